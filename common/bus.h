/* ZeroMQ sockets inside the libevent loop.
 *
 * libzmq exposes one file descriptor per socket (ZMQ_FD) that is
 * edge-triggered and signals "ZMQ_EVENTS may have changed", not "a message
 * is waiting". So on every wake-up we keep receiving until libzmq answers
 * EAGAIN (a receive that finds nothing has read the socket's pending
 * commands, as a read of ZMQ_EVENTS would), and a send (which can consume
 * the edge for pending input) has the socket read again on the loop's next
 * pass, once for any number of sends. To keep one busy socket from starving
 * the loop, at most BUS_BURST messages are handled per wake-up; the rest are
 * handled on the next loop iteration (a zero-delay timer, so due timers and
 * other sockets get their turn first). A callback may pause or destroy its own
 * socket; no further message is delivered after either.
 *
 * Every socket gets ZMQ_MAXMSGSIZE = ENVELOPE_MAX_BYTES + 64 KiB and a bounded
 * ZMQ_LINGER, so a peer cannot make us allocate without limit and shutdown
 * never hangs on unsent messages. */
#ifndef LINLI_BUS_H
#define LINLI_BUS_H

#include <event2/event.h>
#include <stddef.h>

#define BUS_BURST 256
#define BUS_MAX_FRAMES 8
#define BUS_LINGER_MS 1000

typedef struct bus_sock bus_sock_t;

/* One received multipart message: frames[i] points into memory valid only
 * during the callback. */
typedef struct {
    int count;
    const void *data[BUS_MAX_FRAMES];
    size_t size[BUS_MAX_FRAMES];
} bus_msg_t;

/* Called for each complete message received. Messages with more than
 * BUS_MAX_FRAMES frames are dropped (and counted) before this is called. */
typedef void(bus_recv_fn)(bus_sock_t *s, const bus_msg_t *msg, void *arg);

/* A new socket of type (ZMQ_ROUTER, ZMQ_DEALER, ZMQ_PUB, ZMQ_SUB, ...) in
 * zctx, watched by base when fn is not NULL. Returns NULL (logged) on
 * failure. */
bus_sock_t *bus_sock_new(struct event_base *base, void *zctx, int type, bus_recv_fn *fn,
                         void *arg);
/* Closes the socket (after at most BUS_LINGER_MS for unsent messages).
 * Accepts NULL; NULLs *s_p. */
void bus_sock_destroy(bus_sock_t **s_p);

/* Binds / connects; returns 0 or -1 (logged with zmq_strerror). Binding an
 * ipc:// path also takes a lock on "<path>.lock", held until the socket is
 * destroyed (or the process exits): a path another process is bound to is
 * refused, where libzmq would silently take it over. */
int bus_bind(bus_sock_t *s, const char *endpoint);
int bus_connect(bus_sock_t *s, const char *endpoint);
/* The endpoint actually bound (resolves "tcp://127.0.0.1:*"); borrowed. */
const char *bus_endpoint(const bus_sock_t *s);

/* Sends n frames as one message without blocking. Returns 0; LX_AGAIN when
 * the high-water mark is reached (nothing was sent; PUB sockets drop instead
 * and return 0); -1 on other errors (logged). */
int bus_send(bus_sock_t *s, int n, const void *const *data, const size_t *size);

/* Stops (paused true) or resumes reading; sending is unaffected. */
void bus_pause(bus_sock_t *s, int paused);

/* The underlying libzmq socket, for setsockopt before bind/connect. */
void *bus_zsock(bus_sock_t *s);

/* Messages dropped for having too many frames (for /metrics). */
unsigned long long bus_dropped(const bus_sock_t *s);

#endif
