/* The Redis key scheme for live counts and the synchronous reads behind
 * `linlictl stats` (see counters.h). Writes happen only in the analytics
 * daemon, through its apply script; this file builds the same keys so both
 * sides agree, and owns the blocking position read and epoch reset. */
#include "counters.h"

#include "config.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#define S_SCAN_COUNT "1000"  /* keys per SCAN step during a reset */

int counters_prefix_valid(const char *prefix)
{
    if (!prefix)
        return 0;
    size_t n = strlen(prefix);
    if (n == 0 || n > COUNTERS_PREFIX_MAX)
        return 0;
    for (size_t i = 0; i < n; i++) {
        char ch = prefix[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '_' || ch == '.' || ch == ':' || ch == '-'))
            return 0;
    }
    return 1;
}

int counters_config_prefix(const char **prefix)
{
    const char *p = config_get("LINLI_REDIS_PREFIX", COUNTERS_DEFAULT_PREFIX);
    if (!counters_prefix_valid(p)) {
        log_error("counters",
                  "invalid LINLI_REDIS_PREFIX (want 1..%d bytes of A-Z a-z 0-9 _ . : -)",
                  COUNTERS_PREFIX_MAX);
        return -1;
    }
    *prefix = p;
    return 0;
}

int counters_config_tz(int *tz_offset_min)
{
    int64_t v;
    if (config_int("LINLI_TZ_OFFSET_MIN", COUNTERS_DEFAULT_TZ_MIN, -720, 840, &v) < 0)
        return -1;
    *tz_offset_min = (int)v;
    return 0;
}

void counters_day(int64_t ms, int tz_offset_min, char out[9])
{
    /* Floor division so that times before 1970 still land on the right day. */
    int64_t secs = ms / 1000 - ((ms % 1000) < 0 ? 1 : 0);
    int64_t local = secs + (int64_t)tz_offset_min * 60;
    /* the last day asked for, per thread: events come in runs of one day */
    static __thread int64_t last_day = INT64_MIN;
    static __thread char last[9];
    int64_t day = local / 86400 - ((local % 86400) < 0 ? 1 : 0);
    if (day == last_day) {
        memcpy(out, last, 9);
        return;
    }
    time_t t = (time_t)local;
    struct tm tm;
    if (!gmtime_r(&t, &tm)) {
        memcpy(out, "00000000", 9);
        return;
    }
    unsigned y = (unsigned)(tm.tm_year + 1900) % 10000u, m = (unsigned)(tm.tm_mon + 1) % 100u,
             d = (unsigned)tm.tm_mday % 100u;
    snprintf(out, 9, "%04u%02u%02u", y, m, d);
    memcpy(last, out, 9);
    last_day = day;
}

static int s_fmt(size_t len, int n)
{
    return (n < 0 || (size_t)n >= len) ? -1 : 0;
}

/* Appends "P:{cC}" or "P:city", which must be shorter than COUNTERS_KEY_MAX
 * (the hot keys are built without printf). */
static int s_scope(char *buf, size_t len, size_t *at, const char *prefix, int64_t community_id)
{
    int rc = str_put(buf, len, at, prefix);
    if (!community_id) {
        rc |= str_put(buf, len, at, ":city");
    } else {
        rc |= str_put(buf, len, at, ":{c");
        rc |= str_put_i64(buf, len, at, community_id);
        rc |= str_put(buf, len, at, "}");
    }
    return *at >= COUNTERS_KEY_MAX ? -1 : rc;
}

int counters_key_scope(char *buf, size_t len, const char *prefix, int64_t community_id,
                       const char *what)
{
    size_t at = 0;
    int rc = s_scope(buf, len, &at, prefix, community_id);
    rc |= str_put(buf, len, &at, ":");
    return rc | str_put(buf, len, &at, what);
}

