/* Unit tests for common/qr.c: the SVG and PNG renderings are decoded back
 * (SVG path runs, PNG chunks, CRCs, stored deflate blocks and Adler-32, all
 * with independent code here) and compared module by module with what
 * libqrencode produces for the same text. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>
#include <qrencode.h>

#include "qr.h"

#define S_TEXT "L1.YTo0Mjo3OjE4MDAwMDAwMDAwMDA.X-U9jIB7aIh9PLWV5N_Cug"

static QRcode *s_reference(const char *text)
{
    QRcode *qr = QRcode_encodeString8bit(text, 0, QR_ECLEVEL_M);
    assert_non_null(qr);
    return qr;
}

static int s_dark_count(const QRcode *qr)
{
    int n = 0;
    for (int i = 0; i < qr->width * qr->width; i++)
        n += qr->data[i] & 1;
    return n;
}

/* Reads the dark runs from the SVG path into a module grid (width x width,
 * quiet zone removed); returns the number of dark modules, -1 if the path
 * does not have the expected shape. */
static int s_svg_grid(const char *svg, int px, int width, unsigned char *grid)
{
    const char *d = strstr(svg, "<path");
    if (!d || !(d = strstr(d, " d=\"")))
        return -1;
    d += 4;
    int count = 0;
    memset(grid, 0, (size_t)width * (size_t)width);
    while (*d == 'M') {
        int x, y, w, h, w2, used = 0;
        if (sscanf(d, "M%d %dh%dv%dh-%dz%n", &x, &y, &w, &h, &w2, &used) != 5 || used == 0)
            return -1;
        if (w != w2 || h != px || x % px || y % px || w % px || w <= 0)
            return -1;
        int mx = x / px - 4, my = y / px - 4;
        if (mx < 0 || my < 0 || my >= width || mx + w / px > width)
            return -1;
        for (int i = 0; i < w / px; i++) {
            if (grid[my * width + mx + i])
                return -1;  /* overlapping runs */
            grid[my * width + mx + i] = 1;
            count++;
        }
        d += used;
    }
    return *d == '"' ? count : -1;
}

static void test_svg_modules_match(void **state)
{
    (void)state;
    int sizes[] = {1, 4, 10, 64};
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        int px = sizes[k];
        char *svg = qr_svg(S_TEXT, px, NULL);
        assert_non_null(svg);
        assert_true(strncmp(svg, "<svg", 4) == 0);
        assert_non_null(strstr(svg, "</svg>\n"));
        assert_null(strstr(svg, "<text"));
        QRcode *qr = s_reference(S_TEXT);
        int side = (qr->width + 8) * px;
        char want[128];
        snprintf(want, sizeof want, "viewBox=\"0 0 %d %d\"", side, side);
        assert_non_null(strstr(svg, want));
        snprintf(want, sizeof want, "<rect width=\"%d\" height=\"%d\" fill=\"#ffffff\"/>", side,
                 side);
        assert_non_null(strstr(svg, want));
        unsigned char *grid = malloc((size_t)qr->width * (size_t)qr->width);
        assert_non_null(grid);
        int n = s_svg_grid(svg, px, qr->width, grid);
        assert_int_equal(n, s_dark_count(qr));
        for (int i = 0; i < qr->width * qr->width; i++)
            assert_int_equal(grid[i], qr->data[i] & 1);
        free(grid);
        QRcode_free(qr);
        free(svg);
    }
}

static void test_svg_caption_escaped(void **state)
{
    (void)state;
    const char *caption = "Tom & Jerry's <\"club\"> café";
    char *svg = qr_svg(S_TEXT, 4, caption);
    assert_non_null(svg);
    assert_true(strncmp(svg, "<svg", 4) == 0);
    assert_non_null(
        strstr(svg, ">Tom &amp; Jerry&apos;s &lt;&quot;club&quot;&gt; café</text>"));
    assert_null(strstr(svg, caption));
    assert_null(strstr(svg, "<\"club\">"));
    /* The caption band makes the image taller than wide. */
    QRcode *qr = s_reference(S_TEXT);
    char want[64];
    snprintf(want, sizeof want, "viewBox=\"0 0 %d ", (qr->width + 8) * 4);
    assert_non_null(strstr(svg, want));
    QRcode_free(qr);
    free(svg);

    /* Control bytes dropped, line breaks become spaces, invalid UTF-8 and
     * surrogates become U+FFFD. */
    svg = qr_svg(S_TEXT, 2, "a\x01" "b\nc\xff" "d\xed\xa0\x80" "e\xc3");
    assert_non_null(svg);
    assert_non_null(strstr(svg, ">ab c\xef\xbf\xbd" "d\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"
                                "e\xef\xbf\xbd</text>"));
    free(svg);

    /* An empty caption still produces a well-formed, empty text element. */
    svg = qr_svg(S_TEXT, 2, "");
    assert_non_null(svg);
    assert_non_null(strstr(svg, "\"></text>"));
    free(svg);
}

