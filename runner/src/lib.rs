//! The Layer node runner: registers with the platform, takes batches pushed
//! to it, runs them on warm workers, reports the results.
//!
//! - [`inventory`]: the node's capacity; GPUs behind the [`inventory::GpuInventory`] trait (NVML).
//! - [`gpu`]: binding whole GPUs to workers exclusively; sampling; cordoning.
//! - [`logs`]: recent worker output per worker, for `layer logs`.
//! - [`pool`]: warm worker pools per (Function, revision); the process and
//!   Docker drivers; the pull workers the platform assigns ([`pool::pull`]).
//! - [`gateway`]: the address through which container workers reach the platform.
//! - [`keys`]: the keys minted for each Function's workers.
//! - [`exec`]: one batch on a worker: timeout, size cap, classification, splitting.
//! - [`server`]: the runner's HTTP API (`POST /v1/batches`, `/healthz`, `/v1/status`).
//! - [`platform`]: registration, heartbeats, reports, deregistration.
//!
//! Shutdown drains: the runner stops taking batches (and says so in its
//! heartbeat), finishes and reports the ones it holds, deregisters, and
//! stops its workers.

pub mod exec;
pub mod gateway;
pub mod gpu;
pub mod inventory;
pub mod keys;
pub mod logs;
pub mod metrics;
pub mod platform;
pub mod pool;
pub mod server;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a runner needs to start.
#[derive(Clone)]
pub struct Config {
    /// The platform's base URL.
    pub platform: String,
    /// An API key with the `runner` claim or the admin scope.
    pub api_key: String,
    /// Where the runner listens.
    pub listen: SocketAddr,
    /// The URL the platform reaches the runner at; by default
    /// `http://<listen address>`.
    pub advertise: Option<String>,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Batches run at once; by default the CPU count (at least 2).
    pub slots: Option<u32>,
    /// Idle workers beyond `replicas.min` stop after this long.
    pub idle_timeout: Duration,
    pub startup_timeout: Duration,
    /// Handed to every worker as `LAYER_GATEWAY_API_KEY` instead of the
    /// key the platform mints for each Function's workers.
    pub worker_api_key: Option<String>,
    pub max_response_bytes: usize,
    /// How long a drain waits for batches in progress.
    pub drain_timeout: Duration,
    pub gpus: Arc<dyn inventory::GpuInventory>,
    /// Whether to run Functions with `worker.image` as containers when a
    /// Docker engine answers (`DOCKER_HOST`, else the local socket).
    pub docker: bool,
    /// Whether the operator lets this runner start `worker.command` as
    /// local processes (`--allow-commands`). Off, the runner does not
    /// advertise the `process` driver, so the platform sends it no such
    /// Function, and it refuses a batch that needs one. Off by default:
    /// a command runs on the host with the runner's rights.
    pub allow_commands: bool,
}

impl Config {
    pub fn new(platform: impl Into<String>, api_key: impl Into<String>) -> Self {
        Config {
            platform: platform.into(),
            api_key: api_key.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
            name: std::env::var("HOSTNAME").unwrap_or_else(|_| "runner".into()),
            labels: BTreeMap::new(),
            slots: None,
            idle_timeout: Duration::from_secs(300),
            startup_timeout: Duration::from_secs(60),
            worker_api_key: None,
            max_response_bytes: 64 << 20,
            drain_timeout: Duration::from_secs(300),
            gpus: Arc::new(inventory::NoGpus),
            docker: true,
            allow_commands: false,
        }
    }
}

