/* Unit tests of the analytics apply path against a real Redis
 * (LINLI_TEST_REDIS = "host:port" or a socket path; skipped when unset).
 * Hand-built registry events go through analytics_apply_event in a real
 * libevent loop; the counters are then read back with plain commands and
 * with counters_read. Each test uses its own key prefix and deletes it. */
#include "../../services/analytics/analytics.h"
#include "counters.h"
#include "log.h"
#include "util.h"

#include <event2/event.h>
#include <hiredis/hiredis.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#define EPOCH 7
#define TZ 480
/* 2026-11-23T10:00:00+08:00 */
#define T0 INT64_C(1795399200000)

typedef struct {
    struct event_base *base;
    analytics_t *a;
    redisContext *c;      /* blocking, for checks */
    char prefix[64];
    char day[9];          /* day of T0 in TZ */
} t_t;

static const char *s_addr(void)
{
    const char *a = getenv("LINLI_TEST_REDIS");
    return a && *a ? a : NULL;
}

static void s_start(t_t *t)
{
    analytics_opts_t o = { .redis = s_addr(), .prefix = t->prefix, .tz_offset_min = TZ };
    t->a = analytics_new(t->base, &o);
    assert_non_null(t->a);
    int64_t deadline = mono_us() + 5000000;
    while (!analytics_redis_connected(t->a) && mono_us() < deadline)
        event_base_loop(t->base, EVLOOP_ONCE);
    assert_true(analytics_redis_connected(t->a));
}

static void s_wipe(t_t *t)
{
    char pattern[96], cursor[32] = "0";
    snprintf(pattern, sizeof pattern, "%s:*", t->prefix);
    do {
        redisReply *r = redisCommand(t->c, "SCAN %s MATCH %s COUNT 1000", cursor, pattern);
        assert_non_null(r);
        snprintf(cursor, sizeof cursor, "%s", r->element[0]->str);
        for (size_t i = 0; i < r->element[1]->elements; i++)
            freeReplyObject(redisCommand(t->c, "UNLINK %s", r->element[1]->element[i]->str));
        freeReplyObject(r);
    } while (strcmp(cursor, "0") != 0);
}

static int s_setup(void **state)
{
    static int n;
    if (!s_addr()) {
        print_message("LINLI_TEST_REDIS unset: skipping Redis tests\n");
        *state = NULL;
        return 0;
    }
    t_t *t = xcalloc(1, sizeof *t);
    snprintf(t->prefix, sizeof t->prefix, "test_an_%d_%d", (int)getpid(), ++n);
    counters_day(T0, TZ, t->day);
    t->base = event_base_new();
    t->c = counters_connect(s_addr(), 2000);
    assert_non_null(t->c);
    s_start(t);
    *state = t;
    return 0;
}

static int s_teardown(void **state)
{
    t_t *t = *state;
    if (!t)
        return 0;
    analytics_destroy(&t->a);
    s_wipe(t);
    redisFree(t->c);
    event_base_free(t->base);
    free(t);
    return 0;
}

#define NEED_REDIS(t)                 \
    do {                              \
        if (!(t))                     \
            skip();                   \
    } while (0)

/* Runs the loop until every script call has its reply. */
static void s_flush(t_t *t)
{
    int64_t deadline = mono_us() + 5000000;
    while (analytics_pending(t->a) > 0 && mono_us() < deadline)
        event_base_loop(t->base, EVLOOP_ONCE);
    assert_int_equal(analytics_pending(t->a), 0);
}

/* ---- event builders ---- */

static int s_send_epoch(t_t *t, uint64_t epoch, uint64_t seq, int64_t community, Linli__Event *ev)
{
    Linli__Envelope env = LINLI__ENVELOPE__INIT;
    env.stream = (char *)"registry";
    env.type = (char *)"registry.event";
    env.epoch = epoch;
    env.sequence = seq;
    env.community_id = community;
    env.occurred_at = T0;
    env.payload_case = LINLI__ENVELOPE__PAYLOAD_EVENT;
    env.event = ev;
    return analytics_apply_event(t->a, &env);
}

static void s_send(t_t *t, uint64_t seq, int64_t community, Linli__Event *ev)
{
    assert_int_equal(s_send_epoch(t, EPOCH, seq, community, ev), 0);
}

