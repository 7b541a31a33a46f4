/* Command server over a ROUTER socket (see cmdsrv.h). */
#include "cmdsrv.h"

#include "bus.h"
#include "log.h"
#include "util.h"

#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#define S_MAX_ROUTING_ID 256

struct cmdsrv {
    bus_sock_t *sock;            /* ROUTER */
    struct event_base *base;
    char *source;                /* our name in replies */
    cmdsrv_fn *fn;               /* the service's handler */
    void *arg;
    bool paused;
    int outstanding;
    envelope_buf_t enc;          /* replies are encoded here */
    unsigned long long received, rejected, replied;
};

struct cmdsrv_req {
    unsigned char rid[S_MAX_ROUTING_ID]; /* ROUTER routing id of the peer */
    size_t rid_len;
    bool delimited;              /* a REQ peer: replies need the empty frame too */
    Linli__Envelope *env;        /* decoded request, owned */
    int64_t received_us;
};

/* A REQ peer drops any reply that does not start with the empty delimiter
 * frame it sent, so echo it. */
static void s_send(cmdsrv_t *srv, const void *rid, size_t rid_len, bool delimited,
                   const Linli__Envelope *e)
{
    size_t len;
    const uint8_t *buf = envelope_encode_to(e, &srv->enc, &len);
    const void *data[3] = { rid, "", buf };
    size_t size[3] = { rid_len, 0, len };
    if (!delimited) {
        data[1] = buf;
        size[1] = len;
    }
    if (bus_send(srv->sock, delimited ? 3 : 2, data, size) != 0)
        log_debug("cmdsrv", "reply not delivered bytes=%zu", len);
    else
        srv->replied++;
}

/* Answers a refused frame; request_id (may be NULL) names the request when
 * the frame carried a readable one, so the client sees the error at once
 * rather than waiting out its timeout. */
static void s_reject(cmdsrv_t *srv, const bus_msg_t *msg, const char *code, const char *why,
                     const char *request_id)
{
    srv->rejected++;
    log_info("cmdsrv", "rejected frame code=%s why=%s", code, why);
    Linli__Reply *reply = envelope_error_reply(code, why);
    if (request_id)
        reply->request_id = xstrdup(request_id);
    Linli__Envelope *e = envelope_reply_new(NULL, srv->source, reply);
    s_send(srv, msg->data[0], msg->size[0], msg->count > 2 && msg->size[1] == 0, e);
    protobuf_c_message_free_unpacked(&e->base, NULL);
}

static void s_on_msg(bus_sock_t *s, const bus_msg_t *msg, void *arg)
{
    (void)s;
    cmdsrv_t *srv = arg;
    srv->received++;
    /* DEALER peers send [envelope]; REQ peers add an empty delimiter. The
     * ROUTER prepends the routing id. */
    if (msg->count < 2 || msg->size[0] == 0 || msg->size[0] > S_MAX_ROUTING_ID) {
        srv->rejected++;
        return;
    }
    if (msg->count > 3 || (msg->count == 3 && msg->size[1] != 0)) {
        s_reject(srv, msg, ENVELOPE_E_MALFORMED, "a command is one frame", NULL);
        return;
    }
    const char *code;
    char why[160];
    int last = msg->count - 1;
    Linli__Envelope *env = envelope_decode(msg->data[last], msg->size[last], &code, why,
                                           sizeof why);
    if (!env) {
        char id[37];
        int has_id = strcmp(code, ENVELOPE_E_INVALID) == 0 &&
                     envelope_peek_id(msg->data[last], msg->size[last], id);
        s_reject(srv, msg, code, why, has_id ? id : NULL);
        return;
    }
    if (env->payload_case != LINLI__ENVELOPE__PAYLOAD_COMMAND) {
        char id[37] = "";
        if (env->id && env->id[0])
            snprintf(id, sizeof id, "%s", env->id); /* validated: a UUID */
        envelope_free(&env);
        s_reject(srv, msg, ENVELOPE_E_INVALID, "only commands are accepted here",
                 id[0] ? id : NULL);
        return;
    }
    if (!env->id || !env->id[0]) {
        envelope_free(&env);
        s_reject(srv, msg, ENVELOPE_E_INVALID, "a command needs an id", NULL);
        return;
    }
    cmdsrv_req_t *req = xmalloc(sizeof *req);
    memcpy(req->rid, msg->data[0], msg->size[0]);
    req->rid_len = msg->size[0];
    req->delimited = msg->count == 3;
    req->env = env;
    req->received_us = mono_us();
    srv->outstanding++;
    srv->fn(srv, req, srv->arg);
}

