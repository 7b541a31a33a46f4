/* Descriptor-driven conversion between protobuf-c messages and JSON (the
 * mapping is in pbjson.h). Building walks the JSON object key by key and
 * stores each value straight into the new message, putting every string,
 * array and submessage on the heap the moment it is created, so the single
 * call protobuf_c_message_free_unpacked(m, NULL) frees a finished message and
 * a half-built one alike: on any error we free the top message and stop.
 * Writing walks the descriptor's fields and leaves out those at their default.
 * The same code serves every message in proto/, so nothing here may trust the
 * JSON (from people) or the message (unpacked from a peer's bytes). */
#include "pbjson.h"

#include "util.h"

#include <errno.h>
#include <float.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* State while building one message: the caller's error buffer and the path
 * of the value being converted ("sign_up.person_ids[2]"), so that every
 * error names its field. */
typedef struct {
    char *err;         /* caller's buffer; may be NULL */
    size_t errlen;
    char path[256];    /* cut short, not overflowed, past this length */
    size_t pathlen;
} s_ctx_t;

/* Indexed by ProtobufCType, for error messages. */
static const char *const s_type_names[] = {
    "int32", "sint32", "sfixed32", "int64", "sint64", "sfixed64", "uint32", "fixed32",
    "uint64", "fixed64", "float", "double", "bool", "enum", "string", "bytes", "message"};

static const char s_b64_chars[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

__attribute__((format(printf, 2, 3)))
static int s_fail(s_ctx_t *c, const char *fmt, ...)
{
    if (!c->err || !c->errlen)
        return -1;
    char msg[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (c->pathlen)
        snprintf(c->err, c->errlen, "%s: %s", c->path, msg);
    else
        snprintf(c->err, c->errlen, "%s", msg);
    return -1;
}

/* Appends ".name" (or "[index]" when name is NULL) to the path and returns
 * the previous length, which s_pop restores. */
static size_t s_push(s_ctx_t *c, const char *name, size_t index)
{
    size_t old = c->pathlen;
    if (name) {
        if (old)
            (void)str_put(c->path, sizeof c->path, &c->pathlen, ".");
        (void)str_put(c->path, sizeof c->path, &c->pathlen, name);
    } else {
        (void)str_put(c->path, sizeof c->path, &c->pathlen, "[");
        (void)str_put_i64(c->path, sizeof c->path, &c->pathlen, (int64_t)index);
        (void)str_put(c->path, sizeof c->path, &c->pathlen, "]");
    }
    return old;
}

static void s_pop(s_ctx_t *c, size_t old)
{
    c->pathlen = old;
    c->path[old] = '\0';
}

/* Size of one value of type t in a message struct or repeated array. */
static size_t s_elem_size(ProtobufCType t)
{
    switch (t) {
    case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64: case PROTOBUF_C_TYPE_SFIXED64:
    case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64:
        return sizeof(int64_t);
    case PROTOBUF_C_TYPE_DOUBLE: return sizeof(double);
    case PROTOBUF_C_TYPE_BOOL: return sizeof(protobuf_c_boolean);
    case PROTOBUF_C_TYPE_STRING: return sizeof(char *);
    case PROTOBUF_C_TYPE_BYTES: return sizeof(ProtobufCBinaryData);
    case PROTOBUF_C_TYPE_MESSAGE: return sizeof(ProtobufCMessage *);
    default: return sizeof(int32_t);  /* the 32-bit integers, float, enum */
    }
}

/* The string value of v, or NULL if v is not a string or holds a NUL (which
 * a C string field could not keep and a name lookup would cut short). */
static const char *s_cstr(const json_t *v)
{
    const char *s = json_string_value(v);
    return s && strlen(s) == json_string_length(v) ? s : NULL;
}

/* ---- base64, standard alphabet on output; standard or URL-safe, padded or
 * not, on input, as proto3's JSON mapping allows ---- */

static char *s_b64_encode(const uint8_t *p, size_t n)
{
    char *out = xmalloc((n + 2) / 3 * 4 + 1), *o = out;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (i + 1 < n ? (uint32_t)p[i + 1] << 8 : 0) |
                     (i + 2 < n ? p[i + 2] : 0);
        *o++ = s_b64_chars[v >> 18 & 63];
        *o++ = s_b64_chars[v >> 12 & 63];
        *o++ = i + 1 < n ? s_b64_chars[v >> 6 & 63] : '=';
        *o++ = i + 2 < n ? s_b64_chars[v & 63] : '=';
    }
    *o = '\0';
    return out;
}

static int s_b64_digit(char ch)
{
    if (ch == '-')
        return 62;
    if (ch == '_')
        return 63;
    const char *p = ch ? strchr(s_b64_chars, ch) : NULL;
    return p ? (int)(p - s_b64_chars) : -1;
}

/* Decodes len characters of s into a new buffer (NULL when empty). */
static int s_b64_decode(const char *s, size_t len, ProtobufCBinaryData *out)
{
    if (len % 4 == 0 && len && s[len - 1] == '=')
        len -= s[len - 2] == '=' ? 2 : 1;
    if (len % 4 == 1)
        return -1;
    size_t n = len / 4 * 3 + (len % 4 ? len % 4 - 1 : 0), o = 0;
    uint8_t *buf = n ? xmalloc(n) : NULL;
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < len; i++) {
        int d = s_b64_digit(s[i]);
        if (d < 0) {
            free(buf);
            return -1;
        }
        acc = acc << 6 | (uint32_t)d;
        if ((bits += 6) >= 8) {
            bits -= 8;
            buf[o++] = (uint8_t)(acc >> bits);
            acc &= (1u << bits) - 1;
        }
    }
    out->data = buf;
    out->len = n;
    return 0;
}

