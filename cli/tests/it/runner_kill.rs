//! `layer runner` processes against a platform: a runner killed with
//! SIGKILL mid-batch loses nothing; its batches are reissued to the other
//! runner as free retries and every row is written exactly once; and it
//! leaves no worker process behind.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use layer_tests::{TestPlatform, workspace_dir};
use reqwest::Method;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_layer");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `layer runner --allow-commands`.
fn runner(p: &TestPlatform, name: &str) -> Proc {
    runner_with(p, name, |c| {
        c.arg("--allow-commands");
    })
}

fn runner_with(p: &TestPlatform, name: &str, configure: impl FnOnce(&mut Command)) -> Proc {
    let mut cmd = Command::new(BIN);
    cmd.args(["runner", "--platform", &p.url, "--listen", "127.0.0.1:0", "--slots", "2", "--name", name])
        .env("LAYER_API_KEY", &p.admin_key)
        .env_remove("LAYER_RUNNER_ALLOW_COMMANDS")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    configure(&mut cmd);
    Proc(cmd.spawn().expect("start layer runner"))
}

async fn runners(p: &TestPlatform) -> anyhow::Result<Vec<Value>> {
    let (_, list) = p.call(Method::GET, "/v2/runners", None).await?;
    Ok(list["runners"].as_array().cloned().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_killed_mid_batch_loses_nothing_and_writes_each_row_once() -> anyhow::Result<()> {
    const N: usize = 40;
    let p = TestPlatform::start().await?;
    let mut a = runner(&p, "a");
    let _b = runner(&p, "b");
    let start = Instant::now();
    while runners(&p).await?.len() < 2 {
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "runners did not register");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a_id = runners(&p).await?.iter().find(|r| r["name"] == "a").unwrap()["id"].as_str().unwrap().to_string();
    let rows: Vec<Value> = (0..N).map(|i| json!({"id": format!("k{i:02}"), "mode": "slow"})).collect();
    let (s, r) = p.call(Method::POST, "/v2/namespaces/jobs", Some(json!({"upsert_rows": rows}))).await?;
    anyhow::ensure!(s == 200, "{r}");
    let script = workspace_dir().join("tests/python/push_worker.py");
    let spec = json!({
        "targetNamespaces": ["jobs"], "inputs": ["id", "mode"],
        "worker": {"dispatch": "push", "command": ["python3", script], "batchSize": 2, "timeoutSeconds": 5,
                   "env": {"SLOW_SECONDS": "0.4"}},
        // One attempt: a kill that spent an attempt would fail rows.
        "retry": {"maxAttempts": 1},
        "schedule": {"leaseSeconds": 5},
        "scaling": {"replicas": {"min": 0, "max": 2}}
    });
    let doc = json!({"apiVersion": "hevlayer.com/v1alpha1", "kind": "Function", "metadata": {"name": "killme"}, "spec": spec});
    let (s, r) = p.call(Method::POST, "/v2/apply", Some(json!({"documents": [doc]}))).await?;
    anyhow::ensure!(s == 200, "{r}");
    // Kill runner a while it holds a batch (its own status says so: the
    // batch record commits before the batch is sent).
    let a_url =
        runners(&p).await?.into_iter().find(|r| r["id"] == a_id.as_str()).context("runner a listed")?["address"]
            .as_str()
            .context("runner a's address")?
            .to_string();
    let start = Instant::now();
    loop {
        let st: Value = reqwest::get(format!("{a_url}/v1/status")).await?.json().await?;
        if st["batches"].as_array().is_some_and(|b| !b.is_empty()) {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "runner a never got a batch: {st}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(a.0.id() as i32), nix::sys::signal::Signal::SIGKILL)?;
    let _ = a.0.wait();
    let start = Instant::now();
    let st = loop {
        let (_, st) = p.call(Method::GET, "/v2/udfs/killme/status", None).await?;
        if st["counts"]["completed"] == N && st["pending_count"] == 0 && st["processing_count"] == 0 {
            break st;
        }
        anyhow::ensure!(st["failed_count"] == 0, "a row failed: {st}");
        anyhow::ensure!(start.elapsed() < Duration::from_secs(90), "not drained: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Exactly once in effect: each completion counts one write.
    assert_eq!(st["counts"]["completed"], N, "{st}");
    let marked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM rows WHERE namespace = 'jobs' AND attributes ->> '_hevlayer_udf_killme_v' = 'v1'",
    )
    .fetch_one(&p.pool)
    .await?;
    assert_eq!(marked, N as i64);
    let abandoned: i64 =
        sqlx::query_scalar("SELECT count(*) FROM batches WHERE runner_id = $1 AND state <> 'reported'")
            .bind(&a_id)
            .fetch_one(&p.pool)
            .await?;
    assert!(abandoned >= 1, "the killed runner's batch was reissued");
    // Silent for longer than the lost-after window: lost.
    let start = Instant::now();
    loop {
        let a: Vec<Value> = runners(&p).await?.into_iter().filter(|r| r["id"] == a_id.as_str()).collect();
        if a[0]["state"] == "lost" {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(15), "runner a is not lost: {a:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Whether a process is gone: no /proc entry, or a zombie (killed, not yet
/// reaped by whoever adopted it).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "pid (comm) S ppid ...": the state follows the last ')'.
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_killed_with_sigkill_leaves_no_worker_process() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    // The operator's consent through the environment this time.
    let mut r = runner_with(&p, "solo", |c| {
        c.env("LAYER_RUNNER_ALLOW_COMMANDS", "true");
    });
    let start = Instant::now();
    let address = loop {
        if let Some(a) = runners(&p).await?.first().and_then(|r| r["address"].as_str().map(str::to_string)) {
            break a;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "the runner did not register");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    p.upsert_rows("echo", json!([{"id": "w1", "title": "t"}])).await?;
    // The Rust echo worker: it does not watch its parent itself (the
    // Python test worker does, and would leave on its own).
    let worker = layer_tests::echo_worker_binary()?;
    p.apply_function(
        "orphan",
        json!({"targetNamespaces": ["echo"], "inputs": ["id", "title"],
               "worker": {"dispatch": "push", "command": [worker], "timeoutSeconds": 10}}),
    )
    .await?;
    p.drained("orphan", Duration::from_secs(60)).await?;
    // The worker stays warm after its batch; its pid is in the runner's status.
    let start = Instant::now();
    let pid = loop {
        let st: Value = reqwest::get(format!("{address}/v1/status")).await?.json().await?;
        if let Some(pid) = st["workers"][0]["pid"].as_u64() {
            break pid as u32;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "no warm worker: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(parent_of(pid), Some(r.0.id()), "the worker is the runner's child");
    assert!(!gone(pid));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.0.id() as i32), nix::sys::signal::Signal::SIGKILL)?;
    let _ = r.0.wait();
    let start = Instant::now();
    while !gone(pid) {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(5),
            "worker {pid} outlived its runner (parent now {:?})",
            parent_of(pid)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// `layer runner` runs no commands unless its operator says so, with the
/// flag or the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_runner_advertises_the_process_driver_only_when_allowed() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let _plain = runner_with(&p, "plain", |c| {
        c.arg("--no-docker");
    });
    let _env = runner_with(&p, "env", |c| {
        c.arg("--no-docker").env("LAYER_RUNNER_ALLOW_COMMANDS", "1");
    });
    let start = Instant::now();
    let list = loop {
        let list = runners(&p).await?;
        if list.len() == 2 {
            break list;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "the runners did not register: {list:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let drivers = |name: &str| list.iter().find(|r| r["name"] == name).map(|r| r["drivers"].clone());
    assert_eq!(drivers("plain"), Some(json!([])), "{list:?}");
    assert_eq!(drivers("env"), Some(json!(["process"])), "{list:?}");
    Ok(())
}
