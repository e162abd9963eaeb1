//! The test harness: a real PostgreSQL, a fresh database per test, the
//! platform in-process on an ephemeral port, and the public `hevlayer`
//! Python client for compatibility tests.
//!
//! PostgreSQL: when `DATABASE_URL` is set, databases are created on that
//! server. Otherwise one throwaway cluster is started from the system
//! binaries under `$TMPDIR/layer-test-pg-<uid>` (fsync off) and left running
//! for the next test process to reuse; every test gets its own database,
//! named after its process so databases of finished runs are dropped.

pub mod otlp;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use layer_platform::embedded::{EmbeddedOptions, EmbeddedPostgres};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

/// The admin key every test platform is bootstrapped with.
pub const ADMIN_KEY: &str = "lyr_test_admin_key_0123456789abcdef";

/// The directory of the workspace (for examples and the Python venv).
pub fn workspace_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

/// Holds an exclusive file lock while alive.
struct FileLock(std::fs::File);

impl FileLock {
    fn acquire(path: &std::path::Path) -> Result<Self> {
        let f = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(path)?;
        f.lock().with_context(|| format!("locking {}", path.display()))?;
        Ok(FileLock(f))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// Connection options for the maintenance database of the test server.
async fn server_options() -> Result<PgConnectOptions> {
    if let Ok(url) = std::env::var("DATABASE_URL") {
        return url.parse::<PgConnectOptions>().context("DATABASE_URL");
    }
    let uid = nix::unistd::Uid::effective();
    let dir = std::env::temp_dir().join(format!("layer-test-pg-{uid}"));
    std::fs::create_dir_all(&dir)?;
    let _lock = FileLock::acquire(&std::env::temp_dir().join(format!("layer-test-pg-{uid}.lock")))?;
    // Adopts the server an earlier test process started, or starts one.
    let pg = EmbeddedPostgres::start(EmbeddedOptions { data_dir: dir, port: 5432, ephemeral: true })
        .await
        .context("starting the test PostgreSQL (set DATABASE_URL to use your own server)")?;
    let options = pg.options("postgres");
    // Deliberately left running for the next test process.
    std::mem::forget(pg);
    Ok(options)
}

static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// A fresh, empty database on the test server.
pub struct TestDb {
    pub options: PgConnectOptions,
    pub name: String,
}

impl TestDb {
    pub async fn create() -> Result<TestDb> {
        let server = server_options().await?;
        let mut conn = server.connect().await.context("connecting to the test PostgreSQL")?;
        drop_abandoned(&mut conn).await?;
        let pid = std::process::id();
        let name = format!("layer_t_{pid}_{}", NEXT_DB.fetch_add(1, Ordering::SeqCst));
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await?;
        conn.close().await?;
        Ok(TestDb { options: server.database(&name), name })
    }

    pub async fn pool(&self) -> Result<PgPool> {
        Ok(sqlx::postgres::PgPoolOptions::new().max_connections(4).connect_with(self.options.clone()).await?)
    }

    pub fn url(&self) -> String {
        self.options.to_url_lossy().to_string()
    }
}

/// Drops the databases of test processes that have exited.
async fn drop_abandoned(conn: &mut PgConnection) -> Result<()> {
    let names: Vec<String> = sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'layer\\_t\\_%'")
        .fetch_all(&mut *conn)
        .await?;
    for name in names {
        let Some(pid) = name.split('_').nth(2).and_then(|p| p.parse::<i32>().ok()) else {
            continue;
        };
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        if !alive {
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut *conn).await;
        }
    }
    Ok(())
}

/// A platform running in this process on an ephemeral port.
pub struct TestPlatform {
    pub url: String,
    pub admin_key: String,
    pub db: TestDb,
    pub pool: PgPool,
    shutdown: CancellationToken,
    http: reqwest::Client,
}

/// Options for [`TestPlatform::start_with`].
#[derive(Debug, Clone)]
pub struct PlatformOptions {
    pub max_body_bytes: usize,
    /// How long the pull scaler waits before it stops workers the queue no
    /// longer calls for.
    pub scale_down_after: Duration,
}

impl Default for PlatformOptions {
    fn default() -> Self {
        PlatformOptions { max_body_bytes: 64 << 20, scale_down_after: Duration::from_secs(60) }
    }
}

impl TestPlatform {
    pub async fn start() -> Result<TestPlatform> {
        Self::start_with(PlatformOptions::default()).await
    }

    pub async fn start_with(opts: PlatformOptions) -> Result<TestPlatform> {
        let db = TestDb::create().await?;
        let mut config = layer_platform::Config::new(db.options.clone());
        config.listen = "127.0.0.1:0".parse()?;
        config.max_connections = 8;
        config.max_body_bytes = opts.max_body_bytes;
        config.scaling.scale_down_after = opts.scale_down_after;
        config.bootstrap_admin_key = Some(ADMIN_KEY.to_string());
        let shutdown = CancellationToken::new();
        let started = layer_platform::start(config, shutdown.clone()).await?;
        let pool = db.pool().await?;
        Ok(TestPlatform {
            url: format!("http://{}", started.addr),
            admin_key: ADMIN_KEY.to_string(),
            db,
            pool,
            shutdown,
            http: reqwest::Client::builder().timeout(Duration::from_secs(60)).build()?,
        })
    }

