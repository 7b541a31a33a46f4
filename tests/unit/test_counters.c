/* Unit tests for common/counters.c: the key scheme, prefix and day rules and
 * address parsing on their own, and the position read, the epoch reset and
 * the view reads against a real Redis (LINLI_TEST_REDIS, "host:port" or a
 * socket path). Each Redis test writes under a key prefix of its own
 * (tc_<pid>_<n>) with plain commands and deletes it afterwards. Without
 * LINLI_TEST_REDIS the tests that need the server are skipped. */
#include "counters.h"
#include "log.h"
#include "util.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define S_DAY "20261123"

static const char *s_addr;  /* NULL: no server, skip */

#define S_REQUIRE_REDIS()                                                                    \
    do {                                                                                     \
        if (!s_addr)                                                                         \
            skip();                                                                          \
    } while (0)

/* One Redis test: its connection and prefix. */
typedef struct {
    redisContext *c;
    char p[64];
} s_env_t;

/* ---- helpers ---- */

/* Runs a command built with hiredis' format (%s for strings) and fails the
 * test on an error reply. */
static void s_cmd(redisContext *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    assert_non_null(r);
    if (r->type == REDIS_REPLY_ERROR)
        fail_msg("Redis error: %s (%s)", r->str, fmt);
    freeReplyObject(r);
}

static int s_exists(redisContext *c, const char *key)
{
    redisReply *r = redisCommand(c, "EXISTS %s", key);
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_INTEGER);
    int n = (int)r->integer;
    freeReplyObject(r);
    return n;
}

/* The string at key, into buf ("" when missing). */
static const char *s_get(redisContext *c, const char *key, char *buf, size_t len)
{
    redisReply *r = redisCommand(c, "GET %s", key);
    assert_non_null(r);
    buf[0] = '\0';
    if (r->type == REDIS_REPLY_STRING)
        snprintf(buf, len, "%s", r->str);
    freeReplyObject(r);
    return buf;
}

/* Deletes every key starting with pattern's text (a glob). Returns how many. */
static long long s_wipe(redisContext *c, const char *pattern)
{
    char cursor[32] = "0";
    long long n = 0;
    do {
        redisReply *r = redisCommand(c, "SCAN %s MATCH %s COUNT 1000", cursor, pattern);
        assert_non_null(r);
        assert_int_equal(r->type, REDIS_REPLY_ARRAY);
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        for (size_t i = 0; i < r->element[1]->elements; i++) {
            s_cmd(c, "DEL %s", r->element[1]->element[i]->str);
            n++;
        }
        freeReplyObject(r);
    } while (strcmp(cursor, "0") != 0);
    return n;
}

/* Counts keys matching pattern. */
static long long s_count(redisContext *c, const char *pattern)
{
    char cursor[32] = "0";
    long long n = 0;
    do {
        redisReply *r = redisCommand(c, "SCAN %s MATCH %s COUNT 1000", cursor, pattern);
        assert_non_null(r);
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        n += (long long)r->element[1]->elements;
        freeReplyObject(r);
    } while (strcmp(cursor, "0") != 0);
    return n;
}

static void s_wipe_prefix(redisContext *c, const char *prefix)
{
    char pat[128];
    snprintf(pat, sizeof pat, "%s:*", prefix);
    s_wipe(c, pat);
}

static int s_setup(void **state)
{
    static int n;
    s_env_t *e = xcalloc(1, sizeof *e);
    *state = e;
    if (!s_addr)
        return 0;
    snprintf(e->p, sizeof e->p, "tc_%d_%d", (int)getpid(), ++n);
    e->c = counters_connect(s_addr, 2000);
    if (!e->c)
        return -1;
    s_wipe_prefix(e->c, e->p);
    return 0;
}

static int s_teardown(void **state)
{
    s_env_t *e = *state;
    if (e->c) {
        s_wipe_prefix(e->c, e->p);
        redisFree(e->c);
    }
    free(e);
    return 0;
}

/* ---- no server needed ---- */

/* Prefixes: 1..64 bytes of [A-Za-z0-9_.:-]; nothing a glob or a hash tag
 * would read. */
