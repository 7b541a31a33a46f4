/* Command server: a ROUTER socket that receives command envelopes and sends
 * exactly one reply for each. Frames that fail to decode or validate are
 * answered at once with an error reply (when they carry enough to route
 * one) and never reach the service. Everything else is handed to the
 * service's handler as a request, which the service answers with
 * cmdsrv_reply() now or later (after a database commit). */
#ifndef LINLI_CMDSRV_H
#define LINLI_CMDSRV_H

#include "envelope.h"

#include <event2/event.h>
#include <stdbool.h>

typedef struct cmdsrv cmdsrv_t;
typedef struct cmdsrv_req cmdsrv_req_t;

/* Called for each valid command. The handler owns req from here on and must
 * pass it to cmdsrv_reply() exactly once. req's envelope stays valid until
 * then. */
typedef void(cmdsrv_fn)(cmdsrv_t *srv, cmdsrv_req_t *req, void *arg);

/* Binds a ROUTER to endpoint. source names us in reply envelopes. Returns NULL
 * (logged) on failure. */
cmdsrv_t *cmdsrv_new(struct event_base *base, void *zctx, const char *endpoint,
                     const char *source, cmdsrv_fn *fn, void *arg);
/* Requests not yet answered are dropped (their peers time out and retry).
 * Accepts NULL; NULLs *srv_p. */
void cmdsrv_destroy(cmdsrv_t **srv_p);

/* The decoded, validated request envelope (borrowed; a command is set). */
const Linli__Envelope *cmdsrv_req_envelope(const cmdsrv_req_t *req);
/* Microseconds (monotonic) when the request was received. */
int64_t cmdsrv_req_received(const cmdsrv_req_t *req);

/* Sends reply (ownership taken; heap-built) for *req_p, frees the request and
 * NULLs *req_p. A peer that has gone is not an error. */
void cmdsrv_reply(cmdsrv_t *srv, cmdsrv_req_t **req_p, Linli__Reply *reply);
/* Shorthand for an error reply. */
void cmdsrv_reply_error(cmdsrv_t *srv, cmdsrv_req_t **req_p, const char *code,
                        const char *message);

/* Stops (true) or resumes (false) taking requests: during shutdown the socket
 * is no longer read, so nothing new is accepted while the rest drains. */
void cmdsrv_pause(cmdsrv_t *srv, bool paused);
/* Requests handed to the service and not yet answered. */
int cmdsrv_outstanding(const cmdsrv_t *srv);
/* The endpoint bound (borrowed). */
const char *cmdsrv_endpoint(const cmdsrv_t *srv);
/* Counters for /metrics. */
void cmdsrv_stats(const cmdsrv_t *srv, unsigned long long *received,
                  unsigned long long *rejected, unsigned long long *replied);

#endif
