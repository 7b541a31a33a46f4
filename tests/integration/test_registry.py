"""Registry end to end: commands over ZeroMQ from a client built from proto/
alone, the daemon as a process, real PostgreSQL. Fixtures follow the Jianghai
District festival (shared/demo/FESTIVAL.md); the people are invented."""
import os
import subprocess
import threading
import time

import linli
from linli import wait_for

HOUR = 3600 * 1000


def now_ms():
    return int(time.time() * 1000)


def setup_festival(c, capacity=3, walk_in=False):
    """A community, an activity a few days out, and residents."""
    com = c.call("create_community", {"name": "江翠社区", "district": "江海区", "city": "江门"})
    assert com["ok"], com
    cid = int(com["create_community"]["id"])
    start = now_ms() + 3 * 24 * HOUR
    act = c.call("create_activity", {
        "community_id": cid, "title": "邻里共享课堂: 粤剧入门", "place": "江翠社区党群服务中心",
        "zone": "邻里学", "starts_at": start, "ends_at": start + 2 * HOUR,
        "capacity": capacity, "walk_in": walk_in})
    assert act["ok"], act
    aid = int(act["create_activity"]["id"])
    people = []
    for i, name in enumerate(["陈晓梅", "李志强", "黄丽娟", "梁伟明", "吴嘉欣", "何俊杰", "林美玲", "郑国华"]):
        p = c.call("register_person", {"community_id": cid, "name": name,
                                       "phone": "138-0000-%04d" % (100 + i),
                                       "roles": ["ROLE_RESIDENT", "ROLE_VOLUNTEER"]})
        assert p["ok"], p
        people.append(int(p["register_person"]["id"]))
    return cid, aid, people


def activity(c, aid):
    r = c.call("get_activity", {"activity_id": aid})
    assert r["ok"], r
    return r["get_activity"]


def test_signup_capacity_group_and_waitlist(s):
    s.start("registry")
    c = s.client()
    cid, aid, p = setup_festival(c, capacity=3)
    # A household of two signs up together.
    r = c.call("sign_up", {"activity_id": aid, "person_ids": [p[0], p[1]]})
    assert r["ok"] and r["sign_up"]["status"] == "confirmed", r
    assert len(r["sign_up"]["signup_ids"]) == 2
    # A group of two does not fit in the one seat left: all or nothing.
    r = c.call("sign_up", {"activity_id": aid, "person_ids": [p[2], p[3]]})
    assert not r["ok"] and r["error"]["code"] == "activity_full", r
    assert int(activity(c, aid).get("taken", 0)) == 2
    r = c.call("sign_up", {"activity_id": aid, "person_ids": [p[2]]})
    assert r["ok"] and r["sign_up"]["status"] == "confirmed", r
    # Full: join the waiting list.
    r = c.call("sign_up", {"activity_id": aid, "person_ids": [p[4]], "join_waitlist": True})
    assert r["ok"] and r["sign_up"]["status"] == "waitlisted", r
    assert r["sign_up"]["waitlist_position"] == 1
    r = c.call("sign_up", {"activity_id": aid, "person_ids": [p[5]], "join_waitlist": True})
    assert r["sign_up"]["waitlist_position"] == 2, r
    # Duplicate sign-up.
    r = c.call("sign_up", {"activity_id": aid, "person_ids": [p[0]]})
    assert r["error"]["code"] == "already_signed_up", r
    # A cancellation offers the seat to the first waiter ...
    r = c.call("cancel_sign_up", {"activity_id": aid, "person_id": p[1]})
    assert r["ok"], r
    offer = int(r["cancel_sign_up"]["offer_id"])
    assert offer > 0
    info = activity(c, aid)
    assert int(info["taken"]) == 3 and info.get("offers_open") == 1, info
    # ... who declines: it passes on to the next.
    r = c.call("respond_offer", {"offer_id": offer, "accept": False})
    assert r["ok"] and r["respond_offer"]["status"] == "declined", r
    nxt = int(r["respond_offer"]["next_offer_id"])
    assert nxt > 0
    r = c.call("respond_offer", {"offer_id": offer, "accept": True})
    assert r["error"]["code"] == "offer_closed", r
    r = c.call("respond_offer", {"offer_id": nxt, "accept": True})
    assert r["ok"] and r["respond_offer"]["status"] == "accepted", r
    info = activity(c, aid)
    assert int(info["taken"]) == 3 and int(info.get("waiting", 0)) == 0, info


