//! Scan-job SQL: one function per use case.
//!
//! A scan runs inside one transaction under `statement_timeout`: its job
//! row and its results appear together at commit, so no other request ever
//! sees a half-written scan. One that runs out of time is rolled back and
//! recorded as `failed`.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use layer_protocol::filter::Filter;
use layer_protocol::scan::{ScanJob, ScanMode, ScanSource, ScanStatus, ScanValue};
use serde_json::Value;
use sqlx::{PgPool, Postgres, QueryBuilder, Transaction};

use super::filter::{push_attr, push_filter};
use crate::error::{PlatformError, Result, is_query_cancelled};
use crate::time::rfc3339;

/// How long a scan is kept: older ones are gone for every endpoint, and
/// the next scan created deletes them.
pub const SCAN_RETENTION: Duration = Duration::from_secs(3600);
/// The most scans one namespace keeps; creating one more deletes the oldest.
pub const MAX_SCANS_PER_NAMESPACE: i64 = 100;
/// The most results (ids, or distinct values) one scan holds; past this the
/// scan is `truncated`.
pub const MAX_SCAN_RESULTS: i64 = 1_000_000;
/// Expired scans one create deletes at most (each may hold many results).
const PRUNE_SLICE: i64 = 20;

/// A checked scan request.
#[derive(Debug, Clone)]
pub struct ScanPlan {
    pub mode: ScanMode,
    /// The attribute a `values` scan counts.
    pub field: Option<String>,
    pub source: ScanSource,
    pub filter: Option<Filter>,
    /// The filter as given, kept on the job.
    pub filters: Option<Value>,
    pub page_size: i64,
    pub threads: Option<i64>,
    pub timeout: Duration,
    /// The key that asked.
    pub created_by: String,
}

const COLUMNS: &str = "id, namespace, mode, field, source, filters, page_size, threads, status, documents_scanned, \
                       result_count, truncated, error, elapsed_ms, created_at, completed_at";

/// A stored scan job.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ScanRow {
    pub id: String,
    pub namespace: String,
    pub mode: String,
    pub field: Option<String>,
    pub source: String,
    pub filters: Option<sqlx::types::Json<Value>>,
    pub page_size: i32,
    pub threads: Option<i32>,
    pub status: String,
    pub documents_scanned: i64,
    pub result_count: i64,
    pub truncated: bool,
    pub error: Option<String>,
    pub elapsed_ms: Option<i64>,
    pub created_at: DateTime<Utc>,
    pub completed_at: Option<DateTime<Utc>>,
}

impl ScanRow {
    pub fn mode(&self) -> ScanMode {
        ScanMode::parse(&self.mode).unwrap_or_default()
    }

    pub fn status(&self) -> ScanStatus {
        ScanStatus::parse(&self.status).unwrap_or(ScanStatus::Failed)
    }

    /// The job as the client's `ScanJob` sees it.
    pub fn to_job(&self) -> ScanJob {
        let mode = self.mode();
        let status = self.status();
        let finished = status != ScanStatus::Running;
        let counted = mode == ScanMode::Count && status == ScanStatus::Completed;
        ScanJob {
            id: self.id.clone(),
            namespace: self.namespace.clone(),
            status,
            progress: if finished { 1.0 } else { 0.0 },
            documents_scanned: self.documents_scanned,
            stable_as_of: None,
            created_at: rfc3339(self.created_at),
            completed_at: self.completed_at.map(rfc3339),
            error: self.error.clone(),
            mode,
            field: self.field.clone(),
            source: ScanSource::parse(&self.source).unwrap_or_default(),
            effective_source: Some(ScanSource::Origin),
            unique_values: (mode == ScanMode::Values && status == ScanStatus::Completed).then_some(self.result_count),
            truncated: Some(self.truncated),
            bounded: Some(false),
            approximate: Some(false),
            threads: self.threads.map(i64::from),
            page_size: i64::from(self.page_size),
            filters: self.filters.as_ref().map(|f| f.0.clone()),
            elapsed_ms: self.elapsed_ms,
            count: counted.then_some(self.documents_scanned),
            served_by: counted.then_some(ScanSource::Origin),
        }
    }
}

