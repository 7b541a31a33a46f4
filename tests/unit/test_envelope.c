/* Unit tests for common/envelope.c: encode/decode round trips of each payload
 * kind, the size cap at and just past its boundary, malformed bytes (every
 * truncation, bad wire types, nesting deep enough to exhaust the stack), each
 * validation rule with its limit, the names of oneof members, and the reply
 * builders. Frames are built both with protobuf-c and by hand, so that bytes
 * protobuf-c would never produce reach the decoder too. */
#include "envelope.h"

#include "util.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#define S_UUID "0b6c0c52-5a1e-4b8e-9d0f-3f5a2b7c9e11"
#define S_UUID2 "6f1d2e3c-4b5a-4978-8695-a4b3c2d1e0f9"

/* ---- helpers ---- */

/* Fills e's header fields with recognisable values. */
static void s_header(Linli__Envelope *e)
{
    linli__envelope__init(e);
    e->id = (char *)S_UUID;
    e->idempotency_key = (char *)"key-1";
    e->source = (char *)"test";
    e->type = (char *)"registry.sign_up";
    e->occurred_at = 1700000000123LL;
    e->community_id = 42;
    e->trace_id = (char *)"trace-9";
    e->sequence = 7;
    e->epoch = 3;
    e->stream = (char *)"registry";
}

static void s_assert_header(const Linli__Envelope *d)
{
    assert_string_equal(d->id, S_UUID);
    assert_string_equal(d->idempotency_key, "key-1");
    assert_string_equal(d->source, "test");
    assert_string_equal(d->type, "registry.sign_up");
    assert_int_equal(d->occurred_at, 1700000000123LL);
    assert_int_equal(d->community_id, 42);
    assert_string_equal(d->trace_id, "trace-9");
    assert_int_equal(d->sequence, 7);
    assert_int_equal(d->epoch, 3);
    assert_string_equal(d->stream, "registry");
}

/* Encodes e, decodes the bytes from an exact-size heap copy (so ASan sees
 * any read past the end) and checks that re-encoding gives the same bytes. */
static Linli__Envelope *s_round_trip(const Linli__Envelope *e)
{
    size_t len = 0;
    uint8_t *buf = envelope_encode(e, &len);
    assert_non_null(buf);
    assert_int_equal(len, linli__envelope__get_packed_size(e));
    const char *code = NULL;
    char why[128] = "";
    Linli__Envelope *d = envelope_decode(buf, len, &code, why, sizeof why);
    if (!d)
        fail_msg("decode failed: %s (%s)", code, why);
    size_t len2 = 0;
    uint8_t *buf2 = envelope_encode(d, &len2);
    assert_int_equal(len2, len);
    assert_memory_equal(buf2, buf, len);
    free(buf2);
    free(buf);
    return d;
}

/* Decodes len bytes that must be refused with code (pointer and text). */
static void s_refused(const void *buf, size_t len, const char *want, const char *why_part)
{
    /* An exact-size copy: reads past len are caught under ASan. */
    uint8_t *copy = xmalloc(len);
    if (len)
        memcpy(copy, buf, len);
    const char *code = NULL;
    char why[128] = "";
    Linli__Envelope *d = envelope_decode(copy, len, &code, why, sizeof why);
    free(copy);
    if (d) {
        envelope_free(&d);
        fail_msg("accepted %zu bytes, want %s", len, want);
    }
    assert_non_null(code);
    if (strcmp(code, want) != 0)
        fail_msg("%zu bytes gave %s (%s), want %s", len, code, why, want);
    assert_true(why[0] != '\0');
    if (why_part && !strstr(why, why_part))
        fail_msg("why \"%s\" lacks \"%s\"", why, why_part);
}

static Linli__Envelope *s_accepted(const void *buf, size_t len)
{
    uint8_t *copy = xmalloc(len);
    if (len)
        memcpy(copy, buf, len);
    const char *code = NULL;
    char why[128] = "";
    Linli__Envelope *d = envelope_decode(copy, len, &code, why, sizeof why);
    free(copy);
    if (!d)
        fail_msg("%zu bytes refused: %s (%s)", len, code, why);
    return d;
}

