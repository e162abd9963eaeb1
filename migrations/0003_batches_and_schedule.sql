-- Batches and the schedule trigger.

-- Every claim (a pull worker's, or a batch the dispatcher sends to a
-- runner) leases its items under one batch id; the Function's in-flight
-- batches are the distinct batch ids among its leased items, which bounds
-- them by spec.schedule.maxInFlightBatches. The index answers that with one
-- probe per batch.
CREATE SEQUENCE work_batch_ids;
ALTER TABLE work_items ADD COLUMN batch_id bigint;
CREATE INDEX work_items_in_flight ON work_items (function_id, batch_id) WHERE state = 'leased';

-- The last time the cron schedule (spec.schedule.cron) fired a sweep; a
-- replica claims a firing by moving it, so one sweep runs per match.
ALTER TABLE function_stats ADD COLUMN last_scheduled_at timestamptz;
