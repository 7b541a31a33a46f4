/* Unit tests for pbjson: round trips of real Linli messages (JSON -> message
 * -> wire -> message -> JSON), every error the contract names with its exact
 * message, the limits at and just past their boundary, and the types proto/
 * does not use yet (bytes, float, double, sint/fixed, proto2 optional, scalar
 * oneof members) through a small hand-written descriptor, t_all. */
#include "pbjson.h"

#include "envelope.h"
#include "envelope.pb-c.h"
#include "registry.pb-c.h"

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <setjmp.h>
#include <cmocka.h>

/* ---- t_all: one field of each kind proto/ lacks. Field names are in
 * alphabetical order, so fields_sorted_by_name is the identity. ---- */

typedef struct {
    ProtobufCMessage base;
    double a_double;
    float b_float;
    int32_t c_sint32;
    uint32_t d_fixed32;
    int64_t e_sfixed64;
    uint64_t f_fixed64;
    protobuf_c_boolean g_bool;
    ProtobufCBinaryData h_bytes;
    size_t n_i_blobs;
    ProtobufCBinaryData *i_blobs;
    size_t n_j_words;
    char **j_words;
    size_t n_k_reals;
    double *k_reals;
    uint32_t choice_case;   /* oneof choice { l_name, m_raw, n_num } */
    union {
        char *l_name;
        ProtobufCBinaryData m_raw;
        int32_t n_num;
    } choice;
    protobuf_c_boolean has_o_opt;  /* proto2 optional int32 o_opt */
    int32_t o_opt;
    int32_t p_int32;
} t_all_t;

static const ProtobufCMessageDescriptor t_all_descriptor;

static void s_all_init(ProtobufCMessage *m)
{
    memset(m, 0, sizeof(t_all_t));
    m->descriptor = &t_all_descriptor;
}

#define T_FIELD(name, id, label, type, q, member, flags) \
    {name, id, PROTOBUF_C_LABEL_##label, PROTOBUF_C_TYPE_##type, q, offsetof(t_all_t, member), \
     NULL, NULL, flags, 0, NULL, NULL}
#define T_CHOICE offsetof(t_all_t, choice_case)

