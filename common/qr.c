/* QR codes for printed check-in tokens (see qr.h): libqrencode computes the
 * module matrix, and this file draws it either as SVG (for printing at any
 * size) or as a greyscale PNG (for screens and chat apps). The PNG's image
 * data is a zlib stream of stored, uncompressed deflate blocks: a QR image
 * is small, and writing the container by hand keeps zlib out of every
 * daemon's link line. */
#include "qr.h"

#include "util.h"

#include <qrencode.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define S_QUIET 4           /* quiet zone, in modules, on every side */
#define S_PX_MIN 1
#define S_PX_MAX 64
#define S_STORED_MAX 65535  /* most bytes one stored deflate block holds */

/* Encodes text at level M, or NULL when it is empty or does not fit. */
static QRcode *s_encode(const char *text, int module_px)
{
    if (!text || !*text || module_px < S_PX_MIN || module_px > S_PX_MAX)
        return NULL;
    /* 8-bit mode keeps the token's exact bytes; version 0 picks the
     * smallest symbol that fits. */
    return QRcode_encodeString8bit(text, 0, QR_ECLEVEL_M);
}

/* Length of the well-formed UTF-8 sequence at s that is also a legal XML
 * character, or 0. s is NUL-terminated, so looking ahead stops at the NUL,
 * which is never a continuation byte. */
static size_t s_utf8_len(const unsigned char *s)
{
    unsigned char c = s[0];
    if (c < 0x80)
        return 1;
    if (c >= 0xc2 && c <= 0xdf)
        return (s[1] & 0xc0) == 0x80 ? 2 : 0;
    if (c >= 0xe0 && c <= 0xef) {
        unsigned char lo = c == 0xe0 ? 0xa0 : 0x80, hi = c == 0xed ? 0x9f : 0xbf;
        if (s[1] < lo || s[1] > hi || (s[2] & 0xc0) != 0x80)
            return 0;
        if (c == 0xef && s[1] == 0xbf && (s[2] == 0xbe || s[2] == 0xbf))
            return 0;  /* U+FFFE and U+FFFF are not XML characters */
        return 3;
    }
    if (c >= 0xf0 && c <= 0xf4) {
        unsigned char lo = c == 0xf0 ? 0x90 : 0x80, hi = c == 0xf4 ? 0x8f : 0xbf;
        if (s[1] < lo || s[1] > hi || (s[2] & 0xc0) != 0x80 || (s[3] & 0xc0) != 0x80)
            return 0;
        return 4;
    }
    return 0;
}

/* Appends s as XML character data. Captions come from user-entered names,
 * so besides the five markup characters, control bytes are dropped (line
 * breaks become spaces) and invalid UTF-8 becomes U+FFFD: otherwise the
 * document would not parse. */
static void s_xml_escape(lx_buf_t *b, const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        switch (*p) {
        case '&': buf_add(b, "&amp;", 5); p++; continue;
        case '<': buf_add(b, "&lt;", 4); p++; continue;
        case '>': buf_add(b, "&gt;", 4); p++; continue;
        case '"': buf_add(b, "&quot;", 6); p++; continue;
        case '\'': buf_add(b, "&apos;", 6); p++; continue;
        case '\t': case '\n': case '\r': buf_add(b, " ", 1); p++; continue;
        default: break;
        }
        if (*p < 0x20) {
            p++;
            continue;
        }
        size_t n = s_utf8_len(p);
        if (n == 0) {
            buf_add(b, "\xef\xbf\xbd", 3);
            p++;
            continue;
        }
        buf_add(b, (const char *)p, n);
        p += n;
    }
}

