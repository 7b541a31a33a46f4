/* The registry daemon's core (see registry.h). */
#include "registry.h"

#include "bus.h"
#include "cmdsrv.h"
#include "config.h"
#include "db.h"
#include "http.h"
#include "log.h"
#include "migrate.h"
#include "outbox.h"
#include "pbjson.h"
#include "qr.h"
#include "sqlcmd.h"
#include "token.h"
#include "util.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#define S_SCHEMA "registry"
#define S_MAX_SKEW_MS (5 * 60 * 1000)               /* scanner clocks may run ahead */
#define S_MAX_OFFLINE_MS (30LL * 24 * 3600 * 1000)   /* oldest offline scan accepted */
#define S_MAX_DEVICE_ID 64
#define S_MAX_UPLOAD 500

struct registry {
    struct event_base *base;
    void *zctx;                  /* ZeroMQ context, owned */
    db_t *db;                    /* command connection */
    db_t *lane_db;               /* second command connection, for check-in batches */
    cmdsrv_t *srv;               /* command ROUTER */
    bus_sock_t *pub;             /* event PUB */
    outbox_t *outbox;            /* relay + replay */
    sqlcmd_t *cmds;              /* batching executor */
    metrics_t *metrics;
    lx_http_t *http;             /* /healthz /readyz /metrics; NULL when off */
    metric_t *m_commands, *m_batches, *m_overlapped, *m_retried, *m_failed, *m_published, *m_pending,
        *m_rejected, *m_token_hits, *m_token_misses;
    char *secret;                /* token key, owned */
    token_cache_t *tokens;       /* genuine tokens under secret */
    char *conninfo;              /* owned */
    size_t secret_len;
    struct event *tick;          /* sweep + metrics, every sweep_ms */
    struct event *drain;         /* shutdown: waits for work in progress */
    int64_t drain_deadline_us;
    bool stopping;
};

int registry_migrate(void)
{
    char *conninfo = config_pg();
    int rc = migrate_service(conninfo, S_SCHEMA, config_get("LINLI_REGISTRY_MIGRATIONS", "services/registry/migrations"));
    free(conninfo);
    return rc;
}

/* ---- commands ---- */

/* Checks a scan against what no scanner could have sent and verifies its
 * token, at the time of the scan so a scanner that was offline can upload
 * later. Returns 0 with the scan's time, verdict and claims, or -1 with a
 * reason. */
static int s_scan_check(registry_t *r, const Linli__Scan *scan, int64_t now, int64_t *at,
                        token_verdict_t *v, token_claims_t *c, const char **why)
{
    *at = scan->scanned_at ? scan->scanned_at : now;
    if (*at > now + S_MAX_SKEW_MS) {
        *why = "scanned_at is in the future";
        return -1;
    }
    if (*at < now - S_MAX_OFFLINE_MS) {
        *why = "scanned_at is more than 30 days old";
        return -1;
    }
    if (strlen(scan->device_id) > S_MAX_DEVICE_ID) {
        *why = "device_id is longer than 64 bytes";
        return -1;
    }
    if (scan->person_id <= 0) {
        *why = "person_id must be positive";
        return -1;
    }
    *c = (token_claims_t){ 0 };
    *v = token_cache_verify(r->tokens, scan->token, strlen(scan->token), *at, c);
    return 0;
}

/* The JSON arguments for one checked scan: its own fields plus what only we
 * can know, the token's verdict and claims. */
static json_t *s_scan_json(const Linli__Scan *scan, int64_t at, token_verdict_t v,
                           const token_claims_t *c)
{
    json_t *a = pbjson_from_message(&scan->base);
    json_object_del(a, "token");  /* its verdict and claims stand for it */
    json_object_set_new(a, "scanned_at", json_integer(at));
    json_object_set_new(a, "verdict", json_string(token_verdict_name(v)));
    if (v == TOKEN_OK || v == TOKEN_EXPIRED) {
        json_object_set_new(a, "kind", json_string(c->kind == TOKEN_STATION ? "s" : "a"));
        json_object_set_new(a, "subject_id", json_integer(c->id));
        json_object_set_new(a, "community_id", json_integer(c->community_id));
    }
    return a;
}

/* The scan lane (004_lanes.sql): person, activity, its community, device,
 * counter (two's-complement), scanned_at, expected_id. */
static const sqlcmd_lane_t s_scan_lane = {
    .name = "scan",
    .ncols = 7,
    .types = { "bigint", "bigint", "bigint", "text", "bigint", "bigint", "bigint" },
};

/* The flood's plain case, an entry scan of a valid activity token for the
 * activity the scanner expects, goes in the scan lane; everything else as
 * JSON. Returns 0 when the request was taken. */