static size_t s_varint(uint8_t *p, uint64_t v)
{
    size_t n = 0;
    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

/* A frame built inside out: the bytes sit at the end of data and each
 * s_wrap puts a length-delimited field header in front of them. */
typedef struct {
    uint8_t *data;  /* owned; the frame is data[start, start + len) */
    size_t start;
    size_t len;
} s_frame_t;

static void s_frame_new(s_frame_t *f, size_t cap, const void *inner, size_t inner_len)
{
    f->data = xmalloc(cap);
    assert_true(inner_len <= cap);
    f->start = cap - inner_len;
    f->len = inner_len;
    if (inner_len)
        memcpy(f->data + f->start, inner, inner_len);
}

/* Makes the current bytes the value of field (wire type 2). */
static void s_wrap(s_frame_t *f, uint32_t field)
{
    uint8_t h[20];
    size_t n = s_varint(h, (uint64_t)field << 3 | 2);
    n += s_varint(h + n, f->len);
    assert_true(f->start >= n);
    f->start -= n;
    memcpy(f->data + f->start, h, n);
    f->len += n;
}

/* Envelope{reply{replay{events[<inner>]}}}: three levels of nesting. */
static void s_wrap_replay(s_frame_t *f)
{
    s_wrap(f, 3);   /* ReplayResult.events */
    s_wrap(f, 63);  /* Reply.replay */
    s_wrap(f, 17);  /* Envelope.reply */
}

/* ---- round trips ---- */

static void test_round_trip_command(void **state)
{
    (void)state;
    Linli__Envelope e;
    s_header(&e);
    Linli__Command cmd = LINLI__COMMAND__INIT;
    Linli__SignUp su = LINLI__SIGN_UP__INIT;
    int64_t people[] = {11, 12, INT64_MAX};
    su.activity_id = 5;
    su.n_person_ids = 3;
    su.person_ids = people;
    su.join_waitlist = 1;
    cmd.command_case = LINLI__COMMAND__COMMAND_SIGN_UP;
    cmd.sign_up = &su;
    e.payload_case = LINLI__ENVELOPE__PAYLOAD_COMMAND;
    e.command = &cmd;

    Linli__Envelope *d = s_round_trip(&e);
    s_assert_header(d);
    assert_int_equal(d->payload_case, LINLI__ENVELOPE__PAYLOAD_COMMAND);
    assert_non_null(d->command);
    assert_string_equal(envelope_command_name(d->command), "sign_up");
    assert_int_equal(d->command->command_case, LINLI__COMMAND__COMMAND_SIGN_UP);
    const Linli__SignUp *got = d->command->sign_up;
    assert_int_equal(got->activity_id, 5);
    assert_int_equal(got->n_person_ids, 3);
    assert_int_equal(got->person_ids[0], 11);
    assert_int_equal(got->person_ids[1], 12);
    assert_int_equal(got->person_ids[2], INT64_MAX);
    assert_true(got->join_waitlist);
    envelope_free(&d);
    assert_null(d);

    /* A command with no fields of its own set is still a command. */
    Linli__Sweep sw = LINLI__SWEEP__INIT;
    cmd.command_case = LINLI__COMMAND__COMMAND_SWEEP;
    cmd.sweep = &sw;
    d = s_round_trip(&e);
    assert_string_equal(envelope_command_name(d->command), "sweep");
    assert_int_equal(d->command->sweep->now, 0);
    envelope_free(&d);
}

static void test_round_trip_reply(void **state)
{
    (void)state;
    Linli__Envelope e;
    s_header(&e);
    e.type = (char *)"reply";
    Linli__Reply r = LINLI__REPLY__INIT;
    Linli__SignUpResult res = LINLI__SIGN_UP_RESULT__INIT;
    int64_t ids[] = {101, 102};
    res.status = (char *)"waitlisted";
    res.n_signup_ids = 2;
    res.signup_ids = ids;
    res.waitlist_position = 4;
    r.ok = 1;
    r.request_id = (char *)S_UUID2;
    r.result_case = LINLI__REPLY__RESULT_SIGN_UP;
    r.sign_up = &res;
    e.payload_case = LINLI__ENVELOPE__PAYLOAD_REPLY;
    e.reply = &r;

    Linli__Envelope *d = s_round_trip(&e);
    assert_int_equal(d->payload_case, LINLI__ENVELOPE__PAYLOAD_REPLY);
    assert_true(d->reply->ok);
    assert_null(d->reply->error);
    assert_string_equal(d->reply->request_id, S_UUID2);
    assert_int_equal(d->reply->result_case, LINLI__REPLY__RESULT_SIGN_UP);
    assert_string_equal(d->reply->sign_up->status, "waitlisted");
    assert_int_equal(d->reply->sign_up->n_signup_ids, 2);
    assert_int_equal(d->reply->sign_up->signup_ids[1], 102);
    assert_int_equal(d->reply->sign_up->waitlist_position, 4);
    envelope_free(&d);

    /* An error reply: ok false, no result. */
    Linli__Reply er = LINLI__REPLY__INIT;
    Linli__Error err = LINLI__ERROR__INIT;
    err.code = (char *)"activity_full";
    err.message = (char *)"no seats left";
    er.error = &err;
    e.reply = &er;
    d = s_round_trip(&e);
    assert_false(d->reply->ok);
    assert_non_null(d->reply->error);
    assert_string_equal(d->reply->error->code, "activity_full");
    assert_string_equal(d->reply->error->message, "no seats left");
    assert_int_equal(d->reply->result_case, LINLI__REPLY__RESULT__NOT_SET);
    envelope_free(&d);
}

static void test_round_trip_event(void **state)
{
    (void)state;
    Linli__Envelope e;
    s_header(&e);
    e.type = (char *)"registry.checked_in";
    e.sequence = UINT64_MAX;
    e.epoch = UINT64_MAX - 1;
    Linli__Event ev = LINLI__EVENT__INIT;
    Linli__CheckedIn ci = LINLI__CHECKED_IN__INIT;
    ci.checkin_id = 900;
    ci.activity_id = 5;
    ci.person_id = 11;
    ci.community_id = 42;
    ci.at = 1700000000999LL;
    ci.device_id = (char *)"scanner-3";
    ev.event_case = LINLI__EVENT__EVENT_CHECKED_IN;
    ev.checked_in = &ci;
    e.payload_case = LINLI__ENVELOPE__PAYLOAD_EVENT;
    e.event = &ev;

    Linli__Envelope *d = s_round_trip(&e);
    assert_int_equal(d->payload_case, LINLI__ENVELOPE__PAYLOAD_EVENT);
    assert_int_equal(d->sequence, UINT64_MAX);
    assert_int_equal(d->epoch, UINT64_MAX - 1);
    assert_string_equal(envelope_event_name(d->event), "checked_in");
    const Linli__CheckedIn *got = d->event->checked_in;
    assert_int_equal(got->checkin_id, 900);
    assert_int_equal(got->activity_id, 5);
    assert_int_equal(got->station_id, 0);
    assert_int_equal(got->person_id, 11);
    assert_int_equal(got->community_id, 42);
    assert_int_equal(got->at, 1700000000999LL);
    assert_string_equal(got->device_id, "scanner-3");
    envelope_free(&d);
}

static void test_round_trip_heartbeat(void **state)
{
    (void)state;
    Linli__Envelope e = LINLI__ENVELOPE__INIT;
    e.source = (char *)"registry-relay";
    e.type = (char *)"heartbeat";
    Linli__Heartbeat hb = LINLI__HEARTBEAT__INIT;
    hb.stream = (char *)"registry";
    hb.epoch = 2;
    hb.last_sequence = 123456789012ULL;
    e.payload_case = LINLI__ENVELOPE__PAYLOAD_HEARTBEAT;
    e.heartbeat = &hb;

    Linli__Envelope *d = s_round_trip(&e);
    assert_int_equal(d->payload_case, LINLI__ENVELOPE__PAYLOAD_HEARTBEAT);
    assert_string_equal(d->id, "");  /* an unset id is allowed */
    assert_string_equal(d->heartbeat->stream, "registry");
    assert_int_equal(d->heartbeat->epoch, 2);
    assert_int_equal(d->heartbeat->last_sequence, 123456789012ULL);
    envelope_free(&d);

    /* An all-zero heartbeat is an empty sub-message on the wire and still
     * decodes as a heartbeat. */
    Linli__Heartbeat zero = LINLI__HEARTBEAT__INIT;
    e.heartbeat = &zero;
    d = s_round_trip(&e);
    assert_int_equal(d->payload_case, LINLI__ENVELOPE__PAYLOAD_HEARTBEAT);
    assert_non_null(d->heartbeat);
    envelope_free(&d);
}

/* A replay reply carries whole event envelopes: the legitimate nesting. */
static void test_round_trip_replay_result(void **state)
{
    (void)state;
    Linli__Envelope inner[2];
    Linli__Event evs[2];
    Linli__SignedUp sus[2];
    Linli__Envelope *ptrs[2];
    for (int i = 0; i < 2; i++) {
        s_header(&inner[i]);
        inner[i].sequence = (uint64_t)(10 + i);
        linli__event__init(&evs[i]);
        linli__signed_up__init(&sus[i]);
        sus[i].activity_id = 5;
        evs[i].event_case = LINLI__EVENT__EVENT_SIGNED_UP;
        evs[i].signed_up = &sus[i];
        inner[i].payload_case = LINLI__ENVELOPE__PAYLOAD_EVENT;
        inner[i].event = &evs[i];
        ptrs[i] = &inner[i];
    }
    Linli__ReplayResult rr = LINLI__REPLAY_RESULT__INIT;
    rr.epoch = 3;
    rr.last_sequence = 11;
    rr.n_events = 2;
    rr.events = ptrs;
    rr.more = 1;
    Linli__Reply r = LINLI__REPLY__INIT;
    r.ok = 1;
    r.result_case = LINLI__REPLY__RESULT_REPLAY;
    r.replay = &rr;
    Linli__Envelope e;
    s_header(&e);
    e.payload_case = LINLI__ENVELOPE__PAYLOAD_REPLY;
    e.reply = &r;

    Linli__Envelope *d = s_round_trip(&e);
    const Linli__ReplayResult *got = d->reply->replay;
    assert_int_equal(got->n_events, 2);
    assert_true(got->more);
    for (size_t i = 0; i < 2; i++) {
        assert_int_equal(got->events[i]->sequence, 10 + i);
        assert_string_equal(envelope_event_name(got->events[i]->event), "signed_up");
    }
    envelope_free(&d);
}

static void test_encode_empty(void **state)
{
    (void)state;
    Linli__Envelope e = LINLI__ENVELOPE__INIT;
    size_t len = 99;
    uint8_t *buf = envelope_encode(&e, &len);
    assert_non_null(buf);  /* the caller frees even an empty frame */
    assert_int_equal(len, 0);
    free(buf);
}

/* ---- the size cap ---- */

/* A valid command envelope of exactly n bytes (n large), padded through a
 * community name, which validation does not limit. */
static uint8_t *s_sized_frame(size_t n)
{
    Linli__Envelope e;
    s_header(&e);
    Linli__Command cmd = LINLI__COMMAND__INIT;
    Linli__CreateCommunity cc = LINLI__CREATE_COMMUNITY__INIT;
    cmd.command_case = LINLI__COMMAND__COMMAND_CREATE_COMMUNITY;
    cmd.create_community = &cc;
    e.payload_case = LINLI__ENVELOPE__PAYLOAD_COMMAND;
    e.command = &cmd;
    char *name = xmalloc(n + 1);
    memset(name, 'n', n);
    size_t namelen = n - 64;
    for (int tries = 0; tries < 8; tries++) {
        name[namelen] = '\0';
        cc.name = name;
        size_t got = linli__envelope__get_packed_size(&e);
        if (got == n)
            break;
        namelen = namelen + n - got;  /* varint lengths settle in a step or two */
    }
    assert_int_equal(linli__envelope__get_packed_size(&e), n);
    size_t len = 0;
    uint8_t *buf = envelope_encode(&e, &len);
    assert_int_equal(len, n);
    free(name);
    return buf;
}

static void test_size_cap(void **state)
{
    (void)state;
    /* Exactly at the cap: accepted. */
    uint8_t *at = s_sized_frame(ENVELOPE_MAX_BYTES);
    Linli__Envelope *d = s_accepted(at, ENVELOPE_MAX_BYTES);
    assert_string_equal(envelope_command_name(d->command), "create_community");
    assert_true(strlen(d->command->create_community->name) > ENVELOPE_MAX_BYTES - 200);
    envelope_free(&d);
    free(at);

    /* One byte past: refused, though the bytes form a valid Envelope. */
    uint8_t *past = s_sized_frame(ENVELOPE_MAX_BYTES + 1);
    Linli__Envelope *ok = linli__envelope__unpack(NULL, ENVELOPE_MAX_BYTES + 1, past);
    assert_non_null(ok);  /* control: protobuf-c alone would take it */
    linli__envelope__free_unpacked(ok, NULL);
    s_refused(past, ENVELOPE_MAX_BYTES + 1, ENVELOPE_E_TOO_LARGE, "exceeds");
    assert_string_equal(ENVELOPE_E_TOO_LARGE, "frame_too_large");
    free(past);

    /* Refused unread: a NULL buffer with a huge length does not crash. */
    const char *code = NULL;
    char why[128] = "";
    assert_null(envelope_decode(NULL, ENVELOPE_MAX_BYTES + 1, &code, why, sizeof why));
    assert_string_equal(code, ENVELOPE_E_TOO_LARGE);
    assert_null(envelope_decode(NULL, SIZE_MAX, &code, why, sizeof why));
    assert_string_equal(code, ENVELOPE_E_TOO_LARGE);
    assert_non_null(strstr(why, "1048576"));
}

/* ---- malformed bytes ---- */

static void test_malformed_bytes(void **state)
{
    (void)state;
    assert_string_equal(ENVELOPE_E_MALFORMED, "malformed_frame");
    static const struct {
        const char *what;
        const char *bytes;
        size_t len;
    } cases[] = {
        {"key varint never ends", "\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", 11},
        {"string length missing", "\x0a", 1},
        {"string length past the end", "\x0a\x05" "abc", 5},
        {"huge string length", "\x0a\xff\xff\xff\xff\x0f" "abc", 9},
        {"int64 varint cut", "\x28\x80", 2},
        {"int64 varint too long", "\x28\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 12},
        {"fixed64 cut", "\x09\x01\x02\x03", 4},
        {"fixed32 cut", "\x0d\x01\x02", 3},
        {"group start (unsupported)", "\x0b", 1},
        {"group end", "\x0c", 1},
        {"wire type 6", "\x0e\x00", 2},
        {"wire type 7", "\x0f\x00", 2},
        {"command as varint", "\x80\x01\x01", 3},
        {"command length past the end", "\x82\x01\x10\x0a", 4},
        {"inner message cut", "\x82\x01\x02\x0a\x05", 5},
        {"inner string length past the end", "\x82\x01\x04\x0a\x02\x0a\x09", 7},
        {"id as varint", "\x08\x01", 2},
    };
    for (size_t i = 0; i < LX_ARRAY_LEN(cases); i++) {
        const char *code = NULL;
        char why[128] = "";
        uint8_t *copy = xmalloc(cases[i].len);
        memcpy(copy, cases[i].bytes, cases[i].len);
        Linli__Envelope *d = envelope_decode(copy, cases[i].len, &code, why, sizeof why);
        free(copy);
        if (d) {
            envelope_free(&d);
            fail_msg("%s: accepted", cases[i].what);
        }
        if (!code || strcmp(code, ENVELOPE_E_MALFORMED) != 0)
            fail_msg("%s: gave %s (%s)", cases[i].what, code, why);
    }
}

/* Every prefix of a valid frame is refused: cut inside the payload it is
 * malformed; cut at the payload's start it is a valid message with no
 * payload; cut in the header fields it is one or the other. */
static void test_every_truncation(void **state)
{
    (void)state;
    Linli__Envelope e;
    s_header(&e);
    Linli__Command cmd = LINLI__COMMAND__INIT;
    Linli__Scan scan = LINLI__SCAN__INIT;
    scan.token = (char *)"L1.abc.def";
    scan.person_id = 11;
    scan.device_id = (char *)"dev";
    scan.counter = 99;
    cmd.command_case = LINLI__COMMAND__COMMAND_SCAN;
    cmd.scan = &scan;
    e.payload_case = LINLI__ENVELOPE__PAYLOAD_COMMAND;
    e.command = &cmd;
    size_t n = 0;
    uint8_t *buf = envelope_encode(&e, &n);
    size_t cmdlen = linli__command__get_packed_size(&cmd);
    uint8_t tmp[10];
    size_t payload_at = n - (2 + s_varint(tmp, cmdlen) + cmdlen);  /* tag 16 is 2 bytes */

    Linli__Envelope *d = s_accepted(buf, n);
    envelope_free(&d);
    for (size_t i = 0; i < n; i++) {
        if (i == payload_at)
            s_refused(buf, i, ENVELOPE_E_INVALID, "no payload");
        else if (i > payload_at)
            s_refused(buf, i, ENVELOPE_E_MALFORMED, NULL);
        else {
            const char *code = NULL;
            char why[128];
            uint8_t *copy = xmalloc(i ? i : 1);
            memcpy(copy, buf, i);
            d = envelope_decode(copy, i, &code, why, sizeof why);
            free(copy);
            assert_null(d);
            assert_non_null(code);
            assert_true(strcmp(code, ENVELOPE_E_MALFORMED) == 0 ||
                        strcmp(code, ENVELOPE_E_INVALID) == 0);
        }
    }
    /* Trailing garbage after a valid frame is a malformed frame too. */
    uint8_t *longer = xmalloc(n + 1);
    memcpy(longer, buf, n);
    longer[n] = 0xff;
    s_refused(longer, n + 1, ENVELOPE_E_MALFORMED, NULL);
    free(longer);
    free(buf);
}

/* protobuf-c unpacks by recursion without a limit; an Envelope can contain
 * Envelopes, so a small frame could nest deep enough to overflow the stack.
 * Such frames are refused before unpacking. */
static void test_nesting_depth(void **state)
{
    (void)state;
    /* Envelope(1) { reply(2) { replay(3) { events: Envelope(4) ... } } }:
     * five wraps put an empty Envelope at depth 16, the limit. */
    assert_int_equal(ENVELOPE_MAX_DEPTH, 16);
    s_frame_t f;
    s_frame_new(&f, 4096, NULL, 0);
    for (int i = 0; i < 5; i++)
        s_wrap_replay(&f);
    Linli__Envelope *d = s_accepted(f.data + f.start, f.len);
    const Linli__Envelope *deepest = d;
    for (int i = 0; i < 5; i++) {
        assert_int_equal(deepest->reply->replay->n_events, 1);
        deepest = deepest->reply->replay->events[0];
    }
    assert_int_equal(deepest->payload_case, LINLI__ENVELOPE__PAYLOAD__NOT_SET);
    envelope_free(&d);
    free(f.data);

    /* The same with an empty heartbeat inside the deepest Envelope: 17. */
    s_frame_new(&f, 4096, "\x9a\x01\x00", 3);  /* Envelope.heartbeat, length 0 */
    for (int i = 0; i < 5; i++)
        s_wrap_replay(&f);
    s_refused(f.data + f.start, f.len, ENVELOPE_E_MALFORMED, "nested deeper than 16");
    free(f.data);

    /* Deep enough to crash an unguarded decoder (about 20,000 levels, well
     * under the size cap). */
    size_t cap = ENVELOPE_MAX_BYTES;
    s_frame_new(&f, cap, NULL, 0);
    int levels = 0;
    while (f.start > 32 && f.len < 300000) {
        s_wrap_replay(&f);
        levels++;
    }
    assert_true(levels > 10000);
    assert_true(f.len <= ENVELOPE_MAX_BYTES);
    s_refused(f.data + f.start, f.len, ENVELOPE_E_MALFORMED, "nested");
    free(f.data);
}

/* Only message fields count as nesting: the same bytes inside a string or
 * an unknown field are data, and protobuf-c does not descend into them. */
static void test_nesting_in_data_is_not_depth(void **state)
{
    (void)state;
    s_frame_t blob;
    s_frame_new(&blob, 4096, NULL, 0);
    for (int i = 0; i < 50; i++)
        s_wrap_replay(&blob);

    /* Heartbeat.stream (a string) holding the blob. */
    s_frame_t f;
    s_frame_new(&f, 8192, blob.data + blob.start, blob.len);
    s_wrap(&f, 1);   /* Heartbeat.stream */
    s_wrap(&f, 19);  /* Envelope.heartbeat */
    Linli__Envelope *d = s_accepted(f.data + f.start, f.len);
    assert_int_equal(d->payload_case, LINLI__ENVELOPE__PAYLOAD_HEARTBEAT);
    assert_memory_equal(d->heartbeat->stream, blob.data + blob.start, blob.len);
    envelope_free(&d);
    free(f.data);

    /* An unknown field 1000 holding the blob, next to a heartbeat. */
    s_frame_new(&f, 8192, blob.data + blob.start, blob.len);
    s_wrap(&f, 1000);
    uint8_t *frame = xmalloc(f.len + 3);
    memcpy(frame, f.data + f.start, f.len);
    memcpy(frame + f.len, "\x9a\x01\x00", 3);
    d = s_accepted(frame, f.len + 3);
    assert_int_equal(d->payload_case, LINLI__ENVELOPE__PAYLOAD_HEARTBEAT);
    assert_int_equal(d->base.n_unknown_fields, 1);
    envelope_free(&d);
    free(frame);
    free(f.data);
    free(blob.data);
}

/* ---- validation ---- */

/* envelope_validate refuses e with a reason containing why_part. */
static void s_invalid_mem(const Linli__Envelope *e, const char *why_part)
{
    char why[128] = "";
    assert_int_equal(envelope_validate(e, why, sizeof why), -1);
    if (!strstr(why, why_part))
        fail_msg("why \"%s\" lacks \"%s\"", why, why_part);
}

/* As s_invalid_mem, and the same envelope on the wire is refused by
 * envelope_decode as invalid with the same reason. */
static void s_invalid(const Linli__Envelope *e, const char *why_part)
{
    s_invalid_mem(e, why_part);
    char why[128] = "";
    envelope_validate(e, why, sizeof why);
    size_t len = 0;
    uint8_t *buf = envelope_encode(e, &len);
    s_refused(buf, len, ENVELOPE_E_INVALID, why);
    free(buf);
}

static void s_valid(const Linli__Envelope *e)
{
    char why[128] = "";
    if (envelope_validate(e, why, sizeof why) != 0)
        fail_msg("refused: %s", why);
    Linli__Envelope *d = s_round_trip(e);
    envelope_free(&d);
}

static void test_validate_limits(void **state)
{
    (void)state;
    assert_string_equal(ENVELOPE_E_INVALID, "invalid_envelope");
    Linli__Heartbeat hb = LINLI__HEARTBEAT__INIT;
    Linli__Envelope e;
    s_header(&e);
    e.payload_case = LINLI__ENVELOPE__PAYLOAD_HEARTBEAT;
    e.heartbeat = &hb;
    s_valid(&e);

    char big[ENVELOPE_MAX_KEY + 2];
    memset(big, 'k', sizeof big);
    big[ENVELOPE_MAX_KEY] = '\0';
    e.idempotency_key = big;
    s_valid(&e);
    big[ENVELOPE_MAX_KEY] = 'k';
    big[ENVELOPE_MAX_KEY + 1] = '\0';
    s_invalid(&e, "idempotency_key longer than 128 bytes");
    e.idempotency_key = (char *)"";

    char name[ENVELOPE_MAX_NAME + 2];
    memset(name, 'x', sizeof name);
    const char *labels[] = {"source", "type", "trace_id", "stream"};
    char **fields[] = {&e.source, &e.type, &e.trace_id, &e.stream};
    for (size_t i = 0; i < LX_ARRAY_LEN(fields); i++) {
        char *saved = *fields[i];
        name[ENVELOPE_MAX_NAME] = '\0';
        *fields[i] = name;
        s_valid(&e);
        name[ENVELOPE_MAX_NAME] = 'x';
        name[ENVELOPE_MAX_NAME + 1] = '\0';
        char want[64];
        snprintf(want, sizeof want, "%s longer than 64 bytes", labels[i]);
        s_invalid(&e, want);
        *fields[i] = saved;
    }

    /* NULL strings (hand-built messages) count as empty. */
    Linli__Envelope n = LINLI__ENVELOPE__INIT;
    n.id = n.idempotency_key = n.source = n.type = n.trace_id = n.stream = NULL;
    n.payload_case = LINLI__ENVELOPE__PAYLOAD_HEARTBEAT;
    n.heartbeat = &hb;
    char why[128];
    assert_int_equal(envelope_validate(&n, why, sizeof why), 0);

    /* id: empty or a canonical UUID. */
    e.id = (char *)"";
    s_valid(&e);
    const char *bad_ids[] = {"not-a-uuid",
                             "0b6c0c52-5a1e-4b8e-9d0f-3f5a2b7c9e110",   /* one too many */
                             "0b6c0c52-5a1e-4b8e-9d0f-3f5a2b7c9e1",     /* one too few */
                             "0b6c0c52x5a1e-4b8e-9d0f-3f5a2b7c9e11",    /* bad separator */
                             "0b6c0c52-5a1e-4b8e-9d0f-3f5a2b7c9e1g",    /* not hex */
                             " 0b6c0c52-5a1e-4b8e-9d0f-3f5a2b7c9e11"};  /* space */
    for (size_t i = 0; i < LX_ARRAY_LEN(bad_ids); i++) {
        e.id = (char *)bad_ids[i];
        s_invalid(&e, "id is not a UUID");
    }
    e.id = (char *)S_UUID;

    e.community_id = -1;
    s_invalid(&e, "community_id is negative");
    e.community_id = INT64_MIN;
    s_invalid(&e, "community_id is negative");
    e.community_id = 0;
    s_valid(&e);
    e.community_id = INT64_MAX;
    s_valid(&e);
}

static void test_validate_payload(void **state)
{
    (void)state;
    Linli__Envelope e;
    s_header(&e);
    s_invalid(&e, "envelope has no payload");
    e.payload_case = (Linli__Envelope__PayloadCase)99;
    s_invalid(&e, "envelope has no payload");

    /* A command needs a command set inside. */
    Linli__Command cmd = LINLI__COMMAND__INIT;
    e.payload_case = LINLI__ENVELOPE__PAYLOAD_COMMAND;
    e.command = &cmd;
    s_invalid(&e, "command envelope without a command");
    /* NULL members exist only in hand-built messages: protobuf-c packs
     * nothing for them, so on the wire they read as no payload. */
    e.command = NULL;
    s_invalid_mem(&e, "command envelope without a command");
    Linli__GetActivity ga = LINLI__GET_ACTIVITY__INIT;
    cmd.command_case = LINLI__COMMAND__COMMAND_GET_ACTIVITY;
    cmd.get_activity = &ga;
    e.command = &cmd;
    s_valid(&e);

    Linli__Reply r = LINLI__REPLY__INIT;
    e.payload_case = LINLI__ENVELOPE__PAYLOAD_REPLY;
    e.reply = NULL;
    s_invalid_mem(&e, "empty reply");
    e.reply = &r;
    s_valid(&e);  /* an empty reply message is still a reply */

    /* An event with no member this build knows passes: newer producers may
     * publish types we have never heard of. */
    Linli__Event ev = LINLI__EVENT__INIT;
    e.payload_case = LINLI__ENVELOPE__PAYLOAD_EVENT;
    e.event = NULL;
    s_invalid_mem(&e, "event envelope without an event");
    e.event = &ev;
    s_valid(&e);

    e.payload_case = LINLI__ENVELOPE__PAYLOAD_HEARTBEAT;
    e.heartbeat = NULL;
    s_invalid_mem(&e, "empty heartbeat");
    size_t len = 0;
    uint8_t *buf = envelope_encode(&e, &len);
    s_refused(buf, len, ENVELOPE_E_INVALID, "envelope has no payload");
    free(buf);

    /* why is always terminated, even when short. */
    char tiny[8];
    memset(tiny, '#', sizeof tiny);
    assert_int_equal(envelope_validate(&e, tiny, sizeof tiny), -1);
    assert_int_equal(strlen(tiny), sizeof tiny - 1);
}

/* Wire shapes only a peer would send. */
static void test_decode_wire_shapes(void **state)
{
    (void)state;
    /* Nothing at all: a message with no payload. */
    const char *code = NULL;
    char why[128] = "";
    assert_null(envelope_decode(NULL, 0, &code, why, sizeof why));
    assert_string_equal(code, ENVELOPE_E_INVALID);
    assert_string_equal(why, "envelope has no payload");

    /* A command sub-message with no member: invalid, not malformed. */
    s_refused("\x82\x01\x00", 3, ENVELOPE_E_INVALID, "without a command");
    /* A command whose member is unknown to this build (field 50). */
    s_refused("\x82\x01\x03\x92\x03\x00", 6, ENVELOPE_E_INVALID, "without a command");

    /* An event whose member is unknown (field 99) is accepted, unnamed. */
    Linli__Envelope *d = s_accepted("\x92\x01\x03\x9a\x06\x00", 6);
    assert_int_equal(d->payload_case, LINLI__ENVELOPE__PAYLOAD_EVENT);
    assert_null(envelope_event_name(d->event));
    envelope_free(&d);

    /* Unknown top-level fields are carried, not refused. */
    d = s_accepted("\xf8\x07\x05\x9a\x01\x00", 6);  /* field 127 varint, heartbeat */
    assert_int_equal(d->payload_case, LINLI__ENVELOPE__PAYLOAD_HEARTBEAT);
    envelope_free(&d);

    /* Two members of the command oneof: the last one wins, the first is
     * freed (ASan would report a leak), exactly one command remains. */
    d = s_accepted("\x82\x01\x02\x0a\x00"   /* create_community {} */
                   "\x82\x01\x02\x62\x00",  /* get_activity {} */
                   10);
    assert_string_equal(envelope_command_name(d->command), "get_activity");
    envelope_free(&d);

    /* Two payload members: likewise the last. */
    d = s_accepted("\x82\x01\x02\x62\x00\x9a\x01\x00", 8);
    assert_int_equal(d->payload_case, LINLI__ENVELOPE__PAYLOAD_HEARTBEAT);
    envelope_free(&d);

    /* A string id that is not a UUID is invalid, whatever else is right. */
    s_refused("\x0a\x03" "abc\x9a\x01\x00", 8, ENVELOPE_E_INVALID, "id is not a UUID");
    /* A negative community_id needs ten bytes of varint. */
    s_refused("\x30\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01\x9a\x01\x00", 14,
              ENVELOPE_E_INVALID, "community_id is negative");
}

/* ---- names ---- */

static void test_command_names(void **state)
{
    (void)state;
    static const struct {
        Linli__Command__CommandCase c;
        const char *name;
    } names[] = {
        {LINLI__COMMAND__COMMAND_CREATE_COMMUNITY, "create_community"},
        {LINLI__COMMAND__COMMAND_REGISTER_PERSON, "register_person"},
        {LINLI__COMMAND__COMMAND_CREATE_ACTIVITY, "create_activity"},
        {LINLI__COMMAND__COMMAND_SIGN_UP, "sign_up"},
        {LINLI__COMMAND__COMMAND_CANCEL_SIGN_UP, "cancel_sign_up"},
        {LINLI__COMMAND__COMMAND_RESPOND_OFFER, "respond_offer"},
        {LINLI__COMMAND__COMMAND_ISSUE_TOKEN, "issue_token"},
        {LINLI__COMMAND__COMMAND_SCAN, "scan"},
        {LINLI__COMMAND__COMMAND_UPLOAD_SCANS, "upload_scans"},
        {LINLI__COMMAND__COMMAND_CREATE_ROUTE, "create_route"},
        {LINLI__COMMAND__COMMAND_REDEEM_ROUTE, "redeem_route"},
        {LINLI__COMMAND__COMMAND_GET_ACTIVITY, "get_activity"},
        {LINLI__COMMAND__COMMAND_SWEEP, "sweep"},
        {LINLI__COMMAND__COMMAND_REPLAY, "replay"},
    };
    Linli__Command cmd = LINLI__COMMAND__INIT;
    assert_null(envelope_command_name(&cmd));
    for (size_t i = 0; i < LX_ARRAY_LEN(names); i++) {
        cmd.command_case = names[i].c;
        const char *got = envelope_command_name(&cmd);
        assert_non_null(got);
        assert_string_equal(got, names[i].name);
    }
    cmd.command_case = (Linli__Command__CommandCase)50;  /* no such member */
    assert_null(envelope_command_name(&cmd));
}

static void test_event_names(void **state)
{
    (void)state;
    static const struct {
        Linli__Event__EventCase c;
        const char *name;
    } names[] = {
        {LINLI__EVENT__EVENT_COMMUNITY_CREATED, "community_created"},
        {LINLI__EVENT__EVENT_PERSON_REGISTERED, "person_registered"},
        {LINLI__EVENT__EVENT_ACTIVITY_CREATED, "activity_created"},
        {LINLI__EVENT__EVENT_SIGNED_UP, "signed_up"},
        {LINLI__EVENT__EVENT_SIGN_UP_CANCELLED, "sign_up_cancelled"},
        {LINLI__EVENT__EVENT_OFFER_MADE, "offer_made"},
        {LINLI__EVENT__EVENT_OFFER_CLOSED, "offer_closed"},
        {LINLI__EVENT__EVENT_CHECKED_IN, "checked_in"},
        {LINLI__EVENT__EVENT_CHECKED_OUT, "checked_out"},
        {LINLI__EVENT__EVENT_SCAN_REFUSED, "scan_refused"},
        {LINLI__EVENT__EVENT_STAMP_COLLECTED, "stamp_collected"},
        {LINLI__EVENT__EVENT_ROUTE_REDEEMED, "route_redeemed"},
    };
    Linli__Event ev = LINLI__EVENT__INIT;
    assert_null(envelope_event_name(&ev));
    for (size_t i = 0; i < LX_ARRAY_LEN(names); i++) {
        ev.event_case = names[i].c;
        const char *got = envelope_event_name(&ev);
        assert_non_null(got);
        assert_string_equal(got, names[i].name);
    }
    ev.event_case = (Linli__Event__EventCase)99;
    assert_null(envelope_event_name(&ev));
}

/* ---- builders ---- */

static void test_reply_new(void **state)
{
    (void)state;
    Linli__Envelope req;
    s_header(&req);
    Linli__Command cmd = LINLI__COMMAND__INIT;
    Linli__Sweep sw = LINLI__SWEEP__INIT;
    cmd.command_case = LINLI__COMMAND__COMMAND_SWEEP;
    cmd.sweep = &sw;
    req.payload_case = LINLI__ENVELOPE__PAYLOAD_COMMAND;
    req.command = &cmd;

    Linli__Reply *r = xmalloc(sizeof *r);
    linli__reply__init(r);
    r->ok = 1;
    r->result_case = LINLI__REPLY__RESULT_SWEEP;
    r->sweep = xmalloc(sizeof *r->sweep);
    linli__sweep_result__init(r->sweep);

    int64_t before = now_ms();
    Linli__Envelope *e = envelope_reply_new(&req, "registry", r);
    int64_t after = now_ms();
    assert_non_null(e);
    assert_true(uuid_valid(e->id));
    assert_string_not_equal(e->id, S_UUID);
    assert_string_equal(e->idempotency_key, "key-1");
    assert_ptr_not_equal(e->idempotency_key, req.idempotency_key);
    assert_string_equal(e->trace_id, "trace-9");
    assert_ptr_not_equal(e->trace_id, req.trace_id);
    assert_string_equal(e->source, "registry");
    assert_string_equal(e->type, "reply");
    assert_int_equal(e->community_id, 42);
    assert_true(e->occurred_at >= before && e->occurred_at <= after);
    assert_int_equal(e->sequence, 0);
    assert_string_equal(e->stream, "");
    assert_int_equal(e->payload_case, LINLI__ENVELOPE__PAYLOAD_REPLY);
    assert_ptr_equal(e->reply, r);  /* ownership taken, not copied */
    assert_string_equal(r->request_id, S_UUID);

    char why[128];
    assert_int_equal(envelope_validate(e, why, sizeof why), 0);
    Linli__Envelope *d = s_round_trip(e);
    assert_string_equal(d->reply->request_id, S_UUID);
    assert_int_equal(d->reply->result_case, LINLI__REPLY__RESULT_SWEEP);
    assert_string_equal(d->id, e->id);
    envelope_free(&d);

    /* Each reply gets its own id. */
    Linli__Reply *r2 = envelope_error_reply("x", NULL);
    Linli__Envelope *e2 = envelope_reply_new(&req, "registry", r2);
    assert_string_not_equal(e2->id, e->id);
    protobuf_c_message_free_unpacked(&e2->base, NULL);
    protobuf_c_message_free_unpacked(&e->base, NULL);
}

static void test_reply_new_edges(void **state)
{
    (void)state;
    /* No request at all (e.g. a frame too broken to decode). */
    Linli__Reply *r = envelope_error_reply(ENVELOPE_E_MALFORMED, "frame is not a valid Envelope");
    Linli__Envelope *e = envelope_reply_new(NULL, "cmdsrv", r);
    assert_true(uuid_valid(e->id));
    assert_string_equal(e->idempotency_key, "");
    assert_string_equal(e->trace_id, "");
    assert_int_equal(e->community_id, 0);
    assert_string_equal(r->request_id, "");
    char why[128];
    assert_int_equal(envelope_validate(e, why, sizeof why), 0);
    Linli__Envelope *d = s_round_trip(e);
    assert_false(d->reply->ok);
    assert_string_equal(d->reply->error->code, "malformed_frame");
    envelope_free(&d);
    protobuf_c_message_free_unpacked(&e->base, NULL);

    /* A request with empty id, key and trace: nothing copied, and a
     * request_id the reply already had is kept. */
    Linli__Envelope req = LINLI__ENVELOPE__INIT;
    req.community_id = 8;
    r = envelope_error_reply("not_found", "no such activity");
    r->request_id = xstrdup(S_UUID2);
    e = envelope_reply_new(&req, "registry", r);
    assert_string_equal(e->idempotency_key, "");
    assert_string_equal(e->trace_id, "");
    assert_int_equal(e->community_id, 8);
    assert_string_equal(r->request_id, S_UUID2);
    protobuf_c_message_free_unpacked(&e->base, NULL);

    /* A request with an id replaces a heap request_id the reply had (the
     * old one is freed: ASan reports a leak otherwise). */
    req.id = (char *)S_UUID;
    r = envelope_error_reply("not_found", NULL);
    r->request_id = xstrdup(S_UUID2);
    e = envelope_reply_new(&req, "registry", r);
    assert_string_equal(r->request_id, S_UUID);
    protobuf_c_message_free_unpacked(&e->base, NULL);

    /* A decoded request works the same way and may be freed first. */
    Linli__Envelope full;
    s_header(&full);
    Linli__Heartbeat hb = LINLI__HEARTBEAT__INIT;
    full.payload_case = LINLI__ENVELOPE__PAYLOAD_HEARTBEAT;
    full.heartbeat = &hb;
    Linli__Envelope *dreq = s_round_trip(&full);
    e = envelope_reply_new(dreq, "registry", envelope_error_reply("x", "y"));
    envelope_free(&dreq);
    assert_string_equal(e->idempotency_key, "key-1");
    assert_string_equal(e->trace_id, "trace-9");
    assert_string_equal(e->reply->request_id, S_UUID);
    protobuf_c_message_free_unpacked(&e->base, NULL);
}

static void test_error_reply(void **state)
{
    (void)state;
    char code[] = "activity_full";
    char msg[] = "no seats left";
    Linli__Reply *r = envelope_error_reply(code, msg);
    assert_false(r->ok);
    assert_non_null(r->error);
    assert_string_equal(r->error->code, "activity_full");
    assert_string_equal(r->error->message, "no seats left");
    /* copied, not borrowed */
    assert_ptr_not_equal(r->error->code, code);
    assert_ptr_not_equal(r->error->message, msg);
    code[0] = msg[0] = 'X';
    assert_string_equal(r->error->code, "activity_full");
    assert_int_equal(r->result_case, LINLI__REPLY__RESULT__NOT_SET);
    assert_string_equal(r->request_id, "");
    protobuf_c_message_free_unpacked(&r->base, NULL);

    /* Without a message the code stands in for it. */
    r = envelope_error_reply("not_found", NULL);
    assert_string_equal(r->error->code, "not_found");
    assert_string_equal(r->error->message, "not_found");
    protobuf_c_message_free_unpacked(&r->base, NULL);
}

/* A frame refused as invalid_envelope still names its request when its id
 * is a UUID; nothing is read from frames that do not unpack. */
static void test_peek_id(void **state)
{
    (void)state;
    Linli__Envelope e;
    s_header(&e);
    e.source = (char *)"a-source-name-that-is-far-too-long-for-any-envelope-"
                       "0123456789abcdef";
    Linli__Heartbeat hb = LINLI__HEARTBEAT__INIT;
    e.payload_case = LINLI__ENVELOPE__PAYLOAD_HEARTBEAT;
    e.heartbeat = &hb;
    size_t len;
    uint8_t *buf = envelope_encode(&e, &len);
    const char *code;
    char why[128], id[37] = "";
    assert_null(envelope_decode(buf, len, &code, why, sizeof why));
    assert_string_equal(code, ENVELOPE_E_INVALID);
    assert_int_equal(envelope_peek_id(buf, len, id), 1);
    assert_string_equal(id, S_UUID);
    free(buf);

    e.id = (char *)"not-a-uuid";
    buf = envelope_encode(&e, &len);
    assert_int_equal(envelope_peek_id(buf, len, id), 0);
    free(buf);
    e.id = NULL;
    buf = envelope_encode(&e, &len);
    assert_int_equal(envelope_peek_id(buf, len, id), 0);
    free(buf);

    assert_int_equal(envelope_peek_id("\xff\xff\xff", 3, id), 0);
    assert_int_equal(envelope_peek_id("", ENVELOPE_MAX_BYTES + 1, id), 0);
}

static void test_free_accepts_null(void **state)
{
    (void)state;
    envelope_free(NULL);
    Linli__Envelope *e = NULL;
    envelope_free(&e);
    assert_null(e);
    e = s_accepted("\x9a\x01\x00", 3);
    envelope_free(&e);
    assert_null(e);
    envelope_free(&e);  /* twice is harmless */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_round_trip_command),
        cmocka_unit_test(test_round_trip_reply),
        cmocka_unit_test(test_round_trip_event),
        cmocka_unit_test(test_round_trip_heartbeat),
        cmocka_unit_test(test_round_trip_replay_result),
        cmocka_unit_test(test_encode_empty),
        cmocka_unit_test(test_size_cap),
        cmocka_unit_test(test_malformed_bytes),
        cmocka_unit_test(test_every_truncation),
        cmocka_unit_test(test_nesting_depth),
        cmocka_unit_test(test_nesting_in_data_is_not_depth),
        cmocka_unit_test(test_validate_limits),
        cmocka_unit_test(test_validate_payload),
        cmocka_unit_test(test_decode_wire_shapes),
        cmocka_unit_test(test_command_names),
        cmocka_unit_test(test_event_names),
        cmocka_unit_test(test_reply_new),
        cmocka_unit_test(test_reply_new_edges),
        cmocka_unit_test(test_error_reply),
        cmocka_unit_test(test_peek_id),
        cmocka_unit_test(test_free_accepts_null),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
