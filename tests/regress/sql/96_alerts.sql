-- Budget alert thresholds (policy.alert_at): a threshold_crossed event the first time settled
-- usage reaches each threshold in a window, re-armed by a new window, a reset, an edit of the
-- policy and usage that falls below it. (Once under concurrency: tests/isolation/specs/alerts.spec.)
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
BEGIN;
SET LOCAL pg_quota.fake_now = '2026-06-01 10:00:00+00';
SELECT quota.create_user('alma') AS alma \gset
SELECT quota.create_key(:alma, 'alerted') AS key \gset
SELECT key_id AS kid FROM quota.api_key WHERE name = 'alerted' \gset

-- Thresholds are fractions of the limit in (0, 1]; anything else is refused naming the field.
\set VERBOSITY terse
\set ON_ERROR_ROLLBACK on
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, alert_at)
VALUES ('user', :alma, 'requests', 'day', 10, '{0.8, 80}');
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, alert_at)
VALUES ('user', :alma, 'requests', 'day', 10, '{0}');
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, alert_at)
VALUES ('user', :alma, 'requests', 'day', 10, '{NaN}');
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, alert_at)
VALUES ('user', :alma, 'requests', 'day', 10, '{0.5, NULL}');
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, alert_at)
VALUES ('user', :alma, 'requests', 'day', 10, '{{0.5}, {0.8}}');
\unset ON_ERROR_ROLLBACK
\set VERBOSITY default
-- Kept sorted, each once; an empty list is none.
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, alert_at)
VALUES ('user', :alma, 'tokens', 'day', 1000, '{1, 0.5, 0.8, 0.5}') RETURNING policy_id AS pol, alert_at \gset
SELECT :'alert_at' AS stored_thresholds;
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, alert_at)
VALUES ('user', :alma, 'requests', 'day', 100, '{}') RETURNING alert_at IS NULL AS no_thresholds;

-- 1000 tokens a day, alerts at 50 %, 80 %, 100 %. 400 tokens cross nothing; 500 cross 50 %.
SELECT allowed FROM quota.admit(:'key', 'alert-a1', 'm', 100, 100);
SELECT settled FROM quota.settle('alert-a1', 200, 200);
SELECT count(*) AS alerts FROM quota.event WHERE policy_id = :pol AND kind = 'threshold_crossed';
SELECT allowed FROM quota.admit(:'key', 'alert-a2', 'm', 50, 50);
SELECT settled FROM quota.settle('alert-a2', 50, 50);
SELECT policy_id = :pol AS this_policy, key_id = :kid AS this_key, user_id = :alma AS this_user,
       detail - 'scope_id' - 'subject_id' AS detail
FROM quota.event WHERE policy_id = :pol AND kind = 'threshold_crossed' ORDER BY event_id;
-- More usage in the same window crosses no threshold twice.
SELECT allowed FROM quota.admit(:'key', 'alert-a3', 'm', 10, 10);
SELECT settled FROM quota.settle('alert-a3', 10, 10);
SELECT count(*) AS alerts FROM quota.event WHERE policy_id = :pol AND kind = 'threshold_crossed';
-- One settle that jumps over several thresholds logs each of them, lowest first, and the
-- exhausted event comes after them.
SELECT allowed FROM quota.admit(:'key', 'alert-a4', 'm', 200, 200);
SELECT settled FROM quota.settle('alert-a4', 300, 200);
SELECT kind, detail ->> 'threshold' AS threshold, detail ->> 'used' AS used, detail ->> 'limit' AS limit
FROM quota.event WHERE policy_id = :pol AND kind IN ('threshold_crossed', 'exhausted') ORDER BY event_id;
SELECT state FROM quota.status(:kid) WHERE policy_id = :pol;

-- A new window re-arms every threshold.
SET LOCAL pg_quota.fake_now = '2026-06-02 09:00:00+00';
SELECT allowed FROM quota.admit(:'key', 'alert-b1', 'm', 300, 300);
SELECT settled FROM quota.settle('alert-b1', 300, 300);
SELECT detail ->> 'window_start' AS window_start, detail ->> 'threshold' AS threshold
FROM quota.event WHERE policy_id = :pol AND kind = 'threshold_crossed' AND at = '2026-06-02 09:00:00+00' ORDER BY event_id;