static void s_checked_in(t_t *t, uint64_t seq, int64_t c, int64_t act, int64_t person, int64_t at)
{
    Linli__CheckedIn x = LINLI__CHECKED_IN__INIT;
    x.checkin_id = (int64_t)seq;
    x.activity_id = act;
    x.person_id = person;
    x.community_id = c;
    x.at = at;
    Linli__Event ev = LINLI__EVENT__INIT;
    ev.event_case = LINLI__EVENT__EVENT_CHECKED_IN;
    ev.checked_in = &x;
    s_send(t, seq, c, &ev);
}

static void s_checked_out(t_t *t, uint64_t seq, int64_t c, int64_t act, int64_t person)
{
    Linli__CheckedOut x = LINLI__CHECKED_OUT__INIT;
    x.activity_id = act;
    x.person_id = person;
    x.community_id = c;
    x.at = T0 + 3600000;
    Linli__Event ev = LINLI__EVENT__INIT;
    ev.event_case = LINLI__EVENT__EVENT_CHECKED_OUT;
    ev.checked_out = &x;
    s_send(t, seq, c, &ev);
}

static void s_signed_up(t_t *t, uint64_t seq, int64_t c, int64_t act, int64_t person,
                        const char *status)
{
    Linli__SignedUp x = LINLI__SIGNED_UP__INIT;
    x.signup_id = (int64_t)seq;
    x.activity_id = act;
    x.person_id = person;
    x.community_id = c;
    x.status = (char *)status;
    Linli__Event ev = LINLI__EVENT__INIT;
    ev.event_case = LINLI__EVENT__EVENT_SIGNED_UP;
    ev.signed_up = &x;
    s_send(t, seq, c, &ev);
}

static void s_cancelled(t_t *t, uint64_t seq, int64_t c, int64_t act, int64_t person, int was)
{
    Linli__SignUpCancelled x = LINLI__SIGN_UP_CANCELLED__INIT;
    x.activity_id = act;
    x.person_id = person;
    x.community_id = c;
    x.was_confirmed = was;
    Linli__Event ev = LINLI__EVENT__INIT;
    ev.event_case = LINLI__EVENT__EVENT_SIGN_UP_CANCELLED;
    ev.sign_up_cancelled = &x;
    s_send(t, seq, c, &ev);
}

static void s_offer_closed(t_t *t, uint64_t seq, int64_t c, int64_t act, int64_t person)
{
    Linli__OfferClosed x = LINLI__OFFER_CLOSED__INIT;
    x.offer_id = 1;
    x.activity_id = act;
    x.person_id = person;
    x.community_id = c;
    x.outcome = (char *)"accepted";
    Linli__Event ev = LINLI__EVENT__INIT;
    ev.event_case = LINLI__EVENT__EVENT_OFFER_CLOSED;
    ev.offer_closed = &x;
    s_send(t, seq, c, &ev);
}

static void s_stamp(t_t *t, uint64_t seq, int64_t c, int64_t route, int64_t person)
{
    Linli__StampCollected x = LINLI__STAMP_COLLECTED__INIT;
    x.route_id = route;
    x.station_id = (int64_t)seq;
    x.person_id = person;
    x.community_id = c;
    Linli__Event ev = LINLI__EVENT__INIT;
    ev.event_case = LINLI__EVENT__EVENT_STAMP_COLLECTED;
    ev.stamp_collected = &x;
    s_send(t, seq, c, &ev);
}

static void s_redeemed(t_t *t, uint64_t seq, int64_t c, int64_t route, int64_t person)
{
    Linli__RouteRedeemed x = LINLI__ROUTE_REDEEMED__INIT;
    x.redemption_id = 1;
    x.route_id = route;
    x.person_id = person;
    x.community_id = c;
    x.reward = (char *)"tote bag";
    Linli__Event ev = LINLI__EVENT__INIT;
    ev.event_case = LINLI__EVENT__EVENT_ROUTE_REDEEMED;
    ev.route_redeemed = &x;
    s_send(t, seq, c, &ev);
}

static void s_refused(t_t *t, uint64_t seq, int64_t c, const char *reason)
{
    Linli__ScanRefused x = LINLI__SCAN_REFUSED__INIT;
    x.activity_id = 1;
    x.person_id = 5;
    x.community_id = c;
    x.reason = (char *)reason;
    Linli__Event ev = LINLI__EVENT__INIT;
    ev.event_case = LINLI__EVENT__EVENT_SCAN_REFUSED;
    ev.scan_refused = &x;
    s_send(t, seq, c, &ev);
}

