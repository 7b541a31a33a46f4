/* Decoding, validation, encoding and building of Envelopes (see envelope.h).
 * Everything that arrives from a socket passes through envelope_decode before
 * any other code looks at it. */
#include "envelope.h"

#include "pbjson.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int s_len_ok(const char *s, size_t max)
{
    return !s || strnlen(s, max + 1) <= max;
}

int envelope_validate(const Linli__Envelope *e, char *why, size_t whylen)
{
    if (!s_len_ok(e->idempotency_key, ENVELOPE_MAX_KEY)) {
        snprintf(why, whylen, "idempotency_key longer than %d bytes", ENVELOPE_MAX_KEY);
        return -1;
    }
    const char *names[] = { e->source, e->type, e->trace_id, e->stream };
    const char *labels[] = { "source", "type", "trace_id", "stream" };
    for (size_t i = 0; i < LX_ARRAY_LEN(names); i++) {
        if (!s_len_ok(names[i], ENVELOPE_MAX_NAME)) {
            snprintf(why, whylen, "%s longer than %d bytes", labels[i], ENVELOPE_MAX_NAME);
            return -1;
        }
    }
    if (e->id && e->id[0] && !uuid_valid(e->id)) {
        snprintf(why, whylen, "id is not a UUID");
        return -1;
    }
    if (e->community_id < 0) {
        snprintf(why, whylen, "community_id is negative");
        return -1;
    }
    switch (e->payload_case) {
    case LINLI__ENVELOPE__PAYLOAD_COMMAND:
        if (!e->command || !envelope_command_name(e->command)) {
            snprintf(why, whylen, "command envelope without a command");
            return -1;
        }
        break;
    case LINLI__ENVELOPE__PAYLOAD_REPLY:
        if (!e->reply) {
            snprintf(why, whylen, "empty reply");
            return -1;
        }
        break;
    case LINLI__ENVELOPE__PAYLOAD_EVENT:
        /* An event with no member we know is valid: a newer producer may
         * publish types this build has never heard of, and subscribers must
         * still advance past them. */
        if (!e->event) {
            snprintf(why, whylen, "event envelope without an event");
            return -1;
        }
        break;
    case LINLI__ENVELOPE__PAYLOAD_HEARTBEAT:
        if (!e->heartbeat) {
            snprintf(why, whylen, "empty heartbeat");
            return -1;
        }
        break;
    default:
        snprintf(why, whylen, "envelope has no payload");
        return -1;
    }
    return 0;
}

Linli__Envelope *envelope_decode(const void *buf, size_t len, const char **code, char *why,
                                 size_t whylen)
{
    if (len > ENVELOPE_MAX_BYTES) {
        *code = ENVELOPE_E_TOO_LARGE;
        snprintf(why, whylen, "frame of %zu bytes exceeds %d", len, ENVELOPE_MAX_BYTES);
        return NULL;
    }
    Linli__Envelope *e = linli__envelope__unpack(NULL, len, buf);
    if (!e) {
        *code = ENVELOPE_E_MALFORMED;
        snprintf(why, whylen, "frame is not a valid Envelope");
        return NULL;
    }
    if (envelope_validate(e, why, whylen) < 0) {
        *code = ENVELOPE_E_INVALID;
        linli__envelope__free_unpacked(e, NULL);
        return NULL;
    }
    return e;
}

uint8_t *envelope_encode(const Linli__Envelope *e, size_t *len)
{
    size_t n = linli__envelope__get_packed_size(e);
    uint8_t *buf = xmalloc(n);
    *len = linli__envelope__pack(e, buf);
    return buf;
}

void envelope_free(Linli__Envelope **e_p)
{
    if (e_p && *e_p) {
        linli__envelope__free_unpacked(*e_p, NULL);
        *e_p = NULL;
    }
}

const char *envelope_command_name(const Linli__Command *cmd)
{
    return pbjson_oneof_case_name(&cmd->base, "create_community");
}

const char *envelope_event_name(const Linli__Event *ev)
{
    return pbjson_oneof_case_name(&ev->base, "community_created");
}

Linli__Envelope *envelope_reply_new(const Linli__Envelope *req, const char *source,
                                    Linli__Reply *reply)
{
    Linli__Envelope *e = xmalloc(sizeof *e);
    linli__envelope__init(e);
    char id[37];
    uuid_new(id);
    e->id = xstrdup(id);
    if (req && req->idempotency_key && req->idempotency_key[0])
        e->idempotency_key = xstrdup(req->idempotency_key);
    if (req && req->trace_id && req->trace_id[0])
        e->trace_id = xstrdup(req->trace_id);
    e->source = xstrdup(source);
    e->type = xstrdup("reply");
    e->occurred_at = now_ms();
    e->community_id = req ? req->community_id : 0;
    e->payload_case = LINLI__ENVELOPE__PAYLOAD_REPLY;
    e->reply = reply;
    if (req && req->id && req->id[0]) {
        if (reply->request_id && reply->request_id != protobuf_c_empty_string)
            free(reply->request_id);
        reply->request_id = xstrdup(req->id);
    }
    return e;
}

Linli__Reply *envelope_error_reply(const char *code, const char *message)
{
    Linli__Reply *r = xmalloc(sizeof *r);
    linli__reply__init(r);
    r->ok = 0;
    r->error = xmalloc(sizeof *r->error);
    linli__error__init(r->error);
    r->error->code = xstrdup(code);
    r->error->message = xstrdup(message ? message : code);
    return r;
}
