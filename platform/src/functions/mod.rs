//! Function resources: the `/v2/udfs` API and every revision of each spec.
//!
//! - [`store`]: the `functions` and `function_revisions` tables.
//! - [`api`]: the HTTP handlers.

pub mod api;
pub mod store;
