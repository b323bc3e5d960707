#!/usr/bin/env bash
# Bring up the product locally: a project-local PostgreSQL 15 cluster (data in .pgdata/) with
# pg_quota installed and created, a demo user/key/policy, the mock upstream and the relay.
# Prints the demo key and a ready curl. Ctrl-C stops everything it started.
set -euo pipefail
LOG_TAG=run
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

PGQ_PORT=${PGQ_PORT:-54329}
RELAY_LISTEN=${PGQ_LISTEN:-127.0.0.1:8080}
MOCK_LISTEN=${PGQ_MOCK_LISTEN:-127.0.0.1:9090}
DATA=$REPO_ROOT/.pgdata
RUNDIR=$REPO_ROOT/.run
mkdir -p "$RUNDIR"; chmod 700 "$RUNDIR"

bash scripts/bootstrap.sh
for addr in "$RELAY_LISTEN" "$MOCK_LISTEN"; do
  port_in_use "${addr##*:}" && fail "port ${addr##*:} is in use; set PGQ_LISTEN / PGQ_MOCK_LISTEN to free addresses"
done

say "building the extension and the relay (release)"
install_extension --release
cargo build -q --release -p pg-quota-relay || fail "cargo build --release -p pg-quota-relay"

stop_all() {
  trap - INT TERM EXIT
  say "stopping"
  if [ ${#SPAWNED_PIDS[@]} -gt 0 ]; then
    kill "${SPAWNED_PIDS[@]}" 2>/dev/null || true
    wait "${SPAWNED_PIDS[@]}" 2>/dev/null || true
  fi
  cluster_stop "$DATA"
}
trap 'stop_all; exit 0' INT TERM
trap stop_all EXIT

cluster_init "$DATA"
cluster_start "$DATA" "$PGQ_PORT" "shared_preload_libraries=pg_quota" "pg_quota.sweep_database=pg_quota"
say "PostgreSQL 15 on 127.0.0.1:$PGQ_PORT (data in .pgdata/, log in .pgdata/server.log)"
PSQL=(psql -X -q -h "$DATA/socket" -p "$PGQ_PORT" -U postgres -v ON_ERROR_STOP=1)
demo_db_exists() { "${PSQL[@]}" -d postgres -tc "SELECT 1 FROM pg_database WHERE datname = 'pg_quota'" | grep -q 1; }
# Before a release the install script changes without a version bump, and CREATE EXTENSION IF
# NOT EXISTS would keep the old SQL: when the installed script differs from the one this demo
# database was made with, the demo database is made again (it holds demo data only).
sql_sum=$(cat "$($PG_CONFIG --sharedir)"/extension/pg_quota--*.sql | sha256sum | cut -c1-64)
if [ "$(cat "$DATA/extension.sha256" 2>/dev/null)" != "$sql_sum" ]; then
  if demo_db_exists; then
    say "the extension's SQL changed since the demo database was made: making it again"
    "${PSQL[@]}" -d postgres -c "DROP DATABASE pg_quota WITH (FORCE)" || fail "drop database pg_quota"
  fi
  rm -f "$RUNDIR/demo-key"
fi
echo "$sql_sum" >"$DATA/extension.sha256"
demo_db_exists \
  || "${PSQL[@]}" -d postgres -c "CREATE DATABASE pg_quota" || fail "create database pg_quota"
"${PSQL[@]}" -d pg_quota -c "SET client_min_messages = warning" \
  -c "CREATE EXTENSION IF NOT EXISTS pg_quota; ALTER EXTENSION pg_quota UPDATE" || fail "CREATE EXTENSION pg_quota"

# The demo key is shown once by create_key; keep it (mode 600) so later runs can print it again.
if [ ! -s "$RUNDIR/demo-key" ]; then
  "${PSQL[@]}" -d pg_quota -At -f sql/examples/demo.sql >"$RUNDIR/demo-key" || fail "seeding the demo data"
  chmod 600 "$RUNDIR/demo-key"
fi
DEMO_KEY=$(tail -n1 "$RUNDIR/demo-key")

# The relay logs in as pgq_relay, a member of quota_relay and never a superuser, whose bind
# parameters (API keys) are never written to the server log (sql/examples/relay_role.sql).
"${PSQL[@]}" -d pg_quota -v relay_role=pgq_relay -f sql/examples/relay_role.sql || fail "creating the relay role pgq_relay"
DATABASE_URL="host=127.0.0.1 port=$PGQ_PORT user=pgq_relay dbname=pg_quota"
spawn_listening "$RUNDIR/mock.log" target/release/pg-quota-relay mock-upstream --listen "$MOCK_LISTEN"
MOCK_URL=$SPAWNED_URL
DATABASE_URL=$DATABASE_URL spawn_listening "$RUNDIR/relay.log" target/release/pg-quota-relay serve \
  --listen "$RELAY_LISTEN" --upstream-url "$MOCK_URL/v1" --state-dir "$RUNDIR/state"
RELAY_URL=$SPAWNED_URL

cat <<MSG

  pg_quota is up.
    relay          $RELAY_URL   (log: .run/relay.log)
    demo upstream  $MOCK_URL    (log: .run/mock.log)
    database       psql -h 127.0.0.1 -p $PGQ_PORT -U postgres pg_quota
    demo key       $DEMO_KEY

  Try:
    curl -s $RELAY_URL/healthz
    curl -s $RELAY_URL/v1/chat/completions -H "Authorization: Bearer $DEMO_KEY" \\
         -H 'Content-Type: application/json' \\
         -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello!"}]}'
    psql -h 127.0.0.1 -p $PGQ_PORT -U postgres pg_quota -c 'SELECT * FROM quota.status(1)'

  Ctrl-C stops everything.
MSG
wait -n "${SPAWNED_PIDS[@]}" || true
fail "a process exited unexpectedly (see .run/*.log)"
