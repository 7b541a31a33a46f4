/* Batching PL/pgSQL command executor (see sqlcmd.h). */
#include "sqlcmd.h"

#include "log.h"
#include "pbjson.h"
#include "util.h"

#include <assert.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

typedef struct s_item {
    cmdsrv_req_t *req;        /* owned until replied */
    char *name;               /* command name */
    char *json;               /* {"n": name, "k": key, "a": args, "c": ctx} */
    size_t json_len;
    bool single;              /* run alone: its batch failed once */
    char *vals;               /* lane command: its quoted array elements, each NUL-ended */
    uint64_t conf[SQLCMD_CONFLICTS_MAX + 1]; /* lane command: what it must not share, hashed */
    int nconf;
    /* filled from the result row */
    char *code, *message, *result;
    bool got_row;
    struct s_item *next;
} s_item_t;

/* A set of conflict hashes: open addressing, 0 marks a free slot. */
typedef struct {
    uint64_t *slot;
    size_t cap;               /* a power of two */
    size_t used;              /* slots filled since the last reset */
} s_set_t;

/* A batch in the database, on its own connection. */
typedef struct {
    sqlcmd_t *q;
    db_t *db;                 /* borrowed; NULL: this slot is not used */
    s_item_t *items;          /* the batch in order; NULL: free */
    int n;
    s_item_t **slots;         /* the batch by position, batch_max entries */
    bool exclusive;           /* JSON commands or a retry: runs alone */
    s_set_t set;              /* the conflict hashes of its items */
} s_flight_t;

struct sqlcmd {
    cmdsrv_t *srv;
    sqlcmd_opts_t opts;
    s_flight_t fl[2];         /* [1] only with a lane connection */
    char *sql;                /* SELECT ... FROM <schema>.exec_batch($1, lanes) */
    s_item_t *head, *tail;    /* queue, FIFO */
    int queued;
    char *buf;                /* the batch's JSON array, reused */
    size_t buf_cap;
    int ncols;                /* lane arrays, 4 + the lane's columns; 0: no lane */
    char *col[4 + SQLCMD_LANE_MAX];   /* the batch's lane arrays, reused */
    size_t col_len[4 + SQLCMD_LANE_MAX], col_cap[4 + SQLCMD_LANE_MAX];
    s_set_t skipped;          /* while a lane batch is formed: what the commands it passed
                               * over name, so that none behind them overtakes them */
    bool lane_blocked;        /* the last look found nothing to send beside the batch in
                               * flight: the next goes on from where it stopped */
    s_item_t *scan_last;      /* while blocked: the last command that look passed over */
    int scan_looked;          /* while blocked: how many it looked at */
    bool closing;             /* sqlcmd_close called */
    unsigned long long batches, commands, retried, failed, overlapped;
};

static void s_item_free(s_item_t *it)
{
    free(it->name);
    free(it->json);
    free(it->vals);
    free(it->code);
    free(it->message);
    free(it->result);
    free(it);
}

static void s_item_clear_result(s_item_t *it)
{
    free(it->code);
    free(it->message);
    free(it->result);
    it->code = it->message = it->result = NULL;
    it->got_row = false;
}

/* One row per command: (i, code, message, result), i its position in the
 * batch; rows come in no particular order. A command left without a row is
 * answered "internal" (see s_on_done). */
static void s_on_rows(const PGresult *res, void *arg)
{
    s_flight_t *f = arg;
    if (!res || PQresultStatus(res) != PGRES_TUPLES_OK || PQnfields(res) != 4)
        return;
    for (int row = 0, n = PQntuples(res); row < n; row++) {
        char *end;
        long i = strtol(PQgetvalue(res, row, 0), &end, 10);
        if (PQgetisnull(res, row, 0) || *end || i < 0 || i >= f->n ||
            f->slots[i]->got_row || PQgetisnull(res, row, 1)) {
            log_error("sqlcmd", "unexpected result row position=%s", PQgetvalue(res, row, 0));
            continue;
        }
        s_item_t *it = f->slots[i];
        it->got_row = true;
        it->code = xstrdup(PQgetvalue(res, row, 1));
        it->message = xstrdup(PQgetvalue(res, row, 2));
        it->result = PQgetisnull(res, row, 3) ? NULL : xstrdup(PQgetvalue(res, row, 3));
    }
}

