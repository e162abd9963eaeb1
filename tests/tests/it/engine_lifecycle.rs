//! The engine's lifecycle promises, driven through the pull protocol with
//! the bodies the `hevlayer` client sends: inputs, version bumps, stale-after,
//! retries and backoff, permanent failures, reset, pause, lease expiry,
//! fencing of late results, rows rewritten while leased, the write trigger,
//! competing workers, deletion.

use std::time::{Duration, Instant};

use layer_tests::TestPlatform;
use reqwest::Method;
use serde_json::{Value, json};

async fn apply(p: &TestPlatform, name: &str, spec: Value) -> anyhow::Result<()> {
    p.apply_function(name, spec).await
}

async fn claim(p: &TestPlatform, f: &str, worker: &str, limit: i64, lease: Option<i64>) -> anyhow::Result<Vec<Value>> {
    let mut body = json!({"worker_id": worker, "limit": limit});
    if let Some(l) = lease {
        body["lease_seconds"] = json!(l);
    }
    let (s, r) = p.call(Method::POST, &format!("/v2/udfs/{f}/claim"), Some(body)).await?;
    anyhow::ensure!(s == 200, "claim: {r}");
    Ok(r["items"].as_array().unwrap().clone())
}

/// Claims until `n` items arrive (discovery runs in the background).
async fn claim_n(p: &TestPlatform, f: &str, worker: &str, n: usize) -> anyhow::Result<Vec<Value>> {
    let start = Instant::now();
    let mut got = Vec::new();
    while got.len() < n {
        got.extend(claim(p, f, worker, (n - got.len()) as i64, None).await?);
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "only {} of {n} claimed", got.len());
        if got.len() < n {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(got)
}

async fn complete(p: &TestPlatform, f: &str, worker: &str, items: &[Value], attrs: Value) -> anyhow::Result<u64> {
    let items: Vec<Value> =
        items.iter().map(|i| json!({"namespace": i["namespace"], "id": i["id"], "attributes": attrs})).collect();
    let (s, r) = p
        .call(Method::POST, &format!("/v2/udfs/{f}/items/complete"), Some(json!({"worker_id": worker, "items": items})))
        .await?;
    anyhow::ensure!(s == 200, "complete: {r}");
    Ok(r["updated"].as_u64().unwrap())
}

async fn fail(p: &TestPlatform, f: &str, worker: &str, items: &[Value], kind: &str) -> anyhow::Result<u64> {
    let items: Vec<Value> = items
        .iter()
        .map(
            |i| json!({"namespace": i["namespace"], "id": i["id"], "kind": kind, "message": format!("{kind} trouble")}),
        )
        .collect();
    let (s, r) = p
        .call(Method::POST, &format!("/v2/udfs/{f}/items/fail"), Some(json!({"worker_id": worker, "items": items})))
        .await?;
    anyhow::ensure!(s == 200, "fail: {r}");
    Ok(r["updated"].as_u64().unwrap())
}

async fn status(p: &TestPlatform, f: &str) -> anyhow::Result<Value> {
    Ok(p.call(Method::GET, &format!("/v2/udfs/{f}/status"), None).await?.1)
}

fn spec(extra: Value) -> Value {
    let mut s =
        json!({"targetNamespaces": ["items"], "inputs": ["id", "title", "size"], "worker": {"dispatch": "pull"}});
    for (k, v) in extra.as_object().unwrap() {
        s[k] = v.clone();
    }
    s
}

const FAST_RETRY: &str = r#"{"maxAttempts": 3, "initialBackoffSeconds": 0, "maxBackoffSeconds": 0}"#;

#[tokio::test]
async fn claims_carry_every_input_and_markers_follow_the_version() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let rows: Vec<Value> =
        (0..50).map(|i| json!({"id": format!("r{i:02}"), "title": format!("t{i}"), "other": 1})).collect();
    p.upsert_rows("items", json!(rows)).await?;
    apply(&p, "sizer", spec(json!({}))).await?;
    let items = claim_n(&p, "sizer", "w1", 50).await?;
    let first = items.iter().find(|i| i["id"] == "r07").unwrap();
    assert_eq!(
        first["input"],
        json!({"id": "r07", "title": "t7", "size": null}),
        "declared inputs only, null when absent"
    );
    assert_eq!(complete(&p, "sizer", "w1", &items, json!({"size": 3})).await?, 50);
    let (_, d) = p.call(Method::GET, "/v2/namespaces/items/documents/r07", None).await?;
    assert_eq!(d["attributes"], json!({"title": "t7", "other": 1, "size": 3, "_hevlayer_udf_sizer_v": "v1"}));
    let st = status(&p, "sizer").await?;
    assert_eq!((st["counts"]["completed"].as_i64(), st["pending_count"].as_i64()), (Some(50), Some(0)), "{st}");

    // Bumping the version re-runs every row exactly once.
    apply(&p, "sizer", spec(json!({"version": "v2"}))).await?;
    let again = claim_n(&p, "sizer", "w1", 50).await?;
    assert_eq!(complete(&p, "sizer", "w1", &again, json!({"size": 4})).await?, 50);
    let (s, r) = p.call(Method::POST, "/v2/udfs/sizer/discover", Some(json!({}))).await?;
    assert_eq!((s, r["enqueued"].as_u64()), (200, Some(0)), "{r}");
    assert!(claim(&p, "sizer", "w1", 100, None).await?.is_empty());
    let markers: Vec<String> = sqlx::query_scalar("SELECT DISTINCT attributes ->> '_hevlayer_udf_sizer_v' FROM rows")
        .fetch_all(&p.pool)
        .await?;
    assert_eq!(markers, ["v2"]);
    assert_eq!(status(&p, "sizer").await?["counts"]["completed"], 100);

    // Deleting the Function stops its work and keeps what it wrote.
    p.upsert_rows("items", json!([{"id": "new", "title": "n"}])).await?;
    let (s, _) = p.call(Method::DELETE, "/v2/udfs/sizer", None).await?;
    assert_eq!(s, 200);
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM work_items").fetch_one(&p.pool).await?;
    assert_eq!(queued, 0);
    let (_, d) = p.call(Method::GET, "/v2/namespaces/items/documents/r07", None).await?;
    assert_eq!(d["attributes"]["size"], 4);
    Ok(())
}

