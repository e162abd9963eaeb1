-- The row store, API keys and the resources of the foundation.

-- A namespace of rows. `write_seq` is bumped by every write transaction (the
-- row lock serialises writers of one namespace), and each row records the
-- sequence of its last write, so discovery can read only what changed.
CREATE TABLE namespaces (
    name            text PRIMARY KEY,
    write_seq       bigint      NOT NULL DEFAULT 0,
    row_count       bigint      NOT NULL DEFAULT 0,
    distance_metric text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    last_write_at   timestamptz
);

CREATE TABLE rows (
    namespace  text   NOT NULL REFERENCES namespaces (name) ON DELETE CASCADE,
    id         text   NOT NULL,
    attributes jsonb  NOT NULL DEFAULT '{}'::jsonb,
    vector     real[],
    write_seq  bigint NOT NULL,
    PRIMARY KEY (namespace, id)
);
CREATE INDEX rows_namespace_write_seq ON rows (namespace, write_seq);

-- Index resources: labels on a row-store namespace, for indexSelector.
CREATE TABLE indexes (
    name          text PRIMARY KEY,
    k8s_namespace text        NOT NULL,
    labels        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    annotations   jsonb       NOT NULL DEFAULT '{}'::jsonb,
    spec          jsonb       NOT NULL DEFAULT '{}'::jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- InfraRules resources: compute pools.
CREATE TABLE infra_rules (
    name          text PRIMARY KEY,
    k8s_namespace text        NOT NULL,
    labels        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    spec          jsonb       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- API keys. Only the SHA-256 of the token is stored.
CREATE TABLE api_keys (
    key_id        text PRIMARY KEY,
    name          text        NOT NULL,
    owner         text,
    description   text,
    entitlements  jsonb       NOT NULL,
    token_hash    bytea       NOT NULL UNIQUE,
    expires_after text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz,
    revoked_at    timestamptz,
    last_seen_at  timestamptz
);

-- Functions and every revision of their spec. Revisions outlive a deleted
-- Function, and a re-created one continues the numbering.
CREATE TABLE functions (
    id            text PRIMARY KEY,
    k8s_namespace text        NOT NULL DEFAULT 'layer',
    labels        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    spec          jsonb       NOT NULL,
    paused        boolean     NOT NULL DEFAULT false,
    revision      integer     NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE function_revisions (
    function_id text        NOT NULL,
    revision    integer     NOT NULL,
    spec        jsonb       NOT NULL,
    changed     text[]      NOT NULL,
    key_id      text,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (function_id, revision)
);
