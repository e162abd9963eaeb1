//! Batch records and failed rows: what happened to the work.
//!
//! - `GET /v2/udfs/{id}/batches?state=&runner=&since=&limit=&cursor=`:
//!   newest first; `cursor` is the `next_cursor` of the previous page.
//! - `GET /v2/batches/{id}`.
//! - `GET /v2/udfs/{id}/failed?limit=&cursor=`: rows that spent their
//!   attempts, with the last error.
//!
//! Finished records are pruned after `EngineConfig::batch_retention`.

use axum::extract::{Path, State};
use axum::{Extension, Json};
use chrono::{DateTime, Utc};
use layer_protocol::error::ErrorBody;
use layer_protocol::keys::Scope;
use layer_protocol::runner::{BatchRecord, FailedRow, ListBatchesResponse, ListFailedResponse};
use sqlx::types::Json as SqlJson;
use sqlx::{PgPool, Postgres, QueryBuilder};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Principal;
use crate::error::{ApiError, PlatformError, Result};
use crate::http::{AppState, Params, int_param, next_page, time_param};
use crate::time::rfc3339;

/// The batch-record routes with their part of the OpenAPI document,
/// generated from the handlers' `#[utoipa::path]` and the wire types.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_batches)).routes(routes!(get_batch)).routes(routes!(list_failed))
}

/// The states of a batch record, for the `state` filter.
#[derive(utoipa::ToSchema)]
#[allow(dead_code, non_camel_case_types)]
enum BatchState {
    dispatched,
    reported,
    abandoned,
}

/// The query of `GET /v2/udfs/{id}/batches` (read by hand from the query
/// string, which names a bad value; this describes it).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct BatchQuery {
    /// Only batches in this state.
    #[param(inline)]
    state: Option<BatchState>,
    /// Only batches sent to this runner (its id).
    runner: Option<String>,
    /// Only batches dispatched at or after this RFC 3339 time.
    #[param(format = DateTime)]
    since: Option<String>,
    /// At most this many (default 50).
    #[param(minimum = 1, maximum = 1000, example = 10)]
    limit: Option<i64>,
    /// The previous page's `next_cursor`.
    cursor: Option<String>,
}

/// The query of `GET /v2/udfs/{id}/failed`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct FailedQuery {
    /// At most this many (default 100).
    #[param(minimum = 1, maximum = 1000, example = 10)]
    limit: Option<i64>,
    /// The previous page's `next_cursor`.
    cursor: Option<String>,
}

#[derive(sqlx::FromRow)]
struct RecordRow {
    id: i64,
    function_id: String,
    revision: i32,
    runner_id: String,
    state: String,
    items: i32,
    written: i32,
    failed: i32,
    dropped: i32,
    worker: Option<String>,
    gpus: SqlJson<Vec<String>>,
    cold_start: Option<bool>,
    error: Option<String>,
    trace_id: Option<String>,
    queued_at: Option<DateTime<Utc>>,
    dispatched_at: DateTime<Utc>,
    started_at: Option<DateTime<Utc>>,
    ended_at: Option<DateTime<Utc>>,
    finished_at: Option<DateTime<Utc>>,
}

impl From<RecordRow> for BatchRecord {
    fn from(r: RecordRow) -> Self {
        BatchRecord {
            id: r.id,
            udf_id: r.function_id,
            revision: r.revision,
            runner_id: r.runner_id,
            state: r.state,
            items: r.items,
            written: r.written,
            failed: r.failed,
            dropped: r.dropped,
            worker: r.worker,
            gpus: r.gpus.0,
            cold_start: r.cold_start,
            error: r.error,
            trace_id: r.trace_id,
            queued_at: r.queued_at.map(rfc3339),
            dispatched_at: rfc3339(r.dispatched_at),
            started_at: r.started_at.map(rfc3339),
            ended_at: r.ended_at.map(rfc3339),
            finished_at: r.finished_at.map(rfc3339),
        }
    }
}

const RECORD_COLUMNS: &str = "SELECT id, function_id, revision, runner_id, state, items, written, failed, dropped, \
     worker, gpus, cold_start, error, trace_id, queued_at, dispatched_at, started_at, ended_at, finished_at \
     FROM batches";

const STATES: [&str; 3] = ["dispatched", "reported", "abandoned"];

