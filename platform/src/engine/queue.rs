//! The work queue: claims, leases, fenced writeback, failures, the lease
//! reaper and the counts behind a Function's status. Every transition is a
//! guarded statement, so a late or duplicate report changes nothing.

use std::collections::BTreeMap;

use layer_protocol::function::{FunctionSpec, RetrySpec, Udf, UdfDiscoveryStatus, UdfStatus};
use layer_protocol::namespace::Attributes;
use rand::Rng;
use serde_json::Value;
use sqlx::{PgPool, Postgres, QueryBuilder};

use super::discovery::Needs;
use super::policy::{FailureClass, Next, next_state};
use crate::error::Result;
use crate::time::rfc3339;

/// Begins a transaction for queue bookkeeping with `synchronous_commit =
/// off`: it commits without waiting for the WAL flush.
///
/// Why this is safe: a crash can lose only the last few such commits, and
/// each is re-derivable. A lost enqueue is found again (its cursor move is
/// lost with it); a lost claim leaves its items claimable, and the late
/// report of that batch is fenced off; a lost writeback leaves the row
/// unmarked and its item leased, so the row runs again after the lease.
/// Users' own writes stay synchronous, and flushing them flushes everything
/// before them.
pub async fn begin(pool: &PgPool) -> Result<sqlx::Transaction<'static, Postgres>> {
    // One round trip: the setting travels with `BEGIN`.
    Ok(pool.begin_with("BEGIN; SET LOCAL synchronous_commit = off").await?)
}

macro_rules! keyed_joins {
    () => {
        "SET LOCAL enable_seqscan = off; SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off"
    };
}

/// The planner settings of a writeback transaction (see
/// [`begin_writeback`]); public so the plan tests EXPLAIN under them.
///
/// Every statement in such a transaction touches at most a batch of items
/// and rows, each by its primary key, so a sequential scan, a hash join or
/// a merge join over `work_items` or `rows` is never the right plan; yet at
/// a batch of 1,000 in a table of 100,000 the cost model prefers one, and
/// stale statistics (a table analysed while small) make any plan look cheap.
/// Turned off, each lookup is a nested loop over the batch with a key probe.
pub const KEYED_SETTINGS: &str = concat!("SET LOCAL plan_cache_mode = force_generic_plan; ", keyed_joins!());

/// The join settings of [`KEYED_SETTINGS`] alone, which claims use too
/// (they keep PostgreSQL's plan cache mode).
pub const KEYED_JOINS: &str = keyed_joins!();

/// Begins a writeback transaction: as [`begin`], its statements use the
/// plans PostgreSQL cached for them (`force_generic_plan`), and the
/// planner looks rows up by key ([`KEYED_SETTINGS`]).
///
/// Why generic plans: the writeback statements are long and the rows they
/// touch are found by primary key, so their generic plan is the right one
/// for any batch size, while planning them anew cost a single-row report
/// about half a millisecond. PostgreSQL's own choice (`auto`) keeps
/// re-planning them, because a one-row array makes a custom plan look
/// cheaper than the generic one.
pub async fn begin_writeback(pool: &PgPool) -> Result<sqlx::Transaction<'static, Postgres>> {
    Ok(pool.begin_with(format!("BEGIN; SET LOCAL synchronous_commit = off; {KEYED_SETTINGS}")).await?)
}

/// The window the completion rate is measured over.
pub const RATE_WINDOW_SECONDS: i64 = 300;

/// One leased row, as the worker receives it.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub namespace: String,
    pub id: String,
    /// Every declared input; `null` where the row lacks it; `id` is the row id.
    pub input: Attributes,
}

fn project_inputs(id: &str, attributes: &Attributes, inputs: &[String]) -> Attributes {
    inputs
        .iter()
        .map(|name| {
            let v = if name == "id" {
                Value::String(id.to_string())
            } else {
                attributes.get(name).cloned().unwrap_or(Value::Null)
            };
            (name.clone(), v)
        })
        .collect()
}

#[derive(sqlx::FromRow)]
struct Picked {
    /// The Function's batches in flight before this claim (first round only).
    in_flight: i64,
    /// `None` (with the rest): nothing was picked.
    namespace: Option<String>,
    row_id: Option<String>,
    attributes: Option<sqlx::types::Json<Attributes>>,
    needed: Option<bool>,
    available_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// Who claims: a pull worker, or the dispatcher for a runner.
#[derive(Debug, Clone, Copy)]
pub enum Claimer<'a> {
    /// A pull worker's own id: its reports are fenced on it. `key` is the
    /// API key it claimed with: that key's writes to a leased row keep the
    /// lease's fence (write-through completion).
    Worker { id: &'a str, key: &'a str },
    /// A runner: the lease holder is `runner/<id>/batch/<batch>`, so the
    /// report of one batch cannot touch another's leases. The batch record
    /// gets the trace id its spans will carry.
    Runner { id: &'a str, trace_id: &'a str },
}

impl Claimer<'_> {
    fn lease_holder(self, batch_id: i64) -> String {
        match self {
            Claimer::Worker { id, .. } => id.to_string(),
            Claimer::Runner { id, .. } => batch_holder(id, batch_id),
        }
    }
}