/* ---- message to JSON ---- */

/* protobuf-c does not check that an unpacked string is UTF-8 and jansson
 * refuses one that is not, so a peer's bad bytes become U+FFFD here rather
 * than a missing field or invalid JSON. */
static json_t *s_json_string(const char *s)
{
    size_t n = s ? strlen(s) : 0;
    json_t *j = json_stringn(s ? s : "", n);
    if (j)
        return j;
    const unsigned char *p = (const unsigned char *)s;
    char *buf = xmalloc(n * 3 + 1);
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        size_t k = utf8_seq_len(p + i, n - i);
        memcpy(buf + o, k ? (const char *)p + i : "\xef\xbf\xbd", k ? k : 3);
        o += k ? k : 3;
        i += k ? k : 1;
    }
    j = json_stringn(buf, o);
    free(buf);
    return j ? j : json_string("");
}

/* JSON has no NaN or infinities; proto3's mapping writes them as strings. */
static json_t *s_json_real(double d)
{
    if (isnan(d))
        return json_string("NaN");
    if (isinf(d))
        return json_string(d > 0 ? "Infinity" : "-Infinity");
    return json_real(d);
}

static json_t *s_from_value(const ProtobufCFieldDescriptor *f, const void *slot)
{
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32: case PROTOBUF_C_TYPE_SFIXED32:
        return json_integer(*(const int32_t *)slot);
    case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_FIXED32:
        return json_integer(*(const uint32_t *)slot);
    case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64: case PROTOBUF_C_TYPE_SFIXED64:
        return json_integer(*(const int64_t *)slot);
    case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64: {
        uint64_t v = *(const uint64_t *)slot;
        char buf[24];
        if (v <= INT64_MAX)
            return json_integer((json_int_t)v);
        snprintf(buf, sizeof buf, "%" PRIu64, v);  /* a JSON integer here is not portable */
        return json_string(buf);
    }
    case PROTOBUF_C_TYPE_FLOAT: return s_json_real(*(const float *)slot);
    case PROTOBUF_C_TYPE_DOUBLE: return s_json_real(*(const double *)slot);
    case PROTOBUF_C_TYPE_BOOL: return json_boolean(*(const protobuf_c_boolean *)slot);
    case PROTOBUF_C_TYPE_ENUM: {
        int32_t v = *(const int32_t *)slot;
        const ProtobufCEnumValue *ev = protobuf_c_enum_descriptor_get_value(f->descriptor, v);
        return ev ? json_string(ev->name) : json_integer(v);  /* proto3 enums are open */
    }
    case PROTOBUF_C_TYPE_STRING: return s_json_string(*(char *const *)slot);
    case PROTOBUF_C_TYPE_BYTES: {
        const ProtobufCBinaryData *b = slot;
        char *s = s_b64_encode(b->data, b->len);
        json_t *j = json_string(s);
        free(s);
        return j;
    }
    case PROTOBUF_C_TYPE_MESSAGE: {
        const ProtobufCMessage *sub = *(ProtobufCMessage *const *)slot;
        return sub ? pbjson_from_message(sub) : json_object();
    }
    }
    return json_null();
}

