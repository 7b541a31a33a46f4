/* Signed check-in tokens (see token.h). The MAC covers the whole signed text
 * "L1.<base64url(payload)>", so the version prefix is authenticated too, and
 * verification checks the bytes the signer produced rather than a re-encoding.
 * Parsing is deliberately strict: base64url must be canonical (no padding,
 * unused trailing bits zero) and numbers must be plain decimal without
 * leading zeros, so every set of claims has exactly one valid text and no
 * altered character can still verify. */
#include "token.h"

#include "util.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/core_names.h>
#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/params.h>

#define S_PREFIX "L1."
#define S_PREFIX_LEN 3
#define S_MAC_LEN 16            /* bytes of HMAC-SHA256 kept */
#define S_MAC_B64_LEN 22        /* base64url length of S_MAC_LEN bytes */
#define S_PAYLOAD_MAX 64        /* "k:" + 3 * 19 digits + 2 colons = 61 */
#define S_PAYLOAD_B64_MAX 86    /* base64url length of S_PAYLOAD_MAX bytes */
#define S_CACHE_SLOTS 64        /* tokens a cache holds (a power of two) */

static const char s_b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/* Writes base64url (no padding) of in into out, which must hold
 * 4 * ceil(n / 3) bytes; returns the number of characters written. */
static size_t s_b64_encode(const unsigned char *in, size_t n, char *out)
{
    size_t o = 0, i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = s_b64[v >> 18 & 63];
        out[o++] = s_b64[v >> 12 & 63];
        out[o++] = s_b64[v >> 6 & 63];
        out[o++] = s_b64[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[o++] = s_b64[v >> 18 & 63];
        out[o++] = s_b64[v >> 12 & 63];
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        out[o++] = s_b64[v >> 18 & 63];
        out[o++] = s_b64[v >> 12 & 63];
        out[o++] = s_b64[v >> 6 & 63];
    }
    return o;
}

static int s_b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '-')
        return 62;
    if (c == '_')
        return 63;
    return -1;
}

/* Decodes n characters of canonical base64url into out (room for outcap
 * bytes). Returns the decoded length, or -1 for a character outside the
 * alphabet, an impossible length, non-zero unused bits or too little room.
 * Rejecting non-zero unused bits matters: otherwise two texts would decode
 * to the same bytes and an altered last character could still verify. */
static long s_b64_decode(const char *in, size_t n, unsigned char *out, size_t outcap)
{
    if (n % 4 == 1)
        return -1;
    size_t outlen = n / 4 * 3 + (n % 4 ? n % 4 - 1 : 0);
    if (outlen > outcap)
        return -1;
    size_t o = 0;
    uint32_t acc = 0;
    unsigned bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = s_b64_value((unsigned char)in[i]);
        if (v < 0)
            return -1;
        acc = acc << 6 | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    if (acc != 0)
        return -1;
    return (long)o;
}

/* Parses a positive-or-zero decimal int64 from s[*pos..n) up to (not
 * including) the byte stop, or to n when stop is -1. No sign, no leading
 * zeros, at least one digit, no overflow. Advances *pos past the digits. */
static int s_parse_num(const unsigned char *s, size_t n, size_t *pos, int stop, int64_t *out)
{
    size_t i = *pos, start = i;
    int64_t v = 0;
    while (i < n && s[i] != stop) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        int d = s[i] - '0';
        if (v > (INT64_MAX - d) / 10)
            return -1;
        v = v * 10 + d;
        i++;
    }
    size_t digits = i - start;
    if (digits == 0 || (digits > 1 && s[start] == '0'))
        return -1;
    *pos = i;
    *out = v;
    return 0;
}

/* Parses "<kind>:<id>:<community_id>:<expires_at>" exactly. */
static int s_parse_payload(const unsigned char *p, size_t n, token_claims_t *c)
{
    if (n < 2 || (p[0] != TOKEN_ACTIVITY && p[0] != TOKEN_STATION) || p[1] != ':')
        return -1;
    c->kind = (token_kind_t)p[0];
    size_t pos = 2;
    if (s_parse_num(p, n, &pos, ':', &c->id) < 0 || pos >= n)
        return -1;
    pos++;
    if (s_parse_num(p, n, &pos, ':', &c->community_id) < 0 || pos >= n)
        return -1;
    pos++;
    if (s_parse_num(p, n, &pos, -1, &c->expires_at) < 0 || pos != n)
        return -1;
    if (c->id <= 0 || c->community_id <= 0)
        return -1;
    return 0;
}

