/* linlictl: the operator's command line for a running Linli. */
#include "config.h"
#include "ctl.h"
#include "log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int s_usage(FILE *f)
{
    fprintf(f, "usage: linlictl [--key KEY] [--timeout MS] [--retries N] COMMAND ...\n"
               "  call NAME ['{json}']     send a registry or timebank command, print the reply\n"
               "                           as JSON (e.g. call get_activity '{\"activity_id\":1}')\n"
               "  qr (--activity ID|--station ID) [--valid S] -o FILE.svg|.png\n"
               "                           issue a signed check-in token as a printable QR code\n"
               "  stats [--community ID] [--activity ID] [--json]\n"
               "                           live counts from Redis\n"
               "  tail [-n COUNT]          print registry events as they are published\n"
               "  timebank|tb SUBCOMMAND   hours: balance, statement, gift, record, approve, ...\n"
               "                           (linlictl tb help lists them)\n"
               "  cert verify CODE         check a certificate's code (exit 1: not valid)\n"
               "Endpoints come from LINLI_REGISTRY_CMD, LINLI_REGISTRY_PUB, LINLI_TIMEBANK_CMD\n"
               "and LINLI_REDIS.\n"
               "Exit status: 0 ok, 1 the service answered with an error, 2 usage or transport.\n");
    return f == stdout ? 0 : 2;
}

int main(int argc, char **argv)
{
    log_init("linlictl", LOG_LEVEL_WARN);
    if (config_load() != 0)
        return 2;
    ctl_opts_t o = { .endpoint = config_get("LINLI_REGISTRY_CMD", "tcp://127.0.0.1:7101"),
                     .pub = config_get("LINLI_REGISTRY_PUB", "tcp://127.0.0.1:7102"),
                     .timebank = config_get("LINLI_TIMEBANK_CMD", "tcp://127.0.0.1:7111"),
                     .timeout_ms = 5000,
                     .retries = 2 };
    int i = 1;
    for (; i < argc && argv[i][0] == '-'; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h"))
            return s_usage(stdout);
        if (!strcmp(argv[i], "--version")) {
            printf("linlictl %s\n", LINLI_VERSION);
            return 0;
        }
        if (i + 1 >= argc)
            return s_usage(stderr);
        if (!strcmp(argv[i], "--key"))
            o.key = argv[++i];
        else if (!strcmp(argv[i], "--timeout"))
            o.timeout_ms = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--retries"))
            o.retries = atoi(argv[++i]);
        else
            return s_usage(stderr);
    }
    if (i >= argc || o.timeout_ms <= 0 || o.retries < 0)
        return s_usage(stderr);
    const char *cmd = argv[i];
    int rest = argc - i - 1;
    char **rargv = argv + i + 1;
    if (!strcmp(cmd, "call"))
        return ctl_call(&o, rest, rargv);
    if (!strcmp(cmd, "qr"))
        return ctl_qr(&o, rest, rargv);
    if (!strcmp(cmd, "tail"))
        return ctl_tail(&o, rest, rargv);
    if (!strcmp(cmd, "stats"))
        return ctl_stats(&o, rest, rargv);
    if (!strcmp(cmd, "timebank") || !strcmp(cmd, "tb"))
        return ctl_timebank(&o, rest, rargv);
    if (!strcmp(cmd, "cert"))
        return ctl_cert(&o, rest, rargv);
    return s_usage(stderr);
}
