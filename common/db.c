/* Pipelined PostgreSQL in the libevent loop (see db.h). A batch becomes one
 * libpq pipeline: [ROLLBACK] [BEGIN] { [Parse] Bind/Execute [Sync] } [COMMIT]
 * Sync. While sending we record every command whose results will come back
 * in db->ops, so that reading is a walk down that list: each result (and the
 * NULL that ends it) belongs to the next op, and the last Sync closes the
 * batch. Statements are prepared under names "s<N>" the first time their
 * SQL text is seen on a connection; the map from text to name lives and dies
 * with the connection. Callbacks run only from loop events (socket, timer,
 * or the "broken" event that defers a failed send), never inside
 * db_batch_submit().
 */
#include "db.h"

#include "log.h"
#include "util.h"

#include <assert.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define S_BACKOFF_MIN_MS 100
#define S_BACKOFF_MAX_MS 5000
#define S_PREP_MAX 1024           /* distinct SQL texts prepared per connection */
#define S_MAX_PARAMS 65535        /* the protocol's limit per statement */
#define S_NULL_PARAM SIZE_MAX     /* offset marking an SQL NULL parameter */

/* What a command in the pipeline is, so its results go to the right place. */
enum {
    S_OP_ROLLBACK, /* ends a transaction a failed batch left open; result ignored */
    S_OP_BEGIN,
    S_OP_PREPARE,
    S_OP_EXEC,
    S_OP_COMMIT,
    S_OP_SYNC,
};

typedef struct {
    int kind; /* S_OP_* */
    int stmt; /* statement index for S_OP_PREPARE and S_OP_EXEC, else -1 */
} s_op_t;

typedef struct {
    db_result_fn *fn; /* may be NULL */
    void *arg;
    uint64_t hash;    /* of the SQL text: key into the prepared-statement map */
    size_t sql;       /* offset of the NUL-terminated SQL text in batch->text */
    size_t param0;    /* index of the first parameter in batch->params */
    int nparams;
} s_stmt_t;

struct db_batch {
    bool in_transaction;
    s_stmt_t *stmts;      /* owned; count used of cap */
    int count, cap;
    size_t *params;       /* owned; offsets into text, S_NULL_PARAM for NULL */
    size_t nparams, params_cap;
    char *text;           /* owned; SQL texts and parameter values, each NUL-terminated */
    size_t text_len, text_cap;
    db_done_fn *done;     /* may be NULL */
    void *done_arg;
    int next_cb;          /* index of the next statement whose callback is due */
    bool failed;
    char *errmsg;         /* owned; first error, one line */
    db_batch_t *next;     /* queue link */
};

typedef struct {
    char *sql;     /* owned; NULL marks a free slot */
    uint64_t hash;
    int id;        /* -1 while not prepared */
    char name[12]; /* "s<id>", the server-side name, valid while id >= 0 */
} s_prep_t;

struct db {
    struct event_base *base;     /* borrowed */
    char *conninfo;              /* owned, for reconnecting */
    PGconn *conn;                /* NULL while disconnected */
    struct event *ev_read;       /* EV_READ|EV_PERSIST on PQsocket; replaced on reconnect */
    struct event *ev_write;      /* EV_WRITE, added only while PQflush has data left */
    struct event *ev_reconnect;  /* back-off timer */
    struct event *ev_broken;     /* activated when a send fails where callbacks may not run */
    int backoff_ms;
    bool broken;                 /* conn failed; ev_broken will tear it down */
    db_batch_t *inflight;        /* the batch whose pipeline is on the wire */
    db_batch_t *queue_head;      /* waiting batches, FIFO */
    db_batch_t *queue_tail;
    s_op_t *ops;                 /* the in-flight pipeline, in send order */
    int nops, ops_cap, op_pos;   /* op_pos: the op the next result belongs to */
    PGresult *pending;           /* result of the current op, until its NULL arrives */
    int skip_exec;               /* statement whose prepare failed: drop its exec result */
    s_prep_t *prep;              /* open-addressing map SQL text -> statement id */
    size_t prep_cap, prep_count;
    int prep_next_id;
    bool prep_full_warned;
    const char **pvals;          /* scratch parameter pointers for one statement */
    int pvals_cap;
    unsigned long long batches, statements;
};

