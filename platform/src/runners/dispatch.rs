//! The push dispatcher: leases batches of push Functions and sends each to
//! a runner.
//!
//! Placement: a runner that is active (heartbeating, not draining), has a
//! free slot, has the driver the Function needs (`process` for a
//! `worker.command`, which only runners started with `--allow-commands`
//! advertise; `docker` for an image), and whose labels match the
//! node selector of the Function's compute pool; among those, one with an
//! idle warm worker for the Function's revision, then the least loaded.
//!
//! A refused or failed send never loses the batch: its items go back to the
//! queue at once as a free retry (`runner_lost`), and the runner is left out
//! of placement for a moment. A runner that dies after accepting a batch
//! stops heartbeating, so the batch's leases are no longer extended and
//! expire; the reaper reissues them, also as free retries.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use layer_protocol::function::{ComputeClass, Dispatch, Udf, UdfCondition, resolve_resources};
use layer_protocol::resource::{ComputePool, InfraRulesInfo, PoolResources};
use layer_protocol::runner::tokens::{self, Purpose};
use layer_protocol::runner::{BatchAssignment, RunnerState, WorkerPlan};
use layer_protocol::work::ClaimedItem;
use layer_telemetry::trace::{KeyValue, Span, SpanKind, new_trace_id};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::store::{self, RunnerRow};
use crate::engine::policy::FailureClass;
use crate::engine::queue::{self, Claimer, Failure};
use crate::error::Result;

/// Settings of the dispatcher.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// How often it looks for work without being woken.
    pub tick: Duration,
    /// A runner silent this long is lost.
    pub lost_after: Duration,
    /// How long a runner that refused a batch is left out.
    pub cooldown: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            tick: Duration::from_millis(250),
            lost_after: Duration::from_secs(6),
            cooldown: Duration::from_secs(2),
        }
    }
}

/// The plan a runner needs to run a Function's workers, with the limits
/// of its compute pool where the spec leaves them out.
pub fn worker_plan(udf: &Udf, pool: Option<&ComputePool>) -> WorkerPlan {
    let w = &udf.spec.worker;
    let replicas = udf.spec.scaling.as_ref().map(|s| (s.replicas.min, s.replicas.max)).unwrap_or((0, 1));
    let r = resolve_resources(w, pool.map(|p| &p.resources));
    WorkerPlan {
        command: w.command.clone(),
        image: w.image.clone(),
        url: w.url.clone(),
        port: w.port,
        env: w.env.clone(),
        batch_size: w.batch_size,
        timeout_seconds: w.timeout_seconds,
        lease_seconds: udf.spec.schedule.lease_seconds,
        replicas_min: replicas.0,
        replicas_max: replicas.1.max(1),
        cpu: r.cpu,
        memory_bytes: r.memory_bytes,
        ephemeral_disk_bytes: r.ephemeral_disk_bytes,
        gpus: r.gpus,
        protocol: w.protocol,
    }
}

/// The compute pools: those of `InfraRules`, and the stock `cpu` and `gpu`
/// pools where no rules define them (no node selector, no replica limit;
/// the `gpu` pool asks for one GPU).
pub fn compute_pools(rules: Vec<InfraRulesInfo>) -> BTreeMap<String, ComputePool> {
    let mut pools = BTreeMap::new();
    for p in rules.into_iter().flat_map(|r| r.spec.compute_pools) {
        pools.insert(p.name.clone(), p);
    }
    for kind in ["cpu", "gpu"] {
        pools.entry(kind.to_string()).or_insert_with(|| ComputePool {
            name: kind.into(),
            kind: kind.into(),
            max_replicas_per_workload: None,
            node_selector: BTreeMap::new(),
            tolerations: Vec::new(),
            resources: PoolResources {
                requests: BTreeMap::new(),
                limits: if kind == "gpu" {
                    BTreeMap::from([("nvidia.com/gpu".to_string(), "1".to_string())])
                } else {
                    BTreeMap::new()
                },
            },
        });
    }
    pools
}

/// How a Function's batches are placed.
#[derive(Debug, Clone)]
pub struct Scheduling {
    pub plan: WorkerPlan,
    /// The worker driver a runner needs.
    pub driver: &'static str,
    /// The labels a runner must carry (the pool's node selector).
    pub selector: BTreeMap<String, String>,
    pub pool: String,
}

