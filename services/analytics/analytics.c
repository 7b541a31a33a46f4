/* Analytics daemon core (see analytics.h): the registry subscriber, the
 * hiredis connection in the libevent loop, the apply script with its batches, the
 * resynchronisation that follows a lost connection or a position mismatch,
 * and the health and metrics endpoints. */
#include "analytics.h"

#include "config.h"
#include "counters.h"
#include "http.h"
#include "log.h"
#include "sub.h"
#include "util.h"

#include <hiredis/adapters/libevent.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <openssl/evp.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

#define S_STREAM "registry"
#define S_MAX_OPS 8                /* most operations one event needs (checked_in: 6) */
#define S_ARG_MAX 72               /* bytes of one operation argument, NUL included */
#define S_BACKOFF_MIN_MS 100
#define S_BACKOFF_MAX_MS 5000
#define S_SYNC_TIMEOUT_MS 2000     /* blocking position read and reset */
#define S_TICK_MS 1000             /* metrics refresh from the subscriber */
#define S_MAX_OUTSTANDING 50000    /* events in flight before intake pauses */
#define S_BATCH_EVENTS 1000        /* events merged into one script call, at most */
#define S_BATCH_OPS 256            /* distinct operations of one script call, at most */

/* Applies a run of consecutive events of one epoch, first..last, atomically,
 * their operations merged (see s_batch_t). The stored position "epoch:seq"
 * decides:
 *   no position yet, or seq = first - 1 of the same epoch -> apply, store last, 1
 *   same epoch, seq >= last (all applied already)          -> 0
 *   another epoch (late events of a reset stream)          -> -1
 *   "epoch:reset" (a reset was interrupted)                -> -2
 *   same epoch, seq < first - 1 (a gap)                    -> -3
 *   same epoch, first <= seq < last (some applied already) -> -4
 * Sequences are compared as decimal strings (no leading zeros), exact for
 * every uint64. Operations are checked before any is applied, because
 * Redis does not roll a script back when it fails half way.
 *   KEYS[1] position; KEYS[1+i] the key of operation i
 *   ARGV[1] epoch, ARGV[2] first, ARGV[3] last, ARGV[4] first - 1,
 *   ARGV[3i+2..3i+4] operation i: name, argument, argument; pfadd's first
 *   argument holds its elements separated by spaces */
static const char s_script[] =
    "local n = #KEYS - 1\n"
    "if n < 0 or #ARGV ~= 4 + 3 * n then\n"
    "  return redis.error_reply('ERR linli apply: bad argument count')\n"
    "end\n"
    "for i = 1, n do\n"
    "  local op = ARGV[3 * i + 2]\n"
    "  if op ~= 'incrby' and op ~= 'hincrby' and op ~= 'pfadd' and op ~= 'hset' then\n"
    "    return redis.error_reply('ERR linli apply: unknown operation ' .. op)\n"
    "  end\n"
    "end\n"
    "local function lt(x, y) return #x < #y or (#x == #y and x < y) end\n"
    "local cur = redis.call('GET', KEYS[1])\n"
    "if cur then\n"
    "  local e, s = string.match(cur, '^(%d+):(%d+)$')\n"
    "  if not e then return -2 end\n"
    "  if e ~= ARGV[1] then return -1 end\n"
    "  if s ~= ARGV[4] then\n"
    "    if not lt(s, ARGV[3]) then return 0 end\n"
    "    if not lt(s, ARGV[2]) then return -4 end\n"
    "    return -3\n"
    "  end\n"
    "end\n"
    "for i = 1, n do\n"
    "  local k, op, x, y = KEYS[i + 1], ARGV[3 * i + 2], ARGV[3 * i + 3], ARGV[3 * i + 4]\n"
    "  if op == 'incrby' then redis.call('INCRBY', k, x)\n"
    "  elseif op == 'hincrby' then redis.call('HINCRBY', k, x, y)\n"
    "  elseif op == 'pfadd' then\n"
    "    local t = {}\n"
    "    for v in string.gmatch(x, '%S+') do t[#t + 1] = v end\n"
    "    redis.call('PFADD', k, unpack(t))\n"
    "  else redis.call('HSET', k, x, y) end\n"
    "end\n"
    "redis.call('SET', KEYS[1], ARGV[1] .. ':' .. ARGV[3])\n"
    "return 1\n";

/* One merged operation of a batch: INCRBY and HINCRBY deltas are summed,
 * PFADD elements gathered, and HSET keeps the last value, which leaves
 * Redis as applying the events one by one would. */
typedef struct {
    const char *op;              /* "incrby", "hincrby", "pfadd", "hset" (static) */
    char key[COUNTERS_KEY_MAX];
    char field[S_ARG_MAX];       /* hincrby, hset: the hash field */
    long long delta;             /* incrby, hincrby */
    char *vals;                  /* pfadd: elements, space-separated; hset: the value */
    size_t vals_len, vals_cap;
} s_mop_t;

/* Consecutive events waiting to go to Redis as one script call. */
typedef struct {
    int events;                  /* 0: empty */
    uint64_t epoch, first, last;
    int n;                       /* merged operations */
    s_mop_t ops[S_BATCH_OPS];
    int slot[2 * S_BATCH_OPS];   /* hash of (op, key, field) -> index + 1; 0 free */
} s_batch_t;

struct analytics {
    struct event_base *base;     /* borrowed */
    char *redis;                 /* Redis address */
    char *prefix;                /* key prefix */
    int tz;                      /* minutes east of UTC */
    char *pub;                   /* registry PUB endpoint; NULL: no subscriber */
    char *cmd;                   /* registry command endpoint */
    char pos_key[COUNTERS_KEY_MAX]; /* P:pos:registry */
    char sha[41];                /* SHA1 of s_script, hex */

