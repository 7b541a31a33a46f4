/* Unit tests for common/config.c: the environment beating the LINLI_CONFIG
 * file, the file's syntax (comments, blank lines, spaces, CRLF, '=' inside
 * values, malformed lines with their line number in the log), config_int's
 * ranges and refusals, secrets from KEY_FILE or KEY, and config_reset. Files
 * live in a mkdtemp directory removed at the end; every variable a test sets
 * is unset after it, and stderr is captured where a log line is expected. */
#include "config.h"

#include <dirent.h>
#include <fcntl.h>
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

static char s_dir[] = "/tmp/linli-test-config-XXXXXX";

/* Every variable a test may set; unset before and after each test. */
static const char *const s_vars[] = {
    "LINLI_CONFIG",    "LINLI_T_A",        "LINLI_T_B",        "LINLI_T_C",
    "LINLI_T_D",       "LINLI_T_N",        "LINLI_T_SECRET",   "LINLI_T_SECRET_FILE",
    "LINLI_T_EMPTY",   "LINLI_T_EQ",       "LINLI_T_HASH",     "LINLI_T_DUP",
    "LINLI_T_SPACED",  "LINLI_T_CRLF",     "LINLI_T_LAST",
};

/* ---- files ---- */

/* Writes text to <dir>/name and returns the path (static buffer). */
static const char *s_write(const char *name, const char *text, size_t len)
{
    static char path[256];
    snprintf(path, sizeof path, "%s/%s", s_dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fwrite(text, 1, len, f), len);
    assert_int_equal(fclose(f), 0);
    return path;
}

static void s_use_config(const char *text)
{
    const char *path = s_write("linli.conf", text, strlen(text));
    assert_int_equal(setenv("LINLI_CONFIG", path, 1), 0);
}

/* Loads text as the config file; returns config_load's result and the log
 * it wrote in *log (caller frees) when log is not NULL. */
static int s_load(const char *text, char **log)
{
    s_use_config(text);
    s_capture_begin();
    int rc = config_load();
    char *out = s_capture_end();
    if (log)
        *log = out;
    else
        free(out);
    return rc;
}

static void s_clean(void)
{
    free(s_capture_end());
    for (size_t i = 0; i < sizeof s_vars / sizeof *s_vars; i++)
        unsetenv(s_vars[i]);
    config_reset();
}

static int s_setup(void **state)
{
    (void)state;
    s_clean();
    return 0;
}

static int s_teardown(void **state)
{
    (void)state;
    s_clean();
    return 0;
}

static int s_group_setup(void **state)
{
    (void)state;
    return mkdtemp(s_dir) ? 0 : -1;
}

static int s_group_teardown(void **state)
{
    (void)state;
    DIR *d = opendir(s_dir);
    if (!d)
        return -1;
    struct dirent *ent;
    char path[512];
    while ((ent = readdir(d))) {
        if (strcmp(ent->d_name, ".") == 0 || strcmp(ent->d_name, "..") == 0)
            continue;
        snprintf(path, sizeof path, "%s/%s", s_dir, ent->d_name);
        unlink(path);
    }
    closedir(d);
    return rmdir(s_dir);
}

/* ---- config_get and config_load ---- */

static void test_defaults_and_env(void **state)
{
    (void)state;
    /* No LINLI_CONFIG: loading is a no-op. */
    assert_int_equal(config_load(), 0);
    assert_string_equal(config_get("LINLI_T_A", "dflt"), "dflt");
    assert_null(config_get("LINLI_T_A", NULL));
    /* An empty LINLI_CONFIG names no file. */
    setenv("LINLI_CONFIG", "", 1);
    assert_int_equal(config_load(), 0);

    /* The getters see the environment without any load. */
    setenv("LINLI_T_A", "from-env", 1);
    assert_string_equal(config_get("LINLI_T_A", "dflt"), "from-env");
    /* An empty variable counts as unset. */
    setenv("LINLI_T_EMPTY", "", 1);
    assert_string_equal(config_get("LINLI_T_EMPTY", "dflt"), "dflt");
    /* Values are not trimmed or otherwise touched. */
    setenv("LINLI_T_B", "  a b  ", 1);
    assert_string_equal(config_get("LINLI_T_B", NULL), "  a b  ");
}

