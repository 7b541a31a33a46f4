/* Unit tests for common/bus.c, common/cmdsrv.c and common/cmdcli.c with real
 * ZeroMQ sockets (ipc:// endpoints in a private mkdtemp directory, and
 * inproc://) in a real libevent loop, nothing mocked: the edge-triggered
 * ZMQ_FD handling under bursts far larger than BUS_BURST, pause/resume,
 * multipart limits and PUB/SUB on the bus; the command server and both
 * clients end to end, pipelined and out of order, timeouts, late and stray
 * replies, and the frames a peer should never send. Every wait runs the loop
 * against a deadline, so a lost wake-up fails the test instead of hanging. */
#include "bus.h"
#include "cmdcli.h"
#include "cmdsrv.h"
#include "envelope.h"
#include "log.h"
#include "util.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <event2/event.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#define S_DEADLINE_MS 5000  /* any one wait; a hang fails after this */
#define S_BURST 10000       /* messages in a burst: many times BUS_BURST */
#define S_MAX_HELD 1000     /* requests a holding server keeps unanswered */

static char s_dir[64];      /* mkdtemp directory for the ipc:// sockets */
static unsigned s_next_ep;  /* endpoints handed out so far */

/* One test's loop and ZeroMQ context. */
typedef struct {
    struct event_base *base;
    void *zctx;
    struct event *deadline;  /* ends a wait that took too long */
    struct event *tick;      /* wakes the loop to re-check state other threads change */
    bool timed_out;
    bool finished;           /* the test ran to its end (so closed its sockets) */
} s_env_t;

/* ---- loop helpers ---- */

/* A fresh ipc:// endpoint in the test directory. */
static void s_ipc(char *buf, size_t len)
{
    snprintf(buf, len, "ipc://%s/s%u", s_dir, s_next_ep++);
}

static void s_on_deadline(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    s_env_t *e = arg;
    e->timed_out = true;
}

static void s_on_tick(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
}

typedef bool(s_pred_fn)(const void *arg);

/* Runs the loop until pred(arg) holds or ms pass. Returns whether it holds. */
static bool s_run_until(s_env_t *e, s_pred_fn *pred, const void *arg, int ms)
{
    struct timeval tv = { ms / 1000, (ms % 1000) * 1000 };
    struct timeval tick = { 0, 1000 };
    e->timed_out = false;
    evtimer_add(e->deadline, &tv);
    evtimer_add(e->tick, &tick);
    while (!(pred && pred(arg)) && !e->timed_out)
        event_base_loop(e->base, EVLOOP_ONCE);
    evtimer_del(e->deadline);
    evtimer_del(e->tick);
    return pred && pred(arg);
}

/* Runs the loop for ms whatever happens. */
static void s_run_for(s_env_t *e, int ms)
{
    s_run_until(e, NULL, NULL, ms);
}

typedef struct {
    const int *n;
    int want;
} s_at_least_t;

static bool s_at_least(const void *arg)
{
    const s_at_least_t *a = arg;
    return *a->n >= a->want;
}

/* Runs the loop until *n reaches want; fails the test on the deadline. */
static void s_wait(s_env_t *e, const int *n, int want)
{
    s_at_least_t a = { n, want };
    if (!s_run_until(e, s_at_least, &a, S_DEADLINE_MS))
        fail_msg("deadline: count %d, want %d", *n, want);
}

static int s_setup(void **state)
{
    s_env_t *e = xcalloc(1, sizeof *e);
    e->base = event_base_new();
    e->zctx = zmq_ctx_new();
    if (!e->base || !e->zctx) {
        if (e->base)
            event_base_free(e->base);
        free(e);
        return -1;
    }
    e->deadline = evtimer_new(e->base, s_on_deadline, e);
    e->tick = event_new(e->base, -1, EV_PERSIST, s_on_tick, e);
    *state = e;
    return 0;
}

static int s_teardown(void **state)
{
    s_env_t *e = *state;
    if (!e->finished) {
        /* A failed test jumped past closing its sockets: terminating the
         * context would wait for them forever, so abandon it all. */
        return 0;
    }
    event_free(e->deadline);
    event_free(e->tick);
    /* Every socket is closed by now; this waits out their linger. */
    zmq_ctx_term(e->zctx);
    event_base_free(e->base);
    free(e);
    return 0;
}

static int s_group_setup(void **state)
{
    (void)state;
    log_init("test_bus", LOG_LEVEL_ERROR);
    snprintf(s_dir, sizeof s_dir, "/tmp/test_bus.XXXXXX");
    return mkdtemp(s_dir) ? 0 : -1;
}

static int s_group_teardown(void **state)
{
    (void)state;
    /* Bound sockets remove their files on close; connect-only names were
     * never created; lock files stay. Remove whatever is left. */
    for (unsigned i = 0; i < s_next_ep; i++) {
        char path[128];
        snprintf(path, sizeof path, "%s/s%u", s_dir, i);
        unlink(path);
        snprintf(path, sizeof path, "%s/s%u.lock", s_dir, i);
        unlink(path);
    }
    return rmdir(s_dir);
}

static void s_set_int(bus_sock_t *s, int opt, int v)
{
    assert_int_equal(zmq_setsockopt(bus_zsock(s), opt, &v, sizeof v), 0);
}

/* ---- bus: a receiver that checks order ---- */

typedef struct {
    int count;              /* messages delivered */
    int out_of_order;       /* sequence numbers that were not the next one */
    uint32_t next;          /* sequence expected next */
    int topic_b;            /* messages with topic "b" (must not reach a SUB to "a") */
    int hellos;             /* PUB/SUB join probes seen */
    int pause_at;           /* pause the socket once count reaches this (0: never) */
    int destroy_at;         /* destroy the socket once count reaches this (0: never) */
    bus_sock_t **self;      /* the receiving socket, for pause_at / destroy_at */
    bus_sock_t *echo;       /* send each message back on this socket (ping-pong) */
    int echo_limit;         /* stop echoing after this many */
    struct event *probe;    /* zero-delay timer armed at the first message */
    int count_at_probe;     /* count when the probe ran (-1: not yet) */
    int frames;             /* frame count of the last message */
    size_t sizes[BUS_MAX_FRAMES];
    bool content_ok;        /* frames of the last message hold what was sent */
} s_rx_t;

static void s_rx_init(s_rx_t *rx)
{
    memset(rx, 0, sizeof *rx);
    rx->count_at_probe = -1;
}

static void s_on_probe(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    s_rx_t *rx = arg;
    rx->count_at_probe = rx->count;
}

static void s_on_rx(bus_sock_t *s, const bus_msg_t *msg, void *arg)
{
    s_rx_t *rx = arg;
    const void *seqp = msg->data[msg->count - 1];
    size_t seqlen = msg->size[msg->count - 1];
    if (msg->count == 2 && msg->size[0] == 5 && memcmp(msg->data[0], "hello", 5) == 0) {
        rx->hellos++;
        return;
    }
    if (msg->count == 2 && msg->size[0] == 1 && ((const char *)msg->data[0])[0] == 'b')
        rx->topic_b++;
    rx->frames = msg->count;
    rx->content_ok = true;
    for (int i = 0; i < msg->count; i++) {
        rx->sizes[i] = msg->size[i];
        for (size_t j = 0; j < msg->size[i]; j++)
            if (((const unsigned char *)msg->data[i])[j] != (unsigned char)(i + j))
                rx->content_ok = false;
    }
    uint32_t seq = UINT32_MAX;
    if (seqlen == sizeof seq)
        memcpy(&seq, seqp, sizeof seq);
    if (seq != rx->next)
        rx->out_of_order++;
    rx->next = seq + 1;
    rx->count++;
    if (rx->probe && rx->count == 1) {
        struct timeval zero = { 0, 0 };
        evtimer_add(rx->probe, &zero);
    }
    if (rx->echo && rx->count <= rx->echo_limit) {
        const void *data[1] = { &rx->next };
        size_t size[1] = { sizeof rx->next };
        assert_int_equal(bus_send(rx->echo, 1, data, size), 0);
    }
    if (rx->pause_at && rx->count == rx->pause_at)
        bus_pause(s, 1);
    if (rx->destroy_at && rx->count == rx->destroy_at) {
        assert_ptr_equal(*rx->self, s);
        bus_sock_destroy(rx->self);
    }
}