#[tokio::test]
async fn stale_after_expiry_runs_a_row_again() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", json!([{"id": "a", "title": "x"}])).await?;
    apply(&p, "fresh", spec(json!({"staleAfterSeconds": 1}))).await?;
    let items = claim_n(&p, "fresh", "w", 1).await?;
    assert_eq!(complete(&p, "fresh", "w", &items, json!({"size": 1})).await?, 1);
    let (_, d) = p.call(Method::GET, "/v2/namespaces/items/documents/a", None).await?;
    let due = d["attributes"]["_hevlayer_udf_fresh_stale_after"].as_f64().expect("stale-after marker");
    assert!(due > 1.7e9, "{d}");
    let (_, r) = p.call(Method::POST, "/v2/udfs/fresh/discover", None).await?;
    assert_eq!(r["enqueued"], 0, "not stale yet");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let (_, r) = p.call(Method::POST, "/v2/udfs/fresh/discover", None).await?;
    assert_eq!(r["enqueued"], 1, "{r}");
    assert_eq!(claim(&p, "fresh", "w", 10, None).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn transient_failures_retry_and_permanent_ones_fail_at_once() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", json!([{"id": "flaky", "title": "f"}, {"id": "poison", "title": "p"}])).await?;
    apply(&p, "retry", spec(json!({"retry": serde_json::from_str::<Value>(FAST_RETRY)?}))).await?;
    let items = claim_n(&p, "retry", "w", 2).await?;
    let (flaky, poison): (Vec<Value>, Vec<Value>) = items.into_iter().partition(|i| i["id"] == "flaky");
    assert_eq!(fail(&p, "retry", "w", &poison, "permanent").await?, 1);
    assert_eq!(fail(&p, "retry", "w", &flaky, "transient").await?, 1);
    let again = claim(&p, "retry", "w", 10, None).await?;
    assert_eq!(again.len(), 1, "the permanent failure is not retried: {again:?}");
    assert_eq!(fail(&p, "retry", "w", &again, "transient").await?, 1);
    let third = claim(&p, "retry", "w", 10, None).await?;
    assert_eq!(third.len(), 1);
    let attempts: i32 =
        sqlx::query_scalar("SELECT attempts FROM work_items WHERE row_id = 'flaky'").fetch_one(&p.pool).await?;
    assert_eq!(attempts, 2, "two attempts spent before the third");
    assert_eq!(complete(&p, "retry", "w", &third, json!({"size": 9})).await?, 1, "done after 3 attempts");
    let st = status(&p, "retry").await?;
    assert_eq!((st["failed_count"].as_i64(), st["counts"]["completed"].as_i64()), (Some(1), Some(1)), "{st}");
    let (err, kind): (String, String) =
        sqlx::query_as("SELECT last_error, last_error_kind FROM work_items WHERE row_id = 'poison'")
            .fetch_one(&p.pool)
            .await?;
    assert_eq!((err.as_str(), kind.as_str()), ("permanent trouble", "permanent"));

    // reset-failed brings it back, with fresh attempts.
    let (s, r) = p.call(Method::POST, "/v2/udfs/retry/reset-failed", None).await?;
    assert_eq!((s, r["updated"].as_u64()), (200, Some(1)), "{r}");
    let back = claim(&p, "retry", "w", 10, None).await?;
    assert_eq!(back.len(), 1);
    // Attempts run out: transient failures end in `failed` with the last error.
    for _ in 0..3 {
        let it = claim(&p, "retry", "w", 10, None).await?;
        let it = if it.is_empty() { back.clone() } else { it };
        fail(&p, "retry", "w", &it, "transient").await?;
    }
    let st = status(&p, "retry").await?;
    assert_eq!(st["failed_count"], 1, "{st}");
    Ok(())
}

