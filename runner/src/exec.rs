//! Running one batch on a worker: `POST /run` with the timeout enforced,
//! the answer size-capped and checked, every misbehaviour turned into a
//! classified per-row failure with a message, and a batch that fails as a
//! whole split in halves (recursively) so one poison row cannot sink its
//! neighbours.

use std::collections::HashMap;
use std::time::Duration;

use layer_protocol::call::{CallAnswer, CallAssignment, CallOutcome, Passthrough};
use layer_protocol::function::CallProtocol;
use layer_protocol::runner::{BatchAssignment, FailureKind, RowError, RowResult, RunRequest};
use layer_protocol::work::ClaimedItem;
use layer_telemetry::trace::{KeyValue, Span, SpanKind};
use serde_json::{Map, Value};

use crate::pool::{AcquireError, Pools, Want, WorkerLease};

/// What a batch run needs.
#[derive(Clone)]
pub struct Exec {
    pub pools: Pools,
    pub http: reqwest::Client,
    /// The largest worker answer read.
    pub max_response_bytes: usize,
}

/// Why a call failed as a whole.
#[derive(Debug, Clone, PartialEq)]
enum CallFailure {
    Timeout(u32),
    Crashed(String),
    /// The worker was killed for exceeding its memory limit.
    OutOfMemory(String),
    Status(u16, String),
    Overloaded,
    Garbage(String),
    /// A GPU bound to the worker was cordoned mid-call.
    GpuLost(String),
}

impl CallFailure {
    fn row_error(&self) -> RowError {
        let (kind, message) = match self {
            CallFailure::Timeout(s) => (
                FailureKind::Timeout,
                format!("the worker did not answer within timeoutSeconds ({s} s); it was killed and replaced"),
            ),
            CallFailure::Crashed(m) => (FailureKind::Transient, format!("the worker crashed mid-batch: {m}")),
            CallFailure::OutOfMemory(m) => {
                (FailureKind::Oom, format!("the worker ran out of memory mid-batch and was killed: {m}"))
            }
            CallFailure::Status(code, body) => {
                (FailureKind::Transient, format!("the worker answered HTTP {code}: {body}"))
            }
            CallFailure::Overloaded => {
                (FailureKind::Transient, "the worker is overloaded (HTTP 429); try again later".to_string())
            }
            CallFailure::Garbage(m) => (FailureKind::Transient, format!("the worker's answer is not valid: {m}")),
            CallFailure::GpuLost(m) => (FailureKind::RunnerLost, format!("{m}; the batch is reissued")),
        };
        RowError { kind, message }
    }

    /// What a call that failed so ends as.
    fn call_outcome(&self) -> CallOutcome {
        match self {
            CallFailure::Timeout(_) => CallOutcome::TimedOut,
            CallFailure::Overloaded => CallOutcome::Busy,
            CallFailure::GpuLost(_) => CallOutcome::Unavailable,
            CallFailure::Crashed(_)
            | CallFailure::OutOfMemory(_)
            | CallFailure::Status(..)
            | CallFailure::Garbage(_) => CallOutcome::WorkerFailed,
        }
    }

    /// Whether splitting the batch could help: not for an overloaded worker.
    fn splits(&self) -> bool {
        !matches!(self, CallFailure::Overloaded | CallFailure::GpuLost(_))
    }
}

fn failed(items: &[ClaimedItem], error: &RowError) -> Vec<RowResult> {
    items
        .iter()
        .map(|i| RowResult {
            namespace: i.namespace.clone(),
            id: i.id.clone(),
            attributes: None,
            vector: None,
            error: Some(error.clone()),
        })
        .collect()
}

/// A worker's answer to a call: its one item's result (`run`), or its own
/// HTTP answer (`invoke`).
enum Answered {
    Item(Option<RowResult>),
    Passthrough(Passthrough),
}

/// What ran a batch, for its report and its spans.
#[derive(Debug, Clone, Default)]
pub struct Ran {
    /// The worker that ran it (the last one, if it was split).
    pub worker: Option<String>,
    /// The UUIDs of the GPUs that worker held.
    pub gpus: Vec<String>,
    /// Whether any worker was started for it.
    pub cold: bool,
}

impl Exec {
    /// Runs a batch to per-row results, one for each item, in item order,
    /// with spans for each worker acquisition and call under `span`.
    pub async fn run(&self, a: &BatchAssignment, span: &Span) -> (Vec<RowResult>, Ran) {
        let mut ran = Ran::default();
        let results = self.run_items(a, &a.items, &mut ran, span).await;
        (results, ran)
    }

