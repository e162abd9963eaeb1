//! The OpenAPI document of the whole API, served at `GET /openapi.json`.
//! Kept by hand beside the handlers; a test checks that every route the
//! router serves is listed here.

/// OpenAPI 3.1, JSON.
pub const DOCUMENT: &str = include_str!("openapi.json");