def test_offer_expires_and_passes_on(s):
    s.start("registry", extra_env={"LINLI_SWEEP_MS": "100"})
    c = s.client()
    cid, aid, p = setup_festival(c, capacity=1)
    assert c.call("sign_up", {"activity_id": aid, "person_ids": [p[0]]})["ok"]
    for who in (p[1], p[2]):
        assert c.call("sign_up", {"activity_id": aid, "person_ids": [who],
                                  "join_waitlist": True})["ok"]
    # Shorten the offer time to one second for this activity, then free the seat.
    s.sql("UPDATE registry.activities SET offer_ttl_seconds = 1 WHERE id = %d" % aid)
    r = c.call("cancel_sign_up", {"activity_id": aid, "person_id": p[0]})
    first = int(r["cancel_sign_up"]["offer_id"])
    # The registry's own sweep expires it and offers the seat to the next waiter.
    wait_for(lambda: s.sql("SELECT count(*) FROM registry.offers WHERE activity_id = %d" % aid) == "2",
             what="offer passed on")
    r = c.call("respond_offer", {"offer_id": first, "accept": True})
    assert not r["ok"] and r["error"]["code"] in ("offer_closed", "offer_expired"), r


def test_capacity_holds_under_concurrency(s):
    s.start("registry")
    c = s.client()
    cid, aid, _ = setup_festival(c, capacity=25)
    people = []
    for i in range(120):
        r = c.call("register_person", {"community_id": cid, "name": "居民%03d" % i})
        people.append(int(r["register_person"]["id"]))
    results = []
    lock = threading.Lock()

    def worker(chunk):
        cl = linli.Client(s.cmd)
        for pid in chunk:
            r = cl.call("sign_up", {"activity_id": aid, "person_ids": [pid]})
            with lock:
                results.append(r)
        cl.close()

    threads = [threading.Thread(target=worker, args=(people[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r["ok"]]
    full = [r for r in results if not r["ok"] and r["error"]["code"] == "activity_full"]
    assert len(ok) == 25 and len(full) == 95, (len(ok), len(full))
    assert int(activity(c, aid)["taken"]) == 25
    assert s.sql("SELECT count(*) FROM registry.signups WHERE activity_id = %d AND status = 'confirmed'" % aid) == "25"


def test_concurrent_checkin_batches_settle_conflicts(s):
    """Check-in batches run two at a time; scans that collide across them
    (one person at several gates, a nonce or a key sent twice by different
    clients) still give one check-in each, consistent replies and a
    gap-free event stream."""
    s.start("registry")
    c = s.client()
    cid, aid, _ = setup_festival(c, capacity=8, walk_in=True)
    people = [int(c.call("register_person", {"community_id": cid, "name": "游客%03d" % i})
                  ["register_person"]["id"]) for i in range(150)]
    token = c.call("issue_token", {"activity_id": aid, "valid_seconds": 3600})["issue_token"]["token"]
    replies = []
    lock = threading.Lock()

    def worker(w):
        cl = linli.Client(s.cmd)
        sent = {}
        for i in range(150):
            # first people of this client's own, then everyone from several clients
            pid = people[w * 25 + i] if i < 25 else people[(i * 7 + w * 13) % 150]
            if i % 10 == 3:                               # a nonce another client also sends
                scan = {"device_id": "shared-gate", "counter": i}
            else:
                scan = {"device_id": "gate-%d" % w, "counter": i}
            scan.update({"token": token, "person_id": pid})
            key = "shared-key-%d" % i if i % 10 == 7 else None
            env = cl.envelope("scan", scan, key)
            sent[env.id] = (pid, scan, key)
            cl.send_raw(env.SerializeToString())         # all in flight at once
        for _ in range(len(sent)):
            r = cl.recv_envelope(20000)
            d = linli.reply_dict(r)
            with lock:
                replies.append((sent[r.reply.request_id], d))
        cl.close()

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(replies) == 900
    codes = {}
    for (_, _, _), d in replies:
        code = "ok" if d["ok"] else d["error"]["code"]
        codes[code] = codes.get(code, 0) + 1
    assert set(codes) <= {"ok", "already_checked_in"}, codes
    # one check-in per person, and every accepted reply names a real one
    assert s.sql("SELECT count(*) FROM registry.checkins WHERE activity_id = %d" % aid) == "150"
    assert s.sql("SELECT count(DISTINCT person_id) FROM registry.checkins WHERE activity_id = %d"
                 % aid) == "150"
    ids = {}
    for (pid, scan, key), d in replies:
        # a shared nonce or key gets the first reply, maybe another person's
        if d["ok"] and scan["device_id"] != "shared-gate" and not key:
            ids.setdefault(pid, set()).add(d["scan"]["checkin_id"])
    assert all(len(v) == 1 for v in ids.values()), ids
    stored = dict(line.split("|") for line in s.sql(
        "SELECT person_id || '|' || id FROM registry.checkins WHERE activity_id = %d" % aid).split())
    for pid, v in ids.items():
        assert stored[str(pid)] == next(iter(v)), (pid, v, stored.get(str(pid)))
    # a nonce and a key answer the same wherever they were sent from
    by_nonce, by_key = {}, {}
    for (pid, scan, key), d in replies:
        by_nonce.setdefault((scan["device_id"], scan["counter"]), []).append(d)
        if key:
            by_key.setdefault(key, []).append(d)
    for group in list(by_nonce.values()) + list(by_key.values()):
        first = dict(group[0], request_id="")
        assert all(dict(d, request_id="") == first for d in group), group
    # two batches were in the database at once (the metric is refreshed by
    # the registry's tick)
    def overlapped():
        _, body = linli.http_get(s.http["registry"], "/metrics")
        m = [l for l in body.splitlines() if l.startswith("linli_registry_batches_overlapped_total")]
        return float(m[0].split()[1]) if m else 0
    wait_for(lambda: overlapped() > 0, 5, what="batches overlapped")
    # the events: gap-free, one checked_in per check-in
    assert s.sql("SELECT count(*) = max(seq) FROM registry.outbox") == "t"
    assert s.sql("SELECT count(*) FROM registry.outbox WHERE type = 'checked_in'") == "150"
    # each nonce recorded once
    assert s.sql("SELECT count(*) = count(DISTINCT (device_id, counter)) FROM registry.scans") == "t"
    assert int(s.sql("SELECT count(*) FROM registry.scans")) <= len(by_nonce)


def test_idempotent_retry_survives_restart(s):
    s.start("registry")
    c = s.client()
    cid, aid, p = setup_festival(c, capacity=5)
    first = c.call("sign_up", {"activity_id": aid, "person_ids": [p[0]]}, key="retry-1")
    again = c.call("sign_up", {"activity_id": aid, "person_ids": [p[0]]}, key="retry-1")
    assert first == {**again, "request_id": first["request_id"]}, (first, again)
    assert s.stop("registry") == 0
    s.start("registry")
    c = s.client()
    after = c.call("sign_up", {"activity_id": aid, "person_ids": [p[0]]}, key="retry-1")
    assert after["sign_up"] == first["sign_up"], (first, after)
    assert int(activity(c, aid)["taken"]) == 1
    n = s.sql("SELECT count(*) FROM registry.outbox WHERE type = 'signed_up'")
    assert n == "1", n
    # The same key for another command is a conflict, not a replay.
    r = c.call("cancel_sign_up", {"activity_id": aid, "person_id": p[0]}, key="retry-1")
    assert r["error"]["code"] == "idempotency_conflict", r


def test_bad_input_changes_nothing(s):
    s.start("registry")
    c = s.client()
    cid, aid, p = setup_festival(c)
    before = s.sql("SELECT count(*) FROM registry.outbox")
    cases = [
        ("sign_up", {"activity_id": 999999, "person_ids": [p[0]]}, "not_found"),
        ("sign_up", {"activity_id": aid, "person_ids": [999999]}, "unknown_person"),
        ("sign_up", {"activity_id": aid, "person_ids": []}, "invalid_argument"),
        ("sign_up", {"activity_id": aid, "person_ids": [p[0], p[0]]}, "invalid_argument"),
        ("create_activity", {"community_id": cid, "title": "x", "starts_at": 2000, "ends_at": 1000,
                             "capacity": 5}, "invalid_argument"),
        ("create_activity", {"community_id": cid, "title": "x", "starts_at": 1000, "ends_at": 2000,
                             "capacity": 0}, "invalid_argument"),
        ("create_activity", {"community_id": 424242, "title": "x", "starts_at": 1000,
                             "ends_at": 2000, "capacity": 5}, "not_found"),
        ("register_person", {"community_id": cid, "name": ""}, "invalid_argument"),
        ("register_person", {"community_id": cid, "name": "x", "phone": "call me"}, "invalid_argument"),
        ("create_community", {"name": "江翠社区"}, "already_exists"),
        ("cancel_sign_up", {"activity_id": aid, "person_id": p[7]}, "not_signed_up"),
        ("respond_offer", {"offer_id": 31337, "accept": True}, "not_found"),
        ("redeem_route", {"route_id": 31337, "person_id": p[0]}, "not_found"),
        ("issue_token", {"activity_id": aid, "station_id": 1}, "invalid_argument"),
        ("upload_scans", {"scans": []}, "invalid_argument"),
        ("scan", {"token": "L1.x.y", "person_id": p[0], "scanned_at": now_ms() + 3600 * 1000},
         "invalid_argument"),
    ]
    for name, args, code in cases:
        r = c.call(name, args)
        assert not r["ok"] and r["error"]["code"] == code, (name, args, r)
        assert r["error"]["message"], r
    assert s.sql("SELECT count(*) FROM registry.outbox") == before
    # Closed and not yet open sign-up windows.
    start = now_ms() + 10 * HOUR
    act = c.call("create_activity", {"community_id": cid, "title": "暑期夏令营",
                                     "starts_at": start, "ends_at": start + HOUR, "capacity": 5,
                                     "signup_opens_at": start - HOUR})
    r = c.call("sign_up", {"activity_id": int(act["create_activity"]["id"]), "person_ids": [p[0]]})
    assert r["error"]["code"] == "signup_not_open", r
    past = now_ms() - 10 * HOUR
    act = c.call("create_activity", {"community_id": cid, "title": "邻里影院",
                                     "starts_at": past, "ends_at": past + HOUR, "capacity": 5})
    r = c.call("sign_up", {"activity_id": int(act["create_activity"]["id"]), "person_ids": [p[0]]})
    assert r["error"]["code"] == "signup_closed", r


def test_malformed_frames_get_error_replies(s):
    s.start("registry")
    c = s.client()
    c.send_raw(b"\xff\xff\xff not a protobuf")
    r = linli.reply_dict(c.recv_envelope())
    assert r["error"]["code"] == "malformed_frame", r
    env = c.envelope("get_activity", {"activity_id": 1})
    env.idempotency_key = "k" * 300
    c.send_raw(env.SerializeToString())
    r = linli.reply_dict(c.recv_envelope())
    assert r["error"]["code"] == "invalid_envelope", r
    c.send_raw(b"x" * (1024 * 1024 + 10))
    # Oversized frames are cut off by ZMQ_MAXMSGSIZE (the peer is
    # disconnected); the daemon stays up and answers the next client.
    c2 = s.client()
    assert c2.call("get_activity", {"activity_id": 1})["error"]["code"] == "not_found"


def test_checkin_tokens_nonce_and_refusals(s):
    s.start("registry")
    c = s.client()
    cid, aid, p = setup_festival(c, capacity=5)
    assert c.call("sign_up", {"activity_id": aid, "person_ids": [p[0], p[1]]})["ok"]
    tok = c.call("issue_token", {"activity_id": aid, "valid_seconds": 3600})
    assert tok["ok"], tok
    token = tok["issue_token"]["token"]
    assert tok["issue_token"]["svg"].startswith("<svg") or "<svg" in tok["issue_token"]["svg"][:200]
    scan = {"token": token, "person_id": p[0], "device_id": "scanner-jc-01", "counter": 1}
    r1 = c.call("scan", scan)
    assert r1["ok"] and r1["scan"]["accepted"], r1
    # A retried scan (same nonce, new idempotency key) is one check-in.
    r2 = c.call("scan", scan)
    assert r2["scan"]["checkin_id"] == r1["scan"]["checkin_id"], (r1, r2)
    assert s.sql("SELECT count(*) FROM registry.checkins WHERE person_id = %d" % p[0]) == "1"
    # Entering twice is refused, with the reason kept.
    r = c.call("scan", dict(scan, counter=2))
    assert r["error"]["code"] == "already_checked_in", r
    # Not signed up.
    r = c.call("scan", {"token": token, "person_id": p[5], "device_id": "scanner-jc-01", "counter": 3})
    assert r["error"]["code"] == "not_signed_up", r
    # Forged: another token's signature on this payload.
    head, payload, mac = token.split(".")
    forged = ".".join([head, payload, ("A" if mac[0] != "A" else "B") + mac[1:]])
    r = c.call("scan", {"token": forged, "person_id": p[1], "device_id": "d2", "counter": 1})
    assert r["error"]["code"] == "token_forged", r
    r = c.call("scan", {"token": "garbage", "person_id": p[1], "device_id": "d2", "counter": 2})
    assert r["error"]["code"] == "token_malformed", r
    # Wrong activity: the scanner is checking in for another activity.
    r = c.call("scan", {"token": token, "person_id": p[1], "device_id": "d2", "counter": 3,
                        "expected_id": aid + 1000})
    assert r["error"]["code"] == "wrong_activity", r
    # Exit, then exit again.
    r = c.call("scan", dict(scan, counter=4, direction="DIRECTION_EXIT"))
    assert r["ok"], r
    r = c.call("scan", dict(scan, counter=5, direction="DIRECTION_EXIT"))
    assert r["error"]["code"] == "not_checked_in", r
    refused = s.sql("SELECT string_agg(reason, ',' ORDER BY reason) FROM registry.scans WHERE NOT accepted")
    for reason in ("already_checked_in", "not_signed_up", "token_forged", "token_malformed",
                   "wrong_activity", "not_checked_in"):
        assert reason in refused, refused


def test_scan_lane_keeps_every_value(s):
    """Plain entry scans travel in columns (the scan lane): scanner ids and
    keys with the characters array literals quote, uint64 counters past
    INT64_MAX, retries by key and by nonce, and a scanner id that is not
    UTF-8 (which goes as JSON, with U+FFFD for the bad bytes)."""
    s.start("registry")
    c = s.client()
    cid, aid, p = setup_festival(c, capacity=8, walk_in=True)
    token = c.call("issue_token", {"activity_id": aid, "valid_seconds": 3600})["issue_token"]["token"]
    odd = ['北门 "A" \\ {1,2}', "NULL", "", "gate,with,commas"]
    big = 2 ** 64 - 1
    for i, dev in enumerate(odd):
        key = 'k"%d\\{x}' % i
        scan = {"token": token, "person_id": p[i], "device_id": dev, "counter": str(big - i),
                "expected_id": aid}
        r1 = c.call("scan", scan, key=key)
        assert r1["ok"] and r1["scan"]["accepted"], (dev, r1)
        r2 = c.call("scan", scan, key=key)            # the same command again
        assert dict(r2, request_id="") == dict(r1, request_id=""), (dev, r1, r2)
        if dev:                                       # the same scan under a new key
            r3 = c.call("scan", scan)
            assert r3["scan"]["checkin_id"] == r1["scan"]["checkin_id"], (dev, r1, r3)
        row = s.sql("SELECT device_id || '|' || counter FROM registry.scans WHERE person_id = %d"
                    % p[i])
        assert row == "%s|%d" % (dev, big - i - 2 ** 64), (dev, row)
        assert s.sql("SELECT count(*) FROM registry.checkins WHERE person_id = %d AND device_id = %s"
                      % (p[i], "$q$%s$q$" % dev)) == "1", dev
        assert s.sql("SELECT count(*) FROM registry.command_log WHERE key = $q$%s$q$" % key) == "1"
    ev = s.sql("SELECT payload::json ->> 'device_id' FROM registry.outbox WHERE type = 'checked_in'"
               " AND (payload::json ->> 'person_id')::bigint = %d" % p[0])
    assert ev == odd[0], ev
    # Bytes that are not UTF-8 in the scanner id: patched into the frame.
    env = c.envelope("scan", {"token": token, "person_id": p[5], "device_id": "QQQQ", "counter": 1})
    c.send_raw(env.SerializeToString().replace(b"QQQQ", b"Q\xff\xfeQ"))
    r = c.recv_envelope()
    assert r.reply.ok and r.reply.request_id == env.id, r
    assert s.sql("SELECT device_id FROM registry.scans WHERE person_id = %d" % p[5]) == "Q\ufffd\ufffdQ"


def test_second_registry_on_the_same_socket_refuses_to_start(s):
    """libzmq would let a second daemon take over an ipc:// socket file from
    the first; the daemon refuses to start instead, and the first keeps
    serving."""
    s.start("registry")
    c = s.client()
    assert c.call("create_community", {"name": "外海街道"})["ok"]
    env = dict(s.env, LINLI_REGISTRY_HTTP="127.0.0.1:%d" % linli.free_port())
    p = subprocess.run([os.path.join(s.bin, "linli-registry")], env=env, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode != 0, p
    assert "another process is bound" in p.stderr, p.stderr
    r = c.call("get_activity", {"activity_id": 424242})
    assert r["error"]["code"] == "not_found", r


def test_offline_upload_keeps_original_times(s):
    s.start("registry")
    c = s.client()
    cid, aid, p = setup_festival(c, capacity=8, walk_in=True)
    tok = c.call("issue_token", {"activity_id": aid, "valid_seconds": 120})["issue_token"]
    # Scans taken while the token was valid, uploaded after it expired.
    taken = now_ms() - 1000
    s.sql("SELECT 1")  # keep the connection warm; no effect
    scans = [{"token": tok["token"], "person_id": pid, "device_id": "offline-7",
              "counter": i + 1, "scanned_at": taken - i * 10} for i, pid in enumerate(p[:4])]
    expired_scan = {"token": tok["token"], "person_id": p[4], "device_id": "offline-7",
                    "counter": 99, "scanned_at": int(tok["expires_at"]) + 1000}
    r = c.call("upload_scans", {"scans": scans + [expired_scan]})
    assert r["ok"], r
    results = r["upload_scans"]["results"]
    assert [x.get("accepted", False) for x in results] == [True] * 4 + [False], results
    assert results[4]["reason"] == "token_expired"
    got = s.sql("SELECT string_agg(checked_in_at::text, ',' ORDER BY checked_in_at DESC) FROM registry.checkins")
    assert got == ",".join(str(x["scanned_at"]) for x in scans), got
    # Uploading the same batch again creates nothing new.
    r2 = c.call("upload_scans", {"scans": scans})
    assert [x["checkin_id"] for x in r2["upload_scans"]["results"]] == \
        [x["checkin_id"] for x in results[:4]]
    assert s.sql("SELECT count(*) FROM registry.checkins") == "4"


def test_stamp_route_and_reward_once(s):
    s.start("registry")
    c = s.client()
    cid, aid, p = setup_festival(c)
    stations = ["顺天里144号", "江南路", "彩虹村", "江门儿童公园", "江海广场", "新中社区新南小区"]
    r = c.call("create_route", {"community_id": cid, "name": "City Walk 打卡路线",
                                "reward": "限定版纪念品", "stations": stations})
    assert r["ok"], r
    rid = int(r["create_route"]["id"])
    sids = [int(x) for x in r["create_route"]["station_ids"]]
    assert len(sids) == 6
    r = c.call("redeem_route", {"route_id": rid, "person_id": p[0]})
    assert r["error"]["code"] == "route_incomplete", r
    for n, sid in enumerate(sids, 1):
        tok = c.call("issue_token", {"station_id": sid})["issue_token"]["token"]
        r = c.call("scan", {"token": tok, "person_id": p[0], "device_id": "phone-%d" % p[0],
                            "counter": n})
        assert r["ok"] and r["scan"]["stamps"] == n and r["scan"]["stations"] == 6, r
        if n == 1:
            again = c.call("scan", {"token": tok, "person_id": p[0],
                                    "device_id": "phone-%d" % p[0], "counter": 100})
            assert again["error"]["code"] == "already_checked_in", again
    r = c.call("redeem_route", {"route_id": rid, "person_id": p[0]})
    assert r["ok"] and r["redeem_route"]["reward"] == "限定版纪念品", r
    r = c.call("redeem_route", {"route_id": rid, "person_id": p[0]})
    assert r["error"]["code"] == "already_redeemed", r


def test_events_published_in_order_with_replay(s):
    s.start("registry")
    c = s.client()
    setup_festival(c)
    n = int(s.sql("SELECT count(*) FROM registry.outbox"))
    def published():
        _, body = linli.http_get(s.http["registry"], "/metrics")
        return "\nlinli_registry_events_published_total %d\n" % n in "\n" + body
    wait_for(published, what="relay published every event")
    r = c.call("replay", {"stream": "registry", "after_sequence": 0, "limit": 1000})
    events = r["replay"]["events"]
    assert [int(e["sequence"]) for e in events] == list(range(1, n + 1))
    assert events[0]["event"].keys() == {"community_created"}
    # Personal data never leaves in events.
    for e in events:
        if "person_registered" in e["event"]:
            assert "phone" not in e["event"]["person_registered"]
    r = c.call("replay", {"stream": "registry", "after_sequence": n - 2, "limit": 1})
    assert len(r["replay"]["events"]) == 1 and r["replay"]["more"] is True
    r = c.call("replay", {"stream": "nope"})
    assert r["error"]["code"] == "not_found"


def test_ops_endpoints_and_clean_shutdown(s):
    import subprocess
    out = subprocess.run([s.bin + "/linli-registry", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("linli-registry ")
    out = subprocess.run([s.bin + "/linli-registry", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "LINLI_PG" in out.stdout
    s.start("registry")
    port = s.http["registry"]
    assert linli.http_get(port, "/healthz")[0] == 200
    assert linli.http_get(port, "/readyz")[0] == 200
    c = s.client()
    setup_festival(c)
    status, body = linli.http_get(port, "/metrics")
    assert status == 200 and "linli_registry_commands_total" in body
    assert linli.http_get(port, "/nope")[0] == 404
    # Phones never appear in the log.
    assert "138-0000-01" not in s.log("registry")
    assert s.stop("registry") == 0


if __name__ == "__main__":
    linli.run_tests(globals())