/* "P:{cC}:<kind>:<id>:<what>", C even when 0 */
static int s_key_of(char *buf, size_t len, const char *prefix, int64_t community_id,
                    const char *kind, int64_t id, const char *what)
{
    size_t at = 0;
    int rc = str_put(buf, len, &at, prefix);
    rc |= str_put(buf, len, &at, ":{c");
    rc |= str_put_i64(buf, len, &at, community_id);
    rc |= str_put(buf, len, &at, "}");
    rc |= str_put(buf, len, &at, kind);
    rc |= str_put_i64(buf, len, &at, id);
    rc |= str_put(buf, len, &at, ":");
    return rc | str_put(buf, len, &at, what);
}

int counters_key_activity(char *buf, size_t len, const char *prefix, int64_t community_id,
                          int64_t activity_id, const char *what)
{
    return s_key_of(buf, len, prefix, community_id, ":act:", activity_id, what);
}

int counters_key_uniq(char *buf, size_t len, const char *prefix, int64_t community_id,
                      const char *day)
{
    size_t at = 0;
    int rc = s_scope(buf, len, &at, prefix, community_id);
    rc |= str_put(buf, len, &at, ":uniq:");
    return rc | str_put(buf, len, &at, day);
}

int counters_key_route(char *buf, size_t len, const char *prefix, int64_t community_id,
                       int64_t route_id, const char *what)
{
    return s_key_of(buf, len, prefix, community_id, ":route:", route_id, what);
}

int counters_key_activities(char *buf, size_t len, const char *prefix)
{
    return s_fmt(len, snprintf(buf, len, "%s:city:activities", prefix));
}

int counters_key_position(char *buf, size_t len, const char *prefix, const char *stream)
{
    return s_fmt(len, snprintf(buf, len, "%s:pos:%s", prefix, stream));
}

redisContext *counters_connect(const char *addr, int timeout_ms)
{
    struct timeval tv = { timeout_ms / 1000, (timeout_ms % 1000) * 1000 };
    redisContext *c = NULL;
    char *host = NULL;

    if (!addr || !*addr) {
        log_error("counters", "no Redis address");
        return NULL;
    }
    if (addr[0] == '/') {
        c = redisConnectUnixWithTimeout(addr, tv);
    } else {
        const char *colon = strrchr(addr, ':');
        char *end = NULL;
        long port = colon ? strtol(colon + 1, &end, 10) : 0;
        if (!colon || colon == addr || !end || *end || port < 1 || port > 65535) {
            log_error("counters", "bad Redis address addr=%s (want host:port or /path)", addr);
            return NULL;
        }
        host = xstrndup(addr, (size_t)(colon - addr));
        c = redisConnectWithTimeout(host, (int)port, tv);
    }
    if (!c) {
        log_error("counters", "cannot allocate Redis context addr=%s", addr);
        goto cleanup;
    }
    if (c->err) {
        log_error("counters", "cannot connect to Redis addr=%s err=%s", addr, c->errstr);
        redisFree(c);
        c = NULL;
        goto cleanup;
    }
    redisSetTimeout(c, tv);
cleanup:
    free(host);
    return c;
}

/* Runs a command and checks the reply's type. Returns the reply (caller
 * frees) or NULL (logged). type -1 accepts any non-error reply. */
static redisReply *s_cmd(redisContext *c, int type, const char *what, int argc,
                         const char **argv)
{
    redisReply *r = redisCommandArgv(c, argc, argv, NULL);
    if (!r) {
        log_error("counters", "Redis command failed cmd=%s err=%s", what, c->errstr);
        return NULL;
    }
    if (r->type == REDIS_REPLY_ERROR || (type >= 0 && r->type != type)) {
        log_error("counters", "unexpected Redis reply cmd=%s type=%d err=%s", what, r->type,
                  r->type == REDIS_REPLY_ERROR ? r->str : "-");
        freeReplyObject(r);
        return NULL;
    }
    return r;
}

static int s_parse_u64(const char *s, size_t n, uint64_t *out)
{
    if (n == 0 || n > 20)
        return -1;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        uint64_t d = (uint64_t)(s[i] - '0');
        if (v > (UINT64_MAX - d) / 10)
            return -1;
        v = v * 10 + d;
    }
    *out = v;
    return 0;
}

