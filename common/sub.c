/* Subscriber with gap detection and replay (see sub.h). */
#include "sub.h"

#include "bus.h"
#include "cmdcli.h"
#include "config.h"
#include "log.h"
#include "util.h"

#include <inttypes.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#define S_REPLAY_TIMEOUT_MS 5000
#define S_RETRY_MS 1000

struct sub {
    struct event_base *base;
    bus_sock_t *live;            /* SUB on the producer's PUB */
    cmdcli_t *cli;               /* DEALER to the producer's ROUTER */
    struct event *retry;         /* re-asks after a failed replay */
    char *stream, *source;
    sub_apply_fn *apply;
    sub_epoch_fn *on_epoch;
    void *arg;
    uint64_t epoch, seq;         /* last applied */
    unsigned batch;
    bool replaying;              /* a Replay is in flight */
    bool caught_up;
    unsigned long long applied, dupes, gaps, replays;
};

static void s_replay(sub_t *s);

static void s_new_epoch(sub_t *s, uint64_t epoch)
{
    log_info("sub", "new epoch stream=%s old=%" PRIu64 " new=%" PRIu64, s->stream, s->epoch, epoch);
    s->epoch = epoch;
    s->seq = 0;
    if (s->on_epoch)
        s->on_epoch(epoch, s->arg);
}

/* Applies ev if it is the next one. Returns 1 applied, 0 duplicate, -1 gap. */
static int s_offer(sub_t *s, const Linli__Envelope *ev)
{
    if (ev->sequence <= s->seq) {
        s->dupes++;
        return 0;
    }
    if (ev->sequence != s->seq + 1)
        return -1;
    s->apply(ev, s->arg);
    s->seq = ev->sequence;
    s->applied++;
    return 1;
}

static void s_on_replay(const Linli__Envelope *reply, void *arg)
{
    sub_t *s = arg;
    s->replaying = false;
    if (!reply || !reply->reply->ok || reply->reply->result_case != LINLI__REPLY__RESULT_REPLAY) {
        log_warn("sub", "replay failed stream=%s err=%s", s->stream,
                 !reply ? "timeout"
                        : reply->reply->error ? reply->reply->error->code : "unexpected reply");
        struct timeval tv = { 0, S_RETRY_MS * 1000 };
        evtimer_add(s->retry, &tv);
        return;
    }
    const Linli__ReplayResult *r = reply->reply->replay;
    if (r->epoch_changed || (s->epoch && r->epoch != s->epoch)) {
        s_new_epoch(s, r->epoch);
        s_replay(s);
        return;
    }
    if (!s->epoch)
        s->epoch = r->epoch;
    for (size_t i = 0; i < r->n_events; i++) {
        if (s_offer(s, r->events[i]) < 0) {
            /* A hole in the table cannot happen (sequences are assigned
             * gap-free); if it does, ask again rather than skip. */
            log_error("sub", "replay out of order stream=%s have=%" PRIu64 " got=%" PRIu64,
                      s->stream, s->seq, r->events[i]->sequence);
            break;
        }
    }
    if (r->more || s->seq < r->last_sequence) {
        s_replay(s);
    } else if (!s->caught_up) {
        s->caught_up = true;
        log_info("sub", "caught up stream=%s epoch=%" PRIu64 " seq=%" PRIu64, s->stream, s->epoch,
                 s->seq);
    }
}

static void s_replay(sub_t *s)
{
    if (s->replaying)
        return;
    Linli__Replay *rq = xmalloc(sizeof *rq);
    linli__replay__init(rq);
    rq->stream = xstrdup(s->stream);
    rq->epoch = s->epoch;
    rq->after_sequence = s->seq;
    rq->limit = s->batch;
    Linli__Command *cmd = xmalloc(sizeof *cmd);
    linli__command__init(cmd);
    cmd->command_case = LINLI__COMMAND__COMMAND_REPLAY;
    cmd->replay = rq;
    Linli__Envelope *env = cmdcli_envelope(s->stream, s->source, "", 0, cmd);
    s->replays++;
    if (cmdcli_send(s->cli, env, S_REPLAY_TIMEOUT_MS, s_on_replay, s) == 0) {
        s->replaying = true;
    } else {
        struct timeval tv = { 0, S_RETRY_MS * 1000 };
        evtimer_add(s->retry, &tv);
    }
    protobuf_c_message_free_unpacked(&env->base, NULL);
}