static void test_prefix_valid(void **state)
{
    (void)state;
    char max[COUNTERS_PREFIX_MAX + 2];
    memset(max, 'a', sizeof max);
    max[COUNTERS_PREFIX_MAX] = '\0';
    assert_true(counters_prefix_valid(max));
    max[COUNTERS_PREFIX_MAX] = 'a';
    max[COUNTERS_PREFIX_MAX + 1] = '\0';
    assert_false(counters_prefix_valid(max));

    assert_true(counters_prefix_valid("linli"));
    assert_true(counters_prefix_valid("a"));
    assert_true(counters_prefix_valid("Az09_.:-"));
    assert_false(counters_prefix_valid(NULL));
    assert_false(counters_prefix_valid(""));
    const char *bad[] = { "a*", "a?", "a[b]", "a{c}", "a}", "a\\b", "a b", "a\n", "a/b",
                          "caf\xc3\xa9", "a^" };
    for (size_t i = 0; i < LX_ARRAY_LEN(bad); i++)
        assert_false(counters_prefix_valid(bad[i]));
}

/* The prefix and time zone from the environment, with their defaults and
 * bounds. */
static void test_config(void **state)
{
    (void)state;
    const char *p = NULL;
    int tz = 0;
    unsetenv("LINLI_REDIS_PREFIX");
    unsetenv("LINLI_TZ_OFFSET_MIN");
    assert_int_equal(counters_config_prefix(&p), 0);
    assert_string_equal(p, COUNTERS_DEFAULT_PREFIX);
    assert_int_equal(counters_config_tz(&tz), 0);
    assert_int_equal(tz, COUNTERS_DEFAULT_TZ_MIN);

    setenv("LINLI_REDIS_PREFIX", "t:x-1", 1);
    assert_int_equal(counters_config_prefix(&p), 0);
    assert_string_equal(p, "t:x-1");
    setenv("LINLI_REDIS_PREFIX", "t*", 1);
    p = "unchanged";
    assert_int_equal(counters_config_prefix(&p), -1);
    assert_string_equal(p, "unchanged");

    const char *ok[] = { "-720", "840", "0", "-180" };
    const int want[] = { -720, 840, 0, -180 };
    for (size_t i = 0; i < LX_ARRAY_LEN(ok); i++) {
        setenv("LINLI_TZ_OFFSET_MIN", ok[i], 1);
        assert_int_equal(counters_config_tz(&tz), 0);
        assert_int_equal(tz, want[i]);
    }
    const char *bad[] = { "-721", "841", "8h", "x" };
    for (size_t i = 0; i < LX_ARRAY_LEN(bad); i++) {
        setenv("LINLI_TZ_OFFSET_MIN", bad[i], 1);
        tz = 12345;
        assert_int_equal(counters_config_tz(&tz), -1);
        assert_int_equal(tz, 12345);
    }
    unsetenv("LINLI_REDIS_PREFIX");
    unsetenv("LINLI_TZ_OFFSET_MIN");
}

/* Days in the city's zone: the boundaries fall at local midnight, and times
 * before 1970 (negative ms, not whole seconds) still floor to the right day. */
static void test_day(void **state)
{
    (void)state;
    char d[9];
    /* 2026-11-23T16:00:00Z is midnight in UTC+8. */
    const int64_t midnight = INT64_C(1795449600000);
    counters_day(midnight, 480, d);
    assert_string_equal(d, "20261124");
    counters_day(midnight - 1, 480, d);
    assert_string_equal(d, "20261123");
    counters_day(midnight, 0, d);
    assert_string_equal(d, "20261123");
    counters_day(midnight, -720, d);
    assert_string_equal(d, "20261123");
    counters_day(midnight - INT64_C(16) * 3600 * 1000, -1, d); /* 23:59 on the 22nd */
    assert_string_equal(d, "20261122");
    counters_day(midnight, 840, d);
    assert_string_equal(d, "20261124");

    counters_day(0, 0, d);
    assert_string_equal(d, "19700101");
    counters_day(-1, 0, d);
    assert_string_equal(d, "19691231");
    counters_day(-1000, 0, d);
    assert_string_equal(d, "19691231");
    counters_day(-1500, 60, d);
    assert_string_equal(d, "19700101");
    counters_day(-INT64_C(86400000), 0, d);
    assert_string_equal(d, "19691231");
    counters_day(-INT64_C(86400001), 0, d);
    assert_string_equal(d, "19691230");
    /* 2024-02-29T23:59:59.999 local in UTC+8 */
    counters_day(INT64_C(1709222399999), 480, d);
    assert_string_equal(d, "20240229");
}

/* The key scheme of counters.h, byte for byte, and refusal when a key does
 * not fit its buffer (exactly full still fits). */