/// The lease holder of a batch pushed to a runner.
pub fn batch_holder(runner_id: &str, batch_id: i64) -> String {
    format!("runner/{runner_id}/batch/{batch_id}")
}

/// What one claim leased: a batch, or nothing.
#[derive(Debug, Clone, Default)]
pub struct Claim {
    /// The batch the items are leased under; `None` when nothing was leased.
    pub batch_id: Option<i64>,
    /// The lease holder reports must name.
    pub holder: String,
    pub items: Vec<Claimed>,
    /// When the longest-waiting item became claimable.
    pub queued_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Set when the claim was turned away because the Function already has
    /// `maxInFlightBatches` batches leased.
    pub at_capacity: bool,
    /// Set when the caller's copy of the Function is out of date (paused,
    /// deleted or changed since it was read): nothing was claimed.
    pub stale: bool,
}

/// Begins a claim's transaction: key lookups ([`KEYED_JOINS`]), since a
/// claim touches the rows it picks by key; PostgreSQL's plan cache mode.
pub async fn begin_claim(pool: &PgPool) -> Result<sqlx::Transaction<'static, Postgres>> {
    Ok(pool.begin_with(format!("BEGIN; {KEYED_JOINS}")).await?)
}

/// One round of a claim: what its picking statement needs.
#[derive(Debug, Clone, Copy)]
pub struct ClaimRound<'a> {
    pub udf: &'a Udf,
    pub needs: &'a Needs,
    pub claimer: Claimer<'a>,
    pub batch_id: i64,
    /// The lease holder reports must name.
    pub holder: &'a str,
    /// `maxInFlightBatches`.
    pub cap: i64,
    /// Rows still wanted.
    pub want: i64,
    pub lease_seconds: i64,
    /// The first round also counts the batches in flight, after the turn
    /// was taken, and picks nothing at `maxInFlightBatches`.
    pub first: bool,
}

/// The claim: one round of [`claim`] picks up to `:want` claimable items of
/// Function `:udf`, drops those whose row no longer needs work, leases the
/// rest to `:holder` under batch `:batch`, and records a runner's batch, in
/// one statement. `:needed` is the Function's predicate over `rows r`
/// ([`Needs`]); every other `:name` is a parameter (see [`claim_statement`]).
///
/// Concurrency contract: the caller holds the Function's claim turn (an
/// advisory lock taken in the same transaction, see [`claim`]), so `gate`
/// counts the batches in flight with no other claim of the Function
/// between the count and the leases: `maxInFlightBatches` holds across
/// workers and replicas. The items are picked `FOR UPDATE SKIP LOCKED`, so
/// a writeback or reaper holding one is passed over, never waited on; each
/// picked item is then touched by its primary key only. A lease is the
/// holder, its expiry and the row's `write_seq` at the claim
/// (`leased_seq`): the writeback is fenced on all three.
///
/// The plan: `gate` by a loose index scan over `work_items_in_flight` (one
/// probe per batch, first round only), `picked` by `work_items_claimable`,
/// then a key probe of `rows` and of `work_items` per picked item.
pub const CLAIM_SQL: &str = "WITH RECURSIVE b(id, n) AS (
         SELECT (SELECT w.batch_id FROM work_items w
                 WHERE w.function_id = :udf AND w.state = 'leased' AND w.batch_id IS NOT NULL
                 ORDER BY w.batch_id LIMIT 1), 1
         UNION ALL
         SELECT (SELECT w.batch_id FROM work_items w
                 WHERE w.function_id = :udf AND w.state = 'leased' AND w.batch_id IS NOT NULL AND w.batch_id > b.id
                 ORDER BY w.batch_id LIMIT 1), b.n + 1
         FROM b WHERE b.id IS NOT NULL AND b.n < :cap
     ),
     gate AS MATERIALIZED (
         SELECT CASE WHEN :first THEN (SELECT count(id) FROM b) ELSE 0 END AS n
     ),
     picked AS MATERIALIZED (
         SELECT w.namespace, w.row_id, w.available_at FROM work_items w
         WHERE w.function_id = :udf AND w.state = 'pending' AND w.available_at <= now()
           AND (SELECT n FROM gate) < :cap
         ORDER BY w.available_at LIMIT :want
         FOR UPDATE SKIP LOCKED
     ),
     probe AS MATERIALIZED (
         SELECT p.namespace, p.row_id, p.available_at, r.attributes, r.write_seq,
                coalesce(r.id IS NOT NULL AND :needed, false) AS needed
         FROM picked p LEFT JOIN rows r ON r.namespace = p.namespace AND r.id = p.row_id
     ),
     dropped AS (
         DELETE FROM work_items w USING probe x
         WHERE w.function_id = :udf AND w.namespace = x.namespace AND w.row_id = x.row_id AND NOT x.needed
     ),
     leased AS (
         UPDATE work_items w
         SET state = 'leased', worker_id = :holder, leased_key = :key, batch_id = :batch,
             lease_seconds = :lease_seconds, lease_expires_at = now() + make_interval(secs => :lease_seconds),
             leased_seq = x.write_seq, leased_version = w.version, updated_at = now()
         FROM probe x
         WHERE w.function_id = :udf AND w.namespace = x.namespace AND w.row_id = x.row_id AND x.needed
     ),
     -- A runner's batch record commits with its leases.
     record AS (
         INSERT INTO batches (id, function_id, revision, runner_id, trace_id, queued_at, items)
         SELECT :batch, :udf, :revision, :runner, :trace, min(available_at), count(*) FROM probe
         WHERE needed AND :runner::text IS NOT NULL HAVING count(*) > 0
         ON CONFLICT (id) DO UPDATE SET items = batches.items + EXCLUDED.items,
             queued_at = least(batches.queued_at, EXCLUDED.queued_at)
     )
     SELECT g.n AS in_flight, x.namespace, x.row_id, x.attributes, x.needed, x.available_at
     FROM gate g LEFT JOIN probe x ON true";

