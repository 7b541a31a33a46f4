/* linli-timebank: the timebank daemon. See timebank.h. */
#include "config.h"
#include "log.h"
#include "timebank.h"

#include <event2/event.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

static void s_on_signal(evutil_socket_t sig, short what, void *arg)
{
    (void)what;
    log_info("main", "signal received sig=%d, draining", (int)sig);
    timebank_shutdown(arg, 10000);
}

int main(int argc, char **argv)
{
    int migrate_only = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: linli-timebank [--migrate] [--version]\n"
                   "Runs the Linli timebank. Configuration comes from LINLI_* environment\n"
                   "variables (see README): LINLI_PG, LINLI_TIMEBANK_CMD, LINLI_TIMEBANK_PUB,\n"
                   "LINLI_TIMEBANK_HTTP, LINLI_CERT_SECRET_FILE, LINLI_TIMEBANK_MIGRATIONS,\n"
                   "LINLI_REGISTRY_CMD, LINLI_REGISTRY_PUB.\n"
                   "  --migrate   apply database migrations and exit\n");
            return 0;
        }
        if (!strcmp(argv[i], "--version")) {
            printf("linli-timebank %s\n", LINLI_VERSION);
            return 0;
        }
        if (!strcmp(argv[i], "--migrate")) {
            migrate_only = 1;
            continue;
        }
        fprintf(stderr, "linli-timebank: unknown argument '%s' (try --help)\n", argv[i]);
        return 2;
    }
    log_init("timebank", log_level_parse(config_get("LINLI_LOG_LEVEL", "info")));
    if (config_load() != 0)
        return 1;
    if (migrate_only)
        return timebank_migrate() == 0 ? 0 : 1;
    signal(SIGPIPE, SIG_IGN);

    struct event_base *base = event_base_new();
    timebank_t *t = timebank_new(base);
    if (!t) {
        event_base_free(base);
        return 1;
    }
    struct event *sigterm = evsignal_new(base, SIGTERM, s_on_signal, t);
    struct event *sigint = evsignal_new(base, SIGINT, s_on_signal, t);
    event_add(sigterm, NULL);
    event_add(sigint, NULL);
    event_base_dispatch(base);
    event_free(sigterm);
    event_free(sigint);
    timebank_destroy(&t);
    event_base_free(base);
    log_info("main", "stopped");
    return 0;
}
