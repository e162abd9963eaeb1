//! W1-pull and incremental discovery.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use layer_platform::embedded::{EmbeddedOptions, EmbeddedPostgres};
use serde_json::{Value, json};

pub(crate) const KEY: &str = "lyr_bench_admin_key_0123456789";

/// CPU seconds (user + system) a process has used, with its reaped children.
pub(crate) fn cpu_seconds(pid: u32, with_children: bool) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let f: Vec<f64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0.0)).collect();
    // Fields after the command: state is index 0, utime 11, stime 12, cutime 13, cstime 14.
    let own = f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0);
    let children = if with_children { f.get(13).unwrap_or(&0.0) + f.get(14).unwrap_or(&0.0) } else { 0.0 };
    // Clock ticks are 100 per second on Linux.
    (own + children) / 100.0
}

/// All CPU PostgreSQL has used: every live server process, plus what the
/// postmaster reaped from exited backends.
pub(crate) fn postgres_cpu(postmaster: u32) -> f64 {
    let mut total = cpu_seconds(postmaster, true);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == postmaster {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let ppid =
            stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)).and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(postmaster) {
            total += cpu_seconds(pid, false);
        }
    }
    total
}

pub(crate) fn postmaster_pid(data_dir: &Path) -> Result<u32> {
    let text = std::fs::read_to_string(data_dir.join("pg/postmaster.pid"))?;
    Ok(text.lines().next().context("postmaster.pid")?.trim().parse()?)
}

