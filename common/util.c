/* Allocation wrappers, clocks and UUIDs (see util.h). */
#include "util.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>
#include <uuid/uuid.h>

static void s_oom(size_t n)
{
    fprintf(stderr, "fatal: out of memory allocating %zu bytes\n", n);
    abort();
}

void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        s_oom(n);
    return p;
}

void *xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p)
        s_oom(n * size);
    return p;
}

void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        s_oom(n);
    return q;
}

char *xstrdup(const char *s)
{
    if (!s)
        return NULL;
    char *d = strdup(s);
    if (!d)
        s_oom(strlen(s) + 1);
    return d;
}

char *xstrndup(const char *s, size_t n)
{
    char *d = strndup(s, n);
    if (!d)
        s_oom(n + 1);
    return d;
}

char *xasprintf(const char *fmt, ...)
{
    va_list ap;
    char *out = NULL;
    va_start(ap, fmt);
    int n = vasprintf(&out, fmt, ap);
    va_end(ap);
    if (n < 0)
        s_oom(strlen(fmt));
    return out;
}

int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int64_t mono_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Random version-4 UUIDs from a per-thread pool filled by getrandom(2): one
 * read per 256 ids instead of libuuid's per-id set-up, which showed in
 * profiles since every reply and event carries an id. The pool is dropped in
 * a forked child. */
static unsigned s_forks;              /* children forked: bumped in each child */
static pthread_once_t s_fork_once = PTHREAD_ONCE_INIT;

static void s_on_fork_child(void)
{
    s_forks++;
}

static void s_watch_forks(void)
{
    pthread_atfork(NULL, NULL, s_on_fork_child);
}

void uuid_new(char out[37])
{
    static __thread uint8_t pool[4096];
    static __thread size_t used = sizeof pool;
    static __thread unsigned owner;
    /* a forked child must not hand out its parent's ids; a fork handler
     * rather than getpid(), which is a system call per id */
    pthread_once(&s_fork_once, s_watch_forks);
    if (owner != s_forks) {
        owner = s_forks;
        used = sizeof pool;
    }
    if (used + 16 > sizeof pool) {
        size_t got = 0;
        while (got < sizeof pool) {
            ssize_t n = getrandom(pool + got, sizeof pool - got, 0);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                /* no kernel entropy interface: libuuid's own sources */
                uuid_t u;
                uuid_generate_random(u);
                uuid_unparse_lower(u, out);
                return;
            }
            got += (size_t)n;
        }
        used = 0;
    }
    uuid_t u;
    memcpy(u, pool + used, 16);
    used += 16;
    u[6] = (uint8_t)((u[6] & 0x0f) | 0x40); /* version 4 */
    u[8] = (uint8_t)((u[8] & 0x3f) | 0x80); /* RFC 4122 variant */
    uuid_unparse_lower(u, out);
}

int str_put(char *dst, size_t cap, size_t *len, const char *s)
{
    size_t n = strlen(s), room = cap > *len ? cap - *len - 1 : 0;
    int rc = 0;
    if (n > room) {
        n = room;
        rc = -1;
    }
    memcpy(dst + *len, s, n);
    *len += n;
    if (cap > *len)
        dst[*len] = '\0';
    return rc;
}

static int s_put_digits(char *dst, size_t cap, size_t *len, uint64_t u, bool negative)
{
    char tmp[24];
    char *p = tmp + sizeof tmp;
    *--p = '\0';
    do {
        *--p = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (negative)
        *--p = '-';
    return str_put(dst, cap, len, p);
}

int str_put_i64(char *dst, size_t cap, size_t *len, int64_t v)
{
    return s_put_digits(dst, cap, len, v < 0 ? 0 - (uint64_t)v : (uint64_t)v, v < 0);
}

int str_put_u64(char *dst, size_t cap, size_t *len, uint64_t v)
{
    return s_put_digits(dst, cap, len, v, false);
}

void str_copy(char *dst, size_t cap, const char *s)
{
    size_t len = 0;
    dst[0] = '\0';
    (void)str_put(dst, cap, &len, s);
}

int uuid_valid(const char *s)
{
    uuid_t u;
    return s && strlen(s) == 36 && uuid_parse(s, u) == 0;
}

uint64_t util_fnv1a(uint64_t h, const void *p, size_t n)
{
    const unsigned char *s = p;
    for (size_t i = 0; i < n; i++)
        h = (h ^ s[i]) * 1099511628211ull;
    return h;
}

size_t utf8_seq_len(const unsigned char *p, size_t n)
{
    static const uint32_t min[] = {0, 0, 0x80, 0x800, 0x10000};
    size_t len;
    uint32_t cp;
    if (p[0] < 0x80)
        return 1;
    if ((p[0] & 0xe0) == 0xc0)
        len = 2, cp = p[0] & 0x1f;
    else if ((p[0] & 0xf0) == 0xe0)
        len = 3, cp = p[0] & 0x0f;
    else if ((p[0] & 0xf8) == 0xf0)
        len = 4, cp = p[0] & 0x07;
    else
        return 0;
    if (len > n)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        cp = cp << 6 | (p[i] & 0x3f);
    }
    return cp < min[len] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff) ? 0 : len;
}

int utf8_valid(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        size_t k = utf8_seq_len(p + i, n - i);
        if (!k)
            return 0;
        i += k;
    }
    return 1;
}

void buf_add(lx_buf_t *b, const char *s, size_t n)
{
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 512;
        while (b->len + n + 1 > cap)
            cap *= 2;
        b->p = xrealloc(b->p, cap);
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

void buf_str(lx_buf_t *b, const char *s)
{
    buf_add(b, s, strlen(s));
}

void buf_printf(lx_buf_t *b, const char *fmt, ...)
{
    char small[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(small, sizeof small, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n < sizeof small) {
        buf_add(b, small, (size_t)n);
        return;
    }
    char *big = xmalloc((size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(big, (size_t)n + 1, fmt, ap);
    va_end(ap);
    buf_add(b, big, (size_t)n);
    free(big);
}