#[tokio::test]
async fn backoff_delays_the_next_claim() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", json!([{"id": "a", "title": "x"}])).await?;
    apply(&p, "slow", spec(json!({"retry": {"maxAttempts": 5, "initialBackoffSeconds": 30, "maxBackoffSeconds": 60}})))
        .await?;
    let items = claim_n(&p, "slow", "w", 1).await?;
    fail(&p, "slow", "w", &items, "transient").await?;
    assert!(claim(&p, "slow", "w", 10, None).await?.is_empty(), "backing off");
    let wait: f64 = sqlx::query_scalar("SELECT extract(epoch FROM available_at - now())::float8 FROM work_items")
        .fetch_one(&p.pool)
        .await?;
    assert!((14.0..=30.5).contains(&wait), "30 s with jitter down to half, got {wait}");
    Ok(())
}

#[tokio::test]
async fn pause_stops_claims_and_discovery() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", json!([{"id": "a", "title": "x"}])).await?;
    apply(&p, "pz", spec(json!({}))).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (s, _) = p.call(Method::POST, "/v2/udfs/pz/pause", None).await?;
    assert_eq!(s, 200);
    assert!(claim(&p, "pz", "w", 10, None).await?.is_empty());
    let (s, r) = p.call(Method::POST, "/v2/udfs/pz/discover", None).await?;
    assert_eq!(s, 409, "{r}");
    p.call(Method::POST, "/v2/udfs/pz/resume", None).await?;
    assert_eq!(claim_n(&p, "pz", "w", 1).await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_vanished_worker_loses_its_lease_and_its_late_result() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", json!([{"id": "a", "title": "x"}])).await?;
    apply(&p, "lease", spec(json!({}))).await?;
    let start = Instant::now();
    let mut mine = Vec::new();
    while mine.is_empty() {
        mine = claim(&p, "lease", "vanisher", 10, Some(1)).await?;
        assert!(start.elapsed() < Duration::from_secs(10));
    }
    // The worker says nothing; the reaper returns the row after the lease.
    let start = Instant::now();
    let other = loop {
        let got = claim(&p, "lease", "survivor", 10, None).await?;
        if !got.is_empty() {
            break got;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never reissued");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(other[0]["id"], "a");
    let (attempts, err): (i32, String) =
        sqlx::query_as("SELECT attempts, last_error FROM work_items WHERE row_id = 'a'").fetch_one(&p.pool).await?;
    assert_eq!(attempts, 1, "an expired lease spends an attempt");
    assert!(err.contains("lease expired") && err.contains("vanisher"), "{err}");
    // The late report of the first worker is dropped, the second is written.
    assert_eq!(complete(&p, "lease", "vanisher", &mine, json!({"size": "late"})).await?, 0);
    assert_eq!(fail(&p, "lease", "vanisher", &mine, "permanent").await?, 0);
    assert_eq!(complete(&p, "lease", "survivor", &other, json!({"size": "good"})).await?, 1);
    let (_, d) = p.call(Method::GET, "/v2/namespaces/items/documents/a", None).await?;
    assert_eq!(d["attributes"]["size"], "good");
    let st = status(&p, "lease").await?;
    assert_eq!((st["counts"]["leases_expired"].as_i64(), st["counts"]["dropped"].as_i64()), (Some(1), Some(1)), "{st}");
    let (text, m) = layer_tests::scrape(&p.url).await?;
    assert_eq!(m["layer_lease_expiries_total{udf=\"lease\"}"], 1.0, "{text}");
    assert_eq!(m["layer_rows_dropped_stale_total{udf=\"lease\"}"], 1.0, "{text}");
    Ok(())
}

#[tokio::test]
async fn heartbeats_keep_a_lease() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", json!([{"id": "a", "title": "x"}])).await?;
    apply(&p, "hb", spec(json!({}))).await?;
    let start = Instant::now();
    let mut mine = Vec::new();
    while mine.is_empty() {
        mine = claim(&p, "hb", "w", 10, Some(1)).await?;
        assert!(start.elapsed() < Duration::from_secs(10));
    }
    let refs: Vec<Value> = mine.iter().map(|i| json!({"namespace": i["namespace"], "id": i["id"]})).collect();
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (_, r) =
            p.call(Method::POST, "/v2/udfs/hb/items/heartbeat", Some(json!({"worker_id": "w", "items": refs}))).await?;
        assert_eq!(r["updated"], 1, "{r}");
    }
    assert_eq!(complete(&p, "hb", "w", &mine, json!({"size": 1})).await?, 1, "held for 2.5 s on a 1 s lease");
    Ok(())
}

