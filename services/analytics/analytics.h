/* The analytics daemon core: turns registry events into live counters in
 * Redis (key scheme in common/counters.h).
 *
 * Consecutive events that arrive together (up to 1,000) become ONE script
 * call (EVALSHA, EVAL after NOSCRIPT) that, atomically in Redis, checks the
 * stored stream position, applies the events' INCRBY/PFADD/HINCRBY/HSET
 * operations, merged (a thousand check-ins at one activity are one INCRBY
 * of 1000), and stores the new position, so an event applied twice (a
 * replay, a restart) changes nothing. All calls go down one hiredis
 * connection, which keeps them in stream order.
 *
 * When Redis and the subscriber's idea of the position may have diverged
 * (the connection dropped with replies outstanding, or a script reported a
 * gap or a stale epoch), the daemon resynchronises: it drops the
 * subscriber, waits for the outstanding replies, reads the position Redis
 * holds and subscribes again from there. The same path bounds memory when
 * Redis falls behind: past 50,000 events in flight, intake pauses that way. */
#ifndef LINLI_ANALYTICS_H
#define LINLI_ANALYTICS_H

#include "envelope.h"

#include <event2/event.h>
#include <stdint.h>

typedef struct analytics analytics_t;

typedef struct {
    const char *redis;         /* "host:port" or "/path/to/socket" */
    const char *prefix;        /* Redis key prefix, see counters_prefix_valid() */
    int tz_offset_min;         /* city time zone for daily unique counts */
    const char *registry_pub;  /* registry PUB endpoint; NULL: no subscriber (tests
                                * feed events through analytics_apply_event) */
    const char *registry_cmd;  /* registry command endpoint, for replays */
    const char *http_addr;     /* /healthz /readyz /metrics listen address; NULL: none */
} analytics_opts_t;

/* Fills opts from configuration: LINLI_REDIS, LINLI_REDIS_PREFIX,
 * LINLI_TZ_OFFSET_MIN, LINLI_REGISTRY_PUB, LINLI_REGISTRY_CMD,
 * LINLI_ANALYTICS_HTTP (unset: no HTTP server). Strings are borrowed from
 * config. Returns 0, or -1 (logged) on an invalid value. */
int analytics_opts_from_config(analytics_opts_t *opts);

/* Builds the service in base: starts connecting to Redis (reconnecting with
 * back-off for as long as it lives), reads the applied position and, with
 * registry_pub set, subscribes to the registry stream from there. An
 * unreachable Redis is not an error here: the service keeps trying and
 * reports not ready meanwhile. Returns NULL (logged) on invalid options or
 * when the HTTP server cannot listen. opts strings are copied. */
analytics_t *analytics_new(struct event_base *base, const analytics_opts_t *opts);

/* Frees everything; outstanding Redis calls are abandoned (their replies,
 * if Redis executed them, are in Redis all the same). Accepts NULL; NULLs
 * *a_p. Call outside the loop's callbacks. */
void analytics_destroy(analytics_t **a_p);

/* Queues ev for the next script call, sent once the events that arrived
 * with it are queued too (the subscriber's sub_apply_fn, exposed for
 * tests). ev is borrowed. Envelopes that are not events, or whose
 * event is one analytics does not count, still advance the position.
 * Returns 0 when the call was queued, -1 (logged and counted) when it was
 * not: no Redis connection, a resynchronisation under way, or an envelope
 * without stream/epoch/sequence. */
int analytics_apply_event(analytics_t *a, const Linli__Envelope *ev);

/* Script calls sent and not yet answered, plus one while events wait to be
 * sent. */
int analytics_pending(const analytics_t *a);

/* 1 when connected to Redis (the connect callback has fired), else 0. */
int analytics_redis_connected(const analytics_t *a);

/* Stops intake (drops the subscriber) and exits the loop once every
 * outstanding Redis reply has arrived, or after deadline_ms. */
void analytics_stop(analytics_t *a, int deadline_ms);

typedef struct {
    unsigned long long applied;     /* script returned 1: the event changed counters */
    unsigned long long duplicates;  /* script returned 0: already applied */
    unsigned long long stale;       /* old epoch, or a reset under way: ignored */
    unsigned long long gaps;        /* script saw a sequence past the next one */
    unsigned long long errors;      /* Redis errors, lost connections, unsent calls */
    unsigned long long resyncs;     /* resynchronisations started */
} analytics_stats_t;

void analytics_stats(const analytics_t *a, analytics_stats_t *out);

#endif
