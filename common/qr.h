/* Printable QR codes (libqrencode) for check-in tokens. */
#ifndef LINLI_QR_H
#define LINLI_QR_H

#include <stddef.h>

/* Encodes text (8-bit mode, error correction level M) as a standalone SVG
 * document: black modules on white, a 4-module quiet zone, `module_px`
 * pixels per module (1..64), and `caption` (may be NULL; XML-escaped, with
 * control characters dropped and invalid UTF-8 replaced) printed under the
 * code. Returns a new NUL-terminated string the caller frees, or NULL when
 * text is NULL, empty or too long to encode, or module_px is out of range. */
char *qr_svg(const char *text, int module_px, const char *caption);

/* Encodes text as a PNG image (8-bit greyscale, dark 0 and light 255, same
 * layout without caption). The image data is a zlib stream of stored
 * (uncompressed) blocks, so no zlib library is needed. Returns a new buffer
 * the caller frees and its size in *len, or NULL (with *len = 0) as for
 * qr_svg or when len is NULL. */
unsigned char *qr_png(const char *text, int module_px, size_t *len);

#endif
