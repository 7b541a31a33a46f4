/* linlictl subcommands. Each returns the process exit status: 0 success,
 * 1 the service answered with an error (or, for cert verify, the
 * certificate is not valid), 2 usage or transport failure. */
#ifndef LINLI_CTL_H
#define LINLI_CTL_H

#include "envelope.h"

typedef struct {
    const char *endpoint;   /* registry command endpoint */
    const char *pub;        /* registry event endpoint */
    const char *timebank;   /* timebank command endpoint */
    const char *key;        /* idempotency key, NULL: new per call */
    int timeout_ms;
    int retries;            /* resends of the same envelope on timeout */
} ctl_opts_t;

int ctl_call(const ctl_opts_t *o, int argc, char **argv);
int ctl_qr(const ctl_opts_t *o, int argc, char **argv);
int ctl_tail(const ctl_opts_t *o, int argc, char **argv);
int ctl_stats(const ctl_opts_t *o, int argc, char **argv);
/* linlictl timebank (tb) SUBCOMMAND ...: argv starts after "timebank". */
int ctl_timebank(const ctl_opts_t *o, int argc, char **argv);
/* linlictl cert verify CODE (and cert issue): argv starts after "cert". */
int ctl_cert(const ctl_opts_t *o, int argc, char **argv);

/* The service that owns the command named name, from its field number in
 * linli.Command: "timebank" for 64..127, "registry" below 64. NULL when
 * name is no command or its number is in no service's range. The endpoint
 * the command goes to is stored in *endpoint (borrowed from o) when
 * endpoint is not NULL. */
const char *ctl_service(const ctl_opts_t *o, const char *name, const char **endpoint);

/* Sends cmd (taken, freed here) to the service that owns it, in an
 * envelope of type "<service>.<command>" with key as its idempotency key
 * (NULL: a new one), resending the same envelope on timeout. Returns the
 * reply envelope (caller frees with envelope_free; its payload is a reply),
 * or NULL after printing why on stderr. */
Linli__Envelope *ctl_send(const ctl_opts_t *o, const char *key, Linli__Command *cmd);

/* Prints m as indented JSON and a newline on stdout. */
void ctl_print_json(const ProtobufCMessage *m);

#endif