/* Whether field f of m is to be written: oneof members by their case,
 * optional scalars by has_, the rest when not at their default. */
static int s_is_set(const ProtobufCMessage *m, const ProtobufCFieldDescriptor *f)
{
    static const char zero[sizeof(int64_t)];
    const char *base = (const char *)m, *slot = base + f->offset;
    if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF)
        return *(const uint32_t *)(base + f->quantifier_offset) == f->id;
    if (f->label == PROTOBUF_C_LABEL_REPEATED)
        return *(const size_t *)(base + f->quantifier_offset) > 0;
    if (f->label == PROTOBUF_C_LABEL_REQUIRED)
        return 1;
    switch (f->type) {
    case PROTOBUF_C_TYPE_STRING: {
        const char *s = *(char *const *)slot;
        return f->label == PROTOBUF_C_LABEL_OPTIONAL ? s && s != f->default_value : s && *s;
    }
    case PROTOBUF_C_TYPE_MESSAGE: return *(ProtobufCMessage *const *)slot != NULL;
    default: break;
    }
    if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset)
        return *(const protobuf_c_boolean *)(base + f->quantifier_offset);
    switch (f->type) {
    case PROTOBUF_C_TYPE_BYTES: return ((const ProtobufCBinaryData *)slot)->len > 0;
    case PROTOBUF_C_TYPE_FLOAT: return *(const float *)slot != 0;
    case PROTOBUF_C_TYPE_DOUBLE: return *(const double *)slot != 0;
    default: return memcmp(slot, zero, s_elem_size(f->type)) != 0;
    }
}

json_t *pbjson_from_message(const ProtobufCMessage *m)
{
    const ProtobufCMessageDescriptor *desc = m->descriptor;
    json_t *obj = json_object();
    for (unsigned i = 0; i < desc->n_fields; i++) {
        const ProtobufCFieldDescriptor *f = &desc->fields[i];
        const char *slot = (const char *)m + f->offset;
        json_t *v;
        if (!s_is_set(m, f))
            continue;
        if (f->label == PROTOBUF_C_LABEL_REPEATED) {
            size_t n = *(const size_t *)((const char *)m + f->quantifier_offset);
            size_t size = s_elem_size(f->type);
            const char *arr = *(char *const *)slot;
            v = json_array();
            for (size_t k = 0; k < n; k++)
                json_array_append_new(v, s_from_value(f, arr + k * size));
        } else {
            v = s_from_value(f, slot);
        }
        json_object_set_new(obj, f->name, v);
    }
    return obj;
}

/* ---- JSON to message ---- */

static int s_to_message(s_ctx_t *c, const ProtobufCMessageDescriptor *desc, const json_t *j,
                        ProtobufCMessage **out, int depth);

static int s_to_int(s_ctx_t *c, const ProtobufCFieldDescriptor *f, const json_t *v,
                    json_int_t lo, json_int_t hi, json_int_t *out)
{
    if (!json_is_integer(v))
        return s_fail(c, "expected integer");
    *out = json_integer_value(v);
    if (*out < lo || *out > hi)
        return s_fail(c, "%lld out of range for %s", (long long)*out, s_type_names[f->type]);
    return 0;
}

/* uint64 beyond INT64_MAX cannot be a jansson integer, so it comes as a
 * string of decimal digits; smaller values may come either way. */
static int s_to_uint64(s_ctx_t *c, const ProtobufCFieldDescriptor *f, const json_t *v,
                       uint64_t *out)
{
    const char *s = s_cstr(v);
    if (json_is_integer(v)) {
        json_int_t x = json_integer_value(v);
        if (x < 0)
            return s_fail(c, "%lld out of range for %s", (long long)x, s_type_names[f->type]);
        *out = (uint64_t)x;
        return 0;
    }
    if (!s || !*s || strlen(s) > 20 || s[strspn(s, "0123456789")])
        return s_fail(c, "expected integer");
    errno = 0;
    *out = strtoull(s, NULL, 10);
    if (errno == ERANGE)
        return s_fail(c, "%s out of range for %s", s, s_type_names[f->type]);
    return 0;
}

