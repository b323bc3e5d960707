-- The ledger at scale: partitions by day (or week) made ahead by quota.maintain_ledger, rows the
-- default partition caught filed into partitions, request ids remembered for a horizon (not for
-- ever), closed partitions counted by checkpoints so that quota.drift() survives archiving,
-- archived partitions kept for COPY or dropped. In a database of its own: the upkeep files every
-- ledger row of the database, and the other tests' rows would make its output theirs.
CREATE DATABASE pgq_ledger;
\c pgq_ledger
SET TimeZone = 'UTC';
SET DateStyle = 'ISO, YMD';
SET IntervalStyle = 'postgres';
SET client_min_messages = warning;
CREATE EXTENSION pg_quota;
SET pg_quota.fake_now = '2026-03-02 10:00:00+00';  -- a Monday
SET pg_quota.reservation_ttl = '10min';
SET pg_quota.request_id_retention = '1d';
INSERT INTO quota.model_price (model, input_per_mtok, output_per_mtok) VALUES ('gpt-x', 2, 8);
SELECT quota.create_user('ledger') AS uid \gset
SELECT quota.create_key(:uid, 'lk') AS key \gset
SELECT key_id AS kid FROM quota.api_key WHERE name = 'lk' \gset
-- a lifetime budget (its window counts every ledger row there is), a month and a day of tokens
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit) VALUES
    ('key', :kid, 'cost', 'total', 100), ('key', :kid, 'tokens', 'month', 10000000),
    ('key', :kid, 'tokens', 'day', 1000000);
CREATE FUNCTION pg_temp.request(id text) RETURNS boolean LANGUAGE sql AS $$
    SELECT a.allowed AND s.settled FROM quota.admit(current_setting('my.key'), id, 'gpt-x', 1000, 500) a,
    LATERAL quota.settle(id, 1000, 500) s
$$;
SET my.key = :'key';

-- A new ledger has only its default partition, which takes the first rows.
SELECT pg_temp.request('l-1'), pg_temp.request('l-2');
SELECT partition, is_default, est_rows FROM quota.ledger_partitions();

-- The upkeep files them into their day's partition (with a warning) and makes partitions
-- through a week ahead.
SELECT * FROM quota.maintain_ledger();
SELECT partition, range_from, range_to, is_default, closed FROM quota.ledger_partitions();
SELECT tableoid::regclass AS partition, count(*) FROM quota.usage_ledger GROUP BY 1;
-- New rows go straight into the day's partition; nothing is counted twice.
SELECT pg_temp.request('l-3');
SELECT tableoid::regclass AS partition, count(*) FROM quota.usage_ledger GROUP BY 1;
SELECT requests FROM quota.usage_daily WHERE key_id = :kid;
SELECT count(*) AS drifting_counters FROM quota.drift();
-- A second upkeep has nothing to do.
SELECT * FROM quota.maintain_ledger();

-- Request ids stay unique without an index of the ledger: a second settle is answered as the
-- first, and admit refuses the id.
SELECT settled, cost FROM quota.settle('l-3', 1, 1);
SELECT count(*) AS l3_rows FROM quota.usage_ledger WHERE request_id = 'l-3';
SELECT * FROM quota.admit(:'key', 'l-3', 'gpt-x', 10, 10);
SELECT request_id, settled_by, billed, cost FROM quota.ledger_request ORDER BY request_id;

-- The sweeper was off for three weeks: rows of days with no partition go to the default
-- partition, and the next upkeep files them (and warns).
SET pg_quota.fake_now = '2026-03-23 08:00:00+00';
SELECT pg_temp.request('l-4');
SELECT tableoid::regclass AS partition, count(*) FROM quota.usage_ledger WHERE request_id = 'l-4' GROUP BY 1;
SET client_min_messages = notice;
SELECT made_partitions, filed_rows FROM quota.maintain_ledger();
SET client_min_messages = warning;
SELECT tableoid::regclass AS partition, count(*) FROM quota.usage_ledger WHERE request_id = 'l-4' GROUP BY 1;
SELECT est_rows AS default_rows FROM quota.ledger_partitions() WHERE is_default;
-- The same upkeep forgot the request ids older than reservation_ttl + request_id_retention:
-- l-1..l-3 are no longer known, l-4 is.
SELECT request_id FROM quota.ledger_request ORDER BY 1;

