-- Shadow mode (policy.enforce = false): a new limit is counted and shown but never refuses or
-- suspends; the first request of a window it would have refused logs shadow_refusal. One
-- UPDATE makes it enforce, with the usage it has counted.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
BEGIN;
SET LOCAL pg_quota.fake_now = '2026-07-01 10:00:00+00';
SELECT quota.create_user('sia') AS sia \gset
SELECT quota.create_key(:sia, 'shadowed') AS key \gset
SELECT key_id AS kid FROM quota.api_key WHERE name = 'shadowed' \gset
-- The limit in force: 50 requests a week. The one being tried: 2 requests a day, strict, that
-- would suspend the key; in shadow.
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :sia, 'requests', 'week', 50) RETURNING policy_id AS live \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, on_exhausted, enforce)
VALUES ('user', :sia, 'requests', 'day', 2, 'disable', false) RETURNING policy_id AS trial \gset
SELECT allowed FROM quota.admit(:'key', 'shadow-1', 'm', 1, 1);
SELECT settled FROM quota.settle('shadow-1', 1, 1);
SELECT allowed FROM quota.admit(:'key', 'shadow-2', 'm', 1, 1);
SELECT settled FROM quota.settle('shadow-2', 1, 1);
-- The third request would be refused by the trial: it passes, and that is logged once, with
-- no exhausted or disabled event and no suspension. Its rate limit is the live policy's.
SELECT allowed, ratelimit_limit, ratelimit_remaining FROM quota.admit(:'key', 'shadow-3', 'm', 1, 1);
SELECT settled FROM quota.settle('shadow-3', 1, 1);
SELECT allowed FROM quota.admit(:'key', 'shadow-4', 'm', 1, 1);
SELECT settled FROM quota.settle('shadow-4', 1, 1);
SELECT kind, policy_id = :trial AS trial, key_id = :kid AS this_key, detail - 'scope_id' AS detail
FROM quota.event WHERE policy_id IN (:live, :trial) AND kind NOT LIKE 'policy_%' ORDER BY event_id;
SELECT suspended_until FROM quota.api_key WHERE key_id = :kid;
-- quota.status shows the trial's would-be state, marked as not enforced.
SELECT policy_id = :trial AS trial, quota_limit, used, remaining, state, enforce, limit_key
FROM quota.status(:kid) ORDER BY policy_id;

-- A shadow policy forms a limit of its own: one with a higher limit than the policy in force
-- does not raise it (several sources of one limit merge by MAX).
SELECT quota.create_user('tom') AS tom \gset
SELECT quota.create_key(:tom, 'capped') AS tkey \gset
SELECT key_id AS tkid FROM quota.api_key WHERE name = 'capped' \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :tom, 'requests', 'day', 1);
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, enforce)
VALUES ('user', :tom, 'requests', 'day', 100, false);
SELECT allowed FROM quota.admit(:'tkey', 'shadow-t1', 'm', 1, 1);
SELECT http_status, error_code FROM quota.admit(:'tkey', 'shadow-t2', 'm', 1, 1);
SELECT effective_limit, enforce FROM quota.status(:tkid) ORDER BY policy_id;

-- The next window logs a would-be refusal again.
SET LOCAL pg_quota.fake_now = '2026-07-02 10:00:00+00';
SELECT allowed FROM quota.admit(:'key', 'shadow-5', 'm', 1, 1);
SELECT settled FROM quota.settle('shadow-5', 1, 1);
SELECT allowed FROM quota.admit(:'key', 'shadow-6', 'm', 1, 1);
SELECT settled FROM quota.settle('shadow-6', 1, 1);
SELECT allowed FROM quota.admit(:'key', 'shadow-7', 'm', 1, 1);
SELECT settled FROM quota.settle('shadow-7', 1, 1);
SELECT at, detail ->> 'window_start' AS window_start, detail ->> 'why' AS why
FROM quota.event WHERE policy_id = :trial AND kind = 'shadow_refusal' ORDER BY event_id;

-- One UPDATE makes the trial enforce: the 3 requests it has counted today count, so the next
-- request is refused, the window logged exhausted and the key suspended as it says.
SET LOCAL pg_quota.fake_now = '2026-07-02 11:00:00+00';
UPDATE quota.policy SET enforce = true WHERE policy_id = :trial;
SELECT http_status, error_code FROM quota.admit(:'key', 'shadow-8', 'm', 1, 1);
SELECT suspended_by = :trial AS suspended_by_trial FROM quota.api_key WHERE key_id = :kid;
SELECT kind FROM quota.event WHERE policy_id = :trial AND at = '2026-07-02 11:00:00+00' ORDER BY event_id;
SELECT used, state, enforce FROM quota.status(:kid) WHERE policy_id = :trial;

-- A channel's cap in shadow never takes the channel out of routing; it logs its would-be
-- refusal (no key: the cap is the channel's).
SELECT quota.create_user('uma') AS uma \gset
SELECT quota.create_key(:uma, 'routed') AS ukey \gset
INSERT INTO quota.channel (name, base_url, api_key) VALUES ('shadow-acct', 'http://127.0.0.1:9/v1', 'sk-x')
RETURNING channel_id AS ch \gset
INSERT INTO quota.channel_model (channel_id, model) VALUES (:ch, 'shadow-model');
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, enforce)
VALUES ('channel', :ch, 'requests', 'day', 1, false) RETURNING policy_id AS chpol \gset
SELECT allowed, channel_id = :ch AS routed FROM quota.admit(:'ukey', 'shadow-c1', 'shadow-model', 1, 1);
SELECT settled FROM quota.settle('shadow-c1', 1, 1);
SELECT allowed, channel_id = :ch AS routed FROM quota.admit(:'ukey', 'shadow-c2', 'shadow-model', 1, 1);
SELECT allowed, channel_id = :ch AS routed FROM quota.admit(:'ukey', 'shadow-c3', 'shadow-model', 1, 1);
SELECT kind, key_id, detail ->> 'why' AS why FROM quota.event WHERE policy_id = :chpol AND kind = 'shadow_refusal';
SELECT state FROM quota.channel_status() WHERE channel_id = :ch;
ROLLBACK;