#[utoipa::path(get, path = "/v2/udfs/{id}/batches", tag = "batches", operation_id = "list_batches",
    summary = "A Function's batch records, newest first",
    description = "Needs the `read` scope. Push batches with their runner, worker, GPUs, timings, outcome counts and \
                   trace id. Finished records are kept for the platform's batch retention.",
    params(("id" = String, Path, description = "The Function", example = "tags"), BatchQuery),
    responses((status = 200, description = "OK", body = ListBatchesResponse),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn list_batches(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    params: Params,
) -> std::result::Result<Json<ListBatchesResponse>, ApiError> {
    p.require(Scope::Read)?;
    crate::functions::store::get(&state.pool, &id).await?;
    let limit = int_param(&params, "limit", 50, 1, 1000)?;
    let mut qb = QueryBuilder::<Postgres>::new(RECORD_COLUMNS);
    qb.push(" WHERE function_id = ").push_bind(id);
    if let Some(s) = params.get("state") {
        if !STATES.contains(&s.as_str()) {
            return Err(PlatformError::invalid("state", format!("\"{s}\" is not one of {}", STATES.join(", "))).into());
        }
        qb.push(" AND state = ").push_bind(s.clone());
    }
    if let Some(r) = params.get("runner") {
        qb.push(" AND runner_id = ").push_bind(r.clone());
    }
    if let Some(since) = time_param(&params, "since")? {
        qb.push(" AND dispatched_at >= ").push_bind(since);
    }
    if let Some(c) = params.get("cursor") {
        let before: i64 = c.parse().map_err(|_| PlatformError::invalid("cursor", "not a cursor from next_cursor"))?;
        qb.push(" AND id < ").push_bind(before);
    }
    qb.push(" ORDER BY id DESC LIMIT ").push_bind(limit + 1);
    let mut rows: Vec<RecordRow> = qb.build_query_as().fetch_all(&state.pool).await.map_err(PlatformError::from)?;
    let next_cursor = next_page(&mut rows, limit, |r| r.id.to_string());
    Ok(Json(ListBatchesResponse { batches: rows.into_iter().map(Into::into).collect(), next_cursor }))
}

#[utoipa::path(get, path = "/v2/batches/{id}", tag = "batches", operation_id = "get_batch",
    summary = "One batch record", description = "Needs the `read` scope.",
    params(("id" = i64, Path, description = "The batch's id", example = 1)),
    responses((status = 200, description = "OK", body = BatchRecord),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn get_batch(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> std::result::Result<Json<BatchRecord>, ApiError> {
    p.require(Scope::Read)?;
    let id: i64 = id.parse().map_err(|_| PlatformError::invalid("id", format!("\"{id}\" is not a batch id")))?;
    let row: Option<RecordRow> = sqlx::query_as(&format!("{RECORD_COLUMNS} WHERE id = $1"))
        .bind(id)
        .fetch_optional(&state.pool)
        .await
        .map_err(PlatformError::from)?;
    match row {
        Some(r) => Ok(Json(r.into())),
        None => Err(PlatformError::NotFound(format!(
            "batch {id} not found (records are kept for the platform's batch retention)"
        ))
        .into()),
    }
}

#[derive(sqlx::FromRow)]
struct FailedRowDb {
    namespace: String,
    row_id: String,
    attempts: i32,
    free_retries: i32,
    last_error_kind: Option<String>,
    last_error: Option<String>,
    version: String,
    updated_at: DateTime<Utc>,
}

#[utoipa::path(get, path = "/v2/udfs/{id}/failed", tag = "batches", operation_id = "list_failed_rows",
    summary = "A Function's failed rows",
    description = "Needs the `read` scope. Rows that spent their attempts, by namespace and id, with the class and \
                   message of their last failure.",
    params(("id" = String, Path, description = "The Function", example = "tags"), FailedQuery),
    responses((status = 200, description = "OK", body = ListFailedResponse),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn list_failed(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    params: Params,
) -> std::result::Result<Json<ListFailedResponse>, ApiError> {
    p.require(Scope::Read)?;
    crate::functions::store::get(&state.pool, &id).await?;
    let limit = int_param(&params, "limit", 100, 1, 1000)?;
    let mut qb = QueryBuilder::<Postgres>::new(
        "SELECT namespace, row_id, attempts, free_retries, last_error_kind, last_error, version, updated_at
         FROM work_items WHERE state = 'failed' AND function_id = ",
    );
    qb.push_bind(id);
    // The cursor is the last (namespace, id) of the previous page.
    if let Some(c) = params.get("cursor") {
        let Some((ns, row)) = c.split_once('/') else {
            return Err(PlatformError::invalid("cursor", "not a cursor from next_cursor").into());
        };
        qb.push(" AND (namespace, row_id) > (").push_bind(ns.to_string()).push(", ").push_bind(row.to_string());
        qb.push(")");
    }
    qb.push(" ORDER BY namespace, row_id LIMIT ").push_bind(limit + 1);
    let mut rows: Vec<FailedRowDb> = qb.build_query_as().fetch_all(&state.pool).await.map_err(PlatformError::from)?;
    let next_cursor = next_page(&mut rows, limit, |r| format!("{}/{}", r.namespace, r.row_id));
    let rows = rows
        .into_iter()
        .map(|r| FailedRow {
            namespace: r.namespace,
            id: r.row_id,
            attempts: r.attempts,
            free_retries: r.free_retries,
            error_kind: r.last_error_kind,
            error: r.last_error,
            version: r.version,
            failed_at: rfc3339(r.updated_at),
        })
        .collect();
    Ok(Json(ListFailedResponse { rows, next_cursor }))
}

/// Deletes finished batch records older than `retention`, in slices.
/// Returns how many went.
pub async fn prune(pool: &PgPool, retention: std::time::Duration) -> Result<u64> {
    let mut total = 0;
    loop {
        let n = sqlx::query(
            "DELETE FROM batches WHERE id IN (
                 SELECT id FROM batches WHERE state <> 'dispatched'
                     AND finished_at < now() - make_interval(secs => $1)
                 LIMIT 5000)",
        )
        .bind(retention.as_secs_f64())
        .execute(pool)
        .await?
        .rows_affected();
        total += n;
        if n < 5000 {
            return Ok(total);
        }
    }
}