    /// A request with a bearer key (`None` sends no Authorization header).
    pub fn request(&self, method: reqwest::Method, path: &str, key: Option<&str>) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{}", self.url, path));
        if let Some(k) = key {
            r = r.bearer_auth(k);
        }
        r
    }

    /// Applies one Function document with this spec (camelCase) as the admin.
    pub async fn apply_function(&self, name: &str, spec: serde_json::Value) -> Result<()> {
        let doc = serde_json::json!({"apiVersion": "hevlayer.com/v1alpha1", "kind": "Function",
                                     "metadata": {"name": name}, "spec": spec});
        let (s, r) =
            self.call(reqwest::Method::POST, "/v2/apply", Some(serde_json::json!({"documents": [doc]}))).await?;
        anyhow::ensure!(s == 200, "apply: {r}");
        Ok(())
    }

    /// Upserts rows into a namespace as the admin.
    pub async fn upsert_rows(&self, namespace: &str, rows: serde_json::Value) -> Result<()> {
        let body = serde_json::json!({"upsert_rows": rows});
        let (s, r) = self.call(reqwest::Method::POST, &format!("/v2/namespaces/{namespace}"), Some(body)).await?;
        anyhow::ensure!(s == 200, "upsert into {namespace}: {r}");
        Ok(())
    }

    /// The failed rows of a Function: row id → (error kind, message, attempts).
    pub async fn failed_rows(&self, udf_id: &str) -> Result<std::collections::BTreeMap<String, (String, String, i32)>> {
        let rows: Vec<(String, String, String, i32)> = sqlx::query_as(
            "SELECT row_id, coalesce(last_error_kind, ''), coalesce(last_error, ''), attempts FROM work_items
             WHERE function_id = $1 AND state = 'failed'",
        )
        .bind(udf_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(|(id, k, m, a)| (id, (k, m, a))).collect())
    }

