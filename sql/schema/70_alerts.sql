-- Alerts (issue 20): budget thresholds, shadow policies' would-be refusals, the NOTIFY of every
-- event, and the tables of the webhook notifier (`pg-quota-relay notify`). Everything here
-- writes to quota.event in the transaction of the decision it reports, so an alert is never
-- lost and never sent for a change that rolled back.

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
