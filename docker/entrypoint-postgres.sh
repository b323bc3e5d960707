#!/usr/bin/env bash
# Entrypoint of the pg-quota-postgres image. Runs as `postgres`.
#
# First start (no $PGDATA/PG_VERSION): initdb with the superuser password from POSTGRES_PASSWORD
# or POSTGRES_PASSWORD_FILE, preload pg_quota with its sweeper on $PGQ_DB, create that database
# with the extension, create the relay login role (IN ROLE quota_relay, nothing else), run the
# *.sql files of /docker-entrypoint-initdb.d once, in name order, in $PGQ_DB. Any later start
# only starts the server. A first start that fails leaves an empty data directory behind, so the
# next start tries again.
#
# PostgreSQL runs as a child of this script, which forwards SIGTERM and SIGINT as a fast
# shutdown (clients are disconnected, a checkpoint is written, exit 0): a pooled client such as
# the relay never holds up `docker stop`. Any other command (e.g. `bash`) is run as given.
set -Eeuo pipefail

PG_BIN=/usr/lib/postgresql/15/bin
PGDATA=${PGDATA:-/var/lib/postgresql/data}
PGQ_DB=${PGQ_DB:-pg_quota}
PGQ_RELAY_USER=${PGQ_RELAY_USER:-pgq_relay}
PGQ_LISTEN_ADDRESSES=${PGQ_LISTEN_ADDRESSES:-*}
PGQ_SWEEP_INTERVAL=${PGQ_SWEEP_INTERVAL:-60s}
INITDB_DIR=${PGQ_INITDB_DIR:-/docker-entrypoint-initdb.d}
SOCKET_DIR=/var/run/postgresql
export PGDATA

say()  { printf '[pg-quota-entrypoint] %s\n' "$*"; }
fail() { printf '[pg-quota-entrypoint] FAILED: %s\n' "$*" >&2; exit 1; }

# secret NAME: the value of $NAME, or the contents of the file named by $NAME_FILE (one of them,
# not both). Trailing newlines of a file are dropped.
secret() {
  local name=$1 file_var="${1}_FILE"
  local value=${!name:-} file=${!file_var:-}
  if [ -n "$value" ] && [ -n "$file" ]; then fail "set $name or $file_var, not both"; fi
  if [ -n "$file" ]; then
    [ -r "$file" ] || fail "$file_var=$file is not a readable file"
    value=$(cat "$file")
  fi
  printf '%s' "$value"
}

valid_ident() { [[ $1 =~ ^[a-z_][a-z0-9_]{0,62}$ ]]; }

