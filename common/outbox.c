/* Outbox relay and replay (see outbox.h). */
#include "outbox.h"

#include "db.h"
#include "log.h"
#include "pbjson.h"
#include "util.h"

#include <inttypes.h>
#include <openssl/evp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uuid/uuid.h>

#define S_READ_LIMIT 2000        /* rows per read */
#define S_REPLAY_MAX 1000        /* events per replay reply */

struct outbox {
    struct event_base *base;
    db_t *db;                    /* reads and replays */
    PGconn *listen;              /* LISTEN connection, NULL while down */
    struct event *listen_ev;     /* read watch on listen's socket */
    struct event *tick;          /* 1 s: poll, heartbeat, reconnect */
    bus_sock_t *pub;             /* borrowed */
    char *conninfo, *schema, *stream, *source;
    char *replay_sql, *state_sql;
    EVP_MD *md5;                 /* event ids (s_event_id) */
    envelope_buf_t enc;          /* published events are encoded here */
    bool reading;                /* a read is in the database */
    bool again;                  /* kicked while reading */
    uint64_t epoch, last_seq;    /* the newest event published */
    bool started;                /* epoch and last_seq were read at start */
    unsigned long long published;
};

#define S_STREAM_MAX 64          /* bytes of a stream's name */
#define S_TYPE_MAX 256           /* "<stream>.<type>" */

/* An event's id names it for good: the UUID spelling of
 * MD5("<stream>:<epoch>:<seq>"), as <schema>.outbox_replay defines it
 * (md5(...)::uuid). Computed here rather than in the database, which every
 * command waits on. */
static void s_event_id(const outbox_t *o, uint64_t epoch, uint64_t seq, char id[37])
{
    char text[S_STREAM_MAX + 48];   /* "<stream>:<epoch>:<seq>" */
    size_t len = 0;
    int rc = str_put(text, sizeof text, &len, o->stream);
    rc |= str_put(text, sizeof text, &len, ":");
    rc |= str_put_u64(text, sizeof text, &len, epoch);
    rc |= str_put(text, sizeof text, &len, ":");
    rc |= str_put_u64(text, sizeof text, &len, seq);
    unsigned char d[EVP_MAX_MD_SIZE];
    unsigned dlen = 0;
    if (rc != 0 || !EVP_Digest(text, len, d, &dlen, o->md5, NULL) || dlen != 16) {
        log_error("outbox", "cannot derive an event id seq=%" PRIu64, seq);
        abort();
    }
    uuid_unparse_lower(d, id);
}

/* Fills e, initialised by the caller, from one outbox row (columns as
 * returned by <schema>.outbox_read). Its strings are borrowed from res, o
 * and the caller's id and type buffers; e->event is new (the caller frees
 * it with protobuf_c_message_free_unpacked). An event type this build does
 * not know is sent with an empty Event, so subscribers still advance past
 * it. */
