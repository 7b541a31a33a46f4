/* Unit tests for services/linlictl/csv.c: RFC 4180 quoting (comma, double
 * quote, CR, LF), quotes doubled, plain fields left alone, and the guard
 * against formula injection for text people typed. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "../../services/linlictl/csv.h"

static void s_expect(const char *in, int guard, const char *want)
{
    char *got = csv_field(in, guard);
    assert_non_null(got);
    assert_string_equal(got, want);
    free(got);
}

static void test_plain(void **state)
{
    (void)state;
    s_expect("", 0, "");
    s_expect(NULL, 0, "");
    s_expect(NULL, CSV_TEXT, "");
    s_expect("gift", 0, "gift");
    s_expect("帮老人买菜", CSV_TEXT, "帮老人买菜");
    s_expect("a b;c\t'x'", CSV_TEXT, "a b;c\t'x'");
    /* numbers and kinds are not guarded: a negative amount stays a number */
    s_expect("-60", 0, "-60");
    s_expect("=1+2", 0, "=1+2");
}

static void test_quoted(void **state)
{
    (void)state;
    s_expect("a,b", 0, "\"a,b\"");
    s_expect("say \"hi\"", 0, "\"say \"\"hi\"\"\"");
    s_expect("\"", 0, "\"\"\"\"");
    s_expect("line1\nline2", CSV_TEXT, "\"line1\nline2\"");
    s_expect("cr\rhere", CSV_TEXT, "\"cr\rhere\"");
    s_expect("crlf\r\n", 0, "\"crlf\r\n\"");
    s_expect(",", CSV_TEXT, "\",\"");
    s_expect("\"\"\"", CSV_TEXT, "\"\"\"\"\"\"\"\"");
}

static void test_formula_guard(void **state)
{
    (void)state;
    s_expect("=HYPERLINK(\"http://x\")", CSV_TEXT, "\"'=HYPERLINK(\"\"http://x\"\")\"");
    s_expect("+1", CSV_TEXT, "\"'+1\"");
    s_expect("-1", CSV_TEXT, "\"'-1\"");
    s_expect("@SUM(A1)", CSV_TEXT, "\"'@SUM(A1)\"");
    s_expect("=a,b", CSV_TEXT, "\"'=a,b\"");
    s_expect("\tx", CSV_TEXT, "\"'\tx\"");
    s_expect("\rx", CSV_TEXT, "\"'\rx\"");
    s_expect("=", CSV_TEXT, "\"'=\"");
    /* only the first character counts */
    s_expect("a=b", CSV_TEXT, "a=b");
    s_expect(" =1", CSV_TEXT, " =1");
    s_expect("'=1", CSV_TEXT, "'=1");
}

/* Each output is a single field: read back by RFC 4180 it is the input
 * (after the apostrophe, when guarded). */
static void test_round_trip(void **state)
{
    (void)state;
    const char *inputs[] = { "", "x", "a,b", "\"", "a\"b\"", "\n", "a\r\nb", "=1", "-x,\"y\"" };
    for (size_t i = 0; i < sizeof inputs / sizeof inputs[0]; i++) {
        for (int guard = 0; guard <= 1; guard++) {
            char *f = csv_field(inputs[i], guard);
            char back[64];
            size_t n = 0;
            const char *p = f;
            if (*p == '"') {
                for (p++; *p; p++) {
                    if (*p == '"') {
                        assert_true(p[1] == '"' || p[1] == '\0');
                        if (p[1] == '\0')
                            break;
                        p++;
                    }
                    back[n++] = *p;
                }
                assert_int_equal(*p, '"');
                assert_int_equal(p[1], '\0');
            } else {
                assert_null(strpbrk(f, ",\"\r\n"));
                n = strlen(f);
                memcpy(back, f, n);
            }
            back[n] = '\0';
            const char *want = back;
            if (guard && inputs[i][0] && strchr("=+-@\t\r", inputs[i][0])) {
                assert_int_equal(back[0], '\'');
                want = back + 1;
            }
            assert_string_equal(want, inputs[i]);
            free(f);
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plain),
        cmocka_unit_test(test_quoted),
        cmocka_unit_test(test_formula_guard),
        cmocka_unit_test(test_round_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
