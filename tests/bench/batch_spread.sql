\set rid random(1, 9000000000000000)
SELECT count(*) FILTER (WHERE allowed) FROM quota.admit_many(
  ARRAY(SELECT 'sk-pgq-' || lpad(to_hex(k), 12, '0') || '-' || md5(k::text) || md5((k + 1)::text)
        FROM (SELECT 1 + floor(random() * 1000)::bigint AS k FROM generate_series(1, :n::int)) s),
  ARRAY(SELECT 'b' || :rid || '-' || i FROM generate_series(1, :n::int) i),
  array_fill('bench-model'::text, ARRAY[:n::int]), array_fill(100::bigint, ARRAY[:n::int]), array_fill(100::bigint, ARRAY[:n::int]));
SELECT count(*) FILTER (WHERE billed) FROM quota.settle_many(ARRAY(SELECT 'b' || :rid || '-' || i FROM generate_series(1, :n::int) i),
  array_fill(100::bigint, ARRAY[:n::int]), array_fill(100::bigint, ARRAY[:n::int]));
