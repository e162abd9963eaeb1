//! `POST /v2/udfs/{id}/calls` (call a Function, synchronously),
//! `GET /v2/udfs/{id}/calls` and `GET /v2/calls/{call_id}` (the records).
//!
//! Errors of a call are `application/problem+json` (RFC 9457) carrying
//! the API's stable `code`: 404 for an unknown Function (before anything
//! is sent), 403, 409 for a paused or pull Function, 413 over the body
//! limit, 422 when the Function answers a permanent error, 429 with
//! `Retry-After` when no worker of it comes free in time, 502 when its
//! worker crashes or answers garbage, 503 when no runner can take it or it
//! answers a transient error, 504 when `timeoutSeconds` passes.

// A problem is built at most once per call, on its way to the caller:
// its size does not matter.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use layer_protocol::call::{CallAnswer, CallAssignment, CallList, CallOutcome, CallRecord, CallStatus};
use layer_protocol::error::ErrorBody;
use layer_protocol::function::{CallProtocol, Dispatch, Udf};
use layer_protocol::keys::Scope;
use layer_protocol::runner::tokens::{self, Purpose};
use layer_telemetry::trace::{Context, KeyValue, Span, SpanKind, new_trace_id, span_trace_id};
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::Snapshot;
use super::store::{self, CallRow};
use crate::auth::Principal;
use crate::error::{ApiError, PlatformError, REQUEST_ID};
use crate::http::{AppState, Params, int_param, next_page, time_param};
use crate::runners::dispatch::{place_call, scheduling, unmet};

/// The routes of call records, which take an API key, with their part of
/// the OpenAPI document.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list)).routes(routes!(get_call))
}

/// Calling a Function, which takes an API key, or none where the Function
/// allows anonymous calls.
pub fn call_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(call))
}

/// The id of the call an answer is for.
const CALL_ID: HeaderName = HeaderName::from_static("layer-call-id");
/// The revision of the Function that answered.
const REVISION: HeaderName = HeaderName::from_static("layer-revision");
/// Where the time went: `queue`, `cold-start`, `worker`, `platform`.
const SERVER_TIMING: HeaderName = HeaderName::from_static("server-timing");

/// An RFC 9457 problem: the error answer of a call.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct Problem {
    /// `urn:layer:error:<code>`.
    #[serde(rename = "type")]
    kind: String,
    /// A short summary of the kind of problem.
    title: &'static str,
    status: u16,
    /// What went wrong with this call.
    detail: String,
    /// The API's stable error code (`not_found`, `conflict`, ...).
    code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<String>,
    /// Seconds to wait before calling again (429, 503).
    #[serde(skip)]
    retry_after: Option<u32>,
    /// A 401 says how to authenticate.
    #[serde(skip)]
    www_authenticate: bool,
}

impl Problem {
    fn new(status: StatusCode, code: &'static str, title: &'static str, detail: impl Into<String>) -> Self {
        Problem {
            kind: format!("urn:layer:error:{code}"),
            title,
            status: status.as_u16(),
            detail: detail.into(),
            code,
            call_id: None,
            request_id: REQUEST_ID.try_with(Clone::clone).ok().filter(|r| !r.is_empty()),
            retry_after: None,
            www_authenticate: status == StatusCode::UNAUTHORIZED,
        }
    }

    fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }

    fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl From<PlatformError> for Problem {
    fn from(e: PlatformError) -> Self {
        let status = e.status();
        if status.is_server_error() {
            tracing::error!(error = %e, "a call failed in the platform");
        }
        let title = match e.code() {
            "not_found" => "No such Function",
            "forbidden" => "Not allowed",
            "unauthorized" => "Not authenticated",
            "conflict" => "The Function cannot be called now",
            "payload_too_large" => "Body too large",
            "unavailable" => "Unavailable",
            c if c.starts_with("invalid") => "Invalid request",
            _ => "Internal error",
        };
        let detail = if status.is_server_error() && status != StatusCode::SERVICE_UNAVAILABLE {
            "the platform failed to run the call; its log has the details".to_string()
        } else {
            e.to_string()
        };
        let retry = (status == StatusCode::SERVICE_UNAVAILABLE).then_some(1);
        Problem { retry_after: retry, ..Problem::new(status, e.code(), title, detail) }
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/problem+json"));
        if let Some(s) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.www_authenticate {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"layer\""));
        }
        if let Some(id) = self.call_id.as_deref().and_then(|i| HeaderValue::from_str(i).ok()) {
            headers.insert(CALL_ID, id);
        }
        let body = serde_json::to_vec(&self).unwrap_or_default();
        (self.status(), headers, body).into_response()
    }
}

