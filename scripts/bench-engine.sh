#!/usr/bin/env bash
# Engine benchmark: admit+settle pairs per second against plain single-row UPDATE pairs
# measured in the same run on the same throwaway cluster (pgbench -M prepared, 8 clients,
# 2 threads, unix socket). Also runs the data model's floor (tests/bench/floor_setup.sql: the
# same row writes with no engine logic), so each figure shows how much of the distance to the
# baseline is the engine's own work. Prints ratios; asserts nothing. BENCH_SECONDS (10) per case
# and BENCH_ROUNDS (3) set the length.
# Batched cases (issue 19: quota.admit_many + quota.settle_many, batches of 16 and 64) count
# admit+settle pairs per second too (transactions x batch size), against the same baselines,
# with a batched floor (the data model's row writes done set-based). BENCH_BATCHED=0 skips them.
# PG_BIN / PG_CONFIG name the PostgreSQL to use (scripts/lib.sh), PGQ_BENCH_PORT its port.
set -euo pipefail
LOG_TAG=bench
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
DURATION=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-3}
PORT=${PGQ_BENCH_PORT:-54392}

bench_cluster bench "$PORT" "shared_buffers=512MB" "max_connections=50"
psql -X -q -v ON_ERROR_STOP=1 -f tests/bench/setup.sql >/dev/null || fail "benchmark setup"

run() {  # run SCRIPT [BATCH] -> prints pairs per second (tps x BATCH, the script's :n)
  local n=${2:-1}
  awk -v t="$(pgbench_tps "$1" "$DURATION" -D n="$n")" -v n="$n" 'BEGIN {printf "%.0f", t * n}'
}

# The machine's speed drifts (other tenants, disk flush times), so each round measures every
# case right after its baseline, and the summary takes the median of the rounds' ratios.
psql -X -q -v ON_ERROR_STOP=1 -f tests/bench/six_policies.sql >/dev/null || fail "six-policy setup"
psql -X -q -v ON_ERROR_STOP=1 -f tests/bench/floor_setup.sql >/dev/null || fail "floor setup"
say "pairs per second (two committed statements each), $ROUNDS rounds of $DURATION s per case"
printf '  %-6s %11s %11s %11s %6s %6s %11s %11s %11s %6s %6s %11s %6s\n' round "base 1,000" \
  "floor" "spread" ratio "/floor" "base hot" "floor hot" "hot key" ratio "/floor" "6 policies" ratio >&2
r_spread=(); r_hot=(); r_hot6=(); r_floor=(); r_floor_hot=(); f_spread=(); f_hot=(); r_bare=(); r_bare_hot=()
b16_spread=(); b64_spread=(); b16_hot=(); b64_hot=(); b16_hot6=(); b64_hot6=(); bf_spread=(); bf_hot=(); bf_share=(); bf_share_hot=()
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
  if [ "${BENCH_BATCHED:-1}" != 0 ]; then
    s16=$(run batch_spread.sql 16); s64=$(run batch_spread.sql 64); fs64=$(run floor_batch_spread.sql 64)
    h16=$(run batch_hot.sql 16); h64=$(run batch_hot.sql 64); fh64=$(run floor_batch_hot.sql 64)
    x16=$(run batch_hot6.sql 16); x64=$(run batch_hot6.sql 64)
    b16_spread+=("$(ratio "$s16" "$base_spread")"); b64_spread+=("$(ratio "$s64" "$base_spread")")
    b16_hot+=("$(ratio "$h16" "$base_hot")"); b64_hot+=("$(ratio "$h64" "$base_hot")")
    b16_hot6+=("$(ratio "$x16" "$base_hot")"); b64_hot6+=("$(ratio "$x64" "$base_hot")")
    bf_spread+=("$(ratio "$fs64" "$base_spread")"); bf_hot+=("$(ratio "$fh64" "$base_hot")")
    bf_share+=("$(ratio "$s64" "$fs64")"); bf_share_hot+=("$(ratio "$h64" "$fh64")")
    printf '  %-6s batched pairs/s: spread 16 %.0f  64 %.0f (floor 64 %.0f) | hot 16 %.0f  64 %.0f (floor 64 %.0f) | 6 policies 16 %.0f  64 %.0f\n' \
      "$round" "$s16" "$s64" "$fs64" "$h16" "$h64" "$fh64" "$x16" "$x64" >&2
  fi
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
MSG
if [ "${BENCH_BATCHED:-1}" != 0 ]; then cat <<MSG
  batched, ratio to the same baselines (median of rounds; goals: spread 64 >= 2, hot 64 >= 5):
    spread over 1,000 keys, batches of 16 / 64:  $(median "${b16_spread[@]}") / $(median "${b64_spread[@]}")   (rounds of 64: ${b64_spread[*]})
    one hot key, batches of 16 / 64:             $(median "${b16_hot[@]}") / $(median "${b64_hot[@]}")   (rounds of 64: ${b64_hot[*]})
    hot key, 6 policies + boost, 16 / 64:        $(median "${b16_hot6[@]}") / $(median "${b64_hot6[@]}")
    batched floor of 64, spread / hot key:       $(median "${bf_spread[@]}") / $(median "${bf_hot[@]}")
    batches of 64 as a share of that floor:      $(median "${bf_share[@]}") / $(median "${bf_share_hot[@]}")
MSG
fi
cat <<MSG
  counters drifting after the runs:            $drift
  reservations left after the runs:            $left
MSG
