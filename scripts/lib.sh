# Shared shell helpers for run.sh, test.sh and bench scripts. Source it; do not run it.
# Every step that can fail says what failed in one line.

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
PG_CONFIG=${PG_CONFIG:-$PG_BIN/pg_config}
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# Python with the openai SDK, installed by bootstrap.sh (same venv path there).
SDK_PYTHON=${PGQ_SDK_VENV:-/var/tmp/pg_quota-sdk-venv}/bin/python

say()  { printf '[%s] %s\n' "${LOG_TAG:-pg_quota}" "$*"; }
fail() { printf '[%s] FAILED: %s\n' "${LOG_TAG:-pg_quota}" "$*" >&2; exit 1; }

# Servers run as `postgres`: initdb and postgres refuse to run as root.
as_postgres() {
  if [ "$(id -un)" = postgres ]; then "$@"; else runuser -u postgres -- "$@"; fi
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# cluster_init DIR: a cluster owned by postgres with trust auth on loopback and a private socket dir.
cluster_init() {
  local dir=$1
  [ -f "$dir/data/PG_VERSION" ] && return 0
  mkdir -p "$dir/data" "$dir/socket" || fail "cannot create $dir"
  chown -R postgres:postgres "$dir" || fail "cannot chown $dir to postgres"
  as_postgres "$PG_BIN/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
    >"$dir/initdb.log" 2>&1 || fail "initdb of $dir failed (see $dir/initdb.log)"
}

# cluster_standby_of PRIMARY_DIR PRIMARY_PORT DIR: a streaming standby of the running cluster in
# PRIMARY_DIR (pg_basebackup over its socket, with its configuration and standby.signal), not
# started; start it with cluster_start on a port of its own.
cluster_standby_of() {
  local primary=$1 port=$2 dir=$3
  mkdir -p "$dir/socket" || fail "cannot create $dir"
  chown -R postgres:postgres "$dir" || fail "cannot chown $dir to postgres"
  as_postgres "$PG_BIN/pg_basebackup" -D "$dir/data" -h "$primary/socket" -p "$port" -U postgres \
    -X stream -R -c fast >"$dir/basebackup.log" 2>&1 || fail "pg_basebackup into $dir failed (see $dir/basebackup.log)"
}

# cluster_start DIR PORT [extra postgres -c options...]
cluster_start() {
  local dir=$1 port=$2; shift 2
  local opts="-c port=$port -c listen_addresses=127.0.0.1 -c unix_socket_directories=$dir/socket"
  local o; for o in "$@"; do opts="$opts -c $o"; done
  port_in_use "$port" && fail "port $port is in use (another server?); set a free port and retry"
  as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -o "$opts" -w -t 60 start >/dev/null \
    || { tail -n 5 "$dir/server.log" >&2; fail "cluster in $dir did not start (see $dir/server.log)"; }
}

cluster_stop() {
  local dir=$1
  [ -f "$dir/data/postmaster.pid" ] || return 0
  as_postgres "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}

# Install the extension into the Postgres named by $PG_CONFIG. Pass --release for benchmarks and the demo.
# Also installs the frozen install scripts of earlier releases (install_release_scripts).
install_extension() {
  (cd "$REPO_ROOT/pg_quota" && cargo pgrx install --pg-config "$PG_CONFIG" "$@" >/dev/null 2>&1) \
    || fail "cargo pgrx install failed (rerun: cd pg_quota && cargo pgrx install --pg-config $PG_CONFIG)"
  install_release_scripts "$("$PG_CONFIG" --sharedir)/extension"
}

# install_release_scripts DIR: the frozen install scripts of earlier releases (sql/releases/),
# which cargo pgrx neither installs nor packages, into an extension directory, so that
# `CREATE EXTENSION pg_quota VERSION '0.1.0'` works there (the upgrade test, the images).
install_release_scripts() {
  install -m 644 "$REPO_ROOT"/sql/releases/pg_quota--*.sql "$1/" \
    || fail "installing sql/releases/ into $1"
}

# Start a binary in the background and wait for its "listening on http://..." stdout line.
# Sets SPAWNED_URL and appends the pid to SPAWNED_PIDS at once, so an exit trap that kills
# "${SPAWNED_PIDS[@]}" stops it even when start-up fails. Usage: spawn_listening LOGFILE cmd args...
SPAWNED_PIDS=()
spawn_listening() {
  local log=$1; shift
  "$@" >"$log" 2>&1 &
  SPAWNED_PID=$!
  SPAWNED_PIDS+=("$SPAWNED_PID")
  local i
  for i in $(seq 1 100); do
    SPAWNED_URL=$(grep -o 'listening on http://[^ ]*' "$log" 2>/dev/null | head -n1 | sed 's/listening on //' || true)
    [ -n "$SPAWNED_URL" ] && return 0
    kill -0 "$SPAWNED_PID" 2>/dev/null || { tail -n 5 "$log" >&2; fail "$1 exited at start-up (see $log)"; }
    sleep 0.1
  done
  fail "$1 did not report a listening address within 10 s (see $log)"
}

# Benchmarks (scripts/bench-*.sh). bench_cluster NAME PORT [SETTING...]: the extension built
# in release mode and a throwaway cluster under WORK (/var/tmp/pg_quota-NAME.*), removed on
# exit, with PGHOST, PGPORT, PGUSER and PGDATABASE pointing at it. pgbench_tps SCRIPT SECONDS [PGBENCH ARGS]: transactions per
# second of tests/bench/SCRIPT, 8 clients over 2 threads, prepared, after a VACUUM ANALYZE and a
# CHECKPOINT (so no case pays for the one before). ratio A B: A / B. median X...: the middle one.
bench_cluster() {
  local name=$1 port=$2
  shift 2
  bash "$REPO_ROOT/scripts/bootstrap.sh" >/dev/null
  install_extension --release
  WORK=$(mktemp -d "/var/tmp/pg_quota-$name.XXXXXX"); chmod 755 "$WORK"
  trap 'cluster_stop "$WORK/cluster"; rm -rf "$WORK"' EXIT
  cluster_init "$WORK/cluster"
  cluster_start "$WORK/cluster" "$port" "$@"
  export PGHOST="$WORK/cluster/socket" PGPORT=$port PGUSER=postgres PGDATABASE=postgres
}
pgbench_tps() {
  psql -X -q -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null
  local tps script=$1 seconds=$2
  shift 2
  tps=$("$PG_BIN/pgbench" -n -M prepared -c 8 -j 2 -T "$seconds" "$@" -f "$REPO_ROOT/tests/bench/$script" 2>&1 \
        | awk '/^tps = / {print $3; exit}')
  [ -n "$tps" ] || fail "pgbench $script produced no result"
  echo "$tps"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
