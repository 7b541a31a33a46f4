"""Nothing lost, nothing counted twice: the registry's outbox relay and the
analytics subscriber as processes, with real PostgreSQL and Redis. A
subscriber that starts late, one that restarts, a relay that restarts in the
middle of a stream and a flood past the high-water mark must all end with
exactly the counts the database says."""
import os
import signal
import threading
import time

import linli
from linli import wait_for
from test_registry import setup_festival


def checkin_all(s, c, aid, people, device, start_counter=1, token=None):
    token = token or c.call("issue_token", {"activity_id": aid})["issue_token"]["token"]
    for i, pid in enumerate(people):
        r = c.call("scan", {"token": token, "person_id": pid, "device_id": device,
                            "counter": start_counter + i})
        assert r["ok"], r
    return token


def register(c, cid, n, tag):
    out = []
    for i in range(n):
        r = c.call("register_person", {"community_id": cid, "name": "%s-%03d" % (tag, i)})
        out.append(int(r["register_person"]["id"]))
    return out


def counts(s, cid, aid):
    r = s.redis()
    try:
        return {
            "act_checkins": r.int(s.key("{c%d}" % cid, "act", aid, "checkins")),
            "act_signups": r.int(s.key("{c%d}" % cid, "act", aid, "signups")),
            "com_checkins": r.int(s.key("{c%d}" % cid, "checkins")),
            "city_checkins": r.int(s.key("city", "checkins")),
        }
    finally:
        r.close()


def db_counts(s, aid):
    return {
        "act_checkins": int(s.sql("SELECT count(*) FROM registry.checkins WHERE activity_id = %d" % aid)),
        "act_signups": int(s.sql("SELECT count(*) FROM registry.signups WHERE activity_id = %d AND status = 'confirmed'" % aid)),
    }


def converged(s, cid, aid):
    want = db_counts(s, aid)
    got = counts(s, cid, aid)
    return got["act_checkins"] == want["act_checkins"] and \
        got["act_signups"] == want["act_signups"] and got


def test_late_subscriber_catches_up(s):
    s.start("registry")
    c = s.client()
    cid, aid, p = setup_festival(c, capacity=50, walk_in=True)
    more = register(c, cid, 30, "late")
    assert c.call("sign_up", {"activity_id": aid, "person_ids": more[:10]})["ok"]
    checkin_all(s, c, aid, more, "gate-1")
    # Analytics starts only now and must replay everything.
    s.start("analytics")
    got = wait_for(lambda: converged(s, cid, aid), what="late subscriber converged")
    assert got["act_checkins"] == 30 and got["act_signups"] == 10, got
    assert got["city_checkins"] == 30 and got["com_checkins"] == 30
    r = s.redis()
    today = r.cmd("PFCOUNT", *r.cmd("KEYS", s.key("{c%d}" % cid, "uniq", "*")))
    r.close()
    assert today == 30, today


def test_subscriber_killed_during_traffic_counts_once(s):
    s.start("registry")
    s.start("analytics")
    c = s.client()
    cid, aid, p = setup_festival(c, capacity=100, walk_in=True)
    people = register(c, cid, 60, "rs")
    tok = checkin_all(s, c, aid, people[:20], "gate-2")
    wait_for(lambda: converged(s, cid, aid), what="first 20")

    def produce():
        cl = linli.Client(s.cmd)
        for i, pid in enumerate(people[20:]):
            assert cl.call("scan", {"token": tok, "person_id": pid, "device_id": "gate-2",
                                    "counter": 100 + i})["ok"]
        cl.close()

    # Kill analytics hard while events are being applied, restart it while
    # traffic goes on: it resumes from the position stored with its counts,
    # and the live events it sees again are dropped.
    t = threading.Thread(target=produce)
    t.start()
    time.sleep(0.1)
    s.stop("analytics", sig=signal.SIGKILL)
    s.start("analytics")
    t.join()
    got = wait_for(lambda: converged(s, cid, aid), what="restart converged")
    time.sleep(1.0)
    assert counts(s, cid, aid) == got and got["act_checkins"] == 60, got


