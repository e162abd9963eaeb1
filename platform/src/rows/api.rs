//! `/v2/namespaces`: writes, fetches, queries, listing (scans are in [`super::scans`]).

use axum::extract::{Path, State};
use axum::{Extension, Json};
use layer_protocol::error::ErrorBody;
use layer_protocol::filter::Filter;
use layer_protocol::keys::Scope;
use layer_protocol::namespace::{
    FetchDocumentsRequest, FetchDocumentsResponse, IncludeAttributes, NamespaceList, QueryRequest, QueryResponse,
    StatusResponse, WriteRequest, WriteResponse,
};
use layer_protocol::validate::check_namespace_name;
use serde_json::{Map, Value, json};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::plan::{normalize_id, plan};
use super::store::{self, OrderBy, Query};
use crate::auth::Principal;
use crate::error::{ApiError, PlatformError, Result};
use crate::http::{ApiJson, AppState, Params, int_param};

/// The row routes (scans included) with their part of the OpenAPI
/// document, generated from the handlers' `#[utoipa::path]` and the wire
/// types.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list))
        .routes(routes!(write, delete))
        .routes(routes!(query))
        .routes(routes!(fetch_many))
        .routes(routes!(fetch_one))
        .merge(super::scans::routes())
}

/// The query of `GET /v2/namespaces`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct ListQuery {
    /// Only namespaces whose name starts with this.
    #[param(example = "it")]
    prefix: Option<String>,
    /// The previous page's `next_cursor`, as given.
    cursor: Option<String>,
    /// How many (default 100).
    #[param(minimum = 1, maximum = 1000, example = 10)]
    page_size: Option<i64>,
}

/// The query of `GET /v2/namespaces/{ns}/documents/{id}`.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct FetchQuery {
    /// Comma-separated attribute names (default: all).
    #[param(example = "title")]
    include_attributes: Option<String>,
}

pub(super) fn check_ns(principal: &Principal, ns: &str, scope: Scope) -> Result<()> {
    check_namespace_name(ns).map_err(|m| PlatformError::invalid("namespace", m))?;
    principal.require_namespace(ns, scope)
}

fn millis(started: std::time::Instant) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("server_total_ms".into(), json!(started.elapsed().as_secs_f64() * 1000.0));
    m
}

#[utoipa::path(post, path = "/v2/namespaces/{ns}", tag = "rows", operation_id = "write_namespace",
    summary = "Write rows: upsert_rows, upsert_columns, patch_rows, patch_columns, deletes, delete_by_filter (one transaction)",
    description = "Needs the `write` scope.", params(("ns" = String, Path, description = "The namespace", example = "items")),
    request_body(content = WriteRequest, example = json!({"upsert_rows": [{"id": "c", "title": "Stove"}]})),
    responses((status = 200, description = "OK", body = WriteResponse), (status = "default", description = "Error", body = ErrorBody)))]
async fn write(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(ns): Path<String>,
    ApiJson(req): ApiJson<WriteRequest>,
) -> Result<Json<WriteResponse>, ApiError> {
    let started = std::time::Instant::now();
    check_ns(&principal, &ns, Scope::Write)?;
    let metric = req.distance_metric.clone();
    let plan = plan(req)?;
    let writer = store::Writer { key_id: &principal.key_id, worker_of: principal.worker_of() };
    let c = store::write(&state.pool, &ns, plan, metric.as_deref(), &writer).await?;
    state.engine.namespace_written(&ns);
    let affected = c.upserted + c.patched + c.deleted;
    Ok(Json(WriteResponse {
        status: "OK".into(),
        message: format!("{} upserted, {} patched, {} deleted", c.upserted, c.patched, c.deleted),
        rows_affected: affected,
        rows_upserted: c.upserted,
        rows_patched: c.patched,
        rows_deleted: c.deleted,
        billing: Map::new(),
        performance: millis(started),
    }))
}

