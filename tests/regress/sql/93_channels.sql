-- Channels: pinning one needs a grant (quota.channel_grant), and no answer lists other
-- channels; a channel's base_url changes only with a new api_key; every change is logged
-- without the key.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
BEGIN;
SET LOCAL pg_quota.fake_now = '2026-06-01 12:00:00+00';
SELECT coalesce(max(event_id), 0) AS ev0 FROM quota.event \gset
INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok) VALUES ('gpt-p', 1, 1);
SELECT quota.create_user('pinner') AS pinner \gset
SELECT quota.create_key(:pinner, 'pinner') AS key \gset
SELECT key_id AS kid FROM quota.api_key WHERE name = 'pinner' \gset
INSERT INTO quota.channel (name, base_url, api_key, priority) VALUES
    ('premium', 'https://premium.example/v1', 'sk-premium-secret', 0),
    ('shared', 'https://shared.example/v1', 'sk-shared-secret', 10);
SELECT channel_id AS premium FROM quota.channel WHERE name = 'premium' \gset
SELECT channel_id AS shared FROM quota.channel WHERE name = 'shared' \gset
INSERT INTO quota.channel_model (channel_id, model) VALUES (:premium, 'gpt-p'), (:shared, 'gpt-p');

-- Unpinned, routing picks the shared channel (highest priority).
SELECT allowed, channel_id = :shared AS shared FROM quota.admit(:'key', 'ch-c1', 'gpt-p', 1, 1);
-- Pinning the premium channel without a grant: 403, and nothing of the channel comes back.
SELECT allowed, http_status, error_code, message, upstream_base_url, upstream_api_key
FROM quota.admit(:'key', 'ch-c2', 'gpt-p', 1, 1, :premium);
-- A channel that does not exist gets the same answer: no message tells which ids exist.
SELECT allowed, http_status, error_code, message FROM quota.admit(:'key', 'ch-c3', 'gpt-p', 1, 1, 999999);
SELECT count(*) AS reservations FROM quota.reservation WHERE request_id IN ('ch-c2', 'ch-c3');

-- A grant to the key, its user or one of the user's groups allows pinning.
INSERT INTO quota.channel_grant (channel_id, subject_type, subject_id) VALUES (:premium, 'key', :kid);
SELECT allowed, channel_id = :premium AS premium, upstream_api_key
FROM quota.admit(:'key', 'ch-c4', 'gpt-p', 1, 1, :premium);
SELECT quota.create_user('other') AS other \gset
SELECT quota.create_key(:other, 'other') AS okey \gset
SELECT http_status, error_code FROM quota.admit(:'okey', 'ch-c5', 'gpt-p', 1, 1, :premium);
INSERT INTO quota.user_group (name) VALUES ('vip') RETURNING group_id AS vip \gset
INSERT INTO quota.user_group_member VALUES (:vip, :other);
INSERT INTO quota.channel_grant (channel_id, subject_type, subject_id) VALUES (:premium, 'user_group', :vip);
SELECT allowed, channel_id = :premium AS premium FROM quota.admit(:'okey', 'ch-c6', 'gpt-p', 1, 1, :premium);
INSERT INTO quota.channel_grant (channel_id, subject_type, subject_id) VALUES (:shared, 'user', :other);
SELECT allowed, channel_id = :shared AS shared FROM quota.admit(:'okey', 'ch-c7', 'gpt-p', 1, 1, :shared);
-- A granted channel that does not serve the model says so about that channel only.
SELECT http_status, error_code, message = format('Channel %s does not serve model other-model.', :premium) AS names_it
FROM quota.admit(:'okey', 'ch-c8', 'other-model', 1, 1, :premium);
-- Grants are checked like policies: a subject that does not exist is refused.
\set VERBOSITY terse
SAVEPOINT a;
INSERT INTO quota.channel_grant (channel_id, subject_type, subject_id) VALUES (:premium, 'key', 424242);
ROLLBACK TO a;
INSERT INTO quota.channel_grant (channel_id, subject_type, subject_id) VALUES (:premium, 'channel', :shared);
ROLLBACK TO a;
-- Deleting a subject deletes its grants.
DELETE FROM quota.user_group WHERE group_id = :vip;
SELECT subject_type, subject_id = :kid AS is_key FROM quota.channel_grant ORDER BY 1;

-- The upstream key cannot be sent elsewhere: base_url changes only with a new api_key.
SAVEPOINT c;
UPDATE quota.channel SET base_url = 'https://attacker.example/v1' WHERE channel_id = :premium;
ROLLBACK TO c;
UPDATE quota.channel SET base_url = 'https://attacker.example/v1', api_key = api_key WHERE channel_id = :premium;
ROLLBACK TO c;
\set VERBOSITY default
UPDATE quota.channel SET base_url = 'https://premium2.example/v1', api_key = 'sk-premium-2'
WHERE channel_id = :premium;
UPDATE quota.channel SET priority = 20 WHERE channel_id = :premium;
SELECT upstream_base_url, upstream_api_key FROM quota.admit(:'key', 'ch-c9', 'gpt-p', 1, 1);
DELETE FROM quota.channel WHERE channel_id = :shared;
-- Every insert, edit and delete of a channel is in quota.event, and no key is.
SELECT kind, coalesce(detail -> 'new' ->> 'name', detail -> 'old' ->> 'name') AS channel,
       coalesce(detail -> 'new' ->> 'subject_type', detail -> 'old' ->> 'subject_type') AS grantee,
       detail -> 'new' ->> 'base_url' AS new_base_url, detail ->> 'api_key_changed' AS api_key_changed
FROM quota.event WHERE kind LIKE 'channel%' AND event_id > :ev0 ORDER BY event_id;
SELECT count(*) AS events_with_a_key FROM quota.event WHERE event_id > :ev0 AND detail::text ~ 'sk-(premium|shared)';

-- Admins manage grants; the relay role cannot.
SET LOCAL ROLE quota_admin;
INSERT INTO quota.channel_grant (channel_id, subject_type, subject_id) VALUES (:premium, 'user', :pinner);
SELECT count(*) AS grants FROM quota.channel_grant;
RESET ROLE;
SAVEPOINT b;
SET LOCAL ROLE quota_relay;
SELECT count(*) FROM quota.channel_grant;
ROLLBACK TO b;

SELECT count(*) AS drifting_counters FROM quota.drift();
ROLLBACK;