/* Whether the command's result may go into its reply: there is one, and
 * it is not the result of an internal command (nobody reads it) of a kind
 * no command returns, which must not turn an "ok" into a failure. */
static bool s_result_wanted(const s_item_t *it)
{
    return it->result && (it->req || pbjson_field(&linli__reply__descriptor, it->name));
}

/* The command's result as the JSON object its reply carries (a new
 * reference), or NULL when the reply carries none: not wanted (above), or
 * an empty one. */
static json_t *s_result_json(const s_item_t *it)
{
    if (!s_result_wanted(it))
        return NULL;
    json_error_t jerr;
    json_t *r = json_loads(it->result, 0, &jerr);
    if (r && json_is_object(r) && json_object_size(r) > 0)
        return r;
    json_decref(r);
    return NULL;
}

/* A lane command's reply (the flood: scans, gifts): the result is set
 * straight into the reply's member, without the JSON object around it that
 * the finish callback would see. */
static Linli__Reply *s_lane_reply(const s_item_t *it)
{
    bool ok = strcmp(it->code, "ok") == 0;
    Linli__Reply *reply;
    if (ok) {
        reply = xmalloc(sizeof *reply);
        linli__reply__init(reply);
        reply->ok = 1;
    } else {
        reply = envelope_error_reply(it->code, it->message[0] ? it->message : it->code);
    }
    /* the usual result, a flat object, without jansson; the rest as JSON */
    if (s_result_wanted(it) && pbjson_set_field_flat(&reply->base, it->name, it->result))
        return reply;
    json_t *r = s_result_json(it);
    if (!r)
        return reply;
    char err[200];
    int rc = pbjson_set_field(&reply->base, it->name, r, err, sizeof err);
    json_decref(r);
    if (rc != 0) {
        log_error("sqlcmd", "result does not fit the reply command=%s err=%s", it->name, err);
        linli__reply__free_unpacked(reply, NULL);
        return envelope_error_reply("internal", "the result could not be encoded");
    }
    return reply;
}

/* Builds the reply from the function's row: {"ok", "error", "<name>": result}
 * converted through the Reply descriptor, so every command's result shape
 * comes from proto/ and nothing here knows about individual commands. */
static Linli__Reply *s_build_reply(const sqlcmd_t *q, const s_item_t *it)
{
    if (it->vals)
        return s_lane_reply(it);
    json_t *j = json_object();
    bool ok = strcmp(it->code, "ok") == 0;
    json_object_set_new(j, "ok", json_boolean(ok));
    if (!ok)
        json_object_set_new(j, "error", json_pack("{s:s, s:s}", "code", it->code, "message",
                                                  it->message[0] ? it->message : it->code));
    json_t *r = s_result_json(it);
    if (r)
        json_object_set_new(j, it->name, r);
    if (ok && q->opts.finish && q->opts.finish(it->name, j, q->opts.arg) != 0) {
        json_decref(j);
        return envelope_error_reply("internal", "the result could not be completed");
    }
    char err[200];
    Linli__Reply *reply =
        (Linli__Reply *)pbjson_to_message(&linli__reply__descriptor, j, err, sizeof err);
    json_decref(j);
    if (!reply) {
        log_error("sqlcmd", "result does not fit the reply command=%s err=%s", it->name, err);
        return envelope_error_reply("internal", "the result could not be encoded");
    }
    return reply;
}

static void s_pump(sqlcmd_t *q);

