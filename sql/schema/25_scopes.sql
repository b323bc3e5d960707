-- Scopes beyond keys and users: user groups, model groups, boosts, channels. Their tables are in
-- 10_tables.sql; here are the rules that keep them consistent.

-- A model belongs to at most one model group. The primary key enforces it; this trigger says
-- which group already holds the model, so the admin knows what to change.
CREATE FUNCTION quota.model_group_member_check() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_group text;
BEGIN
    SELECT g.name INTO v_group FROM quota.model_group_member m
    JOIN quota.model_group g ON g.model_group_id = m.model_group_id
    WHERE m.model = NEW.model AND (TG_OP = 'INSERT' OR m.model <> OLD.model);
    IF FOUND THEN
        RAISE EXCEPTION 'model % already belongs to model group %', quote_literal(NEW.model), quote_literal(v_group)
            USING ERRCODE = 'unique_violation', TABLE = 'model_group_member', SCHEMA = 'quota',
                  COLUMN = 'model', HINT = 'Remove it from that group first; a model belongs to one group.';
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER model_group_member_check BEFORE INSERT OR UPDATE OF model ON quota.model_group_member
    FOR EACH ROW EXECUTE FUNCTION quota.model_group_member_check();

-- A model group and its models in one step: all or nothing (a conflict leaves no empty group).
CREATE FUNCTION quota.create_model_group(name text, models text[]) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    v_id bigint;
BEGIN
    INSERT INTO quota.model_group (name) VALUES (create_model_group.name) RETURNING model_group_id INTO v_id;
    INSERT INTO quota.model_group_member (model, model_group_id)
    SELECT DISTINCT m, v_id FROM unnest(coalesce(create_model_group.models, '{}')) m;
    RETURN v_id;
END
$$;

-- Boosts: refused when they would grant nothing or could never match a policy.
CREATE FUNCTION quota.boost_validate() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    problem text[];
BEGIN
    PERFORM quota.check_subject_and_metric('boost', ARRAY['key', 'user', 'user_group'],
                                           NEW.subject_type, NEW.subject_id, NEW.metric);
    IF NEW.amount IS NULL OR NEW.amount <= 0 THEN
        PERFORM quota.refuse_row('boost', 'amount', format(
            'invalid boost: amount: must be greater than zero, got %s', coalesce(NEW.amount::text, 'NULL')));
    END IF;
    IF NEW.amount IN ('NaN', 'Infinity') THEN
        PERFORM quota.refuse_row('boost', 'amount', format(
            'invalid boost: amount: must be a finite number, got %s', NEW.amount));
    END IF;
    IF NEW.starts_at IS NULL OR NEW.expires_at IS NULL OR NEW.expires_at <= NEW.starts_at THEN
        PERFORM quota.refuse_row('boost', 'expires_at',
            'invalid boost: expires_at: must be after starts_at');
    END IF;
    problem := quota.policy_window_problem(NEW.period, NEW.period_minutes, 'fixed', 'UTC', 1, 0);
    IF problem IS NOT NULL THEN
        PERFORM quota.refuse_row('boost', problem[1], replace(problem[2], 'invalid policy', 'invalid boost'));
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER boost_validate BEFORE INSERT OR UPDATE ON quota.boost
    FOR EACH ROW EXECUTE FUNCTION quota.boost_validate();

CREATE TRIGGER boost_log_change AFTER INSERT OR UPDATE OR DELETE ON quota.boost
    FOR EACH ROW EXECUTE FUNCTION quota.log_change();

-- Subjects are polymorphic, so no foreign key removes their policies, boosts and channel grants: this trigger
-- does, when a key, user, user group or channel is deleted (each policy deletion is logged).
CREATE FUNCTION quota.forget_subject() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_id bigint := (to_jsonb(OLD) ->> TG_ARGV[1])::bigint;
BEGIN
    DELETE FROM quota.policy p WHERE p.subject_type = TG_ARGV[0] AND p.subject_id = v_id;
    DELETE FROM quota.boost b WHERE b.subject_type = TG_ARGV[0] AND b.subject_id = v_id;
    DELETE FROM quota.channel_grant g WHERE g.subject_type = TG_ARGV[0] AND g.subject_id = v_id;
    RETURN NULL;
END
$$;

CREATE TRIGGER forget_subject AFTER DELETE ON quota.api_key
    FOR EACH ROW EXECUTE FUNCTION quota.forget_subject('key', 'key_id');
CREATE TRIGGER forget_subject AFTER DELETE ON quota.app_user
    FOR EACH ROW EXECUTE FUNCTION quota.forget_subject('user', 'user_id');
CREATE TRIGGER forget_subject AFTER DELETE ON quota.user_group
    FOR EACH ROW EXECUTE FUNCTION quota.forget_subject('user_group', 'group_id');
