-- Bounded inputs: model names, request ids and token counts are checked before anything is
-- read or written (PQ400, naming the argument); NaN and infinite limits, boosts and prices
-- are refused.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
BEGIN;
SET LOCAL pg_quota.fake_now = '2026-06-01 12:00:00+00';
-- The SQLSTATE and message of a statement's error, or 'ok'.
CREATE FUNCTION pg_temp.outcome(statement text) RETURNS text LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE statement;
    RETURN 'ok';
EXCEPTION WHEN OTHERS THEN
    RETURN SQLSTATE || ': ' || left(SQLERRM, 200);
END
$$;
INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok) VALUES ('gpt-b', 1, 1);
SELECT quota.create_user('bounds') AS bounds \gset
SELECT quota.create_key(:bounds, 'bounds') AS key \gset
SELECT key_id AS kid FROM quota.api_key WHERE name = 'bounds' \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :bounds, 'tokens', 'day', 1000000);

SELECT label, pg_temp.outcome(format('SELECT * FROM quota.admit(%L, %L, %L, %s, %s)', :'key', r, m, e, o))
FROM (VALUES
    ('a model of 256 bytes',          'in-i1', repeat('m', 256),   1, 1),
    ('a model of 257 bytes',          'in-i2', repeat('m', 257),   1, 1),
    ('a model of a megabyte',         'in-i3', repeat('m', 1048576), 1, 1),
    ('a model with a newline',        'in-i4', 'gpt-b' || chr(10) || 'x', 1, 1),
    ('a model with an escape','in-i5', 'gpt-b' || chr(27), 1, 1),
    ('an empty model',                'in-i6', '',                 1, 1),
    ('a request id of 200 bytes',     repeat('r', 200), 'gpt-b', 1, 1),
    ('a request id of 201 bytes',     repeat('r', 201), 'gpt-b', 1, 1),
    ('a request id of a megabyte',    repeat('r', 1048576), 'gpt-b', 1, 1),
    ('a negative estimate',           'in-i7', 'gpt-b',           -1, 1),
    ('a negative output limit',       'in-i8', 'gpt-b',            1, -1),
    ('an output limit near 2^63',     'in-i9', 'gpt-b',            1, 9223372036854775807)
) t(label, r, m, e, o);
-- (not even an unknown key gets further than the checks)
SELECT pg_temp.outcome($$SELECT * FROM quota.admit('sk-nope', 'in-i10', 'gpt-b', -5, 1)$$) AS unknown_key;

SELECT allowed FROM quota.admit(:'key', 'in-s1', 'gpt-b', 10, 10);
SELECT label, pg_temp.outcome(format('SELECT * FROM quota.settle(%L, %s, %s, %s)', 'in-s1', i, o, c))
FROM (VALUES
    ('a negative input',     -1, 1, 0),
    ('a negative output',     1, -1, 0),
    ('negative cached',       1, 1, -1),
    ('a count near 2^63',    9223372036854775807, 1, 0)
) t(label, i, o, c);
SELECT pg_temp.outcome(format('SELECT * FROM quota.settle(%L, 1, 1)', repeat('r', 201))) AS long_settle_id;
SELECT billed, cost FROM quota.settle('in-s1', 10, 10);
SELECT count(*) AS drifting_counters FROM quota.drift();

-- NaN compares above every number: as a limit it would remove the limit. Refused, as are
-- infinite limits, boosts and prices.
SELECT label, pg_temp.outcome(statement) FROM (VALUES
    ('NaN limit', format($q$INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
                            VALUES ('user', %s, 'cost', 'day', 'NaN')$q$, :bounds)),
    ('infinite limit', format($q$INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
                                 VALUES ('user', %s, 'cost', 'day', 'Infinity')$q$, :bounds)),
    ('NaN by update', $q$UPDATE quota.policy SET quota_limit = 'NaN'$q$),
    ('NaN boost', format($q$INSERT INTO quota.boost (subject_type, subject_id, metric, period, amount, expires_at)
                            VALUES ('user', %s, 'tokens', 'day', 'NaN', '2026-07-01')$q$, :bounds)),
    ('infinite boost', format($q$INSERT INTO quota.boost (subject_type, subject_id, metric, period, amount, expires_at)
                                 VALUES ('user', %s, 'tokens', 'day', 'Infinity', '2026-07-01')$q$, :bounds)),
    ('NaN price', $q$INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok) VALUES ('nan', 'NaN', 1)$q$),
    ('infinite price', $q$INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok) VALUES ('inf', 1, 'Infinity')$q$)
) t(label, statement);
SELECT metric, quota_limit, remaining, state FROM quota.status(:kid);
ROLLBACK;
