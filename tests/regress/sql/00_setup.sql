-- Runs first: the extension installs cleanly with its schema, roles and SQL interface.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
CREATE EXTENSION pg_quota;
SELECT n.nspname AS schema, e.extversion FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
WHERE e.extname = 'pg_quota';
SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname IN ('quota_relay', 'quota_admin') ORDER BY 1;
-- The public interface of DESIGN.md, with its argument lists.
SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS args, p.prosecdef AS security_definer,
       array_to_string(p.proconfig, ',') AS config
FROM pg_proc p WHERE p.pronamespace = 'quota'::regnamespace
  AND p.proname IN ('create_user', 'create_key', 'admit', 'settle', 'refund', 'reset', 'status', 'sweep')
ORDER BY 1;
