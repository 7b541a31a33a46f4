/* The health, readiness and metrics endpoint of every daemon (see http.h),
 * served by libevent's evhttp on the daemon's own event loop, and the small
 * metrics registry it renders. Handlers only read state the loop already
 * keeps, so a probe never blocks the daemon's real work; the registry needs
 * no locking because the loop is single-threaded. */
#include "http.h"

#include "log.h"
#include "util.h"

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/http.h>
#include <event2/keyvalq_struct.h>

#define S_MAX_HEADERS 8192  /* probes send a few short headers */
#define S_MAX_BODY 1024     /* no endpoint takes a body */
#define S_TIMEOUT_S 10      /* a stuck client must not hold a connection */

struct metric {
    metric_t *next;   /* registration order, which is render order */
    char *name;       /* owned; full name, prefix applied */
    char *help;       /* owned */
    char *labels;     /* owned; NULL or a label set without braces */
    int is_gauge;     /* 0: counter (count), 1: gauge (value) */
    uint64_t count;   /* counter value */
    double value;     /* gauge value */
};

struct metrics {
    char *prefix;     /* owned; NULL for none */
    metric_t *head;   /* owned list */
    metric_t *tail;   /* last of head, for appending */
};

struct lx_http {
    struct evhttp *http;  /* owned; frees the listener and open connections */
    metrics_t *metrics;   /* borrowed; may be NULL */
    http_ready_fn *ready; /* may be NULL: always ready */
    void *arg;            /* passed to ready */
    int port;             /* port actually bound */
};

/* ---- metrics registry ------------------------------------------------- */

/* Prometheus metric names: [a-zA-Z_:][a-zA-Z0-9_:]*. */
static int s_name_valid(const char *s, int allow_empty)
{
    if (!*s)
        return allow_empty;
    if (*s >= '0' && *s <= '9')
        return 0;
    for (; *s; s++)
        if (!((*s >= 'a' && *s <= 'z') || (*s >= 'A' && *s <= 'Z') ||
              (*s >= '0' && *s <= '9') || *s == '_' || *s == ':'))
            return 0;
    return 1;
}

metrics_t *metrics_new(const char *prefix)
{
    /* The prefix is code, not input: a bad one is a programmer error. */
    assert(!prefix || s_name_valid(prefix, 1));
    metrics_t *m = xcalloc(1, sizeof *m);
    m->prefix = prefix && *prefix ? xstrdup(prefix) : NULL;
    return m;
}

void metrics_destroy(metrics_t **m_p)
{
    if (!m_p || !*m_p)
        return;
    metrics_t *m = *m_p;
    for (metric_t *c = m->head, *next; c; c = next) {
        next = c->next;
        free(c->name);
        free(c->help);
        free(c->labels);
        free(c);
    }
    free(m->prefix);
    free(m);
    *m_p = NULL;
}

static int s_labels_equal(const char *a, const char *b)
{
    if (!a || !b)
        return a == b;
    return strcmp(a, b) == 0;
}

metric_t *metrics_add(metrics_t *m, const char *name, const char *type, const char *help,
                      const char *labels)
{
    if (!m)
        return NULL;
    assert(name && s_name_valid(name, 0));
    assert(type && (strcmp(type, "counter") == 0 || strcmp(type, "gauge") == 0));
    int is_gauge = strcmp(type, "gauge") == 0;
    if (labels && !*labels)
        labels = NULL;

    char *full = m->prefix ? xasprintf("%s_%s", m->prefix, name) : xstrdup(name);
    for (metric_t *c = m->head; c; c = c->next) {
        if (strcmp(c->name, full) != 0)
            continue;
        /* One name is one HELP/TYPE group, so it has one type. */
        assert(c->is_gauge == is_gauge);
        if (s_labels_equal(c->labels, labels)) {
            free(full);
            return c;
        }
    }
    metric_t *c = xcalloc(1, sizeof *c);
    c->name = full;
    c->help = xstrdup(help ? help : "");
    c->labels = xstrdup(labels);
    c->is_gauge = is_gauge;
    if (m->tail)
        m->tail->next = c;
    else
        m->head = c;
    m->tail = c;
    return c;
}

void metric_inc(metric_t *c, uint64_t n)
{
    if (!c)
        return;
    if (c->is_gauge)
        c->value += (double)n;
    else
        c->count += n;
}

void metric_set_total(metric_t *c, uint64_t total)
{
    if (!c)
        return;
    assert(!c->is_gauge);
    /* A counter never goes down; a smaller total (a restarted source) is
     * ignored rather than shown as a reset. */
    if (total > c->count)
        c->count = total;
}

void metric_set(metric_t *g, double v)
{
    if (!g)
        return;
    /* Counters only go up; setting one is a programmer error. */
    assert(g->is_gauge);
    g->value = v;
}

