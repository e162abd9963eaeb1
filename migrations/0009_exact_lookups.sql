-- Exact lookups in the writeback, whatever the statistics say.
--
-- The writeback finds each reported row's item by its primary key
-- (function_id, namespace, row_id) with `state = 'leased'`. The partial
-- index of in-flight batches, `(function_id, batch_id) WHERE state =
-- 'leased'`, half-matched that lookup (function_id alone), and when the
-- statistics of the moment made it look small the planner chose it, so each
-- of a batch's lookups filtered through every lease of the Function (1,999
-- rows removed per lookup at 2,000 leases). Every leased item has a batch
-- id, so the same index with `batch_id IS NOT NULL` in its predicate holds
-- the same entries, yet only a statement that names a batch (the in-flight
-- count, the report's unreported rows, the runner's heartbeat) can use it.
DROP INDEX work_items_in_flight;
CREATE INDEX work_items_in_flight ON work_items (function_id, batch_id)
    WHERE state = 'leased' AND batch_id IS NOT NULL;