/* Sends reply (taken) to the item's requester; internal commands have none. */
static void s_answer(sqlcmd_t *q, s_item_t *it, Linli__Reply *reply)
{
    if (it->req) {
        cmdsrv_reply(q->srv, &it->req, reply);
    } else {
        const char *code = reply->ok ? "ok" : reply->error && reply->error->code
                                                  ? reply->error->code : "internal";
        if (!reply->ok)
            log_warn("sqlcmd", "internal command failed command=%s code=%s", it->name, code);
        if (q->opts.internal)
            q->opts.internal(it->name, code, q->opts.arg);
        linli__reply__free_unpacked(reply, NULL);
    }
}

static void s_on_done(int status, const char *errmsg, void *arg)
{
    s_flight_t *f = arg;
    sqlcmd_t *q = f->q;
    q->lane_blocked = false;
    s_item_t *batch = f->items;
    int n = f->n;
    f->items = NULL;
    f->n = 0;
    if (q->closing && status != 0) {
        /* Committed or not, the outcome is unknown to the caller; it
         * retries with the same key and gets the stored reply. */
        for (s_item_t *it = batch, *next; it; it = next) {
            next = it->next;
            s_answer(q, it, envelope_error_reply("unavailable", "the service is shutting down"));
            s_item_free(it);
        }
        return;
    }
    if (status == 0) {
        /* Committed: the real replies, also while closing. The next batch
         * goes to the database first, so that it works while these replies
         * are built and sent. */
        q->batches++;
        s_pump(q);
        for (s_item_t *it = batch, *next; it; it = next) {
            next = it->next;
            Linli__Reply *reply = it->got_row ? s_build_reply(q, it)
                                              : envelope_error_reply("internal", "no result");
            s_answer(q, it, reply);
            q->commands++;
            s_item_free(it);
        }
        if (q->opts.committed && !q->closing)
            q->opts.committed(q->opts.arg);
    } else if (n > 1) {
        /* Put the batch back at the front, each to run alone. */
        log_warn("sqlcmd", "batch failed, retrying one by one commands=%d err=%s", n,
                 errmsg ? errmsg : "?");
        s_item_t *last = batch;
        for (s_item_t *it = batch; it; it = it->next) {
            s_item_clear_result(it);
            it->single = true;
            last = it;
        }
        last->next = q->head;
        q->head = batch;
        if (!q->tail)
            q->tail = last;
        q->queued += n;
        q->retried += (unsigned long long)n;
    } else if (batch) {
        q->failed++;
        log_error("sqlcmd", "command failed command=%s err=%s", batch->name,
                  errmsg ? errmsg : "?");
        s_answer(q, batch, envelope_error_reply("internal", "the command could not be completed"));
        s_item_free(batch);
    }
    s_pump(q);
}

static void s_col_append(sqlcmd_t *q, int c, const char *s, size_t n)
{
    if (q->col_len[c] + n > q->col_cap[c]) {
        size_t cap = q->col_cap[c] ? q->col_cap[c] : 4096;
        while (cap < q->col_len[c] + n)
            cap *= 2;
        q->col[c] = xrealloc(q->col[c], cap);
        q->col_cap[c] = cap;
    }
    memcpy(q->col[c] + q->col_len[c], s, n);
    q->col_len[c] += n;
}

