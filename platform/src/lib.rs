//! The Layer control plane: the REST API, the row store, API keys and the
//! Function/Index/InfraRules resources, all state in PostgreSQL. Replicas
//! are stateless; any number may run over one database.
//!
//! - [`http`]: router, JSON extractor, authentication and request ids.
//! - [`auth`]: API keys (`/v2/keys`), hashing, principals and scopes.
//! - [`rows`]: namespaces of rows (`/v2/namespaces`) and the filter compiler.
//! - [`functions`]: Function resources and their revisions (`/v2/udfs`).
//! - [`engine`]: discovery, the work queue, leases, retries, writeback, the pull protocol.
//! - [`runners`]: runner registration, tokens, batch reports, and the push dispatcher.
//! - [`resources`]: `POST /v2/apply` for resource documents, Index and InfraRules.
//! - [`db`]: pools and migrations; [`embedded`]: the PostgreSQL `layer dev` runs.
//! - [`error`]: the one error type and its HTTP mapping.
//! - [`metrics`]: the Prometheus metrics at `/metrics`.
//! - [`openapi`]: the OpenAPI document served at `/openapi.json`.

pub mod auth;
pub mod calls;
pub mod db;
pub mod embedded;
pub mod engine;
pub mod error;
pub mod functions;
pub mod http;
pub mod metrics;
pub mod openapi;
pub mod resources;
pub mod rows;
pub mod runners;
pub mod time;

use std::net::SocketAddr;
use std::sync::Arc;

use sqlx::postgres::PgConnectOptions;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use error::{PlatformError, Result};

/// Everything a platform replica needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the API listens (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    pub database: PgConnectOptions,
    /// Connections this replica may hold.
    pub max_connections: u32,
    /// The largest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// Installed as the admin key when the database has no keys yet
    /// (`LAYER_API_KEY` at first start). `None` mints one.
    pub bootstrap_admin_key: Option<String>,
    /// The engine's background duties.
    pub engine: engine::EngineConfig,
    /// Runner heartbeats and the push dispatcher.
    pub runners: runners::RunnerSettings,
    pub dispatch: runners::dispatch::DispatchConfig,
    /// The scaler of pull workers run by runners.
    pub scaling: runners::scaling::ScalingConfig,
}

impl Config {
    /// Defaults for a database: port 8080 on loopback, 64 MiB bodies.
    pub fn new(database: PgConnectOptions) -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            database,
            max_connections: 16,
            max_body_bytes: 64 << 20,
            bootstrap_admin_key: None,
            engine: engine::EngineConfig::default(),
            runners: runners::RunnerSettings::default(),
            dispatch: runners::dispatch::DispatchConfig::default(),
            scaling: runners::scaling::ScalingConfig::default(),
        }
    }
}

/// A started replica.
#[derive(Debug)]
pub struct Started {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The admin key minted at first start, to be shown once; `None` when
    /// keys existed already or `bootstrap_admin_key` was given.
    pub minted_admin_key: Option<String>,
    task: JoinHandle<Result<()>>,
}

impl Started {
    /// Waits until the server has drained after shutdown was requested.
    pub async fn wait(self) -> Result<()> {
        self.task.await.map_err(|e| PlatformError::Setup(format!("server task failed: {e}")))?
    }
}

/// Binds `config.listen` (before touching the database, so a taken port
/// fails at once), then [`start_on`] that listener.
pub async fn start(config: Config, shutdown: CancellationToken) -> Result<Started> {
    let listener = bind(config.listen).await?;
    start_on(config, listener, shutdown).await
}

/// Binds the API's address, with an error that names it.
pub async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            " (another process listens there: stop it, or choose another address with --listen)"
        } else {
            ""
        };
        PlatformError::Setup(format!("cannot listen on {listen}: {e}{hint}"))
    })
}

/// Connects, migrates, installs the bootstrap key if needed and starts
/// serving on a listener already bound (`config.listen` is not used).
pub async fn start_on(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> Result<Started> {
    let pool = db::connect(config.database.clone(), config.max_connections).await?;
    db::migrate(&pool).await?;
    let minted_admin_key = auth::store::bootstrap_admin(&pool, config.bootstrap_admin_key.as_deref()).await?;
    let addr = listener.local_addr()?;
    let engine = engine::Engine::new(pool.clone());
    let mut duties = tokio::task::JoinSet::new();
    let mut engine_config = config.engine.clone();
    // An expired push lease means its runner stopped extending it; if the
    // runner also missed two heartbeats, it is gone: a free retry.
    engine_config.runner_lost_after = config.runners.heartbeat_interval * 2;
    engine.spawn(engine_config, shutdown.clone(), &mut duties);
    let mut dispatch_config = config.dispatch.clone();
    dispatch_config.lost_after = config.runners.lost_after;
    let dispatcher = runners::dispatch::Dispatcher::new(
        pool.clone(),
        engine.work_ready(),
        engine.functions_generation(),
        dispatch_config,
    );
    duties.spawn(dispatcher.run(shutdown.clone()));
    let mut scaling = config.scaling.clone();
    scaling.lost_after = config.runners.lost_after;
    duties.spawn(runners::scaling::run(pool.clone(), scaling, shutdown.clone()));
    let calls = calls::Catalog::new(pool.clone(), engine.functions_generation(), config.runners.lost_after);
    let state = http::AppState {
        calls: Arc::new(calls),
        recorder: calls::store::Recorder::spawn(pool.clone()),
        keys: Default::default(),
        pool: pool.clone(),
        settings: Arc::new(http::Settings { max_body_bytes: config.max_body_bytes, runners: config.runners.clone() }),
        engine,
        runner_keys: Default::default(),
        // Calls to runners; each call sets its own timeout.
        http: reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .map_err(|e| PlatformError::Internal(format!("the HTTP client did not start: {e}")))?,
    };
    let app = http::router(state);
    tracing::info!(%addr, "platform listening");
    let task = tokio::spawn(async move {
        axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
        while duties.join_next().await.is_some() {}
        pool.close().await;
        tracing::info!("platform stopped");
        Ok(())
    });
    Ok(Started { addr, minted_admin_key, task })
}

/// Runs a replica until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<()> {
    start(config, shutdown).await?.wait().await
}
