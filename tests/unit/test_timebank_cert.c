/* Unit tests for services/timebank/cert.c: the verification code against a
 * known answer computed outside this code (openssl dgst -sha256 -hmac and
 * Python's base64.b32encode), its dependence on every signed input, its
 * constant-time check, and the printable page: escaping of everything that
 * comes from the database, dates in UTC+8, hours, the QR code, and the
 * bound on its size. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <jansson.h>

#include "../../services/timebank/cert.h"

static const char s_key[] = "linli test secret 0123456789";
#define S_KEYLEN (sizeof s_key - 1)
#define S_NUMBER "LX-2026-000042"
/* SHA-256 of "hello" */
#define S_DIGEST "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
/* printf 'linli-cert-v1\nLX-2026-000042\n<digest>' | openssl dgst -sha256 -hmac '<key>'
 * starts 1b9a4b78cb20923651c9; base32 of those 10 bytes: */
#define S_CODE S_NUMBER "-DONEW6GLECJDMUOJ"

static void s_code(const char *number, const char *digest, char *out)
{
    assert_int_equal(cert_code(s_key, S_KEYLEN, number, digest, out, CERT_CODE_MAX + 1), 0);
}

static void test_known_answer(void **state)
{
    (void)state;
    char code[CERT_CODE_MAX + 1];
    s_code(S_NUMBER, S_DIGEST, code);
    assert_string_equal(code, S_CODE);
    /* the exact size is enough, one byte less is not */
    char exact[sizeof S_CODE];
    assert_int_equal(cert_code(s_key, S_KEYLEN, S_NUMBER, S_DIGEST, exact, sizeof exact), 0);
    assert_string_equal(exact, S_CODE);
    assert_int_equal(cert_code(s_key, S_KEYLEN, S_NUMBER, S_DIGEST, exact, sizeof exact - 1),
                     -1);
    assert_string_equal(exact, "");
}

static void test_inputs_change_code(void **state)
{
    (void)state;
    char code[CERT_CODE_MAX + 1];
    /* another number (same digest), computed the same way as S_CODE */
    s_code("LX-2026-000043", S_DIGEST, code);
    assert_string_equal(code, "LX-2026-000043-BXMS2IIDDOFFF2RT");
    /* the digest's last hex digit changed */
    s_code(S_NUMBER, "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9820", code);
    assert_string_equal(code, S_NUMBER "-QKVZWQHVUKATKRQ7");
    /* another key */
    assert_int_equal(cert_code(s_key, S_KEYLEN - 1, S_NUMBER, S_DIGEST, code, sizeof code), 0);
    assert_string_not_equal(code, S_CODE);
    assert_memory_equal(code, S_NUMBER "-", sizeof S_NUMBER);
}

static void test_matches(void **state)
{
    (void)state;
    assert_int_equal(cert_code_matches(s_key, S_KEYLEN, S_NUMBER, S_DIGEST, S_CODE), 1);
    /* one character changed, cut short, one too many, lower case */
    assert_int_equal(cert_code_matches(s_key, S_KEYLEN, S_NUMBER, S_DIGEST,
                                       S_NUMBER "-DONEW6GLECJDMUOK"), 0);
    assert_int_equal(cert_code_matches(s_key, S_KEYLEN, S_NUMBER, S_DIGEST,
                                       S_NUMBER "-DONEW6GLECJDMUO"), 0);
    assert_int_equal(cert_code_matches(s_key, S_KEYLEN, S_NUMBER, S_DIGEST, S_CODE "A"), 0);
    assert_int_equal(cert_code_matches(s_key, S_KEYLEN, S_NUMBER, S_DIGEST,
                                       S_NUMBER "-donew6glecjdmuoj"), 0);
    /* the right code for other content */
    assert_int_equal(cert_code_matches(s_key, S_KEYLEN, "LX-2026-000043", S_DIGEST, S_CODE), 0);
    assert_int_equal(cert_code_matches(s_key, S_KEYLEN, S_NUMBER, "00", S_CODE), 0);
    /* nothing to check against */
    assert_int_equal(cert_code_matches(s_key, S_KEYLEN, NULL, S_DIGEST, S_CODE), 0);
    assert_int_equal(cert_code_matches(s_key, S_KEYLEN, S_NUMBER, NULL, S_CODE), 0);
    assert_int_equal(cert_code_matches(s_key, S_KEYLEN, S_NUMBER, S_DIGEST, NULL), 0);
    assert_int_equal(cert_code_matches(s_key, S_KEYLEN, S_NUMBER, S_DIGEST, ""), 0);
}

static void test_code_rejects(void **state)
{
    (void)state;
    char code[CERT_CODE_MAX + 1];
    char longest[CERT_NUMBER_MAX + 2];
    memset(longest, 'N', sizeof longest - 1);
    longest[sizeof longest - 1] = '\0';
    const char *bad_numbers[] = { "", "LX 2026", "LX-2026\n-1", "LX-\x7f", "编号-1", longest };
    for (size_t i = 0; i < sizeof bad_numbers / sizeof *bad_numbers; i++)
        assert_int_equal(cert_code(s_key, S_KEYLEN, bad_numbers[i], S_DIGEST, code, sizeof code),
                         -1);
    assert_int_equal(cert_code(s_key, S_KEYLEN, NULL, S_DIGEST, code, sizeof code), -1);
    assert_int_equal(cert_code(s_key, S_KEYLEN, S_NUMBER, NULL, code, sizeof code), -1);
    assert_int_equal(cert_code(s_key, S_KEYLEN, S_NUMBER, "", code, sizeof code), -1);
    /* the longest number fits CERT_CODE_MAX */
    longest[CERT_NUMBER_MAX] = '\0';
    assert_int_equal(cert_code(s_key, S_KEYLEN, longest, S_DIGEST, code, sizeof code), 0);
    assert_int_equal(strlen(code), CERT_CODE_MAX);
}

