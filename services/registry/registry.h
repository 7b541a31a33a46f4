/* The registry service: communities, people, activities, sign-ups with
 * waiting lists, QR check-ins and stamp routes. Commands arrive on a ROUTER
 * and run as PL/pgSQL functions in batched transactions (common/sqlcmd.h);
 * events leave through the transactional outbox (common/outbox.h). What the
 * database cannot do is done here: signing and checking QR tokens (the
 * secret stays in this process), rendering QR codes, validating untrusted
 * input before it reaches SQL, and the periodic sweep that expires offers
 * and checks people out. */
#ifndef LINLI_REGISTRY_H
#define LINLI_REGISTRY_H

#include <event2/event.h>

typedef struct registry registry_t;

/* Applies the registry's migrations (LINLI_PG, LINLI_REGISTRY_MIGRATIONS) and
 * returns 0, or -1 (logged). */
int registry_migrate(void);

/* Reads configuration (see config.h), connects to PostgreSQL, binds the
 * command, event and HTTP endpoints, and starts the relay and the sweep.
 * Returns NULL (logged) when anything is missing or unreachable. */
registry_t *registry_new(struct event_base *base);
/* Stops taking commands, lets those in progress finish for at most
 * deadline_ms, then leaves the loop. */
void registry_shutdown(registry_t *r, int deadline_ms);
/* Accepts NULL; NULLs *r_p. */
void registry_destroy(registry_t **r_p);

#endif
