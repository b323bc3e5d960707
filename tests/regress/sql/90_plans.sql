-- A connection keeps the lifecycle's plans for its lifetime. Plans made on a fresh install,
-- whose tables were analyzed while empty, must not read those tables in full once they have
-- grown: every lifecycle statement is a keyed lookup.
DROP DATABASE IF EXISTS pgq_regress_plans;
CREATE DATABASE pgq_regress_plans;
\c pgq_regress_plans
SET client_min_messages = warning;
CREATE EXTENSION pg_quota;
RESET client_min_messages;
-- no ANALYZE behind the test's back
ALTER TABLE quota.usage_ledger_default SET (autovacuum_enabled = false);
ALTER TABLE quota.ledger_request SET (autovacuum_enabled = false);
ALTER TABLE quota.reservation SET (autovacuum_enabled = false);
ALTER TABLE quota.released SET (autovacuum_enabled = false);
ALTER TABLE quota.counter SET (autovacuum_enabled = false);
ALTER TABLE quota.app_user SET (autovacuum_enabled = false);
ALTER TABLE quota.policy SET (autovacuum_enabled = false);
INSERT INTO quota.model_price VALUES ('gpt-plan', 1, 2, NULL);
SELECT quota.create_user('paula') AS paula \gset
SELECT quota.create_key(:paula, 'plans') AS key \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :paula, 'cost', 'day', 1000000);
VACUUM ANALYZE;
-- The first calls make the plans, while the ledger (its default partition, which takes the rows
-- while no upkeep has made partitions), its request ids, reservation and released are empty
-- (the batches first: their plans are made while no reservation was ever filed).
SELECT count(*) FILTER (WHERE allowed) AS admitted FROM quota.admit_many(ARRAY[:'key', :'key'], ARRAY['plan-b0', 'plan-b1'],
       ARRAY['gpt-plan', 'gpt-plan'], ARRAY[1, 1]::bigint[], ARRAY[1, 1]::bigint[]);
SELECT count(*) FILTER (WHERE settled) AS settled FROM quota.settle_many(ARRAY['plan-b0', 'plan-b1'], ARRAY[1, 1]::bigint[],
       ARRAY[1, 1]::bigint[]);