/// The caller's body as the item's `input`: nothing is `{}`, a JSON object
/// is itself, any other JSON value is `{"input": value}`.
fn input_of(body: &[u8]) -> Result<Map<String, Value>, Problem> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "Invalid request",
            format!("the body is not JSON: {e}"),
        )
    })?;
    if let Some(path) = layer_protocol::validate::nul_byte_path(&value, "") {
        let message =
            format!("{}: {}", if path.is_empty() { "body" } else { &path }, layer_protocol::validate::NUL_MESSAGE);
        return Err(Problem::new(StatusCode::BAD_REQUEST, "invalid_request", "Invalid request", message));
    }
    Ok(match value {
        Value::Object(m) => m,
        other => Map::from_iter([("input".to_string(), other)]),
    })
}

/// What a call carries to its worker.
enum Payload {
    /// `run`: the item's input.
    Input(Map<String, Value>),
    /// `invoke`: the caller's body and content type.
    Raw(Bytes, Option<String>),
}

/// What a call did, for its answer and its record.
struct Ran {
    udf: Udf,
    runner_id: String,
    answer: CallAnswer,
    dispatched: Instant,
}

/// The Function, if the caller may call it and it can be called now.
/// The Function, from the shared snapshot; one created since it was read
/// (on another replica) is read from the database, and the snapshot with it.
async fn function(state: &AppState, snapshot: &mut Arc<Snapshot>, id: &str) -> Result<Udf, PlatformError> {
    if let Some(u) = snapshot.functions.get(id) {
        return Ok(u.clone());
    }
    let udf = crate::functions::store::get(&state.pool, id).await?;
    state.calls.forget().await;
    *snapshot = state.calls.get().await?;
    Ok(udf)
}

async fn callable(state: &AppState, p: &Principal, id: &str) -> Result<(Udf, Arc<Snapshot>), Problem> {
    let mut snapshot = state.calls.get().await?;
    if p.is_anonymous() {
        // Without a key, an unknown Function and one that wants a key look
        // the same: nothing is learnt about which Functions exist.
        let open = function(state, &mut snapshot, id).await.ok().filter(|u| u.spec.calls.anonymous);
        return open.map(|u| (u, snapshot)).ok_or_else(|| {
            let m = "missing API key: send `Authorization: Bearer <api key>` (this Function takes no anonymous calls)";
            Problem::new(StatusCode::UNAUTHORIZED, "unauthorized", "Not authenticated", m)
        });
    }
    p.require_call(id)?;
    let udf = function(state, &mut snapshot, id).await?;
    if udf.paused {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "conflict",
            "The Function is paused",
            format!("function {id} is paused; resume it (layer udf resume {id}) to call it"),
        ));
    }
    if udf.spec.worker.dispatch == Dispatch::Pull {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "not_callable",
            "The Function cannot be called",
            format!(
                "function {id} is a pull Function: its workers claim rows themselves and no runner holds one to call; \
                 give it worker.dispatch: push (with a command or an image) to call it"
            ),
        ));
    }
    Ok((udf, snapshot))
}