/// The Function's scheduling, or why it is rejected: its pool is unknown,
/// or it asks for more replicas than the pool allows.
pub fn scheduling(udf: &Udf, pools: &BTreeMap<String, ComputePool>) -> std::result::Result<Scheduling, UdfCondition> {
    let name = match udf.spec.scaling.as_ref().and_then(|s| s.pool.clone()) {
        Some(p) => p,
        None => match udf.spec.worker.compute_class {
            ComputeClass::Gpu => "gpu".into(),
            ComputeClass::Cpu => "cpu".into(),
        },
    };
    let Some(pool) = pools.get(&name) else {
        let known: Vec<&str> = pools.keys().map(String::as_str).collect();
        return Err(UdfCondition::new(
            "PoolNotFound",
            format!("scaling.pool {name:?} is not a compute pool of InfraRules (the pools are: {})", known.join(", ")),
        ));
    };
    let plan = worker_plan(udf, Some(pool));
    if let Some(limit) = pool.max_replicas_per_workload
        && udf.spec.scaling.as_ref().is_some_and(|s| s.replicas.max > limit)
    {
        return Err(UdfCondition::new(
            "ReplicasRejected",
            format!(
                "scaling.replicas.max {} is above the maxReplicasPerWorkload ({limit}) of compute pool {name:?}; \
                 no batch is placed until one of them changes",
                plan.replicas_max
            ),
        ));
    }
    let driver = if plan.command.is_some() {
        "process"
    } else if plan.image.is_some() {
        "docker"
    } else {
        "http"
    };
    Ok(Scheduling { plan, driver, selector: pool.node_selector.clone(), pool: name })
}

/// GPUs of a runner that can take work (not cordoned), and those free now.
fn gpu_counts(r: &RunnerRow) -> (usize, usize) {
    let load = &r.load.0.gpus;
    if load.is_empty() {
        // No heartbeat yet: what it registered with.
        let n = r.capacity.0.gpus.len();
        return (n, n);
    }
    (load.iter().filter(|g| g.state != "cordoned").count(), load.iter().filter(|g| g.state == "free").count())
}

/// What a runner must offer to take a Function's batches, checked in this
/// order.
#[derive(Debug, Clone, Copy)]
enum Need {
    /// The worker driver (`process`, `docker`).
    Driver,
    /// The labels of the pool's node selector.
    Labels,
    /// Enough usable GPUs for one worker.
    Gpus,
}

impl Need {
    const ALL: [Need; 3] = [Need::Driver, Need::Labels, Need::Gpus];

    fn met(self, s: &Scheduling, r: &RunnerRow) -> bool {
        match self {
            Need::Driver => r.drivers.0.iter().any(|d| d == s.driver),
            Need::Labels => s.selector.iter().all(|(k, v)| r.labels.0.get(k) == Some(v)),
            Need::Gpus => gpu_counts(r).0 >= s.plan.gpus as usize,
        }
    }

    /// What it means when no active runner meets it.
    fn unmet(self, s: &Scheduling) -> String {
        match self {
            Need::Driver if s.driver == "docker" => "no active runner can run images (worker.image): none has the \
                                                     docker driver (a reachable Docker engine)"
                .to_string(),
            Need::Driver if s.driver == "http" => {
                "no runner calls a worker.url in push mode: give the worker a command or an image".to_string()
            }
            Need::Driver if s.driver == "process" => "no active runner allows commands (worker.command): a runner \
                                                      runs them only when its operator starts it with \
                                                      --allow-commands (LAYER_RUNNER_ALLOW_COMMANDS=true); or give \
                                                      the worker an image"
                .to_string(),
            Need::Driver => format!("no active runner has the {} driver", s.driver),
            Need::Labels => {
                let labels: Vec<String> = s.selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!(
                    "no active runner carries the labels of compute pool {:?} ({}); start one with --labels",
                    s.pool,
                    labels.join(", ")
                )
            }
            Need::Gpus => format!("no active runner has {} usable GPUs for a worker", s.plan.gpus),
        }
    }
}

/// Picks a runner for one batch of `udf`, or none: an active runner with
/// a free slot that meets every [`Need`], and already hosts the Function
/// when `replicas.max` workers of it run across the fleet; among those, one with an idle
/// warm worker of the revision, then one with the GPUs free, then the least
/// loaded.
fn place<'a>(
    udf: &Udf,
    s: &Scheduling,
    runners: &'a mut [RunnerRow],
    cooldown: &HashMap<String, Instant>,
) -> Option<&'a mut RunnerRow> {
    let at = pick(udf, s, runners, cooldown, true)?;
    runners.get_mut(at)
}

