//! The `calls` table: one record per finished call.

use chrono::{DateTime, Utc};
use layer_protocol::call::{CallRecord, CallStatus};
use sqlx::{PgPool, Postgres, QueryBuilder};

use crate::error::{PlatformError, Result};
use crate::time::rfc3339;

/// A finished call, as recorded.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct CallRow {
    pub call_id: String,
    pub function_id: String,
    pub revision: i32,
    pub status: String,
    pub http_status: i16,
    pub runner_id: Option<String>,
    pub worker: Option<String>,
    pub key_id: Option<String>,
    pub request_bytes: i64,
    pub response_bytes: i64,
    pub queued_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub cold_start: bool,
    pub trace_id: Option<String>,
    pub error: Option<String>,
}

impl From<CallRow> for CallRecord {
    fn from(r: CallRow) -> Self {
        let finished = r.finished_at.unwrap_or(r.queued_at);
        CallRecord {
            call_id: r.call_id,
            udf_id: r.function_id,
            revision: r.revision,
            status: CallStatus::parse(&r.status).unwrap_or(CallStatus::Failed),
            http_status: r.http_status as u16,
            runner_id: r.runner_id,
            worker: r.worker,
            key_id: r.key_id,
            request_bytes: r.request_bytes as u64,
            response_bytes: r.response_bytes as u64,
            queued_at: rfc3339(r.queued_at),
            started_at: r.started_at.map(rfc3339),
            finished_at: rfc3339(finished),
            cold_start: r.cold_start,
            trace_id: r.trace_id,
            error: r.error,
        }
    }
}

const COLUMNS: &str = "SELECT call_id, function_id, revision, status, http_status, runner_id, worker, key_id, \
     request_bytes, response_bytes, queued_at, started_at, finished_at, cold_start, trace_id, error FROM calls";

/// Writes records in one statement.
pub async fn insert(pool: &PgPool, rows: &[CallRow]) -> Result<()> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut qb = QueryBuilder::<Postgres>::new(
        "INSERT INTO calls (call_id, function_id, revision, status, http_status, runner_id, worker, key_id, \
         request_bytes, response_bytes, queued_at, started_at, finished_at, cold_start, trace_id, error) ",
    );
    qb.push_values(rows, |mut b, r| {
        b.push_bind(&r.call_id)
            .push_bind(&r.function_id)
            .push_bind(r.revision)
            .push_bind(&r.status)
            .push_bind(r.http_status)
            .push_bind(&r.runner_id)
            .push_bind(&r.worker)
            .push_bind(&r.key_id)
            .push_bind(r.request_bytes)
            .push_bind(r.response_bytes)
            .push_bind(r.queued_at)
            .push_bind(r.started_at)
            .push_bind(r.finished_at)
            .push_bind(r.cold_start)
            .push_bind(&r.trace_id)
            .push_bind(&r.error);
    });
    qb.push(" ON CONFLICT (call_id) DO NOTHING");
    qb.build().execute(pool).await?;
    Ok(())
}

/// Records calls off their callers' path: each call's record goes to a
/// queue that one task writes, as many at a time as have gathered (up to
/// [`Recorder::BATCH`]), so calls at a high rate cost one statement per
/// batch, not per call. Records still queued when the platform dies are
/// lost (their calls were answered).
#[derive(Clone)]
pub struct Recorder {
    tx: tokio::sync::mpsc::Sender<CallRow>,
}

impl Recorder {
    const BATCH: usize = 500;

    /// Starts the writing task; it ends once every `Recorder` is dropped and
    /// the queue is written.
    pub fn spawn(pool: PgPool) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<CallRow>(10_000);
        tokio::spawn(async move {
            let mut batch = Vec::with_capacity(Self::BATCH);
            while rx.recv_many(&mut batch, Self::BATCH).await > 0 {
                if let Err(e) = insert(&pool, &batch).await {
                    tracing::warn!(records = batch.len(), error = %e, "recording calls failed");
                }
                batch.clear();
            }
        });
        Recorder { tx }
    }

    /// Queues a record; with the queue full (the database far behind), the
    /// record is written by a task of its own.
    pub fn record(&self, row: CallRow) {
        if let Err(
            tokio::sync::mpsc::error::TrySendError::Full(row) | tokio::sync::mpsc::error::TrySendError::Closed(row),
        ) = self.tx.try_send(row)
        {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(row).await;
            });
        }
    }
}

pub async fn get(pool: &PgPool, call_id: &str) -> Result<CallRecord> {
    let row: Option<CallRow> =
        sqlx::query_as(&format!("{COLUMNS} WHERE call_id = $1")).bind(call_id).fetch_optional(pool).await?;
    row.map(Into::into).ok_or_else(|| {
        PlatformError::NotFound(format!(
            "call {call_id} not found (a call is recorded once it has answered, and kept for the call retention)"
        ))
    })
}

/// What a listing asks for.
#[derive(Debug, Default)]
pub struct Filter {
    pub status: Option<CallStatus>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// After this (queued_at, call_id), newest first.
    pub before: Option<(DateTime<Utc>, String)>,
    pub limit: i64,
}

/// A Function's calls, newest first; `limit + 1` are read, so the caller
/// knows whether there is a next page.
pub async fn list(pool: &PgPool, function_id: &str, f: &Filter) -> Result<Vec<CallRow>> {
    let mut qb = QueryBuilder::<Postgres>::new(COLUMNS);
    qb.push(" WHERE function_id = ").push_bind(function_id.to_string());
    if let Some(s) = f.status {
        qb.push(" AND status = ").push_bind(s.as_str());
    }
    if let Some(t) = f.since {
        qb.push(" AND queued_at >= ").push_bind(t);
    }
    if let Some(t) = f.until {
        qb.push(" AND queued_at < ").push_bind(t);
    }
    if let Some((at, id)) = &f.before {
        qb.push(" AND (queued_at, call_id) < (").push_bind(*at).push(", ").push_bind(id.clone()).push(")");
    }
    qb.push(" ORDER BY queued_at DESC, call_id DESC LIMIT ").push_bind(f.limit + 1);
    Ok(qb.build_query_as().fetch_all(pool).await?)
}

/// Deletes the records of calls that finished longer than `retention` ago.
pub async fn prune(pool: &PgPool, retention: std::time::Duration) -> Result<u64> {
    let r = sqlx::query("DELETE FROM calls WHERE finished_at < now() - make_interval(secs => $1)")
        .bind(retention.as_secs_f64())
        .execute(pool)
        .await?;
    Ok(r.rows_affected())
}