static void s_community_created(t_t *t, uint64_t seq, int64_t c)
{
    Linli__CommunityCreated x = LINLI__COMMUNITY_CREATED__INIT;
    x.id = c;
    x.name = (char *)"Riverside";
    Linli__Event ev = LINLI__EVENT__INIT;
    ev.event_case = LINLI__EVENT__EVENT_COMMUNITY_CREATED;
    ev.community_created = &x;
    s_send(t, seq, c, &ev);
}

/* ---- reading back ---- */

/* Runs a command (hiredis format) and reads an integer, a numeric string
 * or nil (0) from the reply; anything else gives -999. */
static long long s_int(t_t *t, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(t->c, fmt, ap);
    va_end(ap);
    assert_non_null(r);
    long long v = -999;
    if (r->type == REDIS_REPLY_INTEGER)
        v = r->integer;
    else if (r->type == REDIS_REPLY_STRING)
        v = strtoll(r->str, NULL, 10);
    else if (r->type == REDIS_REPLY_NIL)
        v = 0;
    freeReplyObject(r);
    return v;
}

static void s_position(t_t *t, char *out, size_t len)
{
    redisReply *r = redisCommand(t->c, "GET %s:pos:registry", t->prefix);
    assert_non_null(r);
    snprintf(out, len, "%s", r->type == REDIS_REPLY_STRING ? r->str : "(nil)");
    freeReplyObject(r);
}

static void s_assert_position(t_t *t, const char *want)
{
    char pos[64];
    s_position(t, pos, sizeof pos);
    assert_string_equal(pos, want);
}

static void s_stats(t_t *t, analytics_stats_t *st)
{
    analytics_stats(t->a, st);
}

/* ---- tests ---- */

static void test_checkins_per_scope(void **state)
{
    t_t *t = *state;
    NEED_REDIS(t);
    const char *p = t->prefix;
    s_checked_in(t, 1, 11, 101, 1, T0);
    s_checked_in(t, 2, 11, 101, 2, T0);
    s_checked_in(t, 3, 11, 101, 3, T0);
    s_checked_in(t, 4, 11, 102, 1, T0);
    s_checked_in(t, 5, 12, 201, 4, T0);
    s_flush(t);

    assert_int_equal(s_int(t, "GET %s:{c11}:act:101:checkins", p), 3);
    assert_int_equal(s_int(t, "GET %s:{c11}:act:101:present", p), 3);
    assert_int_equal(s_int(t, "GET %s:{c11}:act:102:checkins", p), 1);
    assert_int_equal(s_int(t, "GET %s:{c12}:act:201:checkins", p), 1);
    assert_int_equal(s_int(t, "GET %s:{c11}:checkins", p), 4);
    assert_int_equal(s_int(t, "GET %s:{c12}:checkins", p), 1);
    assert_int_equal(s_int(t, "GET %s:city:checkins", p), 5);
    assert_int_equal(s_int(t, "PFCOUNT %s:{c11}:uniq:%s", p, t->day), 3);
    assert_int_equal(s_int(t, "PFCOUNT %s:city:uniq:%s", p, t->day), 4);
    s_assert_position(t, "7:5");

    analytics_stats_t st;
    s_stats(t, &st);
    assert_int_equal(st.applied, 5);
    assert_int_equal(st.duplicates, 0);
    assert_int_equal(st.errors, 0);

    counters_view_t v;
    assert_int_equal(counters_read_day(t->c, p, 11, 101, t->day, &v), 0);
    assert_int_equal(v.checkins, 3);
    assert_int_equal(v.present, 3);
    assert_int_equal(v.unique_today, 3);  /* the community's, as documented */
    assert_int_equal(v.have_position, 1);
    assert_int_equal(v.epoch, 7);
    assert_int_equal(v.sequence, 5);
    assert_int_equal(counters_read_day(t->c, p, 11, 0, t->day, &v), 0);
    assert_int_equal(v.checkins, 4);
    assert_int_equal(v.unique_today, 3);
    assert_int_equal(counters_read_day(t->c, p, 0, 0, t->day, &v), 0);
    assert_int_equal(v.checkins, 5);
    assert_int_equal(v.unique_today, 4);
}

