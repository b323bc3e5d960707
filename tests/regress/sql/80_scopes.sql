-- Scopes: user groups (per member, MAX merge), model groups, boosts, billing isolation,
-- upstream channels and routing, and the guard against policies that enforce nothing.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
BEGIN;
SET LOCAL pg_quota.fake_now = '2026-06-01 12:00:00+00';
-- $1 in, $1 out per 1000 tokens: a request of 1000 + 1000 tokens costs $2.
INSERT INTO quota.model_price VALUES ('gpt-s', 1000, 1000, NULL), ('claude-s', 1000, 1000, NULL),
                                     ('claude-h', 1000, 1000, NULL);

-- ── User groups: a group policy gives every member the full amount, on its own counter ──
SELECT quota.create_user('ann') AS ann \gset
SELECT quota.create_user('ben') AS ben \gset
SELECT quota.create_key(:ann, 'ann') AS ann_key \gset
SELECT quota.create_key(:ben, 'ben') AS ben_key \gset
INSERT INTO quota.user_group (name) VALUES ('team') RETURNING group_id AS team \gset
INSERT INTO quota.user_group_member VALUES (:team, :ann), (:team, :ben);
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user_group', :team, 'cost', 'day', 4) RETURNING policy_id AS team_pol \gset
-- ann spends $4, the whole amount; she is refused, ben still has his own $4.
SELECT allowed FROM quota.admit(:'ann_key', 'g1', 'gpt-s', 1000, 1000);
SELECT settled FROM quota.settle('g1', 1000, 1000);
SELECT allowed FROM quota.admit(:'ann_key', 'g2', 'gpt-s', 1000, 1000);
SELECT settled FROM quota.settle('g2', 1000, 1000);
SELECT allowed, error_code, message FROM quota.admit(:'ann_key', 'g3', 'gpt-s', 1, 1);
SELECT allowed FROM quota.admit(:'ben_key', 'g4', 'gpt-s', 1000, 1000);
SELECT settled FROM quota.settle('g4', 1000, 1000);
SELECT scope_id = :ann AS is_ann, used FROM quota.counter WHERE policy_id = :team_pol ORDER BY scope_id;

-- ── MAX merge: ben's own $10 a day and the group's $4 a day form one limit of $10 ──
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :ben, 'cost', 'day', 10) RETURNING policy_id AS ben_pol \gset
SELECT subject_type, quota_limit, effective_limit, used, remaining, state
FROM quota.status((SELECT key_id FROM quota.api_key WHERE name = 'ben')) ORDER BY policy_id;
-- $2 used (counted on the group policy); another $6 passes although the group's $4 is spent:
-- the limit admits when any of its sources does.
SELECT allowed FROM quota.admit(:'ben_key', 'g5', 'gpt-s', 3000, 3000);
SELECT settled FROM quota.settle('g5', 3000, 3000);
SELECT subject_type, used, remaining, state
FROM quota.status((SELECT key_id FROM quota.api_key WHERE name = 'ben')) ORDER BY policy_id;
-- His own policy counts from its creation on: $6 of $10, so two more $2 requests fit, a third not.
SELECT allowed FROM quota.admit(:'ben_key', 'g6', 'gpt-s', 1000, 1000);
SELECT allowed FROM quota.admit(:'ben_key', 'g7', 'gpt-s', 1000, 1000);
SELECT allowed, error_code FROM quota.admit(:'ben_key', 'g8', 'gpt-s', 1000, 1000);
SELECT quota.refund('g6'), quota.refund('g7');
-- The smaller source does not cap the larger one: ann's own $1 adds nothing to the group's $4.
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit) VALUES ('user', :ann, 'cost', 'day', 1);
SELECT DISTINCT effective_limit FROM quota.status((SELECT key_id FROM quota.api_key WHERE name = 'ann'));
-- Leaving the group takes the group's policy away from the next admit.
DELETE FROM quota.user_group_member WHERE user_id = :ben;
SELECT subject_type, effective_limit FROM quota.status((SELECT key_id FROM quota.api_key WHERE name = 'ben'));

