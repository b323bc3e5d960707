\set k random(1, 1000)
\set rid random(1, 9000000000000000)
SELECT bench_floor.bare_admit('b' || :rid, :k);
SELECT bench_floor.bare_settle('b' || :rid, :k);
