/* Certificate codes and printable pages (see cert.h). */
#include "cert.h"

#include "qr.h"
#include "util.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define S_CODE_DOMAIN "linli-cert-v1\n"
#define S_MAC_BYTES 10                  /* 80 bits: 16 base32 characters */
#define S_TZ_OFFSET_S (8 * 3600)        /* the page's dates are UTC+8 */
#define S_FIELD_MAX 200                 /* bytes of a name, issuer ... shown */
#define S_CONTENT_MAX 500               /* bytes of one month's content shown */
#define S_QR_PX 4
#define S_NOTE_MAX 300                  /* the "months not listed" line, and the NUL */

/* ---- codes ---- */

static int s_number_ok(const char *number)
{
    size_t n = number ? strlen(number) : 0;
    if (n == 0 || n > CERT_NUMBER_MAX)
        return 0;
    /* No separator of the signed message may hide in a number. */
    for (size_t i = 0; i < n; i++)
        if (number[i] <= ' ' || number[i] > '~')
            return 0;
    return 1;
}

int cert_code(const void *secret, size_t secret_len, const char *number, const char *digest,
              char *out, size_t outlen)
{
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    if (out && outlen)
        out[0] = '\0';
    if (!secret || !s_number_ok(number) || !digest || !digest[0] || !out)
        return -1;
    size_t nlen = strlen(number);
    if (outlen < nlen + 1 + CERT_MAC_CHARS + 1)
        return -1;
    char *msg = xasprintf("%s%s\n%s", S_CODE_DOMAIN, number, digest);
    unsigned char mac[EVP_MAX_MD_SIZE];
    size_t maclen = 0;
    unsigned char *ok = EVP_Q_mac(NULL, "HMAC", NULL, "SHA256", NULL, secret, secret_len,
                                  (const unsigned char *)msg, strlen(msg), mac, sizeof mac,
                                  &maclen);
    free(msg);
    if (!ok || maclen < S_MAC_BYTES)
        return -1;
    memcpy(out, number, nlen);
    char *p = out + nlen;
    *p++ = '-';
    /* 10 bytes are exactly 16 groups of 5 bits: no padding. */
    unsigned acc = 0;
    int bits = 0;
    for (int i = 0; i < S_MAC_BYTES; i++) {
        acc = (acc << 8) | mac[i];
        bits += 8;
        while (bits >= 5) {
            *p++ = alphabet[(acc >> (bits - 5)) & 31];
            bits -= 5;
        }
    }
    *p = '\0';
    OPENSSL_cleanse(mac, sizeof mac);
    return 0;
}

int cert_code_matches(const void *secret, size_t secret_len, const char *number,
                      const char *digest, const char *code)
{
    char want[CERT_CODE_MAX + 1];
    if (!code || cert_code(secret, secret_len, number, digest, want, sizeof want) != 0)
        return 0;
    /* The length is no secret (the number is printed); the bytes are. */
    size_t n = strlen(want);
    return strlen(code) == n && CRYPTO_memcmp(want, code, n) == 0;
}

/* ---- HTML ---- */

/* Appends at most max bytes of s (cut at a character boundary, "…" then
 * added), escaped. Invalid UTF-8 cannot come from jansson; it is dropped
 * byte by byte all the same. */
static void s_esc(lx_buf_t *b, const char *s, size_t max)
{
    if (!s)
        return;
    size_t n = strlen(s), used = 0;
    for (size_t i = 0; i < n;) {
        unsigned char c = (unsigned char)s[i];
        size_t k = c < 0x80 ? 1 : utf8_seq_len((const unsigned char *)s + i, n - i);
        if (k == 0) {
            i++;
            continue;
        }
        if (used + k > max) {
            buf_str(b, "…");
            return;
        }
        used += k;
        switch (c) {
        case '&': buf_str(b, "&amp;"); break;
        case '<': buf_str(b, "&lt;"); break;
        case '>': buf_str(b, "&gt;"); break;
        case '"': buf_str(b, "&quot;"); break;
        case '\'': buf_str(b, "&#39;"); break;
        default:
            if (c >= 0x20 || c == '\t' || c == '\n')
                buf_add(b, s + i, k);
        }
        i += k;
    }
}