    redisAsyncContext *ac;       /* NULL while disconnected; hiredis owns it */
    int connected;               /* the connect callback said OK */
    int reconnect_ms;            /* current back-off, 0 after a success */
    struct event *reconnect_ev;  /* timer: connect again */

    int resync_pending;          /* subscriber dropped, waiting to restart it */
    int resync_ms;               /* back-off for failed restarts */
    struct event *resync_ev;     /* timer/deferred: restart the subscriber */
    unsigned gen;                /* bumped on every resync and reset; a reply from an
                                  * older generation reports but never resyncs */
    int outstanding;             /* script calls without a reply yet */
    int inflight_events;         /* the events of those calls */
    s_batch_t *batch;            /* events not sent yet, owned */
    struct event *flush_ev;      /* sends the batch once the current burst is read */

    void *zctx;                  /* owned, only with a subscriber */
    sub_t *sub;                  /* NULL while resynchronising or stopped */
    unsigned long long sub_gaps, sub_replays; /* sub_stats already folded into metrics */

    metrics_t *metrics;          /* owned */
    metric_t *m_applied, *m_dupes, *m_stale, *m_gaps, *m_replays, *m_errors, *m_resyncs;
    metric_t *m_connected, *m_caught_up, *m_pending;
    lx_http_t *http;             /* NULL without http_addr */
    struct event *tick_ev;       /* periodic metrics refresh */

    int stopping;                /* analytics_stop was called */
    int destroying;              /* analytics_destroy is freeing the connection */
    struct event *deadline_ev;   /* shutdown deadline */
    analytics_stats_t st;
};

/* One script call in flight: the privdata of its reply callback. */
typedef struct {
    analytics_t *a;
    unsigned gen;                /* a->gen when sent */
    uint64_t epoch, first, seq;  /* the events first..seq */
    int events;
    int retried;                 /* already resent as EVAL after NOSCRIPT */
    int argc;
    const char **argv;           /* argv[0], argv[1] borrowed; the rest owned */
    size_t *lens;
} s_call_t;

/* The operations one event turns into. */
typedef struct {
    int n;
    int err;                     /* a key did not fit or there were too many ops */
    char keys[S_MAX_OPS][COUNTERS_KEY_MAX];
    const char *op[S_MAX_OPS];
    char x[S_MAX_OPS][S_ARG_MAX];
    char y[S_MAX_OPS][S_ARG_MAX];
} s_ops_t;

static void s_connect(analytics_t *a);
static void s_resync_schedule(analytics_t *a, const char *why);

/* ---- operations ---- */

/* Reserves the next operation and returns the buffer for its key, or NULL. */
static char *s_op(s_ops_t *o, const char *op, const char *x, const char *y)
{
    if (o->n >= S_MAX_OPS) {
        o->err = 1;
        return NULL;
    }
    o->op[o->n] = op;
    str_copy(o->x[o->n], S_ARG_MAX, x);
    str_copy(o->y[o->n], S_ARG_MAX, y);
    return o->keys[o->n++];
}

static void s_check(s_ops_t *o, int rc)
{
    if (rc < 0)
        o->err = 1;
}

/* delta on what for the activity (when known), its community and the city. */
static void s_count(const analytics_t *a, s_ops_t *o, int64_t community, int64_t activity,
                    const char *what, int delta)
{
    char d[16];
    char *k;
    size_t dl = 0;
    str_put_i64(d, sizeof d, &dl, delta);
    if (community && activity && (k = s_op(o, "incrby", d, "")))
        s_check(o, counters_key_activity(k, COUNTERS_KEY_MAX, a->prefix, community, activity,
                                         what));
    if (community && (k = s_op(o, "incrby", d, "")))
        s_check(o, counters_key_scope(k, COUNTERS_KEY_MAX, a->prefix, community, what));
    if ((k = s_op(o, "incrby", d, "")))
        s_check(o, counters_key_scope(k, COUNTERS_KEY_MAX, a->prefix, 0, what));
}

static void s_activity_index(const analytics_t *a, s_ops_t *o, int64_t community,
                             int64_t activity)
{
    char x[24], y[24];
    size_t xl = 0, yl = 0;
    char *k;
    if (!community || !activity)
        return;
    str_put_i64(x, sizeof x, &xl, activity);
    str_put_i64(y, sizeof y, &yl, community);
    if ((k = s_op(o, "hset", x, y)))
        s_check(o, counters_key_activities(k, COUNTERS_KEY_MAX, a->prefix));
}

/* Refusal reasons become hash fields: short, lower-case, [a-z0-9_], so a
 * peer's bytes never reach a key or a JSON document unchecked. */
