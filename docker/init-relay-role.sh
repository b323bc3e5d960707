#!/bin/sh
# The relay's login role, pgq_relay (sql/examples/relay_role.sql): a member of quota_relay, never
# a superuser, that logs no bind parameters (API keys are quota.admit's). Runs once, when the
# data directory is initialised, after 10-extension.sql created the extension and its roles.
set -e
psql -v ON_ERROR_STOP=1 -U "$POSTGRES_USER" -d "$POSTGRES_DB" \
  -v relay_role=pgq_relay -v relay_password="${PGQ_RELAY_PASSWORD:?set PGQ_RELAY_PASSWORD}" \
  -f /pg_quota/relay_role.sql
