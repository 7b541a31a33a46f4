/* Live counts in Redis: the key scheme shared by the analytics daemon (which
 * writes them) and `linlictl stats` (which reads them), plus a synchronous
 * read API, a human table and a JSON rendering.
 *
 * Keys (P is the prefix, LINLI_REDIS_PREFIX, default "linli"; C a community
 * id, A an activity id, R a route id, D a day yyyymmdd in the city's time
 * zone, LINLI_TZ_OFFSET_MIN minutes east of UTC, default 480):
 *
 *   P:{cC}:signups                  confirmed sign-ups in community C
 *   P:{cC}:checkins                 check-ins (activities and route stations)
 *   P:{cC}:act:A:signups            confirmed sign-ups for activity A
 *   P:{cC}:act:A:checkins           check-ins at activity A
 *   P:{cC}:act:A:present            checked in and not yet out
 *   P:{cC}:uniq:D                   HyperLogLog of person ids checked in on D
 *   P:{cC}:route:R:stamps           stamps collected on route R
 *   P:{cC}:route:R:redeemed         rewards redeemed for route R
 *   P:{cC}:refusals                 hash: refused scans by reason
 *   P:city:signups | checkins       city-wide totals
 *   P:city:uniq:D                   city-wide HyperLogLog of D
 *   P:city:activities               hash: activity id -> community id, so an
 *                                   activity can be read without its community
 *   P:pos:S                         "epoch:seq" last applied from stream S;
 *                                   "epoch:reset" while a reset is under way
 *
 * Everything under P:{c*} and P:city:* is derived from the registry stream:
 * counters_reset() deletes all of it. The {cC} hash tag keeps a community's
 * keys in one Redis Cluster slot; city-wide and position keys live elsewhere.
 * Counters are plain integers (INCRBY), so GET on a missing key reads 0. */
#ifndef LINLI_COUNTERS_H
#define LINLI_COUNTERS_H

#include <hiredis/hiredis.h>
#include <jansson.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define COUNTERS_DEFAULT_PREFIX "linli"
#define COUNTERS_DEFAULT_TZ_MIN 480  /* China Standard Time, UTC+8 */
#define COUNTERS_PREFIX_MAX 64       /* bytes in a prefix */
#define COUNTERS_KEY_MAX 256         /* bytes in any key built here, NUL included */
#define COUNTERS_REASON_MAX 64       /* bytes kept of a refusal reason */
#define COUNTERS_MAX_REASONS 16      /* refusal reasons a view holds */

/* 1 when prefix can be used: 1..COUNTERS_PREFIX_MAX bytes of [A-Za-z0-9_.:-]
 * (no glob or hash-tag characters, so SCAN MATCH P:* matches only our keys);
 * else 0. */
int counters_prefix_valid(const char *prefix);

/* The prefix and time zone from configuration (LINLI_REDIS_PREFIX,
 * LINLI_TZ_OFFSET_MIN in [-720, 840]). Return 0, or -1 (logged) when the value
 * is invalid. The prefix string is borrowed from config. */
int counters_config_prefix(const char **prefix);
int counters_config_tz(int *tz_offset_min);

/* Writes the day of ms (milliseconds since the Unix epoch) in the time zone
 * tz_offset_min minutes east of UTC as "yyyymmdd" into out. */
void counters_day(int64_t ms, int tz_offset_min, char out[9]);

/* Key builders. Each writes a NUL-terminated key into buf (len bytes) and
 * returns 0, or -1 when it does not fit (buf then holds a truncated string
 * that must not be used). community_id 0 means the city-wide key where one
 * exists (scope, uniq); what names the counter ("signups", "checkins",
 * "present", "stamps", "redeemed", "refusals"). */
int counters_key_scope(char *buf, size_t len, const char *prefix, int64_t community_id,
                       const char *what);
int counters_key_activity(char *buf, size_t len, const char *prefix, int64_t community_id,
                          int64_t activity_id, const char *what);
int counters_key_uniq(char *buf, size_t len, const char *prefix, int64_t community_id,
                      const char *day);