static int s_to_real(s_ctx_t *c, const ProtobufCFieldDescriptor *f, const json_t *v, double *out)
{
    const char *s = s_cstr(v);
    if (json_is_number(v))
        *out = json_number_value(v);
    else if (s && !strcmp(s, "NaN"))
        *out = NAN;
    else if (s && (!strcmp(s, "Infinity") || !strcmp(s, "-Infinity")))
        *out = *s == '-' ? -INFINITY : INFINITY;
    else
        return s_fail(c, "expected number");
    if (f->type == PROTOBUF_C_TYPE_FLOAT && isfinite(*out) && fabs(*out) > FLT_MAX)
        return s_fail(c, "%g out of range for float", *out);
    return 0;
}

static int s_to_enum(s_ctx_t *c, const ProtobufCFieldDescriptor *f, const json_t *v,
                     int32_t *out)
{
    const ProtobufCEnumDescriptor *ed = f->descriptor;
    const ProtobufCEnumValue *ev = NULL;
    if (json_is_string(v)) {
        const char *s = s_cstr(v);
        if (s)
            ev = protobuf_c_enum_descriptor_get_value_by_name(ed, s);
        if (!ev)
            return s_fail(c, "\"%.64s\" is not a value of %s", json_string_value(v), ed->name);
    } else if (json_is_integer(v)) {
        json_int_t x = json_integer_value(v);
        if (x >= INT32_MIN && x <= INT32_MAX)
            ev = protobuf_c_enum_descriptor_get_value(ed, (int)x);
        if (!ev)
            return s_fail(c, "%lld is not a value of %s", (long long)x, ed->name);
    } else {
        return s_fail(c, "expected enum name or number");
    }
    *out = ev->value;
    return 0;
}

/* Converts v into the value slot of field f (one element when repeated).
 * Whatever is allocated is stored in slot before anything can fail. */
static int s_to_value(s_ctx_t *c, const ProtobufCFieldDescriptor *f, const json_t *v,
                      void *slot, int depth)
{
    json_int_t x;
    double d;
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32: case PROTOBUF_C_TYPE_SFIXED32:
        if (s_to_int(c, f, v, INT32_MIN, INT32_MAX, &x) < 0)
            return -1;
        *(int32_t *)slot = (int32_t)x;
        return 0;
    case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_FIXED32:
        if (s_to_int(c, f, v, 0, UINT32_MAX, &x) < 0)
            return -1;
        *(uint32_t *)slot = (uint32_t)x;
        return 0;
    case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64: case PROTOBUF_C_TYPE_SFIXED64:
        if (s_to_int(c, f, v, INT64_MIN, INT64_MAX, &x) < 0)
            return -1;
        *(int64_t *)slot = x;
        return 0;
    case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64:
        return s_to_uint64(c, f, v, slot);
    case PROTOBUF_C_TYPE_FLOAT:
        if (s_to_real(c, f, v, &d) < 0)
            return -1;
        *(float *)slot = (float)d;
        return 0;
    case PROTOBUF_C_TYPE_DOUBLE:
        return s_to_real(c, f, v, slot);
    case PROTOBUF_C_TYPE_BOOL:
        if (!json_is_boolean(v))
            return s_fail(c, "expected true or false");
        *(protobuf_c_boolean *)slot = json_is_true(v);
        return 0;
    case PROTOBUF_C_TYPE_ENUM:
        return s_to_enum(c, f, v, slot);
    case PROTOBUF_C_TYPE_STRING:
        if (!json_is_string(v))
            return s_fail(c, "expected string");
        if (json_string_length(v) > PBJSON_MAX_STRING)
            return s_fail(c, "string longer than %d bytes", PBJSON_MAX_STRING);
        if (!s_cstr(v))
            return s_fail(c, "string contains NUL");
        *(char **)slot = xstrndup(json_string_value(v), json_string_length(v));
        return 0;
    case PROTOBUF_C_TYPE_BYTES: {
        ProtobufCBinaryData *b = slot;
        size_t n = json_string_length(v);
        if (!json_is_string(v))
            return s_fail(c, "expected base64 string");
        /* checked before decoding too, so a huge string is not decoded first */
        if (n > (PBJSON_MAX_STRING + 2) / 3 * 4)
            return s_fail(c, "bytes longer than %d", PBJSON_MAX_STRING);
        if (s_b64_decode(json_string_value(v), n, b) < 0)
            return s_fail(c, "invalid base64");
        if (b->len > PBJSON_MAX_STRING)
            return s_fail(c, "bytes longer than %d", PBJSON_MAX_STRING);
        return 0;
    }
    case PROTOBUF_C_TYPE_MESSAGE:
        return s_to_message(c, f->descriptor, v, slot, depth + 1);
    }
    return s_fail(c, "unsupported field type");
}

