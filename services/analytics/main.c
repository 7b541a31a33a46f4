/* linli-analytics: registry events in, live counters in Redis out. Loads
 * configuration, builds the service, runs the loop until SIGTERM/SIGINT,
 * then lets outstanding Redis replies arrive (at most 5 s) and exits 0. */
#include "analytics.h"
#include "config.h"
#include "log.h"

#include <event2/event.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>

#define DRAIN_MS 5000

static void s_usage(FILE *f)
{
    fprintf(f, "usage: linli-analytics [--help] [--version]\n"
               "Applies registry events to live counters in Redis.\n"
               "Configuration (environment or the file named by LINLI_CONFIG):\n"
               "  LINLI_REDIS            host:port or /socket [127.0.0.1:6379]\n"
               "  LINLI_REDIS_PREFIX     key prefix [linli]\n"
               "  LINLI_TZ_OFFSET_MIN    city time zone, minutes east of UTC [480]\n"
               "  LINLI_REGISTRY_PUB     registry events [tcp://127.0.0.1:7102]\n"
               "  LINLI_REGISTRY_CMD     registry commands [tcp://127.0.0.1:7101]\n"
               "  LINLI_ANALYTICS_HTTP   /healthz /readyz /metrics host:port [off]\n"
               "  LINLI_LOG_LEVEL        debug|info|warn|error [info]\n");
}

static void s_on_signal(evutil_socket_t sig, short what, void *arg)
{
    (void)what;
    log_info("main", "signal received sig=%d", (int)sig);
    analytics_stop(arg, DRAIN_MS);
}

int main(int argc, char **argv)
{
    struct event_base *base = NULL;
    struct event *sigterm = NULL, *sigint = NULL;
    analytics_t *a = NULL;
    analytics_opts_t opts;
    int rc = 1;

    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            s_usage(stdout);
            return 0;
        }
        if (strcmp(argv[i], "--version") == 0) {
            printf("linli-analytics %s\n", LINLI_VERSION);
            return 0;
        }
        s_usage(stderr);
        return 2;
    }
    log_init("analytics", log_level_parse(config_get("LINLI_LOG_LEVEL", "info")));
    if (config_load() < 0 || analytics_opts_from_config(&opts) < 0)
        goto cleanup;
    /* The file may set the level too; the environment still wins. */
    log_init("analytics", log_level_parse(config_get("LINLI_LOG_LEVEL", "info")));
    base = event_base_new();
    if (!base || !(a = analytics_new(base, &opts)))
        goto cleanup;
    sigterm = evsignal_new(base, SIGTERM, s_on_signal, a);
    sigint = evsignal_new(base, SIGINT, s_on_signal, a);
    if (!sigterm || !sigint || event_add(sigterm, NULL) < 0 || event_add(sigint, NULL) < 0)
        goto cleanup;
    signal(SIGPIPE, SIG_IGN);  /* hiredis write()s: a closed peer is an error, not a death */
    if (event_base_dispatch(base) < 0)
        goto cleanup;
    log_info("main", "stopped");
    rc = 0;
cleanup:
    if (sigterm)
        event_free(sigterm);
    if (sigint)
        event_free(sigint);
    analytics_destroy(&a);
    if (base)
        event_base_free(base);
    return rc;
}