static const ProtobufCFieldDescriptor t_all_fields[] = {
    T_FIELD("a_double", 1, NONE, DOUBLE, 0, a_double, 0),
    T_FIELD("b_float", 2, NONE, FLOAT, 0, b_float, 0),
    T_FIELD("c_sint32", 3, NONE, SINT32, 0, c_sint32, 0),
    T_FIELD("d_fixed32", 4, NONE, FIXED32, 0, d_fixed32, 0),
    T_FIELD("e_sfixed64", 5, NONE, SFIXED64, 0, e_sfixed64, 0),
    T_FIELD("f_fixed64", 6, NONE, FIXED64, 0, f_fixed64, 0),
    T_FIELD("g_bool", 7, NONE, BOOL, 0, g_bool, 0),
    T_FIELD("h_bytes", 8, NONE, BYTES, 0, h_bytes, 0),
    T_FIELD("i_blobs", 9, REPEATED, BYTES, offsetof(t_all_t, n_i_blobs), i_blobs, 0),
    T_FIELD("j_words", 10, REPEATED, STRING, offsetof(t_all_t, n_j_words), j_words, 0),
    T_FIELD("k_reals", 11, REPEATED, DOUBLE, offsetof(t_all_t, n_k_reals), k_reals,
            PROTOBUF_C_FIELD_FLAG_PACKED),
    T_FIELD("l_name", 12, NONE, STRING, T_CHOICE, choice.l_name, PROTOBUF_C_FIELD_FLAG_ONEOF),
    T_FIELD("m_raw", 13, NONE, BYTES, T_CHOICE, choice.m_raw, PROTOBUF_C_FIELD_FLAG_ONEOF),
    T_FIELD("n_num", 14, NONE, INT32, T_CHOICE, choice.n_num, PROTOBUF_C_FIELD_FLAG_ONEOF),
    T_FIELD("o_opt", 15, OPTIONAL, INT32, offsetof(t_all_t, has_o_opt), o_opt, 0),
    T_FIELD("p_int32", 16, NONE, INT32, 0, p_int32, 0),
};
static const unsigned t_all_by_name[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
static const ProtobufCIntRange t_all_ranges[] = {{1, 0}, {0, 16}};

static const ProtobufCMessageDescriptor t_all_descriptor = {
    PROTOBUF_C__MESSAGE_DESCRIPTOR_MAGIC, "test.All", "All", "TAll", "test", sizeof(t_all_t),
    16, t_all_fields, t_all_by_name, 1, t_all_ranges, s_all_init, NULL, NULL, NULL};

/* ---- helpers ---- */

static ProtobufCMessage *s_parse_ok(const ProtobufCMessageDescriptor *d, const char *text)
{
    char err[256] = "unset";
    ProtobufCMessage *m = pbjson_parse(d, text, strlen(text), err, sizeof err);
    if (!m)
        fail_msg("rejected %s: %s", text, err);
    assert_string_equal(err, "");
    return m;
}

static void s_expect_err(const ProtobufCMessageDescriptor *d, const char *text, const char *want)
{
    char err[256];
    ProtobufCMessage *m = pbjson_parse(d, text, strlen(text), err, sizeof err);
    if (m) {
        protobuf_c_message_free_unpacked(m, NULL);
        fail_msg("accepted %s", text);
    }
    assert_string_equal(err, want);
}

/* The error for text starts with want (for jansson's own wording). */
#define S_EXPECT_ERR_PREFIX(d, lit, want) s_expect_err_prefix(d, lit, sizeof(lit) - 1, want)
static void s_expect_err_prefix(const ProtobufCMessageDescriptor *d, const char *text,
                                size_t len, const char *want)
{
    char err[256];
    ProtobufCMessage *m = pbjson_parse(d, text, len, err, sizeof err);
    if (m) {
        protobuf_c_message_free_unpacked(m, NULL);
        fail_msg("accepted %s", text);
    }
    if (strncmp(err, want, strlen(want)) != 0)
        fail_msg("error \"%s\" does not start with \"%s\"", err, want);
}

/* m writes JSON equal to the JSON text want. */
static void s_expect_json(const ProtobufCMessage *m, const char *want)
{
    json_t *got = pbjson_from_message(m);
    json_t *exp = json_loads(want, 0, NULL);
    assert_non_null(got);
    assert_non_null(exp);
    if (!json_equal(got, exp))
        fail_msg("got %s want %s", json_dumps(got, JSON_COMPACT), want);
    json_decref(got);
    json_decref(exp);
}

/* Packs m and unpacks it again; the caller frees the copy. */
static ProtobufCMessage *s_wire_copy(const ProtobufCMessage *m)
{
    size_t n = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = malloc(n + 1);
    assert_non_null(buf);
    assert_int_equal(protobuf_c_message_pack(m, buf), n);
    ProtobufCMessage *u = protobuf_c_message_unpack(m->descriptor, NULL, n, buf);
    free(buf);
    assert_non_null(u);
    return u;
}

/* Parses text, checks it writes back as want (text itself when NULL), and
 * that the same holds after a trip over the wire. Returns the message. */
static ProtobufCMessage *s_round_trip(const ProtobufCMessageDescriptor *d, const char *text,
                                      const char *want)
{
    ProtobufCMessage *m = s_parse_ok(d, text);
    s_expect_json(m, want ? want : text);
    ProtobufCMessage *u = s_wire_copy(m);
    s_expect_json(u, want ? want : text);
    protobuf_c_message_free_unpacked(u, NULL);
    return m;
}

/* A JSON text of n copies of unit between head and tail. */
static char *s_repeat(const char *head, const char *unit, size_t n, const char *tail)
{
    size_t hl = strlen(head), ul = strlen(unit), tl = strlen(tail);
    char *s = malloc(hl + ul * n + tl + 1), *p = s;
    assert_non_null(s);
    memcpy(p, head, hl);
    p += hl;
    for (size_t i = 0; i < n; i++, p += ul)
        memcpy(p, unit, ul);
    memcpy(p, tail, tl + 1);
    return s;
}

/* ---- round trips of real messages ---- */

static void test_sign_up(void **state)
{
    (void)state;
    const char *text = "{\"sign_up\":{\"activity_id\":42,\"person_ids\":[7,8,9000000000],"
                       "\"join_waitlist\":true}}";
    Linli__Command *c = (Linli__Command *)s_round_trip(&linli__command__descriptor, text, NULL);
    assert_int_equal(c->command_case, LINLI__COMMAND__COMMAND_SIGN_UP);
    assert_int_equal(c->sign_up->activity_id, 42);
    assert_int_equal(c->sign_up->n_person_ids, 3);
    assert_int_equal(c->sign_up->person_ids[0], 7);
    assert_int_equal(c->sign_up->person_ids[1], 8);
    assert_int_equal(c->sign_up->person_ids[2], 9000000000LL);
    assert_true(c->sign_up->join_waitlist);
    assert_string_equal(pbjson_oneof_case_name(&c->base, "create_community"), "sign_up");
    protobuf_c_message_free_unpacked(&c->base, NULL);
}

static void test_register_person_roles(void **state)
{
    (void)state;
    Linli__Command *c = (Linli__Command *)s_round_trip(
        &linli__command__descriptor,
        "{\"register_person\":{\"community_id\":3,\"name\":\"张伟\",\"phone\":\"+86 138\","
        "\"roles\":[\"ROLE_RESIDENT\",2,\"ROLE_ORGANISER\"],\"language\":\"zh-CN\"}}",
        "{\"register_person\":{\"community_id\":3,\"name\":\"张伟\",\"phone\":\"+86 138\","
        "\"roles\":[\"ROLE_RESIDENT\",\"ROLE_VOLUNTEER\",\"ROLE_ORGANISER\"],"
        "\"language\":\"zh-CN\"}}");
    Linli__RegisterPerson *rp = c->register_person;
    assert_int_equal(c->command_case, LINLI__COMMAND__COMMAND_REGISTER_PERSON);
    assert_string_equal(rp->name, "张伟");
    assert_string_equal(rp->language, "zh-CN");
    assert_int_equal(rp->n_roles, 3);
    assert_int_equal(rp->roles[0], LINLI__ROLE__ROLE_RESIDENT);
    assert_int_equal(rp->roles[1], LINLI__ROLE__ROLE_VOLUNTEER);
    assert_int_equal(rp->roles[2], LINLI__ROLE__ROLE_ORGANISER);
    protobuf_c_message_free_unpacked(&c->base, NULL);
}

static void test_reply_nested_repeated(void **state)
{
    (void)state;
    Linli__Reply *r = (Linli__Reply *)s_round_trip(
        &linli__reply__descriptor,
        "{\"ok\":true,\"upload_scans\":{\"results\":[{\"accepted\":true,\"checkin_id\":5,"
        "\"stamps\":2,\"stations\":3},{\"reason\":\"expired\"},{}]}}",
        NULL);
    assert_true(r->ok);
    assert_null(r->error);
    assert_int_equal(r->result_case, LINLI__REPLY__RESULT_UPLOAD_SCANS);
    Linli__UploadScansResult *u = r->upload_scans;
    assert_int_equal(u->n_results, 3);
    assert_true(u->results[0]->accepted);
    assert_int_equal(u->results[0]->checkin_id, 5);
    assert_int_equal(u->results[0]->stamps, 2);
    assert_int_equal(u->results[0]->stations, 3);
    assert_string_equal(u->results[0]->reason, "");
    assert_false(u->results[1]->accepted);
    assert_string_equal(u->results[1]->reason, "expired");
    assert_non_null(u->results[2]);
    assert_int_equal(u->results[2]->checkin_id, 0);
    assert_string_equal(pbjson_oneof_case_name(&r->base, "create_community"), "upload_scans");
    protobuf_c_message_free_unpacked(&r->base, NULL);

    r = (Linli__Reply *)s_round_trip(
        &linli__reply__descriptor,
        "{\"error\":{\"code\":\"not_found\",\"message\":\"no such activity\"}}", NULL);
    assert_false(r->ok);
    assert_string_equal(r->error->code, "not_found");
    assert_string_equal(r->error->message, "no such activity");
    assert_int_equal(r->result_case, LINLI__REPLY__RESULT__NOT_SET);
    assert_null(pbjson_oneof_case_name(&r->base, "create_community"));
    protobuf_c_message_free_unpacked(&r->base, NULL);
}

static void test_envelope_with_command(void **state)
{
    (void)state;
    Linli__Envelope *e = (Linli__Envelope *)s_round_trip(
        &linli__envelope__descriptor,
        "{\"id\":\"6f1c2a9e-8d1b-4c3a-9f00-0123456789ab\",\"idempotency_key\":\"k1\","
        "\"source\":\"linlictl\",\"type\":\"registry.create_route\","
        "\"occurred_at\":1767225600000,\"community_id\":12,\"trace_id\":\"t-1\","
        "\"sequence\":1,\"epoch\":2,\"stream\":\"registry\","
        "\"command\":{\"create_route\":{\"community_id\":12,\"name\":\"Old town\","
        "\"reward\":\"tea\",\"stations\":[\"Gate\",\"Well\",\"Temple\"]}}}",
        NULL);
    assert_string_equal(e->id, "6f1c2a9e-8d1b-4c3a-9f00-0123456789ab");
    assert_string_equal(e->type, "registry.create_route");
    assert_int_equal(e->occurred_at, 1767225600000LL);
    assert_int_equal(e->sequence, 1);
    assert_int_equal(e->epoch, 2);
    assert_int_equal(e->payload_case, LINLI__ENVELOPE__PAYLOAD_COMMAND);
    assert_int_equal(e->command->command_case, LINLI__COMMAND__COMMAND_CREATE_ROUTE);
    Linli__CreateRoute *cr = e->command->create_route;
    assert_int_equal(cr->n_stations, 3);
    assert_string_equal(cr->stations[0], "Gate");
    assert_string_equal(cr->stations[2], "Temple");
    assert_string_equal(cr->reward, "tea");
    protobuf_c_message_free_unpacked(&e->base, NULL);
}

static void test_envelope_replay_of_events(void **state)
{
    (void)state;
    Linli__Envelope *e = (Linli__Envelope *)s_round_trip(
        &linli__envelope__descriptor,
        "{\"type\":\"reply\",\"reply\":{\"ok\":true,\"replay\":{\"epoch\":3,"
        "\"last_sequence\":9,\"events\":[{\"sequence\":8,\"event\":{\"signed_up\":"
        "{\"signup_id\":1,\"activity_id\":2,\"person_id\":3,\"community_id\":4,"
        "\"status\":\"confirmed\"}}},{\"sequence\":9,\"event\":{\"checked_out\":"
        "{\"checkin_id\":5,\"automatic\":true}}}],\"more\":true}}}",
        NULL);
    assert_int_equal(e->payload_case, LINLI__ENVELOPE__PAYLOAD_REPLY);
    assert_int_equal(e->reply->result_case, LINLI__REPLY__RESULT_REPLAY);
    Linli__ReplayResult *rr = e->reply->replay;
    assert_int_equal(rr->n_events, 2);
    assert_true(rr->more);
    assert_int_equal(rr->events[0]->event->event_case, LINLI__EVENT__EVENT_SIGNED_UP);
    assert_string_equal(rr->events[0]->event->signed_up->status, "confirmed");
    assert_int_equal(rr->events[1]->sequence, 9);
    assert_int_equal(rr->events[1]->event->event_case, LINLI__EVENT__EVENT_CHECKED_OUT);
    assert_true(rr->events[1]->event->checked_out->automatic);
    protobuf_c_message_free_unpacked(&e->base, NULL);
}

/* ---- what is written ---- */

static void test_defaults_omitted(void **state)
{
    (void)state;
    Linli__Envelope e = LINLI__ENVELOPE__INIT;
    s_expect_json(&e.base, "{}");
    e.type = (char *)"heartbeat";
    s_expect_json(&e.base, "{\"type\":\"heartbeat\"}");

    /* an empty message that is set is written, as oneof presence matters */
    Linli__Command c = LINLI__COMMAND__INIT;
    Linli__Sweep sweep = LINLI__SWEEP__INIT;
    c.command_case = LINLI__COMMAND__COMMAND_SWEEP;
    c.sweep = &sweep;
    s_expect_json(&c.base, "{\"sweep\":{}}");

    Linli__Reply r = LINLI__REPLY__INIT;
    Linli__Error error = LINLI__ERROR__INIT;
    s_expect_json(&r.base, "{}");
    r.error = &error;
    s_expect_json(&r.base, "{\"error\":{}}");

    /* zeros, "", false and [] given explicitly are not written back */
    Linli__Command *p = (Linli__Command *)s_parse_ok(
        &linli__command__descriptor,
        "{\"sign_up\":{\"activity_id\":0,\"person_ids\":[],\"join_waitlist\":false}}");
    assert_int_equal(p->sign_up->n_person_ids, 0);
    assert_null(p->sign_up->person_ids);
    s_expect_json(&p->base, "{\"sign_up\":{}}");
    protobuf_c_message_free_unpacked(&p->base, NULL);

    Linli__Envelope *pe = (Linli__Envelope *)s_parse_ok(
        &linli__envelope__descriptor, "{\"id\":\"\",\"sequence\":0,\"heartbeat\":{}}");
    s_expect_json(&pe->base, "{\"heartbeat\":{}}");
    protobuf_c_message_free_unpacked(&pe->base, NULL);

    /* a scalar oneof member at zero is still set */
    t_all_t *a = (t_all_t *)s_parse_ok(&t_all_descriptor, "{\"n_num\":0,\"o_opt\":0}");
    assert_int_equal(a->choice_case, 14);
    assert_true(a->has_o_opt);
    s_expect_json(&a->base, "{\"n_num\":0,\"o_opt\":0}");
    protobuf_c_message_free_unpacked(&a->base, NULL);
}

static void test_uint64_as_string(void **state)
{
    (void)state;
    Linli__Heartbeat h = LINLI__HEARTBEAT__INIT;
    h.stream = (char *)"registry";
    h.epoch = INT64_MAX;
    h.last_sequence = UINT64_MAX;
    const char *text = "{\"stream\":\"registry\",\"epoch\":9223372036854775807,"
                       "\"last_sequence\":\"18446744073709551615\"}";
    s_expect_json(&h.base, text);

    Linli__Heartbeat *p = (Linli__Heartbeat *)s_round_trip(&linli__heartbeat__descriptor,
                                                           text, NULL);
    assert_true(p->epoch == (uint64_t)INT64_MAX);
    assert_true(p->last_sequence == UINT64_MAX);
    protobuf_c_message_free_unpacked(&p->base, NULL);

    p = (Linli__Heartbeat *)s_parse_ok(
        &linli__heartbeat__descriptor,
        "{\"epoch\":\"42\",\"last_sequence\":\"9223372036854775808\"}");
    assert_int_equal(p->epoch, 42);
    assert_true(p->last_sequence == (uint64_t)INT64_MAX + 1);
    s_expect_json(&p->base, "{\"epoch\":42,\"last_sequence\":\"9223372036854775808\"}");
    protobuf_c_message_free_unpacked(&p->base, NULL);

    const ProtobufCMessageDescriptor *d = &linli__heartbeat__descriptor;
    s_expect_err(d, "{\"epoch\":\"18446744073709551616\"}",
                 "epoch: 18446744073709551616 out of range for uint64");
    s_expect_err(d, "{\"epoch\":-1}", "epoch: -1 out of range for uint64");
    s_expect_err(d, "{\"epoch\":\"-1\"}", "epoch: expected integer");
    s_expect_err(d, "{\"epoch\":\"1e3\"}", "epoch: expected integer");
    s_expect_err(d, "{\"epoch\":\"\"}", "epoch: expected integer");
    s_expect_err(d, "{\"epoch\":\" 1\"}", "epoch: expected integer");
    s_expect_err(d, "{\"epoch\":1.0}", "epoch: expected integer");
    /* a JSON number this large is refused by jansson itself */
    S_EXPECT_ERR_PREFIX(d, "{\"epoch\":18446744073709551615}", "line 1 column ");
}

static void test_all_types(void **state)
{
    (void)state;
    t_all_t *a = (t_all_t *)s_round_trip(
        &t_all_descriptor,
        "{\"a_double\":1.5,\"b_float\":-0.25,\"c_sint32\":-2147483648,"
        "\"d_fixed32\":4294967295,\"e_sfixed64\":-9223372036854775808,"
        "\"f_fixed64\":\"18446744073709551615\",\"g_bool\":true,\"h_bytes\":\"AAEC/w==\","
        "\"i_blobs\":[\"\",\"Zg\",\"Zm8=\",\"Zm9v\"],\"j_words\":[\"a\",\"\",\"c\"],"
        "\"k_reals\":[1,\"Infinity\",\"-Infinity\",\"NaN\",-2.5e-3],"
        "\"l_name\":\"x\",\"o_opt\":-7,\"p_int32\":2147483647}",
        "{\"a_double\":1.5,\"b_float\":-0.25,\"c_sint32\":-2147483648,"
        "\"d_fixed32\":4294967295,\"e_sfixed64\":-9223372036854775808,"
        "\"f_fixed64\":\"18446744073709551615\",\"g_bool\":true,\"h_bytes\":\"AAEC/w==\","
        "\"i_blobs\":[\"\",\"Zg==\",\"Zm8=\",\"Zm9v\"],\"j_words\":[\"a\",\"\",\"c\"],"
        "\"k_reals\":[1.0,\"Infinity\",\"-Infinity\",\"NaN\",-2.5e-3],"
        "\"l_name\":\"x\",\"o_opt\":-7,\"p_int32\":2147483647}");
    assert_true(a->a_double == 1.5);
    assert_true(a->b_float == -0.25f);
    assert_int_equal(a->c_sint32, INT32_MIN);
    assert_true(a->d_fixed32 == UINT32_MAX);
    assert_true(a->e_sfixed64 == INT64_MIN);
    assert_true(a->f_fixed64 == UINT64_MAX);
    assert_true(a->g_bool);
    assert_int_equal(a->h_bytes.len, 4);
    assert_memory_equal(a->h_bytes.data, "\x00\x01\x02\xff", 4);
    assert_int_equal(a->n_i_blobs, 4);
    assert_int_equal(a->i_blobs[0].len, 0);
    assert_null(a->i_blobs[0].data);
    assert_int_equal(a->i_blobs[1].len, 1);
    assert_memory_equal(a->i_blobs[1].data, "f", 1);
    assert_int_equal(a->i_blobs[2].len, 2);
    assert_memory_equal(a->i_blobs[2].data, "fo", 2);
    assert_int_equal(a->i_blobs[3].len, 3);
    assert_memory_equal(a->i_blobs[3].data, "foo", 3);
    assert_int_equal(a->n_j_words, 3);
    assert_string_equal(a->j_words[1], "");
    assert_string_equal(a->j_words[2], "c");
    assert_int_equal(a->n_k_reals, 5);
    assert_true(a->k_reals[0] == 1.0);
    assert_true(isinf(a->k_reals[1]) && a->k_reals[1] > 0);
    assert_true(isinf(a->k_reals[2]) && a->k_reals[2] < 0);
    assert_true(isnan(a->k_reals[3]));
    assert_true(a->k_reals[4] == -2.5e-3);
    assert_int_equal(a->choice_case, 12);
    assert_string_equal(a->choice.l_name, "x");
    assert_true(a->has_o_opt);
    assert_int_equal(a->o_opt, -7);
    assert_int_equal(a->p_int32, INT32_MAX);
    assert_string_equal(pbjson_oneof_case_name(&a->base, "m_raw"), "l_name");
    protobuf_c_message_free_unpacked(&a->base, NULL);

    /* bytes: URL-safe and unpadded input, standard padded output */
    a = (t_all_t *)s_parse_ok(&t_all_descriptor, "{\"h_bytes\":\"-_8\",\"m_raw\":\"Zm9vYg\"}");
    assert_int_equal(a->h_bytes.len, 2);
    assert_memory_equal(a->h_bytes.data, "\xfb\xff", 2);
    assert_int_equal(a->choice_case, 13);
    assert_int_equal(a->choice.m_raw.len, 4);
    assert_memory_equal(a->choice.m_raw.data, "foob", 4);
    s_expect_json(&a->base, "{\"h_bytes\":\"+/8=\",\"m_raw\":\"Zm9vYg==\"}");
    protobuf_c_message_free_unpacked(&a->base, NULL);
}

static void test_output_of_bad_peer_data(void **state)
{
    (void)state;
    /* strings from the wire need not be UTF-8; JSON must stay valid */
    Linli__Envelope e = LINLI__ENVELOPE__INIT;
    e.type = (char *)"a\xff" "b\xc0\x80" "c\xf0\x9f\x98\x80" "d\xe4\xb8";
    s_expect_json(&e.base, "{\"type\":\"a\\ufffdb\\ufffd\\ufffdc\xf0\x9f\x98\x80"
                           "d\\ufffd\\ufffd\"}");

    /* proto3 enums are open: an unknown number is written as a number, and
     * (the contract accepts only defined values) refused on the way back */
    Linli__RegisterPerson rp = LINLI__REGISTER_PERSON__INIT;
    Linli__Role roles[] = {LINLI__ROLE__ROLE_VOLUNTEER, (Linli__Role)7};
    rp.n_roles = 2;
    rp.roles = roles;
    s_expect_json(&rp.base, "{\"roles\":[\"ROLE_VOLUNTEER\",7]}");
    s_expect_err(&linli__register_person__descriptor, "{\"roles\":[\"ROLE_VOLUNTEER\",7]}",
                 "roles[1]: 7 is not a value of linli.Role");

    /* non-finite floats as proto3 writes them */
    t_all_t a;
    s_all_init(&a.base);
    a.b_float = -INFINITY;
    a.a_double = NAN;
    s_expect_json(&a.base, "{\"a_double\":\"NaN\",\"b_float\":\"-Infinity\"}");
}

/* ---- errors ---- */

static void test_errors_fields(void **state)
{
    (void)state;
    const ProtobufCMessageDescriptor *cmd = &linli__command__descriptor;
    s_expect_err(cmd, "{\"nope\":1}", "nope: unknown field");
    s_expect_err(cmd, "{\"sign_up\":{\"activity\":1}}", "sign_up.activity: unknown field");
    s_expect_err(cmd, "{\"sign_up\":{\"activity_id\":\"1\"}}",
                 "sign_up.activity_id: expected integer");
    s_expect_err(cmd, "{\"sign_up\":{\"activity_id\":1.5}}",
                 "sign_up.activity_id: expected integer");
    s_expect_err(cmd, "{\"sign_up\":{\"person_ids\":[1,2,\"x\"]}}",
                 "sign_up.person_ids[2]: expected integer");
    s_expect_err(cmd, "{\"sign_up\":{\"person_ids\":5}}", "sign_up.person_ids: expected array");
    s_expect_err(cmd, "{\"sign_up\":{\"join_waitlist\":1}}",
                 "sign_up.join_waitlist: expected true or false");
    s_expect_err(cmd, "{\"sign_up\":null}", "sign_up: expected object");
    s_expect_err(cmd, "{\"sign_up\":5}", "sign_up: expected object");
    s_expect_err(cmd, "{\"create_community\":{\"name\":5}}",
                 "create_community.name: expected string");
    s_expect_err(cmd, "{\"create_activity\":{\"capacity\":4294967296}}",
                 "create_activity.capacity: 4294967296 out of range for uint32");
    s_expect_err(cmd, "{\"create_activity\":{\"capacity\":-1}}",
                 "create_activity.capacity: -1 out of range for uint32");
    s_expect_err(cmd, "{\"register_person\":{\"roles\":[\"ROLE_RESIDENT\",\"ROLE_BOSS\"]}}",
                 "register_person.roles[1]: \"ROLE_BOSS\" is not a value of linli.Role");
    s_expect_err(cmd, "{\"register_person\":{\"roles\":[9]}}",
                 "register_person.roles[0]: 9 is not a value of linli.Role");
    s_expect_err(cmd, "{\"register_person\":{\"roles\":[4294967298]}}",
                 "register_person.roles[0]: 4294967298 is not a value of linli.Role");
    s_expect_err(cmd, "{\"register_person\":{\"roles\":[true]}}",
                 "register_person.roles[0]: expected enum name or number");
    s_expect_err(cmd, "{\"sign_up\":{},\"sweep\":{}}",
                 "sweep: only one member of a oneof may be set, sign_up already is");
    s_expect_err(&linli__reply__descriptor,
                 "{\"ok\":true,\"scan\":{},\"error\":{},\"sign_up\":{}}",
                 "sign_up: only one member of a oneof may be set, scan already is");
    s_expect_err(&linli__envelope__descriptor,
                 "{\"reply\":{\"upload_scans\":{\"results\":[{},{\"stamps\":-1}]}}}",
                 "reply.upload_scans.results[1].stamps: -1 out of range for uint32");

    const ProtobufCMessageDescriptor *all = &t_all_descriptor;
    s_expect_err(all, "{\"c_sint32\":2147483648}", "c_sint32: 2147483648 out of range for sint32");
    s_expect_err(all, "{\"p_int32\":-2147483649}", "p_int32: -2147483649 out of range for int32");
    s_expect_err(all, "{\"d_fixed32\":-1}", "d_fixed32: -1 out of range for fixed32");
    s_expect_err(all, "{\"f_fixed64\":-1}", "f_fixed64: -1 out of range for fixed64");
    s_expect_err(all, "{\"b_float\":1e39}", "b_float: 1e+39 out of range for float");
    s_expect_err(all, "{\"a_double\":\"1.5\"}", "a_double: expected number");
    s_expect_err(all, "{\"a_double\":\"nan\"}", "a_double: expected number");
    s_expect_err(all, "{\"g_bool\":\"true\"}", "g_bool: expected true or false");
    s_expect_err(all, "{\"h_bytes\":5}", "h_bytes: expected base64 string");
    s_expect_err(all, "{\"j_words\":[\"a\",1]}", "j_words[1]: expected string");
    s_expect_err(all, "{\"l_name\":\"x\",\"n_num\":1}",
                 "n_num: only one member of a oneof may be set, l_name already is");
    static const char *const bad_b64[] = {"Z", "Zg=", "Zg=a", "Zm9v=", "Zg===", "====",
                                          "!!!!", "Zm 9v", "Zm9v\\n"};
    for (size_t i = 0; i < sizeof bad_b64 / sizeof bad_b64[0]; i++) {
        char text[64];
        snprintf(text, sizeof text, "{\"i_blobs\":[\"Zg\",\"%s\"]}", bad_b64[i]);
        s_expect_err(all, text, "i_blobs[1]: invalid base64");
    }
}

static void test_errors_document(void **state)
{
    (void)state;
    const ProtobufCMessageDescriptor *env = &linli__envelope__descriptor;
    char err[64];

    s_expect_err(env, "[1]", "expected object");
    S_EXPECT_ERR_PREFIX(env, "\"x\"", "line 1 column ");  /* jansson wants [ or { */
    S_EXPECT_ERR_PREFIX(env, "{\"type\":", "line 1 column 8: ");
    S_EXPECT_ERR_PREFIX(env, "{\"type\":\"a\",\n\"type\":\"b\"}", "line 2 column ");
    S_EXPECT_ERR_PREFIX(env, "{\"type\":\"\xff\"}", "line 1 column ");
    S_EXPECT_ERR_PREFIX(env, "{\"type\":\"\xc0\x80\"}", "line 1 column ");
    S_EXPECT_ERR_PREFIX(env, "{\"type\":\"a\\u0000b\"}", "line 1 column ");
    S_EXPECT_ERR_PREFIX(env, "", "line ");
    /* len bounds the text: the rest is not read */
    Linli__Envelope *e = (Linli__Envelope *)pbjson_parse(env, "{\"type\":\"t\"}garbage", 12,
                                                         err, sizeof err);
    assert_non_null(e);
    assert_string_equal(e->type, "t");
    protobuf_c_message_free_unpacked(&e->base, NULL);

    /* pbjson_to_message on values jansson's parser would not produce */
    json_t *j = json_integer(1);
    assert_null(pbjson_to_message(env, j, err, sizeof err));
    assert_string_equal(err, "expected object");
    json_decref(j);
    assert_null(pbjson_to_message(env, NULL, err, sizeof err));
    assert_string_equal(err, "expected object");
    j = json_pack("{s:{s:o}}", "create_community", "name", json_stringn("a\0b", 3));
    assert_null(pbjson_to_message(&linli__command__descriptor, j, err, sizeof err));
    assert_string_equal(err, "create_community.name: string contains NUL");
    json_decref(j);
    j = json_object();
    json_object_setn_new(j, "type\0x", 6, json_string("t"));
    assert_null(pbjson_to_message(env, j, err, sizeof err));
    assert_string_equal(err, "type: unknown field");
    json_decref(j);

    /* the error buffer: truncated but terminated, or absent */
    const char *text = "{\"sign_up\":{\"activity_id\":\"1\"}}";
    assert_null(pbjson_parse(&linli__command__descriptor, text, strlen(text), err, 8));
    assert_string_equal(err, "sign_up");
    err[0] = 'x';
    assert_null(pbjson_parse(&linli__command__descriptor, text, strlen(text), err, 0));
    assert_int_equal(err[0], 'x');
    assert_null(pbjson_parse(&linli__command__descriptor, text, strlen(text), NULL, 0));
    assert_null(pbjson_parse(&linli__command__descriptor, "{", 1, NULL, 0));
}

static void test_limits(void **state)
{
    (void)state;
    char *s;
    Linli__Command *c;
    const ProtobufCMessageDescriptor *cmd = &linli__command__descriptor;

    /* depth: Envelope > Reply > ReplayResult > Envelope ... the 16th is fine */
    s = s_repeat("", "{\"reply\":{\"replay\":{\"events\":[", 5, "{}");
    char *t = s_repeat(s, "]}}}", 5, "");
    Linli__Envelope *e = (Linli__Envelope *)s_parse_ok(&linli__envelope__descriptor, t);
    assert_non_null(e->reply->replay->events[0]->reply->replay->events[0]);
    protobuf_c_message_free_unpacked(&e->base, NULL);
    free(s);
    free(t);
    s = s_repeat("", "{\"reply\":{\"replay\":{\"events\":[", 5, "{\"reply\":{}}");
    t = s_repeat(s, "]}}}", 5, "");
    s_expect_err(&linli__envelope__descriptor, t,
                 "reply.replay.events[0].reply.replay.events[0].reply.replay.events[0]."
                 "reply.replay.events[0].reply.replay.events[0].reply: "
                 "messages nested deeper than 16");
    free(s);
    free(t);

    /* string length */
    s = s_repeat("{\"create_community\":{\"name\":\"", "x", PBJSON_MAX_STRING, "\"}}");
    c = (Linli__Command *)s_parse_ok(cmd, s);
    assert_int_equal(strlen(c->create_community->name), PBJSON_MAX_STRING);
    protobuf_c_message_free_unpacked(&c->base, NULL);
    free(s);
    s = s_repeat("{\"create_community\":{\"name\":\"", "x", PBJSON_MAX_STRING + 1, "\"}}");
    s_expect_err(cmd, s, "create_community.name: string longer than 65536 bytes");
    free(s);

    /* bytes length, decoded: 65536 = 3 * 21845 + 1 */
    s = s_repeat("{\"h_bytes\":\"", "AAAA", 21845, "AA==\"}");
    t_all_t *a = (t_all_t *)s_parse_ok(&t_all_descriptor, s);
    assert_int_equal(a->h_bytes.len, PBJSON_MAX_STRING);
    protobuf_c_message_free_unpacked(&a->base, NULL);
    free(s);
    s = s_repeat("{\"h_bytes\":\"", "AAAA", 21845, "AAA=\"}");
    s_expect_err(&t_all_descriptor, s, "h_bytes: bytes longer than 65536");
    free(s);
    s = s_repeat("{\"h_bytes\":\"", "AAAA", 21846, "AA==\"}");
    s_expect_err(&t_all_descriptor, s, "h_bytes: bytes longer than 65536");
    free(s);

    /* repeated length */
    s = s_repeat("{\"sign_up\":{\"person_ids\":[", "1,", PBJSON_MAX_REPEATED - 1, "1]}}");
    c = (Linli__Command *)s_parse_ok(cmd, s);
    assert_int_equal(c->sign_up->n_person_ids, PBJSON_MAX_REPEATED);
    assert_int_equal(c->sign_up->person_ids[PBJSON_MAX_REPEATED - 1], 1);
    protobuf_c_message_free_unpacked(&c->base, NULL);
    free(s);
    s = s_repeat("{\"sign_up\":{\"person_ids\":[", "1,", PBJSON_MAX_REPEATED, "1]}}");
    s_expect_err(cmd, s, "sign_up.person_ids: more than 10000 elements");
    free(s);
}

static void test_field_and_case_name(void **state)
{
    (void)state;
    const ProtobufCFieldDescriptor *f = pbjson_field(&linli__sign_up__descriptor, "person_ids");
    assert_non_null(f);
    assert_int_equal(f->id, 2);
    assert_int_equal(f->label, PROTOBUF_C_LABEL_REPEATED);
    assert_int_equal(pbjson_field(&linli__command__descriptor, "replay")->id, 63);
    assert_null(pbjson_field(&linli__sign_up__descriptor, "nope"));
    assert_null(pbjson_field(&linli__sign_up__descriptor, ""));

    Linli__Command c = LINLI__COMMAND__INIT;
    assert_null(pbjson_oneof_case_name(&c.base, "create_community"));

    Linli__Envelope *e = (Linli__Envelope *)s_parse_ok(
        &linli__envelope__descriptor, "{\"type\":\"heartbeat\",\"heartbeat\":{\"epoch\":1}}");
    assert_string_equal(pbjson_oneof_case_name(&e->base, "command"), "heartbeat");
    assert_string_equal(pbjson_oneof_case_name(&e->base, "event"), "heartbeat");
    assert_null(pbjson_oneof_case_name(&e->base, "type"));      /* not in a oneof */
    assert_null(pbjson_oneof_case_name(&e->base, "nope"));
    protobuf_c_message_free_unpacked(&e->base, NULL);
}

/* pbjson_set_field sets one member as pbjson_to_message would from the
 * object around it: the same message, packed byte for byte, and the same
 * errors with the member's name first in their path. */
static void test_set_field(void **state)
{
    (void)state;
    static const char payload[] = "{\"checkin_id\": 9, \"activity_id\": 4, \"person_id\": 17, "
                                  "\"community_id\": 2, \"at\": 1700000000000, "
                                  "\"device_id\": \"gate-1\"}";
    char err[200];
    json_error_t jerr;
    json_t *p = json_loads(payload, 0, &jerr);
    assert_non_null(p);
    Linli__Event *a = malloc(sizeof *a);
    linli__event__init(a);
    assert_int_equal(pbjson_set_field(&a->base, "checked_in", p, err, sizeof err), 0);
    assert_int_equal(a->event_case, LINLI__EVENT__EVENT_CHECKED_IN);
    assert_int_equal(a->checked_in->person_id, 17);
    assert_string_equal(a->checked_in->device_id, "gate-1");
    json_t *wrap = json_pack("{s:O}", "checked_in", p);
    ProtobufCMessage *b = pbjson_to_message(&linli__event__descriptor, wrap, err, sizeof err);
    assert_non_null(b);
    size_t la = protobuf_c_message_get_packed_size(&a->base);
    size_t lb = protobuf_c_message_get_packed_size(b);
    assert_int_equal(la, lb);
    uint8_t *ba = malloc(la), *bb = malloc(lb);
    protobuf_c_message_pack(&a->base, ba);
    protobuf_c_message_pack(b, bb);
    assert_memory_equal(ba, bb, la);
    free(ba);
    free(bb);
    protobuf_c_message_free_unpacked(b, NULL);
    json_decref(wrap);

    /* a second member of the same oneof */
    assert_int_equal(pbjson_set_field(&a->base, "checked_out", p, err, sizeof err), -1);
    assert_non_null(strstr(err, "checked_out"));
    assert_non_null(strstr(err, "only one member of a oneof"));
    linli__event__free_unpacked(a, NULL);
    json_decref(p);

    Linli__Event *c = malloc(sizeof *c);
    linli__event__init(c);
    json_t *empty = json_object();
    assert_int_equal(pbjson_set_field(&c->base, "nope", empty, err, sizeof err), -1);
    assert_string_equal(err, "nope: unknown field");
    assert_int_equal(pbjson_set_field(&c->base, "checked_in", empty, err, sizeof err), 0);
    assert_int_equal(c->event_case, LINLI__EVENT__EVENT_CHECKED_IN);
    json_decref(empty);
    linli__event__free_unpacked(c, NULL);
    c = malloc(sizeof *c);
    linli__event__init(c);
    /* only oneof members: a plain field may already hold something */
    Linli__Reply *r = envelope_error_reply("full", "Activity is full.");
    json_t *e = json_pack("{s:s}", "code", "x");
    assert_int_equal(pbjson_set_field(&r->base, "error", e, err, sizeof err), -1);
    assert_string_equal(err, "error: not a member of a oneof");
    assert_string_equal(r->error->code, "full");
    json_decref(e);
    linli__reply__free_unpacked(r, NULL);
    json_t *bad = json_pack("{s:s}", "person_id", "x");
    assert_int_equal(pbjson_set_field(&c->base, "checked_in", bad, err, sizeof err), -1);
    assert_string_equal(err, "checked_in.person_id: expected integer");
    json_decref(bad);
    linli__event__free_unpacked(c, NULL);   /* part of a value is safe to free */
}

/* Sets member name of a new message of desc from text by the full path
 * (jansson, then pbjson_set_field) and by pbjson_set_field_flat; returns
 * whether the fast path took it, having checked that when it did both
 * messages pack to the same bytes, and when it did not it left its message
 * untouched. */
static int s_flat_agrees(const ProtobufCMessageDescriptor *desc, const char *name,
                         const char *text)
{
    ProtobufCMessage *fast = malloc(desc->sizeof_message);
    protobuf_c_message_init(desc, fast);
    int took = pbjson_set_field_flat(fast, name, text);
    size_t lf = protobuf_c_message_get_packed_size(fast);
    if (!took) {
        assert_int_equal(lf, 0);
    } else {
        json_error_t jerr;
        char err[200];
        json_t *j = json_loads(text, 0, &jerr);
        assert_non_null(j);
        ProtobufCMessage *full = malloc(desc->sizeof_message);
        protobuf_c_message_init(desc, full);
        assert_int_equal(pbjson_set_field(full, name, j, err, sizeof err), 0);
        size_t ls = protobuf_c_message_get_packed_size(full);
        assert_int_equal(lf, ls);
        uint8_t *bf = malloc(lf + 1), *bs = malloc(ls + 1);
        protobuf_c_message_pack(fast, bf);
        protobuf_c_message_pack(full, bs);
        assert_memory_equal(bf, bs, lf);
        free(bf);
        free(bs);
        protobuf_c_message_free_unpacked(full, NULL);
        json_decref(j);
    }
    protobuf_c_message_free_unpacked(fast, NULL);
    return took;
}

/* The fast path takes the flat objects the relay and the lanes produce and
 * gives everything else to the full path. */
static void test_set_field_flat(void **state)
{
    (void)state;
    const ProtobufCMessageDescriptor *ev = &linli__event__descriptor;
    const ProtobufCMessageDescriptor *re = &linli__reply__descriptor;
    /* taken: as the scan lane and jsonb write them, any spacing, any order */
    assert_true(s_flat_agrees(ev, "checked_in",
        "{\"checkin_id\": 9, \"activity_id\": 4, \"person_id\": 17, \"community_id\": 2, "
        "\"at\": 1700000000000, \"device_id\": \"gate-1\"}"));
    assert_true(s_flat_agrees(ev, "checked_in",
        " {\"device_id\":\"\xe6\xb1\x9f\xe6\xb5\xb7-1\",\"at\":-1,\n\t\"checkin_id\":0} \r\n"));
    assert_true(s_flat_agrees(ev, "checked_in",
        "{\"at\": -9223372036854775808, \"person_id\": 9223372036854775807}"));
    assert_true(s_flat_agrees(re, "scan", "{\"accepted\": true, \"checkin_id\": 123}"));
    assert_true(s_flat_agrees(re, "scan", "{\"accepted\": false, \"reason\": \"not_signed_up\"}"));
    assert_true(s_flat_agrees(re, "scan", "{\"stamps\": 4294967295, \"stations\": 0}"));

    /* left to the full path: not flat, not plain, not JSON, or an error */
    static const char *const left[] = {
        "{}", " { } ", "", "[]", "null", "{\"at\": 1",                  /* empty, not an object */
        "{\"at\": 1}x", "{\"at\": 1,}", "{\"at\" 1}", "{at: 1}",       /* not JSON */
        "{\"device_id\": \"a\\\"b\"}", "{\"device_id\": \"a\x01\"}",    /* escapes, control */
        "{\"device_id\": \"\xff\xfe\"}",                                /* not UTF-8 */
        "{\"at\": 1.5}", "{\"at\": 1e3}", "{\"at\": 01}", "{\"at\": -}",  /* not integers */
        "{\"at\": 9223372036854775808}", "{\"at\": 12345678901234567890123}",
        "{\"at\": \"5\"}", "{\"device_id\": 5}", "{\"at\": true}",      /* wrong types */
        "{\"at\": 1, \"at\": 2}",                                        /* a key twice */
        "{\"nope\": 1}", "{\"at\": null}", "{\"at\": {}}", "{\"at\": [1]}",
    };
    for (size_t i = 0; i < sizeof left / sizeof *left; i++)
        assert_false(s_flat_agrees(ev, "checked_in", left[i]));
    assert_false(s_flat_agrees(re, "scan", "{\"stamps\": -1}"));           /* out of range */
    assert_false(s_flat_agrees(re, "scan", "{\"stamps\": 4294967296}"));
    assert_false(s_flat_agrees(re, "scan", "{\"accepted\": truex}"));
    assert_false(s_flat_agrees(re, "upload_scans", "{\"results\": []}"));  /* repeated */
    assert_false(s_flat_agrees(ev, "nope", "{\"at\": 1}"));                /* no member */
    assert_false(s_flat_agrees(re, "error", "{\"code\": \"x\"}"));         /* not a oneof */

    /* a member already set stays as it was */
    Linli__Event *e = malloc(sizeof *e);
    linli__event__init(e);
    assert_int_equal(pbjson_set_field_flat(&e->base, "checked_in", "{\"at\": 5}"), 1);
    assert_int_equal(pbjson_set_field_flat(&e->base, "checked_out", "{\"at\": 6}"), 0);
    assert_int_equal(e->event_case, LINLI__EVENT__EVENT_CHECKED_IN);
    assert_int_equal(e->checked_in->at, 5);
    linli__event__free_unpacked(e, NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sign_up),
        cmocka_unit_test(test_register_person_roles),
        cmocka_unit_test(test_reply_nested_repeated),
        cmocka_unit_test(test_envelope_with_command),
        cmocka_unit_test(test_envelope_replay_of_events),
        cmocka_unit_test(test_defaults_omitted),
        cmocka_unit_test(test_uint64_as_string),
        cmocka_unit_test(test_all_types),
        cmocka_unit_test(test_output_of_bad_peer_data),
        cmocka_unit_test(test_errors_fields),
        cmocka_unit_test(test_errors_document),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_field_and_case_name),
        cmocka_unit_test(test_set_field),
        cmocka_unit_test(test_set_field_flat),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
