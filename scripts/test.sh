#!/usr/bin/env bash
# Run every test, in tiers: plain Rust unit tests; #[pg_test] via cargo pgrx test; then
# out-of-process tests (pg_regress, isolation specs, Rust tests driving the relay) against a
# throwaway PostgreSQL 15 cluster that this script creates, and always stops and removes.
set -euo pipefail
LOG_TAG=test
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

bash scripts/bootstrap.sh

TEST_PORT=${PGQ_TEST_PORT:-54391}
WORK=$(mktemp -d /var/tmp/pg_quota-test.XXXXXX)
chmod 755 "$WORK"
RESULTS="$WORK/results.log"
: >"$RESULTS"

cleanup() {
  local pid
  for pid in "${SPAWNED_PIDS[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
  cluster_stop "$WORK/cluster"
  rm -rf "$WORK" /var/tmp/pg_quota-pgrx-test
}
trap cleanup EXIT

# Runs a test command, keeps its output for the tally, and fails the whole run on failure.
tier() {
  local name=$1; shift
  say "── $name"
  if ! "$@" 2>&1 | tee -a "$RESULTS"; then
    fail "$name"
  fi
}

tier "unit tests (window math, relay)" cargo test -p pg_quota_core -p pg-quota-relay

rm -rf /var/tmp/pg_quota-pgrx-test
tier "#[pg_test] (cargo pgrx test)" bash -c \
  "cd pg_quota && cargo pgrx test pg15 --runas postgres --pgdata /var/tmp/pg_quota-pgrx-test"

say "── installing the extension and starting a throwaway cluster on port $TEST_PORT"
install_extension
cargo build -q -p pg-quota-relay || fail "cargo build -p pg-quota-relay"
cluster_init "$WORK/cluster"
cluster_start "$WORK/cluster" "$TEST_PORT" "shared_preload_libraries=pg_quota" "max_connections=200" \
  "pg_quota.sweep_database=pgq_sweeper" "pg_quota.sweep_interval=1s"

export PGHOST="$WORK/cluster/socket" PGPORT=$TEST_PORT PGUSER=postgres
regress_opts=(--host="$PGHOST" --port="$PGPORT" --user=postgres --use-existing)

if ls tests/regress/sql/*.sql >/dev/null 2>&1; then
  tier "pg_regress (SQL behaviour)" bash -c "
    cd tests/regress && psql -q -d postgres -c 'DROP DATABASE IF EXISTS pgq_regress' -c 'CREATE DATABASE pgq_regress' &&
    $PG_BIN/../lib/pgxs/src/test/regress/pg_regress ${regress_opts[*]} --dbname=pgq_regress \
      --inputdir=. --outputdir=. \$(ls sql | sed 's/\.sql\$//' | sort) \
    || { cat regression.diffs 2>/dev/null | head -n 80; exit 1; }"
fi

if ls tests/isolation/specs/*.spec >/dev/null 2>&1; then
  tier "isolation specs (two sessions)" bash -c "
    cd tests/isolation && psql -q -d postgres -c 'DROP DATABASE IF EXISTS pgq_isolation' -c 'CREATE DATABASE pgq_isolation' &&
    /usr/lib/postgresql/15/lib/pgxs/src/test/isolation/pg_isolation_regress ${regress_opts[*]} --dbname=pgq_isolation \
      --inputdir=. --outputdir=output_iso \$(ls specs | sed 's/\.spec\$//' | sort) \
    || { cat output_iso/regression.diffs 2>/dev/null | head -n 80; exit 1; }"
fi

tier "upgrades from frozen releases (scripts/test-upgrade.sh)" bash scripts/test-upgrade.sh

export PGQ_TEST_DSN="host=127.0.0.1 port=$TEST_PORT user=postgres dbname=postgres"
export PGQ_RELAY_BIN="$REPO_ROOT/target/debug/pg-quota-relay"
export PGQ_SERVER_LOG="$WORK/cluster/server.log"
tier "out-of-process tests (real cluster, relay)" cargo test -p pg_quota_tests -- --test-threads=1

say "── starting the mock upstream and a relay for the OpenAI SDK test"
psql -q -d postgres -c 'DROP DATABASE IF EXISTS pgq_sdk' -c 'CREATE DATABASE pgq_sdk' \
  && psql -q -d pgq_sdk -c 'CREATE EXTENSION pg_quota' || fail "creating the database pgq_sdk"
spawn_listening "$WORK/mock.log" "$PGQ_RELAY_BIN" mock-upstream --listen 127.0.0.1:0
mock_url=$SPAWNED_URL
spawn_listening "$WORK/relay.log" "$PGQ_RELAY_BIN" serve --listen 127.0.0.1:0 \
  --database-url "host=127.0.0.1 port=$TEST_PORT user=postgres dbname=pgq_sdk" --upstream-url "$mock_url/v1" \
  --forward-header 'x-mock-*'
tier "official OpenAI SDK (python)" env PGQ_RELAY_URL="$SPAWNED_URL" \
  PGQ_SDK_DSN="host=$PGHOST port=$PGPORT user=postgres dbname=pgq_sdk" "$SDK_PYTHON" tests/sdk/test_openai_sdk.py

tier "container images (scripts/test-docker.sh)" bash scripts/test-docker.sh

# One closing line for the whole run: cargo's "N passed; M failed" lines, pg_regress' and
# the isolation tester's "All N tests passed." lines, and the "NAME: N passed, M failed" lines
# of the script tiers (sdk, upgrade, docker).
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$RESULTS" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo 'passed; [0-9]+ failed' "$RESULTS" | awk '{s+=$2} END {print s+0}')
golden=$(grep -Eo 'All [0-9]+ tests passed' "$RESULTS" | awk '{s+=$2} END {print s+0}')
scripted=$(grep -Eo '^(sdk|upgrade|docker): [0-9]+ passed, [0-9]+ failed' "$RESULTS" | awk '{p+=$2; f+=$4} END {print p+0, f+0}')
echo "total: $((passed + golden + ${scripted% *})) passed, $((failed + ${scripted#* })) failed"