int counters_key_route(char *buf, size_t len, const char *prefix, int64_t community_id,
                       int64_t route_id, const char *what);
int counters_key_activities(char *buf, size_t len, const char *prefix);
int counters_key_position(char *buf, size_t len, const char *prefix, const char *stream);

/* A blocking connection to addr ("host:port" or an absolute unix socket
 * path) with timeout_ms for connecting and for each command. Returns the
 * context (caller frees with redisFree) or NULL (logged). */
redisContext *counters_connect(const char *addr, int timeout_ms);

/* Reads the applied position of stream. Returns 0 with *epoch and *sequence
 * set (0/0 when nothing was ever applied) and *reset_pending 1 when a reset
 * of *epoch was interrupted (call counters_reset again before applying);
 * -1 (logged) on a Redis error or a malformed stored value. */
int counters_position_read(redisContext *c, const char *prefix, const char *stream,
                           uint64_t *epoch, uint64_t *sequence, int *reset_pending);

/* Starts stream's history over at epoch: marks the position "epoch:reset",
 * deletes every registry-derived key of prefix (SCAN MATCH + UNLINK, in
 * batches; it blocks, so use it only when an epoch changes), then stores
 * "epoch:0". Marking first makes late events of the old epoch, still in
 * flight on another connection, refuse to apply. Returns the number of keys
 * deleted, or -1 (logged) on a Redis error, in which case the position stays
 * marked and the reset must be repeated. */
long long counters_reset(redisContext *c, const char *prefix, const char *stream,
                         uint64_t epoch);

typedef struct {
    char reason[COUNTERS_REASON_MAX + 1];
    int64_t count;
} counters_reason_t;

/* What one read shows. Scope: the activity when activity_id is set, else the
 * community, else the city. */
typedef struct {
    int64_t community_id;      /* 0: city-wide (looked up when only an activity was named) */
    int64_t activity_id;       /* 0: none */
    char day[9];               /* the day unique_today counts, yyyymmdd */
    int64_t signups;           /* confirmed sign-ups in scope */
    int64_t checkins;          /* check-ins in scope */
    int64_t present;           /* activity scope only: in and not out; else 0 */
    int64_t unique_today;      /* distinct people checked in on day, community or city (HLL) */
    size_t nreasons;           /* community scope: refusals by reason, largest first */
    counters_reason_t reasons[COUNTERS_MAX_REASONS];
    int64_t refusals;          /* community scope: all refused scans, every reason */
    int have_position;         /* 1 when the registry stream position was read */
    uint64_t epoch;            /* registry stream position applied so far */
    uint64_t sequence;
} counters_view_t;

/* Fills *out for the given scope, counting unique people for today in the
 * configured time zone (LINLI_TZ_OFFSET_MIN). community_id 0 with an
 * activity looks the community up in P:city:activities. Returns 0, or -1
 * (logged) on a Redis error, an invalid prefix, or an activity whose
 * community is unknown. */
int counters_read(redisContext *c, const char *prefix, int64_t community_id, int64_t activity_id,
                  counters_view_t *out);
/* The same for an explicit day ("yyyymmdd"). */
int counters_read_day(redisContext *c, const char *prefix, int64_t community_id,
                      int64_t activity_id, const char *day, counters_view_t *out);

/* Stamps collected and rewards redeemed on a route of a community. Returns
 * 0, or -1 (logged) on a Redis error. */
int counters_read_route(redisContext *c, const char *prefix, int64_t community_id,
                        int64_t route_id, int64_t *stamps, int64_t *redeemed);

/* Writes v as a small two-column table for people. */
void counters_print(FILE *f, const counters_view_t *v);
/* v as a new JSON object (caller owns the reference):
 *   {"community_id":1,"activity_id":2,"day":"20261123","signups":3,
 *    "checkins":4,"present":1,"unique_today":3,"refusals":2,
 *    "refusals_by_reason":{"expired":2},
 *    "position":{"stream":"registry","epoch":1,"sequence":17}}
 * present is omitted outside activity scope, the refusal fields outside
 * community scope, position when it was not read. */
json_t *counters_to_json(const counters_view_t *v);

#endif
