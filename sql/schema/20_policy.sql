-- Policy validation and the policy-change log.

-- Whether a policy or boost subject exists. Subjects are polymorphic (no single foreign key), so
-- validation checks them here and 25_scopes.sql deletes a subject's rows when it goes away.
CREATE FUNCTION quota.subject_exists(subject_type text, subject_id bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT CASE subject_type
        WHEN 'key' THEN EXISTS (SELECT 1 FROM quota.api_key k WHERE k.key_id = subject_id)
        WHEN 'user' THEN EXISTS (SELECT 1 FROM quota.app_user u WHERE u.user_id = subject_id)
        WHEN 'user_group' THEN EXISTS (SELECT 1 FROM quota.user_group g WHERE g.group_id = subject_id)
        WHEN 'channel' THEN EXISTS (SELECT 1 FROM quota.channel c WHERE c.channel_id = subject_id)
        ELSE false END
$$;

-- Refuses an invalid row (policy, boost) with SQLSTATE 23514 (check_violation), naming the
-- column in the message and in the error's COLUMN field so tools can point at it.
CREATE FUNCTION quota.refuse_row(tbl text, col text, msg text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = msg,
        COLUMN = col, TABLE = tbl, SCHEMA = 'quota',
        HINT = format('See the column comments: \d+ quota.%s', tbl);
END
$$;

-- The check policies, boosts and channel grants share: a known subject type that names an
-- existing subject. Refuses naming the field, like quota.refuse_row.
CREATE FUNCTION quota.check_subject(tbl text, subject_types text[], subject_type text, subject_id bigint)
RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF subject_type IS NULL OR NOT subject_type = ANY (subject_types) THEN
        PERFORM quota.refuse_row(tbl, 'subject_type', format('invalid %s: subject_type: %L is not one of %s',
            tbl, subject_type, array_to_string(subject_types, ', ')));
    END IF;
    IF NOT quota.subject_exists(subject_type, subject_id) THEN
        PERFORM quota.refuse_row(tbl, 'subject_id', format('invalid %s: subject_id: no %s with id %s',
            tbl, replace(subject_type, '_', ' '), coalesce(subject_id::text, 'NULL')));
    END IF;
END
$$;

-- quota.check_subject, and a known metric (policies and boosts).
CREATE FUNCTION quota.check_subject_and_metric(tbl text, subject_types text[], subject_type text,
                                               subject_id bigint, metric text)
RETURNS void
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM quota.check_subject(tbl, subject_types, subject_type, subject_id);
    IF metric IS NULL OR metric NOT IN ('cost', 'tokens', 'requests') THEN
        PERFORM quota.refuse_row(tbl, 'metric', format(
            'invalid %s: metric: %L is not one of cost, tokens, requests', tbl, metric));
    END IF;
END
$$;

CREATE FUNCTION quota.policy_validate() RETURNS trigger
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

CREATE TRIGGER policy_validate BEFORE INSERT OR UPDATE ON quota.policy
    FOR EACH ROW EXECUTE FUNCTION quota.policy_validate();

-- Logs every change of an admin-managed row (policies, boosts, channels, channel grants) as
-- <table>_created/_changed/_deleted with the old and new row. A row's api_key (a channel's
-- upstream secret) is never logged: only whether an edit changed it. SECURITY DEFINER: admins
-- change those rows but cannot write the event log directly.
CREATE FUNCTION quota.log_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_old jsonb := CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END;
    v_new jsonb := CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END;
BEGIN
    INSERT INTO quota.event (at, kind, policy_id, detail)
    VALUES (quota.clock(),
            TG_TABLE_NAME || CASE TG_OP WHEN 'INSERT' THEN '_created' WHEN 'UPDATE' THEN '_changed' ELSE '_deleted' END,
            (coalesce(v_new, v_old) ->> 'policy_id')::bigint,
            jsonb_strip_nulls(jsonb_build_object(
                'old', v_old - 'api_key', 'new', v_new - 'api_key',
                'api_key_changed', CASE WHEN TG_OP = 'UPDATE' AND v_old ? 'api_key'
                                        THEN (v_old -> 'api_key') IS DISTINCT FROM (v_new -> 'api_key') END)));
    RETURN NULL;
END
$$;

CREATE TRIGGER policy_log_change AFTER INSERT OR UPDATE OR DELETE ON quota.policy
    FOR EACH ROW EXECUTE FUNCTION quota.log_change();

-- Ends the suspensions that a policy caused, now, logging each key as resumed `by` (reset,
-- policy_changed, policy_deleted).
CREATE FUNCTION quota.lift_suspensions(policy_id bigint, by text, now_ts timestamptz) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_key record;
BEGIN
    FOR v_key IN
        UPDATE quota.api_key k SET suspended_until = NULL, suspended_by = NULL
        WHERE k.suspended_by = lift_suspensions.policy_id RETURNING k.key_id, k.user_id
    LOOP
        INSERT INTO quota.event (at, kind, policy_id, key_id, user_id, detail)
        VALUES (now_ts, 'resumed', lift_suspensions.policy_id, v_key.key_id, v_key.user_id,
                jsonb_build_object('by', by));
    END LOOP;
END
$$;

-- Starts a policy's windows over at now_ts: no usage (counters, rolling buckets, checkpoints of
-- closed ledger partitions), nothing marked spent, alerts re-armed (quota.cross_thresholds,
-- quota.log_shadow_refusal), and reset_at tells quota.drift to count the ledger from then on.
-- In-flight holds stay: their settle or refund releases them. For quota.reset, and for a policy
-- that measures something else after an edit.
CREATE FUNCTION quota.clear_usage(policy_id bigint, now_ts timestamptz) RETURNS void
LANGUAGE sql VOLATILE AS $$
    UPDATE quota.counter c SET used = 0, exhausted_at = NULL, reset_at = now_ts,
                               alert_level = NULL, alert_window = NULL, shadow_refused_at = NULL
    WHERE c.policy_id = clear_usage.policy_id;
    DELETE FROM quota.rolling_usage r WHERE r.policy_id = clear_usage.policy_id;
    DELETE FROM quota.ledger_checkpoint k WHERE k.policy_id = clear_usage.policy_id;
$$;

-- An edited policy is judged afresh, like a new one: the keys it suspended resume at once, and
-- its counters forget that they were marked spent (and which alerts they logged), so it
-- refuses, logs, alerts and suspends again only if its window is spent under the new settings. The counters keep their usage when only the
-- limit, boundary, action, exclusivity, enabled flag, enforce flag or thresholds changed
-- (a shadow policy switched to enforcing keeps what it counted); an edit of what the policy
-- measures (subject, model group, metric, window) starts its windows over, as if it were new:
-- usage in other units or in another window cannot count in the new one. A deleted policy
-- releases its keys too (its counters go with it).
CREATE FUNCTION quota.policy_judged_afresh() RETURNS trigger
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

CREATE TRIGGER policy_judged_afresh AFTER UPDATE OR DELETE ON quota.policy
    FOR EACH ROW EXECUTE FUNCTION quota.policy_judged_afresh();
