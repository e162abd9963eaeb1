//! W1-push (drain through platform → runner → Rust echo worker, beside the
//! pull path in the same run) and W2 (write-to-marker latency at idle).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use layer_platform::embedded::{EmbeddedOptions, EmbeddedPostgres};
use serde_json::{Value, json};

use crate::drain::{
    KEY, Platform, call, cpu_seconds, fill, layer_binary, postgres_cpu, postmaster_pid, start_platform, status,
};

pub(crate) struct Runner(Child);

impl Drop for Runner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn echo_binary() -> Result<PathBuf> {
    let bin = std::env::current_exe()?.parent().context("exe dir")?.join("layer-echo-worker");
    if !bin.exists() {
        bail!("{} is missing: build it with `cargo build --release -p layer-echo-worker`", bin.display());
    }
    Ok(bin)
}

pub(crate) async fn start_runner(http: &reqwest::Client, platform: &Platform, slots: u32) -> Result<Runner> {
    start_runner_with(http, platform, slots, &[]).await
}

async fn start_runner_with(http: &reqwest::Client, platform: &Platform, slots: u32, extra: &[&str]) -> Result<Runner> {
    let child = Command::new(layer_binary()?)
        .args(["runner", "--platform", &platform.url, "--listen", "127.0.0.1:0", "--slots", &slots.to_string()])
        .arg("--allow-commands")
        .args(extra)
        .env("LAYER_API_KEY", KEY)
        .env("LAYER_LOG", crate::child_log())
        .stdout(Stdio::null())
        .spawn()?;
    let start = Instant::now();
    loop {
        let list = call(http, reqwest::Method::GET, format!("{}/v2/runners", platform.url), json!(null)).await;
        if list.is_ok_and(|l| l["runners"].as_array().is_some_and(|r| !r.is_empty())) {
            return Ok(Runner(child));
        }
        ensure!(start.elapsed() < Duration::from_secs(30), "the runner did not register");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU seconds of a process and its live children.
fn tree_cpu(pid: u32) -> f64 {
    let mut children = 0.0;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)).and_then(|p| p.parse().ok());
        if ppid == Some(pid) {
            children += cpu_seconds(child, false);
        }
    }
    cpu_seconds(pid, false) + children
}

