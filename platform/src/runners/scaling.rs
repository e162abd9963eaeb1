//! Pull workers run by runners: the scaler (seed 000's operator).
//!
//! A pull Function with `worker.image` gets its workers from the fleet:
//! every tick one platform replica (an advisory lock) decides how many
//! should run and which runners run them, in `pull_scaling` and
//! `pull_assignments`; each runner reads its share in its heartbeat answer
//! and keeps that many containers of the image running.
//!
//! The rule, with `B = worker.batchSize` and the Function's queue depth `Q`
//! (its pending and leased rows):
//!
//! - `mode: autoscale`: `wanted = clamp(ceil(Q / (ROWS_PER_REPLICA_BATCHES × B)), min, max)`,
//!   so one replica per four batches of queued rows, and zero when the queue
//!   is empty and `replicas.min` is 0. Scaling up is immediate (the next
//!   tick, 1 s by default). Scaling down waits until the queue has called
//!   for fewer replicas for a whole scale-down window (60 s by default),
//!   then goes straight to what it calls for.
//! - `mode: fixed`: always `replicas.max`, whatever the queue.
//! - A paused Function, or one its compute pool rejects, runs none.
//!
//! Placement honours what push placement does (the docker driver, the
//! pool's node selector, enough usable GPUs, counting those the runner's
//! other pull assignments take), spreads a Function's replicas over the
//! runners that qualify (fewest of its replicas first), and keeps existing
//! assignments where they are. The sum of a Function's assignments never
//! exceeds `replicas.max`. An assignment on a runner that is lost, draining
//! or no longer qualifies is moved.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use layer_protocol::function::{Dispatch, ScalingMode, Udf, UdfCondition};
use layer_protocol::runner::{PullWorkers, RunnerState};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::dispatch::{self, Scheduling, compute_pools, scheduling};
use super::store::{self, RunnerRow};
use crate::error::Result;

/// Queued rows that call for one more replica, in batches.
pub const ROWS_PER_REPLICA_BATCHES: u64 = 4;

/// Settings of the scaler.
#[derive(Debug, Clone)]
pub struct ScalingConfig {
    /// How often it decides.
    pub tick: Duration,
    /// How long the queue must call for fewer replicas before they stop.
    pub scale_down_after: Duration,
    /// A runner silent this long is lost.
    pub lost_after: Duration,
}

impl Default for ScalingConfig {
    fn default() -> Self {
        ScalingConfig {
            tick: Duration::from_secs(1),
            scale_down_after: Duration::from_secs(60),
            lost_after: Duration::from_secs(6),
        }
    }
}

/// Whether the platform runs this Function's workers: pull, with an image.
pub fn runs_pull_workers(udf: &Udf) -> bool {
    udf.spec.worker.dispatch == Dispatch::Pull && udf.spec.worker.image.as_deref().is_some_and(|i| !i.is_empty())
}

/// The replicas the queue calls for now.
pub fn wanted(udf: &Udf, queue_depth: u64) -> u32 {
    let (mode, min, max) = match &udf.spec.scaling {
        Some(s) => (s.mode, s.replicas.min, s.replicas.max),
        None => (ScalingMode::Autoscale, 0, 1),
    };
    if udf.paused {
        return 0;
    }
    if mode == ScalingMode::Fixed {
        return max;
    }
    let per_replica = ROWS_PER_REPLICA_BATCHES * u64::from(udf.spec.worker.batch_size.max(1));
    let n = queue_depth.div_ceil(per_replica);
    (n.min(u64::from(max)) as u32).max(min).min(max)
}

/// The replicas to run: up at once, down only after the queue has called
/// for fewer for `window`. Returns them with the new start of the low spell.
pub fn next_replicas(
    current: u32,
    wanted: u32,
    low_since: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    window: Duration,
) -> (u32, Option<DateTime<Utc>>) {
    if wanted >= current {
        return (wanted, None);
    }
    let since = low_since.unwrap_or(now);
    if (now - since).to_std().unwrap_or_default() >= window { (wanted, None) } else { (current, Some(since)) }
}

