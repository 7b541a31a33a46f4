/* Unit tests for common/migrate.c against a real PostgreSQL (LINLI_TEST_PG).
 * Each test writes its migration files into a fresh temporary directory and
 * applies them to a schema of its own (test_migrate_<pid>_<n>), dropping
 * both at the end. Without LINLI_TEST_PG the tests are skipped, saying why. */
#include "migrate.h"
#include "db.h"
#include "log.h"
#include "util.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static const char *s_conninfo; /* NULL: no server, skip */

typedef struct {
    PGconn *conn;
    char dir[64];
    char schema[64];
} s_env_t;

#define S_REQUIRE_PG()                                                                       \
    do {                                                                                     \
        if (!s_conninfo)                                                                     \
            skip();                                                                          \
    } while (0)

static void s_quiet(void *arg, const char *msg)
{
    (void)arg;
    (void)msg;
}

static void s_write(const s_env_t *e, const char *name, const char *text)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", e->dir, name);
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    assert_int_equal(fputs(text, f) >= 0, 1);
    assert_int_equal(fclose(f), 0);
}

static void s_unlink(const s_env_t *e, const char *name)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", e->dir, name);
    assert_int_equal(unlink(path), 0);
}

/* The single integer that sql returns. */
static long s_int(const s_env_t *e, const char *sql, const char *param)
{
    const char *p[1] = { param };
    PGresult *res = db_exec(e->conn, sql, param ? 1 : 0, param ? p : NULL);
    assert_non_null(res);
    assert_int_equal(PQntuples(res), 1);
    long v = strtol(PQgetvalue(res, 0, 0), NULL, 10);
    PQclear(res);
    return v;
}

/* 1 when schema.name is a table. */
static long s_has_table(const s_env_t *e, const char *name)
{
    char q[160];
    snprintf(q, sizeof q, "%s.%s", e->schema, name);
    return s_int(e, "SELECT (to_regclass($1) IS NOT NULL)::int", q);
}

static long s_rows(const s_env_t *e)
{
    char sql[160];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM %s.schema_migrations", e->schema);
    return s_int(e, sql, NULL);
}