static void test_keys(void **state)
{
    (void)state;
    char k[COUNTERS_KEY_MAX];
    assert_int_equal(counters_key_scope(k, sizeof k, "P", 7, "signups"), 0);
    assert_string_equal(k, "P:{c7}:signups");
    assert_int_equal(counters_key_scope(k, sizeof k, "P", 0, "checkins"), 0);
    assert_string_equal(k, "P:city:checkins");
    assert_int_equal(counters_key_scope(k, sizeof k, "P", 7, "refusals"), 0);
    assert_string_equal(k, "P:{c7}:refusals");
    assert_int_equal(counters_key_activity(k, sizeof k, "P", 7, 42, "present"), 0);
    assert_string_equal(k, "P:{c7}:act:42:present");
    assert_int_equal(counters_key_uniq(k, sizeof k, "P", 7, S_DAY), 0);
    assert_string_equal(k, "P:{c7}:uniq:" S_DAY);
    assert_int_equal(counters_key_uniq(k, sizeof k, "P", 0, S_DAY), 0);
    assert_string_equal(k, "P:city:uniq:" S_DAY);
    assert_int_equal(counters_key_route(k, sizeof k, "P", 7, 3, "stamps"), 0);
    assert_string_equal(k, "P:{c7}:route:3:stamps");
    /* activity and route keys always name their community, 0 as well */
    assert_int_equal(counters_key_activity(k, sizeof k, "P", 0, 42, "present"), 0);
    assert_string_equal(k, "P:{c0}:act:42:present");
    assert_int_equal(counters_key_route(k, sizeof k, "P", 0, 3, "stamps"), 0);
    assert_string_equal(k, "P:{c0}:route:3:stamps");
    assert_int_equal(counters_key_activity(k, sizeof k, "P", -5, -6, "x"), 0);
    assert_string_equal(k, "P:{c-5}:act:-6:x");
    assert_int_equal(counters_key_activities(k, sizeof k, "P"), 0);
    assert_string_equal(k, "P:city:activities");
    assert_int_equal(counters_key_position(k, sizeof k, "P", "registry"), 0);
    assert_string_equal(k, "P:pos:registry");

    /* The longest prefix with the widest ids fits COUNTERS_KEY_MAX. */
    char p[COUNTERS_PREFIX_MAX + 1];
    memset(p, 'p', COUNTERS_PREFIX_MAX);
    p[COUNTERS_PREFIX_MAX] = '\0';
    assert_int_equal(counters_key_activity(k, sizeof k, p, INT64_MIN, INT64_MIN, "checkins"), 0);
    assert_int_equal(counters_key_route(k, sizeof k, p, INT64_MAX, INT64_MIN, "redeemed"), 0);

    /* "P:{c7}:signups" is 14 bytes: 15 fit, 14 do not. */
    char small[15];
    assert_int_equal(counters_key_scope(small, 15, "P", 7, "signups"), 0);
    assert_string_equal(small, "P:{c7}:signups");
    assert_int_equal(counters_key_scope(small, 14, "P", 7, "signups"), -1);
    assert_int_equal(counters_key_activity(small, 14, "P", 7, 42, "x"), -1);
    assert_int_equal(counters_key_uniq(small, 14, "P", 7, S_DAY), -1);
    assert_int_equal(counters_key_route(small, 14, "P", 7, 3, "x"), -1);
    assert_int_equal(counters_key_activities(small, 14, "P"), -1);
    assert_int_equal(counters_key_position(small, 14, "P", "registry"), -1);
    assert_int_equal(counters_key_position(small, 14, "P", "regist"), 0);
    /* A scope that alone exceeds COUNTERS_KEY_MAX. */
    char *huge = xmalloc(COUNTERS_KEY_MAX + 10);
    memset(huge, 'h', COUNTERS_KEY_MAX + 9);
    huge[COUNTERS_KEY_MAX + 9] = '\0';
    char big[COUNTERS_KEY_MAX * 2];
    assert_int_equal(counters_key_scope(big, sizeof big, huge, 7, "signups"), -1);
    assert_int_equal(counters_key_uniq(big, sizeof big, huge, 0, S_DAY), -1);
    free(huge);
}

/* Addresses that cannot be used are refused without a connection attempt
 * hanging: no address, no port, a port out of range, a missing socket. */
static void test_connect_bad_address(void **state)
{
    (void)state;
    const char *bad[] = { NULL, "", "localhost", ":6379", "localhost:", "localhost:0",
                          "localhost:65536", "localhost:63x9", "localhost:-1",
                          "/nonexistent/redis.sock" };
    for (size_t i = 0; i < LX_ARRAY_LEN(bad); i++)
        assert_null(counters_connect(bad[i], 500));
}