/// Picks a runner for one call of `udf`, as [`place`] picks one for a
/// batch, except that a runner's batch slots do not limit its calls (a
/// call waits for a worker of the Function on the runner instead).
pub(crate) fn place_call<'a>(udf: &Udf, s: &Scheduling, runners: &'a [RunnerRow]) -> Option<&'a RunnerRow> {
    runners.get(pick(udf, s, runners, &HashMap::new(), false)?)
}

/// The index of the runner [`place`] (`slots`) or [`place_call`] picks.
fn pick(
    udf: &Udf,
    s: &Scheduling,
    runners: &[RunnerRow],
    cooldown: &HashMap<String, Instant>,
    slots: bool,
) -> Option<usize> {
    let gpus = s.plan.gpus as usize;
    // `replicas.max` holds across the fleet: once that many workers of the
    // revision run (or are about to: a runner with a batch of it in flight
    // counts as one), only runners that have one take more.
    let hosted = |r: &RunnerRow| {
        let workers = r.load.0.workers.iter().filter(|w| w.udf_id == udf.id && w.revision == udf.revision).count();
        workers.max(usize::from(r.in_flight_udfs.contains(&udf.id)))
    };
    // Draining and lost runners' workers are on their way out.
    let fleet: usize = runners.iter().filter(|r| r.state() == RunnerState::Active).map(hosted).sum();
    let full = fleet >= s.plan.replicas_max as usize;
    runners
        .iter()
        .enumerate()
        .filter(|(_, r)| !full || hosted(r) > 0)
        .filter(|(_, r)| r.state() == RunnerState::Active)
        .filter(|(_, r)| !slots || r.in_flight < i64::from(r.capacity.0.slots))
        .filter(|(_, r)| cooldown.get(&r.id).is_none_or(|t| Instant::now() >= *t))
        .filter(|(_, r)| Need::ALL.iter().all(|n| n.met(s, r)))
        .min_by_key(|(_, r)| {
            let warm =
                r.load.0.workers.iter().any(|w| w.udf_id == udf.id && w.revision == udf.revision && w.state == "idle");
            (!warm, gpus > 0 && gpu_counts(r).1 < gpus, r.in_flight)
        })
        .map(|(i, _)| i)
}

/// The first [`Need`] no active or draining runner meets, in words.
pub(crate) fn unmet(s: &Scheduling, runners: &[RunnerRow]) -> Option<String> {
    let mut runners: Vec<&RunnerRow> =
        runners.iter().filter(|r| matches!(r.state(), RunnerState::Active | RunnerState::Draining)).collect();
    if runners.is_empty() {
        return Some("no runner is active: work waits until one registers".into());
    }
    for need in Need::ALL {
        runners.retain(|r| need.met(s, r));
        if runners.is_empty() {
            return Some(need.unmet(s));
        }
    }
    None
}

/// Whether a runner meets every [`Need`] of a Function.
pub(crate) fn qualifies(s: &Scheduling, r: &RunnerRow) -> bool {
    Need::ALL.iter().all(|n| n.met(s, r))
}

/// The GPUs of a runner that can take work (not cordoned).
pub(crate) fn usable_gpus(r: &RunnerRow) -> usize {
    gpu_counts(r).0
}

/// A handle to the dispatcher duty.
#[derive(Clone)]
pub struct Dispatcher {
    pool: PgPool,
    http: reqwest::Client,
    work_ready: Arc<Notify>,
    generation: Arc<AtomicU64>,
    config: DispatchConfig,
}

/// Push Functions with their scheduling, as last read; rejected ones are
/// left out (their status says why).
struct Catalog {
    read_at: Instant,
    generation: u64,
    udfs: Vec<(Udf, Scheduling)>,
}

/// How long the catalog is trusted without a local change: changes made
/// through another replica reach this one within it.
const CATALOG_TTL: Duration = Duration::from_secs(1);

/// Runners left out of placement until the given time, after a refused or
/// failed send. Shared with the sends, which put a runner here before
/// handing its batch back, so no round can place the batch on it again.
type Cooldown = Arc<std::sync::Mutex<HashMap<String, Instant>>>;

