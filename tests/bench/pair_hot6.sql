\set rid random(1, 9000000000000000)
SELECT allowed FROM quota.admit('sk-pgq-000000000002-' || md5('2') || md5('3'), 'b' || :rid, 'bench-model-6', 100, 100);
SELECT billed FROM quota.settle('b' || :rid, 100, 100);
