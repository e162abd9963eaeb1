//! The runner's HTTP API.
//!
//! - `POST /v1/batches`: a batch from the platform, signed with this
//!   runner's key (`Authorization: Bearer <dispatch token>`). 202 once
//!   accepted; 503 while draining or with every slot busy (the platform
//!   puts the batch back at once, as a free retry); 401 for a bad token;
//!   403 for a `worker.command` batch on a runner started without
//!   `--allow-commands` (also a free retry on the platform's side).
//! - `POST /v1/calls`: one call from the platform, signed with a call
//!   token; answered when the worker has answered (a
//!   [`layer_protocol::call::CallAnswer`]), 503 while draining, 403 for a
//!   `worker.command` Function without `--allow-commands`.
//! - `GET /v1/logs?udf=ID&lines=N`: the recent output of the Function's
//!   workers (signed by the platform: an inspection token).
//! - `GET /healthz`; `GET /v1/status`: load, workers and GPUs.
//! - `GET /metrics`: Prometheus text format (see [`crate::metrics`]).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header::AUTHORIZATION};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use layer_protocol::call::CallAssignment;
use layer_protocol::runner::tokens::{self, Purpose};
use layer_protocol::runner::{BatchAssignment, BatchReport, RunnerLogs};
use layer_telemetry::trace::{KeyValue, Span, SpanKind};
use serde_json::json;

use crate::Shared;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .route("/v1/status", get(status))
        .route("/v1/batches", post(accept))
        .route("/v1/calls", post(call))
        .route("/v1/logs", get(logs))
        .route("/metrics", get(metrics))
        .layer(axum::extract::DefaultBodyLimit::max(256 << 20))
        .with_state(shared)
}

fn refuse(status: StatusCode, code: &str, message: String) -> Response {
    (status, axum::Json(json!({"error": code, "code": code, "message": message}))).into_response()
}

async fn status(State(shared): State<Arc<Shared>>) -> Response {
    axum::Json(json!({
        "runner_id": shared.runner_id,
        "draining": shared.is_draining(),
        "slots": shared.slots,
        "batches": shared.held_ids(),
        "workers": shared.exec.pools.views(),
        "gpus": shared.gpus.statuses(),
    }))
    .into_response()
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let text = crate::metrics::render(&shared);
    ([(axum::http::header::CONTENT_TYPE, layer_telemetry::metrics::CONTENT_TYPE)], text).into_response()
}

fn bearer(headers: &HeaderMap) -> &str {
    headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|h| h.strip_prefix("Bearer ")).unwrap_or_default()
}

/// The most lines one worker's log answers with.
const MAX_LOG_LINES: usize = crate::logs::LINES_PER_WORKER;

async fn logs(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Response {
    if let Err(e) = tokens::verify(&shared.signing_key, bearer(&headers), &shared.runner_id, Purpose::Inspect) {
        return refuse(StatusCode::UNAUTHORIZED, "unauthorized", e);
    }
    let Some(udf) = q.get("udf").filter(|u| !u.is_empty()) else {
        return refuse(StatusCode::BAD_REQUEST, "invalid_request", "udf: required".into());
    };
    let lines = match q.get("lines").map(|l| l.parse::<usize>()) {
        None => 100,
        Some(Ok(n)) => n.min(MAX_LOG_LINES),
        Some(Err(_)) => return refuse(StatusCode::BAD_REQUEST, "invalid_request", "lines: expected a number".into()),
    };
    axum::Json(RunnerLogs { workers: shared.logs.recent(udf, lines) }).into_response()
}

async fn accept(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let assignment: BatchAssignment = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "invalid_request", format!("not a batch: {e}")),
    };
    let token = bearer(&headers);
    if let Err(e) =
        tokens::verify(&shared.signing_key, token, &shared.runner_id, Purpose::Dispatch(assignment.batch_id))
    {
        tracing::warn!(batch_id = assignment.batch_id, error = %e, "batch refused: bad token");
        return refuse(StatusCode::UNAUTHORIZED, "unauthorized", e);
    }
    if shared.is_draining() {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "draining", "the runner is draining".into());
    }
    // The platform places command Functions only on runners that
    // advertise the process driver; this holds even if it did not.
    if assignment.worker.command.is_some() && !shared.allow_commands {
        tracing::warn!(batch_id = assignment.batch_id, udf = %assignment.udf_id, "batch refused: commands are not allowed");
        return refuse(StatusCode::FORBIDDEN, "commands_not_allowed", crate::pool::COMMANDS_NOT_ALLOWED.into());
    }
    {
        let mut held = shared.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.contains(&assignment.batch_id) {
            return StatusCode::ACCEPTED.into_response();
        }
        if held.len() >= shared.slots as usize {
            return refuse(StatusCode::SERVICE_UNAVAILABLE, "busy", format!("all {} slots are busy", shared.slots));
        }
        held.insert(assignment.batch_id);
    }
    // The batch's spans continue the platform's trace.
    let span = Span::start(
        "layer.runner.batch",
        SpanKind::Server,
        &layer_telemetry::trace::extract(&headers),
        None,
        vec![
            KeyValue::new("layer.udf", assignment.udf_id.clone()),
            KeyValue::new("layer.revision", i64::from(assignment.revision)),
            KeyValue::new("layer.batch.id", assignment.batch_id),
            KeyValue::new("layer.batch.size", assignment.items.len() as i64),
            KeyValue::new("layer.runner", shared.runner_id.clone()),
        ],
    );
    let logs = tracing::info_span!(
        "batch",
        batch_id = assignment.batch_id,
        udf = %assignment.udf_id,
        trace_id = %span.trace_id()
    );
    let s = shared.clone();
    shared.batches.spawn(tracing::Instrument::instrument(run_batch(s, assignment, span), logs));
    StatusCode::ACCEPTED.into_response()
}

