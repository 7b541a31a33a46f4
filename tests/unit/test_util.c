/* Unit tests for common/util.c: UUIDs (form, version, uniqueness across the
 * per-thread pool's refills and across threads), UUID validation, string
 * helpers and clocks. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <pthread.h>
#include <sys/wait.h>
#include <unistd.h>

#include "util.h"

#define S_MANY 5000 /* ids per thread: many refills of the 256-id pool */

static int s_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void s_fill(char **ids, int n)
{
    for (int i = 0; i < n; i++) {
        ids[i] = xmalloc(37);
        uuid_new(ids[i]);
    }
}

static void *s_thread(void *arg)
{
    s_fill(arg, S_MANY);
    return NULL;
}

static void test_uuid_form(void **state)
{
    (void)state;
    for (int i = 0; i < 1000; i++) {
        char id[37];
        uuid_new(id);
        assert_int_equal(strlen(id), 36);
        assert_true(uuid_valid(id));
        for (int k = 0; k < 36; k++) {
            if (k == 8 || k == 13 || k == 18 || k == 23)
                assert_int_equal(id[k], '-');
            else
                assert_non_null(strchr("0123456789abcdef", id[k]));
        }
        assert_int_equal(id[14], '4');                /* version 4 */
        assert_non_null(strchr("89ab", id[19]));      /* RFC 4122 variant */
    }
}

/* Two threads draw from their own pools at once; no id repeats anywhere. */
static void test_uuid_unique(void **state)
{
    (void)state;
    char **ids = xcalloc(3 * S_MANY, sizeof *ids);
    pthread_t t1, t2;
    assert_int_equal(pthread_create(&t1, NULL, s_thread, ids + S_MANY), 0);
    assert_int_equal(pthread_create(&t2, NULL, s_thread, ids + 2 * S_MANY), 0);
    s_fill(ids, S_MANY);
    pthread_join(t1, NULL);
    pthread_join(t2, NULL);
    qsort(ids, 3 * S_MANY, sizeof *ids, s_cmp);
    for (int i = 1; i < 3 * S_MANY; i++)
        assert_string_not_equal(ids[i - 1], ids[i]);
    for (int i = 0; i < 3 * S_MANY; i++)
        free(ids[i]);
    free(ids);
}

/* A forked child draws fresh ids, not the rest of its parent's pool. */
static void test_uuid_fork(void **state)
{
    (void)state;
    char warm[37], parent[37], child[37];
    uuid_new(warm); /* the pool is filled and partly used */
    int fds[2];
    assert_int_equal(pipe(fds), 0);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        uuid_new(child);
        _exit(write(fds[1], child, 37) == 37 ? 0 : 1);
    }
    uuid_new(parent);
    assert_int_equal(read(fds[0], child, 37), 37);
    int st;
    assert_int_equal(waitpid(pid, &st, 0), pid);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    close(fds[0]);
    close(fds[1]);
    assert_true(uuid_valid(child));
    assert_string_not_equal(parent, child);
}

static void test_uuid_valid(void **state)
{
    (void)state;
    assert_true(uuid_valid("123e4567-e89b-12d3-a456-426614174000"));
    assert_true(uuid_valid("123E4567-E89B-12D3-A456-426614174000"));
    assert_false(uuid_valid(NULL));
    assert_false(uuid_valid(""));
    assert_false(uuid_valid("123e4567e89b12d3a456426614174000"));
    assert_false(uuid_valid("123e4567-e89b-12d3-a456-42661417400"));
    assert_false(uuid_valid("123e4567-e89b-12d3-a456-4266141740000"));
    assert_false(uuid_valid("123e4567-e89b-12d3-a456-42661417400g"));
    assert_false(uuid_valid("123e4567-e89b-12d3-a456+426614174000"));
}

