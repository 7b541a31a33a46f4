/* Environment-then-file configuration lookup (see config.h). */
#include "config.h"

#include "log.h"
#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *key;    /* owned */
    char *value;  /* owned */
} s_entry_t;

static s_entry_t *s_entries;  /* values from the LINLI_CONFIG file */
static size_t s_count;

static char *s_trim(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\n' || s[n - 1] == '\r'))
        s[--n] = '\0';
    return s;
}

int config_load(void)
{
    const char *path = getenv("LINLI_CONFIG");
    if (!path || !*path)
        return 0;
    FILE *f = fopen(path, "r");
    if (!f) {
        log_error("config", "cannot open config file path=%s err=%s", path, strerror(errno));
        return -1;
    }
    char *line = NULL;   /* a line of any length, a long connection string say */
    size_t cap = 0;
    int lineno = 0, rc = 0;
    while (getline(&line, &cap, f) >= 0) {
        lineno++;
        char *s = s_trim(line);
        if (!*s || *s == '#')
            continue;
        char *eq = strchr(s, '=');
        if (!eq || eq == s) {
            log_error("config", "malformed line path=%s line=%d (want KEY=VALUE)", path, lineno);
            rc = -1;
            break;
        }
        *eq = '\0';
        s_entries = xrealloc(s_entries, (s_count + 1) * sizeof *s_entries);
        s_entries[s_count].key = xstrdup(s_trim(s));
        s_entries[s_count].value = xstrdup(s_trim(eq + 1));
        s_count++;
    }
    /* fopen succeeds on a directory and getline then fails (EISDIR):
     * without this check that, or any read error, would pass for an empty
     * file. */
    if (rc == 0 && ferror(f)) {
        log_error("config", "cannot read config file path=%s err=%s", path, strerror(errno));
        rc = -1;
    }
    free(line);
    fclose(f);
    return rc;
}

const char *config_get(const char *key, const char *def)
{
    const char *v = getenv(key);
    if (v && *v)
        return v;
    for (size_t i = s_count; i-- > 0;)
        if (strcmp(s_entries[i].key, key) == 0 && s_entries[i].value[0])
            return s_entries[i].value;
    return def;
}

int config_int(const char *key, int64_t def, int64_t min, int64_t max, int64_t *out)
{
    const char *v = config_get(key, NULL);
    if (!v) {
        *out = def;
        return 0;
    }
    char *end;
    errno = 0;
    long long n = strtoll(v, &end, 10);
    if (errno || end == v || *end || n < min || n > max) {
        log_error("config", "invalid value key=%s value=%s range=[%lld,%lld]", key, v,
                  (long long)min, (long long)max);
        return -1;
    }
    *out = n;
    return 0;
}

char *config_secret(const char *key)
{
    char fkey[128];
    snprintf(fkey, sizeof fkey, "%s_FILE", key);
    const char *path = config_get(fkey, NULL);
    if (path) {
        FILE *f = fopen(path, "r");
        if (!f) {
            log_error("config", "cannot read secret file key=%s path=%s err=%s", fkey, path,
                      strerror(errno));
            return NULL;
        }
        char buf[4096];
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        /* one byte more means the file does not fit: refuse, never cut */
        int too_long = n == sizeof buf - 1 && fgetc(f) != EOF;
        int failed = ferror(f);
        fclose(f);
        if (too_long || failed) {
            log_error("config", "secret file %s key=%s path=%s", too_long ? "longer than 4095 bytes"
                      : "unreadable", fkey, path);
            memset(buf, 0, sizeof buf);
            return NULL;
        }
        buf[n] = '\0';
        while (n && (buf[n - 1] == '\n' || buf[n - 1] == '\r'))
            buf[--n] = '\0';
        return n ? xstrdup(buf) : NULL;
    }
    const char *v = config_get(key, NULL);
    return v ? xstrdup(v) : NULL;
}

void config_reset(void)
{
    for (size_t i = 0; i < s_count; i++) {
        free(s_entries[i].key);
        free(s_entries[i].value);
    }
    free(s_entries);
    s_entries = NULL;
    s_count = 0;
}

char *config_pg(void)
{
    char *c = config_secret("LINLI_PG");
    return c ? c : xstrdup("dbname=linli");
}
