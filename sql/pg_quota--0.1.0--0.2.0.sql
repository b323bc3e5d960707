-- pg_quota 0.1.0 → 0.2.0. Every schema change after release 0.1.0 goes here as well as into
-- sql/schema/, so that ALTER EXTENSION pg_quota UPDATE gives a 0.1.0 database exactly what a
-- fresh install of 0.2.0 has, keeping its data (scripts/test-upgrade.sh proves it).
\echo Use "ALTER EXTENSION pg_quota UPDATE" to load this file. \quit

-- quota.models lists aliases (quota.model_alias) beside the models they price as.
CREATE OR REPLACE FUNCTION quota.models(api_key text) RETURNS TABLE (model text, owned_by text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v record;
BEGIN
    SELECT r.error_code, r.message INTO v
    FROM quota.key_for_secret(models.api_key) k JOIN quota.app_user u ON u.user_id = k.user_id
    LEFT JOIN quota.key_refusal(k.enabled, u.enabled, k.expires_at, quota.clock()) r ON true;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Incorrect API key provided.' USING ERRCODE = 'invalid_authorization_specification';
    ELSIF v.error_code IS NOT NULL THEN
        RAISE EXCEPTION '%', v.message USING ERRCODE = 'PQ403', DETAIL = v.error_code;
    END IF;
    -- priced models, their aliases, and the models of enabled channels
    RETURN QUERY SELECT m.model, 'pg_quota'::text
    FROM (SELECT p.model FROM quota.model_price p
          UNION SELECT a.alias FROM quota.model_alias a
          UNION SELECT cm.model FROM quota.channel_model cm
                JOIN quota.channel c ON c.channel_id = cm.channel_id AND c.status = 'enabled') m
    ORDER BY m.model;
END
$$;

-- Issue 18: the ledger partitioned by time (sql/schema/10_tables.sql, 70_ledger.sql). The 0.1.0
-- ledger, one table with a unique index on request_id, becomes quota.usage_ledger partitioned by
-- settled_at. Its rows move into the default partition, keeping their ledger_id, without passing
-- the rollup trigger again; the first upkeep (quota.maintain_ledger, which the sweeper runs after
-- each sweep, or a DBA) files them into day partitions. Its request ids go into
-- quota.ledger_request, which the upkeep then forgets past their horizon.
ALTER TABLE quota.usage_ledger RENAME TO usage_ledger_0_1;
ALTER SEQUENCE quota.usage_ledger_ledger_id_seq RENAME TO usage_ledger_0_1_seq;
DO $$
DECLARE
    c name;
BEGIN
    -- the new table's CHECK constraints take these names
    FOR c IN SELECT conname FROM pg_catalog.pg_constraint
             WHERE conrelid = 'quota.usage_ledger_0_1'::regclass AND contype = 'c' LOOP
        EXECUTE format('ALTER TABLE quota.usage_ledger_0_1 DROP CONSTRAINT %I', c);
    END LOOP;
END
$$;
CREATE TABLE quota.usage_ledger (
    ledger_id        bigint GENERATED ALWAYS AS IDENTITY,  -- insertion order; not indexed
    request_id       text NOT NULL,
    settled_by       text NOT NULL DEFAULT 'settle' CHECK (settled_by IN ('settle', 'sweep', 'correction')),
    key_id           bigint NOT NULL,
    user_id          bigint NOT NULL,
    channel_id       bigint,
    model            text NOT NULL,
    input_tokens     bigint NOT NULL,
    output_tokens    bigint NOT NULL,
    cached_tokens    bigint NOT NULL,
    cost             numeric NOT NULL CHECK (cost >= 0 OR settled_by = 'correction'),
    billed           boolean NOT NULL,
    unbilled_reason  text CHECK (billed = (unbilled_reason IS NULL)),
    -- false when an exclusive model-group policy of that axis took the spend (billing isolation)
    counted_in_key_global   boolean NOT NULL DEFAULT true,
    counted_in_user_global  boolean NOT NULL DEFAULT true,
    counted_policy   bigint[] NOT NULL,
    counted_scope    bigint[] NOT NULL,
    counted_window   timestamptz[] NOT NULL,
    counted_amount   numeric[] NOT NULL,
    settled_at       timestamptz NOT NULL
) PARTITION BY RANGE (settled_at);
-- Catches a row no partition takes (the sweep was off for longer than the partitions made ahead);
-- quota.maintain_ledger files such rows into partitions, and quota.ledger_partitions() shows them.
CREATE TABLE quota.usage_ledger_default PARTITION OF quota.usage_ledger DEFAULT;
-- Each partition has its own indexes (quota.ledger_add_indexes), none on the partitioned table:
-- partitions made after CREATE EXTENSION are the DBA's tables, which pg_dump writes with their
-- indexes, and an index of the partitioned table would make them twice on restore.
-- quota.drift and quota.status read the ledger of the current windows. Rows arrive in
-- settled_at order, so a block range index finds them for a fraction of a b-tree's cost.
CREATE INDEX ON quota.usage_ledger_default (key_id, settled_at);
CREATE INDEX ON quota.usage_ledger_default USING brin (settled_at) WITH (autosummarize = on);

SELECT pg_catalog.setval('quota.usage_ledger_ledger_id_seq', s.last_value, s.is_called)
FROM quota.usage_ledger_0_1_seq s;
INSERT INTO quota.usage_ledger OVERRIDING SYSTEM VALUE SELECT * FROM quota.usage_ledger_0_1;

-- The request ids of the ledger's recent rows, one row per ledger row, with what a settle
-- repeated answers: the ledger's request ids are unique while they are here, and a settle,
-- refund or admit that repeats one is recognised. Kept for pg_quota.reservation_ttl plus
-- pg_quota.request_id_retention after the row's settled_at (quota.maintain_ledger forgets them
-- then), so its size follows the request rate, not the ledger's age. A trigger on the ledger
-- fills it (sql/schema/60_rollups.sql).
CREATE TABLE quota.ledger_request (
    request_id       text NOT NULL,
    settled_by       text NOT NULL,
    settled_at       timestamptz NOT NULL,  -- finds the ledger row's partition
    billed           boolean NOT NULL,
    unbilled_reason  text,
    cost             numeric NOT NULL,
    PRIMARY KEY (request_id, settled_by)
);
CREATE INDEX ON quota.ledger_request USING brin (settled_at) WITH (autosummarize = on);

-- Closed ledger partitions: a partition closes (quota.close_ledger_partition) once its range
-- has ended; what its rows gave the current windows goes into quota.ledger_checkpoint, and from
-- then on quota.drift() reads the checkpoints instead of its rows, so the partition may leave
-- the ledger (quota.archive_ledger: archived_as names where it went, NULL once dropped).
-- Partitions close in order, so the closed ones cover the ledger up to max(range_to).
CREATE TABLE quota.ledger_closed (
    range_from   timestamptz PRIMARY KEY,
    range_to     timestamptz NOT NULL,
    ledger_rows  bigint NOT NULL,
    closed_at    timestamptz NOT NULL,
    archived_at  timestamptz,
    archived_as  text
);

-- What the rows of closed partitions gave each counter's window, summed (rows settled before
-- the counter's last reset left out); only windows still current are kept. quota.clear_usage
-- clears a policy's checkpoints with its counters.
CREATE TABLE quota.ledger_checkpoint (
    policy_id     bigint NOT NULL REFERENCES quota.policy ON DELETE CASCADE,
    scope_id      bigint NOT NULL,
    window_start  timestamptz NOT NULL,  -- the counted window (rolling windows: the minute bucket)
    amount        numeric NOT NULL,
    PRIMARY KEY (policy_id, scope_id, window_start)
);

INSERT INTO quota.ledger_request (request_id, settled_by, settled_at, billed, unbilled_reason, cost)
SELECT l.request_id, l.settled_by, l.settled_at, l.billed, l.unbilled_reason, l.cost FROM quota.usage_ledger l;
-- (leaving the extension first takes the old table and its sequence off the dumped tables)
ALTER EXTENSION pg_quota DROP TABLE quota.usage_ledger_0_1;
ALTER EXTENSION pg_quota DROP SEQUENCE quota.usage_ledger_0_1_seq;
DROP TABLE quota.usage_ledger_0_1;

SELECT pg_catalog.pg_extension_config_dump('quota.usage_ledger', '');
SELECT pg_catalog.pg_extension_config_dump('quota.usage_ledger_default', '');
SELECT pg_catalog.pg_extension_config_dump('quota.ledger_request', '');
SELECT pg_catalog.pg_extension_config_dump('quota.ledger_closed', '');
SELECT pg_catalog.pg_extension_config_dump('quota.ledger_checkpoint', '');
SELECT pg_catalog.pg_extension_config_dump('quota.usage_ledger_ledger_id_seq', '');

CREATE TRIGGER usage_daily_add AFTER INSERT ON quota.usage_ledger
    FOR EACH ROW EXECUTE FUNCTION quota.usage_daily_add();
CREATE TRIGGER usage_ledger_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON quota.usage_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION quota.usage_ledger_append_only();

-- Every ledger row's request id goes into quota.ledger_request, whose primary key keeps the
-- ledger's request ids unique (a second settle of a request fails here), one statement at a time.
CREATE FUNCTION quota.ledger_request_add() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO quota.ledger_request (request_id, settled_by, settled_at, billed, unbilled_reason, cost)
    SELECT n.request_id, n.settled_by, n.settled_at, n.billed, n.unbilled_reason, n.cost FROM new_rows n;
    RETURN NULL;