SELECT allowed FROM quota.admit(:'key', 'plan-0', 'gpt-plan', 1, 1);
SELECT settled FROM quota.settle('plan-0', 1, 1);
SELECT allowed FROM quota.admit(:'key', 'plan-r0', 'gpt-plan', 1, 1);
SELECT quota.refund('plan-r0');
-- Each of them grows by 5,000 rows (the ledger's request ids with it).
INSERT INTO quota.usage_ledger (request_id, key_id, user_id, model, input_tokens, output_tokens, cached_tokens,
                                cost, billed, counted_policy, counted_scope, counted_window, counted_amount,
                                settled_at)
SELECT 'plan-bulk-' || i, k.key_id, k.user_id, 'gpt-plan', 1, 1, 0, 0, true, '{}', '{}', '{}', '{}', now()
FROM generate_series(1, 5000) i, quota.api_key k;
INSERT INTO quota.reservation (request_id, key_id, user_id, model, counted_in_key_global, counted_in_user_global,
                               est_input_tokens, max_output_tokens, hold_policy, hold_scope, hold_amount,
                               hold_limit, created_at)
SELECT 'plan-open-' || i, k.key_id, k.user_id, 'gpt-plan', true, true, 0, 0, '{}', '{}', '{}', '{}', now()
FROM generate_series(1, 5000) i, quota.api_key k;
INSERT INTO quota.released (request_id, kind, key_id, user_id, model, released_at)
SELECT 'plan-gone-' || i, 'refunded', k.key_id, k.user_id, 'gpt-plan', now()
FROM generate_series(1, 5000) i, quota.api_key k;
-- (and the users and counters, the counters by 5,000 scopes paula's policy does not cover)
INSERT INTO quota.app_user (name) SELECT 'plan-user-' || i FROM generate_series(1, 5000) i;
INSERT INTO quota.counter (policy_id, scope_id, window_start, used)
SELECT p.policy_id, 2000000 + i, date_trunc('day', now()), 0 FROM generate_series(1, 5000) i, quota.policy p;
-- (and the policies, one for each of those users)
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
SELECT 'user', u.user_id, 'requests', 'day', 10 FROM quota.app_user u WHERE u.name LIKE 'plan-user-%';
SELECT pg_stat_force_next_flush();
-- (kept in psql variables: a temporary table would change the search path, and that alone
-- makes every kept plan again)
SELECT string_agg(relname || '=' || seq_scan, ',' ORDER BY relname) AS scans_before FROM pg_stat_user_tables
WHERE relname IN ('usage_ledger_default', 'ledger_request', 'reservation', 'released') \gset
SELECT string_agg(indexrelname || '=' || idx_tup_read, ',' ORDER BY indexrelname) AS reads_before
FROM pg_stat_user_indexes WHERE relname IN ('app_user', 'counter', 'ledger_request', 'policy', 'reservation', 'released') \gset
SELECT allowed FROM quota.admit(:'key', 'plan-1', 'gpt-plan', 1, 1);
SELECT settled FROM quota.settle('plan-1', 1, 1);
SELECT allowed FROM quota.admit(:'key', 'plan-2', 'gpt-plan', 1, 1);
SELECT settled FROM quota.settle('plan-2', 1, 1);
SELECT quota.refund('plan-1');
SELECT allowed FROM quota.admit(:'key', 'plan-r1', 'gpt-plan', 1, 1);
SELECT quota.refund('plan-r1');
SELECT pg_stat_force_next_flush();
-- Full reads of the grown tables by those calls: none.
SELECT s.relname, s.seq_scan - split_part(b, '=', 2)::bigint AS full_scans
FROM pg_stat_user_tables s JOIN unnest(string_to_array(:'scans_before', ',')) b ON split_part(b, '=', 1) = s.relname
ORDER BY 1;
-- Batches of them too.
SELECT count(*) FILTER (WHERE allowed) AS admitted FROM quota.admit_many(
       array_fill(:'key'::text, ARRAY[8]), ARRAY(SELECT 'plan-b-' || i FROM generate_series(1, 8) i),
       array_fill('gpt-plan'::text, ARRAY[8]), array_fill(1::bigint, ARRAY[8]), array_fill(1::bigint, ARRAY[8]));
SELECT count(*) FILTER (WHERE settled) AS settled FROM quota.settle_many(
       ARRAY(SELECT 'plan-b-' || i FROM generate_series(1, 8) i), array_fill(1::bigint, ARRAY[8]),
       array_fill(1::bigint, ARRAY[8]));
SELECT pg_stat_force_next_flush();
-- The lifecycle's functions forbid sequential scans, so a plan that walks a whole table does it
-- through an index: by the single calls and batches since the tables grew, a handful of index
-- entries are read per call and index, not thousands.
SELECT s.indexrelname, s.idx_tup_read - split_part(b, '=', 2)::bigint < 100 AS keyed_reads
FROM pg_stat_user_indexes s JOIN unnest(string_to_array(:'reads_before', ',')) b ON split_part(b, '=', 1) = s.indexrelname
ORDER BY 1;
-- The sweep finds the suspensions that ran out without reading every key.
INSERT INTO quota.api_key (user_id, name, public_id, secret_hash)
SELECT k.user_id, 'many', 'plan' || lpad(i::text, 8, '0'), '\x00' FROM generate_series(1, 5000) i, quota.api_key k;
UPDATE quota.api_key SET suspended_until = now() - interval '1 second' WHERE public_id = 'plan00000042';
ANALYZE quota.api_key;
SELECT pg_stat_force_next_flush();
SELECT seq_scan AS key_scans_before FROM pg_stat_user_tables WHERE relname = 'api_key' \gset
SELECT resumed_keys FROM quota.sweep();
SELECT pg_stat_force_next_flush();
SELECT seq_scan - :key_scans_before AS full_scans_of_api_key FROM pg_stat_user_tables WHERE relname = 'api_key';
-- It finds the spent windows that have ended without reading every counter: of 5,000 counters,
-- one is marked spent in yesterday's window.
INSERT INTO quota.counter (policy_id, scope_id, window_start, used)
SELECT p.policy_id, 1000000 + i, date_trunc('day', now()), 1 FROM generate_series(1, 5000) i, quota.policy p
WHERE p.subject_type = 'user' AND p.subject_id = :paula;
UPDATE quota.counter SET exhausted_at = now() - interval '1 day' WHERE scope_id = 1000042;
ANALYZE quota.counter;
SELECT pg_stat_force_next_flush();
SELECT seq_scan AS counter_scans_before FROM pg_stat_user_tables WHERE relname = 'counter' \gset
SELECT recovered_windows FROM quota.sweep();
SELECT pg_stat_force_next_flush();
SELECT seq_scan - :counter_scans_before AS full_scans_of_counter FROM pg_stat_user_tables WHERE relname = 'counter';
-- quota.drift reads the ledger of the current windows only, not a year of history.
INSERT INTO quota.usage_ledger (request_id, key_id, user_id, model, input_tokens, output_tokens, cached_tokens,
                                cost, billed, counted_policy, counted_scope, counted_window, counted_amount,
                                settled_at)
SELECT 'plan-old-' || i, k.key_id, k.user_id, 'gpt-plan', 1, 1, 0, 0, true, '{}', '{}', '{}', '{}',
       now() - interval '400 days' + i * interval '10 min'
FROM generate_series(1, 50000) i, quota.api_key k WHERE k.name = 'plans';
VACUUM ANALYZE quota.usage_ledger;
SELECT pg_stat_force_next_flush();
SELECT seq_scan AS ledger_scans_before FROM pg_stat_user_tables WHERE relname = 'usage_ledger_default' \gset
SELECT count(*) AS drifting_counters FROM quota.drift() WHERE scope_id < 1000000;
SELECT pg_stat_force_next_flush();
SELECT seq_scan - :ledger_scans_before AS full_scans_of_ledger FROM pg_stat_user_tables WHERE relname = 'usage_ledger_default';
-- A policy has one window at any instant, and the planner is told so: its default guess for a
-- set-returning function, 1,000 rows a call, made queries over many policies look costly enough
-- to JIT-compile (quota.drift went from 50 ms to 1.5 s). (Last in this file: the temporary
-- function changes the search path, which makes every kept plan again.)
CREATE FUNCTION pg_temp.estimated_rows(query text) RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    plan json;
BEGIN
    EXECUTE 'EXPLAIN (FORMAT JSON) ' || query INTO plan;
    RETURN (plan -> 0 -> 'Plan' ->> 'Plan Rows')::bigint;
END
$$;
ANALYZE quota.policy;
SELECT pg_temp.estimated_rows($$SELECT * FROM quota.window_bounds('day', NULL, 'fixed', now(), 'UTC', 1, 0, now())$$)
       AS window_bounds_rows,
       pg_temp.estimated_rows($$SELECT w.* FROM quota.policy p, quota.policy_window(p, now()) w$$) AS policy_window_rows,
       (SELECT count(*) FROM quota.policy) AS policies;
\c pgq_regress
DROP DATABASE pgq_regress_plans;
