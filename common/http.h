/* The small HTTP server every daemon runs beside its sockets (libevent
 * evhttp): /healthz (200 while the loop runs), /readyz (200 when the
 * service's readiness callback says so, else 503 with the reason), and
 * /metrics in the Prometheus text format. Every request gets exactly one
 * reply; anything else is 404, methods other than GET/HEAD are 405 (a
 * method name libevent does not know at all gets evhttp's own 501). */
#ifndef LINLI_HTTP_H
#define LINLI_HTTP_H

#include <event2/event.h>
#include <stdint.h>

typedef struct lx_http lx_http_t;
typedef struct metrics metrics_t;
typedef struct metric metric_t;

/* Returns NULL when ready, else a short reason (borrowed) such as
 * "database down". */
typedef const char *(http_ready_fn)(void *arg);

/* Listens on addr ("host:port"; "[v6addr]:port"; an empty host means all
 * IPv4 addresses; port 0 picks a free one) and serves on base. Returns NULL
 * with the reason logged when addr is malformed or cannot be bound. metrics,
 * ready and arg are borrowed and must outlive the server; metrics may be
 * NULL (empty /metrics), ready may be NULL (always ready). */
lx_http_t *http_new(struct event_base *base, const char *addr, metrics_t *metrics,
                    http_ready_fn *ready, void *arg);
/* The port actually bound (useful after port 0), or -1 for NULL. */
int http_port(const lx_http_t *h);
/* Stops listening and closes open connections. Accepts NULL; NULLs *h_p. */
void http_destroy(lx_http_t **h_p);

/* A registry of counters and gauges rendered by /metrics, used from the
 * loop's thread only. Returns a new empty registry the caller destroys.
 * Names become prefix_name; a NULL or empty prefix leaves names as given. */
metrics_t *metrics_new(const char *prefix);
/* Frees the registry and every metric in it. Accepts NULL; NULLs *m_p. */
void metrics_destroy(metrics_t **m_p);
/* Registers a metric (type "counter" or "gauge") and returns it; the
 * registry owns it. name and help are copied. labels may be NULL or a
 * Prometheus label set without braces, e.g. "stream=\"registry\"", copied
 * verbatim. Metrics sharing a name render under one HELP/TYPE (the first
 * one's help) and must share a type; registering the same name and labels
 * again returns the existing metric. Returns NULL only when m is NULL, so a
 * service without a registry can still call metric_inc/metric_set. A bad
 * name or type is a programmer error (assert). */
metric_t *metrics_add(metrics_t *m, const char *name, const char *type, const char *help,
                      const char *labels);
/* Adds n to a counter (or a gauge). Accepts NULL (does nothing). */
void metric_inc(metric_t *c, uint64_t n);
/* Sets a gauge; counters cannot be set. Accepts NULL (does nothing). */
void metric_set(metric_t *g, double v);
/* For a counter that mirrors a monotonic total kept elsewhere (e.g. a
 * module's own statistics): sets it to total, never lower. */
void metric_set_total(metric_t *c, uint64_t total);
/* Renders the registry as Prometheus text exposition 0.0.4, groups in
 * registration order; caller frees. A NULL or empty registry gives "". */
char *metrics_render(const metrics_t *m);

#endif
