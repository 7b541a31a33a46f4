/* libFuzzer target for the JSON side of pbjson: text from linlictl or the
 * gateway is parsed as a linli.Envelope, and whatever is accepted must
 * survive the rest of its life: written back as JSON, packed for the wire,
 * freed. Beyond crashes and leaks it checks two round trips, since a service
 * stores the JSON and sends the bytes: the JSON we write must parse back to
 * the same JSON, and the packed bytes must unpack to the same JSON. */
#include "pbjson.h"
#include "util.h"

#include "envelope.pb-c.h"

#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* m2's JSON equals j; m2 is freed. */
static void s_check_same(ProtobufCMessage *m2, const json_t *j)
{
    json_t *j2 = pbjson_from_message(m2);
    if (!json_equal(j2, j))
        abort();
    json_decref(j2);
    protobuf_c_message_free_unpacked(m2, NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[256];
    ProtobufCMessage *m = pbjson_parse(&linli__envelope__descriptor, (const char *)data, size,
                                       err, sizeof err);
    if (!m)
        return 0;
    json_t *j = pbjson_from_message(m);

    ProtobufCMessage *again = pbjson_to_message(&linli__envelope__descriptor, j, err, sizeof err);
    if (!again)
        abort();  /* our own output must be acceptable input */
    s_check_same(again, j);

    size_t len = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = xmalloc(len ? len : 1);
    if (protobuf_c_message_pack(m, buf) != len)
        abort();
    ProtobufCMessage *wire = protobuf_c_message_unpack(&linli__envelope__descriptor, NULL, len, buf);
    if (!wire)
        abort();
    s_check_same(wire, j);

    free(buf);
    json_decref(j);
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}
