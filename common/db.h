/* Asynchronous PostgreSQL inside the libevent loop, pipelined.
 *
 * A db_t owns one connection in non-blocking, pipeline mode. Work is sent as
 * a batch: an ordered list of statements that go to the server in one
 * pipeline (one round trip), by default wrapped in BEGIN ... COMMIT so the
 * whole batch commits or nothing does. Each statement's result is handed to
 * its callback in order; then the batch's done callback says whether it
 * committed. Statements are prepared on first use per connection (the SQL
 * text is the key), so repeated calls skip parsing and planning.
 *
 * One batch is in flight at a time per db_t; db_batch_submit() on a busy
 * db_t queues the batch behind the current one, and batches complete in
 * submission order. If the connection breaks, every queued and in-flight
 * batch completes with status -1 and the db_t reconnects (back-off from
 * 100 ms doubling to 5 s) before the next batch is sent. A batch submitted
 * while the connection is down waits for the next reconnect attempt and
 * completes with -1 if that attempt fails, so nothing waits longer than one
 * back-off step. Status -1 after a lost connection does not prove that
 * nothing committed (the COMMIT may have reached the server): callers that
 * must know rely on idempotency keys.
 *
 * Callbacks may submit new batches (a done callback submitting the next
 * batch is the normal case) but must not call db_destroy() on their db_t.
 */
#ifndef LINLI_DB_H
#define LINLI_DB_H

#include <event2/event.h>
#include <libpq-fe.h>
#include <stdbool.h>

typedef struct db db_t;
typedef struct db_batch db_batch_t;

/* Called once per statement, in order. res is borrowed (do not PQclear) and
 * is NULL when no result came back (connection lost, db destroyed). Inside a
 * transaction that failed, statements after the failing one get a result with
 * status PGRES_PIPELINE_ABORTED. A statement whose SQL could not be prepared
 * (syntax error, unknown table) gets the failed prepare's result. */
typedef void(db_result_fn)(const PGresult *res, void *arg);

/* Called once per batch after every statement callback. status is 0 when the
 * batch committed (or, without a transaction, every statement succeeded),
 * -1 otherwise; errmsg is the first error's primary message on one line
 * (borrowed, NULL on success). A failing COMMIT (deferred constraint,
 * serialization failure) fails the batch even though every statement
 * callback saw success. */
typedef void(db_done_fn)(int status, const char *errmsg, void *arg);

/* Connects to conninfo (blocking; called at start-up) and attaches to base.
 * Returns NULL, with the reason logged, when the connection fails. */
db_t *db_new(struct event_base *base, const char *conninfo);
/* Closes the connection. The batch in flight and those still queued
 * complete with status -1, their callbacks running inside this call (the
 * in-flight one may still commit on the server). Accepts NULL and NULLs
 * *db_p. */
void db_destroy(db_t **db_p);

/* A new empty batch. in_transaction: wrap it in BEGIN/COMMIT, all or nothing.
 * Without it each statement runs on its own (its own implicit transaction,
 * a pipeline sync after each), so a failing statement does not stop the
 * ones after it; the batch still travels in one round trip. */
db_batch_t *db_batch_new(bool in_transaction);
/* Appends a statement. sql is a single statement using $1..$n; sql and
 * params are text (a NULL param is SQL NULL) and are copied, so the caller's strings may go away after this returns.
 * nparams is 0..65535. fn may be NULL. Keep SQL texts constant (values go in
 * params): each distinct text is prepared once per connection, and past
 * 1024 distinct texts the rest run unprepared. */
void db_batch_add(db_batch_t *b, const char *sql, int nparams, const char *const *params,
                  db_result_fn *fn, void *arg);
/* Number of statements in the batch. */
int db_batch_count(const db_batch_t *b);
/* Sends the batch (or queues it behind the one in flight) and takes
 * ownership: *b_p is NULLed. done may be NULL. Returns 0; the callbacks
 * always run later, from the loop, never inside this call. */
int db_batch_submit(db_t *db, db_batch_t **b_p, db_done_fn *done, void *arg);
/* Frees a batch that was never submitted. Accepts NULL. */
void db_batch_destroy(db_batch_t **b_p);

/* True while a batch is in flight or queued. */
bool db_busy(const db_t *db);
/* True while the connection is up (for /readyz). */
bool db_ready(const db_t *db);
/* Batches sent and statements executed (a result came back that was not
 * PGRES_PIPELINE_ABORTED) since start, across reconnects (for /metrics).
 * Either pointer may be NULL. */
void db_stats(const db_t *db, unsigned long long *batches, unsigned long long *statements);

/* Blocking helper for start-up and tools, on a plain connection: runs sql
 * with text params and returns the result (caller PQclears), or NULL with
 * the error logged when it did not return PGRES_COMMAND_OK/TUPLES_OK. */
PGresult *db_exec(PGconn *conn, const char *sql, int nparams, const char *const *params);

#endif
