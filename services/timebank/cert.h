/* Certificates of volunteer service: the verification code printed on
 * each one and its printable HTML page. Pure functions, no I/O: the
 * timebank's SQL decides what a certificate covers and computes its digest
 * (SHA-256 of the content, hex); only this process holds the key, so only
 * it can make a code, and a code checks the number and digest it was made
 * for and nothing else.
 *
 * A code is NUMBER "-" 16 characters of RFC 4648 base32 (A-Z, 2-7, no
 * padding) of the first 10 bytes of
 *     HMAC-SHA256(secret, "linli-cert-v1\n" NUMBER "\n" DIGEST)
 * e.g. "LX-2026-000042-7QJ4XKZ2M5PRB6TA". The number keeps it findable; the
 * 80 bits make it unguessable. */
#ifndef LINLI_TIMEBANK_CERT_H
#define LINLI_TIMEBANK_CERT_H

#include <jansson.h>
#include <stddef.h>

#define CERT_NUMBER_MAX 64   /* bytes of a certificate number */
#define CERT_MAC_CHARS 16    /* base32 characters after the number */
#define CERT_CODE_MAX (CERT_NUMBER_MAX + 1 + CERT_MAC_CHARS)   /* without the NUL */
/* cert_html's output stays below this many bytes (a string in a reply may
 * hold 65536): months past it are left out of the table, and it says so. */
#define CERT_HTML_MAX 60000

/* Writes the code for number and digest under the key (secret_len bytes)
 * into out (outlen bytes, NUL-terminated). Returns 0, or -1 (out untouched
 * but for a NUL) when number is empty, longer than CERT_NUMBER_MAX or not
 * printable ASCII without spaces, digest is NULL, out is too small, or
 * OpenSSL fails. */
int cert_code(const void *secret, size_t secret_len, const char *number, const char *digest,
              char *out, size_t outlen);

/* 1 when code is the code for number and digest under the key, compared in
 * constant time; 0 otherwise, also when number or digest is NULL or a code
 * cannot be made for them. */
int cert_code_matches(const void *secret, size_t secret_len, const char *number,
                      const char *digest, const char *code);

/* A self-contained printable HTML page for an issued certificate: result
 * is a linli.Certificate as JSON (borrowed), its "code" already set. Every
 * string from it is HTML-escaped; dates are shown in UTC+8 (China Standard
 * Time); the code is also drawn as an inline QR code (SVG). Missing fields
 * show as empty. Returns a new NUL-terminated string the caller frees,
 * shorter than CERT_HTML_MAX bytes, or NULL when result is not an object. */
char *cert_html(const json_t *result);

/* s HTML-escaped (& < > " ' as entities, control characters other than
 * tab and newline dropped) as a new string the caller frees; NULL gives "".
 * What cert_html does to every string it shows. */
char *cert_html_escape(const char *s);

#endif
