/* Load generator for scripts/bench/ledger: drives gifts and spends through
 * the timebank's command endpoint from many concurrent clients, each
 * keeping a window of commands in flight, and reports acknowledged
 * movements and postings per second (a reply means committed; a posting is
 * one ledger entry, a movement within a community has two and one between
 * communities four) with p50/p99 acknowledgement latency: once spread over
 * every member, once with all traffic on ten hot accounts. Then it checks
 * the ledger's invariants in the database.
 *
 *   ledger REGISTRY TIMEBANK PGCONN [clients] [window] [people] [movements] [rounds]
 */
#include "bench.h"
#include "cmdcli.h"
#include "envelope.h"
#include "pbjson.h"
#include "util.h"

#include <inttypes.h>
#include <libpq-fe.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zmq.h>

typedef enum { PHASE_REGISTER, PHASE_RECORD, PHASE_APPROVE, PHASE_MOVE } s_phase_t;
static const char *const s_names[] = { "register_person", "record_hours", "approve_hours",
                                       "move" };

typedef struct {
    const char *endpoint;
    s_phase_t phase;
    int64_t community_id[2];  /* PHASE_REGISTER: people alternate between them */
    int64_t organiser[2];
    int64_t *people;          /* all people (PHASE_MOVE picks from them) */
    int npeople;              /* PHASE_MOVE: pick among the first npeople */
    int64_t *ids;             /* this client's slice: people, then record ids */
    int n, window, client_no, round;
    unsigned seed;
    int64_t *lat_us;          /* out: one latency per command */
    int ok, failed;
    char refusals[4][40];     /* the first codes seen */
} s_client_t;

static void *s_zctx;

static int64_t s_pick(s_client_t *c)
{
    return c->people[rand_r(&c->seed) % (unsigned)c->npeople];
}

