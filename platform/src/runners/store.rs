//! Runners and batches in PostgreSQL.

use chrono::{DateTime, Utc};
use layer_protocol::runner::{Capacity, RegisterRequest, RunnerLoad, RunnerState, RunnerView};
use rand::RngCore;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Transaction};

use crate::error::{PlatformError, Result};
use crate::time::rfc3339;

/// A runner as the dispatcher and the token checks need it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct RunnerRow {
    pub id: String,
    pub name: String,
    pub address: String,
    pub labels: Json<std::collections::BTreeMap<String, String>>,
    pub capacity: Json<Capacity>,
    pub drivers: Json<Vec<String>>,
    pub state: String,
    pub load: Json<RunnerLoad>,
    pub signing_key: Vec<u8>,
    pub registered_at: DateTime<Utc>,
    pub last_heartbeat_at: DateTime<Utc>,
    /// Computed: no heartbeat for longer than the lost-after window.
    pub lost: bool,
    /// Computed: batches dispatched to it and not yet reported.
    pub in_flight: i64,
    /// Computed: the Functions of those batches.
    pub in_flight_udfs: Vec<String>,
}

impl RunnerRow {
    pub fn state(&self) -> RunnerState {
        match self.state.as_str() {
            "gone" => RunnerState::Gone,
            _ if self.lost => RunnerState::Lost,
            "draining" => RunnerState::Draining,
            _ => RunnerState::Active,
        }
    }

    pub fn view(&self) -> RunnerView {
        RunnerView {
            id: self.id.clone(),
            name: self.name.clone(),
            address: self.address.clone(),
            labels: self.labels.0.clone(),
            capacity: self.capacity.0.clone(),
            drivers: self.drivers.0.clone(),
            state: self.state(),
            load: self.load.0.clone(),
            batches_in_flight: self.in_flight,
            registered_at: rfc3339(self.registered_at),
            last_heartbeat_at: rfc3339(self.last_heartbeat_at),
        }
    }
}

const SELECT_RUNNERS: &str = "SELECT r.id, r.name, r.address, r.labels, r.capacity, r.drivers, r.state, r.load,
        r.signing_key, r.registered_at, r.last_heartbeat_at,
        r.last_heartbeat_at < now() - make_interval(secs => $1) AS lost,
        f.in_flight, f.in_flight_udfs
    FROM runners r
    CROSS JOIN LATERAL (SELECT count(*) AS in_flight,
                               coalesce(array_agg(DISTINCT b.function_id), '{}') AS in_flight_udfs
                        FROM batches b WHERE b.runner_id = r.id AND b.state = 'dispatched') f";

/// How long a granted worker slot is kept whatever the runner reports:
/// the worker it was granted for may not show in a heartbeat yet.
const SLOT_GRACE_SECONDS: f64 = 10.0;

/// A runner's request for one more push worker slot of a Function.
#[derive(Debug, Clone, Copy)]
pub struct SlotRequest<'a> {
    pub runner_id: &'a str,
    pub udf_id: &'a str,
    /// The Function's `replicas.max`.
    pub max: u32,
    /// The workers the runner has besides the one it asks for, when it says.
    pub others: Option<u32>,
    pub lost_after_seconds: f64,
}

/// Grants one more push worker slot of `udf_id` to a runner when the
/// fleet holds fewer than `max` (counting only runners that are not lost
/// or gone). Slots are counted under an advisory lock of the Function, so
/// grants on every replica add up. A runner that says how many workers it
/// has besides the new one first has its slots brought down to that (it
/// asks one slot at a time, so the count includes every earlier grant).
/// Returns whether it was granted, and the slots held across the fleet
/// after it.
pub async fn grant_slot(pool: &PgPool, req: SlotRequest<'_>) -> Result<(bool, u32)> {
    let SlotRequest { runner_id, udf_id, max, others, lost_after_seconds } = req;
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7318))").bind(udf_id).execute(&mut *tx).await?;
    if let Some(others) = others {
        sqlx::query("UPDATE worker_slots SET slots = $3 WHERE function_id = $1 AND runner_id = $2 AND slots > $3")
            .bind(udf_id)
            .bind(runner_id)
            .bind(i32::try_from(others).unwrap_or(i32::MAX))
            .execute(&mut *tx)
            .await?;
    }
    let held: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(s.slots), 0)::bigint FROM worker_slots s JOIN runners r ON r.id = s.runner_id
         WHERE s.function_id = $1 AND r.state <> 'gone'
           AND r.last_heartbeat_at >= now() - make_interval(secs => $2)",
    )
    .bind(udf_id)
    .bind(lost_after_seconds)
    .fetch_one(&mut *tx)
    .await?;
    if held >= i64::from(max) {
        tx.commit().await?;
        return Ok((false, held as u32));
    }
    sqlx::query(
        "INSERT INTO worker_slots (function_id, runner_id, slots) VALUES ($1, $2, 1)
         ON CONFLICT (function_id, runner_id) DO UPDATE SET slots = worker_slots.slots + 1, granted_at = now()",
    )
    .bind(udf_id)
    .bind(runner_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((true, held as u32 + 1))
}