char *qr_svg(const char *text, int module_px, const char *caption)
{
    QRcode *qr = s_encode(text, module_px);
    if (!qr)
        return NULL;

    int size = (qr->width + 2 * S_QUIET) * module_px;
    int font = module_px * 2 < 12 ? 12 : module_px * 2;
    int height = caption ? size + font * 2 : size;
    lx_buf_t b = {0};
    buf_printf(&b,
                 "<svg xmlns=\"http://www.w3.org/2000/svg\" version=\"1.1\" width=\"%d\" "
                 "height=\"%d\" viewBox=\"0 0 %d %d\" shape-rendering=\"crispEdges\">\n"
                 "<rect width=\"%d\" height=\"%d\" fill=\"#ffffff\"/>\n<path fill=\"#000000\" d=\"",
                 size, height, size, height, size, height);
    /* One rectangle per horizontal run of dark modules keeps the path a
     * fraction of the size of one per module. */
    for (int y = 0; y < qr->width; y++) {
        const unsigned char *row = qr->data + (size_t)y * (size_t)qr->width;
        for (int x = 0; x < qr->width;) {
            if (!(row[x] & 1)) {
                x++;
                continue;
            }
            int run = 1;
            while (x + run < qr->width && (row[x + run] & 1))
                run++;
            buf_printf(&b, "M%d %dh%dv%dh-%dz", (x + S_QUIET) * module_px,
                         (y + S_QUIET) * module_px, run * module_px, module_px, run * module_px);
            x += run;
        }
    }
    buf_add(&b, "\"/>\n", 4);
    if (caption) {
        buf_printf(&b,
                     "<text x=\"50%%\" y=\"%d\" font-family=\"sans-serif\" font-size=\"%d\" "
                     "text-anchor=\"middle\" fill=\"#000000\">",
                     size + font * 7 / 5, font);
        s_xml_escape(&b, caption);
        buf_add(&b, "</text>\n", 8);
    }
    buf_add(&b, "</svg>\n", 7);
    QRcode_free(qr);
    return b.p;
}

/* CRC-32 (ISO 3309, as PNG chunks use it) with a table the caller builds
 * once per image; no static state, so no initialisation race. */
static void s_crc_table(uint32_t t[256])
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
        t[n] = c;
    }
}

static uint32_t s_crc(const uint32_t t[256], const unsigned char *p, size_t n)
{
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++)
        c = t[(c ^ p[i]) & 0xff] ^ (c >> 8);
    return c ^ 0xffffffffu;
}

static void s_put32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* Writes a chunk's length and type at p; the caller writes the data after
 * them and then calls s_chunk_end. Returns where the data goes. */
static unsigned char *s_chunk_begin(unsigned char *p, const char *type, uint32_t len)
{
    s_put32(p, len);
    memcpy(p + 4, type, 4);
    return p + 8;
}

/* Appends the CRC of the chunk whose data of len bytes starts at data;
 * returns the end of the chunk. */
static unsigned char *s_chunk_end(const uint32_t t[256], unsigned char *data, uint32_t len)
{
    s_put32(data + len, s_crc(t, data - 4, (size_t)len + 4));
    return data + len + 4;
}

/* A zlib stream of stored deflate blocks written into a buffer already
 * sized for it: raw bytes are split into blocks of at most S_STORED_MAX. */
typedef struct {
    unsigned char *p;   /* next output byte */
    size_t remaining;   /* raw bytes still to come, over all blocks */
    size_t block_left;  /* raw bytes still to come in the open block */
    uint32_t a, b;      /* Adler-32 halves over the raw bytes */
} s_zstored_t;

static size_t s_zstored_size(size_t raw)
{
    size_t blocks = raw ? (raw + S_STORED_MAX - 1) / S_STORED_MAX : 1;
    return 2 + blocks * 5 + raw + 4;
}

static void s_zstored_begin(s_zstored_t *z, unsigned char *out, size_t raw)
{
    out[0] = 0x78;  /* deflate, 32 KiB window */
    out[1] = 0x01;  /* no dictionary, fastest; 0x7801 % 31 == 0 */
    z->p = out + 2;
    z->remaining = raw;
    z->block_left = 0;
    z->a = 1;
    z->b = 0;
    if (raw == 0) {
        /* An empty final block, so the stream is still well-formed. */
        memcpy(z->p, "\x01\x00\x00\xff\xff", 5);
        z->p += 5;
    }
}

