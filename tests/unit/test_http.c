/* Unit tests for common/http.c: a server on 127.0.0.1:0 and evhttp's client
 * in the same event loop, so each request runs the loop until its reply
 * arrives; plus the metrics registry's rendering on its own, and a raw
 * socket for what the evhttp client will not send. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <cmocka.h>
#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>

#include "http.h"

typedef struct {
    struct event_base *base;
    metrics_t *metrics;
    metric_t *commands;
    lx_http_t *http;
    const char *not_ready;  /* what the readiness callback returns */
    int ready_calls;
} s_fix_t;

typedef struct {
    struct event_base *base;
    int code;            /* -1: no response */
    char *body;          /* owned */
    char *content_type;  /* owned */
    char *allow;         /* owned */
    char *content_length;/* owned */
} s_resp_t;

static const char *s_ready(void *arg)
{
    s_fix_t *f = arg;
    f->ready_calls++;
    return f->not_ready;
}

static int s_setup(void **state)
{
    s_fix_t *f = calloc(1, sizeof *f);
    assert_non_null(f);
    f->base = event_base_new();
    assert_non_null(f->base);
    f->metrics = metrics_new("linli_test");
    f->commands = metrics_add(f->metrics, "commands_total", "counter", "Commands handled.", NULL);
    f->http = http_new(f->base, "127.0.0.1:0", f->metrics, s_ready, f);
    assert_non_null(f->http);
    assert_true(http_port(f->http) > 0);
    *state = f;
    return 0;
}

static int s_teardown(void **state)
{
    s_fix_t *f = *state;
    http_destroy(&f->http);
    assert_null(f->http);
    http_destroy(&f->http);  /* accepts NULL */
    metrics_destroy(&f->metrics);
    assert_null(f->metrics);
    event_base_free(f->base);
    free(f);
    return 0;
}

static char *s_header(struct evhttp_request *req, const char *name)
{
    const char *v = evhttp_find_header(evhttp_request_get_input_headers(req), name);
    return v ? strdup(v) : NULL;
}

static void s_on_response(struct evhttp_request *req, void *arg)
{
    s_resp_t *r = arg;
    if (req && evhttp_request_get_response_code(req) > 0) {
        r->code = evhttp_request_get_response_code(req);
        struct evbuffer *in = evhttp_request_get_input_buffer(req);
        size_t n = evbuffer_get_length(in);
        r->body = malloc(n + 1);
        evbuffer_remove(in, r->body, n);
        r->body[n] = '\0';
        r->content_type = s_header(req, "Content-Type");
        r->allow = s_header(req, "Allow");
        r->content_length = s_header(req, "Content-Length");
    }
    event_base_loopbreak(r->base);
}

static void s_resp_free(s_resp_t *r)
{
    free(r->body);
    free(r->content_type);
    free(r->allow);
    free(r->content_length);
    memset(r, 0, sizeof *r);
}

/* Makes one request and runs the loop until its reply (or failure). */
static void s_request(s_fix_t *f, enum evhttp_cmd_type cmd, const char *path, s_resp_t *r)
{
    memset(r, 0, sizeof *r);
    r->base = f->base;
    r->code = -1;
    struct evhttp_connection *c =
        evhttp_connection_base_new(f->base, NULL, "127.0.0.1", (unsigned short)http_port(f->http));
    assert_non_null(c);
    evhttp_connection_set_timeout(c, 5);
    struct evhttp_request *req = evhttp_request_new(s_on_response, r);
    assert_non_null(req);
    evhttp_add_header(evhttp_request_get_output_headers(req), "Host", "127.0.0.1");
    assert_int_equal(evhttp_make_request(c, req, cmd, path), 0);
    event_base_dispatch(f->base);
    evhttp_connection_free(c);
}

static void s_expect(s_fix_t *f, enum evhttp_cmd_type cmd, const char *path, int code,
                     const char *body)
{
    s_resp_t r;
    s_request(f, cmd, path, &r);
    if (r.code != code)
        fail_msg("%s: status %d, want %d", path, r.code, code);
    assert_string_equal(r.body, body);
    s_resp_free(&r);
}

static void test_healthz(void **state)
{
    s_fix_t *f = *state;
    s_resp_t r;
    s_request(f, EVHTTP_REQ_GET, "/healthz", &r);
    assert_int_equal(r.code, 200);
    assert_string_equal(r.body, "ok\n");
    assert_non_null(r.content_type);
    assert_true(strncmp(r.content_type, "text/plain", 10) == 0);
    s_resp_free(&r);
    /* A query string does not change the path. */
    s_expect(f, EVHTTP_REQ_GET, "/healthz?verbose=1", 200, "ok\n");
}

