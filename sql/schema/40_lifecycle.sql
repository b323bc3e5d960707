-- The request lifecycle: admit before forwarding, settle or refund after. Each call is one
-- transaction. Lock order everywhere: reservation row, then counters (channel counters first,
-- then the rest in policy_id order: the order of quota.policies_for and of a reservation's
-- holds), then the api_key row, so concurrent calls cannot deadlock.
--
-- The entry points also force generic plans: their statements' parameters never change the best
-- plan (every lookup is by key), and custom plans would re-plan every statement of every call
-- (measured: admit 0.86 ms -> 0.35 ms a call).
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

-- The one place that decides which policies a request counts on (admit, a late settle, status),
-- in lock order (the channel's policies first, then by policy_id), with for each:
--   scope_id         whose counter it is: the key, the user (also for group policies: each
--                    member has its own counter and the full amount), or the channel;
--   limit_key        policies of one axis with the same model group, metric, period and window
--                    kind form one limit;
--   effective_limit  the largest quota_limit of that limit's policies (several sources merge by
--                    MAX) plus the boosts active at `at` for that axis, model group, metric and
--                    period. A limit admits a request when any of its policies does.
-- model = NULL lists every policy the key is subject to, for any model. Otherwise only global
-- policies and those of the model's group apply, and an exclusive model-group policy takes the
-- request out of the global policies of its axis (billing isolation).
CREATE FUNCTION quota.policies_for(key_id bigint, user_id bigint, model text, channel_id bigint,
                                   at timestamptz)