static void s_send_seq(bus_sock_t *s, uint32_t seq)
{
    const void *data[1] = { &seq };
    size_t size[1] = { sizeof seq };
    assert_int_equal(bus_send(s, 1, data, size), 0);
}

/* A PUSH (send-only) -> PULL pair on endpoint, both without high-water
 * marks so a whole burst can be queued before the loop runs. */
static void s_push_pull(s_env_t *e, const char *ep, s_rx_t *rx, bus_sock_t **push,
                        bus_sock_t **pull)
{
    *pull = bus_sock_new(e->base, e->zctx, ZMQ_PULL, s_on_rx, rx);
    assert_non_null(*pull);
    s_set_int(*pull, ZMQ_RCVHWM, 0);
    assert_int_equal(bus_bind(*pull, ep), 0);
    *push = bus_sock_new(e->base, e->zctx, ZMQ_PUSH, NULL, NULL);
    assert_non_null(*push);
    s_set_int(*push, ZMQ_SNDHWM, 0);
    assert_int_equal(bus_connect(*push, ep), 0);
    rx->self = pull;
}

/* ---- bus tests ---- */

/* 10,000 messages queued before the loop runs, over ipc: the receiver is
 * woken by one edge and must keep going past BUS_BURST on its own. Then
 * another 10,000 sent from a timer while the receiver is draining, so edges
 * arrive mid-drain. All arrive, in order, before the deadline. */
typedef struct {
    bus_sock_t *push;
    uint32_t sent;
    uint32_t total;
    struct event *ev;
} s_feeder_t;

static void s_on_feed(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    s_feeder_t *f = arg;
    for (int i = 0; i < 700 && f->sent < f->total; i++)
        s_send_seq(f->push, f->sent++);
    if (f->sent == f->total)
        event_del(f->ev);
}

static void test_bus_burst_ipc(void **state)
{
    s_env_t *e = *state;
    char ep[128];
    s_ipc(ep, sizeof ep);
    s_rx_t rx;
    s_rx_init(&rx);
    bus_sock_t *push, *pull;
    s_push_pull(e, ep, &rx, &push, &pull);
    assert_string_equal(bus_endpoint(pull), ep);

    for (uint32_t i = 0; i < S_BURST; i++)
        s_send_seq(push, i);
    s_wait(e, &rx.count, S_BURST);
    assert_int_equal(rx.count, S_BURST);
    assert_int_equal(rx.out_of_order, 0);
    assert_int_equal(rx.next, S_BURST);

    s_feeder_t f = { push, S_BURST, 2 * S_BURST, NULL };
    f.ev = event_new(e->base, -1, EV_PERSIST, s_on_feed, &f);
    struct timeval every = { 0, 500 };
    event_add(f.ev, &every);
    s_wait(e, &rx.count, 2 * S_BURST);
    event_free(f.ev);
    assert_int_equal(rx.count, 2 * S_BURST);
    assert_int_equal(rx.out_of_order, 0);
    assert_int_equal(bus_dropped(pull), 0);
    s_run_for(e, 20);
    assert_int_equal(rx.count, 2 * S_BURST);

    bus_sock_destroy(&push);
    bus_sock_destroy(&pull);
    assert_null(pull);
    e->finished = true;
}

/* Over inproc the whole burst is in the pipe before the first wake-up, so
 * nothing but the BUS_BURST limit stops the receiver from draining all of
 * it in one go. A timer that falls due during the drain must still get its
 * turn before the drain ends (bus.h: one busy socket does not starve the
 * loop), and every message still arrives in order. */
static void test_bus_burst_yields_to_loop(void **state)
{
    s_env_t *e = *state;
    s_rx_t rx;
    s_rx_init(&rx);
    rx.probe = evtimer_new(e->base, s_on_probe, &rx);
    bus_sock_t *push, *pull;
    s_push_pull(e, "inproc://burst", &rx, &push, &pull);
    for (uint32_t i = 0; i < S_BURST; i++)
        s_send_seq(push, i);
    s_wait(e, &rx.count, S_BURST);
    assert_int_equal(rx.out_of_order, 0);
    assert_int_equal(rx.next, S_BURST);
    if (rx.count_at_probe < 0 || rx.count_at_probe >= S_BURST)
        fail_msg("a timer due during the burst ran at count %d of %d", rx.count_at_probe,
                 S_BURST);
    event_free(rx.probe);
    bus_sock_destroy(&push);
    bus_sock_destroy(&pull);
    e->finished = true;
}

/* The same when the callback answers each message on its own socket, as a
 * server does: a send that finds more input waiting must not put the socket
 * straight back to work within the same pass of the loop. Both directions
 * arrive whole and in order. */
static void test_bus_burst_yields_when_replying(void **state)
{
    s_env_t *e = *state;
    s_rx_t ra, rb;
    s_rx_init(&ra);
    s_rx_init(&rb);
    ra.probe = evtimer_new(e->base, s_on_probe, &ra);
    bus_sock_t *a = bus_sock_new(e->base, e->zctx, ZMQ_DEALER, s_on_rx, &ra);
    bus_sock_t *b = bus_sock_new(e->base, e->zctx, ZMQ_DEALER, s_on_rx, &rb);
    for (int i = 0; i < 2; i++) {
        s_set_int(i ? b : a, ZMQ_SNDHWM, 0);
        s_set_int(i ? b : a, ZMQ_RCVHWM, 0);
    }
    assert_int_equal(bus_bind(a, "inproc://replying"), 0);
    assert_int_equal(bus_connect(b, "inproc://replying"), 0);
    ra.echo = a;
    ra.echo_limit = S_BURST;
    rb.next = 1;  /* a answers n with n + 1 */
    for (uint32_t i = 0; i < S_BURST; i++)
        s_send_seq(b, i);
    s_wait(e, &ra.count, S_BURST);
    if (ra.count_at_probe < 0 || ra.count_at_probe >= S_BURST)
        fail_msg("a timer due during the burst ran at count %d of %d", ra.count_at_probe,
                 S_BURST);
    s_wait(e, &rb.count, S_BURST);
    assert_int_equal(ra.out_of_order, 0);
    assert_int_equal(rb.out_of_order, 0);
    assert_int_equal(rb.next, S_BURST + 1);
    event_free(ra.probe);
    bus_sock_destroy(&a);
    bus_sock_destroy(&b);
    e->finished = true;
}

/* Two DEALERs in one loop bouncing messages, eight in flight, each answered
 * from inside the receive callback: every send may consume the edge that
 * announces the next input, which bus_send must notice. 20,000 hops, no
 * stall. */
static void test_bus_ping_pong(void **state)
{
    s_env_t *e = *state;
    char ep[128];
    s_ipc(ep, sizeof ep);
    s_rx_t ra, rb;
    s_rx_init(&ra);
    s_rx_init(&rb);
    bus_sock_t *a = bus_sock_new(e->base, e->zctx, ZMQ_DEALER, s_on_rx, &ra);
    bus_sock_t *b = bus_sock_new(e->base, e->zctx, ZMQ_DEALER, s_on_rx, &rb);
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(bus_bind(a, ep), 0);
    assert_int_equal(bus_connect(b, ep), 0);
    ra.echo = a;
    rb.echo = b;
    ra.echo_limit = rb.echo_limit = 10000;
    /* Sequence numbers do not matter here: eight balls interleave. */
    for (uint32_t i = 0; i < 8; i++)
        s_send_seq(b, i);
    /* a answers its first 10,000 and b every one of those; then the balls
     * stop: b gets 10,000, a gets b's 10,000 answers plus the first 8. */
    s_wait(e, &rb.count, 10000);
    s_wait(e, &ra.count, 10000 + 8);
    s_run_for(e, 20);
    assert_int_equal(ra.count, 10000 + 8);
    assert_int_equal(rb.count, 10000);
    bus_sock_destroy(&a);
    bus_sock_destroy(&b);
    e->finished = true;
}

