//! Discovery: finds the rows of a namespace that need a Function's work and
//! enqueues them.
//!
//! A sweep reads only rows written since the last sweep of that (Function,
//! namespace), through the `(namespace, write_seq)` index, so its cost grows
//! with what changed, not with the namespace. A changed version or filter
//! rescans from the start, once. Rows whose result went stale are found
//! through `stale_deadlines`.

use chrono::{DateTime, Utc};
use layer_protocol::filter::Filter;
use layer_protocol::function::{FunctionSpec, Udf};
use sqlx::{PgConnection, PgPool, Postgres, QueryBuilder};
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::error::{PlatformError, Result};
use crate::rows::filter::push_filter;

/// What decides whether a row needs a Function's work.
#[derive(Debug, Clone)]
pub struct Needs {
    pub marker: String,
    pub stale_marker: String,
    pub version: String,
    pub filter: Option<Filter>,
}

impl Needs {
    pub fn of(udf: &Udf) -> Result<Needs> {
        let filter = match &udf.spec.filter {
            Some(f) => Filter::parse(f, "spec.filter").map_err(|e| PlatformError::invalid(e.path, e.message))?,
            None => None,
        };
        Ok(Needs {
            marker: FunctionSpec::marker_attribute(&udf.id),
            stale_marker: FunctionSpec::stale_after_attribute(&udf.id),
            version: udf.spec.version.clone(),
            filter,
        })
    }

    /// Appends the predicate over `rows r`: the filter, AND the marker is
    /// missing or differs from the version, or the stale-after time passed.
    pub fn push(&self, qb: &mut QueryBuilder<'_, Postgres>) {
        qb.push("(");
        if let Some(f) = &self.filter {
            push_filter(qb, f);
            qb.push(" AND ");
        }
        qb.push("((r.attributes -> ");
        qb.push_bind(self.marker.clone());
        qb.push("::text) IS DISTINCT FROM to_jsonb(");
        qb.push_bind(self.version.clone());
        qb.push("::text) OR coalesce(jsonb_typeof(r.attributes -> ");
        qb.push_bind(self.stale_marker.clone());
        qb.push("::text) = 'number' AND (r.attributes ->> ");
        qb.push_bind(self.stale_marker.clone());
        qb.push("::text)::numeric < extract(epoch FROM now()), false)))");
    }
}

/// What a change of spec must rescan for: version and filter.
pub fn spec_key(spec: &FunctionSpec) -> String {
    serde_json::json!([spec.version, spec.filter]).to_string()
}

fn push_enqueue_conflict(qb: &mut QueryBuilder<'_, Postgres>) {
    // A failed row that is rewritten, or meets a new version, gets a fresh
    // start; a leased one keeps its lease and learns the wanted version.
    qb.push(
        " ON CONFLICT (function_id, namespace, row_id) DO UPDATE SET
             version = EXCLUDED.version,
             state = CASE WHEN work_items.state = 'failed' THEN 'pending' ELSE work_items.state END,
             attempts = CASE WHEN work_items.state = 'failed' THEN 0 ELSE work_items.attempts END,
             free_retries = CASE WHEN work_items.state = 'failed' THEN 0 ELSE work_items.free_retries END,
             available_at = CASE WHEN work_items.state = 'failed' THEN now() ELSE work_items.available_at END,
             updated_at = now()",
    );
}

/// `INSERT INTO work_items ... SELECT <fn>, r.namespace, r.id, <version>`:
/// the head both kinds of sweep share; the caller adds `FROM` and the rest.
fn push_enqueue_select(qb: &mut QueryBuilder<'_, Postgres>, udf: &Udf) {
    qb.push("INSERT INTO work_items (function_id, namespace, row_id, version) SELECT ");
    qb.push_bind(udf.id.clone());
    qb.push(", r.namespace, r.id, ");
    qb.push_bind(udf.spec.version.clone());
}

/// What one sweep of a namespace reads: the rows written after `from` up
/// to `to` (the namespace's committed sequence), and the rows whose result
/// went stale.
#[derive(Debug, Clone, Copy)]
pub struct SweepRange<'a> {
    pub udf: &'a Udf,
    pub needs: &'a Needs,
    pub namespace: &'a str,
    /// The spec key the cursor moves to.
    pub key: &'a str,
    /// Whether the cursor's spec key is `key` (else this is a rescan).
    pub same_key: bool,
    pub from: i64,
    pub to: i64,
}

