/* What the load generators share: reading one reply from a DEALER socket.
 * Each generator is a program of its own, so this is a header. */
#ifndef LINLI_BENCH_H
#define LINLI_BENCH_H

#include "envelope.h"

#include <stdlib.h>
#include <string.h>
#include <zmq.h>

/* Receives one message from zs without waiting. Returns -1 when nothing is
 * waiting, 0 for a message that is not a reply to one of the n commands
 * (dropped), or 1 with the reply in *out (free it with
 * linli__envelope__free_unpacked) and the command's index, which the
 * generators put in the last 12 hex digits of the command's id, in *idx. */
static inline int bench_reply(void *zs, int n, Linli__Envelope **out, int *idx)
{
    zmq_msg_t m;
    zmq_msg_init(&m);
    if (zmq_msg_recv(&m, zs, ZMQ_DONTWAIT) < 0) {
        zmq_msg_close(&m);
        return -1;
    }
    Linli__Envelope *r = linli__envelope__unpack(NULL, zmq_msg_size(&m), zmq_msg_data(&m));
    zmq_msg_close(&m);
    if (!r || r->payload_case != LINLI__ENVELOPE__PAYLOAD_REPLY || !r->reply->request_id ||
        strlen(r->reply->request_id) != 36) {
        if (r)
            linli__envelope__free_unpacked(r, NULL);
        return 0;
    }
    *idx = (int)strtol(r->reply->request_id + 24, NULL, 16);
    if (*idx < 0 || *idx >= n) {
        linli__envelope__free_unpacked(r, NULL);
        return 0;
    }
    *out = r;
    return 1;
}

#endif