/* Advisory locks this session holds: must be none after every call. */
static long s_locks(const s_env_t *e)
{
    return s_int(e, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND pid = pg_backend_pid()", NULL);
}

static int s_setup(void **state)
{
    static int seq;
    s_env_t *e = xcalloc(1, sizeof *e);
    *state = e;
    if (!s_conninfo)
        return 0;
    snprintf(e->dir, sizeof e->dir, "/tmp/test_migrate_XXXXXX");
    if (!mkdtemp(e->dir))
        return -1;
    snprintf(e->schema, sizeof e->schema, "test_migrate_%d_%d", (int)getpid(), ++seq);
    e->conn = PQconnectdb(s_conninfo);
    if (PQstatus(e->conn) != CONNECTION_OK) {
        fprintf(stderr, "test_migrate: cannot connect: %s", PQerrorMessage(e->conn));
        return -1;
    }
    PQsetNoticeProcessor(e->conn, s_quiet, NULL);
    return 0;
}

static int s_teardown(void **state)
{
    s_env_t *e = *state;
    if (e->conn) {
        char sql[160];
        snprintf(sql, sizeof sql, "DROP SCHEMA IF EXISTS %s CASCADE", e->schema);
        PQclear(PQexec(e->conn, sql));
        PQfinish(e->conn);
    }
    if (e->dir[0]) {
        DIR *d = opendir(e->dir);
        struct dirent *de;
        while (d && (de = readdir(d))) {
            if (strcmp(de->d_name, ".") && strcmp(de->d_name, ".."))
                s_unlink(e, de->d_name);
        }
        if (d)
            closedir(d);
        rmdir(e->dir);
    }
    free(e);
    return 0;
}

static void s_write_ab(const s_env_t *e)
{
    /* b refers to a: applying 002 before 001 would fail. */
    s_write(e, "002_b.sql", "CREATE TABLE b(id int PRIMARY KEY REFERENCES a(id));\n"
                            "INSERT INTO b VALUES (1);\n");
    s_write(e, "001_a.sql", "-- the first table\nCREATE TABLE a(id int PRIMARY KEY);\n"
                            "INSERT INTO a VALUES (1), (2);\n");
}

static void test_applies_in_order_once(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_write_ab(e);
    s_write(e, "notes.txt", "not a migration");
    s_write(e, "01_short.sql", "this is not SQL");
    s_write(e, "004_x.sql~", "this is not SQL");
    s_write(e, "abc_x.sql", "this is not SQL");

    assert_int_equal(migrate_apply(e->conn, e->schema, e->dir), 2);
    assert_int_equal(s_has_table(e, "a"), 1);
    assert_int_equal(s_has_table(e, "b"), 1);
    assert_int_equal(s_rows(e), 2);
    char sql[256];
    snprintf(sql, sizeof sql,
             "SELECT count(*) FROM %s.schema_migrations WHERE (version, name) IN "
             "((1, '001_a.sql'), (2, '002_b.sql')) AND checksum ~ '^[0-9a-f]{64}$'",
             e->schema);
    assert_int_equal(s_int(e, sql, NULL), 2);
    assert_int_equal(s_locks(e), 0);
    assert_int_equal(PQtransactionStatus(e->conn), PQTRANS_IDLE);

    /* Second run: nothing to do. */
    assert_int_equal(migrate_apply(e->conn, e->schema, e->dir), 0);
    assert_int_equal(s_rows(e), 2);

    /* A new file: only it runs. */
    s_write(e, "003_c.sql", "ALTER TABLE a ADD COLUMN note text;");
    assert_int_equal(migrate_apply(e->conn, e->schema, e->dir), 1);
    assert_int_equal(s_rows(e), 3);
    assert_int_equal(s_locks(e), 0);
}

static void test_failing_file_leaves_no_trace(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_write_ab(e);
    s_write(e, "003_c.sql", "CREATE TABLE c(id int);\nINSERT INTO c VALUES (1);\nSELECT 1/0;\n");
    assert_int_equal(migrate_apply(e->conn, e->schema, e->dir), -1);
    assert_int_equal(s_has_table(e, "a"), 1);
    assert_int_equal(s_has_table(e, "b"), 1);
    assert_int_equal(s_has_table(e, "c"), 0);
    assert_int_equal(s_rows(e), 2);
    char sql[160];
    snprintf(sql, sizeof sql, "SELECT count(*) FROM %s.schema_migrations WHERE version = 3",
             e->schema);
    assert_int_equal(s_int(e, sql, NULL), 0);
    assert_int_equal(s_locks(e), 0);
    assert_int_equal(PQtransactionStatus(e->conn), PQTRANS_IDLE);

    /* Fixed, it applies. */
    s_write(e, "003_c.sql", "CREATE TABLE c(id int);\n");
    assert_int_equal(migrate_apply(e->conn, e->schema, e->dir), 1);
    assert_int_equal(s_has_table(e, "c"), 1);
}

static void test_changed_file_rejected(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_write_ab(e);
    assert_int_equal(migrate_apply(e->conn, e->schema, e->dir), 2);
    s_write(e, "001_a.sql", "-- edited\nCREATE TABLE a(id int PRIMARY KEY);\n"
                            "INSERT INTO a VALUES (1), (2);\n");
    /* A new file waiting too: it must not land on an edited history. */
    s_write(e, "003_c.sql", "CREATE TABLE c(id int);\n");
    assert_int_equal(migrate_apply(e->conn, e->schema, e->dir), -1);
    assert_int_equal(s_has_table(e, "c"), 0);
    assert_int_equal(s_rows(e), 2);
    assert_int_equal(s_locks(e), 0);
}

static void test_bad_schema_rejected(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_write_ab(e);
    const char *bad[] = {
        "", "Bad", "1abc", "a-b", "a b", "a;drop table x", "a\"b", "ümlaut",
        "x123456789012345678901234567890123456789012345678901234567890123", /* 64 */
    };
    for (size_t i = 0; i < LX_ARRAY_LEN(bad); i++)
        assert_int_equal(migrate_apply(e->conn, bad[i], e->dir), -1);
    assert_int_equal(migrate_apply(e->conn, NULL, e->dir), -1);
    assert_int_equal(s_int(e, "SELECT count(*) FROM pg_namespace WHERE nspname = $1", "Bad"), 0);
    /* 63 characters is the limit, and fine. */
    char ok[64];
    snprintf(ok, sizeof ok, "%s", e->schema);
    memset(ok + strlen(ok), '_', 63 - strlen(ok));
    ok[63] = '\0';
    assert_int_equal(migrate_apply(e->conn, ok, e->dir), 2);
    char sql[128];
    snprintf(sql, sizeof sql, "DROP SCHEMA %s CASCADE", ok);
    PQclear(db_exec(e->conn, sql, 0, NULL));
}

static void test_bad_directory(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    assert_int_equal(migrate_apply(e->conn, e->schema, "/nonexistent/linli/migrations"), -1);
    /* Two files with one version. */
    s_write(e, "001_a.sql", "SELECT 1;");
    s_write(e, "001_b.sql", "SELECT 2;");
    assert_int_equal(migrate_apply(e->conn, e->schema, e->dir), -1);
    assert_int_equal(s_locks(e), 0);
    /* An empty directory is fine: the schema and its table appear. */
    s_unlink(e, "001_a.sql");
    s_unlink(e, "001_b.sql");
    assert_int_equal(migrate_apply(e->conn, e->schema, e->dir), 0);
    assert_int_equal(s_rows(e), 0);
}

static void test_file_ending_transaction_rejected(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_write(e, "001_a.sql", "CREATE TABLE a(id int); COMMIT;");
    assert_int_equal(migrate_apply(e->conn, e->schema, e->dir), -1);
    assert_int_equal(s_rows(e), 0);
    assert_int_equal(s_locks(e), 0);
    assert_int_equal(PQtransactionStatus(e->conn), PQTRANS_IDLE);
}

static void test_copy_rejected(void **state)
{
    S_REQUIRE_PG();
    s_env_t *e = *state;
    s_write(e, "001_a.sql", "CREATE TABLE a(id int);\nCOPY a FROM STDIN;\n");
    assert_int_equal(migrate_apply(e->conn, e->schema, e->dir), -1);
    assert_int_equal(s_has_table(e, "a"), 0);
    assert_int_equal(s_locks(e), 0);
    assert_int_equal(PQtransactionStatus(e->conn), PQTRANS_IDLE);
}

int main(void)
{
    log_init("test_migrate", LOG_LEVEL_WARN);
    s_conninfo = getenv("LINLI_TEST_PG");
    if (s_conninfo && !*s_conninfo)
        s_conninfo = NULL;
    if (!s_conninfo)
        printf("# LINLI_TEST_PG is not set: skipping the tests that need PostgreSQL\n");
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_applies_in_order_once, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_failing_file_leaves_no_trace, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_changed_file_rejected, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_bad_schema_rejected, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_bad_directory, s_setup, s_teardown),
        cmocka_unit_test_setup_teardown(test_file_ending_transaction_rejected, s_setup,
                                        s_teardown),
        cmocka_unit_test_setup_teardown(test_copy_rejected, s_setup, s_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
