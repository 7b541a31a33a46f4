/* Unit tests for common/db.c against a real PostgreSQL: the server named by
 * LINLI_TEST_PG (a libpq conninfo), a real event_base loop, and a schema of
 * our own (test_db_<pid>) that is dropped at the end. Without LINLI_TEST_PG
 * every test that needs the server is skipped, saying why. */
#include "db.h"
#include "log.h"
#include "util.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/event.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#define S_DEADLINE_S 20

static const char *s_conninfo;  /* NULL: no server, skip */
static char s_schema[64];
static PGconn *s_side;          /* blocking connection for set-up and checks */

/* One test's loop and db. */
typedef struct {
    struct event_base *base;
    db_t *db;
    struct event *deadline;
    bool timed_out;
} s_env_t;

/* What the callbacks of one batch saw. */
typedef struct {
    int calls;                  /* statement callbacks */
    ExecStatusType status[1100];
    int nulls;                  /* callbacks with res == NULL */
    int done;                   /* done callbacks */
    int done_status;
    char errmsg[256];
    int value[1100];            /* first column of the first row, as int */
} s_track_t;

#define S_REQUIRE_PG()                                                                       \
    do {                                                                                     \
        if (!s_conninfo)                                                                     \
            skip();                                                                          \
    } while (0)

/* ---- helpers ---- */

static void s_side_exec(const char *sql)
{
    PGresult *res = db_exec(s_side, sql, 0, NULL);
    assert_non_null(res);
    PQclear(res);
}

static long s_side_int(const char *sql, int nparams, const char *const *params)
{
    PGresult *res = db_exec(s_side, sql, nparams, params);
    assert_non_null(res);
    assert_int_equal(PQntuples(res), 1);
    long v = strtol(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    return v;
}

static long s_count_t(void)
{
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM %s.t", s_schema);
    return s_side_int(sql, 0, NULL);
}

static void s_on_deadline(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    s_env_t *e = arg;
    e->timed_out = true;
}

/* Runs the loop until *count reaches target; fails the test on the deadline. */
static void s_run(s_env_t *e, const int *count, int target)
{
    struct timeval tv = { S_DEADLINE_S, 0 };
    e->timed_out = false;
    evtimer_add(e->deadline, &tv);
    while (*count < target && !e->timed_out)
        event_base_loop(e->base, EVLOOP_ONCE);
    evtimer_del(e->deadline);
    assert_false(e->timed_out);
}

static void s_on_stmt(const PGresult *res, void *arg)
{
    s_track_t *t = arg;
    assert_true(t->calls < (int)LX_ARRAY_LEN(t->status));
    if (!res) {
        t->nulls++;
        t->status[t->calls] = PGRES_FATAL_ERROR;
        t->value[t->calls] = -1;
    } else {
        t->status[t->calls] = PQresultStatus(res);
        t->value[t->calls] = PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) > 0
                                 ? atoi(PQgetvalue(res, 0, 0))
                                 : -1;
    }
    t->calls++;
}

static void s_on_done(int status, const char *errmsg, void *arg)
{
    s_track_t *t = arg;
    t->done++;
    t->done_status = status;
    snprintf(t->errmsg, sizeof t->errmsg, "%s", errmsg ? errmsg : "");
}

static int s_setup(void **state)
{
    s_env_t *e = xcalloc(1, sizeof *e);
    *state = e;
    if (!s_conninfo)
        return 0;
    char sql[128];
    snprintf(sql, sizeof sql, "TRUNCATE %s.t", s_schema);
    s_side_exec(sql);
    e->base = event_base_new();
    e->deadline = evtimer_new(e->base, s_on_deadline, e);
    e->db = db_new(e->base, s_conninfo);
    if (!e->db)
        return -1;
    return 0;
}

static int s_teardown(void **state)
{
    s_env_t *e = *state;
    db_destroy(&e->db);
    assert_null(e->db);
    if (e->deadline)
        event_free(e->deadline);
    if (e->base)
        event_base_free(e->base);
    free(e);
    return 0;
}

