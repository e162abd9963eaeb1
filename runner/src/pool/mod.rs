//! Warm worker pools, one per (Function, revision).
//!
//! A batch takes a worker with [`Pools::acquire`]: an idle warm one if
//! there is one, else a new one while the pool is under `replicas.max`,
//! else it waits for one to come free. The [`WorkerLease`] gives the worker
//! back when dropped; a worker that timed out or misbehaved is discarded
//! instead. Idle workers beyond `replicas.min` stop after the idle window.
//! A batch for a newer revision retires the older revision's pool: its idle
//! workers stop at once, busy ones when their batch ends. A worker that
//! will not start is retried with a doubling backoff.

pub mod container;
pub mod process;
pub mod pull;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use container::ContainerWorker;
use layer_protocol::runner::{WorkerPlan, WorkerView};
use process::{ProcessWorker, WorkerEnv};
use tokio::sync::Notify;

use crate::gpu::{GpuBinding, Gpus, Unbound};
use crate::logs::{LogBook, WorkerLog};

/// Why a runner without `--allow-commands` runs no `worker.command`.
pub const COMMANDS_NOT_ALLOWED: &str = "this runner does not run commands (worker.command): its operator did not \
                                        allow it (start the runner with --allow-commands, or \
                                        LAYER_RUNNER_ALLOW_COMMANDS=true)";

/// Why a worker did not become ready.
enum NotReady {
    /// It exited first; how.
    Exited(String),
    /// It did not answer `GET /healthz` with 200 within the startup window.
    TimedOut,
}

