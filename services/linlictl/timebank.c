/* linlictl timebank (tb) and cert: the timebank's commands
 * (proto/timebank.proto) from the command line, each with a readable
 * result, or with --json the reply as JSON. Statements and record lists are
 * fetched page by page until the service says there is no more, then
 * printed as one. Text that came from people (memos, names, contents) is
 * printed with its control characters replaced, so that it cannot drive
 * the terminal, and a CSV export guards it against formula injection. */
#include "csv.h"
#include "ctl.h"
#include "envelope.h"
#include "pbjson.h"
#include "util.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define S_USAGE (-1)     /* a subcommand's result: print its usage, exit 2 */
#define S_PAGE 1000      /* lines or records asked for per page (the most allowed) */
#define S_MAX_ARGS 4     /* positional arguments of any subcommand */
#define S_LABEL 20       /* width of the labels of readable results */

/* An option of a subcommand. */
typedef struct {
    const char *name;     /* "--memo" */
    const char **value;   /* where its value goes; NULL: a flag, see flag */
    int *flag;            /* set to 1 when the flag is given */
} s_opt_t;

/* Takes the options listed in opts (a {NULL} entry ends it; opts may be
 * NULL), "--json" into *as_json, and the other arguments, in order, into
 * pos (at most npos). An argument that starts with '-' and is longer than
 * that is an option. Returns the number of positional arguments, or -1 on
 * an unknown option, an option without its value, or too many arguments. */
static int s_args(int argc, char **argv, const s_opt_t *opts, int *as_json, const char **pos,
                  int npos)
{
    int n = 0;
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] != '-' || a[1] == '\0') {
            if (n >= npos)
                return -1;
            pos[n++] = a;
            continue;
        }
        if (!strcmp(a, "--json")) {
            *as_json = 1;
            continue;
        }
        const s_opt_t *opt = opts;
        while (opt && opt->name && strcmp(opt->name, a))
            opt++;
        if (!opt || !opt->name)
            return -1;
        if (!opt->value) {
            *opt->flag = 1;
            continue;
        }
        if (i + 1 >= argc)
            return -1;
        *opt->value = argv[++i];
    }
    return n;
}

/* Parses s, decimal digits only, as a number in [min, max] into *out.
 * Returns 0, or -1 (and *out untouched) when it is not one. */
static int s_num(const char *s, long long min, long long max, long long *out)
{
    if (!s || *s < '0' || *s > '9')
        return -1;
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < min || v > max)
        return -1;
    *out = v;
    return 0;
}

/* An id: 1 and up. NULL (option not given) leaves *out as it is. */
static int s_id(const char *s, long long *out)
{
    return s ? s_num(s, 1, INT64_MAX, out) : 0;
}

/* Minutes of a movement or record: 1..UINT32_MAX (the service caps them). */
static int s_minutes(const char *s, long long *out)
{
    return s_num(s, 1, UINT32_MAX, out);
}

/* ms since the epoch of the UTC time in tm, or -1 when tm names no real
 * time (2026-02-30, 25:00). */
static long long s_utc(struct tm *tm)
{
    struct tm want = *tm;
    time_t t = timegm(tm);
    if (t == (time_t)-1 || tm->tm_year != want.tm_year || tm->tm_mon != want.tm_mon ||
        tm->tm_mday != want.tm_mday || tm->tm_hour != want.tm_hour ||
        tm->tm_min != want.tm_min || tm->tm_sec != want.tm_sec || t < 0)
        return -1;
    return (long long)t * 1000;
}

/* 1 when s has the shape of pattern, where 'd' stands for a digit and any
 * other character for itself. */
static int s_shape(const char *s, const char *pattern)
{
    for (; *pattern; s++, pattern++) {
        if (*pattern == 'd' ? (*s < '0' || *s > '9') : *s != *pattern)
            return 0;
    }
    return *s == '\0';
}

/* YYYY-MM-DD (midnight UTC), YYYY-MM-DDTHH:MMZ or YYYY-MM-DDTHH:MM:SSZ, as
 * ms since the epoch into *ms. Returns 0, or -1 when s is none of these or
 * names no real time. */
static int s_time(const char *s, long long *ms)
{
    struct tm tm = { 0 };
    if (!s || !(s_shape(s, "dddd-dd-dd") || s_shape(s, "dddd-dd-ddTdd:ddZ") ||
                s_shape(s, "dddd-dd-ddTdd:dd:ddZ")))
        return -1;
    sscanf(s, "%4d-%2d-%2dT%2d:%2d:%2d", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour,
           &tm.tm_min, &tm.tm_sec);
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    long long v = s_utc(&tm);
    if (v < 0)
        return -1;
    *ms = v;
    return 0;
}

/* A date option, YYYY-MM-DD: midnight UTC into *ms. NULL (not given)
 * leaves *ms as it is. Returns 0 or -1. */
static int s_date(const char *s, long long *ms)
{
    return !s ? 0 : s_shape(s, "dddd-dd-dd") ? s_time(s, ms) : -1;
}

