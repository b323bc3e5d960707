-- The request lifecycle: admit before forwarding, settle or refund after; each call is one
-- transaction. admit and settle, the hot path, are native code over SPI (src/lifecycle/); the
-- SQL helpers here serve them, refund, the sweep and the admin views, so that every rule has one
-- home. Lock order everywhere: the reservation row, then the counters (channel counters first,
-- then the rest in policy_id order: quota.lock_order, the order of quota.policies_for and of a
-- reservation's holds), then the day's rollup row (settle: the ledger trigger runs at the end
-- of the statement that updates the counters), then the api_key row, so concurrent calls
-- cannot deadlock.
--
-- The entry points force generic plans: their statements' parameters never change the best plan
-- (every lookup is by key), and custom plans would re-plan every statement of every call.
--
-- Only the SECURITY DEFINER entry points pin search_path. The helpers below them do not: they
-- schema-qualify every object and run under their caller's pinned path, and a SET clause on
-- each would cost a search-path recomputation per call and prevent inlining.

CREATE TYPE quota.admission AS (
    allowed              boolean,
    http_status          integer,
    error_code           text,
    message              text,
    retry_after_s        integer,
    key_id               bigint,
    user_id              bigint,
    channel_id           bigint,
    upstream_base_url    text,
    upstream_api_key     text,
    upstream_model       text,
    ratelimit_limit      numeric,
    ratelimit_remaining  numeric,
    ratelimit_metric     text,
    ratelimit_reset_at   timestamptz
);

CREATE TYPE quota.settlement AS (
    settled          boolean,
    billed           boolean,
    unbilled_reason  text,
    cost             numeric,
    replay           boolean
);

-- The axis a policy counts on: a key's own policies; a user's, own and through its groups (one
-- axis, so they merge); a channel's.
CREATE FUNCTION quota.policy_axis(subject_type text) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE subject_type WHEN 'user_group' THEN 'user' ELSE subject_type END
$$;

-- The lock order of counters, as a sort key: a channel's counters first (every customer of the
-- channel shares them, and routing locks them before the rest), then by policy_id. Every
-- statement that locks counters, or lists policies for a caller that will, sorts by this (then
-- by scope_id where it spans scopes), so that concurrent calls cannot deadlock.
CREATE FUNCTION quota.lock_order(axis text, policy_id bigint) RETURNS bigint[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ARRAY[CASE axis WHEN 'channel' THEN 0 ELSE 1 END, policy_id]
$$;

-- The one place that decides which policies a request counts on (admit, a late settle, status),
-- in lock order (the channel's policies first, then by policy_id), with for each:
--   scope_id         whose counter it is: the key, the user (also for group policies: each
--                    member has its own counter and the full amount), or the channel;
--   limit_key        policies of one axis with the same model group, metric, period and window
--                    kind form one limit; shadow policies (enforce = false) form limits of their
--                    own, so a shadow limit never raises an enforced one;
--   effective_limit  the largest quota_limit of that limit's policies (several sources merge by
--                    MAX) plus the boosts active at `at` for that axis, model group, metric and
--                    period. A limit admits a request when any of its policies does.
-- model = NULL lists every policy the key is subject to, for any model. Otherwise only global
-- policies and those of the model's group (or, for a model not in a group, the group of the
-- model it is priced as: quota.price_for) apply, and an exclusive model-group policy takes the
-- request out of the global policies of its axis (billing isolation).
CREATE FUNCTION quota.policies_for(key_id bigint, user_id bigint, model text, channel_id bigint,
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

-- One window contains any instant: tell the planner (its default guess for a set-returning
-- function, 1,000 rows, made queries over many policies look costly enough to JIT-compile,
-- which took quota.drift from 50 ms to 1.5 s).
ALTER FUNCTION quota.window_bounds(text, integer, text, timestamptz, text, integer, integer, timestamptz) ROWS 1;

-- A policy's window containing `at` (see quota.window_bounds).
CREATE FUNCTION quota.policy_window(p quota.policy, at timestamptz)
RETURNS TABLE (window_start timestamptz, window_end timestamptz)
LANGUAGE sql IMMUTABLE ROWS 1 AS $$
    SELECT w.window_start, w.window_end
    FROM quota.window_bounds(p.period, p.period_minutes, p.window_mode, p.anchor, p.time_zone,
                             p.week_start, p.reset_hour, at) w
$$;

-- "daily spending quota of this API key", … for client messages that carry no amounts.
CREATE FUNCTION quota.policy_words(p quota.policy) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT CASE p.period WHEN '5h' THEN '5-hour' WHEN 'day' THEN 'daily' WHEN 'week' THEN 'weekly'
                         WHEN 'month' THEN 'monthly' WHEN 'minutes' THEN p.period_minutes || '-minute'
                         ELSE 'lifetime' END
           || CASE p.window_mode WHEN 'rolling' THEN ' rolling ' ELSE ' ' END
           || CASE p.metric WHEN 'cost' THEN 'spending' WHEN 'tokens' THEN 'token' ELSE 'request' END
           || ' quota'
           || coalesce(' for ' || (SELECT '"' || g.name || '"' FROM quota.model_group g
                                    WHERE g.model_group_id = p.model_group) || ' models', '')
           || CASE p.subject_type WHEN 'key' THEN ' of this API key' WHEN 'user' THEN ' of this user'
                                  WHEN 'user_group' THEN ' of your user group'
                                  ELSE ' of the upstream channel' END
$$;

-- Settled usage of a counter in the window starting at window_start (expiry-aware: a counter
-- whose stored window is not the current one has used nothing in the current one).
CREATE FUNCTION quota.window_used(p quota.policy, c quota.counter, window_start timestamptz)
RETURNS numeric
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF c.policy_id IS NULL THEN
        RETURN 0;
    ELSIF p.window_mode = 'rolling' THEN
        RETURN (SELECT coalesce(sum(r.used), 0) FROM quota.rolling_usage r
                 WHERE r.policy_id = c.policy_id AND r.scope_id = c.scope_id AND r.bucket >= window_start);
    ELSIF c.window_start = window_start THEN
        RETURN c.used;
    END IF;
    RETURN 0;
END
$$;

-- When a blocked window frees up: its end for fixed windows; for rolling windows the moment the
-- oldest counted bucket leaves it (or a minute, when only in-flight holds block it).
CREATE FUNCTION quota.window_frees_at(p quota.policy, scope_id bigint, window_start timestamptz,
                                      window_end timestamptz, now_ts timestamptz)
RETURNS timestamptz
LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN p.window_mode = 'rolling' THEN
        coalesce((SELECT min(r.bucket) FROM quota.rolling_usage r
                   WHERE r.policy_id = p.policy_id AND r.scope_id = window_frees_at.scope_id
                     AND r.bucket >= window_start AND r.used > 0) + (window_end - window_start),
                 now_ts + interval '1 minute')
        ELSE window_end END
$$;

-- The entry points are native code (src/lifecycle/): see there for why. A connection keeps
-- their plans for its lifetime (generic plans, made once); every statement in them is a keyed
-- lookup, so they are planned without sequential scans: a plan made while a table was empty
-- (a fresh install, or the reservation table right after VACUUM truncated it) would otherwise
-- read that table in full on every call once it has grown, until the next ANALYZE. JIT is off:
-- it never pays for statements this small, and a scan that has no index to use instead (a
-- one-row table) carries the cost penalty that would otherwise trigger it on every call.
CREATE FUNCTION quota.admit(api_key text, request_id text, model text, est_input_tokens bigint,
                            max_output_tokens bigint, channel_id bigint DEFAULT NULL)
RETURNS quota.admission
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
AS 'MODULE_PATHNAME', 'admit_wrapper';

-- Ends the suspension of one key and logs it: one that has run out by now_ts, or, given `by` (why
-- it ends early: admit found the window that caused it no longer spent), any. Safe to race (only
-- one caller logs).
CREATE FUNCTION quota.resume_key(key_id bigint, now_ts timestamptz, by text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_policy bigint;
    v_user   bigint;
BEGIN
    UPDATE quota.api_key k SET suspended_until = NULL, suspended_by = NULL
    FROM (SELECT k2.key_id, k2.suspended_by FROM quota.api_key k2
          WHERE k2.key_id = resume_key.key_id FOR UPDATE) old
    WHERE k.key_id = old.key_id AND k.suspended_until IS NOT NULL
      AND (k.suspended_until <= now_ts OR resume_key.by IS NOT NULL)
    RETURNING old.suspended_by, k.user_id INTO v_policy, v_user;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO quota.event (at, kind, policy_id, key_id, user_id, detail)
    VALUES (now_ts, 'resumed', v_policy, resume_key.key_id, v_user,
            jsonb_strip_nulls(jsonb_build_object('by', resume_key.by)));
    RETURN true;
END
$$;

-- Gives back holds that will not be settled (refund, expiry): amounts[i] on the counter of
-- policies[i] for scopes[i], one after the other, so in lock order when given in lock order.
CREATE FUNCTION quota.release_holds(policies bigint[], scopes bigint[], amounts numeric[]) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    i integer;
BEGIN
    FOR i IN 1 .. coalesce(array_length(policies, 1), 0) LOOP
        UPDATE quota.counter c SET reserved = c.reserved - amounts[i]
        WHERE c.policy_id = policies[i] AND c.scope_id = scopes[i];
    END LOOP;
END
$$;

CREATE FUNCTION quota.settle(request_id text, input_tokens bigint, output_tokens bigint,
                             cached_tokens bigint DEFAULT 0)
RETURNS quota.settlement
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
AS 'MODULE_PATHNAME', 'settle_wrapper';

-- A window just reached its limit: remember it once, log it, and suspend the key when the
-- policy says so (until the window frees up; a total window never does).
CREATE FUNCTION quota.mark_exhausted(p quota.policy, scope_id bigint, key_id bigint, user_id bigint,
                                     window_start timestamptz, window_end timestamptz, now_ts timestamptz)
RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_until timestamptz;
BEGIN
    UPDATE quota.counter c SET exhausted_at = now_ts
    WHERE c.policy_id = p.policy_id AND c.scope_id = mark_exhausted.scope_id;
    INSERT INTO quota.event (at, kind, policy_id, key_id, user_id, detail)
    VALUES (now_ts, 'exhausted', p.policy_id, key_id, user_id,
            jsonb_build_object('scope_id', scope_id, 'window_start', window_start));
    IF p.on_exhausted = 'disable' THEN
        v_until := coalesce(quota.window_frees_at(p, scope_id, window_start, window_end, now_ts), 'infinity');
        UPDATE quota.api_key k SET suspended_until = greatest(coalesce(k.suspended_until, v_until), v_until),
                                   suspended_by = p.policy_id
        WHERE k.key_id = mark_exhausted.key_id;
        INSERT INTO quota.event (at, kind, policy_id, key_id, user_id, detail)
        VALUES (now_ts, 'disabled', p.policy_id, key_id, user_id, jsonb_build_object('until', v_until));
    END IF;
END
$$;

-- A window found spent is not any more: it has ended (by 'window_reset'; the counter marked it
-- before marked_before, the start of the window that followed) or it has room again (by
-- 'window_not_spent', marked_before infinity: a boost, a rolling window's usage ageing out).
-- Clears the mark and logs it with the start of the window that was spent, once: a concurrent
-- caller, or a mark set anew in the current window, finds nothing to clear.
CREATE FUNCTION quota.recover_window(policy_id bigint, scope_id bigint, key_id bigint, user_id bigint,
                                     marked_before timestamptz, now_ts timestamptz, by text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_spent_at timestamptz;
BEGIN
    UPDATE quota.counter c SET exhausted_at = NULL
    FROM (SELECT c2.policy_id, c2.scope_id, c2.exhausted_at FROM quota.counter c2
          WHERE c2.policy_id = recover_window.policy_id AND c2.scope_id = recover_window.scope_id
          FOR UPDATE) old
    WHERE c.policy_id = old.policy_id AND c.scope_id = old.scope_id AND c.exhausted_at < marked_before
    RETURNING old.exhausted_at INTO v_spent_at;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO quota.event (at, kind, policy_id, key_id, user_id, detail)
    SELECT now_ts, 'recovered', p.policy_id, recover_window.key_id, recover_window.user_id,
           jsonb_build_object('scope_id', recover_window.scope_id, 'window_start', w.window_start,
                              'by', recover_window.by)
    FROM quota.policy p CROSS JOIN LATERAL quota.policy_window(p, v_spent_at) w
    WHERE p.policy_id = recover_window.policy_id;
    RETURN true;
END
$$;

-- A late settle (or refund) of a request that the sweep charged at its reservation: corrects
-- the charge to the measured usage (input/output/cached; a refund's is zero) with one
-- correction row in the ledger, the difference per counted policy. The difference reaches a
-- window only while it is the window the sweep charged (a fixed window still current, a rolling
-- window's bucket still inside it) and was not cleared since (quota.reset, an edit of what the
-- policy measures); an ended window keeps what it was charged. Only the first correction
-- counts: returns NULL when the request has one already or was not charged by the sweep, else
-- the request's cost after the correction and whether it is billed. Locks the counters in the
-- order of the sweep's row (the lock order), then the day's rollup row.
CREATE FUNCTION quota.correct_swept(request_id text, input_tokens bigint, output_tokens bigint,
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

-- Planned like admit and settle (see above quota.admit).
CREATE FUNCTION quota.refund(request_id text, reason text DEFAULT NULL) RETURNS boolean
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

-- The models a key may use, for GET /v1/models. A key that admit would refuse with 401 or 403
-- is refused the same way: 28000 for an unknown key; PQ403 with admit's message and its error
-- code in DETAIL for a disabled or expired key or a disabled user (quota.key_refusal, the rule
-- admit applies). A suspended key (a 429) may still list.
CREATE FUNCTION quota.models(api_key text) RETURNS TABLE (model text, owned_by text)
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