static void s_reason(const char *in, char *out, size_t len)
{
    size_t n = 0;
    for (; in && in[n] && n + 1 < len && n < COUNTERS_REASON_MAX; n++) {
        char ch = in[n];
        if (ch >= 'A' && ch <= 'Z')
            ch = (char)(ch - 'A' + 'a');
        out[n] = ((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_') ? ch : '_';
    }
    out[n] = '\0';
    if (n == 0)
        snprintf(out, len, "unknown");
}

static int64_t s_or(int64_t v, int64_t fallback)
{
    return v ? v : fallback;
}

/* Fills o with what env changes; *name gets the event's name. */
static void s_build(const analytics_t *a, const Linli__Envelope *env, s_ops_t *o,
                    const char **name)
{
    const Linli__Event *ev =
        env->payload_case == LINLI__ENVELOPE__PAYLOAD_EVENT ? env->event : NULL;
    int64_t c = env->community_id;
    char x[S_ARG_MAX];
    char *k;

    *name = "none";
    if (!ev)
        return;
    switch (ev->event_case) {
    case LINLI__EVENT__EVENT_COMMUNITY_CREATED:
        *name = "community_created";
        break;
    case LINLI__EVENT__EVENT_PERSON_REGISTERED:
        *name = "person_registered";
        break;
    case LINLI__EVENT__EVENT_OFFER_MADE:
        *name = "offer_made";
        break;
    case LINLI__EVENT__EVENT_OFFER_CLOSED:
        /* An accepted offer is followed by its own signed_up event. */
        *name = "offer_closed";
        break;
    case LINLI__EVENT__EVENT_ACTIVITY_CREATED:
        *name = "activity_created";
        if (ev->activity_created)
            s_activity_index(a, o, s_or(ev->activity_created->community_id, c),
                             ev->activity_created->id);
        break;
    case LINLI__EVENT__EVENT_SIGNED_UP: {
        const Linli__SignedUp *e = ev->signed_up;
        *name = "signed_up";
        if (!e || strcmp(e->status ? e->status : "", "confirmed") != 0)
            break;
        s_count(a, o, s_or(e->community_id, c), e->activity_id, "signups", 1);
        s_activity_index(a, o, s_or(e->community_id, c), e->activity_id);
        break;
    }
    case LINLI__EVENT__EVENT_SIGN_UP_CANCELLED: {
        const Linli__SignUpCancelled *e = ev->sign_up_cancelled;
        *name = "sign_up_cancelled";
        if (e && e->was_confirmed)
            s_count(a, o, s_or(e->community_id, c), e->activity_id, "signups", -1);
        break;
    }
    case LINLI__EVENT__EVENT_CHECKED_IN: {
        const Linli__CheckedIn *e = ev->checked_in;
        *name = "checked_in";
        if (!e)
            break;
        int64_t cc = s_or(e->community_id, c);
        char day[9];
        counters_day(e->at ? e->at : env->occurred_at ? env->occurred_at : now_ms(), a->tz, day);
        /* Route stations count as check-ins of the community and the city;
         * only activities have a head count. */
        s_count(a, o, cc, e->activity_id, "checkins", 1);
        if (cc && e->activity_id && (k = s_op(o, "incrby", "1", "")))
            s_check(o, counters_key_activity(k, COUNTERS_KEY_MAX, a->prefix, cc, e->activity_id,
                                             "present"));
        size_t xl = 0;
        str_put_i64(x, sizeof x, &xl, e->person_id);
        if (cc && (k = s_op(o, "pfadd", x, "")))
            s_check(o, counters_key_uniq(k, COUNTERS_KEY_MAX, a->prefix, cc, day));
        if ((k = s_op(o, "pfadd", x, "")))
            s_check(o, counters_key_uniq(k, COUNTERS_KEY_MAX, a->prefix, 0, day));
        break;
    }
    case LINLI__EVENT__EVENT_CHECKED_OUT: {
        const Linli__CheckedOut *e = ev->checked_out;
        *name = "checked_out";
        int64_t cc = e ? s_or(e->community_id, c) : 0;
        if (cc && e->activity_id && (k = s_op(o, "incrby", "-1", "")))
            s_check(o, counters_key_activity(k, COUNTERS_KEY_MAX, a->prefix, cc, e->activity_id,
                                             "present"));
        break;
    }
    case LINLI__EVENT__EVENT_SCAN_REFUSED: {
        const Linli__ScanRefused *e = ev->scan_refused;
        *name = "scan_refused";
        int64_t cc = e ? s_or(e->community_id, c) : 0;
        if (!cc)
            break;
        s_reason(e->reason, x, sizeof x);
        if ((k = s_op(o, "hincrby", x, "1")))
            s_check(o, counters_key_scope(k, COUNTERS_KEY_MAX, a->prefix, cc, "refusals"));
        break;
    }
    case LINLI__EVENT__EVENT_STAMP_COLLECTED: {
        const Linli__StampCollected *e = ev->stamp_collected;
        *name = "stamp_collected";
        int64_t cc = e ? s_or(e->community_id, c) : 0;
        if (cc && e->route_id && (k = s_op(o, "incrby", "1", "")))
            s_check(o, counters_key_route(k, COUNTERS_KEY_MAX, a->prefix, cc, e->route_id,
                                          "stamps"));
        break;
    }
    case LINLI__EVENT__EVENT_ROUTE_REDEEMED: {
        const Linli__RouteRedeemed *e = ev->route_redeemed;
        *name = "route_redeemed";
        int64_t cc = e ? s_or(e->community_id, c) : 0;
        if (cc && e->route_id && (k = s_op(o, "incrby", "1", "")))
            s_check(o, counters_key_route(k, COUNTERS_KEY_MAX, a->prefix, cc, e->route_id,
                                          "redeemed"));
        break;
    }
    default:
        *name = "unknown";
        break;
    }
}

/* ---- script calls ---- */

static void s_call_free(s_call_t *call)
{
    for (int i = 2; i < call->argc; i++)
        free((char *)call->argv[i]);
    free(call->argv);
    free(call->lens);
    free(call);
}

static void s_push(s_call_t *call, const char *s, size_t n)
{
    call->argv[call->argc] = xstrndup(s, n);
    call->lens[call->argc] = n;
    call->argc++;
}

static void s_pushs(s_call_t *call, const char *s)
{
    s_push(call, s, strlen(s));
}

/* ---- batches ---- */

static void s_batch_clear(s_batch_t *b)
{
    for (int i = 0; i < b->n; i++)
        free(b->ops[i].vals);
    b->n = 0;
    b->events = 0;
    memset(b->slot, 0, sizeof b->slot);
}

static void s_vals_append(s_mop_t *m, const char *v, int sep)
{
    size_t n = strlen(v);
    if (m->vals_len + n + 2 > m->vals_cap) {
        m->vals_cap = (m->vals_len + n + 2) * 2;
        m->vals = xrealloc(m->vals, m->vals_cap);
    }
    if (sep && m->vals_len)
        m->vals[m->vals_len++] = ' ';
    memcpy(m->vals + m->vals_len, v, n + 1);
    m->vals_len += n;
}

/* The merged operation for (op, key, field), added if new; NULL when the
 * batch has no room for another. */
static s_mop_t *s_batch_op(s_batch_t *b, const char *op, const char *key, const char *field)
{
    uint64_t h = util_fnv1a(UTIL_FNV_SEED, op, strlen(op) + 1);
    h = util_fnv1a(h, key, strlen(key) + 1);
    h = util_fnv1a(h, field, strlen(field));
    for (size_t i = h % LX_ARRAY_LEN(b->slot);; i = (i + 1) % LX_ARRAY_LEN(b->slot)) {
        int s = b->slot[i];
        if (s == 0)
            break;
        s_mop_t *m = &b->ops[s - 1];
        if (strcmp(m->op, op) == 0 && strcmp(m->key, key) == 0 && strcmp(m->field, field) == 0)
            return m;
    }
    if (b->n >= S_BATCH_OPS)
        return NULL;
    size_t i = h % LX_ARRAY_LEN(b->slot);
    while (b->slot[i])
        i = (i + 1) % LX_ARRAY_LEN(b->slot);
    s_mop_t *m = &b->ops[b->n];
    *m = (s_mop_t){ .op = op };
    str_copy(m->key, sizeof m->key, key);
    str_copy(m->field, sizeof m->field, field);
    b->slot[i] = ++b->n;
    return m;
}

/* Whether the event's operations fit in the batch beside the ones there. */
static int s_batch_fits(const s_batch_t *b, const s_ops_t *o)
{
    return b->events < S_BATCH_EVENTS && b->n + o->n <= S_BATCH_OPS;
}

/* Adds one event's operations; the caller checked they fit. */
static void s_batch_add(s_batch_t *b, const Linli__Envelope *env, const s_ops_t *o)
{
    if (b->events == 0) {
        b->epoch = env->epoch;
        b->first = env->sequence;
    }
    b->last = env->sequence;
    b->events++;
    for (int i = 0; i < o->n; i++) {
        const char *op = o->op[i];
        int hash = strcmp(op, "hincrby") == 0 || strcmp(op, "hset") == 0;
        s_mop_t *m = s_batch_op(b, op, o->keys[i], hash ? o->x[i] : "");
        if (strcmp(op, "incrby") == 0)
            m->delta += strtoll(o->x[i], NULL, 10);
        else if (strcmp(op, "hincrby") == 0)
            m->delta += strtoll(o->y[i], NULL, 10);
        else if (strcmp(op, "pfadd") == 0)
            s_vals_append(m, o->x[i], 1);
        else {
            m->vals_len = 0;
            s_vals_append(m, o->y[i], 0);
        }
    }
}

static s_call_t *s_call_new(analytics_t *a, const s_batch_t *b)
{
    s_call_t *call = xcalloc(1, sizeof *call);
    int max = 3 + 1 + b->n + 4 + 3 * b->n;
    char num[24];

    call->a = a;
    call->gen = a->gen;
    call->epoch = b->epoch;
    call->first = b->first;
    call->seq = b->last;
    call->events = b->events;
    call->argv = xcalloc((size_t)max, sizeof *call->argv);
    call->lens = xcalloc((size_t)max, sizeof *call->lens);
    call->argv[0] = "EVALSHA";
    call->lens[0] = 7;
    call->argv[1] = a->sha;
    call->lens[1] = 40;
    call->argc = 2;
    snprintf(num, sizeof num, "%d", 1 + b->n);
    s_pushs(call, num);
    s_pushs(call, a->pos_key);
    for (int i = 0; i < b->n; i++)
        s_pushs(call, b->ops[i].key);
    snprintf(num, sizeof num, "%" PRIu64, b->epoch);
    s_pushs(call, num);
    snprintf(num, sizeof num, "%" PRIu64, b->first);
    s_pushs(call, num);
    snprintf(num, sizeof num, "%" PRIu64, b->last);
    s_pushs(call, num);
    snprintf(num, sizeof num, "%" PRIu64, b->first - 1);
    s_pushs(call, num);
    for (int i = 0; i < b->n; i++) {
        const s_mop_t *m = &b->ops[i];
        char d[24];
        snprintf(d, sizeof d, "%lld", m->delta);
        s_pushs(call, m->op);
        if (strcmp(m->op, "incrby") == 0) {
            s_pushs(call, d);
            s_pushs(call, "");
        } else if (strcmp(m->op, "hincrby") == 0) {
            s_pushs(call, m->field);
            s_pushs(call, d);
        } else if (strcmp(m->op, "pfadd") == 0) {
            s_push(call, m->vals, m->vals_len);
            s_pushs(call, "");
        } else {
            s_pushs(call, m->field);
            s_push(call, m->vals, m->vals_len);
        }
    }
    return call;
}

static void s_error(analytics_t *a)
{
    a->st.errors++;
    metric_inc(a->m_errors, 1);
}

/* Called whenever a reply arrived: finish a shutdown or a resync that was
 * waiting for the pipeline to drain. */
static void s_drained(analytics_t *a)
{
    if (a->destroying || a->outstanding > 0)
        return;
    if (a->stopping) {
        event_base_loopexit(a->base, NULL);
        return;
    }
    if (a->resync_pending)
        event_active(a->resync_ev, EV_TIMEOUT, 1);
}

static void s_on_reply(redisAsyncContext *ac, void *reply, void *privdata)
{
    s_call_t *call = privdata;
    analytics_t *a = call->a;
    redisReply *r = reply;  /* owned by hiredis: never freed here */
    unsigned long long n = (unsigned long long)call->events;

    a->outstanding--;
    a->inflight_events -= call->events;
    if (a->destroying)
        goto done;
    if (!r) {
        s_error(a);
        if (call->gen == a->gen)
            s_resync_schedule(a, "connection lost with calls outstanding");
        goto done;
    }
    if (r->type == REDIS_REPLY_ERROR && strncmp(r->str, "NOSCRIPT", 8) == 0 && !call->retried) {
        /* The script cache was flushed: send the body. If a later call
         * overtakes this one, the script reports a gap and we resync. */
        call->retried = 1;
        call->argv[0] = "EVAL";
        call->lens[0] = 4;
        call->argv[1] = s_script;
        call->lens[1] = sizeof s_script - 1;
        if (redisAsyncCommandArgv(ac, s_on_reply, call, call->argc, call->argv, call->lens) ==
            REDIS_OK) {
            a->outstanding++;
            a->inflight_events += call->events;
            return;
        }
        log_error("redis", "cannot resend script seq=%" PRIu64, call->seq);
        s_error(a);
        s_resync_schedule(a, "resend failed");
        goto done;
    }
    if (r->type == REDIS_REPLY_ERROR || r->type != REDIS_REPLY_INTEGER) {
        log_error("redis", "apply failed epoch=%" PRIu64 " seq=%" PRIu64 "..%" PRIu64 " err=%s",
                  call->epoch, call->first, call->seq,
                  r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply type");
        s_error(a);
        if (call->gen == a->gen)
            s_resync_schedule(a, "apply failed");
        goto done;
    }
    switch (r->integer) {
    case 1:
        a->st.applied += n;
        metric_inc(a->m_applied, (double)n);
        log_debug("apply", "applied epoch=%" PRIu64 " seq=%" PRIu64 "..%" PRIu64, call->epoch,
                  call->first, call->seq);
        break;
    case 0:
        a->st.duplicates += n;
        metric_inc(a->m_dupes, (double)n);
        log_debug("apply", "duplicate epoch=%" PRIu64 " seq=%" PRIu64 "..%" PRIu64, call->epoch,
                  call->first, call->seq);
        break;
    case -3:
    case -4:
        a->st.gaps++;
        metric_inc(a->m_gaps, 1);
        log_warn("apply", "out of order: stored position is %s epoch=%" PRIu64
                 " seq=%" PRIu64 "..%" PRIu64, r->integer == -3 ? "behind" : "inside the run",
                 call->epoch, call->first, call->seq);
        if (call->gen == a->gen)
            s_resync_schedule(a, "position gap");
        break;
    default: /* -1 old epoch, -2 reset under way */
        a->st.stale += n;
        metric_inc(a->m_stale, (double)n);
        log_info("apply", "ignored %s epoch=%" PRIu64 " seq=%" PRIu64 "..%" PRIu64,
                 r->integer == -1 ? "events of another epoch" : "events during a reset",
                 call->epoch, call->first, call->seq);
        if (call->gen == a->gen)
            s_resync_schedule(a, "epoch mismatch");
        break;
    }
done:
    s_call_free(call);
    s_drained(a);
}

/* Sends the batch as one script call. Returns 0, or -1 (logged, counted,
 * resync scheduled) when it could not be queued. */
static int s_flush(analytics_t *a)
{
    s_batch_t *b = a->batch;
    if (!b->events)
        return 0;
    if (!a->ac) {
        log_warn("apply", "Redis not connected; dropping seq=%" PRIu64 "..%" PRIu64, b->first,
                 b->last);
        s_batch_clear(b);
        s_error(a);
        s_resync_schedule(a, "Redis not connected");
        return -1;
    }
    s_call_t *call = s_call_new(a, b);
    s_batch_clear(b);
    if (redisAsyncCommandArgv(a->ac, s_on_reply, call, call->argc, call->argv, call->lens) !=
        REDIS_OK) {
        log_error("redis", "cannot queue apply seq=%" PRIu64 "..%" PRIu64 " err=%s", call->first,
                  call->seq, a->ac->errstr);
        s_call_free(call);
        s_error(a);
        s_resync_schedule(a, "send failed");
        return -1;
    }
    a->outstanding++;
    a->inflight_events += call->events;
    return 0;
}

static void s_flush_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    s_flush(arg);
}

int analytics_apply_event(analytics_t *a, const Linli__Envelope *env)
{
    s_ops_t *o = NULL;
    const char *name = "none";
    int rc = -1;

    if (a->stopping || (a->pub && a->resync_pending))
        return -1;  /* the subscriber replays these after the resync */
    if (env->sequence == 0 || (env->stream && env->stream[0] && strcmp(env->stream, S_STREAM))) {
        log_error("apply", "refused envelope without a registry position stream=%s seq=%" PRIu64,
                  env->stream ? env->stream : "", env->sequence);
        s_error(a);
        return -1;
    }
    if (!a->ac) {
        log_warn("apply", "Redis not connected; dropping seq=%" PRIu64, env->sequence);
        s_error(a);
        s_resync_schedule(a, "Redis not connected");
        return -1;
    }
    o = xcalloc(1, sizeof *o);
    s_build(a, env, o, &name);
    if (o->err) {
        /* Ids are int64 and keys have room for them: this is a bug. */
        log_error("apply", "cannot build operations epoch=%" PRIu64 " seq=%" PRIu64 " event=%s",
                  env->epoch, env->sequence, name);
        s_error(a);
        goto cleanup;
    }
    /* A batch holds consecutive events of one epoch: anything else (a
     * duplicate, a gap, a new epoch) starts a new one, for the script to
     * judge on its own. */
    s_batch_t *b = a->batch;
    if (b->events && (env->epoch != b->epoch || env->sequence != b->last + 1 ||
                      !s_batch_fits(b, o)) && s_flush(a) != 0)
        goto cleanup;
    if (!b->events)
        event_active(a->flush_ev, EV_TIMEOUT, 1);
    s_batch_add(b, env, o);
    log_debug("apply", "queued epoch=%" PRIu64 " seq=%" PRIu64 " event=%s", env->epoch,
              env->sequence, name);
    rc = 0;
cleanup:
    free(o);
    return rc;
}

/* ---- subscriber ---- */

static void s_fold_sub_stats(analytics_t *a);

static void s_sub_apply(const Linli__Envelope *ev, void *arg)
{
    analytics_t *a = arg;
    if (a->resync_pending || a->stopping)
        return;
    if (a->inflight_events >= S_MAX_OUTSTANDING) {
        /* Redis is slower than the stream. Rather than buffer without
         * bound, stop taking events, let the pipeline drain and replay the
         * rest from the position Redis holds. */
        s_resync_schedule(a, "Redis is behind");
        return;
    }
    analytics_apply_event(a, ev);
    /* A gap or a replay shows in /metrics with the event that followed it,
     * not a tick later. */
    s_fold_sub_stats(a);
}

static void s_sub_epoch(uint64_t new_epoch, void *arg)
{
    analytics_t *a = arg;
    /* Calls of the old epoch still in flight will find the position marked
     * and refuse; they must not trigger a resync of their own. */
    a->gen++;
    log_warn("sub", "registry stream restarted; resetting counters epoch=%" PRIu64, new_epoch);
    redisContext *c = counters_connect(a->redis, S_SYNC_TIMEOUT_MS);
    long long n = c ? counters_reset(c, a->prefix, S_STREAM, new_epoch) : -1;
    if (c)
        redisFree(c);
    if (n < 0)
        s_resync_schedule(a, "reset failed");
}

/* Folds the subscriber's counters into our metrics. */
static void s_fold_sub_stats(analytics_t *a)
{
    unsigned long long applied, dupes, gaps, replays;
    if (!a->sub)
        return;
    sub_stats(a->sub, &applied, &dupes, &gaps, &replays);
    if (gaps > a->sub_gaps)
        metric_inc(a->m_gaps, gaps - a->sub_gaps);
    if (replays > a->sub_replays)
        metric_inc(a->m_replays, replays - a->sub_replays);
    a->sub_gaps = gaps;
    a->sub_replays = replays;
}

static void s_sub_drop(analytics_t *a)
{
    s_fold_sub_stats(a);
    sub_destroy(&a->sub);
    a->sub_gaps = a->sub_replays = 0;
}

/* Reads the position Redis holds (finishing an interrupted reset) and
 * subscribes from there. Blocking: runs at start-up and after a resync. */
static int s_sub_start(analytics_t *a)
{
    uint64_t epoch = 0, seq = 0;
    int reset_pending = 0, rc = -1;
    redisContext *c = counters_connect(a->redis, S_SYNC_TIMEOUT_MS);

    if (!c)
        goto cleanup;
    if (counters_position_read(c, a->prefix, S_STREAM, &epoch, &seq, &reset_pending) < 0)
        goto cleanup;
    if (reset_pending) {
        log_warn("sub", "finishing an interrupted reset epoch=%" PRIu64, epoch);
        if (counters_reset(c, a->prefix, S_STREAM, epoch) < 0)
            goto cleanup;
        seq = 0;
    }
    sub_opts_t so = {
        .pub_endpoint = a->pub,
        .cmd_endpoint = a->cmd,
        .stream = S_STREAM,
        .source = "analytics",
        .epoch = epoch,
        .sequence = seq,
    };
    a->sub = sub_new(a->base, a->zctx, &so, s_sub_apply, s_sub_epoch, a);
    if (!a->sub)
        goto cleanup;
    log_info("sub", "subscribed stream=%s from epoch=%" PRIu64 " seq=%" PRIu64, S_STREAM, epoch,
             seq);
    rc = 0;
cleanup:
    if (c)
        redisFree(c);
    return rc;
}

static void s_resync_schedule(analytics_t *a, const char *why)
{
    a->gen++;
    if (!a->pub || a->resync_pending || a->stopping || a->destroying)
        return;
    a->resync_pending = 1;
    s_batch_clear(a->batch);      /* replayed from the position Redis holds */
    a->st.resyncs++;
    metric_inc(a->m_resyncs, 1);
    log_warn("sub", "resynchronising with Redis reason=\"%s\" outstanding=%d", why,
             a->outstanding);
    event_active(a->resync_ev, EV_TIMEOUT, 1);
}

static void s_resync_cb(evutil_socket_t fd, short what, void *arg)
{
    analytics_t *a = arg;
    (void)fd;
    (void)what;
    if (a->stopping || !a->resync_pending)
        return;
    s_sub_drop(a);
    /* The connect callback and the last reply bring us back here. */
    if (!a->connected || a->outstanding > 0)
        return;
    if (s_sub_start(a) < 0) {
        a->resync_ms = a->resync_ms ? a->resync_ms * 2 : S_BACKOFF_MIN_MS;
        if (a->resync_ms > S_BACKOFF_MAX_MS)
            a->resync_ms = S_BACKOFF_MAX_MS;
        struct timeval tv = { a->resync_ms / 1000, (a->resync_ms % 1000) * 1000 };
        evtimer_add(a->resync_ev, &tv);
        return;
    }
    a->resync_pending = 0;
    a->resync_ms = 0;
}

/* ---- Redis connection ---- */

static void s_reconnect_later(analytics_t *a)
{
    if (a->stopping || a->destroying)
        return;
    a->reconnect_ms = a->reconnect_ms ? a->reconnect_ms * 2 : S_BACKOFF_MIN_MS;
    if (a->reconnect_ms > S_BACKOFF_MAX_MS)
        a->reconnect_ms = S_BACKOFF_MAX_MS;
    struct timeval tv = { a->reconnect_ms / 1000, (a->reconnect_ms % 1000) * 1000 };
    evtimer_add(a->reconnect_ev, &tv);
}

static void s_reconnect_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    s_connect(arg);
}

static void s_on_connect(const redisAsyncContext *ac, int status)
{
    analytics_t *a = ac->data;
    if (status != REDIS_OK) {
        /* hiredis frees ac after this callback. */
        log_warn("redis", "connect failed addr=%s err=%s retry_ms=%d", a->redis, ac->errstr,
                 a->reconnect_ms ? a->reconnect_ms * 2 : S_BACKOFF_MIN_MS);
        a->ac = NULL;
        s_reconnect_later(a);
        return;
    }
    a->connected = 1;
    a->reconnect_ms = 0;
    log_info("redis", "connected addr=%s", a->redis);
    if (a->resync_pending)
        event_active(a->resync_ev, EV_TIMEOUT, 1);
}

static void s_on_disconnect(const redisAsyncContext *ac, int status)
{
    analytics_t *a = ac->data;
    a->ac = NULL;
    a->connected = 0;
    if (a->destroying)
        return;
    log_warn("redis", "disconnected addr=%s status=%d err=%s", a->redis, status,
             ac->err ? ac->errstr : "-");
    s_reconnect_later(a);
    s_resync_schedule(a, "Redis disconnected");
}

static void s_on_script_load(redisAsyncContext *ac, void *reply, void *privdata)
{
    analytics_t *a = privdata;
    redisReply *r = reply;
    (void)ac;
    if (!r || a->destroying)
        return;
    if (r->type != REDIS_REPLY_STRING)
        log_error("redis", "SCRIPT LOAD failed err=%s",
                  r->type == REDIS_REPLY_ERROR ? r->str : "unexpected reply type");
    else if (strcmp(r->str, a->sha) != 0)
        log_error("redis", "SCRIPT LOAD returned another digest sha=%s ours=%s", r->str, a->sha);
}

static void s_connect(analytics_t *a)
{
    redisAsyncContext *ac = NULL;

    if (a->redis[0] == '/') {
        ac = redisAsyncConnectUnix(a->redis);
    } else {
        const char *colon = strrchr(a->redis, ':');
        char *host = xstrndup(a->redis, colon ? (size_t)(colon - a->redis) : 0);
        ac = redisAsyncConnect(host, colon ? atoi(colon + 1) : 0);
        free(host);
    }
    if (!ac || ac->err) {
        log_warn("redis", "connect failed addr=%s err=%s", a->redis, ac ? ac->errstr : "oom");
        if (ac)
            redisAsyncFree(ac);
        s_reconnect_later(a);
        return;
    }
    ac->data = a;
    if (redisLibeventAttach(ac, a->base) != REDIS_OK) {
        log_error("redis", "cannot attach to the event loop");
        redisAsyncFree(ac);
        s_reconnect_later(a);
        return;
    }
    redisAsyncSetConnectCallback(ac, s_on_connect);
    redisAsyncSetDisconnectCallback(ac, s_on_disconnect);
    a->ac = ac;
    /* A name that says whose connection this is, in CLIENT LIST. */
    char name[COUNTERS_PREFIX_MAX + 24];
    snprintf(name, sizeof name, "linli-analytics-%s", a->prefix);
    redisAsyncCommand(ac, NULL, NULL, "CLIENT SETNAME %s", name);
    /* Queued before any event, so the script is cached before the first
     * EVALSHA. */
    const char *argv[] = { "SCRIPT", "LOAD", s_script };
    size_t lens[] = { 6, 4, sizeof s_script - 1 };
    redisAsyncCommandArgv(ac, s_on_script_load, a, 3, argv, lens);
}

/* ---- health and metrics ---- */

static const char *s_ready(void *arg)
{
    analytics_t *a = arg;
    if (a->stopping)
        return "stopping";
    if (!a->connected)
        return "redis down";
    if (a->pub && (a->resync_pending || !a->sub))
        return "resynchronising";
    if (a->pub && !sub_caught_up(a->sub))
        return "catching up";
    return NULL;
}

static void s_tick_cb(evutil_socket_t fd, short what, void *arg)
{
    analytics_t *a = arg;
    (void)fd;
    (void)what;
    s_fold_sub_stats(a);
    metric_set(a->m_connected, a->connected);
    metric_set(a->m_caught_up, a->sub && sub_caught_up(a->sub));
    metric_set(a->m_pending, a->outstanding);
}

static void s_deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    analytics_t *a = arg;
    (void)fd;
    (void)what;
    log_warn("main", "shutdown deadline passed outstanding=%d", a->outstanding);
    event_base_loopexit(a->base, NULL);
}

