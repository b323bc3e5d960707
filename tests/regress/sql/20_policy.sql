-- Invalid policies are refused with a message naming the column; edits apply on the next admit
-- and are logged.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
BEGIN;
SET LOCAL pg_quota.fake_now = '2026-05-01 12:00:00+00';
SELECT quota.create_user('bob') AS bob \gset
SELECT quota.create_key(:bob, 'k') AS key \gset
\set VERBOSITY terse
\set ON_ERROR_ROLLBACK on
INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit) VALUES ('user', :bob, 'day', 0);
INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit) VALUES ('user', :bob, 'day', -5);
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit) VALUES ('user', :bob, 'tokens', 'day', 10.5);
INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit, time_zone) VALUES ('user', :bob, 'day', 1, 'Mars/Olympus');
INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit) VALUES ('user', :bob, 'minutes', 1);
INSERT INTO quota.policy (subject_type, subject_id, period, period_minutes, quota_limit) VALUES ('user', :bob, 'minutes', 0, 1);
INSERT INTO quota.policy (subject_type, subject_id, period, period_minutes, quota_limit) VALUES ('user', :bob, 'day', 30, 1);
INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit) VALUES ('user', :bob, 'fortnight', 1);
INSERT INTO quota.policy (subject_type, subject_id, period, window_mode, quota_limit) VALUES ('user', :bob, 'day', 'sliding', 1);
INSERT INTO quota.policy (subject_type, subject_id, period, window_mode, quota_limit) VALUES ('user', :bob, 'total', 'rolling', 1);
INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit, boundary) VALUES ('user', :bob, 'day', 1, 'soft');
INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit, on_exhausted) VALUES ('user', :bob, 'day', 1, 'ban');
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit) VALUES ('user', :bob, 'dollars', 'day', 1);
INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit) VALUES ('team', :bob, 'day', 1);
INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit) VALUES ('user', 999999, 'day', 1);
INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit, week_start) VALUES ('user', :bob, 'week', 1, 8);
INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit, reset_hour) VALUES ('user', :bob, 'day', 1, 24);
-- The refused column is also in the error's COLUMN field and the SQLSTATE is check_violation.
DO $$
DECLARE col text; state text;
BEGIN
    INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit, reset_hour)
    VALUES ('user', (SELECT max(user_id) FROM quota.app_user), 'day', 1, 99);
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS col = COLUMN_NAME, state = RETURNED_SQLSTATE;
    RAISE NOTICE 'sqlstate %, column %', state, col;
END $$;
ROLLBACK;
\unset ON_ERROR_ROLLBACK
\set VERBOSITY default

BEGIN;
SET LOCAL pg_quota.fake_now = '2026-05-01 12:00:00+00';
SELECT quota.create_user('bob') AS bob \gset
SELECT quota.create_key(:bob, 'k') AS key \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :bob, 'requests', 'day', 2) RETURNING policy_id AS pol \gset
SELECT allowed FROM quota.admit(:'key', 'p1', 'm', 1, 1);
SELECT allowed FROM quota.admit(:'key', 'p2', 'm', 1, 1);
SELECT allowed, error_code FROM quota.admit(:'key', 'p3', 'm', 1, 1);
-- Raising the limit takes effect on the very next admit, with no cache to wait for.
UPDATE quota.policy SET quota_limit = 3 WHERE policy_id = :pol;
SELECT allowed FROM quota.admit(:'key', 'p4', 'm', 1, 1);
-- Disabling it removes it; deleting it too.
UPDATE quota.policy SET quota_limit = 1 WHERE policy_id = :pol;
SELECT allowed FROM quota.admit(:'key', 'p5', 'm', 1, 1);
UPDATE quota.policy SET enabled = false WHERE policy_id = :pol;
SELECT allowed FROM quota.admit(:'key', 'p6', 'm', 1, 1);
DELETE FROM quota.policy WHERE policy_id = :pol;
-- Every change is in the event log, with the old and new row.
SELECT kind, detail->'old'->>'quota_limit' AS old_limit, detail->'new'->>'quota_limit' AS new_limit,
       detail->'new'->>'enabled' AS enabled
FROM quota.event WHERE policy_id = :pol ORDER BY event_id;
ROLLBACK;
