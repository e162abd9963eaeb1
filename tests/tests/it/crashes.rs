//! Workers that die, crash or hang mid-batch, through a real runner and
//! real worker processes: the batch is split so the bad row is isolated,
//! its good neighbours complete in that same batch within seconds (the dead
//! worker's slot is free for its replacement at once), and no row is
//! charged an attempt, nor failed, for another row's fault. A row whose
//! runner has no worker free in time waits for one, charged nothing.

use std::time::Duration;

use layer_tests::{TestPlatform, TestRunner, workspace_dir};
use serde_json::{Value, json};

/// A push Function over `jobs` served by `tests/python/push_worker.py`,
/// one worker across the fleet, whole batches of `batch`.
fn spec(batch: u32, timeout_seconds: u32) -> Value {
    let script = workspace_dir().join("tests/python/push_worker.py");
    json!({
        "targetNamespaces": ["jobs"],
        "inputs": ["id", "mode"],
        "worker": {"dispatch": "push", "command": ["python3", script], "batchSize": batch,
                   "timeoutSeconds": timeout_seconds},
        "retry": {"maxAttempts": 1, "initialBackoffSeconds": 0, "maxBackoffSeconds": 0},
        "schedule": {"leaseSeconds": 60},
        "scaling": {"replicas": {"min": 0, "max": 1}},
    })
}

/// Rows `g00..` in `ok` mode and the given bad ones, in one namespace.
async fn rows(p: &TestPlatform, good: usize, bad: &[(&str, &str)]) -> anyhow::Result<()> {
    let mut rows: Vec<Value> = (0..good).map(|i| json!({"id": format!("g{i:02}"), "mode": "ok"})).collect();
    rows.extend(bad.iter().map(|(id, mode)| json!({"id": id, "mode": mode})));
    p.upsert_rows("jobs", json!(rows)).await
}

/// The Function's batch records: (items, written, failed).
async fn batches(p: &TestPlatform, udf: &str) -> anyhow::Result<Vec<(i32, i32, i32)>> {
    Ok(sqlx::query_as("SELECT items, written, failed FROM batches WHERE function_id = $1 ORDER BY id")
        .bind(udf)
        .fetch_all(&p.pool)
        .await?)
}

/// One Function whose first and only batch holds `good` healthy rows and
/// the `bad` ones (id, mode), and how the bad ones must fail.
struct Case<'a> {
    udf: &'a str,
    good: usize,
    bad: &'a [(&'a str, &'a str)],
    timeout: u32,
    /// The failure kind of each bad row...
    kind: &'a str,
    /// ...and what its message says.
    says: &'a str,
}

/// Drives the case; checks the healthy rows all completed in that batch and
/// only the bad ones failed, as the case says.
async fn isolates(case: Case<'_>) -> anyhow::Result<()> {
    let Case { udf, good, bad, timeout, kind, says } = case;
    let p = TestPlatform::start().await?;
    let _runner = TestRunner::start(&p, |_| {}).await?;
    rows(&p, good, bad).await?;
    let batch = u32::try_from(good + bad.len())?;
    p.apply_function(udf, spec(batch, timeout)).await?;
    // Within seconds of the failures, not after a heartbeat or a lease.
    let st = p.drained(udf, Duration::from_secs(30)).await?;
    assert_eq!(st["counts"]["completed"], good, "{st}");
    let failed = p.failed_rows(udf).await?;
    let bad_ids: Vec<&str> = bad.iter().map(|(id, _)| *id).collect();
    assert_eq!(failed.keys().map(String::as_str).collect::<Vec<_>>(), bad_ids, "only the bad rows fail: {failed:?}");
    for (id, (k, message, attempts)) in &failed {
        assert_eq!((k.as_str(), *attempts), (kind, 1), "{id}: {message}");
        assert!(message.contains(says), "{id}: {message}");
    }
    // One batch: the good rows completed in it, charged nothing.
    assert_eq!(batches(&p, udf).await?, vec![(batch as i32, good as i32, bad.len() as i32)]);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_sigkills_itself_mid_batch_costs_its_neighbours_nothing() -> anyhow::Result<()> {
    let bad = [("bad", "sigkill")];
    isolates(Case { udf: "sigkilled", good: 7, bad: &bad, timeout: 10, kind: "transient", says: "crashed mid-batch" })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_crashes_on_one_poison_row_in_sixteen_costs_the_other_fifteen_nothing() -> anyhow::Result<()> {
    let bad = [("bad", "crash")];
    isolates(Case { udf: "poisoned", good: 15, bad: &bad, timeout: 10, kind: "transient", says: "exit status: 3" })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_that_hang_past_the_timeout_are_replaced_and_a_healthy_row_in_their_batch_completes()
-> anyhow::Result<()> {
    let bad = [("h1", "hang"), ("h2", "hang")];
    isolates(Case { udf: "hung", good: 2, bad: &bad, timeout: 2, kind: "timeout", says: "timeoutSeconds (2 s)" }).await
}

/// Three batches of one slow row for one worker: the runner waits half the
/// lease for a worker, then hands the rest back (`no_worker`), charged
/// neither an attempt (`maxAttempts` is 1) nor a free retry; all complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_that_wait_for_a_busy_worker_are_charged_nothing() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let _runner = TestRunner::start(&p, |_| {}).await?;
    rows(&p, 0, &[("s1", "slow"), ("s2", "slow"), ("s3", "slow")]).await?;
    let mut spec = spec(1, 4);
    spec["worker"]["env"] = json!({"SLOW_SECONDS": "3"});
    spec["schedule"] = json!({"leaseSeconds": 4, "maxInFlightBatches": 3});
    p.apply_function("busy", spec).await?;
    let start = std::time::Instant::now();
    let waited = loop {
        let w: Option<(String, i32, i32)> = sqlx::query_as(
            "SELECT state, attempts, free_retries FROM work_items
             WHERE function_id = 'busy' AND last_error_kind = 'no_worker' LIMIT 1",
        )
        .fetch_optional(&p.pool)
        .await?;
        if let Some(w) = w {
            break w;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "no row ever waited for a worker");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((waited.1, waited.2), (0, 0), "waiting was charged: {waited:?}");
    let st = p.drained("busy", Duration::from_secs(60)).await?;
    assert_eq!((st["counts"]["completed"].as_i64(), st["failed_count"].as_i64()), (Some(3), Some(0)), "{st}");
    Ok(())
}

/// A result PostgreSQL cannot store (a NUL in a value or a name) fails that
/// row alone, permanently, saying why; a NUL in a worker's error message
/// is stored escaped. The neighbours are written in the same batch, and the
/// report is acknowledged at once (not retried until the leases expire).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_with_a_nul_fails_its_row_alone_and_its_neighbours_are_written() -> anyhow::Result<()> {
    let bad = [("n1", "nul"), ("n2", "nulkey")];
    isolates(Case { udf: "nuls", good: 6, bad: &bad, timeout: 10, kind: "permanent", says: "NUL (\\u0000)" }).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_error_message_with_a_nul_is_stored_escaped() -> anyhow::Result<()> {
    let bad = [("e1", "nulerror")];
    isolates(Case { udf: "nulerrors", good: 7, bad: &bad, timeout: 10, kind: "permanent", says: "cannot\\u0000 do it" })
        .await
}