static int s_scan_lane_submit(registry_t *r, cmdsrv_req_t **req, const Linli__Scan *scan,
                              int64_t at, token_verdict_t v, const token_claims_t *c)
{
    if (scan->direction != LINLI__DIRECTION__DIRECTION_ENTRY || v != TOKEN_OK ||
        c->kind != TOKEN_ACTIVITY || (scan->expected_id != 0 && scan->expected_id != c->id))
        return -1;
    const int64_t v6[6] = { scan->person_id, c->id, c->community_id, (int64_t)scan->counter,
                            at, scan->expected_id };
    char num[6][24];
    for (int k = 0; k < 6; k++) {
        size_t len = 0;
        str_put_i64(num[k], sizeof num[k], &len, v6[k]);
    }
    const char *cols[7] = { num[0], num[1], num[2], scan->device_id, num[3], num[4], num[5] };
    /* A batch running beside this one must not hold the same person (one
     * open check-in each) or nonce: the unique indexes would make one wait
     * for the other. */
    char nonce[S_MAX_DEVICE_ID + 32];
    size_t nlen = 0;
    str_put(nonce, sizeof nonce, &nlen, scan->device_id);
    str_put(nonce, sizeof nonce, &nlen, "/");
    str_put(nonce, sizeof nonce, &nlen, num[3]);
    const char *conflicts[2] = { num[0], nonce };
    return sqlcmd_submit_lane(r->cmds, req, NULL, cols, conflicts, scan->device_id[0] ? 2 : 1);
}

static void s_on_command(cmdsrv_t *srv, cmdsrv_req_t *req, void *arg)
{
    registry_t *r = arg;
    const Linli__Command *cmd = cmdsrv_req_envelope(req)->command;
    const char *name = envelope_command_name(cmd);
    json_t *args = NULL;
    const char *why = NULL;
    int64_t now = now_ms();

    switch (cmd->command_case) {
    case LINLI__COMMAND__COMMAND_REPLAY:
        outbox_replay(r->outbox, srv, &req);
        return;
    case LINLI__COMMAND__COMMAND_SCAN: {
        int64_t at;
        token_verdict_t v;
        token_claims_t c;
        if (s_scan_check(r, cmd->scan, now, &at, &v, &c, &why) != 0)
            break;
        if (s_scan_lane_submit(r, &req, cmd->scan, at, v, &c) == 0)
            return;
        args = s_scan_json(cmd->scan, at, v, &c);
        break;
    }
    case LINLI__COMMAND__COMMAND_UPLOAD_SCANS: {
        const Linli__UploadScans *up = cmd->upload_scans;
        if (up->n_scans == 0 || up->n_scans > S_MAX_UPLOAD) {
            why = "an upload holds 1 to 500 scans";
            break;
        }
        json_t *list = json_array();
        for (size_t i = 0; i < up->n_scans && !why; i++) {
            int64_t at;
            token_verdict_t v;
            token_claims_t c;
            if (s_scan_check(r, up->scans[i], now, &at, &v, &c, &why) == 0)
                json_array_append_new(list, s_scan_json(up->scans[i], at, v, &c));
        }
        args = json_pack("{s:o}", "scans", list);
        if (why)
            json_decref(args), args = NULL;
        break;
    }
    case LINLI__COMMAND__COMMAND_SWEEP:
        why = "sweep is run by the registry itself";
        break;
    default: {
        /* Every other command goes to SQL as-is: its member message, by
         * the field name, is the argument object. */
        const ProtobufCFieldDescriptor *f = name ? pbjson_field(&linli__command__descriptor, name)
                                                 : NULL;
        if (!f) {
            cmdsrv_reply_error(srv, &req, "unknown_command", "this service has no such command");
            return;
        }
        const ProtobufCMessage *m =
            *(const ProtobufCMessage *const *)((const char *)cmd + f->offset);
        args = pbjson_from_message(m);
    }
    }
    if (!args) {
        cmdsrv_reply_error(srv, &req, "invalid_argument", why ? why : "bad arguments");
        return;
    }
    sqlcmd_submit(r->cmds, &req, name, &args);
}

/* issue_token: SQL checked that the subject exists and computed the expiry;
 * we sign the token and draw its QR code. */
