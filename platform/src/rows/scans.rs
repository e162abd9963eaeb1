//! `/v2/namespaces/{ns}/scans`: scan jobs, what the client's
//! `TpufClient.list_ids` (and `create_scan`, `scan`, `get_scan_results`)
//! uses. A scan runs to completion inside the request that creates it, so
//! the job it answers with is already `completed` (or `failed`, past its
//! `timeout_seconds`); its results are then paged with `limit`/`offset`.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::{Extension, Json};
use layer_protocol::error::ErrorBody;
use layer_protocol::filter::Filter;
use layer_protocol::keys::Scope;
use layer_protocol::namespace::StatusResponse;
use layer_protocol::scan::{
    CreateScanRequest, ScanIdsResponse, ScanJob, ScanJobList, ScanMode, ScanResults, ScanStatus, ScanValuesResponse,
};
use layer_protocol::validate::NUL_MESSAGE;

use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::api::check_ns;
use super::scan_store::{self, MAX_SCAN_RESULTS, ScanPlan};
use crate::auth::Principal;
use crate::error::{ApiError, PlatformError, Result};
use crate::http::{ApiJson, AppState, Params, int_param};

/// The largest page of results, and of `page_size`.
pub const MAX_PAGE: i64 = 10_000;
/// `page_size` when the request names none (the client's default).
pub const DEFAULT_PAGE_SIZE: i64 = 1000;
/// The longest `timeout_seconds`, and the default.
pub const MAX_TIMEOUT_SECONDS: i64 = 300;
pub const DEFAULT_TIMEOUT_SECONDS: i64 = 30;

/// The scan routes with their part of the OpenAPI document, generated
/// from the handlers' `#[utoipa::path]` and the wire types.
pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(create, list)).routes(routes!(get_one, delete)).routes(routes!(results))
}

/// The query of a page of results.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
struct ResultsQuery {
    /// How many (default: the scan's `page_size`).
    #[param(minimum = 1, maximum = 10000, example = 100)]
    limit: Option<i64>,
    /// 0-based; the previous page's `next_offset`.
    #[param(minimum = 0, maximum = 1_000_000, example = 0)]
    offset: Option<i64>,
}

fn in_range(field: &str, v: Option<i64>, default: i64, min: i64, max: i64) -> Result<i64> {
    match v {
        None => Ok(default),
        Some(n) if (min..=max).contains(&n) => Ok(n),
        Some(n) => Err(PlatformError::invalid(field, format!("{n} is out of range; allowed {min}..={max}"))),
    }
}

/// Checks a request and turns it into a plan; every error names its field.
pub fn plan(req: CreateScanRequest, created_by: &str) -> Result<ScanPlan> {
    for (name, set) in [
        ("as_of", req.as_of.is_some()),
        ("between", req.between.is_some()),
        ("fts", req.fts.is_some()),
        ("hybrid_text", req.hybrid_text.is_some()),
        ("ann", req.ann.is_some()),
    ] {
        if set {
            return Err(PlatformError::Unsupported(format!(
                "{name} is not supported by this store: scan with filters (mode ids, count or values)"
            )));
        }
    }
    let mode = req.mode.unwrap_or_default();
    let page_size = in_range("page_size", req.page_size, DEFAULT_PAGE_SIZE, 1, MAX_PAGE)?;
    let timeout = in_range("timeout_seconds", req.timeout_seconds, DEFAULT_TIMEOUT_SECONDS, 1, MAX_TIMEOUT_SECONDS)?;
    let threads = req.threads.map(|t| in_range("threads", Some(t), 1, 1, 64)).transpose()?;
    let field = match (mode, req.field) {
        (ScanMode::Values, None) => {
            return Err(PlatformError::invalid("field", "a values scan needs the attribute to count, in field"));
        }
        (ScanMode::Values, Some(f)) => {
            if f.is_empty() || f.len() > 128 {
                return Err(PlatformError::invalid("field", "attribute names are 1-128 bytes"));
            }
            if f.contains('\0') {
                return Err(PlatformError::invalid("field", NUL_MESSAGE));
            }
            Some(f)
        }
        (_, None) => None,
        (m, Some(_)) => {
            return Err(PlatformError::invalid(
                "field",
                format!("only a values scan takes a field; this one is mode {}", m.as_str()),
            ));
        }
    };
    let filter = match &req.filters {
        Some(f) => Filter::parse(f, "filters").map_err(|e| PlatformError::invalid(e.path, e.message))?,
        None => None,
    };
    Ok(ScanPlan {
        mode,
        field,
        source: req.source.unwrap_or_default(),
        filters: filter.as_ref().and(req.filters),
        filter,
        page_size,
        threads,
        timeout: Duration::from_secs(timeout as u64),
        created_by: created_by.to_string(),
    })
}

