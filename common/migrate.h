/* Schema migrations: numbered SQL files per service (NNN_name.sql in one
 * directory), applied in number order, each once, each in its own
 * transaction together with its row in <schema>.schema_migrations
 * (version, name, checksum, applied_at). A pg_advisory_lock keyed by the
 * schema name makes concurrent starts of several replicas safe. A file that
 * was applied and has since changed (checksum differs) is an error: history
 * is never rewritten. Each file runs with search_path set to the schema (then
 * public), so it may use unqualified names. */
#ifndef LINLI_MIGRATE_H
#define LINLI_MIGRATE_H

#include <libpq-fe.h>

/* Applies every file in dir not yet recorded for schema. Creates the schema
 * and its schema_migrations table when missing. Returns the number of files
 * applied (>= 0), or -1 with the failing file and the server's message
 * logged; a failing file changes nothing. */
int migrate_apply(PGconn *conn, const char *schema, const char *dir);

/* A service's start-up migration: connects to conninfo, applies dir for
 * schema (migrate_apply), logs the outcome and disconnects. Returns 0 when
 * the schema is up to date, -1 (logged) otherwise. */
int migrate_service(const char *conninfo, const char *schema, const char *dir);

#endif
