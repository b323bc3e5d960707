-- Key 2 and its user (bench-2) become subject to six policies, one of every scope, plus an
-- active boost, for model bench-model-6 (pair_hot6.sql): the user's cost/day (from setup.sql),
-- a key policy, a user-group policy, a model-group policy, a rolling key policy, and a cap on
-- the channel that serves bench-model-6 (so admit also routes). Other keys and bench-model are
-- untouched, so the other runs measure the same thing before and after this file.
INSERT INTO quota.model_price VALUES ('bench-model-6', 1, 2, NULL);
INSERT INTO quota.user_group (name) VALUES ('bench-group');
INSERT INTO quota.user_group_member
SELECT g.group_id, u.user_id FROM quota.user_group g, quota.app_user u
WHERE g.name = 'bench-group' AND u.name = 'bench-2';
SELECT quota.create_model_group('bench-models', ARRAY['bench-model-6']);
INSERT INTO quota.channel (name, base_url, api_key) VALUES ('bench-upstream', 'http://127.0.0.1:9/v1', 'sk-bench');
INSERT INTO quota.channel_model (channel_id, model) SELECT channel_id, 'bench-model-6' FROM quota.channel;

WITH k AS (SELECT key_id FROM quota.api_key WHERE public_id = '000000000002')
INSERT INTO quota.policy (subject_type, subject_id, model_group, metric, period, period_minutes, window_mode, quota_limit)
SELECT 'key', k.key_id, NULL::bigint, 'tokens', '5h', NULL::integer, 'fixed', 1000000000000 FROM k
UNION ALL SELECT 'user_group', g.group_id, NULL, 'requests', 'week', NULL, 'fixed', 1000000000000
          FROM quota.user_group g WHERE g.name = 'bench-group'
UNION ALL SELECT 'user', u.user_id, m.model_group_id, 'tokens', 'month', NULL, 'fixed', 1000000000000
          FROM quota.app_user u, quota.model_group m WHERE u.name = 'bench-2' AND m.name = 'bench-models'
UNION ALL SELECT 'key', k.key_id, NULL, 'cost', 'minutes', 90, 'rolling', 1000000000000 FROM k
UNION ALL SELECT 'channel', c.channel_id, NULL, 'tokens', 'day', NULL, 'fixed', 1000000000000
          FROM quota.channel c WHERE c.name = 'bench-upstream';
INSERT INTO quota.boost (subject_type, subject_id, metric, period, amount, expires_at)
SELECT 'key', key_id, 'tokens', '5h', 1000, quota.clock() + interval '1 day'
FROM quota.api_key WHERE public_id = '000000000002';
