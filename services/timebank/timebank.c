/* The timebank daemon's core (see timebank.h). */
#include "timebank.h"

#include "bus.h"
#include "cert.h"
#include "cmdsrv.h"
#include "config.h"
#include "db.h"
#include "http.h"
#include "log.h"
#include "migrate.h"
#include "outbox.h"
#include "pbjson.h"
#include "sqlcmd.h"
#include "sub.h"
#include "util.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#define S_SCHEMA "timebank"
#define S_STREAM "registry"              /* the events we follow */
#define S_FIRST_COMMAND 64               /* our members of linli.Command */
#define S_LAST_COMMAND 79
#define S_TICK_MS 1000                   /* metrics, and a resync that waits */
#define S_APPLY_MAX 20000                /* registry events queued or in the database */
#define S_RUN_MAX 2000                   /* registry events per apply_events command */
#define S_RUNS_MAX (S_APPLY_MAX + 1)     /* runs in flight: each holds one event at least */
#define S_RESYNC_WAIT_MAX_MS 30000       /* back-off of a resync that cannot read the position */
#define S_POSITION_SQL "SELECT epoch, seq FROM timebank.inbox_position($1)"

struct timebank {
    struct event_base *base;
    void *zctx;                  /* ZeroMQ context, owned */
    db_t *db;                    /* command connection */
    db_t *lane_db;               /* second command connection, for batches of movements */
    cmdsrv_t *srv;               /* command ROUTER */
    bus_sock_t *pub;             /* event PUB */
    outbox_t *outbox;            /* relay + replay */
    sqlcmd_t *cmds;              /* batching executor: commands and registry events */
    sub_t *sub;                  /* registry events; NULL while resynchronising or stopped */
    metrics_t *metrics;
    lx_http_t *http;             /* /healthz /readyz /metrics; NULL when off */
    metric_t *m_commands, *m_batches, *m_overlapped, *m_retried, *m_failed, *m_published, *m_pending,
        *m_rejected, *m_applied, *m_refused, *m_inflight, *m_resyncs, *m_gaps, *m_replays;
    char *secret;                /* certificate key, owned */
    size_t secret_len;
    char *conninfo;              /* owned */
    char *reg_pub, *reg_cmd;     /* the registry's endpoints, owned */
    int batch_max;               /* commands per transaction */
    int applying;                /* registry events sent to the database, not yet answered */
    json_t *run;                 /* the apply_events command being gathered; NULL: none */
    json_t *run_events;          /* its "events" (borrowed from run) */
    uint64_t run_epoch;          /* the epoch of its events */
    int run_n;                   /* events it covers, of every kind */
    bool run_flush;              /* flush_ev is active */
    struct event *flush_ev;      /* sends the run at the end of this turn of the loop */
    int *runs;                   /* events per run in flight, oldest first (a ring) */
    uint64_t *vol;               /* a bit per person id: one whose check-ins are service (a
                                  * volunteer or organiser); a superset of the database's */
    size_t vol_words;
    uint32_t *comm;              /* per person id: their community (0: not known here) */
    size_t comm_len;
    bool people_loaded;          /* vol and comm were read from the database */
    int runs_head, runs_len;
    bool resync;                 /* the subscriber is to restart from the database's position */
    int resync_wait_ms;          /* back-off after a failed restart; 0: none */
    int64_t resync_next_us;      /* no restart before this (mono_us) */
    bool synced;                 /* caught up with the registry at least once */
    bool halted;                 /* the registry's history restarted: events stopped */
    unsigned long long sub_gaps, sub_replays; /* the subscriber's, already in the metrics */
    struct event *tick;          /* metrics + resync, every S_TICK_MS */
    struct event *resync_ev;     /* restarts the subscriber once nothing is in flight */
    struct event *drain;         /* shutdown: waits for work in progress */
    int64_t drain_deadline_us;
    bool stopping;
};

int timebank_migrate(void)
{
    char *conninfo = config_pg();
    int rc = migrate_service(conninfo, S_SCHEMA, config_get("LINLI_TIMEBANK_MIGRATIONS", "services/timebank/migrations"));
    free(conninfo);
    return rc;
}

/* ---- commands ---- */

#define S_MAX_MINUTES 60000000   /* one movement: a million hours */
#define S_MAX_MEMO 200
#define S_MAX_SERVICE 64

/* The movement lane (003_lanes.sql): command name, payer, payee (0: a
 * pool), the pool's community, minutes, service, memo. */
static const sqlcmd_lane_t s_move_lane = {
    .name = "gift",
    .ncols = 7,
    .types = { "text", "bigint", "bigint", "bigint", "bigint", "text", "text" },
};

static int64_t s_comm_of(const timebank_t *t, int64_t id);

/* Gifts and spends whose arguments timebank.exec would take go in the
 * lane; the rest as JSON, which answers what is wrong with them. Returns 0
 * when the request was taken. */