/// [`CLAIM_SQL`] for one round, after `prefix` (empty, or an `EXPLAIN` for
/// the plan tests), with its parameters bound.
pub fn claim_statement<'a>(prefix: &str, r: ClaimRound<'a>) -> QueryBuilder<'a, Postgres> {
    let (runner, trace, key) = match r.claimer {
        Claimer::Runner { id, trace_id } => (Some(id), Some(trace_id), None),
        Claimer::Worker { key, .. } => (None, None, Some(key)),
    };
    let mut qb = QueryBuilder::<Postgres>::new(prefix.to_string());
    let mut rest = CLAIM_SQL;
    while let Some(at) = rest.find(':') {
        qb.push(&rest[..at]);
        rest = &rest[at + 1..];
        if let Some(after) = rest.strip_prefix(':') {
            // A cast.
            qb.push("::");
            rest = after;
            continue;
        }
        let end = rest.find(|c: char| !(c.is_ascii_lowercase() || c == '_')).unwrap_or(rest.len());
        match &rest[..end] {
            "udf" => qb.push_bind(&r.udf.id),
            "revision" => qb.push_bind(r.udf.revision),
            "cap" => qb.push_bind(r.cap),
            "first" => qb.push_bind(r.first),
            "want" => qb.push_bind(r.want),
            "holder" => qb.push_bind(r.holder),
            "key" => qb.push_bind(key),
            "batch" => qb.push_bind(r.batch_id),
            "lease_seconds" => qb.push_bind(r.lease_seconds as i32),
            "runner" => qb.push_bind(runner),
            "trace" => qb.push_bind(trace),
            "needed" => {
                r.needs.push(&mut qb);
                &mut qb
            }
            other => unreachable!("CLAIM_SQL names an unknown parameter :{other}"),
        };
        rest = &rest[end..];
    }
    qb.push(rest);
    qb
}

/// Leases up to `limit` claimable rows to `worker_id` for `lease_seconds`
/// as one batch, unless the Function already has `maxInFlightBatches`
/// batches leased.
///
/// Concurrency: claims of one Function take turns on an advisory lock for
/// the length of their transaction, so the in-flight bound holds across
/// workers and replicas; within it, `FOR UPDATE SKIP LOCKED` on the pending
/// items. Each lease bumps the item's epoch, records the row's `write_seq`
/// and the batch id. Items whose row was deleted, or no longer needs work
/// (rewritten out of the filter, or marked by someone else), are dropped
/// here instead of leased.
pub async fn claim(pool: &PgPool, udf: &Udf, claimer: Claimer<'_>, limit: i64, lease_seconds: i64) -> Result<Claim> {
    if udf.paused {
        return Ok(Claim::default());
    }
    let needs = Needs::of(udf)?;
    let mut tx = begin_claim(pool).await?;
    // One round trip: the turn, a batch id, asynchronous commit (see
    // `begin`), and the Function as it is now, so a caller working from a
    // cached copy never claims for a paused, deleted or changed Function.
    // Its row is locked (`FOR KEY SHARE`) before any item is, the order a
    // deletion of the Function takes them in, so the two never deadlock.
    let current: Option<(i64, bool, i32)> = sqlx::query_as(
        "SELECT nextval('work_batch_ids'), f.paused, f.revision
         FROM (SELECT pg_advisory_xact_lock(hashtextextended($1, 7317)),
                      set_config('synchronous_commit', 'off', true)) l
         LEFT JOIN LATERAL (SELECT paused, revision FROM functions WHERE id = $1 FOR KEY SHARE) f ON true",
    )
    .bind(&udf.id)
    .fetch_optional(&mut *tx)
    .await?
    .map(|(id, paused, revision): (i64, Option<bool>, Option<i32>)| {
        (id, paused.unwrap_or(true), revision.unwrap_or(-1))
    });
    let Some((batch_id, paused, revision)) = current else {
        return Ok(Claim { stale: true, ..Claim::default() });
    };
    if paused || revision != udf.revision {
        tx.commit().await?;
        return Ok(Claim { stale: true, ..Claim::default() });
    }
    let worker_id = claimer.lease_holder(batch_id);
    let cap = i64::from(udf.spec.schedule.max_in_flight_batches);
    let mut out = Vec::new();
    let mut queued_at: Option<chrono::DateTime<chrono::Utc>> = None;
    // A few rounds at most: a round only comes up short when it dropped items.
    for round in 0..4 {
        let want = limit - out.len() as i64;
        if want <= 0 {
            break;
        }
        let mut qb = claim_statement(
            "",
            ClaimRound {
                udf,
                needs: &needs,
                claimer,
                batch_id,
                holder: &worker_id,
                cap,
                want,
                lease_seconds,
                first: round == 0,
            },
        );
        let picked: Vec<Picked> = qb.build_query_as().fetch_all(&mut *tx).await?;
        if round == 0 && picked.first().is_some_and(|p| p.in_flight >= cap) {
            tx.commit().await?;
            return Ok(Claim { at_capacity: true, ..Claim::default() });
        }
        let mut dropped = false;
        let mut any = false;
        for p in picked {
            let (Some(namespace), Some(row_id), Some(needed)) = (p.namespace, p.row_id, p.needed) else {
                continue;
            };
            any = true;
            if !needed {
                dropped = true;
                continue;
            }
            if let Some(t) = p.available_at {
                queued_at = Some(queued_at.map_or(t, |q| q.min(t)));
            }
            let attrs = p.attributes.map(|a| a.0).unwrap_or_default();
            out.push(Claimed { input: project_inputs(&row_id, &attrs, &udf.spec.inputs), namespace, id: row_id });
        }
        if !any || !dropped {
            break;
        }
    }
    tx.commit().await?;
    let batch_id = (!out.is_empty()).then_some(batch_id);
    Ok(Claim { batch_id, holder: worker_id, items: out, queued_at, at_capacity: false, stale: false })
}

