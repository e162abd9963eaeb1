//! Lifecycle promises through real worker processes built on the public
//! `hevlayer` client: TransientError twice then success (3 attempts),
//! PermanentError fails at once, reset-failed, pause stops claims, and a
//! worker that claims and vanishes loses its rows to the next worker.

use std::time::{Duration, Instant};

use layer_tests::{TestPlatform, python_with_hevlayer, workspace_dir};
use reqwest::Method;
use serde_json::{Value, json};

fn worker(p: &TestPlatform, calls: &std::path::Path, vanish: bool) -> anyhow::Result<tokio::process::Child> {
    Ok(tokio::process::Command::new(python_with_hevlayer()?)
        .arg(workspace_dir().join("tests/python/lifecycle_worker.py"))
        .env("HEVLAYER_BASE_URL", &p.url)
        .env("LAYER_GATEWAY_API_KEY", &p.admin_key)
        .env("CALLS_FILE", calls)
        .env("VANISH", if vanish { "1" } else { "0" })
        .env_remove("HEVLAYER_API_KEY")
        .kill_on_drop(true)
        .spawn()?)
}

async fn status(p: &TestPlatform) -> anyhow::Result<Value> {
    Ok(p.call(Method::GET, "/v2/udfs/lifecycle/status", None).await?.1)
}

async fn wait_for(p: &TestPlatform, what: &str, done: impl Fn(&Value) -> bool) -> anyhow::Result<Value> {
    let start = Instant::now();
    loop {
        let st = status(p).await?;
        if done(&st) {
            return Ok(st);
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(60), "waiting for {what}: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn calls_of(path: &std::path::Path, id: &str) -> usize {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter(|l| l.split(' ').next() == Some(id)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_workers_retry_fail_pause_and_vanish() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let calls = std::env::temp_dir().join(format!("layer-lifecycle-calls-{}", std::process::id()));
    let _ = std::fs::remove_file(&calls);
    let rows = json!([{"id": "flaky", "mode": "flaky"}, {"id": "poison", "mode": "poison"}, {"id": "plain"}]);
    p.call(Method::POST, "/v2/namespaces/jobs", Some(json!({"upsert_rows": rows}))).await?;
    let doc = json!({"apiVersion": "hevlayer.com/v1alpha1", "kind": "Function", "metadata": {"name": "lifecycle"},
        "spec": {"targetNamespaces": ["jobs"], "inputs": ["id", "mode"], "triggers": ["discovery", "write"],
                 "worker": {"dispatch": "pull", "batchSize": 10},
                 "retry": {"maxAttempts": 5, "initialBackoffSeconds": 0, "maxBackoffSeconds": 0}}});
    let (s, r) = p.call(Method::POST, "/v2/apply", Some(json!({"documents": [doc]}))).await?;
    assert_eq!(s, 200, "{r}");

    let mut w = worker(&p, &calls, false)?;
    let st = wait_for(&p, "flaky and plain done, poison failed", |st| {
        st["counts"]["completed"] == 2 && st["failed_count"] == 1 && st["pending_count"] == 0
    })
    .await?;
    assert_eq!(calls_of(&calls, "flaky"), 3, "TransientError twice, then success: {st}");
    assert_eq!(calls_of(&calls, "poison"), 1, "PermanentError is not retried");
    let (_, d) = p.call(Method::GET, "/v2/namespaces/jobs/documents/flaky", None).await?;
    assert_eq!(d["attributes"]["result"], "done after 3");
    assert_eq!(d["attributes"]["_hevlayer_udf_lifecycle_v"], "v1");
    let err: String =
        sqlx::query_scalar("SELECT last_error FROM work_items WHERE row_id = 'poison'").fetch_one(&p.pool).await?;
    assert_eq!(err, "poison: cannot be done");

    // reset-failed brings the poison row back; it fails again at once.
    let (_, r) = p.call(Method::POST, "/v2/udfs/lifecycle/reset-failed", None).await?;
    assert_eq!(r["updated"], 1);
    wait_for(&p, "poison failed again", |st| st["failed_count"] == 1 && st["pending_count"] == 0).await?;
    assert_eq!(calls_of(&calls, "poison"), 2);

    // Paused: a new row waits, untouched by the running worker.
    p.call(Method::POST, "/v2/udfs/lifecycle/pause", None).await?;
    p.call(Method::POST, "/v2/namespaces/jobs", Some(json!({"upsert_rows": [{"id": "later"}]}))).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(calls_of(&calls, "later"), 0, "a paused Function hands out nothing");
    p.call(Method::POST, "/v2/udfs/lifecycle/resume", None).await?;
    p.call(Method::POST, "/v2/udfs/lifecycle/discover", None).await?;
    wait_for(&p, "later done", |st| st["counts"]["completed"] == 3).await?;
    w.kill().await?;

    // A worker that claims and vanishes: after its 1 s lease the rows go to
    // the next worker, and each is written once.
    p.call(Method::POST, "/v2/namespaces/jobs", Some(json!({"upsert_rows": [{"id": "v1"}, {"id": "v2"}]}))).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let out = worker(&p, &calls, true)?.wait_with_output().await?;
    assert!(out.status.success());
    let st = status(&p).await?;
    assert_eq!(st["processing_count"], 2, "the vanished worker holds both: {st}");
    let mut w = worker(&p, &calls, false)?;
    let st = wait_for(&p, "vanished rows done", |st| st["counts"]["completed"] == 5).await?;
    assert_eq!(st["counts"]["leases_expired"], 2, "{st}");
    w.kill().await?;
    let _ = std::fs::remove_file(&calls);
    Ok(())
}