async fn call(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    let assignment: CallAssignment = match serde_json::from_slice(&body) {
        Ok(a) => a,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, "invalid_request", format!("not a call: {e}")),
    };
    let purpose = Purpose::Call(&assignment.call_id);
    if let Err(e) = tokens::verify(&shared.signing_key, bearer(&headers), &shared.runner_id, purpose) {
        tracing::warn!(call_id = %assignment.call_id, error = %e, "call refused: bad token");
        return refuse(StatusCode::UNAUTHORIZED, "unauthorized", e);
    }
    if shared.is_draining() {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "draining", "the runner is draining".into());
    }
    if assignment.worker.command.is_some() && !shared.allow_commands {
        return refuse(StatusCode::FORBIDDEN, "commands_not_allowed", crate::pool::COMMANDS_NOT_ALLOWED.into());
    }
    let span = Span::start(
        "layer.runner.call",
        SpanKind::Server,
        &layer_telemetry::trace::extract(&headers),
        None,
        vec![
            KeyValue::new("layer.udf", assignment.udf_id.clone()),
            KeyValue::new("layer.revision", i64::from(assignment.revision)),
            KeyValue::new("layer.call.id", assignment.call_id.clone()),
            KeyValue::new("layer.runner", shared.runner_id.clone()),
        ],
    );
    let logs = tracing::info_span!("call", call_id = %assignment.call_id, udf = %assignment.udf_id, trace_id = %span.trace_id());
    let answer = tracing::Instrument::instrument(shared.exec.run_call(&assignment, &span), logs).await;
    span.set([
        KeyValue::new("layer.call.outcome", format!("{:?}", answer.outcome)),
        KeyValue::new("layer.worker.cold_start", answer.cold_start),
    ]);
    span.end();
    axum::Json(answer).into_response()
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

async fn run_batch(shared: Arc<Shared>, a: BatchAssignment, span: Span) {
    let started_at_ms = unix_ms();
    let (results, ran) = shared.exec.run(&a, &span).await;
    let failed = results.iter().filter(|r| r.error.is_some()).count();
    span.set([
        KeyValue::new("layer.batch.ok", (results.len() - failed) as i64),
        KeyValue::new("layer.batch.failed", failed as i64),
        KeyValue::new("layer.gpu.uuids", ran.gpus.join(",")),
        KeyValue::new("layer.worker.cold_start", ran.cold),
    ]);
    let report = BatchReport {
        results,
        worker: ran.worker,
        started_at_ms: Some(started_at_ms),
        ended_at_ms: Some(unix_ms()),
        gpus: ran.gpus,
        cold_start: Some(ran.cold),
    };
    // Reports are retried until the report token would have expired.
    let give_up = Duration::from_secs(u64::from(a.worker.lease_seconds) + 240);
    let reporting = span.child("layer.report", SpanKind::Client, vec![]);
    match shared.platform.report(a.batch_id, &a.report_token, &report, give_up, &reporting).await {
        Ok(r) => {
            reporting.set([
                KeyValue::new("layer.batch.written", r.written as i64),
                KeyValue::new("layer.batch.dropped", r.dropped as i64),
            ]);
            tracing::debug!(written = r.written, failed = r.failed, dropped = r.dropped, "batch reported");
        }
        Err(e) => {
            reporting.error(e.clone());
            span.error("the report was not accepted");
            tracing::warn!(error = %e, "batch report not accepted; its leases will expire")
        }
    }
    reporting.end();
    span.end();
    shared.held.lock().unwrap_or_else(|e| e.into_inner()).remove(&a.batch_id);
}