static void test_strings_and_clocks(void **state)
{
    (void)state;
    char *s = xasprintf("%s-%d", "gate", 7);
    assert_string_equal(s, "gate-7");
    free(s);
    assert_null(xstrdup(NULL));
    s = xstrndup("江翠社区", 6);
    assert_string_equal(s, "江翠");
    free(s);
    int64_t a = mono_us(), b = mono_us();
    assert_true(b >= a);
    assert_true(now_ms() > 1700000000000LL);
}

/* FNV-1a 64, the published vectors, and continuing equals hashing at once. */
static void test_fnv1a(void **state)
{
    (void)state;
    assert_true(util_fnv1a(UTIL_FNV_SEED, "", 0) == 0xcbf29ce484222325ull);
    assert_true(util_fnv1a(UTIL_FNV_SEED, "a", 1) == 0xaf63dc4c8601ec8cull);
    assert_true(util_fnv1a(UTIL_FNV_SEED, "foobar", 6) == 0x85944171f73967e8ull);
    assert_true(util_fnv1a(util_fnv1a(UTIL_FNV_SEED, "foo", 3), "bar", 3) ==
                util_fnv1a(UTIL_FNV_SEED, "foobar", 6));
}

/* The growing string: appends of any size, printf past its small buffer,
 * bytes with NULs in the middle counted by length. */
/* Fixed-buffer text: digits as printf writes them, and a cut-short result
 * that says so and stays NUL-ended. */
static void test_str_put(void **state)
{
    (void)state;
    const int64_t vals[] = { 0, 7, -7, 10, 1234567890123, INT64_MAX, INT64_MIN, -1 };
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
        char got[32], want[32];
        size_t len = 0;
        assert_int_equal(str_put_i64(got, sizeof got, &len, vals[i]), 0);
        snprintf(want, sizeof want, "%" PRId64, vals[i]);
        assert_string_equal(got, want);
        assert_int_equal(len, strlen(want));
    }
    char u[24];
    size_t ulen = 0;
    assert_int_equal(str_put_u64(u, sizeof u, &ulen, UINT64_MAX), 0);
    assert_string_equal(u, "18446744073709551615");
    char b[8];
    size_t len = 0;
    assert_int_equal(str_put(b, sizeof b, &len, "ab:"), 0);
    assert_int_equal(str_put_i64(b, sizeof b, &len, 1234), 0);
    assert_string_equal(b, "ab:1234");
    assert_int_equal(str_put(b, sizeof b, &len, "x"), -1);
    assert_string_equal(b, "ab:1234");
    len = 5;
    assert_int_equal(str_put_i64(b, sizeof b, &len, 123), -1);
    assert_string_equal(b, "ab:1212");
    str_copy(b, sizeof b, "abcdefghij");
    assert_string_equal(b, "abcdefg");
    str_copy(b, sizeof b, "");
    assert_string_equal(b, "");
}

static void test_buf(void **state)
{
    (void)state;
    lx_buf_t b = { 0 };
    buf_str(&b, "江翠");
    buf_add(&b, "a\0b", 3);
    assert_int_equal(b.len, strlen("江翠") + 3);
    assert_memory_equal(b.p + strlen("江翠"), "a\0b", 3);
    assert_int_equal(b.p[b.len], '\0');
    char big[3000];
    memset(big, 'x', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    size_t before = b.len;
    buf_printf(&b, "%s-%d", big, 42);
    assert_int_equal(b.len, before + strlen(big) + 3);
    assert_string_equal(b.p + b.len - 3, "-42");
    for (int i = 0; i < 1000; i++)
        buf_printf(&b, "%d,", i);
    assert_int_equal(b.p[b.len], '\0');
    assert_string_equal(b.p + b.len - 8, "998,999,");
    free(b.p);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fnv1a),
        cmocka_unit_test(test_uuid_form),
        cmocka_unit_test(test_uuid_unique),
        cmocka_unit_test(test_uuid_fork),
        cmocka_unit_test(test_uuid_valid),
        cmocka_unit_test(test_strings_and_clocks),
        cmocka_unit_test(test_buf),
        cmocka_unit_test(test_str_put),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
