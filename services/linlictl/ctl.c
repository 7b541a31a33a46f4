/* linlictl's subcommands: send any registry or timebank command as JSON and
 * print the reply as JSON, fetch a printable QR code, follow the event
 * stream. Commands go to the service that owns them, told by their field
 * number in linli.Command (proto/envelope.proto). */
#include "ctl.h"

#include "cmdcli.h"
#include "envelope.h"
#include "log.h"
#include "pbjson.h"
#include "qr.h"
#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

/* Field numbers of linli.Command by owning service (proto/envelope.proto). */
#define S_REGISTRY_FIRST 1
#define S_REGISTRY_LAST 63
#define S_TIMEBANK_FIRST 64
#define S_TIMEBANK_LAST 127

void ctl_print_json(const ProtobufCMessage *m)
{
    json_t *j = pbjson_from_message(m);
    char *text = json_dumps(j, JSON_INDENT(2) | JSON_ENSURE_ASCII * 0);
    printf("%s\n", text ? text : "{}");
    free(text);
    json_decref(j);
}

const char *ctl_service(const ctl_opts_t *o, const char *name, const char **endpoint)
{
    const ProtobufCFieldDescriptor *f = name ? pbjson_field(&linli__command__descriptor, name)
                                             : NULL;
    const char *service = NULL, *ep = NULL;
    if (f && f->id >= S_REGISTRY_FIRST && f->id <= S_REGISTRY_LAST) {
        service = "registry";
        ep = o->endpoint;
    } else if (f && f->id >= S_TIMEBANK_FIRST && f->id <= S_TIMEBANK_LAST) {
        service = "timebank";
        ep = o->timebank;
    }
    if (endpoint)
        *endpoint = ep;
    return service;
}

/* Timeouts resend the same envelope: same id and key, so the service
 * answers with its first reply. */
Linli__Envelope *ctl_send(const ctl_opts_t *o, const char *key, Linli__Command *cmd)
{
    const char *endpoint;
    const char *service = ctl_service(o, envelope_command_name(cmd), &endpoint);
    if (!service) {
        fprintf(stderr, "linlictl: no service owns this command\n");
        protobuf_c_message_free_unpacked(&cmd->base, NULL);
        return NULL;
    }
    void *zctx = zmq_ctx_new();
    Linli__Envelope *env = cmdcli_envelope(service, "linlictl", key, 0, cmd);
    Linli__Envelope *reply = NULL;
    int rc = LX_AGAIN;
    for (int i = 0; i <= o->retries && rc == LX_AGAIN; i++)
        rc = cmdcli_call(zctx, endpoint, env, o->timeout_ms, &reply);
    if (rc == LX_AGAIN)
        fprintf(stderr, "linlictl: no reply from %s within %d ms\n", endpoint, o->timeout_ms);
    protobuf_c_message_free_unpacked(&env->base, NULL);
    zmq_ctx_term(zctx);
    return reply;
}

static Linli__Command *s_parse_command(const char *name, const char *args)
{
    char *text = xasprintf("{\"%s\": %s}", name, args);
    char err[256];
    Linli__Command *cmd = (Linli__Command *)pbjson_parse(&linli__command__descriptor, text,
                                                         strlen(text), err, sizeof err);
    free(text);
    if (!cmd)
        fprintf(stderr, "linlictl: bad command: %s\n", err);
    return cmd;
}

int ctl_call(const ctl_opts_t *o, int argc, char **argv)
{
    if (argc < 1 || argc > 2) {
        fprintf(stderr, "usage: linlictl call COMMAND ['{json arguments}']\n");
        return 2;
    }
    if (!ctl_service(o, argv[0], NULL)) {
        fprintf(stderr, "linlictl: unknown command '%s'\n", argv[0]);
        return 2;
    }
    Linli__Command *cmd = s_parse_command(argv[0], argc == 2 ? argv[1] : "{}");
    if (!cmd)
        return 2;
    Linli__Envelope *reply = ctl_send(o, o->key, cmd);
    if (!reply)
        return 2;
    ctl_print_json(&reply->reply->base);
    int rc = reply->reply->ok ? 0 : 1;
    envelope_free(&reply);
    return rc;
}