/// Brings a runner's slots down to the push workers it reports, except
/// those granted in the last few seconds.
async fn release_slots(pool: &PgPool, runner_id: &str, load: &RunnerLoad) -> Result<()> {
    let mut counts: std::collections::BTreeMap<&str, i32> = std::collections::BTreeMap::new();
    for w in load.workers.iter().filter(|w| w.kind.is_none()) {
        *counts.entry(w.udf_id.as_str()).or_default() += 1;
    }
    let (udfs, ns): (Vec<&str>, Vec<i32>) = counts.into_iter().unzip();
    sqlx::query(
        "WITH c AS (SELECT * FROM unnest($2::text[], $3::int[]) AS c(udf, n))
         UPDATE worker_slots s SET slots = coalesce((SELECT n FROM c WHERE c.udf = s.function_id), 0)
         WHERE s.runner_id = $1 AND s.granted_at < now() - make_interval(secs => $4)
           AND s.slots > coalesce((SELECT n FROM c WHERE c.udf = s.function_id), 0)",
    )
    .bind(runner_id)
    .bind(&udfs)
    .bind(&ns)
    .bind(SLOT_GRACE_SECONDS)
    .execute(pool)
    .await?;
    Ok(())
}

/// Registers a runner; returns its id and signing key.
pub async fn register(pool: &PgPool, key_id: &str, req: &RegisterRequest) -> Result<(String, Vec<u8>)> {
    let id = format!("rn_{}", uuid::Uuid::new_v4().simple());
    let mut key = vec![0u8; 32];
    rand::rng().fill_bytes(&mut key);
    sqlx::query(
        "INSERT INTO runners (id, name, address, labels, capacity, drivers, signing_key, key_id)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(&id)
    .bind(&req.name)
    .bind(&req.address)
    .bind(Json(&req.labels))
    .bind(Json(&req.capacity))
    .bind(Json(&req.drivers))
    .bind(&key)
    .bind(key_id)
    .execute(pool)
    .await?;
    Ok((id, key))
}

/// One runner, whatever its state.
pub async fn get(pool: &PgPool, id: &str, lost_after_seconds: f64) -> Result<RunnerRow> {
    sqlx::query_as(&format!("{SELECT_RUNNERS} WHERE r.id = $2"))
        .bind(lost_after_seconds)
        .bind(id)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| PlatformError::NotFound(format!("runner {id} not found")))
}

/// Every runner not deregistered, oldest first.
pub async fn list(pool: &PgPool, lost_after_seconds: f64) -> Result<Vec<RunnerRow>> {
    Ok(sqlx::query_as(&format!("{SELECT_RUNNERS} WHERE r.state <> 'gone' ORDER BY r.registered_at, r.id"))
        .bind(lost_after_seconds)
        .fetch_all(pool)
        .await?)
}