#[tokio::test]
async fn a_row_rewritten_while_leased_keeps_the_new_write_and_runs_again() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", json!([{"id": "a", "title": "old"}])).await?;
    apply(&p, "rw", spec(json!({}))).await?;
    let items = claim_n(&p, "rw", "w", 1).await?;
    assert_eq!(items[0]["input"]["title"], "old");
    // Another key writes it (the claiming key's own writes keep the lease:
    // see tests/tests/it/writethrough.rs).
    let other = p.mint_key(json!({"o": {"scopes": ["write"]}})).await?;
    let (s, r) = p
        .call_as(
            &other,
            Method::POST,
            "/v2/namespaces/items",
            Some(json!({"upsert_rows": [{"id": "a", "title": "new"}]})),
        )
        .await?;
    assert_eq!(s, 200, "{r}");
    assert_eq!(complete(&p, "rw", "w", &items, json!({"size": "from-old"})).await?, 0, "stale result dropped");
    let (_, d) = p.call(Method::GET, "/v2/namespaces/items/documents/a", None).await?;
    assert_eq!(d["attributes"], json!({"title": "new"}), "not overwritten");
    let again = claim_n(&p, "rw", "w", 1).await?;
    assert_eq!(again[0]["input"]["title"], "new");
    assert_eq!(complete(&p, "rw", "w", &again, json!({"size": "from-new"})).await?, 1);
    Ok(())
}

