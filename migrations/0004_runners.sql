-- Runners and the batches pushed to them.

-- One row per registration. state: 'active' (takes batches), 'draining'
-- (finishing, takes none; set by the runner's heartbeat), 'gone'
-- (deregistered). A runner whose last heartbeat is older than three
-- intervals is reported as 'lost' and takes no batches.
CREATE TABLE runners (
    id                text PRIMARY KEY,
    name              text        NOT NULL,
    address           text        NOT NULL,
    labels            jsonb       NOT NULL DEFAULT '{}',
    capacity          jsonb       NOT NULL,
    drivers           jsonb       NOT NULL DEFAULT '[]',
    state             text        NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'draining', 'gone')),
    load              jsonb       NOT NULL DEFAULT '{"batches": 0, "workers": []}',
    -- The HMAC key this runner's tokens are signed with.
    signing_key       bytea       NOT NULL,
    key_id            text,
    registered_at     timestamptz NOT NULL DEFAULT now(),
    last_heartbeat_at timestamptz NOT NULL DEFAULT now()
);

-- A batch pushed to a runner. state: 'dispatched' (moved out by the
-- runner's report, or the reaper once its leases are gone), 'reported',
-- 'abandoned' (its leases expired or the dispatch failed).
CREATE TABLE batches (
    id            bigint PRIMARY KEY,
    function_id   text        NOT NULL REFERENCES functions (id) ON DELETE CASCADE,
    revision      integer     NOT NULL,
    runner_id     text        NOT NULL,
    state         text        NOT NULL DEFAULT 'dispatched' CHECK (state IN ('dispatched', 'reported', 'abandoned')),
    items         integer     NOT NULL,
    written       integer     NOT NULL DEFAULT 0,
    failed        integer     NOT NULL DEFAULT 0,
    dropped       integer     NOT NULL DEFAULT 0,
    worker        text,
    error         text,
    dispatched_at timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);
CREATE INDEX batches_open ON batches (runner_id) WHERE state = 'dispatched';
CREATE INDEX batches_by_function ON batches (function_id, id);
