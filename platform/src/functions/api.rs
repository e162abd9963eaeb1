//! `/v2/udfs`: the Function API in the client's snake_case models.

use axum::extract::{Path, State};
use std::collections::BTreeMap;

use axum::{Extension, Json};
use layer_protocol::error::ErrorBody;
use layer_protocol::function::{FunctionSpec, GetUdfResponse, RevisionList, Udf, UdfList, validate_spec};
use layer_protocol::keys::Scope;
use layer_protocol::namespace::StatusResponse;
use layer_protocol::validate::{Case, Obj, Problems, check_resource_name, field};
use serde_json::Value;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::store::{self, Author, FunctionInput};
use crate::auth::Principal;
use crate::error::{ApiError, PlatformError, Result};
use crate::http::{ApiJson, AppState};

/// The Function routes with their part of the OpenAPI document.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, create))
        .routes(routes!(get_one, update, delete))
        .routes(routes!(revisions))
        .routes(routes!(pause))
        .routes(routes!(resume))
}

/// `POST /v2/udfs` (read by [`parse_body`], which names every problem;
/// this describes it).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct CreateUdf {
    /// The Function's name: lowercase letters, digits and `-`.
    #[schema(pattern = "^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")]
    id: String,
    spec: FunctionSpec,
    labels: Option<BTreeMap<String, String>>,
}

/// `PUT /v2/udfs/{id}`: as [`CreateUdf`], the id in the path.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
struct UpdateUdf {
    /// The id in the path, if given.
    id: Option<String>,
    spec: FunctionSpec,
    labels: Option<BTreeMap<String, String>>,
}

/// The caller as the author of a Function change (see
/// [`store::field_needing_admin`] for what needs the admin scope).
pub(crate) fn author(p: &Principal) -> Author<'_> {
    Author { key_id: Some(&p.key_id), may_run_commands: p.is_admin() }
}

/// Validates `{"id"?, "spec", "labels"?}` in snake_case.
fn parse_body(body: &Value, id_from_path: Option<&str>) -> Result<FunctionInput> {
    let mut p = Problems::new();
    let fields = [field("id", "id"), field("spec", "spec"), field("labels", "labels")];
    let Some(o) = Obj::open(&mut p, "", body, Case::Snake, &fields) else {
        return Err(PlatformError::invalid_fields("invalid_function", p.into_vec()));
    };
    let id = match id_from_path {
        Some(id) => {
            if let Some(body_id) = o.string(&mut p, fields[0], false)
                && body_id != id
            {
                p.push("id", format!("\"{body_id}\" differs from the id in the path (\"{id}\")"));
            }
            Some(id.to_string())
        }
        None => o.string(&mut p, fields[0], true),
    };
    if let Some(id) = &id
        && let Err(m) = check_resource_name(id)
    {
        p.push("id", m);
    }
    let labels = o.string_map(&mut p, fields[2]);
    let spec = match o.get(fields[1]) {
        Some(s) => validate_spec(&mut p, "spec", s, Case::Snake),
        None => {
            p.push("spec", "required");
            None
        }
    };
    match (id, spec) {
        (Some(id), Some(v)) if p.is_empty() => {
            Ok(FunctionInput { id, k8s_namespace: "layer".into(), labels, spec: v.spec, paused: v.paused })
        }
        _ => Err(PlatformError::invalid_fields("invalid_function", p.into_vec())),
    }
}