/// Spreads `want` replicas of one Function over the runners that qualify,
/// keeping `current` ones where they are. `gpus_taken` counts the GPUs
/// each runner's pull assignments take, and is updated.
pub fn assign(
    s: &Scheduling,
    want: u32,
    current: &BTreeMap<String, u32>,
    runners: &[RunnerRow],
    gpus_taken: &mut HashMap<String, usize>,
) -> BTreeMap<String, u32> {
    let per = s.plan.gpus as usize;
    let ok: Vec<&RunnerRow> =
        runners.iter().filter(|r| r.state() == RunnerState::Active && dispatch::qualifies(s, r)).collect();
    let mut out: BTreeMap<String, u32> = BTreeMap::new();
    // Keep what runs where it may, up to `want`.
    let mut kept = 0u32;
    for r in &ok {
        if let Some(&n) = current.get(&r.id) {
            let n = n.min(want - kept);
            if n > 0 {
                out.insert(r.id.clone(), n);
                kept += n;
            }
        }
    }
    // Give back the GPUs of what was not kept.
    for (runner, &n) in current {
        let now = out.get(runner).copied().unwrap_or(0);
        if let Some(t) = gpus_taken.get_mut(runner) {
            *t = t.saturating_sub(n.saturating_sub(now) as usize * per);
        }
    }
    while kept < want {
        let pick = ok
            .iter()
            .filter(|r| dispatch::usable_gpus(r) >= gpus_taken.get(&r.id).copied().unwrap_or(0) + per)
            .min_by_key(|r| (out.get(&r.id).copied().unwrap_or(0), r.in_flight, r.id.clone()));
        let Some(r) = pick else { break };
        *out.entry(r.id.clone()).or_default() += 1;
        *gpus_taken.entry(r.id.clone()).or_default() += per;
        kept += 1;
    }
    out
}

/// The queue depth, counted no further than `cap` (enough to decide).
async fn queue_depth(pool: &PgPool, udf_id: &str, cap: i64) -> Result<u64> {
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM work_items
                               WHERE function_id = $1 AND state IN ('pending', 'leased') LIMIT $2) q",
    )
    .bind(udf_id)
    .bind(cap)
    .fetch_one(pool)
    .await?;
    Ok(n as u64)
}

/// One decision for every pull Function with an image. Returns false
/// when another replica holds the scaler's turn.
pub async fn scale_once(pool: &PgPool, config: &ScalingConfig) -> Result<bool> {
    let mut tx = pool.begin().await?;
    let turn: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(crate::db::SCALER_LOCK)
        .fetch_one(&mut *tx)
        .await?;
    if !turn {
        return Ok(false);
    }
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(&mut *tx).await?;
    let udfs: Vec<Udf> = crate::functions::store::list(pool).await?.into_iter().filter(runs_pull_workers).collect();
    let pools = compute_pools(crate::resources::store::list_infra_rules(pool).await?);
    let runners = store::list(pool, config.lost_after.as_secs_f64()).await?;
    let rows: Vec<(String, String, i32, i32)> =
        sqlx::query_as("SELECT function_id, runner_id, revision, replicas FROM pull_assignments")
            .fetch_all(&mut *tx)
            .await?;
    let mut current: HashMap<String, BTreeMap<String, u32>> = HashMap::new();
    let mut before: BTreeMap<(String, String), (i32, u32)> = BTreeMap::new();
    for (f, r, rev, n) in rows {
        current.entry(f.clone()).or_default().insert(r.clone(), n.max(0) as u32);
        before.insert((f, r), (rev, n.max(0) as u32));
    }
    let scaled: Vec<(String, i32, Option<DateTime<Utc>>)> =
        sqlx::query_as("SELECT function_id, replicas, low_since FROM pull_scaling").fetch_all(&mut *tx).await?;
    let scaled: HashMap<String, (u32, Option<DateTime<Utc>>)> =
        scaled.into_iter().map(|(f, n, l)| (f, (n.max(0) as u32, l))).collect();
    let mut gpus_taken: HashMap<String, usize> = HashMap::new();
    let plans: HashMap<&str, Option<Scheduling>> =
        udfs.iter().map(|u| (u.id.as_str(), scheduling(u, &pools).ok())).collect();
    for (f, on) in &current {
        let per = plans.get(f.as_str()).and_then(|s| s.as_ref()).map_or(0, |s| s.plan.gpus as usize);
        for (runner, n) in on {
            *gpus_taken.entry(runner.clone()).or_default() += *n as usize * per;
        }
    }
    let mut after: BTreeMap<(String, String), (i32, u32)> = BTreeMap::new();
    let mut decided: Vec<(&str, u32, Option<DateTime<Utc>>)> = Vec::new();
    for udf in &udfs {
        let Some(s) = plans.get(udf.id.as_str()).and_then(|s| s.as_ref()) else {
            continue;
        };
        let max = u64::from(s.plan.replicas_max);
        let cap = (max * ROWS_PER_REPLICA_BATCHES * u64::from(udf.spec.worker.batch_size.max(1)) + 1) as i64;
        let depth = queue_depth(pool, &udf.id, cap).await?;
        let was = scaled.get(&udf.id).copied();
        let (was_n, low_since) = was.unwrap_or((0, None));
        let (replicas, low_since) = next_replicas(was_n, wanted(udf, depth), low_since, now, config.scale_down_after);
        if replicas != was_n {
            tracing::info!(udf = %udf.id, from = was_n, to = replicas, queue_depth = depth, "scaling pull workers");
        }
        if was != Some((replicas, low_since)) {
            decided.push((&udf.id, replicas, low_since));
        }
        let empty = BTreeMap::new();
        for (runner, n) in assign(s, replicas, current.get(&udf.id).unwrap_or(&empty), &runners, &mut gpus_taken) {
            after.insert((udf.id.clone(), runner), (udf.revision, n));
        }
    }
    // Most ticks change nothing: then nothing is written.
    let gone: Vec<&String> =
        scaled.keys().filter(|f| !udfs.iter().any(|u| &u.id == *f && plans[u.id.as_str()].is_some())).collect();
    if decided.is_empty() && gone.is_empty() && after == before {
        return Ok(true);
    }
    for (f, replicas, low_since) in decided {
        sqlx::query(
            "INSERT INTO pull_scaling (function_id, replicas, low_since) VALUES ($1, $2, $3)
             ON CONFLICT (function_id) DO UPDATE SET replicas = EXCLUDED.replicas, low_since = EXCLUDED.low_since,
                 updated_at = now()",
        )
        .bind(f)
        .bind(replicas as i32)
        .bind(low_since)
        .execute(&mut *tx)
        .await?;
    }
    if !gone.is_empty() {
        sqlx::query("DELETE FROM pull_scaling WHERE function_id = ANY($1)").bind(&gone).execute(&mut *tx).await?;
    }
    if after != before {
        sqlx::query("DELETE FROM pull_assignments").execute(&mut *tx).await?;
        let mut fs = Vec::new();
        let mut rs = Vec::new();
        let mut revs = Vec::new();
        let mut ns = Vec::new();
        for ((f, r), (rev, n)) in after {
            fs.push(f);
            rs.push(r);
            revs.push(rev);
            ns.push(n as i32);
        }
        sqlx::query(
            "INSERT INTO pull_assignments (function_id, runner_id, revision, replicas)
             SELECT * FROM unnest($1::text[], $2::text[], $3::int[], $4::int[])",
        )
        .bind(&fs)
        .bind(&rs)
        .bind(&revs)
        .bind(&ns)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Runs the scaler until `shutdown`.
pub async fn run(pool: PgPool, config: ScalingConfig, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(config.tick) => {}
        }
        if let Err(e) = scale_once(&pool, &config).await {
            tracing::warn!(error = %e, "scaling pull workers failed; retrying on the next tick");
        }
    }
}