-- ── Model groups: exclusive membership, all or nothing ──
SELECT quota.create_model_group('claude', ARRAY['claude-s', 'claude-h']) AS claude \gset
\set VERBOSITY default
SAVEPOINT mg;
SELECT quota.create_model_group('mixed', ARRAY['gpt-s', 'claude-h']);
ROLLBACK TO mg;
INSERT INTO quota.model_group (name) VALUES ('other') RETURNING model_group_id AS other \gset
INSERT INTO quota.model_group_member VALUES ('claude-s', :other);
ROLLBACK TO mg;
\set VERBOSITY terse
-- Nothing of the failed group remains; claude-h is still in claude.
SELECT g.name, array_agg(m.model ORDER BY m.model) AS models
FROM quota.model_group g LEFT JOIN quota.model_group_member m USING (model_group_id) GROUP BY 1 ORDER BY 1;

-- ── Model-group policies, and billing isolation ──
SELECT quota.create_user('cid') AS cid \gset
SELECT quota.create_key(:cid, 'cid') AS cid_key \gset
SELECT key_id AS cid_kid FROM quota.api_key WHERE name = 'cid' \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :cid, 'cost', 'day', 4) RETURNING policy_id AS cid_global \gset
INSERT INTO quota.policy (subject_type, subject_id, model_group, metric, period, quota_limit, exclusive)
VALUES ('user', :cid, :claude, 'cost', 'day', 6, true) RETURNING policy_id AS cid_claude \gset
-- A claude request counts on the claude policy only: the global $4 neither judges nor counts it.
SELECT policy_id = :cid_claude AS is_claude, effective_limit FROM quota.status(:cid_kid, 'claude-s');
SELECT allowed FROM quota.admit(:'cid_key', 'x1', 'claude-s', 2500, 2500);
SELECT settled FROM quota.settle('x1', 2500, 2500);
SELECT counted_in_user_global, counted_in_key_global, counted_policy = ARRAY[:cid_claude]::bigint[] AS only_claude
FROM quota.usage_ledger WHERE request_id = 'x1';
SELECT policy_id = :cid_global AS is_global, model_group, used, state FROM quota.status(:cid_kid) ORDER BY policy_id;
-- A gpt request counts on the global policy only (not of the claude group).
SELECT allowed FROM quota.admit(:'cid_key', 'x2', 'gpt-s', 1000, 1000);
SELECT settled FROM quota.settle('x2', 1000, 1000);
SELECT counted_in_user_global, counted_policy = ARRAY[:cid_global]::bigint[] AS only_global
FROM quota.usage_ledger WHERE request_id = 'x2';
-- Without exclusive, a claude request counts on both and both must admit it.
UPDATE quota.policy SET exclusive = false WHERE policy_id = :cid_claude;
SELECT allowed, error_code, message FROM quota.admit(:'cid_key', 'x3', 'claude-h', 1000, 1000);
SELECT allowed FROM quota.admit(:'cid_key', 'x4', 'claude-h', 500, 500);
SELECT settled FROM quota.settle('x4', 500, 500);
SELECT counted_in_user_global, cardinality(counted_policy) AS counted_on FROM quota.usage_ledger WHERE request_id = 'x4';
SELECT policy_id = :cid_global AS is_global, used FROM quota.status(:cid_kid) ORDER BY policy_id;
SELECT * FROM quota.drift();

-- ── Boosts: add to the effective limit exactly while active ──
SELECT quota.create_user('dee') AS dee \gset
SELECT quota.create_key(:dee, 'dee') AS dee_key \gset
SELECT key_id AS dee_kid FROM quota.api_key WHERE name = 'dee' \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :dee, 'requests', 'day', 1);
INSERT INTO quota.boost (subject_type, subject_id, metric, period, amount, starts_at, expires_at, reason)
VALUES ('user', :dee, 'requests', 'day', 2, '2026-06-01 13:00:00+00', '2026-06-01 14:00:00+00', 'launch day')
RETURNING boost_id AS boost \gset
SELECT allowed FROM quota.admit(:'dee_key', 'b1', 'gpt-s', 1, 1);
SELECT settled FROM quota.settle('b1', 1, 1);
SET LOCAL pg_quota.fake_now = '2026-06-01 12:59:59.999999+00';
SELECT boost, effective_limit FROM quota.status(:dee_kid);
SELECT allowed FROM quota.admit(:'dee_key', 'b2', 'gpt-s', 1, 1);
SET LOCAL pg_quota.fake_now = '2026-06-01 13:00:00+00';
SELECT boost, effective_limit FROM quota.status(:dee_kid);
SELECT allowed FROM quota.admit(:'dee_key', 'b3', 'gpt-s', 1, 1);
SELECT settled FROM quota.settle('b3', 1, 1);
SET LOCAL pg_quota.fake_now = '2026-06-01 13:59:59.999999+00';
SELECT allowed FROM quota.admit(:'dee_key', 'b4', 'gpt-s', 1, 1);
SELECT quota.refund('b4');
SET LOCAL pg_quota.fake_now = '2026-06-01 14:00:00+00';
SELECT boost, effective_limit, used, state FROM quota.status(:dee_kid);
SELECT allowed FROM quota.admit(:'dee_key', 'b5', 'gpt-s', 1, 1);
-- Revoking takes effect on the next admit; both are logged.
SET LOCAL pg_quota.fake_now = '2026-06-01 13:30:00+00';
SELECT allowed FROM quota.admit(:'dee_key', 'b6', 'gpt-s', 1, 1);
SELECT quota.refund('b6');
DELETE FROM quota.boost WHERE boost_id = :boost;
SELECT allowed FROM quota.admit(:'dee_key', 'b7', 'gpt-s', 1, 1);
SELECT kind, detail -> 'new' ->> 'reason' AS granted, detail -> 'old' ->> 'reason' AS revoked,
       detail -> 'new' ->> 'amount' AS amount