/// Records a heartbeat and extends the leases of the batches the runner
/// says it holds (only batches dispatched to it). Returns the leases
/// extended. A deregistered runner gets a 409 and must register again.
pub async fn heartbeat(
    pool: &PgPool,
    id: &str,
    state: RunnerState,
    load: &RunnerLoad,
    batch_ids: &[i64],
) -> Result<u64> {
    let state = match state {
        RunnerState::Draining => "draining",
        _ => "active",
    };
    let updated = sqlx::query(
        "UPDATE runners SET last_heartbeat_at = now(), state = $2, load = $3 WHERE id = $1 AND state <> 'gone'",
    )
    .bind(id)
    .bind(state)
    .bind(Json(load))
    .execute(pool)
    .await?
    .rows_affected();
    if updated == 0 {
        return Err(PlatformError::Conflict(format!("runner {id} is deregistered; register again")));
    }
    release_slots(pool, id, load).await?;
    if batch_ids.is_empty() {
        return Ok(0);
    }
    // Only leases past half their length move, so a heartbeat rewrites a
    // batch's items once per half-lease, not every few seconds.
    // Concurrency: `SKIP LOCKED`: items a report is writing back right now
    // are left alone (they are about to leave the lease anyway), so
    // heartbeats and reports never wait on, or deadlock with, each other.
    Ok(sqlx::query(
        "WITH due AS (
             SELECT w.function_id, w.namespace, w.row_id FROM work_items w
             JOIN batches b ON w.function_id = b.function_id AND w.batch_id = b.id
             WHERE b.id = ANY($2) AND b.runner_id = $1 AND b.state = 'dispatched'
               AND w.state = 'leased' AND w.lease_expires_at > now()
               AND w.lease_expires_at < now() + make_interval(secs => w.lease_seconds / 2.0)
             FOR UPDATE OF w SKIP LOCKED
         )
         UPDATE work_items w SET lease_expires_at = now() + make_interval(secs => w.lease_seconds), updated_at = now()
         FROM due
         WHERE w.function_id = due.function_id AND w.namespace = due.namespace AND w.row_id = due.row_id",
    )
    .bind(id)
    .bind(batch_ids)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Marks a runner deregistered. Its open batches' leases run out and are
/// reissued as free retries.
pub async fn deregister(pool: &PgPool, id: &str) -> Result<()> {
    sqlx::query("UPDATE runners SET state = 'gone' WHERE id = $1").bind(id).execute(pool).await?;
    Ok(())
}

/// Deletes the runners not heard from for `retention`: lost ones (no
/// heartbeat) and deregistered ones (their last heartbeat came just
/// before they left). `now` is the database clock unless given (tests
/// step time with it). A runner that still has a batch out is kept until
/// that batch is reported or reaped, so its leases stay free retries.
/// Batch records name their runner by id and are not touched: they stay
/// readable until their own retention. Returns how many runners went.
///
/// Concurrency: one statement; a heartbeat racing it either lands first
/// (the runner is no longer old and stays) or finds the row gone and gets
/// a 401, like any runner the platform does not know.
pub async fn prune(pool: &PgPool, retention: std::time::Duration, now: Option<DateTime<Utc>>) -> Result<u64> {
    Ok(sqlx::query(
        "DELETE FROM runners r
         WHERE r.last_heartbeat_at < coalesce($1, now()) - make_interval(secs => $2)
           AND NOT EXISTS (SELECT 1 FROM batches b WHERE b.runner_id = r.id AND b.state = 'dispatched')",
    )
    .bind(now)
    .bind(retention.as_secs_f64())
    .execute(pool)
    .await?
    .rows_affected())
}

/// A batch record, with its Function as it is now (`None` when the
/// Function was deleted).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BatchRow {
    pub id: i64,
    pub function_id: String,
    pub runner_id: String,
    pub state: String,
    pub written: i32,
    pub failed: i32,
    pub dropped: i32,
    pub revision: i32,
    /// Seconds since the batch was leased.
    pub age_seconds: f64,
    function: Option<Json<crate::functions::store::FunctionRow>>,
}

impl BatchRow {
    /// The batch's Function, taken out of the row; `None` if it was deleted.
    pub fn take_udf(&mut self) -> Option<layer_protocol::function::Udf> {
        self.function.take().map(|f| f.0.into())
    }
}

/// The batch, locked for its report, and its Function, in one statement.
/// Concurrency: `FOR UPDATE`, so two deliveries of one report run one
/// after the other and the second sees `reported`.
pub async fn lock_batch(tx: &mut Transaction<'_, Postgres>, batch_id: i64) -> Result<Option<BatchRow>> {
    Ok(sqlx::query_as(
        "SELECT b.id, b.function_id, b.runner_id, b.state, b.written, b.failed, b.dropped, b.revision,
             extract(epoch FROM clock_timestamp() - b.dispatched_at)::float8 AS age_seconds,
             (SELECT to_jsonb(f) FROM functions f WHERE f.id = b.function_id) AS function
         FROM batches b WHERE b.id = $1 FOR UPDATE",
    )
    .bind(batch_id)
    .fetch_optional(&mut **tx)
    .await?)
}

/// Closes a reported batch with its outcome and the runner's account of it.
pub async fn finish_batch(
    tx: &mut Transaction<'_, Postgres>,
    batch_id: i64,
    counts: (u64, u64, u64),
    report: &layer_protocol::runner::BatchReport,
    error: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "UPDATE batches SET state = 'reported', written = $2, failed = $3, dropped = $4, worker = $5, error = $6,
             started_at = to_timestamp($7::float8 / 1000), ended_at = to_timestamp($8::float8 / 1000),
             gpus = $9, cold_start = $10, finished_at = now()
         WHERE id = $1",
    )
    .bind(batch_id)
    .bind(counts.0 as i32)
    .bind(counts.1 as i32)
    .bind(counts.2 as i32)
    .bind(report.worker.as_deref())
    .bind(error)
    .bind(report.started_at_ms.map(|t| t as f64))
    .bind(report.ended_at_ms.map(|t| t as f64))
    .bind(Json(&report.gpus))
    .bind(report.cold_start)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Closes a batch that never ran (its send failed) or whose leases ran out.
pub async fn abandon_batch(pool: &PgPool, batch_id: i64, error: &str) -> Result<()> {
    sqlx::query(
        "UPDATE batches SET state = 'abandoned', error = $2, finished_at = now() WHERE id = $1 AND state = 'dispatched'",
    )
    .bind(batch_id)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}
