/* Conversion between protobuf-c messages and JSON (jansson), driven by the
 * message descriptors, so it works for every message in proto/ without
 * per-message code. Services keep records as jsonb in PostgreSQL and speak
 * protobuf on the wire; linlictl and the gateway speak JSON to people.
 *
 * Mapping (close to proto3's JSON mapping, with the .proto field names):
 *   keys are the field names exactly as in the .proto file (snake_case);
 *   int32/sint32/sfixed32/uint32/fixed32/int64/sint64/sfixed64/uint64/fixed64
 *     are JSON integers (uint64 above INT64_MAX is written as a string and
 *     accepted as one);
 *   float/double are JSON reals (integers accepted; NaN and the infinities
 *     are the strings "NaN", "Infinity", "-Infinity", as in proto3);
 *   bool is true/false;
 *   string is a JSON string (must be valid UTF-8 without NUL; a message
 *     unpacked from the wire may hold invalid UTF-8, which is written with
 *     U+FFFD in its place so the JSON stays valid);
 *   bytes are base64 strings (written standard and padded; read standard or
 *     URL-safe, padding optional);
 *   enums are written as their value name ("ROLE_VOLUNTEER") and accepted as
 *     a name or an integer that is a defined value (an undefined number in a
 *     message from the wire is written as a number, and so is not accepted
 *     back);
 *   messages are objects; repeated fields are arrays; a oneof member is a key
 *     like any other field, and at most one member of a oneof may be given;
 *   null is not accepted for any field.
 *   Writing omits fields that hold their default (0, "", false, empty array,
 *   unset message) as proto3 does; a oneof member that is set is always
 *   written, even when empty ({"sweep": {}}).
 */
#ifndef LINLI_PBJSON_H
#define LINLI_PBJSON_H

#include <jansson.h>
#include <protobuf-c/protobuf-c.h>
#include <stddef.h>

#define PBJSON_MAX_DEPTH 16        /* nesting of messages; the top one is 1 */
#define PBJSON_MAX_STRING 65536    /* bytes in one string or bytes field */
#define PBJSON_MAX_REPEATED 10000  /* elements in one repeated field */

/* Returns a new JSON object for m (caller owns the reference). Never NULL
 * for a valid message. */
json_t *pbjson_from_message(const ProtobufCMessage *m);

/* Builds a message of type desc from the JSON object j. Unknown keys, wrong
 * types, out-of-range integers, undefined enum names, two members of one
 * oneof, and anything past the limits above are errors.
 * Returns the message (caller frees it with
 * protobuf_c_message_free_unpacked(m, NULL)), or NULL with a one-line reason
 * naming the field (e.g. "sign_up.person_ids[2]: expected integer") written
 * to err (errlen bytes, always NUL-terminated). Nothing is leaked on error. */
ProtobufCMessage *pbjson_to_message(const ProtobufCMessageDescriptor *desc, const json_t *j,
                                    char *err, size_t errlen);

/* Sets the member of a oneof of m named name (for example Event.checked_in
 * or Reply.scan) from the JSON value v, as pbjson_to_message does for that
 * key of m's object, without building the object around it. m is a message
 * from protobuf-c's init (or unpacked). Returns 0, or -1 with a reason whose
 * path starts at name written to err: name is not a oneof member of m, a
 * member of that oneof is already set, or v does not fit. m may then hold
 * part of the value, and is only fit to be freed (with
 * protobuf_c_message_free_unpacked, as usual). */
int pbjson_set_field(ProtobufCMessage *m, const char *name, const json_t *v, char *err,
                     size_t errlen);

/* The fast path of pbjson_set_field for the commonest text: a flat object
 * whose values are integers, true/false and strings without escapes, each
 * key a field of the member's message that is not repeated, not in a oneof
 * and of an integer, bool or string type (an event payload, a scan's
 * result). text is NUL-terminated JSON. When it is such an object, sets
 * exactly what pbjson_set_field(m, name, <text parsed by jansson>) would
 * and returns 1; for anything else (an empty object, nesting, escapes,
 * reals, enums, a key given twice, an error of any kind) returns 0 and
 * leaves m as it was, for the caller to take the full path. */
int pbjson_set_field_flat(ProtobufCMessage *m, const char *name, const char *text);

/* Convenience: parse text (len bytes, need not be NUL-terminated) as JSON and
 * convert as above. Same ownership and errors; a JSON syntax error (and a
 * key repeated in one object) is reported with its line and column. */
ProtobufCMessage *pbjson_parse(const ProtobufCMessageDescriptor *desc, const char *text,
                               size_t len, char *err, size_t errlen);

/* The field of desc's oneof-or-regular fields named name, or NULL. */
const ProtobufCFieldDescriptor *pbjson_field(const ProtobufCMessageDescriptor *desc,
                                             const char *name);

/* For a message with a oneof (like linli.Command, linli.Event, linli.Reply's
 * result): the name of the member that is set, or NULL when none is.
 * oneof_first_field names any member of that oneof (by habit the first); it
 * is NULL too when that name is not a field of m or not in a oneof. The
 * result points into m's descriptor (static). */
const char *pbjson_oneof_case_name(const ProtobufCMessage *m, const char *oneof_first_field);

#endif