/* ---- against Redis ---- */

static void test_connect(void **state)
{
    S_REQUIRE_REDIS();
    s_env_t *e = *state;
    redisReply *r = redisCommand(e->c, "PING");
    assert_non_null(r);
    assert_int_equal(r->type, REDIS_REPLY_STATUS);
    assert_string_equal(r->str, "PONG");
    freeReplyObject(r);
}

/* The stored position "epoch:seq" or "epoch:reset": read back exactly, 0/0
 * when absent, and anything else refused rather than half-read. */
static void test_position_read(void **state)
{
    S_REQUIRE_REDIS();
    s_env_t *e = *state;
    char key[COUNTERS_KEY_MAX];
    assert_int_equal(counters_key_position(key, sizeof key, e->p, "registry"), 0);
    uint64_t ep = 1, seq = 1;
    int pending = 1;

    assert_int_equal(counters_position_read(e->c, e->p, "registry", &ep, &seq, &pending), 0);
    assert_int_equal(ep, 0);
    assert_int_equal(seq, 0);
    assert_int_equal(pending, 0);

    s_cmd(e->c, "SET %s %s", key, "5:17");
    assert_int_equal(counters_position_read(e->c, e->p, "registry", &ep, &seq, &pending), 0);
    assert_int_equal(ep, 5);
    assert_int_equal(seq, 17);
    assert_int_equal(pending, 0);

    s_cmd(e->c, "SET %s %s", key, "1795399200000:0");
    assert_int_equal(counters_position_read(e->c, e->p, "registry", &ep, &seq, &pending), 0);
    assert_int_equal(ep, UINT64_C(1795399200000));
    assert_int_equal(seq, 0);

    s_cmd(e->c, "SET %s %s", key, "18446744073709551615:18446744073709551615");
    assert_int_equal(counters_position_read(e->c, e->p, "registry", &ep, &seq, &pending), 0);
    assert_true(ep == UINT64_MAX && seq == UINT64_MAX);

    s_cmd(e->c, "SET %s %s", key, "6:reset");
    assert_int_equal(counters_position_read(e->c, e->p, "registry", &ep, &seq, &pending), 0);
    assert_int_equal(ep, 6);
    assert_int_equal(seq, 0);
    assert_int_equal(pending, 1);

    const char *bad[] = { "abc", "5", "5:", ":5", "5:17x", "-1:2", "5:-2", "5:reset2",
                          "5:rese", "18446744073709551616:1", "1:18446744073709551616",
                          "5:17:3", " 5:1", "5:1 ", "" };
    for (size_t i = 0; i < LX_ARRAY_LEN(bad); i++) {
        s_cmd(e->c, "SET %s %s", key, bad[i]);
        ep = seq = 9;
        if (counters_position_read(e->c, e->p, "registry", &ep, &seq, &pending) != -1)
            fail_msg("stored position \"%s\" was accepted", bad[i]);
        assert_int_equal(ep, 0);
        assert_int_equal(seq, 0);
    }
    /* Binary-safe: a NUL inside is not the end of the value. */
    redisReply *r = redisCommand(e->c, "SET %s %b", key, "5:1\0" "7", (size_t)5);
    freeReplyObject(r);
    assert_int_equal(counters_position_read(e->c, e->p, "registry", &ep, &seq, &pending), -1);

    /* Not a string at all. */
    s_cmd(e->c, "DEL %s", key);
    s_cmd(e->c, "HSET %s a 1", key);
    assert_int_equal(counters_position_read(e->c, e->p, "registry", &ep, &seq, &pending), -1);
    /* Another stream's position is a different key. */
    assert_int_equal(counters_position_read(e->c, e->p, "other", &ep, &seq, &pending), 0);
    assert_int_equal(ep, 0);
}

/* A reset deletes every registry-derived key of the prefix (communities,
 * activities, routes, HyperLogLogs, hashes, city-wide keys; many, over
 * several SCAN steps), keeps the position key, stored as "epoch:0", and
 * touches no key of another prefix or outside the derived families. */