/// One result to write back.
#[derive(Debug, Clone)]
pub struct Completion {
    pub namespace: String,
    pub id: String,
    pub attributes: Attributes,
    /// A PostgreSQL array literal for the row's new vector.
    pub vector: Option<String>,
}

/// What a batch of completions did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CompleteCounts {
    /// Written, with the marker, and removed from the queue.
    pub written: u64,
    /// Dropped because the row was written since it was claimed; requeued.
    pub stale: u64,
    /// Dropped because the lease is not this worker's, or expired.
    pub not_leased: u64,
}

/// `CROSS JOIN LATERAL (...) w`: the item of each reported row `i(ns, id)`
/// that `$2` holds a live lease on, locked, for Function `$1`.
///
/// One primary-key lookup per reported row, never a scan of the Function's
/// leases: the lookup names the key alone (`OFFSET 0` keeps the lease
/// conditions out of it), so no partial index of the leases can half-match
/// it whatever the statistics say. Rows that match the key but not the
/// lease are locked too, briefly; they are the reporter's own rows.
macro_rules! held_lease {
    () => {
        "CROSS JOIN LATERAL (
             SELECT * FROM (
                 SELECT * FROM work_items k
                 WHERE k.function_id = $1 AND k.namespace = i.ns AND k.row_id = i.id OFFSET 0
             ) w
             WHERE w.state = 'leased' AND w.worker_id = $2 AND w.lease_expires_at > now()
             FOR UPDATE
         ) w"
    };
}

