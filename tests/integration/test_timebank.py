"""Timebank end to end: the registry and the timebank as processes, real
PostgreSQL, commands over ZeroMQ from a client built from proto/ alone. The
timebank learns communities, people and activities from the registry's
events. Places follow the Jianghai District festival (shared/demo/FESTIVAL.md);
the people are invented.

The property test runs thousands of random operations from several clients
at once and then checks the ledger's invariants in the database."""
import random
import threading
import time

import linli
from linli import wait_for

HOUR = 3600 * 1000


def now_ms():
    return int(time.time() * 1000)


def ok(r, what=""):
    assert r["ok"], (what, r)
    return r


def person(reg, cid, name, roles, i):
    r = ok(reg.call("register_person", {"community_id": cid, "name": name,
                                        "phone": "138-0000-%04d" % i, "roles": roles}))
    return int(r["register_person"]["id"])


def community(reg, name):
    r = ok(reg.call("create_community", {"name": name, "district": "江海区", "city": "江门"}))
    return int(r["create_community"]["id"])


def known(tb, pid):
    """True once the timebank has learnt the person (from registry events)."""
    r = tb.call("get_balance", {"person_id": pid})
    return r["ok"]


def balance(tb, pid):
    return int(ok(tb.call("get_balance", {"person_id": pid}))["get_balance"].get("balance", 0))


def credit(tb, organiser, pid, minutes, started):
    """Records hours for pid and approves them; returns the transfer id."""
    r = ok(tb.call("record_hours", {"actor_id": organiser, "person_id": pid, "minutes": minutes,
                                    "started_at": started, "field": "elderly care"}))
    rec = int(r["record_hours"]["record_id"])
    r = ok(tb.call("approve_hours", {"actor_id": organiser, "record_id": rec}))
    assert r["approve_hours"]["state"] == "credited", r
    return int(r["approve_hours"]["transfer_id"])


def town(s, n_per_community=4):
    """Two communities with an organiser each and volunteers, known to the
    timebank. Returns (registry client, timebank client, communities,
    organisers, volunteers by community)."""
    s.start("registry")
    s.start("timebank")
    reg = s.client()
    tb = s.client("timebank")
    cids = [community(reg, "江翠社区"), community(reg, "新中社区")]
    orgs, vols, i = [], [], 0
    for cid in cids:
        orgs.append(person(reg, cid, "组织者%d" % cid, ["ROLE_ORGANISER"], i))
        i += 1
        vs = []
        for k in range(n_per_community):
            vs.append(person(reg, cid, "志愿者%d-%d" % (cid, k), ["ROLE_VOLUNTEER", "ROLE_RESIDENT"], i))
            i += 1
        vols.append(vs)
    last = vols[-1][-1]
    wait_for(lambda: known(tb, last), what="timebank to learn the people")
    return reg, tb, cids, orgs, vols


