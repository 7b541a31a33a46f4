/* Configuration: LINLI_* environment variables, then an optional file named
 * by LINLI_CONFIG (lines KEY=VALUE, '#' comments), then built-in defaults.
 * The environment wins over the file. Secrets are read from KEY_FILE (a path)
 * or KEY, never from argv.
 *
 * Keys every daemon understands (defaults in brackets):
 *   LINLI_PG             libpq conninfo ["dbname=linli"]
 *   LINLI_REDIS          host:port or /path/to/socket [127.0.0.1:6379]
 *   LINLI_REGISTRY_CMD   registry command endpoint [tcp://127.0.0.1:7101]
 *   LINLI_REGISTRY_PUB   registry event endpoint [tcp://127.0.0.1:7102]
 *   LINLI_<SVC>_HTTP     health/metrics listen address, host:port [127.0.0.1:0 = off]
 *   LINLI_TOKEN_SECRET   QR token key (or LINLI_TOKEN_SECRET_FILE)
 *   LINLI_LOG_LEVEL      debug|info|warn|error [info]
 *   LINLI_MIGRATIONS     directory of the service's numbered SQL files
 *   LINLI_BATCH_MAX      commands per transaction [512]
 */
#ifndef LINLI_CONFIG_H
#define LINLI_CONFIG_H

#include <stdint.h>

/* Loads the file named by LINLI_CONFIG, if any. Returns 0, or -1 (logged) if
 * the file is named but cannot be read or has a malformed line. Call once,
 * before the getters; without it they see only the environment. */
int config_load(void);

/* The value of key, or def when it is unset or empty. The returned string is
 * borrowed: valid until config_reset(). */
const char *config_get(const char *key, const char *def);

/* Integer value of key within [min, max]. Returns 0 and stores it in *out
 * (def when unset); -1 (logged with the key name) when it is not a number
 * or is out of range. */
int config_int(const char *key, int64_t def, int64_t min, int64_t max, int64_t *out);

/* A secret from key_FILE (contents, trailing newline dropped) or key.
 * Returns a new string the caller frees, or NULL when neither is set or the
 * file cannot be read (logged, without the secret). */
char *config_secret(const char *key);

/* The libpq connection string: LINLI_PG, or LINLI_PG_FILE (it may carry a
 * password, so it is a secret like any other); "dbname=linli" when neither
 * is set. Returns a new string the caller frees. */
char *config_pg(void);

/* Forgets the loaded file (for tests). */
void config_reset(void);

#endif
