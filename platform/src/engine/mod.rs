//! The Function engine: discovery, the work queue, leases, retries and
//! fenced writeback, plus the pull protocol workers speak.
//!
//! - [`policy`]: failure classes and the retry policy (pure).
//! - [`discovery`]: sweeps that enqueue rows needing work.
//! - [`queue`]: claim, complete, fail, heartbeat, reap, reset, status.
//! - [`api`]: the pull protocol under `/v2/udfs/{id}`.
//!
//! [`Engine`] runs two background duties: discovery (on its interval, on
//! apply, and at once after writes for Functions with the `write` trigger)
//! and the lease reaper, which also prunes, every ten minutes, batch
//! records past `batch_retention` and runners lost or deregistered past
//! `runner_retention`. Both are safe to run on every replica: sweeps of
//! one (Function, namespace) serialise on its cursor row and the reaper
//! takes leases with `SKIP LOCKED`.

pub mod api;
pub mod discovery;
pub mod policy;
pub mod queue;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use layer_protocol::function::{Trigger, Udf};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Settings of the background duties.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How often the discovery loop looks for due sweeps.
    pub tick: Duration,
    /// How often expired leases are reaped.
    pub reap_interval: Duration,
    /// A runner silent this long is lost: the expired leases of its batches
    /// are free retries.
    pub runner_lost_after: Duration,
    /// Finished batch records older than this are deleted.
    pub batch_retention: Duration,
    /// How long call records are kept after the call ended.
    pub call_retention: Duration,
    /// Runners lost or deregistered longer than this leave the runner
    /// list (their batch records stay).
    pub runner_retention: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            tick: Duration::from_millis(500),
            reap_interval: Duration::from_secs(1),
            runner_lost_after: Duration::from_secs(6),
            batch_retention: Duration::from_secs(7 * 24 * 3600),
            call_retention: Duration::from_secs(7 * 24 * 3600),
            runner_retention: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Default)]
struct Requests {
    /// Functions to sweep at once (applied or asked for).
    functions: BTreeSet<String>,
    /// Namespaces just written, for Functions with the `write` trigger.
    namespaces: BTreeSet<String>,
}