/* A time, YYYY-MM-DDTHH:MM[:SS]Z, into *ms. Returns 0 or -1. */
static int s_datetime(const char *s, long long *ms)
{
    return s && !s_shape(s, "dddd-dd-dd") ? s_time(s, ms) : -1;
}

/* ms since the epoch as ISO 8601 in UTC, "2026-07-05T01:00:00Z". */
static const char *s_iso(long long ms, char buf[32])
{
    long long sec = ms / 1000 - (ms % 1000 < 0);
    time_t t = (time_t)sec;
    struct tm tm;
    if (!gmtime_r(&t, &tm) || !strftime(buf, 32, "%Y-%m-%dT%H:%M:%SZ", &tm))
        snprintf(buf, 32, "%lld", ms);
    return buf;
}

/* Minutes as "2 h 05 min"; with sign, "+" before amounts that are not
 * negative. */
static const char *s_hm(long long minutes, int sign, char buf[40])
{
    unsigned long long m = minutes < 0 ? 0 - (unsigned long long)minutes
                                       : (unsigned long long)minutes;
    snprintf(buf, 40, "%s%llu h %02llu min", minutes < 0 ? "-" : sign ? "+" : "", m / 60,
             m % 60);
    return buf;
}

/* Prints a period "FROM to TO" (TO exclusive); FROM 0 is "the beginning". */
static void s_print_period(long long from, long long to)
{
    char d1[32], d2[32];
    printf("%s to %s", from ? s_iso(from, d1) : "the beginning", s_iso(to, d2));
}

/* Prints text from the service to f with control characters (C0, DEL)
 * shown as spaces. NULL prints nothing. */
static void s_text(FILE *f, const char *s)
{
    for (; s && *s; s++)
        putc((unsigned char)*s < 0x20 || *s == 0x7f ? ' ' : *s, f);
}

/* "label  value\n" for a text value from the service; nothing when it is
 * empty. */
static void s_line(const char *label, const char *value)
{
    if (!value || !*value)
        return;
    printf("%-*s", S_LABEL, label);
    s_text(stdout, value);
    putchar('\n');
}

/* Sends the timebank command name with args (taken: a JSON object of its
 * fields as in proto/timebank.proto; NULL when building it failed) under
 * key. Returns 0 with the reply in *reply (caller frees with envelope_free)
 * when the service answered ok with the result of that command. Else
 * *reply is NULL and the exit status is returned after printing why on
 * stderr: 1 for the service's error (with as_json its reply is also printed
 * as JSON on stdout), 2 for an argument that does not fit the command or a
 * transport failure. */
static int s_call(const ctl_opts_t *o, const char *key, const char *name, json_t *args,
                  int as_json, Linli__Envelope **reply)
{
    *reply = NULL;
    if (!args) {
        fprintf(stderr, "linlictl: %s: an argument is not valid UTF-8\n", name);
        return 2;
    }
    json_t *j = json_object();
    json_object_set_new(j, name, args);
    char err[256];
    Linli__Command *cmd = (Linli__Command *)pbjson_to_message(&linli__command__descriptor, j,
                                                               err, sizeof err);
    json_decref(j);
    if (!cmd) {
        fprintf(stderr, "linlictl: bad argument: %s\n", err);
        return 2;
    }
    Linli__Envelope *e = ctl_send(o, key, cmd);
    if (!e)
        return 2;
    const Linli__Reply *r = e->reply;
    if (!r->ok) {
        if (as_json)
            ctl_print_json(&r->base);
        const char *code = r->error && r->error->code && *r->error->code ? r->error->code
                                                                         : "error";
        fprintf(stderr, "linlictl: ");
        s_text(stderr, code);
        fprintf(stderr, ": ");
        s_text(stderr, r->error ? r->error->message : NULL);
        fputc('\n', stderr);
        envelope_free(&e);
        return 1;
    }
    const char *got = pbjson_oneof_case_name(&r->base, "create_community");
    if (!got || strcmp(got, name)) {
        fprintf(stderr, "linlictl: unexpected reply to %s (%s)\n", name, got ? got : "no result");
        envelope_free(&e);
        return 2;
    }
    *reply = e;
    return 0;
}

/* Prints the result of a reply that is ok. */
typedef void(s_print_fn)(const Linli__Reply *r);

/* One command, one reply: sends it (see s_call) and prints the reply as
 * JSON or with print. Returns the exit status. */
static int s_simple(const ctl_opts_t *o, const char *name, json_t *args, int as_json,
                    s_print_fn *print)
{
    Linli__Envelope *e;
    int rc = s_call(o, o->key, name, args, as_json, &e);
    if (rc)
        return rc;
    if (as_json)
        ctl_print_json(&e->reply->base);
    else
        print(e->reply);
    envelope_free(&e);
    return 0;
}

/* ------------------------------------------------------------ printers */

