//! Calls: a Function run once over HTTP, synchronously, through the same
//! runners and warm workers as its row batches.
//!
//! `POST /v2/udfs/{id}/calls` places the call on a runner as a batch would
//! be placed (an idle warm worker of the revision first), sends it there
//! (`POST /v1/calls`, a call token), and answers with the worker's output.
//! The record of the call is written once the caller has the answer, off
//! the caller's path: a platform that dies in between loses the record of
//! calls it had answered, never an answer. Records are pruned after
//! `EngineConfig::call_retention`.

pub mod api;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use layer_protocol::function::Udf;
use layer_protocol::resource::ComputePool;
use sqlx::PgPool;

use crate::error::Result;
use crate::runners::store::RunnerRow;

/// How long what calls are placed by is trusted before it is read again:
/// a Function changed on another replica, or a runner's load, is seen
/// this much later at most (on this replica, a change is seen at once).
const FRESH_FOR: Duration = Duration::from_millis(500);

/// What a call is placed by, read once for many calls instead of on each:
/// the Functions, the compute pools and the runners. Reads are shared
/// (one caller refreshes, the others wait for it), and a change of a
/// Function on this replica (the engine's generation) refreshes it at once.
pub struct Catalog {
    pool: PgPool,
    generation: Arc<AtomicU64>,
    lost_after_seconds: f64,
    snapshot: tokio::sync::Mutex<Option<Arc<Snapshot>>>,
    /// Calls of each Function this replica holds now.
    in_flight: Arc<std::sync::Mutex<HashMap<String, u32>>>,
}

/// A call's place in its Function's queue, given back when dropped.
pub struct Place {
    in_flight: Arc<std::sync::Mutex<HashMap<String, u32>>>,
    udf_id: String,
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.udf_id) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.udf_id);
            }
        }
    }
}

pub struct Snapshot {
    read_at: Instant,
    generation: u64,
    pub functions: HashMap<String, Udf>,
    pub pools: BTreeMap<String, ComputePool>,
    pub runners: Vec<RunnerRow>,
}

impl Catalog {
    pub fn new(pool: PgPool, generation: Arc<AtomicU64>, lost_after: Duration) -> Self {
        Catalog {
            pool,
            generation,
            lost_after_seconds: lost_after.as_secs_f64(),
            snapshot: Default::default(),
            in_flight: Default::default(),
        }
    }

    /// A place for one more call of `udf_id`, unless `queue` calls of it
    /// are already held here (waiting for a worker or running).
    pub fn enter(&self, udf_id: &str, queue: u32) -> Option<Place> {
        let mut map = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        let n = map.entry(udf_id.to_string()).or_insert(0);
        if *n >= queue {
            return None;
        }
        *n += 1;
        Some(Place { in_flight: self.in_flight.clone(), udf_id: udf_id.to_string() })
    }

    /// The current snapshot, read again if it is stale.
    pub async fn get(&self) -> Result<Arc<Snapshot>> {
        let mut slot = self.snapshot.lock().await;
        let generation = self.generation.load(Ordering::SeqCst);
        if let Some(s) = slot.as_ref()
            && s.generation == generation
            && s.read_at.elapsed() < FRESH_FOR
        {
            return Ok(s.clone());
        }
        let functions =
            crate::functions::store::list(&self.pool).await?.into_iter().map(|u| (u.id.clone(), u)).collect();
        let rules = crate::resources::store::list_infra_rules(&self.pool).await?;
        let runners = crate::runners::store::list(&self.pool, self.lost_after_seconds).await?;
        let snapshot = Arc::new(Snapshot {
            read_at: Instant::now(),
            generation,
            functions,
            pools: crate::runners::dispatch::compute_pools(rules),
            runners,
        });
        *slot = Some(snapshot.clone());
        Ok(snapshot)
    }

    /// Forgets the snapshot: the next call reads anew.
    pub async fn forget(&self) {
        *self.snapshot.lock().await = None;
    }
}
