-- Daily rollups per key/user/model/channel, kept by a trigger in the settle transaction. A
-- correction row (a late settle of a swept request) corrects amounts and adds no request.
CREATE FUNCTION quota.usage_daily_add() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    v_request integer := CASE WHEN NEW.settled_by = 'correction' THEN 0 ELSE 1 END;
BEGIN
    INSERT INTO quota.usage_daily AS d (day, key_id, user_id, model, channel_id, requests, input_tokens,
                                        output_tokens, cached_tokens, cost, unbilled)
    VALUES ((NEW.settled_at AT TIME ZONE 'UTC')::date, NEW.key_id, NEW.user_id, NEW.model,
            coalesce(NEW.channel_id, 0), v_request, NEW.input_tokens, NEW.output_tokens, NEW.cached_tokens,
            NEW.cost, CASE WHEN NEW.billed THEN 0 ELSE v_request END)
    ON CONFLICT (day, key_id, model, channel_id) DO UPDATE SET
        requests      = d.requests + EXCLUDED.requests,
        input_tokens  = d.input_tokens + EXCLUDED.input_tokens,
        output_tokens = d.output_tokens + EXCLUDED.output_tokens,
        cached_tokens = d.cached_tokens + EXCLUDED.cached_tokens,
        cost          = d.cost + EXCLUDED.cost,
        unbilled      = d.unbilled + EXCLUDED.unbilled;
    RETURN NULL;
END
$$;

CREATE TRIGGER usage_daily_add AFTER INSERT ON quota.usage_ledger
    FOR EACH ROW EXECUTE FUNCTION quota.usage_daily_add();

-- The ledger is append-only.
CREATE FUNCTION quota.usage_ledger_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'quota.usage_ledger is append-only (% refused)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER usage_ledger_append_only BEFORE UPDATE OR DELETE OR TRUNCATE ON quota.usage_ledger
    FOR EACH STATEMENT EXECUTE FUNCTION quota.usage_ledger_append_only();

-- Every ledger row's request id goes into quota.ledger_request, whose primary key keeps the
-- ledger's request ids unique (a second settle of a request fails here), one statement at a time.
CREATE FUNCTION quota.ledger_request_add() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO quota.ledger_request (request_id, settled_by, settled_at, billed, unbilled_reason, cost)
    SELECT n.request_id, n.settled_by, n.settled_at, n.billed, n.unbilled_reason, n.cost FROM new_rows n;
    RETURN NULL;
END
$$;

CREATE TRIGGER ledger_request_add AFTER INSERT ON quota.usage_ledger
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION quota.ledger_request_add();
