-- Lost settlements are not free: the sweep charges an expired reservation at its reservation
-- (pg_quota.expired_reservations = 'charge', the default); a late settle corrects the charge to
-- the measured usage with one correction row; 'release' keeps the old behaviour.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
BEGIN;
SET LOCAL pg_quota.fake_now = '2026-06-01 12:00:00+00';
SET LOCAL pg_quota.reservation_ttl = '10min';
INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok) VALUES ('gpt-x', 2, 8);
SELECT quota.create_user('crash') AS crash \gset
SELECT quota.create_key(:crash, 'crashy') AS key \gset
SELECT key_id AS kid FROM quota.api_key WHERE name = 'crashy' \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :crash, 'cost', 'day', 1), ('key', :kid, 'tokens', 'day', 100000);
INSERT INTO quota.policy (subject_type, subject_id, metric, period, period_minutes, window_mode, quota_limit)
VALUES ('key', :kid, 'tokens', 'minutes', 60, 'rolling', 100000);

-- A relay admits x1 (1000 in + 500 out: $0.006, 1500 tokens) and dies before it settles.
SELECT allowed FROM quota.admit(:'key', 'ex-x1', 'gpt-x', 1000, 500);
SET LOCAL pg_quota.fake_now = '2026-06-01 12:11:00+00';
SELECT expired_reservations FROM quota.sweep();
-- Charged at its reservation, like a settle of the estimate: billed, marked as the sweep's.
SELECT request_id, input_tokens, output_tokens, cost, billed, unbilled_reason, settled_by
FROM quota.usage_ledger WHERE key_id = :kid ORDER BY ledger_id;
SELECT metric, window_mode, used, reserved FROM quota.status(:kid) ORDER BY policy_id;
SELECT kind, detail ->> 'request_id' AS request_id, detail ->> 'action' AS action
FROM quota.event WHERE kind = 'reservation_expired' AND key_id = :kid;
SELECT count(*) AS drifting_counters FROM quota.drift();

-- The settle arrives late with the measured usage (200 + 100 tokens, $0.0012): one correction
-- row brings the charge down to it; the request costs what it used, once.
SELECT * FROM quota.settle('ex-x1', 200, 100);
SELECT request_id, settled_by, input_tokens, output_tokens, cost FROM quota.usage_ledger WHERE key_id = :kid ORDER BY ledger_id;
SELECT metric, window_mode, used, reserved FROM quota.status(:kid) ORDER BY policy_id;
SELECT requests, input_tokens, output_tokens, cost FROM quota.usage_daily WHERE key_id = :kid;
-- Settling again changes nothing and gives the same answer.
SELECT * FROM quota.settle('ex-x1', 999, 999);
SELECT count(*) AS x1_rows FROM quota.usage_ledger WHERE request_id = 'ex-x1';
SELECT count(*) AS drifting_counters FROM quota.drift();

-- A late refund of a swept request (the upstream failed after all): corrected to nothing.
SELECT allowed FROM quota.admit(:'key', 'ex-x2', 'gpt-x', 1000, 500);
SET LOCAL pg_quota.fake_now = '2026-06-01 12:22:00+00';
SELECT expired_reservations FROM quota.sweep();
SELECT quota.refund('ex-x2', 'upstream 502') AS refunded, quota.refund('ex-x2') AS again;
SELECT request_id, settled_by, input_tokens, output_tokens, cost FROM quota.usage_ledger
WHERE request_id = 'ex-x2' ORDER BY ledger_id;
SELECT metric, window_mode, used FROM quota.status(:kid) ORDER BY policy_id;
SELECT count(*) AS drifting_counters FROM quota.drift();

-- A correction that comes after the charged window has ended is written to the ledger, but
-- leaves the windows alone: the ended day keeps the charge, the new day starts at zero.
SELECT allowed FROM quota.admit(:'key', 'ex-x3', 'gpt-x', 1000, 500);
SET LOCAL pg_quota.fake_now = '2026-06-01 12:33:00+00';
SELECT expired_reservations FROM quota.sweep();
SET LOCAL pg_quota.fake_now = '2026-06-02 00:10:00+00';
SELECT * FROM quota.settle('ex-x3', 10, 10);
SELECT settled_by, input_tokens, output_tokens, cost, cardinality(counted_policy) AS counted FROM quota.usage_ledger
WHERE request_id = 'ex-x3' ORDER BY ledger_id;
SELECT metric, window_mode, used FROM quota.status(:kid) ORDER BY policy_id;
SELECT count(*) AS drifting_counters FROM quota.drift();

