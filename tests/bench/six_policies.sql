-- Key 1 becomes subject to six policies, one of every scope, plus an active boost: its user's
-- cost/day (from setup.sql), a key policy, a user-group policy, a model-group policy, a rolling
-- key policy, and a cap on the channel that serves bench-model (so admit also routes).
INSERT INTO quota.user_group (name) VALUES ('bench-group');
INSERT INTO quota.user_group_member
SELECT g.group_id, u.user_id FROM quota.user_group g, quota.app_user u
WHERE g.name = 'bench-group' AND u.name = 'bench-1';
SELECT quota.create_model_group('bench-models', ARRAY['bench-model']);
INSERT INTO quota.channel (name, base_url, api_key) VALUES ('bench-upstream', 'http://127.0.0.1:9/v1', 'sk-bench');
INSERT INTO quota.channel_model (channel_id, model) SELECT channel_id, 'bench-model' FROM quota.channel;

INSERT INTO quota.policy (subject_type, subject_id, model_group, metric, period, period_minutes, window_mode, quota_limit)
SELECT 'key', 1, NULL::bigint, 'tokens', '5h', NULL::integer, 'fixed', 1000000000000
UNION ALL SELECT 'user_group', g.group_id, NULL, 'requests', 'week', NULL, 'fixed', 1000000000000
          FROM quota.user_group g WHERE g.name = 'bench-group'
UNION ALL SELECT 'user', u.user_id, m.model_group_id, 'tokens', 'month', NULL, 'fixed', 1000000000000
          FROM quota.app_user u, quota.model_group m WHERE u.name = 'bench-1' AND m.name = 'bench-models'
UNION ALL SELECT 'key', 1, NULL, 'cost', 'minutes', 90, 'rolling', 1000000000000
UNION ALL SELECT 'channel', c.channel_id, NULL, 'tokens', 'day', NULL, 'fixed', 1000000000000
          FROM quota.channel c WHERE c.name = 'bench-upstream';
INSERT INTO quota.boost (subject_type, subject_id, metric, period, amount, expires_at)
VALUES ('key', 1, 'tokens', '5h', 1000, quota.clock() + interval '1 day');