/* Multipart messages arrive whole; BUS_MAX_FRAMES frames are delivered, more
 * are dropped whole and counted, and the socket goes on. */
static void test_bus_multipart(void **state)
{
    s_env_t *e = *state;
    char ep[128];
    s_ipc(ep, sizeof ep);
    s_rx_t rx;
    s_rx_init(&rx);
    bus_sock_t *push, *pull;
    s_push_pull(e, ep, &rx, &push, &pull);

    unsigned char frames[20][64];
    const void *data[20];
    size_t size[20];
    for (int i = 0; i < 20; i++) {
        for (int j = 0; j < 64; j++)
            frames[i][j] = (unsigned char)(i + j);
        data[i] = frames[i];
        size[i] = (size_t)(i * 3) % 64;
    }
    assert_int_equal(bus_send(push, 3, data, size), 0);
    s_wait(e, &rx.count, 1);
    assert_int_equal(rx.frames, 3);
    assert_true(rx.content_ok);
    assert_int_equal(rx.sizes[0], 0);
    assert_int_equal(rx.sizes[1], 3);
    assert_int_equal(rx.sizes[2], 6);

    assert_int_equal(bus_send(push, BUS_MAX_FRAMES, data, size), 0);
    s_wait(e, &rx.count, 2);
    assert_int_equal(rx.frames, BUS_MAX_FRAMES);
    assert_true(rx.content_ok);
    assert_int_equal(rx.sizes[BUS_MAX_FRAMES - 1], (size_t)(BUS_MAX_FRAMES - 1) * 3);

    assert_int_equal(bus_send(push, BUS_MAX_FRAMES + 1, data, size), 0);
    assert_int_equal(bus_send(push, 20, data, size), 0);
    uint32_t seq = 7;
    const void *one[1] = { &seq };
    size_t onesize[1] = { sizeof seq };
    assert_int_equal(bus_send(push, 1, one, onesize), 0);
    s_wait(e, &rx.count, 3);
    s_run_for(e, 20);
    assert_int_equal(rx.count, 3);
    assert_int_equal(rx.frames, 1);
    assert_int_equal(rx.next, 8);
    assert_int_equal(bus_dropped(pull), 2);
    bus_sock_destroy(&push);
    bus_sock_destroy(&pull);
    e->finished = true;
}

/* A paused socket delivers nothing, however much is queued; resuming
 * delivers it all, in order, without a new edge. Pausing from inside the
 * callback stops delivery at once, not at the end of the burst. Sending on
 * a paused socket still works. */
static void test_bus_pause_resume(void **state)
{
    s_env_t *e = *state;
    char ep[128];
    s_ipc(ep, sizeof ep);
    s_rx_t rx;
    s_rx_init(&rx);
    bus_sock_t *push, *pull;
    s_push_pull(e, ep, &rx, &push, &pull);

    bus_pause(pull, 1);
    bus_pause(pull, 1);  /* idempotent */
    for (uint32_t i = 0; i < 1000; i++)
        s_send_seq(push, i);
    s_run_for(e, 100);
    assert_int_equal(rx.count, 0);
    bus_pause(pull, 0);
    s_wait(e, &rx.count, 1000);
    assert_int_equal(rx.out_of_order, 0);

    rx.pause_at = 1100;
    for (uint32_t i = 1000; i < 2000; i++)
        s_send_seq(push, i);
    s_wait(e, &rx.count, 1100);
    s_run_for(e, 50);
    if (rx.count != 1100)
        fail_msg("paused inside the callback at 1100, yet %d were delivered", rx.count);
    bus_pause(pull, 0);
    s_wait(e, &rx.count, 2000);
    assert_int_equal(rx.out_of_order, 0);
    assert_int_equal(rx.next, 2000);

    /* A paused DEALER still sends. */
    char ep2[128];
    s_ipc(ep2, sizeof ep2);
    s_rx_t r2;
    s_rx_init(&r2);
    s_rx_t r1;
    s_rx_init(&r1);
    bus_sock_t *a = bus_sock_new(e->base, e->zctx, ZMQ_DEALER, s_on_rx, &r1);
    bus_sock_t *b = bus_sock_new(e->base, e->zctx, ZMQ_DEALER, s_on_rx, &r2);
    assert_int_equal(bus_bind(b, ep2), 0);
    assert_int_equal(bus_connect(a, ep2), 0);
    bus_pause(a, 1);
    for (uint32_t i = 0; i < 10; i++)
        s_send_seq(a, i);
    s_wait(e, &r2.count, 10);
    assert_int_equal(r2.out_of_order, 0);
    bus_pause(push, 1);  /* no read watch: a no-op */
    s_send_seq(push, 2000);
    s_wait(e, &rx.count, 2001);

    bus_sock_destroy(&a);
    bus_sock_destroy(&b);
    bus_sock_destroy(&push);
    bus_sock_destroy(&pull);
    e->finished = true;
}

/* A callback may destroy its own socket with more input pending. */
static void test_bus_destroy_in_callback(void **state)
{
    s_env_t *e = *state;
    s_rx_t rx;
    s_rx_init(&rx);
    rx.destroy_at = 3;
    bus_sock_t *push, *pull;
    s_push_pull(e, "inproc://destroy", &rx, &push, &pull);
    for (uint32_t i = 0; i < 1000; i++)
        s_send_seq(push, i);
    s_wait(e, &rx.count, 3);
    s_run_for(e, 20);
    assert_int_equal(rx.count, 3);
    assert_null(pull);
    bus_sock_destroy(&push);
    e->finished = true;
}

/* PUB/SUB: a subscriber gets exactly the topics it asked for, in order. The
 * publisher keeps announcing itself until the subscription has reached it
 * (the slow-joiner problem). A PUB with nobody listening drops, returning 0. */
typedef struct {
    bus_sock_t *pub;
    struct event *ev;
} s_hello_t;

static void s_on_hello(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    s_hello_t *h = arg;
    const void *data[2] = { "hello", "" };
    size_t size[2] = { 5, 0 };
    assert_int_equal(bus_send(h->pub, 2, data, size), 0);
}

