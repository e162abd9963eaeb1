//! Wire types and resource validation shared by the Layer platform, runner
//! and CLI. Nothing here does I/O, so every rule can be unit-tested and the
//! CLI can check a file before it is sent.
//!
//! - [`error`]: the one JSON error body every endpoint answers with.
//! - [`namespace`]: row-store requests and responses (the `/v2/namespaces` API).
//! - [`filter`]: the Turbopuffer array-form filter language, parsed into an AST.
//! - [`scan`]: scan jobs over a namespace (`/v2/namespaces/{ns}/scans`).
//! - [`keys`]: API keys and their entitlements (`/v2/keys`).
//! - [`function`]: the Function spec in its canonical snake_case form (`/v2/udfs`).
//! - [`resource`]: `Function`, `Index` and `InfraRules` documents (YAML or JSON),
//!   validated with errors that name the field path.
//! - [`validate`]: the path-aware field checks the resources are built from.
//! - [`work`]: the pull protocol (claim, complete, fail, heartbeat, discover).
//! - [`call`]: Functions called over HTTP: what the platform sends a runner,
//!   what it answers, and the call record.
//! - [`runner`]: registration, heartbeats, batches pushed to runners, reports,
//!   token claims, and the push protocol to workers (`POST /run`).

pub mod call;
pub mod error;
pub mod filter;
pub mod function;
pub mod keys;
pub mod namespace;
pub mod resource;
pub mod runner;
pub mod scan;
pub mod validate;
pub mod work;

/// The `apiVersion` every resource document carries.
pub const API_VERSION: &str = "hevlayer.com/v1alpha1";

/// Attributes with this prefix belong to the platform (completion markers);
/// users may neither write nor return them.
pub const RESERVED_PREFIX: &str = "_hevlayer_";
