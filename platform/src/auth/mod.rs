//! API keys and bearer authentication.
//!
//! - [`token`]: minting secrets and hashing them (only hashes are stored).
//! - [`principal`]: who is calling and what they may do.
//! - [`store`]: the `api_keys` table.
//! - [`api`]: the `/v2/keys` handlers.

pub mod api;
pub mod principal;
pub mod store;
pub mod token;

pub use principal::Principal;