/// Deletes expired scans (a slice of them, oldest first) and the oldest of
/// this namespace's beyond [`MAX_SCANS_PER_NAMESPACE`] less one, making
/// room for the scan about to be created.
///
/// Concurrency: two creates may prune at once; each delete is idempotent,
/// and at worst a namespace briefly holds a few more than the cap.
async fn prune(pool: &PgPool, namespace: &str) -> Result<u64> {
    let expired = sqlx::query(
        "DELETE FROM scans WHERE id IN (
             SELECT id FROM scans WHERE created_at < now() - make_interval(secs => $1)
             ORDER BY created_at LIMIT $2)",
    )
    .bind(SCAN_RETENTION.as_secs_f64())
    .bind(PRUNE_SLICE)
    .execute(pool)
    .await?
    .rows_affected();
    let over = sqlx::query(
        "DELETE FROM scans WHERE id IN (
             SELECT id FROM scans WHERE namespace = $1
             ORDER BY created_at DESC, id DESC OFFSET $2)",
    )
    .bind(namespace)
    .bind(MAX_SCANS_PER_NAMESPACE - 1)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(expired + over)
}

/// The scan being made: its id, its namespace and what it was asked.
struct Job<'a> {
    id: &'a str,
    namespace: &'a str,
    plan: &'a ScanPlan,
}

/// What a finished scan found.
struct Found {
    documents_scanned: i64,
    result_count: i64,
    truncated: bool,
}

/// Creates a scan and runs it to completion. `Ok` holds the job, completed
/// or (past its timeout) failed; bad filters (an invalid regex) are `Err`.
pub async fn create_and_run(pool: &PgPool, namespace: &str, plan: &ScanPlan) -> Result<ScanRow> {
    let pruned = prune(pool, namespace).await?;
    if pruned > 0 {
        tracing::debug!(namespace, pruned, "pruned scans");
    }
    let id = format!("scan_{}", uuid::Uuid::new_v4().simple());
    let job = Job { id: &id, namespace, plan };
    let started = Instant::now();
    let mut tx = pool.begin().await?;
    match run_in(&mut tx, &job, started).await {
        Ok(Some(row)) => {
            tx.commit().await?;
            Ok(row)
        }
        Ok(None) => Err(namespace_not_found(namespace)),
        Err(e) if is_query_cancelled(&e) => {
            drop(tx);
            let message = format!(
                "the scan ran past its timeout_seconds ({} s) and was cancelled; narrow the filter or allow more time",
                plan.timeout.as_secs()
            );
            tracing::info!(namespace, scan_id = %id, "scan ran past its timeout");
            record_failed(pool, &job, &message, started).await
        }
        Err(e) => Err(e.into()),
    }
}

async fn run_in(
    tx: &mut Transaction<'_, Postgres>,
    job: &Job<'_>,
    started: Instant,
) -> std::result::Result<Option<ScanRow>, sqlx::Error> {
    let plan = job.plan;
    sqlx::query("SELECT set_config('statement_timeout', $1, true)")
        .bind(format!("{}ms", plan.timeout.as_millis()))
        .execute(&mut **tx)
        .await?;
    // The job row first: the key-share lock its foreign key takes keeps the
    // namespace from being deleted under the scan.
    let inserted = insert_job(&mut **tx, job, ScanStatus::Running, None).await?;
    if !inserted {
        return Ok(None);
    }
    let found = match plan.mode {
        ScanMode::Ids => scan_ids(tx, job).await?,
        ScanMode::Count => count_rows(tx, job).await?,
        ScanMode::Values => scan_values(tx, job, plan.field.as_deref().unwrap_or("id")).await?,
    };
    let elapsed = started.elapsed().as_millis() as i64;
    sqlx::query_as(&format!(
        "UPDATE scans SET status = 'completed', documents_scanned = $2, result_count = $3, truncated = $4,
             elapsed_ms = $5, completed_at = now()
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(job.id)
    .bind(found.documents_scanned)
    .bind(found.result_count)
    .bind(found.truncated)
    .bind(elapsed)
    .fetch_one(&mut **tx)
    .await
    .map(Some)
}

/// Inserts a job if the namespace exists; `false` if it does not.
async fn insert_job<'e>(
    ex: impl sqlx::PgExecutor<'e>,
    job: &Job<'_>,
    status: ScanStatus,
    error: Option<(&str, i64)>,
) -> std::result::Result<bool, sqlx::Error> {
    let plan = job.plan;
    let n = sqlx::query(
        "INSERT INTO scans (id, namespace, mode, field, source, filters, page_size, threads, status, error,
                            elapsed_ms, created_by, completed_at)
         SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, CASE WHEN $10::text IS NULL THEN NULL ELSE now() END
         WHERE EXISTS (SELECT 1 FROM namespaces WHERE name = $2)",
    )
    .bind(job.id)
    .bind(job.namespace)
    .bind(plan.mode.as_str())
    .bind(plan.field.as_deref())
    .bind(plan.source.as_str())
    .bind(plan.filters.clone().map(sqlx::types::Json))
    .bind(plan.page_size as i32)
    .bind(plan.threads.map(|t| t as i32))
    .bind(status.as_str())
    .bind(error.map(|e| e.0))
    .bind(error.map(|e| e.1))
    .bind(&plan.created_by)
    .execute(ex)
    .await?
    .rows_affected();
    Ok(n == 1)
}