pub(crate) struct Platform {
    pub(crate) child: Child,
    pub(crate) url: String,
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn layer_binary() -> Result<PathBuf> {
    let bin = std::env::current_exe()?.parent().context("exe dir")?.join("layer");
    if !bin.exists() {
        bail!("{} is missing: build it first with `cargo build --release -p layer-cli`", bin.display());
    }
    Ok(bin)
}

pub(crate) async fn start_platform(pg: &EmbeddedPostgres) -> Result<Platform> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let child = Command::new(layer_binary()?)
        .args(["platform", "--listen", &format!("127.0.0.1:{port}"), "--database-url", &pg.url("layer")])
        .env("LAYER_API_KEY", KEY)
        .env("LAYER_LOG", crate::child_log())
        .stdout(Stdio::null())
        .spawn()?;
    let url = format!("http://127.0.0.1:{port}");
    let start = Instant::now();
    while reqwest::get(format!("{url}/healthz")).await.map(|r| r.status() != 200).unwrap_or(true) {
        ensure!(start.elapsed() < Duration::from_secs(30), "the platform did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Platform { child, url })
}

pub(crate) async fn call(http: &reqwest::Client, method: reqwest::Method, url: String, body: Value) -> Result<Value> {
    let r = http.request(method, url).bearer_auth(KEY).json(&body).send().await?;
    let status = r.status();
    let v: Value = r.json().await?;
    ensure!(status.is_success(), "{status}: {v}");
    Ok(v)
}

/// Fills `ns` with `rows` small rows.
pub(crate) async fn fill(http: &reqwest::Client, url: &str, ns: &str, rows: usize) -> Result<()> {
    for start in (0..rows).step_by(1000) {
        let docs: Vec<Value> = (start..(start + 1000).min(rows)).map(|i| json!({"id": i, "title": "x"})).collect();
        call(http, reqwest::Method::POST, format!("{url}/v2/namespaces/{ns}"), json!({"upsert_rows": docs})).await?;
    }
    Ok(())
}

pub(crate) async fn status(http: &reqwest::Client, url: &str, f: &str) -> Result<Value> {
    let r = http.get(format!("{url}/v2/udfs/{f}/status")).bearer_auth(KEY).send().await?;
    Ok(r.json().await?)
}

/// A no-op pull worker: claim, complete with no attributes, until empty.
async fn noop_worker(http: reqwest::Client, url: String, f: String, id: String, batch: usize) -> Result<u64> {
    let mut done = 0;
    loop {
        let claimed = call(
            &http,
            reqwest::Method::POST,
            format!("{url}/v2/udfs/{f}/claim"),
            json!({"worker_id": id, "limit": batch}),
        )
        .await?;
        let items = claimed["items"].as_array().context("items")?;
        if items.is_empty() {
            return Ok(done);
        }
        let complete: Vec<Value> = items.iter().map(|i| json!({"namespace": i["namespace"], "id": i["id"]})).collect();
        let r = call(
            &http,
            reqwest::Method::POST,
            format!("{url}/v2/udfs/{f}/items/complete"),
            json!({"worker_id": id, "items": complete}),
        )
        .await?;
        done += r["updated"].as_u64().unwrap_or(0);
    }
}

pub async fn run(rows: usize, batches: &[usize], workers: usize) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("layer-bench-drain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pg = EmbeddedPostgres::start(EmbeddedOptions { data_dir: dir.clone(), port: 5432, ephemeral: false }).await?;
    let result = async {
        let platform = start_platform(&pg).await?;
        let http = reqwest::Client::new();
        let postmaster = postmaster_pid(&dir)?;
        for &batch in batches {
            pull_once(&http, &platform, postmaster, rows, batch, workers).await?;
            pgqueuer_line(&pg.url("layer"), postmaster, rows, batch);
        }
        anyhow::Ok(())
    }
    .await;
    pg.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// One W1-pull drain of `rows` at `batch`; prints its line, returns rows/s.
pub(crate) async fn pull_once(
    http: &reqwest::Client,
    platform: &Platform,
    postmaster: u32,
    rows: usize,
    batch: usize,
    workers: usize,
) -> Result<f64> {
    let ns = format!("w1-{batch}");
    let f = format!("noop-{batch}");
    fill(http, &platform.url, &ns, rows).await?;
    let doc = json!({"apiVersion": "hevlayer.com/v1alpha1", "kind": "Function", "metadata": {"name": f},
        "spec": {"targetNamespaces": [ns], "inputs": ["id", "title"], "worker": {"dispatch": "pull", "batchSize": batch}}});
    call(http, reqwest::Method::POST, format!("{}/v2/apply", platform.url), json!({"documents": [doc]})).await?;
    let start = Instant::now();
    while status(http, &platform.url, &f).await?["pending_count"].as_u64() != Some(rows as u64) {
        ensure!(start.elapsed() < Duration::from_secs(120), "discovery did not enqueue {rows} rows");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let enqueue = start.elapsed();
    let (p0, g0) = (cpu_seconds(platform.child.id(), false), postgres_cpu(postmaster));
    let start = Instant::now();
    let url = Arc::new(platform.url.clone());
    let tasks: Vec<_> = (0..workers)
        .map(|w| tokio::spawn(noop_worker(http.clone(), url.to_string(), f.clone(), format!("w{w}"), batch)))
        .collect();
    let mut done = 0;
    for t in tasks {
        done += t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (p1, g1) = (cpu_seconds(platform.child.id(), false), postgres_cpu(postmaster));
    ensure!(done == rows as u64, "drained {done} of {rows}");
    let per_k = |cpu: f64| cpu / (rows as f64 / 1000.0);
    println!(
        "W1-pull batch {batch:>5}, {workers} workers: {rows} rows in {elapsed:.2} s = {:.0} rows/s; CPU-s per 1,000 rows: platform {:.4}, PostgreSQL {:.4} (discovery enqueued them in {:.2} s)",
        rows as f64 / elapsed,
        per_k(p1 - p0),
        per_k(g1 - g0),
        enqueue.as_secs_f64()
    );
    Ok(rows as f64 / elapsed)
}

/// Runs the PgQueuer reference and prints its line (or why it was not
/// measured); returns its rate in jobs/s when it ran.
pub(crate) fn pgqueuer_line(db_url: &str, postmaster: u32, rows: usize, batch: usize) -> Option<f64> {
    let per_k = |cpu: f64| cpu / (rows as f64 / 1000.0);
    match pgqueuer(db_url, postmaster, rows, batch) {
        Ok((secs, worker_cpu, pg_cpu)) => {
            println!(
                "PgQueuer batch {batch:>5}, 1 worker:  {rows} jobs in {secs:.2} s = {:.0} jobs/s; CPU-s per 1,000 jobs: worker {:.4}, PostgreSQL {:.4}",
                rows as f64 / secs,
                per_k(worker_cpu),
                per_k(pg_cpu)
            );
            Some(rows as f64 / secs)
        }
        Err(e) => {
            println!("PgQueuer batch {batch:>5}: not measured: {e:#}");
            None
        }
    }
}

/// Runs the PgQueuer reference on the same server: enqueue, then drain.
/// Returns (seconds, worker CPU-s, PostgreSQL CPU-s) of the drain.
fn pgqueuer(db_url: &str, postmaster: u32, rows: usize, batch: usize) -> Result<(f64, f64, f64)> {
    let python = layer_tests::python_with_hevlayer()?;
    let ok = Command::new(&python).args(["-c", "import pgqueuer, asyncpg"]).output()?.status.success();
    if !ok {
        bail!("PgQueuer is not installed: {} -m pip install pgqueuer==1.6.0 asyncpg", python.display());
    }
    let script = layer_tests::workspace_dir().join("tests/bench/pgqueuer_drain.py");
    // asyncpg's DSN for a Unix socket: host= names the socket directory.
    let socket_dir = db_url.split_once("?host=").map(|(_, d)| d.to_string()).context("socket dir")?;
    let url = format!("postgresql://layer@/layer?host={socket_dir}&port=5432");
    let out = Command::new(&python).arg(&script).args(["enqueue", &url, &rows.to_string()]).output()?;
    ensure!(out.status.success(), "enqueue failed: {}", String::from_utf8_lossy(&out.stderr));
    let g0 = postgres_cpu(postmaster);
    let out = Command::new(&python).arg(&script).args(["drain", &url, &batch.to_string()]).output()?;
    let g1 = postgres_cpu(postmaster);
    ensure!(out.status.success(), "drain failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace().map(|x| x.parse::<f64>());
    let secs = parts.next().context("seconds")??;
    let cpu = parts.next().context("cpu")??;
    Ok((secs, cpu, g1 - g0))
}

pub async fn discovery(rows: usize, new: usize, repeat: usize) -> Result<()> {
    use layer_platform::engine::discovery::sweep_function;
    use layer_platform::functions::store::{Author, FunctionInput, upsert};
    use layer_protocol::resource::{Resource, validate_document};

    let dir = std::env::temp_dir().join(format!("layer-bench-disc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pg = EmbeddedPostgres::start(EmbeddedOptions { data_dir: dir.clone(), port: 5432, ephemeral: false }).await?;
    let result = async {
        let pool = layer_platform::db::connect(pg.options("layer"), 4).await?;
        layer_platform::db::migrate(&pool).await?;
        let doc = json!({"apiVersion": "hevlayer.com/v1alpha1", "kind": "Function", "metadata": {"name": "disc"},
            "spec": {"targetNamespaces": ["big"], "inputs": ["title"], "filter": ["kind", "Eq", "product"], "worker": {"dispatch": "pull"}}});
        let Ok(Resource::Function { spec, .. }) = validate_document(&doc) else { bail!("bad function") };
        let mut conn = pool.acquire().await?;
        let input = FunctionInput { id: "disc".into(), k8s_namespace: "layer".into(), labels: None, spec: *spec, paused: None };
        let (udf, _) = upsert(&mut conn, &input, Author::INTERNAL, false).await?;
        drop(conn);

        let t = Instant::now();
        sqlx::query("INSERT INTO namespaces (name, write_seq, row_count) VALUES ('big', 1, $1)").bind(rows as i64).execute(&pool).await?;
        sqlx::query(
            "INSERT INTO rows (namespace, id, attributes, write_seq)
             SELECT 'big', 'r' || g, jsonb_build_object('title', 'product ' || g, 'kind', 'product', '_hevlayer_udf_disc_v', 'v1'), 1
             FROM generate_series(1, $1) g",
        )
        .bind(rows as i64)
        .execute(&pool)
        .await?;
        sqlx::query("ANALYZE rows").execute(&pool).await?;
        eprintln!("loaded {rows} complete rows in {:.1} s", t.elapsed().as_secs_f64());

        let ns = vec!["big".to_string()];
        let t = Instant::now();
        let enqueued = sweep_function(&pool, &udf, &ns, &tokio::sync::Notify::new()).await?;
        println!("discovery: first sweep over {rows} complete rows: {:.0} ms, {enqueued} enqueued", t.elapsed().as_secs_f64() * 1e3);
        ensure!(enqueued == 0);

        let mut times = Vec::new();
        for round in 0..repeat {
            let docs: Vec<Value> =
                (0..new).map(|i| json!({"id": format!("new-{round}-{i}"), "title": "fresh", "kind": "product"})).collect();
            let req: layer_protocol::namespace::WriteRequest = serde_json::from_value(json!({"upsert_rows": docs}))?;
            layer_platform::rows::store::write(&pool, "big", layer_platform::rows::plan::plan(req)?, None, &layer_platform::rows::store::Writer { key_id: "bench", worker_of: None }).await?;
            let t = Instant::now();
            let enqueued = sweep_function(&pool, &udf, &ns, &tokio::sync::Notify::new()).await?;
            times.push(t.elapsed());
            ensure!(enqueued == new as u64, "enqueued {enqueued}, expected {new}");
        }
        times.sort();
        println!(
            "discovery: incremental sweep of {new} new rows in a namespace of {rows}: median {:.1} ms, max {:.1} ms over {repeat} sweeps (wall time of the sweep's statements over the Unix socket)",
            times[times.len() / 2].as_secs_f64() * 1e3,
            times.last().unwrap().as_secs_f64() * 1e3
        );
        pool.close().await;
        anyhow::Ok(())
    }
    .await;
    pg.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    result
}
