#!/usr/bin/env bash
# Soak benchmark: does the engine slow down as the ledger grows old? Measures admit+settle pairs
# per second over 1,000 keys on an empty ledger, then fills the ledger with SOAK_ROWS rows of
# generated history spread over SOAK_DAYS days (in day partitions, as the upkeep makes them; the
# last day's request ids in quota.ledger_request, as its horizon keeps them), and measures again.
# Each figure is a ratio to plain single-row UPDATE pairs measured in the same round, so the
# machine's drift between the two phases cancels out. Then times the archive of the oldest 30
# days: closing their partitions (the checkpoints, which the upkeep does a day at a time in
# production) and dropping them. Prints figures; asserts nothing.
# SOAK_ROWS (20,000,000), SOAK_DAYS (42), BENCH_SECONDS (10) and BENCH_ROUNDS (3) set the size.
set -euo pipefail
LOG_TAG=soak
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
ROWS=${SOAK_ROWS:-20000000}
DAYS=${SOAK_DAYS:-42}
DURATION=${BENCH_SECONDS:-10}
ROUNDS=${BENCH_ROUNDS:-3}
PORT=${PGQ_BENCH_PORT:-54393}

bench_cluster soak "$PORT" "shared_buffers=512MB" "max_connections=50" "max_wal_size=8GB" \
  "shared_preload_libraries=pg_quota" "pg_quota.sweep_interval=0"
PSQL=(psql -X -q -v ON_ERROR_STOP=1)
"${PSQL[@]}" -f tests/bench/setup.sql >/dev/null || fail "benchmark setup"
"${PSQL[@]}" -c "SELECT * FROM quota.maintain_ledger()" >/dev/null || fail "the first upkeep"

seconds() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", (b - a) / 1e9}'; }
measure() {  # measure PHASE -> appends the median ratio to RATIOS
  local r=() base pair
  for round in $(seq 1 "$ROUNDS"); do
    base=$(pgbench_tps baseline_spread.sql "$DURATION"); pair=$(pgbench_tps pair_spread.sql "$DURATION")
    r+=("$(ratio "$pair" "$base")")
    printf '  %-8s round %s: baseline %8.0f  pairs %8.0f  ratio %s\n' "$1" "$round" "$base" "$pair" "${r[-1]}" >&2
  done
  RATIOS+=("$(median "${r[@]}")")
}
RATIOS=()

say "pairs per second over 1,000 keys, $ROUNDS rounds of $DURATION s: an empty ledger"
measure empty

say "filling the ledger: $ROWS rows over $DAYS days"
t0=$(date +%s%N)
"${PSQL[@]}" <<SQL || fail "filling the ledger"
-- day partitions for the history, as the upkeep would have made them
SELECT quota.ledger_cover(date_trunc('day', now()) - interval '$DAYS days', date_trunc('day', now()), 'day');
-- the history goes straight in: its rollups and request ids are not what is measured here
ALTER TABLE quota.usage_ledger DISABLE TRIGGER USER;
INSERT INTO quota.usage_ledger (request_id, settled_by, key_id, user_id, model, input_tokens, output_tokens,
                                cached_tokens, cost, billed, counted_policy, counted_scope, counted_window,
                                counted_amount, settled_at)
SELECT 'h' || g, 'settle', k.key_id, k.user_id, 'bench-model', 100, 100, 0, 0.0003, true,
       ARRAY[p.policy_id], ARRAY[k.user_id], ARRAY[date_trunc('day', t.at)], ARRAY[0.0003], t.at
FROM generate_series(1, $ROWS) g
CROSS JOIN LATERAL (SELECT date_trunc('day', now()) - interval '$DAYS days'
                           + (g - 1) * (interval '1 day' * $DAYS / $ROWS) AS at) t
JOIN quota.api_key k ON k.public_id = lpad(to_hex(1 + g % 1000), 12, '0')
JOIN quota.policy p ON p.subject_type = 'user' AND p.subject_id = k.user_id;
ALTER TABLE quota.usage_ledger ENABLE TRIGGER USER;
-- the request ids of the last day, as quota.ledger_request keeps them (pg_quota.request_id_retention)
INSERT INTO quota.ledger_request (request_id, settled_by, settled_at, billed, unbilled_reason, cost)
SELECT l.request_id, l.settled_by, l.settled_at, l.billed, NULL, l.cost FROM quota.usage_ledger l
WHERE l.settled_at >= date_trunc('day', now()) - interval '1 day' AND l.request_id LIKE 'h%';
VACUUM ANALYZE;
SQL
t1=$(date +%s%N)
fill_seconds=$(seconds "$t0" "$t1")
ledger_size=$(psql -X -At -c "SELECT pg_size_pretty(sum(bytes)) FROM quota.ledger_partitions()")
request_ids=$(psql -X -At -c "SELECT count(*) FROM quota.ledger_request")
say "filled in $fill_seconds s: $ledger_size of ledger partitions, $request_ids request ids kept"

say "the same, with the old ledger"
measure old

say "archiving the oldest 30 days"
t0=$(date +%s%N)
closed=$(psql -X -At -c "SELECT count(*) FROM generate_series(1, 30) i
                         WHERE quota.close_ledger_partition(date_trunc('day', now()) - interval '$((DAYS - 30)) days') IS NOT NULL")
t1=$(date +%s%N)
dropped=$(psql -X -At -c "SELECT count(*) || ' partitions, ' || sum(ledger_rows) || ' rows'
                          FROM quota.archive_ledger(date_trunc('day', now()) - interval '$((DAYS - 30)) days', NULL)")
t2=$(date +%s%N)
drift=$(psql -X -At -c "SELECT count(*) FROM quota.drift()")
left=$(psql -X -At -c "SELECT count(*) FROM quota.reservation")

cat <<MSG

  ledger: $ROWS rows over $DAYS days ($ledger_size), filled in $fill_seconds s
  pairs / baseline, empty ledger (median):  ${RATIOS[0]}
  pairs / baseline, old ledger (median):    ${RATIOS[1]}
  old / empty (goal >= 0.90):               $(ratio "${RATIOS[1]}" "${RATIOS[0]}")
  closing 30 day partitions (checkpoints):  $(seconds "$t0" "$t1") s ($closed closed; the upkeep closes one a day)
  dropping them (detach + drop):            $(seconds "$t1" "$t2") s ($dropped)
  counters drifting after the runs:         $drift
  reservations left after the runs:         $left
MSG
