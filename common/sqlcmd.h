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
 * "internal" error instead. */
typedef int(sqlcmd_finish_fn)(const char *name, json_t *reply, void *arg);
/* Called after each committed batch (e.g. to wake the outbox relay). */
typedef void(sqlcmd_commit_fn)(void *arg);

typedef struct {
    const char *schema;          /* "registry" */
    int batch_max;               /* commands per transaction, >= 1 */
    int queue_max;               /* queued beyond this: "overloaded" replies */
    sqlcmd_finish_fn *finish;    /* may be NULL */
    sqlcmd_commit_fn *committed; /* may be NULL */
    void *arg;
} sqlcmd_opts_t;

/* srv and db are borrowed and must outlive the executor. Returns NULL when
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
 * runs without an idempotency key and its reply is dropped. */
void sqlcmd_submit(sqlcmd_t *q, cmdsrv_req_t **req_p, const char *name, json_t **args_p);

/* Commands queued or in the database. */
int sqlcmd_pending(const sqlcmd_t *q);
/* Counters for /metrics. */
void sqlcmd_stats(const sqlcmd_t *q, unsigned long long *batches, unsigned long long *commands,
                  unsigned long long *retried, unsigned long long *failed);

#endif
