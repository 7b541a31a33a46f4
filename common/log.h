/* Structured logging: one line per record on stderr,
 *   2026-11-23T10:00:00.123Z info registry cmd: message key=value
 * A record below the current level costs one comparison. Personal data is
 * passed through log_mask() before it reaches a log line. */
#ifndef LINLI_LOG_H
#define LINLI_LOG_H

#include <stddef.h>

enum { LOG_LEVEL_DEBUG = 0, LOG_LEVEL_INFO, LOG_LEVEL_WARN, LOG_LEVEL_ERROR };

extern int log_level_;  /* internal: read by the macros below */

/* Sets the service name printed on every line and the minimum level. */
void log_init(const char *service, int level);
/* Parses "debug", "info", "warn", "error"; returns -1 for anything else. */
int log_level_parse(const char *s);
void log_write(int level, const char *module, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#define log_debug(mod, ...) do { if (log_level_ <= LOG_LEVEL_DEBUG) log_write(LOG_LEVEL_DEBUG, mod, __VA_ARGS__); } while (0)
#define log_info(mod, ...)  do { if (log_level_ <= LOG_LEVEL_INFO)  log_write(LOG_LEVEL_INFO,  mod, __VA_ARGS__); } while (0)
#define log_warn(mod, ...)  do { if (log_level_ <= LOG_LEVEL_WARN)  log_write(LOG_LEVEL_WARN,  mod, __VA_ARGS__); } while (0)
#define log_error(mod, ...) log_write(LOG_LEVEL_ERROR, mod, __VA_ARGS__)

/* Masks personal data for logs: keeps the first 3 and last 2 characters of
 * s and replaces the rest with '*' ("138******21"); strings of 6 characters
 * or fewer become "***". Writes into buf (always NUL-terminated) and
 * returns it. */
const char *log_mask(const char *s, char *buf, size_t len);

#endif
