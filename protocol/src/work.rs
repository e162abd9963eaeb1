//! The pull protocol of the `hevlayer` client: claim, complete, fail,
//! heartbeat, discover (`/v2/udfs/{id}/...`), in its snake_case models.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `POST /v2/udfs/{id}/claim`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClaimRequest {
    pub worker_id: String,
    /// Rows to lease; defaults to the Function's `worker.batch_size`.
    #[serde(default)]
    pub limit: Option<i64>,
    /// Lease length; defaults to the Function's `schedule.lease_seconds`.
    #[serde(default)]
    pub lease_seconds: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClaimedItem {
    pub namespace: String,
    pub id: String,
    /// Every declared input, `null` where the row lacks it; `id` is the row id.
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub input: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClaimResponse {
    pub udf_id: String,
    pub worker_id: String,
    pub items: Vec<ClaimedItem>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ItemRef {
    pub namespace: String,
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HeartbeatRequest {
    pub worker_id: String,
    pub items: Vec<ItemRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CompleteItem {
    pub namespace: String,
    pub id: String,
    #[serde(default)]
    pub vector: Option<Vec<f64>>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub vectors: Option<Value>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub attributes: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CompleteRequest {
    pub worker_id: String,
    pub items: Vec<CompleteItem>,
}

/// How a worker classifies a failure.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    Transient,
    Permanent,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FailItem {
    pub namespace: String,
    pub id: String,
    pub kind: ErrorKind,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FailRequest {
    pub worker_id: String,
    pub items: Vec<FailItem>,
}

/// The answer to complete, fail, heartbeat and reset-failed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ItemsResponse {
    pub udf_id: String,
    pub updated: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DiscoverRequest {
    /// Restrict the sweep to these of the Function's namespaces.
    #[serde(default)]
    pub namespaces: Option<Vec<String>>,
    /// Accepted for compatibility; a sweep reads what changed in one pass.
    #[serde(default)]
    pub page_size: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DiscoverResponse {
    pub udf_id: String,
    pub enqueued: u64,
    pub namespaces: Vec<String>,
}
