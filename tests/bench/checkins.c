/* Load generator for scripts/bench/checkins: drives registrations, sign-ups
 * and check-ins through the registry's command endpoint from many
 * concurrent clients, each keeping a window of commands in flight, and
 * reports acknowledged commands/s (a reply means committed), p50/p99
 * acknowledgement latency, and the lag until the counts show in Redis.
 *
 *   checkins ENDPOINT REDIS PREFIX [clients] [window] [people]
 */
#include "bench.h"
#include "cmdcli.h"
#include "counters.h"
#include "envelope.h"
#include "pbjson.h"
#include "util.h"

#include <dirent.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

#define S_CLIENTS_PER_THREAD 8   /* clients one load thread drives */

typedef enum { PHASE_REGISTER, PHASE_SIGN_UP, PHASE_SCAN } s_phase_t;
static const char *const s_names[] = { "register_person", "sign_up", "scan" };

typedef struct {
    const char *endpoint;
    s_phase_t phase;
    int64_t community_id, activity_id;
    const char *token;
    int64_t *people;          /* this client's slice; filled in by PHASE_REGISTER */
    int n, window, client_no;
    int round;                /* scan round: 0 the signed-up activity, then walk-ins */
    int64_t *lat_us;          /* out: one latency per command */
    int ok, failed;
    uint8_t **msg;            /* the commands, encoded before the phase */
    size_t *len;
    void *zs;                 /* DEALER */
    int64_t *sent_at;
    int next, done;           /* sent, answered */
} s_client_t;

static void *s_zctx;
static int64_t s_last_ack_ms; /* wall clock of the last acknowledgement */

/* The i-th command of the client's phase, encoded. Built field by field, as
 * a client from proto/ would, and before the phase is timed, so the load
 * generator spends its share of the machine on sending and receiving. The
 * index rides in the id, so a reply finds its send time at once. */
static uint8_t *s_encode(const s_client_t *c, int i, size_t *len)
{
    char id[37], key[64], type[40], name[48], device[16];
    snprintf(id, sizeof id, "00000000-0000-4000-8000-%012x", (unsigned)i);
    snprintf(key, sizeof key, "bench-%d-%s%d-%d-%d", (int)getpid(), s_names[c->phase], c->round,
             c->client_no, i);
    snprintf(type, sizeof type, "registry.%s", s_names[c->phase]);
    Linli__Command cmd = LINLI__COMMAND__INIT;
    Linli__RegisterPerson reg = LINLI__REGISTER_PERSON__INIT;
    Linli__SignUp sign = LINLI__SIGN_UP__INIT;
    Linli__Scan scan = LINLI__SCAN__INIT;
    Linli__Role role = LINLI__ROLE__ROLE_RESIDENT;
    int64_t person = c->people[i];
    switch (c->phase) {
    case PHASE_REGISTER:
        snprintf(name, sizeof name, "居民-%d-%d", c->client_no, i);
        reg.community_id = c->community_id;
        reg.name = name;
        reg.n_roles = 1;
        reg.roles = &role;
        cmd.command_case = LINLI__COMMAND__COMMAND_REGISTER_PERSON;
        cmd.register_person = &reg;
        break;
    case PHASE_SIGN_UP:
        sign.activity_id = c->activity_id;
        sign.n_person_ids = 1;
        sign.person_ids = &person;
        cmd.command_case = LINLI__COMMAND__COMMAND_SIGN_UP;
        cmd.sign_up = &sign;
        break;
    case PHASE_SCAN:
        snprintf(device, sizeof device, "gate-%d-%d", c->round, c->client_no);
        scan.token = (char *)c->token;
        scan.person_id = person;
        scan.device_id = device;
        scan.counter = (uint64_t)i + 1;
        cmd.command_case = LINLI__COMMAND__COMMAND_SCAN;
        cmd.scan = &scan;
        break;
    }
    Linli__Envelope env = LINLI__ENVELOPE__INIT;
    env.id = id;
    env.idempotency_key = key;
    env.source = (char *)"bench";
    env.type = type;
    env.occurred_at = now_ms();
    env.payload_case = LINLI__ENVELOPE__PAYLOAD_COMMAND;
    env.command = &cmd;
    return envelope_encode(&env, len);
}

/* One client's sending: its window refilled from the commands encoded
 * before the phase began. */
