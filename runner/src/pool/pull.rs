//! Pull workers the runner runs from a Function's image.
//!
//! The platform's scaler assigns each runner a count of pull workers per
//! Function (in every heartbeat answer); [`PullFleet::tick`] keeps that many
//! containers of the revision's image running. A container that exits is
//! replaced after a doubling pause (1 s, 2 s, 4 s ... at most
//! [`MAX_BACKOFF`]; one that ran for [`HEALTHY_RUN`] starts the count
//! again); meanwhile the heartbeat shows it in `backoff` with how it ended
//! and its last lines, and the Function's status says so. A newer revision
//! replaces the older one's workers; workers no longer assigned stop.
//! Pull workers hold their GPUs (bound by UUID) for as long as they run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use layer_protocol::runner::{PullWorkers, WorkerPlan, WorkerView};

use super::Launch;
use super::container::{ContainerWorker, Engine, short};
use super::process::WorkerEnv;
use crate::gpu::{Gpus, Unbound};
use crate::keys::WorkerKeys;
use crate::logs::{LogBook, WorkerLog};

/// The longest pause before a crashed pull worker is started again.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// A worker that ran this long before it exited was not crash-looping.
pub const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// Lines of a crashed worker's output its status carries.
const LAST_LINES: usize = 5;

/// The pause before restart number `failures` (1-based).
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(MAX_BACKOFF)
}

struct Running {
    worker: ContainerWorker,
    log: WorkerLog,
    since: Instant,
}

struct PullSet {
    revision: i32,
    plan: WorkerPlan,
    replicas: u32,
    workers: Vec<Running>,
    starting: usize,
    failures: u32,
    next_start: Instant,
    /// Why the last worker ended or would not start.
    last_error: Option<String>,
}

impl PullSet {
    fn new(w: &PullWorkers) -> Self {
        PullSet {
            revision: w.revision,
            plan: w.plan.clone(),
            replicas: w.replicas,
            workers: Vec::new(),
            starting: 0,
            failures: 0,
            next_start: Instant::now(),
            last_error: None,
        }
    }

    fn failed(&mut self, why: String) {
        self.failures += 1;
        self.next_start = Instant::now() + backoff(self.failures);
        self.last_error = Some(why);
    }
}

#[derive(Default)]
struct Inner {
    assigned: Vec<PullWorkers>,
    sets: HashMap<String, PullSet>,
    serial: u64,
}

/// The runner's pull workers.
#[derive(Clone)]
pub struct PullFleet {
    inner: Arc<Mutex<Inner>>,
    engine: Option<Engine>,
    keys: WorkerKeys,
    gpus: Gpus,
    logs: LogBook,
    /// `HEVLAYER_BASE_URL` for containers: the runner's gateway.
    worker_url: String,
    runner_name: String,
}

