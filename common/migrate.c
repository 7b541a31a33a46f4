/* Numbered SQL migrations applied once each, in order, under an advisory
 * lock (see migrate.h). The steps: list NNN_*.sql files, take the lock,
 * create the schema and its schema_migrations table, check that every file
 * already applied still has its recorded SHA-256, then run each new file in
 * its own transaction together with the INSERT that records it. Files run
 * with search_path set to the schema (then public), so they may use
 * unqualified names and a test can apply them to a schema of its own.
 */
#include "migrate.h"

#include "db.h"
#include "log.h"
#include "util.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <openssl/evp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define S_MAX_FILE_BYTES (16 * 1024 * 1024)

typedef struct {
    int version;  /* the NNN prefix */
    char *name;   /* owned; file name without directory */
} s_file_t;

/* ^[0-9]{3}_.*\.sql$ */
static bool s_name_ok(const char *name)
{
    size_t n = strlen(name);
    return n >= 8 && name[0] >= '0' && name[0] <= '9' && name[1] >= '0' && name[1] <= '9' &&
           name[2] >= '0' && name[2] <= '9' && name[3] == '_' &&
           strcmp(name + n - 4, ".sql") == 0;
}

/* ^[a-z_][a-z0-9_]{0,62}$: identifiers that need no quoting and fit NAMEDATALEN. */
static bool s_schema_ok(const char *s)
{
    if (!s || !((*s >= 'a' && *s <= 'z') || *s == '_'))
        return false;
    size_t n = 0;
    for (; s[n]; n++)
        if (!((s[n] >= 'a' && s[n] <= 'z') || (s[n] >= '0' && s[n] <= '9') || s[n] == '_'))
            return false;
    return n <= 63;
}

static int s_file_cmp(const void *a, const void *b)
{
    return strcmp(((const s_file_t *)a)->name, ((const s_file_t *)b)->name);
}

static void s_files_free(s_file_t *files, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(files[i].name);
    free(files);
}

/* Lists the migration files of dir sorted by name (= by version, the prefix
 * being fixed-width). Returns 0, or -1 when dir cannot be read or two files
 * share a version. */
static int s_list(const char *dir, s_file_t **out, size_t *nout)
{
    s_file_t *files = NULL;
    size_t n = 0, cap = 0;
    DIR *d = opendir(dir);
    if (!d) {
        log_error("migrate", "cannot open directory dir=%s err=%s", dir, strerror(errno));
        return -1;
    }
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!s_name_ok(de->d_name))
            continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            files = xrealloc(files, cap * sizeof *files);
        }
        files[n].version = (de->d_name[0] - '0') * 100 + (de->d_name[1] - '0') * 10 +
                           (de->d_name[2] - '0');
        files[n].name = xstrdup(de->d_name);
        n++;
    }
    closedir(d);
    if (n)
        qsort(files, n, sizeof *files, s_file_cmp);
    for (size_t i = 1; i < n; i++) {
        if (files[i].version == files[i - 1].version) {
            log_error("migrate", "two files with one version dir=%s files=%s,%s", dir,
                      files[i - 1].name, files[i].name);
            s_files_free(files, n);
            return -1;
        }
    }
    *out = files;
    *nout = n;
    return 0;
}

/* Reads dir/name whole and NUL-terminated into *text (caller frees), and
 * its SHA-256 in hex into hex. Returns 0 or -1 with the reason logged. */
static int s_read(const char *dir, const char *name, char **text, char hex[65])
{
    int rc = -1;
    char *path = xasprintf("%s/%s", dir, name);
    char *buf = NULL;
    struct stat st;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 || fstat(fd, &st) < 0) {
        log_error("migrate", "cannot read file=%s err=%s", path, strerror(errno));
        goto close_fd;
    }
    if (!S_ISREG(st.st_mode) || st.st_size > S_MAX_FILE_BYTES) {
        log_error("migrate", "not a regular file of at most %d bytes file=%s", S_MAX_FILE_BYTES,
                  path);
        goto close_fd;
    }
    size_t len = 0, size = (size_t)st.st_size;
    buf = xmalloc(size + 1);
    while (len < size) {
        ssize_t r = read(fd, buf + len, size - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            log_error("migrate", "cannot read file=%s err=%s", path,
                      r < 0 ? strerror(errno) : "file shrank");
            goto free_buf;
        }
        len += (size_t)r;
    }
    buf[len] = '\0';
    /* PQexec takes a C string: a NUL inside would silently cut the file. */
    if (memchr(buf, '\0', len)) {
        log_error("migrate", "file contains a NUL byte file=%s", path);
        goto free_buf;
    }
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int mdlen = 0;
    if (!EVP_Digest(buf, len, md, &mdlen, EVP_sha256(), NULL) || mdlen != 32) {
        log_error("migrate", "cannot compute SHA-256 file=%s", path);
        goto free_buf;
    }
    for (unsigned int i = 0; i < mdlen; i++)
        snprintf(hex + 2 * i, 3, "%02x", md[i]);
    *text = buf;
    buf = NULL;
    rc = 0;

