/* linli-registry: the registry daemon. See registry.h. */
#include "config.h"
#include "log.h"
#include "registry.h"

#include <event2/event.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

static void s_on_signal(evutil_socket_t sig, short what, void *arg)
{
    (void)what;
    log_info("main", "signal received sig=%d, draining", (int)sig);
    registry_shutdown(arg, 10000);
}

int main(int argc, char **argv)
{
    int migrate_only = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h")) {
            printf("usage: linli-registry [--migrate] [--version]\n"
                   "Runs the Linli registry. Configuration comes from LINLI_* environment\n"
                   "variables (see README): LINLI_PG, LINLI_REGISTRY_CMD, LINLI_REGISTRY_PUB,\n"
                   "LINLI_REGISTRY_HTTP, LINLI_TOKEN_SECRET_FILE, LINLI_REGISTRY_MIGRATIONS.\n"
                   "  --migrate   apply database migrations and exit\n");
            return 0;
        }
        if (!strcmp(argv[i], "--version")) {
            printf("linli-registry %s\n", LINLI_VERSION);
            return 0;
        }
        if (!strcmp(argv[i], "--migrate")) {
            migrate_only = 1;
            continue;
        }
        fprintf(stderr, "linli-registry: unknown argument '%s' (try --help)\n", argv[i]);
        return 2;
    }
    log_init("registry", log_level_parse(config_get("LINLI_LOG_LEVEL", "info")));
    if (config_load() != 0)
        return 1;
    if (migrate_only)
        return registry_migrate() == 0 ? 0 : 1;
    signal(SIGPIPE, SIG_IGN);

    struct event_base *base = event_base_new();
    registry_t *r = registry_new(base);
    if (!r) {
        event_base_free(base);
        return 1;
    }
    struct event *sigterm = evsignal_new(base, SIGTERM, s_on_signal, r);
    struct event *sigint = evsignal_new(base, SIGINT, s_on_signal, r);
    event_add(sigterm, NULL);
    event_add(sigint, NULL);
    event_base_dispatch(base);
    event_free(sigterm);
    event_free(sigint);
    registry_destroy(&r);
    event_base_free(base);
    log_info("main", "stopped");
    return 0;
}