static int s_move_lane_submit(timebank_t *t, cmdsrv_req_t **req, const Linli__Command *cmd)
{
    int64_t from, to, pool = 0;
    uint32_t minutes;
    const char *name, *service = "", *memo;
    if (cmd->command_case == LINLI__COMMAND__COMMAND_GIFT) {
        const Linli__Gift *g = cmd->gift;
        name = "gift";
        from = g->from_person_id;
        to = g->to_person_id;
        minutes = g->minutes;
        memo = g->memo;
        if (to <= 0)
            return -1;
    } else if (cmd->command_case == LINLI__COMMAND__COMMAND_SPEND) {
        const Linli__Spend *sp = cmd->spend;
        name = "spend";
        from = sp->person_id;
        to = sp->provider_id;
        pool = sp->community_id;
        minutes = sp->minutes;
        service = sp->service;
        memo = sp->memo;
        size_t sl = strlen(service);
        if (to < 0 || pool < 0 || (to > 0 && pool != 0) || sl < 1 || sl > S_MAX_SERVICE)
            return -1;
    } else {
        return -1;
    }
    if (from <= 0 || from == to || minutes < 1 || minutes > S_MAX_MINUTES ||
        strlen(memo) > S_MAX_MEMO)
        return -1;
    char num[4][24];
    snprintf(num[0], sizeof num[0], "%" PRId64, from);
    snprintf(num[1], sizeof num[1], "%" PRId64, to);
    snprintf(num[2], sizeof num[2], "%" PRId64, pool);
    snprintf(num[3], sizeof num[3], "%" PRIu32, minutes);
    const char *cols[7] = { name, num[0], num[1], num[2], num[3], service, memo };
    /* Two batches that share an account wait for each other's row locks
     * (taken in id order: they cannot deadlock); naming every account a
     * movement touches keeps such batches apart, so that the two the
     * executor runs at once really run at once. The pools and clearing
     * accounts are the hot rows: a community's pool takes every spend to
     * it, its clearing account every movement across its border. A
     * community not known here (a person the registry has just
     * registered) is named "?": batches that touch it may merely wait. */
    int64_t cf = s_comm_of(t, from);
    int64_t ct = to > 0 ? s_comm_of(t, to) : pool > 0 ? pool : cf;
    char names[5][32];
    int n = 0;
    snprintf(names[n++], sizeof names[0], "p%" PRId64, from);
    if (to > 0)
        snprintf(names[n++], sizeof names[0], "p%" PRId64, to);
    else if (ct > 0)
        snprintf(names[n++], sizeof names[0], "pool%" PRId64, ct);
    else
        snprintf(names[n++], sizeof names[0], "pool?");
    if (!cf || !ct) {
        snprintf(names[n++], sizeof names[0], "clearing?");
    } else if (cf != ct) {
        snprintf(names[n++], sizeof names[0], "clearing%" PRId64, cf);
        snprintf(names[n++], sizeof names[0], "clearing%" PRId64, ct);
    }
    const char *conflicts[5] = { names[0], names[1], names[2], names[3], names[4] };
    return sqlcmd_submit_lane(t->cmds, req, name, cols, conflicts, n);
}

/* Queries change nothing: get_..., list_..., verify_... */
static bool s_is_read(const char *name)
{
    return !strncmp(name, "get_", 4) || !strncmp(name, "list_", 5) ||
           !strncmp(name, "verify_", 7);
}

static void s_on_command(cmdsrv_t *srv, cmdsrv_req_t *req, void *arg)
{
    timebank_t *t = arg;
    const Linli__Command *cmd = cmdsrv_req_envelope(req)->command;
    const char *name = envelope_command_name(cmd);

    if (cmd->command_case == LINLI__COMMAND__COMMAND_REPLAY) {
        outbox_replay(t->outbox, srv, &req);
        return;
    }
    /* Every command goes to SQL as-is: its member message, by the field
     * name, is the argument object. Only our own: another service's
     * command would only meet "unknown" in our SQL, later and dearer. */
    const ProtobufCFieldDescriptor *f = name ? pbjson_field(&linli__command__descriptor, name)
                                             : NULL;
    if (!f || f->id < S_FIRST_COMMAND || f->id > S_LAST_COMMAND) {
        cmdsrv_reply_error(srv, &req, "unknown_command", "this service has no such command");
        return;
    }
    /* A command that changes the ledger must be safe to retry: after a
     * lost connection its outcome is unknown, and only its key tells a
     * retry from a second movement. */
    const Linli__Envelope *env = cmdsrv_req_envelope(req);
    if (!s_is_read(name) && (!env->idempotency_key || !env->idempotency_key[0])) {
        cmdsrv_reply_error(srv, &req, "invalid_argument",
                           "an idempotency key is required: a command that moves hours must "
                           "be safe to retry");
        return;
    }
    if (s_move_lane_submit(t, &req, cmd) == 0)
        return;
    const ProtobufCMessage *m = *(const ProtobufCMessage *const *)((const char *)cmd + f->offset);
    json_t *args = pbjson_from_message(m);
    sqlcmd_submit(t->cmds, &req, name, &args);
}

