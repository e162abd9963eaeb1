//! The pull protocol under `/v2/udfs/{id}`: claim, complete, fail,
//! heartbeat, discover, status, reset-failed.

use axum::extract::{Path, State};
use axum::{Extension, Json};
use layer_protocol::error::ErrorBody;
use layer_protocol::function::{Udf, UdfStatus};
use layer_protocol::keys::Scope;
use layer_protocol::work::{
    ClaimRequest, ClaimResponse, ClaimedItem, CompleteRequest, DiscoverRequest, DiscoverResponse, ErrorKind,
    FailRequest, HeartbeatRequest, ItemsResponse,
};
use layer_telemetry::trace::{Context, KeyValue, Span, SpanKind};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::policy::FailureClass;
use super::queue::{self, Completion, Failure};
use crate::auth::Principal;
use crate::error::{ApiError, PlatformError, Result};
use crate::functions::store;
use crate::http::{ApiJson, AppState, ReportJson};

/// The pull-protocol routes with their part of the OpenAPI document,
/// generated from the handlers' `#[utoipa::path]` and the wire types.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(claim))
        .routes(routes!(complete))
        .routes(routes!(fail))
        .routes(routes!(heartbeat))
        .routes(routes!(discover))
        .routes(routes!(status))
        .routes(routes!(reset_failed))
}

fn check_worker(worker_id: &str) -> Result<()> {
    if worker_id.trim().is_empty() || worker_id.len() > 256 {
        return Err(PlatformError::invalid("worker_id", "must be 1-256 characters"));
    }
    if worker_id.contains('\0') {
        return Err(PlatformError::invalid("worker_id", layer_protocol::validate::NUL_MESSAGE));
    }
    if worker_id.starts_with("runner/") {
        return Err(PlatformError::invalid(
            "worker_id",
            "ids starting with runner/ belong to batches pushed to runners",
        ));
    }
    Ok(())
}

async fn udf_for(state: &AppState, p: &Principal, id: &str, scope: Scope) -> Result<Udf> {
    p.require(scope)?;
    store::get(&state.pool, id).await
}

/// The Function of a pull-protocol call (claim, complete, fail, heartbeat,
/// status): a key minted for the Function's workers may make these for
/// that Function alone.
async fn udf_for_worker(state: &AppState, p: &Principal, id: &str, scope: Scope) -> Result<Udf> {
    if !p.works_for(id) {
        p.require(scope)?;
    }
    store::get(&state.pool, id).await
}

/// Notes that a worker claimed from the Function's queue, at most every
/// 5 s per Function and platform replica: the status of a pull Function
/// whose workers run elsewhere says when none has claimed for a while.
async fn note_claim(state: &AppState, udf_id: &str) {
    static SEEN: std::sync::LazyLock<std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>> =
        std::sync::LazyLock::new(Default::default);
    {
        let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
        if seen.get(udf_id).is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(5)) {
            return;
        }
        seen.insert(udf_id.to_string(), std::time::Instant::now());
    }
    let noted = sqlx::query(
        "INSERT INTO function_stats (function_id, last_claim_at) SELECT id, now() FROM functions WHERE id = $1
         ON CONFLICT (function_id) DO UPDATE SET last_claim_at = now()",
    )
    .bind(udf_id)
    .execute(&state.pool)
    .await;
    if let Err(e) = noted {
        tracing::debug!(udf = %udf_id, error = %e, "noting a claim failed");
    }
}

#[utoipa::path(post, path = "/v2/udfs/{id}/claim", tag = "pull", operation_id = "claim",
    summary = "Lease up to `limit` rows that need work (pull protocol)",
    description = "Needs the `write` scope. Returns no items while the Function already has `schedule.maxInFlightBatches` claims holding leases, or is paused.", params(("id" = String, Path, description = "The Function", example = "tags")), 
    request_body(content = ClaimRequest, example = json!({"worker_id": "worker-1", "limit": 10})),
    responses((status = 200, description = "OK", body = ClaimResponse), (status = "default", description = "Error", body = ErrorBody)))]
