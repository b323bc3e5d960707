-- The ledger's partitions. quota.usage_ledger is partitioned by settled_at (10_tables.sql): one
-- partition per UTC day or per week from Monday (pg_quota.ledger_partition), each with its own
-- indexes, and a default partition that catches rows no partition takes. quota.maintain_ledger,
-- which the sweeper runs after each sweep, makes partitions a week ahead, files what the default
-- partition caught, closes ended partitions (their checkpoints), archives or drops partitions
-- past pg_quota.ledger_retention and forgets request ids past their horizon. Partitions made
-- here are ordinary tables of the DBA's (not members of the extension): pg_dump writes them,
-- with their rows and indexes, and a DBA may COPY, move or drop a detached one.

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