static void test_head_has_no_body(void **state)
{
    s_fix_t *f = *state;
    s_resp_t r;
    s_request(f, EVHTTP_REQ_HEAD, "/healthz", &r);
    assert_int_equal(r.code, 200);
    assert_string_equal(r.body, "");
    assert_non_null(r.content_length);
    assert_string_equal(r.content_length, "3");
    s_resp_free(&r);
    s_request(f, EVHTTP_REQ_HEAD, "/metrics", &r);
    assert_int_equal(r.code, 200);
    assert_string_equal(r.body, "");
    s_resp_free(&r);
}

static void test_readyz_flip(void **state)
{
    s_fix_t *f = *state;
    s_expect(f, EVHTTP_REQ_GET, "/readyz", 200, "ready\n");
    f->not_ready = "database down";
    s_expect(f, EVHTTP_REQ_GET, "/readyz", 503, "not ready: database down\n");
    f->not_ready = "redis down";
    s_expect(f, EVHTTP_REQ_GET, "/readyz", 503, "not ready: redis down\n");
    f->not_ready = NULL;
    s_expect(f, EVHTTP_REQ_GET, "/readyz", 200, "ready\n");
    assert_int_equal(f->ready_calls, 4);
    /* Health does not depend on readiness. */
    f->not_ready = "draining";
    s_expect(f, EVHTTP_REQ_GET, "/healthz", 200, "ok\n");
    assert_int_equal(f->ready_calls, 4);
}

static void test_metrics_endpoint(void **state)
{
    s_fix_t *f = *state;
    metric_inc(f->commands, 1);
    metric_inc(f->commands, 2);
    s_resp_t r;
    s_request(f, EVHTTP_REQ_GET, "/metrics", &r);
    assert_int_equal(r.code, 200);
    assert_non_null(r.content_type);
    assert_true(strncmp(r.content_type, "text/plain; version=0.0.4", 25) == 0);
    assert_string_equal(r.body, "# HELP linli_test_commands_total Commands handled.\n"
                                "# TYPE linli_test_commands_total counter\n"
                                "linli_test_commands_total 3\n");
    s_resp_free(&r);

    /* Metrics added while serving show up on the next scrape. */
    metric_t *lag = metrics_add(f->metrics, "lag_seconds", "gauge", "Replication lag.",
                                "stream=\"registry\"");
    metric_set(lag, 0.25);
    s_request(f, EVHTTP_REQ_GET, "/metrics", &r);
    assert_int_equal(r.code, 200);
    assert_non_null(strstr(r.body, "\nlinli_test_commands_total 3\n"));
    assert_non_null(strstr(r.body, "# TYPE linli_test_lag_seconds gauge\n"
                                   "linli_test_lag_seconds{stream=\"registry\"} 0.25\n"));
    s_resp_free(&r);
}

static void test_not_found(void **state)
{
    s_fix_t *f = *state;
    const char *paths[] = {"/", "/healthz/", "/HEALTHZ", "/metricsx", "/ready", "//healthz",
                           "/healthz/../metrics", "/%68ealthz"};
    for (size_t i = 0; i < sizeof paths / sizeof *paths; i++)
        s_expect(f, EVHTTP_REQ_GET, paths[i], 404, "not found\n");
    /* Unknown path with another method: the path decides first. */
    s_expect(f, EVHTTP_REQ_POST, "/nope", 404, "not found\n");
}

static void test_method_not_allowed(void **state)
{
    s_fix_t *f = *state;
    enum evhttp_cmd_type cmds[] = {EVHTTP_REQ_POST, EVHTTP_REQ_PUT, EVHTTP_REQ_DELETE,
                                   EVHTTP_REQ_OPTIONS, EVHTTP_REQ_PATCH};
    const char *paths[] = {"/healthz", "/readyz", "/metrics"};
    for (size_t i = 0; i < sizeof cmds / sizeof *cmds; i++) {
        for (size_t j = 0; j < sizeof paths / sizeof *paths; j++) {
            s_resp_t r;
            s_request(f, cmds[i], paths[j], &r);
            if (r.code != 405)
                fail_msg("method %d %s: status %d", (int)cmds[i], paths[j], r.code);
            assert_non_null(r.allow);
            assert_string_equal(r.allow, "GET, HEAD");
            s_resp_free(&r);
        }
    }
    /* The readiness callback is not consulted for a refused method. */
    assert_int_equal(f->ready_calls, 0);
}