/* issue_certificate: SQL fixed the content and its digest; we add the code
 * only this key can make, and the printable page. */
static int s_finish_issue(timebank_t *t, json_t *res)
{
    const char *number = json_string_value(json_object_get(res, "number"));
    const char *digest = json_string_value(json_object_get(res, "digest"));
    char code[CERT_CODE_MAX + 1];
    if (cert_code(t->secret, t->secret_len, number, digest, code, sizeof code) != 0) {
        log_error("timebank", "cannot make a certificate code number=%s digest=%s",
                  number ? number : "?", digest ? digest : "?");
        return -1;
    }
    json_object_set_new(res, "code", json_string(code));
    char *html = cert_html(res);
    if (!html)
        return -1;
    json_object_set_new(res, "html", json_string(html));
    free(html);
    return 0;
}

/* verify_certificate: SQL echoed the code and, when it found the
 * certificate, its number and the digest recomputed from the ledger, and
 * what else is wrong (problem). The code decides whether that content is
 * what was certified. */
static void s_finish_verify(timebank_t *t, json_t *res)
{
    const char *given = json_string_value(json_object_get(res, "code"));
    const char *number = json_string_value(json_object_get(res, "number"));
    const char *digest = json_string_value(json_object_get(res, "digest"));
    const char *problem = json_string_value(json_object_get(res, "problem"));
    bool matches = cert_code_matches(t->secret, t->secret_len, number, digest, given);
    bool valid = matches && (!problem || !problem[0]);
    json_object_set_new(res, "valid", json_boolean(valid));
    if (!valid && (!problem || !problem[0]))
        json_object_set_new(res, "problem",
                            json_string("the code does not match this certificate: it is forged "
                                        "or the certificate was altered"));
    /* a refused code may be a forgery attempt: worth a line at info */
    if (valid)
        log_debug("timebank", "certificate verified number=%s valid=1", number);
    else
        log_info("timebank", "certificate refused number=%s", number ? number : "-");
}

static int s_finish(const char *name, json_t *reply, void *arg)
{
    timebank_t *t = arg;
    bool issue = strcmp(name, "issue_certificate") == 0;
    if (!issue && strcmp(name, "verify_certificate") != 0)
        return 0;
    json_t *res = json_object_get(reply, name);
    if (!json_is_object(res)) {
        /* an empty result is left out of the reply */
        res = json_object();
        json_object_set_new(reply, name, res);
    }
    if (issue)
        return s_finish_issue(t, res);
    s_finish_verify(t, res);
    return 0;
}

static void s_on_committed(void *arg)
{
    timebank_t *t = arg;
    outbox_kick(t->outbox);
}

/* ---- registry events ---- */

static void s_resync_schedule(timebank_t *t, const char *why);
static void s_sub_drop(timebank_t *t);

/* ---- volunteers ----
 *
 * Only a volunteer's check-in can become hours, and at a festival most
 * check-ins are residents'. Registry ids are dense, so a bit per id tells
 * at once whether a check-in is worth sending to the database: a million
 * people cost 128 KB. The bits are loaded with the position and set by
 * person_registered events as they arrive; a bit set for a person whose
 * event was later replayed is harmless (SQL checks again), and none is
 * ever missing. */

/* Past this id the tables stop (ids are dense: a city has tens of millions
 * at most): such a person's check-ins all go to SQL, and their movements
 * name their community as not known. */
#define S_VOL_ID_MAX (1LL << 26)

static void s_vol_set(timebank_t *t, int64_t id)
{
    if (id <= 0 || id >= S_VOL_ID_MAX)
        return;
    size_t w = (size_t)id / 64;
    if (w >= t->vol_words) {
        /* by half again, not double: the table is as large as the city */
        size_t n = t->vol_words + t->vol_words / 2 + 1024;
        if (n <= w)
            n = w + 1024;
        t->vol = xrealloc(t->vol, n * sizeof *t->vol);
        memset(t->vol + t->vol_words, 0, (n - t->vol_words) * sizeof *t->vol);
        t->vol_words = n;
    }
    t->vol[w] |= 1ull << ((uint64_t)id % 64);
}

/* Whether id's check-ins may be service. */
static bool s_vol_has(const timebank_t *t, int64_t id)
{
    if (id >= S_VOL_ID_MAX)
        return true;
    size_t w = (size_t)id / 64;
    return id > 0 && w < t->vol_words && (t->vol[w] >> ((uint64_t)id % 64) & 1);
}

/* A person's community, for naming the accounts a movement touches (see
 * s_move_lane_submit): ids are dense, 4 bytes a person. */
