-- Benchmark data: 1,000 users, each with one key of a known secret and one cost policy, and a
-- plain table for the baseline (a single-row UPDATE is the floor of any committed write).
CREATE EXTENSION IF NOT EXISTS pg_quota;
INSERT INTO quota.model_price VALUES ('bench-model', 1, 2, NULL);
INSERT INTO quota.app_user (name) SELECT 'bench-' || k FROM generate_series(1, 1000) k;
-- Keys with deterministic secrets, so pgbench can present key k without a lookup.
INSERT INTO quota.api_key (user_id, name, public_id, secret_hash)
SELECT u.user_id, 'bench', lpad(to_hex(k), 12, '0'),
       sha256(convert_to(md5(k::text) || md5((k + 1)::text), 'UTF8'))
FROM generate_series(1, 1000) k JOIN quota.app_user u ON u.name = 'bench-' || k;
INSERT INTO quota.policy (subject_type, subject_id, metric, period, quota_limit)
SELECT 'user', u.user_id, 'cost', 'day', 1000000000 FROM quota.app_user u WHERE u.name LIKE 'bench-%';

CREATE TABLE bench_counter (id int PRIMARY KEY, n bigint NOT NULL) WITH (fillfactor = 70);
INSERT INTO bench_counter SELECT k, 0 FROM generate_series(1, 1000) k;
VACUUM ANALYZE;
