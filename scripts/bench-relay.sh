#!/usr/bin/env bash
# Relay overhead benchmark: the mock upstream called directly vs through the relay (admit
# before, settle after, on a throwaway cluster), both release builds, non-streaming chat
# completions. Latency at a fixed moderate rate (hey -q, one worker per key, 4 keys);
# throughput at max rate (wrk, a random key of 64 per request). Prints one small table and
# the mean quota.admit round trip the relay saw next to a committed single-row UPDATE's at
# the same rate; asserts nothing. BENCH_PG_EXTRA adds postgres
# settings, e.g. BENCH_PG_EXTRA=synchronous_commit=off to see the figures without WAL flushes.
set -euo pipefail
LOG_TAG=bench
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"
DURATION=${BENCH_SECONDS:-15}
RATE=${BENCH_RATE:-200}       # requests per second for the latency runs (4 workers)
PORT=${PGQ_BENCH_PORT:-54393}

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
  rm -rf "$WORK"
}
trap cleanup EXIT
cluster_init "$WORK/cluster"
cluster_start "$WORK/cluster" "$PORT" "shared_buffers=512MB" "max_connections=50" ${BENCH_PG_EXTRA:-}
export PGHOST="$WORK/cluster/socket" PGPORT=$PORT PGUSER=postgres PGDATABASE=postgres
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

# latency URL -> "p50_ms p99_ms" at $RATE requests/s for $DURATION s, after a 2 s warm-up:
# 4 hey processes, one worker and one key each, at RATE/4 requests/s each.
latency() {
  local i pids=()
  for i in 0 1 2 3; do
    hey -z 2s -c 1 -q $((RATE / 4)) -m POST -T application/json -D "$WORK/body.json" \
      -H "Authorization: Bearer ${KEYS[$i]}" "$1" >/dev/null &
    pids+=($!)
  done
  wait "${pids[@]}" || fail "hey warm-up on $1"
  pids=()
  for i in 0 1 2 3; do
    hey -z "${DURATION}s" -c 1 -q $((RATE / 4)) -o csv -m POST -T application/json -D "$WORK/body.json" \
      -H "Authorization: Bearer ${KEYS[$i]}" "$1" >"$WORK/hey$i.csv" &
    pids+=($!)
  done
  wait "${pids[@]}" || fail "hey on $1"
  # columns: response-time (s), ..., status-code (7th)
  grep -h '^[0-9]' "$WORK"/hey?.csv >"$WORK/latency.csv"
  local bad; bad=$(awk -F, '$7 != 200' "$WORK/latency.csv" | wc -l)
  [ "$bad" -eq 0 ] || fail "$bad answers other than 200 from $1"
  cut -d, -f1 "$WORK/latency.csv" | sort -n | awk '{t[NR] = $1 * 1000}
    END {printf "%.2f %.2f", t[int(NR * 0.50 + 0.5)], t[int(NR * 0.99 + 0.5)]}'
}
# throughput URL -> requests/s at max rate (2 threads, 32 connections)
throughput() {
  wrk -t2 -c32 -d"${DURATION}s" -s "$WORK/post.lua" "$1" >"$WORK/wrk.out" || fail "wrk $1"
  ! grep -Eq 'Non-2xx|Socket errors' "$WORK/wrk.out" || { cat "$WORK/wrk.out" >&2; fail "errors from $1"; }
  awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$WORK/wrk.out"
}
# "sum count" of the relay's histograms of the admit call and of the upstream call (to its
# response headers), as they stand now
relay_seconds() {
  curl -s "$RELAY/metrics" | awk '/^pgq_relay_admit_seconds_sum\{result="ok"\}/ {s = $2}
    /^pgq_relay_admit_seconds_count\{result="ok"\}/ {c = $2}
    /^pgq_relay_upstream_seconds_sum\{endpoint="chat_completions"\}/ {us = $2}
    /^pgq_relay_upstream_seconds_count\{endpoint="chat_completions"\}/ {uc = $2}
    END {print s + 0, c + 0, us + 0, uc + 0}'
}

say "latency at $RATE requests/s, $DURATION s each; then max rate, $DURATION s each"
direct=$(latency "$MOCK/v1/chat/completions")
before=$(relay_seconds)
relay=$(latency "$RELAY/v1/chat/completions")
read -r admit_ms upstream_ms < <(echo "$before $(relay_seconds)" \
  | awk '{printf "%.2f %.2f\n", ($5 - $1) / ($6 - $2) * 1000, ($7 - $3) / ($8 - $4) * 1000}')
read -r direct_p50 direct_p99 <<<"$direct"
read -r relay_p50 relay_p99 <<<"$relay"
# The floor under admit on this machine right now: one committed single-row UPDATE per
# transaction, 4 clients at the same rate (the machine's wake-up latency moves by 1.5x between
# runs, so the admit figure is only meaningful next to this one).
psql -X -q -c "CREATE TABLE bench_floor (id int PRIMARY KEY, n bigint); INSERT INTO bench_floor VALUES (1, 0), (2, 0), (3, 0), (4, 0)"
echo 'UPDATE bench_floor SET n = n + 1 WHERE id = :client_id + 1;' >"$WORK/floor.sql"
floor_ms=$("$PG_BIN/pgbench" -n -M prepared -c 4 -j 1 -R "$RATE" -T "$DURATION" -f "$WORK/floor.sql" 2>&1 \
           | awk '/^latency average = / {printf "%.2f", $4}')
[ -n "$floor_ms" ] || fail "pgbench floor run"
direct_rps=$(throughput "$MOCK/v1/chat/completions")
relay_rps=$(throughput "$RELAY/v1/chat/completions")
sleep 1
left=$(psql -X -At -c "SELECT count(*) FROM quota.reservation")
drift=$(psql -X -At -c "SELECT count(*) FROM quota.drift()")

awk -v dp50="$direct_p50" -v dp99="$direct_p99" -v rp50="$relay_p50" -v rp99="$relay_p99" \
    -v drps="$direct_rps" -v rrps="$relay_rps" -v rate="$RATE" -v admit="$admit_ms" -v floor="$floor_ms" \
    -v upstream="$upstream_ms" 'BEGIN {
  printf "\n  %-34s %8s %8s %12s\n", "", "p50 ms", "p99 ms", "max req/s"
  printf "  %-34s %8.2f %8.2f %12d\n", "mock upstream, direct", dp50, dp99, drps
  printf "  %-34s %8.2f %8.2f %12d\n", "through the relay", rp50, rp99, rrps
  printf "  %-34s %8.2f %8.2f %12.3f\n", "added by the relay / ratio", rp50 - dp50, rp99 - dp99, rrps / drps
  printf "  (latency at %d req/s; goals: added p50 < 1 ms, added p99 < 5 ms)\n", rate
  printf "  mean quota.admit round trip inside the relay during its latency run: %.2f ms\n", admit
  printf "  mean committed single-row UPDATE round trip (pgbench, same rate):      %.2f ms\n", floor
  printf "  mean upstream call inside the relay (to its response headers):         %.2f ms\n", upstream
}'
echo "  reservations left after the runs: $left; counters drifting from the ledger: $drift"