    /// Runs one call: on a worker of the Function's pool, as a batch of
    /// one item (`id`: the call id, `namespace`: empty, `input`: the
    /// caller's object), with the batch's timeout and checks.
    pub async fn run_call(&self, c: &CallAssignment, span: &Span) -> CallAnswer {
        let a = BatchAssignment {
            batch_id: 0,
            udf_id: c.udf_id.clone(),
            revision: c.revision,
            version: c.version.clone(),
            worker: c.worker.clone(),
            items: vec![ClaimedItem { namespace: String::new(), id: c.call_id.clone(), input: c.input.clone() }],
            report_token: String::new(),
        };
        let mut answer = CallAnswer {
            outcome: CallOutcome::Unavailable,
            output: None,
            error: None,
            worker: None,
            cold_start: false,
            gpus: Vec::new(),
            passthrough: None,
            acquire_ms: 0.0,
            worker_ms: 0.0,
        };
        let wait = Duration::from_secs(u64::from(c.worker.timeout_seconds));
        let started = std::time::Instant::now();
        let acquiring = span.child("layer.worker.acquire", SpanKind::Internal, vec![]);
        let acquired = self.pools.acquire(&c.udf_id, c.revision, &c.worker, wait, Want::Call).await;
        answer.acquire_ms = started.elapsed().as_secs_f64() * 1000.0;
        let mut lease = match acquired {
            Ok(l) => l,
            Err(e) => {
                let (outcome, m) = match e {
                    AcquireError::StartFailed(m) => {
                        (CallOutcome::WorkerFailed, format!("the worker did not start: {m}"))
                    }
                    AcquireError::Busy(m) => (CallOutcome::Busy, m),
                    AcquireError::Unavailable(m) => (CallOutcome::Unavailable, m),
                };
                acquiring.error(m.clone());
                acquiring.end();
                answer.outcome = outcome;
                answer.error = Some(m);
                return answer;
            }
        };
        let w = lease.worker();
        acquiring.set([
            KeyValue::new("layer.worker", w.name().to_string()),
            KeyValue::new("layer.worker.cold_start", lease.cold),
        ]);
        acquiring.end();
        crate::metrics::METRICS
            .worker_acquisitions
            .with_label_values(&[c.udf_id.as_str(), if lease.cold { "cold" } else { "warm" }])
            .inc();
        answer.worker = Some(w.name().to_string());
        answer.gpus = w.gpus().uuids().to_vec();
        answer.cold_start = lease.cold;
        let calling = span.child(
            "layer.worker.call",
            SpanKind::Client,
            vec![KeyValue::new("layer.worker", w.name().to_string())],
        );
        let started = std::time::Instant::now();
        let outcome = match c.worker.protocol {
            CallProtocol::Invoke => self.invoke(&mut lease, c, &calling).await.map(Answered::Passthrough),
            CallProtocol::Run => {
                self.call(&mut lease, &a, &a.items, &calling).await.map(|mut r| Answered::Item(r.pop()))
            }
        };
        answer.worker_ms = started.elapsed().as_secs_f64() * 1000.0;
        crate::metrics::METRICS.worker_call_duration.with_label_values(&[&c.udf_id]).observe(answer.worker_ms / 1000.0);
        match outcome {
            Ok(Answered::Passthrough(p)) => {
                calling.set([KeyValue::new("http.response.status_code", i64::from(p.status))]);
                answer.outcome = CallOutcome::Succeeded;
                answer.passthrough = Some(p);
            }
            Ok(Answered::Item(Some(RowResult { error: None, attributes, .. }))) => {
                answer.outcome = CallOutcome::Succeeded;
                answer.output = Some(attributes.unwrap_or_default());
            }
            Ok(Answered::Item(Some(RowResult { error: Some(e), .. }))) => {
                answer.outcome =
                    if e.kind == FailureKind::Permanent { CallOutcome::Failed } else { CallOutcome::Transient };
                calling.error(e.message.clone());
                answer.error = Some(e.message);
            }
            Ok(Answered::Item(None)) => {
                answer.outcome = CallOutcome::WorkerFailed;
                answer.error = Some("the worker's answer held no result".into());
            }
            Err(f) => {
                let message = f.row_error().message;
                calling.error(message.clone());
                answer.outcome = f.call_outcome();
                answer.error = Some(message);
            }
        }
        calling.end();
        answer
    }