def test_hours_credited_gifted_spent_reversed(s):
    reg, tb, cids, orgs, vols = town(s)
    a, b = vols[0][0], vols[0][1]
    started = now_ms() - 5 * HOUR
    # a volunteer cannot approve their own hours
    r = ok(tb.call("record_hours", {"actor_id": a, "person_id": a, "minutes": 90,
                                    "started_at": started}))
    rec = int(r["record_hours"]["record_id"])
    r = tb.call("approve_hours", {"actor_id": a, "record_id": rec})
    assert not r["ok"] and r["error"]["code"] == "self_approval", r
    r = ok(tb.call("approve_hours", {"actor_id": orgs[0], "record_id": rec}))
    assert r["approve_hours"]["state"] == "credited", r
    assert balance(tb, a) == 90
    # gift to family, then spend at a provider of the other community
    r = ok(tb.call("gift", {"from_person_id": a, "to_person_id": b, "minutes": 30, "memo": "for mum"}))
    gift_id = int(r["gift"]["transfer_id"])
    assert int(r["gift"]["from_balance"]) == 60 and int(r["gift"]["to_balance"]) == 30, r
    ok(tb.call("spend", {"person_id": b, "provider_id": vols[1][0], "minutes": 20,
                         "service": "appliance repair"}))
    assert balance(tb, b) == 10 and balance(tb, vols[1][0]) == 20
    r = tb.call("spend", {"person_id": b, "minutes": 11, "service": "lessons"})
    assert not r["ok"] and r["error"]["code"] == "insufficient_balance", r
    # a reversal needs the hours to still be there
    r = tb.call("reverse", {"actor_id": orgs[0], "transfer_id": gift_id, "reason": "sent twice"})
    assert not r["ok"] and r["error"]["code"] == "insufficient_balance", r
    ok(tb.call("gift", {"from_person_id": a, "to_person_id": b, "minutes": 20}))
    r = ok(tb.call("reverse", {"actor_id": orgs[0], "transfer_id": gift_id, "reason": "sent twice"}))
    assert r["reverse"]["kind"] == "reversal"
    assert balance(tb, a) == 70 and balance(tb, b) == 0
    # the statement shows every line with its running balance
    st = ok(tb.call("get_statement", {"person_id": a}))["get_statement"]
    assert [int(x["amount"]) for x in st["lines"]] == [90, -30, -20, 30], st
    assert [int(x["balance"]) for x in st["lines"]] == [90, 60, 40, 70], st
    assert int(st["closing_balance"]) == 70, st
    tot = ok(tb.call("get_totals", {}))["get_totals"]
    assert int(tot["credited_minutes"]) == 90 and int(tot["spent_minutes"]) == 20, tot
    # every movement was published on the timebank's stream
    rr = ok(tb.call("replay", {"stream": "timebank", "after_sequence": 0, "limit": 100}))
    kinds = [e["event"] and list(e["event"].keys())[0] for e in rr["replay"]["events"]]
    for k in ("hours_recorded", "hours_reviewed", "credited", "gifted", "spent", "reversed"):
        assert k in kinds, (k, kinds)


def test_retry_returns_first_reply(s):
    reg, tb, cids, orgs, vols = town(s)
    a, b = vols[0][0], vols[0][1]
    credit(tb, orgs[0], a, 120, now_ms() - 3 * HOUR)
    env = tb.envelope("gift", {"from_person_id": a, "to_person_id": b, "minutes": 45},
                      key="gift-retry-1")
    first = tb.request(env)
    again = tb.request(tb.envelope("gift", {"from_person_id": a, "to_person_id": b, "minutes": 45},
                                   key="gift-retry-1"))
    assert first["ok"] and again["gift"] == first["gift"], (first, again)
    assert balance(tb, a) == 75 and balance(tb, b) == 45
    n = s.sql("SELECT count(*) FROM timebank.transfers WHERE command_key = 'gift-retry-1'")
    assert n.strip() == "1", n
    # ... also after a restart
    s.stop("timebank")
    s.start("timebank")
    tb2 = s.client("timebank")
    again = tb2.request(tb2.envelope("gift", {"from_person_id": a, "to_person_id": b, "minutes": 45},
                                     key="gift-retry-1"))
    assert again["gift"] == first["gift"], again
    assert balance(tb2, a) == 75


