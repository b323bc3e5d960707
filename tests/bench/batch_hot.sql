\set rid random(1, 9000000000000000)
SELECT count(*) FILTER (WHERE allowed) FROM quota.admit_many(
  array_fill('sk-pgq-000000000001-' || md5('1') || md5('2'), ARRAY[:n::int]),
  ARRAY(SELECT 'b' || :rid || '-' || i FROM generate_series(1, :n::int) i),
  array_fill('bench-model'::text, ARRAY[:n::int]), array_fill(100::bigint, ARRAY[:n::int]), array_fill(100::bigint, ARRAY[:n::int]));
SELECT count(*) FILTER (WHERE billed) FROM quota.settle_many(ARRAY(SELECT 'b' || :rid || '-' || i FROM generate_series(1, :n::int) i),
  array_fill(100::bigint, ARRAY[:n::int]), array_fill(100::bigint, ARRAY[:n::int]));