#[utoipa::path(delete, path = "/v2/namespaces/{ns}", tag = "rows", operation_id = "delete_namespace",
    summary = "Delete a namespace and its rows", description = "Needs the `write` scope.", params(("ns" = String, Path, description = "The namespace", example = "scratch")),
    responses((status = 200, description = "OK", body = StatusResponse), (status = "default", description = "Error", body = ErrorBody)))]
async fn delete(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(ns): Path<String>,
) -> Result<Json<StatusResponse>, ApiError> {
    check_ns(&principal, &ns, Scope::Write)?;
    let n = store::delete_namespace(&state.pool, &ns).await?;
    Ok(Json(StatusResponse {
        status: "OK".into(),
        message: Some(format!("namespace {ns} deleted")),
        rows_affected: Some(n),
    }))
}

#[utoipa::path(get, path = "/v2/namespaces", tag = "rows", operation_id = "list_namespaces",
    summary = "List namespaces", description = "Needs the `read` scope.", params(ListQuery),
    responses((status = 200, description = "OK", body = NamespaceList), (status = "default", description = "Error", body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    params: Params,
) -> Result<Json<NamespaceList>, ApiError> {
    let page_size = int_param(&params, "page_size", 100, 1, 1000)?;
    let prefix = params.get("prefix").map(String::as_str).unwrap_or("");
    let after = params.get("cursor").map(|c| store::parse_namespace_cursor(c)).transpose()?;
    let (mut namespaces, next_cursor) =
        store::list_namespaces(&state.pool, prefix, after.as_deref(), page_size).await?;
    namespaces.retain(|n| principal.can_see(&n.name));
    Ok(Json(NamespaceList { namespaces, next_cursor }))
}

#[utoipa::path(post, path = "/v2/namespaces/{ns}/documents", tag = "rows", operation_id = "fetch_documents",
    summary = "Fetch documents by id", description = "Needs the `read` scope.", params(("ns" = String, Path, description = "The namespace", example = "items")),
    request_body(content = FetchDocumentsRequest, example = json!({"ids": ["a", "b"], "include_attributes": ["title"]})),
    responses((status = 200, description = "OK", body = FetchDocumentsResponse), (status = "default", description = "Error", body = ErrorBody)))]
async fn fetch_many(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(ns): Path<String>,
    ApiJson(req): ApiJson<FetchDocumentsRequest>,
) -> Result<Json<FetchDocumentsResponse>, ApiError> {
    check_ns(&principal, &ns, Scope::Read)?;
    if req.ids.len() > 10_000 {
        return Err(PlatformError::invalid("ids", "at most 10000 ids per fetch").into());
    }
    let ids =
        req.ids.iter().enumerate().map(|(i, v)| normalize_id(v, &format!("ids[{i}]"))).collect::<Result<Vec<_>>>()?;
    let (documents, missing) = store::fetch(&state.pool, &ns, &ids, req.include_attributes.as_deref()).await?;
    Ok(Json(FetchDocumentsResponse { documents, missing }))
}

#[utoipa::path(get, path = "/v2/namespaces/{ns}/documents/{id}", tag = "rows", operation_id = "fetch_document",
    summary = "Fetch one document", description = "Needs the `read` scope.",
    params(("ns" = String, Path, description = "The namespace", example = "items"), ("id" = String, Path, description = "The row's id", example = "a"), FetchQuery),
    responses((status = 200, description = "OK", body = layer_protocol::namespace::Document), (status = "default", description = "Error", body = ErrorBody)))]
async fn fetch_one(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((ns, id)): Path<(String, String)>,
    params: Params,
) -> Result<Json<layer_protocol::namespace::Document>, ApiError> {
    check_ns(&principal, &ns, Scope::Read)?;
    let include: Option<Vec<String>> = params
        .get("include_attributes")
        .map(|s| s.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect());
    let (mut docs, _) = store::fetch(&state.pool, &ns, std::slice::from_ref(&id), include.as_deref()).await?;
    docs.pop()
        .map(Json)
        .ok_or_else(|| ApiError(PlatformError::NotFound(format!("document {id} not found in namespace {ns}"))))
}