cmdsrv_t *cmdsrv_new(struct event_base *base, void *zctx, const char *endpoint,
                     const char *source, cmdsrv_fn *fn, void *arg)
{
    cmdsrv_t *srv = xcalloc(1, sizeof *srv);
    srv->base = base;
    srv->source = xstrdup(source);
    srv->fn = fn;
    srv->arg = arg;
    srv->sock = bus_sock_new(base, zctx, ZMQ_ROUTER, s_on_msg, srv);
    if (!srv->sock)
        goto fail;
    /* Many clients x many in-flight commands: keep the queues deep enough
     * that a burst is batched rather than refused. */
    int hwm = 100000;
    zmq_setsockopt(bus_zsock(srv->sock), ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(bus_zsock(srv->sock), ZMQ_SNDHWM, &hwm, sizeof hwm);
    if (bus_bind(srv->sock, endpoint) != 0)
        goto fail;
    return srv;
fail:
    cmdsrv_destroy(&srv);
    return NULL;
}

void cmdsrv_destroy(cmdsrv_t **srv_p)
{
    if (!srv_p || !*srv_p)
        return;
    cmdsrv_t *srv = *srv_p;
    bus_sock_destroy(&srv->sock);
    free(srv->enc.p);
    free(srv->source);
    free(srv);
    *srv_p = NULL;
}

const Linli__Envelope *cmdsrv_req_envelope(const cmdsrv_req_t *req)
{
    return req->env;
}

int64_t cmdsrv_req_received(const cmdsrv_req_t *req)
{
    return req->received_us;
}

void cmdsrv_reply(cmdsrv_t *srv, cmdsrv_req_t **req_p, Linli__Reply *reply)
{
    cmdsrv_req_t *req = *req_p;
    const Linli__Envelope *env = req->env;
    /* envelope_reply_new's envelope, on the stack with borrowed strings */
    Linli__Envelope e = LINLI__ENVELOPE__INIT;
    char id[37];
    uuid_new(id);
    e.id = id;
    if (env->idempotency_key && env->idempotency_key[0])
        e.idempotency_key = env->idempotency_key;
    if (env->trace_id && env->trace_id[0])
        e.trace_id = env->trace_id;
    e.source = srv->source;
    e.type = (char *)"reply";
    e.occurred_at = now_ms();
    e.community_id = env->community_id;
    e.payload_case = LINLI__ENVELOPE__PAYLOAD_REPLY;
    e.reply = reply;
    if (reply->request_id && reply->request_id != protobuf_c_empty_string)
        free(reply->request_id);
    reply->request_id = env->id;   /* a command has one (s_on_msg) */
    s_send(srv, req->rid, req->rid_len, req->delimited, &e);
    reply->request_id = NULL;
    linli__reply__free_unpacked(reply, NULL);
    envelope_free(&req->env);
    free(req);
    *req_p = NULL;
    srv->outstanding--;
}

void cmdsrv_reply_error(cmdsrv_t *srv, cmdsrv_req_t **req_p, const char *code,
                        const char *message)
{
    cmdsrv_reply(srv, req_p, envelope_error_reply(code, message));
}

void cmdsrv_pause(cmdsrv_t *srv, bool paused)
{
    /* Closing intake: stop reading but keep sending, so requests in flight
     * still get their replies. Messages queued in libzmq stay unread and
     * their senders time out and retry elsewhere; nothing half-done is lost. */
    srv->paused = paused;
    bus_pause(srv->sock, paused);
}

int cmdsrv_outstanding(const cmdsrv_t *srv)
{
    return srv->outstanding;
}

const char *cmdsrv_endpoint(const cmdsrv_t *srv)
{
    return bus_endpoint(srv->sock);
}

void cmdsrv_stats(const cmdsrv_t *srv, unsigned long long *received,
                  unsigned long long *rejected, unsigned long long *replied)
{
    *received = srv->received;
    *rejected = srv->rejected;
    *replied = srv->replied;
}