static void s_print_balance(const Linli__Reply *r)
{
    const Linli__Balance *b = r->get_balance;
    char t[40];
    printf("%-*sperson %lld, account %lld, community %lld\n", S_LABEL, "account",
           (long long)b->person_id, (long long)b->account_id, (long long)b->community_id);
    printf("%-*s%s\n", S_LABEL, "balance", s_hm(b->balance, 0, t));
    printf("%-*s%s\n", S_LABEL, "limit", s_hm(b->limit, 0, t));
    printf("%-*s%s\n", S_LABEL, "earned", s_hm(b->earned_minutes, 0, t));
    printf("%-*s%u\n", S_LABEL, "stars", b->stars);
    if (b->next_star_minutes > 0)
        printf("%-*s%s more earned\n", S_LABEL, "next star",
               s_hm(b->next_star_minutes, 0, t));
    else
        printf("%-*s%s\n", S_LABEL, "next star", "none (top level reached)");
}

static void s_print_totals(const Linli__Reply *r)
{
    const Linli__Totals *x = r->get_totals;
    char t[40];
    if (x->community_id)
        printf("%-*scommunity %lld\n", S_LABEL, "totals of", (long long)x->community_id);
    else
        printf("%-*sthe whole city\n", S_LABEL, "totals of");
    printf("%-*s%s\n", S_LABEL, "credited", s_hm(x->credited_minutes, 0, t));
    printf("%-*s%s\n", S_LABEL, "gifted", s_hm(x->gifted_minutes, 0, t));
    printf("%-*s%s\n", S_LABEL, "spent", s_hm(x->spent_minutes, 0, t));
    printf("%-*s%s\n", S_LABEL, "held by members", s_hm(x->held_minutes, 0, t));
    printf("%-*s%u\n", S_LABEL, "accounts", x->accounts);
    printf("%-*s%u\n", S_LABEL, "volunteers credited", x->volunteers_credited);
    printf("%-*s%u\n", S_LABEL, "records pending", x->records_pending);
}

static void s_print_history(const Linli__Reply *r)
{
    const Linli__History *h = r->get_history;
    char t[40], d1[32], d2[32];
    printf("person %lld: %s credited\n", (long long)h->person_id, s_hm(h->total_minutes, 0, t));
    if (h->n_items)
        printf("%-10s  %-10s  %14s  %7s  %-8s  %s\n", "FIRST", "LAST", "HOURS", "RECORDS",
               "ACTIVITY", "TITLE / FIELD");
    for (size_t i = 0; i < h->n_items; i++) {
        const Linli__HistoryItem *it = h->items[i];
        printf("%.10s  %.10s  %14s  %7u  %-8lld  ", s_iso(it->first_at, d1),
               s_iso(it->last_at, d2), s_hm(it->minutes, 0, t), it->records,
               (long long)it->activity_id);
        s_text(stdout, it->title);
        if (it->title && *it->title && it->field && *it->field)
            fputs(" / ", stdout);
        s_text(stdout, it->field);
        putchar('\n');
    }
}

static void s_print_rules(const Linli__Reply *r)
{
    const Linli__Rules *x = r->get_rules->rules;
    char t[40], d[32];
    if (!x) {
        printf("no rules\n");
        return;
    }
    printf("%-*scommunity %lld\n", S_LABEL, "rules of", (long long)x->community_id);
    printf("%-*s%s\n", S_LABEL, "overdraft", s_hm(x->overdraft_minutes, 0, t));
    printf("%-*s%s\n", S_LABEL, "max per record", s_hm(x->max_record_minutes, 0, t));
    printf("%-*s%s\n", S_LABEL, "max per day", s_hm(x->max_day_minutes, 0, t));
    printf("%-*s%s\n", S_LABEL, "min held to spend", s_hm(x->min_held_minutes, 0, t));
    s_line("gift policy", x->gift_policy);
    printf("%-*s%u\n", S_LABEL, "approval levels", x->approval_levels);
    printf("%-*s", S_LABEL, "star hours");
    for (size_t i = 0; i < x->n_star_hours; i++)
        printf("%s%u", i ? ", " : "", x->star_hours[i]);
    printf("%s\n", x->n_star_hours ? "" : "none");
    s_line("timezone", x->timezone);
    if (x->changed_at) {
        printf("%-*s%s", S_LABEL, "changed", s_iso(x->changed_at, d));
        if (x->changed_by)
            printf(" by person %lld", (long long)x->changed_by);
        putchar('\n');
    }
}

static void s_print_transfer(const Linli__TransferResult *x)
{
    char t[40], b1[40], b2[40];
    printf("transfer %lld (%s): %s from account %lld (balance %s) to account %lld (balance %s)\n",
           (long long)x->transfer_id, x->kind ? x->kind : "", s_hm(x->minutes, 0, t),
           (long long)x->from_account_id, s_hm(x->from_balance, 0, b1),
           (long long)x->to_account_id, s_hm(x->to_balance, 0, b2));
}

static void s_print_gift(const Linli__Reply *r)
{
    s_print_transfer(r->gift);
}

static void s_print_spend(const Linli__Reply *r)
{
    s_print_transfer(r->spend);
}

static void s_print_reverse(const Linli__Reply *r)
{
    s_print_transfer(r->reverse);
}

static void s_print_record_result(const Linli__RecordResult *x)
{
    printf("record %lld: %s, approvals %u of %u", (long long)x->record_id,
           x->state ? x->state : "", x->approvals, x->levels);
    if (x->transfer_id)
        printf(", credited by transfer %lld", (long long)x->transfer_id);
    if (x->needs_review)
        printf(", needs review");
    putchar('\n');
}

