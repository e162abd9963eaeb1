//! Traces, metrics, batch records and failed rows, end to end: an
//! in-test OTLP/HTTP receiver decodes what the platform, the runner and the
//! worker export; `/metrics` is parsed (and checked by `promtool` where it
//! is installed); the batch API is compared with what happened.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use layer_tests::otlp::{BATCH_SPANS, GotSpan, otlp_receiver, promtool_accepts};
use layer_tests::scrape;
use layer_tests::{TestPlatform, TestRunner, workspace_dir};
use reqwest::Method;
use serde_json::{Value, json};

/// The spans of trace `trace_id`, once every span named in `want` has
/// arrived (flushing the exporter while waiting).
async fn trace_with(
    traces: &layer_telemetry::TraceGuard,
    spans: &layer_tests::otlp::Spans,
    trace_id: &str,
    want: &[&str],
) -> anyhow::Result<Vec<GotSpan>> {
    let start = Instant::now();
    loop {
        traces.flush();
        let got: Vec<GotSpan> = spans.lock().unwrap().iter().filter(|s| s.trace_id == trace_id).cloned().collect();
        if want.iter().all(|w| got.iter().any(|s| s.name == *w)) {
            return Ok(got);
        }
        let names: Vec<&str> = got.iter().map(|s| s.name.as_str()).collect();
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "spans of trace {trace_id} so far: {names:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The name of the parent of the span named `name`, or `<id>` when the
/// parent is not among `got`.
fn parent_name(got: &[GotSpan], name: &str) -> String {
    let s = got.iter().find(|s| s.name == name).unwrap_or_else(|| panic!("no span {name}: {got:#?}"));
    got.iter()
        .find(|p| p.span_id == s.parent_id)
        .map(|p| p.name.clone())
        .unwrap_or_else(|| format!("<{}>", s.parent_id))
}

fn worker_spec(env: Value) -> Value {
    let script = workspace_dir().join("tests/python/push_worker.py");
    json!({
        "targetNamespaces": ["jobs"],
        "inputs": ["id", "mode"],
        "worker": {"dispatch": "push", "command": ["python3", script], "batchSize": 8, "timeoutSeconds": 10, "env": env},
        "retry": {"maxAttempts": 1, "initialBackoffSeconds": 0, "maxBackoffSeconds": 0},
        "schedule": {"leaseSeconds": 30}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_is_one_trace_across_platform_runner_and_worker() -> anyhow::Result<()> {
    let (otlp, spans) = otlp_receiver().await?;
    let traces =
        layer_telemetry::init_traces("layer-test", layer_telemetry::TraceExport::Endpoint(format!("{otlp}/v1/traces")))
            .map_err(anyhow::Error::msg)?;
    let p = TestPlatform::start().await?;
    let runner = TestRunner::start(&p, |_| {}).await?;
    p.apply_function("traced", worker_spec(json!({"OTEL_EXPORTER_OTLP_ENDPOINT": otlp}))).await?;
    let r = p
        .request(Method::POST, "/v2/udfs/traced/calls", Some(&p.admin_key))
        .json(&json!({"mode": "ok"}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    let call_id = r.headers().get("layer-call-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    // The record names the trace (it is written after the answer).
    let start = Instant::now();
    let record = loop {
        let (status, record) = p.call(Method::GET, &format!("/v2/calls/{call_id}"), None).await?;
        if status == 200 {
            break record;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "call {call_id} never recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let trace_id = record["trace_id"].as_str().unwrap_or_default().to_string();
    assert_eq!(trace_id.len(), 32, "{record}");

    let request = "POST /v2/udfs/{id}/calls";
    let want = [request, "layer.call", "layer.runner.call", "layer.worker.acquire", "layer.worker.call", "worker.run"];
    let got = trace_with(&traces, &spans, &trace_id, &want).await?;
    let by_name: HashMap<&str, &GotSpan> = got.iter().map(|s| (s.name.as_str(), s)).collect();
    let parent_of = |name: &str| parent_name(&got, name);
    let roots: Vec<&str> = got.iter().filter(|s| s.parent_id.is_empty()).map(|s| s.name.as_str()).collect();
    assert_eq!(roots, [request], "{got:#?}");
    assert_eq!(parent_of("layer.call"), request);
    assert_eq!(parent_of("layer.runner.call"), "layer.call", "the runner continues the platform's trace");
    assert_eq!(parent_of("layer.worker.acquire"), "layer.runner.call");
    assert_eq!(parent_of("layer.worker.call"), "layer.runner.call");
    assert_eq!(parent_of("worker.run"), "layer.worker.call", "the worker joins through traceparent");
    assert_eq!(by_name["layer.call"].attrs["layer.call.id"], call_id);
    assert_eq!(by_name["layer.call"].attrs["layer.call.status"], "succeeded");
    assert_eq!(by_name["layer.worker.acquire"].attrs["layer.worker.cold_start"], "true", "the call started a worker");
    runner.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_push_batch_is_one_trace_across_platform_runner_and_worker() -> anyhow::Result<()> {
    let (otlp, spans) = otlp_receiver().await?;
    let traces =
        layer_telemetry::init_traces("layer-test", layer_telemetry::TraceExport::Endpoint(format!("{otlp}/v1/traces")))
            .map_err(anyhow::Error::msg)?;
    let p = TestPlatform::start().await?;
    let runner = TestRunner::start(&p, |_| {}).await?;
    let rows: Vec<Value> = (0..8).map(|i| json!({"id": format!("r{i}"), "mode": "ok"})).collect();
    p.upsert_rows("jobs", json!(rows)).await?;
    p.apply_function("traced", worker_spec(json!({"OTEL_EXPORTER_OTLP_ENDPOINT": otlp}))).await?;
    let st = p.drained("traced", Duration::from_secs(60)).await?;
    assert_eq!(st["counts"]["completed"], 8, "{st}");

    // The batch record names the trace.
    let (status, list) = p.call(Method::GET, "/v2/udfs/traced/batches", None).await?;
    assert_eq!(status, 200, "{list}");
    let batches = list["batches"].as_array().unwrap();
    assert_eq!(batches.len(), 1, "8 rows at batchSize 8: {list}");
    let record = &batches[0];
    let trace_id = record["trace_id"].as_str().unwrap().to_string();
    assert_eq!(trace_id.len(), 32, "{record}");

    // Every span of the batch arrives, in one trace, the worker's too.
    let want: Vec<&str> = BATCH_SPANS.iter().copied().chain(["worker.run"]).collect();
    let got = trace_with(&traces, &spans, &trace_id, &want).await?;
    let by_name: HashMap<&str, &GotSpan> = got.iter().map(|s| (s.name.as_str(), s)).collect();
    let parent_of = |name: &str| parent_name(&got, name);
    // One root; every other span's parent is in the trace.
    let roots: Vec<&str> = got.iter().filter(|s| s.parent_id.is_empty()).map(|s| s.name.as_str()).collect();
    assert_eq!(roots, ["layer.batch"], "{got:#?}");
    for s in &got {
        assert!(
            s.parent_id.is_empty() || got.iter().any(|p| p.span_id == s.parent_id),
            "{} has no parent: {got:#?}",
            s.name
        );
        assert!(!s.error, "{} failed: {s:?}", s.name);
    }
    assert_eq!(parent_of("layer.lease"), "layer.batch");
    assert_eq!(parent_of("layer.dispatch"), "layer.batch");
    assert_eq!(parent_of("layer.runner.batch"), "layer.dispatch", "the runner continues the platform's trace");
    assert_eq!(parent_of("layer.worker.acquire"), "layer.runner.batch");
    assert_eq!(parent_of("layer.worker.call"), "layer.runner.batch");
    assert_eq!(parent_of("worker.run"), "layer.worker.call", "the worker joins through traceparent");
    assert_eq!(parent_of("layer.report"), "layer.runner.batch");
    let report_request = parent_of("layer.writeback");
    assert_eq!(report_request, "POST /v2/runners/{id}/batches/{batch}/report");
    assert_eq!(parent_of(&report_request), "layer.report", "the platform continues the runner's report");
    assert_eq!(by_name["worker.run"].service, "push-worker");
    assert_eq!(by_name["layer.batch"].service, "layer-test");

    // The attributes name the batch and count its outcome.
    let batch_id = record["id"].as_i64().unwrap().to_string();
    let root = by_name["layer.batch"];
    assert_eq!(root.attrs["layer.udf"], "traced");
    assert_eq!(root.attrs["layer.batch.id"], batch_id);
    assert_eq!(root.attrs["layer.batch.size"], "8");
    assert_eq!(root.attrs["layer.runner"], runner.id);
    assert_eq!(
        by_name["layer.worker.acquire"].attrs["layer.worker.cold_start"], "true",
        "the first batch starts a worker"
    );
    assert_eq!(by_name["layer.writeback"].attrs["layer.batch.written"], "8");
    assert_eq!(by_name["layer.runner.batch"].attrs["layer.batch.ok"], "8");

    // The record's timings are in order.
    assert_eq!(record["state"], "reported");
    assert_eq!((record["items"].as_i64(), record["written"].as_i64()), (Some(8), Some(8)), "{record}");
    assert_eq!(record["cold_start"], true, "{record}");
    assert!(record["worker"].as_str().is_some_and(|w| w.starts_with("traced-r")), "{record}");
    let t = |k: &str| {
        chrono::DateTime::parse_from_rfc3339(record[k].as_str().unwrap_or_else(|| panic!("{k} missing: {record}")))
            .unwrap()
    };
    assert!(t("queued_at") <= t("dispatched_at"), "{record}");
    assert!(t("started_at") <= t("ended_at"), "{record}");
    assert!(t("ended_at") <= t("finished_at"), "{record}");
    let (_, one) = p.call(Method::GET, &format!("/v2/batches/{batch_id}"), None).await?;
    assert_eq!(&one, record);

    // A worker that answers garbage: its call span and the batch's runner
    // span record the error; the writeback counts the failed row.
    p.upsert_rows("broken", json!([{"id": "g1", "mode": "garbage"}])).await?;
    let mut broken = worker_spec(json!({}));
    broken["targetNamespaces"] = json!(["broken"]);
    p.apply_function("broken", broken).await?;
    let st = p.drained("broken", Duration::from_secs(60)).await?;
    assert_eq!(st["failed_count"], 1, "{st}");
    let (_, list) = p.call(Method::GET, "/v2/udfs/broken/batches", None).await?;
    let broken_trace = list["batches"][0]["trace_id"].as_str().unwrap().to_string();
    let got = trace_with(&traces, &spans, &broken_trace, &BATCH_SPANS).await?;
    let span = |name: &str| got.iter().find(|s| s.name == name).unwrap();
    assert!(span("layer.worker.call").error, "{got:#?}");
    assert!(!span("layer.runner.batch").error, "the batch itself was reported: {got:#?}");
    assert_eq!(span("layer.runner.batch").attrs["layer.batch.failed"], "1");
    assert_eq!(span("layer.writeback").attrs["layer.batch.failed"], "1");
    runner.stop().await?;

    // The pull protocol: a claim and a completion sent with a caller's
    // traceparent are server spans under it, each with its pull span.
    let pull = json!({"targetNamespaces": ["jobs"], "inputs": ["id"], "worker": {"dispatch": "pull"}});
    p.apply_function("pulled", pull).await?;
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{caller_trace}-{caller_span}-01");
    let start = Instant::now();
    let items = loop {
        let r = p
            .request(Method::POST, "/v2/udfs/pulled/claim", Some(&p.admin_key))
            .header("traceparent", &traceparent)
            .json(&json!({"worker_id": "puller", "limit": 2}))
            .send()
            .await?;
        let body: Value = r.json().await?;
        if body["items"].as_array().is_some_and(|i| !i.is_empty()) {
            break body["items"].clone();
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "nothing to claim: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let done: Vec<Value> =
        items.as_array().unwrap().iter().map(|i| json!({"namespace": i["namespace"], "id": i["id"]})).collect();
    let r = p
        .request(Method::POST, "/v2/udfs/pulled/items/complete", Some(&p.admin_key))
        .header("traceparent", &traceparent)
        .json(&json!({"worker_id": "puller", "items": done}))
        .send()
        .await?;
    assert_eq!(r.status(), 200);
    let start = Instant::now();
    let pulled: Vec<GotSpan> = loop {
        traces.flush();
        let got: Vec<GotSpan> = spans.lock().unwrap().iter().filter(|s| s.trace_id == caller_trace).cloned().collect();
        if got.iter().any(|s| s.name == "layer.claim" && s.attrs.get("layer.batch.size").is_some_and(|n| n != "0"))
            && got.iter().any(|s| s.name == "layer.complete")
        {
            break got;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "pull spans so far: {got:#?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    for (server, inner) in
        [("POST /v2/udfs/{id}/claim", "layer.claim"), ("POST /v2/udfs/{id}/items/complete", "layer.complete")]
    {
        let inner = pulled.iter().rfind(|s| s.name == inner).unwrap();
        let parent = pulled.iter().find(|s| s.span_id == inner.parent_id).expect("the request's span");
        assert_eq!(parent.name, server);
        assert_eq!(parent.parent_id, caller_span, "the request continues the caller's trace");
        assert_eq!(parent.attrs["http.response.status_code"], "200");
        assert_eq!(inner.attrs["layer.worker"], "puller");
    }
    let complete = pulled.iter().find(|s| s.name == "layer.complete").unwrap();
    assert_eq!(complete.attrs["layer.batch.written"], items.as_array().unwrap().len().to_string());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_batch_records_and_failed_rows_follow_a_drain() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let mut rows: Vec<Value> = (0..14).map(|i| json!({"id": format!("ok{i:02}"), "mode": "ok"})).collect();
    rows.push(json!({"id": "bad1", "mode": "permanent"}));
    rows.push(json!({"id": "bad2", "mode": "permanent"}));
    p.upsert_rows("jobs", json!(rows)).await?;
    p.apply_function("metered", worker_spec(json!({}))).await?;

    // No runner yet: the queue depth is every row.
    let start = Instant::now();
    loop {
        let (_, m) = scrape(&p.url).await?;
        if m.get("layer_udf_queue_depth{udf=\"metered\"}") == Some(&16.0) {
            break;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(20), "queue depth never reached 16: {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let runner = TestRunner::start(&p, |_| {}).await?;
    p.drained("metered", Duration::from_secs(60)).await?;
    let (text, m) = scrape(&p.url).await?;
    assert_eq!(m["layer_udf_queue_depth{udf=\"metered\"}"], 0.0, "{text}");
    assert_eq!(m["layer_udf_failed_rows{udf=\"metered\"}"], 2.0, "{text}");
    assert_eq!(m["layer_rows_completed_total{udf=\"metered\"}"], 14.0, "{text}");
    assert_eq!(m["layer_rows_failed_total{udf=\"metered\"}"], 2.0, "{text}");
    assert_eq!(m["layer_batches_in_flight{udf=\"metered\"}"], 0.0, "{text}");
    assert_eq!(m["layer_runners{state=\"active\"}"], 1.0, "{text}");
    assert!(m["layer_batch_duration_seconds_count{udf=\"metered\"}"] >= 2.0, "{text}");
    assert!(m.keys().any(|k| k.starts_with("layer_discovery_sweep_duration_seconds_count")), "{text}");
    assert!(!text.contains("ok01"), "no row ids in labels");
    promtool_accepts(&text, "platform")?;

    let (rtext, rm) = scrape(&format!("http://{}", runner.addr)).await?;
    assert!(rm["layer_runner_worker_acquisitions_total{start=\"cold\",udf=\"metered\"}"] >= 1.0, "{rtext}");
    assert!(rm["layer_runner_worker_call_duration_seconds_count{udf=\"metered\"}"] >= 2.0, "{rtext}");
    assert_eq!(rm["layer_runner_batches_in_flight"], 0.0, "{rtext}");
    assert!(rm.keys().any(|k| k.starts_with("layer_runner_workers{")), "a warm worker is listed: {rtext}");
    promtool_accepts(&rtext, "runner")?;

    // Batch records add up to what happened.
    let (_, list) = p.call(Method::GET, "/v2/udfs/metered/batches?limit=100", None).await?;
    let batches = list["batches"].as_array().unwrap();
    let sum = |k: &str| batches.iter().map(|b| b[k].as_i64().unwrap()).sum::<i64>();
    assert_eq!((sum("items"), sum("written"), sum("failed")), (16, 14, 2), "{list}");
    assert!(batches.iter().all(|b| b["state"] == "reported" && b["runner_id"] == runner.id.as_str()), "{list}");
    let ids: Vec<i64> = batches.iter().map(|b| b["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] > w[1]), "newest first: {ids:?}");
    // Pages of one.
    let (_, page) = p.call(Method::GET, "/v2/udfs/metered/batches?limit=1", None).await?;
    assert_eq!(page["batches"][0]["id"], ids[0]);
    let cursor = page["next_cursor"].as_str().expect("a next page").to_string();
    let (_, page2) = p.call(Method::GET, &format!("/v2/udfs/metered/batches?limit=1&cursor={cursor}"), None).await?;
    assert_eq!(page2["batches"][0]["id"], ids[1], "{page2}");
    // Filters.
    let (_, none) = p.call(Method::GET, "/v2/udfs/metered/batches?state=abandoned", None).await?;
    assert_eq!(none["batches"], json!([]), "{none}");
    let (_, other) = p.call(Method::GET, "/v2/udfs/metered/batches?runner=nobody", None).await?;
    assert_eq!(other["batches"], json!([]), "{other}");
    let (_, later) = p.call(Method::GET, "/v2/udfs/metered/batches?since=2999-01-01T00:00:00Z", None).await?;
    assert_eq!(later["batches"], json!([]), "{later}");
    let (status, bad) = p.call(Method::GET, "/v2/udfs/metered/batches?state=bogus", None).await?;
    assert_eq!((status, bad["field"].as_str()), (400, Some("state")), "{bad}");
    let (status, bad) = p.call(Method::GET, "/v2/udfs/metered/batches?since=yesterday", None).await?;
    assert_eq!((status, bad["field"].as_str()), (400, Some("since")), "{bad}");
    let (status, _) = p.call(Method::GET, "/v2/batches/999999999", None).await?;
    assert_eq!(status, 404);
    let (status, _) = p.call(Method::GET, "/v2/udfs/nope/batches", None).await?;
    assert_eq!(status, 404);

    // The failed rows, with their last error.
    let (_, failed) = p.call(Method::GET, "/v2/udfs/metered/failed", None).await?;
    let got: Vec<(String, String, String, i64)> = failed["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["error_kind"].as_str().unwrap_or_default().to_string(),
                r["error"].as_str().unwrap_or_default().to_string(),
                r["attempts"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("bad1".into(), "permanent".into(), "cannot do bad1".into(), 1),
            ("bad2".into(), "permanent".into(), "cannot do bad2".into(), 1)
        ],
        "{failed}"
    );
    let (_, first) = p.call(Method::GET, "/v2/udfs/metered/failed?limit=1", None).await?;
    let cursor = first["next_cursor"].as_str().expect("a second page").to_string();
    let (_, second) = p.call(Method::GET, &format!("/v2/udfs/metered/failed?limit=1&cursor={cursor}"), None).await?;
    assert_eq!(second["rows"][0]["id"], "bad2", "{second}");
    assert!(second.get("next_cursor").is_none(), "{second}");
    runner.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_batch_records_go_after_the_retention() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    p.apply_function("kept", worker_spec(json!({}))).await?;
    for (id, state, age_hours) in
        [(1, "reported", 200), (2, "abandoned", 200), (3, "reported", 1), (4, "dispatched", 200)]
    {
        sqlx::query(
            "INSERT INTO batches (id, function_id, revision, runner_id, state, items, dispatched_at, finished_at)
             VALUES ($1, 'kept', 1, 'r', $2, 1, now() - make_interval(hours => $3),
                     CASE WHEN $2 = 'dispatched' THEN NULL ELSE now() - make_interval(hours => $3) END)",
        )
        .bind(id as i64)
        .bind(state)
        .bind(age_hours)
        .execute(&p.pool)
        .await?;
    }
    let n = layer_platform::runners::records::prune(&p.pool, Duration::from_secs(168 * 3600)).await?;
    assert_eq!(n, 2);
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM batches ORDER BY id").fetch_all(&p.pool).await?;
    assert_eq!(left, [3, 4], "recent and open records stay");
    Ok(())
}