/* The HMAC-SHA256 state keyed with the last key used on this thread.
 * Fetching the algorithm and keying cost far more than hashing a token, and
 * a daemon verifies every scan with the same key: each MAC starts from a
 * copy of this state. */
static _Thread_local EVP_MAC_CTX *s_keyed;
static _Thread_local unsigned char *s_keyed_key;
static _Thread_local size_t s_keyed_len;

static EVP_MAC_CTX *s_keyed_ctx(const void *key, size_t keylen)
{
    if (s_keyed && s_keyed_len == keylen && CRYPTO_memcmp(s_keyed_key, key, keylen) == 0)
        return s_keyed;
    EVP_MAC_CTX_free(s_keyed);
    if (s_keyed_key)
        OPENSSL_clear_free(s_keyed_key, s_keyed_len);
    s_keyed = NULL;
    s_keyed_key = NULL;
    s_keyed_len = 0;
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "HMAC", NULL);
    EVP_MAC_CTX *ctx = mac ? EVP_MAC_CTX_new(mac) : NULL;
    EVP_MAC_free(mac);
    OSSL_PARAM params[] = { OSSL_PARAM_construct_utf8_string(OSSL_MAC_PARAM_DIGEST,
                                                             (char *)"SHA256", 0),
                            OSSL_PARAM_construct_end() };
    unsigned char *copy = OPENSSL_malloc(keylen);
    if (!ctx || !copy || !EVP_MAC_init(ctx, key, keylen, params)) {
        EVP_MAC_CTX_free(ctx);
        OPENSSL_free(copy);
        return NULL;
    }
    memcpy(copy, key, keylen);
    s_keyed = ctx;
    s_keyed_key = copy;
    s_keyed_len = keylen;
    return ctx;
}

/* First S_MAC_LEN bytes of HMAC-SHA256(key, msg). */
static int s_mac(const void *key, size_t keylen, const char *msg, size_t n,
                 unsigned char out[S_MAC_LEN])
{
    unsigned char full[EVP_MAX_MD_SIZE];
    size_t fulllen = 0;
    if (keylen == 0 || keylen > INT_MAX)
        return -1;
    EVP_MAC_CTX *keyed = s_keyed_ctx(key, keylen);
    EVP_MAC_CTX *ctx = keyed ? EVP_MAC_CTX_dup(keyed) : NULL;
    int ok = ctx && EVP_MAC_update(ctx, (const unsigned char *)msg, n) &&
             EVP_MAC_final(ctx, full, &fulllen, sizeof full) && fulllen >= S_MAC_LEN;
    EVP_MAC_CTX_free(ctx);
    if (ok)
        memcpy(out, full, S_MAC_LEN);
    OPENSSL_cleanse(full, sizeof full);
    return ok ? 0 : -1;
}

int token_sign(const token_claims_t *claims, const void *key, size_t keylen, char *out,
               size_t outlen)
{
    if (!claims || !key || keylen == 0 || !out || outlen < TOKEN_MAX_LEN + 1)
        return -1;
    if ((claims->kind != TOKEN_ACTIVITY && claims->kind != TOKEN_STATION) || claims->id <= 0 ||
        claims->community_id <= 0 || claims->expires_at < 0)
        return -1;

    char payload[S_PAYLOAD_MAX + 1];
    int plen = snprintf(payload, sizeof payload, "%c:%lld:%lld:%lld", (char)claims->kind,
                        (long long)claims->id, (long long)claims->community_id,
                        (long long)claims->expires_at);
    if (plen < 0 || (size_t)plen >= sizeof payload)
        return -1;

    size_t n = 0;
    memcpy(out, S_PREFIX, S_PREFIX_LEN);
    n = S_PREFIX_LEN;
    n += s_b64_encode((const unsigned char *)payload, (size_t)plen, out + n);

    unsigned char mac[S_MAC_LEN];
    if (s_mac(key, keylen, out, n, mac) < 0)
        return -1;
    out[n++] = '.';
    n += s_b64_encode(mac, sizeof mac, out + n);
    out[n] = '\0';
    return 0;
}

/* The verdict on a genuine token with claims c at now_ms: a token expires at
 * its expires_at. */
static token_verdict_t s_expiry(const token_claims_t *c, int64_t now_ms)
{
    return now_ms >= c->expires_at ? TOKEN_EXPIRED : TOKEN_OK;
}