static void test_same_event_twice_counts_once(void **state)
{
    t_t *t = *state;
    NEED_REDIS(t);
    const char *p = t->prefix;
    s_checked_in(t, 1, 11, 101, 1, T0);
    s_checked_in(t, 2, 11, 101, 2, T0);
    s_checked_in(t, 2, 11, 101, 2, T0);  /* a replayed event */
    s_checked_in(t, 1, 11, 101, 1, T0);  /* an older one */
    s_flush(t);
    assert_int_equal(s_int(t, "GET %s:{c11}:act:101:checkins", p), 2);
    assert_int_equal(s_int(t, "GET %s:city:checkins", p), 2);
    s_assert_position(t, "7:2");
    analytics_stats_t st;
    s_stats(t, &st);
    assert_int_equal(st.applied, 2);
    assert_int_equal(st.duplicates, 2);

    /* A restart: a new daemon sees the same position in Redis. Events that
     * arrive together go as one call, applied whole or not at all: a run
     * that overlaps the stored position changes nothing and counts as a
     * gap (with a subscriber, the daemon then resubscribes from the stored
     * position, which is where a subscriber starts anyway). */
    analytics_destroy(&t->a);
    s_start(t);
    s_checked_in(t, 2, 11, 101, 2, T0);
    s_checked_in(t, 3, 11, 101, 3, T0);
    s_flush(t);
    s_stats(t, &st);
    assert_int_equal(st.applied, 0);
    assert_int_equal(st.gaps, 1);
    assert_int_equal(s_int(t, "GET %s:{c11}:act:101:checkins", p), 2);
    s_assert_position(t, "7:2");
    s_checked_in(t, 2, 11, 101, 2, T0);
    s_flush(t);
    s_checked_in(t, 3, 11, 101, 3, T0);
    s_flush(t);
    s_stats(t, &st);
    assert_int_equal(st.applied, 1);
    assert_int_equal(st.duplicates, 1);
    assert_int_equal(s_int(t, "GET %s:{c11}:act:101:checkins", p), 3);
    s_assert_position(t, "7:3");
}

/* A thousand check-ins that arrive together are one script call whose
 * merged operations leave exactly what one call per event would. */
static void test_burst_is_merged(void **state)
{
    t_t *t = *state;
    NEED_REDIS(t);
    const char *p = t->prefix;
    uint64_t seq = 1;
    for (int i = 0; i < 2500; i++)   /* three calls: 1000, 1000, 500 */
        s_checked_in(t, seq++, 11 + i % 3, 101 + i % 3, 5000 + i % 700, T0);
    s_flush(t);
    analytics_stats_t st;
    s_stats(t, &st);
    assert_int_equal(st.applied, 2500);
    assert_int_equal(st.gaps, 0);
    for (int k = 0; k < 3; k++) {
        int want = 2500 / 3 + (k < 2500 % 3);
        assert_int_equal(s_int(t, "GET %s:{c%d}:act:%d:checkins", p, 11 + k, 101 + k), want);
        assert_int_equal(s_int(t, "GET %s:{c%d}:act:%d:present", p, 11 + k, 101 + k), want);
        assert_int_equal(s_int(t, "GET %s:{c%d}:checkins", p, 11 + k), want);
    }
    assert_int_equal(s_int(t, "GET %s:city:checkins", p), 2500);
    counters_view_t v;
    assert_int_equal(counters_read_day(t->c, p, 0, 0, t->day, &v), 0);
    /* HyperLogLog estimates, but the same set gives the same estimate */
    for (int i = 0; i < 700; i++)
        s_int(t, "PFADD %s:scratch %d", p, 5000 + i);
    assert_int_equal(v.unique_today, s_int(t, "PFCOUNT %s:scratch", p));
    s_assert_position(t, "7:2500");
    /* the same burst again (a replay) changes nothing */
    for (uint64_t q = 1; q <= 2500; q++)
        s_checked_in(t, q, 11 + (int)((q - 1) % 3), 101 + (int)((q - 1) % 3), 5000, T0);
    s_flush(t);
    s_stats(t, &st);
    assert_int_equal(st.applied, 2500);
    assert_int_equal(st.duplicates, 2500);
    assert_int_equal(s_int(t, "GET %s:city:checkins", p), 2500);
}

static void test_older_seq_ignored(void **state)
{
    t_t *t = *state;
    NEED_REDIS(t);
    const char *p = t->prefix;
    for (uint64_t s = 1; s <= 4; s++)
        s_checked_in(t, s, 11, 101, (int64_t)s, T0);
    s_flush(t);
    /* Different content, old sequence: must change nothing at all. */
    s_checked_in(t, 3, 12, 999, 42, T0);
    s_stamp(t, 2, 12, 5, 42);
    s_flush(t);
    assert_int_equal(s_int(t, "EXISTS %s:{c12}:checkins", p), 0);
    assert_int_equal(s_int(t, "EXISTS %s:{c12}:route:5:stamps", p), 0);
    assert_int_equal(s_int(t, "GET %s:city:checkins", p), 4);
    assert_int_equal(s_int(t, "PFCOUNT %s:city:uniq:%s", p, t->day), 4);
    s_assert_position(t, "7:4");
    analytics_stats_t st;
    s_stats(t, &st);
    assert_int_equal(st.duplicates, 2);
}

