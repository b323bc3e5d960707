#!/usr/bin/env bash
# Engine benchmark: admit+settle pairs per second against plain single-row UPDATE pairs
# measured in the same run on the same throwaway cluster (pgbench -M prepared, 8 clients,
# 2 threads, unix socket). Also runs the data model's floor (tests/bench/floor_setup.sql: the
# same row writes with no engine logic), so each figure shows how much of the distance to the
# baseline is the engine's own work. Prints ratios; asserts nothing. BENCH_SECONDS (10) per case
# and BENCH_ROUNDS (3) set the length.
set -euo pipefail
LOG_TAG=bench
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
DURATION=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-3}
PORT=${PGQ_BENCH_PORT:-54392}

bash scripts/bootstrap.sh >/dev/null
install_extension --release
WORK=$(mktemp -d /var/tmp/pg_quota-bench.XXXXXX); chmod 755 "$WORK"
trap 'cluster_stop "$WORK/cluster"; rm -rf "$WORK"' EXIT
cluster_init "$WORK/cluster"
cluster_start "$WORK/cluster" "$PORT" "shared_buffers=512MB" "max_connections=50"
export PGHOST="$WORK/cluster/socket" PGPORT=$PORT PGUSER=postgres PGDATABASE=postgres
psql -X -q -v ON_ERROR_STOP=1 -f tests/bench/setup.sql >/dev/null || fail "benchmark setup"

run() {  # run SCRIPT -> prints tps
  psql -X -q -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null
  local tps
  tps=$("$PG_BIN/pgbench" -n -M prepared -c 8 -j 2 -T "$DURATION" -f "tests/bench/$1" 2>&1 \
        | awk '/^tps = / {print $3; exit}')
  [ -n "$tps" ] || fail "pgbench $1 produced no result"
  echo "$tps"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

# The machine's speed drifts (other tenants, disk flush times), so each round measures every
# case right after its baseline, and the summary takes the median of the rounds' ratios.
psql -X -q -v ON_ERROR_STOP=1 -f tests/bench/six_policies.sql >/dev/null || fail "six-policy setup"
psql -X -q -v ON_ERROR_STOP=1 -f tests/bench/floor_setup.sql >/dev/null || fail "floor setup"
say "pairs per second (two committed statements each), $ROUNDS rounds of $DURATION s per case"
printf '  %-6s %11s %11s %11s %6s %6s %11s %11s %11s %6s %6s %11s %6s\n' round "base 1,000" \
  "floor" "spread" ratio "/floor" "base hot" "floor hot" "hot key" ratio "/floor" "6 policies" ratio >&2
r_spread=(); r_hot=(); r_hot6=(); r_floor=(); r_floor_hot=(); f_spread=(); f_hot=(); r_bare=(); r_bare_hot=()
for round in $(seq 1 "$ROUNDS"); do
  base_spread=$(run baseline_spread.sql); floor_spread=$(run floor_spread.sql); pair_spread=$(run pair_spread.sql)
  base_hot=$(run baseline_hot.sql); floor_hot=$(run floor_hot.sql); pair_hot=$(run pair_hot.sql)
  pair_hot6=$(run pair_hot6.sql)
  r_bare+=("$(ratio "$(run floor_bare_spread.sql)" "$base_spread")")
  r_bare_hot+=("$(ratio "$(run floor_bare_hot.sql)" "$base_hot")")
  r_spread+=("$(ratio "$pair_spread" "$base_spread")"); r_hot+=("$(ratio "$pair_hot" "$base_hot")")
  r_hot6+=("$(ratio "$pair_hot6" "$base_hot")")
  r_floor+=("$(ratio "$floor_spread" "$base_spread")"); r_floor_hot+=("$(ratio "$floor_hot" "$base_hot")")
  f_spread+=("$(ratio "$pair_spread" "$floor_spread")"); f_hot+=("$(ratio "$pair_hot" "$floor_hot")")
  printf '  %-6s %11.0f %11.0f %11.0f %6s %6s %11.0f %11.0f %11.0f %6s %6s %11.0f %6s\n' "$round" \
    "$base_spread" "$floor_spread" "$pair_spread" "${r_spread[-1]}" "${f_spread[-1]}" \
    "$base_hot" "$floor_hot" "$pair_hot" "${r_hot[-1]}" "${f_hot[-1]}" "$pair_hot6" "${r_hot6[-1]}" >&2
done
drift=$(psql -X -At -c "SELECT count(*) FROM quota.drift()") \
  || { tail -n 30 "$WORK/cluster/server.log" >&2; fail "drift check"; }
left=$(psql -X -At -c "SELECT count(*) FROM quota.reservation")

cat <<MSG

  median ratio spread (goal >= 0.5):           $(median "${r_spread[@]}")
  median ratio hot key (goal >= 0.7):          $(median "${r_hot[@]}")
  median ratio hot key, 6 policies + boost:    $(median "${r_hot6[@]}")
  the data model's floor, spread / hot key:    $(median "${r_floor[@]}") / $(median "${r_floor_hot[@]}")
  pairs as a share of that floor, spread / hot: $(median "${f_spread[@]}") / $(median "${f_hot[@]}")
  the floor of bare tables, spread / hot key:  $(median "${r_bare[@]}") / $(median "${r_bare_hot[@]}")
  counters drifting after the runs:            $drift
  reservations left after the runs:            $left
MSG