static void s_add_insert(db_batch_t *b, int id, const char *v, s_track_t *t)
{
    char sql[128], idbuf[16];
    snprintf(sql, sizeof sql, "INSERT INTO %s.t(id, v) VALUES ($1, $2)", s_schema);
    snprintf(idbuf, sizeof idbuf, "%d", id);
    const char *params[2] = { idbuf, v };
    db_batch_add(b, sql, 2, params, t ? s_on_stmt : NULL, t);
}

/* ---- tests ---- */

static void test_insert_1000(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_track_t *t = xcalloc(1, sizeof *t);
    db_batch_t *b = db_batch_new(true);
    for (int i = 0; i < 1000; i++)
        s_add_insert(b, i, "x", t);
    assert_int_equal(db_batch_count(b), 1000);
    assert_int_equal(db_batch_submit(e->db, &b, s_on_done, t), 0);
    assert_null(b);
    /* Never inside submit. */
    assert_int_equal(t->calls, 0);
    assert_int_equal(t->done, 0);
    s_run(e, &t->done, 1);
    assert_int_equal(t->done_status, 0);
    assert_string_equal(t->errmsg, "");
    assert_int_equal(t->calls, 1000);
    for (int i = 0; i < 1000; i++)
        assert_int_equal(t->status[i], PGRES_COMMAND_OK);
    assert_int_equal(s_count_t(), 1000);
    free(t);
}

static void test_results_in_order(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_track_t *t = xcalloc(1, sizeof *t);
    db_batch_t *b = db_batch_new(true);
    for (int i = 0; i < 500; i++) {
        char v[16];
        snprintf(v, sizeof v, "%d", i);
        const char *p[1] = { v };
        db_batch_add(b, "SELECT $1::int + 1", 1, p, s_on_stmt, t);
    }
    db_batch_submit(e->db, &b, s_on_done, t);
    s_run(e, &t->done, 1);
    assert_int_equal(t->done_status, 0);
    assert_int_equal(t->calls, 500);
    for (int i = 0; i < 500; i++) {
        assert_int_equal(t->status[i], PGRES_TUPLES_OK);
        assert_int_equal(t->value[i], i + 1);
    }
    free(t);
}

static void test_null_and_empty_batch(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_track_t *t = xcalloc(1, sizeof *t);
    db_batch_t *b = db_batch_new(true);
    const char *p[2] = { NULL, "" };
    db_batch_add(b, "SELECT ($1::text IS NULL)::int + ($2::text = '')::int", 2, p, s_on_stmt, t);
    db_batch_submit(e->db, &b, s_on_done, t);
    s_track_t *t2 = xcalloc(1, sizeof *t2);
    b = db_batch_new(true);
    assert_int_equal(db_batch_count(b), 0);
    db_batch_submit(e->db, &b, s_on_done, t2);
    s_track_t *t3 = xcalloc(1, sizeof *t3);
    b = db_batch_new(false);
    db_batch_submit(e->db, &b, NULL, NULL); /* done may be NULL */
    b = db_batch_new(false);
    db_batch_submit(e->db, &b, s_on_done, t3);
    s_run(e, &t3->done, 1);
    assert_int_equal(t->done_status, 0);
    assert_int_equal(t->value[0], 2);
    assert_int_equal(t2->done, 1);
    assert_int_equal(t2->done_status, 0);
    assert_int_equal(t3->done_status, 0);
    free(t);
    free(t2);
    free(t3);
}