impl PullFleet {
    pub fn new(
        engine: Option<Engine>,
        keys: WorkerKeys,
        gpus: Gpus,
        logs: LogBook,
        worker_url: String,
        runner_name: String,
    ) -> Self {
        PullFleet { inner: Arc::default(), engine, keys, gpus, logs, worker_url, runner_name }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the platform assigned, as of its last heartbeat answer.
    pub fn assign(&self, assigned: Vec<PullWorkers>) {
        self.lock().assigned = assigned;
    }

    /// Brings the running workers to what is assigned: notes exits, stops
    /// what is no longer wanted, starts what is missing (in the background).
    pub fn tick(&self) {
        let mut starts = Vec::new();
        {
            let mut inner = self.lock();
            let assigned = inner.assigned.clone();
            // Exits first: they count as failures of their set.
            for set in inner.sets.values_mut() {
                let mut alive = Vec::new();
                for r in std::mem::take(&mut set.workers) {
                    match r.worker.exited() {
                        Some(exit) => {
                            let lines = r.log.tail(LAST_LINES);
                            let ran = r.since.elapsed();
                            tracing::warn!(worker = %r.worker.name, container = %short(&r.worker.id), %exit,
                                ran_s = ran.as_secs(), "pull worker exited");
                            if ran >= HEALTHY_RUN {
                                set.failures = 0;
                            }
                            let mut why = format!("its container stopped ({exit}) after {} s", ran.as_secs());
                            if !lines.is_empty() {
                                why.push_str(&format!("; its last lines: {}", lines.join(" | ")));
                            }
                            set.failed(why);
                            r.worker.kill();
                        }
                        None => alive.push(r),
                    }
                }
                set.workers = alive;
            }
            // Sets no longer assigned, or at an older revision, stop.
            inner.sets.retain(|udf_id, set| {
                let keep = assigned.iter().any(|a| &a.udf_id == udf_id && a.revision == set.revision);
                if !keep {
                    for r in set.workers.drain(..) {
                        tracing::info!(worker = %r.worker.name, "pull worker no longer assigned: stopping it");
                        r.worker.stop();
                    }
                }
                keep || set.starting > 0
            });
            for a in &assigned {
                let set = inner.sets.entry(a.udf_id.clone()).or_insert_with(|| PullSet::new(a));
                if set.revision != a.revision {
                    // Its old workers are stopping; the new set waits for
                    // the starts under way to land.
                    continue;
                }
                set.replicas = a.replicas;
                set.plan = a.plan.clone();
                // Too many: the newest stop first.
                while set.workers.len() + set.starting > set.replicas as usize && !set.workers.is_empty() {
                    let r = set.workers.pop().expect("not empty");
                    tracing::info!(worker = %r.worker.name, "scaling down: stopping a pull worker");
                    r.worker.stop();
                }
            }
            let Inner { sets, serial, .. } = &mut *inner;
            let mut wanted = Vec::new();
            for (udf_id, set) in sets.iter_mut() {
                if !assigned.iter().any(|a| &a.udf_id == udf_id && a.revision == set.revision) {
                    continue;
                }
                let missing = (set.replicas as usize).saturating_sub(set.workers.len() + set.starting);
                if missing == 0 || Instant::now() < set.next_start {
                    continue;
                }
                for _ in 0..missing {
                    *serial += 1;
                    wanted.push((udf_id.clone(), set.revision, *serial));
                }
            }
            for (udf_id, revision, serial) in wanted {
                let set = inner.sets.get_mut(&udf_id).expect("just seen");
                let name = format!("{udf_id}-r{revision}-p{serial}");
                match self.gpus.bind(set.plan.gpus, &name, &udf_id) {
                    Ok(gpus) => {
                        set.starting += 1;
                        starts.push((udf_id, revision, set.plan.clone(), name, gpus));
                    }
                    Err(Unbound::NotNow(e)) => {
                        set.last_error = Some(format!("waiting for GPUs: {e}"));
                        break;
                    }
                    Err(Unbound::Never(e)) => {
                        set.failed(e);
                        break;
                    }
                }
            }
        }
        for (udf_id, revision, plan, name, gpus) in starts {
            let me = self.clone();
            tokio::spawn(async move {
                let log = me.logs.open(&udf_id, revision, &name);
                let started = me.start(&udf_id, revision, &plan, Launch { name, gpus, log: log.clone() }).await;
                let mut inner = me.lock();
                let Some(set) = inner.sets.get_mut(&udf_id).filter(|s| s.revision == revision) else {
                    if let Ok(w) = started {
                        w.stop();
                    }
                    return;
                };
                set.starting -= 1;
                match started {
                    Ok(worker) => {
                        set.last_error = None;
                        set.workers.push(Running { worker, log, since: Instant::now() });
                    }
                    Err(e) => {
                        tracing::warn!(udf = %udf_id, revision, error = %e, "pull worker failed to start");
                        set.failed(e);
                    }
                }
            });
        }
    }

    async fn start(
        &self,
        udf_id: &str,
        revision: i32,
        plan: &WorkerPlan,
        launch: Launch,
    ) -> Result<ContainerWorker, String> {
        let Some(engine) = &self.engine else {
            return Err(format!("runner {} has no Docker engine to run worker.image", self.runner_name));
        };
        let api_key = self.keys.get(udf_id, revision).await?;
        let env = WorkerEnv { udf_id: udf_id.to_string(), platform_url: self.worker_url.clone(), api_key };
        ContainerWorker::start_pull(engine, plan, &env, launch).await
    }

    /// What the heartbeat reports: each pull worker, those starting, and
    /// one `backoff` entry per Function short of its count after a failure.
    pub fn views(&self) -> Vec<WorkerView> {
        let inner = self.lock();
        let mut out = Vec::new();
        for (udf_id, set) in &inner.sets {
            let view = |state: &str| WorkerView {
                udf_id: udf_id.clone(),
                revision: set.revision,
                state: state.into(),
                kind: Some("pull".into()),
                ..Default::default()
            };
            for r in &set.workers {
                out.push(WorkerView {
                    container: Some(short(&r.worker.id).to_string()),
                    gpus: r.worker.gpus.uuids().to_vec(),
                    ..view("running")
                });
            }
            out.extend((0..set.starting).map(|_| view("starting")));
            if set.workers.len() + set.starting < set.replicas as usize
                && let Some(e) = &set.last_error
            {
                out.push(WorkerView { error: Some(e.clone()), ..view("backoff") });
            }
        }
        out
    }

    /// Stops every pull worker (the runner is stopping).
    pub fn stop_all(&self) {
        let mut inner = self.lock();
        inner.assigned.clear();
        for set in inner.sets.values_mut() {
            for r in set.workers.drain(..) {
                r.worker.stop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_doubling_to_a_cap() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(9), Duration::from_secs(256));
        assert_eq!(backoff(10), MAX_BACKOFF);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
