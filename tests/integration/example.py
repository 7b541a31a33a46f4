"""A client in another language, from proto/ alone: signs up, checks in and
reads the live counts of a running Linli (the one `make run` starts).

    /usr/bin/python3 tests/integration/example.py

With the demo festival loaded (var/demo/ids), a new household of 新中社区 (a
mother and her son) registers, signs up together for the neighbourhood cinema
night of 江翠社区 and checks in there; without the demo, the example creates a
community and an activity of its own. Every run registers a new household, so
the counts grow by two, and the registry publishes six events (`linlictl tail`
shows them).

Endpoints come from LINLI_REGISTRY_CMD and LINLI_REDIS (defaults: make run's);
LINLI_VAR names make run's var directory (default: var in this checkout).
"""
import os
import sys
import time

import linli

cmd = os.environ.get("LINLI_REGISTRY_CMD", "tcp://127.0.0.1:7101")
redis_addr = os.environ.get("LINLI_REDIS", "127.0.0.1:56379")
prefix = os.environ.get("LINLI_REDIS_PREFIX", "linli")
var = os.environ.get("LINLI_VAR", os.path.join(linli.ROOT, "var"))


def demo_ids():
    """The demo loader's ids (name=value lines), or {} without the demo."""
    try:
        with open(os.path.join(var, "demo", "ids"), encoding="utf-8") as f:
            return dict(line.strip().split("=", 1) for line in f if "=" in line)
    except OSError:
        return {}


def ok(reply, name):
    """The result of a successful reply; stops with the error otherwise."""
    if not reply.get("ok"):
        sys.exit("example.py: %s failed: %s" % (name, reply.get("error", reply)))
    return reply.get(name, {})


c = linli.Client(cmd, source="example.py")
try:
    ids = demo_ids()
    if "community_xinzhong" in ids and "activity_cinema_jiangcui" in ids:
        cid = int(ids["community_xinzhong"])
        aid = int(ids["activity_cinema_jiangcui"])
    else:
        stamp = int(time.time())
        cid = int(ok(c.call("create_community", {"name": "example.py %d" % stamp, "city": "江门"}),
                     "create_community")["id"])
        start = int(time.time() * 1000) + 86400 * 1000
        aid = int(ok(c.call("create_activity", {
            "community_id": cid, "title": "邻里影院：露天电影之夜", "place": "example.py",
            "zone": "邻里乐", "starts_at": start, "ends_at": start + 7200 * 1000,
            "capacity": 120, "walk_in": True}), "create_activity")["id"])
    act = ok(c.call("get_activity", {"activity_id": aid}), "get_activity")
    print("activity %d: %s" % (aid, act.get("title")))
    # the counters are kept under the activity's community
    acom = int(act["community_id"])
    r = linli.Redis(redis_addr)
    signups_key = "%s:{c%d}:act:%d:signups" % (prefix, acom, aid)
    checkins_key = "%s:{c%d}:act:%d:checkins" % (prefix, acom, aid)
    before = r.int(checkins_key)

    pids = [int(ok(c.call("register_person", {"community_id": cid, "name": name,
                                              "roles": ["ROLE_RESIDENT"]}),
                   "register_person")["id"]) for name in ("邝小燕", "邝子轩")]
    # A household signs up together; join_waitlist: once the 120 seats are
    # gone, later runs wait (a walk-in activity lets them in all the same).
    print("sign_up:", ok(c.call("sign_up", {"activity_id": aid, "person_ids": pids,
                                            "join_waitlist": True}), "sign_up"))
    token = ok(c.call("issue_token", {"activity_id": aid}), "issue_token")["token"]
    # (device, counter) is the scan's nonce: a repeated one gets the first
    # reply and checks nobody in, so every scanner counts its own scans.
    device = "example-%d" % pids[0]
    for n, pid in enumerate(pids, 1):
        print("scan:   ", ok(c.call("scan", {"token": token, "person_id": pid,
                                            "device_id": device, "counter": n,
                                            "expected_id": aid}), "scan"))
    linli.wait_for(lambda: r.int(checkins_key) == before + len(pids), timeout=10,
                   what="the check-in count in Redis")
    print("counts:  activity %d has %d sign-up(s) and %d check-in(s)" % (
        aid, r.int(signups_key), r.int(checkins_key)))
    r.close()
finally:
    c.close()
