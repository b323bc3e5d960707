\set k random(1, 1000)
\set rid random(1, 9000000000000000)
SELECT bench_floor.admit('b' || :rid, :k);
SELECT bench_floor.settle('b' || :rid, :k);
