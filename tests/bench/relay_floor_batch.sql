-- The relay's floor for batching (scripts/bench-relay.sh), in a database of its own after
-- relay_floor.sql: quota.admit_many and quota.settle_many call the engine floor's
-- bench_floor.admit_many and settle_many (floor_setup.sql), one row per item, all admitted and
-- billed; and quota.admit and quota.settle become batches of one of them, as the engine's single
-- calls are. (A batching relay sends a lone call as a single call: the floor's single settle
-- writes the rollup before the counter, its batches the counter first, and the two deadlocked.)
-- A relay that batches in front of this database shows the most that batching through this
-- relay can give on this machine, whatever the engine.
CREATE OR REPLACE FUNCTION quota.admit(api_key text, request_id text, model text, est_input_tokens bigint,
                                       max_output_tokens bigint, channel_id bigint DEFAULT NULL)
RETURNS quota.admission LANGUAGE plpgsql AS $$
DECLARE
    k bigint := 1 + abs(hashtext(api_key)) % 1000;  -- a counter of floor_setup.sql's 1,000
BEGIN
    PERFORM bench_floor.admit_many(ARRAY[request_id], ARRAY[k]);
    RETURN ROW(true, 200, NULL, NULL, NULL, k, k, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::quota.admission;
END
$$;

CREATE OR REPLACE FUNCTION quota.settle(request_id text, input_tokens bigint, output_tokens bigint,
                                        cached_tokens bigint DEFAULT 0)
RETURNS quota.settlement LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bench_floor.settle_many(ARRAY[settle.request_id]);
    RETURN ROW(true, true, NULL, 0.0003, false)::quota.settlement;
END
$$;

ALTER EXTENSION pg_quota DROP FUNCTION quota.admit_many(text[], text[], text[], bigint[], bigint[], bigint[]);
DROP FUNCTION quota.admit_many(text[], text[], text[], bigint[], bigint[], bigint[]);
ALTER EXTENSION pg_quota DROP FUNCTION quota.settle_many(text[], bigint[], bigint[], bigint[]);
DROP FUNCTION quota.settle_many(text[], bigint[], bigint[], bigint[]);

CREATE FUNCTION quota.admit_many(api_keys text[], request_ids text[], models text[],
                                 est_input_tokens bigint[], max_output_tokens bigint[],
                                 channel_ids bigint[] DEFAULT NULL)
RETURNS TABLE (ordinal integer, allowed boolean, http_status integer, error_code text, message text,
               retry_after_s integer, key_id bigint, user_id bigint, channel_id bigint,
               upstream_base_url text, upstream_api_key text, upstream_model text,
               ratelimit_limit numeric, ratelimit_remaining numeric, ratelimit_metric text,
               ratelimit_reset_at timestamptz, sqlstate text)
LANGUAGE plpgsql AS $$
DECLARE
    keys bigint[] := ARRAY(SELECT 1 + abs(hashtext(a)) % 1000 FROM unnest(api_keys) a);
BEGIN
    PERFORM bench_floor.admit_many(request_ids, keys);
    RETURN QUERY SELECT i::integer, true, 200, NULL::text, NULL::text, NULL::integer, keys[i], keys[i], NULL::bigint,
                        NULL::text, NULL::text, NULL::text, NULL::numeric, NULL::numeric, NULL::text,
                        NULL::timestamptz, NULL::text
                 FROM generate_subscripts(request_ids, 1) i;
END
$$;

CREATE FUNCTION quota.settle_many(request_ids text[], input_tokens bigint[], output_tokens bigint[],
                                  cached_tokens bigint[] DEFAULT NULL)
RETURNS TABLE (ordinal integer, settled boolean, billed boolean, unbilled_reason text, cost numeric,
               replay boolean, sqlstate text, message text)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bench_floor.settle_many(request_ids);
    RETURN QUERY SELECT i::integer, true, true, NULL::text, 0.0003, false, NULL::text, NULL::text
                 FROM generate_subscripts(request_ids, 1) i;
END
$$;
