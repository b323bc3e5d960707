-- Exhaustion actions, manual reset, the sweep, and late settles.
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
BEGIN;
SET LOCAL pg_quota.fake_now = '2026-05-01 10:00:00+00';
SELECT quota.create_user('gina') AS gina \gset
SELECT quota.create_key(:gina, 'suspendable') AS key \gset
SELECT key_id AS kid FROM quota.api_key WHERE name = 'suspendable' \gset
-- 1000 tokens per 5h window anchored at 09:00; graceful; exhausting it suspends the key.
INSERT INTO quota.policy (subject_type, subject_id, metric, period, anchor, quota_limit, boundary, on_exhausted)
VALUES ('key', :kid, 'tokens', '5h', '2026-05-01 09:00:00+00', 1000, 'graceful', 'disable')
RETURNING policy_id AS pol \gset
SELECT allowed FROM quota.admit(:'key', 'e1', 'm', 500, 500);
SELECT * FROM quota.settle('e1', 600, 600);
SELECT suspended_until, suspended_by = :pol AS by_policy FROM quota.api_key WHERE key_id = :kid;
SELECT http_status, error_code, retry_after_s, message FROM quota.admit(:'key', 'e2', 'm', 1, 1);
-- The suspending policy is its rate limit: nothing left until the key resumes.
SELECT ratelimit_limit, ratelimit_remaining, ratelimit_metric, ratelimit_reset_at
FROM quota.admit(:'key', 'e2b', 'm', 1, 1);
SELECT state FROM quota.status(:kid);
-- At the window's end the key resumes by itself on the next request, and it is logged.
SET LOCAL pg_quota.fake_now = '2026-05-01 14:00:00+00';
SELECT allowed FROM quota.admit(:'key', 'e3', 'm', 1, 1);
SELECT suspended_until FROM quota.api_key WHERE key_id = :kid;
SELECT kind FROM quota.event WHERE key_id = :kid ORDER BY event_id;

-- Exhaust again, then the sweep (pg_cron or the background worker) resumes it without traffic.
SELECT * FROM quota.settle('e3', 1000, 0);
SELECT suspended_until FROM quota.api_key WHERE key_id = :kid;
SET LOCAL pg_quota.fake_now = '2026-05-01 19:00:00+00';
SELECT * FROM quota.sweep();
SELECT suspended_until FROM quota.api_key WHERE key_id = :kid;

-- Manual reset: clears the window's usage and unblocks, but keeps the anchor: the next reset
-- is still at 19:00 + 5h, not 5 hours after the reset (peer bug).
SELECT allowed FROM quota.admit(:'key', 'e4', 'm', 900, 100);
SELECT * FROM quota.settle('e4', 900, 200);
SET LOCAL pg_quota.fake_now = '2026-05-01 20:30:00+00';
SELECT used, window_start, next_reset, state FROM quota.status(:kid);
SELECT quota.reset(:pol);
SELECT used, window_start, next_reset, state FROM quota.status(:kid);
SELECT anchor FROM quota.policy WHERE policy_id = :pol;
SELECT allowed FROM quota.admit(:'key', 'e5', 'm', 1, 1);
SELECT kind FROM quota.event WHERE policy_id = :pol AND kind IN ('reset', 'resumed') ORDER BY event_id;

-- Stale reservations (a relay that died) are released by the sweep after the TTL, logged, and
-- a late settle still charges the usage: nothing is lost. (That is pg_quota.expired_reservations
-- = 'release', from here on in this file; the default charges them: see 92_expired.)
SELECT reserved FROM quota.status(:kid);
SET LOCAL pg_quota.expired_reservations = 'release';
SET LOCAL pg_quota.reservation_ttl = '10min';
SET LOCAL pg_quota.fake_now = '2026-05-01 20:39:00+00';
SELECT expired_reservations FROM quota.sweep();
SET LOCAL pg_quota.fake_now = '2026-05-01 20:41:00+00';
SELECT expired_reservations FROM quota.sweep();
SELECT reserved FROM quota.status(:kid);
SELECT kind, reason FROM quota.released WHERE request_id = 'e5';
SELECT quota.refund('e5') AS refund_after_expiry;
SELECT * FROM quota.settle('e5', 3, 4);
SELECT used FROM quota.status(:kid);
SELECT count(*) AS drifting_counters FROM quota.drift();

