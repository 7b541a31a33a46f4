/* The timebank service: volunteer hours recorded, approved and credited,
 * gifted, spent and reversed in a double-entry ledger; balances,
 * statements, community rules and certificates of service. Commands arrive
 * on a ROUTER and run as PL/pgSQL functions in batched transactions
 * (common/sqlcmd.h); events leave through the transactional outbox
 * (common/outbox.h). What it knows of communities, people, activities and
 * check-ins comes from the registry's events (common/sub.h), each applied
 * by SQL as an internal command that records the stream position in the
 * same transaction. What the database cannot do is done here: making and
 * checking certificate codes (the key stays in this process) and rendering
 * printable certificates. */
#ifndef LINLI_TIMEBANK_H
#define LINLI_TIMEBANK_H

#include <event2/event.h>

typedef struct timebank timebank_t;

/* Applies the timebank's migrations (LINLI_PG, LINLI_TIMEBANK_MIGRATIONS) and
 * returns 0, or -1 (logged). */
int timebank_migrate(void);

/* Reads configuration (see config.h and the README), connects to
 * PostgreSQL, binds the command, event and HTTP endpoints, starts the relay
 * and subscribes to the registry's events from the position the database
 * holds. Returns NULL (logged) when anything is missing or unreachable; the
 * registry need not be up yet (the subscriber connects when it is). */
timebank_t *timebank_new(struct event_base *base);
/* Stops taking commands and registry events, lets those in progress finish
 * for at most deadline_ms, then leaves the loop. */
void timebank_shutdown(timebank_t *t, int deadline_ms);
/* Accepts NULL; NULLs *t_p. */
void timebank_destroy(timebank_t **t_p);

#endif