#[tokio::test]
async fn the_write_trigger_enqueues_without_waiting_for_a_sweep() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    apply(&p, "onwrite", spec(json!({"triggers": ["write"], "schedule": {"discoveryIntervalSeconds": 86400}}))).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let written = Instant::now();
    p.upsert_rows("items", json!([{"id": "w1", "title": "x"}])).await?;
    let items = claim_n(&p, "onwrite", "w", 1).await?;
    eprintln!("claimable {:?} after the write", written.elapsed());
    assert!(written.elapsed() < Duration::from_secs(5));
    assert_eq!(items[0]["id"], "w1");
    // Without the trigger, and with a day between sweeps, a write waits.
    apply(&p, "onwrite", spec(json!({"triggers": ["discovery"], "schedule": {"discoveryIntervalSeconds": 86400}})))
        .await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.upsert_rows("items", json!([{"id": "w2", "title": "y"}])).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(claim(&p, "onwrite", "w", 10, None).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn reserved_attributes_in_a_result_fail_the_row_with_a_message() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", json!([{"id": "a", "title": "x"}])).await?;
    apply(&p, "res", spec(json!({}))).await?;
    let items = claim_n(&p, "res", "w", 1).await?;
    assert_eq!(complete(&p, "res", "w", &items, json!({"_hevlayer_udf_res_v": "v9"})).await?, 0);
    let err: String = sqlx::query_scalar("SELECT last_error FROM work_items WHERE row_id = 'a' AND state = 'failed'")
        .fetch_one(&p.pool)
        .await?;
    assert!(err.contains("reserved _hevlayer_ prefix"), "{err}");
    let (_, d) = p.call(Method::GET, "/v2/namespaces/items/documents/a", None).await?;
    assert_eq!(d["attributes"], json!({"title": "x"}));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_workers_with_short_leases_lose_nothing_and_write_once() -> anyhow::Result<()> {
    const N: usize = 300;
    let p = TestPlatform::start().await?;
    let rows: Vec<Value> = (0..N).map(|i| json!({"id": format!("r{i:03}"), "title": "t"})).collect();
    p.upsert_rows("items", json!(rows)).await?;
    apply(&p, "race", spec(json!({"retry": {"maxAttempts": 100, "initialBackoffSeconds": 0, "maxBackoffSeconds": 0}})))
        .await?;
    let p = std::sync::Arc::new(p);
    let mut tasks = Vec::new();
    for w in 0..3 {
        let p = p.clone();
        tasks.push(tokio::spawn(async move {
            let worker = format!("w{w}");
            let mut round = 0u64;
            let start = Instant::now();
            loop {
                let st = status(&p, "race").await?;
                if st["counts"]["completed"] == N as u64 {
                    return anyhow::Ok(());
                }
                anyhow::ensure!(start.elapsed() < Duration::from_secs(90), "not drained: {st}");
                let items = claim(&p, "race", &worker, 25, Some(1)).await?;
                round += 1;
                // Every third batch of a worker outlives its 1 s lease.
                let pause = if (round + w).is_multiple_of(3) { 1300 } else { 20 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
                if !items.is_empty() {
                    complete(&p, "race", &worker, &items, json!({"size": worker})).await?;
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let st = status(&p, "race").await?;
    assert!(st["counts"]["dropped"].as_i64().unwrap() > 0, "some late results were dropped: {st}");
    assert!(st["counts"]["leases_expired"].as_i64().unwrap() > 0, "{st}");
    let (marked, completed): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM rows WHERE attributes ->> '_hevlayer_udf_race_v' = 'v1'),
                (SELECT completed FROM function_stats WHERE function_id = 'race')",
    )
    .fetch_one(&p.pool)
    .await?;
    assert_eq!((marked, completed), (N as i64, N as i64), "every row written exactly once: {st}");
    Ok(())
}

#[tokio::test]
async fn a_vector_result_is_stored_on_the_row() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", json!([{"id": "a", "title": "x"}, {"id": "b", "title": "y"}])).await?;
    apply(&p, "embed", spec(json!({}))).await?;
    let items = claim_n(&p, "embed", "w", 2).await?;
    // The client's embedding kind sends `vector` instead of attributes.
    let body: Vec<Value> = items
        .iter()
        .map(|i| {
            if i["id"] == "a" {
                json!({"namespace": i["namespace"], "id": i["id"], "vector": [0.25, -1.5, 3.0]})
            } else {
                // Finite as a double, infinite as the stored 32-bit float.
                json!({"namespace": i["namespace"], "id": i["id"], "vector": [1.0, 1e39]})
            }
        })
        .collect();
    let (s, r) =
        p.call(Method::POST, "/v2/udfs/embed/items/complete", Some(json!({"worker_id": "w", "items": body}))).await?;
    assert_eq!((s, r["updated"].as_u64()), (200, Some(1)), "{r}");
    let err: String = sqlx::query_scalar("SELECT last_error FROM work_items WHERE row_id = 'b' AND state = 'failed'")
        .fetch_one(&p.pool)
        .await?;
    assert_eq!(err, "the result's vector[1]: a vector holds numbers within the 32-bit float range only");
    let (_, d) = p.call(Method::GET, "/v2/namespaces/items/documents/a", None).await?;
    assert_eq!(d["vector"], json!([0.25, -1.5, 3.0]), "{d}");
    assert_eq!(d["attributes"]["_hevlayer_udf_embed_v"], "v1");
    let (_, q) = p
        .call(
            Method::POST,
            "/v2/namespaces/items/query",
            Some(json!({"filters": ["id", "Eq", "a"], "include_attributes": ["vector"]})),
        )
        .await?;
    assert_eq!(q["rows"][0]["vector"], json!([0.25, -1.5, 3.0]), "{q}");
    Ok(())
}

#[tokio::test]
async fn max_in_flight_batches_bounds_concurrent_claims() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let rows: Vec<Value> = (0..20).map(|i| json!({"id": format!("r{i:02}"), "title": "t"})).collect();
    p.upsert_rows("items", json!(rows)).await?;
    apply(
        &p,
        "capped",
        spec(json!({"schedule": {"maxInFlightBatches": 2}, "retry": {"initialBackoffSeconds": 0, "maxBackoffSeconds": 0}})),
    )
    .await?;
    let a = claim_n(&p, "capped", "wa", 3).await?;
    let b = claim(&p, "capped", "wb", 3, None).await?;
    assert_eq!(b.len(), 3);
    // Two batches are out: a third claimer, and a second claim by a worker
    // that holds one, are turned away.
    assert!(claim(&p, "capped", "wc", 3, None).await?.is_empty());
    assert!(claim(&p, "capped", "wa", 3, None).await?.is_empty());
    // A batch partly completed is still in flight.
    assert_eq!(complete(&p, "capped", "wa", &a[..1], json!({"size": 1})).await?, 1);
    assert!(claim(&p, "capped", "wc", 3, None).await?.is_empty());
    // Completing the rest frees its slot.
    assert_eq!(complete(&p, "capped", "wa", &a[1..], json!({"size": 1})).await?, 2);
    let c = claim(&p, "capped", "wc", 3, None).await?;
    assert_eq!(c.len(), 3);
    // So does a failure report...
    assert_eq!(fail(&p, "capped", "wb", &b, "transient").await?, 3);
    assert_eq!(claim(&p, "capped", "wd", 3, None).await?.len(), 3);
    // ...and a lease that runs out.
    assert!(claim(&p, "capped", "we", 3, None).await?.is_empty());
    sqlx::query("UPDATE work_items SET lease_expires_at = now() - interval '1 second' WHERE worker_id = 'wc'")
        .execute(&p.pool)
        .await?;
    let start = Instant::now();
    loop {
        if !claim(&p, "capped", "we", 3, None).await?.is_empty() {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "the expired batch never freed its slot");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test]
async fn a_cron_schedule_sweeps_on_its_matches_only() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", json!([{"id": "c1", "title": "x"}])).await?;
    // Yearly: applying does not sweep, and nothing else does either.
    apply(&p, "yearly", spec(json!({"schedule": {"cron": "0 0 1 1 *"}}))).await?;
    let (s, u) = p.call(Method::GET, "/v2/udfs/yearly", None).await?;
    assert_eq!(s, 200);
    assert_eq!(u["udf"]["spec"]["triggers"], json!([]), "the client's models know no schedule trigger");
    assert_eq!(u["udf"]["spec"]["schedule"]["cron"], "0 0 1 1 *");
    let next = u["status"]["discovery"]["next_scheduled_at"].as_str().unwrap().to_string();
    assert!(next.contains("-01-01T00:00:00"), "{next}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(claim(&p, "yearly", "w", 10, None).await?.is_empty());
    assert_eq!(status(&p, "yearly").await?["discovery"]["sweeps_completed"], 0);

    // Every two seconds, listed explicitly beside write: rows written
    // later are found by the schedule.
    apply(
        &p,
        "often",
        spec(
            json!({"triggers": ["schedule"], "schedule": {"cron": "*/2 * * * * *", "discoveryIntervalSeconds": 86400}}),
        ),
    )
    .await?;
    let items = claim_n(&p, "often", "w", 1).await?;
    assert_eq!(items[0]["id"], "c1");
    complete(&p, "often", "w", &items, json!({"size": 1})).await?;
    p.upsert_rows("items", json!([{"id": "c2", "title": "y"}])).await?;
    let items = claim_n(&p, "often", "w", 1).await?;
    assert_eq!(items[0]["id"], "c2");
    let st = status(&p, "often").await?;
    assert!(st["discovery"]["last_scheduled_at"].is_string(), "{st}");
    assert!(st["discovery"]["sweeps_completed"].as_i64().unwrap() >= 2, "{st}");
    Ok(())
}

#[tokio::test]
async fn sweeps_cover_every_namespace_with_bounded_concurrent_scans() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let names: Vec<String> = (0..7).map(|i| format!("part-{i}")).collect();
    for n in &names {
        let rows: Vec<Value> = (0..30).map(|i| json!({"id": format!("{n}-{i}"), "title": "t"})).collect();
        let (s, r) = p.call(Method::POST, &format!("/v2/namespaces/{n}"), Some(json!({"upsert_rows": rows}))).await?;
        anyhow::ensure!(s == 200, "upsert: {r}");
    }
    let mut sp = spec(json!({"schedule": {"maxConcurrentScans": 2}}));
    sp["targetNamespaces"] = json!(names);
    apply(&p, "wide", sp).await?;
    let (s, r) = p.call(Method::POST, "/v2/udfs/wide/discover", Some(json!({}))).await?;
    assert_eq!(s, 200, "{r}");
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM work_items WHERE function_id = 'wide'").fetch_one(&p.pool).await?;
    assert_eq!(pending, 7 * 30);
    let per_ns: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT namespace) FROM discovery_cursors WHERE function_id = 'wide'")
            .fetch_one(&p.pool)
            .await?;
    assert_eq!(per_ns, 7);
    Ok(())
}

#[tokio::test]
async fn a_pull_function_without_an_image_says_when_no_worker_claims() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", json!([{"id": "a", "title": "x"}, {"id": "b", "title": "y"}])).await?;
    apply(&p, "lonely", spec(json!({}))).await?;
    p.wait_for_pending("lonely", 2).await?;
    let conditions = async || -> anyhow::Result<Vec<Value>> {
        let (_, st) = p.call(Method::GET, "/v2/udfs/lonely/status", None).await?;
        Ok(st["conditions"].as_array().cloned().unwrap_or_default())
    };
    let c = conditions().await?;
    assert_eq!(c.len(), 1, "{c:?}");
    assert_eq!(c[0]["reason"], "NoWorker");
    let m = c[0]["message"].as_str().unwrap_or_default();
    assert!(m.contains("2 rows are pending") && m.contains("no worker has ever claimed"), "{m}");
    // A worker that claims (even nothing more than one row) clears it.
    claim(&p, "lonely", "w", 1, None).await?;
    assert_eq!(conditions().await?, Vec::<Value>::new());
    Ok(())
}
