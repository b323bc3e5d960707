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
