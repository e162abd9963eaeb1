//! The keys a runner hands its workers as `LAYER_GATEWAY_API_KEY`.
//!
//! Each Function's workers get a key the platform mints for them on this
//! runner (`POST /v2/runners/{id}/worker-keys`): the pull protocol for that
//! Function alone, and read and write on its namespaces. The runner asks
//! once per (Function, revision), so a new revision rotates the key, and
//! keeps the token in memory only; it is never logged. An operator's
//! `--worker-api-key` (the seed's configured inbound worker key) replaces
//! them all.
//!
//! The same handle asks for push worker slots: a runner starts a push
//! worker only once the platform granted it one (`replicas.max` across the
//! fleet).

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Mutex;

use crate::platform::PlatformClient;

#[derive(Clone)]
pub struct WorkerKeys {
    platform: Option<PlatformClient>,
    configured: Option<String>,
    minted: Arc<Mutex<HashMap<(String, i32), String>>>,
    /// One slot request at a time, so each one's count of the runner's
    /// other workers includes every earlier grant.
    slot_turn: Arc<Mutex<()>>,
}

impl std::fmt::Debug for WorkerKeys {
    // Never the tokens.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerKeys").field("configured", &self.configured.is_some()).finish_non_exhaustive()
    }
}

impl WorkerKeys {
    pub fn new(platform: PlatformClient, configured: Option<String>) -> Self {
        WorkerKeys { platform: Some(platform), configured, minted: Arc::default(), slot_turn: Arc::default() }
    }

    /// No platform to ask: workers get `configured`, or no key.
    pub fn fixed(configured: Option<String>) -> Self {
        WorkerKeys { platform: None, configured, minted: Arc::default(), slot_turn: Arc::default() }
    }

    /// Whether this runner may start one more push worker of `udf_id`: the
    /// platform counts them across the fleet against `replicas.max`. With
    /// no platform to ask, yes.
    /// `others` counts the workers of `udf_id` this runner has besides the
    /// one it asks for; it is read in turn, after every earlier grant.
    pub async fn slot(&self, udf_id: &str, others: impl FnOnce() -> u32) -> Result<bool, String> {
        match &self.platform {
            Some(p) => {
                let _turn = self.slot_turn.lock().await;
                p.worker_slot(udf_id, others()).await.map(|r| r.granted)
            }
            None => Ok(true),
        }
    }

    /// The key for the workers of `udf_id` at `revision`.
    pub async fn get(&self, udf_id: &str, revision: i32) -> Result<Option<String>, String> {
        if let Some(k) = &self.configured {
            return Ok(Some(k.clone()));
        }
        let Some(platform) = &self.platform else {
            return Ok(None);
        };
        let key = (udf_id.to_string(), revision);
        // Held across the mint: two workers starting together share one key
        // (a second mint would delete the first's).
        let mut keys = self.minted.lock().await;
        if let Some(t) = keys.get(&key) {
            return Ok(Some(t.clone()));
        }
        let minted = platform.worker_key(udf_id).await?;
        tracing::info!(udf = %udf_id, revision, key_id = %minted.key_id, "worker key minted");
        // One key per Function: the platform replaced the older ones.
        keys.retain(|(id, _), _| id != udf_id);
        keys.insert(key, minted.token.clone());
        Ok(Some(minted.token))
    }
}