int counters_position_read(redisContext *c, const char *prefix, const char *stream,
                           uint64_t *epoch, uint64_t *sequence, int *reset_pending)
{
    char key[COUNTERS_KEY_MAX];
    redisReply *r = NULL;
    int rc = -1;

    *epoch = *sequence = 0;
    *reset_pending = 0;
    if (counters_key_position(key, sizeof key, prefix, stream) < 0) {
        log_error("counters", "position key too long stream=%s", stream);
        return -1;
    }
    const char *argv[] = { "GET", key };
    r = s_cmd(c, -1, "GET", 2, argv);
    if (!r)
        goto cleanup;
    if (r->type == REDIS_REPLY_NIL) {
        rc = 0;
        goto cleanup;
    }
    if (r->type != REDIS_REPLY_STRING)
        goto malformed;
    const char *colon = memchr(r->str, ':', r->len);
    if (!colon || s_parse_u64(r->str, (size_t)(colon - r->str), epoch) < 0)
        goto malformed;
    size_t rest = r->len - (size_t)(colon + 1 - r->str);
    if (rest == 5 && memcmp(colon + 1, "reset", 5) == 0)
        *reset_pending = 1;
    else if (s_parse_u64(colon + 1, rest, sequence) < 0)
        goto malformed;
    rc = 0;
    goto cleanup;
malformed:
    log_error("counters", "malformed stored position key=%s", key);
    *epoch = *sequence = 0;
cleanup:
    if (r)
        freeReplyObject(r);
    return rc;
}

/* Deletes every key matching pattern; returns how many, or -1. */
static long long s_unlink_matching(redisContext *c, const char *pattern)
{
    char cursor[32] = "0";
    long long deleted = 0;
    const char **argv = NULL;
    size_t *lens = NULL;
    redisReply *r = NULL;

    do {
        const char *scan[] = { "SCAN", cursor, "MATCH", pattern, "COUNT", S_SCAN_COUNT };
        r = s_cmd(c, REDIS_REPLY_ARRAY, "SCAN", 6, scan);
        if (!r)
            goto fail;
        if (r->elements != 2 || r->element[0]->type != REDIS_REPLY_STRING ||
            r->element[1]->type != REDIS_REPLY_ARRAY ||
            r->element[0]->len >= sizeof cursor) {
            log_error("counters", "malformed SCAN reply pattern=%s", pattern);
            goto fail;
        }
        memcpy(cursor, r->element[0]->str, r->element[0]->len);
        cursor[r->element[0]->len] = '\0';
        redisReply *keys = r->element[1];
        if (keys->elements > 0) {
            argv = xcalloc(keys->elements + 1, sizeof *argv);
            lens = xcalloc(keys->elements + 1, sizeof *lens);
            argv[0] = "UNLINK";
            lens[0] = 6;
            for (size_t i = 0; i < keys->elements; i++) {
                argv[i + 1] = keys->element[i]->str;
                lens[i + 1] = keys->element[i]->len;
            }
            redisReply *u = redisCommandArgv(c, (int)keys->elements + 1, argv, lens);
            if (!u || u->type != REDIS_REPLY_INTEGER) {
                log_error("counters", "UNLINK failed err=%s",
                          !u ? c->errstr : u->type == REDIS_REPLY_ERROR ? u->str : "type");
                if (u)
                    freeReplyObject(u);
                goto fail;
            }
            deleted += u->integer;
            freeReplyObject(u);
            free(argv);
            free(lens);
            argv = NULL;
            lens = NULL;
        }
        freeReplyObject(r);
        r = NULL;
    } while (strcmp(cursor, "0") != 0);
    return deleted;
fail:
    free(argv);
    free(lens);
    if (r)
        freeReplyObject(r);
    return -1;
}