/* The i-th command of the client's phase, built field by field from proto/. */
static uint8_t *s_encode(s_client_t *c, int i, size_t *len)
{
    char id[37], key[80], type[40], name[48];
    snprintf(id, sizeof id, "00000000-0000-4000-8000-%012x", (unsigned)i);
    snprintf(key, sizeof key, "bench-%d-%s%d-%d-%d", (int)getpid(), s_names[c->phase], c->round,
             c->client_no, i);
    Linli__Command cmd = LINLI__COMMAND__INIT;
    Linli__RegisterPerson reg = LINLI__REGISTER_PERSON__INIT;
    Linli__RecordHours rec = LINLI__RECORD_HOURS__INIT;
    Linli__ApproveHours app = LINLI__APPROVE_HOURS__INIT;
    Linli__Gift gift = LINLI__GIFT__INIT;
    Linli__Spend spend = LINLI__SPEND__INIT;
    Linli__Role role = LINLI__ROLE__ROLE_VOLUNTEER;
    const char *service = "timebank";
    switch (c->phase) {
    case PHASE_REGISTER:
        service = "registry";
        snprintf(name, sizeof name, "志愿者-%d-%d", c->client_no, i);
        reg.community_id = c->community_id[i % 2];
        reg.name = name;
        reg.n_roles = 1;
        reg.roles = &role;
        cmd.command_case = LINLI__COMMAND__COMMAND_REGISTER_PERSON;
        cmd.register_person = &reg;
        break;
    case PHASE_RECORD:
        /* people alternate between the communities and every slice starts
         * at an even index, so person i of a slice is in community i % 2 */
        rec.actor_id = c->organiser[i % 2];
        rec.person_id = c->ids[i];
        rec.minutes = 600;
        rec.started_at = now_ms() - 86400000LL - (int64_t)(i % 1000) * 1000;
        rec.field = (char *)"elderly care";
        cmd.command_case = LINLI__COMMAND__COMMAND_RECORD_HOURS;
        cmd.record_hours = &rec;
        break;
    case PHASE_APPROVE:
        app.actor_id = c->organiser[i % 2];
        app.record_id = c->ids[i];
        cmd.command_case = LINLI__COMMAND__COMMAND_APPROVE_HOURS;
        cmd.approve_hours = &app;
        break;
    case PHASE_MOVE: {
        int64_t a = s_pick(c), b = s_pick(c);
        while (b == a)
            b = s_pick(c);
        unsigned x = rand_r(&c->seed) % 100;
        uint32_t minutes = 1 + rand_r(&c->seed) % 15;
        if (x < 60) {
            gift.from_person_id = a;
            gift.to_person_id = b;
            gift.minutes = minutes;
            cmd.command_case = LINLI__COMMAND__COMMAND_GIFT;
            cmd.gift = &gift;
        } else {
            spend.person_id = a;
            /* on the hot accounts every spend pays one of them, so their
             * hours stay among them */
            if (x < 90 || c->npeople <= 10)
                spend.provider_id = b;
            spend.minutes = minutes;
            spend.service = (char *)"home repair";
            cmd.command_case = LINLI__COMMAND__COMMAND_SPEND;
            cmd.spend = &spend;
        }
        break;
    }
    }
    snprintf(type, sizeof type, "%s.%s", service, envelope_command_name(&cmd));
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

static void *s_run(void *arg)
{
    s_client_t *c = arg;
    void *zs = zmq_socket(s_zctx, ZMQ_DEALER);
    int linger = 0;
    zmq_setsockopt(zs, ZMQ_LINGER, &linger, sizeof linger);
    zmq_connect(zs, c->endpoint);
    int64_t *sent_at = xcalloc((size_t)c->n, sizeof *sent_at);
    int next = 0, done = 0, nref = 0;
    while (done < c->n) {
        while (next < c->n && next - done < c->window) {
            size_t len;
            uint8_t *buf = s_encode(c, next, &len);
            sent_at[next] = mono_us();
            zmq_send(zs, buf, len, 0);
            free(buf);
            next++;
        }
        zmq_pollitem_t item = { zs, 0, ZMQ_POLLIN, 0 };
        if (zmq_poll(&item, 1, 30000) <= 0) {
            fprintf(stderr, "bench: no reply for 30 s, giving up on client %d\n", c->client_no);
            c->failed += c->n - done;
            break;
        }
        for (;;) {
            Linli__Envelope *r;
            int idx, got = bench_reply(zs, c->n, &r, &idx);
            if (got < 0)
                break;
            if (got == 0)
                continue;
            if (c->lat_us[idx] == 0) {
                c->lat_us[idx] = mono_us() - sent_at[idx];
                if (r->reply->ok) {
                    c->ok++;
                    if (c->phase == PHASE_REGISTER && r->reply->register_person)
                        c->ids[idx] = r->reply->register_person->id;
                    if (c->phase == PHASE_RECORD && r->reply->record_hours)
                        c->ids[idx] = r->reply->record_hours->record_id;
                } else {
                    c->failed++;
                    const char *code = r->reply->error ? r->reply->error->code : "?";
                    int k = 0;
                    while (k < nref && strcmp(c->refusals[k], code) != 0)
                        k++;
                    if (k == nref && nref < 4)
                        snprintf(c->refusals[nref++], sizeof c->refusals[0], "%s", code);
                }
                done++;
            }
            linli__envelope__free_unpacked(r, NULL);
        }
    }
    free(sent_at);
    zmq_close(zs);
    return NULL;
}

static int s_cmp(const void *a, const void *b)
{
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return x < y ? -1 : x > y;
}

static int s_cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static long long s_count(PGconn *pg, const char *sql)
{
    PGresult *res = PQexec(pg, sql);
    long long v = -1;
    if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
        v = atoll(PQgetvalue(res, 0, 0));
    else
        fprintf(stderr, "bench: %s: %s", sql, PQerrorMessage(pg));
    PQclear(res);
    return v;
}

typedef struct {
    s_phase_t phase;
    int round;
    int64_t cid[2], org[2];
    int64_t *people;
    int npeople;
    int64_t *ids;          /* per command: input and output ids (phases before PHASE_MOVE) */
} s_run_t;

/* Runs n commands of one phase with nclients clients; prints the figures
 * under label. Returns the acknowledged count; *rate gets them per second. */
static int s_phase(const char *endpoint, const s_run_t *run, const char *label, int n,
                   int nclients, int window, PGconn *pg, double *rate)
{
    s_client_t *cl = xcalloc((size_t)nclients, sizeof *cl);
    pthread_t *th = xcalloc((size_t)nclients, sizeof *th);
    int64_t *lat = xcalloc((size_t)n, sizeof *lat);
    int per = n / nclients;
    if (per % 2)
        per--;   /* even slices keep the people's communities in step */
    long long entries0 = pg ? s_count(pg, "SELECT count(*) FROM timebank.entries") : 0;
    int64_t t0 = mono_us();
    for (int i = 0; i < nclients; i++) {
        int from = i * per, count = i == nclients - 1 ? n - from : per;
        cl[i] = (s_client_t){ .endpoint = endpoint, .phase = run->phase,
                              .community_id = { run->cid[0], run->cid[1] },
                              .organiser = { run->org[0], run->org[1] },
                              .people = run->people, .npeople = run->npeople,
                              .ids = run->ids ? run->ids + from : NULL, .n = count,
                              .window = window, .client_no = i, .round = run->round,
                              .seed = 7919u * (unsigned)(i + 1) + (unsigned)run->round,
                              .lat_us = lat + from };
        pthread_create(&th[i], NULL, s_run, &cl[i]);
    }
    int ok = 0, failed = 0;
    char codes[256] = "";
    for (int i = 0; i < nclients; i++) {
        pthread_join(th[i], NULL);
        ok += cl[i].ok;
        failed += cl[i].failed;
        for (int k = 0; k < 4 && cl[i].refusals[k][0]; k++)
            if (!strstr(codes, cl[i].refusals[k]) && strlen(codes) + 42 < sizeof codes)
                strcat(strcat(codes, " "), cl[i].refusals[k]);
    }
    double secs = (double)(mono_us() - t0) / 1e6;
    qsort(lat, (size_t)n, sizeof *lat, s_cmp);
    printf("%-22s %7d ok %5d refused in %6.2f s: %8.0f acknowledged/s   p50 %7.2f ms   p99 %7.2f ms\n",
           label, ok, failed, secs, ok / secs, lat[n / 2] / 1000.0,
           lat[(n * 99) / 100] / 1000.0);
    if (failed)
        printf("%-22s refused:%s\n", "", codes);
    if (pg) {
        long long entries = s_count(pg, "SELECT count(*) FROM timebank.entries") - entries0;
        printf("%-22s %7lld postings (ledger entries): %8.0f postings/s\n", "", entries,
               (double)entries / secs);
        *rate = (double)entries / secs;
    } else {
        *rate = ok / secs;
    }
    fflush(stdout);
    free(cl);
    free(th);
    free(lat);
    return ok;
}

static json_t *s_call(const char *service, const char *endpoint, const char *name,
                      const char *args)
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
    Linli__Envelope *env = cmdcli_envelope(service, "bench", NULL, 0, cmd);
    Linli__Envelope *reply = NULL;
    if (cmdcli_call(s_zctx, endpoint, env, 30000, &reply) != 0) {
        fprintf(stderr, "bench: %s got no reply\n", name);
        exit(2);
    }
    json_t *j = pbjson_from_message(&reply->reply->base);
    json_t *res = reply->reply->ok ? json_incref(json_object_get(j, name)) : NULL;
    json_decref(j);
    protobuf_c_message_free_unpacked(&env->base, NULL);
    envelope_free(&reply);
    return res;
}