static int s_finish(const char *name, json_t *reply, void *arg)
{
    registry_t *r = arg;
    if (strcmp(name, "issue_token") != 0)
        return 0;
    json_t *res = json_object_get(reply, "issue_token");
    const char *kind = json_string_value(json_object_get(res, "kind"));
    token_claims_t c = {
        .kind = kind && kind[0] == 's' ? TOKEN_STATION : TOKEN_ACTIVITY,
        .id = json_integer_value(json_object_get(res, "id")),
        .community_id = json_integer_value(json_object_get(res, "community_id")),
        .expires_at = json_integer_value(json_object_get(res, "expires_at")),
    };
    char token[TOKEN_MAX_LEN + 1];
    if (!kind || token_sign(&c, r->secret, r->secret_len, token, sizeof token) != 0) {
        log_error("registry", "cannot sign token kind=%s id=%lld", kind ? kind : "?",
                  (long long)c.id);
        return -1;
    }
    char caption[96];
    snprintf(caption, sizeof caption, "%s %lld", c.kind == TOKEN_STATION ? "station" : "activity",
             (long long)c.id);
    char *svg = qr_svg(token, 8, caption);
    json_object_set_new(reply, "issue_token",
                        json_pack("{s:s, s:I, s:s}", "token", token, "expires_at",
                                  (json_int_t)c.expires_at, "svg", svg ? svg : ""));
    free(svg);
    return 0;
}

static void s_on_committed(void *arg)
{
    registry_t *r = arg;
    outbox_kick(r->outbox);
}

/* ---- periodic work, readiness, shutdown ---- */

static void s_on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    registry_t *r = arg;
    /* Only sweep when idle-ish: a sweep queued behind a full backlog would
     * only add to it, and the next tick comes soon. */
    if (!r->stopping && sqlcmd_pending(r->cmds) < 64) {
        json_t *args = json_object();
        cmdsrv_req_t *none = NULL;
        sqlcmd_submit(r->cmds, &none, "sweep", &args);
    }
    unsigned long long batches, commands, retried, failed, rcv, rej, rep;
    sqlcmd_stats(r->cmds, &batches, &commands, &retried, &failed);
    cmdsrv_stats(r->srv, &rcv, &rej, &rep);
    metric_set_total(r->m_commands, commands);
    metric_set_total(r->m_batches, batches);
    metric_set_total(r->m_overlapped, sqlcmd_overlapped(r->cmds));
    metric_set_total(r->m_retried, retried);
    metric_set_total(r->m_failed, failed);
    metric_set_total(r->m_rejected, rej);
    metric_set_total(r->m_published, outbox_published(r->outbox));
    metric_set(r->m_pending, (double)sqlcmd_pending(r->cmds));
    unsigned long long hits, misses;
    token_cache_stats(r->tokens, &hits, &misses);
    metric_set_total(r->m_token_hits, hits);
    metric_set_total(r->m_token_misses, misses);
}

static const char *s_ready(void *arg)
{
    registry_t *r = arg;
    if (r->stopping)
        return "shutting down";
    if (!db_ready(r->db) || !db_ready(r->lane_db))
        return "database down";
    if (!outbox_ready(r->outbox))
        return "relay not connected";
    return NULL;
}

static void s_on_drain(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    registry_t *r = arg;
    int left = sqlcmd_pending(r->cmds) + cmdsrv_outstanding(r->srv);
    if (left == 0 || mono_us() >= r->drain_deadline_us) {
        if (left)
            log_warn("registry", "drain deadline reached, commands unanswered=%d", left);
        event_base_loopexit(r->base, NULL);
        return;
    }
    struct timeval tv = { 0, 20000 };
    evtimer_add(r->drain, &tv);
}

void registry_shutdown(registry_t *r, int deadline_ms)
{
    if (r->stopping)
        return;
    r->stopping = true;
    cmdsrv_pause(r->srv, true);
    event_del(r->tick);
    r->drain_deadline_us = mono_us() + (int64_t)deadline_ms * 1000;
    s_on_drain(-1, 0, r);
}

/* ---- life cycle ---- */