impl Dispatcher {
    pub fn new(pool: PgPool, work_ready: Arc<Notify>, generation: Arc<AtomicU64>, config: DispatchConfig) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .timeout(Duration::from_secs(15))
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
        Dispatcher { pool, http, work_ready, generation, config }
    }

    /// Runs until `shutdown`; sends in progress finish first.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut sends: JoinSet<()> = JoinSet::new();
        let cooldown: Cooldown = Arc::default();
        let mut catalog: Option<Catalog> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.work_ready.notified() => {}
                _ = tokio::time::sleep(self.config.tick) => {}
                Some(_) = sends.join_next(), if !sends.is_empty() => continue,
            }
            let resting = {
                let mut c = cooldown.lock().unwrap_or_else(|e| e.into_inner());
                c.retain(|_, t| Instant::now() < *t);
                c.clone()
            };
            if let Err(e) = self.dispatch_round(&mut sends, &resting, &cooldown, &mut catalog).await {
                tracing::warn!(error = %e, "dispatch round failed; retrying");
            }
        }
        while sends.join_next().await.is_some() {}
    }

    /// Leases and sends batches until no Function has work or no runner
    /// has room. Functions take turns, one batch each.
    async fn dispatch_round(
        &self,
        sends: &mut JoinSet<()>,
        resting: &HashMap<String, Instant>,
        cooldown: &Cooldown,
        catalog: &mut Option<Catalog>,
    ) -> Result<()> {
        let generation = self.generation.load(Ordering::SeqCst);
        if catalog.as_ref().is_none_or(|c| c.generation != generation || c.read_at.elapsed() > CATALOG_TTL) {
            let pools = compute_pools(crate::resources::store::list_infra_rules(&self.pool).await?);
            let udfs = crate::functions::store::list(&self.pool)
                .await?
                .into_iter()
                .filter(|u| u.spec.worker.dispatch == Dispatch::Push && !u.paused)
                .filter_map(|u| match scheduling(&u, &pools) {
                    Ok(s) => Some((u, s)),
                    Err(c) => {
                        tracing::debug!(udf = %u.id, reason = %c.reason, "{}", c.message);
                        None
                    }
                })
                .collect();
            *catalog = Some(Catalog { read_at: Instant::now(), generation, udfs });
        }
        let Some(Catalog { udfs, .. }) = catalog.as_ref() else { return Ok(()) };
        if udfs.is_empty() {
            return Ok(());
        }
        let mut runners = store::list(&self.pool, self.config.lost_after.as_secs_f64()).await?;
        if runners.is_empty() {
            return Ok(());
        }
        let mut stale = false;
        let mut done: HashSet<&str> = HashSet::new();
        while done.len() < udfs.len() {
            for (udf, sched) in udfs {
                if done.contains(udf.id.as_str()) {
                    continue;
                }
                let Some(runner) = place(udf, sched, &mut runners, resting) else {
                    done.insert(&udf.id);
                    continue;
                };
                let limit = i64::from(udf.spec.worker.batch_size);
                let lease = i64::from(udf.spec.schedule.lease_seconds);
                // The trace id is chosen before the lease so the batch
                // record carries it; the spans start once there is a batch.
                let trace_id = new_trace_id();
                let trace_hex = trace_id.to_string();
                let leasing_at = std::time::SystemTime::now();
                let claimer = Claimer::Runner { id: &runner.id, trace_id: &trace_hex };
                let claim = queue::claim(&self.pool, udf, claimer, limit, lease).await?;
                stale |= claim.stale;
                let Some(batch_id) = claim.batch_id else {
                    done.insert(&udf.id);
                    continue;
                };
                // A short batch means the queue is empty for now.
                if (claim.items.len() as i64) < limit {
                    done.insert(&udf.id);
                }
                let span =
                    batch_span(udf, &runner.id, batch_id, claim.items.len(), trace_id, leasing_at, claim.queued_at);
                runner.in_flight += 1;
                if !runner.in_flight_udfs.contains(&udf.id) {
                    runner.in_flight_udfs.push(udf.id.clone());
                }
                let items = claim
                    .items
                    .into_iter()
                    .map(|c| ClaimedItem { namespace: c.namespace, id: c.id, input: c.input })
                    .collect();
                let report_ttl = u64::from(udf.spec.schedule.lease_seconds) + 300;
                let assignment = BatchAssignment {
                    batch_id,
                    udf_id: udf.id.clone(),
                    revision: udf.revision,
                    version: udf.spec.version.clone(),
                    worker: sched.plan.clone(),
                    items,
                    report_token: tokens::sign(&runner.signing_key, &runner.id, Purpose::Report(batch_id), report_ttl),
                };
                let token = tokens::sign(
                    &runner.signing_key,
                    &runner.id,
                    Purpose::Dispatch(batch_id),
                    tokens::DISPATCH_TTL_SECONDS,
                );
                let send = Send {
                    pool: self.pool.clone(),
                    http: self.http.clone(),
                    udf: udf.clone(),
                    runner_id: runner.id.clone(),
                    url: format!("{}/v1/batches", runner.address.trim_end_matches('/')),
                    token,
                    holder: claim.holder,
                    work_ready: self.work_ready.clone(),
                    cooldown: cooldown.clone(),
                    rest_for: self.config.cooldown,
                    span,
                };
                let logs = tracing::info_span!("batch", batch_id, udf = %udf.id, trace_id = %trace_hex);
                sends.spawn(tracing::Instrument::instrument(send.run(assignment), logs));
            }
        }
        if stale {
            *catalog = None;
        }
        Ok(())
    }
}

