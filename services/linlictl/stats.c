/* linlictl stats: live counts straight from Redis, through the key scheme in
 * common/counters.h that the analytics daemon writes. */
#include "counters.h"
#include "config.h"
#include "ctl.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int ctl_stats(const ctl_opts_t *o, int argc, char **argv)
{
    long long community = 0, activity = 0;
    int as_json = 0;
    for (int i = 0; i < argc; i++) {
        if (!strcmp(argv[i], "--json"))
            as_json = 1;
        else if (!strcmp(argv[i], "--community") && i + 1 < argc)
            community = atoll(argv[++i]);
        else if (!strcmp(argv[i], "--activity") && i + 1 < argc)
            activity = atoll(argv[++i]);
        else {
            fprintf(stderr, "usage: linlictl stats [--community ID] [--activity ID] [--json]\n");
            return 2;
        }
    }
    const char *prefix;
    if (counters_config_prefix(&prefix) != 0)
        return 2;
    redisContext *c = counters_connect(config_get("LINLI_REDIS", "127.0.0.1:6379"),
                                       o->timeout_ms);
    if (!c)
        return 2;
    counters_view_t v;
    int rc = 2;
    if (counters_read(c, prefix, community, activity, &v) == 0) {
        if (as_json) {
            json_t *j = counters_to_json(&v);
            char *text = json_dumps(j, JSON_INDENT(2));
            printf("%s\n", text ? text : "{}");
            free(text);
            json_decref(j);
        } else {
            counters_print(stdout, &v);
        }
        rc = 0;
    }
    redisFree(c);
    return rc;
}