static int s_set(redisContext *c, const char *key, const char *value)
{
    const char *argv[] = { "SET", key, value };
    redisReply *r = s_cmd(c, REDIS_REPLY_STATUS, "SET", 3, argv);
    if (!r)
        return -1;
    freeReplyObject(r);
    return 0;
}

long long counters_reset(redisContext *c, const char *prefix, const char *stream, uint64_t epoch)
{
    char key[COUNTERS_KEY_MAX], value[48], pattern[COUNTERS_KEY_MAX];
    long long total = 0;

    if (!counters_prefix_valid(prefix) ||
        counters_key_position(key, sizeof key, prefix, stream) < 0) {
        log_error("counters", "cannot reset: invalid prefix or stream");
        return -1;
    }
    snprintf(value, sizeof value, "%" PRIu64 ":reset", epoch);
    if (s_set(c, key, value) < 0)
        return -1;
    /* The prefix holds no glob characters (counters_prefix_valid), and '{'
     * is not special to Redis' matcher, so these match exactly our keys. */
    const char *const forms[] = { "%s:{c*", "%s:city:*" };
    for (size_t i = 0; i < LX_ARRAY_LEN(forms); i++) {
        snprintf(pattern, sizeof pattern, forms[i], prefix);
        long long n = s_unlink_matching(c, pattern);
        if (n < 0)
            return -1;
        total += n;
    }
    snprintf(value, sizeof value, "%" PRIu64 ":0", epoch);
    if (s_set(c, key, value) < 0)
        return -1;
    log_info("counters", "reset prefix=%s stream=%s epoch=%" PRIu64 " keys_deleted=%lld", prefix,
             stream, epoch, total);
    return total;
}

/* GETs keys[0..n) into out (0 for missing keys). */
static int s_get_many(redisContext *c, size_t n, const char **keys, int64_t **out)
{
    const char *argv[8];
    redisReply *r = NULL;
    int rc = -1;

    if (n + 1 > LX_ARRAY_LEN(argv))
        return -1;
    argv[0] = "MGET";
    for (size_t i = 0; i < n; i++)
        argv[i + 1] = keys[i];
    r = s_cmd(c, REDIS_REPLY_ARRAY, "MGET", (int)n + 1, argv);
    if (!r)
        return -1;
    if (r->elements != n) {
        log_error("counters", "malformed MGET reply");
        goto cleanup;
    }
    for (size_t i = 0; i < n; i++) {
        redisReply *e = r->element[i];
        *out[i] = 0;
        if (e->type == REDIS_REPLY_NIL)
            continue;
        char *end = NULL;
        errno = 0;
        long long v = e->type == REDIS_REPLY_STRING ? strtoll(e->str, &end, 10) : 0;
        if (e->type != REDIS_REPLY_STRING || errno || !end || *end || end == e->str) {
            log_error("counters", "counter is not an integer key=%s", keys[i]);
            goto cleanup;
        }
        *out[i] = v;
    }
    rc = 0;
cleanup:
    freeReplyObject(r);
    return rc;
}

static int s_reason_cmp(const void *a, const void *b)
{
    const counters_reason_t *x = a, *y = b;
    if (x->count != y->count)
        return x->count < y->count ? 1 : -1;
    return strcmp(x->reason, y->reason);
}

