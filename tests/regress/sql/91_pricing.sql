-- Prices of dated snapshots and aliases; models without a price (passed unbilled, never
-- silently; or refused by pg_quota.unpriced_models = 'refuse').
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
BEGIN;
SET LOCAL pg_quota.fake_now = '2026-06-01 12:00:00+00';
INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok)
VALUES ('gpt-4o-mini', 0.15, 0.60), ('gpt-4o', 2.50, 10);
SELECT quota.create_user('mallory') AS mallory \gset
SELECT quota.create_key(:mallory, 'snapshots') AS key \gset
SELECT key_id AS kid FROM quota.api_key WHERE name = 'snapshots' \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :mallory, 'cost', 'day', 0.0000001) RETURNING policy_id AS pol \gset

-- The exploit as it was reported: the base model is refused, and its dated snapshot must be
-- refused too (it used to pass, settled unbilled with price_not_found, cost 0).
SELECT http_status, error_code FROM quota.admit(:'key', 'pr-p1', 'gpt-4o-mini', 100, 100);
SELECT http_status, error_code FROM quota.admit(:'key', 'pr-p2', 'gpt-4o-mini-2024-07-18', 100, 100);

-- With room, the snapshot is held and charged at the base model's price.
UPDATE quota.policy SET quota_limit = 10 WHERE policy_id = :pol;
SELECT allowed FROM quota.admit(:'key', 'pr-p3', 'gpt-4o-mini-2024-07-18', 1000000, 1000000);
SELECT reserved FROM quota.status(:kid);
SELECT * FROM quota.settle('pr-p3', 1000000, 0);
SELECT model, billed, unbilled_reason, cost FROM quota.usage_ledger WHERE request_id = 'pr-p3';

-- The rule: an exact price; else an alias (quota.model_alias); else the longest priced model
-- that the name starts with, followed by '-', '@' or ':'.
SELECT m AS model, quota.price_model(m) AS priced_as
FROM unnest(ARRAY['gpt-4o-mini', 'gpt-4o-2024-08-06', 'gpt-4o-mini-2024-07-18', 'gpt-4o-mini@2024-07-18',
                  'gpt-4o:extended', 'gpt-4o-minix', 'gpt-4', 'my-mini', 'llama-local']) m;
INSERT INTO quota.model_alias (alias, model) VALUES ('my-mini', 'gpt-4o-mini');
SELECT quota.price_model('my-mini') AS my_mini_priced_as;
SELECT allowed FROM quota.admit(:'key', 'pr-p4', 'my-mini', 1000000, 0);
SELECT billed, cost FROM quota.settle('pr-p4', 1000000, 0);
-- GET /v1/models lists an alias beside the models it can call.
SELECT model FROM quota.models(:'key') WHERE model IN ('my-mini', 'gpt-4o-mini') ORDER BY model;
-- A snapshot also counts in the model group of the model it is priced as.
SELECT quota.create_model_group('frontier', ARRAY['gpt-4o']) AS frontier \gset
INSERT INTO quota.policy (subject_type, subject_id, model_group, metric, period, quota_limit)
VALUES ('user', :mallory, :frontier, 'tokens', 'day', 1000);
SELECT model_group, metric FROM quota.status(:kid, 'gpt-4o-2024-08-06') ORDER BY policy_id;
SELECT http_status, error_code FROM quota.admit(:'key', 'pr-p5', 'gpt-4o-2024-08-06', 1000, 1000);
-- A price of its own takes the snapshot out of gpt-4o's group, from the next request on.
INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok) VALUES ('gpt-4o-2024-08-06', 2.50, 10);
SELECT http_status, error_code FROM quota.admit(:'key', 'pr-p6', 'gpt-4o-2024-08-06', 1000, 1000);
SELECT quota.refund('pr-p6');
-- An alias must name a priced model.
SAVEPOINT a;
INSERT INTO quota.model_alias (alias, model) VALUES ('mystery', 'no-such-price');
ROLLBACK TO a;

-- A model with no price at all passes unbilled (seed 001), counted on request and token
-- policies; the first such request of a model each day is logged with the model and the key.
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :mallory, 'requests', 'day', 100);
SELECT allowed, http_status FROM quota.admit(:'key', 'pr-u1', 'llama-local', 10, 10);
SELECT billed, unbilled_reason, cost FROM quota.settle('pr-u1', 10, 10);
SELECT allowed FROM quota.admit(:'key', 'pr-u2', 'llama-local', 10, 10);
SELECT billed, unbilled_reason FROM quota.settle('pr-u2', 10, 10);
SELECT at, key_id = :kid AS by_key, detail ->> 'model' AS model
FROM quota.event WHERE kind = 'unpriced_model' AND user_id = :mallory ORDER BY event_id;
-- status shows how many of the key's requests in each window were not billed
SELECT metric, used, unbilled_requests FROM quota.status(:kid) ORDER BY policy_id;
-- The next day the first one is logged again.
SET LOCAL pg_quota.fake_now = '2026-06-02 00:00:01+00';
SELECT allowed FROM quota.admit(:'key', 'pr-u3', 'llama-local', 10, 10);
SELECT settled FROM quota.settle('pr-u3', 10, 10);
SELECT count(*) AS unpriced_events FROM quota.event WHERE kind = 'unpriced_model' AND user_id = :mallory;

-- pg_quota.unpriced_models = 'refuse': a key that a cost policy applies to is refused an
-- unpriced model, 400 model_not_priced, naming the model.
SET LOCAL pg_quota.unpriced_models = 'refuse';
SELECT allowed, http_status, error_code, message FROM quota.admit(:'key', 'pr-u4', 'llama-local', 10, 10);
SELECT allowed FROM quota.admit(:'key', 'pr-u5', 'gpt-4o-mini-2024-07-18', 10, 10);
-- A key that no cost policy applies to still passes, unbilled.
SELECT quota.create_user('trent') AS trent \gset
SELECT quota.create_key(:trent, 'no-cost-policy') AS tkey \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :trent, 'requests', 'day', 100);
SELECT allowed FROM quota.admit(:'tkey', 'pr-u6', 'llama-local', 10, 10);
-- ... unless the channel it is routed to has a cost cap.
INSERT INTO quota.channel (name, base_url, api_key) VALUES ('local', 'http://127.0.0.1:9/v1', 'sk-local')
RETURNING channel_id AS local \gset
INSERT INTO quota.channel_model (channel_id, model) VALUES (:local, 'llama-local');
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('channel', :local, 'cost', 'day', 5);
SELECT allowed, http_status, error_code FROM quota.admit(:'tkey', 'pr-u7', 'llama-local', 10, 10);
SET LOCAL pg_quota.unpriced_models = 'allow';
SELECT allowed, channel_id = :local AS routed FROM quota.admit(:'tkey', 'pr-u8', 'llama-local', 10, 10);
SAVEPOINT b;
SET LOCAL pg_quota.unpriced_models = 'nonsense';
ROLLBACK TO b;

SELECT count(*) AS drifting_counters FROM quota.drift();
ROLLBACK;
