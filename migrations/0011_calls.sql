-- Calls: a Function run once over HTTP (POST /v2/udfs/{id}/calls). A
-- synchronous call is recorded once it has answered (off the caller's
-- path); the same record will carry asynchronous calls through their
-- states. No foreign key to functions: the records of a deleted Function
-- stay until their retention passes.
CREATE TABLE calls (
    call_id        text PRIMARY KEY,
    function_id    text        NOT NULL,
    revision       integer     NOT NULL,
    status         text        NOT NULL,
    http_status    smallint    NOT NULL,
    runner_id      text,
    worker         text,
    key_id         text,
    request_bytes  bigint      NOT NULL,
    response_bytes bigint      NOT NULL,
    queued_at      timestamptz NOT NULL,
    started_at     timestamptz,
    finished_at    timestamptz,
    cold_start     boolean     NOT NULL DEFAULT false,
    trace_id       text,
    error          text
);
CREATE INDEX calls_by_function ON calls (function_id, queued_at DESC, call_id DESC);
CREATE INDEX calls_finished ON calls (finished_at);