static void s_print_record_hours(const Linli__Reply *r)
{
    s_print_record_result(r->record_hours);
}

static void s_print_approve(const Linli__Reply *r)
{
    s_print_record_result(r->approve_hours);
}

static void s_print_decline(const Linli__Reply *r)
{
    s_print_record_result(r->decline_hours);
}

static void s_print_records(const Linli__RecordList *l)
{
    char t[40], d[32];
    printf("%-8s  %-8s  %-8s  %-9s  %-8s  %14s  %-20s  %-7s  %s\n", "ID", "STATE", "PERSON",
           "COMMUNITY", "ACTIVITY", "HOURS", "STARTED", "SOURCE", "FIELD: CONTENT");
    for (size_t i = 0; i < l->n_records; i++) {
        const Linli__HourRecord *x = l->records[i];
        printf("%-8lld  %-8s  %-8lld  %-9lld  %-8lld  %14s  %-20s  %-7s  ", (long long)x->id,
               x->state ? x->state : "", (long long)x->person_id, (long long)x->community_id,
               (long long)x->activity_id, s_hm(x->minutes, 0, t), s_iso(x->started_at, d),
               x->source ? x->source : "");
        s_text(stdout, x->field);
        if (x->field && *x->field && x->content && *x->content)
            fputs(": ", stdout);
        s_text(stdout, x->content);
        if (x->approvals)
            printf(" [approvals %u]", x->approvals);
        if (x->needs_review)
            fputs(" [needs review]", stdout);
        if (x->reason && *x->reason) {
            fputs(" [", stdout);
            s_text(stdout, x->reason);
            putchar(']');
        }
        putchar('\n');
    }
    printf("%zu record%s\n", l->n_records, l->n_records == 1 ? "" : "s");
}

static void s_counterparty(const Linli__StatementLine *l, char buf[48])
{
    if (l->counterparty_person_id)
        snprintf(buf, 48, "person %lld", (long long)l->counterparty_person_id);
    else
        snprintf(buf, 48, "account %lld", (long long)l->counterparty_account_id);
}

static void s_print_statement(const Linli__Statement *s)
{
    char t[40], d1[32], c[48];
    printf("statement of person %lld (account %lld), ", (long long)s->person_id,
           (long long)s->account_id);
    s_print_period(s->from, s->to);
    putchar('\n');
    printf("opening balance %s\n", s_hm(s->opening_balance, 0, t));
    printf("%-20s  %-8s  %14s  %14s  %-16s  %s\n", "DATE", "KIND", "AMOUNT", "BALANCE",
           "COUNTERPARTY", "MEMO");
    for (size_t i = 0; i < s->n_lines; i++) {
        const Linli__StatementLine *l = s->lines[i];
        char b[40];
        s_counterparty(l, c);
        printf("%-20s  %-8s  %14s  %14s  %-16s  ", s_iso(l->at, d1), l->kind ? l->kind : "",
               s_hm(l->amount, 1, t), s_hm(l->balance, 0, b), c);
        s_text(stdout, l->memo);
        putchar('\n');
    }
    printf("closing balance %s (%zu line%s)\n", s_hm(s->closing_balance, 0, t), s->n_lines,
           s->n_lines == 1 ? "" : "s");
}

/* RFC 4180: CRLF after every record, the header first. */
static void s_print_csv(const Linli__Statement *s)
{
    printf("entry_id,transfer_id,date,kind,amount_minutes,balance_minutes,"
           "counterparty_person_id,counterparty_account_id,memo\r\n");
    for (size_t i = 0; i < s->n_lines; i++) {
        const Linli__StatementLine *l = s->lines[i];
        char d[32];
        char *kind = csv_field(l->kind, 0);
        char *memo = csv_field(l->memo, CSV_TEXT);
        printf("%lld,%lld,%s,%s,%lld,%lld,%lld,%lld,%s\r\n", (long long)l->entry_id,
               (long long)l->transfer_id, s_iso(l->at, d), kind, (long long)l->amount,
               (long long)l->balance, (long long)l->counterparty_person_id,
               (long long)l->counterparty_account_id, memo);
        free(kind);
        free(memo);
    }
}

/* ------------------------------------------------------------ subcommands */

static int s_balance(const ctl_opts_t *o, int argc, char **argv)
{
    int as_json = 0;
    const char *pos[S_MAX_ARGS];
    long long person;
    if (s_args(argc, argv, NULL, &as_json, pos, 1) != 1 || s_id(pos[0], &person))
        return S_USAGE;
    return s_simple(o, "get_balance", json_pack("{s:I}", "person_id", person), as_json,
                    s_print_balance);
}

/* A page's key: the given key with the page number, so that a resent page
 * is the same request and two pages are not. NULL without a key. */
static char *s_page_key(const ctl_opts_t *o, size_t page)
{
    return o->key ? xasprintf("%s/%zu", o->key, page) : NULL;
}