char *cert_html_escape(const char *s)
{
    lx_buf_t b = { 0 };
    buf_add(&b, "", 0);
    s_esc(&b, s, (size_t)-1);
    return b.p;
}

static const char *s_get_str(const json_t *o, const char *key)
{
    const char *s = json_string_value(json_object_get(o, key));
    return s ? s : "";
}

static long long s_get_int(const json_t *o, const char *key)
{
    return (long long)json_integer_value(json_object_get(o, key));
}

/* The date of ms (since the Unix epoch) in UTC+8, "2026-11-25"; "" for 0. */
static void s_date(long long ms, char out[16])
{
    out[0] = '\0';
    if (ms == 0)
        return;
    long long s = ms / 1000 - (ms % 1000 < 0);   /* floor */
    time_t t = (time_t)(s + S_TZ_OFFSET_S);
    struct tm tm;
    if (!gmtime_r(&t, &tm) || strftime(out, 16, "%Y-%m-%d", &tm) == 0)
        out[0] = '\0';
}

/* Minutes as hours with one decimal, rounded half up: 90 -> "1.5". */
static void s_hours(long long minutes, char out[32])
{
    unsigned long long m = minutes < 0 ? 0ULL - (unsigned long long)minutes
                                       : (unsigned long long)minutes;
    unsigned long long tenths = (m * 10 + 30) / 60;
    snprintf(out, 32, "%s%llu.%llu", minutes < 0 ? "-" : "", tenths / 10, tenths % 10);
}

static const char s_style[] =
    "<style>\n"
    "@page { size: A4; margin: 16mm; }\n"
    "body { font-family: \"Noto Serif CJK SC\", \"Source Han Serif SC\", \"Songti SC\", serif;"
    " color: #111; max-width: 178mm; margin: 0 auto; }\n"
    "h1 { text-align: center; font-size: 22pt; margin: 6mm 0 2mm; line-height: 1.3; }\n"
    "h2 { font-size: 13pt; margin: 6mm 0 2mm; }\n"
    ".number { text-align: center; font-family: monospace; font-size: 12pt; }\n"
    "table { width: 100%; border-collapse: collapse; }\n"
    "th, td { border: 1px solid #555; padding: 1.5mm 2mm; text-align: left;"
    " vertical-align: top; }\n"
    "table.facts th { width: 38%; background: #f3f3f3; }\n"
    "table.months td.h { text-align: right; white-space: nowrap; }\n"
    ".verify { display: flex; align-items: center; gap: 6mm; margin-top: 8mm; }\n"
    ".verify svg { width: 36mm; height: auto; }\n"
    ".code { font-family: monospace; font-size: 12pt; word-break: break-all; }\n"
    ".note { font-size: 9pt; color: #444; }\n"
    "</style>\n";

/* One row of the facts table: label (our own text) and value (escaped). */
static void s_fact(lx_buf_t *b, const char *label, const char *value, size_t max)
{
    buf_str(b, "<tr><th>");
    buf_str(b, label);
    buf_str(b, "</th><td>");
    s_esc(b, value, max);
    buf_str(b, "</td></tr>\n");
}