first_start() {
  local su_password relay_password
  su_password=$(secret POSTGRES_PASSWORD)
  relay_password=$(secret PGQ_RELAY_PASSWORD)
  [ -n "$su_password" ] || fail "first start: set POSTGRES_PASSWORD or POSTGRES_PASSWORD_FILE (the superuser's password)"
  [ -n "$relay_password" ] || fail "first start: set PGQ_RELAY_PASSWORD or PGQ_RELAY_PASSWORD_FILE (the relay role's password)"
  # Not in the environment of the server and its backends.
  unset POSTGRES_PASSWORD POSTGRES_PASSWORD_FILE PGQ_RELAY_PASSWORD PGQ_RELAY_PASSWORD_FILE
  valid_ident "$PGQ_DB" || fail "PGQ_DB='$PGQ_DB' must be a lower-case SQL identifier"
  valid_ident "$PGQ_RELAY_USER" || fail "PGQ_RELAY_USER='$PGQ_RELAY_USER' must be a lower-case SQL identifier"
  [[ $PGQ_SWEEP_INTERVAL =~ ^[0-9]+(ms|s|min|h|d)?$ ]] \
    || fail "PGQ_SWEEP_INTERVAL='$PGQ_SWEEP_INTERVAL' must be a number with an optional unit (ms, s, min, h, d)"
  [ -z "$(ls -A "$PGDATA" 2>/dev/null)" ] \
    || fail "$PGDATA is neither empty nor a PostgreSQL data directory; refusing to touch it"

  say "first start: initdb in $PGDATA"
  # Wipe a half-made cluster on any failure below, so that the next start begins again.
  trap 'say "first start failed: emptying $PGDATA"; "$PG_BIN/pg_ctl" -D "$PGDATA" -m immediate -w stop >/dev/null 2>&1 || true; find "$PGDATA" -mindepth 1 -delete 2>/dev/null || true' ERR
  local pwfile
  pwfile=$(mktemp)           # private to this user (umask 077 below), removed at once
  printf '%s\n' "$su_password" >"$pwfile"
  "$PG_BIN/initdb" -D "$PGDATA" -U postgres --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
    --auth-local=peer --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"

  # Passwords over TCP from anywhere (the container's network decides who can reach it);
  # the socket only for the local `postgres` OS user (peer), e.g. `docker exec -u postgres`.
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  cat >>"$PGDATA/postgresql.conf" <<CONF

# pg-quota-postgres image
shared_preload_libraries = 'pg_quota'
pg_quota.sweep_database = '$PGQ_DB'
pg_quota.sweep_interval = '$PGQ_SWEEP_INTERVAL'
unix_socket_directories = '$SOCKET_DIR'
CONF

  # While the databases are made, a server on a private socket only: no client, and no health
  # check (pg_isready on $SOCKET_DIR), sees a half-made database.
  local init_socket
  init_socket=$(mktemp -d)
  "$PG_BIN/pg_ctl" -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories='$init_socket'" \
    -w -t 60 start >/dev/null
  local psql=("$PG_BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$init_socket" -U postgres)
  "${psql[@]}" -d postgres <<SQL
SELECT 'CREATE DATABASE $PGQ_DB' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$PGQ_DB') \gexec
SQL
  # The password reaches psql through the environment, never its command line (\getenv).
  PGQ_INIT_RELAY_PASSWORD=$relay_password "${psql[@]}" -d "$PGQ_DB" <<SQL
SET client_min_messages = warning;
CREATE EXTENSION pg_quota;
\getenv relay_password PGQ_INIT_RELAY_PASSWORD
CREATE ROLE $PGQ_RELAY_USER LOGIN PASSWORD :'relay_password' IN ROLE quota_relay;
-- Key secrets are bind parameters of quota.admit: keep them out of the server log.
ALTER ROLE $PGQ_RELAY_USER SET log_parameter_max_length = 0;
ALTER ROLE $PGQ_RELAY_USER SET log_min_duration_statement = -1;
SQL
  unset relay_password su_password

  local f
  for f in "$INITDB_DIR"/*; do
    [ -e "$f" ] || continue
    case $f in
      *.sql) say "running $f"; "${psql[@]}" -d "$PGQ_DB" -At -f "$f" ;;
      *)     say "ignoring $f (only *.sql files are run)" ;;
    esac
  done

  "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
  rmdir "$init_socket"
  trap - ERR
  say "first start done: database $PGQ_DB, relay role $PGQ_RELAY_USER"
}

if [ "${1:-postgres}" != postgres ]; then exec "$@"; fi
[ $# -gt 0 ] && shift

[ "$(id -u)" != 0 ] || fail "run as the postgres user, not root"
umask 077
[ -d "$SOCKET_DIR" ] && [ -w "$SOCKET_DIR" ] || fail "$SOCKET_DIR must exist and be writable by $(id -un)"
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  first_start
else
  say "data directory $PGDATA exists: starting"
fi

# Passwords are needed at the first start only; keep them out of the server's environment.
unset POSTGRES_PASSWORD POSTGRES_PASSWORD_FILE PGQ_RELAY_PASSWORD PGQ_RELAY_PASSWORD_FILE
"$PG_BIN/postgres" -D "$PGDATA" -c listen_addresses="$PGQ_LISTEN_ADDRESSES" "$@" &
pg_pid=$!
trap 'kill -INT "$pg_pid" 2>/dev/null || true' TERM INT
# `wait` returns early when a trapped signal arrives: wait until the server is really gone.
status=0
while kill -0 "$pg_pid" 2>/dev/null; do
  wait "$pg_pid" && status=0 || status=$?
done
exit "$status"
