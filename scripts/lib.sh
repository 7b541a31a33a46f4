# shellcheck shell=bash
# Shared helpers for scripts/run, scripts/test and scripts/demo/load: find the
# PostgreSQL binaries, start and stop a project-local PostgreSQL and Redis in
# a var directory, and find free TCP ports. Source it; it defines functions
# (prefix lx_, internal ones lx__) and sets nothing else.
#
# Layout of a var directory VARDIR after lx_servers_start:
#   VARDIR/pg/data            PostgreSQL cluster (owned by the user running it)
#   VARDIR/pg/run             its unix socket (.s.PGSQL.<port>)
#   VARDIR/pg/postgres.log    its log
#   VARDIR/redis/redis.sock   Redis unix socket; redis.pid, redis.log beside it
# VARDIR/pg (or VARDIR/redis) is a symlink into a mktemp directory under /tmp
# when the real place cannot be used: PostgreSQL refuses to run as root, so
# as root it runs as the system user "linli", which may not be able to reach
# a checkout under /root; and a unix socket path must fit in 107 bytes.

LX_PG_USER=linli          # OS user PostgreSQL runs as when we are root
LX_PG_ROLE=linli          # database superuser created by initdb
LX_PG_DB=linli
LX_SOCK_MAX=100           # longest unix socket path we create (kernel limit 107)