static void test_reset(void **state)
{
    S_REQUIRE_REDIS();
    s_env_t *e = *state;
    const char *p = e->p;
    char other[80], k[COUNTERS_KEY_MAX], buf[64];
    snprintf(other, sizeof other, "%sx", p); /* shares p as a string prefix */

    char pos[COUNTERS_KEY_MAX];
    counters_key_position(pos, sizeof pos, p, "registry");
    s_cmd(e->c, "SET %s %s", pos, "3:40");
    counters_key_scope(k, sizeof k, p, 1, "signups");
    s_cmd(e->c, "SET %s 5", k);
    counters_key_scope(k, sizeof k, p, 0, "signups");
    s_cmd(e->c, "SET %s 9", k);
    counters_key_activity(k, sizeof k, p, 1, 2, "present");
    s_cmd(e->c, "SET %s 1", k);
    counters_key_uniq(k, sizeof k, p, 12, S_DAY);
    s_cmd(e->c, "PFADD %s a b", k);
    counters_key_uniq(k, sizeof k, p, 0, S_DAY);
    s_cmd(e->c, "PFADD %s a b", k);
    counters_key_scope(k, sizeof k, p, 1, "refusals");
    s_cmd(e->c, "HSET %s expired 2", k);
    counters_key_activities(k, sizeof k, p);
    s_cmd(e->c, "HSET %s 2 1", k);
    counters_key_route(k, sizeof k, p, 1, 3, "stamps");
    s_cmd(e->c, "SET %s 4", k);
    for (int i = 0; i < 2500; i++) {
        counters_key_activity(k, sizeof k, p, 100 + i % 50, i, "checkins");
        s_cmd(e->c, "SET %s 1", k);
    }
    /* Not ours to delete. */
    char keep1[COUNTERS_KEY_MAX], keep2[COUNTERS_KEY_MAX], keep3[COUNTERS_KEY_MAX];
    counters_key_scope(keep1, sizeof keep1, other, 1, "signups");
    s_cmd(e->c, "SET %s 7", keep1);
    counters_key_scope(keep2, sizeof keep2, other, 0, "signups");
    s_cmd(e->c, "SET %s 7", keep2);
    snprintf(keep3, sizeof keep3, "%s:other", p);
    s_cmd(e->c, "SET %s 7", keep3);

    assert_int_equal(counters_reset(e->c, p, "registry", 4), 2508);
    assert_string_equal(s_get(e->c, pos, buf, sizeof buf), "4:0");
    char pat[128];
    snprintf(pat, sizeof pat, "%s:*", p);
    assert_int_equal(s_count(e->c, pat), 2); /* the position and :other */
    assert_int_equal(s_exists(e->c, keep1), 1);
    assert_int_equal(s_exists(e->c, keep2), 1);
    assert_int_equal(s_exists(e->c, keep3), 1);

    uint64_t ep, seq;
    int pending;
    assert_int_equal(counters_position_read(e->c, p, "registry", &ep, &seq, &pending), 0);
    assert_int_equal(ep, 4);
    assert_int_equal(seq, 0);
    assert_int_equal(pending, 0);

    /* Again, with nothing to delete. */
    assert_int_equal(counters_reset(e->c, p, "registry", 5), 0);
    assert_string_equal(s_get(e->c, pos, buf, sizeof buf), "5:0");

    /* A prefix with glob characters is refused before anything is touched. */
    assert_int_equal(counters_reset(e->c, "*", "registry", 6), -1);
    assert_int_equal(s_exists(e->c, keep1), 1);
    s_wipe_prefix(e->c, other);
}

/* A position still marked "epoch:reset" (a reset that was cut short) reads
 * as pending, and repeating the reset clears the mark. */
static void test_reset_mark_is_pending(void **state)
{
    S_REQUIRE_REDIS();
    s_env_t *e = *state;
    char pos[COUNTERS_KEY_MAX];
    counters_key_position(pos, sizeof pos, e->p, "registry");
    s_cmd(e->c, "SET %s %s", pos, "8:reset");
    uint64_t ep, seq;
    int pending;
    assert_int_equal(counters_position_read(e->c, e->p, "registry", &ep, &seq, &pending), 0);
    assert_int_equal(ep, 8);
    assert_int_equal(pending, 1);
    assert_int_equal(counters_reset(e->c, e->p, "registry", 8), 0);
    assert_int_equal(counters_position_read(e->c, e->p, "registry", &ep, &seq, &pending), 0);
    assert_int_equal(ep, 8);
    assert_int_equal(seq, 0);
    assert_int_equal(pending, 0);
}

