//! Runners and push dispatch.
//!
//! - [`store`]: runners and batch records in PostgreSQL.
//! - [`api`]: registration and listing (API key); heartbeats,
//!   deregistration and batch reports (runner tokens).
//! - [`dispatch`]: the duty that leases batches of push Functions and sends
//!   them to runners.
//!
//! Trust: a runner registers with an API key that has the `runner` claim
//! (or admin) and gets its own HMAC key. Every token after that is an HS256
//! JWT signed with that key: the session token it heartbeats with, the
//! dispatch token on each batch the platform sends it, and the per-batch
//! report token it presents with the results.

pub mod api;
pub mod dispatch;
pub mod store;

use std::time::Duration;

/// Runner timings the API and the dispatcher share.
#[derive(Debug, Clone)]
pub struct RunnerSettings {
    /// How often runners heartbeat (told to them at registration).
    pub heartbeat_interval: Duration,
    /// A runner silent this long is lost: no batches, and its expired
    /// leases are free retries.
    pub lost_after: Duration,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        RunnerSettings { heartbeat_interval: Duration::from_secs(2), lost_after: Duration::from_secs(6) }
    }
}