async fn claim(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ClaimRequest>,
) -> Result<Json<ClaimResponse>, ApiError> {
    let udf = udf_for_worker(&state, &p, &id, Scope::Write).await?;
    check_worker(&req.worker_id)?;
    note_claim(&state, &udf.id).await;
    let limit = req.limit.unwrap_or(i64::from(udf.spec.worker.batch_size));
    if !(1..=10_000).contains(&limit) {
        return Err(PlatformError::invalid("limit", format!("{limit} is out of range; allowed 1..=10000")).into());
    }
    let lease = req.lease_seconds.unwrap_or(i64::from(udf.spec.schedule.lease_seconds));
    if !(1..=86_400).contains(&lease) {
        return Err(
            PlatformError::invalid("lease_seconds", format!("{lease} is out of range; allowed 1..=86400")).into()
        );
    }
    let span = pull_span("layer.claim", &udf.id, &req.worker_id);
    let claimed = span
        .run(async {
            let c = queue::claim(
                &state.pool,
                &udf,
                queue::Claimer::Worker { id: &req.worker_id, key: &p.key_id },
                limit,
                lease,
            )
            .await?;
            span.set([
                KeyValue::new("layer.batch.id", c.batch_id.unwrap_or_default()),
                KeyValue::new("layer.batch.size", c.items.len() as i64),
                KeyValue::new("layer.claim.at_capacity", c.at_capacity),
            ]);
            Ok::<_, PlatformError>(c)
        })
        .await?;
    if claimed.at_capacity {
        tracing::debug!(udf = %udf.id, worker_id = %req.worker_id, "claim turned away: maxInFlightBatches reached");
    }
    Ok(Json(ClaimResponse {
        udf_id: udf.id,
        worker_id: req.worker_id,
        items: claimed
            .items
            .into_iter()
            .map(|c| ClaimedItem { namespace: c.namespace, id: c.id, input: c.input })
            .collect(),
    }))
}

#[utoipa::path(post, path = "/v2/udfs/{id}/items/complete", tag = "pull", operation_id = "complete_items",
    summary = "Write results back with the completion marker (fenced by lease)",
    description = "Needs the `write` scope. A result that cannot be stored fails its row alone; a report naming a row twice is a 400.", params(("id" = String, Path, description = "The Function", example = "tags")), 
    request_body(content = CompleteRequest, example = json!({"worker_id": "worker-1", "items": [{"namespace": "items", "id": "a", "attributes": {"tags": ["camping"]}}]})),
    responses((status = 200, description = "OK", body = ItemsResponse), (status = "default", description = "Error", body = ErrorBody)))]
async fn complete(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    ReportJson(req): ReportJson<CompleteRequest>,
) -> Result<Json<ItemsResponse>, ApiError> {
    let udf = udf_for_worker(&state, &p, &id, Scope::Write).await?;
    check_worker(&req.worker_id)?;
    refuse_twice("items", req.items.iter().map(|i| (i.namespace.as_str(), i.id.as_str())))?;
    let mut completions = Vec::with_capacity(req.items.len());
    let mut refused = Vec::new();
    for item in req.items {
        let multi = item.vectors.as_ref().is_some_and(|v| !v.is_null());
        match accept_result(item.namespace, item.id, item.attributes.unwrap_or_default(), item.vector, multi) {
            Ok(c) => completions.push(c),
            Err(f) => refused.push(f),
        }
    }
    let span = pull_span("layer.complete", &udf.id, &req.worker_id);
    span.set([KeyValue::new("layer.batch.size", (completions.len() + refused.len()) as i64)]);
    let written = span
        .run(async {
            let mut tx = queue::begin_writeback(&state.pool).await?;
            queue::fail(&mut tx, &udf, &req.worker_id, refused).await?;
            let counts = queue::complete(&mut tx, &udf, &req.worker_id, completions).await?;
            tx.commit().await?;
            span.set([KeyValue::new("layer.batch.written", counts.written as i64)]);
            Ok::<_, PlatformError>(counts.written)
        })
        .await?;
    Ok(Json(ItemsResponse { udf_id: udf.id, updated: written }))
}

/// Refuses a report that names one row twice: which of two results would
/// be the row's is not the platform's to guess.
pub(crate) fn refuse_twice<'a>(field: &str, rows: impl Iterator<Item = (&'a str, &'a str)>) -> Result<()> {
    let mut seen = std::collections::HashMap::new();
    for (i, (ns, id)) in rows.enumerate() {
        if let Some(first) = seen.insert((ns, id), i) {
            return Err(PlatformError::invalid(
                format!("{field}[{i}]"),
                format!("names row {ns}/{id} a second time ({field}[{first}] named it first); report each row once"),
            ));
        }
    }
    Ok(())
}

