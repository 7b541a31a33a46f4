/* Unit tests for common/token.c: round trips, expiry at the boundary,
 * tamper and forgery detection, and strict rejection of malformed text,
 * including payloads that carry a correct MAC but bad fields. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>

#include "token.h"

static const char s_key[] = "test-secret-key-0123456789";
static const char s_other_key[] = "another-secret-key";
#define S_KEYLEN (sizeof s_key - 1)
#define S_NOW 1700000000000LL

static token_verdict_t s_verify(const char *text, token_claims_t *c)
{
    return token_verify(text, strlen(text), s_key, S_KEYLEN, S_NOW, c);
}

static void s_sign_ok(const token_claims_t *c, char *out)
{
    assert_int_equal(token_sign(c, s_key, S_KEYLEN, out, TOKEN_MAX_LEN + 1), 0);
}

/* An independent base64url encoder, so crafted tokens do not depend on the
 * code under test. */
static void s_b64url(const unsigned char *in, size_t n, char *out)
{
    static const char a[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n)
            v |= in[i + 2];
        out[o++] = a[v >> 18 & 63];
        out[o++] = a[v >> 12 & 63];
        if (i + 1 < n)
            out[o++] = a[v >> 6 & 63];
        if (i + 2 < n)
            out[o++] = a[v & 63];
    }
    out[o] = '\0';
}

/* Builds "L1.<b64(payload)>.<b64(mac)>" with a correct MAC under s_key,
 * whatever the payload says. */
static void s_craft(const char *payload, char *out, size_t outlen)
{
    char b64[256];
    s_b64url((const unsigned char *)payload, strlen(payload), b64);
    char signed_part[300];
    snprintf(signed_part, sizeof signed_part, "L1.%s", b64);
    unsigned char mac[EVP_MAX_MD_SIZE];
    unsigned int maclen = 0;
    HMAC(EVP_sha256(), s_key, (int)S_KEYLEN, (const unsigned char *)signed_part,
         strlen(signed_part), mac, &maclen);
    char macb64[64];
    s_b64url(mac, 16, macb64);
    snprintf(out, outlen, "%s.%s", signed_part, macb64);
}

static void test_round_trip_activity(void **state)
{
    (void)state;
    token_claims_t in = {TOKEN_ACTIVITY, 42, 7, S_NOW + 60000}, out;
    char tok[TOKEN_MAX_LEN + 1];
    s_sign_ok(&in, tok);
    assert_true(strncmp(tok, "L1.", 3) == 0);
    assert_true(strlen(tok) <= TOKEN_MAX_LEN);
    memset(&out, 0, sizeof out);
    assert_int_equal(s_verify(tok, &out), TOKEN_OK);
    assert_int_equal(out.kind, TOKEN_ACTIVITY);
    assert_int_equal(out.id, 42);
    assert_int_equal(out.community_id, 7);
    assert_int_equal(out.expires_at, S_NOW + 60000);
    /* claims may be NULL */
    assert_int_equal(s_verify(tok, NULL), TOKEN_OK);
}

static void test_round_trip_station_max(void **state)
{
    (void)state;
    token_claims_t in = {TOKEN_STATION, INT64_MAX, INT64_MAX, INT64_MAX}, out;
    char tok[TOKEN_MAX_LEN + 1];
    s_sign_ok(&in, tok);
    assert_true(strlen(tok) <= TOKEN_MAX_LEN);
    assert_int_equal(s_verify(tok, &out), TOKEN_OK);
    assert_int_equal(out.kind, TOKEN_STATION);
    assert_int_equal(out.id, INT64_MAX);
    assert_int_equal(out.community_id, INT64_MAX);
    assert_int_equal(out.expires_at, INT64_MAX);
}

