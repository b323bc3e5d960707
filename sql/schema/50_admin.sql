-- Admin-side functions: manual reset, status, sweep, drift check.

-- Clears the current window's usage and unblocks, keeping the anchor and the window (so the
-- next reset stays where it was). In-flight holds stay: their settle or refund releases them.
CREATE FUNCTION quota.reset(policy_id bigint) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_now timestamptz := quota.clock();
BEGIN
    IF NOT EXISTS (SELECT 1 FROM quota.policy p WHERE p.policy_id = reset.policy_id) THEN
        RAISE EXCEPTION 'reset: no policy with policy_id %', reset.policy_id USING ERRCODE = 'PQ404';
    END IF;
    PERFORM quota.clear_usage(reset.policy_id, v_now);
    INSERT INTO quota.event (at, kind, policy_id) VALUES (v_now, 'reset', reset.policy_id);
    PERFORM quota.lift_suspensions(reset.policy_id, 'reset', v_now);
END
$$;

-- A policy's counter for one scope as of `at`, expiry-aware (a window that has rolled shows its
-- new, empty state even if no request has touched it yet): what quota.status and
-- quota.channel_status show for each policy.
CREATE FUNCTION quota.window_state(p quota.policy, scope_id bigint, effective_limit numeric, at timestamptz)
RETURNS TABLE (used numeric, reserved numeric, remaining numeric, window_start timestamptz,
               next_reset timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT trim_scale(u.used), trim_scale(coalesce(c.reserved, 0)),
           trim_scale(greatest(effective_limit - u.used - coalesce(c.reserved, 0), 0)),
           w.window_start,
           CASE WHEN p.window_mode = 'fixed' THEN w.window_end
                WHEN u.used > 0 THEN quota.window_frees_at(p, window_state.scope_id, w.window_start, w.window_end, at) END
    FROM quota.policy_window(p, at) w
    LEFT JOIN quota.counter c ON c.policy_id = p.policy_id AND c.scope_id = window_state.scope_id
    CROSS JOIN LATERAL (SELECT quota.window_used(p, c, w.window_start) AS used) u
$$;

-- One row per policy that applies to the key, as of quota.clock(). With a model, only the
-- policies a request for that model counts on (model groups and billing isolation applied);
-- without, every policy the key is subject to: its own, its user's, its user's groups'.
-- effective_limit is what the request is judged against (several sources merged by MAX, plus
-- active boosts); limit_key groups the policies that form one limit. unbilled_requests: the
-- key's requests settled in the window without a price or without usage (cost policies could
-- not count them; see the unpriced_model events). enforce false: a shadow policy, whose state
-- is the one it would have (it never refuses or suspends: it logs shadow_refusal instead).
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

-- Every channel with its caps as of quota.clock(): one row per channel policy (one row with NULL
-- policy columns for a channel without caps). state: ok; capped (this cap is spent: routing
-- skips the channel until next_reset); disabled.
CREATE FUNCTION quota.channel_status()
RETURNS TABLE (channel_id bigint, name text, status text, priority integer, weight integer,
               models text[], policy_id bigint, metric text, period text, quota_limit numeric,
               used numeric, reserved numeric, remaining numeric, window_start timestamptz,
               next_reset timestamptz, state text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    WITH now_ts AS (SELECT quota.clock() AS t),
    caps AS (
        SELECT ch.channel_id, f.policy, f.effective_limit, s.*
        FROM quota.channel ch CROSS JOIN now_ts n
        CROSS JOIN LATERAL quota.policies_for(NULL, NULL, NULL, ch.channel_id, n.t) f
        CROSS JOIN LATERAL quota.window_state(f.policy, f.scope_id, f.effective_limit, n.t) s
    )
    SELECT ch.channel_id, ch.name, ch.status, ch.priority, ch.weight,
           (SELECT coalesce(array_agg(cm.model ORDER BY cm.model), '{}') FROM quota.channel_model cm
             WHERE cm.channel_id = ch.channel_id),
           (k.policy).policy_id, (k.policy).metric, (k.policy).period, k.effective_limit,
           k.used, k.reserved, k.remaining, k.window_start, k.next_reset,
           CASE WHEN ch.status <> 'enabled' THEN 'disabled'
                WHEN k.used >= k.effective_limit THEN 'capped'
                ELSE 'ok' END
    FROM quota.channel ch
    LEFT JOIN caps k ON k.channel_id = ch.channel_id
    ORDER BY ch.priority DESC, ch.channel_id, (k.policy).policy_id
$$;

-- Charges expired reservations at their estimate, as a settle of it would (an unknown outcome
-- is not free), by the settle's own code (src/lifecycle/settle.rs, charge_expired): takes each
-- reservation still there, moves its holds to the usage of their policies' windows now, marks,
-- logs and acts on a window this spends and logs the alert thresholds it crosses, and writes one
-- ledger row per reservation (settled_by 'sweep': est_input_tokens + max_output_tokens at the
-- model's price; unbilled only for a model without a price). A late settle corrects the charge
-- (quota.correct_swept).
CREATE FUNCTION quota.charge_expired(request_ids text[], now_ts timestamptz) RETURNS void
LANGUAGE c VOLATILE SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
AS 'MODULE_PATHNAME', 'charge_expired_wrapper';

-- Charges reservations older than pg_quota.reservation_ttl (a crashed relay's, a lost settle)
-- at their reservation (quota.charge_expired), or with pg_quota.expired_reservations =
-- 'release' gives their holds back uncharged; either is logged (reservation_expired). Resumes keys
-- whose suspension ran out, logs the recovery of spent windows that time has given room (fixed
-- ones that have ended, rolling ones whose usage has aged out: requests log it too, lazily, but
-- a window may recover with no request to see it), prunes rolling buckets
-- no window covers any more, records of released reservations older than
-- pg_quota.released_retention and events older than pg_quota.event_retention (when set).
-- Logged; safe to run concurrently with traffic and with itself. Run it from pg_cron or the
-- background worker.
CREATE FUNCTION quota.sweep(OUT expired_reservations integer, OUT resumed_keys integer,
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

-- Recomputes every counter's current window (as admit would see it: a window that has ended
-- holds nothing) from the ledger and the live reservations; returns only the counters that
-- disagree (none when healthy). It reads the live ledger from the earliest current window on
-- (all of its open partitions only while a lifetime window counts; closed partitions count
-- through their checkpoints, quota.ledger_checkpoint), pruned to the partitions of that range and found by a
-- BRIN index on settled_at, and joins it to the counters by hash: linear in the rows of the
-- current windows, not in the ledger's size.
CREATE FUNCTION quota.drift()
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
