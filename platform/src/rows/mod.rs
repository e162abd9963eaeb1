//! The row store: namespaces of documents (`id`, JSON attributes, optional
//! vector) behind the Turbopuffer-shaped `/v2/namespaces` API.
//!
//! - [`plan`]: a write request checked and normalised before any SQL runs.
//! - [`filter`]: the filter AST compiled to parameterised SQL.
//! - [`store`]: the SQL, one function per use case.
//! - [`api`]: the HTTP handlers.
//! - [`scans`]: scan jobs (`/v2/namespaces/{ns}/scans`) and [`scan_store`], their SQL.

pub mod api;
pub mod filter;
pub mod plan;
pub mod scan_store;
pub mod scans;
pub mod store;