/* Raw requests over a plain socket, answered while the loop runs in steps;
 * returns what came back (caller frees) once the server closes or has been
 * quiet for 100 ms after answering. The write side stays open: evhttp drops
 * pipelined requests after a half-close. */
static char *s_raw(s_fix_t *f, const char *request)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(fd >= 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)http_port(f->http));
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(connect(fd, (struct sockaddr *)&sa, sizeof sa), 0);
    assert_int_equal(write(fd, request, strlen(request)), (ssize_t)strlen(request));
    evutil_make_socket_nonblocking(fd);
    char *out = calloc(1, 65536);
    assert_non_null(out);
    size_t len = 0;
    int quiet = 0;
    for (int spins = 0; spins < 3000 && quiet < 100; spins++) {
        event_base_loop(f->base, EVLOOP_NONBLOCK);
        ssize_t n = read(fd, out + len, 65535 - len);
        if (n == 0)
            break;
        if (n > 0) {
            len += (size_t)n;
            quiet = 0;
        } else {
            usleep(1000);
            quiet += len > 0;
        }
    }
    close(fd);
    return out;
}

static void test_raw_requests(void **state)
{
    s_fix_t *f = *state;
    /* A known-but-odd method reaches us and gets 405; one evhttp does not
     * know at all is refused by evhttp itself with 501. */
    char *resp = s_raw(f, "TRACE /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_true(strncmp(resp, "HTTP/1.1 405 ", 13) == 0);
    free(resp);
    resp = s_raw(f, "BREW /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_true(strncmp(resp, "HTTP/1.1 501 ", 13) == 0);
    free(resp);
    /* HEAD carries the GET body's length and no body, even on a kept-alive
     * connection where stray bytes would corrupt the next reply. */
    resp = s_raw(f, "HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n"
                    "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_true(strncmp(resp, "HTTP/1.1 200 ", 13) == 0);
    assert_non_null(strstr(resp, "\r\nContent-Length: 6\r\n"));
    char *second = strstr(resp, "\r\n\r\n");
    assert_non_null(second);
    assert_true(strncmp(second + 4, "HTTP/1.1 200 ", 13) == 0);
    assert_non_null(strstr(second, "\r\n\r\nok\n"));
    free(resp);
    resp = s_raw(f, "GET /healthz HTTP/1.0\r\n\r\n");
    assert_true(strncmp(resp, "HTTP/1.0 200 ", 13) == 0 || strncmp(resp, "HTTP/1.1 200 ", 13) == 0);
    assert_non_null(strstr(resp, "\r\n\r\nok\n"));
    free(resp);
    resp = s_raw(f, "garbage\r\n\r\n");
    assert_true(strncmp(resp, "HTTP/1.1 400 ", 13) == 0 || resp[0] == '\0');
    free(resp);
    /* The server still works afterwards. */
    s_expect(f, EVHTTP_REQ_GET, "/healthz", 200, "ok\n");
}

static void test_no_metrics_no_ready(void **state)
{
    (void)state;
    struct event_base *base = event_base_new();
    assert_non_null(base);
    s_fix_t f = {0};
    f.base = base;
    f.http = http_new(base, "127.0.0.1:0", NULL, NULL, NULL);
    assert_non_null(f.http);
    s_expect(&f, EVHTTP_REQ_GET, "/readyz", 200, "ready\n");
    s_expect(&f, EVHTTP_REQ_GET, "/metrics", 200, "");
    http_destroy(&f.http);
    event_base_free(base);
}

static void test_bad_addresses(void **state)
{
    s_fix_t *f = *state;
    const char *bad[] = {"", "127.0.0.1", "127.0.0.1:", "127.0.0.1:abc", "127.0.0.1:70000",
                         "127.0.0.1:-1", "127.0.0.1:123456", "::1:80", "no.such.host.invalid:0",
                         "127.0.0.1: 80"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
        if (http_new(f->base, bad[i], NULL, NULL, NULL) != NULL)
            fail_msg("accepted \"%s\"", bad[i]);
    assert_null(http_new(f->base, NULL, NULL, NULL, NULL));
    /* The port is taken by the fixture's server. */
    char addr[64];
    snprintf(addr, sizeof addr, "127.0.0.1:%d", http_port(f->http));
    assert_null(http_new(f->base, addr, NULL, NULL, NULL));
    assert_int_equal(http_port(NULL), -1);
}

static void test_ipv6_loopback(void **state)
{
    (void)state;
    struct event_base *base = event_base_new();
    assert_non_null(base);
    lx_http_t *h = http_new(base, "[::1]:0", NULL, NULL, NULL);
    if (!h) {
        event_base_free(base);
        skip();  /* no IPv6 in this sandbox */
    }
    assert_true(http_port(h) > 0);
    http_destroy(&h);
    event_base_free(base);
}

static void test_render(void **state)
{
    (void)state;
    metrics_t *m = metrics_new("linli_x");
    metric_t *a = metrics_add(m, "sent_total", "counter", "Messages sent.", "stream=\"a\"");
    metric_t *q = metrics_add(m, "queue_depth", "gauge", "Queue depth.\nWith \\ backslash.", NULL);
    metric_t *b = metrics_add(m, "sent_total", "counter", "ignored help", "stream=\"b\"");
    metric_t *big = metrics_add(m, "bytes_total", "counter", "", NULL);
    metric_t *g = metrics_add(m, "ratio", "gauge", "A ratio.", "");
    assert_ptr_equal(metrics_add(m, "sent_total", "counter", "again", "stream=\"a\""), a);
    assert_ptr_not_equal(a, b);
    metric_inc(a, 5);
    metric_inc(b, 7);
    metric_inc(b, 0);
    metric_set(q, 12);
    metric_inc(q, 3);
    metric_inc(big, UINT64_MAX);
    metric_set(g, 0.1);
    char *text = metrics_render(m);
    assert_string_equal(text, "# HELP linli_x_sent_total Messages sent.\n"
                              "# TYPE linli_x_sent_total counter\n"
                              "linli_x_sent_total{stream=\"a\"} 5\n"
                              "linli_x_sent_total{stream=\"b\"} 7\n"
                              "# HELP linli_x_queue_depth Queue depth.\\nWith \\\\ backslash.\n"
                              "# TYPE linli_x_queue_depth gauge\n"
                              "linli_x_queue_depth 15\n"
                              "# HELP linli_x_bytes_total \n"
                              "# TYPE linli_x_bytes_total counter\n"
                              "linli_x_bytes_total 18446744073709551615\n"
                              "# HELP linli_x_ratio A ratio.\n"
                              "# TYPE linli_x_ratio gauge\n"
                              "linli_x_ratio 0.1\n");
    free(text);

    /* Special and awkward doubles. */
    metric_set(g, NAN);
    text = metrics_render(m);
    assert_non_null(strstr(text, "\nlinli_x_ratio NaN\n"));
    free(text);
    metric_set(g, -INFINITY);
    text = metrics_render(m);
    assert_non_null(strstr(text, "\nlinli_x_ratio -Inf\n"));
    free(text);
    metric_set(g, INFINITY);
    text = metrics_render(m);
    assert_non_null(strstr(text, "\nlinli_x_ratio +Inf\n"));
    free(text);
    metric_set(g, 1.0 / 3.0);
    text = metrics_render(m);
    const char *line = strstr(text, "\nlinli_x_ratio ");
    assert_non_null(line);
    assert_true(strtod(line + 15, NULL) == 1.0 / 3.0);
    free(text);
    metric_set(g, -2.5e-300);
    text = metrics_render(m);
    assert_non_null(strstr(text, "\nlinli_x_ratio -2.5e-300\n"));
    free(text);
    metrics_destroy(&m);
    assert_null(m);
    metrics_destroy(&m);
    metrics_destroy(NULL);

    /* No prefix, empty registry, no registry. */
    m = metrics_new(NULL);
    text = metrics_render(m);
    assert_string_equal(text, "");
    free(text);
    metric_inc(metrics_add(m, "up", "gauge", "Up.", NULL), 1);
    text = metrics_render(m);
    assert_string_equal(text, "# HELP up Up.\n# TYPE up gauge\nup 1\n");
    free(text);
    metrics_destroy(&m);
    text = metrics_render(NULL);
    assert_string_equal(text, "");
    free(text);
    assert_null(metrics_add(NULL, "x", "counter", "", NULL));
    metric_inc(NULL, 1);
    metric_set(NULL, 1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_healthz, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_head_has_no_body, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_readyz_flip, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_metrics_endpoint, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_not_found, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_method_not_allowed, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_raw_requests, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_bad_addresses, s_setup, s_teardown),
        cmocka_unit_test(test_no_metrics_no_ready),
        cmocka_unit_test(test_ipv6_loopback),
        cmocka_unit_test(test_render),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
