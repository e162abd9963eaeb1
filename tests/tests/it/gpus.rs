//! GPU binding on a runner with simulated GPUs (no GPU exists here): whole
//! GPUs are bound exclusively by UUID, released when the worker stops, and
//! a GPU that answers with errors is cordoned and its batch reissued.
//!
//! The workers are real processes (tests/python/push_worker.py). Each takes
//! an exclusive file lock named after every GPU in its
//! `CUDA_VISIBLE_DEVICES` for as long as it lives, and reports in every
//! result whether another live worker held it: sharing cannot go unseen.

use std::sync::Arc;
use std::time::{Duration, Instant};

use layer_runner::inventory::SimulatedGpus;
use layer_tests::{TestPlatform, TestRunner, workspace_dir};
use reqwest::Method;
use serde_json::{Value, json};

fn spec(namespace: &str, compute_class: &str, lock_dir: &std::path::Path, extra_env: Value) -> Value {
    let script = workspace_dir().join("tests/python/push_worker.py");
    let mut env = json!({"GPU_LOCK_DIR": lock_dir, "SLOW_SECONDS": "0.1"});
    env.as_object_mut().unwrap().extend(extra_env.as_object().unwrap().clone());
    json!({
        "targetNamespaces": [namespace],
        "inputs": ["id", "mode"],
        "worker": {"dispatch": "push", "command": ["python3", script], "computeClass": compute_class,
                   "batchSize": 4, "timeoutSeconds": 30, "env": env},
        "scaling": {"replicas": {"min": 0, "max": 2}},
        "retry": {"maxAttempts": 1, "initialBackoffSeconds": 0, "maxBackoffSeconds": 0},
        "schedule": {"leaseSeconds": 60}
    })
}

async fn status(p: &TestPlatform, f: &str) -> anyhow::Result<Value> {
    Ok(p.call(Method::GET, &format!("/v2/udfs/{f}/status"), None).await?.1)
}