/* Writes the counters of community 11, its activity 101 and the city. */
static void s_fill(s_env_t *e)
{
    const char *p = e->p;
    char k[COUNTERS_KEY_MAX];
    counters_key_scope(k, sizeof k, p, 11, "signups");
    s_cmd(e->c, "SET %s 3", k);
    counters_key_scope(k, sizeof k, p, 11, "checkins");
    s_cmd(e->c, "SET %s 4", k);
    counters_key_activity(k, sizeof k, p, 11, 101, "signups");
    s_cmd(e->c, "SET %s 2", k);
    counters_key_activity(k, sizeof k, p, 11, 101, "checkins");
    s_cmd(e->c, "SET %s 1", k);
    counters_key_activity(k, sizeof k, p, 11, 101, "present");
    s_cmd(e->c, "SET %s 1", k);
    counters_key_scope(k, sizeof k, p, 0, "signups");
    s_cmd(e->c, "SET %s 10", k);
    counters_key_scope(k, sizeof k, p, 0, "checkins");
    s_cmd(e->c, "SET %s -2", k); /* counters are signed */
    counters_key_uniq(k, sizeof k, p, 11, S_DAY);
    s_cmd(e->c, "PFADD %s a b c", k);
    counters_key_uniq(k, sizeof k, p, 0, S_DAY);
    s_cmd(e->c, "PFADD %s a b c d", k);
    counters_key_uniq(k, sizeof k, p, 11, "20261122");
    s_cmd(e->c, "PFADD %s x y z w v", k);
    counters_key_scope(k, sizeof k, p, 11, "refusals");
    s_cmd(e->c, "HSET %s expired 2 duplicate 5 forged 2", k);
    counters_key_activities(k, sizeof k, p);
    s_cmd(e->c, "HSET %s 101 11", k);
    counters_key_route(k, sizeof k, p, 11, 7, "stamps");
    s_cmd(e->c, "SET %s 6", k);
    counters_key_position(k, sizeof k, p, "registry");
    s_cmd(e->c, "SET %s %s", k, "9:77");
}

/* Each scope reads its own counters: the community with its refusals by
 * reason (largest first, ties by name), the activity found through the
 * city's activity map with its community's unique count, the city; all
 * with the registry position. */
static void test_read_scopes(void **state)
{
    S_REQUIRE_REDIS();
    s_env_t *e = *state;
    s_fill(e);
    counters_view_t v;

    assert_int_equal(counters_read_day(e->c, e->p, 11, 0, S_DAY, &v), 0);
    assert_int_equal(v.community_id, 11);
    assert_int_equal(v.activity_id, 0);
    assert_string_equal(v.day, S_DAY);
    assert_int_equal(v.signups, 3);
    assert_int_equal(v.checkins, 4);
    assert_int_equal(v.present, 0);
    assert_int_equal(v.unique_today, 3);
    assert_int_equal(v.refusals, 9);
    assert_int_equal(v.nreasons, 3);
    assert_string_equal(v.reasons[0].reason, "duplicate");
    assert_int_equal(v.reasons[0].count, 5);
    assert_string_equal(v.reasons[1].reason, "expired");
    assert_string_equal(v.reasons[2].reason, "forged");
    assert_int_equal(v.have_position, 1);
    assert_int_equal(v.epoch, 9);
    assert_int_equal(v.sequence, 77);

    assert_int_equal(counters_read_day(e->c, e->p, 11, 0, "20261122", &v), 0);
    assert_int_equal(v.unique_today, 5);

    assert_int_equal(counters_read_day(e->c, e->p, 0, 101, S_DAY, &v), 0);
    assert_int_equal(v.community_id, 11);
    assert_int_equal(v.activity_id, 101);
    assert_int_equal(v.signups, 2);
    assert_int_equal(v.checkins, 1);
    assert_int_equal(v.present, 1);
    assert_int_equal(v.unique_today, 3);
    assert_int_equal(v.nreasons, 0);
    assert_int_equal(v.refusals, 0);

    assert_int_equal(counters_read_day(e->c, e->p, 0, 0, S_DAY, &v), 0);
    assert_int_equal(v.community_id, 0);
    assert_int_equal(v.signups, 10);
    assert_int_equal(v.checkins, -2);
    assert_int_equal(v.unique_today, 4);
    assert_int_equal(v.nreasons, 0);

    /* A community nothing happened in reads zeros. */
    assert_int_equal(counters_read_day(e->c, e->p, 12, 0, S_DAY, &v), 0);
    assert_int_equal(v.signups + v.checkins + v.unique_today + v.refusals, 0);

    int64_t stamps = -1, redeemed = -1;
    assert_int_equal(counters_read_route(e->c, e->p, 11, 7, &stamps, &redeemed), 0);
    assert_int_equal(stamps, 6);
    assert_int_equal(redeemed, 0);
}