/// Places the call on a runner and waits for its answer.
async fn run(
    state: &AppState,
    (udf, snapshot): (Udf, Arc<Snapshot>),
    call_id: &str,
    payload: Payload,
    span: &Span,
) -> Result<Ran, Problem> {
    let sched = scheduling(&udf, &snapshot.pools).map_err(|c| {
        Problem::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "No runner can run the Function", c.message)
            .retry_after(5)
    })?;
    let Some(runner) = place_call(&udf, &sched, &snapshot.runners) else {
        let why = unmet(&sched, &snapshot.runners).unwrap_or_else(|| {
            format!("every runner that can run it holds replicas.max ({}) workers of it", sched.plan.replicas_max)
        });
        return Err(Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "No runner can take the call",
            format!("no runner can take a call of function {} now: {why}", udf.id),
        )
        .retry_after(1));
    };
    let token = tokens::sign(&runner.signing_key, &runner.id, Purpose::Call(call_id), tokens::DISPATCH_TTL_SECONDS);
    let (input, body, content_type) = match payload {
        Payload::Input(i) => (i, None, None),
        Payload::Raw(b, ct) => {
            use base64::Engine as _;
            (Map::new(), Some(base64::engine::general_purpose::STANDARD.encode(b)), ct)
        }
    };
    let assignment = CallAssignment {
        call_id: call_id.to_string(),
        udf_id: udf.id.clone(),
        revision: udf.revision,
        version: udf.spec.version.clone(),
        worker: sched.plan.clone(),
        input,
        body,
        content_type,
    };
    let url = format!("{}/v1/calls", runner.address.trim_end_matches('/'));
    let mut headers = http::HeaderMap::new();
    span.inject(&mut headers);
    // The runner waits up to timeoutSeconds for a worker, then up to
    // timeoutSeconds for its answer.
    let limit = std::time::Duration::from_secs(2 * u64::from(udf.spec.worker.timeout_seconds) + 10);
    let dispatched = Instant::now();
    let unreachable = |m: String| {
        tracing::warn!(runner_id = %runner.id, call_id, error = %m, "a call could not be sent to its runner");
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "The runner did not take the call",
            format!("runner {} did not take the call: {m}", runner.name),
        )
        .retry_after(1)
    };
    let sent = state.http.post(&url).headers(headers).bearer_auth(token).json(&assignment).timeout(limit).send().await;
    let response = sent.map_err(|e| unreachable(e.without_url().to_string()))?;
    if !response.status().is_success() {
        let status = response.status();
        let text: String = response.text().await.unwrap_or_default().chars().take(300).collect();
        return Err(unreachable(format!("HTTP {status}: {text}")));
    }
    let answer: CallAnswer =
        response.json().await.map_err(|e| unreachable(format!("its answer is not a call answer: {e}")))?;
    Ok(Ran { runner_id: runner.id.clone(), udf, answer, dispatched })
}

/// A worker's answer, for the caller.
struct Output {
    status: StatusCode,
    content_type: String,
    body: Vec<u8>,
}

/// The HTTP answer to a call that ran, with its record's status.
fn answer_of(ran: &Ran) -> (Result<Output, Problem>, CallStatus) {
    let a = &ran.answer;
    let error = a.error.clone().unwrap_or_default();
    let problem = |status, code, title| Problem::new(status, code, title, error.clone());
    match a.outcome {
        CallOutcome::Succeeded => match &a.passthrough {
            // `invoke`: the worker's own answer, as it is.
            Some(p) => {
                use base64::Engine as _;
                let body = base64::engine::general_purpose::STANDARD.decode(&p.body).unwrap_or_default();
                let status = StatusCode::from_u16(p.status).unwrap_or(StatusCode::BAD_GATEWAY);
                let content_type = p.content_type.clone().unwrap_or_else(|| "application/octet-stream".into());
                let recorded = if status.is_client_error() || status.is_server_error() {
                    CallStatus::Failed
                } else {
                    CallStatus::Succeeded
                };
                (Ok(Output { status, content_type, body }), recorded)
            }
            None => {
                let body = serde_json::to_vec(&a.output.clone().unwrap_or_default()).unwrap_or_default();
                let output = Output { status: StatusCode::OK, content_type: "application/json".into(), body };
                (Ok(output), CallStatus::Succeeded)
            }
        },
        CallOutcome::Failed => (
            Err(problem(StatusCode::UNPROCESSABLE_ENTITY, "function_error", "The Function refused the input")),
            CallStatus::Failed,
        ),
        CallOutcome::Transient => (
            Err(problem(StatusCode::SERVICE_UNAVAILABLE, "function_unavailable", "The Function failed; try again")
                .retry_after(1)),
            CallStatus::Failed,
        ),
        CallOutcome::TimedOut => {
            (Err(problem(StatusCode::GATEWAY_TIMEOUT, "timeout", "The Function timed out")), CallStatus::TimedOut)
        }
        CallOutcome::WorkerFailed => {
            (Err(problem(StatusCode::BAD_GATEWAY, "worker_failed", "The Function's worker failed")), CallStatus::Failed)
        }
        CallOutcome::Busy => (
            Err(problem(StatusCode::TOO_MANY_REQUESTS, "busy", "Every worker of the Function is busy").retry_after(1)),
            CallStatus::Rejected,
        ),
        CallOutcome::Unavailable => (
            Err(problem(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "The runner cannot run the Function")
                .retry_after(1)),
            CallStatus::Rejected,
        ),
    }
}