/// A pull-protocol span under the request's.
fn pull_span(name: &'static str, udf_id: &str, worker_id: &str) -> Span {
    let attrs =
        vec![KeyValue::new("layer.udf", udf_id.to_string()), KeyValue::new("layer.worker", worker_id.to_string())];
    Span::start(name, SpanKind::Internal, &Context::current(), None, attrs)
}

/// Checks one result before it is written: reserved names, multi-vectors
/// and vector values fail the row permanently with a message saying why.
pub(crate) fn accept_result(
    namespace: String,
    id: String,
    attributes: layer_protocol::namespace::Attributes,
    vector: Option<Vec<f64>>,
    multi_vector: bool,
) -> std::result::Result<Completion, Failure> {
    let vector = vector.map(|v| crate::rows::plan::real_array_literal(v.into_iter().map(Some))).transpose();
    let reserved: Vec<&String> =
        attributes.keys().filter(|k| k.starts_with(layer_protocol::RESERVED_PREFIX) || k.as_str() == "id").collect();
    // PostgreSQL stores no NUL in jsonb: such a result is this row's
    // failure alone, never its batch's.
    let nul = attributes.iter().find_map(|(k, v)| {
        if k.contains('\0') {
            Some(format!("attributes.{}", k.replace('\0', "\\u0000")))
        } else {
            layer_protocol::validate::nul_byte_path(v, &format!("attributes.{k}"))
        }
    });
    let problem = if let Some(path) = nul {
        Some(format!("the result's {path}: {}", layer_protocol::validate::NUL_MESSAGE))
    } else if !reserved.is_empty() {
        Some(format!(
            "the result sets {}: attributes with the reserved {} prefix (and `id`) belong to the platform; return other names",
            reserved.iter().map(|k| format!("\"{k}\"")).collect::<Vec<_>>().join(", "),
            layer_protocol::RESERVED_PREFIX
        ))
    } else if multi_vector {
        Some("multi-vector results (`vectors`) are not supported by this store; return one `vector`".into())
    } else if let Err(i) = &vector {
        Some(format!("the result's vector[{i}]: {}", crate::rows::plan::VECTOR_VALUES))
    } else {
        None
    };
    match problem {
        Some(message) => Err(Failure { namespace, id, class: FailureClass::Permanent, message }),
        None => Ok(Completion { namespace, id, attributes, vector: vector.ok().flatten() }),
    }
}

#[utoipa::path(post, path = "/v2/udfs/{id}/items/fail", tag = "pull", operation_id = "fail_items",
    summary = "Report transient or permanent failures",
    description = "Needs the `write` scope.", params(("id" = String, Path, description = "The Function", example = "tags")), 
    request_body(content = FailRequest, example = json!({"worker_id": "worker-1", "items": [{"namespace": "items", "id": "b", "kind": "transient", "message": "model busy"}]})),
    responses((status = 200, description = "OK", body = ItemsResponse), (status = "default", description = "Error", body = ErrorBody)))]
async fn fail(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    ReportJson(req): ReportJson<FailRequest>,
) -> Result<Json<ItemsResponse>, ApiError> {
    let udf = udf_for_worker(&state, &p, &id, Scope::Write).await?;
    check_worker(&req.worker_id)?;
    refuse_twice("items", req.items.iter().map(|i| (i.namespace.as_str(), i.id.as_str())))?;
    let failures = req
        .items
        .into_iter()
        .map(|i| Failure {
            class: match i.kind {
                ErrorKind::Permanent => FailureClass::Permanent,
                ErrorKind::Transient => FailureClass::Transient,
            },
            message: i.message.unwrap_or_else(|| "no message".into()),
            namespace: i.namespace,
            id: i.id,
        })
        .collect();
    let span = pull_span("layer.fail", &udf.id, &req.worker_id);
    let updated = span
        .run(async {
            let mut tx = queue::begin(&state.pool).await?;
            let updated = queue::fail(&mut tx, &udf, &req.worker_id, failures).await?;
            tx.commit().await?;
            span.set([KeyValue::new("layer.batch.failed", updated as i64)]);
            Ok::<_, PlatformError>(updated)
        })
        .await?;
    Ok(Json(ItemsResponse { udf_id: udf.id, updated }))
}

