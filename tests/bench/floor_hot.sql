\set rid random(1, 9000000000000000)
SELECT bench_floor.admit('b' || :rid, 1);
SELECT bench_floor.settle('b' || :rid, 1);