/* Copies msg into buf as one line: log records and errmsg strings must not
 * span lines, and libpq's messages end in newlines. */
static const char *s_oneline(const char *msg, char *buf, size_t len)
{
    size_t n = 0;
    for (; msg && *msg && n + 1 < len; msg++) {
        bool space = *msg == ' ' || *msg == '\n' || *msg == '\r' || *msg == '\t';
        if (space && (n == 0 || buf[n - 1] == ' '))
            continue;
        buf[n++] = space ? ' ' : *msg;
    }
    while (n && buf[n - 1] == ' ')
        n--;
    buf[n] = '\0';
    return buf;
}

/* The primary message says what went wrong; DETAIL and CONTEXT are in the
 * result for callbacks that want them. */
static char *s_result_error(const PGresult *res)
{
    char buf[512];
    const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    if (!m || !*m)
        m = PQresultErrorMessage(res);
    if (!m || !*m)
        m = PQresStatus(PQresultStatus(res));
    return xstrdup(s_oneline(m, buf, sizeof buf));
}

static void s_on_notice(void *arg, const PGresult *res)
{
    (void)arg;
    char buf[512];
    const char *sev = PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED);
    const char *msg = s_oneline(PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY), buf, sizeof buf);
    if (sev && (strcmp(sev, "NOTICE") == 0 || strcmp(sev, "INFO") == 0))
        log_info("db", "server %s: %s", sev, msg);
    else if (sev && (strcmp(sev, "DEBUG") == 0 || strcmp(sev, "LOG") == 0))
        log_debug("db", "server %s: %s", sev, msg);
    else
        log_warn("db", "server %s: %s", sev ? sev : "notice", msg);
}

/* ---- batches ---- */

/* Appends n bytes of s and a NUL to the batch's text; returns the offset.
 * Offsets, not pointers, because the buffer moves as it grows. */
static size_t s_text_put(db_batch_t *b, const char *s, size_t n)
{
    if (b->text_len + n + 1 > b->text_cap) {
        size_t cap = b->text_cap ? b->text_cap : 1024;
        while (cap < b->text_len + n + 1)
            cap *= 2;
        b->text = xrealloc(b->text, cap);
        b->text_cap = cap;
    }
    size_t off = b->text_len;
    memcpy(b->text + off, s, n);
    b->text[off + n] = '\0';
    b->text_len += n + 1;
    return off;
}

db_batch_t *db_batch_new(bool in_transaction)
{
    db_batch_t *b = xcalloc(1, sizeof *b);
    b->in_transaction = in_transaction;
    return b;
}

void db_batch_add(db_batch_t *b, const char *sql, int nparams, const char *const *params,
                  db_result_fn *fn, void *arg)
{
    assert(b && sql && nparams >= 0 && nparams <= S_MAX_PARAMS && (nparams == 0 || params));
    if (b->count == b->cap) {
        b->cap = b->cap ? b->cap * 2 : 16;
        b->stmts = xrealloc(b->stmts, (size_t)b->cap * sizeof *b->stmts);
    }
    if (b->nparams + (size_t)nparams > b->params_cap) {
        size_t cap = b->params_cap ? b->params_cap : 32;
        while (cap < b->nparams + (size_t)nparams)
            cap *= 2;
        b->params = xrealloc(b->params, cap * sizeof *b->params);
        b->params_cap = cap;
    }
    size_t n = strlen(sql);
    s_stmt_t *s = &b->stmts[b->count++];
    s->fn = fn;
    s->arg = arg;
    s->hash = util_fnv1a(UTIL_FNV_SEED, sql, n);
    s->sql = s_text_put(b, sql, n);
    s->param0 = b->nparams;
    s->nparams = nparams;
    for (int i = 0; i < nparams; i++)
        b->params[b->nparams++] = params[i] ? s_text_put(b, params[i], strlen(params[i]))
                                            : S_NULL_PARAM;
}

int db_batch_count(const db_batch_t *b)
{
    return b ? b->count : 0;
}

void db_batch_destroy(db_batch_t **b_p)
{
    if (!b_p || !*b_p)
        return;
    db_batch_t *b = *b_p;
    free(b->stmts);
    free(b->params);
    free(b->text);
    free(b->errmsg);
    free(b);
    *b_p = NULL;
}

