/* Outbox relay and replay endpoint.
 *
 * A service writes its state change and its event rows into <schema>.outbox
 * in one transaction, numbering the events as it writes them under the
 * stream row's lock, so numbers are gap-free and transactions commit in
 * number order (see the registry's 001_schema.sql). The relay reads what is
 * past the last number it published (<schema>.outbox_read) and publishes
 * it on the PUB socket as [stream][Envelope]: only committed events, in
 * order. It wakes on LISTEN/NOTIFY, on outbox_kick() from the service after
 * a commit, and on a one-second timer (the fallback when a notification is
 * lost), which also publishes a Heartbeat with the newest number so
 * subscribers notice a lost tail. At start it takes the newest committed
 * number as published: subscribers replay anything older they lack.
 *
 * Replay answers a Replay command from the table (<schema>.outbox_read),
 * so a subscriber that starts late, restarts or drops messages catches up
 * from its last applied position. <schema>.outbox_state(stream) gives the
 * epoch and newest number. */
#ifndef LINLI_OUTBOX_H
#define LINLI_OUTBOX_H

#include "bus.h"
#include "cmdsrv.h"

#include <event2/event.h>
#include <stdbool.h>

typedef struct outbox outbox_t;

/* Opens two connections to conninfo (one for reads and replays, one that
 * LISTENs on "<schema>_outbox") and publishes on pub (borrowed). source names
 * the producer in envelopes. Returns NULL (logged) on failure. */
outbox_t *outbox_new(struct event_base *base, const char *conninfo, const char *schema,
                     const char *stream, const char *source, bus_sock_t *pub);
/* Accepts NULL; NULLs *o_p. */
void outbox_destroy(outbox_t **o_p);

/* Read and publish now (cheap when called often: runs are coalesced). */
void outbox_kick(outbox_t *o);

/* Answers req, whose command is a Replay, with a ReplayResult. Takes *req_p. */
void outbox_replay(outbox_t *o, cmdsrv_t *srv, cmdsrv_req_t **req_p);

/* True while both connections are up. */
bool outbox_ready(const outbox_t *o);
/* The stream's epoch and newest published sequence. */
void outbox_position(const outbox_t *o, uint64_t *epoch, uint64_t *sequence);
/* Events published since start (for /metrics). */
unsigned long long outbox_published(const outbox_t *o);

#endif
