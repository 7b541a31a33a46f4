/* Unit tests for common/outbox.c and common/sub.c together, with no mocks:
 * a real PostgreSQL (LINLI_TEST_PG, a libpq conninfo), a database of our
 * own (test_outbox_<pid>, on LINLI_TEST_PG's server) holding the registry's
 * real schema, applied from services/registry/migrations (or
 * LINLI_REGISTRY_MIGRATIONS) by migrate_apply as the daemon does: its
 * outbox tables, the functions that number events as they are written
 * (registry.s_outbox_turn / registry.s_emit) and the relay's
 * registry.outbox_state / registry.outbox_replay, for the stream
 * "registry". A relay publishes on a real PUB socket and answers Replay
 * through a real command server, and subscribers run in the same
 * event_base. Events are written by ordinary transactions on side
 * connections through registry.s_emit, as the registry's commands do. Every
 * wait runs the loop under a deadline, so a hang fails the test. The
 * database is dropped at the end, also after a failure. Without
 * LINLI_TEST_PG every test that needs the server is skipped. */
#include "bus.h"
#include "cmdcli.h"
#include "cmdsrv.h"
#include "config.h"
#include "db.h"
#include "log.h"
#include "migrate.h"
#include "outbox.h"
#include "sub.h"
#include "util.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/event.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#define S_SCHEMA "registry"       /* the schema the migrations are applied into */
#define S_STREAM "registry"       /* the stream 001_schema.sql creates */
#define S_MIGRATIONS "services/registry/migrations" /* from the repository root */
#define S_DEADLINE_MS 8000        /* one wait; the relay's timer ticks every second */
#define S_MAX_EVENTS 600          /* events one recorder keeps */

static const char *s_conninfo;  /* NULL: no server, skip; the server's own database */
static char s_dbname[64];       /* our database, test_outbox_<pid> */
static char *s_db_conninfo;     /* s_conninfo with dbname = s_dbname */
static PGconn *s_side;          /* blocking connection for set-up, inserts and checks */
static uint64_t s_next_epoch;   /* each test's stream starts a fresh epoch */

#define S_REQUIRE_PG()                                                                       \
    do {                                                                                     \
        if (!s_conninfo)                                                                     \
            skip();                                                                          \
    } while (0)

/* One test's loop, sockets and relay. */
typedef struct {
    struct event_base *base;
    void *zctx;
    bus_sock_t *pub;             /* the relay's PUB */
    cmdsrv_t *srv;               /* answers Replay with the current relay */
    outbox_t *ob;                /* NULL while "the service" is down */
    char *pub_ep, *cmd_ep;
    struct event *deadline;
    bool timed_out;
    uint64_t epoch;              /* the stream's epoch in this test */
    unsigned replays_served;     /* Replay commands handed to the relay */
    struct s_rec *recs[4];       /* subscribers, freed at teardown even when a test fails */
    bus_sock_t *raw;             /* a plain SUB, when a test uses one */
    cmdcli_t *cli;               /* a plain command client, when a test uses one */
    PGconn *conns[2];            /* more side connections, when a test uses them */
} s_env_t;

/* What one subscriber applied. */
typedef struct s_rec {
    sub_t *sub;
    int n;                       /* events applied */
    uint64_t seq[S_MAX_EVENTS];
    uint64_t epoch[S_MAX_EVENTS];
    int64_t mark[S_MAX_EVENTS];  /* the marker each event was inserted with */
    char id[S_MAX_EVENTS][37];   /* each event's id */
    int malformed;               /* events whose fields did not match their row */
    int epochs;                  /* on_epoch calls */
    uint64_t new_epoch;          /* the last on_epoch value */
    int n_at_epoch;              /* n when on_epoch was last called */
} s_rec_t;

/* ---- the database ---- */

/* conninfo (key=value or URI) with dbname set to dbname, as key='value'
 * pairs; caller frees. NULL when conninfo does not parse. */
static char *s_conninfo_with_db(const char *conninfo, const char *dbname)
{
    char *err = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &err);
    if (!opts) {
        print_error("LINLI_TEST_PG does not parse: %s", err ? err : "out of memory");
        PQfreemem(err);
        return NULL;
    }
    size_t cap = strlen(conninfo) + strlen(dbname) + 64, n = 0;
    char *out = xmalloc(cap);
    out[0] = '\0';
    for (PQconninfoOption *o = opts; o->keyword; o++) {
        const char *val = strcmp(o->keyword, "dbname") == 0 ? dbname : o->val;
        if (!val)
            continue;
        size_t need = n + strlen(o->keyword) + 2 * strlen(val) + 8;
        if (need > cap) {
            cap = need * 2;
            out = xrealloc(out, cap);
        }
        n += (size_t)sprintf(out + n, "%s%s='", n ? " " : "", o->keyword);
        for (const char *c = val; *c; c++) {
            if (*c == '\'' || *c == '\\')
                out[n++] = '\\';
            out[n++] = *c;
        }
        out[n++] = '\'';
        out[n] = '\0';
    }
    PQconninfoFree(opts);
    return out;
}

/* Runs sql (several statements allowed) on c. */
static void s_exec_on(PGconn *c, const char *sql)
{
    PGresult *res = PQexec(c, sql);
    ExecStatusType st = PQresultStatus(res);
    if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK)
        print_error("SQL failed: %s\n%s", PQerrorMessage(c), sql);
    PQclear(res);
    assert_true(st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK);
}

static void s_exec(const char *sql)
{
    s_exec_on(s_side, sql);
}

/* The single value of a one-row query on c, as an integer (0 for NULL). */
static long long s_int_on(PGconn *c, const char *sql)
{
    PGresult *res = db_exec(c, sql, 0, NULL);
    assert_non_null(res);
    assert_int_equal(PQntuples(res), 1);
    long long v = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    return v;
}

static long long s_int(const char *sql)
{
    return s_int_on(s_side, sql);
}

/* Another side connection to our database, closed by the teardown (so a
 * failing test leaves no open transaction holding locks). */
static PGconn *s_connect(PGconn **slot)
{
    *slot = PQconnectdb(s_db_conninfo);
    assert_int_equal(PQstatus(*slot), CONNECTION_OK);
    PQclear(PQexec(*slot, "SET client_min_messages = warning"));
    return *slot;
}

/* ---- writing events, as a service does ---- */

/* One event through registry.s_emit, which takes the stream's turn (the
 * stream row's lock, held to commit) and numbers the event max(seq) + 1. Its
 * type is an Event oneof member name (community_created), as the relay needs
 * to encode it. The marker is the row's community_id and the payload's id,
 * so the receiving side can check both. */
static const char s_emit_sql[] =
    "SELECT registry.s_emit('community_created', $1::bigint, $2::bigint, "
    "jsonb_build_object('id', $1::bigint, 'name', 'ev' || $1), "
    "jsonb_build_object('trace_id', 'trace-' || $1))";