static int s_statement(const ctl_opts_t *o, int argc, char **argv)
{
    int as_json = 0, csv = 0;
    const char *from_s = NULL, *to_s = NULL, *pos[S_MAX_ARGS];
    const s_opt_t opts[] = { { "--from", &from_s, NULL }, { "--to", &to_s, NULL },
                             { "--csv", NULL, &csv }, { NULL, NULL, NULL } };
    long long person, from = 0, to = 0;
    if (s_args(argc, argv, opts, &as_json, pos, 1) != 1 || s_id(pos[0], &person) ||
        s_date(from_s, &from) || s_date(to_s, &to) || (as_json && csv))
        return S_USAGE;
    Linli__Envelope **pages = NULL;
    size_t n = 0, lines = 0;
    long long after = 0;
    int rc;
    for (;;) {
        char *key = s_page_key(o, n);
        Linli__Envelope *e;
        rc = s_call(o, key, "get_statement",
                    json_pack("{s:I,s:I,s:I,s:I,s:i}", "person_id", person, "from", from, "to",
                              to, "after_entry_id", after, "limit", S_PAGE),
                    as_json, &e);
        free(key);
        if (rc)
            goto done;
        pages = xrealloc(pages, (n + 1) * sizeof *pages);
        pages[n++] = e;
        const Linli__Statement *s = e->reply->get_statement;
        lines += s->n_lines;
        if (!s->more)
            break;
        if (!s->n_lines || s->lines[s->n_lines - 1]->entry_id <= after) {
            fprintf(stderr, "linlictl: the statement's pages do not advance\n");
            rc = 2;
            goto done;
        }
        after = s->lines[s->n_lines - 1]->entry_id;
        /* later pages end where the first did, not at a later "now" */
        to = s->to;
    }
    /* One statement from all pages: the first page's header, every line
     * (borrowed from the pages), the last page's closing balance. */
    Linli__Statement all = *pages[0]->reply->get_statement;
    all.lines = xmalloc((lines ? lines : 1) * sizeof *all.lines);
    all.n_lines = 0;
    for (size_t i = 0; i < n; i++) {
        const Linli__Statement *s = pages[i]->reply->get_statement;
        memcpy(all.lines + all.n_lines, s->lines, s->n_lines * sizeof *s->lines);
        all.n_lines += s->n_lines;
    }
    all.closing_balance = pages[n - 1]->reply->get_statement->closing_balance;
    all.more = 0;
    if (as_json) {
        Linli__Reply r = *pages[0]->reply;
        r.get_statement = &all;
        ctl_print_json(&r.base);
    } else if (csv) {
        s_print_csv(&all);
    } else {
        s_print_statement(&all);
    }
    free(all.lines);
done:
    for (size_t i = 0; i < n; i++)
        envelope_free(&pages[i]);
    free(pages);
    return rc;
}

static int s_totals(const ctl_opts_t *o, int argc, char **argv)
{
    int as_json = 0;
    const char *pos[S_MAX_ARGS];
    long long community = 0;
    int np = s_args(argc, argv, NULL, &as_json, pos, 1);
    if (np < 0 || (np == 1 && s_id(pos[0], &community)))
        return S_USAGE;
    return s_simple(o, "get_totals", json_pack("{s:I}", "community_id", community), as_json,
                    s_print_totals);
}

static int s_history(const ctl_opts_t *o, int argc, char **argv)
{
    int as_json = 0;
    const char *pos[S_MAX_ARGS];
    long long person;
    if (s_args(argc, argv, NULL, &as_json, pos, 1) != 1 || s_id(pos[0], &person))
        return S_USAGE;
    return s_simple(o, "get_history", json_pack("{s:I}", "person_id", person), as_json,
                    s_print_history);
}

static int s_records(const ctl_opts_t *o, int argc, char **argv)
{
    int as_json = 0;
    const char *comm_s = NULL, *person_s = NULL, *state = "", *pos[S_MAX_ARGS];
    const s_opt_t opts[] = { { "--community", &comm_s, NULL }, { "--person", &person_s, NULL },
                             { "--state", &state, NULL }, { NULL, NULL, NULL } };
    long long community = 0, person = 0;
    if (s_args(argc, argv, opts, &as_json, pos, 0) != 0 || (!comm_s && !person_s) ||
        s_id(comm_s, &community) || s_id(person_s, &person))
        return S_USAGE;
    Linli__Envelope **pages = NULL;
    size_t n = 0, count = 0;
    long long after = 0;
    int rc;
    for (;;) {
        char *key = s_page_key(o, n);
        Linli__Envelope *e;
        rc = s_call(o, key, "list_records",
                    json_pack("{s:I,s:I,s:s,s:I,s:i}", "community_id", community, "person_id",
                              person, "state", state, "after_id", after, "limit", S_PAGE),
                    as_json, &e);
        free(key);
        if (rc)
            goto done;
        pages = xrealloc(pages, (n + 1) * sizeof *pages);
        pages[n++] = e;
        const Linli__RecordList *l = e->reply->list_records;
        count += l->n_records;
        if (!l->more)
            break;
        if (!l->n_records || l->records[l->n_records - 1]->id <= after) {
            fprintf(stderr, "linlictl: the record list's pages do not advance\n");
            rc = 2;
            goto done;
        }
        after = l->records[l->n_records - 1]->id;
    }
    Linli__RecordList all = *pages[0]->reply->list_records;
    all.records = xmalloc((count ? count : 1) * sizeof *all.records);
    all.n_records = 0;
    for (size_t i = 0; i < n; i++) {
        const Linli__RecordList *l = pages[i]->reply->list_records;
        memcpy(all.records + all.n_records, l->records, l->n_records * sizeof *l->records);
        all.n_records += l->n_records;
    }
    all.more = 0;
    if (as_json) {
        Linli__Reply r = *pages[0]->reply;
        r.list_records = &all;
        ctl_print_json(&r.base);
    } else {
        s_print_records(&all);
    }
    free(all.records);
done:
    for (size_t i = 0; i < n; i++)
        envelope_free(&pages[i]);
    free(pages);
    return rc;
}