/// The writeback of [`complete`]: `$1` Function, `$2` lease holder, `$3..$6`
/// namespaces, ids, attributes (JSON text) and vectors of the results, `$7`
/// the marker attribute, `$8` the stale-after attribute, `$9` staleAfter
/// seconds. Public so the plan tests can EXPLAIN it.
pub const COMPLETE_SQL: &str = concat!("WITH input AS (
             SELECT * FROM unnest($3::text[], $4::text[], $5::text[], $6::text[]) AS i(ns, id, attrs, vec)
         ),
         cand AS (
             SELECT w.namespace, w.row_id, w.leased_seq, w.leased_version, w.version, i.attrs, i.vec
             FROM input i ",
    held_lease!(),
    "
         ),
         written AS (
             UPDATE rows r
             SET attributes = r.attributes || c.attrs::jsonb || jsonb_build_object($7::text, c.leased_version)
                     || CASE WHEN $9::float8 IS NULL THEN '{}'::jsonb
                             ELSE jsonb_build_object($8::text, floor(extract(epoch FROM now()) + $9::float8)) END,
                 vector = coalesce(c.vec::real[], r.vector)
             FROM cand c
             -- The fence: the row as it was leased. IS NOT DISTINCT FROM
             -- (write_seq is never null) is no index condition, so the
             -- row is found by its key, not among the rows of its write.
             WHERE r.namespace = c.namespace AND r.id = c.row_id AND r.write_seq IS NOT DISTINCT FROM c.leased_seq
             RETURNING r.namespace, r.id
         ),
         done AS (
             -- Retired only if no newer version was asked for meanwhile.
             DELETE FROM work_items w USING written x
             WHERE w.function_id = $1 AND w.namespace = x.namespace AND w.row_id = x.id
               AND w.version = w.leased_version
             RETURNING w.namespace, w.row_id
         ),
         requeued AS (
             UPDATE work_items w
             SET state = 'pending', worker_id = NULL, lease_expires_at = NULL, available_at = now(), updated_at = now()
             FROM cand c
             WHERE w.function_id = $1 AND w.namespace = c.namespace AND w.row_id = c.row_id
               AND (c.namespace, c.row_id) NOT IN (SELECT d.namespace, d.row_id FROM done d)
             RETURNING w.namespace, w.row_id
         ),
         deadlines AS (
             INSERT INTO stale_deadlines (function_id, namespace, row_id, due_at)
             SELECT $1, x.namespace, x.id, now() + make_interval(secs => $9::float8) FROM written x
             WHERE $9::float8 IS NOT NULL
             ON CONFLICT (function_id, namespace, row_id) DO UPDATE SET due_at = EXCLUDED.due_at
         ),
         counts AS (
             SELECT (SELECT count(*) FROM written) AS written,
                    (SELECT count(*) FROM cand) - (SELECT count(*) FROM written) AS stale,
                    (SELECT count(*) FROM input) - (SELECT count(*) FROM cand) AS not_leased
         ),
         -- The counters move in the same statement as the rows they count.
         stats AS (
             INSERT INTO function_stats (function_id, completed, dropped_stale)
             SELECT $1, c.written, c.stale + c.not_leased FROM counts c
             ON CONFLICT (function_id) DO UPDATE SET
                 completed = function_stats.completed + EXCLUDED.completed,
                 dropped_stale = function_stats.dropped_stale + EXCLUDED.dropped_stale
         ),
         bucket AS (
             INSERT INTO completion_buckets (function_id, second, completed)
             SELECT $1, date_trunc('second', now()), c.written FROM counts c WHERE c.written > 0
             ON CONFLICT (function_id, second) DO UPDATE SET completed = completion_buckets.completed + EXCLUDED.completed
         )
         SELECT written, stale, not_leased FROM counts"
);

/// Writes results and markers back and retires their items, in one
/// statement per batch.
///
/// Fencing: an item is written only while it is leased to `worker_id`, the
/// lease has not expired, and the row's `write_seq` is the one it was
/// claimed at. The row gets the returned attributes and the marker
/// `_hevlayer_udf_<fn>_v = <version it was claimed for>` in the same UPDATE.
/// A result for a row written since its claim is dropped and the item goes
/// back to the queue; one for a lost lease is dropped. Both are counted.
pub async fn complete(
    conn: &mut sqlx::PgConnection,
    udf: &Udf,
    worker_id: &str,
    items: Vec<Completion>,
) -> Result<CompleteCounts> {
    // A result for a row named with a NUL names no row: dropped, counted
    // as not leased (no lease is held on such a row).
    let named = items.len();
    let items: Vec<Completion> = items.into_iter().filter(|c| !names_nul(&c.namespace, &c.id)).collect();
    let unnamed = (named - items.len()) as u64;
    if items.is_empty() {
        return Ok(CompleteCounts { not_leased: unnamed, ..CompleteCounts::default() });
    }
    let marker = FunctionSpec::marker_attribute(&udf.id);
    let stale_marker = FunctionSpec::stale_after_attribute(&udf.id);
    let stale_after = udf.spec.stale_after_seconds.map(f64::from);
    let n = items.len();
    let mut ns = Vec::with_capacity(n);
    let mut ids = Vec::with_capacity(n);
    let mut attrs = Vec::with_capacity(n);
    let mut vecs: Vec<Option<String>> = Vec::with_capacity(n);
    for c in items {
        ns.push(c.namespace);
        ids.push(c.id);
        attrs.push(Value::Object(c.attributes).to_string());
        vecs.push(c.vector);
    }
    let (written, stale, fenced): (i64, i64, i64) = sqlx::query_as(COMPLETE_SQL)
        .bind(&udf.id)
        .bind(worker_id)
        .bind(&ns)
        .bind(&ids)
        .bind(&attrs)
        .bind(&vecs)
        .bind(&marker)
        .bind(&stale_marker)
        .bind(stale_after)
        .fetch_one(&mut *conn)
        .await?;
    let counts = CompleteCounts { written: written as u64, stale: stale as u64, not_leased: fenced as u64 + unnamed };
    let m = &crate::metrics::METRICS;
    m.rows_completed.with_label_values(&[&udf.id]).inc_by(counts.written);
    if counts.stale + counts.not_leased > 0 {
        m.rows_dropped_stale.with_label_values(&[&udf.id]).inc_by(counts.stale + counts.not_leased);
    }
    if counts.stale > 0 || counts.not_leased > 0 {
        tracing::info!(udf = %udf.id, worker_id, stale = counts.stale, not_leased = counts.not_leased, "dropped results");
    }
    Ok(counts)
}

/// Whether a reported (namespace, id) holds a NUL, which no row's does.
fn names_nul(namespace: &str, id: &str) -> bool {
    namespace.contains('\0') || id.contains('\0')
}