static void test_not_nul_terminated(void **state)
{
    (void)state;
    token_claims_t in = {TOKEN_STATION, 5, 9, S_NOW + 1}, out;
    char tok[TOKEN_MAX_LEN + 1];
    s_sign_ok(&in, tok);
    size_t n = strlen(tok);
    /* An exact-size heap copy: ASan catches any read past len. */
    char *copy = malloc(n);
    assert_non_null(copy);
    memcpy(copy, tok, n);
    assert_int_equal(token_verify(copy, n, s_key, S_KEYLEN, S_NOW, &out), TOKEN_OK);
    /* Trailing bytes beyond len are not part of the token. */
    char longer[TOKEN_MAX_LEN + 8];
    memcpy(longer, tok, n);
    memcpy(longer + n, "junk", 4);
    assert_int_equal(token_verify(longer, n, s_key, S_KEYLEN, S_NOW, &out), TOKEN_OK);
    assert_int_equal(token_verify(longer, n + 4, s_key, S_KEYLEN, S_NOW, &out), TOKEN_MALFORMED);
    free(copy);
}

static void test_expiry_boundary(void **state)
{
    (void)state;
    token_claims_t in = {TOKEN_ACTIVITY, 1, 1, S_NOW}, out;
    char tok[TOKEN_MAX_LEN + 1];
    s_sign_ok(&in, tok);
    size_t n = strlen(tok);
    assert_int_equal(token_verify(tok, n, s_key, S_KEYLEN, S_NOW - 1, &out), TOKEN_OK);
    memset(&out, 0, sizeof out);
    assert_int_equal(token_verify(tok, n, s_key, S_KEYLEN, S_NOW, &out), TOKEN_EXPIRED);
    assert_int_equal(out.id, 1); /* claims are filled on EXPIRED */
    assert_int_equal(out.expires_at, S_NOW);
    assert_int_equal(token_verify(tok, n, s_key, S_KEYLEN, S_NOW + 1, &out), TOKEN_EXPIRED);
    /* Expiry at 0 (the epoch) is representable and long past. */
    in.expires_at = 0;
    s_sign_ok(&in, tok);
    assert_int_equal(s_verify(tok, &out), TOKEN_EXPIRED);
}

static void test_single_byte_changes(void **state)
{
    (void)state;
    token_claims_t kinds[2] = {{TOKEN_ACTIVITY, 123456, 42, S_NOW + 3600000},
                               {TOKEN_STATION, 9, 1, S_NOW + 1}};
    for (size_t k = 0; k < 2; k++) {
        char tok[TOKEN_MAX_LEN + 1];
        s_sign_ok(&kinds[k], tok);
        size_t n = strlen(tok);
        for (size_t i = 0; i < n; i++) {
            char orig = tok[i];
            for (int c = 0; c < 256; c++) {
                if ((char)c == orig)
                    continue;
                tok[i] = (char)c;
                token_claims_t out = {0};
                token_verdict_t v = token_verify(tok, n, s_key, S_KEYLEN, S_NOW, &out);
                if (v != TOKEN_FORGED && v != TOKEN_MALFORMED)
                    fail_msg("pos %zu byte %d gave %s", i, c, token_verdict_name(v));
                /* claims untouched on rejection */
                assert_int_equal(out.id, 0);
            }
            tok[i] = orig;
        }
        assert_int_equal(token_verify(tok, n, s_key, S_KEYLEN, S_NOW, NULL), TOKEN_OK);
    }
}

/* The cache gives token_verify's verdicts and claims: for a genuine token
 * first seen and then kept, across its expiry, for one altered byte of a
 * kept token, for forged and malformed texts (never kept), and with more
 * tokens than it holds, so slots are taken over. */
