-- Policy validation and the policy-change log.

-- Refuses an invalid policy row with SQLSTATE 23514 (check_violation), naming the column in the
-- message and in the error's COLUMN field so tools can point at it.
CREATE FUNCTION quota.policy_refuse(col text, msg text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    RAISE EXCEPTION USING ERRCODE = 'check_violation', MESSAGE = msg,
        COLUMN = col, TABLE = 'policy', SCHEMA = 'quota',
        HINT = 'See the column comments: \d+ quota.policy';
END
$$;

CREATE FUNCTION quota.policy_validate() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    problem text[];
BEGIN
    IF NEW.subject_type IS DISTINCT FROM 'key' AND NEW.subject_type IS DISTINCT FROM 'user' THEN
        PERFORM quota.policy_refuse('subject_type', format(
            'invalid policy: subject_type: %L is not one of key, user', NEW.subject_type));
    END IF;
    IF NEW.subject_type = 'key' AND NOT EXISTS (SELECT 1 FROM quota.api_key WHERE key_id = NEW.subject_id) THEN
        PERFORM quota.policy_refuse('subject_id', format('invalid policy: subject_id: no key with key_id %s', NEW.subject_id));
    END IF;
    IF NEW.subject_type = 'user' AND NOT EXISTS (SELECT 1 FROM quota.app_user WHERE user_id = NEW.subject_id) THEN
        PERFORM quota.policy_refuse('subject_id', format('invalid policy: subject_id: no user with user_id %s', NEW.subject_id));
    END IF;
    IF NEW.metric NOT IN ('cost', 'tokens', 'requests') THEN
        PERFORM quota.policy_refuse('metric', format(
            'invalid policy: metric: %L is not one of cost, tokens, requests', NEW.metric));
    END IF;
    -- A zero or negative limit would read as "unlimited" to some and "blocked" to others: refused.
    IF NEW.quota_limit <= 0 THEN
        PERFORM quota.policy_refuse('quota_limit', format(
            'invalid policy: quota_limit: must be greater than zero, got %s (to block a key, disable it)', NEW.quota_limit));
    END IF;
    IF NEW.metric IN ('tokens', 'requests') AND NEW.quota_limit <> trunc(NEW.quota_limit) THEN
        PERFORM quota.policy_refuse('quota_limit', format(
            'invalid policy: quota_limit: a %s limit must be a whole number, got %s', NEW.metric, NEW.quota_limit));
    END IF;
    IF NEW.boundary NOT IN ('strict', 'graceful') THEN
        PERFORM quota.policy_refuse('boundary', format(
            'invalid policy: boundary: %L is not one of strict, graceful', NEW.boundary));
    END IF;
    IF NEW.on_exhausted NOT IN ('reject', 'disable') THEN
        PERFORM quota.policy_refuse('on_exhausted', format(
            'invalid policy: on_exhausted: %L is not one of reject, disable', NEW.on_exhausted));
    END IF;
    IF NOT isfinite(NEW.anchor) THEN
        PERFORM quota.policy_refuse('anchor', 'invalid policy: anchor: must be a finite timestamp');
    END IF;
    problem := quota.policy_window_problem(NEW.period, NEW.period_minutes, NEW.window_mode,
                                           NEW.time_zone, NEW.week_start, NEW.reset_hour);
    IF problem IS NOT NULL THEN
        PERFORM quota.policy_refuse(problem[1], problem[2]);
    END IF;
    NEW.updated_at := quota.clock();
    RETURN NEW;
END
$$;

CREATE TRIGGER policy_validate BEFORE INSERT OR UPDATE ON quota.policy
    FOR EACH ROW EXECUTE FUNCTION quota.policy_validate();

-- SECURITY DEFINER: admins change policies but cannot write the event log directly.
CREATE FUNCTION quota.policy_log_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO quota.event (at, kind, policy_id, detail)
        VALUES (quota.clock(), 'policy_created', NEW.policy_id, jsonb_build_object('new', to_jsonb(NEW)));
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO quota.event (at, kind, policy_id, detail)
        VALUES (quota.clock(), 'policy_changed', NEW.policy_id,
                jsonb_build_object('old', to_jsonb(OLD), 'new', to_jsonb(NEW)));
    ELSE
        INSERT INTO quota.event (at, kind, policy_id, detail)
        VALUES (quota.clock(), 'policy_deleted', OLD.policy_id, jsonb_build_object('old', to_jsonb(OLD)));
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER policy_log_change AFTER INSERT OR UPDATE OR DELETE ON quota.policy
    FOR EACH ROW EXECUTE FUNCTION quota.policy_log_change();
