-- The relay's login role, as a superuser (once per cluster; safe to run again):
--   psql -v relay_role=pgq_relay [-v relay_password=...] -f sql/examples/relay_role.sql
-- The relay logs in as a member of quota_relay, never as a superuser: it may run the request
-- lifecycle and nothing else. API keys are bind parameters of quota.admit, so a server that logs
-- statements (log_statement, log_min_duration_statement) would log them in full with their
-- parameters: this role logs no bind parameters and no statement durations. Both settings are
-- superuser-only: the role cannot undo them, and they must be set on the login role itself
-- (settings of a group role such as quota_relay do not reach its members).
SELECT format('CREATE ROLE %I LOGIN IN ROLE quota_relay', :'relay_role')
WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = :'relay_role') \gexec
ALTER ROLE :"relay_role" NOSUPERUSER LOGIN;
GRANT quota_relay TO :"relay_role";
ALTER ROLE :"relay_role" SET log_parameter_max_length = 0;
ALTER ROLE :"relay_role" SET log_min_duration_statement = -1;
\if :{?relay_password}
ALTER ROLE :"relay_role" PASSWORD :'relay_password';
\endif
