/* The Envelope every message travels in (proto/envelope.proto): decoding with
 * a size cap and validation, encoding, and builders for the common shapes.
 * Frames from peers are untrusted: nothing here asserts on their content. */
#ifndef LINLI_ENVELOPE_H
#define LINLI_ENVELOPE_H

#include "envelope.pb-c.h"
#include "registry.pb-c.h"

#include <stddef.h>
#include <stdint.h>

#define ENVELOPE_MAX_BYTES (1024 * 1024)  /* larger frames are refused unread */
#define ENVELOPE_MAX_KEY 128               /* idempotency_key bytes */
#define ENVELOPE_MAX_NAME 64               /* source, type, trace_id, stream bytes */
#define ENVELOPE_MAX_DEPTH 16              /* message nesting; the Envelope is 1 */

/* Stable error codes for frames that cannot be accepted. */
#define ENVELOPE_E_TOO_LARGE "frame_too_large"
#define ENVELOPE_E_MALFORMED "malformed_frame"
#define ENVELOPE_E_INVALID "invalid_envelope"

/* Unpacks and validates len bytes. Returns the message (caller frees with
 * envelope_free) or NULL with *code set to one of the codes above and a
 * reason written to why (whylen bytes). Messages nested deeper than
 * ENVELOPE_MAX_DEPTH are refused as malformed before unpacking. */
Linli__Envelope *envelope_decode(const void *buf, size_t len, const char **code, char *why,
                                 size_t whylen);

/* For a frame envelope_decode refused as invalid_envelope (it unpacks but
 * breaks a rule): copies its id into id when that is a UUID, so the refusal
 * can name the request it answers. Returns 1 when id was written, else 0. */
int envelope_peek_id(const void *buf, size_t len, char id[37]);

/* Checks limits and shape: lengths above, id (when set) a UUID, a payload
 * present, for a command exactly one command set. Returns 0, or -1 with a
 * reason in why. */
int envelope_validate(const Linli__Envelope *e, char *why, size_t whylen);

/* Packs e into a new buffer (caller frees) and stores its size in *len. */
uint8_t *envelope_encode(const Linli__Envelope *e, size_t *len);

/* A buffer reused across encodings: start from {0}, free(p) when done. */
typedef struct {
    uint8_t *p;
    size_t cap;
} envelope_buf_t;

/* Packs e into b, grown as needed, and stores its size in *len. The bytes
 * stay valid until b is used again. */
const uint8_t *envelope_encode_to(const Linli__Envelope *e, envelope_buf_t *b, size_t *len);

/* Frees a decoded envelope; accepts NULL; NULLs *e_p. Only for envelopes from
 * envelope_decode (protobuf-c's unpacked memory). */
void envelope_free(Linli__Envelope **e_p);

/* Name of the command set in cmd ("sign_up", ...), or NULL if none. */
const char *envelope_command_name(const Linli__Command *cmd);
/* Name of the event set in ev ("checked_in", ...), or NULL if none. */
const char *envelope_event_name(const Linli__Event *ev);

/* Builds a reply envelope answering req (id new, trace and key copied) that
 * takes ownership of reply (heap-built with protobuf-c's allocator or from
 * pbjson). Free the result with protobuf_c_message_free_unpacked. */
Linli__Envelope *envelope_reply_new(const Linli__Envelope *req, const char *source,
                                    Linli__Reply *reply);
/* A heap-built error reply (ok = false) with code and message copied. */
Linli__Reply *envelope_error_reply(const char *code, const char *message);

#endif