/* Sends the batch of f: f->n items, f->slots filled. */
static void s_send(sqlcmd_t *q, s_flight_t *f)
{
    size_t len = 1;
    for (int i = 0; i < f->n; i++)
        len += f->slots[i]->json_len + 1;
    /* [cmd,cmd,...]: each command's JSON was built once, at submit */
    if (len + 1 > q->buf_cap) {
        q->buf_cap = len + 1 > 2 * q->buf_cap ? len + 1 : 2 * q->buf_cap;
        q->buf = xrealloc(q->buf, q->buf_cap);
    }
    char *p = q->buf;
    *p++ = '[';
    for (int i = 0; i < f->n; i++) {
        if (i)
            *p++ = ',';
        memcpy(p, f->slots[i]->json, f->slots[i]->json_len);
        p += f->slots[i]->json_len;
    }
    *p++ = ']';
    *p = '\0';
    const char *params[1 + 4 + SQLCMD_LANE_MAX] = { q->buf };
    if (q->ncols) {
        for (int c = 0; c < q->ncols; c++) {
            q->col_len[c] = 0;
            s_col_append(q, c, "{", 1);
        }
        for (int i = 0; i < f->n; i++) {
            const char *v = f->slots[i]->vals;
            for (int c = 0; v && c < q->ncols; c++) {
                size_t vl = strlen(v);
                if (q->col_len[c] > 1)
                    s_col_append(q, c, ",", 1);
                s_col_append(q, c, v, vl);
                v += vl + 1;
            }
        }
        for (int c = 0; c < q->ncols; c++) {
            s_col_append(q, c, "}", 2);   /* with the NUL */
            params[1 + c] = q->col[c];
        }
    }
    /* the db copies the parameters: the buffers serve the next batch */
    db_batch_t *b = db_batch_new(true);
    db_batch_add(b, q->sql, 1 + q->ncols, params, s_on_rows, f);
    db_batch_submit(f->db, &b, s_on_done, f);
}

/* A conflict hash: tag (one byte) then s; never 0, which marks a free slot. */
static uint64_t s_conflict_hash(char tag, const char *s)
{
    return util_fnv1a(util_fnv1a(UTIL_FNV_SEED, &tag, 1), s, strlen(s)) | 1;
}

/* Empties set, with room for n items' conflicts. */
static void s_set_reset(s_set_t *set, int n)
{
    size_t need = 16;
    while (need < (size_t)n * 2 * (SQLCMD_CONFLICTS_MAX + 1))
        need *= 2;
    if (need > set->cap || (set->used && need * 8 <= set->cap)) {
        /* grown to fit, or shrunk after a large batch so that a small one
         * does not clear room for a large one */
        free(set->slot);
        set->slot = xcalloc(need, sizeof *set->slot);
        set->cap = need;
    } else if (set->used) {
        /* a set nothing was added to is empty already: most looks pass
         * over nothing, and a full clear per batch would cost more than
         * the batch's conflict checks */
        memset(set->slot, 0, set->cap * sizeof *set->slot);
    }
    set->used = 0;
}

static void s_set_add(s_set_t *set, const s_item_t *it)
{
    for (int k = 0; k < it->nconf; k++) {
        size_t j = it->conf[k] & (set->cap - 1);
        while (set->slot[j] && set->slot[j] != it->conf[k])
            j = (j + 1) & (set->cap - 1);
        set->used += !set->slot[j];
        set->slot[j] = it->conf[k];
    }
}

/* Whether it shares a person, nonce, key ... with what set holds. */
static bool s_set_hit(const s_set_t *set, const s_item_t *it)
{
    for (int k = 0; k < it->nconf; k++) {
        size_t j = it->conf[k] & (set->cap - 1);
        for (; set->slot[j]; j = (j + 1) & (set->cap - 1))
            if (set->slot[j] == it->conf[k])
                return true;
    }
    return false;
}

/* Remembers the conflict hashes of f's items. */
static void s_set_build(s_flight_t *f)
{
    s_set_reset(&f->set, f->n);
    for (int i = 0; i < f->n; i++)
        s_set_add(&f->set, f->slots[i]);
}

/* Forms a batch of lane commands for f beside the batch of other (NULL
 * when none): the queue's lane commands in order, passing over any that
 * shares something with the other batch or with a command passed over
 * before it (so each person's, account's or key's commands keep their
 * order), up to max, looking at most at 4 x max commands, and stopping at
 * a JSON command or a retry, which keep their place. Returns how many it
 * took; they are unlinked from the queue. When it takes none beside a
 * batch, it remembers where it stopped: commands only join the queue at
 * its end until a batch finishes, so the next look goes on from there
 * rather than scan the same commands again on every submit. */