CREATE TRIGGER forget_subject AFTER DELETE ON quota.channel
    FOR EACH ROW EXECUTE FUNCTION quota.forget_subject('channel', 'channel_id');

-- Channel grants name an existing key, user or user group.
CREATE FUNCTION quota.channel_grant_validate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM quota.check_subject('channel_grant', ARRAY['key', 'user', 'user_group'], NEW.subject_type, NEW.subject_id);
    RETURN NEW;
END
$$;

CREATE TRIGGER channel_grant_validate BEFORE INSERT OR UPDATE ON quota.channel_grant
    FOR EACH ROW EXECUTE FUNCTION quota.channel_grant_validate();
CREATE TRIGGER channel_grant_log_change AFTER INSERT OR UPDATE OR DELETE ON quota.channel_grant
    FOR EACH ROW EXECUTE FUNCTION quota.log_change();

-- A channel's upstream key is write-only: admins cannot read it, and cannot send it elsewhere
-- either. A new base_url needs a new api_key in the same statement (the key of one upstream
-- is no credential for another). Every insert, edit and delete of a channel is logged, without
-- the key (quota.log_change).
CREATE FUNCTION quota.channel_key_follows_url() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.base_url IS DISTINCT FROM OLD.base_url AND NEW.api_key IS NOT DISTINCT FROM OLD.api_key THEN
        PERFORM quota.refuse_row('channel', 'base_url',
            'invalid channel: base_url: a new base_url needs a new api_key in the same statement (the upstream key is never sent to another host)');
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER channel_key_follows_url BEFORE UPDATE ON quota.channel
    FOR EACH ROW EXECUTE FUNCTION quota.channel_key_follows_url();
CREATE TRIGGER channel_log_change AFTER INSERT OR UPDATE OR DELETE ON quota.channel
    FOR EACH ROW EXECUTE FUNCTION quota.log_change();

-- The lifecycle keeps policy rows, policy selections and which models channels serve per backend
-- (src/lifecycle/cache.rs) while this value stays the same. Every change to what
-- quota.policies_for reads (policies, boosts, group memberships, which models are priced and
-- aliased) or to the models of channels
-- sets a new value in the same transaction, drawn from a sequence so
-- that no value is ever used twice, not even after a rollback or a reinstall.
CREATE SEQUENCE quota.policy_generation_seq;
SELECT setval('quota.policy_generation_seq', (extract(epoch FROM clock_timestamp()) * 1000000)::bigint);
CREATE TABLE quota.policy_generation (generation bigint NOT NULL);
INSERT INTO quota.policy_generation VALUES (nextval('quota.policy_generation_seq'));

CREATE FUNCTION quota.policy_generation_bump() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE quota.policy_generation SET generation = nextval('quota.policy_generation_seq');
    RETURN NULL;
END
$$;

CREATE TRIGGER policy_generation_bump AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.policy
    FOR EACH STATEMENT EXECUTE FUNCTION quota.policy_generation_bump();
CREATE TRIGGER policy_generation_bump AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.boost
    FOR EACH STATEMENT EXECUTE FUNCTION quota.policy_generation_bump();
CREATE TRIGGER policy_generation_bump AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.user_group_member
    FOR EACH STATEMENT EXECUTE FUNCTION quota.policy_generation_bump();
CREATE TRIGGER policy_generation_bump AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.model_group_member
    FOR EACH STATEMENT EXECUTE FUNCTION quota.policy_generation_bump();
CREATE TRIGGER policy_generation_bump AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.channel_model
    FOR EACH STATEMENT EXECUTE FUNCTION quota.policy_generation_bump();
-- Which model a snapshot or alias is priced as decides its model group (quota.policies_for).
CREATE TRIGGER policy_generation_bump AFTER INSERT OR UPDATE OF model OR DELETE OR TRUNCATE ON quota.model_price
    FOR EACH STATEMENT EXECUTE FUNCTION quota.policy_generation_bump();
CREATE TRIGGER policy_generation_bump AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON quota.model_alias
    FOR EACH STATEMENT EXECUTE FUNCTION quota.policy_generation_bump();
-- ALWAYS: also when rows arrive by logical replication (session_replication_role = replica).
ALTER TABLE quota.policy ENABLE ALWAYS TRIGGER policy_generation_bump;
ALTER TABLE quota.boost ENABLE ALWAYS TRIGGER policy_generation_bump;
ALTER TABLE quota.user_group_member ENABLE ALWAYS TRIGGER policy_generation_bump;
ALTER TABLE quota.model_group_member ENABLE ALWAYS TRIGGER policy_generation_bump;
ALTER TABLE quota.channel_model ENABLE ALWAYS TRIGGER policy_generation_bump;
ALTER TABLE quota.model_price ENABLE ALWAYS TRIGGER policy_generation_bump;
ALTER TABLE quota.model_alias ENABLE ALWAYS TRIGGER policy_generation_bump;