static void test_bus_pub_sub(void **state)
{
    s_env_t *e = *state;
    char ep[128];
    s_ipc(ep, sizeof ep);
    s_rx_t rx;
    s_rx_init(&rx);
    bus_sock_t *pub = bus_sock_new(e->base, e->zctx, ZMQ_PUB, NULL, NULL);
    assert_non_null(pub);
    s_set_int(pub, ZMQ_SNDHWM, 0);
    assert_int_equal(bus_bind(pub, ep), 0);
    bus_sock_t *sub = bus_sock_new(e->base, e->zctx, ZMQ_SUB, s_on_rx, &rx);
    assert_non_null(sub);
    s_set_int(sub, ZMQ_RCVHWM, 0);
    assert_int_equal(zmq_setsockopt(bus_zsock(sub), ZMQ_SUBSCRIBE, "a", 1), 0);
    assert_int_equal(zmq_setsockopt(bus_zsock(sub), ZMQ_SUBSCRIBE, "hello", 5), 0);
    assert_int_equal(bus_connect(sub, ep), 0);

    s_hello_t h = { pub, NULL };
    h.ev = event_new(e->base, -1, EV_PERSIST, s_on_hello, &h);
    struct timeval every = { 0, 5000 };
    event_add(h.ev, &every);
    s_wait(e, &rx.hellos, 1);
    event_free(h.ev);

    for (uint32_t i = 0; i < 3000; i++) {
        uint32_t seq = i / 2;
        const void *data[2] = { i % 2 ? "b" : "a", &seq };
        size_t size[2] = { 1, sizeof seq };
        assert_int_equal(bus_send(pub, 2, data, size), 0);
    }
    s_wait(e, &rx.count, 1500);
    s_run_for(e, 20);
    assert_int_equal(rx.count, 1500);
    assert_int_equal(rx.topic_b, 0);
    assert_int_equal(rx.out_of_order, 0);
    assert_int_equal(rx.frames, 2);

    /* Nobody subscribed: dropped, not refused. */
    bus_sock_t *lonely = bus_sock_new(e->base, e->zctx, ZMQ_PUB, NULL, NULL);
    s_set_int(lonely, ZMQ_SNDHWM, 1);
    char ep2[128];
    s_ipc(ep2, sizeof ep2);
    assert_int_equal(bus_bind(lonely, ep2), 0);
    for (uint32_t i = 0; i < 100; i++)
        s_send_seq(lonely, i);
    bus_sock_destroy(&lonely);
    bus_sock_destroy(&sub);
    bus_sock_destroy(&pub);
    e->finished = true;
}

/* bus_sock_new, bind, connect and send report their failures as documented. */
static void test_bus_errors(void **state)
{
    s_env_t *e = *state;
    assert_null(bus_sock_new(e->base, e->zctx, 12345, s_on_rx, NULL));
    bus_sock_destroy(NULL);
    bus_sock_t *none = NULL;
    bus_sock_destroy(&none);

    bus_sock_t *r = bus_sock_new(e->base, e->zctx, ZMQ_ROUTER, s_on_rx, NULL);
    assert_non_null(r);
    assert_int_equal(bus_bind(r, "tcp://127.0.0.1:*"), 0);
    const char *bound = bus_endpoint(r);
    assert_true(strncmp(bound, "tcp://127.0.0.1:", 16) == 0);
    assert_true(atoi(bound + 16) > 0);
    assert_int_equal(bus_bind(r, "nonsense://x"), -1);
    assert_int_equal(bus_connect(r, "nonsense://x"), -1);
    /* An ipc:// path another socket is bound to is refused (libzmq alone
     * would take it over), and free again once that socket is gone. */
    char ipc[128];
    s_ipc(ipc, sizeof ipc);
    bus_sock_t *a = bus_sock_new(e->base, e->zctx, ZMQ_ROUTER, NULL, NULL);
    bus_sock_t *b = bus_sock_new(e->base, e->zctx, ZMQ_ROUTER, NULL, NULL);
    assert_int_equal(bus_bind(a, ipc), 0);
    assert_int_equal(bus_bind(b, ipc), -1);
    bus_sock_destroy(&a);
    assert_int_equal(bus_bind(b, ipc), 0);
    bus_sock_destroy(&b);
    char tcp[256];
    snprintf(tcp, sizeof tcp, "%s", bound);
    bus_sock_t *r2 = bus_sock_new(e->base, e->zctx, ZMQ_ROUTER, NULL, NULL);
    assert_int_equal(bus_bind(r2, tcp), -1);  /* in use */
    bus_sock_destroy(&r2);

    /* A ROUTER cannot route to a peer it never heard of. */
    const void *data[2] = { "nobody", "x" };
    size_t size[2] = { 6, 1 };
    assert_int_equal(bus_send(r, 2, data, size), LX_AGAIN);
    bus_sock_destroy(&r);

    /* A DEALER with nobody to take its messages fills up, then refuses. */
    char ep2[128];
    s_ipc(ep2, sizeof ep2);
    bus_sock_t *d = bus_sock_new(e->base, e->zctx, ZMQ_DEALER, NULL, NULL);
    s_set_int(d, ZMQ_SNDHWM, 10);
    s_set_int(d, ZMQ_LINGER, 0);
    assert_int_equal(bus_connect(d, ep2), 0);
    int ok = 0, again = 0;
    for (uint32_t i = 0; i < 100; i++) {
        const void *one[1] = { &i };
        size_t onesize[1] = { sizeof i };
        int rc = bus_send(d, 1, one, onesize);
        assert_true(rc == 0 || rc == LX_AGAIN);
        if (rc == 0)
            ok++;
        else
            again++;
    }
    assert_int_equal(ok, 10);
    assert_int_equal(again, 90);
    bus_sock_destroy(&d);
    e->finished = true;
}

/* ---- command server fixtures ---- */

enum { S_REPLY_NOW, S_HOLD };

typedef struct {
    cmdsrv_t *srv;
    int mode;                        /* S_REPLY_NOW or S_HOLD */
    int calls;                       /* handler calls */
    bool bad;                        /* handler saw something it should not have */
    cmdsrv_req_t *held[S_MAX_HELD];  /* requests kept unanswered (S_HOLD) */
    int nheld;
} s_srv_t;

static Linli__Envelope *s_command(int64_t activity_id)
{
    Linli__Command *cmd = xmalloc(sizeof *cmd);
    linli__command__init(cmd);
    cmd->command_case = LINLI__COMMAND__COMMAND_GET_ACTIVITY;
    cmd->get_activity = xmalloc(sizeof *cmd->get_activity);
    linli__get_activity__init(cmd->get_activity);
    cmd->get_activity->activity_id = activity_id;
    return cmdcli_envelope("registry", "test", NULL, 7, cmd);
}

static void s_env_free(Linli__Envelope *e)
{
    protobuf_c_message_free_unpacked(&e->base, NULL);
}

/* A reply whose result is id: for a real answer 2 x the activity asked. */
static Linli__Reply *s_result(int64_t id)
{
    Linli__Reply *r = xmalloc(sizeof *r);
    linli__reply__init(r);
    r->ok = 1;
    r->result_case = LINLI__REPLY__RESULT_CREATE_COMMUNITY;
    r->create_community = xmalloc(sizeof *r->create_community);
    linli__id_result__init(r->create_community);
    r->create_community->id = id;
    return r;
}

static void s_answer(s_srv_t *s, cmdsrv_req_t **req_p)
{
    const Linli__Envelope *env = cmdsrv_req_envelope(*req_p);
    cmdsrv_reply(s->srv, req_p, s_result(env->command->get_activity->activity_id * 2));
    if (*req_p)
        s->bad = true;
}

static void s_handler(cmdsrv_t *srv, cmdsrv_req_t *req, void *arg)
{
    s_srv_t *s = arg;
    s->calls++;
    const Linli__Envelope *env = cmdsrv_req_envelope(req);
    if (srv != s->srv || !env || env->payload_case != LINLI__ENVELOPE__PAYLOAD_COMMAND ||
        env->command->command_case != LINLI__COMMAND__COMMAND_GET_ACTIVITY ||
        cmdsrv_req_received(req) <= 0 || cmdsrv_req_received(req) > mono_us())
        s->bad = true;
    if (env && env->command->command_case != LINLI__COMMAND__COMMAND_GET_ACTIVITY) {
        cmdsrv_reply_error(srv, &req, "unexpected", NULL);
        return;
    }
    if (s->mode == S_HOLD && s->nheld < S_MAX_HELD)
        s->held[s->nheld++] = req;
    else
        s_answer(s, &req);
}

/* Answers every held request, newest first when reverse. */
static void s_release(s_srv_t *s, bool reverse)
{
    for (int i = 0; i < s->nheld; i++)
        s_answer(s, &s->held[reverse ? s->nheld - 1 - i : i]);
    s->nheld = 0;
}