/// One failure report.
#[derive(Debug, Clone)]
pub struct Failure {
    pub namespace: String,
    pub id: String,
    pub class: FailureClass,
    pub message: String,
}

#[derive(sqlx::FromRow)]
struct Held {
    namespace: String,
    row_id: String,
    attempts: i32,
    free_retries: i32,
}

/// One item's move to its next state, with the error that caused it.
struct Move {
    namespace: String,
    id: String,
    next: Next,
    kind: &'static str,
    message: String,
}

/// The move of items to their next states in [`transition`]: `$1` Function,
/// then one array per field of the moves. Public for the plan tests.
pub const TRANSITION_SQL: &str =
    "UPDATE work_items w SET state = u.state, attempts = u.attempts, free_retries = u.free,
             available_at = now() + make_interval(secs => u.delay), worker_id = NULL, lease_expires_at = NULL,
             last_error = u.message, last_error_kind = u.kind, updated_at = now()
         FROM unnest($2::text[], $3::text[], $4::text[], $5::int[], $6::int[], $7::float8[], $8::text[], $9::text[])
             AS u(ns, id, state, attempts, free, delay, kind, message)
         WHERE w.function_id = $1 AND w.namespace = u.ns AND w.row_id = u.id";

/// Applies moves to items, in one statement.
async fn transition(conn: &mut sqlx::PgConnection, udf_id: &str, moves: Vec<Move>) -> Result<u64> {
    if moves.is_empty() {
        return Ok(0);
    }
    let mut ns = Vec::new();
    let mut ids = Vec::new();
    let mut states = Vec::new();
    let mut attempts = Vec::new();
    let mut free = Vec::new();
    let mut delays = Vec::new();
    let mut kinds = Vec::new();
    let mut messages = Vec::new();
    let (mut retried, mut failed) = (0u64, 0u64);
    for Move { namespace: n, id, next, kind, message } in moves {
        match next {
            Next::Retry { .. } => retried += 1,
            Next::Failed { .. } => failed += 1,
        }
        let (state, a, f, d) = match next {
            Next::Retry { attempts, free_retries, delay } => ("pending", attempts, free_retries, delay.as_secs_f64()),
            Next::Failed { attempts, free_retries } => ("failed", attempts, free_retries, 0.0),
        };
        ns.push(n);
        ids.push(id);
        states.push(state);
        attempts.push(a as i32);
        free.push(f as i32);
        delays.push(d);
        kinds.push(kind);
        messages.push(message);
    }
    let n = sqlx::query(TRANSITION_SQL)
        .bind(udf_id)
        .bind(&ns)
        .bind(&ids)
        .bind(&states)
        .bind(&attempts)
        .bind(&free)
        .bind(&delays)
        .bind(&kinds)
        .bind(&messages)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    let m = &crate::metrics::METRICS;
    m.rows_retried.with_label_values(&[udf_id]).inc_by(retried);
    m.rows_failed.with_label_values(&[udf_id]).inc_by(failed);
    Ok(n)
}

fn jitter() -> f64 {
    rand::rng().random_range(0.5..=1.0)
}

/// The leases a failure report names that its sender holds, locked, in
/// [`fail`]: `$1` Function, `$2` holder, `$3`/`$4` namespaces and ids.
/// Public for the plan tests.
pub const FAIL_HELD_SQL: &str = concat!(
    "SELECT w.namespace, w.row_id, w.attempts, w.free_retries FROM unnest($3::text[], $4::text[]) AS i(ns, id) ",
    held_lease!()
);

/// Records failures reported by the worker holding the leases; reports for
/// leases it does not hold are ignored. Returns the items moved.
pub async fn fail(conn: &mut sqlx::PgConnection, udf: &Udf, worker_id: &str, failures: Vec<Failure>) -> Result<u64> {
    if failures.is_empty() {
        return Ok(0);
    }
    // A row named with a NUL is no row (ids and namespaces hold none).
    let failures: Vec<Failure> = failures.into_iter().filter(|f| !names_nul(&f.namespace, &f.id)).collect();
    let ns: Vec<&str> = failures.iter().map(|f| f.namespace.as_str()).collect();
    let ids: Vec<&str> = failures.iter().map(|f| f.id.as_str()).collect();
    let held: Vec<Held> =
        sqlx::query_as(FAIL_HELD_SQL).bind(&udf.id).bind(worker_id).bind(&ns).bind(&ids).fetch_all(&mut *conn).await?;
    let held: BTreeMap<(String, String), Held> =
        held.into_iter().map(|h| ((h.namespace.clone(), h.row_id.clone()), h)).collect();
    let mut moves = Vec::new();
    for f in failures {
        let Some(h) = held.get(&(f.namespace.clone(), f.id.clone())) else { continue };
        let next = next_state(h.attempts as u32, h.free_retries as u32, f.class, &udf.spec.retry, jitter());
        // The worker's words, storable: PostgreSQL's text holds no NUL.
        let message: String = f.message.chars().take(4096).collect::<String>().replace('\0', "\\u0000");
        moves.push(Move { namespace: f.namespace, id: f.id, next, kind: f.class.as_str(), message });
    }
    transition(conn, &udf.id, moves).await
}