static int s_rules(const ctl_opts_t *o, int argc, char **argv)
{
    int as_json = 0;
    const char *pos[S_MAX_ARGS];
    long long community;
    if (s_args(argc, argv, NULL, &as_json, pos, 1) != 1 || s_id(pos[0], &community))
        return S_USAGE;
    return s_simple(o, "get_rules", json_pack("{s:I}", "community_id", community), as_json,
                    s_print_rules);
}

static int s_gift(const ctl_opts_t *o, int argc, char **argv)
{
    int as_json = 0;
    const char *memo = "", *pos[S_MAX_ARGS];
    const s_opt_t opts[] = { { "--memo", &memo, NULL }, { NULL, NULL, NULL } };
    long long from, to, minutes;
    if (s_args(argc, argv, opts, &as_json, pos, 3) != 3 || s_id(pos[0], &from) ||
        s_id(pos[1], &to) || s_minutes(pos[2], &minutes))
        return S_USAGE;
    return s_simple(o, "gift",
                    json_pack("{s:I,s:I,s:I,s:s}", "from_person_id", from, "to_person_id", to,
                              "minutes", minutes, "memo", memo),
                    as_json, s_print_gift);
}

static int s_spend(const ctl_opts_t *o, int argc, char **argv)
{
    int as_json = 0;
    const char *service = NULL, *provider_s = NULL, *comm_s = NULL, *memo = "",
               *pos[S_MAX_ARGS];
    const s_opt_t opts[] = { { "--service", &service, NULL },
                             { "--provider", &provider_s, NULL },
                             { "--community", &comm_s, NULL },
                             { "--memo", &memo, NULL },
                             { NULL, NULL, NULL } };
    long long person, minutes, provider = 0, community = 0;
    if (s_args(argc, argv, opts, &as_json, pos, 2) != 2 || s_id(pos[0], &person) ||
        s_minutes(pos[1], &minutes) || !service || (provider_s && comm_s) ||
        s_id(provider_s, &provider) || s_id(comm_s, &community))
        return S_USAGE;
    return s_simple(o, "spend",
                    json_pack("{s:I,s:I,s:I,s:I,s:s,s:s}", "person_id", person, "provider_id",
                              provider, "community_id", community, "minutes", minutes,
                              "service", service, "memo", memo),
                    as_json, s_print_spend);
}

static int s_record(const ctl_opts_t *o, int argc, char **argv)
{
    int as_json = 0;
    const char *actor_s = NULL, *person_s = NULL, *minutes_s = NULL, *started_s = NULL,
               *activity_s = NULL, *comm_s = NULL, *field = "", *content = "", *pos[S_MAX_ARGS];
    const s_opt_t opts[] = { { "--actor", &actor_s, NULL },
                             { "--person", &person_s, NULL },
                             { "--minutes", &minutes_s, NULL },
                             { "--started", &started_s, NULL },
                             { "--activity", &activity_s, NULL },
                             { "--community", &comm_s, NULL },
                             { "--field", &field, NULL },
                             { "--content", &content, NULL },
                             { NULL, NULL, NULL } };
    long long actor = 0, person = 0, minutes, started, activity = 0, community = 0;
    if (s_args(argc, argv, opts, &as_json, pos, 0) != 0 || !actor_s || !person_s ||
        s_id(actor_s, &actor) || s_id(person_s, &person) || s_minutes(minutes_s, &minutes) ||
        s_datetime(started_s, &started) || s_id(activity_s, &activity) ||
        s_id(comm_s, &community))
        return S_USAGE;
    return s_simple(o, "record_hours",
                    json_pack("{s:I,s:I,s:I,s:I,s:I,s:I,s:s,s:s}", "actor_id", actor,
                              "person_id", person, "activity_id", activity, "community_id",
                              community, "minutes", minutes, "started_at", started, "field",
                              field, "content", content),
                    as_json, s_print_record_hours);
}

