/* Batching command executor for services whose commands are PL/pgSQL
 * functions. While one batch is in the database the next accumulates, and
 * the whole batch goes as one statement in one transaction:
 *     SELECT i, code, message, result FROM <schema>.exec_batch($1::jsonb)
 * with $1 = [{"n": name, "k": idempotency key, "a": args, "c": ctx}, ...]
 * and one row back per command (i = its position). Under load hundreds of
 * commands share one statement and one commit: throughput comes from
 * batching, and each reply is still sent only after its change is durable.
 * The schema's function stores each reply under its idempotency key in the
 * same transaction, so a retried command gets the first reply, even after a
 * restart. ctx is {"now": ms, "trace_id", "source"}.
 *
 * A lane carries one command in columns instead of JSON, for a flood of one
 * plain command (check-ins): the database then reads typed arrays instead of
 * parsing JSON per command. A lane command stands in $1 as a JSON null, and
 * the batch is
 *     SELECT ... FROM <schema>.exec_batch($1::jsonb, $2::text[], $3::bigint[],
 *                                          $4::text[], $5::text[], $6::<type>[], ...)
 * where row k of the arrays belongs to the k-th null of $1: its idempotency
 * key, ctx now, trace id and source, then the lane's own columns.
 *
 * A batch with any JSON command runs alone. With a second connection
 * (lane_db), two batches of lane commands only may run at once, when they
 * share no idempotency key and nothing their owner named at submit (see
 * sqlcmd_submit_lane): the schema's function then takes its ordering lock
 * late, when it writes its events, and the two never wait for each other's
 * rows before that.
 *
 * If a batch fails as a whole (an unexpected error in one command aborts the
 * transaction), its commands are run again one per transaction, so only the
 * faulty one gets an "internal" error and the others are unaffected. */
#ifndef LINLI_SQLCMD_H
#define LINLI_SQLCMD_H

#include "cmdsrv.h"
#include "db.h"

#include <jansson.h>

typedef struct sqlcmd sqlcmd_t;

/* Called for each committed command whose code is "ok", before its reply is
 * built; may amend the reply, given as JSON {"ok": true, "<name>": result}
 * (borrowed), e.g. to add a signed token. Returns 0, or -1 to answer with an
 * "internal" error instead. Not called for lane commands: their replies are
 * built straight from their results. */
typedef int(sqlcmd_finish_fn)(const char *name, json_t *reply, void *arg);
/* Called after each committed batch (e.g. to wake the outbox relay). */
typedef void(sqlcmd_commit_fn)(void *arg);
/* Called once with the outcome of every internal command (one submitted
 * with a NULL request, whose reply nobody else sees): its name and "ok", or
 * its error code: the function's own, "internal" when it failed or its
 * result did not fit, "invalid_argument" when its arguments could not be
 * encoded, "overloaded" when the queue was full and it was not taken, or
 * "unavailable" when the executor closed first. It may run inside
 * sqlcmd_submit (refused at once), sqlcmd_close and sqlcmd_destroy, so it
 * must not destroy the executor; it may submit more. name is borrowed. */
typedef void(sqlcmd_internal_fn)(const char *name, const char *code, void *arg);

#define SQLCMD_LANE_MAX 12       /* columns of a lane after the four every lane has */
#define SQLCMD_CONFLICTS_MAX 5   /* what a lane command names that others must not share */

typedef struct {
    const char *name;            /* the command the lane carries, "scan" */
    int ncols;                   /* 1..SQLCMD_LANE_MAX */
    const char *types[SQLCMD_LANE_MAX]; /* SQL type of each column: "bigint", "text" */
} sqlcmd_lane_t;

typedef struct {
    const char *schema;          /* "registry" */
    int batch_max;               /* commands per transaction, >= 1 */
    int queue_max;               /* queued beyond this: "overloaded" replies (internal
                                  * commands are never refused: their producer bounds them) */
    sqlcmd_finish_fn *finish;    /* may be NULL */
    sqlcmd_commit_fn *committed; /* may be NULL */
    sqlcmd_internal_fn *internal; /* may be NULL */
    const sqlcmd_lane_t *lane;   /* NULL: no lane; else borrowed, must outlive the executor */
    db_t *lane_db;               /* with a lane: a second connection (borrowed), so two
                                  * batches of lane commands run at once; NULL: one */
    void *arg;
} sqlcmd_opts_t;

/* srv, db and opts->lane_db are borrowed and must outlive the executor. Returns NULL when
 * the schema name is not a plain identifier. */
sqlcmd_t *sqlcmd_new(cmdsrv_t *srv, db_t *db, const sqlcmd_opts_t *opts);
/* Stops sending to the database: queued commands are answered
 * "unavailable" now, a batch in flight when the db reports back (e.g. from
 * db_destroy). Call before destroying the db. */
void sqlcmd_close(sqlcmd_t *q);
/* Frees the executor; call after the db is gone. Accepts NULL. */
void sqlcmd_destroy(sqlcmd_t **q_p);

/* Queues the request as a call of exec(name, key, args, ctx). Takes ownership
 * of *req_p and of args (a JSON object; its reference is stolen), NULLing
 * both. A NULL *req_p is an internal command (such as a periodic sweep): it
 * runs without an idempotency key and its reply is dropped, after its code
 * has gone to opts->internal (a failure is also logged). It is never refused
 * as "overloaded": its producer must bound how many it queues. A result that
 * linli.Reply has no field for (name is no command) is dropped too, rather
 * than turned into an "internal" error. */
void sqlcmd_submit(sqlcmd_t *q, cmdsrv_req_t **req_p, const char *name, json_t **args_p);

/* Queues the request as a lane command: cols holds the lane's ncols values
 * as text (numbers in decimal), borrowed. name is the command's (its reply
 * is answered under it), or NULL for the lane's own name; a lane may carry
 * several commands that share its columns (gifts and spends). conflicts
 * names, as strings, up to SQLCMD_CONFLICTS_MAX things two lane commands
 * must not share to run in concurrent batches (a person, a nonce); the
 * idempotency key is always one. Takes ownership of *req_p, NULLing it.
 * Returns 0, or -1 (nothing taken) when there is no lane or a value, the
 * idempotency key, the trace id or the source is not UTF-8: the caller
 * then submits the command as JSON. */
int sqlcmd_submit_lane(sqlcmd_t *q, cmdsrv_req_t **req_p, const char *name,
                       const char *const *cols, const char *const *conflicts, int nconflicts);

/* Commands queued or in the database. */
int sqlcmd_pending(const sqlcmd_t *q);
/* Batches sent while another was in the database. */
unsigned long long sqlcmd_overlapped(const sqlcmd_t *q);
/* Counters for /metrics. */
void sqlcmd_stats(const sqlcmd_t *q, unsigned long long *batches, unsigned long long *commands,
                  unsigned long long *retried, unsigned long long *failed);

#endif