/// The pull workers assigned to a runner, with the plan each needs.
pub async fn assigned_to(pool: &PgPool, runner_id: &str) -> Result<Vec<PullWorkers>> {
    let ids: Vec<(String, i32, i32)> =
        sqlx::query_as("SELECT function_id, revision, replicas FROM pull_assignments WHERE runner_id = $1")
            .bind(runner_id)
            .fetch_all(pool)
            .await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let pools = compute_pools(crate::resources::store::list_infra_rules(pool).await?);
    let mut out = Vec::new();
    for (udf_id, revision, replicas) in ids {
        let Ok(udf) = crate::functions::store::get(pool, &udf_id).await else { continue };
        // The assignment is for the revision the scaler saw; a newer one
        // waits for its next tick.
        if udf.revision != revision {
            continue;
        }
        if let Ok(s) = scheduling(&udf, &pools) {
            out.push(PullWorkers { udf_id, revision, replicas: replicas.max(0) as u32, plan: s.plan });
        }
    }
    Ok(out)
}

/// Why a pull Function's workers do not run, for its status (see
/// `super::status`): no runner qualifies, workers in backoff (with how they
/// ended), or (no image) rows pending and no worker claiming.
pub async fn conditions(
    pool: &PgPool,
    udf: &Udf,
    s: &Scheduling,
    runners: &[RunnerRow],
    pending: u64,
) -> Result<Vec<UdfCondition>> {
    let mut out = Vec::new();
    if !runs_pull_workers(udf) {
        let last: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT last_claim_at FROM function_stats WHERE function_id = $1")
                .bind(&udf.id)
                .fetch_optional(pool)
                .await?
                .flatten();
        let quiet = match last {
            None => true,
            Some(t) => (Utc::now() - t).num_seconds() > i64::from(udf.spec.schedule.lease_seconds.max(30)),
        };
        if pending > 0 && quiet && !udf.paused {
            let when = last.map_or("no worker has ever claimed".to_string(), |t| {
                format!("no worker has claimed since {}", crate::time::rfc3339(t))
            });
            out.push(UdfCondition::new(
                "NoWorker",
                format!(
                    "{pending} rows are pending and {when}: start a pull worker for {} (it has no worker.image, \
                     so runners do not run one)",
                    udf.id
                ),
            ));
        }
        return Ok(out);
    }
    if let Some(why) = dispatch::unmet(s, runners) {
        out.push(UdfCondition::new("NoRunner", why));
    }
    for r in runners {
        if r.state() != RunnerState::Active {
            continue;
        }
        if let Some(w) = r.load.0.workers.iter().find(|w| w.udf_id == udf.id && w.state == "backoff") {
            let why = w.error.clone().unwrap_or_else(|| "it exited".into());
            out.push(UdfCondition::new(
                "WorkerFailing",
                format!("a worker of {} on runner {} is not running: {why}", udf.id, r.name),
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runners::dispatch::tests::{runner, udf};
    use chrono::TimeZone;

    fn pull(mode: &str, min: u32, max: u32) -> Udf {
        udf(serde_json::json!({
            "targetNamespaces": ["a"], "inputs": ["id"],
            "worker": {"dispatch": "pull", "image": "i", "batchSize": 32},
            "scaling": {"mode": mode, "replicas": {"min": min, "max": max}},
        }))
    }

    #[test]
    fn autoscale_wants_one_replica_per_four_batches_within_its_bounds() {
        let f = pull("autoscale", 0, 6);
        assert_eq!(wanted(&f, 0), 0, "to zero when the queue is empty");
        assert_eq!(wanted(&f, 1), 1);
        assert_eq!(wanted(&f, 128), 1);
        assert_eq!(wanted(&f, 129), 2);
        assert_eq!(wanted(&f, 1_000_000), 6, "never above max");
        assert_eq!(wanted(&pull("autoscale", 2, 6), 0), 2, "never below min");
        assert_eq!(wanted(&pull("fixed", 1, 3), 0), 3, "fixed runs max");
        assert_eq!(wanted(&pull("fixed", 1, 3), 10_000), 3);
        let mut paused = pull("fixed", 1, 3);
        paused.paused = true;
        assert_eq!(wanted(&paused, 10_000), 0);
    }

    #[test]
    fn up_at_once_down_after_the_window() {
        let t0 = Utc.with_ymd_and_hms(2026, 12, 2, 12, 0, 0).unwrap();
        let w = Duration::from_secs(60);
        assert_eq!(next_replicas(1, 4, None, t0, w), (4, None));
        let (n, low) = next_replicas(4, 1, None, t0, w);
        assert_eq!((n, low), (4, Some(t0)), "the low spell starts");
        let later = t0 + chrono::Duration::seconds(59);
        assert_eq!(next_replicas(4, 0, low, later, w), (4, low), "not yet");
        // The queue called for more meanwhile: the spell ends.
        assert_eq!(next_replicas(4, 4, low, later, w), (4, None));
        let after = t0 + chrono::Duration::seconds(60);
        assert_eq!(next_replicas(4, 0, low, after, w), (0, None), "straight to what it calls for");
    }

    #[test]
    fn replicas_spread_keep_their_places_and_fit_the_gpus() {
        let f = pull("autoscale", 0, 6);
        let pools = compute_pools(Vec::new());
        let s = scheduling(&f, &pools).unwrap();
        let docker = |id: &str, gpus: usize| {
            let mut r = runner(id, &[], 0, false, gpus);
            r.drivers = sqlx::types::Json(vec!["process".into(), "docker".into()]);
            r
        };
        let runners = vec![docker("r1", 0), docker("r2", 0), runner("r3", &[], 0, false, 0)];
        let mut taken = HashMap::new();
        let placed = assign(&s, 5, &BTreeMap::new(), &runners, &mut taken);
        assert_eq!(placed, BTreeMap::from([("r1".to_string(), 3), ("r2".to_string(), 2)]), "r3 has no docker driver");
        // Down to 2: kept where they ran, first runners first.
        let placed = assign(&s, 2, &placed, &runners, &mut taken);
        assert_eq!(placed.values().sum::<u32>(), 2);
        // A runner that is gone loses its share to the others.
        let placed = assign(&s, 4, &BTreeMap::from([("gone".to_string(), 4)]), &runners, &mut taken);
        assert_eq!(placed.values().sum::<u32>(), 4);
        assert!(!placed.contains_key("gone"));

        // GPUs: one each, two GPUs in the fleet, so two replicas at most.
        let g = udf(serde_json::json!({
            "targetNamespaces": ["a"], "inputs": ["id"],
            "worker": {"dispatch": "pull", "image": "i", "computeClass": "gpu"},
            "scaling": {"mode": "fixed", "replicas": {"min": 0, "max": 4}},
        }));
        let s = scheduling(&g, &pools).unwrap();
        let runners = vec![docker("g1", 1), docker("g2", 1)];
        let mut taken = HashMap::new();
        let placed = assign(&s, 4, &BTreeMap::new(), &runners, &mut taken);
        assert_eq!(placed, BTreeMap::from([("g1".to_string(), 1), ("g2".to_string(), 1)]));
        assert_eq!(taken.values().sum::<usize>(), 2);
    }
}