/* approve, decline and reverse: --actor A ID [--reason R]. */
static int s_review(const ctl_opts_t *o, int argc, char **argv, const char *name,
                    const char *id_field, int need_reason, s_print_fn *print)
{
    int as_json = 0;
    const char *actor_s = NULL, *reason = NULL, *pos[S_MAX_ARGS];
    const s_opt_t opts[] = { { "--actor", &actor_s, NULL }, { "--reason", &reason, NULL },
                             { NULL, NULL, NULL } };
    long long actor = 0, id;
    if (s_args(argc, argv, opts, &as_json, pos, 1) != 1 || !actor_s || s_id(actor_s, &actor) ||
        s_id(pos[0], &id) || !need_reason != !reason)
        return S_USAGE;
    json_t *args = json_pack("{s:I,s:I}", "actor_id", actor, id_field, id);
    if (reason && json_object_set_new(args, "reason", json_string(reason)) != 0) {
        json_decref(args);
        args = NULL;
    }
    return s_simple(o, name, args, as_json, print);
}

static int s_approve(const ctl_opts_t *o, int argc, char **argv)
{
    return s_review(o, argc, argv, "approve_hours", "record_id", 0, s_print_approve);
}

static int s_decline(const ctl_opts_t *o, int argc, char **argv)
{
    return s_review(o, argc, argv, "decline_hours", "record_id", 1, s_print_decline);
}

static int s_reverse(const ctl_opts_t *o, int argc, char **argv)
{
    return s_review(o, argc, argv, "reverse", "transfer_id", 1, s_print_reverse);
}

static int s_cert_issue(const ctl_opts_t *o, int argc, char **argv)
{
    int as_json = 0;
    const char *actor_s = NULL, *name = NULL, *idno = NULL, *from_s = NULL, *to_s = NULL,
               *comm_s = NULL, *out = NULL, *pos[S_MAX_ARGS];
    const s_opt_t opts[] = { { "--actor", &actor_s, NULL },   { "--name", &name, NULL },
                             { "--id-number", &idno, NULL },  { "--from", &from_s, NULL },
                             { "--to", &to_s, NULL },         { "--community", &comm_s, NULL },
                             { "-o", &out, NULL },            { NULL, NULL, NULL } };
    long long actor = 0, person, from = 0, to = 0, community = 0;
    if (s_args(argc, argv, opts, &as_json, pos, 1) != 1 || !actor_s || !name || !idno ||
        s_id(actor_s, &actor) || s_id(pos[0], &person) || s_date(from_s, &from) ||
        s_date(to_s, &to) || s_id(comm_s, &community))
        return S_USAGE;
    Linli__Envelope *e;
    int rc = s_call(o, o->key, "issue_certificate",
                    json_pack("{s:I,s:I,s:I,s:I,s:I,s:s,s:s}", "actor_id", actor, "person_id",
                              person, "community_id", community, "from", from, "to", to,
                              "holder_name", name, "id_number", idno),
                    as_json, &e);
    if (rc)
        return rc;
    const Linli__Certificate *c = e->reply->issue_certificate;
    char t[40];
    if (as_json) {
        ctl_print_json(&e->reply->base);
    } else {
        s_line("certificate", c->number);
        s_line("code", c->code);
        printf("%-*s%s\n", S_LABEL, "total", s_hm(c->total_minutes, 0, t));
    }
    if (out) {
        const char *html = c->html ? c->html : "";
        size_t len = strlen(html);
        FILE *f = len ? fopen(out, "wb") : NULL;
        int written = f && fwrite(html, 1, len, f) == len;
        if (f && fclose(f) != 0)
            written = 0;
        if (!len) {
            fprintf(stderr, "linlictl: the reply holds no printable page; %s not written\n",
                    out);
            rc = 2;
        } else if (!written) {
            fprintf(stderr, "linlictl: cannot write %s: %s\n", out, strerror(errno));
            rc = 2;
        } else if (!as_json) {
            s_line("written to", out);
        }
    }
    envelope_free(&e);
    return rc;
}

static int s_cert_verify(const ctl_opts_t *o, int argc, char **argv)
{
    int as_json = 0;
    const char *pos[S_MAX_ARGS];
    if (s_args(argc, argv, NULL, &as_json, pos, 1) != 1)
        return S_USAGE;
    Linli__Envelope *e;
    int rc = s_call(o, o->key, "verify_certificate", json_pack("{s:s}", "code", pos[0]),
                    as_json, &e);
    if (rc)
        return rc;
    const Linli__Certificate *c = e->reply->verify_certificate;
    char t[40], d1[32];
    if (as_json) {
        ctl_print_json(&e->reply->base);
    } else {
        printf("%s\n", c->valid ? "VALID" : "NOT VALID");
        s_line("number", c->number);
        if (c->holder_name && *c->holder_name) {
            printf("%-*s", S_LABEL, "holder");
            s_text(stdout, c->holder_name);
            printf(" (person %lld)\n", (long long)c->person_id);
        }
        s_line("id number", c->id_number_masked);
        if (c->issuer && *c->issuer) {
            printf("%-*s", S_LABEL, "issuer");
            s_text(stdout, c->issuer);
            printf(" (community %lld)\n", (long long)c->community_id);
        }
        if (c->issued_at)
            printf("%-*s%s\n", S_LABEL, "issued", s_iso(c->issued_at, d1));
        if (c->to) {
            printf("%-*s", S_LABEL, "period");
            s_print_period(c->from, c->to);
            putchar('\n');
        }
        if (c->number && c->to)
            printf("%-*s%s in %u credited movement%s\n", S_LABEL, "total hours",
                   s_hm(c->total_minutes, 0, t), c->movements, c->movements == 1 ? "" : "s");
        for (size_t i = 0; i < c->n_periods; i++) {
            const Linli__CertificatePeriod *p = c->periods[i];
            printf("  %-8s  %14s  ", p->month ? p->month : "", s_hm(p->minutes, 0, t));
            s_text(stdout, p->content);
            putchar('\n');
        }
        if (c->reversed_minutes)
            printf("%-*s%s since issue\n", S_LABEL, "reversed",
                   s_hm(c->reversed_minutes, 0, t));
        s_line("problem", c->problem);
    }
    rc = c->valid ? 0 : 1;
    envelope_free(&e);
    return rc;
}