static void test_gap_is_refused(void **state)
{
    t_t *t = *state;
    NEED_REDIS(t);
    const char *p = t->prefix;
    s_checked_in(t, 1, 11, 101, 1, T0);
    s_checked_in(t, 3, 11, 101, 3, T0);  /* 2 is missing */
    s_flush(t);
    assert_int_equal(s_int(t, "GET %s:city:checkins", p), 1);
    s_assert_position(t, "7:1");
    analytics_stats_t st;
    s_stats(t, &st);
    assert_int_equal(st.applied, 1);
    assert_int_equal(st.gaps, 1);
}

static void test_unique_people_hll(void **state)
{
    t_t *t = *state;
    NEED_REDIS(t);
    const char *p = t->prefix;
    /* 3 people, 5 check-ins, across two activities of one community. */
    s_checked_in(t, 1, 11, 101, 1001, T0);
    s_checked_in(t, 2, 11, 101, 1002, T0 + 1000);
    s_checked_in(t, 3, 11, 102, 1001, T0 + 2000);
    s_checked_in(t, 4, 11, 102, 1003, T0 + 3000);
    s_checked_in(t, 5, 11, 101, 1002, T0 + 4000);
    s_flush(t);
    assert_int_equal(s_int(t, "GET %s:{c11}:checkins", p), 5);
    assert_int_equal(s_int(t, "PFCOUNT %s:{c11}:uniq:%s", p, t->day), 3);
    assert_int_equal(s_int(t, "PFCOUNT %s:city:uniq:%s", p, t->day), 3);
    counters_view_t v;
    assert_int_equal(counters_read_day(t->c, p, 11, 0, t->day, &v), 0);
    assert_int_equal(v.unique_today, 3);
    assert_int_equal(v.checkins, 5);
}

static void test_day_follows_city_time_zone(void **state)
{
    t_t *t = *state;
    NEED_REDIS(t);
    const char *p = t->prefix;
    /* 2026-11-23T15:59:59Z is 23:59:59 in UTC+8; one second later is the 24th. */
    int64_t before = INT64_C(1795449599000), after = before + 1000;
    char d1[9], d2[9];
    counters_day(before, TZ, d1);
    counters_day(after, TZ, d2);
    assert_string_equal(d1, "20261123");
    assert_string_equal(d2, "20261124");
    counters_day(before, 0, d1);
    assert_string_equal(d1, "20261123");
    counters_day(after, 0, d1);
    assert_string_equal(d1, "20261123");  /* still the 23rd in UTC */
    s_checked_in(t, 1, 11, 101, 1, before);
    s_checked_in(t, 2, 11, 101, 2, after);
    s_flush(t);
    assert_int_equal(s_int(t, "PFCOUNT %s:{c11}:uniq:20261123", p), 1);
    assert_int_equal(s_int(t, "PFCOUNT %s:{c11}:uniq:20261124", p), 1);
}

static void test_checkout_lowers_present(void **state)
{
    t_t *t = *state;
    NEED_REDIS(t);
    const char *p = t->prefix;
    s_checked_in(t, 1, 11, 101, 1, T0);
    s_checked_in(t, 2, 11, 101, 2, T0);
    s_checked_in(t, 3, 11, 101, 3, T0);
    s_checked_out(t, 4, 11, 101, 1);
    s_checked_out(t, 5, 11, 101, 2);
    s_checked_out(t, 5, 11, 101, 2);  /* twice: counts once */
    s_flush(t);
    assert_int_equal(s_int(t, "GET %s:{c11}:act:101:present", p), 1);
    assert_int_equal(s_int(t, "GET %s:{c11}:act:101:checkins", p), 3);
    counters_view_t v;
    assert_int_equal(counters_read_day(t->c, p, 11, 101, t->day, &v), 0);
    assert_int_equal(v.present, 1);
    assert_int_equal(v.checkins, 3);
}