static void s_zstored_put(s_zstored_t *z, const unsigned char *src, size_t n)
{
    while (n > 0) {
        if (z->block_left == 0) {
            size_t blk = z->remaining < S_STORED_MAX ? z->remaining : S_STORED_MAX;
            z->p[0] = blk == z->remaining ? 1 : 0;  /* BFINAL, BTYPE 00 */
            z->p[1] = (unsigned char)blk;
            z->p[2] = (unsigned char)(blk >> 8);
            z->p[3] = (unsigned char)~blk;
            z->p[4] = (unsigned char)(~blk >> 8);
            z->p += 5;
            z->block_left = blk;
        }
        size_t k = n < z->block_left ? n : z->block_left;
        memcpy(z->p, src, k);
        /* 5552 is the most bytes before b can overflow 32 bits (zlib's NMAX). */
        for (size_t i = 0; i < k;) {
            size_t end = k - i > 5552 ? i + 5552 : k;
            for (; i < end; i++) {
                z->a += src[i];
                z->b += z->a;
            }
            z->a %= 65521;
            z->b %= 65521;
        }
        z->p += k;
        src += k;
        n -= k;
        z->block_left -= k;
        z->remaining -= k;
    }
}

static unsigned char *s_zstored_end(s_zstored_t *z)
{
    s_put32(z->p, z->b << 16 | z->a);
    return z->p + 4;
}

unsigned char *qr_png(const char *text, int module_px, size_t *len)
{
    if (!len)
        return NULL;
    *len = 0;
    QRcode *qr = s_encode(text, module_px);
    if (!qr)
        return NULL;

    /* Version 40 at 64 px is 11840 px square, about 140 MB of pixels:
     * large but far from overflowing size_t or a chunk's 31-bit length. */
    size_t side = (size_t)(qr->width + 2 * S_QUIET) * (size_t)module_px;
    size_t rowlen = side + 1;  /* filter byte, then one byte per pixel */
    size_t raw = side * rowlen;
    size_t zlen = s_zstored_size(raw);
    size_t total = 8 + (12 + 13) + (12 + zlen) + 12;
    unsigned char *png = xmalloc(total);
    unsigned char *row = xmalloc(rowlen);
    uint32_t crct[256];
    s_crc_table(crct);

    unsigned char *p = png;
    memcpy(p, "\x89PNG\r\n\x1a\n", 8);
    p += 8;

    unsigned char *d = s_chunk_begin(p, "IHDR", 13);
    s_put32(d, (uint32_t)side);
    s_put32(d + 4, (uint32_t)side);
    d[8] = 8;   /* bits per sample */
    d[9] = 0;   /* greyscale */
    d[10] = 0;  /* deflate */
    d[11] = 0;  /* adaptive filtering, every row uses filter 0 (None) */
    d[12] = 0;  /* not interlaced */
    p = s_chunk_end(crct, d, 13);

    d = s_chunk_begin(p, "IDAT", (uint32_t)zlen);
    s_zstored_t z;
    s_zstored_begin(&z, d, raw);
    for (size_t py = 0; py < side; py++) {
        /* A pixel row only changes at module boundaries. */
        if (py % (size_t)module_px == 0) {
            long my = (long)(py / (size_t)module_px) - S_QUIET;
            memset(row, 255, rowlen);
            row[0] = 0;
            if (my >= 0 && my < qr->width) {
                const unsigned char *m = qr->data + (size_t)my * (size_t)qr->width;
                for (int mx = 0; mx < qr->width; mx++)
                    if (m[mx] & 1)
                        memset(row + 1 + (size_t)(mx + S_QUIET) * (size_t)module_px, 0,
                               (size_t)module_px);
            }
        }
        s_zstored_put(&z, row, rowlen);
    }
    p = s_chunk_end(crct, d, (uint32_t)(s_zstored_end(&z) - d));

    d = s_chunk_begin(p, "IEND", 0);
    p = s_chunk_end(crct, d, 0);
    *len = (size_t)(p - png);

    free(row);
    QRcode_free(qr);
    return png;
}
