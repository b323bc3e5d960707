#!/usr/bin/env bash
# The container tier: builds both images (docker/), starts database, demo upstream and relay
# with the settings of docker/compose.yaml, and checks them from outside as a user would:
# chat completions through the relay with the demo key, the ledger and quota.drift() from the
# database container, a database container replaced on the same volume (data kept, relay
# recovers), the relay never a superuser, no secret in the images. Removes the containers and
# the volume it made; keeps the images (and the debootstrapped base) as a build cache.
#
# Engine: docker when `docker info` answers; otherwise podman, installed with runc and
# debootstrap from Debian's packages as in TOOLCHAIN.md (runc runtime, host network, no
# setrlimit), with a debian:12-slim base made by debootstrap when no registry has one.
# Prints one PASS/FAIL line per check and closes with `docker: N passed, M failed`; exits
# non-zero when a check failed. No container engine to be had: a SKIPPED line, exit 0.
#
# Ports (host network, loopback only): PGQ_DOCKER_PG_PORT (54591), PGQ_DOCKER_RELAY_PORT
# (18080), PGQ_DOCKER_MOCK_PORT (19090). PGQ_DOCKER_TESTS=0 skips the tier.
set -uo pipefail
LOG_TAG=docker
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

PG_PORT=${PGQ_DOCKER_PG_PORT:-54591}
RELAY_PORT=${PGQ_DOCKER_RELAY_PORT:-18080}
MOCK_PORT=${PGQ_DOCKER_MOCK_PORT:-19090}
PG_IMAGE=${PGQ_DOCKER_PG_IMAGE:-pg-quota-postgres:latest}
RELAY_IMAGE=${PGQ_DOCKER_RELAY_IMAGE:-pg-quota-relay:latest}
NAME=pgq-docker-test
VOLUME=$NAME-pgdata
CONTEXT=$REPO_ROOT/target/docker/context
T0=$(date +%s)