-- A manual reset re-arms them: the same usage after it alerts again.
SET LOCAL pg_quota.fake_now = '2026-06-02 09:00:30+00';
SELECT quota.reset(:pol);
SELECT allowed FROM quota.admit(:'key', 'alert-b2', 'm', 300, 300);
SET LOCAL pg_quota.fake_now = '2026-06-02 09:01:00+00';
SELECT settled FROM quota.settle('alert-b2', 300, 300);
SELECT detail ->> 'threshold' AS threshold, detail ->> 'used' AS used
FROM quota.event WHERE policy_id = :pol AND kind = 'threshold_crossed' AND at = '2026-06-02 09:01:00+00' ORDER BY event_id;

-- A raised limit re-arms them (the policy is judged afresh): 602 of 2000 crosses nothing; 400
-- more cross 50 % of the new limit.
SET LOCAL pg_quota.fake_now = '2026-06-02 09:02:00+00';
UPDATE quota.policy SET quota_limit = 2000 WHERE policy_id = :pol;
SELECT allowed FROM quota.admit(:'key', 'alert-b3', 'm', 1, 1);
SELECT settled FROM quota.settle('alert-b3', 1, 1);
SELECT count(*) AS alerts_at_601 FROM quota.event WHERE policy_id = :pol AND kind = 'threshold_crossed' AND at = '2026-06-02 09:02:00+00';
SELECT allowed FROM quota.admit(:'key', 'alert-b4', 'm', 200, 200);
SELECT settled FROM quota.settle('alert-b4', 200, 200);
SELECT detail ->> 'threshold' AS threshold, detail ->> 'used' AS used, detail ->> 'limit' AS limit
FROM quota.event WHERE policy_id = :pol AND kind = 'threshold_crossed' AND at = '2026-06-02 09:02:00+00' ORDER BY event_id;

-- A boost counts in the limit the thresholds are fractions of: 1004 of 2000 + 1000 is below
-- 50 %, so 50 % is re-armed, and crossed again past 1500.
INSERT INTO quota.boost (subject_type, subject_id, metric, period, amount, expires_at)
VALUES ('user', :alma, 'tokens', 'day', 1000, '2026-06-03 00:00:00+00');
SET LOCAL pg_quota.fake_now = '2026-06-02 09:03:00+00';
SELECT allowed FROM quota.admit(:'key', 'alert-b5', 'm', 1, 1);
SELECT settled FROM quota.settle('alert-b5', 1, 1);
SELECT count(*) AS alerts_at_1003 FROM quota.event WHERE policy_id = :pol AND kind = 'threshold_crossed' AND at = '2026-06-02 09:03:00+00';
SELECT allowed FROM quota.admit(:'key', 'alert-b6', 'm', 250, 250);
SELECT settled FROM quota.settle('alert-b6', 250, 250);
SELECT detail ->> 'threshold' AS threshold, detail ->> 'used' AS used, detail ->> 'limit' AS limit
FROM quota.event WHERE policy_id = :pol AND kind = 'threshold_crossed' AND at = '2026-06-02 09:03:00+00' ORDER BY event_id;

-- The sweep's charge of an expired reservation crosses thresholds like a settle.
SELECT quota.create_user('bert') AS bert \gset
SELECT quota.create_key(:bert, 'crashed') AS ckey \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, alert_at)
VALUES ('user', :bert, 'requests', 'day', 2, '{0.5}') RETURNING policy_id AS cpol \gset
SELECT allowed FROM quota.admit(:'ckey', 'alert-c1', 'm', 1, 1);
SET LOCAL pg_quota.reservation_ttl = '10min';
SET LOCAL pg_quota.fake_now = '2026-06-02 09:20:00+00';
SELECT expired_reservations > 0 AS expired FROM quota.sweep();
SELECT kind, detail ->> 'threshold' AS threshold, detail ->> 'used' AS used
FROM quota.event WHERE policy_id = :cpol AND kind = 'threshold_crossed';
SELECT count(*) AS drifting_counters FROM quota.drift() WHERE policy_id IN (:pol, :cpol);
ROLLBACK;
