\set rid random(1, 9000000000000000)
SELECT bench_floor.admit_many(ARRAY(SELECT 'b' || :rid || '-' || i FROM generate_series(1, :n::int) i),
                              ARRAY(SELECT 1 + floor(random() * 1000)::bigint FROM generate_series(1, :n::int)));
SELECT bench_floor.settle_many(ARRAY(SELECT 'b' || :rid || '-' || i FROM generate_series(1, :n::int) i));