char *cert_html(const json_t *result)
{
    if (!json_is_object(result))
        return NULL;
    const char *number = s_get_str(result, "number");
    const char *code = s_get_str(result, "code");
    long long from = s_get_int(result, "from"), to = s_get_int(result, "to");
    char issued[16], d_from[16], d_to[16], hours[32], count[32];
    s_date(s_get_int(result, "issued_at"), issued);
    s_date(from, d_from);
    /* to is exclusive: the last day served is the one before it */
    s_date(to ? to - 1 : 0, d_to);
    s_hours(s_get_int(result, "total_minutes"), hours);

    lx_buf_t head = { 0 };
    buf_str(&head, "<!DOCTYPE html>\n<html lang=\"zh-CN\">\n<head>\n<meta charset=\"utf-8\">\n"
                 "<title>Certificate of Volunteer Service / 志愿服务证明 ");
    s_esc(&head, number, S_FIELD_MAX);
    buf_str(&head, "</title>\n");
    buf_str(&head, s_style);
    buf_str(&head, "</head>\n<body>\n<h1>Certificate of Volunteer Service<br>志愿服务证明</h1>\n"
                 "<p class=\"number\">No. / 编号: ");
    s_esc(&head, number, S_FIELD_MAX);
    buf_str(&head, "</p>\n<table class=\"facts\">\n");
    s_fact(&head, "Holder / 姓名", s_get_str(result, "holder_name"), S_FIELD_MAX);
    s_fact(&head, "ID number / 证件号码", s_get_str(result, "id_number_masked"), S_FIELD_MAX);
    s_fact(&head, "Issued by / 出具单位", s_get_str(result, "issuer"), S_FIELD_MAX);
    buf_str(&head, "<tr><th>Issued on / 出具日期</th><td>");
    buf_str(&head, issued);
    buf_str(&head, " (UTC+8)</td></tr>\n<tr><th>Period / 服务期间</th><td>");
    buf_str(&head, d_from[0] ? d_from : "—");
    buf_str(&head, " – ");
    buf_str(&head, d_to[0] ? d_to : issued);
    buf_str(&head, " (UTC+8, both days included)</td></tr>\n"
                 "<tr><th>Total hours / 累计服务时长</th><td>");
    buf_str(&head, hours);
    buf_str(&head, " h / 小时</td></tr>\n<tr><th>Movements covered / 所含记录</th><td>");
    snprintf(count, sizeof count, "%lld", s_get_int(result, "movements"));
    buf_str(&head, count);
    buf_str(&head, "</td></tr>\n</table>\n<h2>Service by month / 服务明细</h2>\n"
                 "<table class=\"months\">\n<thead><tr><th>Month / 月份</th>"
                 "<th>Hours / 时长</th><th>Service / 服务内容</th></tr></thead>\n<tbody>\n");

    lx_buf_t tail = { 0 };
    buf_str(&tail, "</tbody>\n</table>\n");
    lx_buf_t foot = { 0 };
    buf_str(&foot, "<div class=\"verify\">\n");
    char *svg = code[0] ? qr_svg(code, S_QR_PX, NULL) : NULL;
    if (svg)
        buf_str(&foot, svg);
    free(svg);
    buf_str(&foot, "<div>\n<p>Verification code / 验证码:<br><span class=\"code\">");
    s_esc(&foot, code, CERT_CODE_MAX + 8);
    buf_str(&foot, "</span></p>\n<p class=\"note\">The timebank checks this code against the "
                 "certificate and its ledger (verify_certificate). / 可凭验证码向时间银行核验本证明"
                 "及其账目。</p>\n</div>\n</div>\n</body>\n</html>\n");

    /* The months, as many as fit: the page goes out in one reply. */
    lx_buf_t rows = { 0 };
    buf_add(&rows, "", 0);
    const json_t *periods = json_object_get(result, "periods");
    size_t total = json_is_array(periods) ? json_array_size(periods) : 0, shown = 0;
    size_t fixed = head.len + tail.len + foot.len + S_NOTE_MAX;
    size_t budget = fixed < CERT_HTML_MAX ? CERT_HTML_MAX - fixed : 0;
    for (size_t i = 0; i < total; i++) {
        const json_t *m = json_array_get(periods, i);
        lx_buf_t row = { 0 };
        char h[32];
        s_hours(s_get_int(m, "minutes"), h);
        buf_str(&row, "<tr><td>");
        s_esc(&row, s_get_str(m, "month"), 32);
        buf_str(&row, "</td><td class=\"h\">");
        buf_str(&row, h);
        buf_str(&row, "</td><td>");
        s_esc(&row, s_get_str(m, "content"), S_CONTENT_MAX);
        buf_str(&row, "</td></tr>\n");
        bool fits = rows.len + row.len <= budget;
        if (fits) {
            buf_add(&rows, row.p, row.len);
            shown++;
        }
        free(row.p);
        if (!fits)
            break;
    }
    if (shown < total)
        buf_printf(&tail, "<p class=\"note\">%zu more month(s) not listed here; the total includes "
                        "them. / 另有 %zu 个月未列出，已计入累计时长。</p>\n",
                 total - shown, total - shown);

    lx_buf_t page = head;
    buf_add(&page, rows.p, rows.len);
    buf_add(&page, tail.p, tail.len);
    buf_add(&page, foot.p, foot.len);
    free(rows.p);
    free(tail.p);
    free(foot.p);
    return page.p;
}
