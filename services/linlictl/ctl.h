/* linlictl subcommands. Each returns the process exit status: 0 success,
 * 1 the service answered with an error, 2 usage or transport failure. */
#ifndef LINLI_CTL_H
#define LINLI_CTL_H

typedef struct {
    const char *endpoint;   /* registry command endpoint */
    const char *pub;        /* registry event endpoint */
    const char *key;        /* idempotency key, NULL: new per call */
    int timeout_ms;
    int retries;            /* resends of the same envelope on timeout */
} ctl_opts_t;

int ctl_call(const ctl_opts_t *o, int argc, char **argv);
int ctl_qr(const ctl_opts_t *o, int argc, char **argv);
int ctl_tail(const ctl_opts_t *o, int argc, char **argv);
int ctl_stats(const ctl_opts_t *o, int argc, char **argv);

#endif
