-- Key 1 gets five more policies (six in all): user cost/day plus key and user policies on
-- every metric and several periods, fixed and rolling.
INSERT INTO quota.policy (subject_type, subject_id, metric, period, period_minutes, window_mode, quota_limit)
SELECT 'key', 1, 'tokens', '5h', NULL::integer, 'fixed', 1000000000000
UNION ALL SELECT 'key', 1, 'requests', 'week', NULL, 'fixed', 1000000000000
UNION ALL SELECT 'user', u.user_id, 'tokens', 'month', NULL, 'fixed', 1000000000000 FROM quota.app_user u WHERE u.name = 'bench-1'
UNION ALL SELECT 'user', u.user_id, 'requests', 'minutes', 90, 'fixed', 1000000000000 FROM quota.app_user u WHERE u.name = 'bench-1'
UNION ALL SELECT 'key', 1, 'cost', '5h', NULL, 'rolling', 1000000000000;
