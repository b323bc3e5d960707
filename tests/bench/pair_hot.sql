\set rid random(1, 9000000000000000)
SELECT allowed FROM quota.admit('sk-pgq-000000000001-' || md5('1') || md5('2'), 'b' || :rid, 'bench-model', 100, 100);
SELECT billed FROM quota.settle('b' || :rid, 100, 100);
