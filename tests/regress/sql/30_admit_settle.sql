-- admit / settle / refund: strict vs graceful boundary, idempotency, unbilled paths.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
BEGIN;
SET LOCAL pg_quota.fake_now = '2026-05-01 12:00:00+00';
INSERT INTO quota.model_price VALUES ('gpt-x', 2, 8, 1), ('free-model', 0, 0, NULL);
SELECT quota.create_user('carol') AS carol \gset
SELECT quota.create_key(:carol, 'strict') AS key \gset
-- $0.01 a day, strict. A request estimated at 1000 in + 500 out costs $0.006.
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, boundary)
VALUES ('user', :carol, 'cost', 'day', 0.01, 'strict') RETURNING policy_id AS pol \gset

SELECT allowed, ratelimit_metric, ratelimit_limit, ratelimit_remaining, ratelimit_reset_at
FROM quota.admit(:'key', 's1', 'gpt-x', 1000, 500);
-- A second one would reach $0.012 with the first still in flight: strict refuses it up front.
SELECT allowed, http_status, error_code, retry_after_s, message
FROM quota.admit(:'key', 's2', 'gpt-x', 1000, 500);
-- The client message names no amounts.
SELECT message !~ '[0-9]\.[0-9]|0\.01|\$' AS message_has_no_amounts
FROM quota.admit(:'key', 's2b', 'gpt-x', 1000, 500);
SELECT used, reserved, remaining, state FROM quota.status((SELECT key_id FROM quota.api_key WHERE name = 'strict'));
-- Settle the actual usage (less than the estimate): the hold is replaced by the real cost.
SELECT * FROM quota.settle('s1', 1000, 200, 400);
SELECT used, reserved, remaining FROM quota.status((SELECT key_id FROM quota.api_key WHERE name = 'strict'));
-- Settling again changes nothing and gives the same answer.
SELECT * FROM quota.settle('s1', 99999, 99999);
SELECT count(*) AS ledger_rows, sum(cost) AS spent FROM quota.usage_ledger WHERE request_id = 's1';
-- Now $0.0032 is used; a $0.006 request fits exactly within the rest? 0.0032 + 0.006 <= 0.01: yes.
SELECT allowed FROM quota.admit(:'key', 's3', 'gpt-x', 1000, 500);
SELECT * FROM quota.settle('s3', 1000, 500);
-- $0.0092 used: the next estimate of $0.006 would overshoot, a tiny one still fits.
SELECT allowed FROM quota.admit(:'key', 's4', 'gpt-x', 1000, 500);
SELECT allowed FROM quota.admit(:'key', 's5', 'gpt-x', 100, 50);

-- Refund: releases the hold, is idempotent, and never releases twice.
SELECT reserved FROM quota.status((SELECT key_id FROM quota.api_key WHERE name = 'strict'));
SELECT quota.refund('s5', 'upstream 500') AS first, quota.refund('s5') AS second;
SELECT reserved FROM quota.status((SELECT key_id FROM quota.api_key WHERE name = 'strict'));
SELECT kind, reason FROM quota.released WHERE request_id = 's5';
\set VERBOSITY sqlstate
SAVEPOINT a;
SELECT quota.refund('s1');           -- settled: refused
ROLLBACK TO a;
SELECT * FROM quota.settle('s5', 1, 1); -- refunded: cannot be settled
ROLLBACK TO a;
SELECT * FROM quota.settle('nope', 1, 1);
ROLLBACK TO a;
SELECT quota.refund('nope');
ROLLBACK TO a;
SELECT * FROM quota.admit(:'key', 's1', 'gpt-x', 1, 1); -- a used request id cannot be admitted again
ROLLBACK TO a;
\set VERBOSITY default

-- Graceful: the request in flight may finish past the limit; the next one is blocked.
SELECT quota.create_user('dave') AS dave \gset
SELECT quota.create_key(:dave, 'graceful') AS gkey \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, boundary)
VALUES ('key', (SELECT key_id FROM quota.api_key WHERE name = 'graceful'), 'tokens', 'day', 1000, 'graceful');
SELECT allowed FROM quota.admit(:'gkey', 'g1', 'gpt-x', 900, 5000);   -- estimate far above: graceful admits
SELECT * FROM quota.settle('g1', 900, 300);                          -- 1200 of 1000: exhausted
SELECT allowed, error_code, message FROM quota.admit(:'gkey', 'g2', 'gpt-x', 1, 1);
SELECT used, state FROM quota.status((SELECT key_id FROM quota.api_key WHERE name = 'graceful'));
SELECT kind FROM quota.event WHERE key_id = (SELECT key_id FROM quota.api_key WHERE name = 'graceful') ORDER BY event_id;
-- The same estimate under strict would have been refused up front.
UPDATE quota.policy SET boundary = 'strict', quota_limit = 5000 WHERE subject_type = 'key'
  AND subject_id = (SELECT key_id FROM quota.api_key WHERE name = 'graceful');
SELECT allowed, error_code FROM quota.admit(:'gkey', 'g3', 'gpt-x', 900, 5000);

-- Unbilled: a model without a price passes cost policies and is recorded with the reason;
-- missing usage likewise. Neither blocks the request.
SELECT quota.create_user('erin') AS erin \gset
SELECT quota.create_key(:erin, 'unbilled') AS ukey \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :erin, 'cost', 'day', 0.000001), ('user', :erin, 'requests', 'day', 10);
SELECT allowed FROM quota.admit(:'ukey', 'u1', 'no-price-model', 100000, 100000);
SELECT * FROM quota.settle('u1', 100000, 100000);
SELECT allowed FROM quota.admit(:'ukey', 'u2', 'gpt-x', 0, 0);
SELECT * FROM quota.settle('u2', NULL, NULL);
SELECT request_id, billed, unbilled_reason, cost, counted_amount FROM quota.usage_ledger
WHERE user_id = :erin ORDER BY request_id;
SELECT metric, used FROM quota.status((SELECT key_id FROM quota.api_key WHERE name = 'unbilled'));
-- A price of zero is a real price: billed, cost 0.
SELECT allowed FROM quota.admit(:'ukey', 'u3', 'free-model', 10, 10);
SELECT * FROM quota.settle('u3', 10, 10);

-- After all of it, counters equal what the ledger and live holds say.
SELECT count(*) AS drifting_counters FROM quota.drift();
ROLLBACK;
