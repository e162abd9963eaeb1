//! Push dispatch end to end: the platform leases batches and sends them to
//! a runner, which runs them on warm worker processes and reports back.

use std::time::{Duration, Instant};

use layer_tests::{TestPlatform, TestRunner, workspace_dir};
use reqwest::Method;
use serde_json::{Value, json};

async fn apply(p: &TestPlatform, name: &str, spec: Value) -> anyhow::Result<()> {
    p.apply_function(name, spec).await
}

fn products() -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(workspace_dir().join("examples/tag-products/products.jsonl"))?;
    Ok(Value::Array(text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_push_example_tags_every_product() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let runner = TestRunner::start(&p, |_| {}).await?;
    let rows = products()?;
    p.upsert_rows("products", rows.clone()).await?;
    let doc = std::fs::read_to_string(workspace_dir().join("examples/tag-products/function.yaml"))?;
    let mut doc: Value = serde_json::to_value(layer_protocol::resource::parse_documents(&doc)?.remove(0))?;
    let script = workspace_dir().join("examples/tag-products/worker.py");
    doc["spec"]["worker"]["command"] = json!(["python3", script]);
    apply(&p, "product-tags-push", doc["spec"].clone()).await?;
    let st = p.drained("product-tags-push", Duration::from_secs(60)).await?;
    assert_eq!(st["counts"]["completed"], rows.as_array().unwrap().len(), "{st}");
    let (_, d) = p.call(Method::GET, "/v2/namespaces/products/documents/p002", None).await?;
    assert_eq!(d["attributes"]["tags"], json!(["wireless", "waterproof"]), "{d}");
    assert_eq!(d["attributes"]["_hevlayer_udf_product_tags_push_v"], "v1");
    let (_, list) = p.call(Method::GET, "/v2/runners", None).await?;
    assert_eq!(list["runners"][0]["id"], runner.id, "{list}");
    assert_eq!(list["runners"][0]["state"], "active");
    let batches: i64 =
        sqlx::query_scalar("SELECT count(*) FROM batches WHERE state = 'reported'").fetch_one(&p.pool).await?;
    assert!(batches >= 3, "24 rows at batch 8: {batches} batches");
    runner.stop().await?;
    let (_, list) = p.call(Method::GET, "/v2/runners", None).await?;
    assert_eq!(list["runners"], json!([]), "a drained runner deregisters: {list}");
    Ok(())
}

fn worker_spec(extra: Value) -> Value {
    let script = workspace_dir().join("tests/python/push_worker.py");
    let mut s = json!({
        "targetNamespaces": ["jobs"],
        "inputs": ["id", "mode"],
        "worker": {"dispatch": "push", "command": ["python3", script], "batchSize": 8, "timeoutSeconds": 5},
        "retry": {"maxAttempts": 1, "initialBackoffSeconds": 0, "maxBackoffSeconds": 0},
        "schedule": {"leaseSeconds": 30}
    });
    for (k, v) in extra.as_object().unwrap() {
        if let (Some(a), Some(b)) = (s[k].as_object_mut(), v.as_object()) {
            a.extend(b.clone());
        } else {
            s[k] = v.clone();
        }
    }
    s
}

async fn result_of(p: &TestPlatform, id: &str) -> anyhow::Result<Value> {
    let (_, d) = p.call(Method::GET, &format!("/v2/namespaces/jobs/documents/{id}"), None).await?;
    Ok(d["attributes"]["result"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misbehaving_workers_become_classified_row_failures() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let runner = TestRunner::start(&p, |_| {}).await?;
    // One batch of 8 with per-row trouble; the crash row is the poison the
    // split must isolate from its neighbours.
    let modes = ["ok", "missing", "dup", "permanent", "ok", "crash", "ok", "ok"];
    let rows: Vec<Value> = modes.iter().enumerate().map(|(i, m)| json!({"id": format!("r{i}"), "mode": m})).collect();
    p.upsert_rows("jobs", json!(rows)).await?;
    apply(&p, "mixed", worker_spec(json!({}))).await?;
    p.drained("mixed", Duration::from_secs(60)).await?;
    let e = p.failed_rows("mixed").await?;
    assert_eq!(e.len(), 4, "{e:?}");
    assert!(e["r1"].1.contains("did not include this row"), "{e:?}");
    assert!(e["r2"].1.contains("2 times"), "{e:?}");
    assert_eq!(e["r3"].0, "permanent", "{e:?}");
    assert_eq!(e["r3"].1, "cannot do r3");
    assert!(e["r5"].1.contains("crashed mid-batch") && e["r5"].1.contains("exit status: 3"), "{e:?}");
    for ok in ["r0", "r4", "r6", "r7"] {
        assert_eq!(result_of(&p, ok).await?, format!("ok:{ok}"), "{ok} sank with the poison row");
    }
    // `layer logs`: the crashed worker's output is kept, marked stopped,
    // beside its replacement's.
    let (s, logs) = p.call(Method::GET, "/v2/udfs/mixed/logs?lines=3", None).await?;
    assert_eq!(s, 200, "{logs}");
    let workers = logs["workers"].as_array().unwrap();
    assert!(workers.len() >= 2, "{logs}");
    assert!(workers.iter().any(|w| w["running"] == false), "the crashed worker stopped: {logs}");
    for w in workers {
        assert_eq!((&w["runner_id"], &w["udf_id"]), (&json!(runner.id), &json!("mixed")), "{w}");
        assert!(w["lines"][0]["line"].as_str().is_some_and(|l| l.contains("push_worker ready on")), "{w}");
    }
    let (s, _) = p.call(Method::GET, "/v2/udfs/nothing/logs", None).await?;
    assert_eq!(s, 404);
    // The runner answers only the platform's inspection tokens.
    let logs_url = format!("http://{}/v1/logs?udf=mixed", runner.addr);
    assert_eq!(reqwest::get(&logs_url).await?.status(), 401);
    let forged = reqwest::Client::new().get(&logs_url).bearer_auth(&p.admin_key).send().await?;
    assert_eq!(forged.status(), 401);

    // Whole-call misbehaviour, each alone in its batch.
    let rows = json!([{"id": "g1", "mode": "garbage"}, {"id": "f1", "mode": "fail500"}]);
    p.upsert_rows("jobs", rows).await?;
    apply(
        &p,
        "mixed",
        worker_spec(json!({"version": "v2", "worker": {"batchSize": 1}, "filter": ["id", "In", ["g1", "f1"]]})),
    )
    .await?;
    let start = Instant::now();
    loop {
        let e = p.failed_rows("mixed").await?;
        if e.contains_key("g1") && e.contains_key("f1") {
            assert!(e["g1"].1.contains("not valid: not JSON") && e["g1"].1.contains("<html>"), "{e:?}");
            assert!(e["f1"].1.contains("HTTP 500"), "{e:?}");
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "{e:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_worker_times_out_is_replaced_and_the_row_fails_after_max_attempts() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let _runner = TestRunner::start(&p, |_| {}).await?;
    p.upsert_rows("jobs", json!([{"id": "h", "mode": "hang"}, {"id": "fine", "mode": "ok"}])).await?;
    apply(
        &p,
        "hangs",
        worker_spec(json!({"worker": {"batchSize": 1, "timeoutSeconds": 1},
                           "retry": {"maxAttempts": 2}, "scaling": {"replicas": {"min": 0, "max": 1}}})),
    )
    .await?;
    p.drained("hangs", Duration::from_secs(60)).await?;
    let e = p.failed_rows("hangs").await?;
    assert_eq!(e["h"].0, "timeout", "{e:?}");
    assert_eq!(e["h"].2, 2, "two attempts: {e:?}");
    assert!(e["h"].1.contains("timeoutSeconds (1 s)"), "{e:?}");
    // The one worker slot was freed by killing the hung worker: the other
    // row still ran.
    assert_eq!(result_of(&p, "fine").await?, "ok:fine");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_runner_finishes_its_batches_and_a_new_one_takes_the_rest() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let runner = TestRunner::start(&p, |c| c.slots = Some(1)).await?;
    let rows: Vec<Value> = (0..12).map(|i| json!({"id": format!("s{i:02}"), "mode": "slow"})).collect();
    p.upsert_rows("jobs", json!(rows)).await?;
    apply(&p, "drain", worker_spec(json!({"worker": {"batchSize": 2}}))).await?;
    // Wait until the runner holds a batch (its own status: the batch record
    // commits before the batch is sent), then drain it.
    let start = Instant::now();
    let status_url = format!("http://{}/v1/status", runner.addr);
    loop {
        let st: Value = reqwest::get(&status_url).await?.json().await?;
        if st["batches"].as_array().is_some_and(|b| !b.is_empty()) {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "nothing dispatched: {st}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    runner.stop().await?;
    let open: i64 =
        sqlx::query_scalar("SELECT count(*) FROM batches WHERE state = 'dispatched'").fetch_one(&p.pool).await?;
    assert_eq!(open, 0, "every accepted batch was reported before the runner left");
    let done: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(written), 0)::bigint FROM batches").fetch_one(&p.pool).await?;
    assert!((2..12).contains(&done), "{done} rows done by the drained runner");
    let _second = TestRunner::start(&p, |_| {}).await?;
    let st = p.drained("drain", Duration::from_secs(60)).await?;
    assert_eq!(st["counts"]["completed"], 12, "{st}");
    assert_eq!(st["failed_count"], 0, "{st}");
    Ok(())
}

#[tokio::test]
async fn forged_expired_and_foreign_tokens_are_refused() -> anyhow::Result<()> {
    use layer_protocol::runner::tokens::{Purpose, sign};
    let p = TestPlatform::start().await?;
    let a = TestRunner::start(&p, |_| {}).await?;
    let b = TestRunner::start(&p, |_| {}).await?;
    let key: Vec<u8> =
        sqlx::query_scalar("SELECT signing_key FROM runners WHERE id = $1").bind(&a.id).fetch_one(&p.pool).await?;
    let http = reqwest::Client::new();
    let report = json!({"results": []});
    let post = |path: String, token: String| {
        let http = http.clone();
        let url = format!("{}{path}", p.url);
        let report = report.clone();
        async move { anyhow::Ok(http.post(url).bearer_auth(token).json(&report).send().await?.status().as_u16()) }
    };
    let forged = sign(b"not the runner's key, but 32 b..", &a.id, Purpose::Report(1), 60);
    assert_eq!(post(format!("/v2/runners/{}/batches/1/report", a.id), forged).await?, 401);
    let foreign = sign(&key, &a.id, Purpose::Report(1), 60);
    assert_eq!(post(format!("/v2/runners/{}/batches/1/report", b.id), foreign.clone()).await?, 401);
    assert_eq!(post(format!("/v2/runners/{}/batches/2/report", a.id), foreign).await?, 401, "another batch");
    let session_as_report = sign(&key, &a.id, Purpose::Session, 60);
    assert_eq!(post(format!("/v2/runners/{}/batches/1/report", a.id), session_as_report).await?, 401);
    let expired = {
        use jsonwebtoken::{Algorithm, EncodingKey, Header};
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs();
        let claims = layer_protocol::runner::TokenClaims {
            iss: layer_protocol::runner::TOKEN_ISSUER.into(),
            aud: layer_protocol::runner::AUDIENCE_PLATFORM.into(),
            sub: a.id.clone(),
            iat: now - 120,
            exp: now - 60,
            batch: None,
            call: None,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(&key))?
    };
    let hb = json!({"state": "active", "load": {"batches": 0}});
    let r =
        http.post(format!("{}/v2/runners/{}/heartbeat", p.url, a.id)).bearer_auth(&expired).json(&hb).send().await?;
    assert_eq!(r.status(), 401);
    assert!(r.text().await?.contains("Expired"));
    // Rotation: a session token past half its life is answered with a
    // fresh one, which works; a fresh one is not replaced.
    let aging = sign(&key, &a.id, Purpose::Session, 60);
    let r = http.post(format!("{}/v2/runners/{}/heartbeat", p.url, a.id)).bearer_auth(&aging).json(&hb).send().await?;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await?;
    let fresh = body["token"].as_str().expect("a rotated token").to_string();
    let claims = layer_protocol::runner::tokens::verify(&key, &fresh, &a.id, Purpose::Session).unwrap();
    assert!(layer_protocol::runner::tokens::seconds_left(&claims) > 500, "{claims:?}");
    let r = http.post(format!("{}/v2/runners/{}/heartbeat", p.url, a.id)).bearer_auth(&fresh).json(&hb).send().await?;
    let body: Value = r.json().await?;
    assert!(body.get("token").is_none(), "{body}");
    // Reports are checked against a per-replica cache of runners' keys,
    // filled by the good heartbeats above: the same refusals hold there,
    // and a good token gets past the check (to "no such batch").
    let forged = sign(b"not the runner's key, but 32 b..", &a.id, Purpose::Report(1), 60);
    assert_eq!(post(format!("/v2/runners/{}/batches/1/report", a.id), forged).await?, 401, "cached key");
    let good = sign(&key, &a.id, Purpose::Report(1), 60);
    assert_eq!(post(format!("/v2/runners/{}/batches/2/report", a.id), good.clone()).await?, 401, "another batch");
    let session_as_report = sign(&key, &a.id, Purpose::Session, 60);
    assert_eq!(post(format!("/v2/runners/{}/batches/1/report", a.id), session_as_report).await?, 401);
    assert_eq!(post(format!("/v2/runners/{}/batches/1/report", a.id), good).await?, 404, "cached key, good token");
    // The runner checks the platform's signature on batches it is sent.
    let batch = json!({"batch_id": 5, "udf_id": "x", "revision": 1, "version": "v1", "items": [], "report_token": "t",
                       "worker": {"batch_size": 1, "timeout_seconds": 1, "lease_seconds": 1, "replicas_min": 0, "replicas_max": 1}});
    let forged = sign(b"not the runner's key, but 32 b..", &a.id, Purpose::Dispatch(5), 60);
    let r = http.post(format!("http://{}/v1/batches", a.addr)).bearer_auth(forged).json(&batch).send().await?;
    assert_eq!(r.status(), 401);
    let good = sign(&key, &a.id, Purpose::Dispatch(6), 60);
    let r = http.post(format!("http://{}/v1/batches", a.addr)).bearer_auth(good).json(&batch).send().await?;
    assert_eq!(r.status(), 401, "a token for batch 6 does not carry batch 5");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_echo_example_runs_warm_and_idle_workers_stop() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let _runner = TestRunner::start(&p, |c| c.idle_timeout = Duration::from_secs(1)).await?;
    let rows: Vec<Value> = (0..500).map(|i| json!({"id": format!("e{i:03}"), "title": format!("t{i}")})).collect();
    p.upsert_rows("echo", json!(rows)).await?;
    let doc = std::fs::read_to_string(workspace_dir().join("examples/echo-rust/function.yaml"))?;
    let mut doc: Value = serde_json::to_value(layer_protocol::resource::parse_documents(&doc)?.remove(0))?;
    doc["spec"]["worker"]["command"] = json!([layer_tests::echo_worker_binary()?]);
    doc["spec"]["scaling"]["replicas"] = json!({"min": 0, "max": 2});
    apply(&p, "echo", doc["spec"].clone()).await?;
    let st = p.drained("echo", Duration::from_secs(60)).await?;
    assert_eq!(st["counts"]["completed"], 500, "{st}");
    let (_, d) = p.call(Method::GET, "/v2/namespaces/echo/documents/e042", None).await?;
    assert_eq!(d["attributes"]["echo"], json!({"id": "e042", "title": "t42"}), "{d}");
    // Warm: at most replicas.max workers served all five batches.
    let workers: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT worker FROM batches WHERE function_id = 'echo' AND worker IS NOT NULL")
            .fetch_all(&p.pool)
            .await?;
    assert!(!workers.is_empty() && workers.len() <= 2, "{workers:?}");
    // Idle ones stop after the window (replicas.min is 0): the heartbeat
    // shows no workers.
    let start = Instant::now();
    loop {
        let (_, list) = p.call(Method::GET, "/v2/runners", None).await?;
        if list["runners"][0]["load"]["workers"] == json!([]) {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "idle workers stayed: {list}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_revision_replaces_the_old_workers() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let _runner = TestRunner::start(&p, |_| {}).await?;
    let rows: Vec<Value> = (0..20).map(|i| json!({"id": format!("v{i:02}"), "mode": "ok"})).collect();
    p.upsert_rows("jobs", json!(rows)).await?;
    apply(&p, "revs", worker_spec(json!({"scaling": {"replicas": {"min": 1, "max": 2}}}))).await?;
    p.drained("revs", Duration::from_secs(60)).await?;
    apply(&p, "revs", worker_spec(json!({"version": "v2", "scaling": {"replicas": {"min": 1, "max": 2}}}))).await?;
    let start = Instant::now();
    loop {
        let (_, st) = p.call(Method::GET, "/v2/udfs/revs/status", None).await?;
        let (_, list) = p.call(Method::GET, "/v2/runners", None).await?;
        let workers = list["runners"][0]["load"]["workers"].as_array().cloned().unwrap_or_default();
        let revisions: Vec<i64> = workers.iter().filter_map(|w| w["revision"].as_i64()).collect();
        if st["counts"]["completed"] == 40 && !revisions.is_empty() && revisions.iter().all(|r| *r == 2) {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "old workers stayed: {revisions:?} {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, d) = p.call(Method::GET, "/v2/namespaces/jobs/documents/v07", None).await?;
    assert_eq!(d["attributes"]["_hevlayer_udf_revs_v"], "v2");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_that_cannot_be_reached_costs_no_attempts() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    // A registered runner whose address refuses connections.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let reg = json!({"name": "ghost", "address": format!("http://{closed}"), "drivers": ["process"],
                     "capacity": {"cpus": 1, "memory_bytes": 1, "slots": 1}});
    let (s, r) = p.call(Method::POST, "/v2/runners", Some(reg)).await?;
    assert_eq!(s, 200, "{r}");
    p.upsert_rows("jobs", json!([{"id": "u1", "mode": "ok"}])).await?;
    apply(&p, "unreachable", worker_spec(json!({}))).await?;
    let start = Instant::now();
    loop {
        let abandoned: i64 =
            sqlx::query_scalar("SELECT count(*) FROM batches WHERE state = 'abandoned'").fetch_one(&p.pool).await?;
        if abandoned > 0 {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "no dispatch was attempted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (state, attempts, free, kind): (String, i32, i32, Option<String>) = sqlx::query_as(
        "SELECT state, attempts, free_retries, last_error_kind FROM work_items WHERE function_id = 'unreachable'",
    )
    .fetch_one(&p.pool)
    .await?;
    assert_eq!((state.as_str(), attempts, kind.as_deref()), ("pending", 0, Some("runner_lost")));
    assert!(free >= 1, "a free retry was counted: {free}");
    // The metrics count the failed sends by class, and the free retries.
    let (text, m) = layer_tests::scrape(&p.url).await?;
    assert!(m["layer_dispatch_errors_total{class=\"unreachable\"}"] >= 1.0, "{text}");
    assert_eq!(m["layer_dispatch_errors_total{class=\"refused\"}"], 0.0, "{text}");
    assert!(m["layer_rows_retried_total{udf=\"unreachable\"}"] >= 1.0, "{text}");
    // A real runner then finishes the row (maxAttempts is 1: nothing was spent).
    let _runner = TestRunner::start(&p, |_| {}).await?;
    let st = p.drained("unreachable", Duration::from_secs(30)).await?;
    assert_eq!(st["counts"]["completed"], 1, "{st}");
    let (text, m) = layer_tests::scrape(&p.url).await?;
    assert_eq!(m["layer_batches_dispatched_total{udf=\"unreachable\"}"], 1.0, "only the accepted send: {text}");
    Ok(())
}

async fn condition(p: &TestPlatform, f: &str, reason: &str) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        let (_, st) = p.call(Method::GET, &format!("/v2/udfs/{f}/status"), None).await?;
        if st["conditions"][0]["reason"] == reason {
            return Ok(st["conditions"][0]["message"].as_str().unwrap_or_default().to_string());
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(10), "no {reason} condition: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn functions_that_cannot_be_placed_say_why_in_their_status() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("jobs", json!([{"id": "j1", "mode": "ok"}, {"id": "j2", "mode": "ok"}])).await?;
    // No runner at all.
    let mut imaged = worker_spec(json!({"worker": {"image": "layer/echo-rust:dev"}}));
    imaged["worker"].as_object_mut().unwrap().remove("command");
    apply(&p, "imaged", imaged).await?;
    let m = condition(&p, "imaged", "NoRunner").await?;
    assert!(m.contains("no runner is active"), "{m}");
    // A runner without a Docker engine cannot run images.
    let runner = TestRunner::start(&p, |c| c.docker = false).await?;
    let m = condition(&p, "imaged", "NoRunner").await?;
    assert!(m.contains("no active runner can run images") && m.contains("docker driver"), "{m}");
    // Replicas above the pool's maxReplicasPerWorkload are rejected: the
    // rows wait, and the status says why.
    let rules = json!({"apiVersion": "hevlayer.com/v1alpha1", "kind": "InfraRules", "metadata": {"name": "default"},
        "spec": {"computePools": [{"name": "cpu", "kind": "cpu", "maxReplicasPerWorkload": 2}]}});
    let (s, r) = p.call(Method::POST, "/v2/apply", Some(json!({"documents": [rules]}))).await?;
    assert_eq!(s, 200, "{r}");
    apply(&p, "limited", worker_spec(json!({"scaling": {"replicas": {"min": 0, "max": 3}}}))).await?;
    let m = condition(&p, "limited", "ReplicasRejected").await?;
    assert!(m.contains("scaling.replicas.max 3") && m.contains("maxReplicasPerWorkload (2)"), "{m}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, st) = p.call(Method::GET, "/v2/udfs/limited/status", None).await?;
    assert_eq!(st["counts"]["completed"], 0, "a rejected Function is not run: {st}");
    // Within the limit, it runs and the condition goes.
    apply(&p, "limited", worker_spec(json!({"scaling": {"replicas": {"min": 0, "max": 2}}}))).await?;
    let st = p.drained("limited", Duration::from_secs(30)).await?;
    assert_eq!(st["counts"]["completed"], 2, "{st}");
    assert!(st.get("conditions").is_none(), "{st}");
    runner.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_max_holds_across_the_fleet_in_a_burst() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let mut runners = Vec::new();
    for i in 0..3 {
        runners.push(
            TestRunner::start(&p, |c| {
                c.name = format!("burst-{i}");
                c.slots = Some(4);
            })
            .await?,
        );
    }
    let rows: Vec<Value> = (0..600).map(|i| json!({"id": format!("e{i:03}"), "title": format!("t{i}")})).collect();
    p.upsert_rows("burst", json!(rows)).await?;
    let spec = json!({
        "targetNamespaces": ["burst"], "inputs": ["id", "title"], "triggers": ["discovery"],
        "worker": {"dispatch": "push", "command": [layer_tests::echo_worker_binary()?], "batchSize": 10},
        "schedule": {"maxInFlightBatches": 12},
        "scaling": {"replicas": {"min": 0, "max": 2}},
    });
    // Every runner has room for 4 batches and the Function allows 12 in
    // flight, so each would start workers of its own; the fleet may run 2.
    apply(&p, "burst", spec).await?;
    let st = p.drained("burst", Duration::from_secs(90)).await?;
    assert_eq!(st["counts"]["completed"], 600, "{st}");
    let workers: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT runner_id, worker FROM batches WHERE function_id = 'burst' AND worker IS NOT NULL",
    )
    .fetch_all(&p.pool)
    .await?;
    assert!(!workers.is_empty() && workers.len() <= 2, "{} workers ran at replicas.max 2: {workers:?}", workers.len());
    let held: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(slots), 0)::bigint FROM worker_slots").fetch_one(&p.pool).await?;
    assert!(held <= 2, "{held}");
    for r in runners {
        r.stop().await?;
    }
    Ok(())
}

/// A slot request names the runner's other workers of the Function, so the
/// slot of a worker that crashed or was killed is free for its replacement
/// at once, not at the runner's next heartbeat; a request that names none
/// leaves the runner's slots as they are.
#[tokio::test]
async fn a_slot_request_naming_the_runners_other_workers_frees_the_slots_of_dead_ones() -> anyhow::Result<()> {
    use layer_protocol::runner::tokens::{Purpose, sign};
    let p = TestPlatform::start().await?;
    let a = TestRunner::start(&p, |_| {}).await?;
    apply(
        &p,
        "slots",
        worker_spec(json!({"targetNamespaces": ["none"], "scaling": {"replicas": {"min": 0, "max": 1}}})),
    )
    .await?;
    let key: Vec<u8> =
        sqlx::query_scalar("SELECT signing_key FROM runners WHERE id = $1").bind(&a.id).fetch_one(&p.pool).await?;
    let token = sign(&key, &a.id, Purpose::Session, 60);
    let http = reqwest::Client::new();
    let ask = |body: Value| {
        let r = http.post(format!("{}/v2/runners/{}/worker-slots", p.url, a.id)).bearer_auth(&token).json(&body);
        async move {
            let r = r.send().await?;
            anyhow::ensure!(r.status() == 200, "{}", r.status());
            let v: Value = r.json().await?;
            anyhow::Ok((v["granted"].as_bool().unwrap_or_default(), v["held"].as_u64().unwrap_or(99)))
        }
    };
    assert_eq!(ask(json!({"udf_id": "slots"})).await?, (true, 1), "the first worker");
    // Its worker died; a runner that does not say so waits for a heartbeat.
    assert_eq!(ask(json!({"udf_id": "slots"})).await?, (false, 1), "replicas.max 1 is held");
    assert_eq!(ask(json!({"udf_id": "slots", "others": 1})).await?, (false, 1), "the first worker still runs");
    assert_eq!(ask(json!({"udf_id": "slots", "others": 0})).await?, (true, 1), "the replacement");
    let held: Vec<(String, i32)> =
        sqlx::query_as("SELECT runner_id, slots FROM worker_slots WHERE function_id = 'slots'")
            .fetch_all(&p.pool)
            .await?;
    assert_eq!(held, vec![(a.id.clone(), 1)]);
    let (s, e) =
        p.call(Method::POST, &format!("/v2/runners/{}/worker-slots", a.id), Some(json!({"udf_id": "slots"}))).await?;
    assert_eq!(s, 401, "only the runner asks: {e}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_functions_go_only_to_runners_that_allow_commands() -> anyhow::Result<()> {
    use layer_protocol::runner::tokens::{Purpose, sign};
    let p = TestPlatform::start().await?;
    // A runner whose operator did not pass --allow-commands (and no Docker:
    // it has no driver at all).
    let closed = TestRunner::start(&p, |c| {
        c.allow_commands = false;
        c.docker = false;
    })
    .await?;
    let (_, list) = p.call(Method::GET, "/v2/runners", None).await?;
    assert_eq!(list["runners"][0]["drivers"], json!([]), "no process driver advertised: {list}");
    let rows: Vec<Value> = (0..20).map(|i| json!({"id": format!("c{i:02}"), "mode": "ok"})).collect();
    p.upsert_rows("jobs", json!(rows)).await?;
    apply(&p, "cmds", worker_spec(json!({"worker": {"batchSize": 2}}))).await?;
    let m = condition(&p, "cmds", "NoRunner").await?;
    assert!(m.contains("no active runner allows commands") && m.contains("--allow-commands"), "{m}");
    // Sent one anyway (a placement made on stale drivers), the runner
    // refuses it and says why.
    let key: Vec<u8> =
        sqlx::query_scalar("SELECT signing_key FROM runners WHERE id = $1").bind(&closed.id).fetch_one(&p.pool).await?;
    let batch = json!({"batch_id": 7, "udf_id": "cmds", "revision": 1, "version": "v1", "items": [],
                       "report_token": "t", "worker": {"command": ["python3", "w.py"], "batch_size": 1,
                       "timeout_seconds": 1, "lease_seconds": 1, "replicas_min": 0, "replicas_max": 1}});
    let r = reqwest::Client::new()
        .post(format!("http://{}/v1/batches", closed.addr))
        .bearer_auth(sign(&key, &closed.id, Purpose::Dispatch(7), 60))
        .json(&batch)
        .send()
        .await?;
    let status = r.status().as_u16();
    let body: Value = r.json().await?;
    assert_eq!((status, &body["code"]), (403, &json!("commands_not_allowed")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("--allow-commands"), "{body}");
    // A runner that allows commands runs them all; the other, just as
    // idle, is never sent one (a refused send would leave a batch record).
    let open = TestRunner::start(&p, |_| {}).await?;
    let st = p.drained("cmds", Duration::from_secs(60)).await?;
    assert_eq!(st["counts"]["completed"], 20, "{st}");
    assert!(st.get("conditions").is_none(), "{st}");
    let on: Vec<(String, i64)> =
        sqlx::query_as("SELECT runner_id, count(*) FROM batches WHERE function_id = 'cmds' GROUP BY runner_id")
            .fetch_all(&p.pool)
            .await?;
    assert!(on.len() == 1 && on[0].0 == open.id, "every batch on the runner that allows commands: {on:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_and_deregistered_runners_leave_the_list_after_the_retention() -> anyhow::Result<()> {
    use layer_platform::runners::store::prune;
    let p = TestPlatform::start().await?;
    let day = Duration::from_secs(24 * 3600);
    let register = |name: &str, address: String| {
        json!({"name": name, "address": address, "drivers": ["process"],
               "capacity": {"cpus": 1, "memory_bytes": 1, "slots": 1}})
    };
    // "ghost" never heartbeats: lost. The batch sent to it fails and is
    // recorded under its id.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let (s, ghost) = p.call(Method::POST, "/v2/runners", Some(register("ghost", format!("http://{closed}")))).await?;
    assert_eq!(s, 200, "{ghost}");
    let ghost_id = ghost["runner_id"].as_str().unwrap().to_string();
    // "leaver" deregisters.
    let (_, leaver) = p.call(Method::POST, "/v2/runners", Some(register("leaver", format!("http://{closed}")))).await?;
    let leaver_id = leaver["runner_id"].as_str().unwrap().to_string();
    let r = reqwest::Client::new()
        .post(format!("{}/v2/runners/{leaver_id}/deregister", p.url))
        .bearer_auth(leaver["token"].as_str().unwrap())
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    p.upsert_rows("jobs", json!([{"id": "s1", "mode": "slow"}])).await?;
    let spec = worker_spec(json!({"worker": {"timeoutSeconds": 120, "env": {"SLOW_SECONDS": "60"}},
                                  "schedule": {"leaseSeconds": 300}}));
    apply(&p, "held", spec).await?;
    let start = Instant::now();
    let ghost_batch: i64 = loop {
        let b: Option<i64> = sqlx::query_scalar("SELECT id FROM batches WHERE runner_id = $1 AND state = 'abandoned'")
            .bind(&ghost_id)
            .fetch_optional(&p.pool)
            .await?;
        if let Some(b) = b {
            break b;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "no batch was sent to the ghost");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // "busy" is a real runner holding the slow batch.
    let busy = TestRunner::start(&p, |_| {}).await?;
    let start = Instant::now();
    loop {
        let (_, list) = p.call(Method::GET, "/v2/runners", None).await?;
        let state_of =
            |id: &str| list["runners"].as_array().unwrap().iter().find(|r| r["id"] == id).map(|r| r["state"].clone());
        let st: Value = reqwest::get(format!("http://{}/v1/status", busy.addr)).await?.json().await?;
        if state_of(&ghost_id) == Some(json!("lost")) && st["batches"].as_array().is_some_and(|b| !b.is_empty()) {
            assert_eq!(state_of(&leaver_id), None, "a deregistered runner is not listed: {list}");
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(30), "ghost not lost or busy idle: {list} {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ids = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, String>("SELECT id FROM runners ORDER BY registered_at").fetch_all(&pool).await
    };
    // Lost and deregistered, but not for a day yet: kept.
    assert_eq!(prune(&p.pool, day, None).await?, 0);
    let now = chrono::Utc::now();
    assert_eq!(prune(&p.pool, day, Some(now + chrono::Duration::hours(23))).await?, 0);
    assert_eq!(ids(p.pool.clone()).await?, vec![ghost_id.clone(), leaver_id.clone(), busy.id.clone()]);
    // A day and more later, both go; the runner that holds a batch stays
    // (however silent it would be by then) until the batch is settled.
    assert_eq!(prune(&p.pool, day, Some(now + chrono::Duration::hours(25))).await?, 2);
    assert_eq!(ids(p.pool.clone()).await?, vec![busy.id.clone()]);
    // The batch records of a pruned runner stay readable.
    let (s, b) = p.call(Method::GET, &format!("/v2/batches/{ghost_batch}"), None).await?;
    assert_eq!((s, &b["runner_id"], &b["state"]), (200, &json!(ghost_id), &json!("abandoned")), "{b}");
    let (s, list) = p.call(Method::GET, &format!("/v2/udfs/held/batches?runner={ghost_id}"), None).await?;
    assert!(s == 200 && list["batches"].as_array().unwrap().iter().any(|b| b["id"] == ghost_batch), "{list}");
    Ok(())
}
