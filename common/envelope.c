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

/* Reads a varint at p[*i], p[len] the end; 0 when it runs off the end. */
static int s_varint(const uint8_t *p, size_t len, size_t *i, uint64_t *out)
{
    uint64_t v = 0;
    for (unsigned shift = 0; *i < len && shift < 64; shift += 7) {
        uint8_t b = p[(*i)++];
        v |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return 1;
        }
    }
    return 0;
}

/* protobuf-c unpacks sub-messages by recursion without a depth limit, and an
 * Envelope can hold Envelopes (reply.replay.events), so a frame of a few tens
 * of kilobytes would exhaust the stack. This walks the wire format first and
 * returns -1 when messages nest deeper than ENVELOPE_MAX_DEPTH (the top one
 * is 1), else 0. Bytes it cannot follow are left for unpack to refuse: unpack
 * gives up on a message before it descends into any of its fields. */
static int s_depth_check(const ProtobufCMessageDescriptor *d, const uint8_t *p, size_t len,
                         int depth)
{
    if (depth > ENVELOPE_MAX_DEPTH)
        return -1;
    size_t i = 0;
    uint64_t key, n;
    while (i < len) {
        if (!s_varint(p, len, &i, &key))
            return 0;
        switch (key & 7) {
        case 0:
            if (!s_varint(p, len, &i, &n))
                return 0;
            break;
        case 1:
            if (len - i < 8)
                return 0;
            i += 8;
            break;
        case 5:
            if (len - i < 4)
                return 0;
            i += 4;
            break;
        case 2: {
            if (!s_varint(p, len, &i, &n) || n > len - i)
                return 0;
            const ProtobufCFieldDescriptor *f =
                key >> 3 <= UINT32_MAX
                    ? protobuf_c_message_descriptor_get_field(d, (unsigned)(key >> 3))
                    : NULL;
            if (f && f->type == PROTOBUF_C_TYPE_MESSAGE &&
                s_depth_check(f->descriptor, p + i, (size_t)n, depth + 1) < 0)
                return -1;
            i += (size_t)n;
            break;
        }
        default:
            return 0;
        }
    }
    return 0;
}

int envelope_peek_id(const void *buf, size_t len, char id[37])
{
    if (len > ENVELOPE_MAX_BYTES || s_depth_check(&linli__envelope__descriptor, buf, len, 1) < 0)
        return 0;
    Linli__Envelope *e = linli__envelope__unpack(NULL, len, buf);
    int ok = e && e->id && uuid_valid(e->id);
    if (ok)
        memcpy(id, e->id, 37);
    if (e)
        linli__envelope__free_unpacked(e, NULL);
    return ok;
}

Linli__Envelope *envelope_decode(const void *buf, size_t len, const char **code, char *why,
                                 size_t whylen)
{
    if (len > ENVELOPE_MAX_BYTES) {
        *code = ENVELOPE_E_TOO_LARGE;
        snprintf(why, whylen, "frame of %zu bytes exceeds %d", len, ENVELOPE_MAX_BYTES);
        return NULL;
    }
    if (s_depth_check(&linli__envelope__descriptor, buf, len, 1) < 0) {
        *code = ENVELOPE_E_MALFORMED;
        snprintf(why, whylen, "messages nested deeper than %d", ENVELOPE_MAX_DEPTH);
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

const uint8_t *envelope_encode_to(const Linli__Envelope *e, envelope_buf_t *b, size_t *len)
{
    size_t n = linli__envelope__get_packed_size(e);
    /* grown for one large message (a replay), it goes back to 4 KiB at the
     * next small one */
    if (n > b->cap || !b->p || (b->cap > 65536 && n <= 4096)) {
        free(b->p);
        b->cap = n > 4096 ? n : 4096;
        b->p = xmalloc(b->cap);
    }
    *len = linli__envelope__pack(e, b->p);
    return b->p;
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
