/* ZeroMQ sockets driven by the libevent loop (see bus.h for the edge-trigger
 * rules this follows). */
#include "bus.h"

#include "envelope.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <unistd.h>
#include <zmq.h>

struct bus_sock {
    void *zs;                   /* libzmq socket, owned */
    struct event *ev;           /* read watch on ZMQ_FD; NULL for send-only sockets */
    struct event *more;         /* zero-delay timer: input left after a burst */
    bus_recv_fn *fn;            /* receive callback */
    void *arg;                  /* its argument */
    int type;                   /* ZMQ_ROUTER, ... */
    char endpoint[256];         /* last endpoint bound or connected */
    unsigned long long dropped; /* messages dropped for too many frames */
    int *alive;                 /* set to 0 on destroy while inside a callback */
    int paused;                 /* not reading */
    int lock_fd;                /* flock on "<ipc path>.lock" while bound there; -1 */
};

/* Receives and dispatches up to BUS_BURST messages, reading until libzmq
 * says EAGAIN: a receive that finds nothing has processed the socket's
 * pending commands, so the descriptor signals again when input arrives.
 * Returns 1 if input may remain (caller re-arms), 0 if drained, -1 if the
 * socket was destroyed by a callback. */
static int s_drain(bus_sock_t *s)
{
    int alive = 1;
    s->alive = &alive;
    int handled = 0;
    while (!s->paused) {
        if (handled == BUS_BURST) {
            s->alive = NULL;
            return 1;
        }
        zmq_msg_t parts[BUS_MAX_FRAMES];
        bus_msg_t msg = { 0 };
        int n = 0, more = 1, too_many = 0, failed = 0;
        while (more) {
            zmq_msg_t *m = &parts[n < BUS_MAX_FRAMES ? n : BUS_MAX_FRAMES - 1];
            if (n >= BUS_MAX_FRAMES) {
                /* Keep reading the surplus frames into the last slot so the
                 * message is consumed whole, then drop it. */
                zmq_msg_close(m);
                too_many = 1;
            }
            zmq_msg_init(m);
            if (zmq_msg_recv(m, s->zs, ZMQ_DONTWAIT) < 0) {
                zmq_msg_close(m);
                failed = 1;
                break;
            }
            more = zmq_msg_more(m);
            if (n < BUS_MAX_FRAMES)
                n++;
        }
        if (!failed && !too_many) {
            msg.count = n;
            for (int i = 0; i < n; i++) {
                msg.data[i] = zmq_msg_data(&parts[i]);
                msg.size[i] = zmq_msg_size(&parts[i]);
            }
            s->fn(s, &msg, s->arg);
        } else if (too_many) {
            s->dropped++;
        }
        for (int i = 0; i < n; i++)
            zmq_msg_close(&parts[i]);
        if (!alive)
            return -1;
        if (failed)
            break;   /* EAGAIN on a first frame: drained (later frames cannot fail) */
        handled++;
    }
    s->alive = NULL;
    return 0;
}

/* Handles s's input on the next pass of the loop. Not event_active():
 * libevent runs an event activated from a callback in the same pass, so a
 * socket that keeps re-activating itself (or two that activate each other)
 * would keep the loop from polling and running timers until drained. */
static void s_wake(bus_sock_t *s)
{
    static const struct timeval zero = { 0, 0 };
    if (!evtimer_pending(s->more, NULL))
        evtimer_add(s->more, &zero);
}

static void s_on_fd(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    bus_sock_t *s = arg;
    if (s->paused)
        return;
    if (s_drain(s) == 1)
        s_wake(s);
}

bus_sock_t *bus_sock_new(struct event_base *base, void *zctx, int type, bus_recv_fn *fn,
                         void *arg)
{
    bus_sock_t *s = xcalloc(1, sizeof *s);
    s->lock_fd = -1;
    s->type = type;
    s->fn = fn;
    s->arg = arg;
    s->zs = zmq_socket(zctx, type);
    if (!s->zs) {
        log_error("bus", "zmq_socket failed err=%s", zmq_strerror(errno));
        goto fail;
    }
    int linger = BUS_LINGER_MS;
    int64_t maxmsg = ENVELOPE_MAX_BYTES + 64 * 1024;
    zmq_setsockopt(s->zs, ZMQ_LINGER, &linger, sizeof linger);
    zmq_setsockopt(s->zs, ZMQ_MAXMSGSIZE, &maxmsg, sizeof maxmsg);
    if (type == ZMQ_ROUTER) {
        /* Report unroutable replies instead of dropping them silently. */
        int on = 1;
        zmq_setsockopt(s->zs, ZMQ_ROUTER_MANDATORY, &on, sizeof on);
    }
    if (fn) {
        int fd;
        size_t len = sizeof fd;
        if (zmq_getsockopt(s->zs, ZMQ_FD, &fd, &len) != 0) {
            log_error("bus", "ZMQ_FD failed err=%s", zmq_strerror(errno));
            goto fail;
        }
        s->ev = event_new(base, fd, EV_READ | EV_PERSIST, s_on_fd, s);
        s->more = evtimer_new(base, s_on_fd, s);
        if (!s->ev || !s->more || event_add(s->ev, NULL) != 0) {
            log_error("bus", "cannot watch socket fd=%d", fd);
            goto fail;
        }
    }
    return s;
fail:
    bus_sock_destroy(&s);
    return NULL;
}

