//! `layer dev` and `layer platform`: run the control plane.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use layer_platform::embedded::{EmbeddedOptions, EmbeddedPostgres};
use layer_platform::{Config, db};
use tokio_util::sync::CancellationToken;

/// A banner line on stdout. A server whose stdout was closed (`layer dev |
/// head`) goes on serving: the line is dropped, nothing panics.
macro_rules! banner {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// Cancels `token` on Ctrl-C or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        token.cancel();
    });
}

fn print_banner(addr: SocketAddr, minted: Option<&str>, data_dir: Option<&Path>) {
    banner!("Layer platform listening on http://{addr}");
    if let Some(dir) = data_dir {
        banner!("  data: {} (PostgreSQL log in postgres.log)", dir.display());
    }
    print_minted(minted);
}

/// The admin key minted at the first start, in a block of its own.
fn print_minted(minted: Option<&str>) {
    if let Some(key) = minted {
        let rule = "  ".to_string() + &"=".repeat(76);
        banner!();
        banner!("{rule}");
        banner!("  An admin API key was minted. It is shown this once and stored only as a hash:");
        banner!();
        banner!("    export LAYER_API_KEY={key}");
        banner!();
        banner!("  (Set LAYER_API_KEY before the first start to choose the key yourself.)");
        banner!("{rule}");
    }
}

/// The first steps of the README's "A first session", which goes on from
/// there (a test holds the two together).
const FIRST_STEPS: [&str; 3] = [
    "layer rows upsert products -f examples/tag-products/products.jsonl",
    "layer run -f examples/tag-products/function.yaml",
    "layer rows get products p002",
];

/// What to type next, in another terminal: the shortest path to rows
/// worked on by a Function (the README's "A first session" goes on).
fn print_next_steps(addr: SocketAddr, minted: Option<&str>) {
    let bin_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf));
    banner!();
    banner!("  Next, in another terminal at the repository root:");
    banner!();
    if let Some(dir) = bin_dir {
        banner!("    export PATH={}:$PATH", dir.display());
    }
    match minted {
        Some(key) => banner!("    export LAYER_API_KEY={key}"),
        None => {
            banner!("    export LAYER_API_KEY=...   # your admin key: printed at the first start, or the one you chose")
        }
    }
    if addr.port() != 8080 || !addr.ip().is_loopback() {
        banner!("    export LAYER_URL=http://{addr}");
    }
    for step in FIRST_STEPS {
        banner!("    {step}");
    }
    banner!();
    banner!("  The README's \"A first session\" goes on from there.");
    banner!();
    banner!("  Stop with Ctrl-C (the data stays for the next start).");
}

/// Held for as long as this `layer dev` runs: an exclusive lock on
/// `<data dir>/layer-dev.pid`, which names our pid. The kernel drops the
/// lock when the process ends, however it ends, so a PostgreSQL left by a
/// killed run is still adopted, while one a live `layer dev` uses is never
/// touched. Dropped (a stop, or a start refused after the lock, say for a
/// taken address), it removes the file before it lets the lock go.
struct DataDirLock {
    path: PathBuf,
    _file: std::fs::File,
}