async fn record_failed(pool: &PgPool, job: &Job<'_>, message: &str, started: Instant) -> Result<ScanRow> {
    let elapsed = started.elapsed().as_millis() as i64;
    if !insert_job(pool, job, ScanStatus::Failed, Some((message, elapsed))).await? {
        return Err(namespace_not_found(job.namespace));
    }
    get(pool, job.namespace, job.id).await
}

fn namespace_not_found(namespace: &str) -> PlatformError {
    PlatformError::NotFound(format!("namespace {namespace} not found"))
}

/// ` FROM rows r WHERE <the job's namespace and filter>`.
fn push_where(qb: &mut QueryBuilder<'_, Postgres>, job: &Job<'_>) {
    qb.push(" FROM rows r WHERE r.namespace = ");
    qb.push_bind(job.namespace.to_string());
    if let Some(f) = &job.plan.filter {
        qb.push(" AND ");
        push_filter(qb, f);
    }
}

/// Holds the matching ids in id order, the first [`MAX_SCAN_RESULTS`].
async fn scan_ids(tx: &mut Transaction<'_, Postgres>, job: &Job<'_>) -> std::result::Result<Found, sqlx::Error> {
    let mut qb = QueryBuilder::<Postgres>::new("WITH m AS (SELECT r.id");
    push_where(&mut qb, job);
    qb.push(" ORDER BY r.id LIMIT ");
    qb.push_bind(MAX_SCAN_RESULTS + 1);
    qb.push(
        "), ranked AS (SELECT m.id, row_number() OVER (ORDER BY m.id) - 1 AS ord FROM m), \
         ins AS (INSERT INTO scan_results (scan_id, ord, value) SELECT ",
    );
    qb.push_bind(job.id.to_string());
    qb.push(", ord, ranked.id FROM ranked WHERE ord < ");
    qb.push_bind(MAX_SCAN_RESULTS);
    qb.push(" RETURNING 1) SELECT (SELECT count(*) FROM m), (SELECT count(*) FROM ins)");
    let (matched, held): (i64, i64) = qb.build_query_as().fetch_one(&mut **tx).await?;
    Ok(Found { documents_scanned: held, result_count: held, truncated: matched > held })
}

async fn count_rows(tx: &mut Transaction<'_, Postgres>, job: &Job<'_>) -> std::result::Result<Found, sqlx::Error> {
    let mut qb = QueryBuilder::<Postgres>::new("SELECT count(*)");
    push_where(&mut qb, job);
    let (n,): (i64,) = qb.build_query_as().fetch_one(&mut **tx).await?;
    Ok(Found { documents_scanned: n, result_count: 0, truncated: false })
}

