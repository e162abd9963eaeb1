//! Resource documents (`kubectl apply`-style): `POST /v2/apply` for
//! `Function`, `Index` and `InfraRules`, plus listings of the latter two.
//!
//! - [`store`]: the `indexes` and `infra_rules` tables.
//! - [`api`]: the HTTP handlers.

pub mod api;
pub mod store;