/* ---- life cycle ---- */

int analytics_opts_from_config(analytics_opts_t *opts)
{
    memset(opts, 0, sizeof *opts);
    opts->redis = config_get("LINLI_REDIS", "127.0.0.1:6379");
    opts->registry_pub = config_get("LINLI_REGISTRY_PUB", "tcp://127.0.0.1:7102");
    opts->registry_cmd = config_get("LINLI_REGISTRY_CMD", "tcp://127.0.0.1:7101");
    opts->http_addr = config_get("LINLI_ANALYTICS_HTTP", NULL);
    if (counters_config_prefix(&opts->prefix) < 0 || counters_config_tz(&opts->tz_offset_min) < 0)
        return -1;
    return 0;
}

static void s_sha1_hex(const char *s, size_t n, char out[41])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    if (!EVP_Digest(s, n, md, &len, EVP_sha1(), NULL) || len != 20) {
        fprintf(stderr, "fatal: SHA1 unavailable\n");
        abort();
    }
    for (unsigned i = 0; i < 20; i++)
        snprintf(out + 2 * i, 3, "%02x", md[i]);
}

static void s_metrics(analytics_t *a)
{
    a->metrics = metrics_new("linli_analytics");
    a->m_applied = metrics_add(a->metrics, "events_applied_total", "counter",
                               "registry events that changed counters", NULL);
    a->m_dupes = metrics_add(a->metrics, "events_duplicate_total", "counter",
                             "events already applied (script returned 0)", NULL);
    a->m_stale = metrics_add(a->metrics, "events_stale_total", "counter",
                             "events of an old epoch or during a reset, ignored", NULL);
    a->m_gaps = metrics_add(a->metrics, "gaps_total", "counter",
                            "sequence gaps seen by the subscriber or the apply script", NULL);
    a->m_replays = metrics_add(a->metrics, "replays_total", "counter",
                               "replay requests sent to the registry", NULL);
    a->m_errors = metrics_add(a->metrics, "redis_errors_total", "counter",
                              "Redis errors, lost calls and unsent events", NULL);
    a->m_resyncs = metrics_add(a->metrics, "resyncs_total", "counter",
                               "subscriber restarts from the position in Redis", NULL);
    a->m_connected = metrics_add(a->metrics, "redis_connected", "gauge",
                                 "1 while connected to Redis", NULL);
    a->m_caught_up = metrics_add(a->metrics, "caught_up", "gauge",
                                 "1 once the subscriber has caught up with the registry", NULL);
    a->m_pending = metrics_add(a->metrics, "redis_pending", "gauge",
                               "script calls waiting for a reply", NULL);
}

