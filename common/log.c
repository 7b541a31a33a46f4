/* Structured one-line-per-record logging to stderr (see log.h). */
#include "log.h"

#include <event2/event.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

int log_level_ = LOG_LEVEL_INFO;
static char s_service[32] = "linli";

static const char *const s_names[] = { "debug", "info", "warn", "error" };

/* libevent's own warnings go through our format instead of "[warn] ...". */
static void s_libevent_log(int severity, const char *msg)
{
    int level = severity == EVENT_LOG_DEBUG ? LOG_LEVEL_DEBUG
                : severity == EVENT_LOG_MSG ? LOG_LEVEL_INFO
                : severity == EVENT_LOG_WARN ? LOG_LEVEL_WARN
                                              : LOG_LEVEL_ERROR;
    if (level >= log_level_)
        log_write(level, "libevent", "%s", msg);
}

void log_init(const char *service, int level)
{
    event_set_log_callback(s_libevent_log);
    snprintf(s_service, sizeof s_service, "%s", service ? service : "linli");
    if (level >= LOG_LEVEL_DEBUG && level <= LOG_LEVEL_ERROR)
        log_level_ = level;
}

int log_level_parse(const char *s)
{
    for (int i = 0; s && i < 4; i++)
        if (strcmp(s, s_names[i]) == 0)
            return i;
    return -1;
}

void log_write(int level, const char *module, const char *fmt, ...)
{
    char line[2048];
    struct timeval tv;
    struct tm tm;
    gettimeofday(&tv, NULL);
    gmtime_r(&tv.tv_sec, &tm);
    int n = snprintf(line, sizeof line, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ %s %s %s: ",
                     tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
                     tm.tm_sec, (int)(tv.tv_usec / 1000),
                     s_names[level < 0 ? 0 : level > 3 ? 3 : level], s_service, module);
    va_list ap;
    va_start(ap, fmt);
    if (n > 0 && (size_t)n < sizeof line)
        vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    /* One write per record so lines from several processes do not interleave;
     * newlines inside a message would split a record, so they become spaces. */
    size_t len = strlen(line);
    for (size_t i = 0; i < len; i++)
        if (line[i] == '\n' || line[i] == '\r')
            line[i] = ' ';
    if (len + 1 < sizeof line) {
        line[len++] = '\n';
        line[len] = '\0';
    } else {
        line[sizeof line - 2] = '\n';
        len = sizeof line - 1;
    }
    fwrite(line, 1, len, stderr);
}

const char *log_mask(const char *s, char *buf, size_t len)
{
    if (!buf || len == 0)
        return "";
    /* Characters, not bytes: names are often Chinese, three bytes a
     * character in UTF-8, and a byte count would show most of a short name
     * and cut the last character in half. A byte of the form 10xxxxxx
     * continues a character; every other byte starts one. */
    size_t n = s ? strlen(s) : 0, chars = 0, head = 0, tail = 0;
    for (size_t i = 0; i < n; i++)
        if (((unsigned char)s[i] & 0xc0) != 0x80) {
            if (chars == 3)
                head = i;
            chars++;
        }
    for (size_t i = n, k = 0; k < 2 && i-- > 0;)
        if (((unsigned char)s[i] & 0xc0) != 0x80) {
            tail = i;
            k++;
        }
    size_t stars = chars > 6 ? chars - 5 : 0, out = head + stars + (n - tail);
    if (chars <= 6 || out + 1 > len) {
        snprintf(buf, len, "***");
        return buf;
    }
    memcpy(buf, s, head);
    memset(buf + head, '*', stars);
    memcpy(buf + head + stars, s + tail, n - tail);
    buf[out] = '\0';
    return buf;
}