static void test_signups(void **state)
{
    t_t *t = *state;
    NEED_REDIS(t);
    const char *p = t->prefix;
    s_signed_up(t, 1, 11, 101, 1, "confirmed");
    s_signed_up(t, 2, 11, 101, 2, "confirmed");
    s_signed_up(t, 3, 11, 101, 3, "waitlisted");
    s_cancelled(t, 4, 11, 101, 1, 1);
    s_cancelled(t, 5, 11, 101, 3, 0);  /* left the waiting list */
    s_offer_closed(t, 6, 11, 101, 4);  /* its signed_up follows */
    s_signed_up(t, 7, 11, 101, 4, "confirmed");
    s_signed_up(t, 8, 12, 201, 9, "confirmed");
    s_flush(t);
    assert_int_equal(s_int(t, "GET %s:{c11}:act:101:signups", p), 2);
    assert_int_equal(s_int(t, "GET %s:{c11}:signups", p), 2);
    assert_int_equal(s_int(t, "GET %s:{c12}:signups", p), 1);
    assert_int_equal(s_int(t, "GET %s:city:signups", p), 3);
    s_assert_position(t, "7:8");

    /* The activity's community is found without being named. */
    counters_view_t v;
    assert_int_equal(counters_read_day(t->c, p, 0, 101, t->day, &v), 0);
    assert_int_equal(v.community_id, 11);
    assert_int_equal(v.signups, 2);
    assert_int_equal(counters_read_day(t->c, p, 0, 0, t->day, &v), 0);
    assert_int_equal(v.signups, 3);
    /* An activity nobody has seen. */
    assert_int_equal(counters_read_day(t->c, p, 0, 555, t->day, &v), -1);
}

static void test_stamps_and_refusals(void **state)
{
    t_t *t = *state;
    NEED_REDIS(t);
    const char *p = t->prefix;
    s_stamp(t, 1, 11, 7, 1);
    s_stamp(t, 2, 11, 7, 1);
    s_stamp(t, 3, 11, 7, 2);
    s_redeemed(t, 4, 11, 7, 1);
    s_refused(t, 5, 11, "expired");
    s_refused(t, 6, 11, "forged");
    s_refused(t, 7, 11, "expired");
    s_refused(t, 8, 11, "Wrong Activity!");
    s_refused(t, 9, 12, "");
    s_flush(t);
    assert_int_equal(s_int(t, "GET %s:{c11}:route:7:stamps", p), 3);
    assert_int_equal(s_int(t, "GET %s:{c11}:route:7:redeemed", p), 1);
    assert_int_equal(s_int(t, "HGET %s:{c11}:refusals expired", p), 2);
    assert_int_equal(s_int(t, "HGET %s:{c11}:refusals forged", p), 1);
    assert_int_equal(s_int(t, "HGET %s:{c11}:refusals wrong_activity_", p), 1);
    assert_int_equal(s_int(t, "HGET %s:{c12}:refusals unknown", p), 1);

    int64_t stamps = -1, redeemed = -1;
    assert_int_equal(counters_read_route(t->c, p, 11, 7, &stamps, &redeemed), 0);
    assert_int_equal(stamps, 3);
    assert_int_equal(redeemed, 1);
    counters_view_t v;
    assert_int_equal(counters_read_day(t->c, p, 11, 0, t->day, &v), 0);
    assert_int_equal(v.refusals, 4);
    assert_int_equal(v.nreasons, 3);
    assert_string_equal(v.reasons[0].reason, "expired");
    assert_int_equal(v.reasons[0].count, 2);
}

static void test_other_events_advance_position(void **state)
{
    t_t *t = *state;
    NEED_REDIS(t);
    const char *p = t->prefix;
    s_community_created(t, 1, 11);
    s_signed_up(t, 2, 11, 101, 1, "waitlisted");
    s_flush(t);
    s_assert_position(t, "7:2");
    assert_int_equal(s_int(t, "EXISTS %s:{c11}:signups", p), 0);
    assert_int_equal(s_int(t, "EXISTS %s:city:signups", p), 0);
    analytics_stats_t st;
    s_stats(t, &st);
    assert_int_equal(st.applied, 2);
}