/* Records a failure; the first message wins, because later ones are mostly
 * consequences of it. */
static void s_batch_fail(db_batch_t *b, const PGresult *res)
{
    b->failed = true;
    if (!b->errmsg && res && PQresultStatus(res) != PGRES_PIPELINE_ABORTED)
        b->errmsg = s_result_error(res);
}

static void s_deliver(db_batch_t *b, int i, const PGresult *res)
{
    b->next_cb = i + 1;
    if (b->stmts[i].fn)
        b->stmts[i].fn(res, b->stmts[i].arg);
}

/* Completes a batch that got no (more) results: NULL to every statement
 * still waiting, then done with -1. Takes the batch. */
static void s_batch_abort(db_batch_t *b, const char *why)
{
    for (int i = b->next_cb; i < b->count; i++)
        s_deliver(b, i, NULL);
    if (!b->errmsg)
        b->errmsg = xstrdup(why);
    if (b->done)
        b->done(-1, b->errmsg, b->done_arg);
    db_batch_destroy(&b);
}

/* Detaches the queue before running callbacks, so that batches they submit
 * line up behind a fresh queue instead of being failed with this one. */
static void s_queue_abort(db_t *db, const char *why)
{
    db_batch_t *b = db->queue_head;
    db->queue_head = db->queue_tail = NULL;
    while (b) {
        db_batch_t *next = b->next;
        s_batch_abort(b, why);
        b = next;
    }
}

/* ---- prepared statements ---- */

static void s_prep_reset(db_t *db)
{
    for (size_t i = 0; i < db->prep_cap; i++)
        free(db->prep[i].sql);
    if (db->prep)
        memset(db->prep, 0, db->prep_cap * sizeof *db->prep);
    db->prep_count = 0;
    db->prep_next_id = 0;
    db->prep_full_warned = false;
}

static s_prep_t *s_prep_slot(s_prep_t *tab, size_t cap, uint64_t hash, const char *sql)
{
    size_t i = (size_t)hash & (cap - 1);
    while (tab[i].sql && (tab[i].hash != hash || strcmp(tab[i].sql, sql) != 0))
        i = (i + 1) & (cap - 1);
    return &tab[i];
}

/* The map entry for sql, added (not yet prepared, id -1) when new. NULL when
 * the map is full: the statement then runs unprepared, so SQL built with
 * values inside cannot grow the server's memory without bound. */
static s_prep_t *s_prep_get(db_t *db, uint64_t hash, const char *sql)
{
    if (!db->prep) {
        db->prep_cap = 64;
        db->prep = xcalloc(db->prep_cap, sizeof *db->prep);
    }
    s_prep_t *p = s_prep_slot(db->prep, db->prep_cap, hash, sql);
    if (p->sql)
        return p;
    if (db->prep_count >= S_PREP_MAX) {
        if (!db->prep_full_warned)
            log_warn("db", "prepared statement limit reached limit=%d; new SQL texts run "
                     "unprepared (are values built into the SQL?)", S_PREP_MAX);
        db->prep_full_warned = true;
        return NULL;
    }
    if ((db->prep_count + 1) * 2 > db->prep_cap) {
        size_t cap = db->prep_cap * 2;
        s_prep_t *tab = xcalloc(cap, sizeof *tab);
        for (size_t i = 0; i < db->prep_cap; i++)
            if (db->prep[i].sql)
                *s_prep_slot(tab, cap, db->prep[i].hash, db->prep[i].sql) = db->prep[i];
        free(db->prep);
        db->prep = tab;
        db->prep_cap = cap;
        p = s_prep_slot(db->prep, db->prep_cap, hash, sql);
    }
    p->sql = xstrdup(sql);
    p->hash = hash;
    p->id = -1;
    db->prep_count++;
    return p;
}

/* A Parse that failed or was skipped left no statement on the server; the
 * next use must prepare again. */
static void s_prep_forget(db_t *db, const db_batch_t *b, int i)
{
    const s_stmt_t *s = &b->stmts[i];
    if (!db->prep)
        return;
    s_prep_t *p = s_prep_slot(db->prep, db->prep_cap, s->hash, b->text + s->sql);
    if (p->sql)
        p->id = -1;
}