async fn wait_completed(p: &TestPlatform, f: &str, n: i64, within: Duration) -> anyhow::Result<Value> {
    let start = Instant::now();
    loop {
        let st = status(p, f).await?;
        if st["counts"]["completed"].as_i64() == Some(n) {
            return Ok(st);
        }
        anyhow::ensure!(st["failed_count"] == 0, "rows failed: {:?}", p.failed_rows(f).await?);
        if start.elapsed() > within {
            let (_, runners) = p.call(Method::GET, "/v2/runners", None).await?;
            let batches: Vec<(i64, i32, String, String)> =
                sqlx::query_as("SELECT id, revision, runner_id, state FROM batches ORDER BY id")
                    .fetch_all(&p.pool)
                    .await?;
            anyhow::bail!("{f}: not {n} completed after {within:?}: {st}\nrunners: {runners}\nbatches: {batches:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn runner_status(addr: std::net::SocketAddr) -> anyhow::Result<Value> {
    Ok(reqwest::get(format!("http://{addr}/v1/status")).await?.json().await?)
}

/// A directory for the workers' GPU lock files, removed on drop.
struct LockDir(std::path::PathBuf);

impl LockDir {
    fn new() -> anyhow::Result<LockDir> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        let dir = std::env::temp_dir().join(format!("layer-gpu-locks-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(LockDir(dir))
    }
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for LockDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn rows(prefix: &str, n: usize) -> Value {
    json!((0..n).map(|i| json!({"id": format!("{prefix}{i}"), "mode": "slow"})).collect::<Vec<_>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gpu_functions_on_one_gpu_never_share_it() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let locks = LockDir::new()?;
    // A long idle window: a GPU only changes hands because the idle holder
    // of another Function is stopped for it.
    let runner = TestRunner::start(&p, |c| {
        c.gpus = Arc::new(SimulatedGpus::new(1));
        c.idle_timeout = Duration::from_secs(300);
    })
    .await?;
    p.upsert_rows("gpu-a", rows("a", 24)).await?;
    p.upsert_rows("gpu-b", rows("b", 24)).await?;
    p.upsert_rows("cpu-c", rows("c", 8)).await?;
    p.apply_function("gpu-a", spec("gpu-a", "gpu", locks.path(), json!({}))).await?;
    p.apply_function("gpu-b", spec("gpu-b", "gpu", locks.path(), json!({}))).await?;
    p.apply_function("cpu-c", spec("cpu-c", "cpu", locks.path(), json!({}))).await?;
    for (f, n) in [("gpu-a", 24), ("gpu-b", 24), ("cpu-c", 8)] {
        wait_completed(&p, f, n, Duration::from_secs(120)).await?;
    }
    for (ns, prefix, n, gpus) in
        [("gpu-a", "a", 24, "GPU-simulated-0"), ("gpu-b", "b", 24, "GPU-simulated-0"), ("cpu-c", "c", 8, "")]
    {
        for i in 0..n {
            let (_, d) = p.call(Method::GET, &format!("/v2/namespaces/{ns}/documents/{prefix}{i}"), None).await?;
            let a = &d["attributes"];
            assert_eq!(a["gpus"], gpus, "{ns}/{prefix}{i} ran with CUDA_VISIBLE_DEVICES {}", a["gpus"]);
            if !gpus.is_empty() {
                assert_eq!(a["gpu_shared"], false, "{ns}/{prefix}{i}: another live worker held the GPU");
            }
        }
    }
    // One GPU, bound to at most one worker; the runner shows who has it.
    let st = runner_status(runner.addr).await?;
    let gpus = st["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 1, "{st}");
    let holders: Vec<&Value> = st["workers"].as_array().unwrap().iter().filter(|w| w["gpus"] != Value::Null).collect();
    assert!(holders.len() <= 1, "{st}");
    if let Some(w) = holders.first() {
        assert_eq!(gpus[0]["state"], "bound", "{st}");
        assert_eq!(w["gpus"], json!(["GPU-simulated-0"]), "{st}");
    }
    runner.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_gpu_is_cordoned_and_its_batch_reissued_for_free() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let locks = LockDir::new()?;
    let sick = Arc::new(SimulatedGpus::new(1));
    let runner = TestRunner::start(&p, |c| c.gpus = sick.clone()).await?;
    p.upsert_rows("gpu-a", rows("a", 4)).await?;
    // Each batch takes 20 s (under timeoutSeconds): long enough to fail the
    // GPU under it.
    let env = json!({"SLOW_SECONDS": "20"});
    p.apply_function("gpu-a", spec("gpu-a", "gpu", locks.path(), env.clone())).await?;
    let start = Instant::now();
    while runner_status(runner.addr).await?["workers"]
        .as_array()
        .is_none_or(|w| !w.iter().any(|w| w["state"] == "busy"))
    {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "no busy worker");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sick.fail("GPU-simulated-0", "GPU has fallen off the bus");
    // The next sample (each heartbeat) cordons it; the batch comes back
    // without spending an attempt (maxAttempts is 1: a spent attempt would
    // fail the rows).
    let start = Instant::now();
    let runners = loop {
        let (_, list) = p.call(Method::GET, "/v2/runners", None).await?;
        let st = status(&p, "gpu-a").await?;
        let gpu = &list["runners"][0]["load"]["gpus"][0];
        if gpu["state"] == "cordoned" && st["pending_count"] == 4 {
            break list;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "not cordoned and reissued: {list} {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(runners["runners"][0]["load"]["gpus"][0]["error"], "GPU has fallen off the bus");
    assert!(p.failed_rows("gpu-a").await?.is_empty());
    // The runner's metrics show the cordon, per GPU.
    let metrics = reqwest::get(format!("http://{}/metrics", runner.addr)).await?.text().await?;
    assert!(metrics.contains("layer_runner_gpu_cordoned{gpu_uuid=\"GPU-simulated-0\"} 1\n"), "{metrics}");
    assert!(metrics.contains("layer_runner_gpu_memory_total_bytes{gpu_uuid=\"GPU-simulated-0\"} "), "{metrics}");
    layer_tests::otlp::promtool_accepts(&metrics, "runner")?;
    // Nothing can take the work now, and the Function's status says why.
    let start = Instant::now();
    loop {
        let st = status(&p, "gpu-a").await?;
        if st["conditions"][0]["reason"] == "NoRunner" {
            let m = st["conditions"][0]["message"].as_str().unwrap_or_default();
            assert!(m.contains("no active runner has 1 usable GPUs"), "{st}");
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "no condition: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A runner with a healthy GPU finishes the rows (quickly: the slow
    // revision is replaced first).
    p.apply_function("gpu-a", spec("gpu-a", "gpu", locks.path(), json!({}))).await?;
    let healthy = TestRunner::start(&p, |c| {
        c.name = "healthy".into();
        c.gpus = Arc::new(SimulatedGpus::new(1));
    })
    .await?;
    let st = wait_completed(&p, "gpu-a", 4, Duration::from_secs(60)).await?;
    assert!(st.get("conditions").is_none(), "{st}");
    healthy.stop().await?;
    runner.stop().await?;
    Ok(())
}
