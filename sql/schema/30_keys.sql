-- Users, keys and prices.

CREATE FUNCTION quota.create_user(name text) RETURNS bigint
LANGUAGE sql VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    INSERT INTO quota.app_user (name) VALUES (create_user.name) RETURNING user_id
$$;

-- Returns the secret once: sk-pgq-<12 hex public id>-<64 hex secret>. Only sha256(secret) is
-- stored. The randomness is gen_random_uuid()'s, i.e. pg_strong_random().
CREATE FUNCTION quota.create_key(user_id bigint, name text, expires_at timestamptz DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    public_id text := left(replace(gen_random_uuid()::text, '-', ''), 12);
    secret    text := replace(gen_random_uuid()::text, '-', '') || replace(gen_random_uuid()::text, '-', '');
BEGIN
    IF create_key.user_id IS NULL OR NOT EXISTS (SELECT 1 FROM quota.app_user u WHERE u.user_id = create_key.user_id) THEN
        RAISE EXCEPTION 'create_key: no user with user_id %', create_key.user_id
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    IF coalesce(create_key.name, '') = '' THEN
        RAISE EXCEPTION 'create_key: name must not be empty' USING ERRCODE = 'not_null_violation';
    END IF;
    INSERT INTO quota.api_key (user_id, name, public_id, secret_hash, expires_at)
    VALUES (create_key.user_id, create_key.name, public_id,
            sha256(convert_to(secret, 'UTF8')), create_key.expires_at);
    RETURN 'sk-pgq-' || public_id || '-' || secret;
END
$$;

-- The key row for a presented secret, or nothing. Indexed lookup by public id, then hash compare.
-- Shape checked by length and prefix only: a regular expression with {64} costs ~25 µs a call,
-- and a malformed id or secret cannot match a stored public id and hash anyway.
CREATE FUNCTION quota.key_for_secret(api_key text) RETURNS SETOF quota.api_key
LANGUAGE sql STABLE ROWS 1 AS $$
    SELECT k.* FROM quota.api_key k
    WHERE length(api_key) = 84 AND left(api_key, 7) = 'sk-pgq-' AND substr(api_key, 20, 1) = '-'
      AND k.public_id = substr(api_key, 8, 12)
      AND k.secret_hash = sha256(convert_to(substr(api_key, 21), 'UTF8'))
$$;

-- Cost of a usage in money, exactly, at a model's prices; NULL when p is NULL (no price). The
-- one pricing rule: an inlinable expression, so the lifecycle's statements price in place.
CREATE FUNCTION quota.cost_of(p quota.model_price, input_tokens bigint, output_tokens bigint,
                              cached_tokens bigint)
RETURNS numeric
LANGUAGE sql IMMUTABLE AS $$
    SELECT trim_scale(((input_tokens - least(cached_tokens, input_tokens)) * p.input_per_mtok
            + least(cached_tokens, input_tokens) * coalesce(p.cached_input_per_mtok, p.input_per_mtok)
            + output_tokens * p.output_per_mtok) / 1000000)
$$;

-- The price a model is charged at (the rule of pg_quota_core::pricing): its own row; else its
-- alias's (quota.model_alias); else that of the longest priced model whose name it starts with,
-- followed by '-', '@' or ':' (quota.price_prefixes, longest first). No row: the model has no
-- price. The branches run in order and the first row ends the search (an exactly priced model
-- costs one index probe); inlined into the lifecycle's statements.
CREATE FUNCTION quota.price_for(model text) RETURNS SETOF quota.model_price
LANGUAGE sql STABLE ROWS 1 AS $$
    (SELECT p.* FROM quota.model_price p WHERE p.model = price_for.model)
    UNION ALL
    (SELECT p.* FROM quota.model_alias a JOIN quota.model_price p ON p.model = a.model
     WHERE a.alias = price_for.model)
    UNION ALL
    (SELECT p.* FROM unnest(quota.price_prefixes(price_for.model)) WITH ORDINALITY c(name, n)
     JOIN quota.model_price p ON p.model = c.name ORDER BY c.n LIMIT 1)
    LIMIT 1
$$;

-- The priced model a model is charged as (quota.price_for), or NULL: for admins.
CREATE FUNCTION quota.price_model(model text) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT p.model FROM quota.price_for(model) p
$$;
