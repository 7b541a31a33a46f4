/* Small helpers every module uses: allocation that aborts on failure (so call
 * sites stay readable), clocks, UUIDs and result codes. */
#ifndef LINLI_UTIL_H
#define LINLI_UTIL_H

#include <stddef.h>
#include <stdint.h>

/* Result codes, errno-style: 0 is success, negatives are errors. Only codes a
 * caller branches on are named. */
#define LX_OK 0
#define LX_ERR (-1)
#define LX_AGAIN (-2)    /* try later: queue full, high-water mark reached */

#define LX_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

/* Allocation: on failure these print a message and abort(); they never return
 * NULL. xstrdup(NULL) returns NULL. */
void *xmalloc(size_t n);
void *xcalloc(size_t n, size_t size);
void *xrealloc(void *p, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);
/* printf into a new string owned by the caller. */
char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Wall clock in milliseconds since the Unix epoch. */
int64_t now_ms(void);
/* Monotonic clock in microseconds, for measuring intervals. */
int64_t mono_us(void);

/* FNV-1a over n bytes, continuing from h (start from UTIL_FNV_SEED): a
 * cheap hash for tables and cache keys, not for anything adversarial. */
#define UTIL_FNV_SEED 14695981039346656037ull
uint64_t util_fnv1a(uint64_t h, const void *p, size_t n);

/* Length of the well-formed UTF-8 sequence at p (n > 0 bytes left), or 0
 * when it is not one (overlong, surrogate, past U+10FFFF, cut short). */
size_t utf8_seq_len(const unsigned char *p, size_t n);
/* 1 when the n bytes at s are well-formed UTF-8, else 0. */
int utf8_valid(const char *s, size_t n);

/* A growing NUL-terminated string, for rendering text (HTTP bodies, SVG,
 * HTML). Start from {0}; p is owned by the holder (free it), and NULL
 * until something was added. */
typedef struct {
    char *p;     /* owned */
    size_t len;  /* bytes before the NUL */
    size_t cap;  /* bytes allocated */
} lx_buf_t;

/* Append n bytes of s (any bytes; the buffer stays NUL-terminated). */
void buf_add(lx_buf_t *b, const char *s, size_t n);
/* Append the string s. */
void buf_str(lx_buf_t *b, const char *s);
/* Append printf output, of any length. */
void buf_printf(lx_buf_t *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Text in a fixed buffer of cap bytes that holds *len bytes and a NUL:
 * str_put appends s, str_put_i64 and str_put_u64 the decimal digits of v.
 * Each returns 0, or
 * -1 when the text did not fit (the buffer then holds what did, NUL-ended). */
int str_put(char *dst, size_t cap, size_t *len, const char *s);
int str_put_i64(char *dst, size_t cap, size_t *len, int64_t v);
int str_put_u64(char *dst, size_t cap, size_t *len, uint64_t v);
/* Copies s into dst (cap > 0 bytes), cut short to fit, always NUL-ended. */
void str_copy(char *dst, size_t cap, const char *s);

/* Writes a new random (v4) UUID as 36 characters plus NUL into out. */
void uuid_new(char out[37]);
/* 1 when s is a UUID in canonical text form, else 0. */
int uuid_valid(const char *s);

#endif
