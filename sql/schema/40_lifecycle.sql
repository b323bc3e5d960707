-- The request lifecycle: admit before forwarding, settle or refund after. Each call is one
-- transaction. Lock order everywhere: reservation row, then counters in policy_id order, then
-- the api_key row, so concurrent calls cannot deadlock.
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

-- The policies a key is subject to, in lock order. The one place that decides which policies
-- apply to a request (admit, a late settle, status).
CREATE FUNCTION quota.policies_for(key_id bigint, user_id bigint) RETURNS SETOF quota.policy
LANGUAGE sql STABLE AS $$
    SELECT p.* FROM quota.policy p
    WHERE p.enabled AND ((p.subject_type = 'key' AND p.subject_id = policies_for.key_id)
                      OR (p.subject_type = 'user' AND p.subject_id = policies_for.user_id))
    ORDER BY p.policy_id
$$;

-- The scope a policy's counter counts for, for a request by this key.
CREATE FUNCTION quota.scope_of(p quota.policy, key_id bigint, user_id bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p.subject_type WHEN 'key' THEN key_id ELSE user_id END
$$;

-- A policy's window containing `at` (see quota.window_bounds).
CREATE FUNCTION quota.policy_window(p quota.policy, at timestamptz)
RETURNS TABLE (window_start timestamptz, window_end timestamptz)
LANGUAGE sql IMMUTABLE AS $$
    SELECT w.window_start, w.window_end
    FROM quota.window_bounds(p.period, p.period_minutes, p.window_mode, p.anchor, p.time_zone,
                             p.week_start, p.reset_hour, at) w
$$;

-- "daily cost quota", "5-hour token quota", … for client messages that carry no amounts.
CREATE FUNCTION quota.policy_words(p quota.policy) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE p.period WHEN '5h' THEN '5-hour' WHEN 'day' THEN 'daily' WHEN 'week' THEN 'weekly'
                         WHEN 'month' THEN 'monthly' WHEN 'minutes' THEN p.period_minutes || '-minute'
                         ELSE 'lifetime' END
           || CASE p.window_mode WHEN 'rolling' THEN ' rolling ' ELSE ' ' END
           || CASE p.metric WHEN 'cost' THEN 'spending' WHEN 'tokens' THEN 'token' ELSE 'request' END
           || ' quota of this ' || CASE p.subject_type WHEN 'key' THEN 'API key' ELSE 'user' END
$$;

-- The amount a policy counts for a usage: money, raw tokens, or one request.
CREATE FUNCTION quota.metric_amount(metric text, cost numeric, input_tokens bigint, output_tokens bigint)
RETURNS numeric
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE metric WHEN 'cost' THEN cost
                       WHEN 'tokens' THEN input_tokens + output_tokens
                       ELSE 1 END
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

CREATE FUNCTION quota.admit(api_key text, request_id text, model text, est_input_tokens bigint,
                            max_output_tokens bigint, channel_id bigint DEFAULT NULL)
RETURNS quota.admission
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_now      timestamptz := quota.clock();
    v_found    record;
    v_key      quota.api_key;
    v_user_ok  boolean;
    v_out      quota.admission;
    v_policy   quota.policy;
    v_counter  quota.counter;
    v_ws       timestamptz;
    v_we       timestamptz;
    v_cost     numeric;
    v_amount   numeric;
    v_used     numeric;
    v_scope    bigint;
    v_frees    timestamptz;
    v_left     numeric;
    v_tight    numeric;
    v_policies bigint[] := '{}';
    v_scopes   bigint[] := '{}';
    v_amounts  numeric[] := '{}';
    v_starts   timestamptz[] := '{}';
    i          integer;
BEGIN
    IF coalesce(admit.request_id, '') = '' OR coalesce(admit.model, '') = ''
       OR admit.est_input_tokens IS NULL OR admit.est_input_tokens < 0
       OR admit.max_output_tokens IS NULL OR admit.max_output_tokens < 0 THEN
        RAISE EXCEPTION 'admit: request_id and model are required and token estimates must be >= 0'
            USING ERRCODE = 'PQ400';
    END IF;

    v_out.allowed := false;
    v_out.channel_id := admit.channel_id;

    SELECT k AS key, u.enabled AS user_ok INTO v_found
    FROM quota.key_for_secret(admit.api_key) k JOIN quota.app_user u ON u.user_id = k.user_id;
    IF NOT FOUND THEN
        v_out.http_status := 401; v_out.error_code := 'invalid_api_key';
        v_out.message := 'Incorrect API key provided.';
        RETURN v_out;
    END IF;
    v_key := v_found.key;
    v_user_ok := v_found.user_ok;
    v_out.key_id := v_key.key_id;
    v_out.user_id := v_key.user_id;

    IF NOT v_key.enabled THEN
        v_out.http_status := 403; v_out.error_code := 'key_disabled';
        v_out.message := 'This API key has been disabled.';
        RETURN v_out;
    ELSIF NOT v_user_ok THEN
        v_out.http_status := 403; v_out.error_code := 'user_disabled';
        v_out.message := 'The user that owns this API key has been disabled.';
        RETURN v_out;
    ELSIF v_key.expires_at IS NOT NULL AND v_key.expires_at <= v_now THEN
        v_out.http_status := 403; v_out.error_code := 'key_expired';
        v_out.message := 'This API key has expired.';
        RETURN v_out;
    ELSIF v_key.suspended_until > v_now THEN
        v_out.http_status := 429; v_out.error_code := 'token_quota_policy_exhausted';
        v_out.retry_after_s := CASE WHEN isfinite(v_key.suspended_until)
                                    THEN ceil(extract(epoch FROM v_key.suspended_until - v_now))::int END;
        v_out.message := 'This API key is suspended because a quota was exhausted. '
            || CASE WHEN isfinite(v_key.suspended_until)
                    THEN 'It resumes in ' || quota.approx_duration(v_out.retry_after_s) || '.'
                    ELSE 'It does not resume by itself; ask an administrator.' END;
        RETURN v_out;
    END IF;

    IF EXISTS (SELECT 1 FROM quota.usage_ledger l WHERE l.request_id = admit.request_id
               UNION ALL SELECT 1 FROM quota.released r WHERE r.request_id = admit.request_id) THEN
        RAISE EXCEPTION 'admit: request_id % was already used', admit.request_id USING ERRCODE = 'PQ409';
    END IF;

    -- NULL when the model has no price: cost policies cannot judge such a request; it passes
    -- them and is recorded as unbilled at settle.
    v_cost := quota.price_of(admit.model, admit.est_input_tokens, admit.max_output_tokens, 0);

    -- Pass 1: lock every applicable counter in policy_id order and check; nothing is written
    -- unless every policy passes (all-or-nothing).
    FOR v_policy IN SELECT p.* FROM quota.policies_for(v_key.key_id, v_key.user_id) p LOOP
        v_amount := quota.metric_amount(v_policy.metric, v_cost, admit.est_input_tokens, admit.max_output_tokens);
        CONTINUE WHEN v_amount IS NULL;
        v_scope := quota.scope_of(v_policy, v_key.key_id, v_key.user_id);
        SELECT w.window_start, w.window_end INTO v_ws, v_we FROM quota.policy_window(v_policy, v_now) w;

        SELECT c.* INTO v_counter FROM quota.counter c
        WHERE c.policy_id = v_policy.policy_id AND c.scope_id = v_scope FOR UPDATE;
        IF NOT FOUND THEN
            -- First request of this scope: create the row, then lock it like any other, so
            -- concurrent first requests are checked one after the other.
            INSERT INTO quota.counter AS c (policy_id, scope_id, window_start)
            VALUES (v_policy.policy_id, v_scope, v_ws) ON CONFLICT DO NOTHING;
            SELECT c.* INTO v_counter FROM quota.counter c
            WHERE c.policy_id = v_policy.policy_id AND c.scope_id = v_scope FOR UPDATE;
        END IF;

        v_used := quota.window_used(v_policy, v_counter, v_ws);
        IF v_used >= v_policy.quota_limit
           OR (v_policy.boundary = 'strict' AND v_used + v_counter.reserved + v_amount > v_policy.quota_limit) THEN
            v_frees := quota.window_frees_at(v_policy, v_scope, v_ws, v_we, v_now);
            v_out.http_status := 429;
            v_out.error_code := 'token_quota_policy_exhausted';
            v_out.retry_after_s := CASE WHEN v_frees IS NOT NULL
                                        THEN greatest(1, ceil(extract(epoch FROM v_frees - v_now)))::int END;
            v_out.message := CASE WHEN v_used >= v_policy.quota_limit
                                  THEN 'The ' || quota.policy_words(v_policy) || ' is exhausted. '
                                  ELSE 'This request would exceed the ' || quota.policy_words(v_policy) || '. ' END
                || CASE WHEN v_frees IS NULL THEN 'It does not reset.'
                        ELSE 'It resets in ' || quota.approx_duration(v_out.retry_after_s) || '.' END;
            RETURN v_out;
        END IF;

        v_policies := v_policies || v_policy.policy_id;
        v_scopes := v_scopes || v_scope;
        v_amounts := v_amounts || v_amount;
        v_starts := v_starts || v_ws;

        -- The tightest window (least remaining share of its limit) feeds the rate-limit headers.
        v_left := greatest(v_policy.quota_limit - v_used - v_counter.reserved - v_amount, 0);
        IF v_tight IS NULL OR v_left / v_policy.quota_limit < v_tight THEN
            v_tight := v_left / v_policy.quota_limit;
            v_out.ratelimit_limit := v_policy.quota_limit;
            v_out.ratelimit_remaining := v_left;
            v_out.ratelimit_metric := v_policy.metric;
            v_out.ratelimit_reset_at := v_we;
        END IF;
    END LOOP;

    -- Pass 2: every policy passed; roll stale windows and reserve on all of them.
    FOR i IN 1 .. coalesce(array_length(v_policies, 1), 0) LOOP
        UPDATE quota.counter c SET
            used         = CASE WHEN c.window_start = v_starts[i] THEN c.used ELSE 0 END,
            exhausted_at = CASE WHEN c.window_start = v_starts[i] THEN c.exhausted_at END,
            reset_at     = CASE WHEN c.window_start = v_starts[i] THEN c.reset_at END,
            window_start = v_starts[i],
            reserved     = c.reserved + v_amounts[i]
        WHERE c.policy_id = v_policies[i] AND c.scope_id = v_scopes[i];
    END LOOP;

    INSERT INTO quota.reservation (request_id, key_id, user_id, channel_id, model, est_input_tokens,
                                   max_output_tokens, hold_policy, hold_scope, hold_amount, created_at)
    VALUES (admit.request_id, v_key.key_id, v_key.user_id, admit.channel_id, admit.model,
            admit.est_input_tokens, admit.max_output_tokens, v_policies, v_scopes, v_amounts, v_now);

    -- A suspension that has run out ends here, lazily (quota.sweep() does it too).
    IF v_key.suspended_until IS NOT NULL THEN
        PERFORM quota.resume_key(v_key.key_id, v_now);
    END IF;

    v_out.allowed := true;
    v_out.http_status := 200;
    RETURN v_out;
END
$$;

-- Ends a run-out suspension of one key and logs it; safe to race (only one caller logs).
CREATE FUNCTION quota.resume_key(key_id bigint, now_ts timestamptz) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_policy bigint;
    v_user   bigint;
BEGIN
    UPDATE quota.api_key k SET suspended_until = NULL, suspended_by = NULL
    FROM (SELECT k2.key_id, k2.suspended_by FROM quota.api_key k2
          WHERE k2.key_id = resume_key.key_id FOR UPDATE) old
    WHERE k.key_id = old.key_id AND k.suspended_until <= now_ts
    RETURNING old.suspended_by, k.user_id INTO v_policy, v_user;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO quota.event (at, kind, policy_id, key_id, user_id)
    VALUES (now_ts, 'resumed', v_policy, resume_key.key_id, v_user);
    RETURN true;
END
$$;

-- Gives back the holds of a reservation that will not be settled (refund, expiry).
CREATE FUNCTION quota.release_holds(r quota.reservation) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    i integer;
BEGIN
    FOR i IN 1 .. coalesce(array_length(r.hold_policy, 1), 0) LOOP
        UPDATE quota.counter c SET reserved = c.reserved - r.hold_amount[i]
        WHERE c.policy_id = r.hold_policy[i] AND c.scope_id = r.hold_scope[i];
    END LOOP;
END
$$;

CREATE FUNCTION quota.settle(request_id text, input_tokens bigint, output_tokens bigint,
                             cached_tokens bigint DEFAULT 0)
RETURNS quota.settlement
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_now      timestamptz := quota.clock();
    v_res      quota.reservation;
    v_ledger   quota.usage_ledger;
    v_released quota.released;
    v_policy   quota.policy;
    v_cost     numeric;
    v_reason   text;
    v_actual   numeric;
    v_used     numeric;
    v_exhausted timestamptz;
    v_ws       timestamptz;
    v_we       timestamptz;
    v_cpolicy  bigint[] := '{}';
    v_cscope   bigint[] := '{}';
    v_cwindow  timestamptz[] := '{}';
    v_camount  numeric[] := '{}';
    i          integer;
BEGIN
    IF coalesce(settle.input_tokens, 0) < 0 OR coalesce(settle.output_tokens, 0) < 0
       OR coalesce(settle.cached_tokens, 0) < 0 THEN
        RAISE EXCEPTION 'settle: token counts must be >= 0' USING ERRCODE = 'PQ400';
    END IF;

    DELETE FROM quota.reservation r WHERE r.request_id = settle.request_id RETURNING r.* INTO v_res;
    IF NOT FOUND THEN
        -- Settled before (or by a concurrent call that committed first): the same answer again.
        SELECT l.* INTO v_ledger FROM quota.usage_ledger l WHERE l.request_id = settle.request_id;
        IF FOUND THEN
            RETURN ROW(true, v_ledger.billed, v_ledger.unbilled_reason, v_ledger.cost, true)::quota.settlement;
        END IF;
        SELECT r.* INTO v_released FROM quota.released r WHERE r.request_id = settle.request_id;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'settle: unknown request_id %', settle.request_id USING ERRCODE = 'PQ404';
        ELSIF v_released.kind = 'refunded' THEN
            RAISE EXCEPTION 'settle: request_id % was refunded and cannot be settled', settle.request_id
                USING ERRCODE = 'PQ409';
        END IF;
        -- Expired by the sweep while the upstream was still working: the usage is real, so it is
        -- charged now on the policies that apply now, with no hold left to release.
        v_res := ROW(settle.request_id, v_released.key_id, v_released.user_id, v_released.channel_id,
                     v_released.model, 0, 0, '{}', '{}', '{}', v_released.released_at)::quota.reservation;
        SELECT array_agg(p.policy_id ORDER BY p.policy_id),
               array_agg(quota.scope_of(p, v_released.key_id, v_released.user_id) ORDER BY p.policy_id),
               array_agg(0::numeric ORDER BY p.policy_id)
          INTO v_res.hold_policy, v_res.hold_scope, v_res.hold_amount
        FROM quota.policies_for(v_released.key_id, v_released.user_id) p;
        v_res.hold_policy := coalesce(v_res.hold_policy, '{}');
        v_res.hold_scope := coalesce(v_res.hold_scope, '{}');
        v_res.hold_amount := coalesce(v_res.hold_amount, '{}');
    END IF;

    IF settle.input_tokens IS NULL OR settle.output_tokens IS NULL THEN
        v_reason := 'usage_missing';
    ELSE
        v_cost := quota.price_of(v_res.model, settle.input_tokens, settle.output_tokens,
                                 coalesce(settle.cached_tokens, 0));
        IF v_cost IS NULL THEN
            v_reason := 'price_not_found';
        END IF;
    END IF;

    FOR i IN 1 .. coalesce(array_length(v_res.hold_policy, 1), 0) LOOP
        SELECT p.* INTO v_policy FROM quota.policy p WHERE p.policy_id = v_res.hold_policy[i];
        CONTINUE WHEN NOT FOUND;  -- the policy was deleted meanwhile; its counter went with it
        v_actual := coalesce(quota.metric_amount(v_policy.metric, v_cost, settle.input_tokens,
                                                 settle.output_tokens), 0);
        SELECT w.window_start, w.window_end INTO v_ws, v_we FROM quota.policy_window(v_policy, v_now) w;

        UPDATE quota.counter c SET
            used         = CASE WHEN c.window_start = v_ws THEN c.used ELSE 0 END
                           + CASE WHEN v_policy.window_mode = 'fixed' THEN v_actual ELSE 0 END,
            exhausted_at = CASE WHEN c.window_start = v_ws THEN c.exhausted_at END,
            reset_at     = CASE WHEN c.window_start = v_ws THEN c.reset_at END,
            window_start = v_ws,
            reserved     = c.reserved - v_res.hold_amount[i]
        WHERE c.policy_id = v_policy.policy_id AND c.scope_id = v_res.hold_scope[i]
        RETURNING c.used, c.exhausted_at INTO v_used, v_exhausted;
        IF NOT FOUND THEN
            INSERT INTO quota.counter (policy_id, scope_id, window_start, used)
            VALUES (v_policy.policy_id, v_res.hold_scope[i], v_ws,
                    CASE WHEN v_policy.window_mode = 'fixed' THEN v_actual ELSE 0 END)
            RETURNING used, exhausted_at INTO v_used, v_exhausted;
        END IF;
        IF v_policy.window_mode = 'rolling' THEN
            IF v_actual > 0 THEN
                INSERT INTO quota.rolling_usage AS r (policy_id, scope_id, bucket, used)
                VALUES (v_policy.policy_id, v_res.hold_scope[i],
                        to_timestamp(floor(extract(epoch FROM v_now) / 60) * 60), v_actual)
                ON CONFLICT (policy_id, scope_id, bucket) DO UPDATE SET used = r.used + EXCLUDED.used;
            END IF;
            v_used := (SELECT coalesce(sum(r.used), 0) FROM quota.rolling_usage r
                        WHERE r.policy_id = v_policy.policy_id AND r.scope_id = v_res.hold_scope[i]
                          AND r.bucket >= v_ws);
        END IF;

        v_cpolicy := v_cpolicy || v_policy.policy_id;
        v_cscope := v_cscope || v_res.hold_scope[i];
        v_cwindow := v_cwindow || v_ws;
        v_camount := v_camount || v_actual;

        IF v_used >= v_policy.quota_limit AND v_exhausted IS NULL THEN
            PERFORM quota.mark_exhausted(v_policy, v_res.hold_scope[i], v_res.key_id, v_res.user_id,
                                         v_ws, v_we, v_now);
        END IF;
    END LOOP;

    INSERT INTO quota.usage_ledger (request_id, key_id, user_id, channel_id, model, input_tokens,
                                    output_tokens, cached_tokens, cost, billed, unbilled_reason,
                                    counted_policy, counted_scope, counted_window, counted_amount, settled_at)
    VALUES (settle.request_id, v_res.key_id, v_res.user_id, v_res.channel_id, v_res.model,
            coalesce(settle.input_tokens, 0), coalesce(settle.output_tokens, 0),
            coalesce(settle.cached_tokens, 0), coalesce(v_cost, 0), v_reason IS NULL, v_reason,
            v_cpolicy, v_cscope, v_cwindow, v_camount, v_now);

    RETURN ROW(true, v_reason IS NULL, v_reason, coalesce(v_cost, 0), false)::quota.settlement;
END
$$;

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

CREATE FUNCTION quota.refund(request_id text, reason text DEFAULT NULL) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_res quota.reservation;
BEGIN
    DELETE FROM quota.reservation r WHERE r.request_id = refund.request_id RETURNING r.* INTO v_res;
    IF FOUND THEN
        PERFORM quota.release_holds(v_res);
        INSERT INTO quota.released (request_id, key_id, user_id, channel_id, model, kind, reason, released_at)
        VALUES (v_res.request_id, v_res.key_id, v_res.user_id, v_res.channel_id, v_res.model,
                'refunded', refund.reason, quota.clock());
        RETURN true;
    END IF;
    -- Nothing is ever released twice: a second refund (or one after expiry) changes nothing.
    IF EXISTS (SELECT 1 FROM quota.released r WHERE r.request_id = refund.request_id) THEN
        RETURN false;
    END IF;
    IF EXISTS (SELECT 1 FROM quota.usage_ledger l WHERE l.request_id = refund.request_id) THEN
        RAISE EXCEPTION 'refund: request_id % was already settled; a settled request cannot be refunded',
            refund.request_id USING ERRCODE = 'PQ409';
    END IF;
    RAISE EXCEPTION 'refund: unknown request_id %', refund.request_id USING ERRCODE = 'PQ404';
END
$$;

-- The models a key may call, for GET /v1/models. An unknown key is SQLSTATE 28000.
CREATE FUNCTION quota.models(api_key text) RETURNS TABLE (model text, owned_by text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM quota.key_for_secret(models.api_key)) THEN
        RAISE EXCEPTION 'Incorrect API key provided.' USING ERRCODE = 'invalid_authorization_specification';
    END IF;
    RETURN QUERY SELECT p.model, 'pg_quota'::text FROM quota.model_price p ORDER BY p.model;
END
$$;