RETURNS TABLE (policy quota.policy, scope_id bigint, axis text, limit_key text, effective_limit numeric)
LANGUAGE sql STABLE AS $$
    WITH groups AS (
        SELECT m.group_id FROM quota.user_group_member m WHERE m.user_id = policies_for.user_id
    ), matched AS (
        SELECT p AS policy, quota.policy_axis(p.subject_type) AS axis
        FROM quota.policy p
        WHERE p.enabled
          AND (   (p.subject_type = 'key' AND p.subject_id = policies_for.key_id)
               OR (p.subject_type = 'user' AND p.subject_id = policies_for.user_id)
               OR (p.subject_type = 'user_group' AND p.subject_id IN (SELECT g.group_id FROM groups g))
               OR (p.subject_type = 'channel' AND p.subject_id = policies_for.channel_id))
          AND (policies_for.model IS NULL OR p.model_group IS NULL
               OR p.model_group = (SELECT mg.model_group_id FROM quota.model_group_member mg
                                    WHERE mg.model = policies_for.model))
    ), kept AS (
        SELECT m.policy, m.axis,
               concat_ws('/', m.axis, coalesce((m.policy).model_group::text, '*'), (m.policy).metric,
                         (m.policy).period, (m.policy).period_minutes, (m.policy).window_mode) AS limit_key
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
    ORDER BY k.axis <> 'channel', (k.policy).policy_id
$$;

-- Whether a policy's window refuses a request of `amount`: exhausted, or (strict) the request
-- would overshoot. The one rule admit, routing and status share.
CREATE FUNCTION quota.refuses(boundary text, effective_limit numeric, used numeric, reserved numeric,
                              amount numeric)
RETURNS boolean
LANGUAGE sql IMMUTABLE AS $$
    SELECT used >= effective_limit
        OR (boundary = 'strict' AND used + reserved + amount > effective_limit)
$$;

-- A policy's window containing `at` (see quota.window_bounds).
CREATE FUNCTION quota.policy_window(p quota.policy, at timestamptz)
RETURNS TABLE (window_start timestamptz, window_end timestamptz)
LANGUAGE sql IMMUTABLE AS $$
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

-- When a channel can take a request again: NULL when it can take it now (under every cap), else
-- the instant all its refusing windows have freed up ('infinity' when a total window refuses).
-- Locks the channel's counters, so the verdict holds until commit: admit routes around a
-- channel that a concurrent request just filled instead of refusing. Routing visits channels
-- before any key or user counter is locked, and in one order (priority) for everyone, except
-- that channels of equal priority are visited in weighted-random order; a deadlock there needs
-- two requests to both find their first pick full at once, and PostgreSQL breaks it (40P01).
CREATE FUNCTION quota.channel_blocked_until(channel_id bigint, cost numeric, input_tokens bigint,
                                            output_tokens bigint, now_ts timestamptz)
RETURNS timestamptz
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    r         record;
    v_counter quota.counter;
    v_ws      timestamptz;
    v_we      timestamptz;
    v_amount  numeric;
    v_until   timestamptz;
BEGIN
    FOR r IN
        SELECT f.*, w.window_start AS ws, w.window_end AS we
        FROM quota.policies_for(NULL, NULL, NULL, channel_blocked_until.channel_id, now_ts) f
        CROSS JOIN LATERAL quota.policy_window(f.policy, now_ts) w
    LOOP
        v_amount := quota.metric_amount((r.policy).metric, cost, input_tokens, output_tokens);
        CONTINUE WHEN v_amount IS NULL;
        v_ws := r.ws;
        v_we := r.we;
        LOOP
            SELECT c.* INTO v_counter FROM quota.counter c
            WHERE c.policy_id = (r.policy).policy_id AND c.scope_id = r.scope_id FOR UPDATE;
            EXIT WHEN FOUND;
            -- (a first request creates the row, so that racing first requests queue on it too)
            INSERT INTO quota.counter (policy_id, scope_id, window_start)
            VALUES ((r.policy).policy_id, r.scope_id, v_ws) ON CONFLICT DO NOTHING;
        END LOOP;
        IF quota.refuses((r.policy).boundary, r.effective_limit, quota.window_used(r.policy, v_counter, v_ws),
                         coalesce(v_counter.reserved, 0), v_amount) THEN
            v_until := greatest(v_until, coalesce(quota.window_frees_at(r.policy, r.scope_id, v_ws, v_we, now_ts),
                                                  'infinity'));
        END IF;
    END LOOP;
    RETURN v_until;
END
$$;

-- A 429 decision with the time until `frees` (NULL or infinity: never) in seconds and in words.
CREATE FUNCTION quota.refusal(code text, what text, frees timestamptz, now_ts timestamptz)
RETURNS quota.admission
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    v_out quota.admission;
BEGIN
    v_out.allowed := false;
    v_out.http_status := 429;
    v_out.error_code := code;
    IF isfinite(frees) THEN
        v_out.retry_after_s := greatest(1, ceil(extract(epoch FROM frees - now_ts)))::int;
    END IF;
    v_out.message := what || CASE WHEN v_out.retry_after_s IS NULL THEN ' It does not reset.'
                                  ELSE ' It resets in ' || quota.approx_duration(v_out.retry_after_s) || '.' END;
    RETURN v_out;
END
$$;

CREATE FUNCTION quota.admit(api_key text, request_id text, model text, est_input_tokens bigint,
                            max_output_tokens bigint, channel_id bigint DEFAULT NULL)
RETURNS quota.admission
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_now      timestamptz := quota.clock();
    v_found    record;
    v_key      quota.api_key;
    v_user_ok  boolean;
    v_out      quota.admission;
    v_row      record;
    v_policy   quota.policy;
    v_counter  quota.counter;
    v_chan     record;
    v_channel  bigint;
    v_until    timestamptz;
    v_soonest  timestamptz;
    v_served   boolean := false;
    v_ws       timestamptz;
    v_we       timestamptz;
    v_cost     numeric;
    v_amount   numeric;
    v_used     numeric;
    v_left     numeric;
    v_frees    timestamptz;
    v_iso_key  boolean := false;
    v_iso_user boolean := false;
    v_res      quota.reservation;
    -- holds, one per policy, in lock order
    v_policies bigint[] := '{}';
    v_scopes   bigint[] := '{}';
    v_amounts  numeric[] := '{}';
    v_limits   numeric[] := '{}';
    -- limits (see quota.policies_for), in order of first appearance
    g_key      text[] := '{}';
    g_ok       boolean[] := '{}';
    g_left     numeric[] := '{}';
    g_limit    numeric[] := '{}';
    g_metric   text[] := '{}';
    g_reset    timestamptz[] := '{}';
    g_frees    timestamptz[] := '{}';
    g_policy   bigint[] := '{}';
    g_spent    boolean[] := '{}';
    gi         integer;
    v_worst    integer;
    v_tight    integer;
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

    SELECT k AS key, u.enabled AS user_ok,
           EXISTS (SELECT 1 FROM quota.usage_ledger l WHERE l.request_id = admit.request_id)
           OR EXISTS (SELECT 1 FROM quota.released r WHERE r.request_id = admit.request_id) AS reused
    INTO v_found
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

    IF v_found.reused THEN
        RAISE EXCEPTION 'admit: request_id % was already used', admit.request_id USING ERRCODE = 'PQ409';
    END IF;

    -- NULL when the model has no price: cost policies cannot judge such a request; it passes
    -- them and is recorded as unbilled at settle.
    v_cost := quota.price_of(admit.model, admit.est_input_tokens, admit.max_output_tokens, 0);

    -- Routing. A model that no channel serves goes to the relay's default upstream (channel NULL).
    -- Otherwise: the pinned channel, or among enabled channels under all their caps the highest
    -- priority, then at random by weight (smallest -ln(u)/weight wins).
    FOR v_chan IN
        SELECT c.channel_id, c.status, c.base_url, c.api_key, cm.upstream_model
        FROM quota.channel_model cm JOIN quota.channel c ON c.channel_id = cm.channel_id
        WHERE cm.model = admit.model AND (admit.channel_id IS NULL OR c.channel_id = admit.channel_id)
        ORDER BY c.status = 'enabled' DESC, c.priority DESC, -ln(1 - random()) / c.weight
    LOOP
        v_served := true;
        EXIT WHEN v_chan.status <> 'enabled';
        v_until := quota.channel_blocked_until(v_chan.channel_id, v_cost, admit.est_input_tokens,
                                               admit.max_output_tokens, v_now);
        IF v_until IS NULL THEN
            v_channel := v_chan.channel_id;
            v_out.channel_id := v_chan.channel_id;
            v_out.upstream_base_url := v_chan.base_url;
            v_out.upstream_api_key := v_chan.api_key;
            v_out.upstream_model := v_chan.upstream_model;
            EXIT;
        END IF;
        v_soonest := least(v_soonest, v_until);
    END LOOP;
    IF v_channel IS NULL AND (v_served OR admit.channel_id IS NOT NULL) THEN
        IF admit.channel_id IS NOT NULL AND NOT v_served THEN
            v_out.http_status := 400; v_out.error_code := 'invalid_channel';
            v_out.message := format('Channel %s does not exist or does not serve model %s.', admit.channel_id, admit.model);
        ELSIF v_soonest IS NULL THEN
            v_out.http_status := 503;
            v_out.error_code := CASE WHEN admit.channel_id IS NULL THEN 'no_channel_available' ELSE 'channel_unavailable' END;
            v_out.message := CASE WHEN admit.channel_id IS NULL
                                  THEN format('No upstream channel for model %s is enabled.', admit.model)
                                  ELSE format('Channel %s is disabled.', admit.channel_id) END;
        ELSE
            v_out := quota.refusal(CASE WHEN admit.channel_id IS NULL THEN 'all_channels_exhausted'
                                        ELSE 'channel_quota_exhausted' END,
                                   CASE WHEN admit.channel_id IS NULL
                                        THEN format('Every upstream channel for model %s has reached its quota.', admit.model)
                                        ELSE format('Channel %s has reached its quota.', admit.channel_id) END,
                                   v_soonest, v_now);
            v_out.channel_id := admit.channel_id;
        END IF;
        v_out.key_id := v_key.key_id;
        v_out.user_id := v_key.user_id;
        RETURN v_out;
    END IF;

    -- One pass over the counters the request counts on, in policy_id order (the lock order):
    -- roll a stale window and reserve the estimate in one UPDATE, which also locks the row, then
    -- judge each limit on the values before the hold. If any limit refuses, the holds taken so
    -- far are given back before returning, so the request reserves all or nothing.
    FOR v_row IN
        SELECT f.*, w.window_start AS ws, w.window_end AS we
        FROM quota.policies_for(v_key.key_id, v_key.user_id, admit.model, v_channel, v_now) f
        CROSS JOIN LATERAL quota.policy_window(f.policy, v_now) w
        ORDER BY f.axis <> 'channel', (f.policy).policy_id
    LOOP
        v_policy := v_row.policy;
        IF v_policy.exclusive THEN
            v_iso_key := v_iso_key OR v_row.axis = 'key';
            v_iso_user := v_iso_user OR v_row.axis = 'user';
        END IF;
        v_amount := quota.metric_amount(v_policy.metric, v_cost, admit.est_input_tokens, admit.max_output_tokens);
        CONTINUE WHEN v_amount IS NULL;
        v_ws := v_row.ws;
        v_we := v_row.we;
        LOOP
            UPDATE quota.counter c SET
                used         = CASE WHEN c.window_start = v_ws THEN c.used ELSE 0 END,
                exhausted_at = CASE WHEN c.window_start = v_ws THEN c.exhausted_at END,
                reset_at     = CASE WHEN c.window_start = v_ws THEN c.reset_at END,
                window_start = v_ws,
                reserved     = c.reserved + v_amount
            WHERE c.policy_id = v_policy.policy_id AND c.scope_id = v_row.scope_id
            RETURNING c.* INTO v_counter;
            EXIT WHEN FOUND;
            -- First request of this scope: create the row, then update (and lock) it like any
            -- other, so concurrent first requests are checked one after the other.
            INSERT INTO quota.counter AS c (policy_id, scope_id, window_start)
            VALUES (v_policy.policy_id, v_row.scope_id, v_ws) ON CONFLICT DO NOTHING;
        END LOOP;
        v_counter.reserved := v_counter.reserved - v_amount;  -- as it was before this hold
        v_used := quota.window_used(v_policy, v_counter, v_ws);
        v_policies := v_policies || v_policy.policy_id;
        v_scopes := v_scopes || v_row.scope_id;
        v_amounts := v_amounts || v_amount;
        v_limits := v_limits || v_row.effective_limit;

        gi := array_position(g_key, v_row.limit_key);
        IF gi IS NULL THEN
            g_key := g_key || v_row.limit_key; g_ok := g_ok || false; g_left := g_left || NULL::numeric;
            g_limit := g_limit || v_row.effective_limit; g_metric := g_metric || v_policy.metric;
            g_reset := g_reset || NULL::timestamptz; g_frees := g_frees || NULL::timestamptz;
            g_policy := g_policy || NULL::bigint; g_spent := g_spent || NULL::boolean;
            gi := cardinality(g_key);
        END IF;
        IF NOT quota.refuses(v_policy.boundary, v_row.effective_limit, v_used, v_counter.reserved, v_amount) THEN
            -- A limit admits when any of its policies does; its headers follow its roomiest one.
            v_left := greatest(v_row.effective_limit - v_used - v_counter.reserved - v_amount, 0);
            g_ok[gi] := true;
            IF g_left[gi] IS NULL OR v_left > g_left[gi] THEN
                g_left[gi] := v_left; g_reset[gi] := v_we;
            END IF;
        ELSE
            v_frees := coalesce(quota.window_frees_at(v_policy, v_row.scope_id, v_ws, v_we, v_now), 'infinity');
            IF g_frees[gi] IS NULL OR v_frees < g_frees[gi] THEN
                g_frees[gi] := v_frees; g_policy[gi] := v_policy.policy_id;
                g_spent[gi] := v_used >= v_row.effective_limit;
            END IF;
        END IF;
    END LOOP;

    -- A refused limit refuses the request; with several, report the one that frees up last.
    -- The tightest admitted limit (least share left) feeds the rate-limit headers.
    FOR gi IN 1 .. cardinality(g_key) LOOP
        IF NOT g_ok[gi] THEN
            IF v_worst IS NULL OR g_frees[gi] > g_frees[v_worst] THEN
                v_worst := gi;
            END IF;
        ELSIF v_tight IS NULL OR g_left[gi] / g_limit[gi] < g_left[v_tight] / g_limit[v_tight] THEN
            v_tight := gi;
        END IF;
    END LOOP;
    IF v_worst IS NOT NULL THEN
        v_res.hold_policy := v_policies; v_res.hold_scope := v_scopes; v_res.hold_amount := v_amounts;
        PERFORM quota.release_holds(v_res);
        SELECT p.* INTO v_policy FROM quota.policy p WHERE p.policy_id = g_policy[v_worst];
        v_out := quota.refusal(
            CASE WHEN v_policy.subject_type = 'channel' THEN 'channel_quota_exhausted' ELSE 'token_quota_policy_exhausted' END,
            CASE WHEN g_spent[v_worst] THEN 'The ' || quota.policy_words(v_policy) || ' is exhausted.'
                 ELSE 'This request would exceed the ' || quota.policy_words(v_policy) || '.' END,
            g_frees[v_worst], v_now);
        v_out.key_id := v_key.key_id;
        v_out.user_id := v_key.user_id;
        v_out.channel_id := v_channel;
        -- the refusing limit feeds the rate-limit headers of the 429
        v_out.ratelimit_limit := g_limit[v_worst];
        v_out.ratelimit_remaining := 0;
        v_out.ratelimit_metric := g_metric[v_worst];
        v_out.ratelimit_reset_at := CASE WHEN isfinite(g_frees[v_worst]) THEN g_frees[v_worst] END;
        RETURN v_out;
    END IF;
    IF v_tight IS NOT NULL THEN
        v_out.ratelimit_limit := g_limit[v_tight];
        v_out.ratelimit_remaining := g_left[v_tight];
        v_out.ratelimit_metric := g_metric[v_tight];
        v_out.ratelimit_reset_at := g_reset[v_tight];
    END IF;

    INSERT INTO quota.reservation (request_id, key_id, user_id, channel_id, model, counted_in_key_global,
                                   counted_in_user_global, est_input_tokens, max_output_tokens,
                                   hold_policy, hold_scope, hold_amount, hold_limit, created_at)
    VALUES (admit.request_id, v_key.key_id, v_key.user_id, v_channel, admit.model, NOT v_iso_key,
            NOT v_iso_user, admit.est_input_tokens, admit.max_output_tokens,
            v_policies, v_scopes, v_amounts, v_limits, v_now);

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
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
DECLARE
    v_now      timestamptz := quota.clock();
    v_res      quota.reservation;
    v_ledger   quota.usage_ledger;
    v_released quota.released;
    v_row      record;
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
                     v_released.model, true, true, 0, 0, '{}', '{}', '{}', '{}', v_released.released_at)::quota.reservation;
        SELECT coalesce(array_agg((f.policy).policy_id ORDER BY f.axis <> 'channel', (f.policy).policy_id), '{}'),
               coalesce(array_agg(f.scope_id ORDER BY f.axis <> 'channel', (f.policy).policy_id), '{}'),
               coalesce(array_agg(0::numeric ORDER BY f.axis <> 'channel', (f.policy).policy_id), '{}'),
               coalesce(array_agg(f.effective_limit ORDER BY f.axis <> 'channel', (f.policy).policy_id), '{}'),
               NOT coalesce(bool_or((f.policy).exclusive AND f.axis = 'key'), false),
               NOT coalesce(bool_or((f.policy).exclusive AND f.axis = 'user'), false)
          INTO v_res.hold_policy, v_res.hold_scope, v_res.hold_amount, v_res.hold_limit,
               v_res.counted_in_key_global, v_res.counted_in_user_global
        FROM quota.policies_for(v_released.key_id, v_released.user_id, v_released.model,
                                v_released.channel_id, v_now) f;
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

    FOR i IN 1 .. cardinality(v_res.hold_policy) LOOP
        SELECT p AS policy, w.window_start AS ws, w.window_end AS we INTO v_row
        FROM quota.policy p CROSS JOIN LATERAL quota.policy_window(p, v_now) w
        WHERE p.policy_id = v_res.hold_policy[i];
        CONTINUE WHEN NOT FOUND;  -- the policy was deleted meanwhile; its counter went with it
        v_policy := v_row.policy;
        v_ws := v_row.ws;
        v_we := v_row.we;
        v_actual := coalesce(quota.metric_amount(v_policy.metric, v_cost, settle.input_tokens,
                                                 settle.output_tokens), 0);

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

        IF v_used >= v_res.hold_limit[i] AND v_exhausted IS NULL THEN
            PERFORM quota.mark_exhausted(v_policy, v_res.hold_scope[i], v_res.key_id, v_res.user_id,
                                         v_ws, v_we, v_now);
        END IF;
    END LOOP;

    INSERT INTO quota.usage_ledger (request_id, key_id, user_id, channel_id, model, input_tokens,
                                    output_tokens, cached_tokens, cost, billed, unbilled_reason,
                                    counted_in_key_global, counted_in_user_global,
                                    counted_policy, counted_scope, counted_window, counted_amount, settled_at)
    VALUES (settle.request_id, v_res.key_id, v_res.user_id, v_res.channel_id, v_res.model,
            coalesce(settle.input_tokens, 0), coalesce(settle.output_tokens, 0),
            coalesce(settle.cached_tokens, 0), coalesce(v_cost, 0), v_reason IS NULL, v_reason,
            v_res.counted_in_key_global, v_res.counted_in_user_global, v_cpolicy, v_cscope, v_cwindow, v_camount, v_now);

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
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan AS $$
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
    -- priced models and the models of enabled channels
    RETURN QUERY SELECT m.model, 'pg_quota'::text
    FROM (SELECT p.model FROM quota.model_price p
          UNION SELECT cm.model FROM quota.channel_model cm
                JOIN quota.channel c ON c.channel_id = cm.channel_id AND c.status = 'enabled') m
    ORDER BY m.model;
END
$$;