free_buf:
    free(buf);
close_fd:
    if (fd >= 0)
        close(fd);
    free(path);
    return rc;
}

static const char *s_oneline(const char *msg, char *buf, size_t len)
{
    size_t n = 0;
    for (; msg && *msg && n + 1 < len; msg++) {
        bool space = *msg == ' ' || *msg == '\n' || *msg == '\r' || *msg == '\t';
        if (space && (n == 0 || buf[n - 1] == ' '))
            continue;
        buf[n++] = space ? ' ' : *msg;
    }
    while (n && buf[n - 1] == ' ')
        n--;
    buf[n] = '\0';
    return buf;
}

/* A COPY in a file would leave the connection in copy mode, where not even
 * ROLLBACK gets through; end it so the connection stays usable. */
static void s_abandon_copy(PGconn *conn, ExecStatusType st)
{
    if (st == PGRES_COPY_IN || st == PGRES_COPY_BOTH)
        PQputCopyEnd(conn, "COPY FROM STDIN is not supported in migration files");
    char *row;
    while (PQgetCopyData(conn, &row, 0) > 0)
        PQfreemem(row);
    PGresult *r;
    while ((r = PQgetResult(conn)))
        PQclear(r);
}

/* Runs sql (several statements allowed) and logs the server's message for
 * what on failure. Returns 0 or -1. */
static int s_exec(PGconn *conn, const char *sql, const char *what)
{
    char buf[512];
    PGresult *res = PQexec(conn, sql);
    ExecStatusType st = PQresultStatus(res);
    int rc = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY ? 0 : -1;
    if (rc < 0) {
        const char *err = res && *PQresultErrorMessage(res) ? PQresultErrorMessage(res)
                                                            : PQerrorMessage(conn);
        if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH)
            err = "COPY is not supported in migration files";
        log_error("migrate", "%s failed: %s", what, s_oneline(err, buf, sizeof buf));
    }
    PQclear(res);
    if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH)
        s_abandon_copy(conn, st);
    return rc;
}

static void s_rollback(PGconn *conn)
{
    if (PQtransactionStatus(conn) != PQTRANS_IDLE)
        PQclear(PQexec(conn, "ROLLBACK"));
}

/* Checks every applied version that still has a file: the file must be the
 * one that was applied. Done before applying anything, so that new files
 * never land on top of a history that has been edited. */
static int s_verify(const char *schema, const char *dir, const s_file_t *files, size_t nfiles,
                    const PGresult *applied)
{
    int rc = 0;
    for (int r = 0; r < PQntuples(applied); r++) {
        int version = atoi(PQgetvalue(applied, r, 0));
        const char *name = PQgetvalue(applied, r, 1);
        const char *sum = PQgetvalue(applied, r, 2);
        const s_file_t *f = NULL;
        for (size_t i = 0; i < nfiles && !f; i++)
            if (files[i].version == version)
                f = &files[i];
        if (!f) {
            /* An older build starting against a newer schema: harmless. */
            log_warn("migrate", "applied migration has no file schema=%s version=%d name=%s",
                     schema, version, name);
            continue;
        }
        char *text = NULL, hex[65];
        if (s_read(dir, f->name, &text, hex) < 0)
            return -1;
        free(text);
        if (strcmp(hex, sum) != 0) {
            log_error("migrate", "applied migration has changed schema=%s file=%s/%s "
                      "recorded=%s now=%s", schema, dir, f->name, sum, hex);
            rc = -1;
        } else if (strcmp(name, f->name) != 0) {
            log_warn("migrate", "applied migration was renamed schema=%s version=%d "
                     "recorded=%s now=%s", schema, version, name, f->name);
        }
    }
    return rc;
}

static bool s_is_applied(const PGresult *applied, int version)
{
    for (int r = 0; r < PQntuples(applied); r++)
        if (atoi(PQgetvalue(applied, r, 0)) == version)
            return true;
    return false;
}

/* Runs one file and records it, all in one transaction. Returns 0 or -1
 * with nothing of the file left behind. */
