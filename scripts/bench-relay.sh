#!/usr/bin/env bash
# Relay overhead benchmark: the mock upstream called directly vs through the relay (admit
# before, settle after, on a throwaway cluster), both release builds, non-streaming chat
# completions. Latency at a fixed moderate rate (hey -q, one worker per key, 4 keys; the
# targets take turns in rounds); throughput at max rate (wrk, a random key of 64 per request,
# 32 connections, then 128 with the relay on the floor without WAL flushes as its ceiling, and
# the relay batching on the floor, relay_floor_batch.sql, as batching's ceiling).
# Also the relay's floor: the same relay on a database whose admit and settle make only the
# data model's row writes (tests/bench/relay_floor.sql), with durable commits and without WAL
# flushes. Prints one small table, with the mean admit round trip and upstream call that each
# relay saw, and one database round trip at the same rate; asserts nothing. BENCH_PG_EXTRA
# adds postgres settings, e.g. BENCH_PG_EXTRA=synchronous_commit=off to see the figures
# without WAL flushes everywhere.
#
# `bench-relay.sh replication`: what synchronous replication costs instead. The cluster gets a
# streaming standby (pg_basebackup, on port PGQ_BENCH_PORT + 1) that is synchronous
# (synchronous_standby_names = '*'); the relay's latency at the same rate, its commits
# waiting for the standby's flush (synchronous_commit = on) against a second relay on the
# same database whose commits wait only for the local flush (synchronous_commit = local: what
# asynchronous replication waits for), taking turns with the direct call; no throughput run.
# The relay runs twice on the same database: with natural batching (--batch-max, default 64:
# quota.admit_many / quota.settle_many) and with --batch-max 1 (every call alone); the floor
# relays of the latency runs run with --batch-max 1, two more batch on the floor (max rate only).
# PG_BIN / PG_CONFIG name the PostgreSQL to use (scripts/lib.sh), PGQ_BENCH_PORT its port.
set -euo pipefail
LOG_TAG=bench
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
DURATION=${BENCH_SECONDS:-15}
RATE=${BENCH_RATE:-200}       # requests per second for the latency runs (4 workers)
PORT=${PGQ_BENCH_PORT:-54393}
MODE=${1:-relay}
case "$MODE" in relay | replication) ;; *) fail "usage: bench-relay.sh [replication]" ;; esac

bash scripts/bootstrap.sh >/dev/null
for tool in hey wrk; do
  command -v "$tool" >/dev/null && continue
  say "installing $tool"
  apt-get install -y -qq "$tool" >/dev/null 2>&1 \
    || { apt-get update -qq >/dev/null && apt-get install -y -qq "$tool" >/dev/null; } || fail "apt-get install $tool"
done
say "building release binaries (extension and relay)"
install_extension --release
cargo build --release -q -p pg-quota-relay || fail "cargo build --release -p pg-quota-relay"
BIN=$REPO_ROOT/target/release/pg-quota-relay

