//! `/v2/udfs`: the Function API in the client's snake_case models.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use layer_protocol::function::{GetUdfResponse, RevisionList, Udf, UdfList, validate_spec};
use layer_protocol::keys::Scope;
use layer_protocol::namespace::StatusResponse;
use layer_protocol::validate::{Case, Obj, Problems, check_resource_name, field};
use serde_json::Value;

use super::store::{self, Author, FunctionInput};
use crate::auth::Principal;
use crate::error::{ApiError, PlatformError, Result};
use crate::http::{ApiJson, AppState};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2/udfs", get(list).post(create))
        .route("/v2/udfs/{id}", get(get_one).put(update).delete(delete))
        .route("/v2/udfs/{id}/revisions", get(revisions))
        .route("/v2/udfs/{id}/pause", post(pause))
        .route("/v2/udfs/{id}/resume", post(resume))
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

async fn list(State(state): State<AppState>, Extension(p): Extension<Principal>) -> Result<Json<UdfList>, ApiError> {
    p.require(Scope::Read)?;
    Ok(Json(UdfList { udfs: store::list(&state.pool).await? }))
}

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

async fn revisions(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<RevisionList>, ApiError> {
    p.require(Scope::Read)?;
    Ok(Json(RevisionList { revisions: store::revisions(&state.pool, &id).await? }))
}

async fn delete(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Json<StatusResponse>, ApiError> {
    p.require(Scope::Write)?;
    store::delete(&state.pool, &id).await?;
    state.engine.functions_changed();
    tracing::info!(udf = %id, "function deleted");
    Ok(Json(StatusResponse::ok(format!("function {id} deleted; attributes already written are kept"))))
}

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