/// `Server-Timing`: the wait for a warm worker (`queue`) or the start of
/// one (`cold-start`), the worker's call, and the rest (`platform`).
fn server_timing(a: &CallAnswer, total_ms: f64) -> String {
    let wait = if a.cold_start { "cold-start" } else { "queue" };
    let platform = (total_ms - a.acquire_ms - a.worker_ms).max(0.0);
    format!("{wait};dur={:.1}, worker;dur={:.1}, platform;dur={platform:.1}", a.acquire_ms, a.worker_ms)
}

#[utoipa::path(post, path = "/v2/udfs/{id}/calls", tag = "calls", operation_id = "call_udf",
    summary = "Call a Function and wait for its answer",
    description = "Needs the `invoke` scope (which `write` and `admin` imply), for every Function or for this one; no key at all where the Function has `calls.anonymous`. The body is the Function's input: nothing for no arguments, a JSON \
                   object for several (the worker's item `input`), any other JSON value for one (`{\"input\": value}`). \
                   The answer is the worker's output (the item's `attributes`), with `Layer-Call-Id`, `Layer-Revision` \
                   and `Server-Timing`. Errors are `application/problem+json`.",
    params(("id" = String, Path, description = "The Function's id", example = "tags")),
    security(("bearer" = []), ()),
    request_body(content = Object, description = "The input", example = json!({"id": "p1", "title": "Wireless waterproof speaker"})),
    responses(
        (status = 200, description = "The Function's output", body = Object,
         headers(("Layer-Call-Id" = String, description = "The call's id"),
                 ("Layer-Revision" = i32, description = "The revision that answered"),
                 ("Server-Timing" = String, description = "queue or cold-start, worker, platform (ms)"))),
        (status = 404, description = "No such Function", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "The Function is paused, or is a pull Function", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "The Function refused the input (a permanent error)", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "The Function's call queue is full, or no worker of it came free in time", body = Problem, content_type = "application/problem+json"),
        (status = 502, description = "The worker crashed or answered garbage", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No runner can take it, or the Function failed transiently", body = Problem, content_type = "application/problem+json"),
        (status = 504, description = "The Function did not answer within timeoutSeconds", body = Problem, content_type = "application/problem+json"),
        (status = "default", description = "Other errors", body = Problem, content_type = "application/problem+json")))]
