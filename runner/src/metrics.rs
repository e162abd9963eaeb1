//! The runner's Prometheus metrics, served at `GET /metrics` on its port.
//!
//! Counters and histograms are process-wide; gauges (workers, batches
//! held, GPUs) are read from the runner's own state at scrape time.
//! Labels: Function ids, worker states, GPU UUIDs; never row ids.

use std::collections::BTreeMap;
use std::sync::LazyLock;

use layer_telemetry::metrics::prometheus::{
    GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};
use layer_telemetry::metrics::{LATENCY_BUCKETS, encode, register};

use crate::Shared;

pub struct Metrics {
    registry: Registry,
    pub worker_acquisitions: IntCounterVec,
    pub worker_call_duration: HistogramVec,
    pub gateway_requests: IntCounterVec,
}

/// Counts one request a worker sent through the runner's gateway, by the
/// first two segments of its path (`/v2/udfs`, `/v2/namespaces`).
pub fn gateway_request(path: &str) {
    let area: String = path.split('/').filter(|s| !s.is_empty()).take(2).collect::<Vec<_>>().join("/");
    METRICS.gateway_requests.with_label_values(&[&format!("/{area}")]).inc();
}

/// This process's runner metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    Metrics {
        worker_acquisitions: register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "layer_runner_worker_acquisitions_total",
                    "Workers taken for a batch: start=warm (an idle worker) or cold (started for it).",
                ),
                &["udf", "start"],
            )
            .expect("valid counter"),
        ),
        worker_call_duration: register(
            &r,
            HistogramVec::new(
                HistogramOpts::new("layer_runner_worker_call_duration_seconds", "One POST /run to a worker.")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["udf"],
            )
            .expect("valid histogram"),
        ),
        gateway_requests: register(
            &r,
            IntCounterVec::new(
                Opts::new(
                    "layer_runner_gateway_requests_total",
                    "Requests container workers sent to the platform through the runner, by API area.",
                ),
                &["area"],
            )
            .expect("valid counter"),
        ),
        registry: r,
    }
});

/// The `/metrics` text.
pub fn render(shared: &Shared) -> String {
    let scrape = Registry::new();
    let gauge = |name: &str, help: &str, labels: &[&str]| {
        register(&scrape, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge"))
    };
    let workers = gauge("layer_runner_workers", "Warm workers by Function and state.", &["udf", "state"]);
    let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
    for w in shared.exec.pools.views().into_iter().chain(shared.pull.views()) {
        *counts.entry((w.udf_id, w.state)).or_default() += 1;
    }
    for ((udf, state), n) in counts {
        workers.with_label_values(&[&udf, &state]).set(n);
    }
    let held = register(
        &scrape,
        IntGauge::new("layer_runner_batches_in_flight", "Batches accepted and not yet reported.").expect("valid"),
    );
    held.set(shared.held_ids().len() as i64);
    let slots =
        register(&scrape, IntGauge::new("layer_runner_slots", "Batches this runner runs at once.").expect("valid"));
    slots.set(i64::from(shared.slots));
    let draining = register(
        &scrape,
        IntGauge::new("layer_runner_draining", "1 while the runner drains (takes no new batches).").expect("valid"),
    );
    draining.set(i64::from(shared.is_draining()));
    let gpu = |name: &str, help: &str| {
        register(&scrape, GaugeVec::new(Opts::new(name, help), &["gpu_uuid"]).expect("valid gauge"))
    };
    let util = gpu("layer_runner_gpu_utilization_ratio", "GPU utilisation over the driver's last sample, 0-1.");
    let used = gpu("layer_runner_gpu_memory_used_bytes", "GPU memory in use.");
    let total = gpu("layer_runner_gpu_memory_total_bytes", "GPU memory.");
    let cordoned = gpu("layer_runner_gpu_cordoned", "1 for a GPU cordoned after an error.");
    for g in shared.gpus.statuses() {
        if let Some(u) = g.utilization_percent {
            util.with_label_values(&[&g.uuid]).set(f64::from(u) / 100.0);
        }
        if let Some(m) = g.memory_used_bytes {
            used.with_label_values(&[&g.uuid]).set(m as f64);
        }
        total.with_label_values(&[&g.uuid]).set(g.memory_total_bytes as f64);
        cordoned.with_label_values(&[&g.uuid]).set(if g.state == "cordoned" { 1.0 } else { 0.0 });
    }
    let mut out = encode(&METRICS.registry);
    out.push_str(&encode(&scrape));
    out
}