/// Scan ids are `scan_` and 32 hex digits; anything else names no scan.
fn check_scan_id(ns: &str, id: &str) -> Result<()> {
    let ok = id
        .strip_prefix("scan_")
        .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    if ok {
        Ok(())
    } else {
        Err(PlatformError::NotFound(format!(
            "scan {id:?} not found in namespace {ns}: scan ids are scan_ and 32 hex digits, as create_scan returns them"
        )))
    }
}

#[utoipa::path(post, path = "/v2/namespaces/{ns}/scans", tag = "scans", operation_id = "create_scan",
    summary = "Scan rows with a filter: their ids (mode ids, the default), how many (count) or the distinct values of a field (values)",
    description = "Needs the `read` scope on the namespace. The scan runs to completion in the request (at most \
                   timeout_seconds) and answers with the job, already completed, or failed past its timeout; a count \
                   scan's job also carries count and served_by (the client's ScanCountResponse). Results are paged from \
                   GET .../results. Scans are kept for an hour, at most 100 per namespace; creating one prunes the \
                   rest. as_of, between, fts, hybrid_text and ann are refused with a 400.",
    params(("ns" = String, Path, description = "The namespace", example = "items")),
    request_body(content = CreateScanRequest, example = json!({"mode": "ids", "filters": ["title", "Glob", "T*"]})),
    responses((status = 200, description = "OK", body = ScanJob), (status = "default", description = "Error", body = ErrorBody)))]
async fn create(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(ns): Path<String>,
    ApiJson(req): ApiJson<CreateScanRequest>,
) -> Result<Json<ScanJob>, ApiError> {
    check_ns(&principal, &ns, Scope::Read)?;
    let plan = plan(req, &principal.key_id)?;
    let row = scan_store::create_and_run(&state.pool, &ns, &plan).await?;
    Ok(Json(row.to_job()))
}

#[utoipa::path(get, path = "/v2/namespaces/{ns}/scans", tag = "scans", operation_id = "list_scans",
    summary = "The namespace's scans, newest first", description = "Needs the `read` scope on the namespace.",
    params(("ns" = String, Path, description = "The namespace", example = "items")), responses((status = 200, description = "OK", body = ScanJobList), (status = "default", description = "Error", body = ErrorBody)))]
async fn list(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path(ns): Path<String>,
) -> Result<Json<ScanJobList>, ApiError> {
    check_ns(&principal, &ns, Scope::Read)?;
    let rows = scan_store::list(&state.pool, &ns).await?;
    Ok(Json(ScanJobList { scans: rows.iter().map(scan_store::ScanRow::to_job).collect() }))
}

#[utoipa::path(get, path = "/v2/namespaces/{ns}/scans/{scan_id}", tag = "scans", operation_id = "get_scan",
    summary = "One scan job", description = "Needs the `read` scope on the namespace.",
    params(("ns" = String, Path, description = "The namespace", example = "items"), ("scan_id" = String, Path, description = "The scan's id", example = "scan_00000000000000000000000000000000")), responses((status = 200, description = "OK", body = ScanJob), (status = "default", description = "Error", body = ErrorBody)))]
async fn get_one(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((ns, id)): Path<(String, String)>,
) -> Result<Json<ScanJob>, ApiError> {
    check_ns(&principal, &ns, Scope::Read)?;
    check_scan_id(&ns, &id)?;
    Ok(Json(scan_store::get(&state.pool, &ns, &id).await?.to_job()))
}

#[utoipa::path(delete, path = "/v2/namespaces/{ns}/scans/{scan_id}", tag = "scans", operation_id = "delete_scan",
    summary = "Delete a scan and its results", description = "Needs the `read` scope on the namespace.",
    params(("ns" = String, Path, description = "The namespace", example = "items"), ("scan_id" = String, Path, description = "The scan's id", example = "scan_00000000000000000000000000000000")), responses((status = 200, description = "OK", body = StatusResponse), (status = "default", description = "Error", body = ErrorBody)))]
async fn delete(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((ns, id)): Path<(String, String)>,
) -> Result<Json<StatusResponse>, ApiError> {
    check_ns(&principal, &ns, Scope::Read)?;
    check_scan_id(&ns, &id)?;
    scan_store::delete(&state.pool, &ns, &id).await?;
    Ok(Json(StatusResponse::ok(format!("scan {id} deleted"))))
}

/// A page of results: `limit` (1..=10000, default the scan's `page_size`)
/// from `offset` (default 0).
#[utoipa::path(get, path = "/v2/namespaces/{ns}/scans/{scan_id}/results", tag = "scans",
    operation_id = "get_scan_results",
    summary = "A page of a scan's results: ids in id order, or values most frequent first",
    description = "Needs the `read` scope on the namespace. A failed scan answers 409; a count scan has no results to \
                   page (400).",
    params(("ns" = String, Path, description = "The namespace", example = "items"), ("scan_id" = String, Path, description = "The scan's id", example = "scan_00000000000000000000000000000000"), ResultsQuery), responses((status = 200, description = "OK", body = ScanResults), (status = "default", description = "Error", body = ErrorBody)))]
