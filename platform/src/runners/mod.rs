//! Runners and push dispatch.
//!
//! - [`store`]: runners and batch records in PostgreSQL.
//! - [`api`]: registration and listing (API key); heartbeats,
//!   deregistration and batch reports (runner tokens).
//! - [`dispatch`]: the duty that leases batches of push Functions and sends
//!   them to runners.
//! - [`scaling`]: the duty that decides how many pull workers of each
//!   Function run, and on which runners.
//!
//! Trust: a runner registers with an API key that has the `runner` claim
//! (or admin) and gets its own HMAC key. Every token after that is an HS256
//! JWT signed with that key: the session token it heartbeats with, the
//! dispatch token on each batch the platform sends it, and the per-batch
//! report token it presents with the results.

pub mod api;
pub mod dispatch;
pub mod records;
pub mod scaling;
pub mod status;

pub use status::status;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
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

/// Runners' signing keys, kept in memory after a first check against the
/// database so a batch report costs no lookup. A runner's key never
/// changes (registering again makes a new runner), so entries never go
/// stale; the map is cleared when it grows past `KEY_CACHE_LIMIT`.
#[derive(Debug, Clone, Default)]
pub struct KeyCache(Arc<RwLock<HashMap<String, Arc<[u8]>>>>);

const KEY_CACHE_LIMIT: usize = 10_000;

impl KeyCache {
    pub fn get(&self, runner_id: &str) -> Option<Arc<[u8]>> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).get(runner_id).cloned()
    }

    pub fn insert(&self, runner_id: &str, key: &[u8]) {
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        if map.len() >= KEY_CACHE_LIMIT {
            map.clear();
        }
        map.insert(runner_id.to_string(), Arc::from(key));
    }
}