def test_checkin_proposes_hours(s):
    reg, tb, cids, orgs, vols = town(s)
    start = now_ms() - 2 * HOUR
    act = ok(reg.call("create_activity", {
        "community_id": cids[0], "title": "邻里敲门乐", "place": "江翠社区",
        "zone": "邻里助", "starts_at": start, "ends_at": start + HOUR, "capacity": 10,
        "walk_in": True}))
    aid = int(act["create_activity"]["id"])
    tok = ok(reg.call("issue_token", {"activity_id": aid}))["issue_token"]["token"]
    v = vols[0][2]
    resident = person(reg, cids[0], "街坊", ["ROLE_RESIDENT"], 800)
    # a restart: the volunteers it knows come from the database
    s.stop("timebank")
    s.start("timebank")
    tb = s.client("timebank")
    n = 0
    for who in (resident, v):
        n += 1
        ok(reg.call("scan", {"token": tok, "person_id": who, "device_id": "door-1", "counter": n,
                             "scanned_at": start + 60000}))
        n += 1
        ok(reg.call("scan", {"token": tok, "person_id": who, "device_id": "door-1", "counter": n,
                             "scanned_at": start + 100 * 60000, "direction": "DIRECTION_EXIT"}))

    def proposed():
        r = ok(tb.call("list_records", {"person_id": v}))
        return r["list_records"].get("records")
    recs = wait_for(proposed, what="a proposed record")
    assert len(recs) == 1, recs
    # the resident attended: no record, no stay
    assert s.sql("SELECT count(*) FROM timebank.records WHERE person_id = %d" % resident) == "0"
    assert s.sql("SELECT count(*) FROM timebank.open_stays") == "0"
    rec = recs[0]
    assert rec["source"] == "checkin" and rec["state"] == "pending", rec
    assert int(rec["minutes"]) == 60 and rec.get("needs_review"), rec  # capped at 1 hour
    r = ok(tb.call("approve_hours", {"actor_id": orgs[0], "record_id": int(rec["id"])}))
    assert r["approve_hours"]["state"] == "credited"
    assert balance(tb, v) == 60
    h = ok(tb.call("get_history", {"person_id": v}))["get_history"]
    assert h["items"][0]["title"] == "邻里敲门乐" and int(h["total_minutes"]) == 60, h


def test_restart_catches_up_on_registry_events(s):
    reg, tb, cids, orgs, vols = town(s, 2)
    s.stop("timebank")
    later = [person(reg, cids[1], "新居民%d" % k, ["ROLE_VOLUNTEER"], 500 + k) for k in range(5)]
    s.start("timebank")
    tb = s.client("timebank")
    wait_for(lambda: known(tb, later[-1]), what="people registered while the timebank was down")
    n = s.sql("SELECT count(*) FROM timebank.people")
    assert n.strip() == str(2 + 2 * 2 + 5), n
    pos = s.sql("SELECT seq FROM timebank.inbox WHERE stream = 'registry'").strip()
    last = s.sql("SELECT max(seq) FROM registry.outbox").strip()
    assert pos == last, (pos, last)


def test_gap_in_applied_events_resyncs(s):
    """The database's position falls behind the subscriber's (as after a
    run that was lost): the next run meets a gap, and the timebank
    resubscribes from the stored position and replays, applying nothing
    twice."""
    reg, tb, cids, orgs, vols = town(s, 2)
    s.sql("UPDATE timebank.inbox SET seq = seq - 3 WHERE stream = 'registry'")
    late = person(reg, cids[0], "迟到者", ["ROLE_VOLUNTEER"], 900)
    wait_for(lambda: known(tb, late), what="the person registered after the gap")
    pos = s.sql("SELECT seq FROM timebank.inbox WHERE stream = 'registry'").strip()
    last = s.sql("SELECT max(seq) FROM registry.outbox").strip()
    assert pos == last, (pos, last)
    assert s.sql("SELECT count(*) FROM timebank.accounts WHERE kind = 'person'").strip() == \
        str(2 + 2 * 2 + 1)
    _, metrics = linli.http_get(s.http["timebank"], "/metrics")
    resyncs = [line for line in metrics.splitlines()
               if line.startswith("linli_timebank_registry_resyncs_total")]
    assert resyncs and int(float(resyncs[0].split()[1])) >= 1, resyncs