static int64_t s_call_id(const char *endpoint, const char *name, const char *args)
{
    json_t *res = s_call("registry", endpoint, name, args);
    if (!res) {
        fprintf(stderr, "bench: set-up command %s failed\n", name);
        exit(2);
    }
    int64_t id = json_integer_value(json_object_get(res, "id"));
    json_decref(res);
    return id;
}

/* The ledger's invariants, in the database; prints each and returns how
 * many failed. */
static int s_invariants(PGconn *pg, long long acked, const char *keys)
{
    struct {
        const char *what, *sql;
    } checks[] = {
        { "every balance is the sum of its entries",
          "SELECT count(*) FROM timebank.accounts a WHERE a.balance <> coalesce("
          "(SELECT sum(amount) FROM timebank.entries e WHERE e.account_id = a.id), 0)" },
        { "every movement balances to zero",
          "SELECT count(*) FROM (SELECT transfer_id FROM timebank.entries GROUP BY 1"
          " HAVING sum(amount) <> 0) x" },
        { "no member below its limit",
          "SELECT count(*) FROM timebank.accounts a JOIN timebank.rules r"
          " ON r.community_id = a.community_id"
          " WHERE a.kind = 'person' AND a.balance < -r.overdraft_minutes" },
        { "running balances follow the entries",
          "SELECT count(*) FROM (SELECT balance, sum(amount) OVER (PARTITION BY account_id"
          " ORDER BY id) AS run FROM timebank.entries) x WHERE balance <> run" },
    };
    int bad = 0;
    for (size_t i = 0; i < sizeof checks / sizeof checks[0]; i++) {
        long long v = s_count(pg, checks[i].sql);
        printf("invariant: %-42s %s\n", checks[i].what, v == 0 ? "ok" : "BROKEN");
        bad += v != 0;
    }
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM timebank.transfers WHERE command_key LIKE '%s'", keys);
    long long in_ledger = s_count(pg, sql);
    printf("invariant: %-42s %s (%lld acknowledged, %lld in the ledger)\n",
           "every acknowledged movement once", in_ledger == acked ? "ok" : "BROKEN", acked,
           in_ledger);
    bad += in_ledger != acked;
    return bad;
}