analytics_t *analytics_new(struct event_base *base, const analytics_opts_t *opts)
{
    analytics_t *a = NULL;

    if (!opts->redis || !*opts->redis || !counters_prefix_valid(opts->prefix) ||
        opts->tz_offset_min < -720 || opts->tz_offset_min > 840 ||
        (opts->registry_pub && !opts->registry_cmd)) {
        log_error("main", "invalid analytics options (redis, prefix, time zone or endpoints)");
        return NULL;
    }
    a = xcalloc(1, sizeof *a);
    a->base = base;
    a->redis = xstrdup(opts->redis);
    a->prefix = xstrdup(opts->prefix);
    a->tz = opts->tz_offset_min;
    a->pub = xstrdup(opts->registry_pub);
    a->cmd = xstrdup(opts->registry_cmd);
    counters_key_position(a->pos_key, sizeof a->pos_key, a->prefix, S_STREAM);
    s_sha1_hex(s_script, sizeof s_script - 1, a->sha);
    s_metrics(a);

    a->reconnect_ev = evtimer_new(base, s_reconnect_cb, a);
    a->resync_ev = evtimer_new(base, s_resync_cb, a);
    a->batch = xcalloc(1, sizeof *a->batch);
    a->flush_ev = event_new(base, -1, 0, s_flush_cb, a);
    a->deadline_ev = evtimer_new(base, s_deadline_cb, a);
    a->tick_ev = event_new(base, -1, EV_PERSIST, s_tick_cb, a);
    struct timeval tick = { S_TICK_MS / 1000, (S_TICK_MS % 1000) * 1000 };
    event_add(a->tick_ev, &tick);

    if (opts->http_addr) {
        a->http = http_new(base, opts->http_addr, a->metrics, s_ready, a);
        if (!a->http)
            goto fail;
    }
    if (a->pub) {
        a->zctx = zmq_ctx_new();
        if (!a->zctx) {
            log_error("main", "zmq_ctx_new failed err=%s", zmq_strerror(zmq_errno()));
            goto fail;
        }
        /* Start-up is a resync from nothing: once connected, read the
         * position and subscribe. */
        a->resync_pending = 1;
    }
    s_connect(a);
    log_info("main", "started redis=%s prefix=%s tz_offset_min=%d subscriber=%s", a->redis,
             a->prefix, a->tz, a->pub ? a->pub : "none");
    return a;
fail:
    analytics_destroy(&a);
    return NULL;
}