static void s_srv_start(s_env_t *e, s_srv_t *s, char *ep, size_t eplen, int mode)
{
    memset(s, 0, sizeof *s);
    s->mode = mode;
    s_ipc(ep, eplen);
    s->srv = cmdsrv_new(e->base, e->zctx, ep, "registry", s_handler, s);
    assert_non_null(s->srv);
    assert_string_equal(cmdsrv_endpoint(s->srv), ep);
}

static void s_srv_stop(s_srv_t *s)
{
    s_release(s, false);
    assert_false(s->bad);
    assert_int_equal(cmdsrv_outstanding(s->srv), 0);
    cmdsrv_destroy(&s->srv);
    assert_null(s->srv);
    cmdsrv_destroy(&s->srv);
}

static void s_stats(const s_srv_t *s, unsigned long long rec, unsigned long long rej,
                    unsigned long long rep)
{
    unsigned long long a, b, c;
    cmdsrv_stats(s->srv, &a, &b, &c);
    if (a != rec || b != rej || c != rep)
        fail_msg("stats received=%llu rejected=%llu replied=%llu, want %llu %llu %llu", a, b,
                 c, rec, rej, rep);
}

/* One asynchronous call as its callback saw it. */
typedef struct {
    char id[37];        /* request id */
    int64_t activity;   /* what was asked */
    int calls;          /* callback calls: must end at exactly 1 */
    bool replied;       /* the call got a reply (not a timeout) */
    bool matched;       /* the reply answers this request, by id and content */
    int64_t result;
    char code[64];      /* error code of an error reply */
    int64_t sent_us, done_us;
    int *done;          /* shared count of finished calls */
} s_call_t;

static void s_on_reply(const Linli__Envelope *reply, void *arg)
{
    s_call_t *c = arg;
    c->calls++;
    c->done_us = mono_us();
    (*c->done)++;
    if (!reply)
        return;
    c->replied = true;
    if (reply->payload_case != LINLI__ENVELOPE__PAYLOAD_REPLY)
        return;
    const Linli__Reply *r = reply->reply;
    if (!r->ok) {
        snprintf(c->code, sizeof c->code, "%s", r->error ? r->error->code : "?");
        return;
    }
    if (r->result_case == LINLI__REPLY__RESULT_CREATE_COMMUNITY)
        c->result = r->create_community->id;
    c->matched = r->request_id && strcmp(r->request_id, c->id) == 0 &&
                 c->result == 2 * c->activity && strcmp(reply->source, "registry") == 0 &&
                 reply->community_id == 7;
}

static void s_call(cmdcli_t *cli, s_call_t *c, int64_t activity, int timeout_ms, int *done)
{
    memset(c, 0, sizeof *c);
    c->activity = activity;
    c->done = done;
    Linli__Envelope *req = s_command(activity);
    memcpy(c->id, req->id, sizeof c->id);
    c->sent_us = mono_us();
    assert_int_equal(cmdcli_send(cli, req, timeout_ms, s_on_reply, c), 0);
    s_env_free(req);
}

/* ---- command server and client tests ---- */

/* 800 asynchronous calls in flight at once on one DEALER, answered at once:
 * each callback runs exactly once with its own reply. */
static void test_cmd_pipelined(void **state)
{
    s_env_t *e = *state;
    enum { N = 800 };
    s_srv_t s;
    char ep[128];
    s_srv_start(e, &s, ep, sizeof ep, S_REPLY_NOW);
    cmdcli_t *cli = cmdcli_new(e->base, e->zctx, ep);
    assert_non_null(cli);
    s_call_t *calls = xcalloc(N, sizeof *calls);
    int done = 0;
    for (int i = 0; i < N; i++)
        s_call(cli, &calls[i], 1000 + i, 5000, &done);
    assert_int_equal(cmdcli_pending(cli), N);
    s_wait(e, &done, N);
    s_run_for(e, 20);
    assert_int_equal(done, N);
    for (int i = 0; i < N; i++) {
        if (calls[i].calls != 1 || !calls[i].matched)
            fail_msg("call %d: calls=%d matched=%d result=%lld", i, calls[i].calls,
                     calls[i].matched, (long long)calls[i].result);
    }
    assert_int_equal(cmdcli_pending(cli), 0);
    assert_int_equal(s.calls, N);
    s_stats(&s, N, 0, N);
    free(calls);
    cmdcli_destroy(&cli);
    assert_null(cli);
    cmdcli_destroy(&cli);
    s_srv_stop(&s);
    e->finished = true;
}

/* The server holds 300 requests and answers them newest first: replies are
 * matched by request_id, not by order. */
static void test_cmd_out_of_order(void **state)
{
    s_env_t *e = *state;
    enum { N = 300 };
    s_srv_t s;
    char ep[128];
    s_srv_start(e, &s, ep, sizeof ep, S_HOLD);
    cmdcli_t *cli = cmdcli_new(e->base, e->zctx, ep);
    assert_non_null(cli);
    s_call_t calls[N];
    int done = 0;
    for (int i = 0; i < N; i++)
        s_call(cli, &calls[i], 5000 + i, 5000, &done);
    s_wait(e, &s.calls, N);
    assert_int_equal(cmdsrv_outstanding(s.srv), N);
    s_stats(&s, N, 0, 0);
    assert_int_equal(done, 0);
    s_release(&s, true);
    assert_int_equal(cmdsrv_outstanding(s.srv), 0);
    s_wait(e, &done, N);
    for (int i = 0; i < N; i++) {
        assert_int_equal(calls[i].calls, 1);
        assert_true(calls[i].matched);
    }
    s_stats(&s, N, 0, N);
    cmdcli_destroy(&cli);
    s_srv_stop(&s);
    e->finished = true;
}

/* The blocking client runs on its own thread (it has no loop) against the
 * server in this thread's loop. No cmocka asserts on that thread. */
typedef struct {
    void *zctx;
    const char *endpoint;
    Linli__Envelope *req[20];
    int n;
    int timeout_ms;
    int rc[20];
    Linli__Envelope *reply[20];
    int64_t elapsed_us[20];
    int finished;  /* set (atomically) when the thread is done */
} s_sync_t;

static void *s_sync_thread(void *arg)
{
    s_sync_t *t = arg;
    for (int i = 0; i < t->n; i++) {
        int64_t t0 = mono_us();
        t->rc[i] = cmdcli_call(t->zctx, t->endpoint, t->req[i], t->timeout_ms, &t->reply[i]);
        t->elapsed_us[i] = mono_us() - t0;
    }
    __atomic_store_n(&t->finished, 1, __ATOMIC_RELEASE);
    return NULL;
}

static bool s_sync_done(const void *arg)
{
    const s_sync_t *t = arg;
    return __atomic_load_n(&t->finished, __ATOMIC_ACQUIRE) != 0;
}

static void s_sync_run(s_env_t *e, s_sync_t *t)
{
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, s_sync_thread, t), 0);
    bool ok = s_run_until(e, s_sync_done, t, S_DEADLINE_MS);
    assert_int_equal(pthread_join(th, NULL), 0);
    assert_true(ok);
}

/* cmdcli_call: twenty calls in turn, each answered with its own reply; then
 * a call the server holds times out with LX_AGAIN. */