static int s_read_refusals(redisContext *c, const char *prefix, counters_view_t *out)
{
    char key[COUNTERS_KEY_MAX];
    counters_reason_t *all = NULL;
    redisReply *r = NULL;
    int rc = -1;

    if (counters_key_scope(key, sizeof key, prefix, out->community_id, "refusals") < 0)
        return -1;
    const char *argv[] = { "HGETALL", key };
    r = s_cmd(c, REDIS_REPLY_ARRAY, "HGETALL", 2, argv);
    if (!r)
        return -1;
    size_t n = r->elements / 2;
    all = xcalloc(n ? n : 1, sizeof *all);
    for (size_t i = 0; i < n; i++) {
        redisReply *f = r->element[2 * i], *v = r->element[2 * i + 1];
        if (f->type != REDIS_REPLY_STRING || v->type != REDIS_REPLY_STRING) {
            log_error("counters", "malformed HGETALL reply key=%s", key);
            goto cleanup;
        }
        size_t flen = f->len > COUNTERS_REASON_MAX ? COUNTERS_REASON_MAX : f->len;
        memcpy(all[i].reason, f->str, flen);
        all[i].reason[flen] = '\0';
        all[i].count = strtoll(v->str, NULL, 10);
        out->refusals += all[i].count;
    }
    qsort(all, n, sizeof *all, s_reason_cmp);
    out->nreasons = n < COUNTERS_MAX_REASONS ? n : COUNTERS_MAX_REASONS;
    memcpy(out->reasons, all, out->nreasons * sizeof *all);
    rc = 0;
cleanup:
    free(all);
    freeReplyObject(r);
    return rc;
}

/* Looks up an activity's community in P:city:activities. */
static int s_activity_community(redisContext *c, const char *prefix, int64_t activity_id,
                                int64_t *community_id)
{
    char key[COUNTERS_KEY_MAX], field[24];
    if (counters_key_activities(key, sizeof key, prefix) < 0)
        return -1;
    snprintf(field, sizeof field, "%" PRId64, activity_id);
    const char *argv[] = { "HGET", key, field };
    redisReply *r = s_cmd(c, -1, "HGET", 3, argv);
    if (!r)
        return -1;
    int rc = -1;
    if (r->type == REDIS_REPLY_STRING)
        *community_id = strtoll(r->str, NULL, 10);
    if (r->type == REDIS_REPLY_STRING && *community_id > 0)
        rc = 0;
    else
        log_error("counters", "unknown activity (no community recorded) activity=%" PRId64,
                  activity_id);
    freeReplyObject(r);
    return rc;
}

int counters_read_day(redisContext *c, const char *prefix, int64_t community_id,
                      int64_t activity_id, const char *day, counters_view_t *out)
{
    char k[4][COUNTERS_KEY_MAX];
    const char *keys[4];
    int64_t *vals[4];
    size_t n = 0;
    int ok = 0;

    memset(out, 0, sizeof *out);
    if (!counters_prefix_valid(prefix) || !day || strlen(day) != 8) {
        log_error("counters", "cannot read: invalid prefix or day");
        return -1;
    }
    if (activity_id && !community_id &&
        s_activity_community(c, prefix, activity_id, &community_id) < 0)
        return -1;
    out->community_id = community_id;
    out->activity_id = activity_id;
    memcpy(out->day, day, 9);

    if (activity_id) {
        ok |= counters_key_activity(k[0], sizeof k[0], prefix, community_id, activity_id,
                                    "signups");
        ok |= counters_key_activity(k[1], sizeof k[1], prefix, community_id, activity_id,
                                    "checkins");
        ok |= counters_key_activity(k[2], sizeof k[2], prefix, community_id, activity_id,
                                    "present");
        vals[0] = &out->signups;
        vals[1] = &out->checkins;
        vals[2] = &out->present;
        n = 3;
    } else {
        ok |= counters_key_scope(k[0], sizeof k[0], prefix, community_id, "signups");
        ok |= counters_key_scope(k[1], sizeof k[1], prefix, community_id, "checkins");
        vals[0] = &out->signups;
        vals[1] = &out->checkins;
        n = 2;
    }
    if (ok < 0)
        return -1;
    for (size_t i = 0; i < n; i++)
        keys[i] = k[i];
    if (s_get_many(c, n, keys, vals) < 0)
        return -1;

    if (counters_key_uniq(k[3], sizeof k[3], prefix, community_id, day) < 0)
        return -1;
    const char *pf[] = { "PFCOUNT", k[3] };
    redisReply *r = s_cmd(c, REDIS_REPLY_INTEGER, "PFCOUNT", 2, pf);
    if (!r)
        return -1;
    out->unique_today = r->integer;
    freeReplyObject(r);

    if (community_id && !activity_id && s_read_refusals(c, prefix, out) < 0)
        return -1;

    int reset_pending = 0;
    if (counters_position_read(c, prefix, "registry", &out->epoch, &out->sequence,
                               &reset_pending) == 0)
        out->have_position = 1;
    return 0;
}