-- A window found spent at admit that no settle has marked (here: its limit was lowered below
-- what is used) is marked there: logged, and the key suspended as the policy says.
UPDATE quota.policy SET quota_limit = 5 WHERE policy_id = :pol;
SELECT http_status, error_code, message FROM quota.admit(:'key', 'e6', 'm', 1, 1);
SELECT suspended_until, suspended_by = :pol AS by_policy FROM quota.api_key WHERE key_id = :kid;
SELECT kind FROM quota.event WHERE key_id = :kid AND at = '2026-05-01 20:41:00+00' ORDER BY event_id;
SELECT http_status, message FROM quota.admit(:'key', 'e7', 'm', 1, 1);

-- A total window never resets: a request over it is told so (no retry time), and a key it
-- suspended does not resume by itself.
SELECT quota.create_user('hugo') AS hugo \gset
SELECT quota.create_key(:hugo, 'lifetime') AS lkey \gset
SELECT key_id AS lkid FROM quota.api_key WHERE name = 'lifetime' \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, boundary, on_exhausted)
VALUES ('key', :lkid, 'requests', 'total', 2, 'strict', 'disable');
SELECT allowed FROM quota.admit(:'lkey', 't1', 'm', 1, 1);
SELECT allowed FROM quota.admit(:'lkey', 't2', 'm', 1, 1);
SELECT http_status, error_code, retry_after_s, message FROM quota.admit(:'lkey', 't3', 'm', 1, 1);
SELECT settled FROM quota.settle('t1', 1, 1);
SELECT settled FROM quota.settle('t2', 1, 1);
SELECT suspended_until FROM quota.api_key WHERE key_id = :lkid;
SELECT http_status, error_code, retry_after_s, message FROM quota.admit(:'lkey', 't4', 'm', 1, 1);

-- Editing the policy that suspended a key judges it afresh. The key resumes at once (logged);
-- a window still spent is found so by the next request, which is refused and suspends the key
-- again; a higher limit resumes it, until that is spent too. Deleting the policy frees the key.
SELECT policy_id AS lpol FROM quota.policy WHERE subject_type = 'key' AND subject_id = :lkid \gset
UPDATE quota.policy SET boundary = 'graceful' WHERE policy_id = :lpol;
SELECT suspended_until FROM quota.api_key WHERE key_id = :lkid;
SELECT http_status, error_code, message FROM quota.admit(:'lkey', 't5', 'm', 1, 1);
SELECT suspended_until FROM quota.api_key WHERE key_id = :lkid;
UPDATE quota.policy SET quota_limit = 3 WHERE policy_id = :lpol;
SELECT allowed FROM quota.admit(:'lkey', 't6', 'm', 1, 1);
SELECT settled FROM quota.settle('t6', 1, 1);
SELECT suspended_until FROM quota.api_key WHERE key_id = :lkid;
DELETE FROM quota.policy WHERE policy_id = :lpol;
SELECT suspended_until FROM quota.api_key WHERE key_id = :lkid;
SELECT allowed FROM quota.admit(:'lkey', 't7', 'm', 1, 1);
SELECT kind, detail ->> 'by' AS by FROM quota.event
WHERE key_id = :lkid AND kind IN ('exhausted', 'disabled', 'resumed') ORDER BY event_id;

