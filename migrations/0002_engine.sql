-- The Function engine: the work queue, discovery cursors and counters.

-- One row per (Function, namespace, row) that needs work or has failed.
-- A completed item is deleted: the completion marker on the row is the
-- record. States: 'pending' (claimable from available_at; moved out by a
-- claim), 'leased' (held by worker_id until lease_expires_at; moved out by
-- complete, fail, or the lease reaper), 'failed' (moved out by reset-failed
-- or a new version).
CREATE TABLE work_items (
    function_id      text        NOT NULL REFERENCES functions (id) ON DELETE CASCADE,
    namespace        text        NOT NULL,
    row_id           text        NOT NULL,
    state            text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'leased', 'failed')),
    -- The spec.version the row must be brought to.
    version          text        NOT NULL,
    attempts         integer     NOT NULL DEFAULT 0,
    free_retries     integer     NOT NULL DEFAULT 0,
    available_at     timestamptz NOT NULL DEFAULT now(),
    -- Fencing: bumped by every lease. A report is applied only to the lease
    -- it was made for.
    lease_epoch      bigint      NOT NULL DEFAULT 0,
    lease_seconds    integer,
    lease_expires_at timestamptz,
    worker_id        text,
    -- The row's write_seq and the version when it was leased: a result is
    -- written only if the row has not been written since, and stamps the
    -- version it was computed for.
    leased_seq       bigint,
    leased_version   text,
    last_error       text,
    last_error_kind  text,
    enqueued_at      timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (function_id, namespace, row_id)
);
CREATE INDEX work_items_claimable ON work_items (function_id, available_at) WHERE state = 'pending';
CREATE INDEX work_items_leases ON work_items (lease_expires_at) WHERE state = 'leased';

-- How far discovery has read each (Function, namespace): rows with a
-- write_seq above last_seq are new to it. A changed spec_key (version,
-- filter, inputs) rescans from zero once.
CREATE TABLE discovery_cursors (
    function_id   text        NOT NULL REFERENCES functions (id) ON DELETE CASCADE,
    namespace     text        NOT NULL,
    last_seq      bigint      NOT NULL DEFAULT 0,
    spec_key      text        NOT NULL DEFAULT '',
    swept_at      timestamptz,
    PRIMARY KEY (function_id, namespace)
);

-- Counters per Function.
CREATE TABLE function_stats (
    function_id      text PRIMARY KEY REFERENCES functions (id) ON DELETE CASCADE,
    completed        bigint      NOT NULL DEFAULT 0,
    dropped_stale    bigint      NOT NULL DEFAULT 0,
    leases_expired   bigint      NOT NULL DEFAULT 0,
    sweeps_completed bigint      NOT NULL DEFAULT 0,
    last_sweep_at    timestamptz
);

-- Completions per Function per second, for the rate over a window; the
-- reaper drops buckets older than a day.
CREATE TABLE completion_buckets (
    function_id text        NOT NULL REFERENCES functions (id) ON DELETE CASCADE,
    second      timestamptz NOT NULL,
    completed   bigint      NOT NULL,
    PRIMARY KEY (function_id, second)
);

-- Rows whose result goes stale at a known time (spec.staleAfterSeconds).
CREATE TABLE stale_deadlines (
    function_id text        NOT NULL REFERENCES functions (id) ON DELETE CASCADE,
    namespace   text        NOT NULL,
    row_id      text        NOT NULL,
    due_at      timestamptz NOT NULL,
    PRIMARY KEY (function_id, namespace, row_id)
);
CREATE INDEX stale_deadlines_due ON stale_deadlines (due_at);