static void test_cmd_sync_call(void **state)
{
    s_env_t *e = *state;
    s_srv_t s;
    char ep[128];
    s_srv_start(e, &s, ep, sizeof ep, S_REPLY_NOW);
    s_sync_t *t = xcalloc(1, sizeof *t);
    t->zctx = e->zctx;
    t->endpoint = ep;
    t->n = 20;
    t->timeout_ms = 3000;
    for (int i = 0; i < t->n; i++)
        t->req[i] = s_command(300 + i);
    s_sync_run(e, t);
    for (int i = 0; i < t->n; i++) {
        assert_int_equal(t->rc[i], 0);
        const Linli__Envelope *r = t->reply[i];
        assert_non_null(r);
        assert_int_equal(r->payload_case, LINLI__ENVELOPE__PAYLOAD_REPLY);
        assert_true(r->reply->ok);
        assert_string_equal(r->reply->request_id, t->req[i]->id);
        assert_string_equal(r->idempotency_key, t->req[i]->idempotency_key);
        assert_int_equal(r->reply->create_community->id, 2 * (300 + i));
        envelope_free(&t->reply[i]);
        s_env_free(t->req[i]);
    }
    s_stats(&s, 20, 0, 20);

    s.mode = S_HOLD;
    memset(t, 0, sizeof *t);
    t->zctx = e->zctx;
    t->endpoint = ep;
    t->n = 1;
    t->timeout_ms = 150;
    t->req[0] = s_command(1);
    s_sync_run(e, t);
    assert_int_equal(t->rc[0], LX_AGAIN);
    assert_null(t->reply[0]);
    assert_true(t->elapsed_us[0] >= 140000);
    assert_int_equal(s.calls, 21);
    s_env_free(t->req[0]);
    free(t);
    /* Answering a peer that has gone is not an error. */
    s_release(&s, false);
    s_run_for(e, 10);
    s_srv_stop(&s);
    e->finished = true;
}

/* Nobody bound: the asynchronous call's callback gets NULL after its
 * timeout, the blocking call returns LX_AGAIN, a bad endpoint -1. */
static void test_cmd_no_server(void **state)
{
    s_env_t *e = *state;
    char ep[128];
    s_ipc(ep, sizeof ep);
    cmdcli_t *cli = cmdcli_new(e->base, e->zctx, ep);
    assert_non_null(cli);
    s_call_t c;
    int done = 0;
    s_call(cli, &c, 1, 100, &done);
    assert_int_equal(cmdcli_pending(cli), 1);
    s_wait(e, &done, 1);
    s_run_for(e, 20);
    assert_int_equal(c.calls, 1);
    assert_false(c.replied);
    assert_true(c.done_us - c.sent_us >= 95000);
    assert_int_equal(cmdcli_pending(cli), 0);
    cmdcli_destroy(&cli);

    Linli__Envelope *req = s_command(1);
    Linli__Envelope *reply = (Linli__Envelope *)1;
    int64_t t0 = mono_us();
    assert_int_equal(cmdcli_call(e->zctx, ep, req, 100, &reply), LX_AGAIN);
    assert_true(mono_us() - t0 >= 95000);
    assert_null(reply);
    reply = (Linli__Envelope *)1;
    assert_int_equal(cmdcli_call(e->zctx, "nonsense://x", req, 100, &reply), -1);
    assert_null(reply);
    assert_null(cmdcli_new(e->base, e->zctx, "nonsense://x"));
    s_env_free(req);
    /* The client's DEALER lingers with the request unsent: let it go. */
    void *sink = zmq_socket(e->zctx, ZMQ_ROUTER);
    int zero = 0;
    zmq_setsockopt(sink, ZMQ_LINGER, &zero, sizeof zero);
    assert_int_equal(zmq_bind(sink, ep), 0);
    s_run_for(e, 150);
    zmq_close(sink);
    e->finished = true;
}

/* A reply that comes after its call timed out is dropped: the callback ran
 * once (with NULL) and does not run again. */
static void test_cmd_late_reply(void **state)
{
    s_env_t *e = *state;
    s_srv_t s;
    char ep[128];
    s_srv_start(e, &s, ep, sizeof ep, S_HOLD);
    cmdcli_t *cli = cmdcli_new(e->base, e->zctx, ep);
    s_call_t late, next;
    int done = 0;
    s_call(cli, &late, 10, 60, &done);
    s_wait(e, &done, 1);
    assert_int_equal(s.calls, 1);
    assert_false(late.replied);
    s_release(&s, false);
    s.mode = S_REPLY_NOW;
    /* One DEALER, one ROUTER: replies arrive in the order sent, so once
     * the next call is answered the late reply has been seen and dropped. */
    s_call(cli, &next, 11, 3000, &done);
    s_wait(e, &done, 2);
    s_run_for(e, 20);
    assert_int_equal(late.calls, 1);
    assert_false(late.replied);
    assert_int_equal(next.calls, 1);
    assert_true(next.matched);
    s_stats(&s, 2, 0, 2);
    cmdcli_destroy(&cli);
    s_srv_stop(&s);
    e->finished = true;
}

/* A fake server (a bare ROUTER) answers every request with garbage, a reply
 * to an unknown request id, a non-reply envelope, the right reply and then
 * the right reply again. The client calls back once, with the right one. */
typedef struct {
    bus_sock_t *sock;
    int requests;
} s_fake_t;

static void s_fake_send(s_fake_t *f, const bus_msg_t *msg, Linli__Envelope *env)
{
    size_t len;
    uint8_t *buf = envelope_encode(env, &len);
    const void *data[2] = { msg->data[0], buf };
    size_t size[2] = { msg->size[0], len };
    assert_int_equal(bus_send(f->sock, 2, data, size), 0);
    free(buf);
    s_env_free(env);
}

static void s_on_fake(bus_sock_t *s, const bus_msg_t *msg, void *arg)
{
    (void)s;
    s_fake_t *f = arg;
    assert_int_equal(msg->count, 2);
    const char *code;
    char why[128];
    Linli__Envelope *req = envelope_decode(msg->data[1], msg->size[1], &code, why, sizeof why);
    assert_non_null(req);
    f->requests++;

    const void *junk[2] = { msg->data[0], "\xff\xff\xff" };
    size_t junksize[2] = { msg->size[0], 3 };
    assert_int_equal(bus_send(f->sock, 2, junk, junksize), 0);

    Linli__Envelope *stray = envelope_reply_new(NULL, "registry", s_result(666));
    char other[37];
    uuid_new(other);
    stray->reply->request_id = xstrdup(other);
    s_fake_send(f, msg, stray);

    Linli__Envelope *ev = xmalloc(sizeof *ev);
    linli__envelope__init(ev);
    ev->id = xstrdup(other);
    ev->source = xstrdup("registry");
    ev->payload_case = LINLI__ENVELOPE__PAYLOAD_EVENT;
    ev->event = xmalloc(sizeof *ev->event);
    linli__event__init(ev->event);
    s_fake_send(f, msg, ev);

    int64_t want = 2 * req->command->get_activity->activity_id;
    s_fake_send(f, msg, envelope_reply_new(req, "registry", s_result(want)));
    s_fake_send(f, msg, envelope_reply_new(req, "registry", s_result(want + 1)));
    envelope_free(&req);
}

static void test_cmd_stray_replies(void **state)
{
    s_env_t *e = *state;
    char ep[128];
    s_ipc(ep, sizeof ep);
    s_fake_t f = { NULL, 0 };
    f.sock = bus_sock_new(e->base, e->zctx, ZMQ_ROUTER, s_on_fake, &f);
    assert_int_equal(bus_bind(f.sock, ep), 0);
    cmdcli_t *cli = cmdcli_new(e->base, e->zctx, ep);
    s_call_t a, b;
    int done = 0;
    s_call(cli, &a, 21, 3000, &done);
    s_wait(e, &done, 1);
    assert_int_equal(cmdcli_pending(cli), 0);
    /* Everything the fake sent for a precedes whatever it sends for b. */
    s_call(cli, &b, 22, 3000, &done);
    s_wait(e, &done, 2);
    s_run_for(e, 20);
    assert_int_equal(f.requests, 2);
    assert_int_equal(a.calls, 1);
    assert_true(a.matched);
    assert_int_equal(a.result, 42);
    assert_int_equal(b.calls, 1);
    assert_true(b.matched);
    assert_int_equal(b.result, 44);
    assert_int_equal(done, 2);
    cmdcli_destroy(&cli);
    bus_sock_destroy(&f.sock);
    e->finished = true;
}