impl Drop for DataDirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lock_data_dir(dir: &Path) -> Result<DataDirLock> {
    use std::io::{Read as _, Seek as _, Write as _};
    use std::os::unix::fs::MetadataExt as _;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("layer-dev.pid");
    // A holder removes the file as it stops: a lock taken on a file that
    // was removed meanwhile is no lock on the path, so take it again.
    for _ in 0..10 {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                // The holder writes its pid right after locking: give it a moment.
                let mut holder = String::new();
                for _ in 0..20 {
                    holder.clear();
                    let _ = file.rewind();
                    let _ = file.read_to_string(&mut holder);
                    if !holder.trim().is_empty() {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                let who = match holder.split_whitespace().next() {
                    Some(pid) => format!("pid {pid}"),
                    None => "a process that has not written its pid yet".to_string(),
                };
                anyhow::bail!(
                    "the data directory {} is in use by another `layer dev` ({who}); nothing was started and its \
                     PostgreSQL was not touched. Stop that one first (Ctrl-C in its terminal), or give this one \
                     its own --data-dir",
                    dir.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
        let same = std::fs::metadata(&path).ok().map(|m| (m.dev(), m.ino()));
        let held = file.metadata().ok().map(|m| (m.dev(), m.ino()));
        if same.is_none() || same != held {
            continue;
        }
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
        file.flush()?;
        return Ok(DataDirLock { path, _file: file });
    }
    anyhow::bail!("cannot lock {}: it kept being removed and made again", path.display())
}

/// `layer dev`: embedded PostgreSQL plus the platform.
pub async fn dev(listen: SocketAddr, data_dir: PathBuf, api_key: Option<String>) -> Result<()> {
    // Refuse before anything is initialised: a data directory another
    // `layer dev` uses, then an address that is taken.
    let _lock = lock_data_dir(&data_dir)?;
    let listener = layer_platform::bind(listen).await?;
    let pg = EmbeddedPostgres::start(EmbeddedOptions { data_dir: data_dir.clone(), port: 5432, ephemeral: false })
        .await
        .context("starting the embedded PostgreSQL")?;
    // A signal drains the runner first (it reports to the platform), then
    // stops the platform, then PostgreSQL.
    let signal = CancellationToken::new();
    cancel_on_signal(signal.clone());
    let shutdown = CancellationToken::new();
    let runner_shutdown = CancellationToken::new();
    let options = pg.options(layer_platform::embedded::DATABASE);
    let mut config = Config::new(options.clone());
    config.listen = listen;
    config.bootstrap_admin_key = api_key;
    let started = match layer_platform::start_on(config, listener, shutdown.clone()).await {
        Ok(s) => s,
        Err(e) => {
            pg.stop().await.ok();
            return Err(e).context("starting the platform");
        }
    };
    let runner = async {
        let pool = db::connect(options, 1).await?;
        let key = layer_platform::auth::store::mint_local_runner_key(&pool).await?;
        pool.close().await;
        let mut rc = layer_runner::Config::new(format!("http://{}", started.addr), key);
        rc.name = "dev".into();
        rc.labels.insert("layer.dev/local".into(), "true".into());
        rc.gpus = layer_runner::inventory::detect();
        // One machine, one operator: the local runner runs commands.
        rc.allow_commands = true;
        anyhow::Ok(layer_runner::start(rc, runner_shutdown.clone()).await?)
    }
    .await;
    let runner = match runner {
        Ok(r) => r,
        Err(e) => {
            shutdown.cancel();
            started.wait().await.ok();
            pg.stop().await.ok();
            return Err(e).context("starting the local runner");
        }
    };
    // Printed once everything has started, after the start-up's log lines.
    banner!("Layer platform listening on http://{}", started.addr);
    banner!("  data: {} (PostgreSQL log in postgres.log)", data_dir.display());
    banner!("  runner {} on http://{} (runs push Functions' workers here)", runner.runner_id, runner.addr);
    print_minted(started.minted_admin_key.as_deref());
    print_next_steps(started.addr, started.minted_admin_key.as_deref());
    signal.cancelled().await;
    runner_shutdown.cancel();
    if let Err(e) = runner.wait().await {
        tracing::warn!(error = %e, "the runner stopped with an error");
    }
    shutdown.cancel();
    let served = started.wait().await;
    pg.stop().await.context("stopping PostgreSQL")?;
    served.context("serving")?;
    Ok(())
}

/// Settings of `layer runner`.
pub struct RunnerArgs {
    pub platform: String,
    pub api_key: String,
    pub listen: SocketAddr,
    pub advertise: Option<String>,
    pub name: Option<String>,
    pub labels: Vec<String>,
    pub slots: Option<u32>,
    pub idle_timeout_seconds: u64,
    pub worker_api_key: Option<String>,
    pub docker: bool,
    pub allow_commands: bool,
    pub simulated_gpus: Option<u32>,
}

/// `layer runner`: a node runner; SIGTERM drains it.
pub async fn runner(args: RunnerArgs) -> Result<()> {
    let mut config = layer_runner::Config::new(args.platform, args.api_key);
    config.listen = args.listen;
    config.advertise = args.advertise;
    if let Some(n) = args.name {
        config.name = n;
    }
    for pair in args.labels.iter().flat_map(|l| l.split(',')).filter(|l| !l.is_empty()) {
        let (k, v) = pair.split_once('=').with_context(|| format!("label {pair:?} is not key=value"))?;
        config.labels.insert(k.trim().to_string(), v.trim().to_string());
    }
    config.slots = args.slots;
    config.idle_timeout = std::time::Duration::from_secs(args.idle_timeout_seconds);
    config.worker_api_key = args.worker_api_key;
    config.docker = args.docker;
    config.allow_commands = args.allow_commands;
    config.gpus = match args.simulated_gpus {
        Some(n) => std::sync::Arc::new(layer_runner::inventory::SimulatedGpus::new(n)),
        None => layer_runner::inventory::detect(),
    };
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let started = layer_runner::start(config, shutdown).await.context("starting the runner")?;
    banner!("Layer runner {} listening on http://{}", started.runner_id, started.addr);
    started.wait().await.context("running")?;
    Ok(())
}

/// Settings of `layer platform`.
pub struct PlatformArgs {
    pub database_url: String,
    pub listen: SocketAddr,
    pub max_connections: u32,
    pub max_body_bytes: usize,
    pub api_key: Option<String>,
    pub batch_retention: std::time::Duration,
    pub call_retention: std::time::Duration,
    pub runner_retention: std::time::Duration,
}

/// `layer platform`: a replica against an existing database.
pub async fn platform(args: PlatformArgs) -> Result<()> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let mut config = Config::new(db::parse_url(&args.database_url)?);
    config.listen = args.listen;
    config.max_connections = args.max_connections;
    config.max_body_bytes = args.max_body_bytes;
    config.bootstrap_admin_key = args.api_key;
    config.engine.batch_retention = args.batch_retention;
    config.engine.call_retention = args.call_retention;
    config.engine.runner_retention = args.runner_retention;
    let started = layer_platform::start(config, shutdown).await.context("starting the platform")?;
    print_banner(started.addr, started.minted_admin_key.as_deref(), None);
    banner!("  Stop with Ctrl-C.");
    started.wait().await.context("serving")?;
    Ok(())
}