    /// Waits until the Function has nothing pending or processing and has
    /// completed or failed something; returns its status.
    pub async fn drained(&self, udf_id: &str, within: Duration) -> Result<serde_json::Value> {
        let start = std::time::Instant::now();
        loop {
            let (_, st) = self.call(reqwest::Method::GET, &format!("/v2/udfs/{udf_id}/status"), None).await?;
            let idle = st["pending_count"] == 0 && st["processing_count"] == 0;
            let touched = st["counts"]["completed"].as_i64() > Some(0) || st["failed_count"].as_i64() > Some(0);
            if idle && touched {
                return Ok(st);
            }
            anyhow::ensure!(start.elapsed() < within, "{udf_id} not drained after {within:?}: {st}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until the Function has `n` rows pending (discovery ran).
    pub async fn wait_for_pending(&self, udf_id: &str, n: u64) -> Result<()> {
        let start = std::time::Instant::now();
        loop {
            let (_, st) = self.call(reqwest::Method::GET, &format!("/v2/udfs/{udf_id}/status"), None).await?;
            if st["pending_count"].as_u64() == Some(n) {
                return Ok(());
            }
            anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "{udf_id}: never {n} pending: {st}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends JSON as the admin and returns (status, body).
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value)> {
        self.call_as(&self.admin_key.clone(), method, path, body).await
    }

    pub async fn call_as(
        &self,
        key: &str,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value)> {
        let mut r = self.request(method, path, Some(key));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        Ok((status, v))
    }

    /// Mints a key with the given entitlements and returns its token.
    pub async fn mint_key(&self, entitlements: serde_json::Value) -> Result<String> {
        let (status, body) = self
            .call(
                reqwest::Method::POST,
                "/v2/keys",
                Some(serde_json::json!({"name": "t", "entitlements": entitlements})),
            )
            .await?;
        if status != 200 {
            bail!("mint failed: {status} {body}");
        }
        Ok(body["token"].as_str().context("token")?.to_string())
    }
}

impl Drop for TestPlatform {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A Python interpreter that can import the public `hevlayer` client:
/// `LAYER_TEST_PYTHON`, or a venv at `target/pyenv` made on first use
/// (`pip install hevlayer==0.7.3` from PyPI).
pub fn python_with_hevlayer() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("LAYER_TEST_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let target = workspace_dir().join("target");
    std::fs::create_dir_all(&target)?;
    let venv = target.join("pyenv");
    let python = venv.join("bin/python");
    let _lock = FileLock::acquire(&target.join("pyenv.lock"))?;
    let ok = |py: &std::path::Path| {
        std::process::Command::new(py).args(["-c", "import hevlayer"]).output().is_ok_and(|o| o.status.success())
    };
    if python.exists() && ok(&python) {
        return Ok(python);
    }
    let status = std::process::Command::new("python3").args(["-m", "venv"]).arg(&venv).status()?;
    if !status.success() {
        bail!("python3 -m venv {} failed", venv.display());
    }
    let out = std::process::Command::new(venv.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", "hevlayer==0.7.3"])
        .output()?;
    if !out.status.success() || !ok(&python) {
        bail!(
            "could not install the hevlayer client into {}: {}\nset LAYER_TEST_PYTHON to a python that has `hevlayer` installed",
            venv.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(python)
}

/// The schemathesis release the API fuzzing tests run (PyPI).
pub const SCHEMATHESIS: &str = "schemathesis==4.32.5";

/// The `st` command of schemathesis in the test venv (beside
/// [`python_with_hevlayer`]'s interpreter), installed from PyPI on first
/// use as `./test.sh` does.
pub fn schemathesis() -> Result<PathBuf> {
    let python = python_with_hevlayer()?;
    let st = python.with_file_name("st");
    let target = workspace_dir().join("target");
    let _lock = FileLock::acquire(&target.join("pyenv.lock"))?;
    let version = SCHEMATHESIS.trim_start_matches("schemathesis==");
    let ok = |st: &std::path::Path| {
        std::process::Command::new(st)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(version))
    };
    if ok(&st) {
        return Ok(st);
    }
    let out = std::process::Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", SCHEMATHESIS])
        .output()?;
    if !out.status.success() || !ok(&st) {
        bail!("could not install {SCHEMATHESIS} beside {}: {}", python.display(), String::from_utf8_lossy(&out.stderr));
    }
    Ok(st)
}

/// Runs a Python script from `tests/python/` against a platform; fails with
/// its output unless it exits 0.
pub async fn run_python(script: &str, platform: &TestPlatform, extra_env: &[(&str, &str)]) -> Result<String> {
    let python = python_with_hevlayer()?;
    let path = workspace_dir().join("tests/python").join(script);
    let mut cmd = tokio::process::Command::new(python);
    cmd.arg(&path)
        .env("LAYER_URL", &platform.url)
        .env("LAYER_API_KEY", &platform.admin_key)
        .env("PYTHONUNBUFFERED", "1")
        .kill_on_drop(true);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output()).await.context("python timed out")??;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("{script} failed ({}):\n{text}", out.status);
    }
    Ok(text)
}

/// Samples of a Prometheus text exposition: `name{labels}` → value.
pub fn prometheus_samples(text: &str) -> std::collections::BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// `GET {base}/metrics` (a platform's or a runner's): the text, checked to
/// be the Prometheus text format, and its samples.
pub async fn scrape(base: &str) -> Result<(String, std::collections::BTreeMap<String, f64>)> {
    let r = reqwest::get(format!("{base}/metrics")).await?;
    anyhow::ensure!(r.status() == 200, "GET {base}/metrics: {}", r.status());
    let ctype = r.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    anyhow::ensure!(ctype.starts_with("text/plain; version=0.0.4"), "{base}/metrics is {ctype}");
    let text = r.text().await?;
    let samples = prometheus_samples(&text);
    Ok((text, samples))
}

/// A runner started in-process against a [`TestPlatform`].
pub struct TestRunner {
    pub id: String,
    pub addr: std::net::SocketAddr,
    shutdown: CancellationToken,
    started: Option<layer_runner::Started>,
}

impl TestRunner {
    /// Starts a runner (4 slots, commands allowed) after `tweak` changes
    /// its config.
    pub async fn start(p: &TestPlatform, tweak: impl FnOnce(&mut layer_runner::Config)) -> Result<TestRunner> {
        let mut config = layer_runner::Config::new(p.url.clone(), p.admin_key.clone());
        config.name = "test-runner".into();
        config.slots = Some(4);
        config.drain_timeout = Duration::from_secs(60);
        // The tests' worker processes are commands: opt in, as an operator
        // would (`--allow-commands`); a test may turn it off.
        config.allow_commands = true;
        tweak(&mut config);
        let shutdown = CancellationToken::new();
        let started = layer_runner::start(config, shutdown.clone()).await?;
        Ok(TestRunner { id: started.runner_id.clone(), addr: started.addr, shutdown, started: Some(started) })
    }

    /// Drains and stops the runner (what SIGTERM does).
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown.cancel();
        if let Some(s) = self.started.take() {
            s.wait().await?;
        }
        Ok(())
    }
}

impl Drop for TestRunner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The Rust echo worker of `examples/echo-rust`, as the test build makes it
/// (`layer-test-echo-worker`), built (debug) if a narrower build left it out.
pub fn echo_worker_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test> or target/<profile>/<bin>
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("layer-test-echo-worker");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "layer-tests", "--bin", "layer-test-echo-worker"])
            .current_dir(workspace_dir())
            .status()?;
        anyhow::ensure!(status.success() && bin.exists(), "building layer-test-echo-worker failed");
    }
    Ok(bin)
}