async fn call(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let arrived = Instant::now();
    let queued_at = Utc::now();
    let call_id = format!("call_{}", uuid::Uuid::new_v4().simple());
    let (udf, snapshot) = match callable(&state, &p, &id).await {
        Ok(u) => u,
        Err(problem) => return problem.into_response(),
    };
    // Held until the answer is built.
    let Some(_place) = state.calls.enter(&udf.id, udf.spec.calls.queue) else {
        let m = format!(
            "function {id} already holds calls.queue ({}) calls waiting for a worker or running; try again",
            udf.spec.calls.queue
        );
        return Problem::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", "The Function's call queue is full", m)
            .retry_after(1)
            .into_response();
    };
    let body = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            let m = "the body is larger than the platform's limit (--max-body-bytes)";
            return Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", "Body too large", m)
                .into_response();
        }
        Err(e) => {
            return Problem::new(StatusCode::BAD_REQUEST, "invalid_request", "Invalid request", e.body_text())
                .into_response();
        }
    };
    // `run`: the body is the item's input; `invoke`: it goes as it came.
    let payload = match udf.spec.worker.protocol {
        CallProtocol::Run => match input_of(&body) {
            Ok(i) => Payload::Input(i),
            Err(problem) => return problem.into_response(),
        },
        CallProtocol::Invoke => {
            let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_string);
            Payload::Raw(body.clone(), content_type)
        }
    };
    let attrs = vec![
        KeyValue::new("layer.udf", udf.id.clone()),
        KeyValue::new("layer.revision", i64::from(udf.revision)),
        KeyValue::new("layer.call.id", call_id.clone()),
    ];
    // Under the request's span, in the caller's trace if it sent one;
    // otherwise the call starts its own, whose id its record keeps (as a
    // batch's does) even where no tracing is set up.
    let parent = Context::current();
    let (span, trace_id) = if span_trace_id(&parent).is_empty() {
        let id = new_trace_id();
        (Span::root("layer.call", SpanKind::Internal, Some(id), None, attrs), id.to_string())
    } else {
        let span = Span::start("layer.call", SpanKind::Internal, &parent, None, attrs);
        let id = span.trace_id();
        (span, id)
    };
    let mut record = CallRow {
        call_id: call_id.clone(),
        function_id: udf.id.clone(),
        revision: udf.revision,
        status: CallStatus::Rejected.as_str().into(),
        http_status: 0,
        runner_id: None,
        worker: None,
        key_id: (!p.is_anonymous()).then(|| p.key_id.clone()),
        request_bytes: body.len() as i64,
        response_bytes: 0,
        queued_at,
        started_at: None,
        finished_at: None,
        cold_start: false,
        trace_id: Some(trace_id),
        error: None,
    };
    let revision = udf.revision;
    let (outcome, timing) = match run(&state, (udf, snapshot), &call_id, payload, &span).await {
        Ok(ran) => {
            let (outcome, status) = answer_of(&ran);
            let a = &ran.answer;
            record.status = status.as_str().into();
            record.runner_id = Some(ran.runner_id.clone());
            record.worker = a.worker.clone();
            record.cold_start = a.cold_start;
            record.error = a.error.clone();
            record.started_at = Some(
                queued_at
                    + chrono::Duration::from_std(ran.dispatched.duration_since(arrived)).unwrap_or_default()
                    + chrono::Duration::milliseconds(a.acquire_ms as i64),
            );
            if a.cold_start {
                crate::metrics::METRICS.call_cold_starts.with_label_values(&[&ran.udf.id]).inc();
            }
            (outcome, Some(server_timing(a, arrived.elapsed().as_secs_f64() * 1000.0)))
        }
        Err(problem) => {
            record.error = Some(problem.detail.clone());
            (Err(problem), None)
        }
    };
    let mut response = match outcome {
        Ok(out) => {
            record.response_bytes = out.body.len() as i64;
            let content_type = HeaderValue::from_str(&out.content_type)
                .unwrap_or_else(|_| HeaderValue::from_static("application/octet-stream"));
            (out.status, [(header::CONTENT_TYPE, content_type)], out.body).into_response()
        }
        Err(mut problem) => {
            problem.call_id = Some(call_id.clone());
            span.error(problem.detail.clone());
            record.response_bytes = serde_json::to_vec(&problem).map_or(0, |b| b.len() as i64);
            problem.into_response()
        }
    };
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&call_id) {
        headers.insert(CALL_ID, v);
    }
    headers.insert(REVISION, HeaderValue::from(revision));
    if let Some(t) = timing.and_then(|t| HeaderValue::from_str(&t).ok()) {
        headers.insert(SERVER_TIMING, t);
    }
    record.http_status = response.status().as_u16() as i16;
    record.finished_at = Some(Utc::now());
    span.set([
        KeyValue::new("http.response.status_code", i64::from(record.http_status)),
        KeyValue::new("layer.call.status", record.status.clone()),
    ]);
    span.end();
    let metrics = &crate::metrics::METRICS;
    metrics.calls.with_label_values(&[&record.function_id, &record.status]).inc();
    metrics.call_duration.with_label_values(&[&record.function_id]).observe(arrived.elapsed().as_secs_f64());
    // The record is written once the answer is on its way.
    state.recorder.record(record);
    response
}