lx_log() { printf '%s\n' "$*" >&2; }
lx_die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Prints the directory with initdb, pg_ctl and postgres. pg_config from
# postgresql-common points at the newest server; the one from libpq-dev alone
# prints /usr/bin, which has no initdb, so fall back to the newest
# /usr/lib/postgresql/*/bin. Returns 1 when none is found.
lx_pg_bindir() {
  local d
  if command -v pg_config >/dev/null 2>&1; then
    d=$(pg_config --bindir 2>/dev/null || true)
    if [ -n "$d" ] && [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
      printf '%s\n' "$d"
      return 0
    fi
  fi
  d=$(for b in /usr/lib/postgresql/*/bin; do
        [ -x "$b/initdb" ] && [ -x "$b/pg_ctl" ] && printf '%s\n' "$b"
      done | sort -V | tail -n 1)
  if [ -n "$d" ]; then
    printf '%s\n' "$d"
    return 0
  fi
  lx_log "lx_pg_bindir: no PostgreSQL server binaries (initdb) found; run scripts/bootstrap"
  return 1
}

# True when we are root (PostgreSQL then runs as $LX_PG_USER).
lx__root() { [ "$(id -u)" -eq 0 ]; }

# Runs a command as the PostgreSQL owner: as $LX_PG_USER when root, else as
# ourselves. From / so that an unreadable working directory does not matter.
lx__as_pg() {
  if lx__root; then
    (cd / && runuser -u "$LX_PG_USER" -- "$@")
  else
    (cd / && "$@")
  fi
}

# Creates the system user PostgreSQL runs as when we are root.
lx__ensure_pg_user() {
  lx__root || return 0
  id -u "$LX_PG_USER" >/dev/null 2>&1 && return 0
  lx_log "creating system user $LX_PG_USER (PostgreSQL will not run as root)"
  useradd --system --user-group --no-create-home --home-dir /nonexistent \
          --shell /usr/sbin/nologin "$LX_PG_USER" \
    || id -u "$LX_PG_USER" >/dev/null 2>&1   # lost a race with another run: fine
}

# lx__place VARDIR NAME NEED_PG_USER LONGEST_SUFFIX
# Prints the real directory to use for VARDIR/NAME, creating it if needed:
# VARDIR/NAME itself, or (when NEED_PG_USER=1 and we are root and that user
# cannot reach VARDIR, or when VARDIR/NAME/LONGEST_SUFFIX would be too long
# for a unix socket) a new mktemp directory under /tmp with VARDIR/NAME a
# symlink to it. An existing symlink to an existing directory is reused.
lx__place() {
  local var=$1 name=$2 need_pg=$3 suffix=$4 want=$1/$2 tmp
  if [ -L "$want" ]; then
    tmp=$(readlink -f "$want" || true)
    if [ -n "$tmp" ] && [ -d "$tmp" ]; then
      printf '%s\n' "$tmp"
      return 0
    fi
    lx_log "$want points at a directory that is gone (/tmp cleaned?): starting afresh"
    rm -f "$want"
  fi
  if [ -d "$want" ]; then
    printf '%s\n' "$want"
    return 0
  fi
  local relocate=0
  if [ $(( ${#want} + ${#suffix} + 1 )) -gt "$LX_SOCK_MAX" ]; then
    lx_log "$want is too deep for a unix socket path: using a directory under /tmp"
    relocate=1
  elif [ "$need_pg" = 1 ] && lx__root && ! runuser -u "$LX_PG_USER" -- test -x "$var" 2>/dev/null; then
    lx_log "user $LX_PG_USER cannot reach $var: keeping PostgreSQL's files under /tmp"
    relocate=1
  fi
  if [ $relocate = 1 ]; then
    tmp=$(mktemp -d "/tmp/linli-$name.XXXXXXXX")
    ln -s "$tmp" "$want"
    printf '%s\n' "$tmp"
  else
    mkdir -p "$want"
    printf '%s\n' "$want"
  fi
}

# Port PostgreSQL uses for its socket file name when it listens on no TCP
# port (PGPORT=0): the socket lives in our own directory, so no clash.
lx__pg_sockport() { if [ "$1" = 0 ]; then echo 5432; else echo "$1"; fi; }

# lx_servers_start [--test] VARDIR PGPORT REDISPORT
# Starts PostgreSQL (initdb on first use, database "linli" created if
# missing) and Redis for VARDIR and exports LINLI_PG (libpq conninfo over the
# unix socket) and LINLI_REDIS (socket path). PGPORT/REDISPORT: TCP port on
# 127.0.0.1, or 0 for the unix socket only. --test: throwaway data, so
# initdb --no-sync and fsync=off (never for data you keep). Servers already
# running for VARDIR are reused. Returns 0, or 1 with the reason (and the
# server log tail) on stderr.
lx_servers_start() {
  local fast=0
  if [ "${1:-}" = --test ]; then fast=1; shift; fi
  [ $# -eq 3 ] || { lx_log "usage: lx_servers_start [--test] VARDIR PGPORT REDISPORT"; return 1; }
  local var=$1 pgport=$2 redisport=$3
  mkdir -p "$var"
  var=$(cd "$var" && pwd -P)
  lx__pg_start "$var" "$pgport" "$fast" || return 1
  lx__redis_start "$var" "$redisport" || return 1
}

lx__pg_start() {
  local var=$1 pgport=$2 fast=$3 bindir pg sockport
  bindir=$(lx_pg_bindir) || return 1
  lx__ensure_pg_user || { lx_log "cannot create user $LX_PG_USER"; return 1; }
  sockport=$(lx__pg_sockport "$pgport")
  pg=$(lx__place "$var" pg 1 "run/.s.PGSQL.$sockport") || return 1
  mkdir -p "$pg/run"
  if lx__root; then chown -R "$LX_PG_USER:" "$pg"; fi
  chmod 700 "$pg"

  if [ ! -s "$pg/data/PG_VERSION" ]; then
    rm -rf "$pg/data"
    local sync=()
    [ "$fast" = 1 ] && sync=(--no-sync)
    lx_log "initdb $pg/data"
    # C collation with UTF8 encoding: Chinese text stored as-is, byte order.
    if ! lx__as_pg "$bindir/initdb" -D "$pg/data" -A trust -U "$LX_PG_ROLE" -E UTF8 \
           --locale=C "${sync[@]}" >"$pg/initdb.log" 2>&1; then
      tail -n 20 "$pg/initdb.log" >&2
      lx_log "initdb failed (full log: $pg/initdb.log)"
      return 1
    fi
    echo "include_if_exists = 'linli.conf'" >>"$pg/data/postgresql.conf"
  fi

  # Settings that may differ between starts (port, fsync) live in linli.conf,
  # rewritten on every start; initdb's postgresql.conf includes it.
  local listen=127.0.0.1 durable=on
  [ "$pgport" = 0 ] && listen=
  [ "$fast" = 1 ] && durable=off
  cat >"$pg/data/linli.conf" <<EOF
# Written by scripts/lib.sh on every start; edits are lost.
listen_addresses = '$listen'
port = $sockport
unix_socket_directories = '$pg/run'
max_connections = 100
# The daemons batch many commands per transaction: a moderate cache, WAL
# sized so checkpoints are rare, durable commits (off only for tests).
shared_buffers = 256MB
effective_cache_size = 1GB
work_mem = 8MB
maintenance_work_mem = 128MB
wal_buffers = 16MB
max_wal_size = 2GB
min_wal_size = 256MB
checkpoint_timeout = 15min
checkpoint_completion_target = 0.9
random_page_cost = 1.1
synchronous_commit = on
fsync = $durable
full_page_writes = $durable
timezone = 'UTC'
log_timezone = 'UTC'
log_min_duration_statement = 1000
log_line_prefix = '%m [%p] %q%u@%d '
EOF
  if lx__root; then chown "$LX_PG_USER:" "$pg/data/linli.conf"; fi

  if lx__as_pg "$bindir/pg_ctl" -D "$pg/data" status >/dev/null 2>&1; then
    lx_log "PostgreSQL for $var already running: reusing it"
  elif ! lx__as_pg "$bindir/pg_ctl" -D "$pg/data" -l "$pg/postgres.log" -w -t 60 start >/dev/null 2>&1; then
    tail -n 20 "$pg/postgres.log" >&2 2>/dev/null || true
    lx_log "PostgreSQL failed to start (log: $pg/postgres.log)"
    return 1
  fi
  local i
  for i in $(seq 1 120); do
    "$bindir/pg_isready" -q -h "$pg/run" -p "$sockport" -d postgres -U "$LX_PG_ROLE" && break
    sleep 0.5
  done
  if ! "$bindir/pg_isready" -q -h "$pg/run" -p "$sockport" -d postgres -U "$LX_PG_ROLE"; then
    tail -n 20 "$pg/postgres.log" >&2 2>/dev/null || true
    lx_log "PostgreSQL did not become ready (log: $pg/postgres.log)"
    return 1
  fi

  local psql=("$bindir/psql" -X -q -v ON_ERROR_STOP=1 -h "$pg/run" -p "$sockport" -U "$LX_PG_ROLE")
  if [ "$("${psql[@]}" -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname = '$LX_PG_DB'")" != 1 ]; then
    "${psql[@]}" -d postgres -c "CREATE DATABASE $LX_PG_DB" >/dev/null || {
      lx_log "cannot create database $LX_PG_DB"; return 1; }
  fi
  export LINLI_PG="host=$pg/run port=$sockport dbname=$LX_PG_DB user=$LX_PG_ROLE"
}

lx__redis_start() {
  local var=$1 port=$2 rd sock
  rd=$(lx__place "$var" redis 0 redis.sock) || return 1
  sock=$rd/redis.sock
  if [ -S "$sock" ] && redis-cli -s "$sock" ping 2>/dev/null | grep -q PONG; then
    lx_log "Redis for $var already running: reusing it"
  else
    rm -f "$sock"
    # Redis is derived state here (analytics rebuilds it from PostgreSQL):
    # no snapshots, no append-only file.
    if ! redis-server --bind 127.0.0.1 --port "$port" \
           --unixsocket "$sock" --unixsocketperm 770 \
           --save '' --appendonly no --dir "$rd" \
           --daemonize yes --pidfile "$rd/redis.pid" --logfile "$rd/redis.log" >/dev/null; then
      lx_log "redis-server failed to start (log: $rd/redis.log)"
      return 1
    fi
  fi
  local i
  for i in $(seq 1 100); do
    redis-cli -s "$sock" ping 2>/dev/null | grep -q PONG && break
    sleep 0.1
  done
  if ! redis-cli -s "$sock" ping 2>/dev/null | grep -q PONG; then
    tail -n 20 "$rd/redis.log" >&2 2>/dev/null || true
    lx_log "Redis did not answer PING (log: $rd/redis.log)"
    return 1
  fi
  export LINLI_REDIS=$sock
}

# lx_servers_stop VARDIR
# Stops the PostgreSQL (fast shutdown) and Redis (no save) of VARDIR. Servers
# that are not running, or were never set up, are fine. Keeps their data.
lx_servers_stop() {
  local var=$1 bindir pg rd pid i
  [ -d "$var" ] || return 0
  pg=$var/pg
  if [ -s "$pg/data/postmaster.pid" ] && bindir=$(lx_pg_bindir 2>/dev/null); then
    lx__as_pg "$bindir/pg_ctl" -D "$(readlink -f "$pg")/data" -m fast -w -t 60 stop >/dev/null 2>&1 || true
  fi
  rd=$var/redis
  if [ -S "$rd/redis.sock" ]; then
    redis-cli -s "$rd/redis.sock" shutdown nosave >/dev/null 2>&1 || true
  fi
  # If it did not take the hint (or the socket is gone), use the pid file.
  if [ -s "$rd/redis.pid" ]; then
    pid=$(cat "$rd/redis.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q redis "/proc/$pid/cmdline" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$rd/redis.pid"
  fi
  return 0
}

# lx_vardir_remove VARDIR
# Removes VARDIR and the /tmp directories its symlinks point into. Stop the
# servers first.
lx_vardir_remove() {
  local var=$1 l t
  [ -e "$var" ] || return 0
  for l in "$var/pg" "$var/redis"; do
    if [ -L "$l" ]; then
      t=$(readlink -f "$l" || true)
      case "$t" in /tmp/linli-*) rm -rf "$t" ;; esac
    fi
  done
  rm -rf "$var"
}

# True when something accepts TCP connections on 127.0.0.1:PORT.
lx_port_in_use() {
  (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# Prints a TCP port on 127.0.0.1 that nobody listens on. Picks at random
# below the kernel's ephemeral range (32768+), where outgoing connections do
# not take ports, and checks that it can be bound.
lx_free_port() {
  local i port
  for i in $(seq 1 100); do
    port=$(( 20000 + (RANDOM * 32768 + RANDOM) % 12000 ))
    if [ -x /usr/bin/python3 ]; then
      /usr/bin/python3 - "$port" <<'EOF' 2>/dev/null || continue
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.close()
EOF
    fi
    lx_port_in_use "$port" && continue
    printf '%s\n' "$port"
    return 0
  done
  lx_log "lx_free_port: no free port found"
  return 1
}