/// The sweep's statement, after `prefix` (empty, or an `EXPLAIN` for the
/// plan tests): the cursor moves, deadlines that came due are taken, and
/// the rows written since the cursor plus the rows whose result went stale
/// are enqueued, in one statement. The cursor never moves back: a sweep
/// that waited on the lock may have read an older sequence than the one
/// before it.
pub fn sweep_statement<'a>(prefix: &str, r: SweepRange<'a>) -> QueryBuilder<'a, Postgres> {
    let mut qb =
        QueryBuilder::<Postgres>::new(format!("{prefix}WITH moved AS (UPDATE discovery_cursors SET last_seq = "));
    if r.same_key {
        qb.push("greatest(last_seq, ");
        qb.push_bind(r.to);
        qb.push(")");
    } else {
        qb.push_bind(r.to);
    }
    qb.push(", spec_key = ");
    qb.push_bind(r.key);
    qb.push(", swept_at = now() WHERE function_id = ");
    qb.push_bind(&r.udf.id);
    qb.push(" AND namespace = ");
    qb.push_bind(r.namespace);
    qb.push("), due AS (DELETE FROM stale_deadlines d WHERE d.function_id = ");
    qb.push_bind(&r.udf.id);
    qb.push(" AND d.namespace = ");
    qb.push_bind(r.namespace);
    qb.push(" AND d.due_at <= now() RETURNING d.row_id) ");
    push_enqueue_select(&mut qb, r.udf);
    qb.push(" FROM due JOIN rows r ON r.namespace = ");
    qb.push_bind(r.namespace);
    qb.push(" AND r.id = due.row_id WHERE ");
    r.needs.push(&mut qb);
    if r.to > r.from {
        // A row both due and written since is enqueued once, by the second part.
        qb.push(" AND NOT (r.write_seq > ");
        qb.push_bind(r.from);
        qb.push(" AND r.write_seq <= ");
        qb.push_bind(r.to);
        qb.push(") UNION ALL SELECT ");
        qb.push_bind(&r.udf.id);
        qb.push(", r.namespace, r.id, ");
        qb.push_bind(&r.udf.spec.version);
        qb.push(" FROM rows r WHERE r.namespace = ");
        qb.push_bind(r.namespace);
        qb.push(" AND r.write_seq > ");
        qb.push_bind(r.from);
        qb.push(" AND r.write_seq <= ");
        qb.push_bind(r.to);
        qb.push(" AND ");
        r.needs.push(&mut qb);
    }
    push_enqueue_conflict(&mut qb);
    qb
}

/// Sweeps one namespace for one Function; returns the rows enqueued.
///
/// Concurrency: the cursor row is locked for the sweep's transaction, so two
/// sweeps of one (Function, namespace) run one after the other. The
/// namespace's committed `write_seq` bounds what is read: writers hold the
/// namespace row until they commit, so every row at or below it is final.
pub async fn sweep(conn: &mut PgConnection, udf: &Udf, namespace: &str) -> Result<u64> {
    let needs = Needs::of(udf)?;
    let key = spec_key(&udf.spec);
    // Creates the cursor or locks the one there, and reads the namespace's
    // committed sequence, in one statement. The Function's row is locked
    // first (`FOR KEY SHARE`), so a sweep and a deletion of the Function
    // take their locks in the same order and never deadlock: a deletion
    // waits for the sweep, or the sweep finds the Function gone.
    let cursor: Option<(i64, String, Option<i64>)> = sqlx::query_as(
        "WITH f AS (SELECT id FROM functions WHERE id = $1 FOR KEY SHARE)
         INSERT INTO discovery_cursors (function_id, namespace) SELECT f.id, $2 FROM f
         ON CONFLICT (function_id, namespace) DO UPDATE SET last_seq = discovery_cursors.last_seq
         RETURNING last_seq, spec_key, (SELECT write_seq FROM namespaces WHERE name = $2)",
    )
    .bind(&udf.id)
    .bind(namespace)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((last_seq, stored_key, Some(now_seq))) = cursor else {
        return Ok(0);
    };
    let from = if stored_key == key { last_seq } else { 0 };

    // One statement (see `sweep_statement`).
    let mut qb = sweep_statement(
        "",
        SweepRange { udf, needs: &needs, namespace, key: &key, same_key: stored_key == key, from, to: now_seq },
    );
    Ok(qb.build().execute(&mut *conn).await?.rows_affected())
}

