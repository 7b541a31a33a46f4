/* Unit tests for common/log.c: level names, the line format, filtering by
 * level (below it the arguments are not even evaluated), one line per record
 * whatever the message holds, the length cap, and log_mask on ASCII phone
 * numbers and on UTF-8 names (characters, not bytes). stderr is captured into
 * an anonymous temporary file around each call. */
#include "log.h"

#include <regex.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "capture.h"

static size_t s_count_lines(const char *text)
{
    size_t n = 0;
    for (; *text; text++)
        n += *text == '\n';
    return n;
}

static int s_teardown(void **state)
{
    (void)state;
    free(s_capture_end());
    log_init("linli", LOG_LEVEL_INFO);
    return 0;
}

/* ---- levels ---- */

static void test_level_parse(void **state)
{
    (void)state;
    assert_int_equal(log_level_parse("debug"), LOG_LEVEL_DEBUG);
    assert_int_equal(log_level_parse("info"), LOG_LEVEL_INFO);
    assert_int_equal(log_level_parse("warn"), LOG_LEVEL_WARN);
    assert_int_equal(log_level_parse("error"), LOG_LEVEL_ERROR);
    const char *bad[] = {"DEBUG", "Info", "warning", "err", "", " info", "info ", "fatal"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        if (log_level_parse(bad[i]) != -1)
            fail_msg("\"%s\" parsed", bad[i]);
    assert_int_equal(log_level_parse(NULL), -1);
}

static void test_line_format(void **state)
{
    (void)state;
    log_init("testsvc", LOG_LEVEL_DEBUG);
    s_capture_begin();
    log_write(LOG_LEVEL_INFO, "cmd", "signed up activity=%d people=%s", 42, "3");
    char *out = s_capture_end();
    regex_t re;
    assert_int_equal(regcomp(&re,
                             "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\\.[0-9]{3}Z "
                             "info testsvc cmd: signed up activity=42 people=3\n$",
                             REG_EXTENDED | REG_NOSUB),
                     0);
    if (regexec(&re, out, 0, NULL, 0) != 0)
        fail_msg("line: \"%s\"", out);
    regfree(&re);
    free(out);

    /* Each level prints its own name; out-of-range levels are clamped. */
    static const struct {
        int level;
        const char *name;
    } names[] = {{LOG_LEVEL_DEBUG, " debug testsvc m: x\n"}, {LOG_LEVEL_INFO, " info testsvc m: x\n"},
                 {LOG_LEVEL_WARN, " warn testsvc m: x\n"},   {LOG_LEVEL_ERROR, " error testsvc m: x\n"},
                 {-3, " debug testsvc m: x\n"},              {17, " error testsvc m: x\n"}};
    for (size_t i = 0; i < sizeof names / sizeof *names; i++) {
        s_capture_begin();
        log_write(names[i].level, "m", "x");
        out = s_capture_end();
        if (!strstr(out, names[i].name) || s_count_lines(out) != 1)
            fail_msg("level %d: \"%s\"", names[i].level, out);
        free(out);
    }
}

static int s_evaluated;

static int s_touch(void)
{
    return ++s_evaluated;
}

static void test_level_filter(void **state)
{
    (void)state;
    static const struct {
        int level;
        size_t lines;      /* of the four macros below, how many print */
        const char *first; /* the first level that prints */
    } cases[] = {
        {LOG_LEVEL_DEBUG, 4, " debug "},
        {LOG_LEVEL_INFO, 3, " info "},
        {LOG_LEVEL_WARN, 2, " warn "},
        {LOG_LEVEL_ERROR, 1, " error "},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        log_init("svc", cases[i].level);
        s_evaluated = 0;
        s_capture_begin();
        log_debug("m", "debug %d", s_touch());
        log_info("m", "info %d", s_touch());
        log_warn("m", "warn %d", s_touch());
        log_error("m", "error %d", s_touch());
        char *out = s_capture_end();
        assert_int_equal(s_count_lines(out), cases[i].lines);
        /* Below the level the arguments are not evaluated at all. */
        assert_int_equal(s_evaluated, (int)cases[i].lines);
        const char *nl = strchr(out, '\n');
        assert_non_null(nl);
        char first[256];
        snprintf(first, sizeof first, "%.*s", (int)(nl - out), out);
        if (!strstr(first, cases[i].first))
            fail_msg("level %d first line: \"%s\"", cases[i].level, first);
        free(out);
    }
}

static void test_init_keeps_level_on_bad_input(void **state)
{
    (void)state;
    log_init("svc", LOG_LEVEL_WARN);
    log_init("svc", -1);               /* e.g. log_level_parse failed */
    assert_int_equal(log_level_, LOG_LEVEL_WARN);
    log_init("svc", LOG_LEVEL_ERROR + 1);
    assert_int_equal(log_level_, LOG_LEVEL_WARN);
    log_init("svc", LOG_LEVEL_DEBUG);
    assert_int_equal(log_level_, LOG_LEVEL_DEBUG);
}

static void test_service_name(void **state)
{
    (void)state;
    log_init(NULL, LOG_LEVEL_INFO);
    s_capture_begin();
    log_error("mod", "hello");
    char *out = s_capture_end();
    assert_non_null(strstr(out, " error linli mod: hello\n"));
    free(out);

    /* Longer names are cut to 31 bytes. */
    log_init("a-service-name-much-longer-than-thirty-one-bytes", LOG_LEVEL_INFO);
    s_capture_begin();
    log_error("mod", "hello");
    out = s_capture_end();
    assert_non_null(strstr(out, " error a-service-name-much-longer-than mod: hello\n"));
    free(out);
}

/* ---- one line per record ---- */

static void test_newlines_become_spaces(void **state)
{
    (void)state;
    log_init("svc", LOG_LEVEL_INFO);
    s_capture_begin();
    log_warn("m", "first\nsecond\r\nthird%s", "\nfourth");
    char *out = s_capture_end();
    assert_int_equal(s_count_lines(out), 1);
    assert_null(strchr(out, '\r'));
    assert_non_null(strstr(out, " warn svc m: first second  third fourth\n"));
    free(out);
}

static void test_long_record_is_cut(void **state)
{
    (void)state;
    log_init("svc", LOG_LEVEL_INFO);
    char *big = malloc(5000);
    assert_non_null(big);
    memset(big, 'x', 4999);
    big[4999] = '\0';
    s_capture_begin();
    log_info("m", "big=%s tail", big);
    char *out = s_capture_end();
    /* One line of at most 2047 bytes, newline included. */
    assert_int_equal(strlen(out), 2047);
    assert_int_equal(s_count_lines(out), 1);
    assert_int_equal(out[2046], '\n');
    assert_int_equal(out[2045], 'x');
    free(out);

    /* Lengths around the cap all end in exactly one newline. */
    s_capture_begin();
    log_info("m", "%s", "");
    char *line = s_capture_end();
    size_t prefix = strlen(line) - 1;  /* header bytes before the message */
    free(line);
    for (size_t want = 2040; want <= 2050; want++) {
        size_t msg = want > prefix ? want - prefix : 0;
        big[msg] = '\0';
        s_capture_begin();
        log_info("m", "%s", big);
        out = s_capture_end();
        size_t n = strlen(out);
        assert_true(n <= 2047);
        assert_int_equal(s_count_lines(out), 1);
        assert_int_equal(out[n - 1], '\n');
        assert_true(n == (want + 1 < 2047 ? want + 1 : 2047));
        free(out);
        big[msg] = 'x';
    }
    free(big);
}

/* ---- log_mask ---- */

static void s_mask_is(const char *in, const char *want)
{
    char buf[128];
    memset(buf, '#', sizeof buf);
    const char *got = log_mask(in, buf, sizeof buf);
    assert_ptr_equal(got, buf);
    if (strcmp(got, want) != 0)
        fail_msg("mask(\"%s\") = \"%s\", want \"%s\"", in ? in : "(null)", got, want);
}

static void test_mask_ascii(void **state)
{
    (void)state;
    s_mask_is("13812345621", "138******21");
    s_mask_is("+86 138 1234 5621", "+86************21");
    s_mask_is("abcdefg", "abc**fg");   /* 7: the shortest that shows anything */
    s_mask_is("abcdef", "***");        /* 6 and fewer: nothing shown */
    s_mask_is("a", "***");
    s_mask_is("", "***");
    s_mask_is(NULL, "***");

    /* The middle never shows. */
    char buf[64];
    const char *m = log_mask("13899998821", buf, sizeof buf);
    assert_null(strstr(m, "9999"));
    assert_int_equal(strlen(m), 11);
}

static void test_mask_utf8(void **state)
{
    (void)state;
    /* Chinese names: three bytes a character. A name of up to six
     * characters is hidden entirely; longer ones keep 3 + 2 characters. */
    s_mask_is("王小明", "***");
    s_mask_is("欧阳娜娜", "***");
    s_mask_is("一二三四五六", "***");
    s_mask_is("一二三四五六七", "一二三**六七");
    s_mask_is("一二三四五六七八九", "一二三****八九");
    /* Mixed widths. */
    s_mask_is("Zoë Müller-Lüdenscheidt", "Zoë******************dt");
    s_mask_is("李 Lee Xiaoming", "李 L*********ng");

    /* The result is whole characters: no cut UTF-8 sequence. */
    char buf[64];
    const char *m = log_mask("张三丰李四王五赵六", buf, sizeof buf);
    for (const unsigned char *p = (const unsigned char *)m; *p;) {
        int n = *p < 0x80 ? 1 : (*p & 0xe0) == 0xc0 ? 2 : (*p & 0xf0) == 0xe0 ? 3 : 4;
        for (int k = 1; k < n; k++)
            assert_int_equal(p[k] & 0xc0, 0x80);
        p += n;
    }
    assert_string_equal(m, "张三丰****赵六");
}

static void test_mask_buffer(void **state)
{
    (void)state;
    char buf[16];
    /* Exactly enough room: masked. */
    assert_string_equal(log_mask("13812345621", buf, 12), "138******21");
    /* One byte short: fully hidden rather than cut. */
    assert_string_equal(log_mask("13812345621", buf, 11), "***");
    /* Tiny buffers still get a terminated string. */
    memset(buf, '#', sizeof buf);
    assert_string_equal(log_mask("13812345621", buf, 2), "*");
    assert_int_equal(buf[2], '#');  /* nothing written past len */
    assert_string_equal(log_mask("13812345621", buf, 1), "");
    /* No buffer at all: an empty string, never NULL. */
    const char *m = log_mask("13812345621", NULL, 10);
    assert_non_null(m);
    assert_string_equal(m, "");
    memset(buf, '#', sizeof buf);
    m = log_mask("13812345621", buf, 0);
    assert_string_equal(m, "");
    assert_int_equal(buf[0], '#');

    /* An exact-size heap buffer: ASan sees any write past the end. */
    char *exact = malloc(12);
    assert_non_null(exact);
    assert_string_equal(log_mask("13812345621", exact, 12), "138******21");
    free(exact);
    exact = malloc(sizeof "一二三**六七");
    assert_non_null(exact);
    assert_string_equal(log_mask("一二三四五六七", exact, sizeof "一二三**六七"), "一二三**六七");
    assert_string_equal(log_mask("一二三四五六七", exact, sizeof "一二三**六七" - 1), "***");
    free(exact);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_level_parse, s_teardown),
        cmocka_unit_test_teardown(test_line_format, s_teardown),
        cmocka_unit_test_teardown(test_level_filter, s_teardown),
        cmocka_unit_test_teardown(test_init_keeps_level_on_bad_input, s_teardown),
        cmocka_unit_test_teardown(test_service_name, s_teardown),
        cmocka_unit_test_teardown(test_newlines_become_spaces, s_teardown),
        cmocka_unit_test_teardown(test_long_record_is_cut, s_teardown),
        cmocka_unit_test_teardown(test_mask_ascii, s_teardown),
        cmocka_unit_test_teardown(test_mask_utf8, s_teardown),
        cmocka_unit_test_teardown(test_mask_buffer, s_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