async fn results(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Path((ns, id)): Path<(String, String)>,
    params: Params,
) -> Result<Json<ScanResults>, ApiError> {
    check_ns(&principal, &ns, Scope::Read)?;
    let offset = int_param(&params, "offset", 0, 0, MAX_SCAN_RESULTS)?;
    // Checked before the scan is read; the default comes from the scan.
    let limit = params.get("limit").map(|_| int_param(&params, "limit", 0, 1, MAX_PAGE)).transpose()?;
    check_scan_id(&ns, &id)?;
    let scan = scan_store::get(&state.pool, &ns, &id).await?;
    match scan.status() {
        ScanStatus::Completed => {}
        ScanStatus::Failed => {
            return Err(PlatformError::Conflict(format!(
                "scan {id} failed and has no results: {}",
                scan.error.as_deref().unwrap_or("no reason recorded")
            ))
            .into());
        }
        ScanStatus::Running => {
            return Err(
                PlatformError::Conflict(format!("scan {id} is still running; poll it until it completes")).into()
            );
        }
    }
    let mode = scan.mode();
    if mode == ScanMode::Count {
        return Err(PlatformError::invalid(
            "mode",
            format!(
                "scan {id} is a count scan: it holds no results to page; its count is the job's count ({})",
                scan.documents_scanned
            ),
        )
        .into());
    }
    let limit = limit.unwrap_or(i64::from(scan.page_size));
    let page = scan_store::results_page(&state.pool, &id, offset, limit).await?;
    let end = offset + page.len() as i64;
    let next_offset = (end < scan.result_count && !page.is_empty()).then_some(end);
    Ok(Json(match mode {
        ScanMode::Values => ScanResults::Values(ScanValuesResponse {
            values: page,
            total: scan.result_count,
            truncated: scan.truncated,
            next_offset,
        }),
        _ => ScanResults::Ids(ScanIdsResponse {
            ids: page.into_iter().map(|v| v.v).collect(),
            total: scan.result_count,
            next_offset,
        }),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn req(v: serde_json::Value) -> CreateScanRequest {
        serde_json::from_value(v).unwrap()
    }

    fn field_of(e: PlatformError) -> String {
        match e {
            PlatformError::Invalid { problems, .. } => problems[0].field.clone(),
            other => panic!("not a 400 naming a field: {other:?}"),
        }
    }

    #[test]
    fn the_clients_list_ids_request_plans_an_ids_scan() {
        let p = plan(req(json!({"source": "origin", "filters": ["a", "Eq", 1], "page_size": 10000})), "k").unwrap();
        assert_eq!(p.mode, ScanMode::Ids);
        assert_eq!(p.page_size, 10000);
        assert_eq!(p.timeout, Duration::from_secs(30));
        assert!(p.filter.is_some() && p.filters.is_some());
        let p = plan(req(json!({"filters": []})), "k").unwrap();
        assert!(p.filter.is_none() && p.filters.is_none(), "an empty filter is no filter");
    }

    #[test]
    fn bad_requests_name_their_field() {
        assert_eq!(field_of(plan(req(json!({"page_size": 0})), "k").unwrap_err()), "page_size");
        assert_eq!(field_of(plan(req(json!({"page_size": 10001})), "k").unwrap_err()), "page_size");
        assert_eq!(field_of(plan(req(json!({"timeout_seconds": 0})), "k").unwrap_err()), "timeout_seconds");
        assert_eq!(field_of(plan(req(json!({"threads": 65})), "k").unwrap_err()), "threads");
        assert_eq!(field_of(plan(req(json!({"mode": "values"})), "k").unwrap_err()), "field");
        assert_eq!(field_of(plan(req(json!({"field": "a"})), "k").unwrap_err()), "field");
        assert_eq!(field_of(plan(req(json!({"mode": "values", "field": "a\u{0}"})), "k").unwrap_err()), "field");
        assert_eq!(field_of(plan(req(json!({"filters": ["a", "Like", 1]})), "k").unwrap_err()), "filters[1]");
        assert!(matches!(plan(req(json!({"ann": {}})), "k"), Err(PlatformError::Unsupported(_))));
    }

    #[test]
    fn scan_ids_are_checked_before_any_lookup() {
        assert!(check_scan_id("ns", "scan_0123456789abcdef0123456789abcdef").is_ok());
        for bad in [
            "",
            "scan_",
            "scan_0123456789ABCDEF0123456789ABCDEF",
            "x\u{0}",
            "scan_0123456789abcdef0123456789abcde\u{0}",
        ] {
            assert!(matches!(check_scan_id("ns", bad), Err(PlatformError::NotFound(_))), "{bad:?}");
        }
    }
}