static void s_fill(s_client_t *c)
{
    while (c->next < c->n && c->next - c->done < c->window) {
        c->sent_at[c->next] = mono_us();
        zmq_send(c->zs, c->msg[c->next], c->len[c->next], 0);
        c->next++;
    }
}

/* Every reply that is there for one client. */
static void s_replies(s_client_t *c)
{
    for (;;) {
        Linli__Envelope *r;
        int idx, got = bench_reply(c->zs, c->n, &r, &idx);
        if (got < 0)
            break;
        if (got == 0)
            continue;
        if (c->lat_us[idx] == 0) {
            c->lat_us[idx] = mono_us() - c->sent_at[idx];
            if (r->reply->ok) {
                c->ok++;
                if (c->phase == PHASE_REGISTER && r->reply->register_person)
                    c->people[idx] = r->reply->register_person->id;
            } else if (c->failed++ < 3) {
                fprintf(stderr, "bench: %s refused: %s\n", s_names[c->phase],
                        r->reply->error ? r->reply->error->code : "?");
            }
            c->done++;
        }
        linli__envelope__free_unpacked(r, NULL);
    }
}

/* A thread drives several clients, each on a DEALER socket of its own with
 * its window of commands in flight, as gates on other machines would: one
 * thread per core's worth of clients keeps the load generator's own share
 * of a small machine down to sending and receiving. */
typedef struct {
    s_client_t *cl;
    int n;
} s_group_t;

static void *s_run(void *arg)
{
    s_group_t *g = arg;
    zmq_pollitem_t *items = xcalloc((size_t)g->n, sizeof *items);
    for (int k = 0; k < g->n; k++) {
        s_client_t *c = &g->cl[k];
        c->zs = zmq_socket(s_zctx, ZMQ_DEALER);
        int linger = 0;
        zmq_setsockopt(c->zs, ZMQ_LINGER, &linger, sizeof linger);
        zmq_connect(c->zs, c->endpoint);
        c->sent_at = xcalloc((size_t)c->n, sizeof *c->sent_at);
        items[k] = (zmq_pollitem_t){ c->zs, 0, ZMQ_POLLIN, 0 };
    }
    for (;;) {
        int busy = 0;
        for (int k = 0; k < g->n; k++) {
            s_fill(&g->cl[k]);
            busy += g->cl[k].done < g->cl[k].n;
        }
        if (!busy)
            break;
        int ready = zmq_poll(items, g->n, 30000);
        if (ready < 0 && errno == EINTR)
            continue;
        if (ready <= 0) {
            for (int k = 0; k < g->n; k++) {
                s_client_t *c = &g->cl[k];
                if (c->done < c->n) {
                    fprintf(stderr, "bench: no reply for 30 s, giving up on client %d\n",
                            c->client_no);
                    c->failed += c->n - c->done;
                }
            }
            break;
        }
        for (int k = 0; k < g->n; k++)
            if (items[k].revents & ZMQ_POLLIN)
                s_replies(&g->cl[k]);
    }
    for (int k = 0; k < g->n; k++) {
        free(g->cl[k].sent_at);
        zmq_close(g->cl[k].zs);
    }
    free(items);
    return NULL;
}

/* ---- where the CPU goes: BENCH_WATCH="name=pid[+],..." names processes
 * whose CPU time each phase reports per command; "+" counts the process's
 * children too (PostgreSQL's backends). The load generator counts itself,
 * and the machine's busy time counts everything. */

#define S_WATCH_MAX 8

typedef struct {
    char name[24];
    int pid;
    bool tree;
} s_watch_t;

static s_watch_t s_watch[S_WATCH_MAX];
static int s_nwatch;

/* utime + stime of pid in clock ticks (with cutime + cstime, the reaped
 * children's, when reaped is set), and its parent's pid; -1 when gone. */
static long long s_proc_ticks(int pid, int *ppid, bool reaped)
{
    char path[64], buf[1024];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    const char *p = strrchr(buf, ')');   /* the name may hold spaces */
    long long utime = 0, stime = 0, cutime = 0, cstime = 0;
    int parent = 0;
    if (!p || sscanf(p + 2, "%*c %d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lld %lld %lld %lld",
                     &parent, &utime, &stime, &cutime, &cstime) != 5)
        return -1;
    if (ppid)
        *ppid = parent;
    return utime + stime + (reaped ? cutime + cstime : 0);
}

/* The ticks of watch w, with its children's when it is a tree: those
 * running and those that ended (a backend that exits between two looks
 * moves from the one to the other). */