registry_t *registry_new(struct event_base *base)
{
    registry_t *r = xcalloc(1, sizeof *r);
    r->base = base;
    int64_t batch_max, sweep_ms, pub_hwm;
    if (config_int("LINLI_BATCH_MAX", 512, 1, 10000, &batch_max) != 0 ||
        config_int("LINLI_SWEEP_MS", 1000, 50, 3600000, &sweep_ms) != 0 ||
        config_int("LINLI_PUB_SNDHWM", 10000, 1, 10000000, &pub_hwm) != 0)
        goto fail;
    r->secret = config_secret("LINLI_TOKEN_SECRET");
    if (!r->secret || strlen(r->secret) < 16) {
        log_error("registry", "LINLI_TOKEN_SECRET_FILE (or LINLI_TOKEN_SECRET) must hold at "
                              "least 16 bytes");
        goto fail;
    }
    r->secret_len = strlen(r->secret);
    r->tokens = token_cache_new(r->secret, r->secret_len);
    if (strcmp(config_get("LINLI_MIGRATE", "1"), "0") != 0 && registry_migrate() != 0)
        goto fail;

    r->conninfo = config_pg();
    const char *conninfo = r->conninfo;
    r->zctx = zmq_ctx_new();
    r->db = db_new(base, conninfo);
    r->lane_db = db_new(base, conninfo);
    if (!r->db || !r->lane_db)
        goto fail;
    r->pub = bus_sock_new(base, r->zctx, ZMQ_PUB, NULL, NULL);
    if (!r->pub)
        goto fail;
    /* Per subscriber: past this many queued events a slow one starts losing
     * live events and catches up by replay, so we never grow without bound. */
    int hwm = (int)pub_hwm;
    zmq_setsockopt(bus_zsock(r->pub), ZMQ_SNDHWM, &hwm, sizeof hwm);
    if (bus_bind(r->pub, config_get("LINLI_REGISTRY_PUB", "tcp://127.0.0.1:7102")))
        goto fail;
    r->outbox = outbox_new(base, conninfo, S_SCHEMA, "registry", "registry", r->pub);
    if (!r->outbox)
        goto fail;
    r->srv = cmdsrv_new(base, r->zctx, config_get("LINLI_REGISTRY_CMD", "tcp://127.0.0.1:7101"),
                        "registry", s_on_command, r);
    if (!r->srv)
        goto fail;
    sqlcmd_opts_t opts = { .schema = S_SCHEMA, .batch_max = (int)batch_max,
                           .finish = s_finish, .committed = s_on_committed,
                           .lane = &s_scan_lane, .lane_db = r->lane_db, .arg = r };
    r->cmds = sqlcmd_new(r->srv, r->db, &opts);
    if (!r->cmds)
        goto fail;

    r->metrics = metrics_new("linli_registry");
    r->m_commands = metrics_add(r->metrics, "commands_total", "counter", "Commands answered after commit", NULL);
    r->m_batches = metrics_add(r->metrics, "batches_total", "counter", "Transactions committed", NULL);
    r->m_overlapped = metrics_add(r->metrics, "batches_overlapped_total", "counter", "Check-in batches sent while another was in the database", NULL);
    r->m_retried = metrics_add(r->metrics, "commands_retried_total", "counter", "Commands rerun alone after their batch failed", NULL);
    r->m_failed = metrics_add(r->metrics, "commands_failed_total", "counter", "Commands answered with an internal error", NULL);
    r->m_rejected = metrics_add(r->metrics, "frames_rejected_total", "counter", "Frames refused before reaching a handler", NULL);
    r->m_published = metrics_add(r->metrics, "events_published_total", "counter", "Events published by the relay", NULL);
    r->m_pending = metrics_add(r->metrics, "commands_pending", "gauge", "Commands queued or in the database", NULL);
    r->m_token_hits = metrics_add(r->metrics, "token_cache_hits_total", "counter", "Scans whose token was known genuine, so only its expiry was checked", NULL);
    r->m_token_misses = metrics_add(r->metrics, "token_cache_misses_total", "counter", "Scans whose token was verified in full", NULL);
    const char *http = config_get("LINLI_REGISTRY_HTTP", NULL);
    if (http) {
        r->http = http_new(base, http, r->metrics, s_ready, r);
        if (!r->http)
            goto fail;
    }
    r->tick = event_new(base, -1, EV_PERSIST, s_on_tick, r);
    struct timeval tv = { sweep_ms / 1000, (sweep_ms % 1000) * 1000 };
    event_add(r->tick, &tv);
    r->drain = evtimer_new(base, s_on_drain, r);
    log_info("registry", "ready cmd=%s pub=%s http=%s batch_max=%lld", cmdsrv_endpoint(r->srv),
             bus_endpoint(r->pub), http ? http : "off", (long long)batch_max);
    return r;
fail:
    registry_destroy(&r);
    return NULL;
}

void registry_destroy(registry_t **r_p)
{
    if (!r_p || !*r_p)
        return;
    registry_t *r = *r_p;
    if (r->tick)
        event_free(r->tick);
    if (r->drain)
        event_free(r->drain);
    http_destroy(&r->http);
    /* The executor stops sending, then the db reports what was in flight
     * (answered "unavailable"), then the executor goes. */
    if (r->cmds)
        sqlcmd_close(r->cmds);
    outbox_destroy(&r->outbox);
    db_destroy(&r->db);
    db_destroy(&r->lane_db);
    sqlcmd_destroy(&r->cmds);
    cmdsrv_destroy(&r->srv);
    bus_sock_destroy(&r->pub);
    metrics_destroy(&r->metrics);
    if (r->zctx)
        zmq_ctx_term(r->zctx);
    token_cache_destroy(&r->tokens);
    if (r->secret) {
        memset(r->secret, 0, r->secret_len);
        free(r->secret);
    }
    free(r->conninfo);
    free(r);
    *r_p = NULL;
}
