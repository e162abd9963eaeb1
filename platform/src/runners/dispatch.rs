//! The push dispatcher: leases batches of push Functions and sends each to
//! a runner.
//!
//! Placement: a runner that is active (heartbeating, not draining), has a
//! free slot, has the driver the Function needs, and whose labels match the
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

use layer_protocol::function::{ComputeClass, Dispatch, Udf, parse_bytes, parse_cpu};
use layer_protocol::runner::tokens::{self, Purpose};
use layer_protocol::runner::{BatchAssignment, RunnerState, WorkerPlan};
use layer_protocol::work::ClaimedItem;
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

/// The plan a runner needs to run a Function's workers.
pub fn worker_plan(udf: &Udf) -> WorkerPlan {
    let w = &udf.spec.worker;
    let replicas = udf.spec.scaling.as_ref().map(|s| (s.replicas.min, s.replicas.max)).unwrap_or((0, 1));
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
        cpu: w.resources.as_ref().and_then(|r| r.cpu.as_deref()).and_then(parse_cpu),
        memory_bytes: w.resources.as_ref().and_then(|r| r.memory.as_deref()).and_then(parse_bytes),
        ephemeral_disk_bytes: w.resources.as_ref().and_then(|r| r.ephemeral_disk.as_deref()).and_then(parse_bytes),
    }
}

/// The driver a Function's workers need.
fn driver_for(udf: &Udf) -> &'static str {
    if udf.spec.worker.command.is_some() {
        "process"
    } else if udf.spec.worker.image.is_some() {
        "docker"
    } else {
        "http"
    }
}

/// The node selector of the Function's compute pool (from `InfraRules`),
/// empty when no rules name the pool.
fn pool_selector<'a>(
    udf: &Udf,
    pools: &'a BTreeMap<String, BTreeMap<String, String>>,
) -> Option<&'a BTreeMap<String, String>> {
    let name = match udf.spec.scaling.as_ref().and_then(|s| s.pool.clone()) {
        Some(p) => p,
        None => match udf.spec.worker.compute_class {
            ComputeClass::Gpu => "gpu".into(),
            ComputeClass::Cpu => "cpu".into(),
        },
    };
    pools.get(&name)
}

/// Picks a runner for one batch of `udf`, or none.
fn place<'a>(
    udf: &Udf,
    runners: &'a mut [RunnerRow],
    pools: &BTreeMap<String, BTreeMap<String, String>>,
    cooldown: &HashMap<String, Instant>,
) -> Option<&'a mut RunnerRow> {
    let driver = driver_for(udf);
    let selector = pool_selector(udf, pools);
    let gpu = udf.spec.worker.compute_class == ComputeClass::Gpu;
    runners
        .iter_mut()
        .filter(|r| r.state() == RunnerState::Active)
        .filter(|r| r.in_flight < i64::from(r.capacity.0.slots))
        .filter(|r| cooldown.get(&r.id).is_none_or(|t| Instant::now() >= *t))
        .filter(|r| r.drivers.0.iter().any(|d| d == driver))
        .filter(|r| !gpu || !r.capacity.0.gpus.is_empty())
        .filter(|r| selector.is_none_or(|s| s.iter().all(|(k, v)| r.labels.0.get(k) == Some(v))))
        .min_by_key(|r| {
            let warm =
                r.load.0.workers.iter().any(|w| w.udf_id == udf.id && w.revision == udf.revision && w.state == "idle");
            (!warm, r.in_flight)
        })
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

/// Push Functions and compute pools, as last read.
struct Catalog {
    read_at: Instant,
    generation: u64,
    udfs: Vec<Udf>,
    pools: BTreeMap<String, BTreeMap<String, String>>,
}

/// How long the catalog is trusted without a local change: changes made
/// through another replica reach this one within it.
const CATALOG_TTL: Duration = Duration::from_secs(1);

enum Sent {
    Accepted,
    Refused { runner_id: String },
}

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
        let mut sends: JoinSet<Sent> = JoinSet::new();
        let mut cooldown: HashMap<String, Instant> = HashMap::new();
        let mut catalog: Option<Catalog> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.work_ready.notified() => {}
                _ = tokio::time::sleep(self.config.tick) => {}
                Some(done) = sends.join_next(), if !sends.is_empty() => {
                    if let Ok(Sent::Refused { runner_id }) = done {
                        cooldown.insert(runner_id, Instant::now() + self.config.cooldown);
                    }
                    continue;
                }
            }
            cooldown.retain(|_, t| Instant::now() < *t);
            if let Err(e) = self.dispatch_round(&mut sends, &cooldown, &mut catalog).await {
                tracing::warn!(error = %e, "dispatch round failed; retrying");
            }
        }
        while sends.join_next().await.is_some() {}
    }

    /// Leases and sends batches until no Function has work or no runner
    /// has room. Functions take turns, one batch each.
    async fn dispatch_round(
        &self,
        sends: &mut JoinSet<Sent>,
        cooldown: &HashMap<String, Instant>,
        catalog: &mut Option<Catalog>,
    ) -> Result<()> {
        let generation = self.generation.load(Ordering::SeqCst);
        if catalog.as_ref().is_none_or(|c| c.generation != generation || c.read_at.elapsed() > CATALOG_TTL) {
            let udfs = crate::functions::store::list(&self.pool)
                .await?
                .into_iter()
                .filter(|u| u.spec.worker.dispatch == Dispatch::Push && !u.paused)
                .collect();
            let mut pools = BTreeMap::new();
            for rules in crate::resources::store::list_infra_rules(&self.pool).await? {
                for p in rules.spec.compute_pools {
                    pools.insert(p.name, p.node_selector);
                }
            }
            *catalog = Some(Catalog { read_at: Instant::now(), generation, udfs, pools });
        }
        let Some(Catalog { udfs, pools, .. }) = catalog.as_ref() else { return Ok(()) };
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
            for udf in udfs {
                if done.contains(udf.id.as_str()) {
                    continue;
                }
                let Some(runner) = place(udf, &mut runners, pools, cooldown) else {
                    done.insert(&udf.id);
                    continue;
                };
                let limit = i64::from(udf.spec.worker.batch_size);
                let lease = i64::from(udf.spec.schedule.lease_seconds);
                let claim = queue::claim(&self.pool, udf, Claimer::Runner(&runner.id), limit, lease).await?;
                stale |= claim.stale;
                let Some(batch_id) = claim.batch_id else {
                    done.insert(&udf.id);
                    continue;
                };
                // A short batch means the queue is empty for now.
                if (claim.items.len() as i64) < limit {
                    done.insert(&udf.id);
                }
                runner.in_flight += 1;
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
                    worker: worker_plan(udf),
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
                };
                sends.spawn(send.run(assignment));
            }
        }
        if stale {
            *catalog = None;
        }
        Ok(())
    }
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
}