static void s_row_fill(const outbox_t *o, const PGresult *res, int row, Linli__Envelope *e,
                       char id[37], char type[S_TYPE_MAX])
{
    e->sequence = strtoull(PQgetvalue(res, row, 0), NULL, 10);
    e->epoch = strtoull(PQgetvalue(res, row, 1), NULL, 10);
    s_event_id(o, e->epoch, e->sequence, id);
    e->id = id;
    const char *name = PQgetvalue(res, row, 2);
    size_t tlen = 0;
    str_put(type, S_TYPE_MAX, &tlen, o->stream);
    str_put(type, S_TYPE_MAX, &tlen, ".");
    if (str_put(type, S_TYPE_MAX, &tlen, name) != 0) {
        /* no Event member has so long a name: sent as an empty event of a
         * type nobody handles, never under a name cut short */
        log_error("outbox", "event type too long seq=%" PRIu64, e->sequence);
        tlen = strlen(o->stream) + 1;
        str_put(type, S_TYPE_MAX, &tlen, "unknown");
        name = "";
    }
    e->type = type;
    e->community_id = strtoll(PQgetvalue(res, row, 3), NULL, 10);
    e->trace_id = PQgetvalue(res, row, 4);
    e->occurred_at = strtoll(PQgetvalue(res, row, 5), NULL, 10);
    e->stream = o->stream;
    e->source = o->source;
    e->payload_case = LINLI__ENVELOPE__PAYLOAD_EVENT;

    /* The payload is the member of Event that the type names, set directly. */
    e->event = xmalloc(sizeof *e->event);
    linli__event__init(e->event);
    if (pbjson_field(&linli__event__descriptor, name) &&
        !pbjson_set_field_flat(&e->event->base, name, PQgetvalue(res, row, 6))) {
        json_error_t jerr;
        char err[200];
        json_t *payload = json_loads(PQgetvalue(res, row, 6), 0, &jerr);
        if (!payload || pbjson_set_field(&e->event->base, name, payload, err, sizeof err) != 0) {
            log_error("outbox", "event payload does not fit the proto type=%s seq=%" PRIu64
                      " err=%s", name, e->sequence, payload ? err : jerr.text);
            linli__event__free_unpacked(e->event, NULL);
            e->event = xmalloc(sizeof *e->event);
            linli__event__init(e->event);
        }
        json_decref(payload);
    }
}

/* The event envelope for one outbox row, all of it on the heap (for replay
 * replies). Caller frees with protobuf_c_message_free_unpacked. */
static Linli__Envelope *s_row_envelope(const outbox_t *o, const PGresult *res, int row)
{
    char id[37], type[S_TYPE_MAX];
    Linli__Envelope *e = xmalloc(sizeof *e);
    linli__envelope__init(e);
    s_row_fill(o, res, row, e, id, type);
    e->id = xstrdup(id);
    e->type = xstrdup(type);
    e->trace_id = xstrdup(e->trace_id);
    e->stream = xstrdup(e->stream);
    e->source = xstrdup(e->source);
    return e;
}

static void s_publish(outbox_t *o, const Linli__Envelope *e)
{
    size_t len;
    const uint8_t *buf = envelope_encode_to(e, &o->enc, &len);
    const void *data[2] = { o->stream, buf };
    size_t size[2] = { strlen(o->stream), len };
    /* PUB never blocks: a slow subscriber loses messages at its high-water
     * mark, notices the gap and replays from the table. */
    bus_send(o->pub, 2, data, size);
}

static void s_read(outbox_t *o);

/* History restarted (a new stream row): publish from its first event;
 * subscribers see the epoch change and reset. */
static void s_epoch_reset(outbox_t *o, uint64_t epoch)
{
    log_warn("outbox", "stream epoch changed old=%" PRIu64 " new=%" PRIu64, o->epoch, epoch);
    o->epoch = epoch;
    o->last_seq = 0;
}

/* Rows come from committed transactions only, and never past a number
 * whose lower numbers are not visible yet (see the outbox table), so they
 * go out as they arrive. */
static void s_on_read(const PGresult *res, void *arg)
{
    outbox_t *o = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK)
        return;
    int n = PQntuples(res);
    for (int i = 0; i < n; i++) {
        /* on the stack, its strings borrowed: only the payload is made */
        Linli__Envelope e = LINLI__ENVELOPE__INIT;
        char id[37], type[S_TYPE_MAX];
        s_row_fill(o, res, i, &e, id, type);
        bool stop = false;
        if (e.epoch != o->epoch) {
            s_epoch_reset(o, e.epoch);
            o->again = true;
            stop = true;
        } else if (e.sequence != o->last_seq + 1) {
            /* Numbers are gap-free by construction; a hole means rows were
             * removed by hand. Stop here (the tick retries) rather than
             * publish out of order or spin. */
            log_error("outbox", "hole in the outbox stream=%s after=%" PRIu64 " next=%" PRIu64,
                      o->stream, o->last_seq, e.sequence);
            linli__event__free_unpacked(e.event, NULL);
            return;
        } else {
            s_publish(o, &e);
            o->last_seq = e.sequence;
            o->published++;
        }
        linli__event__free_unpacked(e.event, NULL);
        if (stop)
            break;
    }
    if (n == S_READ_LIMIT)
        o->again = true;
}

