-- Batch records (GET /v2/udfs/{id}/batches, GET /v2/batches/{id}): when
-- the batch's oldest row became claimable, when the runner began and ended
-- the worker call, the GPUs it held, and the trace its spans carry.
-- Finished records are deleted after the retention window
-- (--batch-retention-hours), oldest first.
ALTER TABLE batches
    ADD COLUMN trace_id    text,
    ADD COLUMN queued_at   timestamptz,
    ADD COLUMN started_at  timestamptz,
    ADD COLUMN ended_at    timestamptz,
    ADD COLUMN gpus        jsonb   NOT NULL DEFAULT '[]',
    ADD COLUMN cold_start  boolean;
CREATE INDEX batches_finished ON batches (finished_at) WHERE state <> 'dispatched';