static uint32_t s_be32(const unsigned char *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Bitwise CRC-32, independent of the table version under test. */
static uint32_t s_crc32(const unsigned char *p, size_t n)
{
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1)));
    }
    return ~c;
}

static uint32_t s_adler32(const unsigned char *p, size_t n)
{
    uint32_t a = 1, b = 0;
    for (size_t i = 0; i < n; i++) {
        a = (a + p[i]) % 65521;
        b = (b + a) % 65521;
    }
    return b << 16 | a;
}

typedef struct {
    uint32_t width, height;
    unsigned char *raw;  /* inflated IDAT: height rows of 1 + width bytes */
    size_t rawlen;
    int blocks;          /* stored deflate blocks seen */
} s_png_t;

/* Parses and checks the PNG; fails the test on any structural error. */
static void s_png_parse(const unsigned char *png, size_t len, s_png_t *out)
{
    memset(out, 0, sizeof *out);
    assert_true(len > 8);
    assert_memory_equal(png, "\x89PNG\r\n\x1a\n", 8);
    size_t pos = 8;
    int seen_ihdr = 0, seen_iend = 0;
    unsigned char *z = NULL;
    size_t zlen = 0;
    while (pos < len) {
        assert_true(len - pos >= 12);
        uint32_t n = s_be32(png + pos);
        assert_true(len - pos - 12 >= n);
        const unsigned char *type = png + pos + 4, *data = png + pos + 8;
        assert_int_equal(s_be32(data + n), s_crc32(type, (size_t)n + 4));
        if (memcmp(type, "IHDR", 4) == 0) {
            assert_false(seen_ihdr);
            assert_int_equal(pos, 8);
            assert_int_equal(n, 13);
            out->width = s_be32(data);
            out->height = s_be32(data + 4);
            assert_memory_equal(data + 8, "\x08\x00\x00\x00\x00", 5);
            seen_ihdr = 1;
        } else if (memcmp(type, "IDAT", 4) == 0) {
            assert_true(seen_ihdr);
            z = realloc(z, zlen + n);
            assert_non_null(z);
            memcpy(z + zlen, data, n);
            zlen += n;
        } else if (memcmp(type, "IEND", 4) == 0) {
            assert_int_equal(n, 0);
            seen_iend = 1;
        } else {
            fail_msg("unexpected chunk %.4s", (const char *)type);
        }
        pos += 12 + n;
        if (seen_iend)
            break;
    }
    assert_true(seen_iend);
    assert_int_equal(pos, len);

    /* zlib header, then stored blocks only, then Adler-32. */
    assert_true(zlen >= 2 + 5 + 4);
    assert_int_equal(z[0], 0x78);
    assert_int_equal(((unsigned)z[0] << 8 | z[1]) % 31, 0);
    assert_int_equal(z[1] & 0x20, 0);  /* no preset dictionary */
    size_t zp = 2;
    out->raw = malloc(zlen);
    assert_non_null(out->raw);
    int final = 0;
    while (!final) {
        assert_true(zlen - zp >= 5);
        unsigned hdr = z[zp];
        assert_int_equal(hdr & 6, 0);  /* BTYPE 00: stored */
        final = hdr & 1;
        unsigned blen = z[zp + 1] | (unsigned)z[zp + 2] << 8;
        unsigned nlen = z[zp + 3] | (unsigned)z[zp + 4] << 8;
        assert_int_equal(blen ^ 0xffff, nlen);
        zp += 5;
        assert_true(zlen - zp >= blen);
        memcpy(out->raw + out->rawlen, z + zp, blen);
        out->rawlen += blen;
        zp += blen;
        out->blocks++;
    }
    assert_int_equal(zlen - zp, 4);
    assert_int_equal(s_be32(z + zp), s_adler32(out->raw, out->rawlen));
    free(z);
}