static int s_take_lane(sqlcmd_t *q, s_flight_t *f, const s_flight_t *other, int max)
{
    s_item_t *prev = NULL, *it = q->head, *last = NULL;
    int looked = 0, skipped = 0;
    f->items = NULL;
    f->n = 0;
    if (other && q->lane_blocked) {
        prev = q->scan_last;
        it = prev ? prev->next : q->head;
        looked = skipped = q->scan_looked;
    } else if (other) {
        s_set_reset(&q->skipped, 4 * max);
    }
    while (it && f->n < max && looked < 4 * max && it->vals && !it->single) {
        s_item_t *next = it->next;
        looked++;
        if (other && (s_set_hit(&other->set, it) || (skipped && s_set_hit(&q->skipped, it)))) {
            s_set_add(&q->skipped, it);
            skipped++;
            prev = it;
            it = next;
            continue;
        }
        if (prev)
            prev->next = next;
        else
            q->head = next;
        if (q->tail == it)
            q->tail = prev;
        it->next = NULL;
        if (last)
            last->next = it;
        else
            f->items = it;
        last = it;
        f->slots[f->n++] = it;
        it = next;
    }
    q->queued -= f->n;
    /* nothing taken: every command looked at was passed over */
    q->lane_blocked = other && f->n == 0;
    q->scan_last = prev;
    q->scan_looked = looked;
    return f->n;
}

static void s_pump(sqlcmd_t *q)
{
    while (q->head && !q->closing) {
        s_flight_t *f = NULL;
        bool busy = false, exclusive = false;
        for (int k = 0; k < 2; k++) {
            if (q->fl[k].items) {
                busy = true;
                exclusive = exclusive || q->fl[k].exclusive;
            } else if (!f && q->fl[k].db) {
                f = &q->fl[k];
            }
        }
        bool lane_only = q->head->vals && !q->head->single;
        if (!f || exclusive || (busy && !lane_only))
            return;
        if (lane_only) {
            const s_flight_t *other = busy ? &q->fl[f == &q->fl[0]] : NULL;
            if (!s_take_lane(q, f, other, q->opts.batch_max))
                return;   /* everything sendable waits for the other batch */
            f->exclusive = false;
        } else {
            int max = q->head->single ? 1 : q->opts.batch_max;
            s_item_t *last = NULL;
            f->items = q->head;
            f->n = 0;
            f->exclusive = true;
            while (q->head && f->n < max && (f->n == 0 || !q->head->single)) {
                s_item_t *it = q->head;
                q->head = it->next;
                f->slots[f->n++] = it;
                last = it;
            }
            if (!q->head)
                q->tail = NULL;
            last->next = NULL;
            q->queued -= f->n;
        }
        if (q->fl[1].db)
            s_set_build(f);
        if (busy)
            q->overlapped++;
        s_send(q, f);
    }
}

static int s_ident_ok(const char *s)
{
    if (!s || !*s || strlen(s) > 63 || !((*s >= 'a' && *s <= 'z') || *s == '_'))
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= '0' && *s <= '9') || *s == '_'))
            return 0;
    return 1;
}

