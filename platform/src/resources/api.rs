//! `POST /v2/apply`, `GET /v2/indexes`, `GET /v2/infrarules`.

use axum::extract::State;
use axum::{Extension, Json};
use layer_protocol::error::{ErrorBody, FieldProblem};
use layer_protocol::keys::Scope;
use layer_protocol::resource::{
    ApplyRequest, ApplyResponse, ApplyResult, IndexList, InfraRulesList, Resource, validate_document,
};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::store;
use crate::auth::Principal;
use crate::error::{ApiError, PlatformError};
use crate::functions::api::author;
use crate::functions::store::{FunctionInput, upsert};
use crate::http::{ApiJson, AppState};

/// The resource routes with their part of the OpenAPI document.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(apply)).routes(routes!(indexes)).routes(routes!(infra_rules))
}

/// Validates every document, then applies them all in one transaction: a
/// file with one bad document changes nothing.
#[utoipa::path(post, path = "/v2/apply", tag = "resources", operation_id = "apply_resources",
    summary = "Apply resource documents, all or nothing",
    description = "Needs the `write` scope (`InfraRules`: `admin`). Every document is validated first; one bad document changes nothing.",
    request_body(content = ApplyRequest, example = json!({"documents": [{"apiVersion": "hevlayer.com/v1alpha1", "kind": "Function",
        "metadata": {"name": "tag-titles"},
        "spec": {"targetNamespaces": ["items"], "inputs": ["title"], "worker": {"dispatch": "pull"}}}]})),
    responses((status = 200, description = "OK", body = ApplyResponse),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn apply(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
    ApiJson(req): ApiJson<ApplyRequest>,
) -> Result<Json<ApplyResponse>, ApiError> {
    p.require(Scope::Write)?;
    if req.documents.is_empty() {
        return Err(PlatformError::invalid("documents", "no documents to apply").into());
    }
    let mut resources = Vec::with_capacity(req.documents.len());
    let mut problems: Vec<FieldProblem> = Vec::new();
    for (i, doc) in req.documents.iter().enumerate() {
        let label = describe(doc, i);
        match validate_document(doc) {
            Ok(r) => resources.push(r),
            Err(list) => problems.extend(list.into_iter().map(|pr| FieldProblem {
                message: format!("{label}: {pr}"),
                field: format!("documents[{i}]{}{}", if pr.field.is_empty() { "" } else { "." }, pr.field),
            })),
        }
    }
    if !problems.is_empty() {
        return Err(PlatformError::Invalid {
            code: "invalid_resource",
            message: problems.iter().map(|p| p.message.clone()).collect::<Vec<_>>().join("; "),
            problems,
        }
        .into());
    }
    if resources.iter().any(|r| matches!(r, Resource::InfraRules { .. })) {
        p.require(Scope::Admin)?;
    }
    let mut tx = state.pool.begin().await.map_err(PlatformError::from)?;
    let mut results = Vec::with_capacity(resources.len());
    for (i, r) in resources.iter().enumerate() {
        let meta = r.metadata();
        let (action, revision) = match r {
            Resource::Function { metadata, spec, paused } => {
                let input = FunctionInput {
                    id: metadata.name.clone(),
                    k8s_namespace: metadata.namespace.clone(),
                    labels: Some(metadata.labels.clone()),
                    spec: (**spec).clone(),
                    paused: *paused,
                };
                // A refusal names the document, as validation does.
                let (udf, action) = upsert(&mut tx, &input, author(&p), false).await.map_err(|e| match e {
                    PlatformError::Forbidden(m) => {
                        PlatformError::Forbidden(format!("{}: {m}", describe(&req.documents[i], i)))
                    }
                    other => other,
                })?;
                (action, Some(udf.revision))
            }
            Resource::Index { metadata, spec } => (store::apply_index(&mut tx, metadata, spec).await?, None),
            Resource::InfraRules { metadata, spec } => (store::apply_infra_rules(&mut tx, metadata, spec).await?, None),
        };
        tracing::info!(kind = r.kind(), name = %meta.name, ?action, "applied resource");
        results.push(ApplyResult { kind: r.kind().to_string(), name: meta.name.clone(), action, revision });
    }
    tx.commit().await.map_err(PlatformError::from)?;
    for r in results.iter().filter(|r| r.kind == "Function") {
        state.engine.sweep_soon(&r.name);
    }
    Ok(Json(ApplyResponse { results }))
}

/// `document 2 (Function/tag-products)`, as far as the document says.
fn describe(doc: &serde_json::Value, i: usize) -> String {
    let kind = doc.get("kind").and_then(|v| v.as_str());
    let name = doc.get("metadata").and_then(|m| m.get("name")).and_then(|v| v.as_str());
    match (kind, name) {
        (Some(k), Some(n)) => format!("document {} ({k}/{n})", i + 1),
        _ => format!("document {}", i + 1),
    }
}

#[utoipa::path(get, path = "/v2/indexes", tag = "resources", operation_id = "list_indexes",
    summary = "List Index resources", description = "Needs the `read` scope; a key sees the Indexes of its namespaces.",
    responses((status = 200, description = "OK", body = IndexList),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn indexes(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<IndexList>, ApiError> {
    p.require(Scope::Read)?;
    let list: Vec<_> = store::list_indexes(&state.pool).await?.into_iter().filter(|i| p.can_see(&i.name)).collect();
    Ok(Json(IndexList { indexes: list }))
}

#[utoipa::path(get, path = "/v2/infrarules", tag = "resources", operation_id = "list_infra_rules",
    summary = "List InfraRules resources (compute pools)", description = "Needs the `read` scope.",
    responses((status = 200, description = "OK", body = InfraRulesList),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn infra_rules(
    State(state): State<AppState>,
    Extension(p): Extension<Principal>,
) -> Result<Json<InfraRulesList>, ApiError> {
    p.require(Scope::Read)?;
    Ok(Json(InfraRulesList { infra_rules: store::list_infra_rules(&state.pool).await? }))
}