static void test_failure_rolls_back(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_track_t *t = xcalloc(1, sizeof *t);
    db_batch_t *b = db_batch_new(true);
    for (int i = 0; i < 5; i++)
        s_add_insert(b, i, "before", t);
    const char *zero[1] = { "0" };
    db_batch_add(b, "SELECT 1 / $1::int", 1, zero, s_on_stmt, t);
    for (int i = 5; i < 10; i++)
        s_add_insert(b, i, "after", t);
    /* A SQL text never seen before: its Parse is skipped after the error. */
    char sql[128];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM %s.t WHERE v = $1", s_schema);
    const char *pv[1] = { "x" };
    db_batch_add(b, sql, 1, pv, s_on_stmt, t);
    db_batch_submit(e->db, &b, s_on_done, t);
    s_run(e, &t->done, 1);

    assert_int_equal(t->done_status, -1);
    assert_non_null(strstr(t->errmsg, "division by zero"));
    assert_int_equal(t->calls, 12);
    for (int i = 0; i < 5; i++)
        assert_int_equal(t->status[i], PGRES_COMMAND_OK);
    assert_int_equal(t->status[5], PGRES_FATAL_ERROR);
    for (int i = 6; i < 12; i++)
        assert_int_equal(t->status[i], PGRES_PIPELINE_ABORTED);
    assert_int_equal(t->nulls, 0);
    assert_int_equal(s_count_t(), 0);

    /* The session was left inside the failed transaction; the next batch
     * must still work, including the statement whose Parse was skipped. */
    s_track_t *t2 = xcalloc(1, sizeof *t2);
    b = db_batch_new(true);
    s_add_insert(b, 1, "x", t2);
    db_batch_add(b, sql, 1, pv, s_on_stmt, t2);
    db_batch_submit(e->db, &b, s_on_done, t2);
    s_run(e, &t2->done, 1);
    assert_int_equal(t2->done_status, 0);
    assert_int_equal(t2->status[1], PGRES_TUPLES_OK);
    assert_int_equal(t2->value[1], 1);
    assert_int_equal(s_count_t(), 1);
    free(t);
    free(t2);
}

static void test_commit_failure(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    char sql[256];
    snprintf(sql, sizeof sql,
             "CREATE TABLE IF NOT EXISTS %s.d(id int, CONSTRAINT d_u UNIQUE (id) "
             "DEFERRABLE INITIALLY DEFERRED)",
             s_schema);
    s_side_exec(sql);
    snprintf(sql, sizeof sql, "INSERT INTO %s.d VALUES (7)", s_schema);
    s_track_t *t = xcalloc(1, sizeof *t);
    db_batch_t *b = db_batch_new(true);
    db_batch_add(b, sql, 0, NULL, s_on_stmt, t);
    db_batch_add(b, sql, 0, NULL, s_on_stmt, t);
    db_batch_submit(e->db, &b, s_on_done, t);
    s_run(e, &t->done, 1);
    /* Both statements succeeded; the deferred check fails the COMMIT. */
    assert_int_equal(t->status[0], PGRES_COMMAND_OK);
    assert_int_equal(t->status[1], PGRES_COMMAND_OK);
    assert_int_equal(t->done_status, -1);
    assert_non_null(strstr(t->errmsg, "d_u"));
    snprintf(sql, sizeof sql, "SELECT count(*) FROM %s.d", s_schema);
    assert_int_equal(s_side_int(sql, 0, NULL), 0);
    free(t);
}

static void test_no_transaction(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_track_t *t = xcalloc(1, sizeof *t);
    db_batch_t *b = db_batch_new(false);
    s_add_insert(b, 1, "a", t);
    s_add_insert(b, 1, "dup", t); /* unique violation */
    s_add_insert(b, 2, "b", t);
    db_batch_submit(e->db, &b, s_on_done, t);
    s_run(e, &t->done, 1);
    assert_int_equal(t->done_status, -1);
    assert_non_null(strstr(t->errmsg, "duplicate key"));
    assert_int_equal(t->status[0], PGRES_COMMAND_OK);
    assert_int_equal(t->status[1], PGRES_FATAL_ERROR);
    assert_int_equal(t->status[2], PGRES_COMMAND_OK);
    assert_int_equal(s_count_t(), 2);

    s_track_t *t2 = xcalloc(1, sizeof *t2);
    b = db_batch_new(false);
    s_add_insert(b, 3, "c", t2);
    s_add_insert(b, 4, "d", t2);
    db_batch_submit(e->db, &b, s_on_done, t2);
    s_run(e, &t2->done, 1);
    assert_int_equal(t2->done_status, 0);
    assert_int_equal(s_count_t(), 4);
    free(t);
    free(t2);
}