static int s_apply_one(PGconn *conn, const char *schema, const char *ident, const char *dir,
                       const s_file_t *f)
{
    int rc = -1;
    char *text = NULL, *sql = NULL, *what = NULL, hex[65];
    PGresult *res = NULL;
    if (s_read(dir, f->name, &text, hex) < 0)
        return -1;
    what = xasprintf("migration schema=%s file=%s/%s", schema, dir, f->name);
    if (s_exec(conn, "BEGIN", what) < 0)
        goto free_text;
    sql = xasprintf("SET LOCAL search_path TO %s, public; "
                    "SET LOCAL client_min_messages TO warning", ident);
    if (s_exec(conn, sql, what) < 0 || s_exec(conn, text, what) < 0)
        goto roll_back;
    /* A COMMIT inside the file would split it from its row below. */
    if (PQtransactionStatus(conn) != PQTRANS_INTRANS) {
        log_error("migrate", "%s failed: the file ended the transaction (no BEGIN, COMMIT or "
                  "ROLLBACK in migration files)", what);
        goto roll_back;
    }
    free(sql);
    sql = xasprintf("INSERT INTO %s.schema_migrations(version, name, checksum) "
                    "VALUES ($1, $2, $3)", ident);
    char version[16];
    snprintf(version, sizeof version, "%d", f->version);
    const char *params[3] = { version, f->name, hex };
    res = db_exec(conn, sql, 3, params);
    if (!res)
        goto roll_back;
    if (s_exec(conn, "COMMIT", what) < 0)
        goto roll_back;
    log_info("migrate", "applied schema=%s version=%d file=%s", schema, f->version, f->name);
    rc = 0;
    goto free_text;

roll_back:
    s_rollback(conn);
free_text:
    PQclear(res);
    free(sql);
    free(what);
    free(text);
    return rc;
}

int migrate_apply(PGconn *conn, const char *schema, const char *dir)
{
    int rc = -1, count = 0;
    s_file_t *files = NULL;
    size_t nfiles = 0;
    char *ident = NULL, *sql = NULL;
    PGresult *res = NULL, *applied = NULL;
    const char *lock_params[1] = { schema };

    if (!s_schema_ok(schema)) {
        log_error("migrate", "bad schema name (want [a-z_][a-z0-9_]{0,62}) schema=%s",
                  schema ? schema : "(null)");
        return -1;
    }
    if (!conn || !dir || s_list(dir, &files, &nfiles) < 0)
        return -1;
    ident = PQescapeIdentifier(conn, schema, strlen(schema));
    if (!ident) {
        log_error("migrate", "cannot quote schema=%s: %s", schema, PQerrorMessage(conn));
        goto free_files;
    }
    /* Replicas starting together queue here; the one that gets the lock
     * second finds the work done. */
    res = db_exec(conn, "SELECT pg_advisory_lock(hashtext($1))", 1, lock_params);
    if (!res)
        goto free_ident;
    PQclear(res);
    res = NULL;

    sql = xasprintf("BEGIN; SET LOCAL client_min_messages TO warning; "
                    "CREATE SCHEMA IF NOT EXISTS %s; "
                    "CREATE TABLE IF NOT EXISTS %s.schema_migrations ("
                    "version int PRIMARY KEY, name text NOT NULL, checksum text NOT NULL, "
                    "applied_at timestamptz NOT NULL DEFAULT now()); COMMIT",
                    ident, ident);
    if (s_exec(conn, sql, "creating schema_migrations") < 0) {
        s_rollback(conn);
        goto unlock;
    }
    free(sql);
    sql = xasprintf("SELECT version, name, checksum FROM %s.schema_migrations ORDER BY version",
                    ident);
    applied = db_exec(conn, sql, 0, NULL);
    if (!applied || s_verify(schema, dir, files, nfiles, applied) < 0)
        goto unlock;

    for (size_t i = 0; i < nfiles; i++) {
        if (s_is_applied(applied, files[i].version))
            continue;
        if (s_apply_one(conn, schema, ident, dir, &files[i]) < 0)
            goto unlock;
        count++;
    }
    if (count)
        log_info("migrate", "schema up to date schema=%s applied=%d", schema, count);
    rc = count;

unlock:
    res = db_exec(conn, "SELECT pg_advisory_unlock(hashtext($1))", 1, lock_params);
    PQclear(res);
    PQclear(applied);
    free(sql);
free_ident:
    PQfreemem(ident);
free_files:
    s_files_free(files, nfiles);
    return rc;
}

int migrate_service(const char *conninfo, const char *schema, const char *dir)
{
    PGconn *conn = PQconnectdb(conninfo);
    int rc = -1;
    if (PQstatus(conn) != CONNECTION_OK) {
        log_error("migrate", "cannot connect err=%s", PQerrorMessage(conn));
        goto done;
    }
    int n = migrate_apply(conn, schema, dir);
    if (n >= 0) {
        log_info("migrate", "schema up to date schema=%s applied=%d", schema, n);
        rc = 0;
    }
done:
    PQfinish(conn);
    return rc;
}
