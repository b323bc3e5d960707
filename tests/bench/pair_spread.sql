\set k random(1, 1000)
\set rid random(1, 9000000000000000)
SELECT allowed FROM quota.admit('sk-pgq-' || lpad(to_hex(:k::bigint), 12, '0') || '-' || md5(:k::bigint::text) || md5((:k::bigint + 1)::text), 'b' || :rid, 'bench-model', 100, 100);
SELECT billed FROM quota.settle('b' || :rid, 100, 100);
