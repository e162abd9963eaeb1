//! The runner API: registration (API key), listing (API key), and the
//! runner's own calls, authenticated by the platform's tokens: heartbeat,
//! deregistration, batch reports.

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::http::header::AUTHORIZATION;
use axum::{Extension, Json};
use layer_protocol::error::ErrorBody;
use layer_protocol::keys::Scope;
use layer_protocol::namespace::StatusResponse;
use layer_protocol::runner::tokens::{self, Purpose};
use layer_protocol::runner::{
    BatchReport, FailureKind, FunctionLogs, FunctionWorkerLogs, HeartbeatRequest, HeartbeatResponse, RegisterRequest,
    RegisterResponse, ReportResponse, RunnerList, RunnerLogs, RunnerState, UnreachableRunner, WorkerKeyRequest,
    WorkerKeyResponse, WorkerSlotRequest, WorkerSlotResponse,
};
use layer_telemetry::trace::{Context, KeyValue, Span, SpanKind};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::store::{self, RunnerRow};
use crate::auth::Principal;
use crate::engine::api::accept_result;
use crate::engine::policy::FailureClass;
use crate::engine::queue::{self, Failure, batch_holder};
use crate::error::{ApiError, PlatformError, Result};
use crate::http::{ApiJson, AppState, ReportJson};

/// Routes that take an API key, with their part of the OpenAPI document.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list, register)).routes(routes!(function_logs))
}

/// Routes that take a runner token instead, with their part of the
/// OpenAPI document.
pub fn token_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(heartbeat))
        .routes(routes!(deregister))
        .routes(routes!(worker_key))
        .routes(routes!(worker_slot))
        .routes(routes!(report))
}

