-- Users and keys: the secret is shown once, only its hash is stored, and admit authenticates.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
BEGIN;
SET LOCAL pg_quota.fake_now = '2026-05-01 12:00:00+00';
SELECT quota.create_user('alice') AS alice \gset
SELECT quota.create_key(:alice, 'laptop') AS key \gset
SELECT quota.create_key(:alice, 'ci', '2026-05-02 00:00:00+00') AS expiring \gset
SELECT :'key' ~ '^sk-pgq-[0-9a-f]{12}-[0-9a-f]{64}$' AS key_format;
-- Nothing stored contains the secret; the stored hash is sha256 of the secret part.
SELECT count(*) AS rows_containing_secret FROM quota.api_key k
WHERE k::text LIKE '%' || substr(:'key', 21) || '%';
SELECT k.secret_hash = sha256(convert_to(substr(:'key', 21), 'UTF8')) AS hash_matches
FROM quota.api_key k WHERE k.name = 'laptop';

-- Unknown, garbled and tampered keys: 401 invalid_api_key.
SELECT allowed, http_status, error_code, message FROM quota.admit('sk-nope', 'k1', 'm', 1, 1);
SELECT allowed, http_status, error_code FROM quota.admit(NULL, 'k2', 'm', 1, 1);
SELECT allowed, http_status, error_code
FROM quota.admit(left(:'key', -1) || CASE right(:'key', 1) WHEN 'a' THEN 'b' ELSE 'a' END, 'k3', 'm', 1, 1);

-- A valid key with no policy is admitted, and its owner is reported.
SELECT allowed, http_status, key_id IS NOT NULL AS has_key_id, user_id = :alice AS owner
FROM quota.admit(:'key', 'k4', 'm', 1, 1);

-- Disabled key: 403 key_disabled. Disabled user: 403 user_disabled. quota.models (the relay's
-- /v1/models) refuses them alike: SQLSTATE PQ403, admit's message, its code in DETAIL.
\set SHOW_CONTEXT never
SELECT count(*) AS models_listed FROM quota.models(:'key');
UPDATE quota.api_key SET enabled = false WHERE name = 'laptop';
SELECT http_status, error_code, message FROM quota.admit(:'key', 'k5', 'm', 1, 1);
SAVEPOINT models;
SELECT * FROM quota.models(:'key');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO models;
UPDATE quota.api_key SET enabled = true WHERE name = 'laptop';
UPDATE quota.app_user SET enabled = false WHERE user_id = :alice;
SELECT http_status, error_code FROM quota.admit(:'key', 'k6', 'm', 1, 1);
SAVEPOINT models;
SELECT * FROM quota.models(:'key');
ROLLBACK TO models;
UPDATE quota.app_user SET enabled = true WHERE user_id = :alice;

-- Expiry: admitted before the instant, 403 key_expired from it on.
SELECT allowed FROM quota.admit(:'expiring', 'k7', 'm', 1, 1);
SET LOCAL pg_quota.fake_now = '2026-05-02 00:00:00+00';
SELECT allowed, http_status, error_code, message FROM quota.admit(:'expiring', 'k8', 'm', 1, 1);
SAVEPOINT models;
SELECT * FROM quota.models(:'expiring');
ROLLBACK TO models;
SELECT * FROM quota.models('sk-nope');
\echo :LAST_ERROR_SQLSTATE
ROLLBACK TO models;
\set SHOW_CONTEXT errors

-- Bad input is an error with SQLSTATE class PQ, not a silent decision.
\set VERBOSITY sqlstate
SELECT * FROM quota.admit(:'key', '', 'm', 1, 1);
ROLLBACK;
BEGIN;
SELECT * FROM quota.admit('sk-x', 'k9', 'm', -1, 1);
ROLLBACK;
\set VERBOSITY default
-- create_key refuses an unknown user.
SELECT quota.create_key(424242, 'ghost');