static void s_comm_set(timebank_t *t, int64_t id, int64_t community)
{
    if (id <= 0 || id >= S_VOL_ID_MAX || community <= 0 || community > UINT32_MAX)
        return;
    if ((size_t)id >= t->comm_len) {
        size_t n = t->comm_len + t->comm_len / 2 + 4096;
        if (n <= (size_t)id)
            n = (size_t)id + 4096;
        t->comm = xrealloc(t->comm, n * sizeof *t->comm);
        memset(t->comm + t->comm_len, 0, (n - t->comm_len) * sizeof *t->comm);
        t->comm_len = n;
    }
    t->comm[id] = (uint32_t)community;
}

static int64_t s_comm_of(const timebank_t *t, int64_t id)
{
    return id > 0 && (size_t)id < t->comm_len ? t->comm[id] : 0;
}

/* Sets the bits of the volunteers conn's database knows, a row at a time
 * (a city has millions). Returns 0, or -1 (logged). */
static int s_vol_load(timebank_t *t, PGconn *conn)
{
    if (!PQsendQuery(conn, "SELECT id, community_id, volunteer FROM timebank.people") ||
        !PQsetSingleRowMode(conn)) {
        log_error("sub", "cannot read the volunteers err=%s", PQerrorMessage(conn));
        return -1;
    }
    int rc = 0;
    long long n = 0;
    PGresult *res;
    while ((res = PQgetResult(conn))) {
        ExecStatusType st = PQresultStatus(res);
        if (st == PGRES_SINGLE_TUPLE) {
            int64_t id = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
            s_comm_set(t, id, strtoll(PQgetvalue(res, 0, 1), NULL, 10));
            if (PQgetvalue(res, 0, 2)[0] == 't') {
                s_vol_set(t, id);
                n++;
            }
        } else if (st != PGRES_TUPLES_OK) {
            log_error("sub", "cannot read the volunteers err=%s", PQresultErrorMessage(res));
            rc = -1;
        }
        PQclear(res);
    }
    if (rc == 0)
        log_info("sub", "volunteers known=%lld", n);
    return rc;
}

static void s_run_drop(timebank_t *t)
{
    json_decref(t->run);
    t->run = t->run_events = NULL;
    t->run_n = 0;
}

/* Sends the gathered run as one internal command: SQL applies the events
 * it follows, in order, and stores the position of the run's last event
 * with them (or answers "gap"). */
static void s_run_flush(timebank_t *t)
{
    if (!t->run)
        return;
    if (t->runs_len == S_RUNS_MAX) {   /* cannot happen: runs hold one event at least */
        s_run_drop(t);
        s_resync_schedule(t, "too many runs in flight");
        return;
    }
    t->runs[(t->runs_head + t->runs_len++) % S_RUNS_MAX] = t->run_n;
    t->applying += t->run_n;
    json_t *args = t->run;
    t->run = t->run_events = NULL;
    t->run_n = 0;
    cmdsrv_req_t *none = NULL;
    sqlcmd_submit(t->cmds, &none, "apply_events", &args);
}

static void s_on_flush(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    timebank_t *t = arg;
    t->run_flush = false;
    if (!t->stopping && !t->resync)
        s_run_flush(t);
}

/* Events that arrive together (a replay, a burst) go to the database as
 * one run: a check-in flood at the registry costs the timebank one
 * statement per few thousand events, not one per event. */