FROM quota.event WHERE kind LIKE 'boost%' ORDER BY event_id;

-- ── Guard: a row that would enforce or grant nothing is refused, naming the field ──
SAVEPOINT guard;
INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit) VALUES ('user', :dee, 'day', NULL);
ROLLBACK TO guard;
INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit) VALUES ('user', :dee, 'day', 0);
ROLLBACK TO guard;
INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit, exclusive) VALUES ('user', :dee, 'day', 1, true);
ROLLBACK TO guard;
INSERT INTO quota.policy (subject_type, subject_id, period, quota_limit) VALUES ('user_group', 999999, 'day', 1);
ROLLBACK TO guard;
INSERT INTO quota.boost (subject_type, subject_id, period, amount, expires_at) VALUES ('user', :dee, 'day', 0, '2027-01-01');
ROLLBACK TO guard;
INSERT INTO quota.boost (subject_type, subject_id, period, amount, starts_at, expires_at)
VALUES ('user', :dee, 'day', 1, '2027-01-01', '2026-01-01');
ROLLBACK TO guard;
INSERT INTO quota.boost (subject_type, subject_id, period, amount, expires_at) VALUES ('user', :dee, 'minutes', 1, '2027-01-01');
ROLLBACK TO guard;
-- A model group that limits still exist for cannot be dropped (its limits would vanish).
DELETE FROM quota.model_group WHERE model_group_id = :claude;
ROLLBACK TO guard;
-- Deleting a subject deletes its policies, and each deletion is logged.
DELETE FROM quota.user_group WHERE group_id = :team;
SELECT count(*) AS team_policies FROM quota.policy WHERE subject_type = 'user_group' AND subject_id = :team;
SELECT kind, policy_id = :team_pol AS team_policy FROM quota.event WHERE kind = 'policy_deleted';
COMMIT;

-- ── Channels: routing by priority then weight, caps, pinning ──
BEGIN;
-- 23:00 in New York on June 1st.
SET LOCAL pg_quota.fake_now = '2026-06-02 03:00:00+00';
INSERT INTO quota.channel (name, base_url, api_key, priority) VALUES
    ('free-tier', 'http://free.invalid/v1', 'sk-free-secret', 10),
    ('paid', 'http://paid.invalid/v1', 'sk-paid-secret', 0),
    ('off', 'http://off.invalid/v1', 'sk-off-secret', 99);
SELECT channel_id AS free FROM quota.channel WHERE name = 'free-tier' \gset
SELECT channel_id AS paid FROM quota.channel WHERE name = 'paid' \gset
SELECT channel_id AS off FROM quota.channel WHERE name = 'off' \gset
UPDATE quota.channel SET status = 'disabled' WHERE channel_id = :off;
INSERT INTO quota.channel_model VALUES (:free, 'gpt-s', 'gpt-s-2026'), (:paid, 'gpt-s', NULL), (:off, 'gpt-s', NULL),
                                       (:off, 'only-off', NULL);