/* ---- sending ---- */

static void s_op_push(db_t *db, int kind, int stmt)
{
    if (db->nops == db->ops_cap) {
        db->ops_cap = db->ops_cap ? db->ops_cap * 2 : 64;
        db->ops = xrealloc(db->ops, (size_t)db->ops_cap * sizeof *db->ops);
    }
    db->ops[db->nops].kind = kind;
    db->ops[db->nops].stmt = stmt;
    db->nops++;
}

/* Returns 0, or -1 when the connection failed. */
static int s_flush(db_t *db)
{
    int r = PQflush(db->conn);
    if (r < 0)
        return -1;
    if (r == 1)
        event_add(db->ev_write, NULL);
    else
        event_del(db->ev_write);
    return 0;
}

static int s_send_internal(db_t *db, const char *sql, int kind)
{
    if (!PQsendQueryParams(db->conn, sql, 0, NULL, NULL, NULL, NULL, 0))
        return -1;
    s_op_push(db, kind, -1);
    return 0;
}

static int s_send_sync(db_t *db)
{
    if (!PQpipelineSync(db->conn))
        return -1;
    s_op_push(db, S_OP_SYNC, -1);
    return 0;
}

/* Queues the whole batch in libpq's buffer and starts flushing it. Returns
 * -1 when libpq refused a command: the pipeline is then half-built and only
 * a new connection can clean it up. */
static int s_send(db_t *db, db_batch_t *b)
{
    PGconn *c = db->conn;
    db->nops = 0;
    db->op_pos = 0;
    db->skip_exec = -1;
    db->batches++;

    /* In pipeline mode a Sync does not end an explicit transaction that
     * failed: the session stays in it until someone says ROLLBACK. */
    PGTransactionStatusType ts = PQtransactionStatus(c);
    if ((ts == PQTRANS_INTRANS || ts == PQTRANS_INERROR) &&
        s_send_internal(db, "ROLLBACK", S_OP_ROLLBACK) < 0)
        return -1;

    bool wrap = b->in_transaction && b->count > 0;
    if (wrap && s_send_internal(db, "BEGIN", S_OP_BEGIN) < 0)
        return -1;
    for (int i = 0; i < b->count; i++) {
        const s_stmt_t *s = &b->stmts[i];
        const char *sql = b->text + s->sql;
        if (s->nparams > db->pvals_cap) {
            db->pvals_cap = s->nparams;
            db->pvals = xrealloc(db->pvals, (size_t)db->pvals_cap * sizeof *db->pvals);
        }
        for (int k = 0; k < s->nparams; k++) {
            size_t off = b->params[s->param0 + (size_t)k];
            db->pvals[k] = off == S_NULL_PARAM ? NULL : b->text + off;
        }
        s_prep_t *p = s_prep_get(db, s->hash, sql);
        int ok;
        if (p) {
            if (p->id < 0) {
                p->id = db->prep_next_id++;
                snprintf(p->name, sizeof p->name, "s%d", p->id);
                if (!PQsendPrepare(c, p->name, sql, 0, NULL))
                    return -1;
                s_op_push(db, S_OP_PREPARE, i);
            }
            ok = PQsendQueryPrepared(c, p->name, s->nparams, db->pvals, NULL, NULL, 0);
        } else {
            ok = PQsendQueryParams(c, sql, s->nparams, NULL, db->pvals, NULL, NULL, 0);
        }
        if (!ok)
            return -1;
        s_op_push(db, S_OP_EXEC, i);
        if (!b->in_transaction && s_send_sync(db) < 0)
            return -1;
    }
    if (wrap && s_send_internal(db, "COMMIT", S_OP_COMMIT) < 0)
        return -1;
    if ((b->in_transaction || b->count == 0) && s_send_sync(db) < 0)
        return -1;
    return s_flush(db);
}

/* Sends the next queued batch if the connection is idle and up. On failure
 * the connection is marked broken and torn down from ev_broken, because the
 * caller may be db_batch_submit(), where callbacks must not run. */