#[utoipa::path(get, path = "/v2/udfs", tag = "functions", operation_id = "list_udfs", summary = "List Functions",
    description = "Needs the `read` scope.",
    responses((status = 200, description = "OK", body = UdfList),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn list(State(state): State<AppState>, Extension(p): Extension<Principal>) -> Result<Json<UdfList>, ApiError> {
    p.require(Scope::Read)?;
    Ok(Json(UdfList { udfs: store::list(&state.pool).await? }))
}

#[utoipa::path(post, path = "/v2/udfs", tag = "functions", operation_id = "create_udf", summary = "Create a Function",
    description = "Needs the `write` scope (`worker.command`, `worker.podSpec` and host settings: `admin`). A Function of that id must not exist (409).",
    request_body(content = CreateUdf, example = json!({"id": "tag-items", "spec": {"target_namespaces": ["items"], "inputs": ["id", "title"], "version": "v2", "worker": {"dispatch": "pull"}}, "labels": {"team": "ml"}})),
    responses((status = 200, description = "OK", body = Udf),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn create(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Udf>, ApiError> {
    p.require(Scope::Write)?;
    let input = parse_body(&body, None)?;
    let mut tx = state.pool.begin().await.map_err(PlatformError::from)?;
    let (udf, _) = store::upsert(&mut tx, &input, author(&p), true).await?;
    tx.commit().await.map_err(PlatformError::from)?;
    tracing::info!(udf = %udf.id, revision = udf.revision, "function created");
    state.engine.sweep_soon(&udf.id);
    Ok(Json(udf))
}

#[utoipa::path(put, path = "/v2/udfs/{id}", tag = "functions", operation_id = "update_udf",
    summary = "Create or replace a Function", description = "Needs the `write` scope. A changed spec makes a new revision.",
    params(("id" = String, Path, description = "The Function's id", example = "tags")),
    request_body(content = UpdateUdf, example = json!({"spec": {"target_namespaces": ["items"], "inputs": ["id", "title"], "version": "v2", "worker": {"dispatch": "pull"}}})),
    responses((status = 200, description = "OK", body = Udf),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn update(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<Value>,
) -> Result<Json<Udf>, ApiError> {
    p.require(Scope::Write)?;
    let input = parse_body(&body, Some(&id))?;
    let mut tx = state.pool.begin().await.map_err(PlatformError::from)?;
    let (udf, action) = store::upsert(&mut tx, &input, author(&p), false).await?;
    tx.commit().await.map_err(PlatformError::from)?;
    tracing::info!(udf = %udf.id, revision = udf.revision, ?action, "function applied");
    state.engine.sweep_soon(&udf.id);
    Ok(Json(udf))
}

#[utoipa::path(get, path = "/v2/udfs/{id}", tag = "functions", operation_id = "get_udf",
    summary = "Get a Function with its status", description = "Needs the `read` scope.",
    params(("id" = String, Path, description = "The Function's id", example = "tags")),
    responses((status = 200, description = "OK", body = GetUdfResponse),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn get_one(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<GetUdfResponse>, ApiError> {
    p.require(Scope::Read)?;
    let udf = store::get(&state.pool, &id).await?;
    let status = crate::runners::status(&state.pool, &udf, state.settings.runners.lost_after).await?;
    Ok(Json(GetUdfResponse { udf, status }))
}

#[utoipa::path(get, path = "/v2/udfs/{id}/revisions", tag = "functions", operation_id = "list_udf_revisions",
    summary = "A Function's revisions, newest first, with what changed", description = "Needs the `read` scope.",
    params(("id" = String, Path, description = "The Function's id", example = "tags")),
    responses((status = 200, description = "OK", body = RevisionList),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn revisions(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<RevisionList>, ApiError> {
    p.require(Scope::Read)?;
    Ok(Json(RevisionList { revisions: store::revisions(&state.pool, &id).await? }))
}

#[utoipa::path(delete, path = "/v2/udfs/{id}", tag = "functions", operation_id = "delete_udf",
    summary = "Delete a Function", description = "Needs the `write` scope. Attributes already written are kept.",
    params(("id" = String, Path, description = "The Function's id", example = "retired")),
    responses((status = 200, description = "OK", body = StatusResponse),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn delete(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<StatusResponse>, ApiError> {
    p.require(Scope::Write)?;
    store::delete(&state.pool, &id).await?;
    // Its workers' keys went with it.
    state.keys.forget();
    state.engine.functions_changed();
    tracing::info!(udf = %id, "function deleted");
    Ok(Json(StatusResponse::ok(format!("function {id} deleted; attributes already written are kept"))))
}

#[utoipa::path(post, path = "/v2/udfs/{id}/pause", tag = "functions", operation_id = "pause_udf",
    summary = "Pause a Function", description = "Needs the `write` scope. Nothing new is leased; batches in flight finish.",
    params(("id" = String, Path, description = "The Function's id", example = "tags")),
    responses((status = 200, description = "OK", body = Udf),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn pause(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Udf>, ApiError> {
    p.require(Scope::Write)?;
    let udf = store::set_paused(&state.pool, &id, true).await?;
    state.engine.functions_changed();
    Ok(Json(udf))
}

#[utoipa::path(post, path = "/v2/udfs/{id}/resume", tag = "functions", operation_id = "resume_udf",
    summary = "Resume a paused Function", description = "Needs the `write` scope.",
    params(("id" = String, Path, description = "The Function's id", example = "tags")),
    responses((status = 200, description = "OK", body = Udf),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn resume(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<Udf>, ApiError> {
    p.require(Scope::Write)?;
    let udf = store::set_paused(&state.pool, &id, false).await?;
    state.engine.functions_changed();
    Ok(Json(udf))
}
