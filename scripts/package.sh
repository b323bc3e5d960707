#!/usr/bin/env bash
# Build the release artifacts that the container images copy, on the host: the extension as a
# `cargo pgrx package` tree for PostgreSQL 15 and the relay binary. Fills a small, dedicated
# build context (only these files are sent to the image builder, never target/):
#   target/docker/context/pg_quota-pg15/      the package tree (usr/lib/..., usr/share/...)
#   target/docker/context/pg-quota-relay      the relay binary
#   target/docker/context/*.Dockerfile, entrypoint-postgres.sh   copied from docker/
# Cargo rebuilds only what changed, so a second run takes seconds.
set -euo pipefail
LOG_TAG=package
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

OUT=${PGQ_DOCKER_CONTEXT:-$REPO_ROOT/target/docker/context}

bash scripts/bootstrap.sh >/dev/null || fail "scripts/bootstrap.sh"

say "cargo pgrx package (release, pg15)"
rm -rf "$REPO_ROOT/target/docker/pkg"
(cd pg_quota && cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$REPO_ROOT/target/docker/pkg" \
   >"$REPO_ROOT/target/docker-package.log" 2>&1) \
  || { tail -n 20 "$REPO_ROOT/target/docker-package.log" >&2; fail "cargo pgrx package (log: target/docker-package.log)"; }

say "cargo build --release -p pg-quota-relay"
cargo build -q --release -p pg-quota-relay || fail "cargo build --release -p pg-quota-relay"

rm -rf "$OUT"; mkdir -p "$OUT"
cp -a "$REPO_ROOT/target/docker/pkg" "$OUT/pg_quota-pg15"
[ -f "$OUT/pg_quota-pg15/usr/lib/postgresql/15/lib/pg_quota.so" ] \
  || fail "the package has no usr/lib/postgresql/15/lib/pg_quota.so (layout changed?)"
ls "$OUT"/pg_quota-pg15/usr/share/postgresql/15/extension/pg_quota--*.sql >/dev/null 2>&1 \
  || fail "the package has no install script under usr/share/postgresql/15/extension/"
# Upgrade scripts (sql/pg_quota--A--B.sql), should the package not have them already.
for f in sql/pg_quota--*--*.sql; do
  [ -e "$f" ] && cp -n "$f" "$OUT/pg_quota-pg15/usr/share/postgresql/15/extension/"
done
install_release_scripts "$OUT/pg_quota-pg15/usr/share/postgresql/15/extension"
install -m 755 target/release/pg-quota-relay "$OUT/pg-quota-relay"
install -m 644 docker/postgres.Dockerfile docker/relay.Dockerfile "$OUT/"
install -m 755 docker/entrypoint-postgres.sh "$OUT/"
say "build context ready in ${OUT#"$REPO_ROOT"/} ($(du -sh "$OUT" | cut -f1))"
