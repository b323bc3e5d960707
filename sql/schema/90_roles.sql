-- Least privilege. Runs last, after every function exists.
--   quota_relay: may only run the request lifecycle (admit, settle, refund, models).
--   quota_admin: manages users, keys, prices and policies; reads counters, ledger, events.
-- Grant them to login roles: GRANT quota_relay TO relay_login; the relay's login role also
-- needs the logging settings of sql/examples/relay_role.sql (no bind parameters in the log).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'quota_relay') THEN
        CREATE ROLE quota_relay NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'quota_admin') THEN
        CREATE ROLE quota_admin NOLOGIN;
    END IF;
END
$$;

REVOKE ALL ON ALL FUNCTIONS IN SCHEMA quota FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA quota FROM PUBLIC;
GRANT USAGE ON SCHEMA quota TO quota_relay, quota_admin;

GRANT EXECUTE ON FUNCTION
    quota.admit(text, text, text, bigint, bigint, bigint),
    quota.settle(text, bigint, bigint, bigint),
    quota.admit_many(text[], text[], text[], bigint[], bigint[], bigint[]),
    quota.settle_many(text[], bigint[], bigint[], bigint[]),
    quota.refund(text, text),
    quota.models(text),
    quota.clock()          -- so the relay turns reset instants into seconds on the engine's clock
TO quota_relay;

GRANT SELECT, INSERT, UPDATE, DELETE ON quota.policy, quota.model_price, quota.app_user, quota.user_group,
    quota.user_group_member, quota.model_group, quota.model_group_member, quota.channel_model,
    quota.boost, quota.model_alias, quota.channel_grant TO quota_admin;
-- Channels: admins write the upstream api_key but never read it back; only quota.admit does.
GRANT INSERT, UPDATE, DELETE ON quota.channel TO quota_admin;
GRANT SELECT (channel_id, name, base_url, priority, weight, status, created_at) ON quota.channel TO quota_admin;
GRANT SELECT, DELETE, UPDATE (name, enabled, expires_at, suspended_until, suspended_by) ON quota.api_key
    TO quota_admin;
GRANT SELECT ON quota.counter, quota.rolling_usage, quota.reservation, quota.released,
                quota.usage_ledger, quota.usage_daily, quota.event, quota.unpriced_model_day,
                quota.ledger_request, quota.ledger_closed, quota.ledger_checkpoint TO quota_admin;
-- The webhook notifier (pg-quota-relay notify) runs as a login role granted quota_admin: it reads
-- the event log and keeps its cursor and its failed deliveries.
GRANT SELECT, INSERT, UPDATE, DELETE ON quota.notifier_cursor, quota.webhook_delivery TO quota_admin;
GRANT EXECUTE ON FUNCTION
    quota.create_user(text),
    quota.create_key(bigint, text, timestamptz),
    quota.reset(bigint),
    quota.status(bigint, text),
    quota.channel_status(),
    quota.create_model_group(text, text[]),
    quota.sweep(),
    quota.drift(),
    quota.ledger_partitions(),
    quota.maintain_ledger(),
    quota.clock(),
    quota.approx_duration(bigint),
    quota.window_bounds(text, integer, text, timestamptz, text, integer, integer, timestamptz),
    quota.policy_window(quota.policy, timestamptz),
    quota.policies_for(bigint, bigint, text, bigint, timestamptz),
    quota.policy_window_problem(text, integer, text, text, integer, integer),
    quota.refuse_row(text, text, text),
    quota.subject_exists(text, bigint),
    quota.check_subject(text, text[], text, bigint),
    quota.check_subject_and_metric(text, text[], text, bigint, text),
    quota.price_for(text),
    quota.price_model(text),
    quota.price_prefixes(text)
TO quota_admin;
