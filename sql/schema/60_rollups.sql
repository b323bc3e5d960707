-- Daily rollups per key/user/model/channel, kept by a statement trigger in the settle
-- transaction: one upsert per (day, key, model, channel) of a statement's ledger rows, however
-- many rows a batch settles, in key order (two batches take shared rollup rows in one order). A
-- correction row (a late settle of a swept request) corrects amounts and adds no request.
CREATE FUNCTION quota.usage_daily_add() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO quota.usage_daily AS d (day, key_id, user_id, model, channel_id, requests, input_tokens,
                                        output_tokens, cached_tokens, cost, unbilled)
    SELECT n.day, n.key_id, min(n.user_id), n.model, n.channel_id, sum(n.request), sum(n.input_tokens),
           sum(n.output_tokens), sum(n.cached_tokens), sum(n.cost),
           coalesce(sum(n.request) FILTER (WHERE NOT n.billed), 0)
    FROM (SELECT (r.settled_at AT TIME ZONE 'UTC')::date AS day, r.key_id, r.user_id, r.model,
                 coalesce(r.channel_id, 0) AS channel_id,
                 CASE WHEN r.settled_by = 'correction' THEN 0 ELSE 1 END AS request,
                 r.input_tokens, r.output_tokens, r.cached_tokens, r.cost, r.billed
          FROM new_rows r) n
    GROUP BY n.day, n.key_id, n.model, n.channel_id
    ORDER BY n.day, n.key_id, n.model, n.channel_id
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
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION quota.usage_daily_add();

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
