-- The floor of this data model: the row writes of one admit+settle pair and nothing else (no
-- key lookup, policy selection, window math, pricing, idempotency or exhaustion checks). Copies
-- of the engine's tables, with their constraints and indexes, and the ledger's triggers (the
-- day's rollup, the request ids):
--   admit:  insert the reservation row; add the hold to the counter
--   settle: delete the reservation row; insert the ledger row (its triggers upsert the day's
--           rollup and file its request id); move the hold to the counter's usage
-- The counter is written with a plain UPDATE, the cheapest form (the engine upserts, which
-- also creates a scope's first counter row). So a pair can only approach this figure: the
-- distance between the two is the engine's own work.
CREATE SCHEMA bench_floor;
CREATE TABLE bench_floor.reservation (LIKE quota.reservation INCLUDING ALL);
CREATE TABLE bench_floor.counter (LIKE quota.counter INCLUDING ALL) WITH (fillfactor = 70);
CREATE TABLE bench_floor.usage_ledger (LIKE quota.usage_ledger INCLUDING ALL);
CREATE TRIGGER usage_daily_add AFTER INSERT ON bench_floor.usage_ledger
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION quota.usage_daily_add();
-- The ledger is partitioned: LIKE copies none of its partitions' indexes, which the upkeep
-- makes (quota.maintain_ledger), nor the table of its request ids that its trigger fills.
CREATE INDEX ON bench_floor.usage_ledger (key_id, settled_at);
CREATE INDEX ON bench_floor.usage_ledger USING brin (settled_at) WITH (autosummarize = on);
CREATE TABLE bench_floor.ledger_request (LIKE quota.ledger_request INCLUDING ALL);
CREATE FUNCTION bench_floor.ledger_request_add() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_floor.ledger_request (request_id, settled_by, settled_at, billed, unbilled_reason, cost)
    SELECT n.request_id, n.settled_by, n.settled_at, n.billed, n.unbilled_reason, n.cost FROM new_rows n;
    RETURN NULL;
END
$$;
CREATE TRIGGER ledger_request_add AFTER INSERT ON bench_floor.usage_ledger
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION bench_floor.ledger_request_add();
INSERT INTO bench_floor.counter (policy_id, scope_id, window_start)
SELECT 1, k, date_trunc('day', now()) FROM generate_series(1, 1000) k;

CREATE FUNCTION bench_floor.admit(request_id text, k bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_floor.reservation (request_id, key_id, user_id, channel_id, model,
        counted_in_key_global, counted_in_user_global, est_input_tokens, max_output_tokens,
        hold_policy, hold_scope, hold_amount, hold_limit, created_at)
    VALUES (request_id, k, k, NULL, 'floor-model', true, true, 100, 100,
            ARRAY[1], ARRAY[k], ARRAY[0.0003], ARRAY[1000000000], now());
    UPDATE bench_floor.counter c SET reserved = c.reserved + 0.0003 WHERE c.policy_id = 1 AND c.scope_id = k;
    RETURN true;
END
$$;

CREATE FUNCTION bench_floor.settle(request_id text, k bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM bench_floor.reservation r WHERE r.request_id = settle.request_id;
    INSERT INTO bench_floor.usage_ledger (request_id, key_id, user_id, channel_id, model, input_tokens,
        output_tokens, cached_tokens, cost, billed, unbilled_reason, counted_in_key_global,
        counted_in_user_global, counted_policy, counted_scope, counted_window, counted_amount, settled_at)
    VALUES (request_id, k, k, NULL, 'floor-model', 100, 100, 0, 0.0003, true, NULL, true, true,
            ARRAY[1], ARRAY[k], ARRAY[date_trunc('day', now())], ARRAY[0.0003], now());
    UPDATE bench_floor.counter c SET used = c.used + 0.0003, reserved = c.reserved - 0.0003
    WHERE c.policy_id = 1 AND c.scope_id = k;
    RETURN true;
END
$$;

-- The same six row writes on bare tables (one index each, no arrays, no CHECKs, the rollup
-- upsert made inline instead of by a trigger): what any design with a reservation row, a
-- ledger row, a rollup row and a counter row costs at the least.
CREATE TABLE bench_floor.bare_reservation (request_id text PRIMARY KEY, key_id bigint NOT NULL,
                                           amount numeric NOT NULL, created_at timestamptz NOT NULL);
CREATE TABLE bench_floor.bare_ledger (request_id text PRIMARY KEY, key_id bigint NOT NULL, model text NOT NULL,
                                      input_tokens bigint NOT NULL, output_tokens bigint NOT NULL,
                                      cost numeric NOT NULL, settled_at timestamptz NOT NULL);
CREATE TABLE bench_floor.bare_daily (day date, key_id bigint, model text, requests bigint NOT NULL,
                                     cost numeric NOT NULL, PRIMARY KEY (day, key_id, model)) WITH (fillfactor = 70);
CREATE TABLE bench_floor.bare_counter (id bigint PRIMARY KEY, used numeric NOT NULL, reserved numeric NOT NULL)
    WITH (fillfactor = 70);
INSERT INTO bench_floor.bare_counter SELECT k, 0, 0 FROM generate_series(1, 1000) k;

CREATE FUNCTION bench_floor.bare_admit(request_id text, k bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_floor.bare_reservation VALUES (request_id, k, 0.0003, now());
    UPDATE bench_floor.bare_counter c SET reserved = c.reserved + 0.0003 WHERE c.id = k;
    RETURN true;
END
$$;

CREATE FUNCTION bench_floor.bare_settle(request_id text, k bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM bench_floor.bare_reservation r WHERE r.request_id = bare_settle.request_id;
    INSERT INTO bench_floor.bare_ledger VALUES (request_id, k, 'floor-model', 100, 100, 0.0003, now());
    INSERT INTO bench_floor.bare_daily AS d VALUES (current_date, k, 'floor-model', 1, 0.0003)
    ON CONFLICT (day, key_id, model) DO UPDATE SET requests = d.requests + 1, cost = d.cost + EXCLUDED.cost;
    UPDATE bench_floor.bare_counter c SET used = c.used + 0.0003, reserved = c.reserved - 0.0003 WHERE c.id = k;
    RETURN true;
END
$$;

-- The same row writes for a batch, set-based (issue 19): all reservations in one insert, each
-- counter updated once with the batch's sum, locked in id order (an ordered upsert: an UPDATE
-- ... FROM locks in join order, and batches deadlocked), all ledger rows in one insert (the
-- rollup trigger upserts once per key). What a batch of this data model costs at the least.
CREATE FUNCTION bench_floor.admit_many(request_ids text[], keys bigint[]) RETURNS integer
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO bench_floor.reservation (request_id, key_id, user_id, channel_id, model,
        counted_in_key_global, counted_in_user_global, est_input_tokens, max_output_tokens,
        hold_policy, hold_scope, hold_amount, hold_limit, created_at)
    SELECT r, k, k, NULL, 'floor-model', true, true, 100, 100,
           ARRAY[1], ARRAY[k], ARRAY[0.0003], ARRAY[1000000000], now()
    FROM unnest(request_ids, keys) AS i(r, k);
    INSERT INTO bench_floor.counter AS c (policy_id, scope_id, window_start, reserved)
    SELECT 1, k, date_trunc('day', now()), 0.0003 * count(*) FROM unnest(keys) k GROUP BY k ORDER BY k
    ON CONFLICT (policy_id, scope_id) DO UPDATE SET reserved = c.reserved + EXCLUDED.reserved;
    RETURN cardinality(request_ids);
END
$$;

CREATE FUNCTION bench_floor.settle_many(request_ids text[]) RETURNS integer
LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM bench_floor.reservation r WHERE r.request_id = ANY(request_ids)
        RETURNING r.request_id, r.key_id
    ), ledger AS (
        INSERT INTO bench_floor.usage_ledger (request_id, key_id, user_id, channel_id, model, input_tokens,
            output_tokens, cached_tokens, cost, billed, unbilled_reason, counted_in_key_global,
            counted_in_user_global, counted_policy, counted_scope, counted_window, counted_amount, settled_at)
        SELECT g.request_id, g.key_id, g.key_id, NULL, 'floor-model', 100, 100, 0, 0.0003, true, NULL, true, true,
               ARRAY[1], ARRAY[g.key_id], ARRAY[date_trunc('day', now())], ARRAY[0.0003], now()
        FROM gone g
    ), counted AS (
        INSERT INTO bench_floor.counter AS c (policy_id, scope_id, window_start, used)
        SELECT 1, g.key_id, date_trunc('day', now()), 0.0003 * count(*) FROM gone g GROUP BY g.key_id ORDER BY g.key_id
        ON CONFLICT (policy_id, scope_id) DO UPDATE SET used = c.used + EXCLUDED.used, reserved = c.reserved - EXCLUDED.used
        RETURNING 1
    )
    SELECT cardinality(request_ids)
$$;