-- A boost frees a key that a spent window suspended: the next request finds the window not
-- spent any more, resumes the key (logged, by window_not_spent) and is admitted. When the
-- boosted limit is spent too, it is logged and the key suspended again.
SELECT quota.create_user('ivy') AS ivy \gset
SELECT quota.create_key(:ivy, 'boosted') AS bkey \gset
SELECT key_id AS bkid FROM quota.api_key WHERE name = 'boosted' \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, boundary, on_exhausted)
VALUES ('key', :bkid, 'requests', 'day', 1, 'strict', 'disable');
SELECT allowed FROM quota.admit(:'bkey', 'b1', 'm', 1, 1);
SELECT settled FROM quota.settle('b1', 1, 1);
SELECT http_status, error_code, message FROM quota.admit(:'bkey', 'b2', 'm', 1, 1);
INSERT INTO quota.boost (subject_type, subject_id, metric, period, amount, expires_at)
VALUES ('key', :bkid, 'requests', 'day', 1, '2026-05-02 00:00:00+00');
SELECT used, effective_limit, state FROM quota.status(:bkid);
SELECT allowed FROM quota.admit(:'bkey', 'b3', 'm', 1, 1);
SELECT suspended_until FROM quota.api_key WHERE key_id = :bkid;
SELECT settled FROM quota.settle('b3', 1, 1);
SELECT suspended_until FROM quota.api_key WHERE key_id = :bkid;
SELECT http_status, error_code FROM quota.admit(:'bkey', 'b4', 'm', 1, 1);
SELECT kind, detail ->> 'by' AS by FROM quota.event
WHERE key_id = :bkid AND kind IN ('exhausted', 'recovered', 'disabled', 'resumed') ORDER BY event_id;

-- A key suspended by its user group's policy is freed when the user leaves the group: that
-- policy no longer applies to it.
INSERT INTO quota.user_group (name) VALUES ('trial') RETURNING group_id AS trial \gset
INSERT INTO quota.user_group_member (group_id, user_id) VALUES (:trial, :ivy);
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, on_exhausted)
VALUES ('user_group', :trial, 'tokens', 'day', 10, 'disable') RETURNING policy_id AS tpol \gset
SELECT quota.create_key(:ivy, 'trial') AS tkey \gset
SELECT allowed FROM quota.admit(:'tkey', 'g1', 'm', 5, 5);
SELECT settled FROM quota.settle('g1', 6, 6);
SELECT suspended_by = :tpol AS suspended_by_group FROM quota.api_key WHERE name = 'trial';
DELETE FROM quota.user_group_member WHERE group_id = :trial AND user_id = :ivy;
SELECT allowed FROM quota.admit(:'tkey', 'g2', 'm', 1, 1);
SELECT kind, detail ->> 'by' AS by FROM quota.event e JOIN quota.api_key k USING (key_id)
WHERE k.name = 'trial' AND kind IN ('exhausted', 'disabled', 'resumed') ORDER BY event_id;

-- The records of released reservations are kept for pg_quota.released_retention (30 days by
-- default), then the sweep deletes them: e5's (expired at 20:41 the day before) after a day;
-- g2 and t7, still in flight, expire with the first of these sweeps and stay.
SET LOCAL pg_quota.released_retention = '1d';
SET LOCAL pg_quota.fake_now = '2026-05-02 20:40:59+00';
SELECT pruned_released FROM quota.sweep();
SELECT request_id, kind FROM quota.released ORDER BY request_id;
-- Events are kept for ever unless pg_quota.event_retention is set: then the same sweep deletes
-- the events older than it too.
SELECT count(*) AS events_older_than_a_day FROM quota.event WHERE at < '2026-05-01 20:41:01+00';
SET LOCAL pg_quota.event_retention = '1d';
SET LOCAL pg_quota.fake_now = '2026-05-02 20:41:01+00';
SELECT pruned_released, pruned_events FROM quota.sweep();
SELECT request_id, kind FROM quota.released ORDER BY request_id;
SELECT min(at) AS oldest_event FROM quota.event;
SET LOCAL pg_quota.event_retention = 0;