/// A handle to the engine's background duties.
#[derive(Clone)]
pub struct Engine {
    pool: PgPool,
    requests: Arc<Mutex<Requests>>,
    wake: Arc<Notify>,
    /// Notified when rows were enqueued or batch slots freed: the push
    /// dispatcher waits on it.
    work_ready: Arc<Notify>,
    /// Bumped whenever this replica changes a Function, so copies cached
    /// for the hot paths are refreshed at once (other replicas' changes
    /// are seen within a second).
    functions_generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Engine {
    pub fn new(pool: PgPool) -> Self {
        Engine {
            pool,
            requests: Arc::default(),
            wake: Arc::new(Notify::new()),
            work_ready: Arc::new(Notify::new()),
            functions_generation: Arc::default(),
        }
    }

    /// Says a Function changed (apply, pause, resume, delete).
    pub fn functions_changed(&self) {
        self.functions_generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.work_ready.notify_one();
    }

    /// The counter [`Engine::functions_changed`] bumps.
    pub fn functions_generation(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.functions_generation.clone()
    }

    /// What the push dispatcher waits on.
    pub fn work_ready(&self) -> Arc<Notify> {
        self.work_ready.clone()
    }

    /// Asks for a sweep of a Function as soon as possible.
    pub fn sweep_soon(&self, udf_id: &str) {
        self.functions_changed();
        self.requests.lock().unwrap_or_else(|e| e.into_inner()).functions.insert(udf_id.to_string());
        self.wake.notify_one();
    }

    /// Tells the engine a namespace was written (the `write` trigger).
    pub fn namespace_written(&self, namespace: &str) {
        self.requests.lock().unwrap_or_else(|e| e.into_inner()).namespaces.insert(namespace.to_string());
        self.wake.notify_one();
    }

    /// Starts the discovery loop and the reaper; they stop with `shutdown`.
    pub fn spawn(&self, config: EngineConfig, shutdown: CancellationToken, tasks: &mut JoinSet<()>) {
        let me = self.clone();
        let stop = shutdown.clone();
        tasks.spawn(async move { me.discovery_loop(config.tick, stop).await });
        let pool = self.pool.clone();
        let work_ready = self.work_ready.clone();
        tasks.spawn(async move { reaper_loop(pool, config, work_ready, shutdown).await });
    }

    async fn discovery_loop(self, tick: Duration, shutdown: CancellationToken) {
        let mut last_sweep: HashMap<String, Instant> = HashMap::new();
        let mut crons: HashMap<String, CronState> = HashMap::new();
        let mut cached: Option<(Instant, u64, Arc<Vec<Udf>>)> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(tick) => {}
            }
            let requests = std::mem::take(&mut *self.requests.lock().unwrap_or_else(|e| e.into_inner()));
            // The Functions, re-read after a local change or once a second.
            let generation = self.functions_generation.load(std::sync::atomic::Ordering::SeqCst);
            if cached.as_ref().is_none_or(|(at, g, _)| *g != generation || at.elapsed() > Duration::from_secs(1)) {
                match crate::functions::store::list(&self.pool).await {
                    Ok(list) => cached = Some((Instant::now(), generation, Arc::new(list))),
                    Err(e) => {
                        tracing::warn!(error = %e, "reading Functions failed; retrying on the next tick");
                        continue;
                    }
                }
            }
            let udfs = cached.as_ref().map(|c| c.2.clone()).unwrap_or_default();
            if let Err(e) = self.discover_due(&udfs, &requests, &mut last_sweep, &mut crons).await {
                tracing::warn!(error = %e, "discovery pass failed; retrying on the next tick");
            }
        }
    }

    async fn discover_due(
        &self,
        udfs: &[Udf],
        requests: &Requests,
        last_sweep: &mut HashMap<String, Instant>,
        crons: &mut HashMap<String, CronState>,
    ) -> crate::Result<()> {
        last_sweep.retain(|id, _| udfs.iter().any(|u| &u.id == id));
        crons.retain(|id, _| udfs.iter().any(|u| &u.id == id && u.spec.schedule.cron.is_some()));
        for udf in udfs.iter().filter(|u| !u.paused) {
            // One Function's failure does not hold up the others.
            if let Err(e) = self.discover_one(udf, requests, last_sweep, crons).await {
                tracing::warn!(udf = %udf.id, error = %e, "discovery failed; retrying on the next tick");
            }
        }
        Ok(())
    }

    async fn discover_one(
        &self,
        udf: &Udf,
        requests: &Requests,
        last_sweep: &mut HashMap<String, Instant>,
        crons: &mut HashMap<String, CronState>,
    ) -> crate::Result<()> {
        let interval = Duration::from_secs(u64::from(udf.spec.schedule.discovery_interval_seconds));
        let discovery = udf.spec.triggers.contains(&Trigger::Discovery);
        let periodic = discovery && last_sweep.get(&udf.id).is_none_or(|t| t.elapsed() >= interval);
        // An apply sweeps at once when the Function has the discovery
        // trigger; a schedule-only or write-only Function waits for its
        // trigger (or an explicit POST /discover).
        let scheduled = self.schedule_fires(udf, crons).await?;
        let asked = (discovery && requests.functions.contains(&udf.id)) || scheduled;
        let maybe_written = udf.spec.triggers.contains(&Trigger::Write) && !requests.namespaces.is_empty();
        // Most ticks have nothing to do: resolve namespaces only when
        // there is a reason to sweep.
        if !(periodic || asked || maybe_written) {
            return Ok(());
        }
        // Right after a write, with plain target namespaces, the written ones
        // are known without asking the database: the fast path of `write`.
        if !(periodic || asked) && udf.spec.index_selector.is_none() {
            let written: Vec<String> =
                udf.spec.target_namespaces.iter().filter(|n| requests.namespaces.contains(*n)).cloned().collect();
            if !written.is_empty() {
                discovery::sweep_function(&self.pool, udf, &written, &self.work_ready).await?;
            }
            return Ok(());
        }
        let namespaces = crate::functions::store::active_namespaces(&self.pool, &udf.spec).await?;
        let written: Vec<String> = if maybe_written {
            namespaces.iter().filter(|n| requests.namespaces.contains(*n)).cloned().collect()
        } else {
            Vec::new()
        };
        let targets = if periodic || asked { namespaces } else { written };
        if targets.is_empty() {
            return Ok(());
        }
        discovery::sweep_function(&self.pool, udf, &targets, &self.work_ready).await?;
        if periodic || asked {
            last_sweep.insert(udf.id.clone(), Instant::now());
        }
        Ok(())
    }

    /// Whether the Function's cron schedule fires now. The firing is claimed
    /// in the database, so one replica sweeps per match.
    async fn schedule_fires(&self, udf: &Udf, crons: &mut HashMap<String, CronState>) -> crate::Result<bool> {
        let Some(cron) = &udf.spec.schedule.cron else {
            return Ok(false);
        };
        let key = (cron.clone(), udf.updated_at.clone());
        let state = match crons.get(&udf.id) {
            Some(s) if s.key == key => s.clone(),
            _ => {
                let last = discovery::last_scheduled(&self.pool, &udf.id).await?;
                let s = CronState { key, last, next: discovery::next_firing(udf, last) };
                crons.insert(udf.id.clone(), s.clone());
                s
            }
        };
        let Some(next) = state.next else {
            return Ok(false);
        };
        if chrono::Utc::now() < next {
            return Ok(false);
        }
        let fired = discovery::claim_firing(&self.pool, &udf.id, state.last).await?;
        // Either way, reload next tick: fired here, or by another replica.
        crons.remove(&udf.id);
        if fired.is_some() {
            tracing::info!(udf = %udf.id, cron = %cron, "schedule fired");
        }
        Ok(fired.is_some())
    }

    /// Sweeps a Function now and returns the rows enqueued.
    pub async fn discover_now(&self, udf: &Udf, namespaces: &[String]) -> crate::Result<u64> {
        discovery::sweep_function(&self.pool, udf, namespaces, &self.work_ready).await
    }
}

