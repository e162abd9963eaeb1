-- Scan jobs (POST /v2/namespaces/{ns}/scans, what the client's
-- TpufClient.list_ids uses): a filter over one namespace's rows, run to
-- completion inside the request that creates it, its results held here
-- for paging. Creating a scan prunes the jobs older than the retention
-- (an hour) and keeps at most 100 per namespace; deleting a namespace
-- deletes its scans.
CREATE TABLE scans (
    id                text PRIMARY KEY,
    namespace         text        NOT NULL REFERENCES namespaces (name) ON DELETE CASCADE,
    mode              text        NOT NULL CHECK (mode IN ('ids', 'count', 'values')),
    field             text,
    source            text        NOT NULL,
    filters           jsonb,
    page_size         integer     NOT NULL,
    threads           integer,
    status            text        NOT NULL CHECK (status IN ('running', 'completed', 'failed')),
    -- The rows that matched the filter.
    documents_scanned bigint      NOT NULL DEFAULT 0,
    -- Results held: ids (mode ids) or distinct values (mode values).
    result_count      bigint      NOT NULL DEFAULT 0,
    truncated         boolean     NOT NULL DEFAULT false,
    error             text,
    elapsed_ms        bigint,
    -- The API key that asked for it.
    created_by        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    completed_at      timestamptz
);
CREATE INDEX scans_namespace_created ON scans (namespace, created_at DESC);
CREATE INDEX scans_created ON scans (created_at);

-- A scan's results in page order: `ord` is the 0-based offset, so a page
-- is one range of the primary key.
CREATE TABLE scan_results (
    scan_id text   NOT NULL REFERENCES scans (id) ON DELETE CASCADE,
    ord     bigint NOT NULL,
    -- A row id (mode ids) or a value as text (mode values).
    value   text   NOT NULL,
    -- Mode values: how many matching rows hold the value.
    n       bigint,
    PRIMARY KEY (scan_id, ord)
);
