-- Run once, as a superuser, in a database restored from pg_dump (README: backups). pg_dump
-- keeps the extension's rows but not the ALWAYS mode of its triggers that keep the
-- per-connection policy caches fresh, so without this step edits applied by logical
-- replication would not reach connections that cached the old policies.
DO $$
DECLARE
    t regclass;
BEGIN
    FOR t IN
        SELECT tgrelid::regclass FROM pg_catalog.pg_trigger
        WHERE tgname = 'policy_generation_bump' AND tgenabled <> 'A'
          AND tgrelid::regclass::text LIKE 'quota.%'
    LOOP
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER policy_generation_bump', t);
    END LOOP;
END
$$;