/// Parses `rank_by`: `["attr", "asc"|"desc"]` or a list of those.
fn parse_rank_by(v: &Value) -> Result<Vec<OrderBy>> {
    let bad = |m: &str| PlatformError::invalid("rank_by", m.to_string());
    let Value::Array(items) = v else {
        return Err(bad("expected [\"attribute\", \"asc\"|\"desc\"] or a list of those"));
    };
    let terms: Vec<&Value> = if items.first().is_some_and(Value::is_array) { items.iter().collect() } else { vec![v] };
    let mut out = Vec::new();
    for t in terms {
        let parts = t.as_array().map(Vec::as_slice).unwrap_or_default();
        match parts {
            [Value::String(attr), Value::String(dir)] if dir == "asc" || dir == "desc" => {
                out.push(OrderBy { attr: attr.clone(), descending: dir == "desc" });
            }
            [Value::String(attr), Value::String(kind), ..] if kind == "ANN" || kind == "BM25" => {
                return Err(PlatformError::Unsupported(format!(
                    "rank_by [\"{attr}\", \"{kind}\", ...] is not supported by this store: rank by an attribute with \"asc\" or \"desc\""
                )));
            }
            _ => return Err(bad("each term must be [\"attribute\", \"asc\"|\"desc\"]")),
        }
    }
    if out.len() > 8 {
        return Err(bad("at most 8 ordering terms"));
    }
    Ok(out)
}

#[utoipa::path(post, path = "/v2/namespaces/{ns}/query", tag = "rows", operation_id = "query_namespace",
    summary = "Query rows with filters, rank_by on an attribute, top_k, include_attributes",
    description = "Needs the `read` scope.", params(("ns" = String, Path, description = "The namespace", example = "items")),
    request_body(content = QueryRequest, example = json!({"filters": ["title", "Eq", "Tent"], "rank_by": ["id", "asc"], "top_k": 10})),
    responses((status = 200, description = "OK", body = QueryResponse), (status = "default", description = "Error", body = ErrorBody)))]
async fn query(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(ns): Path<String>,
    ApiJson(req): ApiJson<QueryRequest>,
) -> Result<Json<QueryResponse>, ApiError> {
    let started = std::time::Instant::now();
    check_ns(&principal, &ns, Scope::Read)?;
    for (name, set) in [
        ("vector", req.vector.is_some()),
        ("nearest_to_id", req.nearest_to_id.is_some()),
        ("as_of", req.as_of.is_some()),
        ("between", req.between.is_some()),
        ("cursor", req.cursor.is_some()),
    ] {
        if set {
            return Err(PlatformError::Unsupported(format!(
                "{name} is not supported by this store: query with filters, rank_by on an attribute and top_k"
            ))
            .into());
        }
    }
    let filter = match &req.filters {
        Some(f) => Filter::parse(f, "filters").map_err(|e| PlatformError::invalid(e.path, e.message))?,
        None => None,
    };
    let order = match &req.rank_by {
        Some(r) => parse_rank_by(r)?,
        None => Vec::new(),
    };
    let top_k = match req.top_k {
        None => 10,
        Some(k) if (1..=10_000).contains(&k) => k,
        Some(k) => {
            return Err(PlatformError::invalid("top_k", format!("{k} is out of range; allowed 1..=10000")).into());
        }
    };
    let include = match req.include_attributes {
        None | Some(IncludeAttributes::All(false)) => Some(Vec::new()),
        Some(IncludeAttributes::All(true)) => None,
        Some(IncludeAttributes::Some(list)) => Some(list),
    };
    let rows = store::query(&state.pool, &ns, &Query { filter, order, top_k, include }).await?;
    Ok(Json(QueryResponse { rows, billing: Map::new(), performance: millis(started) }))
}
