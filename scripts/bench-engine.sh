#!/usr/bin/env bash
# Engine benchmark: admit+settle pairs per second against plain single-row UPDATE pairs
# measured in the same run on the same throwaway cluster (pgbench -M prepared, 8 clients,
# 2 threads, unix socket). Prints ratios; asserts nothing.
set -euo pipefail
LOG_TAG=bench
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
DURATION=${BENCH_SECONDS:-15}
PORT=${PGQ_BENCH_PORT:-54392}

bash scripts/bootstrap.sh >/dev/null
install_extension --release
WORK=$(mktemp -d /var/tmp/pg_quota-bench.XXXXXX); chmod 755 "$WORK"
trap 'cluster_stop "$WORK/cluster"; rm -rf "$WORK"' EXIT
cluster_init "$WORK/cluster"
cluster_start "$WORK/cluster" "$PORT" "shared_buffers=512MB" "max_connections=50"
export PGHOST="$WORK/cluster/socket" PGPORT=$PORT PGUSER=postgres PGDATABASE=postgres
psql -X -q -v ON_ERROR_STOP=1 -f tests/bench/setup.sql >/dev/null || fail "benchmark setup"

run() {  # run NAME SCRIPT -> prints and returns tps
  psql -X -q -c "VACUUM ANALYZE" >/dev/null
  local tps
  tps=$("$PG_BIN/pgbench" -n -M prepared -c 8 -j 2 -T "$DURATION" -f "tests/bench/$2" 2>&1 \
        | awk '/^tps = / {print $3; exit}')
  [ -n "$tps" ] || fail "pgbench $2 produced no result"
  printf '  %-44s %10.0f pairs/s\n' "$1" "$tps" >&2
  echo "$tps"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }

say "pairs per second (two committed statements each), $DURATION s per run"
base_spread=$(run "baseline: UPDATE pair, 1,000 rows" baseline_spread.sql)
pair_spread=$(run "admit+settle, 1,000 spread keys, 1 policy" pair_spread.sql)
base_hot=$(run "baseline: UPDATE pair, one hot row" baseline_hot.sql)
pair_hot=$(run "admit+settle, one hot key, 1 policy" pair_hot.sql)
psql -X -q -v ON_ERROR_STOP=1 -f tests/bench/six_policies.sql >/dev/null
pair_hot6=$(run "admit+settle, one hot key, 6 policies" pair_hot.sql)
drift=$(psql -X -At -c "SELECT count(*) FROM quota.drift()") \
  || { tail -n 30 "$WORK/cluster/server.log" >&2; fail "drift check"; }

cat <<MSG

  ratio spread (goal >= 0.5):          $(ratio "$pair_spread" "$base_spread")
  ratio hot key (goal >= 0.7):         $(ratio "$pair_hot" "$base_hot")
  ratio hot key, 6 policies:           $(ratio "$pair_hot6" "$base_hot")
  counters drifting after the runs:    $drift
MSG
