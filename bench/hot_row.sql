-- pgbench script: the bare hot-row transaction of the hot-agent scenario, on the baseline's tables.
-- Every client takes one unit of the same counter row (id 1) and appends one usage row, like the grid's
-- allocation does on one agent's quota. Run by bench/run.py as: pgbench -n -f bench/hot_row.sql -c 8 -T 10
BEGIN;
UPDATE bench_quota SET used = used + 1 WHERE id = 1 AND used + 1 <= lim;
INSERT INTO bench_usage (quota_id, amount) VALUES (1, 1);
END;