void analytics_destroy(analytics_t **a_p)
{
    if (!a_p || !*a_p)
        return;
    analytics_t *a = *a_p;
    a->destroying = 1;
    sub_destroy(&a->sub);
    if (a->ac)
        redisAsyncFree(a->ac);  /* runs outstanding callbacks with NULL, then on_disconnect */
    a->ac = NULL;
    http_destroy(&a->http);
    metrics_destroy(&a->metrics);
    if (a->zctx)
        zmq_ctx_term(a->zctx);
    if (a->reconnect_ev)
        event_free(a->reconnect_ev);
    if (a->resync_ev)
        event_free(a->resync_ev);
    if (a->deadline_ev)
        event_free(a->deadline_ev);
    if (a->tick_ev)
        event_free(a->tick_ev);
    if (a->flush_ev)
        event_free(a->flush_ev);
    if (a->batch) {
        s_batch_clear(a->batch);
        free(a->batch);
    }
    free(a->redis);
    free(a->prefix);
    free(a->pub);
    free(a->cmd);
    free(a);
    *a_p = NULL;
}

int analytics_pending(const analytics_t *a)
{
    return a->outstanding + (a->batch->events > 0);
}

int analytics_redis_connected(const analytics_t *a)
{
    return a->connected;
}

void analytics_stop(analytics_t *a, int deadline_ms)
{
    if (a->stopping)
        return;
    s_flush(a);
    a->stopping = 1;
    s_sub_drop(a);
    event_del(a->reconnect_ev);
    event_del(a->resync_ev);
    event_del(a->tick_ev);
    log_info("main", "stopping outstanding=%d deadline_ms=%d", a->outstanding, deadline_ms);
    if (a->outstanding == 0) {
        event_base_loopexit(a->base, NULL);
        return;
    }
    struct timeval tv = { deadline_ms / 1000, (deadline_ms % 1000) * 1000 };
    evtimer_add(a->deadline_ev, &tv);
}

void analytics_stats(const analytics_t *a, analytics_stats_t *out)
{
    *out = a->st;
}