/* Sets the has_ flag of an optional scalar field f of m; strings and
 * messages say it by their pointer, other fields have none. */
static void s_mark_present(ProtobufCMessage *m, const ProtobufCFieldDescriptor *f)
{
    if (f->label == PROTOBUF_C_LABEL_OPTIONAL && f->quantifier_offset &&
        f->type != PROTOBUF_C_TYPE_STRING && f->type != PROTOBUF_C_TYPE_MESSAGE)
        *(protobuf_c_boolean *)((char *)m + f->quantifier_offset) = 1;
}

/* Converts v, the value of key in the object for m, into m. */
static int s_to_field(s_ctx_t *c, ProtobufCMessage *m, const char *key, const json_t *v,
                      int depth)
{
    const ProtobufCFieldDescriptor *f =
        protobuf_c_message_descriptor_get_field_by_name(m->descriptor, key);
    char *base = (char *)m;
    if (!f)
        return s_fail(c, "unknown field");
    if (f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) {
        uint32_t *which = (uint32_t *)(base + f->quantifier_offset);
        const ProtobufCFieldDescriptor *other =
            *which ? protobuf_c_message_descriptor_get_field(m->descriptor, *which) : NULL;
        if (other)
            return s_fail(c, "only one member of a oneof may be set, %s already is",
                          other->name);
        *which = f->id;
    } else {
        s_mark_present(m, f);
    }
    if (f->label != PROTOBUF_C_LABEL_REPEATED)
        return s_to_value(c, f, v, base + f->offset, depth);

    if (!json_is_array(v))
        return s_fail(c, "expected array");
    size_t n = json_array_size(v), size = s_elem_size(f->type);
    if (n > PBJSON_MAX_REPEATED)
        return s_fail(c, "more than %d elements", PBJSON_MAX_REPEATED);
    if (n == 0)
        return 0;
    /* Count and array are set first: zeroed elements are safe to free. */
    char *arr = xcalloc(n, size);
    *(void **)(base + f->offset) = arr;
    *(size_t *)(base + f->quantifier_offset) = n;
    for (size_t i = 0; i < n; i++) {
        size_t old = s_push(c, NULL, i);
        if (s_to_value(c, f, json_array_get(v, i), arr + i * size, depth) < 0)
            return -1;
        s_pop(c, old);
    }
    return 0;
}

/* Builds a message of type desc at depth (the top one is 1) into *out. */
static int s_to_message(s_ctx_t *c, const ProtobufCMessageDescriptor *desc, const json_t *j,
                        ProtobufCMessage **out, int depth)
{
    json_t *obj = (json_t *)j;  /* jansson's iterators take non-const */
    const char *key;
    size_t keylen;
    json_t *v;
    if (!json_is_object(j))
        return s_fail(c, "expected object");
    if (depth > PBJSON_MAX_DEPTH)
        return s_fail(c, "messages nested deeper than %d", PBJSON_MAX_DEPTH);
    ProtobufCMessage *m = xmalloc(desc->sizeof_message);
    protobuf_c_message_init(desc, m);
    *out = m;  /* from here on the caller's free reaches it */
    json_object_keylen_foreach(obj, key, keylen, v) {
        size_t old = s_push(c, key, 0);
        if (strlen(key) != keylen)
            return s_fail(c, "unknown field");
        if (s_to_field(c, m, key, v, depth) < 0)
            return -1;
        s_pop(c, old);
    }
    return 0;
}

ProtobufCMessage *pbjson_to_message(const ProtobufCMessageDescriptor *desc, const json_t *j,
                                    char *err, size_t errlen)
{
    s_ctx_t c = {.err = err, .errlen = errlen};
    ProtobufCMessage *m = NULL;
    if (err && errlen)
        err[0] = '\0';
    if (s_to_message(&c, desc, j, &m, 1) < 0) {
        protobuf_c_message_free_unpacked(m, NULL);
        return NULL;
    }
    return m;
}