static void s_on_event(const Linli__Envelope *ev, void *arg)
{
    timebank_t *t = arg;
    if (t->stopping || t->resync || t->halted)
        return;   /* replayed from the database's position after the resync */
    if (t->applying + t->run_n >= S_APPLY_MAX) {
        /* The registry sends faster than we apply. Rather than queue
         * without bound, let the queue drain and replay the rest. */
        s_resync_schedule(t, "too many events in flight");
        return;
    }
    if (t->run && ev->epoch != t->run_epoch) {
        s_run_flush(t);
        if (t->resync)
            return;
    }
    if (!t->run) {
        t->run_events = json_array();
        t->run = json_pack("{s:s, s:I, s:I, s:O}", "stream", S_STREAM, "epoch",
                           (json_int_t)ev->epoch, "first", (json_int_t)ev->sequence, "events",
                           t->run_events);
        json_decref(t->run_events);   /* the run holds it */
        t->run_epoch = ev->epoch;
    }
    json_object_set_new(t->run, "last", json_integer((json_int_t)ev->sequence));
    t->run_n++;
    /* The kinds the timebank follows go with their payload, the member
     * message ({"id": 7, "community_id": 3, ...}); the others, and kinds
     * newer than our proto, only count. */
    const Linli__Event *e = ev->event;
    bool wanted = false;
    switch (e ? e->event_case : LINLI__EVENT__EVENT__NOT_SET) {
    case LINLI__EVENT__EVENT_COMMUNITY_CREATED:
    case LINLI__EVENT__EVENT_ACTIVITY_CREATED:
        wanted = true;
        break;
    case LINLI__EVENT__EVENT_PERSON_REGISTERED:
        s_comm_set(t, e->person_registered->id, e->person_registered->community_id);
        for (size_t i = 0; i < e->person_registered->n_roles; i++)
            if (e->person_registered->roles[i] == LINLI__ROLE__ROLE_VOLUNTEER ||
                e->person_registered->roles[i] == LINLI__ROLE__ROLE_ORGANISER)
                s_vol_set(t, e->person_registered->id);
        wanted = true;
        break;
    case LINLI__EVENT__EVENT_CHECKED_IN:
        wanted = e->checked_in->activity_id > 0 && s_vol_has(t, e->checked_in->person_id);
        break;
    case LINLI__EVENT__EVENT_CHECKED_OUT:
        wanted = s_vol_has(t, e->checked_out->person_id);
        break;
    default:
        break;
    }
    /* the oneof case is the member's field number */
    const ProtobufCFieldDescriptor *f =
        wanted ? protobuf_c_message_descriptor_get_field(&linli__event__descriptor,
                                                         (unsigned)e->event_case)
               : NULL;
    if (f) {
        const ProtobufCMessage *m =
            *(const ProtobufCMessage *const *)((const char *)e + f->offset);
        json_array_append_new(t->run_events,
                              json_pack("{s:I, s:s, s:I, s:o}", "seq", (json_int_t)ev->sequence,
                                        "type", f->name, "at", (json_int_t)ev->occurred_at, "p",
                                        m ? pbjson_from_message(m) : json_object()));
    }
    if (t->run_n >= S_RUN_MAX) {
        s_run_flush(t);
    } else if (!t->run_flush) {
        t->run_flush = true;
        event_active(t->flush_ev, EV_TIMEOUT, 1);
    }
}

static void s_on_epoch(uint64_t new_epoch, void *arg)
{
    (void)arg;
    /* Nothing to reset here: SQL takes sequence 1 of a newer epoch. */
    log_warn("sub", "registry stream restarted epoch=%" PRIu64, new_epoch);
}

/* The outcome of every internal command: for apply_event, anything but
 * "ok" (a gap, a failed or refused command) means the subscriber's
 * position is no longer the database's. */
static void s_on_internal(const char *name, const char *code, void *arg)
{
    timebank_t *t = arg;
    if (strcmp(name, "apply_events") != 0 || t->runs_len == 0)
        return;
    /* internal commands are answered in the order they were sent */
    int n = t->runs[t->runs_head];
    t->runs_head = (t->runs_head + 1) % S_RUNS_MAX;
    t->runs_len--;
    t->applying -= n;
    if (strcmp(code, "ok") == 0) {
        metric_inc(t->m_applied, n);
    } else if (strcmp(code, "epoch_changed") == 0) {
        /* Replaying would only meet the same answer: stop following, say
         * so, and leave it to an operator (see the README). */
        metric_inc(t->m_refused, n);
        if (!t->halted)
            log_error("sub", "the registry's history restarted (new epoch): registry events are "
                             "no longer applied; commands keep working on what the ledger holds");
        t->halted = true;
        s_run_drop(t);
        s_sub_drop(t);
    } else {
        metric_inc(t->m_refused, n);
        s_resync_schedule(t, code);
    }
    if (t->resync && t->applying == 0 && !t->stopping)
        event_active(t->resync_ev, EV_TIMEOUT, 1);
}

/* Reads the position of the last applied registry event (0/0 when none),
 * then the volunteers the database knows (s_vol_load).
 * Blocking, on a connection of its own: start-up and resyncs only. */
static int s_position_read(timebank_t *t, uint64_t *epoch, uint64_t *seq, bool people)
{
    /* dbname (the conninfo) comes last so that it may override the timeout */
    const char *const keys[] = { "connect_timeout", "dbname", NULL };
    const char *const vals[] = { "5", t->conninfo, NULL };
    PGconn *conn = PQconnectdbParams(keys, vals, 1);
    PGresult *res = NULL;
    int rc = -1;
    if (PQstatus(conn) != CONNECTION_OK) {
        log_error("sub", "cannot connect to read the registry position err=%s",
                  PQerrorMessage(conn));
        goto done;
    }
    const char *params[1] = { S_STREAM };
    res = db_exec(conn, S_POSITION_SQL, 1, params);
    if (!res)
        goto done;
    char *end1 = NULL, *end2 = NULL;
    if (PQntuples(res) != 1 || PQnfields(res) != 2 || PQgetisnull(res, 0, 0) ||
        PQgetisnull(res, 0, 1)) {
        log_error("sub", "unexpected registry position rows=%d", PQntuples(res));
        goto done;
    }
    *epoch = strtoull(PQgetvalue(res, 0, 0), &end1, 10);
    *seq = strtoull(PQgetvalue(res, 0, 1), &end2, 10);
    if (*end1 || *end2 || PQgetvalue(res, 0, 0)[0] == '-' || PQgetvalue(res, 0, 1)[0] == '-') {
        log_error("sub", "bad registry position epoch=%s seq=%s", PQgetvalue(res, 0, 0),
                  PQgetvalue(res, 0, 1));
        goto done;
    }
    /* After the position: what was applied since only adds volunteers. At
     * start only: the tables only ever gain, and a resync replays what
     * would add to them. */
    if (people && s_vol_load(t, conn) != 0)
        goto done;
    rc = 0;
done:
    PQclear(res);
    PQfinish(conn);
    return rc;
}

