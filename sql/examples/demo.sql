-- Demo data for scripts/run.sh: one user, one key, prices, and two policies.
-- Prints the demo key (the last line of output) — it is shown only once.
INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok, cached_input_per_mtok) VALUES
    ('gpt-4o-mini', 0.15, 0.60, 0.075),
    ('gpt-4o',      2.50, 10.00, 1.25)
ON CONFLICT (model) DO NOTHING;

SELECT quota.create_user('demo') AS demo_user \gset

-- $1.00 per local day (Europe/Berlin midnight), strict: a request that would overshoot is refused.
INSERT INTO quota.policy (name, subject_type, subject_id, metric, period, time_zone, quota_limit, boundary)
VALUES ('demo daily spend', 'user', :demo_user, 'cost', 'day', 'Europe/Berlin', 1.00, 'strict');

-- 100,000 tokens per rolling 5 hours, graceful: the request in flight may finish.
INSERT INTO quota.policy (name, subject_type, subject_id, metric, period, window_mode, quota_limit, boundary)
VALUES ('demo 5h tokens', 'user', :demo_user, 'tokens', '5h', 'rolling', 100000, 'graceful');

SELECT quota.create_key(:demo_user, 'demo key');