/// Polls `GET <base_url>/healthz` (5 ms apart at first, then up to 100 ms)
/// until it answers 200, `exited` says the worker has ended, or `startup`
/// passes. Returns how long it took.
async fn wait_ready(
    http: &reqwest::Client,
    base_url: &str,
    startup: Duration,
    mut exited: impl FnMut() -> Option<String>,
) -> Result<Duration, NotReady> {
    let started = Instant::now();
    let url = format!("{base_url}/healthz");
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(how) = exited() {
            return Err(NotReady::Exited(how));
        }
        if let Ok(r) = http.get(&url).timeout(Duration::from_secs(2)).send().await
            && r.status().is_success()
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > startup {
            return Err(NotReady::TimedOut);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// What a driver needs to start one worker beside its plan.
#[derive(Debug)]
pub struct Launch {
    /// The worker's name, unique on the runner.
    pub name: String,
    /// The GPUs bound to it (none for most).
    pub gpus: GpuBinding,
    /// Where its output lines go, beside the runner's log.
    pub log: WorkerLog,
}

/// A started worker, of either driver.
#[derive(Debug)]
pub enum Worker {
    Process(ProcessWorker),
    Container(ContainerWorker),
}

impl Worker {
    pub fn name(&self) -> &str {
        match self {
            Worker::Process(w) => &w.name,
            Worker::Container(w) => &w.name,
        }
    }

    /// The GPUs bound to the worker.
    pub fn gpus(&self) -> &GpuBinding {
        match self {
            Worker::Process(w) => &w.gpus,
            Worker::Container(w) => &w.gpus,
        }
    }

    /// The worker as the heartbeat shows it; it also tells busy workers
    /// apart (a pid, or a container id).
    fn view(&self, udf_id: &str, revision: i32, state: &str) -> WorkerView {
        let (pid, container) = match self {
            Worker::Process(w) => (Some(w.pid), None),
            Worker::Container(w) => (None, Some(container::short(&w.id).to_string())),
        };
        let gpus = self.gpus().uuids().to_vec();
        WorkerView {
            udf_id: udf_id.to_string(),
            revision,
            state: state.into(),
            pid,
            container,
            gpus,
            ..Default::default()
        }
    }

    pub fn base_url(&self) -> String {
        match self {
            Worker::Process(w) => w.base_url(),
            Worker::Container(w) => w.base_url(),
        }
    }

    /// How the worker ended, if it has: the description and whether it
    /// was killed for exceeding its memory.
    fn exit(&mut self) -> Option<(String, bool)> {
        match self {
            Worker::Process(w) => w.exited().map(|status| (format!("it exited ({status})"), false)),
            Worker::Container(w) => w.exited().map(|e| (format!("its container stopped: {e}"), e.oom_killed)),
        }
    }

    /// Whether the worker has exited.
    pub fn has_exited(&mut self) -> bool {
        self.exit().is_some()
    }

    /// How the worker ended, waiting up to `wait` to learn it (a process
    /// that crashed is reaped within a few ms, so at most 100 ms for one).
    pub async fn exit_within(&mut self, wait: Duration) -> Option<(String, bool)> {
        let wait = if matches!(self, Worker::Process(_)) { wait.min(Duration::from_millis(100)) } else { wait };
        let deadline = Instant::now() + wait;
        loop {
            if let Some(exit) = self.exit() {
                return Some(exit);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn stop(self) {
        match self {
            Worker::Process(w) => w.stop(),
            Worker::Container(w) => w.stop(),
        }
    }

    pub fn kill(self) {
        match self {
            Worker::Process(w) => w.kill(),
            Worker::Container(w) => w.kill(),
        }
    }
}

/// Settings of the pools.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Idle workers beyond `replicas.min` stop after this long.
    pub idle_timeout: Duration,
    /// How long a worker has to answer `/healthz`.
    pub startup_timeout: Duration,
    pub platform_url: String,
    /// `HEVLAYER_BASE_URL` for container workers: the runner's gateway
    /// (see [`crate::gateway`]); `None`, they get `platform_url`.
    pub worker_url: Option<String>,
    /// Handed to workers as `LAYER_GATEWAY_API_KEY`.
    pub keys: crate::keys::WorkerKeys,
    /// The container engine, when the node has one: Functions with
    /// `worker.image` run as its containers.
    pub engine: Option<container::Engine>,
    /// Whether `worker.command` may be started as a local process.
    pub allow_commands: bool,
    /// The node's GPUs, bound to workers whose plan asks for them.
    pub gpus: Gpus,
    /// Recent worker output, for `layer logs`.
    pub logs: LogBook,
}

struct Idle {
    worker: Worker,
    since: Instant,
}

struct Pool {
    revision: i32,
    plan: WorkerPlan,
    idle: Vec<Idle>,
    /// Every worker: idle, busy and starting.
    count: usize,
    /// The workers out on a batch, as the heartbeat shows them.
    busy: Vec<WorkerView>,
    starting: usize,
    start_failures: u32,
    next_start: Instant,
    retired: bool,
    freed: Arc<Notify>,
    /// Whether the last idle worker taken while both calls and batches
    /// waited went to a call: the next goes to a batch.
    last_to_call: bool,
}

/// What a worker is wanted for. When a worker comes free while calls and
/// batches of its Function both wait for one, they take turns: a call
/// waits for at most two batches to end (usually one), and a stream of
/// calls cannot keep batches out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Batch,
    Call,
}

#[derive(Default)]
struct Inner {
    /// Pools by Function id, each Function's current revision last.
    pools: HashMap<(String, i32), Pool>,
    /// Batches and calls waiting for a worker, by pool.
    waiting: HashMap<(String, i32), [usize; 2]>,
    serial: u64,
}

/// Counts a wait for a worker while it lasts.
struct Waiting<'a> {
    pools: &'a Pools,
    key: (String, i32),
    want: Want,
}

impl<'a> Waiting<'a> {
    fn new(pools: &'a Pools, key: (String, i32), want: Want) -> Self {
        pools.lock().waiting.entry(key.clone()).or_default()[want as usize] += 1;
        Waiting { pools, key, want }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut inner = self.pools.lock();
        if let Some(w) = inner.waiting.get_mut(&self.key) {
            w[self.want as usize] -= 1;
            if *w == [0, 0] {
                inner.waiting.remove(&self.key);
            }
        }
    }
}

/// The runner's pools.
#[derive(Clone)]
pub struct Pools {
    inner: Arc<Mutex<Inner>>,
    config: PoolConfig,
    http: reqwest::Client,
}

/// A worker held by one batch.
pub struct WorkerLease {
    worker: Option<Worker>,
    key: (String, i32),
    pools: Pools,
    healthy: bool,
    /// The worker was started for this lease.
    pub cold: bool,
}

impl WorkerLease {
    pub fn worker(&self) -> &Worker {
        self.worker.as_ref().expect("a lease holds its worker until dropped")
    }

    pub fn worker_mut(&mut self) -> &mut Worker {
        self.worker.as_mut().expect("a lease holds its worker until dropped")
    }

    /// The worker misbehaved (timed out, crashed, answered garbage): kill it
    /// instead of giving it back.
    pub fn discard(&mut self) {
        self.healthy = false;
    }
}

impl Drop for WorkerLease {
    fn drop(&mut self) {
        if let Some(w) = self.worker.take() {
            self.pools.release(&self.key, w, self.healthy);
        }
    }
}

/// Why no worker could be had.
#[derive(Debug, Clone)]
pub enum AcquireError {
    /// The worker would not start: the Function's fault, spends an attempt.
    StartFailed(String),
    /// None came free in time: capacity, not a fault; the rows go back to
    /// the queue charged nothing.
    Busy(String),
    /// This runner cannot run the batch (a GPU it can never bind, no key
    /// from the platform, the pool went away): a free retry, bounded.
    Unavailable(String),
}

impl Pools {
    pub fn new(config: PoolConfig, http: reqwest::Client) -> Self {
        Pools { inner: Arc::default(), config, http }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The push workers of `udf_id` on this runner, every revision's:
    /// idle, busy, starting and retiring.
    fn workers_of(&self, udf_id: &str) -> usize {
        self.lock().pools.iter().filter(|((id, _), _)| id == udf_id).map(|(_, p)| p.count).sum()
    }

    /// A worker for one batch (or call: `want`) of `udf_id` at `revision`,
    /// waiting at most `wait` for one to come free.
    pub async fn acquire(
        &self,
        udf_id: &str,
        revision: i32,
        plan: &WorkerPlan,
        wait: Duration,
        want: Want,
    ) -> Result<WorkerLease, AcquireError> {
        self.acquire_as(udf_id, revision, plan, wait, true, want).await
    }

    /// [`Pools::acquire`]; with `evict`, idle workers of other Functions
    /// are stopped to free the GPUs a new worker needs.
    async fn acquire_as(
        &self,
        udf_id: &str,
        revision: i32,
        plan: &WorkerPlan,
        wait: Duration,
        evict: bool,
        want: Want,
    ) -> Result<WorkerLease, AcquireError> {
        let key = (udf_id.to_string(), revision);
        let deadline = Instant::now() + wait;
        let _waiting = Waiting::new(self, key.clone(), want);
        let mut short_of_gpus = None;
        let mut fleet_full: Option<String> = None;
        loop {
            let (freed, start_as) = {
                let mut inner = self.lock();
                self.retire_older(&mut inner, udf_id, revision);
                inner.serial += 1;
                let serial = inner.serial;
                let others = inner.waiting.get(&key).map_or(0, |w| w[1 - want as usize]);
                let pool = inner.pools.entry(key.clone()).or_insert_with(|| Pool {
                    revision,
                    plan: plan.clone(),
                    idle: Vec::new(),
                    count: 0,
                    busy: Vec::new(),
                    starting: 0,
                    start_failures: 0,
                    next_start: Instant::now(),
                    retired: false,
                    freed: Arc::new(Notify::new()),
                    last_to_call: false,
                });
                pool.plan = plan.clone();
                // Calls and batches both waiting take turns (see [`Want`]).
                let my_turn = others == 0 || (want == Want::Call) != pool.last_to_call;
                // The most recently used idle worker: the warmest.
                while my_turn && let Some(mut idle) = pool.idle.pop() {
                    if idle.worker.has_exited() {
                        tracing::warn!(worker = %idle.worker.name(), "idle worker had exited; replacing it");
                        pool.count -= 1;
                        continue;
                    }
                    if idle.worker.gpus().lost().is_cancelled() {
                        tracing::warn!(worker = %idle.worker.name(), "idle worker's GPU was cordoned; replacing it");
                        pool.count -= 1;
                        idle.worker.kill();
                        continue;
                    }
                    pool.busy.push(idle.worker.view(udf_id, revision, "busy"));
                    pool.last_to_call = want == Want::Call;
                    return Ok(WorkerLease {
                        worker: Some(idle.worker),
                        key,
                        pools: self.clone(),
                        healthy: true,
                        cold: false,
                    });
                }
                let max = plan.replicas_max.max(1) as usize;
                if pool.count < max && Instant::now() >= pool.next_start {
                    let name = format!("{udf_id}-r{revision}-w{serial}");
                    match self.config.gpus.bind(plan.gpus, &name, udf_id) {
                        Ok(gpus) => {
                            pool.count += 1;
                            pool.starting += 1;
                            (pool.freed.clone(), Some((name, gpus)))
                        }
                        Err(Unbound::Never(e)) => return Err(AcquireError::Unavailable(e)),
                        Err(Unbound::NotNow(e)) => {
                            let freed = pool.freed.clone();
                            if evict {
                                Self::evict_gpu_holders(&mut inner, &key);
                            }
                            short_of_gpus = Some(e);
                            (freed, None)
                        }
                    }
                } else {
                    (pool.freed.clone(), None)
                }
            };
            let mut start_as = start_as;
            if start_as.is_some() {
                // replicas.max holds across the fleet: the platform grants
                // each start. Without a slot, wait for a worker to come free.
                // Counted with this start, which is not its own other.
                let others = || u32::try_from(self.workers_of(udf_id).saturating_sub(1)).unwrap_or(u32::MAX);
                let granted = self.config.keys.slot(udf_id, others).await;
                if !matches!(granted, Ok(true)) {
                    let mut inner = self.lock();
                    if let Some(pool) = inner.pools.get_mut(&key) {
                        pool.count -= 1;
                        pool.starting -= 1;
                        // Ask again in a second, not on every wake-up.
                        pool.next_start = Instant::now() + Duration::from_secs(1);
                    }
                    drop(inner);
                    start_as = None;
                    fleet_full = Some(match granted {
                        Err(e) => e,
                        _ => format!("replicas.max workers of {udf_id} run in the fleet"),
                    });
                }
            }
            if let Some((name, gpus)) = start_as {
                let api_key = match self.config.keys.get(udf_id, revision).await {
                    Ok(k) => k,
                    Err(e) => {
                        // The platform's fault, not the Function's: a free retry.
                        let mut inner = self.lock();
                        if let Some(pool) = inner.pools.get_mut(&key) {
                            pool.count -= 1;
                            pool.starting -= 1;
                            pool.freed.notify_waiters();
                        }
                        return Err(AcquireError::Unavailable(e));
                    }
                };
                let env =
                    WorkerEnv { udf_id: udf_id.to_string(), platform_url: self.config.platform_url.clone(), api_key };
                let log = self.config.logs.open(udf_id, revision, &name);
                let started = self.start_worker(plan, &env, Launch { name, gpus, log }).await;
                let mut inner = self.lock();
                let Some(pool) = inner.pools.get_mut(&key) else {
                    if let Ok(w) = started {
                        w.stop();
                    }
                    return Err(AcquireError::Unavailable("the pool was removed while its worker started".into()));
                };
                pool.starting -= 1;
                match started {
                    Ok(w) => {
                        pool.start_failures = 0;
                        pool.busy.push(w.view(udf_id, revision, "busy"));
                        return Ok(WorkerLease {
                            worker: Some(w),
                            key,
                            pools: self.clone(),
                            healthy: true,
                            cold: true,
                        });
                    }
                    Err(e) => {
                        pool.count -= 1;
                        pool.start_failures += 1;
                        let backoff = Duration::from_millis(500 * (1u64 << pool.start_failures.min(6)));
                        pool.next_start = Instant::now() + backoff.min(Duration::from_secs(30));
                        pool.freed.notify_waiters();
                        tracing::warn!(udf = %udf_id, revision, error = %e, "worker failed to start");
                        return Err(AcquireError::StartFailed(e));
                    }
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(AcquireError::Busy(match (short_of_gpus, fleet_full) {
                    (Some(e), _) => {
                        format!("no GPU came free for a worker of {udf_id} within {} s: {e}", wait.as_secs())
                    }
                    (None, Some(e)) => format!("no worker of {udf_id} came free within {} s: {e}", wait.as_secs()),
                    (None, None) => {
                        format!("no worker of {udf_id} came free within {} s on this runner", wait.as_secs())
                    }
                }));
            }
            // Wake on a release, or poll: a start backoff may end.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), freed.notified()).await;
        }
    }

    /// Starts a worker with the driver the plan needs: a container for
    /// `worker.image`, a process for `worker.command`.
    async fn start_worker(&self, plan: &WorkerPlan, env: &WorkerEnv, launch: Launch) -> Result<Worker, String> {
        let startup = self.config.startup_timeout;
        if plan.command.is_none() && plan.image.is_some() {
            let Some(engine) = &self.config.engine else {
                return Err("the Function runs an image (worker.image) and this runner has no Docker engine".into());
            };
            let mut env = env.clone();
            if let Some(url) = &self.config.worker_url {
                env.platform_url = url.clone();
            }
            return ContainerWorker::start(engine, plan, &env, launch, &self.http, startup)
                .await
                .map(Worker::Container);
        }
        if !self.config.allow_commands {
            return Err(COMMANDS_NOT_ALLOWED.into());
        }
        ProcessWorker::start(plan, env, launch, &self.http, startup).await.map(Worker::Process)
    }

    /// Stops the idle workers of other pools that hold GPUs, so a worker
    /// that needs them can start once they are gone. Their GPUs come free
    /// when the process has exited or the container is removed.
    fn evict_gpu_holders(inner: &mut Inner, wanting: &(String, i32)) {
        for (key, pool) in inner.pools.iter_mut().filter(|(k, _)| *k != wanting) {
            let (holders, keep): (Vec<Idle>, Vec<Idle>) =
                pool.idle.drain(..).partition(|i| !i.worker.gpus().uuids().is_empty());
            pool.idle = keep;
            for idle in holders {
                tracing::info!(worker = %idle.worker.name(), udf = %key.0, for_udf = %wanting.0,
                    "stopping an idle worker to free its GPUs");
                pool.count -= 1;
                pool.freed.notify_waiters();
                idle.worker.stop();
            }
        }
    }

    fn retire_older(&self, inner: &mut Inner, udf_id: &str, revision: i32) {
        for ((id, rev), pool) in inner.pools.iter_mut() {
            if id == udf_id && *rev < revision && !pool.retired {
                pool.retired = true;
                tracing::info!(udf = %udf_id, old = *rev, new = revision, "new revision: retiring old workers");
                for idle in pool.idle.drain(..) {
                    idle.worker.stop();
                    pool.count -= 1;
                }
            }
        }
        inner.pools.retain(|_, p| !(p.retired && p.count == 0));
    }

    fn release(&self, key: &(String, i32), mut worker: Worker, healthy: bool) {
        let mut inner = self.lock();
        let Some(pool) = inner.pools.get_mut(key) else {
            worker.stop();
            return;
        };
        let view = worker.view(&key.0, key.1, "busy");
        pool.busy.retain(|v| *v != view);
        if healthy && !pool.retired && !worker.has_exited() {
            pool.idle.push(Idle { worker, since: Instant::now() });
        } else {
            pool.count -= 1;
            if healthy {
                worker.stop();
            } else {
                worker.kill();
            }
        }
        pool.freed.notify_waiters();
        inner.pools.retain(|_, p| !(p.retired && p.count == 0));
    }

    /// Stops idle workers past the idle window, keeping `replicas.min`, and
    /// drops exited ones. Called periodically.
    pub fn reap_idle(&self) {
        let mut inner = self.lock();
        let idle_timeout = self.config.idle_timeout;
        for pool in inner.pools.values_mut() {
            let mut keep = Vec::new();
            for mut idle in pool.idle.drain(..) {
                if idle.worker.has_exited() {
                    tracing::warn!(worker = %idle.worker.name(), "idle worker exited");
                    pool.count -= 1;
                } else {
                    keep.push(idle);
                }
            }
            keep.sort_by_key(|i| i.since);
            let min = pool.plan.replicas_min as usize;
            let mut out = Vec::new();
            for idle in keep {
                if pool.count > min && idle.since.elapsed() >= idle_timeout {
                    tracing::info!(worker = %idle.worker.name(), "idle worker stopped");
                    idle.worker.stop();
                    pool.count -= 1;
                } else {
                    out.push(idle);
                }
            }
            pool.idle = out;
        }
        inner.pools.retain(|_, p| !(p.retired && p.count == 0));
    }

    /// Keeps `replicas.min` workers of each current pool started.
    pub async fn keep_minimum(&self) {
        let wanted: Vec<(String, i32, WorkerPlan)> = {
            let inner = self.lock();
            inner
                .pools
                .iter()
                .filter(|(_, p)| !p.retired && p.count < p.plan.replicas_min as usize && Instant::now() >= p.next_start)
                .map(|((id, rev), p)| (id.clone(), *rev, p.plan.clone()))
                .collect()
        };
        for (id, rev, plan) in wanted {
            // Acquiring and dropping at once leaves a warm idle worker. It
            // takes no GPU from another Function's idle worker.
            if let Ok(lease) = self.acquire_as(&id, rev, &plan, Duration::ZERO, false, Want::Batch).await {
                drop(lease);
            }
        }
    }

    /// What the heartbeat reports.
    pub fn views(&self) -> Vec<WorkerView> {
        let inner = self.lock();
        let mut out = Vec::new();
        for ((id, _), pool) in &inner.pools {
            out.extend(pool.idle.iter().map(|i| i.worker.view(id, pool.revision, "idle")));
            out.extend(pool.busy.iter().cloned());
            for _ in 0..pool.starting {
                out.push(WorkerView {
                    udf_id: id.clone(),
                    revision: pool.revision,
                    state: "starting".into(),
                    pid: None,
                    ..Default::default()
                });
            }
        }
        out.sort_by(|a, b| {
            (&a.udf_id, a.revision, &a.state, a.pid, &a.container).cmp(&(
                &b.udf_id,
                b.revision,
                &b.state,
                b.pid,
                &b.container,
            ))
        });
        out
    }

    /// Waits up to `wait` for containers being stopped to be removed.
    pub async fn wait_stopped(&self, wait: Duration) {
        if let Some(engine) = &self.config.engine {
            engine.stopping.close();
            if tokio::time::timeout(wait, engine.stopping.wait()).await.is_err() {
                tracing::warn!("some worker containers were not removed in time");
            }
        }
    }

    /// Stops every idle worker (shutdown); busy ones stop when released.
    pub fn stop_all(&self) {
        let mut inner = self.lock();
        for pool in inner.pools.values_mut() {
            pool.retired = true;
            for idle in pool.idle.drain(..) {
                idle.worker.stop();
                pool.count -= 1;
            }
        }
        inner.pools.retain(|_, p| p.count > 0);
    }
}