-- A charge can spend a window: it is marked and logged like a settle's.
UPDATE quota.policy SET quota_limit = 1000 WHERE subject_type = 'key' AND window_mode = 'fixed';
SELECT allowed FROM quota.admit(:'key', 'ex-x4', 'gpt-x', 500, 500);
SET LOCAL pg_quota.fake_now = '2026-06-02 00:21:00+00';
SELECT expired_reservations FROM quota.sweep();
SELECT metric, window_mode, used, state FROM quota.status(:kid) ORDER BY policy_id;
SELECT kind FROM quota.event WHERE key_id = :kid AND kind = 'exhausted';
UPDATE quota.policy SET quota_limit = 100000 WHERE subject_type = 'key' AND window_mode = 'fixed';

-- pg_quota.expired_reservations = 'release': the old behaviour, holds given back uncharged
-- (a late settle still charges the usage on the policies that apply then).
SET LOCAL pg_quota.expired_reservations = 'release';
SELECT allowed FROM quota.admit(:'key', 'ex-x5', 'gpt-x', 1000, 500);
SET LOCAL pg_quota.fake_now = '2026-06-02 00:32:00+00';
SELECT expired_reservations FROM quota.sweep();
SELECT count(*) AS x5_rows FROM quota.usage_ledger WHERE request_id = 'ex-x5';
SELECT kind, reason FROM quota.released WHERE request_id = 'ex-x5';
SELECT detail ->> 'action' AS action FROM quota.event
WHERE kind = 'reservation_expired' AND detail ->> 'request_id' = 'ex-x5';
SELECT * FROM quota.settle('ex-x5', 10, 10);
SELECT settled_by, cost FROM quota.usage_ledger WHERE request_id = 'ex-x5';
SAVEPOINT a;
SET LOCAL pg_quota.expired_reservations = 'forgive';
ROLLBACK TO a;

-- The sweep's charge is a settle of the estimate, by the same code: twin keys with the same
-- policies (a strict token limit that disables the key once spent, with an alert threshold,
-- and a rolling window), one request each of the same estimate; one is settled with its
-- estimate, the other expires and the sweep charges it. Counters, marks, events, ledger rows,
-- rollups and the suspension come out the same.
SET LOCAL pg_quota.expired_reservations = 'charge';
SET LOCAL pg_quota.fake_now = '2026-06-02 00:40:00+00';
SELECT quota.create_key(quota.create_user('twin-settled'), 'twin-settled') AS tw_s_key,
       quota.create_key(quota.create_user('twin-swept'), 'twin-swept') AS tw_c_key \gset
SELECT key_id AS tw_s FROM quota.api_key WHERE name = 'twin-settled' \gset
SELECT key_id AS tw_c FROM quota.api_key WHERE name = 'twin-swept' \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, on_exhausted, alert_at)
SELECT 'key', k, 'tokens', 'day', 1000, 'disable', '{0.5}' FROM unnest(ARRAY[:tw_s, :tw_c]) k;
INSERT INTO quota.policy (subject_type, subject_id, metric, period, period_minutes, window_mode, quota_limit)
SELECT 'key', k, 'cost', 'minutes', 30, 'rolling', 1 FROM unnest(ARRAY[:tw_s, :tw_c]) k;
SELECT allowed FROM quota.admit(:'tw_s_key', 'tw-s', 'gpt-x', 400, 600);
SELECT allowed FROM quota.admit(:'tw_c_key', 'tw-c', 'gpt-x', 400, 600);
SELECT billed, cost FROM quota.settle('tw-s', 400, 600);
SET LOCAL pg_quota.fake_now = '2026-06-02 00:51:00+00';
SELECT expired_reservations FROM quota.sweep();
SELECT k.name, s.metric, s.window_mode, s.used, s.reserved, s.state, a.suspended_until
FROM unnest(ARRAY[:tw_s, :tw_c]) AS k0(key_id) JOIN quota.api_key a ON a.key_id = k0.key_id
JOIN LATERAL quota.status(k0.key_id) s ON true JOIN quota.api_key k ON k.key_id = k0.key_id
ORDER BY k.name DESC, s.policy_id;
SELECT k.name, array_agg(e.kind ORDER BY e.event_id) AS events
FROM quota.api_key k JOIN quota.event e ON e.key_id = k.key_id AND e.kind <> 'reservation_expired'
WHERE k.key_id IN (:tw_s, :tw_c) GROUP BY k.name ORDER BY k.name DESC;
SELECT request_id, settled_by, input_tokens, output_tokens, cost, billed, counted_amount
FROM quota.usage_ledger WHERE request_id IN ('tw-s', 'tw-c') ORDER BY request_id DESC;
SELECT k.name, d.requests, d.input_tokens, d.output_tokens, d.cost
FROM quota.usage_daily d JOIN quota.api_key k ON k.key_id = d.key_id WHERE d.key_id IN (:tw_s, :tw_c)
ORDER BY k.name DESC;

SELECT count(*) AS drifting_counters FROM quota.drift();
ROLLBACK;
