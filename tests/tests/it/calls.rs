//! Functions called over HTTP (`POST /v2/udfs/{id}/calls`), through a real
//! runner and real worker processes: the answer, its headers, its record,
//! and every way a call can fail, each with its status and problem.

use std::time::{Duration, Instant};

use layer_tests::{TestPlatform, TestRunner, workspace_dir};
use reqwest::Method;
use serde_json::{Value, json};

/// (status, headers, body) of a call with a JSON body.
async fn call(p: &TestPlatform, udf: &str, body: Value) -> anyhow::Result<(u16, reqwest::header::HeaderMap, Value)> {
    let r = p.request(Method::POST, &format!("/v2/udfs/{udf}/calls"), Some(&p.admin_key)).json(&body).send().await?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await?;
    Ok((status, headers, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

fn header<'a>(h: &'a reqwest::header::HeaderMap, name: &str) -> &'a str {
    h.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
}

/// The call's record, once written (it is written after the answer).
async fn record(p: &TestPlatform, call_id: &str) -> anyhow::Result<Value> {
    let start = Instant::now();
    loop {
        let (status, body) = p.call(Method::GET, &format!("/v2/calls/{call_id}"), None).await?;
        if status == 200 {
            return Ok(body);
        }
        anyhow::ensure!(status == 404, "GET /v2/calls/{call_id}: {status} {body}");
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "call {call_id} never recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The seed's Python example, run as a local process.
async fn tag_products(p: &TestPlatform) -> anyhow::Result<()> {
    let doc = std::fs::read_to_string(workspace_dir().join("examples/tag-products/function.yaml"))?;
    let mut doc: Value = serde_json::to_value(layer_protocol::resource::parse_documents(&doc)?.remove(0))?;
    doc["spec"]["worker"]["command"] = json!(["python3", workspace_dir().join("examples/tag-products/worker.py")]);
    p.apply_function("tag-products", doc["spec"].clone()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_answers_a_call_with_its_tags_and_the_call_is_recorded() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let runner = TestRunner::start(&p, |_| {}).await?;
    tag_products(&p).await?;

    let input = json!({"id": "p1", "title": "Wireless speaker", "description": "waterproof"});
    let (status, h, body) = call(&p, "tag-products", input.clone()).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"tags": ["wireless", "waterproof"]}));
    let first = header(&h, "layer-call-id").to_string();
    assert!(first.starts_with("call_"), "{h:?}");
    assert_eq!(header(&h, "layer-revision"), "1");
    let timing = header(&h, "server-timing");
    assert!(
        timing.starts_with("cold-start;dur=") && timing.contains("worker;dur="),
        "a first call starts a worker: {timing}"
    );

    // The worker stays warm: the next call waits for it, starts none.
    let (status, h, body) = call(&p, "tag-products", json!({"id": "p2", "title": "Lamp"})).await?;
    assert_eq!((status, body), (200, json!({"tags": ["uncategorized"]})));
    assert!(header(&h, "server-timing").starts_with("queue;dur="), "{h:?}");
    let second = header(&h, "layer-call-id").to_string();

    let r = record(&p, &first).await?;
    assert_eq!(r["status"], "succeeded", "{r}");
    assert_eq!(r["http_status"], 200);
    assert_eq!(r["udf_id"], "tag-products");
    assert_eq!(r["revision"], 1);
    assert_eq!(r["runner_id"], runner.id.as_str());
    assert_eq!(r["cold_start"], true);
    assert_eq!(r["request_bytes"], input.to_string().len());
    assert_eq!(r["response_bytes"], json!({"tags": ["wireless", "waterproof"]}).to_string().len());
    assert!(r["worker"].as_str().is_some_and(|w| !w.is_empty()), "{r}");
    assert_eq!(r["trace_id"].as_str().map(str::len), Some(32), "{r}");
    assert_eq!(record(&p, &second).await?["cold_start"], false);

    // Listed newest first, a page at a time.
    let (_, page) = p.call(Method::GET, "/v2/udfs/tag-products/calls?limit=1", None).await?;
    assert_eq!(page["calls"][0]["call_id"], second.as_str(), "{page}");
    let cursor = page["next_cursor"].as_str().expect("a next page").to_string();
    let (_, page) = p.call(Method::GET, &format!("/v2/udfs/tag-products/calls?limit=1&cursor={cursor}"), None).await?;
    assert_eq!(page["calls"][0]["call_id"], first.as_str(), "{page}");
    assert!(page.get("next_cursor").is_none(), "{page}");
    let (_, none) = p.call(Method::GET, "/v2/udfs/tag-products/calls?status=failed", None).await?;
    assert_eq!(none["calls"], json!([]));

    // A permanent error of the Function is the caller's 422.
    let (status, h, body) = call(&p, "tag-products", json!({"id": "p3"})).await?;
    assert_eq!(status, 422, "{body}");
    assert_eq!(header(&h, "content-type"), "application/problem+json");
    assert_eq!(body["code"], "function_error");
    assert!(body["detail"].as_str().unwrap_or_default().contains("missing title"), "{body}");
    let failed = record(&p, header(&h, "layer-call-id")).await?;
    assert_eq!((failed["status"].as_str(), failed["http_status"].as_u64()), (Some("failed"), Some(422)));

    // The platform's metrics count the calls by how they ended, and the
    // one cold start.
    let (text, m) = layer_tests::scrape(&p.url).await?;
    let sample = |k: &str| m.get(k).copied().unwrap_or_default();
    assert_eq!(sample(r#"layer_calls_total{status="succeeded",udf="tag-products"}"#), 2.0, "{text}");
    assert_eq!(sample(r#"layer_calls_total{status="failed",udf="tag-products"}"#), 1.0, "{text}");
    assert_eq!(sample(r#"layer_call_cold_starts_total{udf="tag-products"}"#), 1.0, "{text}");
    assert_eq!(sample(r#"layer_call_duration_seconds_count{udf="tag-products"}"#), 3.0, "{text}");
    runner.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_that_cannot_run_are_refused_before_anything_is_sent() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    // No runner yet: the Function exists, but nothing can take the call.
    tag_products(&p).await?;
    let (status, h, body) = call(&p, "tag-products", json!({"title": "x"})).await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(header(&h, "retry-after"), "1");
    assert!(body["detail"].as_str().unwrap_or_default().contains("no runner is active"), "{body}");

    let (status, h, body) = call(&p, "no-such-function", json!({})).await?;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")), "{body}");
    assert_eq!(header(&h, "content-type"), "application/problem+json");
    assert!(h.get("layer-call-id").is_none(), "nothing was accepted: {h:?}");

    p.call(Method::POST, "/v2/udfs/tag-products/pause", None).await?;
    let (status, _, body) = call(&p, "tag-products", json!({})).await?;
    assert_eq!(status, 409, "{body}");
    assert!(body["detail"].as_str().unwrap_or_default().contains("paused"), "{body}");

    p.apply_function("pulled", json!({"targetNamespaces": ["items"], "worker": {"dispatch": "pull"}})).await?;
    let (status, _, body) = call(&p, "pulled", json!({})).await?;
    assert_eq!((status, body["code"].as_str()), (409, Some("not_callable")), "{body}");

    // A key that may only read may not call.
    let reader = p.mint_key(json!({"r": {"scopes": ["read"]}})).await?;
    let r = p.request(Method::POST, "/v2/udfs/tag-products/calls", Some(&reader)).json(&json!({})).send().await?;
    assert_eq!(r.status().as_u16(), 403);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_crashes_hangs_or_answers_garbage_is_a_502_or_504() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let runner = TestRunner::start(&p, |_| {}).await?;
    let script = workspace_dir().join("tests/python/push_worker.py");
    let spec = json!({"targetNamespaces": ["jobs"], "inputs": ["mode"],
                      "worker": {"dispatch": "push", "command": ["python3", script], "timeoutSeconds": 2},
                      "schedule": {"leaseSeconds": 30}});
    p.apply_function("jobs", spec).await?;

    let (status, h, body) = call(&p, "jobs", json!({"mode": "crash"})).await?;
    assert_eq!((status, body["code"].as_str()), (502, Some("worker_failed")), "{body}");
    assert!(body["detail"].as_str().unwrap_or_default().contains("crashed"), "{body}");
    assert_eq!(body["call_id"].as_str(), Some(header(&h, "layer-call-id")));

    let (status, _, body) = call(&p, "jobs", json!({"mode": "garbage"})).await?;
    assert_eq!((status, body["code"].as_str()), (502, Some("worker_failed")), "{body}");

    let (status, h, body) = call(&p, "jobs", json!({"mode": "hang"})).await?;
    assert_eq!((status, body["code"].as_str()), (504, Some("timeout")), "{body}");
    let r = record(&p, header(&h, "layer-call-id")).await?;
    assert_eq!((r["status"].as_str(), r["http_status"].as_u64()), (Some("timed_out"), Some(504)), "{r}");

    // The replaced worker answers the next call.
    let (status, _, body) = call(&p, "jobs", json!({"mode": "ok"})).await?;
    assert_eq!(status, 200, "{body}");
    assert!(body["result"].as_str().is_some_and(|r| r.starts_with("ok:call_")), "{body}");
    runner.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_worker_answers_through_invoke_with_the_callers_bytes_and_content_type() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let runner = TestRunner::start(&p, |_| {}).await?;
    let doc = std::fs::read_to_string(workspace_dir().join("examples/echo-rust/function.yaml"))?;
    let mut doc: Value = serde_json::to_value(layer_protocol::resource::parse_documents(&doc)?.remove(0))?;
    doc["spec"]["worker"]["command"] = json!([layer_tests::echo_worker_binary()?]);
    assert_eq!(doc["spec"]["worker"]["protocol"], "invoke", "the example speaks invoke: {doc}");
    p.apply_function("echo", doc["spec"].clone()).await?;

    let text = "hello, layer \u{1F44B}\nnot JSON at all";
    let r = p
        .request(Method::POST, "/v2/udfs/echo/calls", Some(&p.admin_key))
        .header("content-type", "text/plain; charset=utf-8")
        .body(text)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(header(r.headers(), "content-type"), "text/plain; charset=utf-8");
    let call_id = header(r.headers(), "layer-call-id").to_string();
    assert_eq!(r.text().await?, text, "the bytes as they came");
    let rec = record(&p, &call_id).await?;
    assert_eq!(
        (rec["request_bytes"].as_u64(), rec["response_bytes"].as_u64()),
        (Some(text.len() as u64), Some(text.len() as u64))
    );

    // Binary bytes with no content type pass through too.
    let bytes: Vec<u8> = (0..=255u8).collect();
    let r = p.request(Method::POST, "/v2/udfs/echo/calls", Some(&p.admin_key)).body(bytes.clone()).send().await?;
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(header(r.headers(), "content-type"), "application/octet-stream");
    assert_eq!(r.bytes().await?.to_vec(), bytes);
    runner.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invoke_key_calls_its_functions_alone_and_anonymous_calls_are_an_admins_opt_in() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let runner = TestRunner::start(&p, |_| {}).await?;
    tag_products(&p).await?;
    p.apply_function("other", json!({"targetNamespaces": ["x"], "worker": {"dispatch": "pull"}})).await?;
    let input = json!({"id": "p1", "title": "Wireless mouse"});

    // A key that may call tag-products, and do nothing else.
    let caller = p.mint_key(json!({"calls": {"scopes": ["invoke"], "functions": ["tag-products"]}})).await?;
    let as_caller = |m: Method, path: &str| p.request(m, path, Some(&caller));
    // (`mint_key` names its keys "t".)
    let key_id: String = sqlx::query_scalar("SELECT key_id FROM api_keys WHERE name = 't'").fetch_one(&p.pool).await?;
    let r = as_caller(Method::POST, "/v2/udfs/tag-products/calls").json(&input).send().await?;
    assert_eq!(r.status().as_u16(), 200);
    let rec = record(&p, header(r.headers(), "layer-call-id")).await?;
    assert_eq!(rec["key_id"], key_id.as_str(), "the record names the calling key: {rec}");
    let r = as_caller(Method::POST, "/v2/udfs/other/calls").json(&input).send().await?;
    assert_eq!(r.status().as_u16(), 404, "another Function is not there for it");
    for path in ["/v2/udfs", "/v2/udfs/tag-products", "/v2/udfs/tag-products/calls", "/v2/namespaces/x/scans"] {
        let r = as_caller(Method::GET, path).send().await?;
        assert!(matches!(r.status().as_u16(), 403 | 404), "{path}: {}", r.status());
    }
    let listed: Value = as_caller(Method::GET, "/v2/namespaces").send().await?.json().await?;
    assert_eq!(listed["namespaces"], json!([]), "it sees no namespace: {listed}");
    // A grant of functions must be an invoke grant.
    let (status, body) = p
        .call(
            Method::POST,
            "/v2/keys",
            Some(json!({"name": "x", "entitlements":
            {"w": {"scopes": ["write"], "functions": ["tag-products"]}}})),
        )
        .await?;
    assert_eq!((status, body["field"].as_str()), (400, Some("entitlements.w.functions")), "{body}");

    // No key: a 401 that says how to authenticate, for a Function that
    // does not take anonymous calls and for one that does not exist alike.
    for udf in ["tag-products", "no-such-function"] {
        let r = p.request(Method::POST, &format!("/v2/udfs/{udf}/calls"), None).json(&input).send().await?;
        assert_eq!(r.status().as_u16(), 401, "{udf}");
        assert_eq!(header(r.headers(), "www-authenticate"), "Bearer realm=\"layer\"");
    }
    // Opening the Function needs an admin: a write key may not.
    let writer = p.mint_key(json!({"w": {"scopes": ["write"]}})).await?;
    let doc = std::fs::read_to_string(workspace_dir().join("examples/tag-products/function.yaml"))?;
    let mut doc: Value = serde_json::to_value(layer_protocol::resource::parse_documents(&doc)?.remove(0))?;
    doc["spec"]["worker"]["command"] = json!(["python3", workspace_dir().join("examples/tag-products/worker.py")]);
    doc["metadata"]["name"] = json!("tag-products");
    doc["spec"]["calls"] = json!({"anonymous": true});
    let apply = json!({"documents": [doc]});
    let (status, body) = p.call_as(&writer, Method::POST, "/v2/apply", Some(apply.clone())).await?;
    assert_eq!(status, 403, "{body}");
    assert!(body["message"].as_str().unwrap_or_default().contains("spec.calls.anonymous"), "{body}");
    let (status, body) = p.call(Method::POST, "/v2/apply", Some(apply)).await?;
    assert_eq!(status, 200, "{body}");
    let r = p.request(Method::POST, "/v2/udfs/tag-products/calls", None).json(&input).send().await?;
    assert_eq!(r.status().as_u16(), 200);
    let rec = record(&p, header(r.headers(), "layer-call-id")).await?;
    assert!(rec.get("key_id").is_none(), "an anonymous call has no key: {rec}");
    let r = p.request(Method::POST, "/v2/udfs/other/calls", None).json(&input).send().await?;
    assert_eq!(r.status().as_u16(), 401, "other Functions still want a key");
    runner.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_call_queue_is_a_429_at_once() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let runner = TestRunner::start(&p, |_| {}).await?;
    let script = workspace_dir().join("tests/python/push_worker.py");
    let spec = json!({"targetNamespaces": ["jobs"], "inputs": ["mode"],
                      "worker": {"dispatch": "push", "command": ["python3", script], "timeoutSeconds": 3},
                      "schedule": {"leaseSeconds": 30}, "calls": {"queue": 1}});
    p.apply_function("jobs", spec).await?;
    let status_url = format!("http://{}/v1/status", runner.addr);
    let http = reqwest::Client::new();
    // One call holds the only place (its worker hangs until the timeout);
    // once its worker is busy, a second call is refused at once.
    let holding = call(&p, "jobs", json!({"mode": "hang"}));
    let refused = async {
        let start = Instant::now();
        loop {
            let status: Value = http.get(&status_url).send().await?.json().await?;
            if status["workers"].as_array().is_some_and(|w| w.iter().any(|w| w["state"] == "busy")) {
                break;
            }
            anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "no worker ever busy: {status}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let t = Instant::now();
        let answer = call(&p, "jobs", json!({"mode": "ok"})).await?;
        Ok::<_, anyhow::Error>((answer, t.elapsed()))
    };
    let (held, refused) = tokio::join!(holding, refused);
    let ((status, h, body), took) = refused?;
    assert_eq!((status, body["code"].as_str()), (429, Some("queue_full")), "{body}");
    assert_eq!(header(&h, "retry-after"), "1");
    assert!(took < Duration::from_secs(2), "refused at once, not after a wait: {took:?}");
    assert_eq!(held?.0, 504, "the held call timed out as its worker hung");
    // The place is given back: the next call runs.
    let (status, _, body) = call(&p, "jobs", json!({"mode": "ok"})).await?;
    assert_eq!(status, 200, "{body}");
    runner.stop().await?;
    Ok(())
}

/// Calls and batches of one Function share its workers: while a drain of
/// 100,000 rows keeps every worker busy, a call takes the next worker that
/// comes free (calls and waiting batches take turns), so it is answered
/// within about one batch's time plus its idle latency, not after the
/// drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_is_answered_during_a_drain_of_the_same_function() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let runner = TestRunner::start(&p, |_| {}).await?;
    // Rows are queued as they are written (the write trigger).
    let spec = json!({"targetNamespaces": ["bulk"], "inputs": ["id"], "triggers": ["discovery", "write"],
                      "worker": {"dispatch": "push", "command": [layer_tests::echo_worker_binary()?],
                                 "batchSize": 100, "timeoutSeconds": 30},
                      "schedule": {"maxInFlightBatches": 8},
                      "scaling": {"mode": "fixed", "replicas": {"min": 2, "max": 2}}});
    p.apply_function("bulk", spec).await?;
    // Idle: what a call costs with a warm worker free.
    call(&p, "bulk", json!({"id": "warm-up"})).await?;
    let t = Instant::now();
    let (status, _, _) = call(&p, "bulk", json!({"id": "idle"})).await?;
    assert_eq!(status, 200);
    let idle = t.elapsed();

    for chunk in 0..20 {
        let rows: Vec<Value> = (0..5_000).map(|i| json!({"id": format!("r{}", chunk * 5_000 + i)})).collect();
        p.upsert_rows("bulk", json!(rows)).await?;
    }
    let start = Instant::now();
    loop {
        let (_, st) = p.call(Method::GET, "/v2/udfs/bulk/status", None).await?;
        if st["processing_count"].as_u64() > Some(0) {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(60), "the drain never started: {st}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut during = Vec::new();
    for i in 0..5 {
        let t = Instant::now();
        let (status, _, body) = call(&p, "bulk", json!({"id": format!("during-{i}")})).await?;
        assert_eq!(status, 200, "{body}");
        during.push(t.elapsed());
    }
    let (_, st) = p.call(Method::GET, "/v2/udfs/bulk/status", None).await?;
    let left = st["pending_count"].as_u64().unwrap_or(0) + st["processing_count"].as_u64().unwrap_or(0);
    assert!(left > 0, "the calls were answered while the drain ran: {st}");
    let st = p.drained("bulk", Duration::from_secs(600)).await?;
    assert_eq!(st["counts"]["completed"], 100_000, "{st}");

    // The longest batch, from the dispatch of its lease to its report.
    let longest: f64 = sqlx::query_scalar(
        "SELECT coalesce(max(extract(epoch FROM finished_at - dispatched_at)), 0)::float8 FROM batches",
    )
    .fetch_one(&p.pool)
    .await?;
    let bound = Duration::from_secs_f64(longest) + idle + Duration::from_secs(1);
    for d in &during {
        assert!(*d <= bound, "a call took {d:?} during the drain; batches took up to {longest:.3} s, idle {idle:?}");
    }
    runner.stop().await?;
    Ok(())
}
