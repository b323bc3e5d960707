-- Fills a database of the old release with what a DBA's database holds: users, keys, prices
-- and aliases, groups, model groups, channels with caps and grants, policies of every kind, a
-- boost, ledger history over several days, a refund, a sweep, and reservations still open.
-- Run with psql -v ON_ERROR_STOP=1; the open reservations' ids start with 'open-'.
SET TimeZone = 'UTC';
-- Everything is made before the history it counts (a policy counts from its creation on).
SET pg_quota.fake_now = '2026-11-19 09:00+00';
INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok, cached_input_per_mtok) VALUES
    ('gpt-4o-mini', 0.15, 0.60, 0.075), ('gpt-4o', 2.50, 10.00, 1.25);
INSERT INTO quota.model_alias (alias, model) VALUES ('mini', 'gpt-4o-mini');
SELECT quota.create_user('acme') AS acme \gset
SELECT quota.create_user('globex') AS globex \gset
SELECT quota.create_key(:acme, 'acme prod') AS acme_key \gset
SELECT quota.create_key(:globex, 'globex') AS globex_key \gset
SELECT key_id AS acme_kid FROM quota.api_key WHERE name = 'acme prod' \gset
INSERT INTO quota.user_group (name) VALUES ('team') RETURNING group_id AS team \gset
INSERT INTO quota.user_group_member (group_id, user_id) VALUES (:team, :acme), (:team, :globex);
SELECT quota.create_model_group('frontier', ARRAY['gpt-4o']) AS frontier \gset
INSERT INTO quota.channel (name, base_url, api_key, priority) VALUES
    ('primary', 'https://primary.example/v1', 'sk-primary', 10),
    ('backup', 'https://backup.example/v1', 'sk-backup', 0);
SELECT channel_id AS primary_ch FROM quota.channel WHERE name = 'primary' \gset
INSERT INTO quota.channel_model (channel_id, model, upstream_model)
SELECT channel_id, m, NULL FROM quota.channel, unnest(ARRAY['gpt-4o', 'gpt-4o-mini']) m;
INSERT INTO quota.channel_grant (channel_id, subject_type, subject_id) VALUES (:primary_ch, 'key', :acme_kid);
INSERT INTO quota.policy (subject_type, subject_id, metric, period, time_zone, quota_limit)
VALUES ('user', :acme, 'cost', 'day', 'Europe/Berlin', 50),
       ('user_group', :team, 'tokens', 'week', 'UTC', 10000000),
       ('channel', :primary_ch, 'tokens', 'day', 'America/New_York', 100000000);
INSERT INTO quota.policy (subject_type, subject_id, metric, period, period_minutes, window_mode, quota_limit)
VALUES ('key', :acme_kid, 'requests', 'minutes', 90, 'rolling', 1000);
INSERT INTO quota.policy (subject_type, subject_id, model_group, metric, period, quota_limit, exclusive)
VALUES ('user', :acme, :frontier, 'cost', 'month', 500, true);
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :globex, 'tokens', 'total', 50000000);
INSERT INTO quota.boost (subject_type, subject_id, metric, period, amount, starts_at, expires_at, reason)
VALUES ('user', :acme, 'cost', 'day', 20, '2026-01-01', '2030-01-01', 'launch');

SELECT set_config('fill.acme_key', :'acme_key', false), set_config('fill.globex_key', :'globex_key', false),
       set_config('fill.primary', :'primary_ch', false) \gset x_
-- History: a week of settled requests on both keys, models, aliases and channels.
DO $$
DECLARE
    d int; i int; k text; rid text;
    keys text[] := ARRAY[current_setting('fill.acme_key'), current_setting('fill.globex_key')];
    models text[] := ARRAY['gpt-4o', 'gpt-4o-mini', 'gpt-4o-mini-2024-07-18', 'mini', 'unpriced-model'];
    a record;
BEGIN
    FOR d IN 0..6 LOOP
        PERFORM set_config('pg_quota.fake_now', (timestamptz '2026-11-20 09:00+00' + d * interval '1 day')::text, false);
        FOR i IN 1..10 LOOP
            k := keys[1 + i % 2];
            rid := format('hist-%s-%s', d, i);
            SELECT * INTO a FROM quota.admit(k, rid, models[1 + i % 5], 100 + i, 50);
            IF NOT a.allowed THEN RAISE EXCEPTION 'fill: % refused: %', rid, a.message; END IF;
            IF i = 7 THEN
                PERFORM quota.refund(rid, 'upstream failed');
            ELSE
                PERFORM quota.settle(rid, 100 + i, 10 * i, i);
            END IF;
        END LOOP;
    END LOOP;
    -- one reservation left by a crashed relay, charged by the sweep, then a late settle
    PERFORM set_config('pg_quota.fake_now', '2026-11-27 09:00+00', false);
    PERFORM quota.admit(keys[1], 'crashed-1', 'gpt-4o-mini', 300, 200);
    PERFORM set_config('pg_quota.fake_now', '2026-11-27 10:00+00', false);
    PERFORM quota.sweep();
    PERFORM quota.settle('crashed-1', 250, 120);
    -- reservations open at the upgrade
    PERFORM quota.admit(keys[1], 'open-1', 'gpt-4o', 400, 100);
    PERFORM quota.admit(keys[2], 'open-2', 'gpt-4o-mini', 200, 300);
    PERFORM quota.admit(keys[1], 'open-3', 'gpt-4o-mini', 50, 50, current_setting('fill.primary')::bigint);
END $$;