sqlcmd_t *sqlcmd_new(cmdsrv_t *srv, db_t *db, const sqlcmd_opts_t *opts)
{
    if (!s_ident_ok(opts->schema) || opts->batch_max < 1) {
        log_error("sqlcmd", "bad options schema=%s batch_max=%d", opts->schema ? opts->schema : "",
                  opts->batch_max);
        return NULL;
    }
    sqlcmd_t *q = xcalloc(1, sizeof *q);
    q->srv = srv;
    q->opts = *opts;
    if (q->opts.queue_max < q->opts.batch_max)
        q->opts.queue_max = q->opts.batch_max * 64;
    if (opts->lane) {
        const sqlcmd_lane_t *l = opts->lane;
        if (!l->name || l->ncols < 1 || l->ncols > SQLCMD_LANE_MAX) {
            log_error("sqlcmd", "bad lane name=%s ncols=%d", l->name ? l->name : "", l->ncols);
            free(q);
            return NULL;
        }
        char params[1024] = "$1::jsonb, $2::text[], $3::bigint[], $4::text[], $5::text[]";
        for (int c = 0; c < l->ncols; c++) {
            if (!s_ident_ok(l->types[c])) {
                log_error("sqlcmd", "bad lane column type=%s", l->types[c] ? l->types[c] : "");
                free(q);
                return NULL;
            }
            size_t used = strlen(params);
            snprintf(params + used, sizeof params - used, ", $%d::%s[]", 6 + c, l->types[c]);
        }
        q->ncols = 4 + l->ncols;
        q->sql = xasprintf("SELECT i, code, message, result FROM %s.exec_batch(%s)", opts->schema,
                           params);
    } else {
        q->sql = xasprintf("SELECT i, code, message, result FROM %s.exec_batch($1::jsonb)",
                           opts->schema);
    }
    for (int k = 0; k < 2; k++) {
        q->fl[k].q = q;
        q->fl[k].slots = xcalloc((size_t)q->opts.batch_max, sizeof *q->fl[k].slots);
    }
    q->fl[0].db = db;
    q->fl[1].db = opts->lane ? opts->lane_db : NULL;
    return q;
}

static void s_answer_all(sqlcmd_t *q, s_item_t *list)
{
    for (s_item_t *it = list, *next; it; it = next) {
        next = it->next;
        s_answer(q, it, envelope_error_reply("unavailable", "the service is shutting down"));
        s_item_free(it);
    }
}

void sqlcmd_close(sqlcmd_t *q)
{
    q->closing = true;
    s_answer_all(q, q->head);
    q->head = q->tail = NULL;
    q->queued = 0;
}

void sqlcmd_destroy(sqlcmd_t **q_p)
{
    if (!q_p || !*q_p)
        return;
    sqlcmd_t *q = *q_p;
    s_answer_all(q, q->head);
    /* The db is destroyed first (see sqlcmd_close), and that completes the
     * batch in flight: one still here would call back into freed memory. */
    assert(!q->fl[0].items && !q->fl[1].items);
    free(q->sql);
    for (int k = 0; k < 2; k++) {
        free(q->fl[k].slots);
        free(q->fl[k].set.slot);
    }
    free(q->skipped.slot);
    free(q->buf);
    for (int c = 0; c < 4 + SQLCMD_LANE_MAX; c++)
        free(q->col[c]);
    free(q);
    *q_p = NULL;
}

/* When the queue is full and the command is a client's, answers
 * "overloaded" (taking *req_p) and returns true. */
static bool s_full(sqlcmd_t *q, cmdsrv_req_t **req_p)
{
    /* Internal commands are the service's own (a sweep, events it
     * applies), each kind bounded by its producer: refusing one would only
     * lose work that clients' commands crowded out. */
    if (q->queued < q->opts.queue_max || !*req_p)
        return false;
    cmdsrv_reply_error(q->srv, req_p, "overloaded", "too many commands queued; retry later");
    return true;
}

static void s_enqueue(sqlcmd_t *q, s_item_t *it)
{
    if (q->tail)
        q->tail->next = it;
    else
        q->head = it;
    q->tail = it;
    q->queued++;
    s_pump(q);
}