END
$$;

CREATE TRIGGER ledger_request_add AFTER INSERT ON quota.usage_ledger
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION quota.ledger_request_add();

-- Request ids, corrections and refunds read quota.ledger_request; drift reads checkpoints.
CREATE OR REPLACE FUNCTION quota.correct_swept(request_id text, input_tokens bigint, output_tokens bigint,
                                    cached_tokens bigint, now_ts timestamptz,
                                    OUT cost numeric, OUT billed boolean)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    s quota.usage_ledger;
    p quota.policy;
    v_cost numeric;  -- the measured usage's cost; NULL without a price
    v_actual numeric;
    v_delta numeric;
    v_ws timestamptz;
    v_swept_at timestamptz;
    v_policies bigint[] := '{}';
    v_scopes bigint[] := '{}';
    v_windows timestamptz[] := '{}';
    v_amounts numeric[] := '{}';
    i integer;
BEGIN
    -- the sweep's row, found through quota.ledger_request (its settled_at names the partition)
    SELECT h.settled_at INTO v_swept_at FROM quota.ledger_request h
    WHERE h.request_id = correct_swept.request_id AND h.settled_by = 'sweep'
      AND NOT EXISTS (SELECT 1 FROM quota.ledger_request c
                      WHERE c.request_id = correct_swept.request_id AND c.settled_by = 'correction')
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    SELECT l.* INTO s FROM quota.usage_ledger l
    WHERE l.settled_at = v_swept_at AND l.request_id = correct_swept.request_id AND l.settled_by = 'sweep';
    IF NOT FOUND THEN
        RETURN;  -- archived (quota.archive_ledger refuses partitions this recent)
    END IF;
    SELECT quota.cost_of(mp, input_tokens, output_tokens, cached_tokens) INTO v_cost FROM quota.price_for(s.model) mp;
    FOR i IN 1 .. coalesce(array_length(s.counted_policy, 1), 0) LOOP
        SELECT * INTO p FROM quota.policy x WHERE x.policy_id = s.counted_policy[i];
        CONTINUE WHEN NOT FOUND;
        v_actual := quota.metric_amount(p.metric, v_cost, input_tokens, output_tokens);
        v_delta := coalesce(v_actual, 0) - s.counted_amount[i];
        CONTINUE WHEN v_delta = 0;
        v_ws := (SELECT w.window_start FROM quota.policy_window(p, now_ts) w);
        IF p.window_mode = 'rolling' THEN
            PERFORM 1 FROM quota.counter c
            WHERE c.policy_id = p.policy_id AND c.scope_id = s.counted_scope[i]
              AND coalesce(c.reset_at, '-infinity') <= s.settled_at AND s.counted_window[i] >= v_ws
            FOR UPDATE;
            CONTINUE WHEN NOT FOUND;
            UPDATE quota.rolling_usage r SET used = r.used + v_delta
            WHERE r.policy_id = p.policy_id AND r.scope_id = s.counted_scope[i] AND r.bucket = s.counted_window[i];
        ELSE
            UPDATE quota.counter c SET used = c.used + v_delta
            WHERE c.policy_id = p.policy_id AND c.scope_id = s.counted_scope[i]
              AND c.window_start = s.counted_window[i] AND c.window_start = v_ws
              AND coalesce(c.reset_at, '-infinity') <= s.settled_at;
        END IF;
        CONTINUE WHEN NOT FOUND;
        v_policies := v_policies || p.policy_id;
        v_scopes := v_scopes || s.counted_scope[i];
        v_windows := v_windows || s.counted_window[i];
        v_amounts := v_amounts || v_delta;
    END LOOP;
    INSERT INTO quota.usage_ledger (request_id, settled_by, key_id, user_id, channel_id, model, input_tokens,
                                    output_tokens, cached_tokens, cost, billed, unbilled_reason,
                                    counted_in_key_global, counted_in_user_global,
                                    counted_policy, counted_scope, counted_window, counted_amount, settled_at)
    VALUES (s.request_id, 'correction', s.key_id, s.user_id, s.channel_id, s.model,
            input_tokens - s.input_tokens, output_tokens - s.output_tokens, cached_tokens - s.cached_tokens,
            coalesce(v_cost, 0) - s.cost, v_cost IS NOT NULL, CASE WHEN v_cost IS NULL THEN 'price_not_found' END,
            s.counted_in_key_global, s.counted_in_user_global, v_policies, v_scopes, v_windows, v_amounts, now_ts);
    cost := coalesce(v_cost, 0);
    billed := v_cost IS NOT NULL;
END
$$;