def test_registry_history_restart_stops_events(s):
    """A new epoch on the registry's stream means its ids no longer name
    what the ledger holds: the timebank stops applying its events, says so
    on /readyz, and keeps answering commands."""
    reg, tb, cids, orgs, vols = town(s, 2)
    credit(tb, orgs[0], vols[0][0], 60, now_ms() - 2 * HOUR)
    s.stop("registry")
    s.sql("UPDATE registry.outbox_stream SET epoch = epoch + 1")
    s.start("registry")
    reg = s.client()
    stranger = person(reg, cids[0], "新纪元", ["ROLE_VOLUNTEER"], 700)

    def halted():
        status, body = linli.http_get(s.http["timebank"], "/readyz")
        return status != 200 and "history restarted" in body
    wait_for(halted, what="the timebank to report the restart")
    assert not known(tb, stranger)
    assert balance(tb, vols[0][0]) == 60
    assert "history restarted" in s.log("timebank")


def test_moving_hours_needs_an_idempotency_key(s):
    reg, tb, cids, orgs, vols = town(s, 2)
    a, b = vols[0]
    credit(tb, orgs[0], a, 60, now_ms() - 2 * HOUR)
    r = tb.request(tb.envelope("gift", {"from_person_id": a, "to_person_id": b, "minutes": 5},
                               key=""))
    assert not r["ok"] and r["error"]["code"] == "invalid_argument", r
    assert "idempotency key" in r["error"]["message"], r
    r = tb.request(tb.envelope("get_balance", {"person_id": a}, key=""))
    assert r["ok"] and int(r["get_balance"]["balance"]) == 60, r


def test_certificate_verifies_and_forgery_fails(s):
    reg, tb, cids, orgs, vols = town(s, 2)
    v = vols[0][0]
    credit(tb, orgs[0], v, 150, now_ms() - 26 * HOUR)
    credit(tb, orgs[0], v, 90, now_ms() - 3 * HOUR)
    c = ok(tb.call("issue_certificate", {"actor_id": orgs[0], "person_id": v,
                                          "holder_name": "陈晓梅", "id_number": "440703198001011234"}))
    cert = c["issue_certificate"]
    assert int(cert["total_minutes"]) == 240, cert
    assert cert["id_number_masked"].endswith("1234") and "19800101" not in cert["id_number_masked"]
    assert "<html" in cert["html"].lower() and cert["code"] in cert["html"], cert["code"]
    code = cert["code"]
    r = ok(tb.call("verify_certificate", {"code": code}))["verify_certificate"]
    assert r.get("valid") is True and int(r["total_minutes"]) == 240, r
    # one character changed: not valid
    i = len(code) - 3
    forged = code[:i] + ("A" if code[i] != "A" else "B") + code[i + 1:]
    r = ok(tb.call("verify_certificate", {"code": forged}))["verify_certificate"]
    assert not r.get("valid") and r.get("problem"), r
    # a code made with another key: not valid
    s.stop("timebank")
    other = s.var + "/other.secret"
    with open(other, "w") as f:
        f.write("another-key-another-key-another-key")
    s.start("timebank", extra_env={"LINLI_CERT_SECRET_FILE": other})
    tb = s.client("timebank")
    r = ok(tb.call("verify_certificate", {"code": code}))["verify_certificate"]
    assert not r.get("valid"), r


def test_bad_input_changes_nothing(s):
    reg, tb, cids, orgs, vols = town(s, 2)
    a, b = vols[0]
    credit(tb, orgs[0], a, 60, now_ms() - 2 * HOUR)
    before = s.sql("SELECT count(*) FROM timebank.entries")
    cases = [
        ("gift", {"from_person_id": a, "to_person_id": a, "minutes": 5}, "self_transfer"),
        ("gift", {"from_person_id": a, "to_person_id": b, "minutes": 0}, "invalid_amount"),
        ("gift", {"from_person_id": a, "to_person_id": 999999, "minutes": 5}, "not_found"),
        ("gift", {"from_person_id": a, "to_person_id": b, "minutes": 4000000000}, "amount_too_large"),
        ("spend", {"person_id": a, "minutes": 61, "service": "x"}, "insufficient_balance"),
        ("record_hours", {"actor_id": orgs[0], "person_id": a, "minutes": 1800,
                          "started_at": now_ms() - HOUR}, "record_limit"),
        ("get_statement", {"person_id": a, "from": 10, "to": 5}, "invalid_period"),
    ]
    for name, args, code in cases:
        r = tb.call(name, args)
        assert not r["ok"] and r["error"]["code"] == code, (name, args, r)
        assert r["error"]["message"], r
    assert s.sql("SELECT count(*) FROM timebank.entries") == before


