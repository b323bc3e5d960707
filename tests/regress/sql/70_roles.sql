-- Least privilege: the relay role runs the lifecycle only; the admin role manages policies.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
CREATE ROLE regress_relay LOGIN IN ROLE quota_relay;
CREATE ROLE regress_admin LOGIN IN ROLE quota_admin;
CREATE ROLE regress_nobody LOGIN;
SELECT quota.create_user('ivy') AS ivy \gset
SELECT quota.create_key(:ivy, 'roles') AS key \gset

SET ROLE regress_relay;
SELECT allowed FROM quota.admit(:'key', 'ro1', 'm', 1, 1);
SELECT settled FROM quota.settle('ro1', 1, 1);
SELECT quota.refund('ro1x');
SELECT * FROM quota.api_key;
SELECT * FROM quota.usage_ledger;
INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit) VALUES ('user', :ivy, 'day', 1);
SELECT quota.reset(1);
SELECT quota.create_key(:ivy, 'sneaky');
SET pg_quota.fake_now = '2030-01-01';
RESET ROLE;

SET ROLE regress_admin;
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :ivy, 'requests', 'day', 5) RETURNING subject_type, quota_limit;
SELECT count(*) FROM quota.status((SELECT key_id FROM quota.api_key WHERE name = 'roles'));
SELECT count(*) > 0 AS can_read_ledger FROM quota.usage_ledger;
UPDATE quota.api_key SET secret_hash = 'x' WHERE name = 'roles';
SELECT * FROM quota.admit(:'key', 'ro2', 'm', 1, 1);
RESET ROLE;

SET ROLE regress_nobody;
\set VERBOSITY terse
SELECT * FROM quota.admit(:'key', 'ro3', 'm', 1, 1);
SELECT * FROM quota.policy;
\set VERBOSITY default
RESET ROLE;

-- Every SECURITY DEFINER function pins its search_path.
SELECT p.proname FROM pg_proc p WHERE p.pronamespace = 'quota'::regnamespace AND p.prosecdef
  AND NOT coalesce(array_to_string(p.proconfig, ',') LIKE '%search_path=pg_catalog, pg_temp%', false);

DROP OWNED BY regress_relay, regress_admin, regress_nobody;
DROP ROLE regress_relay, regress_admin, regress_nobody;