static void test_epoch_reset(void **state)
{
    t_t *t = *state;
    NEED_REDIS(t);
    const char *p = t->prefix;
    s_checked_in(t, 1, 11, 101, 1, T0);
    s_signed_up(t, 2, 11, 101, 1, "confirmed");
    s_stamp(t, 3, 11, 7, 1);
    s_flush(t);

    uint64_t e, s;
    int pending;
    assert_int_equal(counters_position_read(t->c, p, "registry", &e, &s, &pending), 0);
    assert_int_equal(e, 7);
    assert_int_equal(s, 3);
    assert_int_equal(pending, 0);

    /* Keys of another prefix sharing a beginning must survive. */
    freeReplyObject(redisCommand(t->c, "SET %sx:{c11}:checkins 5", p));
    assert_true(counters_reset(t->c, p, "registry", 8) >= 5);
    s_assert_position(t, "8:0");
    assert_int_equal(s_int(t, "EXISTS %s:{c11}:checkins", p), 0);
    assert_int_equal(s_int(t, "EXISTS %s:city:checkins", p), 0);
    assert_int_equal(s_int(t, "EXISTS %s:city:activities", p), 0);
    assert_int_equal(s_int(t, "GET %sx:{c11}:checkins", p), 5);
    freeReplyObject(redisCommand(t->c, "DEL %sx:{c11}:checkins", p));

    /* A late event of the old epoch is ignored; the new one starts at 1. */
    Linli__CheckedIn x = LINLI__CHECKED_IN__INIT;
    x.activity_id = 101;
    x.person_id = 9;
    x.community_id = 11;
    x.at = T0;
    Linli__Event ev = LINLI__EVENT__INIT;
    ev.event_case = LINLI__EVENT__EVENT_CHECKED_IN;
    ev.checked_in = &x;
    assert_int_equal(s_send_epoch(t, 7, 4, 11, &ev), 0);
    assert_int_equal(s_send_epoch(t, 8, 1, 11, &ev), 0);
    s_flush(t);
    assert_int_equal(s_int(t, "GET %s:{c11}:checkins", p), 1);
    s_assert_position(t, "8:1");
    analytics_stats_t st;
    s_stats(t, &st);
    assert_int_equal(st.stale, 1);

    /* An interrupted reset is visible to the reader and blocks applying. */
    freeReplyObject(redisCommand(t->c, "SET %s:pos:registry 9:reset", p));
    assert_int_equal(counters_position_read(t->c, p, "registry", &e, &s, &pending), 0);
    assert_int_equal(e, 9);
    assert_int_equal(pending, 1);
    assert_int_equal(s_send_epoch(t, 9, 1, 11, &ev), 0);
    s_flush(t);
    assert_int_equal(s_int(t, "GET %s:{c11}:checkins", p), 1);
    s_stats(t, &st);
    assert_int_equal(st.stale, 2);
}

static void test_reconnects(void **state)
{
    t_t *t = *state;
    NEED_REDIS(t);
    const char *p = t->prefix;
    s_checked_in(t, 1, 11, 101, 1, T0);
    s_flush(t);
    /* Kill our async connection from the server side. */
    redisReply *r = redisCommand(t->c, "CLIENT LIST");
    assert_non_null(r);
    char name[96];
    snprintf(name, sizeof name, " name=linli-analytics-%s ", p);
    const char *line = strstr(r->str, name);
    assert_non_null(line);
    while (line > r->str && line[-1] != '\n')
        line--;
    long long id = strtoll(line + 3, NULL, 10);  /* "id=N ..." */
    freeReplyObject(r);
    assert_int_equal(s_int(t, "CLIENT KILL ID %lld", id), 1);

    int64_t deadline = mono_us() + 3000000;
    while (analytics_redis_connected(t->a) && mono_us() < deadline)
        event_base_loop(t->base, EVLOOP_ONCE);
    assert_false(analytics_redis_connected(t->a));
    deadline = mono_us() + 5000000;
    while (!analytics_redis_connected(t->a) && mono_us() < deadline)
        event_base_loop(t->base, EVLOOP_ONCE);
    assert_true(analytics_redis_connected(t->a));
    s_checked_in(t, 2, 11, 101, 2, T0);
    s_flush(t);
    assert_int_equal(s_int(t, "GET %s:city:checkins", p), 2);
    s_assert_position(t, "7:2");
}

/* The script cache is flushed under us: calls fall back to EVAL. SCRIPT
 * FLUSH affects every client of the server, so this runs only when
 * LINLI_TEST_REDIS_FLUSH=1 says the server is ours alone. */
static void test_noscript_fallback(void **state)
{
    t_t *t = *state;
    NEED_REDIS(t);
    const char *flush = getenv("LINLI_TEST_REDIS_FLUSH");
    if (!flush || strcmp(flush, "1") != 0)
        skip();
    const char *p = t->prefix;
    s_checked_in(t, 1, 11, 101, 1, T0);
    s_flush(t);
    freeReplyObject(redisCommand(t->c, "SCRIPT FLUSH"));
    s_checked_in(t, 2, 11, 101, 2, T0);
    s_checked_in(t, 3, 11, 101, 3, T0);
    s_flush(t);
    assert_int_equal(s_int(t, "GET %s:city:checkins", p), 3);
    s_assert_position(t, "7:3");
}