/* Subscribes from the position the database holds. */
static int s_sub_start(timebank_t *t)
{
    uint64_t epoch = 0, seq = 0;
    if (s_position_read(t, &epoch, &seq, !t->people_loaded) != 0)
        return -1;
    t->people_loaded = true;
    sub_opts_t so = {
        .pub_endpoint = t->reg_pub,
        .cmd_endpoint = t->reg_cmd,
        .stream = S_STREAM,
        .source = "timebank",
        .epoch = epoch,
        .sequence = seq,
    };
    t->sub = sub_new(t->base, t->zctx, &so, s_on_event, s_on_epoch, t);
    if (!t->sub)
        return -1;
    log_info("sub", "subscribed stream=%s from epoch=%" PRIu64 " seq=%" PRIu64, S_STREAM, epoch,
             seq);
    return 0;
}

/* Folds the subscriber's counters into ours: they restart with it. */
static void s_fold_sub_stats(timebank_t *t)
{
    unsigned long long applied, dupes, gaps, replays;
    if (!t->sub)
        return;
    sub_stats(t->sub, &applied, &dupes, &gaps, &replays);
    if (gaps > t->sub_gaps)
        metric_inc(t->m_gaps, gaps - t->sub_gaps);
    if (replays > t->sub_replays)
        metric_inc(t->m_replays, replays - t->sub_replays);
    t->sub_gaps = gaps;
    t->sub_replays = replays;
}

static void s_sub_drop(timebank_t *t)
{
    s_fold_sub_stats(t);
    sub_destroy(&t->sub);
    t->sub_gaps = t->sub_replays = 0;
}

/* Never destroys the subscriber here: this may run inside its callback. */
static void s_resync_schedule(timebank_t *t, const char *why)
{
    if (t->resync || t->stopping)
        return;
    t->resync = true;
    s_run_drop(t);   /* replayed too */
    metric_inc(t->m_resyncs, 1);
    log_warn("sub", "resynchronising with the database reason=\"%s\" in_flight=%d", why,
             t->applying);
    /* The subscriber goes at once (it would only feed us more to drop);
     * the new one starts when nothing is in flight. */
    event_active(t->resync_ev, EV_TIMEOUT, 1);
}

/* Drops the subscriber and, once no event is in flight (an older one could
 * still move the position), starts a new one from the database's position. */
static void s_on_resync(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    timebank_t *t = arg;
    if (!t->resync || t->stopping)
        return;
    s_sub_drop(t);
    if (t->applying > 0 || mono_us() < t->resync_next_us)
        return;   /* the last answer, or the tick, brings us back */
    if (s_sub_start(t) != 0) {
        t->resync_wait_ms = t->resync_wait_ms ? t->resync_wait_ms * 2 : S_TICK_MS;
        if (t->resync_wait_ms > S_RESYNC_WAIT_MAX_MS)
            t->resync_wait_ms = S_RESYNC_WAIT_MAX_MS;
        t->resync_next_us = mono_us() + (int64_t)t->resync_wait_ms * 1000;
        log_warn("sub", "resync failed, retrying in_ms=%d", t->resync_wait_ms);
        return;
    }
    t->resync = false;
    t->resync_wait_ms = 0;
    t->resync_next_us = 0;
}

/* ---- periodic work, readiness, shutdown ---- */

/* Caught up: the registry has nothing more for us and what it sent fits in
 * one transaction. Once caught up, a later resync does not take us out of
 * service: commands about people we know still work. */
static bool s_synced(timebank_t *t)
{
    if (!t->synced && t->sub && sub_caught_up(t->sub) && t->applying <= t->batch_max) {
        t->synced = true;
        log_info("timebank", "caught up with the registry");
    }
    return t->synced;
}