void sqlcmd_submit(sqlcmd_t *q, cmdsrv_req_t **req_p, const char *name, json_t **args_p)
{
    json_t *args = *args_p;
    *args_p = NULL;
    if (s_full(q, req_p)) {
        json_decref(args);
        return;
    }
    cmdsrv_req_t *req = *req_p;
    *req_p = NULL;
    const Linli__Envelope *env = req ? cmdsrv_req_envelope(req) : NULL;
    s_item_t *it = xcalloc(1, sizeof *it);
    it->req = req;
    it->name = xstrdup(name);
    json_t *ctx = json_pack("{s:I, s:s, s:s}", "now", (json_int_t)now_ms(), "trace_id",
                            env && env->trace_id ? env->trace_id : "", "source",
                            env && env->source ? env->source : "internal");
    /* json_pack refuses strings that are not UTF-8 (a key, a trace id):
     * then cmd is NULL. It steals args and ctx either way. */
    json_t *cmd = ctx ? json_pack("{s:s, s:s, s:o, s:o}", "n", name, "k",
                                  env && env->idempotency_key ? env->idempotency_key : "", "a",
                                  args, "c", ctx)
                      : NULL;
    if (!ctx)
        json_decref(args);
    it->json = cmd ? json_dumps(cmd, JSON_COMPACT) : NULL;
    json_decref(cmd);
    if (!it->json) {
        s_answer(q, it, envelope_error_reply("invalid_argument", "arguments cannot be encoded"));
        s_item_free(it);
        return;
    }
    it->json_len = strlen(it->json);
    s_enqueue(q, it);
}

/* Appends s as a quoted array element, "..." with \ before " and \, and its
 * NUL. Returns -1 when s is not UTF-8. */
static int s_quote(char **buf, size_t *len, size_t *cap, const char *s)
{
    size_t n = strlen(s);
    if (!utf8_valid(s, n))
        return -1;
    if (*len + 2 * n + 3 > *cap) {
        *cap = (*len + 2 * n + 3) * 2;
        *buf = xrealloc(*buf, *cap);
    }
    char *p = *buf + *len;
    *p++ = '"';
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '"' || s[i] == '\\')
            *p++ = '\\';
        *p++ = s[i];
    }
    *p++ = '"';
    *p++ = '\0';
    *len = (size_t)(p - *buf);
    return 0;
}

int sqlcmd_submit_lane(sqlcmd_t *q, cmdsrv_req_t **req_p, const char *name,
                       const char *const *cols, const char *const *conflicts, int nconflicts)
{
    if (!q->ncols || nconflicts < 0 || nconflicts > SQLCMD_CONFLICTS_MAX)
        return -1;
    if (!name)
        name = q->opts.lane->name;
    if (s_full(q, req_p))
        return 0;
    const Linli__Envelope *env = *req_p ? cmdsrv_req_envelope(*req_p) : NULL;
    char now[24];
    size_t nlen = 0;
    str_put_i64(now, sizeof now, &nlen, now_ms());
    const char *fixed[4] = { env && env->idempotency_key ? env->idempotency_key : "", now,
                             env && env->trace_id ? env->trace_id : "",
                             env && env->source ? env->source : "internal" };
    char *vals = NULL;
    size_t len = 0, cap = 0;
    int bad = 0;
    for (int c = 0; c < q->ncols && !bad; c++)
        bad = s_quote(&vals, &len, &cap, c < 4 ? fixed[c] : cols[c - 4]);
    if (bad) {
        free(vals);
        return -1;
    }
    s_item_t *it = xcalloc(1, sizeof *it);
    it->req = *req_p;
    *req_p = NULL;
    it->name = xstrdup(name);
    it->json = xstrdup("null");
    it->json_len = 4;
    it->vals = vals;
    for (int k = 0; k < nconflicts; k++)
        it->conf[it->nconf++] = s_conflict_hash('c', conflicts[k]);
    if (fixed[0][0])
        it->conf[it->nconf++] = s_conflict_hash('k', fixed[0]);
    s_enqueue(q, it);
    return 0;
}

int sqlcmd_pending(const sqlcmd_t *q)
{
    return q->queued + q->fl[0].n + q->fl[1].n;
}

unsigned long long sqlcmd_overlapped(const sqlcmd_t *q)
{
    return q->overlapped;
}

void sqlcmd_stats(const sqlcmd_t *q, unsigned long long *batches, unsigned long long *commands,
                  unsigned long long *retried, unsigned long long *failed)
{
    *batches = q->batches;
    *commands = q->commands;
    *retried = q->retried;
    *failed = q->failed;
}