int pbjson_set_field(ProtobufCMessage *m, const char *name, const json_t *v, char *err,
                     size_t errlen)
{
    s_ctx_t c = {.err = err, .errlen = errlen};
    if (err && errlen)
        err[0] = '\0';
    s_push(&c, name, 0);
    const ProtobufCFieldDescriptor *f =
        protobuf_c_message_descriptor_get_field_by_name(m->descriptor, name);
    if (f && !(f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF))
        return s_fail(&c, "not a member of a oneof");
    /* a member already set is refused by s_to_field */
    return s_to_field(&c, m, name, v, 1);
}

/* ---- flat text to a oneof member, without building the JSON tree ----
 * Events and lane replies are flat objects of numbers and plain strings,
 * one per check-in: parsing each into jansson's tree of hash tables cost
 * more than the rest of publishing it. This reads that shape straight into
 * the message and gives up on anything else, which the full path (jansson,
 * then s_to_field) then handles, errors included; tests/fuzz/
 * fuzz_pbjson_flat.c checks that both paths agree on whatever this one
 * takes. */

static const char *s_flat_ws(const char *p)
{
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
        p++;
    return p;
}

/* A string without escapes or control characters at p: its bytes in *s and
 * *n, and the text past its closing quote; NULL for anything else. */
static const char *s_flat_string(const char *p, const char **s, size_t *n)
{
    if (*p != '"')
        return NULL;
    const char *b = ++p;
    for (; *p != '"'; p++)
        if ((unsigned char)*p < 0x20 || *p == '\\')  /* the NUL at the end too */
            return NULL;
    *s = b;
    *n = (size_t)(p - b);
    return p + 1;
}

/* A JSON integer at p that fits int64 (as jansson reads it): its value in
 * *out and the text past it; NULL for a fraction, an exponent, a leading
 * zero or anything out of range. */
static const char *s_flat_int(const char *p, int64_t *out)
{
    int neg = *p == '-';
    p += neg;
    if (*p < '0' || *p > '9' || (*p == '0' && p[1] >= '0' && p[1] <= '9'))
        return NULL;
    uint64_t v = 0;
    int digits = 0;
    for (; *p >= '0' && *p <= '9'; p++, digits++)
        v = v * 10 + (uint64_t)(*p - '0');
    /* 19 digits cannot overflow uint64; fewer than 20 is all int64 holds */
    if (digits > 19 || *p == '.' || *p == 'e' || *p == 'E')
        return NULL;
    if (neg ? v > (uint64_t)INT64_MAX + 1 : v > (uint64_t)INT64_MAX)
        return NULL;
    *out = neg ? (int64_t)(0 - v) : (int64_t)v;
    return p;
}

/* The value at p into field f of sub, as s_to_field and s_to_value store
 * it; the text past it, or NULL when the full path must decide. */
static const char *s_flat_value(const char *p, ProtobufCMessage *sub,
                                const ProtobufCFieldDescriptor *f)
{
    char *slot = (char *)sub + f->offset;
    int64_t x = 0;
    switch (f->type) {
    case PROTOBUF_C_TYPE_INT32: case PROTOBUF_C_TYPE_SINT32: case PROTOBUF_C_TYPE_SFIXED32:
        if (!(p = s_flat_int(p, &x)) || x < INT32_MIN || x > INT32_MAX)
            return NULL;
        *(int32_t *)slot = (int32_t)x;
        break;
    case PROTOBUF_C_TYPE_UINT32: case PROTOBUF_C_TYPE_FIXED32:
        if (!(p = s_flat_int(p, &x)) || x < 0 || x > UINT32_MAX)
            return NULL;
        *(uint32_t *)slot = (uint32_t)x;
        break;
    case PROTOBUF_C_TYPE_INT64: case PROTOBUF_C_TYPE_SINT64: case PROTOBUF_C_TYPE_SFIXED64:
        if (!(p = s_flat_int(p, &x)))
            return NULL;
        *(int64_t *)slot = x;
        break;
    case PROTOBUF_C_TYPE_UINT64: case PROTOBUF_C_TYPE_FIXED64:
        if (!(p = s_flat_int(p, &x)) || x < 0)
            return NULL;
        *(uint64_t *)slot = (uint64_t)x;
        break;
    case PROTOBUF_C_TYPE_BOOL:
        if (!strncmp(p, "true", 4))
            *(protobuf_c_boolean *)slot = 1, p += 4;
        else if (!strncmp(p, "false", 5))
            *(protobuf_c_boolean *)slot = 0, p += 5;
        else
            return NULL;
        break;
    case PROTOBUF_C_TYPE_STRING: {
        const char *s;
        size_t n;
        if (!(p = s_flat_string(p, &s, &n)) || n > PBJSON_MAX_STRING || !utf8_valid(s, n))
            return NULL;
        *(char **)slot = xstrndup(s, n);
        break;
    }
    default:
        return NULL;
    }
    s_mark_present(sub, f);
    return p;
}

