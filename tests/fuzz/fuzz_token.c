/* libFuzzer target for token_verify: arbitrary bytes as an untrusted token.
 * Besides memory safety it checks that a verdict is one of the four, that
 * claims are filled only when the MAC matched, that anything accepted is
 * exactly what token_sign would write for its claims (one text per claims),
 * and that a cache of genuine tokens, kept across inputs, answers every
 * input as token_verify does, twice in a row. tests/fuzz/corpus/fuzz_token
 * holds tokens genuine under s_key (one expired), to start from. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "token.h"

static const char s_key[] = "fuzz-key";
static token_cache_t *s_cache;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* An exact-size copy so reads past size trip ASan. */
    char *text = malloc(size ? size : 1);
    if (!text)
        return 0;
    if (size)
        memcpy(text, data, size);
    token_claims_t c;
    memset(&c, 0x5a, sizeof c);
    token_verdict_t v = token_verify(text, size, s_key, sizeof s_key - 1, 1700000000000LL, &c);
    switch (v) {
    case TOKEN_OK:
    case TOKEN_EXPIRED: {
        char again[TOKEN_MAX_LEN + 1];
        if (token_sign(&c, s_key, sizeof s_key - 1, again, sizeof again) != 0 ||
            strlen(again) != size || memcmp(again, text, size) != 0)
            abort();
        break;
    }
    case TOKEN_MALFORMED:
    case TOKEN_FORGED: {
        token_claims_t untouched;
        memset(&untouched, 0x5a, sizeof untouched);
        if (memcmp(&c, &untouched, sizeof c) != 0)
            abort();
        break;
    }
    default:
        abort();
    }
    if (!s_cache)
        s_cache = token_cache_new(s_key, sizeof s_key - 1);
    for (int i = 0; i < 2; i++) {
        token_claims_t k;
        memset(&k, 0x5a, sizeof k);
        if (token_cache_verify(s_cache, text, size, 1700000000000LL, &k) != v ||
            k.kind != c.kind || k.id != c.id || k.community_id != c.community_id ||
            k.expires_at != c.expires_at)
            abort();
    }
    free(text);
    return 0;
}