/// Holds the distinct values of `field` among the matching rows, most
/// frequent first (ties by value). An array counts each element; null and
/// missing values are not counted.
async fn scan_values(
    tx: &mut Transaction<'_, Postgres>,
    job: &Job<'_>,
    field: &str,
) -> std::result::Result<Found, sqlx::Error> {
    let mut qb = QueryBuilder::<Postgres>::new("WITH m AS MATERIALIZED (SELECT ");
    push_attr(&mut qb, field);
    qb.push(" AS a");
    push_where(&mut qb, job);
    qb.push(
        "), vals AS (
             SELECT CASE jsonb_typeof(e.x) WHEN 'string' THEN e.x #>> '{}' ELSE e.x::text END AS v, count(*) AS n
             FROM m CROSS JOIN LATERAL jsonb_array_elements(
                 CASE jsonb_typeof(m.a) WHEN 'array' THEN m.a ELSE jsonb_build_array(m.a) END) AS e(x)
             WHERE m.a IS NOT NULL AND jsonb_typeof(e.x) <> 'null'
             GROUP BY 1),
         ranked AS (SELECT v, n, row_number() OVER (ORDER BY n DESC, v) - 1 AS ord FROM vals),
         ins AS (INSERT INTO scan_results (scan_id, ord, value, n) SELECT ",
    );
    qb.push_bind(job.id.to_string());
    qb.push(", ord, v, n FROM ranked WHERE ord < ");
    qb.push_bind(MAX_SCAN_RESULTS);
    qb.push(" RETURNING 1) SELECT (SELECT count(*) FROM m), (SELECT count(*) FROM vals), (SELECT count(*) FROM ins)");
    let (matched, distinct, held): (i64, i64, i64) = qb.build_query_as().fetch_one(&mut **tx).await?;
    Ok(Found { documents_scanned: matched, result_count: held, truncated: distinct > held })
}

/// Fails unless the namespace exists.
pub async fn require_namespace(pool: &PgPool, namespace: &str) -> Result<()> {
    let exists: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM namespaces WHERE name = $1)")
        .bind(namespace)
        .fetch_one(pool)
        .await?;
    if exists { Ok(()) } else { Err(namespace_not_found(namespace)) }
}

/// One unexpired scan of the namespace.
pub async fn get(pool: &PgPool, namespace: &str, id: &str) -> Result<ScanRow> {
    let row: Option<ScanRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM scans
         WHERE namespace = $1 AND id = $2 AND created_at >= now() - make_interval(secs => $3)"
    ))
    .bind(namespace)
    .bind(id)
    .bind(SCAN_RETENTION.as_secs_f64())
    .fetch_optional(pool)
    .await?;
    match row {
        Some(r) => Ok(r),
        None => {
            require_namespace(pool, namespace).await?;
            Err(scan_not_found(namespace, id))
        }
    }
}

pub fn scan_not_found(namespace: &str, id: &str) -> PlatformError {
    PlatformError::NotFound(format!(
        "scan {id} not found in namespace {namespace} (scans are kept for {} minutes, at most {MAX_SCANS_PER_NAMESPACE} per namespace)",
        SCAN_RETENTION.as_secs() / 60
    ))
}

/// The namespace's unexpired scans, newest first.
pub async fn list(pool: &PgPool, namespace: &str) -> Result<Vec<ScanRow>> {
    require_namespace(pool, namespace).await?;
    Ok(sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM scans
         WHERE namespace = $1 AND created_at >= now() - make_interval(secs => $2)
         ORDER BY created_at DESC, id DESC LIMIT $3"
    ))
    .bind(namespace)
    .bind(SCAN_RETENTION.as_secs_f64())
    .bind(MAX_SCANS_PER_NAMESPACE)
    .fetch_all(pool)
    .await?)
}

/// Deletes a scan and its results.
pub async fn delete(pool: &PgPool, namespace: &str, id: &str) -> Result<()> {
    let n = sqlx::query("DELETE FROM scans WHERE namespace = $1 AND id = $2")
        .bind(namespace)
        .bind(id)
        .execute(pool)
        .await?
        .rows_affected();
    if n == 1 {
        Ok(())
    } else {
        require_namespace(pool, namespace).await?;
        Err(scan_not_found(namespace, id))
    }
}

/// A page of held results: `limit` from the 0-based `offset`, one range of
/// the primary key however deep the page.
pub async fn results_page(pool: &PgPool, id: &str, offset: i64, limit: i64) -> Result<Vec<ScanValue>> {
    let rows: Vec<(String, Option<i64>)> =
        sqlx::query_as("SELECT value, n FROM scan_results WHERE scan_id = $1 AND ord >= $2 ORDER BY ord LIMIT $3")
            .bind(id)
            .bind(offset)
            .bind(limit)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().map(|(v, n)| ScanValue { v, n: n.unwrap_or(1) }).collect())
}
