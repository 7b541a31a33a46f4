"""A Linli client built from proto/ alone (pyzmq + the official protobuf
runtime), and the harness the integration tests use to run the daemons as
processes against real PostgreSQL and Redis.

    import linli
    c = linli.Client("tcp://127.0.0.1:7101")
    reply = c.call("create_community", {"name": "江翠社区"})
    t = linli.Client("tcp://127.0.0.1:7111", service="timebank")
    reply = t.call("get_totals", {})

The Python protobuf modules are generated from proto/ with protoc on first
import, into $LINLI_PY_OUT or a directory under /tmp.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_protos():
    out = os.environ.get("LINLI_PY_OUT") or os.path.join(
        tempfile.gettempdir(), "linli-py-%d" % os.getuid())
    os.makedirs(out, exist_ok=True)
    protos = sorted(f for f in os.listdir(os.path.join(ROOT, "proto")) if f.endswith(".proto"))
    stamp = max(os.path.getmtime(os.path.join(ROOT, "proto", f)) for f in protos)
    target = os.path.join(out, "envelope_pb2.py")
    if not os.path.exists(target) or os.path.getmtime(target) < stamp:
        subprocess.run(["protoc", "-I" + os.path.join(ROOT, "proto"), "--python_out=" + out]
                       + [os.path.join(ROOT, "proto", f) for f in protos], check=True)
    sys.path.insert(0, out)


_load_protos()
import zmq  # noqa: E402
import envelope_pb2  # noqa: E402
from google.protobuf import json_format  # noqa: E402


class Timeout(Exception):
    pass


class Client:
    """One DEALER connection to a service's command endpoint. service names
    it in each envelope's type ("timebank.get_totals")."""

    def __init__(self, endpoint, source="pytest", ctx=None, service="registry"):
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.source = source
        self.service = service

    def close(self):
        self.sock.close(0)

    def envelope(self, name, args, key=None, community_id=0):
        env = envelope_pb2.Envelope()
        env.id = str(uuid.uuid4())
        env.idempotency_key = key if key is not None else str(uuid.uuid4())
        env.source = self.source
        env.type = self.service + "." + name
        env.occurred_at = int(time.time() * 1000)
        env.community_id = community_id
        env.trace_id = uuid.uuid4().hex[:16]
        json_format.ParseDict({name: args}, env.command, ignore_unknown_fields=False)
        return env

    def send_raw(self, frame):
        self.sock.send(frame)

    def recv_envelope(self, timeout_ms=10000):
        if not self.sock.poll(timeout_ms):
            raise Timeout("no reply within %d ms" % timeout_ms)
        env = envelope_pb2.Envelope()
        env.ParseFromString(self.sock.recv())
        return env

    def request(self, env, timeout_ms=10000):
        """Sends env and returns the reply as a dict (proto field names)."""
        self.sock.send(env.SerializeToString())
        deadline = time.time() + timeout_ms / 1000.0
        while True:
            left = int((deadline - time.time()) * 1000)
            if left <= 0:
                raise Timeout("no reply to %s" % env.type)
            r = self.recv_envelope(left)
            if r.reply.request_id == env.id:
                return reply_dict(r)

    def call(self, name, args=None, key=None, timeout_ms=10000):
        return self.request(self.envelope(name, args or {}, key), timeout_ms)


def reply_dict(env):
    d = json_format.MessageToDict(env.reply, preserving_proto_field_name=True)
    d.setdefault("ok", False)  # proto3 JSON leaves out a false bool
    return d


def event_dict(env):
    return json_format.MessageToDict(env, preserving_proto_field_name=True)


# ---------------------------------------------------------------- harness