-- An edit of what a policy measures (subject, model group, metric, window) starts its windows
-- over: usage in other units or in another window cannot count in the new one. An edit of its
-- limit keeps the usage.
SELECT quota.create_user('jo') AS jo \gset
SELECT quota.create_key(:jo, 'remeasured') AS mkey \gset
SELECT key_id AS mkid FROM quota.api_key WHERE name = 'remeasured' \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
VALUES ('key', :mkid, 'tokens', 'day', 1000) RETURNING policy_id AS mpol \gset
SELECT allowed FROM quota.admit(:'mkey', 'm1', 'm', 300, 300);
SELECT settled FROM quota.settle('m1', 300, 300);
SET LOCAL pg_quota.fake_now = '2026-05-02 20:42:00+00';
UPDATE quota.policy SET quota_limit = 2000 WHERE policy_id = :mpol;
SELECT metric, used, effective_limit, state FROM quota.status(:mkid);
UPDATE quota.policy SET metric = 'requests', quota_limit = 5 WHERE policy_id = :mpol;
SELECT metric, used, effective_limit, state FROM quota.status(:mkid);
SET LOCAL pg_quota.fake_now = '2026-05-02 20:43:00+00';
SELECT allowed FROM quota.admit(:'mkey', 'm2', 'm', 1, 1);
SELECT settled FROM quota.settle('m2', 1, 1);
SET LOCAL pg_quota.fake_now = '2026-05-02 20:44:00+00';
UPDATE quota.policy SET window_mode = 'rolling' WHERE policy_id = :mpol;
SELECT allowed FROM quota.admit(:'mkey', 'm3', 'm', 1, 1);
SELECT settled FROM quota.settle('m3', 1, 1);
SELECT window_mode, used, state FROM quota.status(:mkid);
SELECT count(*) AS drifting_counters FROM quota.drift() WHERE policy_id = :mpol;

-- A spent window that ends recovers, and that is logged once, with the start of the window
-- that was spent: by the request that finds it over (a settle or an admit), or by the sweep
-- when no request comes. A window spent anew is not taken for an ended one.
SELECT quota.create_user('kim') AS kim \gset
SELECT quota.create_key(:kim, 'daily') AS dkey \gset
SELECT key_id AS dkid FROM quota.api_key WHERE name = 'daily' \gset
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit, boundary)
VALUES ('key', :dkid, 'requests', 'day', 2, 'graceful') RETURNING policy_id AS dpol \gset
SET LOCAL pg_quota.fake_now = '2026-05-03 22:00:00+00';
SELECT allowed FROM quota.admit(:'dkey', 'd1', 'm', 1, 1);
SELECT allowed FROM quota.admit(:'dkey', 'd2', 'm', 1, 1);
SELECT allowed FROM quota.admit(:'dkey', 'd3', 'm', 1, 1);
SET LOCAL pg_quota.fake_now = '2026-05-03 22:01:00+00';
SELECT settled FROM quota.settle('d1', 1, 1);
SELECT settled FROM quota.settle('d2', 1, 1);
SELECT http_status FROM quota.admit(:'dkey', 'd4', 'm', 1, 1);
-- d3 settles after midnight: its settle moves the counter to the new day and logs the recovery.
SET LOCAL pg_quota.fake_now = '2026-05-04 00:30:00+00';
SELECT settled FROM quota.settle('d3', 1, 1);
SELECT allowed FROM quota.admit(:'dkey', 'd5', 'm', 1, 1);
SET LOCAL pg_quota.fake_now = '2026-05-04 01:00:00+00';
SELECT settled FROM quota.settle('d5', 1, 1);
SELECT state FROM quota.status(:dkid);
-- No request on the next day: the sweep logs it, once.
SET LOCAL pg_quota.fake_now = '2026-05-05 02:00:00+00';
SELECT recovered_windows FROM quota.sweep();
SELECT recovered_windows FROM quota.sweep();
SELECT allowed FROM quota.admit(:'dkey', 'd6', 'm', 1, 1);
SELECT allowed FROM quota.admit(:'dkey', 'd7', 'm', 1, 1);
SET LOCAL pg_quota.fake_now = '2026-05-05 03:00:00+00';
SELECT settled FROM quota.settle('d6', 1, 1);
SELECT settled FROM quota.settle('d7', 1, 1);
SET LOCAL pg_quota.fake_now = '2026-05-05 03:30:00+00';
SELECT recovered_windows FROM quota.sweep();
-- The next day's first admit logs it.
SET LOCAL pg_quota.fake_now = '2026-05-06 04:00:00+00';
SELECT allowed FROM quota.admit(:'dkey', 'd8', 'm', 1, 1);
SELECT allowed FROM quota.admit(:'dkey', 'd9', 'm', 1, 1);
SELECT kind, at, key_id = :dkid AS of_key, detail ->> 'window_start' AS spent_window, detail ->> 'by' AS by
FROM quota.event WHERE policy_id = :dpol ORDER BY event_id;

-- reset of an unknown policy is an error.
\set VERBOSITY sqlstate
SELECT quota.reset(-1);
ROLLBACK;