static void s_emit_params(int64_t mark, char (*m)[24], char (*at)[24])
{
    snprintf(*m, sizeof *m, "%" PRId64, mark);
    snprintf(*at, sizeof *at, "%" PRId64, (int64_t)1700000000000 + mark);
}

/* Writes n events with markers first, first+1, ... (one statement each, in
 * that order) in the open transaction on c. */
static void s_insert_rows(PGconn *c, int64_t first, int n)
{
    for (int i = 0; i < n; i++) {
        char mark[24], at[24];
        s_emit_params(first + i, &mark, &at);
        const char *p[2] = { mark, at };
        PGresult *res = db_exec(c, s_emit_sql, 2, p);
        assert_non_null(res);
        PQclear(res);
    }
}

/* One transaction of n events that commits (or rolls back). */
static void s_insert_tx(PGconn *c, int64_t first, int n, bool commit)
{
    s_exec_on(c, "BEGIN");
    s_insert_rows(c, first, n);
    s_exec_on(c, commit ? "COMMIT" : "ROLLBACK");
}

/* Sends one event's registry.s_emit on c without waiting for it (it may have to wait
 * for the stream's turn); s_finish collects it. */
static void s_emit_send(PGconn *c, int64_t mark)
{
    char m[24], at[24];
    s_emit_params(mark, &m, &at);
    const char *p[2] = { m, at };
    int ok = PQsendQueryParams(c, s_emit_sql, 2, NULL, p, NULL, NULL, 0);
    assert_int_equal(ok, 1);
}

/* ---- the loop ---- */

static void s_on_deadline(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    s_env_t *e = arg;
    e->timed_out = true;
}

static void s_deadline_arm(s_env_t *e, int ms)
{
    struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };
    e->timed_out = false;
    evtimer_add(e->deadline, &tv);
}