void bus_sock_destroy(bus_sock_t **s_p)
{
    if (!s_p || !*s_p)
        return;
    bus_sock_t *s = *s_p;
    if (s->alive)
        *s->alive = 0;
    if (s->ev)
        event_free(s->ev);
    if (s->more)
        event_free(s->more);
    if (s->zs)
        zmq_close(s->zs);
    if (s->lock_fd >= 0)
        close(s->lock_fd);   /* releases the lock */
    free(s);
    *s_p = NULL;
}

/* libzmq binds an ipc:// path that another process serves by replacing its
 * socket file, silently taking its clients. A lock held next to the file
 * for as long as we are bound makes the second daemon refuse to start
 * instead. Returns 0, or -1 (logged) when another process holds it. */
static int s_ipc_lock(bus_sock_t *s, const char *endpoint)
{
    if (strncmp(endpoint, "ipc://", 6) != 0 || endpoint[6] == '@' || endpoint[6] == '\0' ||
        s->lock_fd >= 0)
        return 0;   /* not a file, or a lock held already */
    char path[300];
    if ((size_t)snprintf(path, sizeof path, "%s.lock", endpoint + 6) >= sizeof path) {
        log_error("bus", "ipc path too long endpoint=%s", endpoint);
        return -1;
    }
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0) {
        log_error("bus", "cannot open lock file path=%s err=%s", path, strerror(errno));
        return -1;
    }
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        log_error("bus", "another process is bound to endpoint=%s (lock %s held)", endpoint,
                  path);
        close(fd);
        return -1;
    }
    s->lock_fd = fd;
    return 0;
}

int bus_bind(bus_sock_t *s, const char *endpoint)
{
    if (s_ipc_lock(s, endpoint) != 0)
        return -1;
    if (zmq_bind(s->zs, endpoint) != 0) {
        log_error("bus", "bind failed endpoint=%s err=%s", endpoint, zmq_strerror(errno));
        return -1;
    }
    size_t len = sizeof s->endpoint;
    if (zmq_getsockopt(s->zs, ZMQ_LAST_ENDPOINT, s->endpoint, &len) != 0)
        snprintf(s->endpoint, sizeof s->endpoint, "%s", endpoint);
    return 0;
}

int bus_connect(bus_sock_t *s, const char *endpoint)
{
    if (zmq_connect(s->zs, endpoint) != 0) {
        log_error("bus", "connect failed endpoint=%s err=%s", endpoint, zmq_strerror(errno));
        return -1;
    }
    snprintf(s->endpoint, sizeof s->endpoint, "%s", endpoint);
    return 0;
}

const char *bus_endpoint(const bus_sock_t *s)
{
    return s->endpoint;
}

int bus_send(bus_sock_t *s, int n, const void *const *data, const size_t *size)
{
    int rc = 0;
    for (int i = 0; i < n; i++) {
        int flags = ZMQ_DONTWAIT | (i + 1 < n ? ZMQ_SNDMORE : 0);
        if (zmq_send(s->zs, data[i], size[i], flags) < 0) {
            /* A failure on the first frame sends nothing; later frames of
             * a multipart message cannot fail on HWM once the first went. */
            if (errno == EAGAIN) {
                rc = LX_AGAIN;
            } else if (errno == EHOSTUNREACH) {
                log_debug("bus", "peer gone endpoint=%s", s->endpoint);
                rc = LX_AGAIN;
            } else {
                log_error("bus", "send failed endpoint=%s err=%s", s->endpoint,
                          zmq_strerror(errno));
                rc = -1;
            }
            break;
        }
    }
    /* Sending may have consumed the edge that announced pending input: the
     * socket is read on the loop's next pass, once for any number of sends. */
    if (s->ev && !s->paused)
        s_wake(s);
    return rc;
}

void bus_pause(bus_sock_t *s, int paused)
{
    if (!s->ev || s->paused == paused)
        return;
    s->paused = paused;
    if (paused) {
        event_del(s->ev);
        event_del(s->more);
    } else {
        event_add(s->ev, NULL);
        /* Input may have arrived while paused without a new edge. */
        s_wake(s);
    }
}

void *bus_zsock(bus_sock_t *s)
{
    return s->zs;
}

unsigned long long bus_dropped(const bus_sock_t *s)
{
    return s->dropped;
}
