-- Batched admission and settlement: quota.admit_many / quota.settle_many answer one row per
-- item, in order, each item seeing the holds of the ones before it; an item's bad input is its
-- own row (SQLSTATE and message), never an error for the others.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
BEGIN;
SET LOCAL pg_quota.fake_now = '2026-07-01 12:00:00+00';
INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok) VALUES ('gpt-b', 1, 1);
SELECT quota.create_user('batcher') AS batcher \gset
SELECT quota.create_key(:batcher, 'batch') AS key \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, boundary)
VALUES ('user', :batcher, 'requests', 'day', 3, 'strict');

-- Item 3 repeats item 1's id, item 4 has an unknown key, item 5 a negative count; items 1, 2
-- and 6 fill the limit of 3 in order, so item 7 is refused.
SELECT ordinal, allowed, http_status, error_code, sqlstate, message, ratelimit_remaining
FROM quota.admit_many(ARRAY[:'key', :'key', :'key', 'sk-nope', :'key', :'key', :'key'],
                      ARRAY['bt1', 'bt2', 'bt1', 'bt4', 'bt5', 'bt6', 'bt7'],
                      array_fill('gpt-b'::text, ARRAY[7]),
                      ARRAY[10, 10, 10, 10, 10, 10, 10]::bigint[],
                      ARRAY[5, 5, 5, 5, -1, 5, 5]::bigint[]);
SELECT used, reserved FROM quota.status((SELECT key_id FROM quota.api_key WHERE name = 'batch'));
-- An id of an earlier batch: a retry with the same arguments gets its decision back.
SELECT ordinal, allowed, http_status, sqlstate FROM quota.admit_many(ARRAY[:'key'], ARRAY['bt2'],
       ARRAY['gpt-b'], ARRAY[10]::bigint[], ARRAY[5]::bigint[]);

-- Settling: an unknown id and a bad count are their own rows; a repeated id is a replay.
SELECT ordinal, settled, billed, cost, replay, sqlstate, message
FROM quota.settle_many(ARRAY['bt1', 'bt2', 'nope', 'bt6', 'bt1'], ARRAY[10, 10, 1, -5, 10]::bigint[],
                       ARRAY[5, 5, 1, 1, 5]::bigint[]);
SELECT ordinal, settled, cost, replay, sqlstate FROM quota.settle_many(ARRAY['bt6'], ARRAY[20]::bigint[], ARRAY[5]::bigint[], ARRAY[4]::bigint[]);
SELECT used, reserved FROM quota.status((SELECT key_id FROM quota.api_key WHERE name = 'batch'));
SELECT count(*) AS reservations_left FROM quota.reservation WHERE request_id LIKE 'bt%';
SELECT * FROM quota.drift();

-- Arrays of different lengths refuse the whole call.
SAVEPOINT lengths;
SELECT * FROM quota.settle_many(ARRAY['a', 'b'], ARRAY[1]::bigint[], ARRAY[1, 1]::bigint[]);
ROLLBACK TO SAVEPOINT lengths;
-- The relay role may run them.
SELECT has_function_privilege('quota_relay', 'quota.admit_many(text[], text[], text[], bigint[], bigint[], bigint[])', 'EXECUTE')
   AND has_function_privilege('quota_relay', 'quota.settle_many(text[], bigint[], bigint[], bigint[])', 'EXECUTE') AS relay_may;
ROLLBACK;