static long long s_watch_ticks(const s_watch_t *w)
{
    long long t = s_proc_ticks(w->pid, NULL, w->tree);
    if (t < 0 || !w->tree)
        return t;
    DIR *d = opendir("/proc");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        int pid = atoi(e->d_name), ppid = 0;
        long long c;
        if (pid > 0 && (c = s_proc_ticks(pid, &ppid, false)) >= 0 && ppid == w->pid)
            t += c;
    }
    if (d)
        closedir(d);
    return t;
}

/* Busy ticks of the whole machine (all but idle and iowait). */
static long long s_machine_ticks(void)
{
    FILE *f = fopen("/proc/stat", "r");
    long long v[8] = { 0 };
    if (!f)
        return 0;
    int n = fscanf(f, "cpu %lld %lld %lld %lld %lld %lld %lld %lld", &v[0], &v[1], &v[2],
                   &v[3], &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    return n == 8 ? v[0] + v[1] + v[2] + v[5] + v[6] + v[7] : 0;
}

static void s_watch_parse(const char *spec)
{
    while (spec && *spec && s_nwatch < S_WATCH_MAX) {
        s_watch_t *w = &s_watch[s_nwatch];
        const char *eq = strchr(spec, '='), *end = strchr(spec, ',');
        if (!end)
            end = spec + strlen(spec);
        if (eq && eq < end && (size_t)(eq - spec) < sizeof w->name) {
            memcpy(w->name, spec, (size_t)(eq - spec));
            w->name[eq - spec] = '\0';
            w->pid = atoi(eq + 1);
            w->tree = end > eq + 1 && end[-1] == '+';
            if (w->pid > 0)
                s_nwatch++;
        }
        spec = *end ? end + 1 : end;
    }
}

typedef struct {
    long long w[S_WATCH_MAX], self, machine;
} s_ticks_t;

static void s_ticks_now(s_ticks_t *t)
{
    for (int i = 0; i < s_nwatch; i++)
        t->w[i] = s_watch_ticks(&s_watch[i]);
    t->self = s_proc_ticks(getpid(), NULL, false);
    t->machine = s_machine_ticks();
}

/* "cpu per command: postgres 61 us, ..., machine 125 us (97% of 2 cores)" */
static void s_ticks_print(const s_ticks_t *a, const s_ticks_t *b, int commands, double secs)
{
    double us = 1e6 / (double)sysconf(_SC_CLK_TCK) / (commands > 0 ? commands : 1);
    printf("  cpu per command:");
    for (int i = 0; i < s_nwatch; i++)
        if (a->w[i] >= 0 && b->w[i] >= 0)
            printf(" %s %.0f us,", s_watch[i].name, (double)(b->w[i] - a->w[i]) * us);
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    double busy = (double)(b->machine - a->machine) / (double)sysconf(_SC_CLK_TCK);
    printf(" load generator %.0f us, machine %.0f us (%.0f%% of %ld cores busy)\n",
           (double)(b->self - a->self) * us, (double)(b->machine - a->machine) * us,
           secs > 0 ? 100.0 * busy / (secs * (double)ncpu) : 0.0, ncpu);
}

static int s_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static int s_cmp(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

/* Runs one phase over n people with nclients clients; prints the figures
 * under label and stores the rate in *rate. */
static int s_phase(const char *endpoint, s_phase_t phase, int round, const char *label,
                   int64_t cid, int64_t aid, const char *token, int64_t *people, int n,
                   int nclients, int window, double *rate)
{
    s_client_t *cl = xcalloc((size_t)nclients, sizeof *cl);
    int nthreads = (nclients + S_CLIENTS_PER_THREAD - 1) / S_CLIENTS_PER_THREAD;
    pthread_t *th = xcalloc((size_t)nthreads, sizeof *th);
    s_group_t *groups = xcalloc((size_t)nthreads, sizeof *groups);
    int64_t *lat = xcalloc((size_t)n, sizeof *lat);
    int per = n / nclients;
    for (int i = 0; i < nclients; i++) {
        int from = i * per, count = i == nclients - 1 ? n - from : per;
        cl[i] = (s_client_t){ .endpoint = endpoint, .phase = phase, .community_id = cid,
                              .activity_id = aid, .token = token, .people = people + from,
                              .n = count, .window = window, .client_no = i, .round = round,
                              .lat_us = lat + from };
        cl[i].msg = xcalloc((size_t)count, sizeof *cl[i].msg);
        cl[i].len = xcalloc((size_t)count, sizeof *cl[i].len);
        for (int k = 0; k < count; k++)
            cl[i].msg[k] = s_encode(&cl[i], k, &cl[i].len[k]);
    }
    s_ticks_t ticks0, ticks1;
    s_ticks_now(&ticks0);
    int64_t t0 = mono_us();
    for (int t = 0; t < nthreads; t++) {
        int from = t * S_CLIENTS_PER_THREAD;
        groups[t] = (s_group_t){ cl + from, nclients - from < S_CLIENTS_PER_THREAD
                                                ? nclients - from : S_CLIENTS_PER_THREAD };
        pthread_create(&th[t], NULL, s_run, &groups[t]);
    }
    int ok = 0, failed = 0;
    for (int t = 0; t < nthreads; t++)
        pthread_join(th[t], NULL);
    s_last_ack_ms = now_ms();   /* the last thread ended on its last reply */
    double secs = (double)(mono_us() - t0) / 1e6;
    s_ticks_now(&ticks1);
    for (int i = 0; i < nclients; i++) {
        ok += cl[i].ok;
        failed += cl[i].failed;
        for (int k = 0; k < cl[i].n; k++)
            free(cl[i].msg[k]);
        free(cl[i].msg);
        free(cl[i].len);
    }
    qsort(lat, (size_t)n, sizeof *lat, s_cmp);
    printf("%-16s %7d ok %5d refused in %6.2f s: %8.0f acknowledged/s   p50 %7.2f ms   p99 %7.2f ms\n",
           label, ok, failed, secs, ok / secs, lat[n / 2] / 1000.0,
           lat[(n * 99) / 100] / 1000.0);
    s_ticks_print(&ticks0, &ticks1, n, secs);
    *rate = ok / secs;
    fflush(stdout);
    free(cl);
    free(th);
    free(groups);
    free(lat);
    return failed;
}

/* One blocking command for the set-up; returns its result object (caller
 * decrefs) or exits. */
static json_t *s_call(const char *endpoint, const char *name, const char *args)
{
    char *text = xasprintf("{\"%s\": %s}", name, args);
    char err[200];
    Linli__Command *cmd = (Linli__Command *)pbjson_parse(&linli__command__descriptor, text,
                                                         strlen(text), err, sizeof err);
    free(text);
    if (!cmd) {
        fprintf(stderr, "bench: %s\n", err);
        exit(2);
    }
    Linli__Envelope *env = cmdcli_envelope("registry", "bench", NULL, 0, cmd);
    Linli__Envelope *reply = NULL;
    if (cmdcli_call(s_zctx, endpoint, env, 30000, &reply) != 0 || !reply->reply->ok) {
        fprintf(stderr, "bench: set-up command %s failed: %s\n", name,
                reply && reply->reply->error ? reply->reply->error->message : "no reply");
        exit(2);
    }
    json_t *j = pbjson_from_message(&reply->reply->base);
    json_t *res = json_incref(json_object_get(j, name));
    json_decref(j);
    protobuf_c_message_free_unpacked(&env->base, NULL);
    envelope_free(&reply);
    return res;
}

static int64_t s_call_id(const char *endpoint, const char *name, const char *args)
{
    json_t *res = s_call(endpoint, name, args);
    int64_t id = json_integer_value(json_object_get(res, "id"));
    json_decref(res);
    return id;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: checkins ENDPOINT REDIS PREFIX [clients] [window] [people] "
                        "[scan rounds]\n");
        return 2;
    }
    const char *endpoint = argv[1], *redis = argv[2], *prefix = argv[3];
    int nclients = argc > 4 ? atoi(argv[4]) : 16;
    int window = argc > 5 ? atoi(argv[5]) : 64;
    int n = argc > 6 ? atoi(argv[6]) : 100000;
    int rounds = argc > 7 ? atoi(argv[7]) : 3;
    if (nclients < 1 || window < 1 || n < nclients || rounds < 1 || rounds > 16) {
        fprintf(stderr, "bench: need clients >= 1, window >= 1, people >= clients, "
                        "1 to 16 scan rounds\n");
        return 2;
    }
    s_watch_parse(getenv("BENCH_WATCH"));
    s_zctx = zmq_ctx_new();
    char args[512];
    int64_t start = now_ms() + 86400000LL;
    int64_t cid = s_call_id(endpoint, "create_community",
                            "{\"name\":\"江翠社区 (bench)\",\"district\":\"江海区\",\"city\":\"江门\"}");
    snprintf(args, sizeof args,
             "{\"community_id\":%" PRId64 ",\"title\":\"邻里公益集市\",\"place\":\"江海广场\","
             "\"starts_at\":%" PRId64 ",\"ends_at\":%" PRId64 ",\"capacity\":1000000}",
             cid, start, (int64_t)(start + 8 * 3600000LL));
    int64_t aid = s_call_id(endpoint, "create_activity", args);
    snprintf(args, sizeof args, "{\"activity_id\":%" PRId64 ",\"valid_seconds\":86400}", aid);
    json_t *tok = s_call(endpoint, "issue_token", args);
    char *token = xstrdup(json_string_value(json_object_get(tok, "token")));
    json_decref(tok);
    if (!token) {
        fprintf(stderr, "bench: issue_token returned no token\n");
        return 2;
    }
    printf("community %" PRId64 ", activity %" PRId64 ", %d people, %d clients x window %d\n",
           cid, aid, n, nclients, window);

    int64_t *people = xcalloc((size_t)n, sizeof *people);
    double rate[16];
    int bad = s_phase(endpoint, PHASE_REGISTER, 0, "register_person", cid, aid, token, people, n,
                      nclients, window, &rate[0]);
    bad += s_phase(endpoint, PHASE_SIGN_UP, 0, "sign_up", cid, aid, token, people, n, nclients,
                   window, &rate[0]);
    bad += s_phase(endpoint, PHASE_SCAN, 0, "scan", cid, aid, token, people, n, nclients, window,
                   &rate[0]);
    int64_t acked_at = s_last_ack_ms;

    /* How long after the last acknowledgement the check-ins show in Redis. */
    redisContext *rc = counters_connect(redis, 2000);
    char key[COUNTERS_KEY_MAX];
    counters_key_activity(key, sizeof key, prefix, cid, aid, "checkins");
    long long seen = -1;
    int64_t deadline = now_ms() + 60000;
    while (rc && now_ms() < deadline) {
        redisReply *r = redisCommand(rc, "GET %s", key);
        seen = r && r->type == REDIS_REPLY_STRING ? atoll(r->str) : 0;
        if (r)
            freeReplyObject(r);
        if (seen >= n)
            break;
        usleep(2000);
    }
    if (seen >= n)
        printf("redis lag          %7lld check-ins visible %lld ms after the last acknowledgement\n",
               seen, (long long)(now_ms() - acked_at));
    else
        printf("redis lag          only %lld of %d check-ins visible after 60 s\n", seen, n);
    if (rc)
        redisFree(rc);

    /* More scan rounds, each at a walk-in activity of its own, since one
     * round on a shared machine can be off by a third: the median is the
     * figure. */
    for (int r = 1; r < rounds; r++) {
        snprintf(args, sizeof args,
                 "{\"community_id\":%" PRId64 ",\"title\":\"邻里公益集市 第%d场\",\"place\":\"江海广场\","
                 "\"starts_at\":%" PRId64 ",\"ends_at\":%" PRId64 ",\"capacity\":1000000,"
                 "\"walk_in\":true}", cid, r + 1, start, (int64_t)(start + 8 * 3600000LL));
        int64_t raid = s_call_id(endpoint, "create_activity", args);
        snprintf(args, sizeof args, "{\"activity_id\":%" PRId64 ",\"valid_seconds\":86400}", raid);
        json_t *rt = s_call(endpoint, "issue_token", args);
        char label[32];
        snprintf(label, sizeof label, "scan, walk-in %d", r);
        bad += s_phase(endpoint, PHASE_SCAN, r, label, cid, raid,
                       json_string_value(json_object_get(rt, "token")), people, n, nclients,
                       window, &rate[r]);
        json_decref(rt);
    }
    if (rounds > 1) {
        qsort(rate, (size_t)rounds, sizeof *rate, s_cmp_double);
        printf("scan, median of %d rounds %8.0f acknowledged/s (lowest %.0f, highest %.0f)\n",
               rounds, rate[rounds / 2], rate[0], rate[rounds - 1]);
    }
    free(people);
    free(token);
    zmq_ctx_term(s_zctx);
    return bad || seen < n ? 1 : 0;
}