static void test_prepare_error(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    for (int round = 0; round < 2; round++) {
        /* Both modes, twice: a failed Parse must not be remembered. */
        s_track_t *t = xcalloc(1, sizeof *t);
        db_batch_t *b = db_batch_new(round == 0);
        db_batch_add(b, "SELECT 1", 0, NULL, s_on_stmt, t);
        db_batch_add(b, "SELEC nonsense", 0, NULL, s_on_stmt, t);
        db_batch_add(b, "SELECT 3", 0, NULL, s_on_stmt, t);
        db_batch_submit(e->db, &b, s_on_done, t);
        s_run(e, &t->done, 1);
        assert_int_equal(t->done_status, -1);
        assert_non_null(strstr(t->errmsg, "syntax error"));
        assert_int_equal(t->calls, 3);
        assert_int_equal(t->status[0], PGRES_TUPLES_OK);
        assert_int_equal(t->status[1], PGRES_FATAL_ERROR);
        if (round == 0) {
            assert_int_equal(t->status[2], PGRES_PIPELINE_ABORTED);
        } else {
            assert_int_equal(t->status[2], PGRES_TUPLES_OK);
            assert_int_equal(t->value[2], 3);
        }
        free(t);
    }
}

typedef struct {
    int *order;   /* shared log of done calls */
    int *n;
    int index;
    s_track_t track;
} s_queued_t;

static void s_on_queued_done(int status, const char *errmsg, void *arg)
{
    (void)errmsg;
    s_queued_t *q = arg;
    assert_int_equal(status, 0);
    /* This batch's statement callbacks all ran before its done. */
    assert_int_equal(q->track.calls, 3);
    q->order[(*q->n)++] = q->index;
}

static void test_queued_in_order(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    int order[8] = { 0 }, n = 0;
    s_queued_t q[8];
    assert_false(db_busy(e->db));
    for (int i = 0; i < 8; i++) {
        memset(&q[i], 0, sizeof q[i]);
        q[i].order = order;
        q[i].n = &n;
        q[i].index = i;
        db_batch_t *b = db_batch_new(i % 2 == 0);
        for (int k = 0; k < 3; k++)
            s_add_insert(b, i * 10 + k, "q", &q[i].track);
        db_batch_submit(e->db, &b, s_on_queued_done, &q[i]);
        assert_true(db_busy(e->db));
    }
    s_run(e, &n, 8);
    for (int i = 0; i < 8; i++)
        assert_int_equal(order[i], i);
    assert_false(db_busy(e->db));
    assert_int_equal(s_count_t(), 24);
}

typedef struct {
    db_t *db;
    int left;
    int done;
    int status;
} s_chain_t;

static void s_on_chain_done(int status, const char *errmsg, void *arg);

static void s_chain_submit(s_chain_t *c)
{
    char sql[128], id[16];
    snprintf(sql, sizeof sql, "INSERT INTO %s.t(id, v) VALUES ($1, 'chain')", s_schema);
    snprintf(id, sizeof id, "%d", c->left);
    const char *p[1] = { id };
    db_batch_t *b = db_batch_new(true);
    db_batch_add(b, sql, 1, p, NULL, NULL);
    db_batch_submit(c->db, &b, s_on_chain_done, c);
}

static void s_on_chain_done(int status, const char *errmsg, void *arg)
{
    (void)errmsg;
    s_chain_t *c = arg;
    c->status |= status;
    /* The batch has left the db before done runs. */
    assert_false(db_busy(c->db));
    if (--c->left > 0)
        s_chain_submit(c); /* re-entrant submit: the normal case */
    else
        c->done = 1;
}

