/* libFuzzer target for the wire side: a peer's bytes are unpacked as a
 * linli.Envelope (capped at 1 MiB, as ZMQ_MAXMSGSIZE caps them in the
 * services) and, when protobuf-c accepts them, written as JSON the way a
 * service logs or stores them. pbjson_from_message must cope with anything
 * unpack lets through (invalid UTF-8, undefined enum numbers, deep nesting)
 * and always give JSON that jansson can serialise. When that JSON is also
 * acceptable input, it must read back to the same JSON. */
#include "pbjson.h"

#include "envelope.pb-c.h"

#include <stdint.h>
#include <stdlib.h>

#define FUZZ_MAX_BYTES (1 << 20)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size > FUZZ_MAX_BYTES)
        return 0;
    ProtobufCMessage *m = protobuf_c_message_unpack(&linli__envelope__descriptor, NULL, size, data);
    if (!m)
        return 0;
    json_t *j = pbjson_from_message(m);
    char *text = json_dumps(j, JSON_COMPACT);
    if (!text)
        abort();

    char err[256];
    ProtobufCMessage *back = pbjson_to_message(&linli__envelope__descriptor, j, err, sizeof err);
    if (back) {
        json_t *j2 = pbjson_from_message(back);
        if (!json_equal(j, j2))
            abort();
        json_decref(j2);
        protobuf_c_message_free_unpacked(back, NULL);
    }

    free(text);
    json_decref(j);
    protobuf_c_message_free_unpacked(m, NULL);
    return 0;
}