#[utoipa::path(post, path = "/v2/udfs/{id}/items/heartbeat", tag = "pull", operation_id = "heartbeat_items",
    summary = "Extend the leases a worker holds",
    description = "Needs the `write` scope.", params(("id" = String, Path, description = "The Function", example = "tags")), 
    request_body(content = HeartbeatRequest, example = json!({"worker_id": "worker-1", "items": [{"namespace": "items", "id": "a"}]})),
    responses((status = 200, description = "OK", body = ItemsResponse), (status = "default", description = "Error", body = ErrorBody)))]
async fn heartbeat(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<HeartbeatRequest>,
) -> Result<Json<ItemsResponse>, ApiError> {
    let udf = udf_for_worker(&state, &p, &id, Scope::Write).await?;
    check_worker(&req.worker_id)?;
    let items: Vec<(String, String)> = req.items.into_iter().map(|i| (i.namespace, i.id)).collect();
    let updated = queue::heartbeat(&state.pool, &udf, &req.worker_id, &items).await?;
    Ok(Json(ItemsResponse { udf_id: udf.id, updated }))
}

#[utoipa::path(post, path = "/v2/udfs/{id}/discover", tag = "pull", operation_id = "discover",
    summary = "Sweep now; the body is optional",
    description = "Needs the `write` scope. 409 while the Function is paused.", params(("id" = String, Path, description = "The Function", example = "tags")), 
    request_body(content = Option<DiscoverRequest>, example = json!({"namespaces": ["items"]})),
    responses((status = 200, description = "OK", body = DiscoverResponse), (status = "default", description = "Error", body = ErrorBody)))]
async fn discover(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<DiscoverResponse>, ApiError> {
    let udf = udf_for(&state, &p, &id, Scope::Write).await?;
    // The body is optional here: an empty one sweeps every namespace.
    let req: DiscoverRequest = if body.iter().all(u8::is_ascii_whitespace) {
        DiscoverRequest::default()
    } else {
        crate::http::parse_json(&body)?
    };
    if udf.paused {
        return Err(PlatformError::Conflict(format!("function {id} is paused; resume it to discover rows")).into());
    }
    let active = store::active_namespaces(&state.pool, &udf.spec).await?;
    let namespaces = match req.namespaces.filter(|n| !n.is_empty()) {
        None => active,
        Some(asked) => {
            if let Some(bad) = asked.iter().find(|n| !active.contains(n)) {
                return Err(PlatformError::invalid(
                    "namespaces",
                    format!("{bad} is not among the function's namespaces ({})", active.join(", ")),
                )
                .into());
            }
            asked
        }
    };
    let enqueued = state.engine.discover_now(&udf, &namespaces).await?;
    Ok(Json(DiscoverResponse { udf_id: udf.id, enqueued, namespaces }))
}

#[utoipa::path(get, path = "/v2/udfs/{id}/status", tag = "pull", operation_id = "udf_status",
    summary = "Function status",
    description = "Needs the `read` scope.", params(("id" = String, Path, description = "The Function", example = "tags")),
    responses((status = 200, description = "OK", body = UdfStatus), (status = "default", description = "Error", body = ErrorBody)))]
async fn status(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<UdfStatus>, ApiError> {
    let udf = udf_for_worker(&state, &p, &id, Scope::Read).await?;
    Ok(Json(crate::runners::status(&state.pool, &udf, state.settings.runners.lost_after).await?))
}

#[utoipa::path(post, path = "/v2/udfs/{id}/reset-failed", tag = "pull", operation_id = "reset_failed",
    summary = "Put failed rows back in the queue",
    description = "Needs the `write` scope.", params(("id" = String, Path, description = "The Function", example = "tags")),
    responses((status = 200, description = "OK", body = ItemsResponse), (status = "default", description = "Error", body = ErrorBody)))]
async fn reset_failed(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<ItemsResponse>, ApiError> {
    let udf = udf_for(&state, &p, &id, Scope::Write).await?;
    let updated = queue::reset_failed(&state.pool, &udf.id).await?;
    tracing::info!(udf = %udf.id, updated, "reset failed rows");
    Ok(Json(ItemsResponse { udf_id: udf.id, updated }))
}