/// Sweeps the given namespaces of a Function, each in its own transaction,
/// at most `maxConcurrentScans` at a time, and counts the sweep. Returns the
/// rows enqueued. A namespace that fails does not stop the others; the first
/// error is returned after all have run. `ready` is notified as soon as a
/// namespace enqueued rows, before the sweep is counted, so the dispatcher
/// starts on them at once.
pub async fn sweep_function(pool: &PgPool, udf: &Udf, namespaces: &[String], ready: &Notify) -> Result<u64> {
    let started = std::time::Instant::now();
    let width = udf.spec.schedule.max_concurrent_scans.max(1) as usize;
    let mut queue = namespaces.iter().cloned();
    let mut scans = JoinSet::new();
    let mut total = 0;
    let mut first_error = None;
    loop {
        while scans.len() < width
            && let Some(ns) = queue.next()
        {
            let (pool, udf) = (pool.clone(), udf.clone());
            scans.spawn(async move {
                let mut tx = super::queue::begin(&pool).await?;
                let n = sweep(&mut tx, &udf, &ns).await?;
                tx.commit().await?;
                Ok::<u64, PlatformError>(n)
            });
        }
        match scans.join_next().await {
            None => break,
            Some(Ok(Ok(n))) => {
                total += n;
                if n > 0 {
                    ready.notify_one();
                }
            }
            Some(Ok(Err(e))) => {
                first_error.get_or_insert(e);
            }
            Some(Err(e)) => {
                first_error.get_or_insert(PlatformError::Internal(format!("a namespace scan stopped: {e}")));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    sqlx::query(
        "INSERT INTO function_stats (function_id, sweeps_completed, last_sweep_at) VALUES ($1, 1, now())
         ON CONFLICT (function_id) DO UPDATE SET sweeps_completed = function_stats.sweeps_completed + 1,
             last_sweep_at = now()",
    )
    .bind(&udf.id)
    .execute(pool)
    .await?;
    crate::metrics::METRICS.sweep_duration.with_label_values(&[&udf.id]).observe(started.elapsed().as_secs_f64());
    if total > 0 {
        tracing::info!(udf = %udf.id, enqueued = total, namespaces = namespaces.len(), "discovery enqueued rows");
    }
    Ok(total)
}

/// When the cron schedule fires next: the first match after it last fired,
/// or after the Function was last changed if that is later. A platform that
/// was down across matches fires once when it is back.
pub fn next_firing(udf: &Udf, last: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    let changed = DateTime::parse_from_rfc3339(&udf.updated_at).ok().map(|t| t.to_utc());
    let base = last.max(changed).unwrap_or_else(Utc::now);
    udf.spec.schedule.next_cron_after(base)
}

/// When the Function's cron schedule fired last (`None`: never).
pub async fn last_scheduled(pool: &PgPool, udf_id: &str) -> Result<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar("SELECT last_scheduled_at FROM function_stats WHERE function_id = $1")
        .bind(udf_id)
        .fetch_optional(pool)
        .await?
        .flatten())
}

/// Claims one firing of the cron schedule: moves `last_scheduled_at` from
/// `seen` to now. Only one replica's claim succeeds for a given `seen`.
pub async fn claim_firing(pool: &PgPool, udf_id: &str, seen: Option<DateTime<Utc>>) -> Result<Option<DateTime<Utc>>> {
    Ok(sqlx::query_scalar(
        "INSERT INTO function_stats (function_id, last_scheduled_at) VALUES ($1, now())
         ON CONFLICT (function_id) DO UPDATE SET last_scheduled_at = now()
         WHERE function_stats.last_scheduled_at IS NOT DISTINCT FROM $2
         RETURNING last_scheduled_at",
    )
    .bind(udf_id)
    .bind(seen)
    .fetch_optional(pool)
    .await?)
}
