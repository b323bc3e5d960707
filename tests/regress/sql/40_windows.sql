-- Windows in SQL: lazy roll-over, expiry-aware status, DST, month clamp, custom and rolling.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
BEGIN;
SET LOCAL pg_quota.fake_now = '2026-03-07 23:30:00-05';   -- New York, the evening before DST starts
SELECT quota.create_user('frank') AS frank \gset
SELECT quota.create_key(:frank, 'ny') AS key \gset
SELECT key_id AS kid FROM quota.api_key WHERE name = 'ny' \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, time_zone, quota_limit)
VALUES ('key', :kid, 'requests', 'day', 'America/New_York', 1) RETURNING policy_id AS pol \gset
SELECT allowed FROM quota.admit(:'key', 'w1', 'm', 1, 1);
SELECT * FROM quota.settle('w1', 1, 1) \gset
SELECT allowed, retry_after_s, message FROM quota.admit(:'key', 'w2', 'm', 1, 1);  -- 30 min to local midnight
-- Local midnight passes. With no request since, status already shows the new, empty window
-- (peer bug: last window's usage displayed after expiry).
SET LOCAL pg_quota.fake_now = '2026-03-08 00:00:01-05';
SELECT used, remaining, window_start, next_reset, state FROM quota.status(:kid);
-- The 8th of March 2026 has 23 hours in New York.
SELECT next_reset - window_start AS day_length FROM quota.status(:kid);
-- And the block is gone on the request path too (peer bug: stale window blocks after rollover).
SELECT allowed FROM quota.admit(:'key', 'w3', 'm', 1, 1);
SELECT window_start, used, reserved FROM quota.counter WHERE policy_id = :pol;

-- A 25-hour day: Berlin, 2026-10-25.
SELECT window_start, window_end, window_end - window_start AS length
FROM quota.window_bounds('day', NULL, 'fixed', '2026-01-01', 'Europe/Berlin', 1, 0, '2026-10-25 12:00:00+01');
-- A reset hour inside the spring-forward gap starts at the first instant after it.
SELECT window_start FROM quota.window_bounds('day', NULL, 'fixed', '2026-01-01', 'America/New_York', 1, 2, '2026-03-08 12:00:00-04');
-- Month windows anchored on the 31st: Jan 31 → Feb 28 → Mar 31 → Apr 30, never drifting.
SELECT m AS at, w.window_start::date AS starts, w.window_end::date AS ends
FROM unnest(ARRAY['2026-02-15', '2026-03-15', '2026-04-15', '2026-05-15']::timestamptz[]) m,
     quota.window_bounds('month', NULL, 'fixed', '2026-01-31 00:00:00+00', 'UTC', 1, 0, m) w;
-- A 90-minute custom window aligned to its anchor.
SELECT window_start, window_end FROM quota.window_bounds('minutes', 90, 'fixed', '2026-05-01 10:17:00+00', 'UTC', 1, 0, '2026-05-01 13:00:00+00');
-- Fixed vs rolling 5h at the same instant.
SELECT mode, window_start, window_end
FROM unnest(ARRAY['fixed', 'rolling']) mode,
     quota.window_bounds('5h', NULL, mode, '2026-05-01 00:00:00+00', 'UTC', 1, 0, '2026-05-01 07:42:31+00');
-- A week starting on Sunday at 06:00 Tokyo time.
SELECT window_start, window_end FROM quota.window_bounds('week', NULL, 'fixed', '2026-01-01', 'Asia/Tokyo', 7, 6, '2026-05-06 00:00:00+00');

-- Rolling window in use: 3 requests per rolling 5 hours (the day policy steps aside).
DELETE FROM quota.policy WHERE policy_id = :pol;
SET LOCAL pg_quota.fake_now = '2026-05-01 10:00:00+00';
INSERT INTO quota.policy (subject_type, subject_id, metric, period, window_mode, quota_limit)
VALUES ('user', :frank, 'requests', '5h', 'rolling', 3) RETURNING policy_id AS rpol \gset
SELECT allowed FROM quota.admit(:'key', 'r1', 'm', 1, 1);
SELECT * FROM quota.settle('r1', 1, 1) \gset
SET LOCAL pg_quota.fake_now = '2026-05-01 11:00:00+00';
SELECT allowed FROM quota.admit(:'key', 'r2', 'm', 1, 1);
SELECT * FROM quota.settle('r2', 1, 1) \gset
SET LOCAL pg_quota.fake_now = '2026-05-01 12:00:00+00';
SELECT allowed FROM quota.admit(:'key', 'r3', 'm', 1, 1);
SELECT * FROM quota.settle('r3', 1, 1) \gset
SET LOCAL pg_quota.fake_now = '2026-05-01 14:30:00+00';
-- Full: frees when the 10:00 usage leaves the window, at 15:00.
SELECT allowed, retry_after_s FROM quota.admit(:'key', 'r4', 'm', 1, 1);
SELECT used, next_reset, state FROM quota.status(:kid) WHERE policy_id = :rpol;
-- Still spent: the sweep finds nothing to recover.
SELECT recovered_windows FROM quota.sweep();
SET LOCAL pg_quota.fake_now = '2026-05-01 15:00:00+00';
SELECT used, state FROM quota.status(:kid) WHERE policy_id = :rpol;
-- The 10:00 usage has left the window: the sweep logs the recovery with no request to see it,
-- once (a second sweep and the next request find nothing to log).
SELECT recovered_windows FROM quota.sweep();
SELECT recovered_windows FROM quota.sweep();
SELECT allowed FROM quota.admit(:'key', 'r5', 'm', 1, 1);
-- Spent again: logged again. While it refused (14:30, as the window moved minute by minute) the
-- spent window was logged once, when it was spent (12:00); it recovered at 15:00, when the
-- 10:00 usage left it.
SELECT * FROM quota.settle('r5', 1, 1) \gset
SELECT kind, at, detail ->> 'by' AS by FROM quota.event
WHERE policy_id = :rpol AND kind IN ('exhausted', 'recovered') ORDER BY event_id;
-- A reset of a rolling window holds as the window moves on: the counters agree with the ledger.
SET LOCAL pg_quota.fake_now = '2026-05-01 15:05:00+00';
SELECT quota.reset(:rpol);
SET LOCAL pg_quota.fake_now = '2026-05-01 15:10:00+00';
SELECT allowed FROM quota.admit(:'key', 'r6', 'm', 1, 1);
SELECT * FROM quota.settle('r6', 1, 1) \gset
SELECT used, state FROM quota.status(:kid) WHERE policy_id = :rpol;
SELECT count(*) AS drifting_counters FROM quota.drift();
ROLLBACK;
