//! `/v2/keys`: mint, list, get, revoke, delete. All need the admin scope,
//! except that a key may read itself.

use axum::extract::{Path, State};
use axum::{Extension, Json};
use layer_protocol::error::ErrorBody;
use layer_protocol::keys::{ApiKey, ApiKeyList, MintKeyRequest, MintKeyResponse, Scope};
use layer_protocol::namespace::StatusResponse;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::Principal;
use super::store;
use crate::error::ApiError;
use crate::http::{ApiJson, AppState, Params};

/// The keys routes with their part of the OpenAPI document, generated
/// from the handlers' `#[utoipa::path]` and the wire types.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(list, mint))
        .routes(routes!(authenticate))
        .routes(routes!(get_key, delete))
        .routes(routes!(revoke))
}

#[utoipa::path(get, path = "/v2/keys", tag = "keys", operation_id = "list_keys", summary = "List keys",
    description = "Needs the `admin` scope.",
    params(("includeRevoked" = Option<bool>, Query, description = "Revoked and expired keys too (default false)", example = true)),
    responses((status = 200, description = "OK", body = ApiKeyList),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    params: Params,
) -> Result<Json<ApiKeyList>, ApiError> {
    p.require(Scope::Admin)?;
    let include_revoked = crate::http::bool_param(&params, "includeRevoked")?;
    Ok(Json(ApiKeyList { keys: store::list(&state.pool, include_revoked).await? }))
}

#[utoipa::path(post, path = "/v2/keys", tag = "keys", operation_id = "mint_key",
    summary = "Mint a key; the token is in this response only", description = "Needs the `admin` scope.",
    request_body(content = MintKeyRequest, example = json!({"name": "tagger", "owner": "ml-team", "entitlements": {"tagging": {"scopes": ["write"], "namespaces": ["items"]}}, "expiresAfter": "30d"})),
    responses((status = 200, description = "OK", body = MintKeyResponse),
              (status = "default", description = "Error", body = ErrorBody)))]
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

#[utoipa::path(get, path = "/v2/keys/{key_id}", tag = "keys", operation_id = "get_key", summary = "Get a key",
    description = "Needs the `admin` scope, except for the key itself.",
    params(("key_id" = String, Path, description = "The key's id", example = "key_0000000000000000")),
    responses((status = 200, description = "OK", body = ApiKey),
              (status = "default", description = "Error", body = ErrorBody)))]
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

#[utoipa::path(post, path = "/v2/keys/{key_id}/revoke", tag = "keys", operation_id = "revoke_key",
    summary = "Revoke a key", description = "Needs the `admin` scope. The last active admin key cannot be revoked (409).",
    params(("key_id" = String, Path, description = "The key's id", example = "key_0000000000000000")),
    responses((status = 200, description = "OK", body = ApiKey),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn revoke(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(key_id): Path<String>,
) -> Result<Json<ApiKey>, ApiError> {
    p.require(Scope::Admin)?;
    let key = store::revoke(&state.pool, &key_id).await?;
    state.keys.forget();
    tracing::info!(key_id = %key_id, by = %p.key_id, "revoked api key");
    Ok(Json(key))
}

#[utoipa::path(delete, path = "/v2/keys/{key_id}", tag = "keys", operation_id = "delete_key",
    summary = "Delete a key", description = "Needs the `admin` scope. The last active admin key cannot be deleted (409).",
    params(("key_id" = String, Path, description = "The key's id", example = "key_0000000000000000")),
    responses((status = 200, description = "OK", body = StatusResponse),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn delete(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    Path(key_id): Path<String>,
) -> Result<Json<StatusResponse>, ApiError> {
    p.require(Scope::Admin)?;
    store::delete(&state.pool, &key_id).await?;
    state.keys.forget();
    tracing::info!(key_id = %key_id, by = %p.key_id, "deleted api key");
    Ok(Json(StatusResponse::ok(format!("key {key_id} deleted"))))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct AuthenticateRequest {
    token: String,
}

/// Token introspection for gateways in front of the platform (admin only).
#[utoipa::path(post, path = "/v2/keys/authenticate", tag = "keys", operation_id = "authenticate_key",
    summary = "Introspect a token", description = "Needs the `admin` scope.",
    request_body(content = AuthenticateRequest, example = json!({"token": "lyr_notatoken"})),
    responses((status = 200, description = "The key's id, name, owner, entitlements and expiry", body = Object),
              (status = "default", description = "Error", body = ErrorBody)))]
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
