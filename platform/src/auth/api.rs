//! `/v2/keys`: mint, list, get, revoke, delete. All need the admin scope,
//! except that a key may read itself.

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use layer_protocol::keys::{ApiKey, ApiKeyList, MintKeyRequest, MintKeyResponse, Scope};
use layer_protocol::namespace::StatusResponse;
use serde::Deserialize;

use super::Principal;
use super::store;
use crate::error::ApiError;
use crate::http::{ApiJson, AppState, Params};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v2/keys", get(list).post(mint))
        .route("/v2/keys/authenticate", post(authenticate))
        .route("/v2/keys/{key_id}", get(get_key).delete(delete))
        .route("/v2/keys/{key_id}/revoke", post(revoke))
}

async fn list(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    params: Params,
) -> Result<Json<ApiKeyList>, ApiError> {
    p.require(Scope::Admin)?;
    let include_revoked = crate::http::bool_param(&params, "includeRevoked")?;
    Ok(Json(ApiKeyList { keys: store::list(&state.pool, include_revoked).await? }))
}

async fn mint(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiJson(req): ApiJson<MintKeyRequest>,
) -> Result<Json<MintKeyResponse>, ApiError> {
    p.require(Scope::Admin)?;
    let (key, token) = store::mint(&state.pool, &req).await?;
    tracing::info!(key_id = %key.key_id, by = %p.key_id, "minted api key");
    Ok(Json(MintKeyResponse { key, token }))
}

async fn get_key(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(key_id): Path<String>,
) -> Result<Json<ApiKey>, ApiError> {
    if p.key_id != key_id {
        p.require(Scope::Admin)?;
    }
    Ok(Json(store::get(&state.pool, &key_id).await?))
}

async fn revoke(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(key_id): Path<String>,
) -> Result<Json<ApiKey>, ApiError> {
    p.require(Scope::Admin)?;
    let key = store::revoke(&state.pool, &key_id).await?;
    tracing::info!(key_id = %key_id, by = %p.key_id, "revoked api key");
    Ok(Json(key))
}

async fn delete(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(key_id): Path<String>,
) -> Result<Json<StatusResponse>, ApiError> {
    p.require(Scope::Admin)?;
    store::delete(&state.pool, &key_id).await?;
    tracing::info!(key_id = %key_id, by = %p.key_id, "deleted api key");
    Ok(Json(StatusResponse::ok(format!("key {key_id} deleted"))))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthenticateRequest {
    token: String,
}

/// Token introspection for gateways in front of the platform (admin only).
async fn authenticate(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiJson(req): ApiJson<AuthenticateRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    p.require(Scope::Admin)?;
    let who = store::authenticate(&state.pool, &req.token).await?;
    let key = store::get(&state.pool, &who.key_id).await?;
    Ok(Json(serde_json::json!({
        "keyId": key.key_id,
        "name": key.name,
        "owner": key.owner,
        "entitlements": key.entitlements,
        "expiresAt": key.expires_at,
    })))
}