static void test_done_submits_next(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_chain_t c = { e->db, 50, 0, 0 };
    s_chain_submit(&c);
    s_run(e, &c.done, 1);
    assert_int_equal(c.status, 0);
    assert_int_equal(s_count_t(), 50);
}

static void test_busy_ready_stats(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    unsigned long long batches = 99, stmts = 99;
    assert_true(db_ready(e->db));
    assert_false(db_busy(e->db));
    db_stats(e->db, &batches, &stmts);
    assert_int_equal(batches, 0);
    assert_int_equal(stmts, 0);
    s_track_t *t = xcalloc(1, sizeof *t);
    db_batch_t *b = db_batch_new(true);
    db_batch_add(b, "SELECT 1", 0, NULL, s_on_stmt, t);
    db_batch_add(b, "SELECT 1/0", 0, NULL, s_on_stmt, t);
    db_batch_add(b, "SELECT 2", 0, NULL, s_on_stmt, t);
    db_batch_submit(e->db, &b, s_on_done, t);
    assert_true(db_busy(e->db));
    s_run(e, &t->done, 1);
    assert_false(db_busy(e->db));
    assert_true(db_ready(e->db));
    db_stats(e->db, &batches, NULL);
    db_stats(e->db, NULL, &stmts);
    assert_int_equal(batches, 1);
    assert_int_equal(stmts, 2); /* the aborted one never ran */
    free(t);
}

typedef struct {
    s_env_t *env;
    int pid;          /* backend pid before the loss */
    s_track_t lost;   /* the batch in flight when the backend died */
    s_track_t after;  /* the batch submitted from lost's done callback */
    bool ready_in_done;
} s_loss_t;

static void s_on_pid(const PGresult *res, void *arg)
{
    int *pid = arg;
    assert_int_equal(PQresultStatus(res), PGRES_TUPLES_OK);
    *pid = atoi(PQgetvalue(res, 0, 0));
}

static void s_on_kill(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    s_loss_t *l = arg;
    char pid[16];
    snprintf(pid, sizeof pid, "%d", l->pid);
    const char *p[1] = { pid };
    PGresult *res = db_exec(s_side, "SELECT pg_terminate_backend($1::int)", 1, p);
    assert_non_null(res);
    assert_string_equal(PQgetvalue(res, 0, 0), "t");
    PQclear(res);
}

static void s_on_lost_done(int status, const char *errmsg, void *arg)
{
    s_loss_t *l = arg;
    s_on_done(status, errmsg, &l->lost);
    l->ready_in_done = db_ready(l->env->db);
    /* Same SQL as before the loss: the new connection must prepare it anew. */
    db_batch_t *b = db_batch_new(true);
    db_batch_add(b, "SELECT pg_backend_pid()", 0, NULL, s_on_stmt, &l->after);
    db_batch_submit(l->env->db, &b, s_on_done, &l->after);
}

