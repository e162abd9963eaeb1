//! Row-store wire types: the `/v2/namespaces` API as the `hevlayer` client
//! speaks it (Turbopuffer-shaped writes and queries).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A JSON object of attributes.
pub type Attributes = Map<String, Value>;

/// `POST /v2/namespaces/{ns}`: any combination of operations, applied in one
/// transaction in the order deletes, upserts, patches, delete_by_filter.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WriteRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<Object>>))]
    pub upsert_rows: Option<Vec<Attributes>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub upsert_columns: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<Object>>))]
    pub patch_rows: Option<Vec<Attributes>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub patch_columns: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<serde_json::Value>>))]
    pub deletes: Option<Vec<Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<serde_json::Value>>))]
    pub delete_by_filter: Option<Value>,
    /// Accepted for compatibility; only `cosine_distance` and
    /// `euclidean_squared` are allowed. Stored on the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distance_metric: Option<String>,
    /// Accepted for compatibility and ignored (attributes are schemaless
    /// JSON), but must be an object, as the client sends it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub schema: Option<Map<String, Value>>,
}

/// The answer to a write, matching the client's `TurbopufferWriteResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WriteResponse {
    pub status: String,
    pub message: String,
    pub rows_affected: u64,
    pub rows_upserted: u64,
    pub rows_patched: u64,
    pub rows_deleted: u64,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub billing: Map<String, Value>,
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub performance: Map<String, Value>,
}

/// `POST /v2/namespaces/{ns}/documents`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct FetchDocumentsRequest {
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<serde_json::Value>))]
    pub ids: Vec<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_attributes: Option<Vec<String>>,
}

/// One stored row.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Document {
    pub id: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub attributes: Attributes,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vector: Option<Vec<f32>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FetchDocumentsResponse {
    pub documents: Vec<Document>,
    pub missing: Vec<String>,
}

/// `include_attributes`: `true` for all, `false` for none, or a list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum IncludeAttributes {
    All(bool),
    Some(Vec<String>),
}

/// `POST /v2/namespaces/{ns}/query`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<serde_json::Value>>))]
    pub filters: Option<Value>,
    /// `["attr", "asc"|"desc"]`, or a list of those for ties.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<serde_json::Value>>))]
    pub rank_by: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 10000))]
    pub top_k: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_attributes: Option<IncludeAttributes>,
    /// Not supported by this store: nearest-neighbour search is refused with a 400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub vector: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub nearest_to_id: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub as_of: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub between: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub cursor: Option<Value>,
    /// Sent by the client as `false`; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_leg_breakdown: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueryResponse {
    /// Each row is `{"id": ..., <attributes>...}`, as Turbopuffer returns them.
    #[cfg_attr(feature = "openapi", schema(value_type = Vec<Object>))]
    pub rows: Vec<Attributes>,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub billing: Map<String, Value>,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub performance: Map<String, Value>,
}

/// One entry of `GET /v2/namespaces`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NamespaceEntry {
    pub name: String,
    pub row_count: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_write_ms: Option<i64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NamespaceList {
    pub namespaces: Vec<NamespaceEntry>,
    #[serde(default)]
    pub next_cursor: Option<String>,
}

/// The plain acknowledgement (`StatusResponse` in the client).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusResponse {
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_affected: Option<u64>,
}

impl StatusResponse {
    pub fn ok(message: impl Into<String>) -> Self {
        Self { status: "OK".into(), message: Some(message.into()), rows_affected: None }
    }
}