static void s_start_next(db_t *db)
{
    if (db->inflight || !db->queue_head || !db->conn || db->broken)
        return;
    db_batch_t *b = db->queue_head;
    db->queue_head = b->next;
    if (!db->queue_head)
        db->queue_tail = NULL;
    b->next = NULL;
    db->inflight = b;
    if (s_send(db, b) < 0) {
        db->broken = true;
        event_active(db->ev_broken, EV_TIMEOUT, 1);
    }
}

int db_batch_submit(db_t *db, db_batch_t **b_p, db_done_fn *done, void *arg)
{
    assert(db && b_p && *b_p);
    db_batch_t *b = *b_p;
    *b_p = NULL;
    b->done = done;
    b->done_arg = arg;
    b->next = NULL;
    if (db->queue_tail)
        db->queue_tail->next = b;
    else
        db->queue_head = b;
    db->queue_tail = b;
    s_start_next(db);
    return 0;
}

/* ---- connection ---- */

static void s_on_read(evutil_socket_t fd, short what, void *arg);
static void s_on_write(evutil_socket_t fd, short what, void *arg);

/* Connects (blocking) and attaches the socket to the loop. Returns 0 or -1
 * with the reason logged. */
static int s_connect(db_t *db)
{
    char buf[512];
    struct event *rd = NULL, *wr = NULL;
    PGconn *conn = PQconnectdb(db->conninfo);
    if (PQstatus(conn) != CONNECTION_OK) {
        log_error("db", "cannot connect: %s", s_oneline(PQerrorMessage(conn), buf, sizeof buf));
        goto close_conn;
    }
    PQsetNoticeReceiver(conn, s_on_notice, NULL);
    if (PQsetnonblocking(conn, 1) != 0 || PQenterPipelineMode(conn) != 1) {
        log_error("db", "cannot enter pipeline mode: %s",
                  s_oneline(PQerrorMessage(conn), buf, sizeof buf));
        goto close_conn;
    }
    rd = event_new(db->base, PQsocket(conn), EV_READ | EV_PERSIST, s_on_read, db);
    wr = event_new(db->base, PQsocket(conn), EV_WRITE, s_on_write, db);
    if (!rd || !wr || event_add(rd, NULL) < 0) {
        log_error("db", "cannot watch the connection's socket");
        goto free_events;
    }
    /* The old events were deleted when the connection broke; freeing them
     * waits until now because that happened inside their own callback. */
    if (db->ev_read)
        event_free(db->ev_read);
    if (db->ev_write)
        event_free(db->ev_write);
    db->ev_read = rd;
    db->ev_write = wr;
    db->conn = conn;
    db->broken = false;
    s_prep_reset(db);
    return 0;

free_events:
    if (rd)
        event_free(rd);
    if (wr)
        event_free(wr);
close_conn:
    PQfinish(conn);
    return -1;
}

static void s_arm_reconnect(db_t *db)
{
    struct timeval tv = { db->backoff_ms / 1000, (db->backoff_ms % 1000) * 1000 };
    evtimer_add(db->ev_reconnect, &tv);
}

/* Drops the connection, fails the in-flight and queued batches and arms the
 * reconnect timer. State is settled before any callback runs, so a callback
 * sees db_ready() false and its new batches wait for the reconnect. */
static void s_lost(db_t *db, const char *why)
{
    char buf[512], msg[600];
    const char *err = s_oneline(db->conn ? PQerrorMessage(db->conn) : NULL, buf, sizeof buf);
    snprintf(msg, sizeof msg, "connection lost: %s", *err ? err : why);
    log_error("db", "%s; reconnecting in %d ms", msg, db->backoff_ms);

    PQclear(db->pending);
    db->pending = NULL;
    if (db->ev_read)
        event_del(db->ev_read);
    if (db->ev_write)
        event_del(db->ev_write);
    PQfinish(db->conn);
    db->conn = NULL;
    db->broken = false;
    s_prep_reset(db);
    s_arm_reconnect(db);

    db_batch_t *b = db->inflight;
    db->inflight = NULL;
    db_batch_t *queued = db->queue_head;
    db->queue_head = db->queue_tail = NULL;
    if (b)
        s_batch_abort(b, msg);
    while (queued) {
        db_batch_t *next = queued->next;
        s_batch_abort(queued, msg);
        queued = next;
    }
}