PASSED=0 FAILED=0
pass() { PASSED=$((PASSED + 1)); printf 'PASS  %s\n' "$1"; }
flunk() { FAILED=$((FAILED + 1)); printf 'FAIL  %s%s\n' "$1" "${2:+: $2}"; }
# check NAME CMD...: one pass/fail line for a command's exit status.
check() { local n=$1; shift; if "$@"; then pass "$n"; else flunk "$n"; fi; }
closing() {
  say "wall time $(( $(date +%s) - T0 )) s"
  echo "docker: $PASSED passed, $FAILED failed"
  [ "$FAILED" -eq 0 ]
}
# holds_none TEXT SECRET...: true when TEXT holds none of the secrets (each must be non-empty)
holds_none() {
  local text=$1 secret; shift
  for secret in "$@"; do
    [ ${#secret} -ge 16 ] || return 1
    grep -qF -- "$secret" <<<"$text" && return 1
  done
  return 0
}
skip() { say "SKIPPED: $*"; echo "docker: 0 passed, 0 failed, 1 skipped"; exit 0; }
# stop here when a step that every later check needs has failed
abort() { flunk "$@"; say "later checks need this step: stopping"; closing; exit 1; }

[ "${PGQ_DOCKER_TESTS:-1}" = 0 ] && skip "PGQ_DOCKER_TESTS=0"

# ── the engine ────────────────────────────────────────────────────────────────
ENGINE_FLAGS=()
BUILD_FLAGS=(--network=host)
if command -v docker >/dev/null && timeout 30 docker info >/dev/null 2>&1; then
  ENGINE=docker
  BASE_IMAGE=${PGQ_DOCKER_BASE_IMAGE:-debian:12-slim}
else
  ENGINE=podman
  BASE_IMAGE=${PGQ_DOCKER_BASE_IMAGE:-localhost/debian:12-slim}
  missing=()
  for p in podman runc debootstrap; do command -v "$p" >/dev/null || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" -eq 0 ] || skip "no docker engine, and installing podman needs root"
    say "installing ${missing[*]} (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt_install() { apt-get install -y -qq -o DPkg::Lock::Timeout=300 podman runc debootstrap >/dev/null 2>&1; }
    apt_install || { apt-get update -qq >/dev/null 2>&1 && apt_install; } \
      || skip "no docker engine, and podman/runc/debootstrap could not be installed"
  fi
  # This sandbox refuses setrlimit: podman must not set default ulimits.
  conf=/etc/containers/containers.conf
  if ! grep -qs '^ *default_ulimits' "$conf"; then
    mkdir -p /etc/containers
    if grep -qs '^\[containers\]' "$conf"; then
      sed -i 's/^\[containers\]/[containers]\ndefault_ulimits = []/' "$conf"
    else
      printf '[containers]\ndefault_ulimits = []\n' >>"$conf"
    fi
  fi
  # crun fails on these hybrid cgroups; runc works.
  ENGINE_FLAGS=(--runtime runc)
  # docker format: the OCI image format drops HEALTHCHECK
  BUILD_FLAGS+=(--pull=never --runtime runc --format docker)
fi
eng() { "$ENGINE" "${ENGINE_FLAGS[@]}" "$@"; }
"$ENGINE" --version >/dev/null 2>&1 || skip "$ENGINE does not run"
say "engine: $($ENGINE --version)"

WORK=$(mktemp -d /var/tmp/pgq-docker-test.XXXXXX)
chmod 700 "$WORK"
cleanup() {
  remove_containers
  rm -rf "$WORK"
}
remove_containers() {
  local c
  for c in "$NAME-relay" "$NAME-mock" "$NAME-db"; do
    eng stop -t 5 "$c" >/dev/null 2>&1; eng rm -f -v "$c" >/dev/null 2>&1
  done
  eng volume rm -f "$VOLUME" >/dev/null 2>&1 || true
}
trap cleanup EXIT
remove_containers   # left over from an interrupted run

# ── compose.yaml: the same settings as the containers run below (no compose engine here)
compose_consistent() {
  /usr/bin/python3 - "$REPO_ROOT/docker/compose.yaml" "$REPO_ROOT/target/docker/context" <<'PY'
import os, re, sys, yaml
path, context = sys.argv[1], sys.argv[2]
c = yaml.safe_load(open(path))
s = c["services"]
assert set(s) == {"postgres", "mock-upstream", "relay"}, s
here = os.path.dirname(path)
for svc in s.values():
    b = svc["build"]
    assert os.path.realpath(os.path.join(here, b["context"])) == os.path.realpath(context), b
    assert os.path.exists(os.path.join(here, "..", "docker", b["dockerfile"])), b
    for k, v in (svc.get("environment") or {}).items():  # passwords only from the user's environment
        if "PASSWORD" in k:
            assert str(v).startswith("${"), k
        for pw in re.findall(r"password=(\S+)", str(v)):
            assert pw.startswith("${"), k
pg, relay = s["postgres"], s["relay"]
assert pg["image"] == "pg-quota-postgres:latest" and relay["image"] == "pg-quota-relay:latest"
assert any(v.startswith("pgdata:/var/lib/postgresql/data") for v in pg["volumes"])
demo = [v for v in pg["volumes"] if "/docker-entrypoint-initdb.d/" in v][0]
assert os.path.exists(os.path.join(here, demo.split(":")[0])), demo
user = pg["environment"]["PGQ_RELAY_USER"]
assert "user=%s " % user in relay["environment"]["DATABASE_URL"] and user != "postgres"
assert relay["command"][0] == "serve" and s["mock-upstream"]["command"][0] == "mock-upstream"
assert relay["depends_on"]["postgres"]["condition"] == "service_healthy"
PY
}
if /usr/bin/python3 -c 'import yaml' 2>/dev/null; then
  check "docker/compose.yaml: three services, relay as pgq_relay, passwords only from the environment" compose_consistent
else
  say "python3-yaml missing: compose.yaml not checked"
fi

# ── the base image ────────────────────────────────────────────────────────────
image_exists() { eng image inspect "$1" >/dev/null 2>&1; }
make_base() {
  local rootfs="$WORK/rootfs" mirror=""
  [ "$ENGINE" = docker ] && timeout 120 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1 && return 0
  command -v debootstrap >/dev/null || { apt-get install -y -qq debootstrap >/dev/null 2>&1 || return 1; }
  # The host's own Debian mirror, when it names one (deb822 sources).
  mirror=$(awk '/^URIs:/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  say "making $BASE_IMAGE with debootstrap --variant=minbase bookworm (about a minute)"
  debootstrap --variant=minbase bookworm "$rootfs" $mirror >"$WORK/debootstrap.log" 2>&1 \
    || { tail -n 5 "$WORK/debootstrap.log" >&2; return 1; }
  # The host's apt sources (bookworm, -updates, -security), as in Debian's own images.
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/" && rm -f "$rootfs/etc/apt/sources.list"
  fi
  # Slim: later package installs leave out documentation, as in the debian:*-slim images.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
CFG
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | eng import --change 'CMD ["bash"]' - "$BASE_IMAGE" >"$WORK/import.log" 2>&1 \
    || { cat "$WORK/import.log" >&2; rm -rf "$rootfs"; return 1; }
  rm -rf "$rootfs"
}
if image_exists "$BASE_IMAGE"; then
  pass "base image $BASE_IMAGE present (cached)"
else
  t=$(date +%s)
  make_base || abort "base image $BASE_IMAGE"
  pass "base image $BASE_IMAGE made ($(( $(date +%s) - t )) s)"
fi

# ── artifacts and images ──────────────────────────────────────────────────────
t=$(date +%s)
bash scripts/package.sh || abort "scripts/package.sh (release extension package and relay binary)"
pass "scripts/package.sh ($(( $(date +%s) - t )) s)"

build() {
  local file=$1 tag=$2 t old; t=$(date +%s)
  old=$(eng image inspect --format '{{.Id}}' "$tag" 2>/dev/null)
  if eng build "${BUILD_FLAGS[@]}" --build-arg BASE_IMAGE="$BASE_IMAGE" -f "$CONTEXT/$file" -t "$tag" \
       "$CONTEXT" >"$WORK/build-$file.log" 2>&1; then
    pass "build $tag from docker/$file ($(( $(date +%s) - t )) s)"
    # the image this tag named before, now untagged: remove it (kept when still in use)
    [ -n "$old" ] && [ "$old" != "$(eng image inspect --format '{{.Id}}' "$tag" 2>/dev/null)" ] \
      && { eng rmi "$old" >/dev/null 2>&1 || true; }
  else
    tail -n 20 "$WORK/build-$file.log"; abort "build $tag from docker/$file"
  fi
}
build postgres.Dockerfile "$PG_IMAGE"
build relay.Dockerfile "$RELAY_IMAGE"

# ── secrets of this run: never on a command line (-e NAME passes the value from the environment)
rand() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
SU_PASSWORD=$(rand)
export PGQ_RELAY_PASSWORD; PGQ_RELAY_PASSWORD=$(rand)
printf '%s\n' "$SU_PASSWORD" >"$WORK/postgres-password"
chmod 644 "$WORK/postgres-password"   # inside $WORK (700); the container's postgres must read it
export DATABASE_URL="host=127.0.0.1 port=$PG_PORT dbname=pg_quota user=pgq_relay password=$PGQ_RELAY_PASSWORD"

for port in "$PG_PORT" "$RELAY_PORT" "$MOCK_PORT"; do
  port_in_use "$port" && abort "port $port is free" "in use; set PGQ_DOCKER_*_PORT"
done

# As in compose.yaml, on the host network (loopback) instead of a compose network. The server
# logs every statement (log_min_duration_statement=0) so that the log check below proves the
# relay role's own settings keep key secrets out of it.
# start: `run -d` quietly (podman without systemd complains that it cannot time health checks;
# they are run on request below), its messages shown when it fails
start() { eng run -d "$@" >/dev/null 2>"$WORK/run.err" || { cat "$WORK/run.err" >&2; return 1; }; }
# run_db [options]: the database container on the volume, on the host network (loopback)
run_db() {
  start --name "$NAME-db" --network=host -v "$VOLUME:/var/lib/postgresql/data" \
    -e PGPORT="$PG_PORT" -e PGQ_LISTEN_ADDRESSES=127.0.0.1 \
    "$@" "$PG_IMAGE" postgres -c log_min_duration_statement=0
}
psql_db() { eng exec "$NAME-db" psql -X -At -v ON_ERROR_STOP=1 -d pg_quota -c "$1" 2>&1; }
# health: the image's HEALTHCHECK command (docker runs it on its own; podman without systemd
# runs it on request)
healthy() {
  if [ "$ENGINE" = podman ]; then eng healthcheck run "$NAME-db" >/dev/null 2>&1
  else [ "$(docker inspect -f '{{.State.Health.Status}}' "$NAME-db" 2>/dev/null)" = healthy ]; fi
}
wait_healthy() {
  local i
  for i in $(seq 1 120); do
    healthy && return 0
    [ "$(eng inspect -f '{{.State.Running}}' "$NAME-db" 2>/dev/null)" = true ] || return 1
    sleep 1
  done
  return 1
}

t=$(date +%s)
run_db -v "$WORK/postgres-password:/run/secrets/postgres-password:ro" \
  -v "$REPO_ROOT/sql/examples/demo.sql:/docker-entrypoint-initdb.d/20-demo.sql:ro" \
  -e POSTGRES_PASSWORD_FILE=/run/secrets/postgres-password -e PGQ_RELAY_PASSWORD \
  || abort "start the database container"
if wait_healthy; then pass "database healthy (pg_isready health check) after $(( $(date +%s) - t )) s, first start"
else eng logs --tail 20 "$NAME-db"; abort "database healthy (pg_isready health check)"; fi

DEMO_KEY=$(eng logs "$NAME-db" 2>&1 | grep -Eo 'sk-pgq-[0-9a-f]{12}-[0-9a-f]{64}' | tail -n1)
check "the demo seed ran once at the first start (demo key in the container log)" test -n "$DEMO_KEY"
check "pg_quota preloaded, sweeper on pg_quota" \
  test "$(psql_db "SELECT current_setting('shared_preload_libraries') || ',' || current_setting('pg_quota.sweep_database')")" = "pg_quota,pg_quota"
check "extension pg_quota created in database pg_quota" \
  test "$(psql_db "SELECT count(*) FROM pg_extension WHERE extname = 'pg_quota'")" = 1
role=$(psql_db "SELECT r.rolsuper, r.rolcreaterole, r.rolcreatedb, pg_has_role('pgq_relay', 'quota_relay', 'member'),
                       (SELECT string_agg(c, ',' ORDER BY c) FROM unnest(s.setconfig) c)
                FROM pg_roles r LEFT JOIN pg_db_role_setting s ON s.setrole = r.oid AND s.setdatabase = 0
                WHERE r.rolname = 'pgq_relay'")
check "relay role pgq_relay: no superuser/createrole/createdb, IN ROLE quota_relay, log settings" \
  test "$role" = "f|f|f|t|log_min_duration_statement=-1,log_parameter_max_length=0"
server_env_clean() {
  local env
  env=$(eng exec "$NAME-db" bash -c 'tr "\0" "\n" </proc/$(head -n1 "$PGDATA/postmaster.pid")/environ' 2>&1)
  grep -q '^PGDATA=' <<<"$env" && holds_none "$env" "$SU_PASSWORD" "$PGQ_RELAY_PASSWORD" \
    && ! grep -q 'PASSWORD' <<<"$env"
}
check "no password in the environment of the server processes" server_env_clean
check "the database runs as postgres, not root" test "$(eng exec "$NAME-db" id -un 2>&1)" = postgres
# psql_tcp PASSWORD: SELECT 1 over TCP as postgres with that password (PGPASSWORD by name only)
psql_tcp() { PGPASSWORD=$1 eng exec -e PGPASSWORD "$NAME-db" psql -X -At -h 127.0.0.1 -U postgres -d pg_quota -c 'SELECT 1' 2>/dev/null; }
check "superuser over TCP: a wrong password is refused" test "$(psql_tcp wrong-password)" != 1
check "superuser over TCP: the password from POSTGRES_PASSWORD_FILE works" test "$(psql_tcp "$SU_PASSWORD")" = 1

# ── demo upstream and relay
start --name "$NAME-mock" --network=host "$RELAY_IMAGE" \
  mock-upstream --listen "127.0.0.1:$MOCK_PORT" || abort "start the demo upstream container"
start --name "$NAME-relay" --network=host -e DATABASE_URL \
  -e PGQ_UPSTREAM_URL="http://127.0.0.1:$MOCK_PORT/v1" -e PGQ_LISTEN="127.0.0.1:$RELAY_PORT" \
  "$RELAY_IMAGE" || abort "start the relay container"
RELAY=http://127.0.0.1:$RELAY_PORT
relay_healthy() { curl -fsS -m 5 "$RELAY/healthz" 2>/dev/null | grep -q '"database":"ok"'; }
ok=0; for i in $(seq 1 60); do relay_healthy && { ok=1; break; }; sleep 0.5; done
if [ $ok = 1 ]; then pass "relay up, /healthz reports the database ok"
else eng logs --tail 20 "$NAME-relay"; abort "relay up, /healthz reports the database ok"; fi
check "the relay runs as a non-root user" test "$(eng exec "$NAME-relay" id -u 2>&1)" != 0
check "the relay's sessions log in as pgq_relay, none as a superuser" \
  test "$(psql_db "SELECT string_agg(DISTINCT usename, ',') FROM pg_stat_activity
                   WHERE client_addr IS NOT NULL AND backend_type = 'client backend'")" = pgq_relay

chat() {  # chat OUT [stream]: POST a chat completion with the demo key; prints the HTTP status
  local body='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello!"}]}'
  [ "${2:-}" = stream ] && body='{"model":"gpt-4o-mini","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Hello!"}]}'
  curl -sS -m 30 -o "$1" -w '%{http_code}' "$RELAY/v1/chat/completions" \
    -H @"$WORK/auth-header" -H 'Content-Type: application/json' -d "$body" 2>/dev/null
}
# the key goes to curl in a file, not on its command line
printf 'Authorization: Bearer %s\n' "$DEMO_KEY" >"$WORK/auth-header"
ledger_rows() { psql_db "SELECT count(*) FROM quota.usage_ledger"; }
# settle runs after the reply: wait for the ledger to reach N rows
wait_ledger() { local i; for i in $(seq 1 50); do [ "$(ledger_rows)" = "$1" ] && return 0; sleep 0.2; done; return 1; }

status=$(chat "$WORK/chat.json")
check "chat completion through the relay: 200 with usage" \
  python3 -c 'import json,sys; d=json.load(open(sys.argv[2])); sys.exit(not (sys.argv[1]=="200" and d["usage"]["total_tokens"]>0 and d["choices"][0]["message"]["content"]))' \
  "$status" "$WORK/chat.json"
status=$(chat "$WORK/stream.txt" stream)
check "streamed chat completion: 200, a usage chunk, data: [DONE]" \
  bash -c '[ "$1" = 200 ] && grep -q "\"usage\":{" "$2" && grep -qx "data: \[DONE\]" <(tr -d "\r" <"$2")' _ "$status" "$WORK/stream.txt"
check "two ledger rows settled for the demo key" wait_ledger 2
check "quota.drift() is empty (counters match the ledger)" test "$(psql_db "SELECT count(*) FROM quota.drift()")" = 0
check "a request without a key is refused (401)" \
  test "$(curl -sS -m 10 -o /dev/null -w '%{http_code}' "$RELAY/v1/chat/completions" -H 'Content-Type: application/json' -d '{}')" = 401

# ── replace the database container, same volume
LEDGER_SQL="SELECT count(*) || '/' || sum(cost) || '/' || max(request_id) FROM quota.usage_ledger"
before=$(psql_db "$LEDGER_SQL")
t=$(date +%s)
eng stop -t 30 "$NAME-db" >/dev/null 2>&1
stop_s=$(( $(date +%s) - t ))
code=$(eng inspect -f '{{.State.ExitCode}}' "$NAME-db" 2>/dev/null)
check "SIGTERM stops the database cleanly while the relay is connected (exit $code in ${stop_s} s)" \
  bash -c '[ "$1" = 0 ] && [ "$2" -lt 10 ] && grep -q "database system is shut down" <<<"$3"' _ "$code" "$stop_s" "$(eng logs "$NAME-db" 2>&1)"
# the server's own log of the first container, after its first start (the demo seed printed the key before)
server_log1=$(eng logs "$NAME-db" 2>&1 | sed -n '/first start done/,$p')
eng rm -f "$NAME-db" >/dev/null 2>&1
unset PGQ_RELAY_PASSWORD   # a later start needs no password
t=$(date +%s)
run_db || abort "start a new database container on the volume"
if wait_healthy; then pass "new database container on the same volume healthy after $(( $(date +%s) - t )) s, without passwords"
else eng logs --tail 20 "$NAME-db"; abort "new database container on the same volume healthy"; fi
logs2=$(eng logs "$NAME-db" 2>&1)
check "the later start skipped the first-start steps and needed no recovery" \
  bash -c '! grep -qE "first start|running /docker-entrypoint|not properly shut down|automatic recovery" <<<"$1" && grep -q "exists: starting" <<<"$1"' _ "$logs2"
check "the data survived (ledger rows/cost/last request: $before)" \
  bash -c '[[ $1 =~ ^2/[0-9.]+/. ]] && [ "$1" = "$2" ]' _ "$before" "$(psql_db "$LEDGER_SQL")"
ok=0
for i in $(seq 1 40); do
  [ "$(chat "$WORK/chat2.json")" = 200 ] && { ok=1; break; }; sleep 0.5
done
check "the relay recovered: a request succeeds after the restart (attempt $i)" test $ok = 1
check "its settlement reached the new server (three ledger rows)" wait_ledger 3
check "quota.drift() still empty after the restart" test "$(psql_db "SELECT count(*) FROM quota.drift()")" = 0

# ── secrets
KEY_SECRET=${DEMO_KEY:21}
all_logs=$( { eng logs "$NAME-relay"; eng logs "$NAME-mock"; } 2>&1; echo "$server_log1"; echo "$logs2")
RELAY_PASSWORD=${DATABASE_URL##*password=}
check "no key secret in the relay's log or the server log (which logs every statement)" \
  holds_none "$all_logs" "$KEY_SECRET"
check "no password in any log" holds_none "$all_logs" "$SU_PASSWORD" "$RELAY_PASSWORD"
for img in "$PG_IMAGE" "$RELAY_IMAGE"; do
  meta=$( { eng history --no-trunc --format '{{.CreatedBy}}' "$img"; eng image inspect --format '{{json .Config}}' "$img"; } 2>&1)
  check "$img: its history and config hold no password or key of this run" \
    holds_none "$meta" "$SU_PASSWORD" "$RELAY_PASSWORD" "$KEY_SECRET"
  envs=$(eng image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$img" 2>&1)
  check "$img: no secret-like variable set in the image (PASSWORD, SECRET, KEY, DATABASE_URL)" \
    bash -c '! grep -qiE "^[A-Z_]*(PASSWORD|SECRET|API_KEY|DATABASE_URL)[A-Z_]*=" <<<"$1"' _ "$envs"
done
check "the relay image runs as a non-root user by default" \
  test "$(eng image inspect --format '{{.Config.User}}' "$RELAY_IMAGE")" != ""
check "the database image runs as postgres by default" \
  test "$(eng image inspect --format '{{.Config.User}}' "$PG_IMAGE")" = postgres

closing
