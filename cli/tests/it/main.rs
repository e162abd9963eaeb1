//! The `layer` binary's suites, one module each, linked into one test
//! binary. Select a suite by its module path:
//! `cargo nextest run -E 'test(/^dev::/)'`.
//!
//! - `cli`: the client commands against an in-process platform
//! - `dev`: `layer dev` on its embedded PostgreSQL, as a newcomer runs it
//! - `runner_kill`: what `kill -9` of a `layer runner` leaves behind

mod cli;
mod dev;
mod runner_kill;