/// A batch's root span (`layer.batch`) from the start of its lease, with
/// `layer.queued` (its oldest row's wait) and `layer.lease` under it.
fn batch_span(
    udf: &Udf,
    runner_id: &str,
    batch_id: i64,
    size: usize,
    trace_id: layer_telemetry::trace::TraceId,
    leasing_at: std::time::SystemTime,
    queued_at: Option<chrono::DateTime<chrono::Utc>>,
) -> Span {
    let attrs = vec![
        KeyValue::new("layer.udf", udf.id.clone()),
        KeyValue::new("layer.revision", i64::from(udf.revision)),
        KeyValue::new("layer.batch.id", batch_id),
        KeyValue::new("layer.batch.size", size as i64),
        KeyValue::new("layer.runner", runner_id.to_string()),
    ];
    let queued_at = queued_at.map(std::time::SystemTime::from).filter(|q| *q < leasing_at);
    let root =
        Span::root("layer.batch", SpanKind::Internal, Some(trace_id), Some(queued_at.unwrap_or(leasing_at)), attrs);
    let metrics = &crate::metrics::METRICS;
    if let Some(q) = queued_at {
        root.child_from("layer.queued", SpanKind::Internal, q, vec![]).end_at(leasing_at);
        let wait = leasing_at.duration_since(q).unwrap_or_default();
        metrics.batch_queue_wait.with_label_values(&[&udf.id]).observe(wait.as_secs_f64());
    }
    root.child_from("layer.lease", SpanKind::Internal, leasing_at, vec![]).end();
    root
}

/// One batch on its way to a runner.
struct Send {
    pool: PgPool,
    http: reqwest::Client,
    udf: Udf,
    runner_id: String,
    url: String,
    token: String,
    holder: String,
    work_ready: Arc<Notify>,
    cooldown: Cooldown,
    rest_for: Duration,
    /// The batch's root span; ends when the runner has the batch.
    span: Span,
}

