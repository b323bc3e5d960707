UPDATE bench_counter SET n = n + 1 WHERE id = 1;
UPDATE bench_counter SET n = n + 1 WHERE id = 1;
