//! The cross-crate suites, one module each, linked into one test binary
//! (each extra binary would link the whole platform and runner again).
//! Select a suite by its module path: `cargo nextest run -E 'test(/^push::/)'`.
//!
//! - `auth`: keys, scopes, namespace restrictions, revocation
//! - `client_compat`: the public `hevlayer` client, unchanged
//! - `containers`: push and pull workers in real Docker containers
//!   (skipped by the `no-docker` profile)
//! - `crashes`: workers that die, crash or hang mid-batch cost their
//!   neighbours nothing
//! - `edge`: bad input at the edge (NUL bytes, foreign cursors, reports
//!   naming a row twice, 401s, missing references)
//! - `engine_lifecycle`, `engine_python`, `engine_seed`: discovery, leases,
//!   retries and writeback through pull workers, seed 000 as written
//! - `filters`: the filter compiler against PostgreSQL
//! - `fuzz`: the API fuzzed by schemathesis from its OpenAPI document
//! - `gpus`: GPU binding through the simulated inventory
//! - `observability`: metrics, traces, promtool
//! - `openapi`: the served OpenAPI document against the routes
//! - `plans`: the hot statements' plans on 100,000 queued rows
//! - `push`: push dispatch to runners and their process workers
//! - `replicas`: several platform replicas over one database
//! - `resources`, `rows`, `scans`: the `/v2` resource, row and scan APIs
//! - `scripts`: `./test.sh` and `./dev.sh` as a newcomer runs them
//! - `writethrough`: seed 000's write-through pattern

mod auth;
mod calls;
mod client_compat;
mod containers;
mod crashes;
mod edge;
mod engine_lifecycle;
mod engine_python;
mod engine_seed;
mod filters;
mod fuzz;
mod gpus;
mod observability;
mod openapi;
mod plans;
mod push;
mod replicas;
mod resources;
mod rows;
mod scans;
mod scripts;
mod writethrough;