int main(int argc, char **argv)
{
    if (argc < 4) {
        fprintf(stderr, "usage: ledger REGISTRY TIMEBANK PGCONN [clients] [window] [people] "
                        "[movements] [rounds]\n");
        return 2;
    }
    const char *registry = argv[1], *timebank = argv[2], *conninfo = argv[3];
    int nclients = argc > 4 ? atoi(argv[4]) : 16;
    int window = argc > 5 ? atoi(argv[5]) : 64;
    int n = argc > 6 ? atoi(argv[6]) : 10000;
    int moves = argc > 7 ? atoi(argv[7]) : 100000;
    int rounds = argc > 8 ? atoi(argv[8]) : 3;
    if (nclients < 1 || window < 1 || n < 2 * nclients || n < 20 || moves < nclients ||
        rounds < 1 || rounds > 16) {
        fprintf(stderr, "bench: need clients >= 1, window >= 1, people >= 2 x clients and >= 20, "
                        "movements >= clients, 1 to 16 rounds\n");
        return 2;
    }
    n -= n % 2;
    s_zctx = zmq_ctx_new();
    PGconn *pg = PQconnectdb(conninfo);
    if (PQstatus(pg) != CONNECTION_OK) {
        fprintf(stderr, "bench: %s", PQerrorMessage(pg));
        return 2;
    }
    s_run_t run = { 0 };
    run.cid[0] = s_call_id(registry, "create_community",
                           "{\"name\":\"江翠社区 (bench)\",\"district\":\"江海区\",\"city\":\"江门\"}");
    run.cid[1] = s_call_id(registry, "create_community",
                           "{\"name\":\"新中社区 (bench)\",\"district\":\"江海区\",\"city\":\"江门\"}");
    char args[256];
    for (int k = 0; k < 2; k++) {
        snprintf(args, sizeof args, "{\"community_id\":%" PRId64 ",\"name\":\"组织者 %d\","
                 "\"roles\":[\"ROLE_ORGANISER\"]}", run.cid[k], k);
        run.org[k] = s_call_id(registry, "register_person", args);
    }
    printf("communities %" PRId64 " and %" PRId64 ", %d people, %d clients x window %d\n",
           run.cid[0], run.cid[1], n, nclients, window);
    int64_t *people = xcalloc((size_t)n, sizeof *people);
    int64_t *records = xcalloc((size_t)n, sizeof *records);
    double rate[16], hot[16];
    run.phase = PHASE_REGISTER;
    run.ids = people;
    s_phase(registry, &run, "register (registry)", n, nclients, window, NULL, &rate[0]);

    /* the timebank learns them from the registry's events */
    snprintf(args, sizeof args, "{\"person_id\":%" PRId64 "}", people[n - 1]);
    int64_t t0 = mono_us();
    json_t *known = NULL;
    while (!(known = s_call("timebank", timebank, "get_balance", args)) &&
           mono_us() - t0 < 120000000LL)
        usleep(20000);
    if (!known) {
        fprintf(stderr, "bench: the timebank did not learn the people within 120 s\n");
        return 1;
    }
    json_decref(known);
    printf("%-22s %d people known to the timebank %.2f s after the last registration\n",
           "events (timebank)", n, (double)(mono_us() - t0) / 1e6);

    /* every member gets ten verified hours */
    for (int i = 0; i < n; i++)
        records[i] = people[i];
    run.phase = PHASE_RECORD;
    run.ids = records;
    s_phase(timebank, &run, "record_hours", n, nclients, window, NULL, &rate[0]);
    run.phase = PHASE_APPROVE;
    s_phase(timebank, &run, "approve_hours", n, nclients, window, pg, &rate[0]);

    run.phase = PHASE_MOVE;
    run.ids = NULL;
    run.people = people;
    long long acked = 0;
    for (int r = 0; r < rounds; r++) {
        char label[40];
        run.round = r;
        run.npeople = n;
        snprintf(label, sizeof label, "gift/spend, round %d", r + 1);
        acked += s_phase(timebank, &run, label, moves, nclients, window, pg, &rate[r]);
        run.round = 100 + r;
        run.npeople = 10;
        snprintf(label, sizeof label, "ten hot accounts, %d", r + 1);
        acked += s_phase(timebank, &run, label, moves, nclients, window, pg, &hot[r]);
    }
    qsort(rate, (size_t)rounds, sizeof *rate, s_cmp_double);
    qsort(hot, (size_t)rounds, sizeof *hot, s_cmp_double);
    printf("postings/s, median of %d rounds: %.0f spread (lowest %.0f, highest %.0f), "
           "%.0f on ten hot accounts (lowest %.0f, highest %.0f)\n",
           rounds, rate[rounds / 2], rate[0], rate[rounds - 1], hot[rounds / 2], hot[0],
           hot[rounds - 1]);
    char keys[64];
    snprintf(keys, sizeof keys, "bench-%d-move%%", (int)getpid());
    int bad = s_invariants(pg, acked, keys);
    PQfinish(pg);
    free(people);
    free(records);
    zmq_ctx_term(s_zctx);
    return bad ? 1 : 0;
}