    fn run_items<'a>(
        &'a self,
        a: &'a BatchAssignment,
        items: &'a [ClaimedItem],
        ran: &'a mut Ran,
        span: &'a Span,
    ) -> std::pin::Pin<Box<dyn Future<Output = Vec<RowResult>> + Send + 'a>> {
        Box::pin(async move {
            if items.is_empty() {
                return Vec::new();
            }
            let wait = Duration::from_secs(u64::from(a.worker.lease_seconds) / 2);
            let acquiring = span.child("layer.worker.acquire", SpanKind::Internal, vec![]);
            let mut lease = match self.pools.acquire(&a.udf_id, a.revision, &a.worker, wait, Want::Batch).await {
                Ok(l) => l,
                Err(AcquireError::StartFailed(m)) => {
                    acquiring.error(format!("the worker did not start: {m}"));
                    let e =
                        RowError { kind: FailureKind::Transient, message: format!("the worker did not start: {m}") };
                    return failed(items, &e);
                }
                Err(AcquireError::Busy(m)) => {
                    acquiring.error(m.clone());
                    return failed(items, &RowError { kind: FailureKind::NoWorker, message: m });
                }
                Err(AcquireError::Unavailable(m)) => {
                    acquiring.error(m.clone());
                    return failed(items, &RowError { kind: FailureKind::RunnerLost, message: m });
                }
            };
            let w = lease.worker();
            acquiring.set([
                KeyValue::new("layer.worker", w.name().to_string()),
                KeyValue::new("layer.worker.cold_start", lease.cold),
                KeyValue::new("layer.gpu.uuids", w.gpus().uuids().join(",")),
            ]);
            acquiring.end();
            crate::metrics::METRICS
                .worker_acquisitions
                .with_label_values(&[a.udf_id.as_str(), if lease.cold { "cold" } else { "warm" }])
                .inc();
            ran.worker = Some(w.name().to_string());
            ran.gpus = w.gpus().uuids().to_vec();
            ran.cold |= lease.cold;
            let calling = span.child(
                "layer.worker.call",
                SpanKind::Client,
                vec![
                    KeyValue::new("layer.worker", w.name().to_string()),
                    KeyValue::new("layer.batch.size", items.len() as i64),
                ],
            );
            let started = std::time::Instant::now();
            let outcome = self.call(&mut lease, a, items, &calling).await;
            crate::metrics::METRICS
                .worker_call_duration
                .with_label_values(&[&a.udf_id])
                .observe(started.elapsed().as_secs_f64());
            match outcome {
                Ok(results) => {
                    let failed = results.iter().filter(|r| r.error.is_some()).count();
                    calling.set([
                        KeyValue::new("layer.batch.ok", (results.len() - failed) as i64),
                        KeyValue::new("layer.batch.failed", failed as i64),
                    ]);
                    calling.end();
                    results
                }
                Err(f) => {
                    calling.error(f.row_error().message);
                    calling.end();
                    drop(lease);
                    if items.len() > 1 && f.splits() {
                        tracing::info!(batch_id = a.batch_id, rows = items.len(), failure = ?f, "batch failed as a whole; splitting it");
                        let (left, right) = items.split_at(items.len() / 2);
                        let mut out = self.run_items(a, left, ran, span).await;
                        out.extend(self.run_items(a, right, ran, span).await);
                        out
                    } else {
                        failed(items, &f.row_error())
                    }
                }
            }
        })
    }

    async fn call(
        &self,
        lease: &mut WorkerLease,
        a: &BatchAssignment,
        items: &[ClaimedItem],
        span: &Span,
    ) -> Result<Vec<RowResult>, CallFailure> {
        let body = RunRequest {
            udf_id: a.udf_id.clone(),
            version: a.version.clone(),
            batch_id: a.batch_id,
            items: items.to_vec(),
        };
        let url = format!("{}/run", lease.worker().base_url());
        // The worker joins the batch's trace through `traceparent`.
        let mut headers = http::HeaderMap::new();
        span.inject(&mut headers);
        let request = self.http.post(&url).headers(headers).json(&body);
        let (status, _, bytes) = self.exchange(lease, request, a.worker.timeout_seconds).await?;
        if status.as_u16() == 429 {
            return Err(CallFailure::Overloaded);
        }
        if !status.is_success() {
            let text: String = String::from_utf8_lossy(&bytes).chars().take(300).collect();
            return Err(CallFailure::Status(status.as_u16(), text));
        }
        match parse_results(&bytes, items) {
            Ok(r) => Ok(r),
            Err(m) => {
                lease.discard();
                Err(CallFailure::Garbage(m))
            }
        }
    }

    /// `POST /invoke` with the caller's body and content type; the
    /// worker's answer, whatever its status, is the caller's.
    async fn invoke(
        &self,
        lease: &mut WorkerLease,
        c: &CallAssignment,
        span: &Span,
    ) -> Result<Passthrough, CallFailure> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let body = c.body.as_deref().and_then(|b| b64.decode(b).ok()).unwrap_or_default();
        let mut headers = http::HeaderMap::new();
        span.inject(&mut headers);
        if let Some(ct) = c.content_type.as_deref().and_then(|t| http::HeaderValue::from_str(t).ok()) {
            headers.insert(http::header::CONTENT_TYPE, ct);
        }
        let request = self.http.post(format!("{}/invoke", lease.worker().base_url())).headers(headers).body(body);
        let (status, content_type, bytes) = self.exchange(lease, request, c.worker.timeout_seconds).await?;
        Ok(Passthrough { status: status.as_u16(), content_type, body: b64.encode(bytes) })
    }

    /// Sends one request to a worker with the timeout enforced, a cordon
    /// of its GPUs watched and its answer size-capped; a worker that times
    /// out, dies or loses a GPU is discarded.
    async fn exchange(
        &self,
        lease: &mut WorkerLease,
        request: reqwest::RequestBuilder,
        timeout_seconds: u32,
    ) -> Result<(reqwest::StatusCode, Option<String>, Vec<u8>), CallFailure> {
        let timeout = Duration::from_secs(u64::from(timeout_seconds));
        let call = async {
            let response = request.send().await.map_err(|e| e.to_string())?;
            let status = response.status();
            let content_type =
                response.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
            let bytes = read_capped(response, self.max_response_bytes).await?;
            Ok::<_, String>((status, content_type, bytes))
        };
        // A cordon of one of the worker's GPUs ends the call: its work is
        // handed back as a free retry.
        let lost = lease.worker().gpus().lost();
        let outcome = tokio::select! {
            o = tokio::time::timeout(timeout, call) => o,
            _ = lost.cancelled() => {
                let reason = lease.worker().gpus().lost_reason().unwrap_or_else(|| "a GPU was cordoned".into());
                lease.discard();
                return Err(CallFailure::GpuLost(reason));
            }
        };
        match outcome {
            Err(_) => {
                // Stage one was dropping the call; stage two kills the
                // worker (its process group) and a new one replaces it.
                lease.discard();
                Err(CallFailure::Timeout(timeout_seconds))
            }
            Ok(Err(e)) => {
                lease.discard();
                // Give a dying worker a moment to be reaped, so its exit
                // (an OOM kill, say) names the cause.
                Err(match lease.worker_mut().exit_within(Duration::from_millis(500)).await {
                    Some((detail, true)) => CallFailure::OutOfMemory(detail),
                    Some((detail, false)) => CallFailure::Crashed(detail),
                    None => CallFailure::Crashed(e),
                })
            }
            Ok(Ok(r)) => Ok(r),
        }
    }
}

