-- The relay's floor (scripts/bench-relay.sh): a database in which quota.admit and quota.settle
-- make only the row writes of this data model, as the engine's floor does (floor_setup.sql,
-- run before this file), on the same copies of the engine's tables. No key lookup, policy
-- selection, window math, pricing or checks: admit files the reservation and adds the hold to
-- one counter; settle removes the reservation, writes the ledger row (its trigger upserts the
-- day's rollup) and moves the hold to usage. The relay runs its own code unchanged against
-- it, so a relay in front of this database adds the least latency that any engine of this data
-- model could give it, with durable commits.
ALTER EXTENSION pg_quota DROP FUNCTION quota.admit(text, text, text, bigint, bigint, bigint);
DROP FUNCTION quota.admit(text, text, text, bigint, bigint, bigint);
ALTER EXTENSION pg_quota DROP FUNCTION quota.settle(text, bigint, bigint, bigint);
DROP FUNCTION quota.settle(text, bigint, bigint, bigint);

CREATE FUNCTION quota.admit(api_key text, request_id text, model text, est_input_tokens bigint,
                            max_output_tokens bigint, channel_id bigint DEFAULT NULL)
RETURNS quota.admission LANGUAGE plpgsql AS $$
DECLARE
    k bigint := 1 + abs(hashtext(api_key)) % 1000;  -- a counter of floor_setup.sql's 1,000
BEGIN
    INSERT INTO bench_floor.reservation (request_id, key_id, user_id, channel_id, model,
        counted_in_key_global, counted_in_user_global, est_input_tokens, max_output_tokens,
        hold_policy, hold_scope, hold_amount, hold_limit, created_at)
    VALUES (request_id, k, k, NULL, model, true, true, est_input_tokens, max_output_tokens,
            ARRAY[1], ARRAY[k], ARRAY[0.0003], ARRAY[1000000000], now());
    UPDATE bench_floor.counter c SET reserved = c.reserved + 0.0003 WHERE c.policy_id = 1 AND c.scope_id = k;
    RETURN ROW(true, 200, NULL, NULL, NULL, k, k, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::quota.admission;
END
$$;

CREATE FUNCTION quota.settle(request_id text, input_tokens bigint, output_tokens bigint,
                             cached_tokens bigint DEFAULT 0)
RETURNS quota.settlement LANGUAGE plpgsql AS $$
DECLARE
    v bench_floor.reservation;
BEGIN
    DELETE FROM bench_floor.reservation r WHERE r.request_id = settle.request_id RETURNING * INTO v;
    INSERT INTO bench_floor.usage_ledger (request_id, key_id, user_id, channel_id, model, input_tokens,
        output_tokens, cached_tokens, cost, billed, unbilled_reason, counted_in_key_global,
        counted_in_user_global, counted_policy, counted_scope, counted_window, counted_amount, settled_at)
    VALUES (request_id, v.key_id, v.user_id, NULL, v.model, input_tokens, output_tokens, cached_tokens,
            0.0003, true, NULL, true, true, ARRAY[1], v.hold_scope, ARRAY[date_trunc('day', now())],
            ARRAY[0.0003], now());
    UPDATE bench_floor.counter c SET used = c.used + 0.0003, reserved = c.reserved - 0.0003
    WHERE c.policy_id = 1 AND c.scope_id = v.key_id;
    RETURN ROW(true, true, NULL, 0.0003, false)::quota.settlement;
END
$$;
