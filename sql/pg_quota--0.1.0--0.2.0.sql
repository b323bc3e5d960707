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

-- Issue 20: alerts and shadow mode
-- New policy columns (enforce: shadow mode; alert_at: thresholds), the counter's alert marks,
-- two event kinds, the policy checks and re-arming (policy_validate, clear_usage,
-- policy_judged_afresh), shadow policies in limits of their own (policies_for), the sweep's
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
    ), matched AS (
        SELECT p AS policy, quota.policy_axis(p.subject_type) AS axis
        FROM quota.policy p
        WHERE p.enabled
          AND (   (p.subject_type = 'key' AND p.subject_id = policies_for.key_id)
               OR (p.subject_type = 'user' AND p.subject_id = policies_for.user_id)
               OR (p.subject_type = 'user_group' AND p.subject_id IN (SELECT g.group_id FROM groups g))
               OR (p.subject_type = 'channel' AND p.subject_id = policies_for.channel_id))
          AND (policies_for.model IS NULL OR p.model_group IS NULL
               OR p.model_group = coalesce(
                      (SELECT mg.model_group_id FROM quota.model_group_member mg
                        WHERE mg.model = policies_for.model),
                      -- a snapshot or alias counts in the group of the model it is priced as
                      (SELECT mg.model_group_id FROM quota.model_group_member mg
                        WHERE mg.model = quota.price_model(policies_for.model))))
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