static void s_on_retry(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    s_replay(arg);
}

static void s_on_live(bus_sock_t *bs, const bus_msg_t *msg, void *arg)
{
    (void)bs;
    sub_t *s = arg;
    if (msg->count != 2)
        return;
    const char *code;
    char why[128];
    Linli__Envelope *ev = envelope_decode(msg->data[1], msg->size[1], &code, why, sizeof why);
    if (!ev) {
        log_warn("sub", "bad event dropped code=%s why=%s", code, why);
        return;
    }
    if (!ev->stream || strcmp(ev->stream, s->stream) != 0)
        goto done;
    /* Until the first replay answers we do not know where we stand. */
    if (s->replaying || !s->epoch)
        goto done;
    if (ev->epoch != s->epoch) {
        s_new_epoch(s, ev->epoch);
        s_replay(s);
        goto done;
    }
    if (ev->payload_case == LINLI__ENVELOPE__PAYLOAD_HEARTBEAT) {
        if (ev->heartbeat->last_sequence > s->seq) {
            s->gaps++;
            s_replay(s);
        }
    } else if (ev->payload_case == LINLI__ENVELOPE__PAYLOAD_EVENT) {
        if (s_offer(s, ev) < 0) {
            s->gaps++;
            log_debug("sub", "gap stream=%s have=%" PRIu64 " got=%" PRIu64, s->stream, s->seq,
                      ev->sequence);
            s_replay(s);
        }
    }
done:
    envelope_free(&ev);
}

sub_t *sub_new(struct event_base *base, void *zctx, const sub_opts_t *opts, sub_apply_fn *apply,
               sub_epoch_fn *on_epoch, void *arg)
{
    sub_t *s = xcalloc(1, sizeof *s);
    s->base = base;
    s->stream = xstrdup(opts->stream);
    s->source = xstrdup(opts->source ? opts->source : "subscriber");
    s->apply = apply;
    s->on_epoch = on_epoch;
    s->arg = arg;
    s->epoch = opts->epoch;
    s->seq = opts->sequence;
    s->batch = opts->replay_batch ? opts->replay_batch : 1000;
    s->retry = evtimer_new(base, s_on_retry, s);
    /* Subscribe first, then ask for the history: nothing published in
     * between can be missed (the Clone pattern). */
    s->live = bus_sock_new(base, zctx, ZMQ_SUB, s_on_live, s);
    if (!s->live)
        goto fail;
    /* The live path may drop under load (replay covers it); the bound keeps
     * a slow subscriber from growing without limit. Tests shrink it. */
    int64_t hwm;
    if (config_int("LINLI_SUB_RCVHWM", 10000, 1, 10000000, &hwm) != 0)
        goto fail;
    int h = (int)hwm;
    zmq_setsockopt(bus_zsock(s->live), ZMQ_RCVHWM, &h, sizeof h);
    if (zmq_setsockopt(bus_zsock(s->live), ZMQ_SUBSCRIBE, s->stream, strlen(s->stream)) != 0 ||
        bus_connect(s->live, opts->pub_endpoint) != 0)
        goto fail;
    s->cli = cmdcli_new(base, zctx, opts->cmd_endpoint);
    if (!s->cli)
        goto fail;
    s_replay(s);
    return s;
fail:
    sub_destroy(&s);
    return NULL;
}

void sub_destroy(sub_t **s_p)
{
    if (!s_p || !*s_p)
        return;
    sub_t *s = *s_p;
    /* Destroying the client answers the pending replay with NULL, which
     * would re-arm the retry timer: free the timer after. */
    s->replaying = true;
    cmdcli_destroy(&s->cli);
    if (s->retry)
        event_free(s->retry);
    bus_sock_destroy(&s->live);
    free(s->stream);
    free(s->source);
    free(s);
    *s_p = NULL;
}

void sub_position(const sub_t *s, uint64_t *epoch, uint64_t *sequence)
{
    *epoch = s->epoch;
    *sequence = s->seq;
}

int sub_caught_up(const sub_t *s)
{
    return s->caught_up;
}

void sub_stats(const sub_t *s, unsigned long long *applied, unsigned long long *dupes,
               unsigned long long *gaps, unsigned long long *replays)
{
    *applied = s->applied;
    *dupes = s->dupes;
    *gaps = s->gaps;
    *replays = s->replays;
}