int ctl_qr(const ctl_opts_t *o, int argc, char **argv)
{
    long long activity = 0, station = 0, valid = 0;
    const char *out = NULL;
    for (int i = 0; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--activity"))
            activity = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "--station"))
            station = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "--valid"))
            valid = atoll(argv[i + 1]);
        else if (!strcmp(argv[i], "-o"))
            out = argv[i + 1];
        else
            goto usage;
    }
    if ((argc % 2) || !out || (!activity == !station))
        goto usage;
    char args[128];
    snprintf(args, sizeof args, "{\"activity_id\":%lld,\"station_id\":%lld,\"valid_seconds\":%lld}",
             activity, station, valid);
    Linli__Command *cmd = s_parse_command("issue_token", args);
    if (!cmd)
        return 2;
    Linli__Envelope *reply = ctl_send(o, o->key, cmd);
    if (!reply)
        return 2;
    int rc = 1;
    if (!reply->reply->ok || reply->reply->result_case != LINLI__REPLY__RESULT_ISSUE_TOKEN) {
        ctl_print_json(&reply->reply->base);
        goto done;
    }
    const Linli__TokenResult *t = reply->reply->issue_token;
    size_t n = strlen(out);
    unsigned char *png = NULL;
    size_t len = 0;
    const void *data = t->svg;
    len = strlen(t->svg);
    if (n > 4 && !strcmp(out + n - 4, ".png")) {
        png = qr_png(t->token, 8, &len);
        data = png;
    }
    FILE *f = fopen(out, "wb");
    if (!f || !data || fwrite(data, 1, len, f) != len) {
        fprintf(stderr, "linlictl: cannot write %s: %s\n", out, strerror(errno));
        rc = 2;
    } else {
        printf("{\"token\": \"%s\", \"expires_at\": %lld, \"file\": \"%s\"}\n", t->token,
               (long long)t->expires_at, out);
        rc = 0;
    }
    if (f)
        fclose(f);
    free(png);
done:
    envelope_free(&reply);
    return rc;
usage:
    fprintf(stderr, "usage: linlictl qr (--activity ID | --station ID) [--valid SECONDS] -o FILE.svg|FILE.png\n");
    return 2;
}

int ctl_tail(const ctl_opts_t *o, int argc, char **argv)
{
    long long count = -1;
    if (argc == 2 && !strcmp(argv[0], "-n"))
        count = atoll(argv[1]);
    else if (argc != 0) {
        fprintf(stderr, "usage: linlictl tail [-n COUNT]\n");
        return 2;
    }
    void *zctx = zmq_ctx_new();
    void *sub = zmq_socket(zctx, ZMQ_SUB);
    zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "registry", 8);
    if (zmq_connect(sub, o->pub) != 0) {
        fprintf(stderr, "linlictl: cannot connect to %s: %s\n", o->pub, zmq_strerror(errno));
        zmq_close(sub);
        zmq_ctx_term(zctx);
        return 2;
    }
    for (long long seen = 0; count < 0 || seen < count;) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, sub, 0) < 0)
            break;
        int more = zmq_msg_more(&m);
        if (!more) {
            const char *code;
            char why[128];
            Linli__Envelope *e = envelope_decode(zmq_msg_data(&m), zmq_msg_size(&m), &code, why,
                                                 sizeof why);
            if (e && e->payload_case == LINLI__ENVELOPE__PAYLOAD_EVENT) {
                json_t *j = pbjson_from_message(&e->base);
                char *text = json_dumps(j, JSON_COMPACT);
                printf("%s\n", text);
                fflush(stdout);
                free(text);
                json_decref(j);
                seen++;
            }
            envelope_free(&e);
        }
        zmq_msg_close(&m);
    }
    zmq_close(sub);
    zmq_ctx_term(zctx);
    return 0;
}