/// The query of `GET /v2/udfs/{id}/calls` (read by hand; this describes it).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct ListQuery {
    /// Only calls that ended so.
    #[param(inline)]
    status: Option<CallStatus>,
    /// Only calls that arrived at or after this RFC 3339 time.
    #[param(format = DateTime)]
    since: Option<String>,
    /// Only calls that arrived before this RFC 3339 time.
    #[param(format = DateTime)]
    until: Option<String>,
    /// At most this many (default 50).
    #[param(minimum = 1, maximum = 1000, example = 10)]
    limit: Option<i64>,
    /// The previous page's `next_cursor`, as given.
    cursor: Option<String>,
}

/// A cursor is the last row's arrival (microseconds) and id.
fn parse_cursor(c: &str) -> Result<(DateTime<Utc>, String), PlatformError> {
    let bad = || PlatformError::invalid("cursor", "not a cursor this API gave out (next_cursor of the page before)");
    let (micros, id) = c.split_once('.').ok_or_else(bad)?;
    let at = micros.parse::<i64>().ok().and_then(DateTime::from_timestamp_micros).ok_or_else(bad)?;
    if !id.starts_with("call_") {
        return Err(bad());
    }
    Ok((at, id.to_string()))
}

#[utoipa::path(get, path = "/v2/udfs/{id}/calls", tag = "calls", operation_id = "list_udf_calls",
    summary = "A Function's calls, newest first", description = "Needs the `read` scope. Calls are recorded once \
                   they have answered and kept for the call retention.",
    params(("id" = String, Path, description = "The Function's id", example = "tags"), ListQuery),
    responses((status = 200, description = "OK", body = CallList),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    params: Params,
) -> Result<Json<CallList>, ApiError> {
    p.require(Scope::Read)?;
    let status = match params.get("status") {
        None => None,
        Some(s) => Some(CallStatus::parse(s).ok_or_else(|| {
            PlatformError::invalid("status", format!("\"{s}\" is not one of succeeded, failed, timed_out, rejected"))
        })?),
    };
    let filter = store::Filter {
        status,
        since: time_param(&params, "since")?,
        until: time_param(&params, "until")?,
        before: params.get("cursor").map(|c| parse_cursor(c)).transpose()?,
        limit: int_param(&params, "limit", 50, 1, 1000)?,
    };
    let mut rows = store::list(&state.pool, &id, &filter).await?;
    let next_cursor =
        next_page(&mut rows, filter.limit, |r| format!("{}.{}", r.queued_at.timestamp_micros(), r.call_id));
    Ok(Json(CallList { calls: rows.into_iter().map(Into::into).collect(), next_cursor }))
}

#[utoipa::path(get, path = "/v2/calls/{call_id}", tag = "calls", operation_id = "get_call",
    summary = "One call's record", description = "Needs the `read` scope.",
    params(("call_id" = String, Path, description = "The call's id (`Layer-Call-Id`)", example = "call_00000000000000000000000000000000")),
    responses((status = 200, description = "OK", body = CallRecord),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn get_call(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(call_id): Path<String>,
) -> Result<Json<CallRecord>, ApiError> {
    p.require(Scope::Read)?;
    Ok(Json(store::get(&state.pool, &call_id).await?))
}
