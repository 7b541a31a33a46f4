/* libFuzzer target for pbjson_set_field_flat, the fast path the relay and
 * the lane replies take for flat JSON objects. Input: a oneof member name
 * of linli.Event or linli.Reply, a newline, then the JSON text. Whatever
 * the fast path takes must be exactly what the full path (jansson, then
 * pbjson_set_field) makes of the same text: the same message, byte for
 * byte. Whatever it leaves must leave the message untouched. */
#include "pbjson.h"
#include "util.h"

#include "envelope.pb-c.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* m packed into a new buffer of *len bytes. */
static uint8_t *s_pack(const ProtobufCMessage *m, size_t *len)
{
    *len = protobuf_c_message_get_packed_size(m);
    uint8_t *buf = xmalloc(*len ? *len : 1);
    if (protobuf_c_message_pack(m, buf) != *len)
        abort();
    return buf;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const uint8_t *nl = memchr(data, '\n', size);
    if (!nl || nl - data > 63)
        return 0;
    char name[64];
    memcpy(name, data, (size_t)(nl - data));
    name[nl - data] = '\0';
    const ProtobufCMessageDescriptor *desc = pbjson_field(&linli__event__descriptor, name)
                                                 ? &linli__event__descriptor
                                                 : &linli__reply__descriptor;
    char *text = xstrndup((const char *)nl + 1, size - (size_t)(nl + 1 - data));

    ProtobufCMessage *fast = xmalloc(desc->sizeof_message);
    protobuf_c_message_init(desc, fast);
    int took = pbjson_set_field_flat(fast, name, text);
    size_t flen;
    uint8_t *fbuf = s_pack(fast, &flen);
    if (!took && flen != 0)
        abort();  /* left, yet changed */

    if (took) {
        json_error_t jerr;
        json_t *j = json_loads(text, 0, &jerr);
        if (!j)
            abort();  /* taken, yet not JSON */
        ProtobufCMessage *full = xmalloc(desc->sizeof_message);
        protobuf_c_message_init(desc, full);
        char err[256];
        if (pbjson_set_field(full, name, j, err, sizeof err) != 0)
            abort();  /* taken, yet refused by the full path */
        size_t len;
        uint8_t *buf = s_pack(full, &len);
        if (len != flen || memcmp(buf, fbuf, len) != 0)
            abort();  /* the two paths disagree */
        free(buf);
        protobuf_c_message_free_unpacked(full, NULL);
        json_decref(j);
    }
    free(fbuf);
    protobuf_c_message_free_unpacked(fast, NULL);
    free(text);
    return 0;
}