-- The free tier: 1000 raw tokens a day, reset at local midnight in New York.
INSERT INTO quota.policy (subject_type, subject_id, metric, period, time_zone, quota_limit)
VALUES ('channel', :free, 'tokens', 'day', 'America/New_York', 1000) RETURNING policy_id AS free_cap \gset
-- A channel cap covers every model of the channel and suspends no customer's key.
SAVEPOINT cap;
INSERT INTO quota.policy (subject_type, subject_id, model_group, metric, period, quota_limit)
VALUES ('channel', :free, :claude, 'tokens', 'day', 1000);
ROLLBACK TO cap;
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, on_exhausted)
VALUES ('channel', :free, 'tokens', 'day', 1000, 'disable');
ROLLBACK TO cap;
SELECT quota.create_user('eve') AS eve \gset
SELECT quota.create_key(:eve, 'eve') AS eve_key \gset
-- eve may pin these channels (a pinned request without a grant is refused: 93_channels).
INSERT INTO quota.channel_grant (channel_id, subject_type, subject_id)
VALUES (:free, 'user', :eve), (:paid, 'user', :eve), (:off, 'user', :eve);
-- Holds are taken in lock order (quota.lock_order): the channel's counters first, even one whose
-- policy is newer than the user's, then by policy_id.
SAVEPOINT lock_order;
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('user', :eve, 'tokens', 'day', 100000) RETURNING policy_id AS eve_day \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('channel', :free, 'cost', 'week', 100000) RETURNING policy_id AS free_week \gset
SELECT allowed FROM quota.admit(:'eve_key', 'c0', 'gpt-s', 10, 10, :free);
SELECT hold_policy = ARRAY[:free_cap, :free_week, :eve_day]::bigint[] AS channels_first_then_by_id
FROM quota.reservation WHERE request_id = 'c0';
ROLLBACK TO lock_order;
SELECT allowed, channel_id = :free AS free, upstream_base_url, upstream_api_key, upstream_model
FROM quota.admit(:'eve_key', 'c1', 'gpt-s', 300, 200);
SELECT settled FROM quota.settle('c1', 300, 200);
SELECT allowed, channel_id = :free AS free FROM quota.admit(:'eve_key', 'c2', 'gpt-s', 300, 200);
SELECT settled FROM quota.settle('c2', 400, 100);
-- The free tier is capped: routing skips it and falls to the paid channel (no rename there).
SELECT allowed, channel_id = :paid AS paid, upstream_api_key, upstream_model
FROM quota.admit(:'eve_key', 'c3', 'gpt-s', 10, 10);
SELECT settled FROM quota.settle('c3', 10, 10);
SELECT name, status, models, metric, used, remaining, next_reset, state FROM quota.channel_status();
-- Pinned to the capped channel: 429 with the channel's code, retry at New York midnight (1 h),
-- and the cap as its rate limit.
SELECT allowed, http_status, error_code, retry_after_s, message, ratelimit_limit, ratelimit_remaining,
       ratelimit_metric, ratelimit_reset_at
