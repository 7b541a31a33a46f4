/* Event subscriber with gap detection and replay (the zguide Clone pattern).
 *
 * It subscribes to the producer's PUB endpoint first, then asks the
 * producer's command endpoint to replay everything after the position the
 * caller last applied. Live events at or below the applied position are
 * dropped; an event past the next expected sequence (a gap: the producer or
 * the network dropped some under the high-water mark) or a heartbeat that
 * shows a newer sequence starts a replay from the applied position. A new
 * epoch means the producer's history restarted: the caller's on_epoch
 * callback resets its derived state, and replay starts at sequence 0.
 *
 * apply is called once per event, in sequence order, with no gaps, from
 * the loop. The caller must make applying idempotent anyway (record the
 * applied position with its own change), because after a crash it restarts
 * from the position it stored. */
#ifndef LINLI_SUB_H
#define LINLI_SUB_H

#include "envelope.h"

#include <event2/event.h>
#include <stdint.h>

typedef struct sub sub_t;

/* ev is borrowed (valid during the call). */
typedef void(sub_apply_fn)(const Linli__Envelope *ev, void *arg);
/* The producer's stream now has a different epoch: drop state derived from
 * the old one. Events of the new epoch follow from sequence 1. */
typedef void(sub_epoch_fn)(uint64_t new_epoch, void *arg);

typedef struct {
    const char *pub_endpoint;  /* producer's PUB, e.g. LINLI_REGISTRY_PUB */
    const char *cmd_endpoint;  /* producer's ROUTER, for Replay commands */
    const char *stream;        /* "registry" */
    const char *source;        /* our name, for the Replay envelopes */
    uint64_t epoch;            /* last applied position; 0/0 = from the start */
    uint64_t sequence;
    unsigned replay_batch;     /* events per replay request; 0 = 1000 */
} sub_opts_t;

/* Returns NULL (logged) when the sockets cannot be set up. */
sub_t *sub_new(struct event_base *base, void *zctx, const sub_opts_t *opts, sub_apply_fn *apply,
               sub_epoch_fn *on_epoch, void *arg);
/* Accepts NULL; NULLs *s_p. */
void sub_destroy(sub_t **s_p);

/* The last applied position. */
void sub_position(const sub_t *s, uint64_t *epoch, uint64_t *sequence);
/* True once a replay has caught up with the producer at least once. */
int sub_caught_up(const sub_t *s);
/* Counters for /metrics: events applied, live events dropped as duplicates,
 * gaps detected, replay requests sent. */
void sub_stats(const sub_t *s, unsigned long long *applied, unsigned long long *dupes,
               unsigned long long *gaps, unsigned long long *replays);

#endif