#[utoipa::path(post, path = "/v2/runners", tag = "runners", operation_id = "register_runner",
    summary = "Register a runner",
    description = "Needs a key with the `runner` claim or the `admin` scope. The answer holds the runner's session token and signing key, shown once.",
    request_body(content = RegisterRequest, example = json!({"name": "gpu-node-1", "address": "http://10.0.0.7:7070", "labels": {"zone": "a"}, "capacity": {"cpus": 16, "memory_bytes": 68719476736_u64, "slots": 4}, "drivers": ["process"]})),
    responses((status = 200, description = "OK", body = RegisterResponse),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn register(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<Json<RegisterResponse>, ApiError> {
    if !(p.has_claim("runner") || p.require(Scope::Admin).is_ok()) {
        return Err(PlatformError::Forbidden(format!(
            "key {} can register no runner: it needs the runner claim or the admin scope",
            p.key_id
        ))
        .into());
    }
    if req.name.trim().is_empty() || req.name.len() > 128 {
        return Err(PlatformError::invalid("name", "must be 1-128 characters").into());
    }
    if !(req.address.starts_with("http://") || req.address.starts_with("https://")) {
        return Err(PlatformError::invalid("address", format!("\"{}\" is not an http(s):// URL", req.address)).into());
    }
    if req.capacity.slots == 0 {
        return Err(PlatformError::invalid("capacity.slots", "must be at least 1").into());
    }
    let (id, key) = store::register(&state.pool, &p.key_id, &req).await?;
    tracing::info!(runner_id = %id, name = %req.name, address = %req.address, "runner registered");
    state.engine.work_ready().notify_one();
    state.calls.forget().await;
    Ok(Json(RegisterResponse {
        token: tokens::sign(&key, &id, Purpose::Session, tokens::SESSION_TTL_SECONDS),
        token_expires_in_seconds: tokens::SESSION_TTL_SECONDS,
        signing_key: hex::encode(&key),
        heartbeat_interval_seconds: state.settings.runners.heartbeat_interval.as_secs().max(1) as u32,
        runner_id: id,
    }))
}

#[utoipa::path(get, path = "/v2/runners", tag = "runners", operation_id = "list_runners",
    summary = "List runners with their state, load, workers and GPUs", description = "Needs the `read` scope.",
    responses((status = 200, description = "OK", body = RunnerList),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn list(State(state): State<AppState>, Extension(p): Extension<Principal>) -> Result<Json<RunnerList>, ApiError> {
    p.require(Scope::Read)?;
    let rows = store::list(&state.pool, state.settings.runners.lost_after.as_secs_f64()).await?;
    Ok(Json(RunnerList { runners: rows.iter().map(RunnerRow::view).collect() }))
}

#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct LogsQuery {
    /// The last this many lines of each worker (default 100; more than
    /// 500 reads as 500).
    #[param(minimum = 0, example = 50)]
    lines: Option<u32>,
}

/// `GET /v2/udfs/{id}/logs?lines=N`: the last `lines` (default 100, at most
/// 500) lines of each of the Function's workers, asked of every active or
/// draining runner at once (3 s each); runners that do not answer are
/// listed under `unreachable`.
#[utoipa::path(get, path = "/v2/udfs/{id}/logs", tag = "functions", operation_id = "get_udf_logs",
    summary = "The latest log lines of each of a Function's workers",
    description = "Needs the `read` scope. Asked of every active or draining runner at once (3 s each); runners that do not answer are listed under `unreachable`.",
    params(("id" = String, Path, description = "The Function's id", example = "tags"), LogsQuery),
    responses((status = 200, description = "OK", body = FunctionLogs),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn function_logs(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Json<FunctionLogs>, ApiError> {
    p.require(Scope::Read)?;
    let udf = crate::functions::store::get(&state.pool, &id).await?;
    let lines = q.lines.unwrap_or(100).clamp(1, 500);
    let runners: Vec<RunnerRow> = store::list(&state.pool, state.settings.runners.lost_after.as_secs_f64())
        .await?
        .into_iter()
        .filter(|r| matches!(r.state(), RunnerState::Active | RunnerState::Draining))
        .collect();
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(3))
        .build()
        .map_err(|e| PlatformError::Internal(e.to_string()))?;
    let mut asks = tokio::task::JoinSet::new();
    for (n, r) in runners.iter().enumerate() {
        let token = tokens::sign(&r.signing_key, &r.id, Purpose::Inspect, tokens::DISPATCH_TTL_SECONDS);
        let url = format!("{}/v1/logs", r.address.trim_end_matches('/'));
        let request = http.get(url).bearer_auth(token).query(&[("udf", udf.id.as_str())]).query(&[("lines", lines)]);
        asks.spawn(async move {
            let answer = async {
                let r = request.send().await.map_err(|e| e.to_string())?;
                if !r.status().is_success() {
                    return Err(format!("HTTP {}", r.status()));
                }
                r.json::<RunnerLogs>().await.map_err(|e| e.to_string())
            };
            (n, answer.await)
        });
    }
    let mut answers: Vec<(usize, std::result::Result<RunnerLogs, String>)> = asks.join_all().await;
    answers.sort_by_key(|(n, _)| *n);
    let mut out = FunctionLogs { udf_id: udf.id.clone(), workers: Vec::new(), unreachable: Vec::new() };
    for (r, (_, answer)) in runners.iter().zip(answers) {
        match answer {
            Ok(logs) => out.workers.extend(logs.workers.into_iter().map(|logs| FunctionWorkerLogs {
                runner_id: r.id.clone(),
                runner_name: r.name.clone(),
                logs,
            })),
            Err(error) => {
                out.unreachable.push(UnreachableRunner { runner_id: r.id.clone(), runner_name: r.name.clone(), error })
            }
        }
    }
    out.workers.sort_by_key(|w| w.logs.started_at_unix_ms);
    Ok(Json(out))
}

/// The bearer token of a runner's call.
fn bearer(headers: &HeaderMap) -> Result<&str> {
    headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or_else(|| PlatformError::Unauthorized("missing runner token: send `Authorization: Bearer <token>`".into()))
}

fn verify(
    key: &[u8],
    token: &str,
    runner_id: &str,
    purpose: Purpose<'_>,
) -> Result<layer_protocol::runner::TokenClaims> {
    tokens::verify(key, token, runner_id, purpose).map_err(|e| {
        tracing::warn!(runner_id, error = %e, "runner token refused");
        PlatformError::Unauthorized(e)
    })
}

/// Checks the bearer token against the runner's key; returns the runner.
async fn authenticate_runner(
    state: &AppState,
    headers: &HeaderMap,
    runner_id: &str,
    purpose: Purpose<'_>,
) -> Result<(RunnerRow, layer_protocol::runner::TokenClaims)> {
    let token = bearer(headers)?;
    let runner = match store::get(&state.pool, runner_id, state.settings.runners.lost_after.as_secs_f64()).await {
        Ok(r) => r,
        Err(PlatformError::NotFound(_)) => {
            return Err(PlatformError::Unauthorized(format!("token refused: no runner {runner_id}")));
        }
        Err(e) => return Err(e),
    };
    let claims = verify(&runner.signing_key, token, runner_id, purpose)?;
    state.runner_keys.insert(runner_id, &runner.signing_key);
    Ok((runner, claims))
}

/// Checks a report token: against the cached key when there is one, so
/// the hot path of a report reads nothing.
async fn authenticate_report(state: &AppState, headers: &HeaderMap, runner_id: &str, batch_id: i64) -> Result<()> {
    match state.runner_keys.get(runner_id) {
        Some(key) => verify(&key, bearer(headers)?, runner_id, Purpose::Report(batch_id)).map(drop),
        None => authenticate_runner(state, headers, runner_id, Purpose::Report(batch_id)).await.map(drop),
    }
}

#[utoipa::path(post, path = "/v2/runners/{id}/heartbeat", tag = "runners", operation_id = "runner_heartbeat",
    summary = "Runner heartbeat", security(("runnerToken" = [])),
    description = "With the runner's session token (not an API key): extends the leases of the batches held; the answer carries a fresh token once the current one is past half-life, and the pull workers the runner should keep.",
    params(("id" = String, Path, description = "The runner's id", example = "r-0000")),
    request_body(content = HeartbeatRequest, example = json!({"state": "active", "load": {"batches": 1}, "batch_ids": [1]})),
    responses((status = 200, description = "OK", body = HeartbeatResponse),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn heartbeat(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let (runner, claims) = authenticate_runner(&state, &headers, &id, Purpose::Session).await?;
    let was_lost = runner.lost;
    let extended = store::heartbeat(&state.pool, &id, req.state, &req.load, &req.batch_ids).await?;
    if was_lost && req.state == RunnerState::Active {
        tracing::info!(runner_id = %id, "runner is back");
        state.engine.work_ready().notify_one();
        state.calls.forget().await;
    }
    // Rotate before expiry: a fresh token once past half-life.
    let token = (tokens::seconds_left(&claims) < tokens::SESSION_TTL_SECONDS / 2)
        .then(|| tokens::sign(&runner.signing_key, &id, Purpose::Session, tokens::SESSION_TTL_SECONDS));
    let pull = if req.state == RunnerState::Active {
        super::scaling::assigned_to(&state.pool, &id).await?
    } else {
        // A draining runner stops its pull workers.
        Vec::new()
    };
    Ok(Json(HeartbeatResponse { token, extended, pull }))
}

/// `POST /v2/runners/{id}/worker-slots`: may the runner start one more
/// push worker of the Function? Granted while the fleet holds fewer slots
/// than its `replicas.max`; so `replicas.max` is a hard cap across runners.
#[utoipa::path(post, path = "/v2/runners/{id}/worker-slots", tag = "runners", operation_id = "runner_worker_slot",
    summary = "Ask for a slot to start one more push worker", security(("runnerToken" = [])),
    description = "With the runner's session token. Granted while the fleet holds fewer slots than the Function's `replicas.max`.",
    params(("id" = String, Path, description = "The runner's id", example = "r-0000")),
    request_body(content = WorkerSlotRequest, example = json!({"udf_id": "tags"})),
    responses((status = 200, description = "OK", body = WorkerSlotResponse),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn worker_slot(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<WorkerSlotRequest>,
) -> Result<Json<WorkerSlotResponse>, ApiError> {
    authenticate_runner(&state, &headers, &id, Purpose::Session).await?;
    let udf = crate::functions::store::get(&state.pool, &req.udf_id).await?;
    let max = super::dispatch::worker_plan(&udf, None).replicas_max;
    let lost_after = state.settings.runners.lost_after.as_secs_f64();
    let slot =
        store::SlotRequest { runner_id: &id, udf_id: &udf.id, max, others: req.others, lost_after_seconds: lost_after };
    let (granted, held) = store::grant_slot(&state.pool, slot).await?;
    if !granted {
        tracing::debug!(runner_id = %id, udf = %udf.id, max, "no worker slot: replicas.max workers run in the fleet");
    }
    Ok(Json(WorkerSlotResponse { granted, max, held }))
}

/// `POST /v2/runners/{id}/worker-keys`: a key for one Function's workers
/// on this runner (see `auth::store::mint_worker_key`), replacing the one
/// it had for them. The token is in the answer only.
#[utoipa::path(post, path = "/v2/runners/{id}/worker-keys", tag = "runners", operation_id = "runner_worker_key",
    summary = "Mint the key of one Function's workers on this runner", security(("runnerToken" = [])),
    description = "With the runner's session token. Replaces the key the runner had for the Function's workers; the token is in this answer only.",
    params(("id" = String, Path, description = "The runner's id", example = "r-0000")),
    request_body(content = WorkerKeyRequest, example = json!({"udf_id": "tags"})),
    responses((status = 200, description = "OK", body = WorkerKeyResponse),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn worker_key(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<WorkerKeyRequest>,
) -> Result<Json<WorkerKeyResponse>, ApiError> {
    let (runner, _) = authenticate_runner(&state, &headers, &id, Purpose::Session).await?;
    let udf = crate::functions::store::get(&state.pool, &req.udf_id).await?;
    let key = crate::auth::store::mint_worker_key(&state.pool, &id, &runner.name, &udf).await?;
    // The key it replaced is gone.
    state.keys.forget();
    tracing::info!(runner_id = %id, udf = %udf.id, key_id = %key.key_id, "minted a worker key");
    Ok(Json(WorkerKeyResponse { udf_id: udf.id, key_id: key.key_id, token: key.token, namespaces: key.namespaces }))
}

#[utoipa::path(post, path = "/v2/runners/{id}/deregister", tag = "runners", operation_id = "deregister_runner",
    summary = "Deregister a runner", security(("runnerToken" = [])),
    description = "With the runner's session token. Its leases go back to the queue and its workers' keys are deleted.",
    params(("id" = String, Path, description = "The runner's id", example = "r-0000")),
    responses((status = 200, description = "OK", body = StatusResponse),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn deregister(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<StatusResponse>, ApiError> {
    authenticate_runner(&state, &headers, &id, Purpose::Session).await?;
    store::deregister(&state.pool, &id).await?;
    crate::auth::store::delete_worker_keys(&state.pool, &id).await?;
    state.keys.forget();
    tracing::info!(runner_id = %id, "runner deregistered");
    state.calls.forget().await;
    Ok(Json(StatusResponse::ok(format!("runner {id} deregistered"))))
}

fn failure_class(kind: FailureKind) -> FailureClass {
    match kind {
        FailureKind::Transient => FailureClass::Transient,
        FailureKind::Permanent => FailureClass::Permanent,
        FailureKind::Timeout => FailureClass::Timeout,
        FailureKind::Oom => FailureClass::OutOfMemory,
        FailureKind::RunnerLost => FailureClass::RunnerLost,
        FailureKind::NoWorker => FailureClass::NoWorker,
    }
}

/// Writes a batch's results back, then acknowledges. Idempotent: the
/// batch's leases are held by `runner/<id>/batch/<n>`, so a repeated report
/// finds nothing leased to write and the stored counts are returned.
#[utoipa::path(post, path = "/v2/runners/{id}/batches/{batch}/report", tag = "runners", operation_id = "report_batch",
    summary = "Report a batch's results", security(("runnerToken" = [])),
    description = "With the batch's report token. Idempotent; acknowledged after the writeback commits. A result that cannot be stored fails its row alone.",
    params(("id" = String, Path, description = "The runner's id", example = "r-0000"), ("batch" = i64, Path, description = "The batch's id", example = 1)),
    request_body(content = BatchReport, example = json!({"results": [{"namespace": "items", "id": "a", "attributes": {"tags": ["camping"]}}, {"namespace": "items", "id": "b", "error": {"kind": "permanent", "message": "no title"}}]})),
    responses((status = 200, description = "OK", body = ReportResponse),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn report(
    State(state): State<AppState>,
    Path((id, batch_id)): Path<(String, i64)>,
    headers: HeaderMap,
    ReportJson(mut req): ReportJson<BatchReport>,
) -> Result<Json<ReportResponse>, ApiError> {
    authenticate_report(&state, &headers, &id, batch_id).await?;
    // One transaction: the writeback, the failures and the batch record
    // commit together (asynchronously; see `queue::begin_writeback`).
    let mut tx = queue::begin_writeback(&state.pool).await?;
    let Some(mut batch) = store::lock_batch(&mut tx, batch_id).await? else {
        return Err(PlatformError::NotFound(format!("batch {batch_id} not found")).into());
    };
    if batch.runner_id != id {
        return Err(PlatformError::Forbidden(format!("batch {batch_id} was not dispatched to runner {id}")).into());
    }
    if batch.state == "reported" {
        return Ok(Json(ReportResponse {
            batch_id,
            written: batch.written as u64,
            failed: batch.failed as u64,
            dropped: batch.dropped as u64,
        }));
    }
    let writeback = Span::start(
        "layer.writeback",
        SpanKind::Internal,
        &Context::current(),
        None,
        vec![
            KeyValue::new("layer.udf", batch.function_id.clone()),
            KeyValue::new("layer.revision", i64::from(batch.revision)),
            KeyValue::new("layer.batch.id", batch_id),
            KeyValue::new("layer.runner", id.clone()),
            KeyValue::new("layer.batch.size", req.results.len() as i64),
            KeyValue::new("layer.gpu.uuids", req.gpus.join(",")),
        ],
    );
    let Some(udf) = batch.take_udf() else {
        // Deleted meanwhile: its work is gone; acknowledge.
        let n = req.results.len() as u64;
        store::finish_batch(&mut tx, batch_id, (0, 0, n), &req, None).await?;
        tx.commit().await.map_err(PlatformError::from)?;
        writeback.set([KeyValue::new("layer.batch.dropped", n as i64)]);
        return Ok(Json(ReportResponse { batch_id, written: 0, failed: 0, dropped: n }));
    };
    crate::engine::api::refuse_twice("results", req.results.iter().map(|r| (r.namespace.as_str(), r.id.as_str())))?;
    let holder = batch_holder(&id, batch_id);
    let mut completions = Vec::new();
    let mut failures = Vec::new();
    for r in std::mem::take(&mut req.results) {
        match r.error {
            Some(e) => failures.push(Failure {
                namespace: r.namespace,
                id: r.id,
                class: failure_class(e.kind),
                message: e.message,
            }),
            None => match accept_result(r.namespace, r.id, r.attributes.unwrap_or_default(), r.vector, false) {
                Ok(c) => completions.push(c),
                Err(f) => failures.push(f),
            },
        }
    }
    let reported = (completions.len() + failures.len()) as u64;
    let outcome = writeback.run(async {
        let failed = queue::fail(&mut tx, &udf, &holder, failures).await?;
        let counts = queue::complete(&mut tx, &udf, &holder, completions).await?;
        // Rows the report left out would otherwise wait for their lease.
        let missing = queue::fail_unreported(&mut tx, &udf, &holder, batch_id).await?;
        let written = counts.written;
        let dropped = reported.saturating_sub(written + failed);
        let left_out = (missing > 0).then_some("the report left rows out");
        store::finish_batch(&mut tx, batch_id, (written, failed + missing, dropped), &req, left_out).await?;
        tx.commit().await?;
        writeback.set([
            KeyValue::new("layer.batch.written", written as i64),
            KeyValue::new("layer.batch.failed", (failed + missing) as i64),
            KeyValue::new("layer.batch.dropped", dropped as i64),
        ]);
        Ok::<_, PlatformError>((written, failed + missing, dropped))
    });
    let (written, failed, dropped) = outcome.await?;
    crate::metrics::METRICS.batch_duration.with_label_values(&[&udf.id]).observe(batch.age_seconds);
    state.engine.work_ready().notify_one();
    Ok(Json(ReportResponse { batch_id, written, failed, dropped }))
}