static void s_on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    timebank_t *t = arg;
    if (t->resync)
        s_on_resync(-1, 0, t);
    s_synced(t);
    s_fold_sub_stats(t);
    unsigned long long batches, commands, retried, failed, rcv, rej, rep;
    sqlcmd_stats(t->cmds, &batches, &commands, &retried, &failed);
    cmdsrv_stats(t->srv, &rcv, &rej, &rep);
    metric_set_total(t->m_commands, commands);
    metric_set_total(t->m_batches, batches);
    metric_set_total(t->m_overlapped, sqlcmd_overlapped(t->cmds));
    metric_set_total(t->m_retried, retried);
    metric_set_total(t->m_failed, failed);
    metric_set_total(t->m_rejected, rej);
    metric_set_total(t->m_published, outbox_published(t->outbox));
    metric_set(t->m_pending, (double)sqlcmd_pending(t->cmds));
    metric_set(t->m_inflight, (double)t->applying);
}

static const char *s_ready(void *arg)
{
    timebank_t *t = arg;
    if (t->stopping)
        return "shutting down";
    if (!db_ready(t->db) || !db_ready(t->lane_db))
        return "database down";
    if (!outbox_ready(t->outbox))
        return "relay not connected";
    if (t->halted)
        return "registry history restarted: events stopped";
    if (!s_synced(t))
        return "not caught up with registry";
    return NULL;
}

static void s_on_drain(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    timebank_t *t = arg;
    int left = sqlcmd_pending(t->cmds) + cmdsrv_outstanding(t->srv);
    if (left == 0 || mono_us() >= t->drain_deadline_us) {
        if (left)
            log_warn("timebank", "drain deadline reached, commands unanswered=%d", left);
        event_base_loopexit(t->base, NULL);
        return;
    }
    struct timeval tv = { 0, 20000 };
    evtimer_add(t->drain, &tv);
}

void timebank_shutdown(timebank_t *t, int deadline_ms)
{
    if (t->stopping)
        return;
    t->stopping = true;
    cmdsrv_pause(t->srv, true);
    event_del(t->tick);
    /* No more events: those in flight finish, the rest are replayed from
     * the stored position at the next start. */
    s_sub_drop(t);
    s_run_drop(t);
    t->drain_deadline_us = mono_us() + (int64_t)deadline_ms * 1000;
    s_on_drain(-1, 0, t);
}

/* ---- life cycle ---- */