CREATE OR REPLACE FUNCTION quota.refund(request_id text, reason text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off AS $$
DECLARE
    v_res quota.reservation;
BEGIN
    DELETE FROM quota.reservation r WHERE r.request_id = refund.request_id RETURNING r.* INTO v_res;
    IF FOUND THEN
        PERFORM quota.release_holds(v_res.hold_policy, v_res.hold_scope, v_res.hold_amount);
        INSERT INTO quota.released (request_id, key_id, user_id, channel_id, model, kind, reason, released_at)
        VALUES (v_res.request_id, v_res.key_id, v_res.user_id, v_res.channel_id, v_res.model,
                'refunded', refund.reason, quota.clock());
        RETURN true;
    END IF;
    -- Nothing is ever released twice: a second refund (or one after expiry) changes nothing.
    IF EXISTS (SELECT 1 FROM quota.released r WHERE r.request_id = refund.request_id) THEN
        RETURN false;
    END IF;
    -- The sweep charged it at its reservation, and the upstream failed after all: the charge is
    -- corrected to nothing, once (a second refund changes nothing).
    IF EXISTS (SELECT 1 FROM quota.ledger_request l WHERE l.request_id = refund.request_id AND l.settled_by = 'sweep') THEN
        RETURN (SELECT c.cost IS NOT NULL FROM quota.correct_swept(refund.request_id, 0, 0, 0, quota.clock()) c);
    END IF;
    IF EXISTS (SELECT 1 FROM quota.ledger_request l WHERE l.request_id = refund.request_id) THEN
        RAISE EXCEPTION 'refund: request_id % was already settled; a settled request cannot be refunded',
            refund.request_id USING ERRCODE = 'PQ409';
    END IF;
    RAISE EXCEPTION 'refund: unknown request_id %', refund.request_id USING ERRCODE = 'PQ404';
END
$$;

CREATE OR REPLACE FUNCTION quota.drift()
RETURNS TABLE (policy_id bigint, scope_id bigint, counter_used numeric, ledger_used numeric,
               counter_reserved numeric, holds_reserved numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
-- planned with the bound's value, so that a recent bound reads only the recent ledger
SET plan_cache_mode = force_custom_plan AS $$
#variable_conflict use_column
DECLARE
    v_now timestamptz := quota.clock();
    v_policies bigint[];  -- the policies that have counters, with their current windows
    v_modes text[];
    v_starts timestamptz[];
    v_since timestamptz;  -- a counter counts the ledger rows of its current window since its last reset
    v_open_from timestamptz := coalesce((SELECT max(k.range_to) FROM quota.ledger_closed k), '-infinity');
BEGIN
    SELECT array_agg(w.policy_id), array_agg(w.window_mode), array_agg(w.window_start),
           min(greatest(w.window_start, w.earliest_reset))
    INTO v_policies, v_modes, v_starts, v_since
    FROM (SELECT p.policy_id, p.window_mode, pw.window_start,
                 (SELECT min(coalesce(c.reset_at, '-infinity')) FROM quota.counter c
                   WHERE c.policy_id = p.policy_id) AS earliest_reset
          FROM quota.policy p CROSS JOIN LATERAL quota.policy_window(p, v_now) pw) w
    WHERE w.earliest_reset IS NOT NULL;

    RETURN QUERY
    WITH live AS (  -- each counter with its policy's window mode and the current window's start
        SELECT c.policy_id, c.scope_id, c.window_start, c.used, c.reserved, c.reset_at,
               w.window_mode, w.current_start
        FROM quota.counter c
        JOIN unnest(v_policies, v_modes, v_starts) AS w(policy_id, window_mode, current_start)
          ON w.policy_id = c.policy_id
    ),
    counted AS (  -- what the ledger rows since the counter's last reset gave its current window:
                  -- the live ledger's, and the checkpoints of archived partitions
        SELECT x.policy_id, x.scope_id, sum(x.amount) AS amount
        FROM (SELECT c.policy_id, c.scope_id, x.amount
              FROM quota.usage_ledger l,
                   unnest(l.counted_policy, l.counted_scope, l.counted_window, l.counted_amount)
                       AS x(policy_id, scope_id, window_start, amount)
              JOIN live c ON c.policy_id = x.policy_id AND c.scope_id = x.scope_id
              WHERE l.settled_at >= v_since
                AND l.settled_at >= v_open_from  -- closed partitions count through their checkpoints
                AND l.settled_at >= coalesce(c.reset_at, '-infinity')
                AND CASE c.window_mode
                        WHEN 'fixed' THEN x.window_start = c.current_start
                        ELSE x.window_start >= c.current_start  -- a rolling window counts in a minute bucket
                    END
              UNION ALL
              SELECT c.policy_id, c.scope_id, k.amount
              FROM quota.ledger_checkpoint k
              JOIN live c ON c.policy_id = k.policy_id AND c.scope_id = k.scope_id
              WHERE CASE c.window_mode
                        WHEN 'fixed' THEN k.window_start = c.current_start
                        ELSE k.window_start >= c.current_start
                    END) x
        GROUP BY 1, 2
    ),
    holds AS (
        SELECT h.policy_id, h.scope_id, sum(h.amount) AS amount
        FROM quota.reservation r, unnest(r.hold_policy, r.hold_scope, r.hold_amount) AS h(policy_id, scope_id, amount)
        GROUP BY 1, 2
    ),
    expected AS (
        SELECT c.policy_id, c.scope_id,
               CASE WHEN c.window_mode = 'rolling'
                        THEN (SELECT coalesce(sum(r.used), 0) FROM quota.rolling_usage r
                              WHERE r.policy_id = c.policy_id AND r.scope_id = c.scope_id
                                AND r.bucket >= c.current_start)
                    WHEN c.window_start = c.current_start THEN c.used
                    ELSE 0
               END AS counter_used,
               coalesce(k.amount, 0) AS ledger_used,
               c.reserved AS counter_reserved,
               coalesce(h.amount, 0) AS holds_reserved
        FROM live c
        LEFT JOIN counted k ON k.policy_id = c.policy_id AND k.scope_id = c.scope_id
        LEFT JOIN holds h ON h.policy_id = c.policy_id AND h.scope_id = c.scope_id
    )
    SELECT * FROM expected e
    WHERE e.counter_used <> e.ledger_used OR e.counter_reserved <> e.holds_reserved
    ORDER BY 1, 2;
END
$$;

-- The first instant of the partition of `period` ('day' or 'week') that holds `at`.
CREATE FUNCTION quota.ledger_period_start(at timestamptz, period text) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT pg_catalog.date_trunc(CASE period WHEN 'week' THEN 'week' ELSE 'day' END, at AT TIME ZONE 'UTC')
           AT TIME ZONE 'UTC'
$$;

-- A partition's length: hours, not days, so that no session time zone's DST moves a bound.
CREATE FUNCTION quota.ledger_period_length(period text) RETURNS interval
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT CASE period WHEN 'week' THEN interval '168 hours' ELSE interval '24 hours' END
$$;

-- Every partition of the ledger with its range (NULL bounds for the default partition), whether
-- it is closed (quota.ledger_closed), its rows (counted for the default partition, which should
-- hold none; estimated from the statistics for the others) and its size on disk.
CREATE FUNCTION quota.ledger_partitions()
RETURNS TABLE (partition regclass, range_from timestamptz, range_to timestamptz, is_default boolean,
               closed boolean, est_rows bigint, bytes bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET datestyle = 'ISO, YMD' AS $$
    SELECT b.relid, b.range_from, b.range_to, b.is_default,
           EXISTS (SELECT 1 FROM quota.ledger_closed k WHERE k.range_from = b.range_from),
           CASE WHEN b.is_default THEN (SELECT count(*) FROM quota.usage_ledger_default)
                ELSE greatest(c.reltuples, 0)::bigint END,
           pg_catalog.pg_total_relation_size(b.relid)
    FROM quota.ledger_bounds() b JOIN pg_catalog.pg_class c ON c.oid = b.relid
    ORDER BY b.range_from NULLS FIRST
$$;

-- The partitions' ranges, read from the catalog (each partition's bound expression).
CREATE FUNCTION quota.ledger_bounds()
RETURNS TABLE (relid regclass, range_from timestamptz, range_to timestamptz, is_default boolean)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp SET datestyle = 'ISO, YMD' AS $$
    SELECT c.oid::regclass,
           (regexp_match(b.expr, 'FROM \(''([^'']*)''\)'))[1]::timestamptz,
           (regexp_match(b.expr, 'TO \(''([^'']*)''\)'))[1]::timestamptz,
           b.expr = 'DEFAULT'
    FROM pg_catalog.pg_inherits i
    JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL (SELECT pg_catalog.pg_get_expr(c.relpartbound, c.oid) AS expr) b
    WHERE i.inhparent = 'quota.usage_ledger'::regclass
$$;

-- Makes the partition [range_from, range_to) with its indexes, moving into it the rows of that
-- range that the default partition caught (they keep their ledger_id and are not counted again:
-- they go straight into the new table, before it joins the ledger). Returns the rows moved.
-- ATTACH takes a SHARE UPDATE EXCLUSIVE lock on the ledger: settles go on meanwhile (except
-- while rows move: see below).
CREATE FUNCTION quota.ledger_make_partition(range_from timestamptz, range_to timestamptz) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp SET datestyle = 'ISO, YMD' AS $$
DECLARE
    v_table text := format('quota.%I', 'usage_ledger_p' || to_char(range_from AT TIME ZONE 'UTC', 'YYYYMMDD'));
    v_moved bigint;
BEGIN
    EXECUTE format('CREATE TABLE %s (LIKE quota.usage_ledger INCLUDING DEFAULTS INCLUDING CONSTRAINTS)', v_table);
    -- a constraint that implies the range spares ATTACH a scan of the table
    EXECUTE format('ALTER TABLE %s ADD CONSTRAINT in_range CHECK (settled_at >= %L AND settled_at < %L)',
                   v_table, range_from, range_to);
    -- Rows to move: a query planned before the new partition joins and run after this commits
    -- would miss them (in neither partition). So readers wait for this (rare) move: the sweeper
    -- was off for a week, or the ledger is new or just upgraded. An empty partition needs no lock.
    IF EXISTS (SELECT 1 FROM quota.usage_ledger_default d
               WHERE d.settled_at >= range_from AND d.settled_at < range_to) THEN
        LOCK TABLE quota.usage_ledger IN ACCESS EXCLUSIVE MODE;
    END IF;
    EXECUTE format('WITH moved AS (DELETE FROM quota.usage_ledger_default d WHERE d.settled_at >= %L AND d.settled_at < %L
                                   RETURNING d.*)
                    INSERT INTO %s SELECT * FROM moved', range_from, range_to, v_table);
    GET DIAGNOSTICS v_moved = ROW_COUNT;
    EXECUTE format('CREATE INDEX ON %s (key_id, settled_at)', v_table);
    EXECUTE format('CREATE INDEX ON %s USING brin (settled_at) WITH (autosummarize = on)', v_table);
    EXECUTE format('ALTER TABLE quota.usage_ledger ATTACH PARTITION %s FOR VALUES FROM (%L) TO (%L)',
                   v_table, range_from, range_to);
    EXECUTE format('ALTER TABLE %s DROP CONSTRAINT in_range', v_table);
    RETURN v_moved;
END
$$;

-- Makes partitions of `period` for [range_from, range_to), around the partitions that exist
-- (after a change of pg_quota.ledger_partition, a new partition fills only the gap left).
CREATE FUNCTION quota.ledger_cover(range_from timestamptz, range_to timestamptz, period text,
                                   OUT made integer, OUT moved bigint)
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_at timestamptz := quota.ledger_period_start(range_from, period);
    v_end timestamptz;
    v_next timestamptz;
BEGIN
    made := 0;
    moved := 0;
    WHILE v_at < range_to LOOP
        SELECT b.range_to INTO v_next FROM quota.ledger_bounds() b
        WHERE NOT b.is_default AND b.range_from <= v_at AND b.range_to > v_at;
        IF FOUND THEN  -- covered: on past that partition
            v_at := v_next;
            CONTINUE;
        END IF;
        v_end := quota.ledger_period_start(v_at, period) + quota.ledger_period_length(period);
        SELECT min(b.range_from) INTO v_next FROM quota.ledger_bounds() b
        WHERE NOT b.is_default AND b.range_from > v_at AND b.range_from < v_end;
        v_end := coalesce(v_next, v_end);
        moved := moved + quota.ledger_make_partition(v_at, v_end);
        made := made + 1;
        v_at := v_end;
    END LOOP;
END
$$;

-- Closes the oldest open partition if it ended at or before `until`: adds what its rows gave
-- each counter's current window to quota.ledger_checkpoint (rows settled before the counter's
-- last reset left out; windows no longer current dropped), and records it in
-- quota.ledger_closed. From then on quota.drift() counts the checkpoints instead of its rows.
-- Returns the partition's range start, or NULL when none is due. Partitions close in order, and
-- not while the default partition holds rows older than the partition's end (file them first).
CREATE FUNCTION quota.close_ledger_partition(until timestamptz) RETURNS timestamptz
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_now timestamptz := quota.clock();
    v record;
    v_rows bigint;
    v_policies bigint[];
    v_modes text[];
    v_starts timestamptz[];
BEGIN
    SELECT b.* INTO v FROM quota.ledger_bounds() b
    WHERE NOT b.is_default AND NOT EXISTS (SELECT 1 FROM quota.ledger_closed k WHERE k.range_from = b.range_from)
    ORDER BY b.range_from LIMIT 1;
    IF NOT FOUND OR v.range_to > until
       OR EXISTS (SELECT 1 FROM quota.usage_ledger_default d WHERE d.settled_at < v.range_to) THEN
        RETURN NULL;
    END IF;
    -- each policy's current window, as quota.drift judges it
    SELECT array_agg(p.policy_id), array_agg(p.window_mode), array_agg(pw.window_start)
    INTO v_policies, v_modes, v_starts
    FROM quota.policy p CROSS JOIN LATERAL quota.policy_window(p, v_now) pw;
    EXECUTE format($q$
        INSERT INTO quota.ledger_checkpoint AS k (policy_id, scope_id, window_start, amount)
        SELECT x.policy_id, x.scope_id, x.window_start, sum(x.amount)
        FROM %s l,
             unnest(l.counted_policy, l.counted_scope, l.counted_window, l.counted_amount)
                 AS x(policy_id, scope_id, window_start, amount)
        JOIN unnest($1, $2, $3) AS w(policy_id, window_mode, current_start) ON w.policy_id = x.policy_id
        LEFT JOIN quota.counter c ON c.policy_id = x.policy_id AND c.scope_id = x.scope_id
        WHERE l.settled_at >= coalesce(c.reset_at, '-infinity')
          AND CASE w.window_mode WHEN 'fixed' THEN x.window_start = w.current_start
                                 ELSE x.window_start >= w.current_start END
        GROUP BY 1, 2, 3
        ON CONFLICT (policy_id, scope_id, window_start) DO UPDATE SET amount = k.amount + EXCLUDED.amount$q$,
        v.relid) USING v_policies, v_modes, v_starts;
    EXECUTE format('SELECT count(*) FROM %s', v.relid) INTO v_rows;
    -- checkpoints of windows that are no longer current count for no counter any more
    DELETE FROM quota.ledger_checkpoint k
    USING unnest(v_policies, v_modes, v_starts) AS w(policy_id, window_mode, current_start)
    WHERE k.policy_id = w.policy_id
      AND CASE w.window_mode WHEN 'fixed' THEN k.window_start <> w.current_start
                             ELSE k.window_start < w.current_start END;
    INSERT INTO quota.ledger_closed (range_from, range_to, ledger_rows, closed_at)
    VALUES (v.range_from, v.range_to, v_rows, v_now);
    RETURN v.range_from;
END
$$;

-- Takes the ledger partitions that end at or before `before` out of the ledger, closing them
-- first if they are not yet (quota.close_ledger_partition: quota.drift() keeps counting them
-- through checkpoints). Each is detached, then moved into schema archive_schema (made if
-- missing) for COPY or pg_dump and a later DROP TABLE, or dropped when archive_schema is NULL.
-- Rollups (quota.usage_daily) and quota.ledger_closed keep their rows. Refuses a `before` later
-- than the request ids' horizon (pg_quota.reservation_ttl + pg_quota.request_id_retention ago):
-- a late settle may still need those rows. DETACH takes an ACCESS EXCLUSIVE lock on the ledger
-- for a moment; it waits at most 0.2 s for requests in flight (settles queue behind it meanwhile),
-- then fails with lock_not_available (the upkeep tries again after the next sweep).
CREATE FUNCTION quota.archive_ledger(before timestamptz, archive_schema text DEFAULT 'quota_archive')
RETURNS TABLE (range_from timestamptz, range_to timestamptz, ledger_rows bigint, archived_as text)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET datestyle = 'ISO, YMD'
SET lock_timeout = '5s' AS $$
DECLARE
    v_now timestamptz := quota.clock();
    v_horizon timestamptz := v_now - current_setting('pg_quota.reservation_ttl')::interval
                                   - current_setting('pg_quota.request_id_retention')::interval;
    v record;
    v_name text;
BEGIN
    IF before IS NULL OR before > v_horizon THEN
        RAISE EXCEPTION 'archive_ledger: before must be no later than % (the request ids'' horizon: pg_quota.reservation_ttl + pg_quota.request_id_retention ago)',
            v_horizon USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF archive_schema IN ('quota', 'pg_catalog', 'public') THEN
        RAISE EXCEPTION 'archive_ledger: archive_schema must be a schema of its own, not %', archive_schema
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM quota.ledger_file_strays(current_setting('pg_quota.ledger_partition'));
    WHILE quota.close_ledger_partition(before) IS NOT NULL LOOP
    END LOOP;
    IF archive_schema IS NOT NULL THEN
        EXECUTE format('CREATE SCHEMA IF NOT EXISTS %I', archive_schema);
    END IF;
    -- while DETACH waits for its lock, requests queue behind it: it waits a moment, no more
    PERFORM pg_catalog.set_config('lock_timeout', '200ms', true);
    FOR v IN SELECT b.relid, b.range_from, b.range_to, k.ledger_rows
             FROM quota.ledger_bounds() b JOIN quota.ledger_closed k ON k.range_from = b.range_from
             WHERE NOT b.is_default AND b.range_to <= before ORDER BY b.range_from LOOP
        v_name := (SELECT c.relname FROM pg_catalog.pg_class c WHERE c.oid = v.relid);
        EXECUTE format('ALTER TABLE quota.usage_ledger DETACH PARTITION %s', v.relid);
        IF archive_schema IS NULL THEN
            EXECUTE format('DROP TABLE %s', v.relid);
        ELSE
            EXECUTE format('ALTER TABLE %s SET SCHEMA %I', v.relid, archive_schema);
        END IF;
        range_from := v.range_from;
        range_to := v.range_to;
        ledger_rows := v.ledger_rows;
        archived_as := CASE WHEN archive_schema IS NOT NULL THEN format('%I.%I', archive_schema, v_name) END;
        UPDATE quota.ledger_closed k SET archived_at = v_now, archived_as = archive_ledger.archived_as
        WHERE k.range_from = v.range_from;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Files the rows the default partition caught into partitions of `period`; returns how many.
CREATE FUNCTION quota.ledger_file_strays(period text) RETURNS bigint
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_start timestamptz;
    v_moved bigint := 0;
BEGIN
    IF period = 'manual' THEN
        RETURN 0;
    END IF;
    FOR v_start IN SELECT DISTINCT quota.ledger_period_start(d.settled_at, period)
                   FROM quota.usage_ledger_default d ORDER BY 1 LOOP
        v_moved := v_moved + (SELECT c.moved FROM quota.ledger_cover(v_start, v_start + quota.ledger_period_length(period), period) c);
    END LOOP;
    RETURN v_moved;
END
$$;

-- The ledger's upkeep, run by the sweeper after each sweep (or from pg_cron): files the rows the
-- default partition caught into partitions (with a WARNING: the sweep was off for longer than
-- the partitions made ahead), makes partitions through a week ahead, closes one ended partition
-- (a day after its end), archives or drops partitions older than pg_quota.ledger_retention (when
-- set; into pg_quota.ledger_archive_schema, or dropped when that is empty), and forgets request
-- ids older than pg_quota.reservation_ttl + pg_quota.request_id_retention. With
-- pg_quota.ledger_partition = 'manual' it leaves partitions to the DBA (or pg_partman).
CREATE FUNCTION quota.maintain_ledger(OUT made_partitions integer, OUT filed_rows bigint,
                                      OUT closed_partitions integer, OUT archived_partitions integer,
                                      OUT forgotten_request_ids bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET datestyle = 'ISO, YMD'
SET lock_timeout = '5s' AS $$
DECLARE
    v_now timestamptz := quota.clock();
    v_period text := current_setting('pg_quota.ledger_partition');
    v_retention interval := current_setting('pg_quota.ledger_retention')::interval;
    v_horizon interval := current_setting('pg_quota.reservation_ttl')::interval
                          + current_setting('pg_quota.request_id_retention')::interval;
    v_archive text := nullif(current_setting('pg_quota.ledger_archive_schema'), '');
    v_made integer;
BEGIN
    made_partitions := 0;
    filed_rows := 0;
    closed_partitions := 0;
    archived_partitions := 0;
    BEGIN
        filed_rows := quota.ledger_file_strays(v_period);
        IF filed_rows > 0 THEN
            RAISE WARNING 'pg_quota: ledger rows that no partition took, filed into partitions now: %', filed_rows
                USING HINT = 'The sweeper did not run for longer than the partitions made ahead (a week), or the ledger is new.';
        END IF;
        IF v_period <> 'manual' THEN
            SELECT c.made INTO v_made
            FROM quota.ledger_cover(quota.ledger_period_start(v_now, v_period), v_now + interval '8 days', v_period) c;
            made_partitions := v_made;
        END IF;
        IF quota.close_ledger_partition(v_now - interval '1 day') IS NOT NULL THEN
            closed_partitions := 1;
        END IF;
        IF v_retention > interval '0' THEN
            SELECT count(*) INTO archived_partitions
            FROM quota.archive_ledger(v_now - greatest(v_retention, v_horizon), v_archive);
        END IF;
    EXCEPTION WHEN lock_not_available THEN  -- all of it rolled back
        made_partitions := 0;
        filed_rows := 0;
        closed_partitions := 0;
        archived_partitions := 0;
        RAISE WARNING 'pg_quota: the ledger''s upkeep waited too long for a lock (%); it runs again after the next sweep', SQLERRM;
    END;
    DELETE FROM quota.ledger_request h WHERE h.settled_at < v_now - v_horizon;
    GET DIAGNOSTICS forgotten_request_ids = ROW_COUNT;
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA quota FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA quota FROM PUBLIC;
GRANT SELECT ON quota.usage_ledger, quota.ledger_request, quota.ledger_closed, quota.ledger_checkpoint TO quota_admin;
GRANT EXECUTE ON FUNCTION quota.ledger_partitions(), quota.maintain_ledger() TO quota_admin;

-- Issue 20: alerts and shadow mode
-- New policy columns (enforce: shadow mode; alert_at: thresholds), the counter's alert marks,
-- two event kinds, the policy checks and re-arming (policy_validate, clear_usage,
-- policy_judged_afresh), shadow policies in limits of their own (policies_for; as of issue 19
-- it also looks policies up by subject, one lookup each, so kept plans stay keyed), the sweep's
-- charge (charge_expired: thresholds, no marks for shadow policies), quota.status with the
-- enforce column (a new result type: dropped and created again), and 70_alerts.sql whole.
ALTER TABLE quota.policy ADD COLUMN enforce boolean NOT NULL DEFAULT true, ADD COLUMN alert_at numeric[];
COMMENT ON COLUMN quota.policy.enforce IS
    'false: shadow mode. The policy is counted and shows in quota.status, but never refuses or suspends; a shadow_refusal event is logged once per window when it would have refused.';
COMMENT ON COLUMN quota.policy.alert_at IS
    'Alert thresholds, fractions of the effective limit in (0, 1], e.g. {0.8,0.95,1}: settled usage crossing one logs a threshold_crossed event, once per threshold and window. NULL or empty: none.';
ALTER TABLE quota.counter ADD COLUMN alert_level numeric, ADD COLUMN alert_window timestamptz,
    ADD COLUMN shadow_refused_at timestamptz;
ALTER TABLE quota.event DROP CONSTRAINT event_kind_check,
    ADD CONSTRAINT event_kind_check CHECK (kind IN ('exhausted', 'recovered', 'disabled', 'resumed', 'reset',
                                             'policy_created', 'policy_changed', 'policy_deleted',
                                             'reservation_expired', 'boost_created', 'boost_changed',
                                             'boost_deleted', 'unpriced_model', 'channel_created',
                                             'channel_changed', 'channel_deleted', 'channel_grant_created',
                                             'channel_grant_changed', 'channel_grant_deleted',
                                             'threshold_crossed', 'shadow_refusal'));

CREATE OR REPLACE FUNCTION quota.policy_validate() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    problem text[];
BEGIN
    PERFORM quota.check_subject_and_metric('policy', ARRAY['key', 'user', 'user_group', 'channel'],
                                           NEW.subject_type, NEW.subject_id, NEW.metric);
    IF NEW.subject_type = 'channel' AND NEW.model_group IS NOT NULL THEN
        PERFORM quota.refuse_row('policy', 'model_group',
            'invalid policy: model_group: a channel policy caps the whole channel; leave model_group NULL');
    END IF;
    IF NEW.subject_type = 'channel' AND NEW.on_exhausted = 'disable' THEN
        PERFORM quota.refuse_row('policy', 'on_exhausted',
            'invalid policy: on_exhausted: a channel cap cannot suspend the keys that use the channel; a full channel drops out of routing until its window frees up (use reject)');
    END IF;
    IF NEW.exclusive AND NEW.model_group IS NULL THEN
        PERFORM quota.refuse_row('policy', 'exclusive',
            'invalid policy: exclusive: only a model-group policy can isolate its spend from the global policies; set model_group or exclusive = false');
    END IF;
    -- A policy without a limit would enforce nothing (and could shadow others): refused. A zero
    -- or negative limit would read as "unlimited" to some and "blocked" to others: refused too.
    IF NEW.quota_limit IS NULL THEN
        PERFORM quota.refuse_row('policy', 'quota_limit',
            'invalid policy: quota_limit: required; a policy without a limit would enforce nothing');
    END IF;
    -- NaN compares above every number and Infinity is no limit: either would remove the limit.
    IF NEW.quota_limit IN ('NaN', 'Infinity') THEN
        PERFORM quota.refuse_row('policy', 'quota_limit', format(
            'invalid policy: quota_limit: must be a finite number, got %s', NEW.quota_limit));
    END IF;
    IF NEW.quota_limit <= 0 THEN
        PERFORM quota.refuse_row('policy', 'quota_limit', format(
            'invalid policy: quota_limit: must be greater than zero, got %s (to block a key, disable it)', NEW.quota_limit));
    END IF;
    IF NEW.metric IN ('tokens', 'requests') AND NEW.quota_limit <> trunc(NEW.quota_limit) THEN
        PERFORM quota.refuse_row('policy', 'quota_limit', format(
            'invalid policy: quota_limit: a %s limit must be a whole number, got %s', NEW.metric, NEW.quota_limit));
    END IF;
    IF NEW.boundary NOT IN ('strict', 'graceful') THEN
        PERFORM quota.refuse_row('policy', 'boundary', format(
            'invalid policy: boundary: %L is not one of strict, graceful', NEW.boundary));
    END IF;
    IF NEW.on_exhausted NOT IN ('reject', 'disable') THEN
        PERFORM quota.refuse_row('policy', 'on_exhausted', format(
            'invalid policy: on_exhausted: %L is not one of reject, disable', NEW.on_exhausted));
    END IF;
    IF NOT isfinite(NEW.anchor) THEN
        PERFORM quota.refuse_row('policy', 'anchor', 'invalid policy: anchor: must be a finite timestamp');
    END IF;
    problem := quota.policy_window_problem(NEW.period, NEW.period_minutes, NEW.window_mode,
                                           NEW.time_zone, NEW.week_start, NEW.reset_hour);
    IF problem IS NOT NULL THEN
        PERFORM quota.refuse_row('policy', problem[1], problem[2]);
    END IF;
    -- Alert thresholds are fractions of the limit (1 = the limit itself); kept sorted, each once.
    IF array_ndims(NEW.alert_at) > 1
       OR EXISTS (SELECT 1 FROM unnest(NEW.alert_at) t WHERE t IS NULL OR NOT (t > 0 AND t <= 1)) THEN
        PERFORM quota.refuse_row('policy', 'alert_at', format(
            'invalid policy: alert_at: each threshold must be a fraction of the limit greater than 0 and at most 1 (0.8 = 80 %%), got %s',
            NEW.alert_at));
    END IF;
    NEW.alert_at := (SELECT array_agg(DISTINCT t ORDER BY t) FROM unnest(NEW.alert_at) t);
    NEW.updated_at := quota.clock();
    RETURN NEW;
END
$$;

CREATE OR REPLACE FUNCTION quota.clear_usage(policy_id bigint, now_ts timestamptz) RETURNS void
LANGUAGE sql VOLATILE AS $$
    UPDATE quota.counter c SET used = 0, exhausted_at = NULL, reset_at = now_ts,
                               alert_level = NULL, alert_window = NULL, shadow_refused_at = NULL
    WHERE c.policy_id = clear_usage.policy_id;
    DELETE FROM quota.rolling_usage r WHERE r.policy_id = clear_usage.policy_id;
    DELETE FROM quota.ledger_checkpoint k WHERE k.policy_id = clear_usage.policy_id;
$$;

CREATE OR REPLACE FUNCTION quota.policy_judged_afresh() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        IF (NEW.subject_type, NEW.subject_id, NEW.model_group, NEW.metric, NEW.period, NEW.period_minutes,
            NEW.window_mode, NEW.anchor, NEW.time_zone, NEW.week_start, NEW.reset_hour)
           IS DISTINCT FROM
           (OLD.subject_type, OLD.subject_id, OLD.model_group, OLD.metric, OLD.period, OLD.period_minutes,
            OLD.window_mode, OLD.anchor, OLD.time_zone, OLD.week_start, OLD.reset_hour) THEN
            PERFORM quota.clear_usage(NEW.policy_id, quota.clock());
        ELSE
            UPDATE quota.counter c SET exhausted_at = NULL, alert_level = NULL, shadow_refused_at = NULL
            WHERE c.policy_id = NEW.policy_id
              AND (c.exhausted_at IS NOT NULL OR c.alert_level IS NOT NULL OR c.shadow_refused_at IS NOT NULL);
        END IF;
    END IF;
    PERFORM quota.lift_suspensions(OLD.policy_id,
                                   CASE TG_OP WHEN 'UPDATE' THEN 'policy_changed' ELSE 'policy_deleted' END,
                                   quota.clock());
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION quota.policies_for(key_id bigint, user_id bigint, model text, channel_id bigint,
                                   at timestamptz)
RETURNS TABLE (policy quota.policy, scope_id bigint, axis text, limit_key text, effective_limit numeric)
LANGUAGE sql STABLE AS $$
    WITH groups AS (
        SELECT m.group_id FROM quota.user_group_member m WHERE m.user_id = policies_for.user_id
    ), subjects AS (
        -- a lookup by subject each (as one OR of them, the plan that the lifecycle made while
        -- there were few policies, and kept, read every policy once there were many)
        SELECT p FROM quota.policy p
        WHERE p.enabled AND p.subject_type = 'key' AND p.subject_id = policies_for.key_id
        UNION ALL
        SELECT p FROM quota.policy p
        WHERE p.enabled AND p.subject_type = 'user' AND p.subject_id = policies_for.user_id
        UNION ALL
        SELECT p FROM quota.policy p
        WHERE p.enabled AND p.subject_type = 'user_group'
          AND p.subject_id = ANY (ARRAY(SELECT g.group_id FROM groups g))
        UNION ALL
        SELECT p FROM quota.policy p
        WHERE p.enabled AND p.subject_type = 'channel' AND p.subject_id = policies_for.channel_id
    ), matched AS (
        SELECT s.p AS policy, quota.policy_axis((s.p).subject_type) AS axis
        FROM subjects s
        WHERE policies_for.model IS NULL OR (s.p).model_group IS NULL
              OR (s.p).model_group = coalesce(
                     (SELECT mg.model_group_id FROM quota.model_group_member mg
                       WHERE mg.model = policies_for.model),
                     -- a snapshot or alias counts in the group of the model it is priced as
                     (SELECT mg.model_group_id FROM quota.model_group_member mg
                       WHERE mg.model = quota.price_model(policies_for.model)))
    ), kept AS (
        SELECT m.policy, m.axis,
               concat_ws('/', m.axis, coalesce((m.policy).model_group::text, '*'), (m.policy).metric,
                         (m.policy).period, (m.policy).period_minutes, (m.policy).window_mode,
                         CASE WHEN NOT (m.policy).enforce THEN 'shadow' END) AS limit_key
        FROM matched m
        WHERE policies_for.model IS NULL OR (m.policy).model_group IS NOT NULL
           OR NOT EXISTS (SELECT 1 FROM matched x WHERE x.axis = m.axis AND (x.policy).exclusive)
    )
    SELECT k.policy,
           CASE k.axis WHEN 'key' THEN policies_for.key_id WHEN 'user' THEN policies_for.user_id
                       ELSE policies_for.channel_id END,
           k.axis, k.limit_key,
           max((k.policy).quota_limit) OVER (PARTITION BY k.limit_key)
           + coalesce((SELECT sum(b.amount) FROM quota.boost b
                        WHERE b.expires_at > policies_for.at AND b.starts_at <= policies_for.at
                          AND b.metric = (k.policy).metric AND b.period = (k.policy).period
                          AND b.period_minutes IS NOT DISTINCT FROM (k.policy).period_minutes
                          AND b.model_group IS NOT DISTINCT FROM (k.policy).model_group
                          AND CASE k.axis
                                  WHEN 'key' THEN b.subject_type = 'key' AND b.subject_id = policies_for.key_id
                                  WHEN 'user' THEN (b.subject_type = 'user' AND b.subject_id = policies_for.user_id)
                                                OR (b.subject_type = 'user_group'
                                                    AND b.subject_id IN (SELECT g.group_id FROM groups g))
                                  ELSE false END), 0)
    FROM kept k
    ORDER BY quota.lock_order(k.axis, (k.policy).policy_id)
$$;

CREATE OR REPLACE FUNCTION quota.charge_expired(expired quota.reservation[], now_ts timestamptz) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v record;
    v_counter quota.counter;
BEGIN
    FOR v IN
        WITH holds AS (
            SELECT p, quota.policy_axis(p.subject_type) AS axis, h.scope_id, h.amount, h.lim, e.key_id, e.user_id,
                   w.window_start, w.window_end
            FROM unnest(expired) e,
                 unnest(e.hold_policy, e.hold_scope, e.hold_amount, e.hold_limit) AS h(policy_id, scope_id, amount, lim)
            JOIN quota.policy p ON p.policy_id = h.policy_id
            CROSS JOIN LATERAL quota.policy_window(p, now_ts) w
        )
        SELECT h.p, h.axis, h.scope_id, h.window_start, h.window_end, sum(h.amount) AS amount, max(h.lim) AS lim,
               min(h.key_id) AS key_id, min(h.user_id) AS user_id,
               CASE WHEN (h.p).window_mode = 'rolling' THEN '-infinity' ELSE h.window_start END AS counter_window
        FROM holds h
        GROUP BY h.p, h.axis, h.scope_id, h.window_start, h.window_end
        ORDER BY quota.lock_order(h.axis, (h.p).policy_id), h.scope_id
    LOOP
        -- rolls a stale window as settle does (roll_window! in src/lifecycle/mod.rs)
        UPDATE quota.counter c SET
            used = CASE WHEN c.window_start = v.counter_window THEN c.used ELSE 0 END
                   + CASE WHEN (v.p).window_mode = 'rolling' THEN 0 ELSE v.amount END,
            window_start = v.counter_window,
            reserved = c.reserved - v.amount
        WHERE c.policy_id = (v.p).policy_id AND c.scope_id = v.scope_id
        RETURNING c.* INTO v_counter;
        CONTINUE WHEN NOT FOUND;
        -- a mark from before the window is the ended window's: its recovery is logged first
        IF v_counter.exhausted_at < v_counter.window_start THEN
            PERFORM quota.recover_window((v.p).policy_id, v.scope_id,
                                         CASE v.axis WHEN 'key' THEN v.scope_id END,
                                         CASE v.axis WHEN 'user' THEN v.scope_id END,
                                         v.counter_window, now_ts, 'window_reset');
        END IF;
        IF (v.p).window_mode = 'rolling' THEN
            INSERT INTO quota.rolling_usage AS r (policy_id, scope_id, bucket, used)
            VALUES ((v.p).policy_id, v.scope_id, quota.minute_bucket(now_ts), v.amount)
            ON CONFLICT (policy_id, scope_id, bucket) DO UPDATE SET used = r.used + EXCLUDED.used;
        END IF;
        IF cardinality((v.p).alert_at) > 0 THEN
            PERFORM quota.cross_thresholds(v.p, v.scope_id, CASE v.axis WHEN 'key' THEN v.scope_id ELSE v.key_id END,
                                           CASE v.axis WHEN 'user' THEN v.scope_id ELSE v.user_id END,
                                           v.window_start, quota.window_used(v.p, v_counter, v.window_start),
                                           v.lim, now_ts);
        END IF;
        -- a shadow policy never marks, logs or acts on a spent window (admit logs shadow_refusal)
        IF (v.p).enforce AND quota.window_used(v.p, v_counter, v.window_start) >= v.lim
           AND NOT coalesce(v_counter.exhausted_at >= v_counter.window_start, false) THEN
            PERFORM quota.mark_exhausted(v.p, v.scope_id, CASE v.axis WHEN 'key' THEN v.scope_id ELSE v.key_id END,
                                         CASE v.axis WHEN 'user' THEN v.scope_id ELSE v.user_id END,
                                         v.window_start, v.window_end, now_ts);
        END IF;
    END LOOP;

    INSERT INTO quota.usage_ledger (request_id, settled_by, key_id, user_id, channel_id, model, input_tokens,
                                    output_tokens, cached_tokens, cost, billed, unbilled_reason,
                                    counted_in_key_global, counted_in_user_global,
                                    counted_policy, counted_scope, counted_window, counted_amount, settled_at)
    SELECT e.request_id, 'sweep', e.key_id, e.user_id, e.channel_id, e.model, e.est_input_tokens,
           e.max_output_tokens, 0, coalesce(c.cost, 0), c.cost IS NOT NULL,
           CASE WHEN c.cost IS NULL THEN 'price_not_found' END,
           e.counted_in_key_global, e.counted_in_user_global,
           coalesce(k.policies, '{}'), coalesce(k.scopes, '{}'), coalesce(k.windows, '{}'), coalesce(k.amounts, '{}'),
           now_ts
    FROM unnest(expired) e
    LEFT JOIN LATERAL (SELECT quota.cost_of(mp, e.est_input_tokens, e.max_output_tokens, 0) AS cost
                       FROM quota.price_for(e.model) mp) c ON true
    LEFT JOIN LATERAL (
        SELECT array_agg(h.policy_id ORDER BY h.n) AS policies, array_agg(h.scope_id ORDER BY h.n) AS scopes,
               array_agg(CASE WHEN p.window_mode = 'rolling' THEN quota.minute_bucket(now_ts) ELSE w.window_start END
                         ORDER BY h.n) AS windows,
               array_agg(h.amount ORDER BY h.n) AS amounts
        FROM unnest(e.hold_policy, e.hold_scope, e.hold_amount) WITH ORDINALITY AS h(policy_id, scope_id, amount, n)
        JOIN quota.policy p ON p.policy_id = h.policy_id
        CROSS JOIN LATERAL quota.policy_window(p, now_ts) w) k ON true
    -- the rollup rows in one order (the day is the same for all)
    ORDER BY e.key_id, e.model, coalesce(e.channel_id, 0), e.request_id;
END
$$;

DROP FUNCTION quota.status(bigint, text);
CREATE FUNCTION quota.status(key_id bigint, model text DEFAULT NULL)
RETURNS TABLE (policy_id bigint, subject_type text, subject_id bigint, model_group text, metric text,
               period text, window_mode text, quota_limit numeric, boost numeric, effective_limit numeric,
               used numeric, reserved numeric, remaining numeric, window_start timestamptz,
               next_reset timestamptz, state text, exclusive boolean, limit_key text,
               unbilled_requests bigint, enforce boolean)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH k AS (SELECT * FROM quota.api_key k WHERE k.key_id = status.key_id),
    now_ts AS (SELECT quota.clock() AS t)
    SELECT (f.policy).policy_id, (f.policy).subject_type, (f.policy).subject_id,
           (SELECT g.name FROM quota.model_group g WHERE g.model_group_id = (f.policy).model_group),
           (f.policy).metric, (f.policy).period, (f.policy).window_mode, (f.policy).quota_limit,
           trim_scale(f.effective_limit - max((f.policy).quota_limit) OVER (PARTITION BY f.limit_key)),
           trim_scale(f.effective_limit),
           s.used, s.reserved, s.remaining, s.window_start, s.next_reset,
           -- a window no longer spent (a boost) ends its suspension with the next request
           CASE WHEN s.used < f.effective_limit THEN 'ok'
                WHEN k.suspended_by = (f.policy).policy_id AND k.suspended_until > n.t THEN 'suspended'
                ELSE 'exhausted' END,
           (f.policy).exclusive, f.limit_key,
           (SELECT count(*) FROM quota.usage_ledger l
             WHERE l.key_id = k.key_id AND l.settled_at >= s.window_start AND l.settled_at <= n.t
               AND NOT l.billed AND l.settled_by <> 'correction'),
           (f.policy).enforce
    FROM k CROSS JOIN now_ts n
    CROSS JOIN LATERAL quota.policies_for(k.key_id, k.user_id, status.model, NULL, n.t) f
    CROSS JOIN LATERAL quota.window_state(f.policy, f.scope_id, f.effective_limit, n.t) s
    ORDER BY (f.policy).policy_id
$$;

-- Every new event is announced, in its transaction (delivered at commit, never after a
-- rollback), on the channel pg_quota_event. The payload names the event; it carries no detail
-- (nor any secret): a listener reads the row.
CREATE FUNCTION quota.event_notify() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_catalog.pg_notify('pg_quota_event', pg_catalog.json_build_object(
        'event_id', NEW.event_id, 'kind', NEW.kind, 'policy_id', NEW.policy_id,
        'key_id', NEW.key_id, 'user_id', NEW.user_id)::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER event_notify AFTER INSERT ON quota.event
    FOR EACH ROW EXECUTE FUNCTION quota.event_notify();

-- A policy's settled usage `used` of its window starting at window_start, for a scope, against
-- the effective limit (boosts included) it was judged by: logs one threshold_crossed event for
-- each of the policy's alert_at thresholds that the usage has reached and that was not logged
-- in this window yet, lowest first. The counter remembers the highest threshold logged
-- (alert_level, for the counter's window alert_window): a new window, quota.reset, an edit of
-- the policy re-arm every threshold, and usage below a logged threshold (a raised limit, a
-- boost, a rolling window's usage ageing out) re-arms those above it. Once per threshold and
-- window also under concurrency: the caller holds the counter row's lock (settle, the sweep's
-- charge), so a second caller sees the first's alert_level. Returns how many were logged.
CREATE FUNCTION quota.cross_thresholds(p quota.policy, scope_id bigint, key_id bigint, user_id bigint,
                                       window_start timestamptz, used numeric, effective_limit numeric,
                                       now_ts timestamptz)
RETURNS integer
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    -- a rolling window's counter never rolls (see quota.counter): its level falls as usage ages out
    v_window timestamptz := CASE WHEN p.window_mode = 'rolling' THEN '-infinity' ELSE window_start END;
    v_before numeric;
    v_level numeric;
    v_logged integer;
BEGIN
    SELECT CASE WHEN c.alert_window = v_window THEN c.alert_level END INTO v_before
    FROM quota.counter c WHERE c.policy_id = p.policy_id AND c.scope_id = cross_thresholds.scope_id;
    SELECT max(t) INTO v_level FROM unnest(p.alert_at) t WHERE used >= t * effective_limit;
    IF v_level IS NOT DISTINCT FROM v_before THEN
        RETURN 0;
    END IF;
    UPDATE quota.counter c SET alert_level = v_level, alert_window = v_window
    WHERE c.policy_id = p.policy_id AND c.scope_id = cross_thresholds.scope_id;
    INSERT INTO quota.event (at, kind, policy_id, key_id, user_id, detail)
    SELECT now_ts, 'threshold_crossed', p.policy_id, key_id, user_id,
           jsonb_build_object('scope_id', scope_id, 'subject_type', p.subject_type, 'subject_id', p.subject_id,
                              'metric', p.metric, 'window_start', window_start, 'threshold', t,
                              'used', trim_scale(used), 'limit', trim_scale(effective_limit))
    FROM unnest(p.alert_at) t
    WHERE t <= v_level AND t > coalesce(v_before, 0)
    ORDER BY t;
    GET DIAGNOSTICS v_logged = ROW_COUNT;
    RETURN v_logged;
END
$$;

-- A shadow policy (enforce = false) would have refused a request: logs a shadow_refusal event,
-- once per window (the counter's shadow_refused_at; a mark from before window_start is an
-- ended window's: a rolling window's start moves, so it logs again a window's length later).
-- why: 'exhausted' (the window is spent) or 'would_exceed' (a strict window the estimate would
-- overshoot). The caller holds the counter row's lock (admit, routing), so concurrent requests
-- log it once. Returns whether it logged.
CREATE FUNCTION quota.log_shadow_refusal(policy_id bigint, scope_id bigint, key_id bigint, user_id bigint,
                                         window_start timestamptz, used numeric, effective_limit numeric,
                                         why text, now_ts timestamptz)
RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    UPDATE quota.counter c SET shadow_refused_at = now_ts
    WHERE c.policy_id = log_shadow_refusal.policy_id AND c.scope_id = log_shadow_refusal.scope_id
      AND (c.shadow_refused_at IS NULL OR c.shadow_refused_at < log_shadow_refusal.window_start);
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO quota.event (at, kind, policy_id, key_id, user_id, detail)
    VALUES (now_ts, 'shadow_refusal', log_shadow_refusal.policy_id, key_id, user_id,
            jsonb_build_object('scope_id', scope_id, 'window_start', window_start, 'why', why,
                               'used', trim_scale(used), 'limit', trim_scale(effective_limit)));
    RETURN true;
END
$$;

-- The webhook notifier (`pg-quota-relay notify --name NAME`): how far it has read the event log.
-- It advances last_event_id in the same transaction as it records the deliveries of the events
-- up to there, so a restart resumes after the last event it recorded (at least once: an event
-- posted but not yet recorded is posted again; receivers deduplicate by event id).
CREATE TABLE quota.notifier_cursor (
    notifier       text PRIMARY KEY CHECK (notifier <> ''),
    last_event_id  bigint NOT NULL,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE quota.notifier_cursor IS
    'The last event each webhook notifier (pg-quota-relay notify --name) has read and recorded.';

-- Deliveries that did not succeed at the first attempt: retried with exponential backoff (at
-- next_attempt_at) until they succeed (status delivered) or --max-attempts is spent (status
-- failed, retried no more). A restarted notifier carries on from here. target names a webhook
-- URL without its secret path: its host and the first hex digits of its SHA-256.
CREATE TABLE quota.webhook_delivery (
    notifier         text NOT NULL,
    event_id         bigint NOT NULL,
    target           text NOT NULL,
    status           text NOT NULL CHECK (status IN ('retrying', 'delivered', 'failed')),
    attempts         integer NOT NULL CHECK (attempts > 0),
    last_error       text,
    next_attempt_at  timestamptz,
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (notifier, event_id, target)
);
COMMENT ON TABLE quota.webhook_delivery IS
    'Webhook deliveries that failed at least once: retrying (due at next_attempt_at), delivered later, or failed for good.';

SELECT pg_catalog.pg_extension_config_dump('quota.notifier_cursor', '');
SELECT pg_catalog.pg_extension_config_dump('quota.webhook_delivery', '');

REVOKE ALL ON FUNCTION quota.status(bigint, text), quota.event_notify(),
    quota.cross_thresholds(quota.policy, bigint, bigint, bigint, timestamptz, numeric, numeric, timestamptz),
    quota.log_shadow_refusal(bigint, bigint, bigint, bigint, timestamptz, numeric, numeric, text, timestamptz)
FROM PUBLIC;
REVOKE ALL ON quota.notifier_cursor, quota.webhook_delivery FROM PUBLIC;
GRANT EXECUTE ON FUNCTION quota.status(bigint, text) TO quota_admin;
GRANT SELECT, INSERT, UPDATE, DELETE ON quota.notifier_cursor, quota.webhook_delivery TO quota_admin;

-- Issue 19: batched admission
-- quota.admit_many and quota.settle_many (sql/schema/45_batch.sql), executable by the relay role.
CREATE FUNCTION quota.admit_many(api_keys text[], request_ids text[], models text[],
                                 est_input_tokens bigint[], max_output_tokens bigint[],
                                 channel_ids bigint[] DEFAULT NULL)
RETURNS TABLE (ordinal integer, allowed boolean, http_status integer, error_code text, message text,
               retry_after_s integer, key_id bigint, user_id bigint, channel_id bigint,
               upstream_base_url text, upstream_api_key text, upstream_model text,
               ratelimit_limit numeric, ratelimit_remaining numeric, ratelimit_metric text,
               ratelimit_reset_at timestamptz, sqlstate text)
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
AS 'MODULE_PATHNAME', 'admit_many_wrapper';

CREATE FUNCTION quota.settle_many(request_ids text[], input_tokens bigint[], output_tokens bigint[],
                                  cached_tokens bigint[] DEFAULT NULL)
RETURNS TABLE (ordinal integer, settled boolean, billed boolean, unbilled_reason text, cost numeric,
               replay boolean, sqlstate text, message text)
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
AS 'MODULE_PATHNAME', 'settle_many_wrapper';

REVOKE ALL ON FUNCTION quota.admit_many(text[], text[], text[], bigint[], bigint[], bigint[]),
    quota.settle_many(text[], bigint[], bigint[], bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION quota.admit_many(text[], text[], text[], bigint[], bigint[], bigint[]),
    quota.settle_many(text[], bigint[], bigint[], bigint[]) TO quota_relay;

-- Issue 19: daily rollups per statement (a batch's ledger rows upsert each rollup row once)
DROP TRIGGER usage_daily_add ON quota.usage_ledger;
CREATE OR REPLACE FUNCTION quota.usage_daily_add() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO quota.usage_daily AS d (day, key_id, user_id, model, channel_id, requests, input_tokens,
                                        output_tokens, cached_tokens, cost, unbilled)
    SELECT n.day, n.key_id, min(n.user_id), n.model, n.channel_id, sum(n.request), sum(n.input_tokens),
           sum(n.output_tokens), sum(n.cached_tokens), sum(n.cost),
           coalesce(sum(n.request) FILTER (WHERE NOT n.billed), 0)
    FROM (SELECT (r.settled_at AT TIME ZONE 'UTC')::date AS day, r.key_id, r.user_id, r.model,
                 coalesce(r.channel_id, 0) AS channel_id,
                 CASE WHEN r.settled_by = 'correction' THEN 0 ELSE 1 END AS request,
                 r.input_tokens, r.output_tokens, r.cached_tokens, r.cost, r.billed
          FROM new_rows r) n
    GROUP BY n.day, n.key_id, n.model, n.channel_id
    ORDER BY n.day, n.key_id, n.model, n.channel_id
    ON CONFLICT (day, key_id, model, channel_id) DO UPDATE SET
        requests      = d.requests + EXCLUDED.requests,
        input_tokens  = d.input_tokens + EXCLUDED.input_tokens,
        output_tokens = d.output_tokens + EXCLUDED.output_tokens,
        cached_tokens = d.cached_tokens + EXCLUDED.cached_tokens,
        cost          = d.cost + EXCLUDED.cost,
        unbilled      = d.unbilled + EXCLUDED.unbilled;
    RETURN NULL;
END
$$;

CREATE TRIGGER usage_daily_add AFTER INSERT ON quota.usage_ledger
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION quota.usage_daily_add();

-- Issue 19: the sweep charges expired reservations by the settle's code (one home for the rules
-- on counters: src/lifecycle/settle.rs). The sweep locks them; charge_expired takes them.
DROP FUNCTION quota.charge_expired(quota.reservation[], timestamptz);
CREATE FUNCTION quota.charge_expired(request_ids text[], now_ts timestamptz) RETURNS void
LANGUAGE c VOLATILE SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
AS 'MODULE_PATHNAME', 'charge_expired_wrapper';
REVOKE ALL ON FUNCTION quota.charge_expired(text[], timestamptz) FROM PUBLIC;
-- (only the old charge used it; the library keeps the symbol for 0.1.0 schemas)
DROP FUNCTION quota.minute_bucket(timestamptz);

CREATE OR REPLACE FUNCTION quota.sweep(OUT expired_reservations integer, OUT resumed_keys integer,
                            OUT recovered_windows integer, OUT pruned_buckets integer,
                            OUT pruned_released integer, OUT pruned_events integer)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_now timestamptz := quota.clock();
    v_ttl interval := current_setting('pg_quota.reservation_ttl')::interval;
    v_retention interval := current_setting('pg_quota.released_retention')::interval;
    v_event_retention interval := current_setting('pg_quota.event_retention')::interval;
    v_charge boolean := current_setting('pg_quota.expired_reservations') = 'charge';
    v_expired quota.reservation[];
    v_policies bigint[];  -- the holds of the expired reservations, summed per counter
    v_scopes bigint[];
    v_amounts numeric[];
    v_key bigint;
    v_ended record;
BEGIN
    WITH expired AS (
        SELECT r.* FROM quota.reservation r
        WHERE r.created_at < v_now - v_ttl
        ORDER BY r.request_id FOR UPDATE SKIP LOCKED
    ), logged AS (
        INSERT INTO quota.event (at, kind, key_id, user_id, detail)
        SELECT v_now, 'reservation_expired', e.key_id, e.user_id,
               jsonb_build_object('request_id', e.request_id, 'created_at', e.created_at,
                                  'action', CASE WHEN v_charge THEN 'charged' ELSE 'released' END)
        FROM expired e
    )
    SELECT coalesce(array_agg(e ORDER BY e.request_id), '{}') INTO v_expired FROM expired e;
    expired_reservations := cardinality(v_expired);

    IF v_charge THEN
        PERFORM quota.charge_expired(ARRAY(SELECT e.request_id FROM unnest(v_expired) e), v_now);
    ELSE
        DELETE FROM quota.reservation r WHERE r.request_id IN (SELECT e.request_id FROM unnest(v_expired) e);
        -- The expired reservations' holds are given back per counter, in lock order (a request
        -- that holds one counter while it waits for the next cannot be waiting for the sweep).
        INSERT INTO quota.released (request_id, key_id, user_id, channel_id, model, kind, reason, released_at)
        SELECT e.request_id, e.key_id, e.user_id, e.channel_id, e.model, 'expired',
               format('reservation older than %s s', extract(epoch FROM v_ttl)), v_now
        FROM unnest(v_expired) e;
        WITH holds AS (  -- summed per counter, numbered in lock order
            SELECT h.policy_id, h.scope_id, sum(h.amount) AS amount,
                   row_number() OVER (ORDER BY quota.lock_order(quota.policy_axis(p.subject_type), h.policy_id),
                                               h.scope_id) AS n
            FROM unnest(v_expired) e, unnest(e.hold_policy, e.hold_scope, e.hold_amount) AS h(policy_id, scope_id, amount)
            LEFT JOIN quota.policy p ON p.policy_id = h.policy_id
            GROUP BY h.policy_id, h.scope_id, p.subject_type
        )
        SELECT array_agg(h.policy_id ORDER BY h.n), array_agg(h.scope_id ORDER BY h.n), array_agg(h.amount ORDER BY h.n)
        INTO v_policies, v_scopes, v_amounts
        FROM holds h;
        PERFORM quota.release_holds(v_policies, v_scopes, v_amounts);
    END IF;

    -- Past the expiry, the sweep waits for no row: it already holds counters, and a request
    -- holding a row the sweep would wait for may be waiting for one of those. A row that a
    -- request holds is left to the next sweep (or to that request). Lock order still: the
    -- counters, then the keys.
    recovered_windows := 0;
    -- Spent windows that time has given room: a fixed window that has ended, a rolling window
    -- whose settled usage has aged out below its effective limit (boosts included, as admit
    -- judges it). A window that an admin's change frees (a boost, a second policy of the same
    -- limit) is found by the next request; judging every spent fixed window on every sweep
    -- would cost a policy selection each (about 0.1 ms) for a change that is logged already.
    FOR v_ended IN
        SELECT c.policy_id, c.scope_id, a.axis,
               CASE WHEN a.fixed THEN w.window_start ELSE 'infinity' END AS marked_before,
               CASE WHEN a.fixed THEN 'window_reset' ELSE 'window_not_spent' END AS why
        FROM quota.counter c
        JOIN quota.policy p ON p.policy_id = c.policy_id
        CROSS JOIN LATERAL quota.policy_window(p, v_now) w
        CROSS JOIN LATERAL (SELECT quota.policy_axis(p.subject_type) AS axis, p.window_mode = 'fixed' AS fixed) a
        WHERE c.exhausted_at IS NOT NULL
          AND CASE WHEN a.fixed THEN c.exhausted_at < w.window_start
                   ELSE quota.window_used(p, c, w.window_start) <
                        (SELECT f.effective_limit
                         FROM quota.policies_for(CASE a.axis WHEN 'key' THEN c.scope_id END,
                                                 CASE a.axis WHEN 'user' THEN c.scope_id END, NULL,
                                                 CASE a.axis WHEN 'channel' THEN c.scope_id END, v_now) f
                         WHERE (f.policy).policy_id = p.policy_id)
              END
        ORDER BY quota.lock_order(a.axis, c.policy_id), c.scope_id
        FOR UPDATE OF c SKIP LOCKED
    LOOP
        IF quota.recover_window(v_ended.policy_id, v_ended.scope_id,
                                CASE v_ended.axis WHEN 'key' THEN v_ended.scope_id END,
                                CASE v_ended.axis WHEN 'user' THEN v_ended.scope_id END,
                                v_ended.marked_before, v_now, v_ended.why) THEN
            recovered_windows := recovered_windows + 1;
        END IF;
    END LOOP;

    resumed_keys := 0;
    FOR v_key IN SELECT k.key_id FROM quota.api_key k WHERE k.suspended_until <= v_now
                 ORDER BY k.key_id FOR UPDATE SKIP LOCKED LOOP
        IF quota.resume_key(v_key, v_now) THEN
            resumed_keys := resumed_keys + 1;
        END IF;
    END LOOP;

    DELETE FROM quota.rolling_usage r
    USING quota.policy p, LATERAL quota.policy_window(p, v_now) w
    WHERE r.policy_id = p.policy_id AND r.bucket < w.window_start;
    GET DIAGNOSTICS pruned_buckets = ROW_COUNT;

    -- the markers of unpriced models' first request of a day are needed for that day only
    DELETE FROM quota.unpriced_model_day d WHERE d.day < (v_now AT TIME ZONE 'UTC')::date - 1;

    pruned_released := 0;
    IF v_retention > interval '0' THEN
        DELETE FROM quota.released r WHERE r.released_at < v_now - v_retention;
        GET DIAGNOSTICS pruned_released = ROW_COUNT;
    END IF;

    pruned_events := 0;
    IF v_event_retention > interval '0' THEN
        DELETE FROM quota.event e WHERE e.at < v_now - v_event_retention;
        GET DIAGNOSTICS pruned_events = ROW_COUNT;
    END IF;
END
$$;

-- Connections served by the new library look at the schema again (cache::schema in the library).
UPDATE quota.policy_generation SET generation = generation + 1;