static unsigned char s_pixel(const s_png_t *png, uint32_t x, uint32_t y)
{
    return png->raw[(size_t)y * (png->width + 1) + 1 + x];
}

static void test_png_layout(void **state)
{
    (void)state;
    int sizes[] = {1, 3, 8, 20};
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        int px = sizes[k];
        size_t len = 0;
        unsigned char *buf = qr_png(S_TEXT, px, &len);
        assert_non_null(buf);
        QRcode *qr = s_reference(S_TEXT);
        uint32_t side = (uint32_t)((qr->width + 8) * px);
        s_png_t png;
        s_png_parse(buf, len, &png);
        assert_int_equal(png.width, side);
        assert_int_equal(png.height, side);
        assert_int_equal(png.rawlen, (size_t)side * (side + 1));
        if (png.rawlen > 65535)
            assert_true(png.blocks >= 2);
        /* Top-left finder pattern: dark at the quiet-zone offset; the quiet
         * zone itself is white. */
        assert_int_equal(s_pixel(&png, 4 * (uint32_t)px, 4 * (uint32_t)px), 0);
        assert_int_equal(s_pixel(&png, 0, 0), 255);
        assert_int_equal(s_pixel(&png, 4 * (uint32_t)px - 1, 4 * (uint32_t)px), 255);
        assert_int_equal(s_pixel(&png, side - 1, side - 1), 255);
        /* Every row is filter None, and every pixel matches its module. */
        for (uint32_t y = 0; y < side; y++) {
            assert_int_equal(png.raw[(size_t)y * (side + 1)], 0);
            for (uint32_t x = 0; x < side; x++) {
                int mx = (int)(x / (uint32_t)px) - 4, my = (int)(y / (uint32_t)px) - 4;
                int dark = mx >= 0 && my >= 0 && mx < qr->width && my < qr->width &&
                           (qr->data[my * qr->width + mx] & 1);
                if (s_pixel(&png, x, y) != (dark ? 0 : 255))
                    fail_msg("px %d pixel %u,%u is %u", px, x, y, s_pixel(&png, x, y));
            }
        }
        free(png.raw);
        QRcode_free(qr);
        free(buf);
    }
}

static void test_rejects(void **state)
{
    (void)state;
    size_t len = 99;
    assert_null(qr_svg("", 4, "x"));
    assert_null(qr_svg(NULL, 4, "x"));
    assert_null(qr_png("", 4, &len));
    assert_int_equal(len, 0);
    len = 99;
    assert_null(qr_png(NULL, 4, &len));
    assert_int_equal(len, 0);
    assert_null(qr_png(S_TEXT, 4, NULL));

    int bad_px[] = {0, -1, 65, 1000};
    for (size_t i = 0; i < sizeof bad_px / sizeof *bad_px; i++) {
        assert_null(qr_svg(S_TEXT, bad_px[i], NULL));
        len = 99;
        assert_null(qr_png(S_TEXT, bad_px[i], &len));
        assert_int_equal(len, 0);
    }

    /* Beyond version 40 at level M (2331 bytes in 8-bit mode). */
    char *huge = malloc(4001);
    assert_non_null(huge);
    memset(huge, 'x', 4000);
    huge[4000] = '\0';
    assert_null(qr_svg(huge, 1, NULL));
    assert_null(qr_png(huge, 1, &len));
    free(huge);
}

static void test_bounds(void **state)
{
    (void)state;
    /* Both ends of module_px work. */
    char *svg = qr_svg("x", 1, NULL);
    assert_non_null(svg);
    free(svg);
    svg = qr_svg("x", 64, "c");
    assert_non_null(svg);
    free(svg);
    size_t len = 0;
    unsigned char *png = qr_png("x", 64, &len);
    assert_non_null(png);
    s_png_t p;
    s_png_parse(png, len, &p);
    assert_int_equal(p.width, (21 + 8) * 64);
    free(p.raw);
    free(png);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_svg_modules_match),
        cmocka_unit_test(test_svg_caption_escaped),
        cmocka_unit_test(test_png_layout),
        cmocka_unit_test(test_rejects),
        cmocka_unit_test(test_bounds),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