token_verdict_t token_verify(const char *text, size_t len, const void *key, size_t keylen,
                             int64_t now_ms, token_claims_t *claims)
{
    /* Shortest conceivable: prefix, one payload character, dot, MAC. */
    if (!text || len < S_PREFIX_LEN + 1 + 1 + S_MAC_B64_LEN || len > TOKEN_MAX_LEN ||
        memcmp(text, S_PREFIX, S_PREFIX_LEN) != 0)
        return TOKEN_MALFORMED;

    /* The MAC part has a fixed length, so the separating dot has a fixed
     * place; any other dot is rejected by the base64url alphabet. */
    size_t dot = len - S_MAC_B64_LEN - 1;
    if (text[dot] != '.')
        return TOKEN_MALFORMED;
    size_t b64len = dot - S_PREFIX_LEN;
    if (b64len > S_PAYLOAD_B64_MAX)
        return TOKEN_MALFORMED;

    unsigned char payload[S_PAYLOAD_MAX];
    long plen = s_b64_decode(text + S_PREFIX_LEN, b64len, payload, sizeof payload);
    if (plen < 0)
        return TOKEN_MALFORMED;
    unsigned char given[S_MAC_LEN];
    if (s_b64_decode(text + dot + 1, S_MAC_B64_LEN, given, sizeof given) != S_MAC_LEN)
        return TOKEN_MALFORMED;
    token_claims_t c;
    if (s_parse_payload(payload, (size_t)plen, &c) < 0)
        return TOKEN_MALFORMED;

    /* Without a usable key nothing can be shown genuine. */
    unsigned char want[S_MAC_LEN];
    if (!key || s_mac(key, keylen, text, dot, want) < 0)
        return TOKEN_FORGED;
    if (CRYPTO_memcmp(want, given, S_MAC_LEN) != 0)
        return TOKEN_FORGED;

    if (claims)
        *claims = c;
    return s_expiry(&c, now_ms);
}

/* ---- cache of genuine tokens ---- */

struct token_cache {
    const void *key;         /* borrowed */
    size_t keylen;           /* bytes of key */
    struct {
        size_t len;          /* 0: empty */
        char text[TOKEN_MAX_LEN];
        token_claims_t claims;
    } slot[S_CACHE_SLOTS];   /* by hash of the text; a newer token takes the slot */
    unsigned long long hits;   /* answered from a slot */
    unsigned long long misses; /* verified in full */
};

token_cache_t *token_cache_new(const void *key, size_t keylen)
{
    token_cache_t *cache = xcalloc(1, sizeof *cache);
    cache->key = key;
    cache->keylen = keylen;
    return cache;
}

void token_cache_destroy(token_cache_t **cache_p)
{
    if (!cache_p || !*cache_p)
        return;
    OPENSSL_cleanse(*cache_p, sizeof **cache_p);
    free(*cache_p);
    *cache_p = NULL;
}

token_verdict_t token_cache_verify(token_cache_t *cache, const char *text, size_t len,
                                   int64_t now_ms, token_claims_t *claims)
{
    if (!text || len == 0 || len > TOKEN_MAX_LEN)
        return token_verify(text, len, cache->key, cache->keylen, now_ms, claims);
    /* The slot depends on the text only, and the comparison takes the same
     * time whatever bytes differ: timing tells nothing of a kept token. */
    size_t k = util_fnv1a(UTIL_FNV_SEED, text, len) & (S_CACHE_SLOTS - 1);
    if (cache->slot[k].len == len && CRYPTO_memcmp(cache->slot[k].text, text, len) == 0) {
        cache->hits++;
        token_claims_t c = cache->slot[k].claims;
        if (claims)
            *claims = c;
        return s_expiry(&c, now_ms);
    }
    cache->misses++;
    token_claims_t c;
    token_verdict_t v = token_verify(text, len, cache->key, cache->keylen, now_ms, &c);
    if (v == TOKEN_OK || v == TOKEN_EXPIRED) {
        memcpy(cache->slot[k].text, text, len);
        cache->slot[k].len = len;
        cache->slot[k].claims = c;
        if (claims)
            *claims = c;
    }
    return v;
}

void token_cache_stats(const token_cache_t *cache, unsigned long long *hits,
                       unsigned long long *misses)
{
    *hits = cache->hits;
    *misses = cache->misses;
}

const char *token_verdict_name(token_verdict_t v)
{
    switch (v) {
    case TOKEN_OK:
        return "ok";
    case TOKEN_MALFORMED:
        return "malformed";
    case TOKEN_FORGED:
        return "forged";
    case TOKEN_EXPIRED:
        return "expired";
    }
    return "unknown";
}
