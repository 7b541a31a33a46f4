/* Signed, expiring check-in tokens for QR codes. A token names what it
 * admits to (an activity or a route station), the community, and when it
 * expires, and carries an HMAC-SHA256 over those fields under the registry's
 * secret, so a printed code cannot be altered or forged.
 *
 * Text form (URL- and QR-friendly, at most TOKEN_MAX_LEN bytes):
 *   "L1." base64url(payload) "." base64url(first 16 bytes of HMAC)
 * where payload is "<kind>:<id>:<community_id>:<expires_at_ms>" and kind is
 * 'a' (activity) or 's' (station). The MAC is compared in constant time. */
#ifndef LINLI_TOKEN_H
#define LINLI_TOKEN_H

#include <stddef.h>
#include <stdint.h>

#define TOKEN_MAX_LEN 160

typedef enum { TOKEN_ACTIVITY = 'a', TOKEN_STATION = 's' } token_kind_t;

typedef struct {
    token_kind_t kind;     /* what the token admits to */
    int64_t id;            /* activity or station id, > 0 */
    int64_t community_id;  /* > 0 */
    int64_t expires_at;    /* ms since the Unix epoch */
} token_claims_t;

/* Verdicts of token_verify, in the order they are checked. */
typedef enum {
    TOKEN_OK = 0,
    TOKEN_MALFORMED = -1,  /* not a token at all, or a bad field */
    TOKEN_FORGED = -2,     /* well-formed but the MAC does not match */
    TOKEN_EXPIRED = -3,    /* genuine but now_ms >= expires_at; claims filled */
} token_verdict_t;

/* Writes the token for claims into out (outlen >= TOKEN_MAX_LEN + 1), NUL-
 * terminated. Returns 0, or -1 when claims are invalid (id or community
 * <= 0, unknown kind, expires_at < 0), key is NULL or empty, or outlen is
 * too small. */
int token_sign(const token_claims_t *claims, const void *key, size_t keylen, char *out,
               size_t outlen);

/* Checks text (len bytes, untrusted, need not be NUL-terminated) against
 * key at time now_ms. Never reads past len. Only the exact form token_sign
 * writes is accepted: canonical base64url, plain decimal numbers without
 * sign or leading zeros, ids > 0, at most TOKEN_MAX_LEN bytes; anything else
 * is TOKEN_MALFORMED, checked before the MAC. With an empty or NULL key no
 * token is genuine (TOKEN_FORGED). Fills *claims (may be NULL) on TOKEN_OK
 * and TOKEN_EXPIRED only; otherwise leaves it untouched. */
token_verdict_t token_verify(const char *text, size_t len, const void *key, size_t keylen,
                             int64_t now_ms, token_claims_t *claims);

/* Genuine tokens seen lately, for one key. A gate's scanners present the same
 * activity token with every scan; a token already shown genuine under the
 * key needs only its expiry checked again, not its MAC. */
typedef struct token_cache token_cache_t;

/* A cache for key (borrowed: it must outlive the cache). Never NULL. */
token_cache_t *token_cache_new(const void *key, size_t keylen);
/* Accepts NULL; NULLs *cache_p. */
void token_cache_destroy(token_cache_t **cache_p);

/* token_verify with cache's key, with the same verdicts and claims: a text
 * equal byte for byte to one that verified genuine before (OK or EXPIRED)
 * gets its claims from the cache, compared in constant time; anything else
 * is verified in full, and kept when genuine. */
token_verdict_t token_cache_verify(token_cache_t *cache, const char *text, size_t len,
                                   int64_t now_ms, token_claims_t *claims);
/* Verifications answered from the cache, and in full. */
void token_cache_stats(const token_cache_t *cache, unsigned long long *hits,
                       unsigned long long *misses);

/* Stable reason code for a verdict: "ok", "malformed", "forged", "expired". */
const char *token_verdict_name(token_verdict_t v);

#endif