/* Reads that cannot be answered fail instead of showing wrong numbers. */
static void test_read_errors(void **state)
{
    S_REQUIRE_REDIS();
    s_env_t *e = *state;
    s_fill(e);
    counters_view_t v;
    char k[COUNTERS_KEY_MAX];

    assert_int_equal(counters_read_day(e->c, e->p, 0, 555, S_DAY, &v), -1); /* unknown */
    assert_int_equal(counters_read_day(e->c, "bad*", 11, 0, S_DAY, &v), -1);
    assert_int_equal(counters_read_day(e->c, e->p, 11, 0, "2026112", &v), -1);
    assert_int_equal(counters_read_day(e->c, e->p, 11, 0, NULL, &v), -1);

    counters_key_activities(k, sizeof k, e->p);
    s_cmd(e->c, "HSET %s 102 0", k);
    assert_int_equal(counters_read_day(e->c, e->p, 0, 102, S_DAY, &v), -1);

    counters_key_scope(k, sizeof k, e->p, 13, "signups");
    s_cmd(e->c, "SET %s 12abc", k);
    assert_int_equal(counters_read_day(e->c, e->p, 13, 0, S_DAY, &v), -1);
    s_cmd(e->c, "SET %s 99999999999999999999", k);
    assert_int_equal(counters_read_day(e->c, e->p, 13, 0, S_DAY, &v), -1);
    s_cmd(e->c, "DEL %s", k);
    s_cmd(e->c, "SADD %s x", k); /* wrong type: MGET reads it as nil */
    assert_int_equal(counters_read_day(e->c, e->p, 13, 0, S_DAY, &v), 0);
    assert_int_equal(v.signups, 0);

    counters_key_uniq(k, sizeof k, e->p, 13, S_DAY);
    s_cmd(e->c, "SET %s notahll", k);
    assert_int_equal(counters_read_day(e->c, e->p, 13, 0, S_DAY, &v), -1);

    /* A malformed position does not fail the read; it is just not shown. */
    counters_key_position(k, sizeof k, e->p, "registry");
    s_cmd(e->c, "SET %s garbage", k);
    assert_int_equal(counters_read_day(e->c, e->p, 11, 0, S_DAY, &v), 0);
    assert_int_equal(v.have_position, 0);
    assert_int_equal(v.signups, 3);

    counters_key_route(k, sizeof k, e->p, 11, 8, "stamps");
    s_cmd(e->c, "SET %s x", k);
    int64_t stamps, redeemed;
    assert_int_equal(counters_read_route(e->c, e->p, 11, 8, &stamps, &redeemed), -1);
}

/* Only COUNTERS_MAX_REASONS reasons are kept (the largest), each cut to
 * COUNTERS_REASON_MAX bytes, while the total counts every reason. */
static void test_read_many_reasons(void **state)
{
    S_REQUIRE_REDIS();
    s_env_t *e = *state;
    char k[COUNTERS_KEY_MAX];
    counters_key_scope(k, sizeof k, e->p, 11, "refusals");
    int64_t total = 0;
    for (int i = 1; i <= COUNTERS_MAX_REASONS + 4; i++) {
        char reason[32];
        snprintf(reason, sizeof reason, "r%02d", i);
        s_cmd(e->c, "HSET %s %s %d", k, reason, i);
        total += i;
    }
    char longr[COUNTERS_REASON_MAX + 20];
    memset(longr, 'L', sizeof longr - 1);
    longr[sizeof longr - 1] = '\0';
    s_cmd(e->c, "HSET %s %s 1000", k, longr);
    total += 1000;

    counters_view_t v;
    assert_int_equal(counters_read_day(e->c, e->p, 11, 0, S_DAY, &v), 0);
    assert_int_equal(v.refusals, total);
    assert_int_equal(v.nreasons, COUNTERS_MAX_REASONS);
    assert_int_equal(strlen(v.reasons[0].reason), COUNTERS_REASON_MAX);
    assert_int_equal(v.reasons[0].count, 1000);
    assert_string_equal(v.reasons[1].reason, "r20");
    assert_string_equal(v.reasons[COUNTERS_MAX_REASONS - 1].reason, "r06");
    for (size_t i = 1; i < v.nreasons; i++)
        assert_true(v.reasons[i - 1].count >= v.reasons[i].count);
}