/// The items of a batch still leased to its holder after the report, in
/// [`fail_unreported`]: `$1` Function, `$2` batch, `$3` holder. Public for
/// the plan tests.
pub const UNREPORTED_SQL: &str = "SELECT namespace, row_id FROM work_items
         WHERE function_id = $1 AND batch_id = $2 AND state = 'leased' AND worker_id = $3";

/// Fails, as transient, the items of a reported batch that the report left
/// out; returns how many.
pub async fn fail_unreported(conn: &mut sqlx::PgConnection, udf: &Udf, holder: &str, batch_id: i64) -> Result<u64> {
    let left: Vec<(String, String)> =
        sqlx::query_as(UNREPORTED_SQL).bind(&udf.id).bind(batch_id).bind(holder).fetch_all(&mut *conn).await?;
    let failures = left
        .into_iter()
        .map(|(namespace, id)| Failure {
            namespace,
            id,
            class: FailureClass::Transient,
            message: "the batch's report did not include this row".into(),
        })
        .collect();
    fail(conn, udf, holder, failures).await
}

/// A pull worker's heartbeat in [`heartbeat`]: `$1` Function, `$2` holder,
/// `$3`/`$4` namespaces and ids. Public for the plan tests.
pub const HEARTBEAT_SQL: &str = concat!(
    "WITH held AS (SELECT w.namespace, w.row_id FROM unnest($3::text[], $4::text[]) AS i(ns, id) ",
    held_lease!(),
    ")
         UPDATE work_items w SET lease_expires_at = now() + make_interval(secs => w.lease_seconds), updated_at = now()
         FROM held h
         WHERE w.function_id = $1 AND w.namespace = h.namespace AND w.row_id = h.row_id"
);

/// Extends the leases `worker_id` holds on these rows by their lease length.
pub async fn heartbeat(pool: &PgPool, udf: &Udf, worker_id: &str, items: &[(String, String)]) -> Result<u64> {
    let ns: Vec<&str> = items.iter().map(|i| i.0.as_str()).collect();
    let ids: Vec<&str> = items.iter().map(|i| i.1.as_str()).collect();
    let mut tx = begin_writeback(pool).await?;
    let n = sqlx::query(HEARTBEAT_SQL).bind(&udf.id).bind(worker_id).bind(&ns).bind(&ids).execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(n.rows_affected())
}

#[derive(sqlx::FromRow)]
struct Expired {
    function_id: String,
    namespace: String,
    row_id: String,
    attempts: i32,
    free_retries: i32,
    worker_id: Option<String>,
    lease_seconds: Option<i32>,
    retry: sqlx::types::Json<RetrySpec>,
    batch_id: Option<i64>,
    /// The batch was pushed to a runner that has since gone silent or
    /// deregistered.
    runner_lost: bool,
}

