\set rid random(1, 9000000000000000)
SELECT bench_floor.bare_admit('b' || :rid, 1);
SELECT bench_floor.bare_settle('b' || :rid, 1);
