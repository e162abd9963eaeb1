-- Pull workers run by runners (the seed's operator), their keys, and the
-- write-through rule.

-- Keys the platform mints for one Function's workers on one runner
-- (POST /v2/runners/{id}/worker-keys): they go with the Function and with
-- the runner.
ALTER TABLE api_keys
    ADD COLUMN worker_function_id text REFERENCES functions (id) ON DELETE CASCADE,
    ADD COLUMN worker_runner_id   text REFERENCES runners (id) ON DELETE CASCADE;
CREATE INDEX api_keys_workers ON api_keys (worker_runner_id, worker_function_id)
    WHERE worker_runner_id IS NOT NULL;

-- The key that claimed a pull lease: its own writes to the row while the
-- lease is live keep the lease's fence (write-through completion).
ALTER TABLE work_items ADD COLUMN leased_key text;
-- Every write looks up the leases of the rows it touches, by row: only
-- leased items are indexed, so this stays small at millions queued.
CREATE INDEX work_items_leased_rows ON work_items (namespace, row_id) WHERE state = 'leased';

-- When a pull Function's queue was last claimed from, for the NoWorker
-- condition of pull Functions whose workers run elsewhere.
ALTER TABLE function_stats ADD COLUMN last_claim_at timestamptz;

-- How many pull workers of a Function the scaler wants, and since when
-- the queue has called for fewer (the scale-down window).
CREATE TABLE pull_scaling (
    function_id text        PRIMARY KEY REFERENCES functions (id) ON DELETE CASCADE,
    replicas    integer     NOT NULL CHECK (replicas >= 0),
    low_since   timestamptz,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Which runner runs how many of them. The sum over a Function's rows never
-- exceeds its replicas.max.
CREATE TABLE pull_assignments (
    function_id text        NOT NULL REFERENCES functions (id) ON DELETE CASCADE,
    runner_id   text        NOT NULL REFERENCES runners (id) ON DELETE CASCADE,
    revision    integer     NOT NULL,
    replicas    integer     NOT NULL CHECK (replicas > 0),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (function_id, runner_id)
);
CREATE INDEX pull_assignments_runner ON pull_assignments (runner_id);

-- Push workers: a runner asks for a slot before it starts one, so
-- replicas.max holds across the fleet (POST /v2/runners/{id}/worker-slots).
-- Heartbeats bring a runner's slots down to the workers it reports.
CREATE TABLE worker_slots (
    function_id text        NOT NULL REFERENCES functions (id) ON DELETE CASCADE,
    runner_id   text        NOT NULL REFERENCES runners (id) ON DELETE CASCADE,
    slots       integer     NOT NULL CHECK (slots >= 0),
    granted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (function_id, runner_id)
);