impl Send {
    async fn run(self, assignment: BatchAssignment) -> Sent {
        let batch_id = assignment.batch_id;
        let outcome = self.http.post(&self.url).bearer_auth(&self.token).json(&assignment).send().await;
        let error = match outcome {
            Ok(r) if r.status().is_success() => return Sent::Accepted,
            Ok(r) => {
                let status = r.status();
                let body: String = r.text().await.unwrap_or_default().chars().take(300).collect();
                format!("runner {} refused batch {batch_id}: {status} {body}", self.runner_id)
            }
            Err(e) => format!("could not send batch {batch_id} to runner {}: {e}", self.runner_id),
        };
        tracing::warn!(batch_id, runner_id = %self.runner_id, error = %error, "dispatch to runner failed");
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
        Sent::Refused { runner_id: self.runner_id }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use layer_protocol::function::validate_spec;
    use layer_protocol::runner::{Capacity, GpuInfo, RunnerLoad, WorkerView};
    use layer_protocol::validate::Case;
    use layer_protocol::validate::Problems;
    use sqlx::types::Json;

    fn udf(spec: serde_json::Value) -> Udf {
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

    fn runner(id: &str, labels: &[(&str, &str)], in_flight: i64, warm: bool, gpus: usize) -> RunnerRow {
        let workers = if warm {
            vec![WorkerView { udf_id: "f".into(), revision: 3, state: "idle".into(), pid: Some(1), container: None }]
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
            load: Json(RunnerLoad { batches: 0, workers }),
            signing_key: Vec::new(),
            registered_at: chrono::Utc::now(),
            last_heartbeat_at: chrono::Utc::now(),
            lost: false,
            in_flight,
        }
    }

    fn push(extra: serde_json::Value) -> Udf {
        let mut s = serde_json::json!({"targetNamespaces": ["a"], "worker": {"dispatch": "push", "command": ["w"]}});
        for (k, v) in extra.as_object().unwrap() {
            s[k] = v.clone();
        }
        udf(s)
    }

    fn picked(
        u: &Udf,
        runners: &mut [RunnerRow],
        pools: &BTreeMap<String, BTreeMap<String, String>>,
    ) -> Option<String> {
        place(u, runners, pools, &HashMap::new()).map(|r| r.id.clone())
    }

    #[test]
    fn placement_prefers_warm_then_least_loaded_among_eligible_runners() {
        let none = BTreeMap::new();
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
        assert!(place(&u, &mut cool, &none, &cooldown).is_none());
    }

    #[test]
    fn placement_follows_pools_drivers_and_gpus() {
        let pools = BTreeMap::from([
            ("cpu".to_string(), BTreeMap::from([("tier".to_string(), "cpu".to_string())])),
            ("special".to_string(), BTreeMap::from([("zone".to_string(), "b".to_string())])),
        ]);
        let mut rs = vec![runner("plain", &[], 0, false, 0), runner("tiered", &[("tier", "cpu")], 1, false, 0)];
        assert_eq!(picked(&push(serde_json::json!({})), &mut rs, &pools).as_deref(), Some("tiered"));
        let special = push(serde_json::json!({"scaling": {"pool": "special"}}));
        assert_eq!(picked(&special, &mut rs, &pools), None, "no runner carries zone=b");
        let gpu = push(serde_json::json!({"worker": {"dispatch": "push", "command": ["w"], "computeClass": "gpu"}}));
        let mut rs = vec![runner("cpu-only", &[], 0, false, 0), runner("gpu", &[], 1, false, 1)];
        assert_eq!(picked(&gpu, &mut rs, &BTreeMap::new()).as_deref(), Some("gpu"));
        let image = push(serde_json::json!({"worker": {"dispatch": "push", "image": "x:1"}}));
        assert_eq!(picked(&image, &mut rs, &BTreeMap::new()), None, "no runner has the docker driver");
    }
}