/* HELP text escapes backslash and newline (exposition format 0.0.4). */
static void s_help_escape(lx_buf_t *b, const char *s)
{
    for (; *s; s++) {
        if (*s == '\\')
            buf_add(b, "\\\\", 2);
        else if (*s == '\n')
            buf_add(b, "\\n", 2);
        else
            buf_add(b, s, 1);
    }
}

/* Shortest text that reads back as the same double, in the spellings
 * Prometheus expects for the special values. */
static void s_fmt_double(char *out, size_t len, double v)
{
    if (isnan(v)) {
        snprintf(out, len, "NaN");
    } else if (isinf(v)) {
        snprintf(out, len, v > 0 ? "+Inf" : "-Inf");
    } else {
        snprintf(out, len, "%.15g", v);
        if (strtod(out, NULL) != v)
            snprintf(out, len, "%.17g", v);
    }
}

static void s_render_sample(lx_buf_t *b, const metric_t *c)
{
    char num[64];
    buf_str(b, c->name);
    if (c->labels) {
        buf_add(b, "{", 1);
        buf_str(b, c->labels);
        buf_add(b, "}", 1);
    }
    if (c->is_gauge)
        s_fmt_double(num, sizeof num, c->value);
    else
        snprintf(num, sizeof num, "%" PRIu64, c->count);
    buf_add(b, " ", 1);
    buf_str(b, num);
    buf_add(b, "\n", 1);
}

char *metrics_render(const metrics_t *m)
{
    lx_buf_t b = {0};
    buf_add(&b, "", 0);
    if (!m)
        return b.p;
    for (const metric_t *c = m->head; c; c = c->next) {
        /* Emit each name's group once, at its first registration: the
         * format wants all samples of a name together after one HELP and
         * TYPE. Registries are a few dozen entries, so quadratic is fine. */
        const metric_t *e = m->head;
        while (e != c && strcmp(e->name, c->name) != 0)
            e = e->next;
        if (e != c)
            continue;
        buf_str(&b, "# HELP ");
        buf_str(&b, c->name);
        buf_add(&b, " ", 1);
        s_help_escape(&b, c->help);
        buf_str(&b, "\n# TYPE ");
        buf_str(&b, c->name);
        buf_str(&b, c->is_gauge ? " gauge\n" : " counter\n");
        for (const metric_t *s = c; s; s = s->next)
            if (strcmp(s->name, c->name) == 0)
                s_render_sample(&b, s);
    }
    return b.p;
}

/* ---- HTTP server ------------------------------------------------------ */

/* Sends the one reply a request gets. body is copied. */
static void s_reply(struct evhttp_request *req, int code, const char *reason,
                    const char *content_type, const char *body)
{
    struct evkeyvalq *hdr = evhttp_request_get_output_headers(req);
    size_t n = strlen(body);
    evhttp_add_header(hdr, "Content-Type", content_type);
    evhttp_add_header(hdr, "Cache-Control", "no-store");
    if (evhttp_request_get_command(req) == EVHTTP_REQ_HEAD) {
        /* evhttp 2.1 would send a HEAD reply's body and omit its length,
         * which corrupts keep-alive connections: give the length a GET
         * would have, and no body. */
        char len[32];
        snprintf(len, sizeof len, "%zu", n);
        evhttp_add_header(hdr, "Content-Length", len);
        evhttp_send_reply(req, code, reason, NULL);
        return;
    }
    struct evbuffer *out = evbuffer_new();
    if (out)
        evbuffer_add(out, body, n);
    evhttp_send_reply(req, code, reason, out);
    if (out)
        evbuffer_free(out);
}

#define S_TEXT "text/plain; charset=utf-8"

static void s_healthz(lx_http_t *h, struct evhttp_request *req)
{
    (void)h;
    s_reply(req, 200, "OK", S_TEXT, "ok\n");
}

static void s_readyz(lx_http_t *h, struct evhttp_request *req)
{
    const char *why = h->ready ? h->ready(h->arg) : NULL;
    if (!why) {
        s_reply(req, 200, "OK", S_TEXT, "ready\n");
        return;
    }
    char *body = xasprintf("not ready: %s\n", why);
    s_reply(req, 503, "Service Unavailable", S_TEXT, body);
    free(body);
}

static void s_metrics(lx_http_t *h, struct evhttp_request *req)
{
    char *body = metrics_render(h->metrics);
    s_reply(req, 200, "OK", "text/plain; version=0.0.4; charset=utf-8", body);
    free(body);
}

static const struct {
    const char *path;
    void (*handle)(lx_http_t *h, struct evhttp_request *req);
} s_routes[] = {
    {"/healthz", s_healthz},
    {"/readyz", s_readyz},
    {"/metrics", s_metrics},
};