# ------------------------------------------------------------ property test

OPS = 450          # per client
CLIENTS = 6
WINDOW = 8         # commands in flight per client


def test_property_concurrent_ledger(s):
    """Random gifts, spends, reversals and credited records from several
    pipelining clients at once, some sent twice with one key; then every
    invariant of the ledger is checked in the database."""
    reg, tb, cids, orgs, vols = town(s, 12)
    # a little overdraft in one community, none in the other
    rules = ok(tb.call("get_rules", {"community_id": cids[0]}))["get_rules"]["rules"]
    rules["overdraft_minutes"] = 60
    for k in ("changed_at", "changed_by"):
        rules.pop(k, None)
    ok(tb.call("set_rules", {"actor_id": orgs[0], "rules": rules, "reason": "newcomers' credit"}))
    for ci, vs in enumerate(vols):
        for v in vs:
            credit(tb, orgs[ci], v, 600 + 10 * (v % 7), now_ms() - 30 * HOUR)
    everyone = [(v, ci) for ci, vs in enumerate(vols) for v in vs]
    acked = {}       # key -> transfer id of an acknowledged movement
    refused = {}     # key -> error code
    transfers = []   # acknowledged movements, for reversals to pick from
    twins = []       # (first reply, second reply) of commands sent twice
    lock = threading.Lock()
    errors = []

    def client(n):
        rnd = random.Random(1000 + n)
        c = linli.Client(s.timebank_cmd, source="prop%d" % n, service="timebank")
        pending = {}   # envelope id -> (name, key, twin slot)
        sent = 0
        try:
            while sent < OPS or pending:
                while sent < OPS and len(pending) < WINDOW:
                    name, args = pick(rnd)
                    key = "p%d-%d" % (n, sent)
                    env = c.envelope(name, args, key=key)
                    c.sock.send(env.SerializeToString())
                    pending[env.id] = (name, key, None)
                    if rnd.random() < 0.08:      # the same command again, same key
                        env2 = c.envelope(name, args, key=key)
                        c.sock.send(env2.SerializeToString())
                        slot = [None, None]
                        pending[env.id] = (name, key, (slot, 0))
                        pending[env2.id] = (name, key, (slot, 1))
                    sent += 1
                r = c.recv_envelope(30000)
                name, key, twin = pending.pop(r.reply.request_id)
                d = linli.reply_dict(r)
                if twin:
                    slot, idx = twin
                    slot[idx] = d
                    if slot[0] is not None and slot[1] is not None:
                        with lock:
                            twins.append((slot[0], slot[1]))
                with lock:
                    if d["ok"] and name in ("gift", "spend", "reverse"):
                        tid = int(d[name]["transfer_id"])
                        assert acked.get(key, tid) == tid, (key, acked.get(key), tid)
                        acked[key] = tid
                        if name != "reverse":
                            transfers.append(tid)
                    elif not d["ok"]:
                        assert d["error"]["code"] != "internal", d
                        refused[key] = d["error"]["code"]
        except Exception as e:  # reported by the main thread
            errors.append(repr(e))
        finally:
            c.close()

    def pick(rnd):
        (a, ca), (b, cb) = rnd.sample(everyone, 2)
        x = rnd.random()
        if x < 0.40:
            return "gift", {"from_person_id": a, "to_person_id": b, "minutes": rnd.randint(1, 90)}
        if x < 0.70:
            if rnd.random() < 0.5:
                return "spend", {"person_id": a, "provider_id": b, "minutes": rnd.randint(1, 90),
                                 "service": "home repair"}
            return "spend", {"person_id": a, "community_id": rnd.choice(cids),
                             "minutes": rnd.randint(1, 90), "service": "elderly care"}
        if x < 0.85:
            with lock:
                t = rnd.choice(transfers) if transfers else 1
            return "reverse", {"actor_id": rnd.choice(orgs), "transfer_id": t,
                               "reason": "property test"}
        if x < 0.97:
            return "gift", {"from_person_id": a, "to_person_id": b,
                            "minutes": rnd.choice([0, 60000001, 100000])}
        return "spend", {"person_id": a, "provider_id": a, "minutes": 5, "service": "x"}

    threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
    t0 = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.time() - t0
    assert not errors, errors
    total = CLIENTS * OPS
    assert len(acked) + len(refused) == total, (len(acked), len(refused), total)
    assert len(acked) > total // 4, "too few movements were accepted to test anything"
    assert {"insufficient_balance", "invalid_amount", "amount_too_large"} <= set(refused.values()), \
        set(refused.values())
    print("  %d commands from %d clients in %.1fs: %d moved, %d refused (%s), %d sent twice"
          % (total, CLIENTS, took, len(acked), len(refused),
             ", ".join(sorted(set(refused.values()))), len(twins)))

    # the same command twice gets the same reply
    for first, second in twins:
        first.pop("request_id", None)
        second.pop("request_id", None)
        assert first == second, (first, second)

    # every balance is the sum of its entries
    bad = s.sql("""SELECT count(*) FROM timebank.accounts a
                    WHERE a.balance <> coalesce((SELECT sum(amount) FROM timebank.entries e
                                                  WHERE e.account_id = a.id), 0)""")
    assert bad.strip() == "0", bad
    # every movement balances to zero
    bad = s.sql("""SELECT count(*) FROM (SELECT transfer_id FROM timebank.entries
                    GROUP BY transfer_id HAVING sum(amount) <> 0) x""")
    assert bad.strip() == "0", bad
    assert s.sql("SELECT coalesce(sum(amount), 0) FROM timebank.entries").strip() == "0"
    # no member below the limit, now or after any entry
    bad = s.sql("""SELECT count(*) FROM timebank.entries e
                    JOIN timebank.accounts a ON a.id = e.account_id
                    JOIN timebank.rules r ON r.community_id = a.community_id
                   WHERE a.kind = 'person' AND e.balance < -r.overdraft_minutes""")
    assert bad.strip() == "0", bad
    # running balances are right
    bad = s.sql("""SELECT count(*) FROM (SELECT balance, sum(amount) OVER
                    (PARTITION BY account_id ORDER BY id) AS run FROM timebank.entries) x
                   WHERE balance <> run""")
    assert bad.strip() == "0", bad
    # every acknowledged command is in the ledger exactly once, refused ones not at all
    rows = s.sql("""SELECT command_key, id FROM timebank.transfers
                     WHERE command_key LIKE 'p%-%'""").split("\n")
    in_ledger = {}
    for line in rows:
        if line.strip():
            k, tid = line.split("|")
            assert k not in in_ledger, "key twice in the ledger: " + k
            in_ledger[k] = int(tid)
    assert in_ledger == acked, (len(in_ledger), len(acked))
    assert not (set(refused) & set(in_ledger))
    # a movement is reversed at most once
    bad = s.sql("""SELECT count(*) FROM (SELECT reverses_id FROM timebank.transfers
                    WHERE reverses_id IS NOT NULL GROUP BY 1 HAVING count(*) > 1) x""")
    assert bad.strip() == "0", bad
    # one event per movement, numbered without gaps
    n_moves = s.sql("SELECT count(*) FROM timebank.transfers").strip()
    n_events = s.sql("""SELECT count(*) FROM timebank.outbox
                         WHERE type IN ('credited', 'gifted', 'spent', 'reversed')""").strip()
    assert n_moves == n_events, (n_moves, n_events)
    gaps = s.sql("SELECT max(seq) - count(*) FROM timebank.outbox").strip()
    assert gaps == "0", gaps


if __name__ == "__main__":
    linli.run_tests(globals())