static void test_connection_loss(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_loss_t *l = xcalloc(1, sizeof *l);
    l->env = e;
    s_track_t first = { 0 };
    db_batch_t *b = db_batch_new(true);
    db_batch_add(b, "SELECT pg_backend_pid()", 0, NULL, s_on_pid, &l->pid);
    db_batch_submit(e->db, &b, s_on_done, &first);
    s_run(e, &first.done, 1);
    assert_int_equal(first.done_status, 0);
    assert_true(l->pid > 0);

    b = db_batch_new(true);
    db_batch_add(b, "SELECT pg_sleep(30)", 0, NULL, s_on_stmt, &l->lost);
    db_batch_add(b, "SELECT 1", 0, NULL, s_on_stmt, &l->lost);
    db_batch_submit(e->db, &b, s_on_lost_done, l);
    /* Queued behind it: fails with it. */
    s_track_t queued = { 0 };
    b = db_batch_new(false);
    db_batch_add(b, "SELECT 2", 0, NULL, s_on_stmt, &queued);
    db_batch_submit(e->db, &b, s_on_done, &queued);

    struct event *kill = evtimer_new(e->base, s_on_kill, l);
    struct timeval tv = { 0, 300 * 1000 };
    evtimer_add(kill, &tv);
    s_run(e, &l->after.done, 1);
    event_free(kill);

    assert_int_equal(l->lost.done, 1);
    assert_int_equal(l->lost.done_status, -1);
    assert_true(l->lost.errmsg[0] != '\0');
    /* The sleeping statement gets the server's FATAL (or NULL if the socket
     * closed first); libpq marks the one after it aborted (or NULL). */
    assert_int_equal(l->lost.calls, 2);
    assert_int_equal(l->lost.status[0], PGRES_FATAL_ERROR);
    assert_true(l->lost.status[1] == PGRES_PIPELINE_ABORTED ||
                l->lost.status[1] == PGRES_FATAL_ERROR);
    assert_false(l->ready_in_done);
    assert_int_equal(queued.done, 1);
    assert_int_equal(queued.done_status, -1);
    assert_int_equal(queued.nulls, 1);

    assert_int_equal(l->after.done_status, 0);
    assert_int_equal(l->after.status[0], PGRES_TUPLES_OK);
    assert_true(l->after.value[0] > 0);
    assert_int_not_equal(l->after.value[0], l->pid);
    assert_true(db_ready(e->db));
    free(l);
}

/* While the database refuses connections, batches fail after one reconnect
 * attempt instead of piling up; once it accepts again, work resumes. A
 * database of our own with ALLOW_CONNECTIONS toggled plays the outage. */
static void test_reconnect_refused(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    if (strncmp(s_conninfo, "postgres://", 11) == 0 || strncmp(s_conninfo, "postgresql://", 13) == 0) {
        printf("# test_reconnect_refused needs a key=value LINLI_TEST_PG; skipped\n");
        skip();
    }
    char dbname[80], sql[200];
    snprintf(dbname, sizeof dbname, "%s_r", s_schema);
    snprintf(sql, sizeof sql, "DROP DATABASE IF EXISTS %s", dbname);
    PQclear(PQexec(s_side, sql));
    snprintf(sql, sizeof sql, "CREATE DATABASE %s", dbname);
    PGresult *res = PQexec(s_side, sql);
    bool created = PQresultStatus(res) == PGRES_COMMAND_OK;
    PQclear(res);
    if (!created) {
        printf("# test_reconnect_refused cannot CREATE DATABASE: %s", PQerrorMessage(s_side));
        skip();
    }
    char *conninfo = xasprintf("%s dbname=%s", s_conninfo, dbname);
    db_t *db = db_new(e->base, conninfo);
    assert_non_null(db);

    int pid = 0;
    s_track_t t0 = { 0 };
    db_batch_t *b = db_batch_new(true);
    db_batch_add(b, "SELECT pg_backend_pid()", 0, NULL, s_on_pid, &pid);
    db_batch_submit(db, &b, s_on_done, &t0);
    s_run(e, &t0.done, 1);
    assert_int_equal(t0.done_status, 0);

    snprintf(sql, sizeof sql, "ALTER DATABASE %s ALLOW_CONNECTIONS false", dbname);
    s_side_exec(sql);
    char pidbuf[16];
    snprintf(pidbuf, sizeof pidbuf, "%d", pid);
    const char *p[1] = { pidbuf };
    res = db_exec(s_side, "SELECT pg_terminate_backend($1::int)", 1, p);
    assert_non_null(res);
    PQclear(res);

    /* In flight when the close is noticed, or queued for a refused attempt:
     * either way it fails. */
    s_track_t t1 = { 0 };
    b = db_batch_new(true);
    db_batch_add(b, "SELECT 1", 0, NULL, s_on_stmt, &t1);
    db_batch_submit(db, &b, s_on_done, &t1);
    s_run(e, &t1.done, 1);
    assert_int_equal(t1.done_status, -1);
    assert_false(db_ready(db));

    /* Submitted while down: waits for one attempt, which is refused. */
    s_track_t t2 = { 0 };
    b = db_batch_new(true);
    db_batch_add(b, "SELECT 2", 0, NULL, s_on_stmt, &t2);
    db_batch_submit(db, &b, s_on_done, &t2);
    assert_int_equal(t2.done, 0);
    s_run(e, &t2.done, 1);
    assert_int_equal(t2.done_status, -1);
    assert_int_equal(t2.nulls, 1);
    assert_non_null(strstr(t2.errmsg, "unavailable"));

    snprintf(sql, sizeof sql, "ALTER DATABASE %s ALLOW_CONNECTIONS true", dbname);
    s_side_exec(sql);
    s_track_t t3 = { 0 };
    b = db_batch_new(true);
    db_batch_add(b, "SELECT 3", 0, NULL, s_on_stmt, &t3);
    db_batch_submit(db, &b, s_on_done, &t3);
    s_run(e, &t3.done, 1);
    assert_int_equal(t3.done_status, 0);
    assert_int_equal(t3.value[0], 3);
    assert_true(db_ready(db));

    db_destroy(&db);
    free(conninfo);
    snprintf(sql, sizeof sql, "DROP DATABASE %s WITH (FORCE)", dbname);
    s_side_exec(sql);
}

