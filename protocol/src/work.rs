//! The pull protocol of the `hevlayer` client: claim, complete, fail,
//! heartbeat, discover (`/v2/udfs/{id}/...`), in its snake_case models.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `POST /v2/udfs/{id}/claim`.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
pub struct ClaimedItem {
    pub namespace: String,
    pub id: String,
    /// Every declared input, `null` where the row lacks it; `id` is the row id.
    pub input: Map<String, Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClaimResponse {
    pub udf_id: String,
    pub worker_id: String,
    pub items: Vec<ClaimedItem>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ItemRef {
    pub namespace: String,
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeartbeatRequest {
    pub worker_id: String,
    pub items: Vec<ItemRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompleteItem {
    pub namespace: String,
    pub id: String,
    #[serde(default)]
    pub vector: Option<Vec<f64>>,
    #[serde(default)]
    pub vectors: Option<Value>,
    #[serde(default)]
    pub attributes: Option<Map<String, Value>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompleteRequest {
    pub worker_id: String,
    pub items: Vec<CompleteItem>,
}

/// How a worker classifies a failure.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    Transient,
    Permanent,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailItem {
    pub namespace: String,
    pub id: String,
    pub kind: ErrorKind,
    #[serde(default)]
    pub message: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailRequest {
    pub worker_id: String,
    pub items: Vec<FailItem>,
}

/// The answer to complete, fail, heartbeat and reset-failed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ItemsResponse {
    pub udf_id: String,
    pub updated: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DiscoverRequest {
    /// Restrict the sweep to these of the Function's namespaces.
    #[serde(default)]
    pub namespaces: Option<Vec<String>>,
    /// Accepted for compatibility; a sweep reads what changed in one pass.
    #[serde(default)]
    pub page_size: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiscoverResponse {
    pub udf_id: String,
    pub enqueued: u64,
    pub namespaces: Vec<String>,
}