static void s_on_read_done(int status, const char *errmsg, void *arg)
{
    outbox_t *o = arg;
    o->reading = false;
    if (status != 0) {
        log_warn("outbox", "read failed err=%s", errmsg ? errmsg : "?");
        return; /* the tick retries */
    }
    if (o->again)
        s_read(o);
}

static void s_read(outbox_t *o)
{
    if (o->reading) {
        o->again = true;
        return;
    }
    o->reading = true;
    o->again = false;
    char after[24], limit[16];
    snprintf(after, sizeof after, "%" PRIu64, o->last_seq);
    snprintf(limit, sizeof limit, "%d", S_READ_LIMIT);
    const char *params[3] = { o->stream, after, limit };
    db_batch_t *b = db_batch_new(false);
    db_batch_add(b, o->replay_sql, 3, params, s_on_read, o);
    db_batch_submit(o->db, &b, s_on_read_done, o);
}

void outbox_kick(outbox_t *o)
{
    s_read(o);
}

/* ---- LISTEN connection ---- */

static void s_listen_close(outbox_t *o)
{
    if (o->listen_ev)
        event_free(o->listen_ev);
    o->listen_ev = NULL;
    if (o->listen)
        PQfinish(o->listen);
    o->listen = NULL;
}

static void s_on_notify(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    outbox_t *o = arg;
    if (!PQconsumeInput(o->listen)) {
        log_warn("outbox", "listen connection lost err=%s", PQerrorMessage(o->listen));
        s_listen_close(o);
        return;
    }
    PGnotify *n;
    int got = 0;
    while ((n = PQnotifies(o->listen)) != NULL) {
        PQfreemem(n);
        got = 1;
    }
    if (got)
        s_read(o);
}

static int s_listen_open(outbox_t *o)
{
    o->listen = PQconnectdb(o->conninfo);
    if (PQstatus(o->listen) != CONNECTION_OK) {
        log_warn("outbox", "listen connect failed err=%s", PQerrorMessage(o->listen));
        goto fail;
    }
    char *chan = xasprintf("%s_outbox", o->schema);
    char *q = PQescapeIdentifier(o->listen, chan, strlen(chan));
    char *sql = xasprintf("LISTEN %s", q ? q : "x");
    free(chan);
    PQfreemem(q);
    PGresult *r = db_exec(o->listen, sql, 0, NULL);
    free(sql);
    if (!r)
        goto fail;
    PQclear(r);
    const char *params[1] = { o->stream };
    r = db_exec(o->listen, o->state_sql, 1, params);
    if (!r)
        goto fail;
    if (PQntuples(r) != 1) {
        log_error("outbox", "stream not found in %s.outbox_stream stream=%s (migrated?)", o->schema,
                  o->stream);
        PQclear(r);
        goto fail;
    }
    /* The position is taken once, at start; a reconnect keeps reading from
     * the last number published, so nothing committed meanwhile is skipped
     * on the live path. */
    if (!o->started) {
        o->epoch = strtoull(PQgetvalue(r, 0, 0), NULL, 10);
        o->last_seq = strtoull(PQgetvalue(r, 0, 1), NULL, 10);
        o->started = true;
    }
    PQclear(r);
    PQsetnonblocking(o->listen, 1);
    o->listen_ev = event_new(o->base, PQsocket(o->listen), EV_READ | EV_PERSIST, s_on_notify, o);
    event_add(o->listen_ev, NULL);
    return 0;
fail:
    s_listen_close(o);
    return -1;
}