static void s_on_broken(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    db_t *db = arg;
    if (db->conn)
        s_lost(db, "send failed");
}

static void s_on_reconnect(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    db_t *db = arg;
    if (s_connect(db) == 0) {
        log_info("db", "reconnected");
        db->backoff_ms = S_BACKOFF_MIN_MS;
        s_start_next(db);
        return;
    }
    db->backoff_ms = db->backoff_ms * 2 > S_BACKOFF_MAX_MS ? S_BACKOFF_MAX_MS : db->backoff_ms * 2;
    s_arm_reconnect(db);
    /* Batches submitted while down have now waited one attempt; failing
     * them keeps waits and memory bounded while the database stays away. */
    s_queue_abort(db, "database unavailable");
}

/* ---- reading ---- */

static bool s_ok(ExecStatusType st)
{
    return st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY;
}

/* All results of op have arrived (res is the first, or NULL). Takes res. */
static void s_op_done(db_t *db, const s_op_t *op, PGresult *res)
{
    db_batch_t *b = db->inflight;
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    switch (op->kind) {
    case S_OP_ROLLBACK:
        break;
    case S_OP_BEGIN:
    case S_OP_COMMIT:
        if (!s_ok(st))
            s_batch_fail(b, res);
        break;
    case S_OP_PREPARE:
        if (st != PGRES_COMMAND_OK) {
            s_prep_forget(db, b, op->stmt);
            /* Skipped because an earlier statement failed: that one carries
             * the error, and this statement's exec will say ABORTED. */
            if (st != PGRES_PIPELINE_ABORTED) {
                s_batch_fail(b, res);
                db->skip_exec = op->stmt;
                s_deliver(b, op->stmt, res);
            }
        }
        break;
    case S_OP_EXEC:
        if (db->skip_exec == op->stmt)
            break;
        if (st != PGRES_PIPELINE_ABORTED)
            db->statements++;
        if (!s_ok(st))
            s_batch_fail(b, res);
        s_deliver(b, op->stmt, res);
        break;
    }
    PQclear(res);
}

/* The last Sync of the batch arrived. The batch leaves db->inflight before
 * done runs, so a done callback that submits sends at once. */
static void s_batch_finish(db_t *db)
{
    db_batch_t *b = db->inflight;
    db->inflight = NULL;
    if (b->failed && !b->errmsg)
        b->errmsg = xstrdup("batch aborted");
    if (b->done)
        b->done(b->failed ? -1 : 0, b->failed ? b->errmsg : NULL, b->done_arg);
    db_batch_destroy(&b);
    s_start_next(db);
}

/* Routes one PQgetResult() value to its op. Returns -1 when the results are
 * out of step with what was sent (a bug, or a confused server). */
static int s_on_result(db_t *db, PGresult *res)
{
    if (db->op_pos >= db->nops) {
        PQclear(res);
        return -1;
    }
    const s_op_t *op = &db->ops[db->op_pos];
    if (res && PQresultStatus(res) == PGRES_PIPELINE_SYNC) {
        /* libpq returns no NULL after a Sync. */
        PQclear(res);
        if (op->kind != S_OP_SYNC)
            return -1;
        if (++db->op_pos == db->nops)
            s_batch_finish(db);
        return 0;
    }
    if (op->kind == S_OP_SYNC) {
        PQclear(res);
        return -1;
    }
    if (res) {
        /* Extended-protocol commands yield one result; keep the first if a
         * server ever sends more. */
        if (db->pending)
            PQclear(res);
        else
            db->pending = res;
        return 0;
    }
    PGresult *first = db->pending;
    db->pending = NULL;
    db->op_pos++;
    s_op_done(db, op, first);
    return 0;
}

/* Takes every result libpq can hand out without waiting. Callbacks may
 * submit (and so start the next batch) or break the connection, so the
 * conditions are re-read on every turn. */
static void s_drain(db_t *db)
{
    while (db->conn && !db->broken && db->inflight && !PQisBusy(db->conn)) {
        PGresult *res = PQgetResult(db->conn);
        if (PQstatus(db->conn) == CONNECTION_BAD) {
            PQclear(res);
            s_lost(db, "connection closed");
            return;
        }
        if (s_on_result(db, res) < 0) {
            log_error("db", "results out of step with the pipeline op=%d ops=%d", db->op_pos,
                      db->nops);
            s_lost(db, "results out of step with the pipeline");
            return;
        }
    }
}