/// Why a runner could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error("registration with the platform failed: {0}")]
    Register(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// State the server, the heartbeat and the batch tasks share.
pub struct Shared {
    pub runner_id: String,
    pub signing_key: Vec<u8>,
    pub slots: u32,
    /// Whether batches of `worker.command` Functions are taken.
    pub allow_commands: bool,
    pub draining: AtomicBool,
    /// Batches accepted and not yet reported.
    pub held: Mutex<HashSet<i64>>,
    pub exec: exec::Exec,
    pub platform: platform::PlatformClient,
    pub batches: TaskTracker,
    pub gpus: gpu::Gpus,
    pub logs: logs::LogBook,
    /// The pull workers the platform assigned to this runner.
    pub pull: pool::pull::PullFleet,
}

impl Shared {
    pub fn held_ids(&self) -> Vec<i64> {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).iter().copied().collect()
    }
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// A started runner.
pub struct Started {
    pub addr: SocketAddr,
    pub runner_id: String,
    task: JoinHandle<Result<(), RunnerError>>,
}

impl Started {
    /// Waits until the runner has drained and stopped.
    pub async fn wait(self) -> Result<(), RunnerError> {
        self.task.await.map_err(|e| RunnerError::Io(std::io::Error::other(e.to_string())))?
    }
}

/// Binds, registers and starts serving; returns once registered.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Started, RunnerError> {
    let listener =
        tokio::net::TcpListener::bind(config.listen).await.map_err(|e| RunnerError::Listen(config.listen, e))?;
    let addr = listener.local_addr()?;
    let advertise = config.advertise.clone().unwrap_or_else(|| format!("http://{addr}"));
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| RunnerError::Register(e.to_string()))?;
    let capacity = inventory::capacity(config.slots, config.gpus.as_ref());
    tracing::info!(gpus = capacity.gpus.len(), inventory = %config.gpus.describe(), "node inventory");
    let engine = if config.docker {
        match pool::container::Engine::connect(&config.name).await {
            Ok(engine) => Some(engine),
            Err(e) => {
                tracing::info!(reason = %e, "the Docker driver is off: Functions with worker.image are not placed here");
                None
            }
        }
    } else {
        None
    };
    // Containers reach the platform through the runner's gateway on the
    // bridge network's gateway address.
    let stop_gateway = CancellationToken::new();
    let worker_url = match &engine {
        Some(engine) => {
            let started = match gateway::bridge_gateway(&engine.docker).await {
                Ok(ip) => gateway::start(SocketAddr::new(ip, 0), &config.platform, stop_gateway.clone()).await,
                Err(e) => Err(e),
            };
            match started {
                Ok(url) => {
                    tracing::info!(%url, "container workers reach the platform through the runner at this address");
                    Some(url)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "no worker gateway: container workers get the platform's own URL");
                    None
                }
            }
        }
        None => None,
    };
    let mut drivers = Vec::new();
    if config.allow_commands {
        drivers.push("process".to_string());
    } else {
        tracing::info!(
            "the process driver is off: Functions with worker.command are not placed here (start the runner with \
             --allow-commands to run them)"
        );
    }
    if engine.is_some() {
        drivers.push("docker".into());
    }
    let client = platform::PlatformClient::new(config.platform.clone(), http.clone());
    let registration = client
        .register(&config.api_key, &config.name, &advertise, &config.labels, capacity.clone(), drivers)
        .await
        .map_err(RunnerError::Register)?;
    let signing_key = hex::decode(&registration.signing_key)
        .map_err(|e| RunnerError::Register(format!("the platform sent a bad signing key: {e}")))?;
    client.set_session(&registration.runner_id, registration.token.clone());
    tracing::info!(runner_id = %registration.runner_id, %advertise, slots = capacity.slots, "runner registered");
    let gpus = gpu::Gpus::new(config.gpus.clone());
    let logs = logs::LogBook::default();
    let keys = keys::WorkerKeys::new(client.clone(), config.worker_api_key.clone());
    let pull = pool::pull::PullFleet::new(
        engine.clone(),
        keys.clone(),
        gpus.clone(),
        logs.clone(),
        worker_url.clone().unwrap_or_else(|| config.platform.clone()),
        config.name.clone(),
    );
    let pools = pool::Pools::new(
        pool::PoolConfig {
            idle_timeout: config.idle_timeout,
            startup_timeout: config.startup_timeout,
            platform_url: config.platform.clone(),
            worker_url,
            keys,
            engine,
            allow_commands: config.allow_commands,
            gpus: gpus.clone(),
            logs: logs.clone(),
        },
        http.clone(),
    );
    let shared = Arc::new(Shared {
        runner_id: registration.runner_id.clone(),
        signing_key,
        slots: capacity.slots,
        allow_commands: config.allow_commands,
        draining: AtomicBool::new(false),
        held: Mutex::new(HashSet::new()),
        exec: exec::Exec { pools: pools.clone(), http, max_response_bytes: config.max_response_bytes },
        platform: client,
        batches: TaskTracker::new(),
        gpus,
        logs,
        pull,
    });
    let heartbeat_every = Duration::from_secs(u64::from(registration.heartbeat_interval_seconds.max(1)));
    let runner_id = registration.runner_id.clone();
    let task = tokio::spawn(async move {
        let ran = run(shared, listener, heartbeat_every, config.drain_timeout, shutdown).await;
        stop_gateway.cancel();
        ran
    });
    Ok(Started { addr, runner_id, task })
}

async fn run(
    shared: Arc<Shared>,
    listener: tokio::net::TcpListener,
    heartbeat_every: Duration,
    drain_timeout: Duration,
    shutdown: CancellationToken,
) -> Result<(), RunnerError> {
    let stop_serving = CancellationToken::new();
    let app = server::router(shared.clone());
    let serving = tokio::spawn({
        let stop = stop_serving.clone();
        async move { axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await }
    });
    let stop_duties = CancellationToken::new();
    let heartbeat = tokio::spawn(platform::heartbeat_loop(shared.clone(), heartbeat_every, stop_duties.clone()));
    let housekeeping = tokio::spawn({
        let pools = shared.exec.pools.clone();
        let pull = shared.pull.clone();
        let stop = stop_duties.clone();
        async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                pools.reap_idle();
                pools.keep_minimum().await;
                pull.tick();
            }
        }
    });

    shutdown.cancelled().await;
    // Drain: refuse new batches, tell the platform, finish what is held.
    shared.draining.store(true, Ordering::SeqCst);
    tracing::info!(held = shared.held_ids().len(), "draining: finishing batches in progress");
    // Pull workers stop now; the rows they hold come back when their
    // leases run out.
    shared.pull.stop_all();
    shared.platform.heartbeat_once(&shared).await.ok();
    shared.batches.close();
    if tokio::time::timeout(drain_timeout, shared.batches.wait()).await.is_err() {
        tracing::warn!("drain timed out; the remaining batches' leases will expire and be reissued");
    }
    stop_duties.cancel();
    let _ = heartbeat.await;
    let _ = housekeeping.await;
    if let Err(e) = shared.platform.deregister().await {
        tracing::warn!(error = %e, "deregistration failed; the platform will find the runner lost");
    }
    stop_serving.cancel();
    let _ = serving.await;
    shared.exec.pools.stop_all();
    // Give stopping workers their grace period; containers are removed.
    tokio::time::sleep(Duration::from_millis(100)).await;
    shared.exec.pools.wait_stopped(Duration::from_secs(15)).await;
    tracing::info!("runner stopped");
    Ok(())
}
