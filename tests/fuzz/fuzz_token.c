/* libFuzzer target for token_verify: arbitrary bytes as an untrusted token.
 * Besides memory safety it checks that a verdict is one of the four, that
 * claims are filled only when the MAC matched, and that anything accepted is
 * exactly what token_sign would write for its claims (one text per claims). */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "token.h"

static const char s_key[] = "fuzz-key";

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
    free(text);
    return 0;
}