async fn read_capped(mut response: reqwest::Response, cap: usize) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if out.len() + chunk.len() > cap {
            return Err(format!("the answer is larger than the runner's cap of {cap} bytes"));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// Checks a worker's answer against the batch: one result per item, in
/// item order. Rows the answer leaves out, or gives twice, fail with a
/// message; results for rows not in the batch are ignored (and logged).
/// An answer that is not `{"results": [...]}` is an error for the whole
/// call.
pub fn parse_results(bytes: &[u8], items: &[ClaimedItem]) -> Result<Vec<RowResult>, String> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        let head: String = String::from_utf8_lossy(bytes).chars().take(80).collect();
        format!("not JSON ({e}); it began {head:?}")
    })?;
    let results = v.get("results").and_then(Value::as_array).ok_or("expected an object with a \"results\" array")?;
    let mut by_key: HashMap<(String, String), Vec<RowResult>> = HashMap::new();
    let ids_in_batch: HashMap<&str, &str> = items.iter().map(|i| (i.id.as_str(), i.namespace.as_str())).collect();
    for (n, r) in results.iter().enumerate() {
        let Some(obj) = r.as_object() else {
            return Err(format!("results[{n}] is not an object"));
        };
        let Some(id) = obj.get("id").and_then(Value::as_str) else {
            return Err(format!("results[{n}] has no string \"id\""));
        };
        let namespace = match obj.get("namespace").and_then(Value::as_str) {
            Some(ns) => ns.to_string(),
            None => match ids_in_batch.get(id) {
                Some(ns) => ns.to_string(),
                None => String::new(),
            },
        };
        let row = row_result(namespace.clone(), id.to_string(), obj, n);
        by_key.entry((namespace, id.to_string())).or_default().push(row);
    }
    let mut out = Vec::with_capacity(items.len());
    for i in items {
        let key = (i.namespace.clone(), i.id.clone());
        let transient = |message: String| {
            let error = RowError { kind: FailureKind::Transient, message };
            failed(std::slice::from_ref(i), &error).remove(0)
        };
        let row = match by_key.remove(&key) {
            None => transient("the worker's answer did not include this row".into()),
            Some(mut rows) if rows.len() == 1 => rows.remove(0),
            Some(rows) => transient(format!("the worker's answer gave this row {} times", rows.len())),
        };
        out.push(row);
    }
    if !by_key.is_empty() {
        let unknown: Vec<String> = by_key.keys().take(5).map(|(ns, id)| format!("{ns}/{id}")).collect();
        tracing::warn!(unknown = ?unknown, "the worker answered for rows not in the batch; ignored");
    }
    Ok(out)
}