/* ------------------------------------------------------------ dispatch */

typedef int(s_sub_fn)(const ctl_opts_t *o, int argc, char **argv);

typedef struct {
    const char *name;
    s_sub_fn *fn;
    const char *usage;    /* arguments, for "usage: linlictl timebank NAME ..." */
} s_sub_t;

static const s_sub_t s_cert_subs[] = {
    { "issue", s_cert_issue,
      "--actor ID PERSON_ID --name NAME --id-number NUM [--from YYYY-MM-DD]\n"
      "           [--to YYYY-MM-DD] [--community ID] [-o FILE.html] [--json]" },
    { "verify", s_cert_verify, "CODE [--json]   (exit 1: not valid)" },
};

static const s_sub_t s_subs[] = {
    { "balance", s_balance, "PERSON_ID [--json]" },
    { "statement", s_statement,
      "PERSON_ID [--from YYYY-MM-DD] [--to YYYY-MM-DD] [--csv|--json]" },
    { "totals", s_totals, "[COMMUNITY_ID] [--json]" },
    { "history", s_history, "PERSON_ID [--json]" },
    { "records", s_records, "(--community ID|--person ID) [--state STATE] [--json]" },
    { "rules", s_rules, "COMMUNITY_ID [--json]" },
    { "gift", s_gift, "FROM_ID TO_ID MINUTES [--memo TEXT] [--json]" },
    { "spend", s_spend,
      "PERSON_ID MINUTES --service TEXT [--provider ID|--community ID] [--memo TEXT] [--json]" },
    { "record", s_record,
      "--actor ID --person ID --minutes M --started YYYY-MM-DDTHH:MM[:SS]Z\n"
      "           [--activity ID] [--community ID] [--field TEXT] [--content TEXT] [--json]" },
    { "approve", s_approve, "--actor ID RECORD_ID [--json]" },
    { "decline", s_decline, "--actor ID RECORD_ID --reason TEXT [--json]" },
    { "reverse", s_reverse, "--actor ID TRANSFER_ID --reason TEXT [--json]" },
};

static void s_list(FILE *f, const char *prefix, const s_sub_t *subs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        fprintf(f, "  %s%s %s\n", prefix, subs[i].name, subs[i].usage);
}

/* The subcommands of linlictl timebank (cert its own too, with cert set). */
static int s_help(FILE *f, int cert)
{
    fprintf(f, "usage: linlictl %s SUBCOMMAND ...\n", cert ? "cert" : "timebank|tb");
    if (!cert)
        s_list(f, "", s_subs, LX_ARRAY_LEN(s_subs));
    s_list(f, cert ? "" : "cert ", s_cert_subs, LX_ARRAY_LEN(s_cert_subs));
    fprintf(f, "Dates are UTC; --to is exclusive. --json prints the reply as JSON.\n"
               "The timebank's endpoint comes from LINLI_TIMEBANK_CMD.\n");
    return f == stdout ? 0 : 2;
}

static int s_dispatch(const ctl_opts_t *o, int argc, char **argv, int cert)
{
    const s_sub_t *subs = cert ? s_cert_subs : s_subs;
    size_t n = cert ? LX_ARRAY_LEN(s_cert_subs) : LX_ARRAY_LEN(s_subs);
    if (argc >= 1 && (!strcmp(argv[0], "help") || !strcmp(argv[0], "--help") ||
                      !strcmp(argv[0], "-h")))
        return s_help(stdout, cert);
    for (size_t i = 0; argc >= 1 && i < n; i++) {
        if (strcmp(argv[0], subs[i].name))
            continue;
        int rc = subs[i].fn(o, argc - 1, argv + 1);
        if (rc != S_USAGE)
            return rc;
        fprintf(stderr, "usage: linlictl %s %s %s\n", cert ? "cert" : "timebank", subs[i].name,
                subs[i].usage);
        return 2;
    }
    return s_help(stderr, cert);
}

int ctl_cert(const ctl_opts_t *o, int argc, char **argv)
{
    return s_dispatch(o, argc, argv, 1);
}

int ctl_timebank(const ctl_opts_t *o, int argc, char **argv)
{
    if (argc >= 1 && !strcmp(argv[0], "cert"))
        return ctl_cert(o, argc - 1, argv + 1);
    return s_dispatch(o, argc, argv, 0);
}