/* counters_read counts unique people for today in the configured zone. */
static void test_read_today(void **state)
{
    S_REQUIRE_REDIS();
    s_env_t *e = *state;
    char day[9], k[COUNTERS_KEY_MAX];
    setenv("LINLI_TZ_OFFSET_MIN", "-300", 1);
    counters_day(now_ms(), -300, day);
    counters_key_uniq(k, sizeof k, e->p, 0, day);
    s_cmd(e->c, "PFADD %s a b", k);
    counters_view_t v;
    assert_int_equal(counters_read(e->c, e->p, 0, 0, &v), 0);
    if (strcmp(v.day, day) == 0) /* unless the day turned in between */
        assert_int_equal(v.unique_today, 2);
    setenv("LINLI_TZ_OFFSET_MIN", "9999", 1);
    assert_int_equal(counters_read(e->c, e->p, 0, 0, &v), -1);
    unsetenv("LINLI_TZ_OFFSET_MIN");
}

/* The JSON and the table show each scope's fields and only those. */
static void test_render(void **state)
{
    (void)state;
    counters_view_t v;
    memset(&v, 0, sizeof v);
    v.community_id = 11;
    memcpy(v.day, S_DAY, 9);
    v.signups = 3;
    v.checkins = 4;
    v.unique_today = 2;
    v.refusals = 7;
    v.nreasons = 2;
    snprintf(v.reasons[0].reason, sizeof v.reasons[0].reason, "duplicate");
    v.reasons[0].count = 5;
    snprintf(v.reasons[1].reason, sizeof v.reasons[1].reason, "expired");
    v.reasons[1].count = 2;
    v.have_position = 1;
    v.epoch = UINT64_C(1795399200000);
    v.sequence = 17;

    json_t *j = counters_to_json(&v);
    char *s = json_dumps(j, JSON_SORT_KEYS | JSON_COMPACT);
    assert_string_equal(s, "{\"activity_id\":0,\"checkins\":4,\"community_id\":11,"
                           "\"day\":\"20261123\",\"position\":{\"epoch\":1795399200000,"
                           "\"sequence\":17,\"stream\":\"registry\"},\"refusals\":7,"
                           "\"refusals_by_reason\":{\"duplicate\":5,\"expired\":2},"
                           "\"signups\":3,\"unique_today\":2}");
    free(s);
    json_decref(j);

    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    assert_non_null(f);
    counters_print(f, &v);
    fclose(f);
    assert_non_null(strstr(text, "scope          community 11\n"));
    assert_non_null(strstr(text, "refusals       7\n"));
    assert_non_null(strstr(text, "  duplicate    5\n"));
    assert_non_null(strstr(text, "applied        registry 1795399200000:17\n"));
    assert_null(strstr(text, "present"));
    free(text);

    v.activity_id = 101;
    v.present = 1;
    v.have_position = 0;
    j = counters_to_json(&v);
    assert_int_equal(json_integer_value(json_object_get(j, "present")), 1);
    assert_null(json_object_get(j, "refusals"));
    assert_null(json_object_get(j, "refusals_by_reason"));
    assert_null(json_object_get(j, "position"));
    json_decref(j);
    f = open_memstream(&text, &len);
    counters_print(f, &v);
    fclose(f);
    assert_non_null(strstr(text, "scope          activity 101 (community 11)\n"));
    assert_non_null(strstr(text, "present        1\n"));
    assert_non_null(strstr(text, "(20261123, whole community)"));
    assert_null(strstr(text, "refusals"));
    assert_null(strstr(text, "applied"));
    free(text);

    memset(&v, 0, sizeof v);
    memcpy(v.day, S_DAY, 9);
    j = counters_to_json(&v);
    assert_null(json_object_get(j, "present"));
    assert_null(json_object_get(j, "refusals"));
    json_decref(j);
    f = open_memstream(&text, &len);
    counters_print(f, &v);
    fclose(f);
    assert_non_null(strstr(text, "scope          city\n"));
    free(text);
}

int main(void)
{
    log_init("test_counters", LOG_LEVEL_ERROR);
    s_addr = getenv("LINLI_TEST_REDIS");
    if (s_addr && !*s_addr)
        s_addr = NULL;
    if (!s_addr)
        printf("# LINLI_TEST_REDIS is not set: skipping the tests that need Redis\n");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prefix_valid),
        cmocka_unit_test(test_config),
        cmocka_unit_test(test_day),
        cmocka_unit_test(test_keys),
        cmocka_unit_test(test_connect_bad_address),
        cmocka_unit_test(test_render),
        cmocka_unit_test_setup_teardown(test_connect, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_position_read, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_reset, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_reset_mark_is_pending, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_read_scopes, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_read_errors, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_read_many_reasons, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_read_today, s_setup, s_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