FROM quota.admit(:'eve_key', 'c4', 'gpt-s', 10, 10, :free);
-- Pinned to a disabled channel, to one that does not serve the model, to one that does not exist
-- (no grant can name it: refused like any channel the key may not pin).
SELECT http_status, error_code FROM quota.admit(:'eve_key', 'c5', 'gpt-s', 10, 10, :off);
SELECT http_status, error_code FROM quota.admit(:'eve_key', 'c6', 'claude-s', 10, 10, :paid);
SELECT http_status, error_code FROM quota.admit(:'eve_key', 'c7', 'gpt-s', 10, 10, 424242);
-- A model only a disabled channel serves: 503. A model no channel serves: the relay's default upstream.
SELECT http_status, error_code, message FROM quota.admit(:'eve_key', 'c8', 'only-off', 10, 10);
SELECT allowed, channel_id, upstream_base_url FROM quota.admit(:'eve_key', 'c9', 'claude-s', 10, 10);
SELECT quota.refund('c9');
-- Every channel capped: 429 with the soonest reset. (A new cap counts from its creation on, so
-- the paid channel's $0.01 lifetime cap refuses by its strict boundary: the estimate is $0.02.)
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('channel', :paid, 'cost', 'total', 0.01);
SELECT allowed, http_status, error_code, retry_after_s, ratelimit_limit, ratelimit_remaining, ratelimit_metric,
       ratelimit_reset_at
FROM quota.admit(:'eve_key', 'c10', 'gpt-s', 10, 10);
-- After local midnight in New York the free tier is back (UTC midnight was long ago).
SET LOCAL pg_quota.fake_now = '2026-06-02 04:00:00+00';
SELECT allowed, channel_id = :free AS free, ratelimit_metric FROM quota.admit(:'eve_key', 'c11', 'gpt-s', 300, 200);
SELECT settled FROM quota.settle('c11', 300, 200);
-- Settlement counted the channels' usage; the daily rollup has it per channel.
SELECT channel_id = :free AS free, input_tokens, output_tokens FROM quota.usage_ledger
WHERE request_id IN ('c1', 'c2', 'c3', 'c11') ORDER BY ledger_id;
SELECT channel_id = :free AS free, requests, input_tokens + output_tokens AS tokens
FROM quota.usage_daily WHERE key_id = (SELECT key_id FROM quota.api_key WHERE name = 'eve') ORDER BY day, channel_id;
SELECT * FROM quota.drift();
-- GET /v1/models: priced models and models of enabled channels.
SELECT model FROM quota.models(:'eve_key');
-- Weight: among channels of one priority, picked at random in proportion to weight (3:1 here).
UPDATE quota.channel SET priority = 50, weight = 3 WHERE channel_id = :free;
UPDATE quota.channel SET priority = 50, weight = 1 WHERE channel_id = :paid;
DELETE FROM quota.policy WHERE subject_type = 'channel';
SELECT setseed(0.42);
SELECT count(*) FILTER (WHERE a.channel_id = :free) BETWEEN 120 AND 180 AS free_about_three_quarters,
       count(*) FILTER (WHERE a.channel_id = :paid) BETWEEN 20 AND 80 AS paid_about_one_quarter
FROM generate_series(1, 200) i, LATERAL quota.admit(:'eve_key', 'w' || i, 'gpt-s', 1, 1) a;
COMMIT;

-- ── Upstream keys: only quota.admit reveals them (to the relay role) ──
CREATE ROLE regress_scope_admin LOGIN IN ROLE quota_admin;
CREATE ROLE regress_scope_relay LOGIN IN ROLE quota_relay;
CREATE ROLE regress_scope_nobody LOGIN;
SELECT quota.create_key((SELECT user_id FROM quota.app_user WHERE name = 'eve'), 'eve2') AS eve2_key \gset
SET ROLE regress_scope_admin;
SELECT name, status FROM quota.channel ORDER BY channel_id;
SELECT api_key FROM quota.channel;
SELECT * FROM quota.channel;
UPDATE quota.channel SET api_key = 'sk-free-rotated' WHERE name = 'free-tier';
RESET ROLE;
SET ROLE regress_scope_nobody;
SELECT name FROM quota.channel;
RESET ROLE;
SET ROLE regress_scope_relay;
SELECT api_key FROM quota.channel;
SELECT upstream_api_key FROM quota.admit(:'eve2_key', 'k1', 'gpt-s', 1, 1, :free);
RESET ROLE;
DROP ROLE regress_scope_admin;
DROP ROLE regress_scope_relay;
DROP ROLE regress_scope_nobody;

-- Each connection keeps the policies it selected while quota.policy_generation holds still.
-- Every change to what selection reads gives it a new value, also for rows applied by logical
-- replication (session_replication_role = replica skips ordinary triggers), and never one used
-- before.
SELECT generation AS g0 FROM quota.policy_generation \gset
SET session_replication_role = replica;
INSERT INTO quota.boost (subject_type, subject_id, metric, period, amount, expires_at)
SELECT 'user', user_id, 'tokens', 'day', 5, now() + interval '1 day' FROM quota.app_user LIMIT 1;
RESET session_replication_role;
SELECT generation > :g0 AS bumped_by_replicated_boost FROM quota.policy_generation;
SELECT generation AS g1 FROM quota.policy_generation \gset
BEGIN;
DELETE FROM quota.channel_model WHERE false;
ROLLBACK;
UPDATE quota.user_group_member SET user_id = user_id WHERE false;
SELECT generation > :g1 + 1 AS rolled_back_value_not_reused FROM quota.policy_generation;
-- Whether any channel serves a model is kept per connection too: a model no channel served a
-- moment ago is routed as soon as a channel takes it on.
SELECT allowed, channel_id IS NULL AS default_upstream FROM quota.admit(:'eve2_key', 'late1', 'gpt-late', 1, 1);
INSERT INTO quota.channel_model (channel_id, model) VALUES (:free, 'gpt-late');
SELECT allowed, channel_id = :free AS free FROM quota.admit(:'eve2_key', 'late2', 'gpt-late', 1, 1);