static void s_heartbeat(outbox_t *o)
{
    Linli__Heartbeat hb = LINLI__HEARTBEAT__INIT;
    hb.stream = o->stream;
    hb.epoch = o->epoch;
    hb.last_sequence = o->last_seq;
    Linli__Envelope e = LINLI__ENVELOPE__INIT;
    char id[37];
    uuid_new(id);
    e.id = id;
    e.type = (char *)"heartbeat";
    e.source = o->source;
    e.stream = o->stream;
    e.epoch = o->epoch;
    e.sequence = o->last_seq;
    e.occurred_at = now_ms();
    e.payload_case = LINLI__ENVELOPE__PAYLOAD_HEARTBEAT;
    e.heartbeat = &hb;
    s_publish(o, &e);
}

/* A history restart (new epoch, numbers from 1 again) shows no row past
 * last_seq until the new history grows past it, so the epoch is checked
 * on every tick as well. Batches complete in order, so a read sent before
 * this check has already been handled, and one sent with the old position
 * after it publishes nothing (its numbers do not follow 0). */
static void s_on_tick_state(const PGresult *res, void *arg)
{
    outbox_t *o = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1)
        return;
    uint64_t epoch = strtoull(PQgetvalue(res, 0, 0), NULL, 10);
    if (epoch == o->epoch)
        return;
    s_epoch_reset(o, epoch);
    s_read(o);
}

static void s_on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    outbox_t *o = arg;
    if (!o->listen)
        s_listen_open(o);
    s_read(o);
    const char *params[1] = { o->stream };
    db_batch_t *b = db_batch_new(false);
    db_batch_add(b, o->state_sql, 1, params, s_on_tick_state, o);
    db_batch_submit(o->db, &b, NULL, NULL);
    s_heartbeat(o);
}

/* ---- replay ---- */

typedef struct {
    outbox_t *o;
    cmdsrv_t *srv;
    cmdsrv_req_t *req;
    Linli__ReplayResult *result;   /* built as rows arrive */
    uint64_t asked_epoch;
    unsigned limit;
    bool state_ok;
} s_replay_t;

static void s_on_replay_state(const PGresult *res, void *arg)
{
    s_replay_t *r = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQntuples(res) != 1)
        return;
    r->state_ok = true;
    r->result->epoch = strtoull(PQgetvalue(res, 0, 0), NULL, 10);
    r->result->last_sequence = strtoull(PQgetvalue(res, 0, 1), NULL, 10);
}

static void s_on_replay_rows(const PGresult *res, void *arg)
{
    s_replay_t *r = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK)
        return;
    int n = PQntuples(res);
    if (r->asked_epoch && r->asked_epoch != r->result->epoch) {
        /* History restarted: the subscriber must start over from 0. */
        r->result->epoch_changed = 1;
        return;
    }
    r->result->events = xcalloc((size_t)n, sizeof *r->result->events);
    for (int i = 0; i < n; i++)
        r->result->events[r->result->n_events++] = s_row_envelope(r->o, res, i);
    r->result->more = (unsigned)n == r->limit;
}

static void s_on_replay_done(int status, const char *errmsg, void *arg)
{
    s_replay_t *r = arg;
    Linli__Reply *reply = xmalloc(sizeof *reply);
    linli__reply__init(reply);
    if (status != 0 || !r->state_ok) {
        protobuf_c_message_free_unpacked(&r->result->base, NULL);
        linli__reply__free_unpacked(reply, NULL);
        log_warn("outbox", "replay failed err=%s", errmsg ? errmsg : "stream not found");
        cmdsrv_reply_error(r->srv, &r->req, "unavailable", "replay failed; retry");
    } else {
        reply->ok = 1;
        reply->result_case = LINLI__REPLY__RESULT_REPLAY;
        reply->replay = r->result;
        cmdsrv_reply(r->srv, &r->req, reply);
    }
    free(r);
}