static void test_view_rendering(void **state)
{
    t_t *t = *state;
    NEED_REDIS(t);
    const char *p = t->prefix;
    s_checked_in(t, 1, 11, 101, 1, T0);
    s_checked_in(t, 2, 11, 101, 2, T0);
    s_refused(t, 3, 11, "expired");
    s_flush(t);

    counters_view_t v;
    assert_int_equal(counters_read_day(t->c, p, 11, 0, t->day, &v), 0);
    json_t *j = counters_to_json(&v);
    assert_int_equal(json_integer_value(json_object_get(j, "community_id")), 11);
    assert_int_equal(json_integer_value(json_object_get(j, "checkins")), 2);
    assert_int_equal(json_integer_value(json_object_get(j, "unique_today")), 2);
    assert_int_equal(json_integer_value(json_object_get(j, "refusals")), 1);
    assert_int_equal(
        json_integer_value(json_object_get(json_object_get(j, "refusals_by_reason"), "expired")),
        1);
    assert_null(json_object_get(j, "present"));
    assert_int_equal(
        json_integer_value(json_object_get(json_object_get(j, "position"), "sequence")), 3);
    assert_string_equal(json_string_value(json_object_get(j, "day")), t->day);
    json_decref(j);

    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    assert_non_null(f);
    counters_print(f, &v);
    fclose(f);
    assert_non_null(strstr(buf, "community 11"));
    assert_non_null(strstr(buf, "checkins       2"));
    assert_non_null(strstr(buf, "expired"));
    free(buf);

    /* counters_read uses today's date: no check-ins today in the test. */
    assert_int_equal(counters_read(t->c, p, 11, 101, &v), 0);
    assert_int_equal(v.checkins, 2);
    assert_int_equal(v.present, 2);
}

static void test_keys_and_prefix(void **state)
{
    (void)state;
    char k[COUNTERS_KEY_MAX];
    assert_int_equal(counters_key_scope(k, sizeof k, "linli", 12, "signups"), 0);
    assert_string_equal(k, "linli:{c12}:signups");
    assert_int_equal(counters_key_scope(k, sizeof k, "linli", 0, "checkins"), 0);
    assert_string_equal(k, "linli:city:checkins");
    assert_int_equal(counters_key_activity(k, sizeof k, "linli", 12, 7, "present"), 0);
    assert_string_equal(k, "linli:{c12}:act:7:present");
    assert_int_equal(counters_key_uniq(k, sizeof k, "linli", 12, "20261123"), 0);
    assert_string_equal(k, "linli:{c12}:uniq:20261123");
    assert_int_equal(counters_key_uniq(k, sizeof k, "linli", 0, "20261123"), 0);
    assert_string_equal(k, "linli:city:uniq:20261123");
    assert_int_equal(counters_key_route(k, sizeof k, "linli", 12, 3, "redeemed"), 0);
    assert_string_equal(k, "linli:{c12}:route:3:redeemed");
    assert_int_equal(counters_key_position(k, sizeof k, "linli", "registry"), 0);
    assert_string_equal(k, "linli:pos:registry");
    char small[8];
    assert_int_equal(counters_key_scope(small, sizeof small, "linli", 12, "signups"), -1);

    assert_true(counters_prefix_valid("linli"));
    assert_true(counters_prefix_valid("test.a-b:c_1"));
    assert_false(counters_prefix_valid(""));
    assert_false(counters_prefix_valid(NULL));
    assert_false(counters_prefix_valid("a*"));
    assert_false(counters_prefix_valid("a{b}"));
    assert_false(counters_prefix_valid("a b"));
    assert_false(counters_prefix_valid("a[b]"));

    analytics_opts_t o = { .redis = "127.0.0.1:1", .prefix = "bad*prefix", .tz_offset_min = 0 };
    struct event_base *base = event_base_new();
    assert_null(analytics_new(base, &o));
    event_base_free(base);
}

int main(void)
{
    log_init("test", LOG_LEVEL_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_keys_and_prefix),
        cmocka_unit_test_setup_teardown(test_checkins_per_scope, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_burst_is_merged, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_same_event_twice_counts_once, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_older_seq_ignored, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_gap_is_refused, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_unique_people_hll, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_day_follows_city_time_zone, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_checkout_lowers_present, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_signups, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_stamps_and_refusals, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_other_events_advance_position, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_epoch_reset, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_reconnects, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_noscript_fallback, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_view_rendering, s_setup, s_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