WORK=$(mktemp -d /var/tmp/pg_quota-bench-relay.XXXXXX); chmod 755 "$WORK"
cleanup() {
  local pid
  for pid in "${SPAWNED_PIDS[@]}"; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
  cluster_stop "$WORK/cluster"
  cluster_stop "$WORK/standby"
  rm -rf "$WORK"
}
trap cleanup EXIT
cluster_init "$WORK/cluster"
# (seven relays with pools of up to 16 connections each, grown by the 128-connection runs)
cluster_start "$WORK/cluster" "$PORT" "shared_buffers=512MB" "max_connections=150" ${BENCH_PG_EXTRA:-}
export PGHOST="$WORK/cluster/socket" PGPORT=$PORT PGUSER=postgres PGDATABASE=postgres
if [ "$MODE" = replication ]; then
  cluster_standby_of "$WORK/cluster" "$PORT" "$WORK/standby"
  cluster_start "$WORK/standby" $((PORT + 1)) "shared_buffers=512MB" "max_connections=120" ${BENCH_PG_EXTRA:-}
  psql -X -q -c "ALTER SYSTEM SET synchronous_standby_names = '*'" -c "SELECT pg_reload_conf()" >/dev/null \
    || fail "making the standby synchronous"
  for _ in $(seq 1 100); do
    [ "$(psql -X -At -c "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'")" = 1 ] && break
    sleep 0.1
  done
  [ "$(psql -X -At -c "SELECT count(*) FROM pg_stat_replication WHERE sync_state = 'sync'")" = 1 ] \
    || fail "the standby did not become synchronous within 10 s"
fi
psql -X -q -v ON_ERROR_STOP=1 >/dev/null <<'SQL' || fail "benchmark setup"
CREATE EXTENSION pg_quota;
INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok) VALUES ('gpt-4o-mini', 0.15, 0.60);
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
SELECT 'user', quota.create_user('bench' || i), 'tokens', 'day', 1e15 FROM generate_series(1, 64) i;
SQL
# 64 users with one key each: the figures measure the relay, not one hot counter row
mapfile -t KEYS < <(psql -X -At -c "SELECT quota.create_key(user_id, 'bench') FROM quota.app_user ORDER BY user_id")
[ ${#KEYS[@]} -eq 64 ] || fail "creating the benchmark keys"

spawn_listening "$WORK/mock.log" "$BIN" mock-upstream --listen 127.0.0.1:0
MOCK=$SPAWNED_URL
spawn_listening "$WORK/relay.log" "$BIN" serve --listen 127.0.0.1:0 --upstream-url "$MOCK/v1" \
  --database-url "host=$PGHOST port=$PORT user=postgres dbname=postgres"
RELAY=$SPAWNED_URL
if [ "$MODE" = replication ]; then
  spawn_listening "$WORK/relay-async.log" "$BIN" serve --listen 127.0.0.1:0 --upstream-url "$MOCK/v1" \
    --database-url "host=$PGHOST port=$PORT user=postgres dbname=postgres options='-c synchronous_commit=local'"
  ASYNC=$SPAWNED_URL
else
  spawn_listening "$WORK/relay-single.log" "$BIN" serve --listen 127.0.0.1:0 --upstream-url "$MOCK/v1" \
    --database-url "host=$PGHOST port=$PORT user=postgres dbname=postgres" --batch-max 1
  SINGLE=$SPAWNED_URL
psql -X -q -c "CREATE DATABASE relay_floor" || fail "creating the relay floor's database"
psql -X -q -v ON_ERROR_STOP=1 -d relay_floor -c "CREATE EXTENSION pg_quota" \
  -f tests/bench/floor_setup.sql -f tests/bench/relay_floor.sql >/dev/null || fail "relay floor setup"
spawn_listening "$WORK/floor.log" "$BIN" serve --listen 127.0.0.1:0 --upstream-url "$MOCK/v1" \
  --database-url "host=$PGHOST port=$PORT user=postgres dbname=relay_floor" --batch-max 1
FLOOR=$SPAWNED_URL
spawn_listening "$WORK/floor-nosync.log" "$BIN" serve --listen 127.0.0.1:0 --upstream-url "$MOCK/v1" \
  --database-url "host=$PGHOST port=$PORT user=postgres dbname=relay_floor options='-c synchronous_commit=off'" --batch-max 1
FLOOR_NOSYNC=$SPAWNED_URL
# the floor with batching (relay_floor_batch.sql: admit_many / settle_many, and single calls as
# batches of one), in a database of its own: the most that batching through this relay gives
# on this machine, whatever the engine
psql -X -q -c "CREATE DATABASE relay_floor_batch" || fail "creating the batching floor's database"
psql -X -q -v ON_ERROR_STOP=1 -d relay_floor_batch -c "CREATE EXTENSION pg_quota" -f tests/bench/floor_setup.sql \
  -f tests/bench/relay_floor.sql -f tests/bench/relay_floor_batch.sql >/dev/null || fail "batching floor setup"
spawn_listening "$WORK/floor-batch.log" "$BIN" serve --listen 127.0.0.1:0 --upstream-url "$MOCK/v1" \
  --database-url "host=$PGHOST port=$PORT user=postgres dbname=relay_floor_batch"
FLOOR_BATCH=$SPAWNED_URL
spawn_listening "$WORK/floor-batch-nosync.log" "$BIN" serve --listen 127.0.0.1:0 --upstream-url "$MOCK/v1" \
  --database-url "host=$PGHOST port=$PORT user=postgres dbname=relay_floor_batch options='-c synchronous_commit=off'"
FLOOR_BATCH_NOSYNC=$SPAWNED_URL
fi

BODY='{"model":"gpt-4o-mini","max_tokens":16,"messages":[{"role":"user","content":"Hello, how are you today?"}]}'
printf '%s' "$BODY" >"$WORK/body.json"
{
  printf 'local keys = {'; printf '"%s",' "${KEYS[@]}"; printf '}\n'
  cat <<LUA
wrk.method = "POST"
wrk.body = '$BODY'
wrk.headers["Content-Type"] = "application/json"
request = function()
  wrk.headers["Authorization"] = "Bearer " .. keys[math.random(#keys)]
  return wrk.format()
end
LUA
} >"$WORK/post.lua"

# sample NAME URL SECONDS: one latency round at $RATE requests/s: 4 hey processes, one worker
# and one key each, at RATE/4 requests/s each; the response times (ms) are added to NAME's.
sample() {
  local i pids=()
  for i in 0 1 2 3; do
    hey -z "$3s" -c 1 -q $((RATE / 4)) -o csv -m POST -T application/json -D "$WORK/body.json" \
      -H "Authorization: Bearer ${KEYS[$i]}" "$2" >"$WORK/hey$i.csv" &
    pids+=($!)
  done
  wait "${pids[@]}" || fail "hey on $2"
  # columns: response-time (s), ..., status-code (7th)
  grep -h '^[0-9]' "$WORK"/hey?.csv >"$WORK/latency.csv"
  local bad; bad=$(awk -F, '$7 != 200' "$WORK/latency.csv" | wc -l)
  [ "$bad" -eq 0 ] || fail "$bad answers other than 200 from $2"
  awk -F, '{print $1 * 1000}' "$WORK/latency.csv" >>"$WORK/$1.ms"
}
# percentiles NAME -> "p50_ms p99_ms" of all of NAME's samples
percentiles() {
  sort -n "$WORK/$1.ms" | awk '{t[NR] = $1} END {printf "%.2f %.2f", t[int(NR * 0.50 + 0.5)], t[int(NR * 0.99 + 0.5)]}'
}
# throughput URL [CONNECTIONS] -> requests/s at max rate (2 threads, 32 connections unless told)
throughput() {
  wrk -t2 -c"${2:-32}" -d"${DURATION}s" -s "$WORK/post.lua" "$1" >"$WORK/wrk.out" || fail "wrk $1"
  ! grep -Eq 'Non-2xx|Socket errors' "$WORK/wrk.out" || { cat "$WORK/wrk.out" >&2; fail "errors from $1"; }
  awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$WORK/wrk.out"
}
# "admit_sum admit_count upstream_sum upstream_count" of a relay's own histograms (the admit
# call, and the upstream call to its response headers), as they stand now
relay_seconds() {
  curl -s "$1/metrics" | awk '/^pgq_relay_admit_seconds_sum\{result="ok"\}/ {s = $2}
    /^pgq_relay_admit_seconds_count\{result="ok"\}/ {c = $2}
    /^pgq_relay_upstream_seconds_sum\{endpoint="chat_completions"\}/ {us = $2}
    /^pgq_relay_upstream_seconds_count\{endpoint="chat_completions"\}/ {uc = $2}
    END {print s + 0, c + 0, us + 0, uc + 0}'
}
# pgbench SCRIPT_TEXT -> mean latency in ms, 4 clients at the latency runs' rate
pgbench_ms() {
  echo "$1" >"$WORK/pgbench.sql"
  "$PG_BIN/pgbench" -n -M prepared -c 4 -j 1 -R "$RATE" -T "$DURATION" -f "$WORK/pgbench.sql" 2>&1 \
    | awk '/^latency average = / {printf "%.2f", $4}'
}

# The targets take turns, a round each, so that the machine's drift (its wake-up latency
# moves by 1.5x within minutes) falls on all of them alike; each relay is driven only in its
# rounds, so its histograms' change over the whole phase is its rounds' means.
ROUNDS=${BENCH_ROUNDS:-3}
if [ "$MODE" = replication ]; then
  TARGETS=(direct async sync)
  declare -A URL=([direct]="$MOCK" [async]="$ASYNC" [sync]="$RELAY")
  say "latency at $RATE requests/s, $ROUNDS rounds of $DURATION s in all per target"
else
  TARGETS=(direct relay single floor nosync)
  declare -A URL=([direct]="$MOCK" [relay]="$RELAY" [single]="$SINGLE" [floor]="$FLOOR" [nosync]="$FLOOR_NOSYNC")
  say "latency at $RATE requests/s, $ROUNDS rounds of $DURATION s in all per target; then max rate, $DURATION s each"
fi
declare -A BEFORE
for t in "${TARGETS[@]}"; do
  sample warmup "${URL[$t]}/v1/chat/completions" 1
  [ "$t" = direct ] || BEFORE[$t]=$(relay_seconds "${URL[$t]}")
done
for round in $(seq 1 "$ROUNDS"); do
  for t in "${TARGETS[@]}"; do
    sample "$t.$round" "${URL[$t]}/v1/chat/completions" $(( (DURATION + ROUNDS - 1) / ROUNDS ))
    cat "$WORK/$t.$round.ms" >>"$WORK/$t.ms"
  done
done
# TARGET -> "p50 p99 admit_ms upstream_ms"
figures() {
  echo "$(percentiles "$1") ${BEFORE[$1]} $(relay_seconds "${URL[$1]}")" | awk '{
    printf "%s %s %.2f %.2f", $1, $2, ($7 - $3) / ($8 - $4) * 1000, ($9 - $5) / ($10 - $6) * 1000}'
}
read -r direct_p50 direct_p99 <<<"$(percentiles direct)"
left() {
  sleep 1
  echo "  reservations left after the runs: $(psql -X -At -c "SELECT count(*) FROM quota.reservation");" \
    "counters drifting from the ledger: $(psql -X -At -c "SELECT count(*) FROM quota.drift()")"
}
if [ "$MODE" = replication ]; then
  read -r async_p50 async_p99 async_admit async_upstream <<<"$(figures async)"
  read -r sync_p50 sync_p99 sync_admit sync_upstream <<<"$(figures sync)"
  printf "\n  %-52s %7s %7s %7s\n" "ms, round by round" "direct" "async" "sync"
  for round in $(seq 1 "$ROUNDS"); do
    printf "  %-52s %7s %7s %7s\n" "round $round p50 / p99" \
      "$(percentiles "direct.$round" | tr ' ' /)" "$(percentiles "async.$round" | tr ' ' /)" "$(percentiles "sync.$round" | tr ' ' /)"
  done
  # the median over the rounds of what sync adds to async in each round
  median_cost() { # column (1: p50, 2: p99)
    for round in $(seq 1 "$ROUNDS"); do
      echo "$(percentiles "async.$round") $(percentiles "sync.$round")" | awk -v c="$1" '{print $(c + 2) - $c}'
    done | sort -n | awk '{t[NR] = $1} END {printf "%.2f", t[int((NR + 1) / 2)]}'
  }
  printf "\n  %-52s %7s %7s %7s %7s\n" "ms, all rounds" "p50" "p99" "admit" "upstr."
  printf "  %-52s %7.2f %7.2f\n" "mock upstream, direct" "$direct_p50" "$direct_p99"
  printf "  %-52s %7.2f %7.2f %7.2f %7.2f\n" "relay, asynchronous (synchronous_commit=local)" \
    "$async_p50" "$async_p99" "$async_admit" "$async_upstream"
  printf "  %-52s %7.2f %7.2f %7.2f %7.2f\n" "relay, synchronous standby (synchronous_commit=on)" \
    "$sync_p50" "$sync_p99" "$sync_admit" "$sync_upstream"
  echo "  synchronous minus asynchronous, median of the rounds: p50 +$(median_cost 1) ms, p99 +$(median_cost 2) ms"
  psql -X -q -c "CREATE TABLE bench_floor (id int PRIMARY KEY, n bigint); INSERT INTO bench_floor VALUES (1, 0), (2, 0), (3, 0), (4, 0)"
  echo "  one committed UPDATE at the same rate (pgbench): synchronous" \
    "$(pgbench_ms 'UPDATE bench_floor SET n = n + 1 WHERE id = :client_id + 1;') ms, asynchronous" \
    "$(PGOPTIONS='-c synchronous_commit=local' pgbench_ms 'UPDATE bench_floor SET n = n + 1 WHERE id = :client_id + 1;') ms"
  echo "  (latency at $RATE req/s, $ROUNDS rounds taking turns; standby on the same machine)"
  left
  exit 0
fi
read -r relay_p50 relay_p99 admit_ms upstream_ms <<<"$(figures relay)"
read -r single_p50 single_p99 single_admit single_upstream <<<"$(figures single)"
read -r floor_p50 floor_p99 floor_admit floor_upstream <<<"$(figures floor)"
read -r nosync_p50 nosync_p99 nosync_admit nosync_upstream <<<"$(figures nosync)"
# What one database round trip costs on this machine right now, at the same rate: a committed
# single-row UPDATE, and a SELECT 1 (the machine's wake-up latency moves by 1.5x between runs,
# so the admit figures are only meaningful next to these).
psql -X -q -c "CREATE TABLE bench_floor (id int PRIMARY KEY, n bigint); INSERT INTO bench_floor VALUES (1, 0), (2, 0), (3, 0), (4, 0)"
update_ms=$(pgbench_ms 'UPDATE bench_floor SET n = n + 1 WHERE id = :client_id + 1;')
select_ms=$(pgbench_ms 'SELECT 1;')
[ -n "$update_ms" ] && [ -n "$select_ms" ] || fail "pgbench reference runs"
direct_rps=$(throughput "$MOCK/v1/chat/completions")
relay_rps=$(throughput "$RELAY/v1/chat/completions")
single_rps=$(throughput "$SINGLE/v1/chat/completions")
# Batches form from what is queued: with more clients at once they grow. And the relay's own
# ceiling on this machine: the floor's database functions, single calls, no WAL flushes.
relay_rps_128=$(throughput "$RELAY/v1/chat/completions" 128)
single_rps_128=$(throughput "$SINGLE/v1/chat/completions" 128)
ceiling_rps_128=$(throughput "$FLOOR_NOSYNC/v1/chat/completions" 128)
# and batching's own ceiling: the floor's batched functions, with durable commits and without
floor_batch_rps_128=$(throughput "$FLOOR_BATCH/v1/chat/completions" 128)
floor_batch_nosync_rps_128=$(throughput "$FLOOR_BATCH_NOSYNC/v1/chat/completions" 128)

row() { # label p50 p99 admit upstream
  awk -v l="$1" -v p50="$2" -v p99="$3" -v a="$4" -v u="$5" -v d50="$direct_p50" -v d99="$direct_p99" \
    'BEGIN {printf "  %-42s %7.2f %7.2f %7.2f %7.2f %8.2f %8.2f\n", l, p50, p99, a, u, p50 - d50, p99 - d99}'
}
printf "\n  %-42s %7s %7s %7s %7s %8s %8s\n" "ms" "p50" "p99" "admit" "upstr." "+p50" "+p99"
printf "  %-42s %7.2f %7.2f\n" "mock upstream, direct" "$direct_p50" "$direct_p99"
row "through the relay, pg_quota (batching)" "$relay_p50" "$relay_p99" "$admit_ms" "$upstream_ms"
row "  the same relay, --batch-max 1" "$single_p50" "$single_p99" "$single_admit" "$single_upstream"
row "through the relay, floor (relay_floor.sql)" "$floor_p50" "$floor_p99" "$floor_admit" "$floor_upstream"
row "  the same without WAL flushes" "$nosync_p50" "$nosync_p99" "$nosync_admit" "$nosync_upstream"
echo "  (latency at $RATE req/s, $ROUNDS rounds taking turns; +: added to the direct call; goals: +p50 < 1 ms, +p99 < 5 ms)"
echo "  one database round trip at the same rate (pgbench): committed UPDATE $update_ms ms, SELECT 1 $select_ms ms"
awk -v d="$direct_rps" -v r="$relay_rps" 'BEGIN {
  printf "  max rate: direct %d req/s, through the relay %d req/s, ratio %.3f\n", d, r, r / d }'
awk -v b="$relay_rps" -v s="$single_rps" 'BEGIN {
  printf "  max rate through the relay: batching %d req/s, --batch-max 1 %d req/s, ratio %.2f (goal >= 4)\n", b, s, b / s }'
awk -v b="$relay_rps_128" -v s="$single_rps_128" -v c="$ceiling_rps_128" 'BEGIN {
  printf "  with 128 connections: batching %d req/s, --batch-max 1 %d req/s, ratio %.2f; the relay on the floor without WAL flushes %d req/s\n", b, s, b / s, c }'
awk -v f="$floor_batch_rps_128" -v n="$floor_batch_nosync_rps_128" -v s="$single_rps_128" 'BEGIN {
  printf "  batching on the floor, 128 connections: %d req/s (%.2f x --batch-max 1 on pg_quota), without WAL flushes %d req/s (%.2f x)\n", f, f / s, n, n / s }'
left