def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def http_get(port, path, timeout=5):
    """Returns (status, body) of a GET on 127.0.0.1:port."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(("GET %s HTTP/1.0\r\nHost: localhost\r\n\r\n" % path).encode())
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    return status, body.decode()


def psql(conninfo, sql):
    r = subprocess.run(["psql", "-X", "-q", "-t", "-A", "-v", "ON_ERROR_STOP=1", "-d", conninfo,
                        "-c", sql], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError("psql failed: %s" % r.stderr)
    return r.stdout.strip()


class Redis:
    """Just enough RESP to read counters, so tests need no client library."""

    def __init__(self, addr):
        if addr.startswith("/"):
            self.s = socket.socket(socket.AF_UNIX)
            self.s.connect(addr)
        else:
            host, port = addr.rsplit(":", 1)
            self.s = socket.create_connection((host, int(port)))
        self.f = self.s.makefile("rb")

    def cmd(self, *args):
        out = b"*%d\r\n" % len(args)
        for a in args:
            a = str(a).encode()
            out += b"$%d\r\n%s\r\n" % (len(a), a)
        self.s.sendall(out)
        return self._read()

    def _read(self):
        line = self.f.readline().rstrip(b"\r\n")
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            raise RuntimeError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = self.f.read(n + 2)[:-2]
            return data.decode()
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RuntimeError("bad reply %r" % line)

    def int(self, key):
        v = self.cmd("GET", key)
        return int(v) if v is not None else 0

    def close(self):
        self.s.close()


class System:
    """A registry (and optionally analytics and the timebank) running as
    processes with a database and a Redis key prefix of their own."""

    def __init__(self, name):
        self.name = name
        self.bin = os.path.join(ROOT, os.environ.get("LINLI_BIN", "bin"))
        self.var = os.path.join(os.environ.get("LINLI_TEST_VAR") or tempfile.mkdtemp(), name)
        os.makedirs(self.var, exist_ok=True)
        base = os.environ["LINLI_TEST_PG"]
        self.dbname = "it_%s_%d" % (name, os.getpid())
        psql(base, "DROP DATABASE IF EXISTS %s" % self.dbname)
        psql(base, "CREATE DATABASE %s" % self.dbname)
        self.base_pg = base
        self.pg = base + " dbname=" + self.dbname
        self.redis_addr = os.environ["LINLI_TEST_REDIS"]
        self.prefix = "it%s%d" % (name, os.getpid())
        secret = os.path.join(self.var, "token.secret")
        with open(secret, "w") as f:
            f.write(uuid.uuid4().hex + uuid.uuid4().hex)
        os.chmod(secret, 0o600)
        cert_secret = os.path.join(self.var, "cert.secret")
        with open(cert_secret, "w") as f:
            f.write(uuid.uuid4().hex + uuid.uuid4().hex)
        os.chmod(cert_secret, 0o600)
        self.cmd = "ipc://%s/cmd.sock" % self.var
        self.pub = "ipc://%s/pub.sock" % self.var
        self.timebank_cmd = "ipc://%s/tb-cmd.sock" % self.var
        self.timebank_pub = "ipc://%s/tb-pub.sock" % self.var
        self.http = {"registry": free_port(), "analytics": free_port(), "timebank": free_port()}
        self.env = dict(os.environ,
                        LINLI_PG=self.pg, LINLI_REDIS=self.redis_addr,
                        LINLI_REDIS_PREFIX=self.prefix,
                        LINLI_REGISTRY_CMD=self.cmd, LINLI_REGISTRY_PUB=self.pub,
                        LINLI_REGISTRY_HTTP="127.0.0.1:%d" % self.http["registry"],
                        LINLI_ANALYTICS_HTTP="127.0.0.1:%d" % self.http["analytics"],
                        LINLI_TIMEBANK_CMD=self.timebank_cmd,
                        LINLI_TIMEBANK_PUB=self.timebank_pub,
                        LINLI_TIMEBANK_HTTP="127.0.0.1:%d" % self.http["timebank"],
                        LINLI_TOKEN_SECRET_FILE=secret,
                        LINLI_CERT_SECRET_FILE=cert_secret,
                        LINLI_REGISTRY_MIGRATIONS=os.path.join(ROOT, "services/registry/migrations"),
                        LINLI_TIMEBANK_MIGRATIONS=os.path.join(ROOT, "services/timebank/migrations"),
                        LINLI_LOG_LEVEL=os.environ.get("LINLI_LOG_LEVEL", "info"))
        self.procs = {}
        self.clients = []

    def start(self, daemon, wait_ready=True, extra_env=None):
        log = open(os.path.join(self.var, daemon + ".log"), "ab")
        env = dict(self.env, **(extra_env or {}))
        p = subprocess.Popen([os.path.join(self.bin, "linli-" + daemon)], env=env,
                             stdout=log, stderr=log)
        self.procs[daemon] = p
        if wait_ready:
            self.wait_ready(daemon)
        return p

    def wait_ready(self, daemon, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            p = self.procs[daemon]
            if p.poll() is not None:
                raise RuntimeError("%s exited with %s:\n%s" % (daemon, p.returncode, self.log(daemon)))
            try:
                status, _ = http_get(self.http[daemon], "/readyz", timeout=1)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("%s not ready:\n%s" % (daemon, self.log(daemon)))

    def stop(self, daemon, sig=signal.SIGTERM, timeout=20):
        p = self.procs.pop(daemon, None)
        if not p:
            return None
        if p.poll() is None:
            p.send_signal(sig)
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise RuntimeError("%s did not stop on %s" % (daemon, sig))

    def log(self, daemon):
        try:
            with open(os.path.join(self.var, daemon + ".log"), "rb") as f:
                return f.read().decode(errors="replace")[-4000:]
        except OSError:
            return ""

    def client(self, service="registry"):
        """A client of the registry or, with service="timebank", of the
        timebank (whose readiness needs the registry running too)."""
        endpoint = {"registry": self.cmd, "timebank": self.timebank_cmd}[service]
        c = Client(endpoint, service=service)
        self.clients.append(c)
        return c

    def redis(self):
        return Redis(self.redis_addr)

    def key(self, *parts):
        return ":".join([self.prefix] + [str(p) for p in parts])

    def sql(self, q):
        return psql(self.pg, q)

    def close(self):
        for c in self.clients:
            c.close()
        failed = []
        for d in list(self.procs):
            rc = self.stop(d)
            if rc not in (0, None):
                failed.append("%s exit %s:\n%s" % (d, rc, self.log(d)))
        try:
            r = self.redis()
            keys = r.cmd("KEYS", self.prefix + ":*")
            if keys:
                r.cmd("DEL", *keys)
            r.close()
        except OSError:
            pass
        psql(self.base_pg, "DROP DATABASE IF EXISTS %s WITH (FORCE)" % self.dbname)
        if failed:
            raise RuntimeError("; ".join(failed))


def wait_for(pred, timeout=20, interval=0.05, what="condition"):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError("timed out waiting for %s (last: %r)" % (what, last))


# ------------------------------------------------------------- test runner

def run_tests(module_globals):
    """Runs every test_* function of the calling module, each with a fresh
    System when it takes one argument; prints one line per test and the
    summary line 'N passed, N failed'; exits non-zero on failure."""
    import traceback
    only = os.environ.get("LINLI_TEST_ONLY")
    tests = [(n, f) for n, f in module_globals.items()
             if n.startswith("test_") and callable(f) and (not only or only in n)]
    passed = failed = 0
    for name, fn in tests:
        t0 = time.time()
        system = None
        try:
            if fn.__code__.co_argcount == 1:
                system = System(name[5:][:20])
                fn(system)
            else:
                fn()
            if system:
                system.close()
                system = None
            passed += 1
            print("ok   %-45s %6.2fs" % (name, time.time() - t0), flush=True)
        except Exception:
            failed += 1
            print("FAIL %-45s %6.2fs" % (name, time.time() - t0), flush=True)
            traceback.print_exc()
            if system:
                for d in list(system.procs):
                    print("--- %s log ---\n%s" % (d, system.log(d)))
                try:
                    system.close()
                except Exception as e:  # the test already failed; report why close did too
                    print("close: %s" % e)
    print("%d passed, %d failed" % (passed, failed))
    sys.exit(1 if failed else 0)