static void s_on_request(struct evhttp_request *req, void *arg)
{
    lx_http_t *h = arg;
    const struct evhttp_uri *uri = evhttp_request_get_evhttp_uri(req);
    const char *path = uri ? evhttp_uri_get_path(uri) : NULL;
    size_t i = 0;
    while (path && i < LX_ARRAY_LEN(s_routes) && strcmp(path, s_routes[i].path) != 0)
        i++;
    if (!path || i == LX_ARRAY_LEN(s_routes)) {
        s_reply(req, 404, "Not Found", S_TEXT, "not found\n");
        return;
    }
    enum evhttp_cmd_type cmd = evhttp_request_get_command(req);
    if (cmd != EVHTTP_REQ_GET && cmd != EVHTTP_REQ_HEAD) {
        evhttp_add_header(evhttp_request_get_output_headers(req), "Allow", "GET, HEAD");
        s_reply(req, 405, "Method Not Allowed", S_TEXT, "method not allowed\n");
        return;
    }
    s_routes[i].handle(h, req);
}

/* Splits "host:port" (host may be "[v6]" or empty for all addresses) into
 * a new host string and a port. Returns 0 or -1. */
static int s_split_addr(const char *addr, char **host, uint16_t *port)
{
    const char *colon = strrchr(addr, ':');
    if (!colon || !colon[1] || strlen(colon + 1) > 5)
        return -1;
    unsigned long p = 0;
    for (const char *s = colon + 1; *s; s++) {
        if (*s < '0' || *s > '9')
            return -1;
        p = p * 10 + (unsigned long)(*s - '0');
    }
    if (p > 65535)
        return -1;
    size_t hlen = (size_t)(colon - addr);
    if (hlen >= 2 && addr[0] == '[' && addr[hlen - 1] == ']')
        *host = xstrndup(addr + 1, hlen - 2);
    else if (memchr(addr, ':', hlen))
        return -1;  /* a bare IPv6 address needs brackets */
    else
        *host = hlen ? xstrndup(addr, hlen) : xstrdup("0.0.0.0");
    *port = (uint16_t)p;
    return 0;
}

lx_http_t *http_new(struct event_base *base, const char *addr, metrics_t *metrics,
                    http_ready_fn *ready, void *arg)
{
    lx_http_t *h = NULL;
    char *host = NULL;
    uint16_t port = 0;
    if (!base || !addr || s_split_addr(addr, &host, &port) < 0) {
        log_error("http", "bad listen address addr=%s (want host:port)", addr ? addr : "(null)");
        goto fail;
    }
    h = xcalloc(1, sizeof *h);
    h->metrics = metrics;
    h->ready = ready;
    h->arg = arg;
    if (!(h->http = evhttp_new(base))) {
        log_error("http", "evhttp_new failed addr=%s", addr);
        goto fail;
    }
    /* Let every method reach s_on_request so it can answer 405 rather than
     * evhttp's 501 for methods outside its default set. */
    evhttp_set_allowed_methods(h->http, EVHTTP_REQ_GET | EVHTTP_REQ_POST | EVHTTP_REQ_HEAD |
                                            EVHTTP_REQ_PUT | EVHTTP_REQ_DELETE |
                                            EVHTTP_REQ_OPTIONS | EVHTTP_REQ_TRACE |
                                            EVHTTP_REQ_CONNECT | EVHTTP_REQ_PATCH);
    evhttp_set_max_headers_size(h->http, S_MAX_HEADERS);
    evhttp_set_max_body_size(h->http, S_MAX_BODY);
    evhttp_set_timeout(h->http, S_TIMEOUT_S);
    evhttp_set_gencb(h->http, s_on_request, h);

    errno = 0;
    struct evhttp_bound_socket *sock = evhttp_bind_socket_with_handle(h->http, host, port);
    if (!sock) {
        log_error("http", "cannot listen addr=%s err=%s", addr,
                  errno ? strerror(errno) : "address not usable");
        goto fail;
    }
    struct sockaddr_storage ss;
    socklen_t sslen = sizeof ss;
    if (getsockname(evhttp_bound_socket_get_fd(sock), (struct sockaddr *)&ss, &sslen) < 0) {
        log_error("http", "getsockname failed addr=%s err=%s", addr, strerror(errno));
        goto fail;
    }
    if (ss.ss_family == AF_INET6)
        h->port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    else
        h->port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    log_info("http", "listening addr=%s port=%d", addr, h->port);
    free(host);
    return h;

fail:
    http_destroy(&h);
    free(host);
    return NULL;
}

int http_port(const lx_http_t *h)
{
    return h ? h->port : -1;
}

void http_destroy(lx_http_t **h_p)
{
    if (!h_p || !*h_p)
        return;
    lx_http_t *h = *h_p;
    if (h->http)
        evhttp_free(h->http);
    free(h);
    *h_p = NULL;
}