fn row_result(namespace: String, id: String, obj: &Map<String, Value>, n: usize) -> RowResult {
    let bad = |message: String| RowResult {
        namespace: namespace.clone(),
        id: id.clone(),
        attributes: None,
        vector: None,
        error: Some(RowError { kind: FailureKind::Transient, message }),
    };
    if let Some(e) = obj.get("error").filter(|e| !e.is_null()) {
        let kind = match e.get("kind").and_then(Value::as_str) {
            Some("permanent") => FailureKind::Permanent,
            _ => FailureKind::Transient,
        };
        let message = e
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| e.as_str().map_or_else(|| e.to_string(), str::to_string));
        return RowResult { namespace, id, attributes: None, vector: None, error: Some(RowError { kind, message }) };
    }
    let attributes = match obj.get("attributes") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(other) => return bad(format!("results[{n}].attributes is not an object but {other}")),
    };
    let vector = match obj.get("vector") {
        None | Some(Value::Null) => None,
        Some(v) => match serde_json::from_value::<Vec<f64>>(v.clone()) {
            Ok(v) => Some(v),
            Err(_) => return bad(format!("results[{n}].vector is not a list of numbers")),
        },
    };
    RowResult { namespace, id, attributes: Some(attributes), vector, error: None }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn items(ids: &[&str]) -> Vec<ClaimedItem> {
        ids.iter().map(|id| ClaimedItem { namespace: "ns".into(), id: (*id).into(), input: Map::new() }).collect()
    }

    #[test]
    fn answers_are_matched_to_the_batch_row_by_row() {
        let body = json!({"results": [
            {"namespace": "ns", "id": "a", "attributes": {"x": 1}},
            {"id": "b", "error": {"kind": "permanent", "message": "bad row"}},
            {"namespace": "ns", "id": "c", "attributes": {"x": 1}},
            {"namespace": "ns", "id": "c", "attributes": {"x": 2}},
            {"namespace": "ns", "id": "zz", "attributes": {}},
        ]});
        let out = parse_results(body.to_string().as_bytes(), &items(&["a", "b", "c", "d"])).unwrap();
        assert_eq!(out[0].attributes, Some(json!({"x": 1}).as_object().unwrap().clone()));
        assert_eq!(out[1].error.as_ref().unwrap().kind, FailureKind::Permanent);
        assert!(out[2].error.as_ref().unwrap().message.contains("2 times"));
        assert!(out[3].error.as_ref().unwrap().message.contains("did not include"));
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn garbage_is_an_error_for_the_whole_call() {
        assert!(parse_results(b"<html>oops", &items(&["a"])).unwrap_err().starts_with("not JSON"));
        assert!(parse_results(b"{\"result\": []}", &items(&["a"])).unwrap_err().contains("\"results\" array"));
        assert!(parse_results(b"{\"results\": [{\"x\": 1}]}", &items(&["a"])).unwrap_err().contains("no string"));
    }
}