static void test_cache_same_verdicts(void **state)
{
    (void)state;
    token_cache_t *cache = token_cache_new(s_key, S_KEYLEN);
    unsigned long long hits, misses;
    char tok[TOKEN_MAX_LEN + 1];
    token_claims_t in = {TOKEN_ACTIVITY, 77, 5, S_NOW + 1000}, out = {0};
    s_sign_ok(&in, tok);
    size_t n = strlen(tok);
    for (int i = 0; i < 3; i++) {
        memset(&out, 0, sizeof out);
        assert_int_equal(token_cache_verify(cache, tok, n, S_NOW, &out), TOKEN_OK);
        assert_int_equal(out.id, 77);
        assert_int_equal(out.community_id, 5);
        assert_int_equal(out.expires_at, S_NOW + 1000);
        assert_int_equal(out.kind, TOKEN_ACTIVITY);
    }
    token_cache_stats(cache, &hits, &misses);
    assert_int_equal(hits, 2);
    assert_int_equal(misses, 1);
    /* kept, then past its expiry: EXPIRED with claims, as token_verify */
    assert_int_equal(token_cache_verify(cache, tok, n, S_NOW + 1000, &out), TOKEN_EXPIRED);
    assert_int_equal(token_verify(tok, n, s_key, S_KEYLEN, S_NOW + 1000, NULL), TOKEN_EXPIRED);
    assert_int_equal(out.id, 77);
    assert_int_equal(token_cache_verify(cache, tok, n, S_NOW + 999, NULL), TOKEN_OK);
    /* one byte changed, or one byte fewer: verified in full, never a hit */
    for (size_t i = 0; i < n; i++) {
        char orig = tok[i];
        tok[i] = orig == 'A' ? 'B' : 'A';
        token_claims_t none = {0};
        token_verdict_t want = token_verify(tok, n, s_key, S_KEYLEN, S_NOW, NULL);
        assert_true(want == TOKEN_FORGED || want == TOKEN_MALFORMED);
        assert_int_equal(token_cache_verify(cache, tok, n, S_NOW, &none), want);
        assert_int_equal(token_cache_verify(cache, tok, n, S_NOW, &none), want);
        assert_int_equal(none.id, 0);
        tok[i] = orig;
    }
    assert_int_equal(token_cache_verify(cache, tok, n - 1, S_NOW, NULL), TOKEN_MALFORMED);
    assert_int_equal(token_cache_verify(cache, NULL, 0, S_NOW, NULL), TOKEN_MALFORMED);
    /* a token signed with another key is forged here, however often seen */
    char other[TOKEN_MAX_LEN + 1];
    static const unsigned char key2[S_KEYLEN] = { 9 };
    assert_int_equal(token_sign(&in, key2, sizeof key2, other, sizeof other), 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(token_cache_verify(cache, other, strlen(other), S_NOW, NULL),
                         TOKEN_FORGED);
    /* many tokens: each keeps its own claims */
    for (int round = 0; round < 2; round++) {
        for (int64_t id = 1; id <= 300; id++) {
            token_claims_t c = {id % 2 ? TOKEN_ACTIVITY : TOKEN_STATION, id, id + 1,
                                S_NOW + id};
            char t[TOKEN_MAX_LEN + 1];
            s_sign_ok(&c, t);
            memset(&out, 0, sizeof out);
            assert_int_equal(token_cache_verify(cache, t, strlen(t), S_NOW + 150, &out),
                             id > 150 ? TOKEN_OK : TOKEN_EXPIRED);
            assert_int_equal(out.id, id);
            assert_int_equal(out.community_id, id + 1);
            assert_int_equal(out.kind, c.kind);
        }
    }
    token_cache_stats(cache, &hits, &misses);
    assert_true(hits > 2);
    token_cache_destroy(&cache);
    assert_null(cache);
    token_cache_destroy(&cache);
}

static void test_other_key_forged(void **state)
{
    (void)state;
    token_claims_t in = {TOKEN_ACTIVITY, 3, 4, S_NOW + 1000};
    char tok[TOKEN_MAX_LEN + 1];
    assert_int_equal(token_sign(&in, s_other_key, strlen(s_other_key), tok, sizeof tok), 0);
    assert_int_equal(s_verify(tok, NULL), TOKEN_FORGED);
    /* Expired and forged: the MAC is checked first. */
    in.expires_at = 1;
    assert_int_equal(token_sign(&in, s_other_key, strlen(s_other_key), tok, sizeof tok), 0);
    assert_int_equal(s_verify(tok, NULL), TOKEN_FORGED);
    /* An empty key makes nothing genuine. */
    s_sign_ok(&in, tok);
    assert_int_equal(token_verify(tok, strlen(tok), s_key, 0, S_NOW, NULL), TOKEN_FORGED);
    assert_int_equal(token_verify(tok, strlen(tok), NULL, 0, S_NOW, NULL), TOKEN_FORGED);
}

static void test_crafted_control(void **state)
{
    (void)state;
    /* The crafting helper itself makes tokens that verify. */
    char tok[512];
    s_craft("a:42:7:1800000000000", tok, sizeof tok);
    token_claims_t out;
    assert_int_equal(s_verify(tok, &out), TOKEN_OK);
    assert_int_equal(out.id, 42);
}

static void test_malformed_text(void **state)
{
    (void)state;
    token_claims_t in = {TOKEN_ACTIVITY, 42, 7, S_NOW + 60000};
    char tok[TOKEN_MAX_LEN + 1];
    s_sign_ok(&in, tok);
    size_t n = strlen(tok);

    /* Every truncation, including empty. */
    for (size_t i = 0; i < n; i++)
        assert_int_equal(token_verify(tok, i, s_key, S_KEYLEN, S_NOW, NULL), TOKEN_MALFORMED);
    assert_int_equal(token_verify(NULL, 0, s_key, S_KEYLEN, S_NOW, NULL), TOKEN_MALFORMED);
    assert_int_equal(token_verify("", 0, s_key, S_KEYLEN, S_NOW, NULL), TOKEN_MALFORMED);

    /* Huge input, whatever its content. */
    char *huge = malloc(100000);
    assert_non_null(huge);
    memset(huge, 'A', 100000);
    memcpy(huge, tok, n);
    assert_int_equal(token_verify(huge, 100000, s_key, S_KEYLEN, S_NOW, NULL), TOKEN_MALFORMED);
    assert_int_equal(token_verify(huge, TOKEN_MAX_LEN + 1, s_key, S_KEYLEN, S_NOW, NULL),
                     TOKEN_MALFORMED);
    free(huge);

    /* Wrong prefix or version. */
    char bad[TOKEN_MAX_LEN + 8];
    const char *prefixes[] = {"L2.", "l1.", "X1.", "L1:"};
    for (size_t i = 0; i < sizeof prefixes / sizeof *prefixes; i++) {
        memcpy(bad, tok, n + 1);
        memcpy(bad, prefixes[i], 3);
        assert_int_equal(s_verify(bad, NULL), TOKEN_MALFORMED);
    }
    snprintf(bad, sizeof bad, "L1%s", tok + 3);
    assert_int_equal(s_verify(bad, NULL), TOKEN_MALFORMED);
    snprintf(bad, sizeof bad, "xL1.%s", tok + 3);
    assert_int_equal(s_verify(bad, NULL), TOKEN_MALFORMED);

    /* Non-base64url characters and standard-base64 padding. */
    const char *junk[] = {"L1.YTo0Mjo3OjE3MDAwMDAwNjAwMDA=.AAAAAAAAAAAAAAAAAAAAAA",
                          "L1.YTo0+jo3OjE3MDAwMDAwNjAwMDA.AAAAAAAAAAAAAAAAAAAAAA",
                          "L1.YTo0Mjo3OjE3MDAwMDAwNjAwMDA.AAAAAAAAAAAAAAAAAAAAA/",
                          "L1.YTo0Mjo3OjE3MDAwMDAwNjAwMDA.AAAAAAAAAAAAAAAAAAAA==",
                          "L1..AAAAAAAAAAAAAAAAAAAAAA",
                          "L1.YTo0Mjo3OjE3MDAwMDAwNjAwMDA",
                          "L1.YTo0Mjo3OjE3MDAwMDAwNjAwMDA.",
                          "L1.YTo0Mjo3.OjE3MDAwMDAwNjAwMDA.AAAAAAAAAAAAAAAAAAAAAA",
                          "L1.YTo0Mjo3OjE3MDAwMDAwNjAwMDA.AAAAAAAAAAAAAAAAAAAAAAA",
                          "L1.YTo0Mjo3OjE3MDAwMDAwNjAwMDA AAAAAAAAAAAAAAAAAAAAAA",
                          "L1.YTo0Mjo3OjE3MDAwMDAwNjAwMDA.AAAAAAAAAAA\nAAAAAAAAAA",
                          "..............................................",
                          "L1.\xff\xfe\xfd.AAAAAAAAAAAAAAAAAAAAAA"};
    for (size_t i = 0; i < sizeof junk / sizeof *junk; i++)
        if (s_verify(junk[i], NULL) != TOKEN_MALFORMED)
            fail_msg("junk %zu accepted: %s", i, junk[i]);

    /* An embedded NUL inside len. */
    memcpy(bad, tok, n + 1);
    bad[10] = '\0';
    assert_int_equal(token_verify(bad, n, s_key, S_KEYLEN, S_NOW, NULL), TOKEN_MALFORMED);
}

/* Payloads with a correct MAC but bad fields: the format is checked first,
 * so they are MALFORMED, not OK. */
static void test_malformed_fields(void **state)
{
    (void)state;
    const char *payloads[] = {
        "a:0:7:1800000000000",          /* zero id */
        "a:-1:7:1800000000000",         /* negative id */
        "s:5:0:1800000000000",          /* zero community */
        "s:5:-3:1800000000000",         /* negative community */
        "a:5:7:-1",                     /* negative expiry */
        "a:+5:7:1800000000000",         /* sign */
        "a:05:7:1800000000000",         /* leading zero */
        "a:5:7:01800000000000",         /* leading zero */
        "a: 5:7:1800000000000",         /* space */
        "a:5:7:1800000000000 ",         /* trailing space */
        "a:5:7:1800000000000:",         /* extra field */
        "a:5:7:1800000000000:1",        /* extra field */
        "a:5:7",                        /* missing field */
        "a:5::1800000000000",           /* empty field */
        "a::7:1800000000000",           /* empty field */
        "a:5:7:",                       /* empty field */
        "x:5:7:1800000000000",          /* unknown kind */
        "A:5:7:1800000000000",          /* kind is case sensitive */
        "as:5:7:1800000000000",         /* long kind */
        ":5:7:1800000000000",           /* no kind */
        "a5:7:1800000000000",           /* no colon */
        "a:9223372036854775808:7:1",    /* INT64_MAX + 1 */
        "a:5:99999999999999999999:1",   /* overflow */
        "a:5:7:18446744073709551616",   /* overflow */
        "a:0x10:7:1800000000000",       /* hex */
        "a:1e3:7:1800000000000",        /* exponent */
        "",                             /* empty payload */
    };
    for (size_t i = 0; i < sizeof payloads / sizeof *payloads; i++) {
        char tok[512];
        s_craft(payloads[i], tok, sizeof tok);
        token_claims_t out = {0};
        token_verdict_t v = s_verify(tok, &out);
        if (v != TOKEN_MALFORMED)
            fail_msg("payload \"%s\" gave %s", payloads[i], token_verdict_name(v));
        assert_int_equal(out.id, 0);
    }
    /* An embedded NUL in the payload. */
    char tok[512];
    char b64[64];
    s_b64url((const unsigned char *)"a:5\0:7:1", 8, b64);
    snprintf(tok, sizeof tok, "L1.%s.AAAAAAAAAAAAAAAAAAAAAA", b64);
    assert_int_equal(s_verify(tok, NULL), TOKEN_MALFORMED);
}

static void test_sign_rejects(void **state)
{
    (void)state;
    char tok[TOKEN_MAX_LEN + 1];
    token_claims_t c = {TOKEN_ACTIVITY, 1, 1, S_NOW};
    assert_int_equal(token_sign(&c, s_key, 0, tok, sizeof tok), -1);
    assert_int_equal(token_sign(&c, NULL, 5, tok, sizeof tok), -1);
    assert_int_equal(token_sign(&c, s_key, S_KEYLEN, tok, TOKEN_MAX_LEN), -1);
    assert_int_equal(token_sign(NULL, s_key, S_KEYLEN, tok, sizeof tok), -1);
    token_claims_t bad[] = {{TOKEN_ACTIVITY, 0, 1, S_NOW},  {TOKEN_ACTIVITY, -1, 1, S_NOW},
                            {TOKEN_STATION, 1, 0, S_NOW},   {TOKEN_STATION, 1, -9, S_NOW},
                            {(token_kind_t)'x', 1, 1, S_NOW}, {TOKEN_ACTIVITY, 1, 1, -1},
                            {TOKEN_ACTIVITY, INT64_MIN, 1, S_NOW}};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        assert_int_equal(token_sign(&bad[i], s_key, S_KEYLEN, tok, sizeof tok), -1);
}

static void test_verdict_names(void **state)
{
    (void)state;
    assert_string_equal(token_verdict_name(TOKEN_OK), "ok");
    assert_string_equal(token_verdict_name(TOKEN_MALFORMED), "malformed");
    assert_string_equal(token_verdict_name(TOKEN_FORGED), "forged");
    assert_string_equal(token_verdict_name(TOKEN_EXPIRED), "expired");
    assert_string_equal(token_verdict_name((token_verdict_t)99), "unknown");
}

/* Keys may change between calls on one thread (the MAC state of the last
 * key is kept): each token verifies under its own key only, however the
 * calls alternate, and a key that is a prefix of another is another key. */
static void test_keys_alternate(void **state)
{
    (void)state;
    token_claims_t in = { .kind = TOKEN_ACTIVITY, .id = 5, .community_id = 2,
                          .expires_at = S_NOW + 1000 };
    char a[TOKEN_MAX_LEN + 1], b[TOKEN_MAX_LEN + 1], p[TOKEN_MAX_LEN + 1];
    token_claims_t out;
    s_sign_ok(&in, a);
    assert_int_equal(token_sign(&in, s_other_key, strlen(s_other_key), b, sizeof b), 0);
    assert_int_equal(token_sign(&in, s_key, S_KEYLEN - 1, p, sizeof p), 0);
    for (int round = 0; round < 3; round++) {
        assert_int_equal(s_verify(a, &out), TOKEN_OK);
        assert_int_equal(s_verify(b, &out), TOKEN_FORGED);
        assert_int_equal(s_verify(p, &out), TOKEN_FORGED);
        assert_int_equal(token_verify(b, strlen(b), s_other_key, strlen(s_other_key), S_NOW,
                                      &out), TOKEN_OK);
        assert_int_equal(token_verify(p, strlen(p), s_key, S_KEYLEN - 1, S_NOW, &out),
                         TOKEN_OK);
        assert_int_equal(token_verify(a, strlen(a), s_key, S_KEYLEN - 1, S_NOW, &out),
                         TOKEN_FORGED);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_activity),
        cmocka_unit_test(test_keys_alternate),
        cmocka_unit_test(test_round_trip_station_max),
        cmocka_unit_test(test_not_nul_terminated),
        cmocka_unit_test(test_expiry_boundary),
        cmocka_unit_test(test_single_byte_changes),
        cmocka_unit_test(test_other_key_forged),
        cmocka_unit_test(test_crafted_control),
        cmocka_unit_test(test_malformed_text),
        cmocka_unit_test(test_malformed_fields),
        cmocka_unit_test(test_sign_rejects),
        cmocka_unit_test(test_verdict_names),
        cmocka_unit_test(test_cache_same_verdicts),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