static void test_destroy_fails_queued(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_track_t t[3];
    memset(t, 0, sizeof t);
    for (int i = 0; i < 3; i++) {
        db_batch_t *b = db_batch_new(true);
        db_batch_add(b, "SELECT 1", 0, NULL, s_on_stmt, &t[i]);
        db_batch_add(b, "SELECT 2", 0, NULL, s_on_stmt, &t[i]);
        db_batch_submit(e->db, &b, s_on_done, &t[i]);
    }
    db_destroy(&e->db);
    assert_null(e->db);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(t[i].done, 1);
        assert_int_equal(t[i].done_status, -1);
        assert_int_equal(t[i].calls, 2);
        assert_int_equal(t[i].nulls, 2);
    }
    db_destroy(&e->db); /* accepts NULL */
    db_destroy(NULL);
}

static void test_unsubmitted_batch(void **state)
{
    (void)state;
    db_batch_t *b = db_batch_new(true);
    const char *p[3] = { "a", NULL, "c" };
    for (int i = 0; i < 100; i++)
        db_batch_add(b, "SELECT $1, $2, $3", 3, p, NULL, NULL);
    assert_int_equal(db_batch_count(b), 100);
    db_batch_destroy(&b);
    assert_null(b);
    db_batch_destroy(&b);
    db_batch_destroy(NULL);
    assert_int_equal(db_batch_count(NULL), 0);
}

static void test_new_fails(void **state)
{
    (void)state;
    struct event_base *base = event_base_new();
    assert_null(db_new(base, "host=/nonexistent/linli port=1 connect_timeout=2"));
    event_base_free(base);
}

static void test_exec(void **state)
{
    (void)state;
    S_REQUIRE_PG();
    const char *p[1] = { "41" };
    PGresult *res = db_exec(s_side, "SELECT $1::int + 1", 1, p);
    assert_non_null(res);
    assert_string_equal(PQgetvalue(res, 0, 0), "42");
    PQclear(res);
    assert_null(db_exec(s_side, "SELECT * FROM no_such_table_anywhere", 0, NULL));
    assert_null(db_exec(s_side, "SELEC", 0, NULL));
}

typedef struct {
    db_t *db;
    int left;
    int next_id;
    int per_batch;
    int done;
    int status;
} s_bench_t;

static void s_on_bench_done(int status, const char *errmsg, void *arg);

static void s_bench_submit(s_bench_t *k)
{
    char sql[128], id[16];
    snprintf(sql, sizeof sql, "INSERT INTO %s.t(id, v) VALUES ($1, $2)", s_schema);
    db_batch_t *b = db_batch_new(true);
    for (int i = 0; i < k->per_batch; i++) {
        snprintf(id, sizeof id, "%d", k->next_id++);
        const char *p[2] = { id, "bench" };
        db_batch_add(b, sql, 2, p, NULL, NULL);
    }
    db_batch_submit(k->db, &b, s_on_bench_done, k);
}