static void test_file_syntax(void **state)
{
    (void)state;
    const char *text =
        "# Linli test configuration\n"
        "\n"
        "   \t \n"
        "LINLI_T_A=alpha\n"
        "  # an indented comment\n"
        "  LINLI_T_SPACED \t=  \t spaced value \t \n"
        "LINLI_T_EQ=dbname=linli host=db.example sslmode=require\n"
        "LINLI_T_HASH=abc#def\n"
        "LINLI_T_CRLF=windows\r\n"
        "LINLI_T_EMPTY=\n"
        "LINLI_T_DUP=first\n"
        "LINLI_T_DUP=second\n"
        "#LINLI_T_B=commented out\n"
        "LINLI_T_LAST=no newline at the end";
    char *log = NULL;
    assert_int_equal(s_load(text, &log), 0);
    assert_string_equal(log, "");  /* nothing to complain about */
    free(log);
    assert_string_equal(config_get("LINLI_T_A", NULL), "alpha");
    assert_string_equal(config_get("LINLI_T_SPACED", NULL), "spaced value");
    assert_string_equal(config_get("LINLI_T_EQ", NULL), "dbname=linli host=db.example sslmode=require");
    assert_string_equal(config_get("LINLI_T_HASH", NULL), "abc#def");  /* no inline comments */
    assert_string_equal(config_get("LINLI_T_CRLF", NULL), "windows");
    assert_string_equal(config_get("LINLI_T_EMPTY", "dflt"), "dflt");  /* empty = unset */
    assert_string_equal(config_get("LINLI_T_DUP", NULL), "second");    /* the last line wins */
    assert_null(config_get("LINLI_T_B", NULL));
    assert_null(config_get("#LINLI_T_B", NULL));
    assert_string_equal(config_get("LINLI_T_LAST", NULL), "no newline at the end");
    assert_null(config_get("LINLI_T_C", NULL));

    /* A line longer than any buffer is one line, read whole. */
    config_reset();
    size_t big = 10000;
    char *long_text = malloc(big + 64);
    assert_non_null(long_text);
    int n = snprintf(long_text, 64, "LINLI_T_A=");
    memset(long_text + n, 'x', big);
    snprintf(long_text + n + big, 64, "y\nLINLI_T_B=after\n");
    assert_int_equal(s_load(long_text, NULL), 0);
    free(long_text);
    const char *a = config_get("LINLI_T_A", NULL);
    assert_non_null(a);
    assert_int_equal(strlen(a), big + 1);
    assert_int_equal(a[big], 'y');
    assert_string_equal(config_get("LINLI_T_B", NULL), "after");

    /* An empty file and a file of only comments are fine. */
    config_reset();
    assert_int_equal(s_load("", NULL), 0);
    assert_int_equal(s_load("# nothing\n\n#\n", NULL), 0);
    assert_null(config_get("LINLI_T_A", NULL));
}

static void test_env_beats_file(void **state)
{
    (void)state;
    assert_int_equal(s_load("LINLI_T_A=file-a\nLINLI_T_B=file-b\nLINLI_T_C=\n", NULL), 0);
    setenv("LINLI_T_A", "env-a", 1);
    assert_string_equal(config_get("LINLI_T_A", "dflt"), "env-a");
    assert_string_equal(config_get("LINLI_T_B", "dflt"), "file-b");
    /* An empty variable counts as unset, so the file's value shows. */
    setenv("LINLI_T_B", "", 1);
    assert_string_equal(config_get("LINLI_T_B", "dflt"), "file-b");
    /* Empty in the file and unset in the environment: the default. */
    assert_string_equal(config_get("LINLI_T_C", "dflt"), "dflt");
    /* The environment is read at each call, not when the file loads. */
    unsetenv("LINLI_T_A");
    assert_string_equal(config_get("LINLI_T_A", "dflt"), "file-a");
    setenv("LINLI_T_A", "later", 1);
    assert_string_equal(config_get("LINLI_T_A", "dflt"), "later");
}