timebank_t *timebank_new(struct event_base *base)
{
    timebank_t *t = xcalloc(1, sizeof *t);
    t->base = base;
    int64_t batch_max, pub_hwm;
    if (config_int("LINLI_BATCH_MAX", 512, 1, 10000, &batch_max) != 0 ||
        config_int("LINLI_PUB_SNDHWM", 10000, 1, 10000000, &pub_hwm) != 0)
        goto fail;
    t->batch_max = (int)batch_max;
    t->secret = config_secret("LINLI_CERT_SECRET");
    t->secret_len = t->secret ? strlen(t->secret) : 0;
    if (t->secret_len < 16) {
        log_error("timebank", "LINLI_CERT_SECRET_FILE (or LINLI_CERT_SECRET) must hold at "
                              "least 16 bytes");
        goto fail;
    }
    if (strcmp(config_get("LINLI_MIGRATE", "1"), "0") != 0 && timebank_migrate() != 0)
        goto fail;

    t->conninfo = config_pg();
    t->reg_pub = xstrdup(config_get("LINLI_REGISTRY_PUB", "tcp://127.0.0.1:7102"));
    t->reg_cmd = xstrdup(config_get("LINLI_REGISTRY_CMD", "tcp://127.0.0.1:7101"));
    t->zctx = zmq_ctx_new();
    t->db = db_new(base, t->conninfo);
    t->lane_db = db_new(base, t->conninfo);
    if (!t->db || !t->lane_db)
        goto fail;
    t->pub = bus_sock_new(base, t->zctx, ZMQ_PUB, NULL, NULL);
    if (!t->pub)
        goto fail;
    /* Per subscriber: past this many queued events a slow one starts losing
     * live events and catches up by replay, so we never grow without bound. */
    int hwm = (int)pub_hwm;
    zmq_setsockopt(bus_zsock(t->pub), ZMQ_SNDHWM, &hwm, sizeof hwm);
    if (bus_bind(t->pub, config_get("LINLI_TIMEBANK_PUB", "tcp://127.0.0.1:7112")))
        goto fail;
    t->outbox = outbox_new(base, t->conninfo, S_SCHEMA, "timebank", "timebank", t->pub);
    if (!t->outbox)
        goto fail;
    t->srv = cmdsrv_new(base, t->zctx, config_get("LINLI_TIMEBANK_CMD", "tcp://127.0.0.1:7111"),
                        "timebank", s_on_command, t);
    if (!t->srv)
        goto fail;
    /* Registry events have room of their own beyond the commands' queue:
     * a catch-up never makes clients' commands "overloaded". */
    sqlcmd_opts_t opts = { .schema = S_SCHEMA, .batch_max = (int)batch_max,
                           .queue_max = (int)batch_max * 64 + S_APPLY_MAX,
                           .finish = s_finish, .committed = s_on_committed,
                           .internal = s_on_internal, .lane = &s_move_lane,
                           .lane_db = t->lane_db, .arg = t };
    t->cmds = sqlcmd_new(t->srv, t->db, &opts);
    if (!t->cmds)
        goto fail;

    t->metrics = metrics_new("linli_timebank");
    t->m_commands = metrics_add(t->metrics, "commands_total", "counter", "Commands answered after commit", NULL);
    t->m_batches = metrics_add(t->metrics, "batches_total", "counter", "Transactions committed", NULL);
    t->m_overlapped = metrics_add(t->metrics, "batches_overlapped_total", "counter", "Batches of movements sent while another was in the database", NULL);
    t->m_retried = metrics_add(t->metrics, "commands_retried_total", "counter", "Commands rerun alone after their batch failed", NULL);
    t->m_failed = metrics_add(t->metrics, "commands_failed_total", "counter", "Commands answered with an internal error", NULL);
    t->m_rejected = metrics_add(t->metrics, "frames_rejected_total", "counter", "Frames refused before reaching a handler", NULL);
    t->m_published = metrics_add(t->metrics, "events_published_total", "counter", "Events published by the relay", NULL);
    t->m_pending = metrics_add(t->metrics, "commands_pending", "gauge", "Commands and registry events queued or in the database", NULL);
    t->m_applied = metrics_add(t->metrics, "registry_events_applied_total", "counter", "Registry events applied (or found already applied)", NULL);
    t->m_refused = metrics_add(t->metrics, "registry_events_refused_total", "counter", "Registry events the database refused (a gap) or could not apply", NULL);
    t->m_inflight = metrics_add(t->metrics, "registry_events_in_flight", "gauge", "Registry events queued or in the database", NULL);
    t->m_resyncs = metrics_add(t->metrics, "registry_resyncs_total", "counter", "Subscriber restarts from the position in the database", NULL);
    t->m_gaps = metrics_add(t->metrics, "registry_gaps_total", "counter", "Gaps in the registry's live events (each replayed)", NULL);
    t->m_replays = metrics_add(t->metrics, "registry_replays_total", "counter", "Replay requests sent to the registry", NULL);
    const char *http = config_get("LINLI_TIMEBANK_HTTP", NULL);
    if (http) {
        t->http = http_new(base, http, t->metrics, s_ready, t);
        if (!t->http)
            goto fail;
    }
    t->resync_ev = evtimer_new(base, s_on_resync, t);
    t->flush_ev = event_new(base, -1, 0, s_on_flush, t);
    t->runs = xcalloc(S_RUNS_MAX, sizeof *t->runs);
    t->drain = evtimer_new(base, s_on_drain, t);
    if (s_sub_start(t) != 0)
        goto fail;
    t->tick = event_new(base, -1, EV_PERSIST, s_on_tick, t);
    struct timeval tv = { S_TICK_MS / 1000, (S_TICK_MS % 1000) * 1000 };
    event_add(t->tick, &tv);
    log_info("timebank", "ready cmd=%s pub=%s http=%s registry_pub=%s registry_cmd=%s "
                         "batch_max=%lld",
             cmdsrv_endpoint(t->srv), bus_endpoint(t->pub), http ? http : "off", t->reg_pub,
             t->reg_cmd, (long long)batch_max);
    return t;
fail:
    timebank_destroy(&t);
    return NULL;
}

void timebank_destroy(timebank_t **t_p)
{
    if (!t_p || !*t_p)
        return;
    timebank_t *t = *t_p;
    /* From here no internal result (answered "unavailable" below) may
     * schedule a resync. */
    t->stopping = true;
    if (t->tick)
        event_free(t->tick);
    if (t->resync_ev)
        event_free(t->resync_ev);
    if (t->flush_ev)
        event_free(t->flush_ev);
    json_decref(t->run);
    free(t->runs);
    free(t->vol);
    free(t->comm);
    if (t->drain)
        event_free(t->drain);
    http_destroy(&t->http);
    sub_destroy(&t->sub);
    /* The executor stops sending, then the db reports what was in flight
     * (answered "unavailable"), then the executor goes. */
    if (t->cmds)
        sqlcmd_close(t->cmds);
    outbox_destroy(&t->outbox);
    db_destroy(&t->db);
    db_destroy(&t->lane_db);
    sqlcmd_destroy(&t->cmds);
    cmdsrv_destroy(&t->srv);
    bus_sock_destroy(&t->pub);
    metrics_destroy(&t->metrics);
    if (t->zctx)
        zmq_ctx_term(t->zctx);
    if (t->secret) {
        memset(t->secret, 0, t->secret_len);
        free(t->secret);
    }
    free(t->conninfo);
    free(t->reg_pub);
    free(t->reg_cmd);
    free(t);
    *t_p = NULL;
}
