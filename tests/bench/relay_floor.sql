-- The relay's floor (scripts/bench-relay.sh): a database in which quota.admit and quota.settle
-- make only the row writes of this data model, by calling the engine floor's bench_floor.admit
-- and bench_floor.settle (floor_setup.sql, run before this file). No key lookup, policy
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
    PERFORM bench_floor.admit(request_id, k);
    RETURN ROW(true, 200, NULL, NULL, NULL, k, k, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL)::quota.admission;
END
$$;

-- (After the reply: its cost is not on the relay's latency path.)
CREATE FUNCTION quota.settle(request_id text, input_tokens bigint, output_tokens bigint,
                             cached_tokens bigint DEFAULT 0)
RETURNS quota.settlement LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bench_floor.settle(settle.request_id, r.key_id)
    FROM bench_floor.reservation r WHERE r.request_id = settle.request_id;
    RETURN ROW(true, true, NULL, 0.0003, false)::quota.settlement;
END
$$;
