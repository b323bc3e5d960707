-- A retried admit: a relay that lost its connection during admit does not know whether it
-- committed, so it runs it again with the same request id. The same key and arguments get the
-- original decision back (the reservation already holds, nothing is held twice); other
-- arguments, or a request already settled or refunded, are still refused.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
BEGIN;
SET LOCAL pg_quota.fake_now = '2026-07-01 12:00:00+00';
INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok) VALUES ('gpt-r', 1, 1);
INSERT INTO quota.channel (name, base_url, api_key) VALUES ('retry-up', 'https://up.example/v1', 'sk-up')
RETURNING channel_id AS up \gset
INSERT INTO quota.channel_model (channel_id, model, upstream_model) VALUES (:up, 'gpt-r', 'gpt-r-2026');
SELECT quota.create_user('retrier') AS retrier \gset
SELECT quota.create_key(:retrier, 'retry') AS key \gset
SELECT quota.create_key(:retrier, 'other') AS other \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :retrier, 'tokens', 'day', 10000);

SELECT allowed, http_status, channel_id = :up AS routed, upstream_base_url, upstream_model
FROM quota.admit(:'key', 'r1', 'gpt-r', 1000, 500);
-- The same admit again: the original decision, and the reservation is held once.
SELECT allowed, http_status, channel_id = :up AS routed, upstream_base_url, upstream_api_key, upstream_model
FROM quota.admit(:'key', 'r1', 'gpt-r', 1000, 500);
-- Naming the channel it was routed to is the same request too, for a key that may pin it.
INSERT INTO quota.channel_grant (channel_id, subject_type, subject_id)
VALUES (:up, 'key', (SELECT key_id FROM quota.api_key WHERE name = 'retry'));
SELECT allowed, channel_id = :up AS routed FROM quota.admit(:'key', 'r1', 'gpt-r', 1000, 500, :up);
SELECT count(*) AS reservations FROM quota.reservation WHERE request_id = 'r1';
SELECT used, reserved FROM quota.status((SELECT key_id FROM quota.api_key WHERE name = 'retry'));

-- The same request id with anything else is a reused id, refused (PQ409).
\set VERBOSITY sqlstate
SAVEPOINT a;
SELECT * FROM quota.admit(:'key', 'r1', 'gpt-r', 1001, 500);    -- another estimate
ROLLBACK TO a;
SELECT * FROM quota.admit(:'key', 'r1', 'gpt-r', 1000, 499);    -- another output limit
ROLLBACK TO a;
SELECT * FROM quota.admit(:'key', 'r1', 'gpt-x', 1000, 500);    -- another model
ROLLBACK TO a;
SELECT * FROM quota.admit(:'other', 'r1', 'gpt-r', 1000, 500);  -- another key
ROLLBACK TO a;
SELECT * FROM quota.admit(:'key', 'r1', 'gpt-r', 1000, 500, :up + 1000);  -- another channel
ROLLBACK TO a;
\set VERBOSITY default
-- An unknown key is still a 401, whatever the request id.
SELECT allowed, http_status, error_code FROM quota.admit('sk-nope', 'r1', 'gpt-r', 1000, 500);

-- A retry stands by the original decision even when the key was disabled in between: the
-- client was admitted and its reservation holds (refusing now would leave it to the sweep).
UPDATE quota.api_key SET enabled = false WHERE name = 'retry';
SELECT allowed, http_status FROM quota.admit(:'key', 'r1', 'gpt-r', 1000, 500);
SELECT allowed, http_status, error_code FROM quota.admit(:'key', 'r2', 'gpt-r', 1000, 500);
UPDATE quota.api_key SET enabled = true WHERE name = 'retry';

-- Once settled (or refunded), the request is over: admitting it again is refused.
SELECT settled, billed, cost FROM quota.settle('r1', 800, 300);
\set VERBOSITY sqlstate
SAVEPOINT b;
SELECT * FROM quota.admit(:'key', 'r1', 'gpt-r', 1000, 500);
ROLLBACK TO b;
\set VERBOSITY default
SELECT allowed FROM quota.admit(:'key', 'r3', 'gpt-r', 10, 10);
SELECT quota.refund('r3') AS refunded;
\set VERBOSITY sqlstate
SAVEPOINT c;
SELECT * FROM quota.admit(:'key', 'r3', 'gpt-r', 10, 10);
ROLLBACK TO c;
\set VERBOSITY default
SELECT used, reserved FROM quota.status((SELECT key_id FROM quota.api_key WHERE name = 'retry'));
SELECT count(*) AS ledger_rows FROM quota.usage_ledger WHERE request_id = 'r1';
SELECT count(*) AS drifting_counters FROM quota.drift();
ROLLBACK;