static void s_on_bench_done(int status, const char *errmsg, void *arg)
{
    (void)errmsg;
    s_bench_t *k = arg;
    k->status |= status;
    if (--k->left > 0)
        s_bench_submit(k);
    else
        k->done = 1;
}

/* Not a pass/fail limit (machines differ): prints the rate for the record. */
static void test_throughput(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    const int per[2] = { 1000, 100 };
    int base_id = 0;
    for (int r = 0; r < 2; r++) {
        s_bench_t k = { e->db, 50, base_id, per[r], 0, 0 };
        struct rusage ru0, ru1;
        getrusage(RUSAGE_SELF, &ru0);
        int64_t t0 = mono_us();
        s_bench_submit(&k);
        s_run(e, &k.done, 1);
        int64_t us = mono_us() - t0;
        getrusage(RUSAGE_SELF, &ru1);
        assert_int_equal(k.status, 0);
        base_id = k.next_id;
        double cpu = (double)(ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) +
                     (double)(ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6 +
                     (double)(ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) +
                     (double)(ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;
        printf("# db throughput: %d batches x %d inserts in %.3f s = %.0f statements/s, "
               "client cpu %.3f s\n",
               50, per[r], (double)us / 1e6, 50.0 * per[r] * 1e6 / (double)us, cpu);
    }
    assert_int_equal(s_count_t(), base_id);
}

/* ---- main ---- */

static void s_quiet(void *arg, const char *msg)
{
    (void)arg;
    (void)msg;
}

static int s_group_setup(void **state)
{
    (void)state;
    if (!s_conninfo)
        return 0;
    s_side = PQconnectdb(s_conninfo);
    if (PQstatus(s_side) != CONNECTION_OK) {
        fprintf(stderr, "test_db: cannot connect to LINLI_TEST_PG: %s", PQerrorMessage(s_side));
        return -1;
    }
    PQsetNoticeProcessor(s_side, s_quiet, NULL);
    char sql[256];
    snprintf(sql, sizeof sql, "DROP SCHEMA IF EXISTS %s CASCADE", s_schema);
    PQclear(PQexec(s_side, sql));
    snprintf(sql, sizeof sql,
             "CREATE SCHEMA %s; CREATE TABLE %s.t(id int PRIMARY KEY, v text NOT NULL)",
             s_schema, s_schema);
    PGresult *res = PQexec(s_side, sql);
    int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
    PQclear(res);
    return ok ? 0 : -1;
}

static int s_group_teardown(void **state)
{
    (void)state;
    if (!s_side)
        return 0;
    char sql[128];
    snprintf(sql, sizeof sql, "DROP SCHEMA IF EXISTS %s CASCADE", s_schema);
    PQclear(PQexec(s_side, sql));
    PQfinish(s_side);
    s_side = NULL;
    return 0;
}

int main(void)
{
    log_init("test_db", LOG_LEVEL_WARN);
    s_conninfo = getenv("LINLI_TEST_PG");
    if (s_conninfo && !*s_conninfo)
        s_conninfo = NULL;
    if (!s_conninfo)
        printf("# LINLI_TEST_PG is not set: skipping the tests that need PostgreSQL\n");
    snprintf(s_schema, sizeof s_schema, "test_db_%d", (int)getpid());
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_insert_1000, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_results_in_order, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_null_and_empty_batch, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_failure_rolls_back, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_commit_failure, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_no_transaction, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_prepare_error, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_queued_in_order, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_done_submits_next, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_busy_ready_stats, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_connection_loss, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_reconnect_refused, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_destroy_fails_queued, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_throughput, s_setup, s_teardown),
        cmocka_unit_test(test_unsubmitted_batch),
        cmocka_unit_test(test_new_fails),
        cmocka_unit_test(test_exec),
    };
    return cmocka_run_group_tests(tests, s_group_setup, s_group_teardown);
}
