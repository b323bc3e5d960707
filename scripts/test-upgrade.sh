#!/usr/bin/env bash
# Upgrade test: for every frozen release in sql/releases/ (pg_quota--X.sql), a database made
# with that release and filled with a DBA's data (tests/upgrade/fill.sql) is upgraded with
# ALTER EXTENSION pg_quota UPDATE, then must equal a fresh install of the current version
# (tests/upgrade/fingerprint.sql), keep every row (tests/upgrade/contents.sql), settle the
# reservations open before the upgrade, and show no drift. The upgraded database must also
# survive pg_dump and pg_restore into an empty database.
# Needs a running cluster (PGHOST, PGPORT, PGUSER) where the extension, its frozen releases and
# upgrade scripts are installed (scripts/lib.sh install_extension). Prints
# "upgrade: N passed, M failed" and exits non-zero on a failure.
set -uo pipefail
LOG_TAG=upgrade
source "$(dirname "$0")/lib.sh"
cd "$REPO_ROOT"

NEW=$(sed -n 's/^version = "\(.*\)"/\1/p' pg_quota/Cargo.toml | head -n1)
WORK=$(mktemp -d /var/tmp/pg_quota-upgrade.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
PSQL=(psql -X -q -v ON_ERROR_STOP=1)
passed=0 failed=0
pass() { passed=$((passed + 1)); say "ok   $*"; }
flunk() { failed=$((failed + 1)); say "FAIL $*"; }
# check DESCRIPTION COMMAND...: one pass or fail line
check() { local what=$1; shift; if "$@" >"$WORK/check.out" 2>&1; then pass "$what"; else flunk "$what"; sed 's/^/     /' "$WORK/check.out" | head -n 40; fi; }
fresh_db() { "${PSQL[@]}" -d postgres -c "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1"; }
value() { "${PSQL[@]}" -At -d "$1" -c "$2"; }
# old_release_sweeps DB: on the old release's schema, served by the new library (as between the
# install of a new build and ALTER EXTENSION UPDATE), the sweep charges an expired reservation
# of a rolling window (the old sweep calls functions of the library that the new schema no
# longer declares, such as minute_bucket); prints t when the charge is in the ledger and the
# window's bucket. The fill's open reservations are not expired.
old_release_sweeps() {
  "${PSQL[@]}" -At -d "$1" <<'SQL'
BEGIN;
SET LOCAL pg_quota.fake_now = '2000-01-01 00:00:00+00';
SELECT quota.create_key(quota.create_user('upgrade-sweep'), 'upgrade-sweep') AS key \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, period_minutes, window_mode, quota_limit)
SELECT 'key', key_id, 'tokens', 'minutes', 60, 'rolling', 1000000 FROM quota.api_key WHERE name = 'upgrade-sweep';
SELECT allowed AS admitted FROM quota.admit(:'key', 'upgrade-sweep-1', 'gpt-4o-mini', 100, 50) \gset
-- (the fill's open reservations were made at 10:00 that day)
SET LOCAL pg_quota.fake_now = '2026-11-27 10:05+00';
SET LOCAL pg_quota.reservation_ttl = '1h';
SELECT expired_reservations AS swept FROM quota.sweep() \gset
SELECT :'admitted'::boolean AND :swept = 1
       AND EXISTS (SELECT 1 FROM quota.usage_ledger WHERE request_id = 'upgrade-sweep-1' AND settled_by = 'sweep')
       AND (SELECT sum(r.used) FROM quota.rolling_usage r JOIN quota.policy p USING (policy_id)
            JOIN quota.api_key k ON k.key_id = p.subject_id AND p.subject_type = 'key'
            WHERE k.name = 'upgrade-sweep') = 150;
COMMIT;
SQL
}

fresh_db pgq_upgrade_fresh >/dev/null && "${PSQL[@]}" -d pgq_upgrade_fresh -c 'CREATE EXTENSION pg_quota' >/dev/null \
  || fail "a fresh install of pg_quota $NEW"
"${PSQL[@]}" -d pgq_upgrade_fresh -f tests/upgrade/fingerprint.sql >"$WORK/fresh.schema" || fail "fingerprint of $NEW"

releases=$(ls sql/releases/pg_quota--*.sql 2>/dev/null | sed 's/.*pg_quota--\(.*\)\.sql$/\1/' | sort -V)
[ -n "$releases" ] || fail "no frozen release in sql/releases/"
for old in $releases; do
  [ "$old" = "$NEW" ] && continue
  db=pgq_upgrade_from_${old//./_}
  say "── $old → $NEW"
  fresh_db "$db" >/dev/null || fail "create database $db"
  check "install $old and fill it (users, keys, policies, groups, channels, ledger, open reservations)" \
    bash -c "${PSQL[*]} -d $db -c \"CREATE EXTENSION pg_quota VERSION '$old'\" && ${PSQL[*]} -d $db -f tests/upgrade/fill.sql"
  check "$old served by the new library: its sweep charges a rolling window's expired reservation" \
    test "$(old_release_sweeps "$db")" = t
  "${PSQL[@]}" -d "$db" -f tests/upgrade/contents.sql >"$WORK/before.rows"
  check "ALTER EXTENSION pg_quota UPDATE from $old" "${PSQL[@]}" -d "$db" -c 'ALTER EXTENSION pg_quota UPDATE'
  check "the upgraded database reports version $NEW" test "$(value "$db" "SELECT extversion FROM pg_extension WHERE extname = 'pg_quota'")" = "$NEW"
  "${PSQL[@]}" -d "$db" -f tests/upgrade/fingerprint.sql >"$WORK/upgraded.schema"
  check "the upgraded schema equals a fresh install of $NEW" diff "$WORK/fresh.schema" "$WORK/upgraded.schema"
  "${PSQL[@]}" -d "$db" -f tests/upgrade/contents.sql >"$WORK/after.rows"
  # (tables the upgrade adds may be new lines; every line of before must be there, unchanged)
  check "every row survived the upgrade ($(wc -l <"$WORK/before.rows") tables)" \
    bash -c "grep -v '^policy_generation ' '$WORK/before.rows' | grep -vxF -f '$WORK/after.rows'; test \${PIPESTATUS[1]} -eq 1"

  # The first upkeep files the migrated ledger into day partitions (as the sweeper would).
  ledger_rows=$(value "$db" "SELECT count(*) FROM quota.usage_ledger")
  check "the first upkeep files the migrated ledger into partitions, and drift stays empty" test "$(value "$db" \
    "SELECT filed_rows FROM quota.maintain_ledger()" 2>/dev/null):$(value "$db" \
    "SELECT (SELECT count(*) FROM quota.usage_ledger_default) = 0
            AND (SELECT count(*) FROM quota.ledger_partitions() WHERE NOT is_default) > 1
            AND NOT EXISTS (SELECT 1 FROM quota.drift())")" = "$ledger_rows:t"
  "${PSQL[@]}" -d "$db" -f tests/upgrade/contents.sql >"$WORK/upkept.rows"

  # pg_dump of the upgraded database (with its ledger partitions) restores into an empty one
  # with the same schema and rows.
  restored=pgq_upgrade_restored
  fresh_db "$restored" >/dev/null
  # As the README tells DBAs: the schema, then the data without the extension's triggers (they
  # would judge rows again, in an order pg_dump does not know, and count the ledger twice), then
  # the rest, and sql/examples/after_restore.sql.
  check "pg_dump, then pg_restore in three sections into an empty database" bash -c \
    "'$PG_BIN/pg_dump' -Fc -d $db -f '$WORK/dump' &&
     '$PG_BIN/pg_restore' --exit-on-error --section=pre-data -d $restored '$WORK/dump' &&
     '$PG_BIN/pg_restore' --exit-on-error --data-only --disable-triggers -d $restored '$WORK/dump' &&
     '$PG_BIN/pg_restore' --exit-on-error --section=post-data -d $restored '$WORK/dump' &&
     ${PSQL[*]} -d $restored -f sql/examples/after_restore.sql"
  "${PSQL[@]}" -d "$restored" -f tests/upgrade/fingerprint.sql >"$WORK/restored.schema"
  check "the restored schema equals a fresh install" diff "$WORK/fresh.schema" "$WORK/restored.schema"
  "${PSQL[@]}" -d "$restored" -f tests/upgrade/contents.sql >"$WORK/restored.rows"
  # (policy_generation is the per-connection caches' clock, not data: the restore moves it on.)
  check "the restored database holds the same rows" \
    diff <(grep -v '^policy_generation ' "$WORK/upkept.rows") <(grep -v '^policy_generation ' "$WORK/restored.rows")
  partitions="SELECT partition, range_from, range_to, (SELECT count(*) FROM quota.usage_ledger l WHERE l.tableoid = p.partition)
              FROM quota.ledger_partitions() p"
  check "the restored database has the same ledger partitions, with their rows" diff \
    <(value "$db" "$partitions") <(value "$restored" "$partitions")
  check "the restored database makes new users, keys, policies and events after the old ones" \
    test "$(value "$restored" "SELECT quota.create_user('after-restore') > max(user_id) FILTER (WHERE name <> 'after-restore')
                               AND (SELECT count(*) FROM quota.event) = (SELECT count(DISTINCT event_id) FROM quota.event) FROM quota.app_user")" = t

  check "reservations open before the upgrade settle after it" test "$(value "$db" \
    "SELECT bool_and(s.settled AND s.billed) AND count(*) = 3 FROM quota.reservation r, LATERAL quota.settle(r.request_id, 100, 20) s
     WHERE r.request_id LIKE 'open-%'")" = t
  check "no reservation is left" test "$(value "$db" "SELECT count(*) FROM quota.reservation")" = 0
  check "a new key is admitted and settled on the upgraded database" test "$(value "$db" \
    "SELECT a.allowed AND s.settled FROM quota.admit(quota.create_key((SELECT min(user_id) FROM quota.app_user), 'after upgrade'),
            'after-upgrade-1', 'gpt-4o-mini', 10, 10) a, LATERAL quota.settle('after-upgrade-1', 10, 5) s")" = t
  check "quota.drift() is empty after the upgrade" test "$(value "$db" "SELECT count(*) FROM quota.drift()")" = 0
done
echo "upgrade: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