static void test_malformed_line(void **state)
{
    (void)state;
    static const struct {
        const char *text;
        const char *line;  /* the line= the log must name */
    } cases[] = {
        {"LINLI_T_A=1\n# fine\nNO_EQUALS_SIGN\nLINLI_T_B=2\n", "line=3"},
        {"=value without a key\n", "line=1"},
        {"LINLI_T_A=1\n\n   =2\n", "line=3"},
        {"LINLI_T_A 1\n", "line=1"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        config_reset();
        char *log = NULL;
        assert_int_equal(s_load(cases[i].text, &log), -1);
        if (!strstr(log, "malformed line") || !strstr(log, cases[i].line) ||
            !strstr(log, "linli.conf"))
            fail_msg("case %zu logged: %s", i, log);
        assert_non_null(strstr(log, " error "));
        free(log);
    }
    /* Loading stops at the bad line: what follows it is not read. */
    config_reset();
    assert_int_equal(s_load(cases[0].text, NULL), -1);
    assert_null(config_get("LINLI_T_B", NULL));
}

static void test_missing_file(void **state)
{
    (void)state;
    char path[300];
    snprintf(path, sizeof path, "%s/does-not-exist.conf", s_dir);
    setenv("LINLI_CONFIG", path, 1);
    s_capture_begin();
    assert_int_equal(config_load(), -1);
    char *log = s_capture_end();
    assert_non_null(strstr(log, "cannot open config file"));
    assert_non_null(strstr(log, "does-not-exist.conf"));
    assert_non_null(strstr(log, "No such file or directory"));
    free(log);
    /* A directory opens but cannot be read: an error, not an empty file
     * (a volume mounted where a file was meant must not mean defaults). */
    setenv("LINLI_CONFIG", s_dir, 1);
    s_capture_begin();
    int rc = config_load();
    log = s_capture_end();
    assert_int_equal(rc, -1);
    assert_non_null(strstr(log, "cannot read config file"));
    assert_non_null(strstr(log, "Is a directory"));
    free(log);
    /* The environment still works after a failed load. */
    setenv("LINLI_T_A", "env", 1);
    assert_string_equal(config_get("LINLI_T_A", NULL), "env");
}

static void test_reset(void **state)
{
    (void)state;
    assert_int_equal(s_load("LINLI_T_A=one\nLINLI_T_B=bee\n", NULL), 0);
    assert_string_equal(config_get("LINLI_T_A", "dflt"), "one");
    config_reset();
    assert_string_equal(config_get("LINLI_T_A", "dflt"), "dflt");
    assert_string_equal(config_get("LINLI_T_B", "dflt"), "dflt");
    config_reset();  /* twice is harmless */

    /* Reset then load another file: only the new values. */
    assert_int_equal(s_load("LINLI_T_A=two\n", NULL), 0);
    assert_string_equal(config_get("LINLI_T_A", "dflt"), "two");
    assert_string_equal(config_get("LINLI_T_B", "dflt"), "dflt");

    /* The environment is untouched by reset. */
    setenv("LINLI_T_C", "env", 1);
    config_reset();
    assert_string_equal(config_get("LINLI_T_C", NULL), "env");
}

/* ---- config_int ---- */

static void test_int_values(void **state)
{
    (void)state;
    int64_t v = -99;
    assert_int_equal(config_int("LINLI_T_N", 512, 1, 1000, &v), 0);
    assert_int_equal(v, 512);  /* unset: the default */
    setenv("LINLI_T_N", "", 1);
    v = -99;
    assert_int_equal(config_int("LINLI_T_N", 7, 1, 1000, &v), 0);
    assert_int_equal(v, 7);  /* empty: the default */

    setenv("LINLI_T_N", "42", 1);
    assert_int_equal(config_int("LINLI_T_N", 0, 1, 1000, &v), 0);
    assert_int_equal(v, 42);
    /* Both ends of the range are inside it. */
    setenv("LINLI_T_N", "1", 1);
    assert_int_equal(config_int("LINLI_T_N", 0, 1, 1000, &v), 0);
    assert_int_equal(v, 1);
    setenv("LINLI_T_N", "1000", 1);
    assert_int_equal(config_int("LINLI_T_N", 0, 1, 1000, &v), 0);
    assert_int_equal(v, 1000);
    setenv("LINLI_T_N", "-5", 1);
    assert_int_equal(config_int("LINLI_T_N", 0, -10, 10, &v), 0);
    assert_int_equal(v, -5);
    /* The whole int64 range. */
    setenv("LINLI_T_N", "9223372036854775807", 1);
    assert_int_equal(config_int("LINLI_T_N", 0, INT64_MIN, INT64_MAX, &v), 0);
    assert_true(v == INT64_MAX);
    setenv("LINLI_T_N", "-9223372036854775808", 1);
    assert_int_equal(config_int("LINLI_T_N", 0, INT64_MIN, INT64_MAX, &v), 0);
    assert_true(v == INT64_MIN);

    /* From the file, with spaces around the value. */
    unsetenv("LINLI_T_N");
    assert_int_equal(s_load("LINLI_T_N =  17  \n", NULL), 0);
    assert_int_equal(config_int("LINLI_T_N", 0, 1, 100, &v), 0);
    assert_int_equal(v, 17);
    /* The environment beats the file here too. */
    setenv("LINLI_T_N", "18", 1);
    assert_int_equal(config_int("LINLI_T_N", 0, 1, 100, &v), 0);
    assert_int_equal(v, 18);
}

static void test_int_refused(void **state)
{
    (void)state;
    static const struct {
        const char *value;
        int64_t min, max;
    } bad[] = {
        {"0", 1, 1000},          /* just below */
        {"1001", 1, 1000},       /* just above */
        {"-1", 0, 10},
        {"abc", 0, 10},
        {"12abc", 0, 100},
        {"5 ", 0, 10},           /* trailing space in the environment */
        {"1.5", 0, 10},
        {"1e3", 0, 10000},
        {"0x10", 0, 100},
        {"--1", -10, 10},
        {"-", -10, 10},
        {"+", 0, 10},
        {"9223372036854775808", INT64_MIN, INT64_MAX},    /* overflow */
        {"-9223372036854775809", INT64_MIN, INT64_MAX},   /* underflow */
        {"99999999999999999999999", INT64_MIN, INT64_MAX},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        setenv("LINLI_T_N", bad[i].value, 1);
        int64_t v = 12345;
        s_capture_begin();
        int rc = config_int("LINLI_T_N", 3, bad[i].min, bad[i].max, &v);
        char *log = s_capture_end();
        if (rc != -1)
            fail_msg("\"%s\" in [%lld,%lld] accepted as %lld", bad[i].value,
                     (long long)bad[i].min, (long long)bad[i].max, (long long)v);
        /* Logged with the key, the value and the range. */
        char range[80];
        snprintf(range, sizeof range, "range=[%lld,%lld]", (long long)bad[i].min,
                 (long long)bad[i].max);
        if (!strstr(log, "key=LINLI_T_N") || !strstr(log, bad[i].value) || !strstr(log, range))
            fail_msg("\"%s\" logged: %s", bad[i].value, log);
        free(log);
    }

    /* A bad value in the file is refused the same way. */
    unsetenv("LINLI_T_N");
    assert_int_equal(s_load("LINLI_T_N=lots\n", NULL), 0);
    int64_t v = 0;
    s_capture_begin();
    int rc = config_int("LINLI_T_N", 3, 0, 10, &v);
    free(s_capture_end());
    assert_int_equal(rc, -1);
}

/* ---- config_secret ---- */

static void test_secret_from_env(void **state)
{
    (void)state;
    assert_null(config_secret("LINLI_T_SECRET"));  /* neither set */
    setenv("LINLI_T_SECRET", "hunter2", 1);
    char *s = config_secret("LINLI_T_SECRET");
    assert_non_null(s);
    assert_string_equal(s, "hunter2");
    /* A copy the caller owns: changing the variable does not change it. */
    setenv("LINLI_T_SECRET", "other", 1);
    assert_string_equal(s, "hunter2");
    free(s);
    /* Empty is unset. */
    setenv("LINLI_T_SECRET", "", 1);
    assert_null(config_secret("LINLI_T_SECRET"));
    /* An empty KEY_FILE names no file, so KEY is used. */
    setenv("LINLI_T_SECRET", "from-env", 1);
    setenv("LINLI_T_SECRET_FILE", "", 1);
    s = config_secret("LINLI_T_SECRET");
    assert_string_equal(s, "from-env");
    free(s);
    /* From the config file too. */
    unsetenv("LINLI_T_SECRET");
    assert_int_equal(s_load("LINLI_T_SECRET=in-file\n", NULL), 0);
    s = config_secret("LINLI_T_SECRET");
    assert_string_equal(s, "in-file");
    free(s);
}

static void test_secret_from_file(void **state)
{
    (void)state;
    static const struct {
        const char *content;
        size_t len;
        const char *want;
    } cases[] = {
        {"s3cret\n", 7, "s3cret"},
        {"s3cret", 6, "s3cret"},
        {"s3cret\r\n", 8, "s3cret"},
        {"s3cret\n\n\n", 9, "s3cret"},
        {"two\nlines\n", 10, "two\nlines"},       /* only trailing newlines go */
        {"  spaced  \n", 11, "  spaced  "},       /* spaces are part of a secret */
        {"dbname=linli password=x\n", 24, "dbname=linli password=x"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        const char *path = s_write("secret", cases[i].content, cases[i].len);
        setenv("LINLI_T_SECRET_FILE", path, 1);
        char *s = config_secret("LINLI_T_SECRET");
        assert_non_null(s);
        assert_string_equal(s, cases[i].want);
        free(s);
    }

    /* KEY_FILE beats KEY. */
    setenv("LINLI_T_SECRET", "from-env", 1);
    char *s = config_secret("LINLI_T_SECRET");
    assert_string_equal(s, "dbname=linli password=x");
    free(s);

    /* A secret of 4095 bytes comes back whole. */
    char big[4096];
    memset(big, 'k', sizeof big - 1);
    big[sizeof big - 1] = '\0';
    setenv("LINLI_T_SECRET_FILE", s_write("big", big, sizeof big - 1), 1);
    s = config_secret("LINLI_T_SECRET");
    assert_non_null(s);
    assert_string_equal(s, big);
    free(s);
    /* One byte more does not fit: refused, never cut short. */
    char bigger[4097];
    memset(bigger, 'k', sizeof bigger);
    setenv("LINLI_T_SECRET_FILE", s_write("bigger", bigger, sizeof bigger), 1);
    assert_null(config_secret("LINLI_T_SECRET"));

    /* An empty file (or only newlines) holds no secret. */
    setenv("LINLI_T_SECRET_FILE", s_write("empty", "", 0), 1);
    assert_null(config_secret("LINLI_T_SECRET"));
    setenv("LINLI_T_SECRET_FILE", s_write("newline", "\n", 1), 1);
    assert_null(config_secret("LINLI_T_SECRET"));

    /* KEY_FILE named in the config file. */
    unsetenv("LINLI_T_SECRET_FILE");
    unsetenv("LINLI_T_SECRET");
    char conf[400];
    snprintf(conf, sizeof conf, "LINLI_T_SECRET_FILE=%s/viaconf\n", s_dir);
    s_write("viaconf", "conf-secret\n", 12);
    assert_int_equal(s_load(conf, NULL), 0);
    s = config_secret("LINLI_T_SECRET");
    assert_string_equal(s, "conf-secret");
    free(s);
}

static void test_secret_file_unreadable(void **state)
{
    (void)state;
    char path[300];
    snprintf(path, sizeof path, "%s/no-such-secret", s_dir);
    setenv("LINLI_T_SECRET_FILE", path, 1);
    /* KEY is set too, but a named file that cannot be read is an error,
     * not a reason to fall back. */
    setenv("LINLI_T_SECRET", "do-not-log-me", 1);
    s_capture_begin();
    char *s = config_secret("LINLI_T_SECRET");
    char *log = s_capture_end();
    assert_null(s);
    assert_non_null(strstr(log, "cannot read secret file"));
    assert_non_null(strstr(log, "key=LINLI_T_SECRET_FILE"));
    assert_non_null(strstr(log, "no-such-secret"));
    assert_null(strstr(log, "do-not-log-me"));
    free(log);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_defaults_and_env, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_file_syntax, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_env_beats_file, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_malformed_line, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_missing_file, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_reset, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_int_values, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_int_refused, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_secret_from_env, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_secret_from_file, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_secret_file_unreadable, s_setup, s_teardown),
    };
    return cmocka_run_group_tests(tests, s_group_setup, s_group_teardown);
}
