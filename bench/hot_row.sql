-- pgbench script: the bare hot-row transaction of the hot-agent scenario, on the baseline's tables.
-- Every client takes one unit of the same counter row and appends one usage row, like the grid's allocation
-- does on one agent's quota. Run by bench/scenarios.py as:
--   pgbench -n -c 8 -j 2 -T 10 -D quota_id=65 -f bench/hot_row.sql
BEGIN;
UPDATE bench_quota SET used = used + 1 WHERE id = :quota_id AND used + 1 <= lim;
INSERT INTO bench_usage (quota_id, amount) VALUES (:quota_id, 1);
END;