int pbjson_set_field_flat(ProtobufCMessage *m, const char *name, const char *text)
{
    const ProtobufCFieldDescriptor *f =
        protobuf_c_message_descriptor_get_field_by_name(m->descriptor, name);
    if (!f || !(f->flags & PROTOBUF_C_FIELD_FLAG_ONEOF) || f->type != PROTOBUF_C_TYPE_MESSAGE)
        return 0;
    uint32_t *which = (uint32_t *)((char *)m + f->quantifier_offset);
    const ProtobufCMessageDescriptor *desc = f->descriptor;
    const char *p = s_flat_ws(text);
    if (*which || desc->n_fields > 64 || *p != '{' || *(p = s_flat_ws(p + 1)) == '}')
        return 0;
    ProtobufCMessage *sub = xmalloc(desc->sizeof_message);
    protobuf_c_message_init(desc, sub);
    uint64_t seen = 0;   /* by field index: a key given twice is the full path's */
    for (;;) {
        const char *key;
        size_t klen;
        char kbuf[64];
        if (!(p = s_flat_string(p, &key, &klen)) || klen >= sizeof kbuf)
            goto fallback;
        memcpy(kbuf, key, klen);
        kbuf[klen] = '\0';
        const ProtobufCFieldDescriptor *g =
            protobuf_c_message_descriptor_get_field_by_name(desc, kbuf);
        if (!g || g->label == PROTOBUF_C_LABEL_REPEATED || (g->flags & PROTOBUF_C_FIELD_FLAG_ONEOF))
            goto fallback;
        uint64_t bit = 1ull << (g - desc->fields);
        if (seen & bit)
            goto fallback;
        seen |= bit;
        p = s_flat_ws(p);
        if (*p != ':' || !(p = s_flat_value(s_flat_ws(p + 1), sub, g)))
            goto fallback;
        p = s_flat_ws(p);
        if (*p == '}')
            break;
        if (*p != ',')
            goto fallback;
        p = s_flat_ws(p + 1);
    }
    if (*s_flat_ws(p + 1) != '\0')
        goto fallback;
    *which = f->id;
    *(ProtobufCMessage **)((char *)m + f->offset) = sub;
    return 1;
fallback:
    protobuf_c_message_free_unpacked(sub, NULL);
    return 0;
}

ProtobufCMessage *pbjson_parse(const ProtobufCMessageDescriptor *desc, const char *text,
                               size_t len, char *err, size_t errlen)
{
    json_error_t jerr;
    /* A repeated key would silently keep one of two values. */
    json_t *j = json_loadb(text, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!j) {
        if (err && errlen)
            snprintf(err, errlen, "line %d column %d: %s", jerr.line, jerr.column, jerr.text);
        return NULL;
    }
    ProtobufCMessage *m = pbjson_to_message(desc, j, err, errlen);
    json_decref(j);
    return m;
}

const ProtobufCFieldDescriptor *pbjson_field(const ProtobufCMessageDescriptor *desc,
                                             const char *name)
{
    return protobuf_c_message_descriptor_get_field_by_name(desc, name);
}

const char *pbjson_oneof_case_name(const ProtobufCMessage *m, const char *oneof_first_field)
{
    const ProtobufCFieldDescriptor *first =
        protobuf_c_message_descriptor_get_field_by_name(m->descriptor, oneof_first_field);
    if (!first || !(first->flags & PROTOBUF_C_FIELD_FLAG_ONEOF))
        return NULL;
    uint32_t which = *(const uint32_t *)((const char *)m + first->quantifier_offset);
    const ProtobufCFieldDescriptor *f =
        which ? protobuf_c_message_descriptor_get_field(m->descriptor, which) : NULL;
    /* the case must belong to this oneof, not to another in the message */
    return f && f->quantifier_offset == first->quantifier_offset ? f->name : NULL;
}
