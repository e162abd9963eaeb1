//! Scan wire types: `/v2/namespaces/{ns}/scans` as the `hevlayer` client
//! speaks it (`create_scan`, `get_scan`, `get_scan_results`, `list_scans`,
//! `delete_scan`; `TpufClient.list_ids` is built on them). Field names and
//! shapes match the client's `CreateScanRequest`, `ScanJob`,
//! `ScanIdsResponse`, `ScanValuesResponse` and `ScanCountResponse`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What a scan collects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ScanMode {
    /// The ids of the matching rows, in id order.
    #[default]
    Ids,
    /// How many rows match; answered at once, there are no results to page.
    Count,
    /// The distinct values of `field` among the matching rows, with counts.
    Values,
}

impl ScanMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ScanMode::Ids => "ids",
            ScanMode::Count => "count",
            ScanMode::Values => "values",
        }
    }

    pub fn parse(s: &str) -> Option<ScanMode> {
        [ScanMode::Ids, ScanMode::Count, ScanMode::Values].into_iter().find(|m| m.as_str() == s)
    }
}

/// Where the client asks a scan to read from. This store has one copy of
/// the rows, so every scan reads the origin (`effective_source`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ScanSource {
    #[default]
    Auto,
    Snapshot,
    Cache,
    Origin,
}

impl ScanSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ScanSource::Auto => "auto",
            ScanSource::Snapshot => "snapshot",
            ScanSource::Cache => "cache",
            ScanSource::Origin => "origin",
        }
    }

    pub fn parse(s: &str) -> Option<ScanSource> {
        [ScanSource::Auto, ScanSource::Snapshot, ScanSource::Cache, ScanSource::Origin]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
}

/// The state of a scan job (the client's `JobStatus`). Scans here run to
/// completion inside the request that creates them, so a job is seen
/// `completed` or `failed`; `running` exists only inside that request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum ScanStatus {
    /// Being computed by the request that created it.
    Running,
    /// Its results are held until it is deleted or pruned.
    Completed,
    /// It ran past `timeout_seconds`; `error` says so. It has no results.
    Failed,
}

impl ScanStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ScanStatus::Running => "running",
            ScanStatus::Completed => "completed",
            ScanStatus::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<ScanStatus> {
        [ScanStatus::Running, ScanStatus::Completed, ScanStatus::Failed].into_iter().find(|m| m.as_str() == s)
    }
}

/// `POST /v2/namespaces/{ns}/scans`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateScanRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ScanSource>,
    /// The same filter language as `/query` and `spec.filter`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Vec<serde_json::Value>>))]
    pub filters: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ScanMode>,
    /// The attribute whose values a `values` scan counts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The default number of results per page of `/results` (1..=10000,
    /// default 1000): what `get_scan_results` answers without `limit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 10000, default = 1000))]
    pub page_size: Option<i64>,
    /// How long the scan may run (1..=300 s, default 30). A scan that runs
    /// longer is cancelled and recorded as `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 300, default = 30))]
    pub timeout_seconds: Option<i64>,
    /// Accepted: every scan here is exhaustive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exhaustive: Option<bool>,
    /// Accepted (1..=64) and echoed; PostgreSQL plans the scan's parallelism.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 64))]
    pub threads: Option<i64>,
    /// Not supported by this store: refused with a 400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub as_of: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub between: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub fts: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub hybrid_text: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(ignore))]
    pub ann: Option<Value>,
}

/// A scan job (the client's `ScanJob`). A `count` scan also carries the
/// fields of the client's `ScanCountResponse` (`count`, `served_by`), so
/// `create_scan` hands back the count directly and `scan()` still finds
/// the job's `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScanJob {
    pub id: String,
    pub namespace: String,
    pub status: ScanStatus,
    /// 1.0 once the scan has finished (completed or failed).
    pub progress: f64,
    /// The rows that matched the filter.
    pub documents_scanned: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stable_as_of: Option<i64>,
    pub created_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub mode: ScanMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// As asked (default `auto`).
    pub source: ScanSource,
    /// Always `origin`: the rows themselves.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_source: Option<ScanSource>,
    /// `values` scans: the distinct values found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_values: Option<i64>,
    /// More results matched than a scan holds; the results are the first
    /// ones (ids in id order, values by count).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounded: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approximate: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<i64>,
    /// The default page length of `/results`.
    pub page_size: i64,
    /// The filter, as given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<Value>,
    /// How long the scan took.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<i64>,
    /// `count` scans: the matching rows (`ScanCountResponse.count`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
    /// `count` scans: `origin` (`ScanCountResponse.served_by`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_by: Option<ScanSource>,
}

/// `GET /v2/namespaces/{ns}/scans`: the namespace's scans, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScanJobList {
    pub scans: Vec<ScanJob>,
}

/// A page of an `ids` scan's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScanIdsResponse {
    pub ids: Vec<String>,
    /// All the ids the scan holds, across pages.
    pub total: i64,
    /// The `offset` of the next page; absent on the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<i64>,
}

/// One distinct value and how many matching rows hold it (an array
/// attribute counts each of its elements).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScanValue {
    /// Strings as themselves, other values as their JSON text.
    pub v: String,
    pub n: i64,
}

/// A page of a `values` scan's results, most frequent first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScanValuesResponse {
    pub values: Vec<ScanValue>,
    /// All the distinct values the scan holds, across pages.
    pub total: i64,
    pub truncated: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_offset: Option<i64>,
}

/// Either page shape, as `/results` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(untagged)]
pub enum ScanResults {
    Ids(ScanIdsResponse),
    Values(ScanValuesResponse),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_clients_list_ids_body_parses() {
        let r: CreateScanRequest =
            serde_json::from_value(json!({"source": "origin", "filters": ["a", "Eq", 1], "page_size": 10000})).unwrap();
        assert_eq!(r.source, Some(ScanSource::Origin));
        assert_eq!(r.mode, None);
        assert_eq!(r.page_size, Some(10000));
    }

    #[test]
    fn unknown_modes_and_fields_are_refused() {
        let e = serde_json::from_value::<CreateScanRequest>(json!({"mode": "rows"})).unwrap_err();
        assert!(e.to_string().contains("unknown variant `rows`"), "{e}");
        let e = serde_json::from_value::<CreateScanRequest>(json!({"filter": []})).unwrap_err();
        assert!(e.to_string().contains("unknown field `filter`"), "{e}");
    }

    #[test]
    fn names_round_trip() {
        for m in [ScanMode::Ids, ScanMode::Count, ScanMode::Values] {
            assert_eq!(ScanMode::parse(m.as_str()), Some(m));
        }
        for s in [ScanSource::Auto, ScanSource::Snapshot, ScanSource::Cache, ScanSource::Origin] {
            assert_eq!(ScanSource::parse(s.as_str()), Some(s));
        }
        for s in [ScanStatus::Running, ScanStatus::Completed, ScanStatus::Failed] {
            assert_eq!(ScanStatus::parse(s.as_str()), Some(s));
        }
    }
}