/// What the discovery loop knows of one Function's cron schedule.
#[derive(Clone)]
struct CronState {
    /// The expression and the Function's `updated_at`: a change reloads.
    key: (String, String),
    last: Option<chrono::DateTime<chrono::Utc>>,
    next: Option<chrono::DateTime<chrono::Utc>>,
}

async fn reaper_loop(pool: PgPool, config: EngineConfig, work_ready: Arc<Notify>, shutdown: CancellationToken) {
    // The first pass prunes right after start, then every ten minutes.
    let mut pruned: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(config.reap_interval) => {}
        }
        loop {
            match queue::reap_expired(&pool, 1000, config.runner_lost_after).await {
                Ok(n) if n > 0 => {
                    work_ready.notify_one();
                    if n < 1000 {
                        break;
                    }
                }
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "lease reaper pass failed");
                    break;
                }
            }
        }
        if pruned.is_none_or(|p| p.elapsed() > Duration::from_secs(600)) {
            if let Err(e) = queue::prune_buckets(&pool).await {
                tracing::warn!(error = %e, "pruning rate buckets failed");
            }
            match crate::runners::records::prune(&pool, config.batch_retention).await {
                Ok(n) if n > 0 => tracing::info!(deleted = n, "pruned batch records past their retention"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pruning batch records failed"),
            }
            match crate::calls::store::prune(&pool, config.call_retention).await {
                Ok(n) if n > 0 => tracing::info!(deleted = n, "pruned call records past their retention"),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pruning call records failed"),
            }
            match crate::runners::store::prune(&pool, config.runner_retention, None).await {
                Ok(n) if n > 0 => {
                    tracing::info!(deleted = n, "removed runners lost or deregistered past their retention")
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "pruning runners failed"),
            }
            pruned = Some(Instant::now());
        }
    }
}