pub(crate) async fn stop_runner(http: &reqwest::Client, platform: &Platform, runner: Runner) -> Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(runner.0.id() as i32), nix::sys::signal::Signal::SIGTERM)?;
    let start = Instant::now();
    loop {
        let list = call(http, reqwest::Method::GET, format!("{}/v2/runners", platform.url), json!(null)).await?;
        if list["runners"].as_array().is_some_and(Vec::is_empty) {
            break;
        }
        ensure!(start.elapsed() < Duration::from_secs(30), "the runner did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(runner);
    Ok(())
}

pub(crate) async fn with_platform<F, Fut>(tag: &str, body: F) -> Result<()>
where
    F: FnOnce(reqwest::Client, Platform, u32, String) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    let dir = std::env::temp_dir().join(format!("layer-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let pg = EmbeddedPostgres::start(EmbeddedOptions { data_dir: dir.clone(), port: 5432, ephemeral: false }).await?;
    let result = async {
        let platform = start_platform(&pg).await?;
        let postmaster = postmaster_pid(&dir)?;
        body(reqwest::Client::new(), platform, postmaster, pg.url("layer")).await
    }
    .await;
    pg.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn push_function(name: &str, ns: &str, batch: usize, echo: &PathBuf, min: u32, triggers: Value) -> Value {
    json!({"apiVersion": "hevlayer.com/v1alpha1", "kind": "Function", "metadata": {"name": name},
        "spec": {"targetNamespaces": [ns], "inputs": ["id", "title"], "triggers": triggers,
                 "worker": {"dispatch": "push", "command": [echo], "batchSize": batch, "timeoutSeconds": 60},
                 "schedule": {"maxInFlightBatches": 8},
                 "scaling": {"replicas": {"min": min, "max": 4}}}})
}

/// W1-push: for each batch size, the ceiling (the writeback statement
/// alone, one and two backends), the pull drain, the push drain and
/// PgQueuer's drain of `rows`, on the same platform and PostgreSQL, then
/// each one's ratio to the two-backend ceiling and to PgQueuer.
pub async fn w1_push(rows: usize, batches: &[usize], workers: usize, slots: u32) -> Result<()> {
    let echo = echo_binary()?;
    with_platform("push", |http, platform, postmaster, db_url| async move {
        for &batch in batches {
            // Each run writes rows as freshly filled as W1's, in a namespace of its own.
            let mut ceilings = Vec::new();
            for backends in [1, 2] {
                let ns = format!("ceiling-{batch}-{backends}");
                fill(&http, &platform.url, &ns, rows).await?;
                let c = crate::ceiling::writeback_alone(&db_url, postmaster, &ns, batch, backends).await?;
                println!(
                    "ceiling batch {batch:>5}, {backends} backend{}: the writeback statement alone, {rows} rows = {:.0} rows/s; CPU-s per 1,000 rows: PostgreSQL {:.4}",
                    if backends == 1 { "" } else { "s" },
                    c.rate,
                    c.pg_cpu_per_k
                );
                ceilings.push(c.rate);
            }
            let pull = crate::drain::pull_once(&http, &platform, postmaster, rows, batch, workers).await?;
            // Enqueue everything with no runner up, then start one and time
            // the drain from there.
            let ns = format!("push-{batch}");
            let f = format!("echo-{batch}");
            fill(&http, &platform.url, &ns, rows).await?;
            let doc = push_function(&f, &ns, batch, &echo, 1, json!(["discovery"]));
            call(&http, reqwest::Method::POST, format!("{}/v2/apply", platform.url), json!({"documents": [doc]})).await?;
            let start = Instant::now();
            while status(&http, &platform.url, &f).await?["pending_count"].as_u64() != Some(rows as u64) {
                ensure!(start.elapsed() < Duration::from_secs(120), "discovery did not enqueue {rows} rows");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let (p0, g0) = (cpu_seconds(platform.child.id(), false), postgres_cpu(postmaster));
            let start = Instant::now();
            let runner = start_runner(&http, &platform, slots).await?;
            let runner_pid = runner.0.id();
            let st = loop {
                let st = status(&http, &platform.url, &f).await?;
                if st["pending_count"] == 0 && st["processing_count"] == 0 {
                    break st;
                }
                ensure!(start.elapsed() < Duration::from_secs(600), "not drained: {st}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            let elapsed = start.elapsed().as_secs_f64();
            let (p1, g1) = (cpu_seconds(platform.child.id(), false), postgres_cpu(postmaster));
            let runner_own = cpu_seconds(runner_pid, false);
            let runner_tree = tree_cpu(runner_pid);
            ensure!(st["counts"]["completed"] == rows, "completed {} of {rows}: {st}", st["counts"]["completed"]);
            let per_k = |cpu: f64| cpu / (rows as f64 / 1000.0);
            let rate = rows as f64 / elapsed;
            println!(
                "W1-push batch {batch:>5}, 1 runner ({slots} slots): {rows} rows in {elapsed:.2} s = {rate:.0} rows/s ({:.2}x pull); CPU-s per 1,000 rows: platform {:.4}, runner {:.4}, workers {:.4}, PostgreSQL {:.4}",
                rate / pull,
                per_k(p1 - p0),
                per_k(runner_own),
                per_k(runner_tree - runner_own),
                per_k(g1 - g0),
            );
            stop_runner(&http, &platform, runner).await?;
            let pgq = crate::drain::pgqueuer_line(&db_url, postmaster, rows, batch);
            let ceiling = ceilings[1];
            let vs = |r: f64| match pgq {
                Some(q) => format!("{:.2}x of the ceiling, {:.2}x PgQueuer", r / ceiling, r / q),
                None => format!("{:.2}x of the ceiling", r / ceiling),
            };
            println!(
                "ratios batch {batch:>5}: W1-pull {}; W1-push {}{}",
                vs(pull),
                vs(rate),
                pgq.map(|q| format!("; PgQueuer {:.2}x of the ceiling", q / ceiling)).unwrap_or_default()
            );
        }
        Ok(())
    })
    .await
}

/// W2: one row written through the API (the `write` trigger) until its
/// marker is set, `samples` times, with a warm worker and nothing else
/// running.
pub async fn w2(samples: usize) -> Result<()> {
    let echo = echo_binary()?;
    with_platform("w2", |http, platform, _, db_url| async move {
        let runner = start_runner(&http, &platform, 2).await?;
        // The default batch size (32): a one-row claim comes up short, so
        // the dispatcher knows the queue is empty without claiming again.
        let doc = push_function("latency", "latency", 32, &echo, 1, json!(["write"]));
        call(&http, reqwest::Method::POST, format!("{}/v2/apply", platform.url), json!({"documents": [doc]})).await?;
        let pool = layer_platform::db::connect(layer_platform::db::parse_url(&db_url)?, 1).await?;
        let mut times = Vec::with_capacity(samples);
        for i in 0..samples + 5 {
            let took = write_to_marker(&http, &platform, &pool, "latency", "_hevlayer_udf_latency_v", &format!("r{i}"))
                .await?;
            // The first few warm the worker and the connections.
            if i >= 5 {
                times.push(took);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        times.sort();
        let p = |q: f64| crate::percentile(&times, q).as_secs_f64() * 1000.0;
        println!(
            "W2 write-to-marker, {samples} single-row writes at idle: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            p(0.50),
            p(0.90),
            p(0.99),
            times.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        );
        stop_runner(&http, &platform, runner).await?;
        Ok(())
    })
    .await
}

/// Writes one row through the API and waits for its marker; returns the
/// time taken. The marker is polled in the database (cheaper than the API,
/// so the polling disturbs the measurement less), every 200 µs with a
/// blocking sleep: tokio's timers tick in whole milliseconds, which would
/// round every sample up.
async fn write_to_marker(
    http: &reqwest::Client,
    platform: &Platform,
    pool: &sqlx::PgPool,
    ns: &str,
    marker: &str,
    id: &str,
) -> Result<Duration> {
    let t = Instant::now();
    let body = json!({"upsert_rows": [{"id": id, "title": "x"}]});
    call(http, reqwest::Method::POST, format!("{}/v2/namespaces/{ns}", platform.url), body).await?;
    loop {
        let done: bool = sqlx::query_scalar("SELECT attributes ? $3 FROM rows WHERE namespace = $1 AND id = $2")
            .bind(ns)
            .bind(id)
            .bind(marker)
            .fetch_one(pool)
            .await?;
        if done {
            return Ok(t.elapsed());
        }
        ensure!(t.elapsed() < Duration::from_secs(60), "row {id} never completed");
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// W6: time from a row written (the `write` trigger) to its marker, with
/// the worker container cold (none running: created, started and checked
/// on the way) and warm, plus the container's own start measured alone
/// (create, start, first `/healthz` answer) with the runner's driver and no
/// platform. Needs the image `layer/echo-rust:dev` (deploy/images/build.sh).
pub async fn w6(samples: usize) -> Result<()> {
    use layer_runner::pool::container::{ContainerWorker, Engine};
    let image = "layer/echo-rust:dev";
    let engine = Engine::connect("layer-bench-w6").await.map_err(anyhow::Error::msg)?;
    ensure!(
        engine.docker.inspect_image(image).await.is_ok(),
        "{image} is missing: build it with deploy/images/build.sh echo"
    );
    // The container alone.
    let plan = layer_protocol::runner::WorkerPlan {
        command: None,
        image: Some(image.into()),
        url: None,
        port: None,
        env: Default::default(),
        batch_size: 32,
        timeout_seconds: 30,
        lease_seconds: 120,
        replicas_min: 0,
        replicas_max: 1,
        cpu: None,
        memory_bytes: None,
        ephemeral_disk_bytes: None,
        gpus: 0,
        protocol: Default::default(),
    };
    let env = layer_runner::pool::process::WorkerEnv { udf_id: "w6".into(), ..Default::default() };
    let http = reqwest::Client::new();
    let mut alone = Vec::with_capacity(samples);
    for i in 0..samples {
        let t = Instant::now();
        let name = format!("w6-alone-{i}");
        let launch = layer_runner::pool::Launch {
            log: layer_runner::logs::WorkerLog::detached(&name),
            name,
            gpus: Default::default(),
        };
        let w = ContainerWorker::start(&engine, &plan, &env, launch, &http, Duration::from_secs(30))
            .await
            .map_err(anyhow::Error::msg)?;
        alone.push(t.elapsed());
        w.kill();
    }
    engine.stopping.close();
    engine.stopping.wait().await;

    with_platform("w6", |http, platform, _, db_url| async move {
        // Idle containers go after 1 s, so a write after 3 s finds none.
        let runner = start_runner_with(&http, &platform, 2, &["--idle-timeout", "1"]).await?;
        let doc = json!({"apiVersion": "hevlayer.com/v1alpha1", "kind": "Function", "metadata": {"name": "w6"},
            "spec": {"targetNamespaces": ["w6"], "inputs": ["id", "title"], "triggers": ["write"],
                     "worker": {"dispatch": "push", "image": image, "timeoutSeconds": 30},
                     "scaling": {"replicas": {"min": 0, "max": 1}}}});
        call(&http, reqwest::Method::POST, format!("{}/v2/apply", platform.url), json!({"documents": [doc]})).await?;
        let pool = layer_platform::db::connect(layer_platform::db::parse_url(&db_url)?, 1).await?;
        let marker = "_hevlayer_udf_w6_v";
        let (mut cold, mut warm) = (Vec::new(), Vec::new());
        for i in 0..samples {
            // Wait until the runner has no container of it.
            let start = Instant::now();
            loop {
                let list = call(&http, reqwest::Method::GET, format!("{}/v2/runners", platform.url), json!(null)).await?;
                if list["runners"][0]["load"]["workers"].as_array().is_some_and(Vec::is_empty) {
                    break;
                }
                ensure!(start.elapsed() < Duration::from_secs(30), "the idle container stayed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            cold.push(write_to_marker(&http, &platform, &pool, "w6", marker, &format!("c{i}")).await?);
            // Now warm.
            for j in 0..5 {
                tokio::time::sleep(Duration::from_millis(20)).await;
                warm.push(write_to_marker(&http, &platform, &pool, "w6", marker, &format!("w{i}-{j}")).await?);
            }
            tokio::time::sleep(Duration::from_millis(2500)).await;
        }
        for v in [&mut cold, &mut warm, &mut alone] {
            v.sort();
        }
        let p50 = |v: &[Duration]| ms(crate::percentile(v, 0.5));
        let max = |v: &[Duration]| v.last().copied().map_or(0.0, ms);
        println!(
            "W6 cold container, write to marker ({samples} samples): p50 {:.1} ms, max {:.1} ms",
            p50(&cold),
            max(&cold)
        );
        println!(
            "W6 warm container, write to marker ({} samples): p50 {:.1} ms, max {:.1} ms",
            warm.len(),
            p50(&warm),
            max(&warm)
        );
        println!(
            "W6 the container alone: create, start, first /healthz 200 ({samples} samples): p50 {:.1} ms, max {:.1} ms",
            p50(&alone),
            max(&alone)
        );
        println!(
            "W6 cold minus warm minus the container alone (the platform's and runner's own cold-path overhead): {:.1} ms",
            p50(&cold) - p50(&warm) - p50(&alone)
        );
        stop_runner(&http, &platform, runner).await?;
        Ok(())
    })
    .await
}