/// Returns expired leases to the queue (or to `failed`), by the database
/// clock. A lease that expires without a report spends an attempt, unless
/// it belongs to a batch on a runner that went silent (`runner_lost_after`),
/// deregistered or was pruned: that is a free retry.
///
/// Concurrency: `SKIP LOCKED`, so reapers on several replicas share the work.
pub async fn reap_expired(pool: &PgPool, batch: i64, runner_lost_after: std::time::Duration) -> Result<u64> {
    let mut tx = begin(pool).await?;
    let expired: Vec<Expired> = sqlx::query_as(
        "SELECT w.function_id, w.namespace, w.row_id, w.attempts, w.free_retries, w.worker_id, w.lease_seconds,
                f.spec -> 'retry' AS retry, w.batch_id,
                CASE WHEN b.id IS NULL THEN false
                     -- A runner whose record was pruned is lost too.
                     WHEN r.id IS NULL THEN true
                     ELSE r.state = 'gone' OR r.last_heartbeat_at < now() - make_interval(secs => $2)
                END AS runner_lost
         FROM work_items w JOIN functions f ON f.id = w.function_id
         LEFT JOIN batches b ON b.id = w.batch_id
         LEFT JOIN runners r ON r.id = b.runner_id
         WHERE w.state = 'leased' AND w.lease_expires_at <= now()
         ORDER BY w.lease_expires_at LIMIT $1 FOR UPDATE OF w SKIP LOCKED",
    )
    .bind(batch)
    .bind(runner_lost_after.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    let batches: Vec<i64> = expired.iter().filter_map(|e| e.batch_id).collect();
    let total = expired.len() as u64;
    let mut by_fn: BTreeMap<String, Vec<Move>> = BTreeMap::new();
    for e in expired {
        let class = if e.runner_lost { FailureClass::RunnerLost } else { FailureClass::LeaseExpired };
        let next = next_state(e.attempts as u32, e.free_retries as u32, class, &e.retry.0, jitter());
        let holder = e.worker_id.as_deref().unwrap_or("?");
        let message = if e.runner_lost {
            format!(
                "the runner holding the batch ({holder}) stopped heartbeating; reissued without spending an attempt"
            )
        } else {
            format!("the lease expired after {} s without a report from {holder}", e.lease_seconds.unwrap_or_default())
        };
        by_fn.entry(e.function_id).or_default().push(Move {
            namespace: e.namespace,
            id: e.row_id,
            next,
            kind: class.as_str(),
            message,
        });
    }
    if !batches.is_empty() {
        sqlx::query(
            "UPDATE batches SET state = 'abandoned', error = 'its leases expired', finished_at = now()
             WHERE id = ANY($1) AND state = 'dispatched'",
        )
        .bind(&batches)
        .execute(&mut *tx)
        .await?;
    }
    for (udf_id, moves) in by_fn {
        let n = moves.len() as i64;
        crate::metrics::METRICS.leases_expired.with_label_values(&[&udf_id]).inc_by(n as u64);
        transition(&mut tx, &udf_id, moves).await?;
        sqlx::query(
            "INSERT INTO function_stats (function_id, leases_expired) VALUES ($1, $2)
             ON CONFLICT (function_id) DO UPDATE SET leases_expired = function_stats.leases_expired + $2",
        )
        .bind(&udf_id)
        .bind(n)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    if total > 0 {
        tracing::info!(expired = total, "returned expired leases to the queue");
    }
    Ok(total)
}

/// Puts failed rows back in the queue with fresh attempts.
pub async fn reset_failed(pool: &PgPool, udf_id: &str) -> Result<u64> {
    Ok(sqlx::query(
        "UPDATE work_items SET state = 'pending', attempts = 0, free_retries = 0, available_at = now(), updated_at = now()
         WHERE function_id = $1 AND state = 'failed'",
    )
    .bind(udf_id)
    .execute(pool)
    .await?
    .rows_affected())
}

/// Drops rate buckets older than a day.
pub async fn prune_buckets(pool: &PgPool) -> Result<()> {
    sqlx::query("DELETE FROM completion_buckets WHERE second < now() - interval '1 day'").execute(pool).await?;
    Ok(())
}

#[derive(sqlx::FromRow)]
struct StatusRow {
    pending: i64,
    leased: i64,
    failed: i64,
    completed: i64,
    dropped_stale: i64,
    leases_expired: i64,
    sweeps: i64,
    last_sweep_at: Option<chrono::DateTime<chrono::Utc>>,
    last_scheduled_at: Option<chrono::DateTime<chrono::Utc>>,
    recent: i64,
}

/// The status the client's `UdfStatus` expects, with real counts and no
/// conditions (`crate::runners::status` adds what the fleet says).
pub async fn status(pool: &PgPool, udf: &Udf) -> Result<UdfStatus> {
    let s: StatusRow = sqlx::query_as(
        "SELECT
             (SELECT count(*) FROM work_items WHERE function_id = $1 AND state = 'pending') AS pending,
             (SELECT count(*) FROM work_items WHERE function_id = $1 AND state = 'leased') AS leased,
             (SELECT count(*) FROM work_items WHERE function_id = $1 AND state = 'failed') AS failed,
             coalesce(st.completed, 0) AS completed,
             coalesce(st.dropped_stale, 0) AS dropped_stale,
             coalesce(st.leases_expired, 0) AS leases_expired,
             coalesce(st.sweeps_completed, 0) AS sweeps,
             st.last_sweep_at,
             st.last_scheduled_at,
             (SELECT coalesce(sum(completed), 0)::bigint FROM completion_buckets
              WHERE function_id = $1 AND second > now() - make_interval(secs => $2)) AS recent
         FROM (SELECT 1) one LEFT JOIN function_stats st ON st.function_id = $1",
    )
    .bind(&udf.id)
    .bind(RATE_WINDOW_SECONDS as f64)
    .fetch_one(pool)
    .await?;
    Ok(UdfStatus {
        udf_id: udf.id.clone(),
        paused: udf.paused,
        active_namespaces: crate::functions::store::active_namespaces(pool, &udf.spec).await?,
        discovery: UdfDiscoveryStatus {
            sweeps_completed: s.sweeps,
            last_completed_at: s.last_sweep_at.map(rfc3339),
            last_scheduled_at: s.last_scheduled_at.map(rfc3339),
            next_scheduled_at: if udf.paused {
                None
            } else {
                super::discovery::next_firing(udf, s.last_scheduled_at).map(rfc3339)
            },
        },
        counts: BTreeMap::from([
            ("pending".to_string(), s.pending),
            ("processing".to_string(), s.leased),
            ("failed".to_string(), s.failed),
            ("completed".to_string(), s.completed),
            ("dropped".to_string(), s.dropped_stale),
            ("leases_expired".to_string(), s.leases_expired),
        ]),
        pending_count: s.pending,
        processing_count: s.leased,
        failed_count: s.failed,
        indexed_rate_per_min: s.recent as f64 * 60.0 / RATE_WINDOW_SECONDS as f64,
        rate_window_seconds: RATE_WINDOW_SECONDS,
        conditions: Vec::new(),
    })
}