/* Destroying a client answers each pending call with NULL, once; a request
 * without a valid id is refused before sending (callback never runs); a
 * full queue refuses with -1 (callback never runs). */
static void test_cmd_client_limits(void **state)
{
    s_env_t *e = *state;
    s_srv_t s;
    char ep[128];
    s_srv_start(e, &s, ep, sizeof ep, S_HOLD);
    cmdcli_t *cli = cmdcli_new(e->base, e->zctx, ep);
    s_call_t c[5];
    int done = 0;
    for (int i = 0; i < 5; i++)
        s_call(cli, &c[i], i, 10000, &done);
    s_wait(e, &s.calls, 5);

    Linli__Envelope *req = s_command(1);
    free(req->id);
    req->id = xstrdup("not-a-uuid");
    s_call_t bad = { .done = &done };
    assert_int_equal(cmdcli_send(cli, req, 1000, s_on_reply, &bad), -1);
    s_env_free(req);
    assert_int_equal(cmdcli_pending(cli), 5);

    cmdcli_destroy(&cli);
    assert_null(cli);
    assert_int_equal(done, 5);
    for (int i = 0; i < 5; i++) {
        assert_int_equal(c[i].calls, 1);
        assert_false(c[i].replied);
    }
    assert_int_equal(bad.calls, 0);
    s_run_for(e, 20);
    assert_int_equal(done, 5);
    s_srv_stop(&s);

    /* Nobody bound: the DEALER's queue fills at its high-water mark. */
    char ep2[128];
    s_ipc(ep2, sizeof ep2);
    cli = cmdcli_new(e->base, e->zctx, ep2);
    enum { MAX = 3000 };
    s_call_t *many = xcalloc(MAX, sizeof *many);
    int sent = 0, refused = -1;
    done = 0;
    for (int i = 0; i < MAX; i++) {
        Linli__Envelope *r = s_command(i);
        many[i].done = &done;
        int rc = cmdcli_send(cli, r, 60000, s_on_reply, &many[i]);
        s_env_free(r);
        if (rc != 0) {
            refused = i;
            break;
        }
        sent++;
    }
    assert_true(sent > 0);
    assert_int_equal(refused, sent);
    assert_int_equal(cmdcli_pending(cli), sent);
    assert_int_equal(many[refused].calls, 0);
    cmdcli_destroy(&cli);
    assert_int_equal(done, sent);
    assert_int_equal(many[refused].calls, 0);
    free(many);
    /* Let the lingering DEALER hand its queue to someone. */
    void *sink = zmq_socket(e->zctx, ZMQ_ROUTER);
    int zero = 0, big = 100000;
    zmq_setsockopt(sink, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(sink, ZMQ_RCVHWM, &big, sizeof big);
    assert_int_equal(zmq_bind(sink, ep2), 0);
    s_run_for(e, 150);
    zmq_close(sink);
    e->finished = true;
}

/* A raw DEALER (or REQ) probe that records every reply envelope. */
typedef struct {
    int count;               /* replies received */
    int undecodable;         /* frames that were not valid envelopes */
    bool ok[32];
    char code[32][32];
    char request_id[32][37];
    char source[32][16];
} s_probe_t;

static void s_on_probe_reply(bus_sock_t *s, const bus_msg_t *msg, void *arg)
{
    (void)s;
    s_probe_t *p = arg;
    const char *code;
    char why[128];
    Linli__Envelope *r = envelope_decode(msg->data[msg->count - 1], msg->size[msg->count - 1],
                                         &code, why, sizeof why);
    if (!r || r->payload_case != LINLI__ENVELOPE__PAYLOAD_REPLY || p->count >= 32) {
        p->undecodable++;
        envelope_free(&r);
        return;
    }
    int i = p->count++;
    p->ok[i] = r->reply->ok;
    snprintf(p->code[i], sizeof p->code[i], "%s",
             r->reply->error && r->reply->error->code ? r->reply->error->code : "");
    snprintf(p->request_id[i], sizeof p->request_id[i], "%s",
             r->reply->request_id ? r->reply->request_id : "");
    snprintf(p->source[i], sizeof p->source[i], "%s", r->source ? r->source : "");
    envelope_free(&r);
}

static void s_send_env(bus_sock_t *s, const Linli__Envelope *env)
{
    size_t len;
    uint8_t *buf = envelope_encode(env, &len);
    const void *data[1] = { buf };
    assert_int_equal(bus_send(s, 1, data, &len), 0);
    free(buf);
}

/* Frames a peer should never send: each gets one error reply with the
 * documented code (none reaches the handler), naming the request when its
 * id was readable; a message with more frames
 * than the bus takes is dropped unanswered; and then a good command is
 * still served. Exactly one reply per request. */
static void test_cmd_rejects(void **state)
{
    s_env_t *e = *state;
    s_srv_t s;
    char ep[128];
    s_srv_start(e, &s, ep, sizeof ep, S_REPLY_NOW);
    s_probe_t p;
    memset(&p, 0, sizeof p);
    bus_sock_t *d = bus_sock_new(e->base, e->zctx, ZMQ_DEALER, s_on_probe_reply, &p);
    assert_int_equal(bus_connect(d, ep), 0);

    Linli__Envelope *good = s_command(50);
    size_t glen;
    uint8_t *gbuf = envelope_encode(good, &glen);
    const char *want[16];
    char wantid[16][37];  /* the request id the refusal must carry, or "" */
    memset(wantid, 0, sizeof wantid);
    int n = 0;

    const void *junk[1] = { "\xff\xff\xff" };
    size_t junksize[1] = { 3 };
    assert_int_equal(bus_send(d, 1, junk, junksize), 0);
    want[n++] = ENVELOPE_E_MALFORMED;

    const void *empty[1] = { "" };
    size_t emptysize[1] = { 0 };
    assert_int_equal(bus_send(d, 1, empty, emptysize), 0);
    want[n++] = ENVELOPE_E_INVALID;

    size_t bigsize[1] = { ENVELOPE_MAX_BYTES + 1 };
    void *big = xcalloc(1, bigsize[0]);
    const void *bigdata[1] = { big };
    assert_int_equal(bus_send(d, 1, bigdata, bigsize), 0);
    free(big);
    want[n++] = ENVELOPE_E_TOO_LARGE;

    const void *two[2] = { gbuf, gbuf };
    size_t twosize[2] = { glen, glen };
    assert_int_equal(bus_send(d, 2, two, twosize), 0);
    want[n++] = ENVELOPE_E_MALFORMED;

    const void *delim3[3] = { "", gbuf, gbuf };
    size_t delim3size[3] = { 0, glen, glen };
    assert_int_equal(bus_send(d, 3, delim3, delim3size), 0);
    want[n++] = ENVELOPE_E_MALFORMED;

    Linli__Envelope *ev = s_command(1);
    linli__command__free_unpacked(ev->command, NULL);
    ev->payload_case = LINLI__ENVELOPE__PAYLOAD_EVENT;
    ev->event = xmalloc(sizeof *ev->event);
    linli__event__init(ev->event);
    s_send_env(d, ev);
    snprintf(wantid[n], 37, "%s", ev->id);  /* readable: named in the refusal */
    s_env_free(ev);
    want[n++] = ENVELOPE_E_INVALID;

    Linli__Envelope *noid = s_command(1);
    free(noid->id);
    noid->id = xstrdup("");
    s_send_env(d, noid);
    want[n++] = ENVELOPE_E_INVALID;
    free(noid->id);
    noid->id = xstrdup("not-a-uuid");
    s_send_env(d, noid);
    want[n++] = ENVELOPE_E_INVALID;
    s_env_free(noid);

    Linli__Envelope *longsrc = s_command(1);
    free(longsrc->source);
    longsrc->source = xasprintf("%0*d", ENVELOPE_MAX_NAME + 1, 0);
    s_send_env(d, longsrc);
    snprintf(wantid[n], 37, "%s", longsrc->id);
    s_env_free(longsrc);
    want[n++] = ENVELOPE_E_INVALID;

    Linli__Envelope *nocmd = s_command(1);
    nocmd->command->command_case = LINLI__COMMAND__COMMAND__NOT_SET;
    free(nocmd->command->get_activity);  /* not freed via the unset case */
    nocmd->command->get_activity = NULL;
    s_send_env(d, nocmd);
    snprintf(wantid[n], 37, "%s", nocmd->id);
    s_env_free(nocmd);
    want[n++] = ENVELOPE_E_INVALID;

    const void *nine[BUS_MAX_FRAMES + 1];
    size_t ninesize[BUS_MAX_FRAMES + 1];
    for (int i = 0; i < BUS_MAX_FRAMES + 1; i++) {
        nine[i] = gbuf;
        ninesize[i] = glen;
    }
    assert_int_equal(bus_send(d, BUS_MAX_FRAMES + 1, nine, ninesize), 0);

    const void *one[1] = { gbuf };
    assert_int_equal(bus_send(d, 1, one, &glen), 0);
    want[n++] = NULL;  /* served */

    s_wait(e, &p.count, n);
    s_run_for(e, 30);
    assert_int_equal(p.count, n);
    assert_int_equal(p.undecodable, 0);
    for (int i = 0; i < n; i++) {
        if (want[i]) {
            if (p.ok[i] || strcmp(p.code[i], want[i]) != 0)
                fail_msg("reply %d: ok=%d code=%s, want %s", i, p.ok[i], p.code[i], want[i]);
            assert_string_equal(p.request_id[i], wantid[i]);
        } else {
            assert_true(p.ok[i]);
            assert_string_equal(p.request_id[i], good->id);
        }
        assert_string_equal(p.source[i], "registry");
    }
    assert_int_equal(s.calls, 1);
    s_stats(&s, (unsigned long long)n, (unsigned long long)n - 1, (unsigned long long)n);

    free(gbuf);
    s_env_free(good);
    bus_sock_destroy(&d);
    s_srv_stop(&s);
    e->finished = true;
}

/* A REQ peer (which adds an empty delimiter frame) is served too: its
 * commands are answered, and so are its bad frames. */
static void test_cmd_req_peer(void **state)
{
    s_env_t *e = *state;
    s_srv_t s;
    char ep[128];
    s_srv_start(e, &s, ep, sizeof ep, S_REPLY_NOW);
    s_probe_t p;
    memset(&p, 0, sizeof p);
    bus_sock_t *r = bus_sock_new(e->base, e->zctx, ZMQ_REQ, s_on_probe_reply, &p);
    assert_int_equal(bus_connect(r, ep), 0);
    Linli__Envelope *good = s_command(60);
    s_send_env(r, good);
    s_wait(e, &p.count, 1);
    assert_true(p.ok[0]);
    assert_string_equal(p.request_id[0], good->id);
    const void *junk[1] = { "\xff\xff\xff" };
    size_t junksize[1] = { 3 };
    assert_int_equal(bus_send(r, 1, junk, junksize), 0);
    s_wait(e, &p.count, 2);
    assert_false(p.ok[1]);
    assert_string_equal(p.code[1], ENVELOPE_E_MALFORMED);
    assert_int_equal(p.undecodable, 0);
    s_env_free(good);
    bus_sock_destroy(&r);
    s_srv_stop(&s);
    e->finished = true;
}

/* A frame past ZMQ_MAXMSGSIZE is refused by libzmq unread (the peer's
 * connection is dropped): no reply, nothing counted, and the server goes on
 * serving others. */
static void test_cmd_too_big_for_transport(void **state)
{
    s_env_t *e = *state;
    s_srv_t s;
    char ep[128];
    s_srv_start(e, &s, ep, sizeof ep, S_REPLY_NOW);
    s_probe_t p;
    memset(&p, 0, sizeof p);
    bus_sock_t *d = bus_sock_new(e->base, e->zctx, ZMQ_DEALER, s_on_probe_reply, &p);
    assert_int_equal(bus_connect(d, ep), 0);
    size_t size[1] = { ENVELOPE_MAX_BYTES + 64 * 1024 + 1 };
    void *big = xcalloc(1, size[0]);
    const void *data[1] = { big };
    assert_int_equal(bus_send(d, 1, data, size), 0);
    free(big);
    s_run_for(e, 200);
    assert_int_equal(p.count, 0);
    s_stats(&s, 0, 0, 0);

    cmdcli_t *cli = cmdcli_new(e->base, e->zctx, ep);
    s_call_t c;
    int done = 0;
    s_call(cli, &c, 70, 3000, &done);
    s_wait(e, &done, 1);
    assert_true(c.matched);
    s_stats(&s, 1, 0, 1);
    assert_int_equal(p.count, 0);
    cmdcli_destroy(&cli);
    bus_sock_destroy(&d);
    s_srv_stop(&s);
    e->finished = true;
}

/* A paused server takes nothing new but still answers what it holds;
 * resumed, it serves what queued meanwhile. */
static void test_cmd_pause(void **state)
{
    s_env_t *e = *state;
    s_srv_t s;
    char ep[128];
    s_srv_start(e, &s, ep, sizeof ep, S_HOLD);
    cmdcli_t *cli = cmdcli_new(e->base, e->zctx, ep);
    s_call_t held, queued;
    int done = 0;
    s_call(cli, &held, 80, 5000, &done);
    s_wait(e, &s.calls, 1);
    cmdsrv_pause(s.srv, true);
    s_call(cli, &queued, 81, 5000, &done);
    s_run_for(e, 100);
    assert_int_equal(s.calls, 1);
    s_release(&s, false);
    s_wait(e, &done, 1);
    assert_true(held.matched);
    assert_int_equal(queued.calls, 0);
    s.mode = S_REPLY_NOW;
    cmdsrv_pause(s.srv, false);
    s_wait(e, &done, 2);
    assert_true(queued.matched);
    assert_int_equal(s.calls, 2);
    s_stats(&s, 2, 0, 2);
    cmdcli_destroy(&cli);
    s_srv_stop(&s);
    e->finished = true;
}

/* Binding where another server is bound fails cleanly. */
static void test_cmd_bind_conflict(void **state)
{
    s_env_t *e = *state;
    s_srv_t s;
    memset(&s, 0, sizeof s);
    s.srv = cmdsrv_new(e->base, e->zctx, "tcp://127.0.0.1:*", "registry", s_handler, &s);
    assert_non_null(s.srv);
    char ep[256];
    snprintf(ep, sizeof ep, "%s", cmdsrv_endpoint(s.srv));
    assert_true(strncmp(ep, "tcp://127.0.0.1:", 16) == 0);
    assert_null(cmdsrv_new(e->base, e->zctx, ep, "other", s_handler, &s));
    assert_null(cmdsrv_new(e->base, e->zctx, "nonsense://x", "other", s_handler, &s));
    s_srv_stop(&s);
    e->finished = true;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_bus_burst_ipc, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_bus_burst_yields_to_loop, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_bus_burst_yields_when_replying, s_setup,
                                        s_teardown),
        cmocka_unit_test_setup_teardown(test_bus_ping_pong, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_bus_multipart, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_bus_pause_resume, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_bus_destroy_in_callback, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_bus_pub_sub, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_bus_errors, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_cmd_pipelined, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_cmd_out_of_order, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_cmd_sync_call, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_cmd_no_server, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_cmd_late_reply, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_cmd_stray_replies, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_cmd_client_limits, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_cmd_rejects, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_cmd_req_peer, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_cmd_too_big_for_transport, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_cmd_pause, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_cmd_bind_conflict, s_setup, s_teardown),
    };
    return cmocka_run_group_tests(tests, s_group_setup, s_group_teardown);
}