static void s_on_read(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    db_t *db = arg;
    if (!db->conn || db->broken)
        return;
    if (!PQconsumeInput(db->conn) || PQstatus(db->conn) == CONNECTION_BAD) {
        s_lost(db, "read failed");
        return;
    }
    /* libpq wants input consumed before it can push more output. */
    if (event_pending(db->ev_write, EV_WRITE, NULL) && s_flush(db) < 0) {
        s_lost(db, "write failed");
        return;
    }
    if (!db->inflight) {
        /* Idle: let libpq parse what came (a notice, or the FATAL that
         * precedes a server-side close) so its receiver logs it. */
        (void)PQisBusy(db->conn);
        return;
    }
    s_drain(db);
}

static void s_on_write(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    db_t *db = arg;
    if (!db->conn || db->broken)
        return;
    if (s_flush(db) < 0) {
        s_lost(db, "write failed");
        return;
    }
    /* A blocked flush reads what the server sent meanwhile into libpq's
     * buffer, where no socket event will announce it. */
    s_drain(db);
}

/* ---- lifetime ---- */

db_t *db_new(struct event_base *base, const char *conninfo)
{
    assert(base && conninfo);
    db_t *db = xcalloc(1, sizeof *db);
    db->base = base;
    db->conninfo = xstrdup(conninfo);
    db->backoff_ms = S_BACKOFF_MIN_MS;
    db->skip_exec = -1;
    db->ev_reconnect = evtimer_new(base, s_on_reconnect, db);
    db->ev_broken = event_new(base, -1, 0, s_on_broken, db);
    if (!db->ev_reconnect || !db->ev_broken) {
        log_error("db", "cannot create events");
        goto destroy_db;
    }
    if (s_connect(db) < 0)
        goto destroy_db;
    log_info("db", "connected server_version=%d", PQserverVersion(db->conn));
    return db;

destroy_db:
    db_destroy(&db);
    return NULL;
}

void db_destroy(db_t **db_p)
{
    if (!db_p || !*db_p)
        return;
    db_t *db = *db_p;
    *db_p = NULL;
    if (db->ev_read)
        event_free(db->ev_read);
    if (db->ev_write)
        event_free(db->ev_write);
    if (db->ev_reconnect)
        event_free(db->ev_reconnect);
    if (db->ev_broken)
        event_free(db->ev_broken);
    PQclear(db->pending);
    PQfinish(db->conn);
    db->conn = NULL;
    /* With conn NULL, batches that callbacks submit now only queue; the
     * loop below fails them too. */
    db_batch_t *b = db->inflight;
    db->inflight = NULL;
    if (b)
        s_batch_abort(b, "database connection closed");
    while (db->queue_head)
        s_queue_abort(db, "database connection closed");
    s_prep_reset(db);
    free(db->prep);
    free(db->ops);
    free(db->pvals);
    free(db->conninfo);
    free(db);
}

bool db_busy(const db_t *db)
{
    return db->inflight || db->queue_head;
}

bool db_ready(const db_t *db)
{
    return db->conn && !db->broken;
}

void db_stats(const db_t *db, unsigned long long *batches, unsigned long long *statements)
{
    if (batches)
        *batches = db->batches;
    if (statements)
        *statements = db->statements;
}

PGresult *db_exec(PGconn *conn, const char *sql, int nparams, const char *const *params)
{
    char buf[512], sqlbuf[100];
    PGresult *res = PQexecParams(conn, sql, nparams, NULL, params, NULL, NULL, 0);
    ExecStatusType st = PQresultStatus(res);
    if (res && (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK))
        return res;
    const char *err = res && *PQresultErrorMessage(res) ? PQresultErrorMessage(res)
                                                        : PQerrorMessage(conn);
    if (!err || !*err)
        err = PQresStatus(st);
    log_error("db", "query failed: %s sql=%s", s_oneline(err, buf, sizeof buf),
              s_oneline(sql, sqlbuf, sizeof sqlbuf));
    PQclear(res);
    return NULL;
}