impl Send {
    async fn run(self, assignment: BatchAssignment) {
        let batch_id = assignment.batch_id;
        let dispatch = self.span.child(
            "layer.dispatch",
            SpanKind::Client,
            vec![KeyValue::new("http.request.method", "POST"), KeyValue::new("url.full", self.url.clone())],
        );
        let mut headers = http::HeaderMap::new();
        dispatch.inject(&mut headers);
        let outcome =
            self.http.post(&self.url).headers(headers).bearer_auth(&self.token).json(&assignment).send().await;
        let (error, class) = match outcome {
            Ok(r) if r.status().is_success() => {
                crate::metrics::METRICS.batches_dispatched.with_label_values(&[&self.udf.id]).inc();
                dispatch.set([KeyValue::new("http.response.status_code", i64::from(r.status().as_u16()))]);
                dispatch.end();
                self.span.end();
                return;
            }
            Ok(r) => {
                let status = r.status();
                dispatch.set([KeyValue::new("http.response.status_code", i64::from(status.as_u16()))]);
                let body: String = r.text().await.unwrap_or_default().chars().take(300).collect();
                (format!("runner {} refused batch {batch_id}: {status} {body}", self.runner_id), "refused")
            }
            Err(e) => (format!("could not send batch {batch_id} to runner {}: {e}", self.runner_id), "unreachable"),
        };
        crate::metrics::METRICS.dispatch_errors.with_label_values(&[class]).inc();
        dispatch.error(error.clone());
        dispatch.end();
        self.span.error(error.clone());
        self.span.end();
        tracing::warn!(batch_id, runner_id = %self.runner_id, error = %error, "dispatch to runner failed");
        // The runner rests before its batch is back in the queue.
        self.cooldown
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(self.runner_id.clone(), Instant::now() + self.rest_for);
        // Back to the queue at once, without spending attempts.
        let failures = assignment
            .items
            .into_iter()
            .map(|i| Failure {
                namespace: i.namespace,
                id: i.id,
                class: FailureClass::RunnerLost,
                message: error.clone(),
            })
            .collect();
        let released = async {
            let mut tx = queue::begin(&self.pool).await?;
            queue::fail(&mut tx, &self.udf, &self.holder, failures).await?;
            tx.commit().await?;
            crate::error::Result::<()>::Ok(())
        };
        if let Err(e) = released.await {
            tracing::warn!(batch_id, error = %e, "releasing a refused batch failed; its leases will expire instead");
        }
        if let Err(e) = store::abandon_batch(&self.pool, batch_id, &error).await {
            tracing::warn!(batch_id, error = %e, "recording a refused batch failed");
        }
        self.work_ready.notify_one();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use layer_protocol::function::validate_spec;
    use layer_protocol::runner::{Capacity, GpuInfo, GpuStatus, RunnerLoad, WorkerView};
    use layer_protocol::validate::Case;
    use layer_protocol::validate::Problems;
    use sqlx::types::Json;

    pub(crate) fn udf(spec: serde_json::Value) -> Udf {
        let mut p = Problems::new();
        let spec = validate_spec(&mut p, "spec", &spec, Case::Camel).expect("valid spec").spec;
        assert!(p.is_empty());
        Udf {
            id: "f".into(),
            spec,
            paused: false,
            created_at: String::new(),
            updated_at: String::new(),
            revision: 3,
            labels: BTreeMap::new(),
        }
    }

    pub(crate) fn runner(id: &str, labels: &[(&str, &str)], in_flight: i64, warm: bool, gpus: usize) -> RunnerRow {
        let workers = if warm {
            vec![WorkerView {
                udf_id: "f".into(),
                revision: 3,
                state: "idle".into(),
                pid: Some(1),
                ..Default::default()
            }]
        } else {
            Vec::new()
        };
        let gpu = GpuInfo { index: 0, uuid: "GPU-x".into(), name: "x".into(), memory_bytes: 1 };
        RunnerRow {
            id: id.into(),
            name: id.into(),
            address: "http://127.0.0.1:1".into(),
            labels: Json(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            capacity: Json(Capacity { cpus: 2, memory_bytes: 1, slots: 2, gpus: vec![gpu; gpus] }),
            drivers: Json(vec!["process".into()]),
            state: "active".into(),
            load: Json(RunnerLoad { batches: 0, workers, gpus: Vec::new() }),
            signing_key: Vec::new(),
            registered_at: chrono::Utc::now(),
            last_heartbeat_at: chrono::Utc::now(),
            lost: false,
            in_flight,
            in_flight_udfs: Vec::new(),
        }
    }

    fn push(extra: serde_json::Value) -> Udf {
        let mut s = serde_json::json!({"targetNamespaces": ["a"], "worker": {"dispatch": "push", "command": ["w"]}});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        udf(s)
    }

    fn runner_with_gpus(id: &str, states: &[&str]) -> RunnerRow {
        let mut r = runner(id, &[], 0, false, states.len());
        r.load.0.gpus = states
            .iter()
            .enumerate()
            .map(|(i, st)| GpuStatus {
                uuid: format!("GPU-{i}"),
                state: st.to_string(),
                worker: None,
                udf_id: None,
                utilization_percent: None,
                memory_used_bytes: None,
                memory_total_bytes: 1,
                error: None,
            })
            .collect();
        r
    }

    fn picked(u: &Udf, runners: &mut [RunnerRow], pools: &BTreeMap<String, ComputePool>) -> Option<String> {
        let s = scheduling(u, pools).expect("scheduled");
        place(u, &s, runners, &HashMap::new()).map(|r| r.id.clone())
    }

    fn pools(defs: serde_json::Value) -> BTreeMap<String, ComputePool> {
        let mut p = Problems::new();
        let spec = layer_protocol::resource::infra_spec(&mut p, &defs).expect("valid rules");
        assert!(p.is_empty());
        compute_pools(vec![InfraRulesInfo { name: "default".into(), spec, updated_at: String::new() }])
    }

    #[test]
    fn placement_prefers_warm_then_least_loaded_among_eligible_runners() {
        let none = compute_pools(Vec::new());
        let u = push(serde_json::json!({}));
        let mut rs = vec![runner("busy", &[], 1, false, 0), runner("idle", &[], 0, false, 0)];
        assert_eq!(picked(&u, &mut rs, &none).as_deref(), Some("idle"));
        let mut rs = vec![runner("cold", &[], 0, false, 0), runner("warm", &[], 1, true, 0)];
        assert_eq!(picked(&u, &mut rs, &none).as_deref(), Some("warm"), "a warm worker beats a lighter load");
        // Full, lost, draining and cooling-down runners take nothing.
        let mut full = runner("full", &[], 2, true, 0);
        assert_eq!(picked(&u, std::slice::from_mut(&mut full), &none), None);
        let mut lost = runner("lost", &[], 0, true, 0);
        lost.lost = true;
        assert_eq!(picked(&u, std::slice::from_mut(&mut lost), &none), None);
        let mut draining = runner("draining", &[], 0, true, 0);
        draining.state = "draining".into();
        assert_eq!(picked(&u, std::slice::from_mut(&mut draining), &none), None);
        let mut cool = vec![runner("cool", &[], 0, false, 0)];
        let cooldown = HashMap::from([("cool".to_string(), Instant::now() + Duration::from_secs(5))]);
        let s = scheduling(&u, &none).unwrap();
        assert!(place(&u, &s, &mut cool, &cooldown).is_none());
    }

    #[test]
    fn commands_go_only_to_runners_that_allow_them() {
        let none = compute_pools(Vec::new());
        let u = push(serde_json::json!({}));
        let mut closed = runner("closed", &[], 0, false, 0);
        closed.drivers.0 = vec!["docker".into()];
        assert_eq!(picked(&u, std::slice::from_mut(&mut closed), &none), None);
        let s = scheduling(&u, &none).unwrap();
        let why = Need::Driver.unmet(&s);
        assert!(why.contains("no active runner allows commands") && why.contains("--allow-commands"), "{why}");
        let mut rs = vec![closed, runner("open", &[], 1, false, 0)];
        assert_eq!(picked(&u, &mut rs, &none).as_deref(), Some("open"));
        // Images still go to the runner without the process driver.
        let image = push(serde_json::json!({"worker": {"dispatch": "push", "image": "x:1"}}));
        assert_eq!(picked(&image, &mut rs, &none).as_deref(), Some("closed"));
    }

    #[test]
    fn replicas_max_holds_across_the_fleet() {
        let pools = compute_pools(Vec::new());
        let u = push(serde_json::json!({"scaling": {"replicas": {"min": 0, "max": 1}}}));
        // One worker of the revision runs on "warm" (busy, so not preferred
        // as warm): only it may take more, however loaded.
        let mut warm = runner("warm", &[], 1, true, 0);
        warm.load.0.workers[0].state = "busy".into();
        let mut rs = vec![runner("empty", &[], 0, false, 0), warm];
        assert_eq!(picked(&u, &mut rs, &pools).as_deref(), Some("warm"));
        // A batch in flight counts as a worker about to run.
        let mut sent = runner("sent", &[], 1, false, 0);
        sent.in_flight_udfs = vec!["f".into()];
        let mut rs = vec![runner("empty", &[], 0, false, 0), sent];
        assert_eq!(picked(&u, &mut rs, &pools).as_deref(), Some("sent"));
        // Below the maximum, the emptier runner is fine.
        let two = push(serde_json::json!({"scaling": {"replicas": {"min": 0, "max": 2}}}));
        let mut sent = runner("sent", &[], 1, false, 0);
        sent.in_flight_udfs = vec!["f".into()];
        let mut rs = vec![runner("empty", &[], 0, false, 0), sent];
        assert_eq!(picked(&two, &mut rs, &pools).as_deref(), Some("empty"));
    }

    #[test]
    fn placement_follows_pools_drivers_and_gpus() {
        let pools = pools(serde_json::json!({"computePools": [
            {"name": "cpu", "kind": "cpu", "nodeSelector": {"tier": "cpu"}},
            {"name": "special", "kind": "cpu", "nodeSelector": {"zone": "b"}},
        ]}));
        let mut rs = vec![runner("plain", &[], 0, false, 0), runner("tiered", &[("tier", "cpu")], 1, false, 0)];
        assert_eq!(picked(&push(serde_json::json!({})), &mut rs, &pools).as_deref(), Some("tiered"));
        let special = push(serde_json::json!({"scaling": {"pool": "special"}}));
        assert_eq!(picked(&special, &mut rs, &pools), None, "no runner carries zone=b");
        // The stock gpu pool: one GPU per worker, on a runner that has one.
        let gpu = push(serde_json::json!({"worker": {"dispatch": "push", "command": ["w"], "computeClass": "gpu"}}));
        assert_eq!(scheduling(&gpu, &pools).unwrap().plan.gpus, 1);
        let mut rs = vec![runner("cpu-only", &[], 0, false, 0), runner("gpu", &[], 1, false, 1)];
        assert_eq!(picked(&gpu, &mut rs, &pools).as_deref(), Some("gpu"));
        let image = push(serde_json::json!({"worker": {"dispatch": "push", "image": "x:1"}}));
        assert_eq!(picked(&image, &mut rs, &pools), None, "no runner has the docker driver");
        // Cordoned GPUs do not count; a runner with its GPU free beats one
        // whose GPUs are bound, whatever the load.
        let mut rs = vec![runner_with_gpus("cordoned", &["cordoned"]), runner_with_gpus("bound", &["bound"])];
        assert_eq!(picked(&gpu, &mut rs, &pools).as_deref(), Some("bound"));
        let mut free = runner_with_gpus("free", &["bound", "free"]);
        free.in_flight = 1;
        let mut rs = vec![runner_with_gpus("bound", &["bound"]), free];
        assert_eq!(picked(&gpu, &mut rs, &pools).as_deref(), Some("free"));
        let two = push(serde_json::json!({"worker": {"dispatch": "push", "command": ["w"], "computeClass": "gpu",
            "resources": {"gpus": 2}}}));
        let mut rs = vec![runner_with_gpus("one", &["free"]), runner_with_gpus("two", &["bound", "free"])];
        assert_eq!(picked(&two, &mut rs, &pools).as_deref(), Some("two"));
    }

    #[test]
    fn pools_reject_too_many_replicas_and_unknown_names_and_lend_their_limits() {
        let pools = pools(serde_json::json!({"computePools": [
            {"name": "gpu", "kind": "gpu", "maxReplicasPerWorkload": 4,
             "resources": {"limits": {"memory": "10Gi", "nvidia.com/gpu": "1"}}},
        ]}));
        let over = push(serde_json::json!({"worker": {"dispatch": "push", "command": ["w"], "computeClass": "gpu"},
            "scaling": {"replicas": {"min": 0, "max": 8}}}));
        let c = scheduling(&over, &pools).unwrap_err();
        assert_eq!(c.reason, "ReplicasRejected");
        assert!(c.message.contains("scaling.replicas.max 8") && c.message.contains("(4)"), "{}", c.message);
        let within = push(serde_json::json!({"worker": {"dispatch": "push", "command": ["w"], "computeClass": "gpu"},
            "scaling": {"replicas": {"min": 0, "max": 4}}}));
        let s = scheduling(&within, &pools).unwrap();
        assert_eq!((s.plan.gpus, s.plan.memory_bytes), (1, Some(10 << 30)), "the pool's limits apply");
        // The spec and its podSpec win over the pool.
        let own = push(serde_json::json!({"worker": {"dispatch": "push", "command": ["w"], "computeClass": "gpu",
            "resources": {"memory": "1Gi"},
            "podSpec": {"containers": [{"name": "w", "resources": {"limits": {"cpu": "500m", "memory": "2Gi",
                "ephemeral-storage": "3Gi", "nvidia.com/gpu": 2}}}]}}}));
        let p = scheduling(&own, &pools).unwrap().plan;
        assert_eq!(
            (p.cpu, p.memory_bytes, p.ephemeral_disk_bytes, p.gpus),
            (Some(0.5), Some(1 << 30), Some(3 << 30), 2)
        );
        let unknown = push(serde_json::json!({"scaling": {"pool": "nowhere"}}));
        let c = scheduling(&unknown, &pools).unwrap_err();
        assert_eq!(c.reason, "PoolNotFound");
        assert!(c.message.contains("\"nowhere\"") && c.message.contains("cpu, gpu"), "{}", c.message);
    }
}