/* Runs the loop until cond holds; a deadline that passes first fails. */
#define S_RUN_UNTIL(e, cond)                                                                 \
    do {                                                                                     \
        s_deadline_arm((e), S_DEADLINE_MS);                                                  \
        while (!(cond) && !(e)->timed_out)                                                   \
            event_base_loop((e)->base, EVLOOP_ONCE);                                         \
        evtimer_del((e)->deadline);                                                          \
        if (!(cond))                                                                         \
            fail_msg("timed out waiting for: %s", #cond);                                    \
    } while (0)

/* Runs the loop for ms, whatever happens (to see that nothing more comes). */
static void s_run_for(s_env_t *e, int ms)
{
    s_deadline_arm(e, ms);
    while (!e->timed_out)
        event_base_loop(e->base, EVLOOP_ONCE);
}

/* Runs the loop in short steps until cond holds, for conditions no loop
 * event signals (another connection's state); a deadline that passes first
 * fails. */
#define S_POLL_UNTIL(e, cond)                                                                \
    do {                                                                                     \
        int64_t s_end_ = mono_us() + (int64_t)S_DEADLINE_MS * 1000;                          \
        while (!(cond) && mono_us() < s_end_)                                                \
            s_run_for((e), 20);                                                              \
        if (!(cond))                                                                         \
            fail_msg("timed out waiting for: %s", #cond);                                    \
    } while (0)

/* True while the query sent on c has not answered yet. */
static bool s_busy(PGconn *c)
{
    if (!PQconsumeInput(c))
        return false; /* broken: s_finish reports it */
    return PQisBusy(c) != 0;
}

/* Waits (running the loop) for the query sent on c, which must succeed. */
static void s_finish(s_env_t *e, PGconn *c)
{
    S_POLL_UNTIL(e, !s_busy(c));
    PGresult *res;
    int results = 0, bad = 0;
    while ((res = PQgetResult(c)) != NULL) {
        ExecStatusType st = PQresultStatus(res);
        if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK) {
            print_error("query failed: %s", PQresultErrorMessage(res));
            bad++;
        }
        results++;
        PQclear(res);
    }
    assert_int_equal(bad, 0);
    assert_int_equal(results, 1);
}

/* True when the server shows waiter's backend waiting for a lock that
 * holder's backend holds (here: the stream row, the writers' turn). */
static bool s_blocked_by(PGconn *waiter, PGconn *holder)
{
    char w[16], h[16];
    snprintf(w, sizeof w, "%d", PQbackendPID(waiter));
    snprintf(h, sizeof h, "%d", PQbackendPID(holder));
    const char *p[2] = { h, w };
    PGresult *res = db_exec(s_side, "SELECT $1::int = ANY (pg_blocking_pids($2::int))", 2, p);
    assert_non_null(res);
    bool yes = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
    PQclear(res);
    return yes;
}

/* ---- the service side: relay and command server ---- */

static void s_on_command(cmdsrv_t *srv, cmdsrv_req_t *req, void *arg)
{
    s_env_t *e = arg;
    const Linli__Command *cmd = cmdsrv_req_envelope(req)->command;
    if (cmd->command_case != LINLI__COMMAND__COMMAND_REPLAY || !e->ob) {
        cmdsrv_reply_error(srv, &req, "unavailable", "no relay");
        return;
    }
    e->replays_served++;
    outbox_replay(e->ob, srv, &req);
}

static void s_relay_start(s_env_t *e)
{
    assert_null(e->ob);
    e->ob = outbox_new(e->base, s_db_conninfo, S_SCHEMA, S_STREAM, "test_outbox", e->pub);
    assert_non_null(e->ob);
    assert_true(outbox_ready(e->ob));
}

/* ---- subscribers ---- */

static void s_apply(const Linli__Envelope *ev, void *arg)
{
    s_rec_t *r = arg;
    if (r->n >= S_MAX_EVENTS) {
        r->malformed++;
        return;
    }
    r->seq[r->n] = ev->sequence;
    r->epoch[r->n] = ev->epoch;
    r->mark[r->n] = ev->community_id;
    snprintf(r->id[r->n], sizeof r->id[r->n], "%s", ev->id ? ev->id : "");
    r->n++;
    char name[32], trace[32];
    snprintf(name, sizeof name, "ev%" PRId64, ev->community_id);
    snprintf(trace, sizeof trace, "trace-%" PRId64, ev->community_id);
    bool ok = ev->payload_case == LINLI__ENVELOPE__PAYLOAD_EVENT && ev->event &&
              ev->event->event_case == LINLI__EVENT__EVENT_COMMUNITY_CREATED &&
              ev->event->community_created->id == ev->community_id &&
              strcmp(ev->event->community_created->name, name) == 0 &&
              strcmp(ev->type, S_STREAM ".community_created") == 0 &&
              strcmp(ev->stream, S_STREAM) == 0 && strcmp(ev->source, "test_outbox") == 0 &&
              strcmp(ev->trace_id, trace) == 0 &&
              ev->occurred_at == 1700000000000 + ev->community_id && uuid_valid(ev->id);
    if (!ok)
        r->malformed++;
}

static void s_on_epoch(uint64_t new_epoch, void *arg)
{
    s_rec_t *r = arg;
    r->epochs++;
    r->new_epoch = new_epoch;
    r->n_at_epoch = r->n;
}

/* A new subscriber from epoch/seq, owned by e. */
static s_rec_t *s_sub_start(s_env_t *e, uint64_t epoch, uint64_t seq, unsigned batch)
{
    s_rec_t *r = NULL;
    for (size_t i = 0; i < LX_ARRAY_LEN(e->recs) && !r; i++)
        if (!e->recs[i])
            r = e->recs[i] = xcalloc(1, sizeof *r);
    assert_non_null(r);
    sub_opts_t so = { .pub_endpoint = e->pub_ep, .cmd_endpoint = e->cmd_ep, .stream = S_STREAM,
                      .source = "test_sub", .epoch = epoch, .sequence = seq,
                      .replay_batch = batch };
    r->sub = sub_new(e->base, e->zctx, &so, s_apply, s_on_epoch, r);
    assert_non_null(r->sub);
    return r;
}

/* Checks that from its from-th event on, r applied exactly the markers
 * want[0..n) with sequences first_seq, first_seq+1, ... in epoch, each once,
 * and nothing after them. */
static void s_check(const s_rec_t *r, int from, const int64_t *want, int n, uint64_t first_seq,
                    uint64_t epoch)
{
    assert_int_equal(r->malformed, 0);
    assert_int_equal(r->n - from, n);
    for (int i = 0; i < n; i++) {
        assert_int_equal(r->seq[from + i], first_seq + (uint64_t)i);
        assert_int_equal(r->epoch[from + i], epoch);
        assert_int_equal(r->mark[from + i], want[i]);
    }
}

/* want = first, first+1, ..., first+n-1 */
static void s_check_range(const s_rec_t *r, int from, int64_t first, int n, uint64_t first_seq,
                          uint64_t epoch)
{
    int64_t *want = xcalloc((size_t)n + 1, sizeof *want);
    for (int i = 0; i < n; i++)
        want[i] = first + i;
    s_check(r, from, want, n, first_seq, epoch);
    free(want);
}

/* The table agrees: n rows numbered 1..n, each number once (gap-free), and
 * outbox_state gives n as the stream's newest number. */
static void s_check_table(long long n)
{
    assert_int_equal(s_int("SELECT count(*) FROM registry.outbox"), n);
    assert_int_equal(s_int("SELECT count(DISTINCT seq) FROM registry.outbox"), n);
    assert_int_equal(s_int("SELECT coalesce(min(seq), 0) FROM registry.outbox"), n ? 1 : 0);
    assert_int_equal(s_int("SELECT coalesce(max(seq), 0) FROM registry.outbox"), n);
    assert_int_equal(s_int("SELECT last_seq FROM registry.outbox_state('" S_STREAM "')"), n);
}

/* ---- the wire ---- */

/* A subscriber of the wire, with no gap logic: what the PUB socket sends. */
typedef struct {
    int events;
    int heartbeats;
    int bad;                     /* frames that are not [stream][Envelope] */
    uint64_t hb_epoch, hb_last;  /* the latest heartbeat */
} s_wire_t;

static void s_on_wire(bus_sock_t *bs, const bus_msg_t *msg, void *arg)
{
    (void)bs;
    s_wire_t *w = arg;
    const char *code;
    char why[128];
    if (msg->count != 2 || msg->size[0] != strlen(S_STREAM) ||
        memcmp(msg->data[0], S_STREAM, msg->size[0]) != 0) {
        w->bad++;
        return;
    }
    Linli__Envelope *ev = envelope_decode(msg->data[1], msg->size[1], &code, why, sizeof why);
    if (!ev) {
        w->bad++;
        return;
    }
    if (ev->payload_case == LINLI__ENVELOPE__PAYLOAD_HEARTBEAT) {
        w->heartbeats++;
        w->hb_epoch = ev->heartbeat->epoch;
        w->hb_last = ev->heartbeat->last_sequence;
        if (strcmp(ev->heartbeat->stream, S_STREAM) != 0 || ev->sequence != w->hb_last ||
            strcmp(ev->type, "heartbeat") != 0)
            w->bad++;
    } else if (ev->payload_case == LINLI__ENVELOPE__PAYLOAD_EVENT) {
        w->events++;
    } else {
        w->bad++;
    }
    envelope_free(&ev);
}

/* Records what the PUB socket sends, on e->raw; returns once the first
 * heartbeat arrived (so the subscription is in place: the relay must run). */
static void s_wire_start(s_env_t *e, s_wire_t *w)
{
    e->raw = bus_sock_new(e->base, e->zctx, ZMQ_SUB, s_on_wire, w);
    assert_non_null(e->raw);
    assert_int_equal(zmq_setsockopt(bus_zsock(e->raw), ZMQ_SUBSCRIBE, "", 0), 0);
    assert_int_equal(bus_connect(e->raw, e->pub_ep), 0);
    S_RUN_UNTIL(e, w->heartbeats >= 1);
}

/* ---- fixtures ---- */

/* Runs one statement on the server's own database (CREATE / DROP DATABASE
 * cannot run in ours). Returns 0, or -1 (printed). */
static int s_admin(const char *sql)
{
    PGconn *c = PQconnectdb(s_conninfo);
    int rc = -1;
    if (PQstatus(c) != CONNECTION_OK) {
        print_error("cannot connect to LINLI_TEST_PG: %s", PQerrorMessage(c));
    } else {
        PQclear(PQexec(c, "SET client_min_messages = warning"));
        PGresult *res = PQexec(c, sql);
        if (PQresultStatus(res) == PGRES_COMMAND_OK)
            rc = 0;
        else
            print_error("%s failed: %s", sql, PQerrorMessage(c));
        PQclear(res);
    }
    PQfinish(c);
    return rc;
}

static int s_group_teardown(void **state)
{
    (void)state;
    if (!s_conninfo)
        return 0;
    if (s_side)
        PQfinish(s_side);
    s_side = NULL;
    free(s_db_conninfo);
    s_db_conninfo = NULL;
    /* FORCE: a test that failed may have left a connection behind. */
    char sql[128];
    snprintf(sql, sizeof sql, "DROP DATABASE IF EXISTS %s WITH (FORCE)", s_dbname);
    return s_admin(sql);
}

/* A database of our own with the registry's migrations applied, as the
 * daemon applies them. */
static int s_group_setup(void **state)
{
    if (!s_conninfo)
        return 0;
    char sql[128];
    snprintf(sql, sizeof sql, "DROP DATABASE IF EXISTS %s WITH (FORCE)", s_dbname);
    if (s_admin(sql) != 0)
        return -1;
    snprintf(sql, sizeof sql, "CREATE DATABASE %s", s_dbname);
    if (s_admin(sql) != 0)
        return -1;
    s_db_conninfo = s_conninfo_with_db(s_conninfo, s_dbname);
    if (!s_db_conninfo)
        goto fail;
    s_side = PQconnectdb(s_db_conninfo);
    if (PQstatus(s_side) != CONNECTION_OK) {
        print_error("cannot connect to %s: %s", s_dbname, PQerrorMessage(s_side));
        goto fail;
    }
    PQclear(PQexec(s_side, "SET client_min_messages = warning"));
    const char *dir = config_get("LINLI_REGISTRY_MIGRATIONS", S_MIGRATIONS);
    if (migrate_apply(s_side, S_SCHEMA, dir) < 1) {
        print_error("cannot apply the registry migrations from %s\n", dir);
        goto fail;
    }
    /* Each test's epoch is above the one the migration gave the stream. */
    s_next_epoch = (uint64_t)s_int("SELECT epoch FROM registry.outbox_stream "
                                   "WHERE stream = '" S_STREAM "'");
    if ((uint64_t)now_ms() > s_next_epoch)
        s_next_epoch = (uint64_t)now_ms();
    return 0;
fail:
    s_group_teardown(state);
    return -1;
}

static int s_setup(void **state)
{
    s_env_t *e = xcalloc(1, sizeof *e);
    *state = e;
    if (!s_conninfo)
        return 0;
    e->epoch = ++s_next_epoch;
    char sql[512];
    snprintf(sql, sizeof sql,
             "DROP TRIGGER IF EXISTS outbox_refuse ON registry.outbox; "
             "DROP FUNCTION IF EXISTS registry.s_refuse(); "
             "TRUNCATE registry.outbox; "
             "UPDATE registry.outbox_stream SET epoch = %" PRIu64 " WHERE stream = '" S_STREAM "'",
             e->epoch);
    s_exec(sql);
    assert_int_equal(s_int("SELECT count(*) FROM registry.outbox_stream"), 1);
    e->base = event_base_new();
    e->deadline = evtimer_new(e->base, s_on_deadline, e);
    e->zctx = zmq_ctx_new();
    e->pub = bus_sock_new(e->base, e->zctx, ZMQ_PUB, NULL, NULL);
    if (!e->pub || bus_bind(e->pub, "tcp://127.0.0.1:*") != 0)
        return -1;
    e->pub_ep = xstrdup(bus_endpoint(e->pub));
    e->srv = cmdsrv_new(e->base, e->zctx, "tcp://127.0.0.1:*", "test_outbox", s_on_command, e);
    if (!e->srv)
        return -1;
    e->cmd_ep = xstrdup(cmdsrv_endpoint(e->srv));
    return 0;
}

static int s_teardown(void **state)
{
    s_env_t *e = *state;
    for (size_t i = 0; i < LX_ARRAY_LEN(e->recs); i++) {
        if (e->recs[i])
            sub_destroy(&e->recs[i]->sub);
        free(e->recs[i]);
    }
    bus_sock_destroy(&e->raw);
    cmdcli_destroy(&e->cli);
    for (size_t i = 0; i < LX_ARRAY_LEN(e->conns); i++)
        if (e->conns[i])
            PQfinish(e->conns[i]);
    /* A test that failed inside a transaction must not leave it open. */
    if (s_side && PQtransactionStatus(s_side) != PQTRANS_IDLE)
        PQclear(PQexec(s_side, "ROLLBACK"));
    outbox_destroy(&e->ob);
    cmdsrv_destroy(&e->srv);
    bus_sock_destroy(&e->pub);
    if (e->zctx)
        zmq_ctx_term(e->zctx);
    if (e->deadline)
        event_free(e->deadline);
    if (e->base)
        event_base_free(e->base);
    free(e->pub_ep);
    free(e->cmd_ep);
    free(e);
    return 0;
}

/* ---- tests ---- */

/* Events committed while a subscriber listens arrive once each, in commit
 * order, numbered 1, 2, 3, ... in the stream's epoch, with the row's fields
 * and the payload translated into the proto Event; the table agrees. */
static void test_live_in_order(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_relay_start(e);
    s_rec_t *r = s_sub_start(e, 0, 0, 0);
    S_RUN_UNTIL(e, sub_caught_up(r->sub));

    for (int tx = 0; tx < 5; tx++)
        s_insert_tx(s_side, 1 + tx * 20, 20, true);
    S_RUN_UNTIL(e, r->n >= 100);
    s_check_range(r, 0, 1, 100, 1, e->epoch);
    s_check_table(100);

    /* The relay derives ids itself; they are the ones registry.outbox_replay
     * defines, so an id names the same event whoever reads the table. */
    PGresult *res = PQexec(s_side, "SELECT seq, event_id FROM registry.outbox_replay("
                                   "'" S_STREAM "', 0, 1000) ORDER BY seq");
    assert_int_equal(PQresultStatus(res), PGRES_TUPLES_OK);
    assert_int_equal(PQntuples(res), 100);
    for (int i = 0; i < 100; i++) {
        assert_int_equal(strtoull(PQgetvalue(res, i, 0), NULL, 10), r->seq[i]);
        assert_string_equal(PQgetvalue(res, i, 1), r->id[i]);
    }
    PQclear(res);

    uint64_t ep, seq;
    outbox_position(e->ob, &ep, &seq);
    assert_int_equal(ep, e->epoch);
    assert_int_equal(seq, 100);
    assert_int_equal(outbox_published(e->ob), 100);
    sub_position(r->sub, &ep, &seq);
    assert_int_equal(ep, e->epoch);
    assert_int_equal(seq, 100);
    unsigned long long applied, dupes, gaps, replays;
    sub_stats(r->sub, &applied, &dupes, &gaps, &replays);
    assert_int_equal(applied, 100);
    assert_int_equal(r->epochs, 0);

    sub_destroy(&r->sub);
    assert_null(r->sub);
    sub_destroy(&r->sub); /* accepts NULL */
}

/* Writers take turns: a transaction that wrote an event holds the stream's
 * turn until it ends, so a second writer's event waits for the first one's
 * COMMIT and is numbered after it, even when the second transaction began
 * (and got its transaction id) first. Numbers follow commit order, nothing
 * uncommitted goes out, and the events arrive gap-free in that order. */
static void test_commit_order(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    PGconn *a = s_connect(&e->conns[0]), *b = s_connect(&e->conns[1]);
    s_relay_start(e);
    s_rec_t *r = s_sub_start(e, 0, 0, 0);
    S_RUN_UNTIL(e, sub_caught_up(r->sub));
    s_insert_tx(s_side, 11, 2, true);               /* seq 1, 2 */
    S_RUN_UNTIL(e, r->n >= 2);

    /* b begins first and takes its transaction id; a then writes three
     * events and holds the turn. */
    s_exec_on(b, "BEGIN");
    long long xid_b = s_int_on(b, "SELECT txid_current()");
    s_exec_on(a, "BEGIN");
    long long xid_a = s_int_on(a, "SELECT txid_current()");
    assert_true(xid_b < xid_a);
    s_insert_rows(a, 1, 3);                         /* seq 3, 4, 5 */
    assert_int_equal(s_int_on(a, "SELECT max(seq) FROM registry.outbox"), 5);

    /* b's event waits for a's turn; meanwhile nothing new is published. */
    s_emit_send(b, 21);
    S_POLL_UNTIL(e, s_blocked_by(b, a));
    s_run_for(e, 300);
    assert_true(s_busy(b));
    assert_int_equal(r->n, 2);

    /* a commits: its events go out, and b gets the turn and the next number. */
    s_exec_on(a, "COMMIT");
    S_RUN_UNTIL(e, r->n >= 5);
    s_finish(e, b);
    assert_int_equal(s_int_on(b, "SELECT seq FROM registry.outbox WHERE community_id = 21"), 6);
    s_run_for(e, 300);
    assert_int_equal(r->n, 5);                      /* b has not committed yet */
    s_exec_on(b, "COMMIT");
    S_RUN_UNTIL(e, r->n >= 6);
    s_run_for(e, 300);

    const int64_t want[] = { 11, 12, 1, 2, 3, 21 };
    s_check(r, 0, want, 6, 1, e->epoch);
    s_check_table(6);
    /* Numbers follow the turn (commit) order, not transaction-id order: b's
     * one row is older by id than a's three but numbered after them. */
    assert_int_equal(s_int("SELECT count(*) FROM registry.outbox o1 JOIN registry.outbox o2 "
                           "ON o1.xmin::text::bigint < o2.xmin::text::bigint "
                           "AND o1.seq > o2.seq"),
                     3);
    assert_int_equal(outbox_published(e->ob), 6);

    sub_destroy(&r->sub);
}

/* Events of a transaction that rolls back (on purpose, because a later
 * statement failed, or while another writer waits for its turn) are never
 * published, and their numbers are taken again by the next writer: no
 * hole. */
static void test_rollback_invisible(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    PGconn *a = s_connect(&e->conns[0]), *b = s_connect(&e->conns[1]);
    s_relay_start(e);
    s_rec_t *r = s_sub_start(e, 0, 0, 0);
    S_RUN_UNTIL(e, sub_caught_up(r->sub));

    s_insert_tx(s_side, 1, 3, true);                /* seq 1..3 */
    s_exec("BEGIN");
    s_insert_rows(s_side, 1001, 5);
    assert_int_equal(s_int("SELECT max(seq) FROM registry.outbox"), 8); /* took 4..8 */
    s_exec("ROLLBACK");

    /* A failing statement aborts the transaction: COMMIT then rolls back. */
    s_exec("BEGIN");
    s_insert_rows(s_side, 2001, 2);
    assert_int_equal(s_int("SELECT max(seq) FROM registry.outbox"), 5); /* took 4, 5 again */
    PGresult *res = PQexec(s_side, "SELECT 1/0");
    assert_int_equal(PQresultStatus(res), PGRES_FATAL_ERROR);
    PQclear(res);
    res = PQexec(s_side, "COMMIT");
    assert_string_equal(PQcmdStatus(res), "ROLLBACK");
    PQclear(res);

    /* A writer waiting for the turn of one that then rolls back gets the
     * number the rolled-back one had. */
    s_exec_on(a, "BEGIN");
    s_insert_rows(a, 3001, 2);                      /* 4, 5 once more */
    s_exec_on(b, "BEGIN");
    s_emit_send(b, 4);
    S_POLL_UNTIL(e, s_blocked_by(b, a));
    s_exec_on(a, "ROLLBACK");
    s_finish(e, b);
    assert_int_equal(s_int_on(b, "SELECT seq FROM registry.outbox WHERE community_id = 4"), 4);
    s_insert_rows(b, 5, 1);
    s_exec_on(b, "COMMIT");

    S_RUN_UNTIL(e, r->n >= 5);
    /* Over a relay tick (read and heartbeat): nothing else appears. */
    s_run_for(e, 1300);
    s_check_range(r, 0, 1, 5, 1, e->epoch);
    s_check_table(5);
    assert_int_equal(s_int("SELECT count(*) FROM registry.outbox WHERE community_id > 1000"), 0);
    assert_int_equal(outbox_published(e->ob), 5);

    sub_destroy(&r->sub);
}

/* A subscriber that starts after the events were published gets all of
 * them by replay, in pages smaller than the history (ReplayResult.more),
 * and then follows live. */
static void test_late_subscriber(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_relay_start(e);
    for (int tx = 0; tx < 5; tx++)
        s_insert_tx(s_side, 1 + tx * 50, 50, true);
    S_RUN_UNTIL(e, outbox_published(e->ob) >= 250);

    s_rec_t *r = s_sub_start(e, 0, 0, 64);
    S_RUN_UNTIL(e, sub_caught_up(r->sub) && r->n >= 250);
    s_check_range(r, 0, 1, 250, 1, e->epoch);
    assert_true(e->replays_served >= 4); /* 250 events in pages of 64 */

    s_insert_tx(s_side, 251, 10, true);
    S_RUN_UNTIL(e, r->n >= 260);
    s_check_range(r, 0, 1, 260, 1, e->epoch);
    s_check_table(260);

    sub_destroy(&r->sub);
}

/* A subscriber restarted from the position it stored gets exactly the
 * events it missed: nothing at or below the position, nothing twice. */
static void test_restart_from_position(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_relay_start(e);
    s_rec_t *r1 = s_sub_start(e, 0, 0, 0);
    S_RUN_UNTIL(e, sub_caught_up(r1->sub));
    s_insert_tx(s_side, 1, 40, true);
    S_RUN_UNTIL(e, r1->n >= 40);
    uint64_t ep, seq;
    sub_position(r1->sub, &ep, &seq);
    assert_int_equal(ep, e->epoch);
    assert_int_equal(seq, 40);
    sub_destroy(&r1->sub);

    s_insert_tx(s_side, 41, 15, true);
    s_insert_tx(s_side, 56, 15, true);
    S_RUN_UNTIL(e, outbox_published(e->ob) >= 70);

    s_rec_t *r2 = s_sub_start(e, ep, seq, 0);
    S_RUN_UNTIL(e, sub_caught_up(r2->sub) && r2->n >= 30);
    s_insert_tx(s_side, 71, 5, true);
    S_RUN_UNTIL(e, r2->n >= 35);
    /* A heartbeat later, still exactly those. */
    s_run_for(e, 1200);
    s_check_range(r2, 0, 41, 35, 41, e->epoch);
    assert_int_equal(r2->epochs, 0);
    sub_position(r2->sub, &ep, &seq);
    assert_int_equal(seq, 75);

    sub_destroy(&r2->sub);
}

/* The relay destroyed and created again (a service restart) starts from
 * the stream's newest committed number: events committed while it was down
 * (or while a read was cut off by the destroy) are not published live, but
 * its heartbeat carries that number, so a following subscriber replays them
 * and gets every event once, in order, with no gap; newer events go out
 * live. */
static void test_relay_restart(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_wire_t w = { 0 };
    s_relay_start(e);
    s_wire_start(e, &w);
    s_rec_t *r = s_sub_start(e, 0, 0, 0);
    S_RUN_UNTIL(e, sub_caught_up(r->sub));
    s_insert_tx(s_side, 1, 30, true);
    S_RUN_UNTIL(e, r->n >= 30 && w.events >= 30);

    /* Down while events are committed. */
    outbox_destroy(&e->ob);
    assert_null(e->ob);
    s_insert_tx(s_side, 31, 20, true);
    s_run_for(e, 200);
    assert_int_equal(r->n, 30);

    /* Back: 31..50 count as published; only the heartbeat (no new event
     * yet) shows the subscriber that it is behind, and it replays. */
    s_relay_start(e);
    uint64_t ep, seq;
    outbox_position(e->ob, &ep, &seq);
    assert_int_equal(ep, e->epoch);
    assert_int_equal(seq, 50);
    unsigned long long applied, dupes, gaps0, gaps, replays0, replays;
    sub_stats(r->sub, &applied, &dupes, &gaps0, &replays0);
    S_RUN_UNTIL(e, r->n >= 50 && w.hb_last == 50);
    sub_stats(r->sub, &applied, &dupes, &gaps, &replays);
    assert_true(gaps > gaps0);
    assert_true(replays > replays0);
    assert_int_equal(outbox_published(e->ob), 0);
    assert_int_equal(w.events, 30);

    s_insert_tx(s_side, 51, 10, true);
    S_RUN_UNTIL(e, r->n >= 60 && w.events >= 40);
    assert_int_equal(outbox_published(e->ob), 10);

    /* Destroyed with a read in the database: nobody publishes 61..70 live;
     * the next relay starts past them and the subscriber replays. */
    s_insert_tx(s_side, 61, 10, true);
    outbox_kick(e->ob);
    outbox_destroy(&e->ob);
    s_relay_start(e);
    s_insert_tx(s_side, 71, 10, true);
    S_RUN_UNTIL(e, r->n >= 80 && w.events >= 50);
    s_run_for(e, 300);
    s_check_range(r, 0, 1, 80, 1, e->epoch);
    s_check_table(80);
    outbox_position(e->ob, &ep, &seq);
    assert_int_equal(ep, e->epoch);
    assert_int_equal(seq, 80);
    assert_int_equal(outbox_published(e->ob), 10);
    assert_int_equal(w.events, 50);                 /* 1..60 and 71..80, each once */
    assert_int_equal(w.bad, 0);

    sub_destroy(&r->sub);
}

/* One round trip per commit: the relay is woken by NOTIFY, not by its
 * one-second timer, so five sequential commit-to-apply trips take well
 * under the four seconds the timer alone would need. */
static void test_notify_wakes_relay(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_relay_start(e);
    s_rec_t *r = s_sub_start(e, 0, 0, 0);
    S_RUN_UNTIL(e, sub_caught_up(r->sub));
    int64_t t0 = mono_us();
    for (int i = 0; i < 5; i++) {
        s_insert_tx(s_side, 1 + i, 1, true);
        S_RUN_UNTIL(e, r->n >= i + 1);
    }
    int64_t took_ms = (mono_us() - t0) / 1000;
    if (took_ms >= 2500)
        fail_msg("5 commits took %lld ms to arrive", (long long)took_ms);
    s_check_range(r, 0, 1, 5, 1, e->epoch);
    sub_destroy(&r->sub);
}

/* On the wire: [stream][Envelope] frames, and a heartbeat every second with
 * the stream's epoch and newest number, so a subscriber that lost the tail
 * notices. */
static void test_wire_heartbeat(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_wire_t w = { 0 };
    s_relay_start(e);
    s_wire_start(e, &w);
    assert_int_equal(w.hb_epoch, e->epoch);
    assert_int_equal(w.hb_last, 0);

    s_insert_tx(s_side, 1, 7, true);
    S_RUN_UNTIL(e, w.events >= 7 && w.hb_last == 7);
    assert_int_equal(w.hb_epoch, e->epoch);
    assert_int_equal(w.bad, 0);
    bus_sock_destroy(&e->raw);
}

/* What a Replay command gets, seen directly. */
typedef struct {
    int replies;
    int ok;
    char code[64];
    uint64_t epoch, last;
    int n;
    uint64_t first_seq, last_seq;
    int more, epoch_changed;
} s_replay_seen_t;

static void s_on_replay_reply(const Linli__Envelope *reply, void *arg)
{
    s_replay_seen_t *s = arg;
    memset(s, 0, sizeof *s);
    s->replies = 1;
    if (!reply) {
        snprintf(s->code, sizeof s->code, "timeout");
        return;
    }
    const Linli__Reply *rp = reply->reply;
    s->ok = rp->ok;
    if (rp->error)
        snprintf(s->code, sizeof s->code, "%s", rp->error->code);
    if (rp->result_case != LINLI__REPLY__RESULT_REPLAY)
        return;
    s->epoch = rp->replay->epoch;
    s->last = rp->replay->last_sequence;
    s->n = (int)rp->replay->n_events;
    if (s->n) {
        s->first_seq = rp->replay->events[0]->sequence;
        s->last_seq = rp->replay->events[s->n - 1]->sequence;
    }
    s->more = rp->replay->more;
    s->epoch_changed = rp->replay->epoch_changed;
}

static void s_ask(s_env_t *e, cmdcli_t *cli, const char *stream, uint64_t epoch, uint64_t after,
                  unsigned limit, s_replay_seen_t *seen)
{
    Linli__Replay *rq = xmalloc(sizeof *rq);
    linli__replay__init(rq);
    rq->stream = xstrdup(stream);
    rq->epoch = epoch;
    rq->after_sequence = after;
    rq->limit = limit;
    Linli__Command *cmd = xmalloc(sizeof *cmd);
    linli__command__init(cmd);
    cmd->command_case = LINLI__COMMAND__COMMAND_REPLAY;
    cmd->replay = rq;
    Linli__Envelope *env = cmdcli_envelope(S_STREAM, "test_outbox", "", 0, cmd);
    memset(seen, 0, sizeof *seen);
    assert_int_equal(cmdcli_send(cli, env, 5000, s_on_replay_reply, seen), 0);
    protobuf_c_message_free_unpacked(&env->base, NULL);
    S_RUN_UNTIL(e, seen->replies == 1);
}

/* The Replay contract: events after the asked number up to the limit (the
 * server's cap of 1000 when 0 or more is asked), `more` when a page is
 * full, the stream's position, epoch_changed for a stale epoch, not_found
 * for another stream. */
static void test_replay_command(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_relay_start(e);
    for (int tx = 0; tx < 3; tx++)
        s_insert_tx(s_side, 1 + tx * 400, 400, true);
    S_RUN_UNTIL(e, outbox_published(e->ob) >= 1200);
    e->cli = cmdcli_new(e->base, e->zctx, e->cmd_ep);
    assert_non_null(e->cli);
    cmdcli_t *cli = e->cli;
    s_replay_seen_t s;

    s_ask(e, cli, S_STREAM, 0, 0, 10, &s);
    assert_true(s.ok);
    assert_int_equal(s.epoch, e->epoch);
    assert_int_equal(s.last, 1200);
    assert_int_equal(s.n, 10);
    assert_int_equal(s.first_seq, 1);
    assert_int_equal(s.last_seq, 10);
    assert_true(s.more);

    s_ask(e, cli, S_STREAM, e->epoch, 1195, 10, &s);
    assert_true(s.ok);
    assert_int_equal(s.n, 5);
    assert_int_equal(s.first_seq, 1196);
    assert_int_equal(s.last_seq, 1200);
    assert_false(s.more);

    s_ask(e, cli, S_STREAM, e->epoch, 0, 0, &s); /* 0: the server's cap */
    assert_int_equal(s.n, 1000);
    assert_true(s.more);
    s_ask(e, cli, S_STREAM, e->epoch, 100, 5000, &s);
    assert_int_equal(s.n, 1000);
    assert_int_equal(s.first_seq, 101);
    assert_int_equal(s.last_seq, 1100);

    s_ask(e, cli, S_STREAM, e->epoch, 1200, 10, &s);
    assert_true(s.ok);
    assert_int_equal(s.n, 0);
    assert_int_equal(s.last, 1200);
    assert_false(s.more);

    s_ask(e, cli, S_STREAM, e->epoch + 1000, 5, 10, &s);
    assert_true(s.ok);
    assert_true(s.epoch_changed);
    assert_int_equal(s.epoch, e->epoch);
    assert_int_equal(s.n, 0);

    s_ask(e, cli, "other", 0, 0, 10, &s);
    assert_false(s.ok);
    assert_string_equal(s.code, "not_found");

    cmdcli_destroy(&e->cli);
}

/* The producer's history restarts while its service is down (outbox emptied,
 * outbox_stream given a new epoch, numbers from 1 again): the restarted
 * relay publishes the new epoch, and a following subscriber and one
 * restarted from an old-epoch position both drop the old state (on_epoch)
 * and apply the new history from 1. Then it restarts again while the relay
 * runs, which the relay notices even before the new history passes the
 * number it last published. */
static void test_epoch_change(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_relay_start(e);
    s_rec_t *r = s_sub_start(e, 0, 0, 0);
    S_RUN_UNTIL(e, sub_caught_up(r->sub));
    s_insert_tx(s_side, 1, 10, true);
    S_RUN_UNTIL(e, r->n >= 10);
    uint64_t old_epoch = e->epoch;

    outbox_destroy(&e->ob);
    e->epoch = ++s_next_epoch;
    char sql[512];
    snprintf(sql, sizeof sql,
             "TRUNCATE registry.outbox; UPDATE registry.outbox_stream SET epoch = %" PRIu64
             " WHERE stream = '" S_STREAM "'", e->epoch);
    s_exec(sql);
    s_relay_start(e);
    s_insert_tx(s_side, 101, 5, true);
    S_RUN_UNTIL(e, r->epochs == 1 && r->n >= 15);
    assert_int_equal(r->new_epoch, e->epoch);
    assert_int_equal(r->n_at_epoch, 10);
    for (int i = 0; i < 10; i++) {
        assert_int_equal(r->seq[i], i + 1);
        assert_int_equal(r->epoch[i], old_epoch);
        assert_int_equal(r->mark[i], i + 1);
    }
    s_check_range(r, 10, 101, 5, 1, e->epoch);

    s_rec_t *r2 = s_sub_start(e, old_epoch, 10, 0);
    S_RUN_UNTIL(e, r2->epochs == 1 && r2->n >= 5);
    assert_int_equal(r2->n_at_epoch, 0);
    s_check_range(r2, 0, 101, 5, 1, e->epoch);

    /* Again while the relay runs, with a new history (3 events) that stays
     * below the number the relay last published (5): it still notices the
     * new epoch (on its tick) and publishes the new history from 1. */
    e->epoch = ++s_next_epoch;
    snprintf(sql, sizeof sql,
             "TRUNCATE registry.outbox; UPDATE registry.outbox_stream SET epoch = %" PRIu64
             " WHERE stream = '" S_STREAM "'", e->epoch);
    s_exec(sql);
    s_insert_tx(s_side, 201, 3, true);
    S_RUN_UNTIL(e, r->epochs == 2 && r->n >= 18 && r2->epochs == 2 && r2->n >= 8);
    s_run_for(e, 300);
    assert_int_equal(r->new_epoch, e->epoch);
    assert_int_equal(r->n_at_epoch, 15);
    s_check_range(r, 15, 201, 3, 1, e->epoch);
    assert_int_equal(r2->n_at_epoch, 5);
    s_check_range(r2, 5, 201, 3, 1, e->epoch);
    uint64_t ep, seq;
    outbox_position(e->ob, &ep, &seq);
    assert_int_equal(ep, e->epoch);
    assert_int_equal(seq, 3);
    s_check_table(3);

    sub_destroy(&r->sub);
    sub_destroy(&r2->sub);
}

/* A transaction whose COMMIT fails (here a deferred constraint that
 * refuses one row) after its events were numbered publishes nothing: the
 * relay reads committed rows only, and the next writer takes the numbers
 * again, so the subscriber's numbers are the table's, with no hole. */
static void test_commit_failure_not_published(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_exec("CREATE FUNCTION registry.s_refuse() RETURNS trigger LANGUAGE plpgsql AS $$\n"
           "BEGIN\n"
           "    IF NEW.community_id = 666 THEN\n"
           "        RAISE EXCEPTION 'refused at commit';\n"
           "    END IF;\n"
           "    RETURN NULL;\n"
           "END $$;\n"
           "CREATE CONSTRAINT TRIGGER outbox_refuse AFTER INSERT ON registry.outbox\n"
           "    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION registry.s_refuse()");
    s_relay_start(e);
    s_rec_t *r = s_sub_start(e, 0, 0, 0);
    S_RUN_UNTIL(e, sub_caught_up(r->sub));
    s_insert_tx(s_side, 1, 3, true);
    S_RUN_UNTIL(e, r->n >= 3);

    s_exec("BEGIN");
    s_insert_rows(s_side, 4, 1);
    s_insert_rows(s_side, 666, 1);
    assert_int_equal(s_int("SELECT max(seq) FROM registry.outbox"), 5);
    PGresult *res = PQexec(s_side, "COMMIT");
    assert_int_equal(PQresultStatus(res), PGRES_FATAL_ERROR);
    PQclear(res);
    assert_int_equal(PQtransactionStatus(s_side), PQTRANS_IDLE);
    /* Over a relay tick (read and heartbeat): nothing. */
    s_run_for(e, 1300);
    assert_int_equal(r->n, 3);
    s_check_table(3);

    s_insert_tx(s_side, 7, 2, true);               /* seq 4, 5 */
    S_RUN_UNTIL(e, r->n >= 5);
    s_run_for(e, 300);
    const int64_t want[] = { 1, 2, 3, 7, 8 };
    s_check(r, 0, want, 5, 1, e->epoch);
    s_check_table(5);
    assert_int_equal(outbox_published(e->ob), 5);

    sub_destroy(&r->sub);
}

/* A relay started after events were committed takes the newest number as
 * published: it sends none of them live, its heartbeat carries that number
 * (and the epoch) from the first tick, and a subscriber gets them by
 * replay; what is committed afterwards goes out live. */
static void test_start_after_commits(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_insert_tx(s_side, 1, 4, true);
    s_insert_tx(s_side, 5, 2, true);
    s_relay_start(e);
    uint64_t ep, seq;
    outbox_position(e->ob, &ep, &seq);
    assert_int_equal(ep, e->epoch);
    assert_int_equal(seq, 6);

    s_wire_t w = { 0 };
    s_wire_start(e, &w);
    assert_int_equal(w.hb_epoch, e->epoch);
    assert_int_equal(w.hb_last, 6);
    s_run_for(e, 300);
    assert_int_equal(w.events, 0);
    assert_int_equal(outbox_published(e->ob), 0);

    s_rec_t *r = s_sub_start(e, 0, 0, 0);
    S_RUN_UNTIL(e, sub_caught_up(r->sub) && r->n >= 6);
    s_insert_tx(s_side, 7, 2, true);
    S_RUN_UNTIL(e, r->n >= 8 && w.events >= 2);
    s_run_for(e, 300);
    s_check_range(r, 0, 1, 8, 1, e->epoch);
    s_check_table(8);
    assert_int_equal(w.events, 2);
    assert_int_equal(w.bad, 0);
    assert_int_equal(outbox_published(e->ob), 2);
    outbox_position(e->ob, &ep, &seq);
    assert_int_equal(seq, 8);

    sub_destroy(&r->sub);
}

/* A subscriber that starts while the producer cannot answer (its replies
 * say "unavailable") keeps asking, and catches up once the relay is back. */
static void test_sub_retries(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_insert_tx(s_side, 1, 4, true);
    s_rec_t *r = s_sub_start(e, 0, 0, 0);
    s_run_for(e, 300);
    assert_false(sub_caught_up(r->sub));
    assert_int_equal(r->n, 0);
    s_relay_start(e);
    S_RUN_UNTIL(e, sub_caught_up(r->sub) && r->n >= 4);
    s_insert_tx(s_side, 5, 2, true);
    S_RUN_UNTIL(e, r->n >= 6);
    s_check_range(r, 0, 1, 6, 1, e->epoch);
    unsigned long long applied, dupes, gaps, replays;
    sub_stats(r->sub, &applied, &dupes, &gaps, &replays);
    assert_true(replays >= 2);
}

/* An event envelope as a producer of stream would send it. */
static void s_send_event(s_env_t *e, const char *topic, const char *stream, uint64_t epoch,
                         uint64_t seq, int64_t mark)
{
    Linli__CommunityCreated cc = LINLI__COMMUNITY_CREATED__INIT;
    cc.id = mark;
    cc.name = (char *)"foreign";
    Linli__Event ev = LINLI__EVENT__INIT;
    ev.event_case = LINLI__EVENT__EVENT_COMMUNITY_CREATED;
    ev.community_created = &cc;
    Linli__Envelope env = LINLI__ENVELOPE__INIT;
    char id[37];
    uuid_new(id);
    env.id = id;
    env.type = (char *)"x.community_created";
    env.source = (char *)"intruder";
    env.stream = (char *)stream;
    env.epoch = epoch;
    env.sequence = seq;
    env.community_id = mark;
    env.payload_case = LINLI__ENVELOPE__PAYLOAD_EVENT;
    env.event = &ev;
    size_t len;
    uint8_t *buf = envelope_encode(&env, &len);
    const void *data[2] = { topic, buf };
    size_t size[2] = { strlen(topic), len };
    assert_int_equal(bus_send(e->pub, 2, data, size), 0);
    free(buf);
}

/* What a subscriber ignores on the live socket: frames that do not decode,
 * messages of the wrong shape, and events of another stream whose name our
 * topic is a prefix of (ZMQ_SUBSCRIBE matches prefixes). */
static void test_sub_ignores_foreign_frames(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_relay_start(e);
    s_rec_t *r = s_sub_start(e, 0, 0, 0);
    S_RUN_UNTIL(e, sub_caught_up(r->sub));
    s_insert_tx(s_side, 1, 2, true);
    S_RUN_UNTIL(e, r->n >= 2);

    const void *g[3] = { S_STREAM, "\xff\x01garbage", "x" };
    size_t gs[3] = { strlen(S_STREAM), 9, 1 };
    assert_int_equal(bus_send(e->pub, 2, g, gs), 0);
    assert_int_equal(bus_send(e->pub, 3, g, gs), 0);
    assert_int_equal(bus_send(e->pub, 1, g, gs), 0);
    s_send_event(e, S_STREAM "tra", S_STREAM "tra", e->epoch, 3, 999);
    s_send_event(e, S_STREAM, S_STREAM "tra", e->epoch, 3, 998);
    s_run_for(e, 200);
    assert_int_equal(r->n, 2);

    s_insert_tx(s_side, 3, 2, true);
    S_RUN_UNTIL(e, r->n >= 4);
    s_run_for(e, 200);
    s_check_range(r, 0, 1, 4, 1, e->epoch);
    assert_int_equal(r->epochs, 0);
}

/* outbox_new refuses, logged, when it cannot work: no server, or a stream
 * the schema does not have. */
static void test_new_fails(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    outbox_t *o = outbox_new(e->base, s_db_conninfo, S_SCHEMA, "nosuchstream", "t", e->pub);
    assert_null(o);
    o = outbox_new(e->base, "host=/nonexistent port=1", S_SCHEMA, S_STREAM, "t", e->pub);
    assert_null(o);
    outbox_destroy(&o); /* accepts NULL */
    outbox_destroy(NULL);
}

int main(void)
{
    log_init("test_outbox", LOG_LEVEL_ERROR);
    s_conninfo = getenv("LINLI_TEST_PG");
    if (s_conninfo && !*s_conninfo)
        s_conninfo = NULL;
    if (!s_conninfo)
        printf("# LINLI_TEST_PG is not set: skipping the tests that need PostgreSQL\n");
    snprintf(s_dbname, sizeof s_dbname, "test_outbox_%d", (int)getpid());
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_live_in_order, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_commit_order, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_rollback_invisible, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_late_subscriber, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_restart_from_position, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_relay_restart, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_notify_wakes_relay, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_wire_heartbeat, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_replay_command, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_epoch_change, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_commit_failure_not_published, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_start_after_commits, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_sub_retries, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_sub_ignores_foreign_frames, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_new_fails, s_setup, s_teardown),
    };
    return cmocka_run_group_tests(tests, s_group_setup, s_group_teardown);
}