void outbox_replay(outbox_t *o, cmdsrv_t *srv, cmdsrv_req_t **req_p)
{
    cmdsrv_req_t *req = *req_p;
    *req_p = NULL;
    const Linli__Replay *rq = cmdsrv_req_envelope(req)->command->replay;
    if (!rq->stream || strcmp(rq->stream, o->stream) != 0) {
        cmdsrv_reply_error(srv, &req, "not_found", "no such stream");
        return;
    }
    s_replay_t *r = xcalloc(1, sizeof *r);
    r->o = o;
    r->srv = srv;
    r->req = req;
    r->asked_epoch = rq->epoch;
    r->limit = rq->limit == 0 || rq->limit > S_REPLAY_MAX ? S_REPLAY_MAX : rq->limit;
    r->result = xmalloc(sizeof *r->result);
    linli__replay_result__init(r->result);
    char after[24], limit[16];
    snprintf(after, sizeof after, "%" PRIu64, rq->after_sequence);
    snprintf(limit, sizeof limit, "%u", r->limit);
    const char *p1[1] = { o->stream };
    const char *p3[3] = { o->stream, after, limit };
    /* State first, then rows: last_sequence may lag the rows by a few events
     * committed in between, which only makes the subscriber ask once more. */
    db_batch_t *b = db_batch_new(true);
    db_batch_add(b, o->state_sql, 1, p1, s_on_replay_state, r);
    db_batch_add(b, o->replay_sql, 3, p3, s_on_replay_rows, r);
    db_batch_submit(o->db, &b, s_on_replay_done, r);
}

/* ---- life cycle ---- */

outbox_t *outbox_new(struct event_base *base, const char *conninfo, const char *schema,
                     const char *stream, const char *source, bus_sock_t *pub)
{
    outbox_t *o = xcalloc(1, sizeof *o);
    o->base = base;
    o->pub = pub;
    o->conninfo = xstrdup(conninfo);
    o->schema = xstrdup(schema);
    o->stream = xstrdup(stream);
    o->source = xstrdup(source);
    /* schema is the service's own constant name, not input. */
    o->replay_sql = xasprintf("SELECT seq, epoch, type, community_id, trace_id, occurred_at, "
                              "payload FROM %s.outbox_read($1, $2::bigint, $3::int)",
                              schema);
    if (strlen(stream) > S_STREAM_MAX) {
        log_error("outbox", "stream name longer than %d bytes stream=%s", S_STREAM_MAX, stream);
        goto fail;
    }
    o->md5 = EVP_MD_fetch(NULL, "MD5", NULL);
    if (!o->md5) {
        log_error("outbox", "OpenSSL offers no MD5, which event ids are named with "
                            "(a FIPS-only configuration has none)");
        goto fail;
    }
    o->state_sql = xasprintf("SELECT epoch, last_seq FROM %s.outbox_state($1)", schema);
    o->db = db_new(base, conninfo);
    if (!o->db || s_listen_open(o) != 0)
        goto fail;
    o->tick = event_new(base, -1, EV_PERSIST, s_on_tick, o);
    struct timeval tv = { 1, 0 };
    event_add(o->tick, &tv);
    return o;
fail:
    outbox_destroy(&o);
    return NULL;
}

void outbox_destroy(outbox_t **o_p)
{
    if (!o_p || !*o_p)
        return;
    outbox_t *o = *o_p;
    if (o->tick)
        event_free(o->tick);
    s_listen_close(o);
    db_destroy(&o->db);
    free(o->enc.p);
    free(o->conninfo);
    free(o->schema);
    free(o->stream);
    free(o->source);
    free(o->replay_sql);
    free(o->state_sql);
    EVP_MD_free(o->md5);
    free(o);
    *o_p = NULL;
}

bool outbox_ready(const outbox_t *o)
{
    return o->listen && db_ready(o->db);
}

void outbox_position(const outbox_t *o, uint64_t *epoch, uint64_t *sequence)
{
    *epoch = o->epoch;
    *sequence = o->last_seq;
}

unsigned long long outbox_published(const outbox_t *o)
{
    return o->published;
}