def test_plain_restart_is_exact(s):
    s.start("registry")
    s.start("analytics")
    c = s.client()
    cid, aid, p = setup_festival(c, capacity=100, walk_in=True)
    people = register(c, cid, 40, "pr")
    tok = checkin_all(s, c, aid, people[:20], "gate-3")
    wait_for(lambda: converged(s, cid, aid), what="first half")
    s.stop("analytics", sig=signal.SIGKILL)
    checkin_all(s, c, aid, people[20:], "gate-3", start_counter=100, token=tok)
    s.start("analytics")
    got = wait_for(lambda: converged(s, cid, aid), what="after restart")
    time.sleep(1.0)  # heartbeats and replays settle; nothing may be added twice
    assert counts(s, cid, aid) == got and got["act_checkins"] == 40, got


def test_relay_restart_mid_stream(s):
    s.start("registry")
    s.start("analytics")
    c = s.client()
    cid, aid, p = setup_festival(c, capacity=200, walk_in=True)
    people = register(c, cid, 80, "rr")
    tok = checkin_all(s, c, aid, people[:40], "gate-4")
    # Stop the registry (and with it the relay) while events may be unpublished,
    # then start it again: subscribers replay what the old relay never sent.
    s.stop("registry", sig=signal.SIGKILL)
    s.start("registry")
    c = s.client()
    checkin_all(s, c, aid, people[40:], "gate-4", start_counter=1000, token=tok)
    got = wait_for(lambda: converged(s, cid, aid), what="relay restart converged")
    assert got["act_checkins"] == 80, got
    seqs = s.sql("SELECT count(*), min(seq), max(seq), count(DISTINCT seq) FROM registry.outbox")
    n, lo, hi, distinct = (int(x) for x in seqs.split("|"))
    assert lo == 1 and hi == n and distinct == n, seqs


def test_flood_past_high_water_mark(s):
    # Small high-water marks on both ends and a subscriber frozen (SIGSTOP)
    # during a flood: libzmq must drop live events, and the subscriber must
    # notice the gaps and replay once it runs again.
    s.start("registry", extra_env={"LINLI_PUB_SNDHWM": "20"})
    s.start("analytics", extra_env={"LINLI_SUB_RCVHWM": "20"})
    c = s.client()
    cid, aid, p = setup_festival(c, capacity=5000, walk_in=True)
    people = register(c, cid, 3000, "fl")
    wait_for(lambda: converged(s, cid, aid), what="set-up applied")
    tok = c.call("issue_token", {"activity_id": aid})["issue_token"]["token"]
    s.procs["analytics"].send_signal(signal.SIGSTOP)
    try:
        env_list = [c.envelope("scan", {"token": tok, "person_id": pid, "device_id": "flood",
                                        "counter": i + 1}) for i, pid in enumerate(people)]
        for e in env_list:                    # pipelined: send all, then read replies
            c.sock.send(e.SerializeToString())
        for _ in env_list:
            assert linli.reply_dict(c.recv_envelope())["ok"]
    finally:
        s.procs["analytics"].send_signal(signal.SIGCONT)
    got = wait_for(lambda: converged(s, cid, aid), timeout=60, what="flood converged")
    assert got["act_checkins"] == 3000, got
    # The live path really did drop events, and replay made up for them.
    def metrics():
        _, body = linli.http_get(s.http["analytics"], "/metrics")
        return dict(line.rsplit(" ", 1) for line in body.splitlines() if line and line[0] != "#")
    m = wait_for(lambda: (lambda m: float(m["linli_analytics_gaps_total"]) > 0 and m)(metrics()),
                 timeout=5, what="gaps counted")
    assert float(m["linli_analytics_replays_total"]) > 1, m


if __name__ == "__main__":
    linli.run_tests(globals())
