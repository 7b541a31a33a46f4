/* Command clients over DEALER sockets (see cmdcli.h). Replies are matched to
 * requests by Reply.request_id; a reply that matches nothing (it came after
 * its timeout) is dropped. */
#include "cmdcli.h"

#include "bus.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

Linli__Envelope *cmdcli_envelope(const char *service, const char *source, const char *key,
                                 int64_t community_id, Linli__Command *cmd)
{
    Linli__Envelope *e = xmalloc(sizeof *e);
    linli__envelope__init(e);
    char id[37];
    uuid_new(id);
    e->id = xstrdup(id);
    if (key) {
        e->idempotency_key = xstrdup(key);
    } else {
        uuid_new(id);
        e->idempotency_key = xstrdup(id);
    }
    e->source = xstrdup(source);
    const char *name = envelope_command_name(cmd);
    e->type = xasprintf("%s.%s", service, name ? name : "unknown");
    e->occurred_at = now_ms();
    e->community_id = community_id;
    e->payload_case = LINLI__ENVELOPE__PAYLOAD_COMMAND;
    e->command = cmd;
    return e;
}

static int s_is_reply_to(const Linli__Envelope *r, const char *id)
{
    return r->payload_case == LINLI__ENVELOPE__PAYLOAD_REPLY && r->reply->request_id &&
           strcmp(r->reply->request_id, id) == 0;
}

int cmdcli_call(void *zctx, const char *endpoint, const Linli__Envelope *req, int timeout_ms,
                Linli__Envelope **reply)
{
    int rc = -1;
    uint8_t *buf = NULL;
    *reply = NULL;
    void *zs = zmq_socket(zctx, ZMQ_DEALER);
    if (!zs) {
        log_error("cmdcli", "zmq_socket failed err=%s", zmq_strerror(errno));
        return -1;
    }
    int linger = 0;
    int64_t maxmsg = ENVELOPE_MAX_BYTES + 64 * 1024;
    zmq_setsockopt(zs, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(zs, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    if (zmq_connect(zs, endpoint) != 0) {
        log_error("cmdcli", "connect failed endpoint=%s err=%s", endpoint, zmq_strerror(errno));
        goto done;
    }
    size_t len;
    buf = envelope_encode(req, &len);
    if (zmq_send(zs, buf, len, 0) < 0) {
        log_error("cmdcli", "send failed endpoint=%s err=%s", endpoint, zmq_strerror(errno));
        goto done;
    }
    int64_t deadline = mono_us() + (int64_t)timeout_ms * 1000;
    for (;;) {
        int64_t left = (deadline - mono_us()) / 1000;
        if (left <= 0) {
            rc = LX_AGAIN;
            goto done;
        }
        zmq_pollitem_t item = { zs, 0, ZMQ_POLLIN, 0 };
        int n = zmq_poll(&item, 1, (long)left);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            log_error("cmdcli", "poll failed err=%s", zmq_strerror(errno));
            goto done;
        }
        if (n == 0)
            continue;
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, zs, 0) < 0) {
            zmq_msg_close(&m);
            continue;
        }
        const char *code;
        char why[128];
        Linli__Envelope *r = envelope_decode(zmq_msg_data(&m), zmq_msg_size(&m), &code, why,
                                             sizeof why);
        zmq_msg_close(&m);
        if (r && s_is_reply_to(r, req->id)) {
            *reply = r;
            rc = 0;
            goto done;
        }
        if (!r)
            log_warn("cmdcli", "bad reply dropped code=%s why=%s", code, why);
        envelope_free(&r);
    }
done:
    free(buf);
    zmq_close(zs);
    return rc;
}

/* ---- asynchronous client ---- */

typedef struct s_pending {
    char id[37];               /* request id */
    cmdcli_reply_fn *fn;
    void *arg;
    struct event *timer;       /* fires the timeout */
    struct cmdcli *owner;
    struct s_pending *prev, *next;
} s_pending_t;

struct cmdcli {
    struct event_base *base;
    bus_sock_t *sock;          /* DEALER */
    s_pending_t *pending;      /* doubly linked, newest first */
    int npending;
};

static void s_pending_finish(cmdcli_t *c, s_pending_t *p, const Linli__Envelope *reply)
{
    if (p->prev)
        p->prev->next = p->next;
    else
        c->pending = p->next;
    if (p->next)
        p->next->prev = p->prev;
    c->npending--;
    event_free(p->timer);
    cmdcli_reply_fn *fn = p->fn;
    void *arg = p->arg;
    free(p);
    fn(reply, arg);
}

static void s_on_timeout(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    s_pending_t *p = arg;
    s_pending_finish(p->owner, p, NULL);
}

static void s_on_reply(bus_sock_t *s, const bus_msg_t *msg, void *arg)
{
    (void)s;
    cmdcli_t *c = arg;
    const char *code;
    char why[128];
    Linli__Envelope *r = envelope_decode(msg->data[msg->count - 1], msg->size[msg->count - 1],
                                         &code, why, sizeof why);
    if (!r) {
        log_warn("cmdcli", "bad reply dropped code=%s why=%s", code, why);
        return;
    }
    /* Replies mostly come back in request order, so the oldest (last) entry
     * is the likely match; the list is short either way. */
    s_pending_t *p = c->pending;
    while (p && p->next)
        p = p->next;
    for (; p; p = p->prev) {
        if (s_is_reply_to(r, p->id)) {
            s_pending_finish(c, p, r);
            break;
        }
    }
    envelope_free(&r);
}

cmdcli_t *cmdcli_new(struct event_base *base, void *zctx, const char *endpoint)
{
    cmdcli_t *c = xcalloc(1, sizeof *c);
    c->base = base;
    c->sock = bus_sock_new(base, zctx, ZMQ_DEALER, s_on_reply, c);
    if (!c->sock || bus_connect(c->sock, endpoint) != 0) {
        cmdcli_destroy(&c);
        return NULL;
    }
    return c;
}

void cmdcli_destroy(cmdcli_t **c_p)
{
    if (!c_p || !*c_p)
        return;
    cmdcli_t *c = *c_p;
    while (c->pending)
        s_pending_finish(c, c->pending, NULL);
    bus_sock_destroy(&c->sock);
    free(c);
    *c_p = NULL;
}

int cmdcli_send(cmdcli_t *c, const Linli__Envelope *req, int timeout_ms, cmdcli_reply_fn *fn,
                void *arg)
{
    if (!req->id || !uuid_valid(req->id)) {
        log_error("cmdcli", "request without a valid id");
        return -1;
    }
    size_t len;
    uint8_t *buf = envelope_encode(req, &len);
    const void *data[1] = { buf };
    int rc = bus_send(c->sock, 1, data, &len);
    free(buf);
    if (rc != 0)
        return -1;
    s_pending_t *p = xcalloc(1, sizeof *p);
    memcpy(p->id, req->id, 37);
    p->fn = fn;
    p->arg = arg;
    p->owner = c;
    p->timer = evtimer_new(c->base, s_on_timeout, p);
    struct timeval tv = { timeout_ms / 1000, (timeout_ms % 1000) * 1000 };
    evtimer_add(p->timer, &tv);
    p->next = c->pending;
    if (c->pending)
        c->pending->prev = p;
    c->pending = p;
    c->npending++;
    return 0;
}

int cmdcli_pending(const cmdcli_t *c)
{
    return c->npending;
}
