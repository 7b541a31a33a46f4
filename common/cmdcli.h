/* Command clients (DEALER). A command envelope goes to the owning service's
 * ROUTER and gets exactly one reply envelope, matched by the request id.
 * Retries reuse the idempotency key, so the service answers with its first
 * reply. */
#ifndef LINLI_CMDCLI_H
#define LINLI_CMDCLI_H

#include "envelope.h"

#include <event2/event.h>

typedef struct cmdcli cmdcli_t;

/* Fills in a command envelope around cmd (ownership of cmd passes to the
 * envelope): a new id, the given idempotency key (NULL: a new UUID), source,
 * type "<service>.<command>", occurred_at now. Free the result with
 * protobuf_c_message_free_unpacked(&env->base, NULL). */
Linli__Envelope *cmdcli_envelope(const char *service, const char *source, const char *key,
                                 int64_t community_id, Linli__Command *cmd);

/* Blocking call for tools and tests (no event loop): sends req to endpoint
 * and waits up to timeout_ms for the reply with the same id. Returns 0 and
 * the reply in *reply (caller frees with envelope_free), LX_AGAIN on timeout,
 * -1 on other errors (logged). zctx may be shared across calls. */
int cmdcli_call(void *zctx, const char *endpoint, const Linli__Envelope *req, int timeout_ms,
                Linli__Envelope **reply);

/* Called with the reply (borrowed: valid during the call) or NULL when no
 * reply came within the timeout. */
typedef void(cmdcli_reply_fn)(const Linli__Envelope *reply, void *arg);

/* An asynchronous client in the loop: one DEALER connected to endpoint.
 * Returns NULL (logged) on failure. */
cmdcli_t *cmdcli_new(struct event_base *base, void *zctx, const char *endpoint);
/* Pending requests are answered with NULL. Accepts NULL; NULLs *c_p. */
void cmdcli_destroy(cmdcli_t **c_p);
/* Sends req (borrowed: encoded before return). fn is called exactly once.
 * Returns 0, or -1 when the request could not be sent (fn is not called). */
int cmdcli_send(cmdcli_t *c, const Linli__Envelope *req, int timeout_ms, cmdcli_reply_fn *fn,
                void *arg);
/* Requests sent and not yet answered. */
int cmdcli_pending(const cmdcli_t *c);

#endif