-- Closed partitions: the upkeep closes one ended partition per run (a day after its end); a
-- closed partition counts in quota.drift() through its checkpoint, not its rows.
SELECT range_from, closed FROM quota.ledger_partitions() WHERE NOT is_default ORDER BY range_from LIMIT 2;
SELECT closed_partitions FROM quota.maintain_ledger();
SELECT range_from, range_to, ledger_rows FROM quota.ledger_closed ORDER BY range_from;
SELECT p.period, k.window_start, k.amount FROM quota.ledger_checkpoint k JOIN quota.policy p USING (policy_id)
ORDER BY p.policy_id;
SELECT count(*) AS drifting_counters FROM quota.drift();

-- archive_ledger refuses what a late settle may still need ...
SELECT * FROM quota.archive_ledger('2026-03-23 00:00:00+00');
-- ... and moves older partitions into an archive schema: out of the ledger, kept for COPY.
SELECT range_from, range_to, ledger_rows, archived_as FROM quota.archive_ledger('2026-03-09 00:00:00+00');
SELECT count(*) AS archived_rows FROM quota_archive.usage_ledger_p20260302;
SELECT count(*) AS ledger_rows FROM quota.usage_ledger;
-- Nothing else forgets them: the rollups, the windows' usage, and drift (through checkpoints).
SELECT sum(requests) AS requests FROM quota.usage_daily WHERE key_id = :kid;
SELECT period, used FROM quota.status(:kid) ORDER BY policy_id;
SELECT count(*) AS drifting_counters FROM quota.drift();
SELECT range_from, archived_as FROM quota.ledger_closed ORDER BY range_from;
-- The lifetime window goes on counting, across the archive.
SELECT pg_temp.request('l-5');
SELECT count(*) AS drifting_counters FROM quota.drift();

-- pg_quota.ledger_retention: the upkeep drops partitions past it (no archive schema set).
SET pg_quota.ledger_retention = '10d';
SELECT archived_partitions FROM quota.maintain_ledger();
SELECT min(range_from) AS oldest_partition FROM quota.ledger_partitions() WHERE NOT is_default;
SELECT count(*) FILTER (WHERE archived_as IS NULL AND archived_at IS NOT NULL) AS dropped FROM quota.ledger_closed;
SELECT count(*) AS drifting_counters FROM quota.drift();
RESET pg_quota.ledger_retention;

-- A reset clears the policy's checkpoints with its counters: the window starts over.
SET pg_quota.fake_now = '2026-03-23 09:00:00+00';
SELECT p.policy_id AS total_policy FROM quota.policy p WHERE p.period = 'total' \gset
SELECT quota.reset(:total_policy);
SET pg_quota.fake_now = '2026-03-23 09:01:00+00';
SELECT count(*) AS total_checkpoints FROM quota.ledger_checkpoint WHERE policy_id = :total_policy;
SELECT pg_temp.request('l-6');
SELECT period, used FROM quota.status(:kid) WHERE period = 'total';
SELECT count(*) AS drifting_counters FROM quota.drift();

-- Weekly partitions after daily ones: the upkeep fills only what no partition covers.
SET pg_quota.ledger_partition = 'week';
SET pg_quota.fake_now = '2026-03-30 09:00:00+00';
SELECT made_partitions FROM quota.maintain_ledger();
SELECT range_from, range_to FROM quota.ledger_partitions() WHERE range_from >= '2026-03-28' ORDER BY range_from;
-- manual: partitions are the DBA's; the upkeep makes none.
SET pg_quota.ledger_partition = 'manual';
SET pg_quota.fake_now = '2026-05-04 09:00:00+00';
SELECT made_partitions FROM quota.maintain_ledger();
RESET pg_quota.ledger_partition;

-- The ledger is still append-only, through the partitioned table.
DELETE FROM quota.usage_ledger;
TRUNCATE quota.usage_ledger;
\c pgq_regress
DROP DATABASE pgq_ledger;