int counters_read(redisContext *c, const char *prefix, int64_t community_id, int64_t activity_id,
                  counters_view_t *out)
{
    int tz = COUNTERS_DEFAULT_TZ_MIN;
    char day[9];
    if (counters_config_tz(&tz) < 0)
        return -1;
    counters_day(now_ms(), tz, day);
    return counters_read_day(c, prefix, community_id, activity_id, day, out);
}

int counters_read_route(redisContext *c, const char *prefix, int64_t community_id,
                        int64_t route_id, int64_t *stamps, int64_t *redeemed)
{
    char k[2][COUNTERS_KEY_MAX];
    if (counters_key_route(k[0], sizeof k[0], prefix, community_id, route_id, "stamps") < 0 ||
        counters_key_route(k[1], sizeof k[1], prefix, community_id, route_id, "redeemed") < 0)
        return -1;
    const char *keys[] = { k[0], k[1] };
    int64_t *vals[] = { stamps, redeemed };
    return s_get_many(c, 2, keys, vals);
}

void counters_print(FILE *f, const counters_view_t *v)
{
    if (v->activity_id)
        fprintf(f, "%-14s activity %" PRId64 " (community %" PRId64 ")\n", "scope",
                v->activity_id, v->community_id);
    else if (v->community_id)
        fprintf(f, "%-14s community %" PRId64 "\n", "scope", v->community_id);
    else
        fprintf(f, "%-14s city\n", "scope");
    fprintf(f, "%-14s %" PRId64 "\n", "signups", v->signups);
    fprintf(f, "%-14s %" PRId64 "\n", "checkins", v->checkins);
    if (v->activity_id)
        fprintf(f, "%-14s %" PRId64 "\n", "present", v->present);
    fprintf(f, "%-14s %" PRId64 "  (%s%s)\n", "unique today", v->unique_today, v->day,
            v->activity_id ? ", whole community" : "");
    if (v->community_id && !v->activity_id) {
        fprintf(f, "%-14s %" PRId64 "\n", "refusals", v->refusals);
        for (size_t i = 0; i < v->nreasons; i++)
            fprintf(f, "  %-12s %" PRId64 "\n", v->reasons[i].reason, v->reasons[i].count);
    }
    if (v->have_position)
        fprintf(f, "%-14s registry %" PRIu64 ":%" PRIu64 "\n", "applied", v->epoch,
                v->sequence);
}

json_t *counters_to_json(const counters_view_t *v)
{
    json_t *o = json_object();
    json_object_set_new(o, "community_id", json_integer(v->community_id));
    json_object_set_new(o, "activity_id", json_integer(v->activity_id));
    json_object_set_new(o, "day", json_string(v->day));
    json_object_set_new(o, "signups", json_integer(v->signups));
    json_object_set_new(o, "checkins", json_integer(v->checkins));
    if (v->activity_id)
        json_object_set_new(o, "present", json_integer(v->present));
    json_object_set_new(o, "unique_today", json_integer(v->unique_today));
    if (v->community_id && !v->activity_id) {
        json_t *by = json_object();
        for (size_t i = 0; i < v->nreasons; i++)
            json_object_set_new(by, v->reasons[i].reason, json_integer(v->reasons[i].count));
        json_object_set_new(o, "refusals", json_integer(v->refusals));
        json_object_set_new(o, "refusals_by_reason", by);
    }
    if (v->have_position) {
        json_t *p = json_object();
        json_object_set_new(p, "stream", json_string("registry"));
        json_object_set_new(p, "epoch", json_integer((json_int_t)v->epoch));
        json_object_set_new(p, "sequence", json_integer((json_int_t)v->sequence));
        json_object_set_new(o, "position", p);
    }
    return o;
}
