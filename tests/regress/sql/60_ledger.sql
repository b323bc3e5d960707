-- The ledger is append-only, rollups follow it in the same transaction, drift is zero.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
BEGIN;
SET LOCAL pg_quota.fake_now = '2026-05-01 23:59:00+00';
INSERT INTO quota.model_price VALUES ('gpt-l', 1, 2, NULL);
SELECT quota.create_user('hank') AS hank \gset
SELECT quota.create_key(:hank, 'l') AS key \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit) VALUES ('user', :hank, 'cost', 'month', 100);
SELECT allowed FROM quota.admit(:'key', 'l1', 'gpt-l', 10, 10);
SELECT settled FROM quota.settle('l1', 1000000, 500000);
SELECT allowed FROM quota.admit(:'key', 'l2', 'gpt-l', 10, 10);
SELECT settled FROM quota.settle('l2', 10, 0);
SET LOCAL pg_quota.fake_now = '2026-05-02 00:01:00+00';
SELECT allowed FROM quota.admit(:'key', 'l3', 'gpt-l', 10, 10);
SELECT settled FROM quota.settle('l3', 0, 1000000);
SELECT day, model, requests, input_tokens, output_tokens, cost, unbilled FROM quota.usage_daily
WHERE user_id = :hank ORDER BY day;
SELECT sum(cost) AS ledger_total FROM quota.usage_ledger WHERE user_id = :hank;
SELECT used FROM quota.status((SELECT key_id FROM quota.api_key WHERE name = 'l'));
SELECT count(*) AS drifting_counters FROM quota.drift();
-- A counter tampered with behind the engine's back shows up as drift.
UPDATE quota.counter SET used = used + 1 WHERE scope_id = :hank;
SELECT counter_used - ledger_used AS drift FROM quota.drift();
SAVEPOINT a;
UPDATE quota.usage_ledger SET cost = 0;
ROLLBACK TO a;
DELETE FROM quota.usage_ledger;
ROLLBACK;
