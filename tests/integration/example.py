"""A client in another language, from proto/ alone: signs up, checks in and
reads the live counts of a running Linli (the one `make run` starts).

    /usr/bin/python3 tests/integration/example.py

Endpoints come from LINLI_REGISTRY_CMD and LINLI_REDIS (defaults: make run's).
"""
import os
import time

import linli

cmd = os.environ.get("LINLI_REGISTRY_CMD", "tcp://127.0.0.1:7101")
redis_addr = os.environ.get("LINLI_REDIS", "127.0.0.1:56379")
prefix = os.environ.get("LINLI_REDIS_PREFIX", "linli")

c = linli.Client(cmd, source="example.py")
stamp = int(time.time())
com = c.call("create_community", {"name": "新中社区 example %d" % stamp, "district": "江海区",
                                  "city": "江门"})
cid = int(com["create_community"]["id"])
start = int(time.time() * 1000) + 86400 * 1000
act = c.call("create_activity", {"community_id": cid, "title": "邻里敲门乐", "place": "新南小区",
                                 "starts_at": start, "ends_at": start + 7200 * 1000,
                                 "capacity": 20})
aid = int(act["create_activity"]["id"])
pid = int(c.call("register_person", {"community_id": cid, "name": "张小燕",
                                     "roles": ["ROLE_VOLUNTEER"]})["register_person"]["id"])
print("sign_up:", c.call("sign_up", {"activity_id": aid, "person_ids": [pid]}))
token = c.call("issue_token", {"activity_id": aid})["issue_token"]["token"]
print("scan:   ", c.call("scan", {"token": token, "person_id": pid, "device_id": "example",
                                  "counter": 1}))
r = linli.Redis(redis_addr)
key = "%s:{c%d}:act:%d:checkins" % (prefix, cid, aid)
linli.wait_for(lambda: r.int(key) == 1, timeout=10, what="the count in Redis")
print("counts:  activity %d has %d sign-up(s) and %d check-in(s)" % (
    aid, r.int("%s:{c%d}:act:%d:signups" % (prefix, cid, aid)), r.int(key)))
