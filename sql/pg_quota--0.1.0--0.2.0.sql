-- pg_quota 0.1.0 → 0.2.0. Every schema change after release 0.1.0 goes here as well as into
-- sql/schema/, so that ALTER EXTENSION pg_quota UPDATE gives a 0.1.0 database exactly what a
-- fresh install of 0.2.0 has, keeping its data (scripts/test-upgrade.sh proves it).
\echo Use "ALTER EXTENSION pg_quota UPDATE" to load this file. \quit

-- quota.models lists aliases (quota.model_alias) beside the models they price as.
CREATE OR REPLACE FUNCTION quota.models(api_key text) RETURNS TABLE (model text, owned_by text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v record;
BEGIN
    SELECT r.error_code, r.message INTO v
    FROM quota.key_for_secret(models.api_key) k JOIN quota.app_user u ON u.user_id = k.user_id
    LEFT JOIN quota.key_refusal(k.enabled, u.enabled, k.expires_at, quota.clock()) r ON true;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'Incorrect API key provided.' USING ERRCODE = 'invalid_authorization_specification';
    ELSIF v.error_code IS NOT NULL THEN
        RAISE EXCEPTION '%', v.message USING ERRCODE = 'PQ403', DETAIL = v.error_code;
    END IF;
    -- priced models, their aliases, and the models of enabled channels
    RETURN QUERY SELECT m.model, 'pg_quota'::text
    FROM (SELECT p.model FROM quota.model_price p
          UNION SELECT a.alias FROM quota.model_alias a
          UNION SELECT cm.model FROM quota.channel_model cm
                JOIN quota.channel c ON c.channel_id = cm.channel_id AND c.status = 'enabled') m
    ORDER BY m.model;
END
$$;

-- Issue 19: batched admission
-- quota.admit_many and quota.settle_many (sql/schema/45_batch.sql), executable by the relay role.
CREATE FUNCTION quota.admit_many(api_keys text[], request_ids text[], models text[],
                                 est_input_tokens bigint[], max_output_tokens bigint[],
                                 channel_ids bigint[] DEFAULT NULL)
RETURNS TABLE (ordinal integer, allowed boolean, http_status integer, error_code text, message text,
               retry_after_s integer, key_id bigint, user_id bigint, channel_id bigint,
               upstream_base_url text, upstream_api_key text, upstream_model text,
               ratelimit_limit numeric, ratelimit_remaining numeric, ratelimit_metric text,
               ratelimit_reset_at timestamptz, sqlstate text)
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
AS 'MODULE_PATHNAME', 'admit_many_wrapper';

CREATE FUNCTION quota.settle_many(request_ids text[], input_tokens bigint[], output_tokens bigint[],
                                  cached_tokens bigint[] DEFAULT NULL)
RETURNS TABLE (ordinal integer, settled boolean, billed boolean, unbilled_reason text, cost numeric,
               replay boolean, sqlstate text, message text)
LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan SET enable_seqscan = off SET jit = off
AS 'MODULE_PATHNAME', 'settle_many_wrapper';

REVOKE ALL ON FUNCTION quota.admit_many(text[], text[], text[], bigint[], bigint[], bigint[]),
    quota.settle_many(text[], bigint[], bigint[], bigint[]) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION quota.admit_many(text[], text[], text[], bigint[], bigint[], bigint[]),
    quota.settle_many(text[], bigint[], bigint[], bigint[]) TO quota_relay;