static void test_escape(void **state)
{
    (void)state;
    char *e = cert_html_escape("<b class=\"x\">Tom & 'Jerry'</b>\x01\t李");
    assert_string_equal(e, "&lt;b class=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/b&gt;\t李");
    free(e);
    e = cert_html_escape(NULL);
    assert_string_equal(e, "");
    free(e);
}

static json_t *s_certificate(const char *holder)
{
    json_t *c = json_pack("{s:s, s:I, s:s, s:s, s:I, s:s, s:I, s:I, s:I, s:I, s:I, s:s, s:s}",
                          "number", S_NUMBER, "person_id", (json_int_t)7, "holder_name", holder,
                          "id_number_masked", "**************1234", "community_id",
                          (json_int_t)3, "issuer", "江翠社区 <Jiangcui> & \"Co\"", "issued_at",
                          (json_int_t)1764000000000, "from", (json_int_t)1759248000000, "to",
                          (json_int_t)1764518400000, "total_minutes", (json_int_t)5490,
                          "movements", (json_int_t)42, "code", S_CODE, "digest", S_DIGEST);
    json_t *periods = json_pack("[{s:s, s:I, s:s}, {s:s, s:I, s:s}]", "month", "2025-10",
                                "minutes", (json_int_t)90, "content", "elderly care <b>'x'</b>",
                                "month", "2025-11", "minutes", (json_int_t)5400, "content",
                                "敬老 & 助残");
    json_object_set_new(c, "periods", periods);
    return c;
}

static void test_html(void **state)
{
    (void)state;
    json_t *c = s_certificate("O'Brien <script>alert(\"x\")</script> & 李");
    char *html = cert_html(c);
    assert_non_null(html);
    assert_non_null(strstr(html, "<!DOCTYPE html>"));
    assert_non_null(strstr(html, "Certificate of Volunteer Service"));
    assert_non_null(strstr(html, "志愿服务证明"));
    /* names escaped, never raw */
    assert_non_null(strstr(html, "O&#39;Brien &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; "
                                 "&amp; 李"));
    assert_null(strstr(html, "<script"));
    assert_null(strstr(html, "O'Brien"));
    assert_non_null(strstr(html, "江翠社区 &lt;Jiangcui&gt; &amp; &quot;Co&quot;"));
    assert_non_null(strstr(html, "elderly care &lt;b&gt;&#39;x&#39;&lt;/b&gt;"));
    assert_null(strstr(html, "<b>"));
    assert_non_null(strstr(html, "敬老 &amp; 助残"));
    assert_non_null(strstr(html, "**************1234"));
    /* dates in UTC+8: issued at 2025-11-24T16:00Z; to is exclusive */
    assert_non_null(strstr(html, "2025-11-25 (UTC+8)"));
    assert_non_null(strstr(html, "2025-10-01 – 2025-11-30"));
    /* 5490 minutes, 90 and 5400 */
    assert_non_null(strstr(html, "91.5 h"));
    assert_non_null(strstr(html, ">1.5<"));
    assert_non_null(strstr(html, ">90.0<"));
    assert_non_null(strstr(html, ">42<"));
    assert_non_null(strstr(html, S_NUMBER));
    assert_non_null(strstr(html, S_CODE));
    assert_non_null(strstr(html, "<svg"));
    assert_null(strstr(html, "more month"));
    free(html);
    json_decref(c);

    assert_null(cert_html(NULL));
    json_t *arr = json_array();
    assert_null(cert_html(arr));
    json_decref(arr);
    /* an empty certificate still renders */
    json_t *empty = json_object();
    html = cert_html(empty);
    assert_non_null(html);
    assert_null(strstr(html, "<svg"));
    free(html);
    json_decref(empty);
}

static void test_html_bounded(void **state)
{
    (void)state;
    json_t *c = s_certificate("张三");
    json_t *periods = json_array();
    char content[2000];
    memset(content, '<', sizeof content - 1);   /* each becomes 4 bytes, before the cut */
    content[sizeof content - 1] = '\0';
    for (int i = 0; i < 240; i++)
        json_array_append_new(periods, json_pack("{s:s, s:I, s:s}", "month", "2025-01",
                                                 "minutes", (json_int_t)60, "content", content));
    json_object_set_new(c, "periods", periods);
    json_object_set_new(c, "holder_name", json_string(content));
    char *html = cert_html(c);
    assert_non_null(html);
    assert_true(strlen(html) < CERT_HTML_MAX);
    assert_non_null(strstr(html, "more month(s) not listed"));
    assert_non_null(strstr(html, S_CODE));
    assert_non_null(strstr(html, "</html>"));
    free(html);
    json_decref(c);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_known_answer),
        cmocka_unit_test(test_inputs_change_code),
        cmocka_unit_test(test_matches),
        cmocka_unit_test(test_code_rejects),
        cmocka_unit_test(test_escape),
        cmocka_unit_test(test_html),
        cmocka_unit_test(test_html_bounded),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
