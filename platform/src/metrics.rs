//! The platform's Prometheus metrics, served at `GET /metrics`.
//!
//! Counters and histograms live in one process-wide registry and count
//! what this replica did (Prometheus sums replicas). Gauges of shared state
//! (queue depth, batches in flight, runners) are read from PostgreSQL at
//! scrape time, so every replica reports the same values for them. Labels
//! are bounded: Function ids, runner states, error classes; never row ids.

use std::sync::LazyLock;

use layer_telemetry::metrics::prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};
use layer_telemetry::metrics::{LATENCY_BUCKETS, encode, register};
use sqlx::PgPool;

pub struct Metrics {
    registry: Registry,
    pub rows_completed: IntCounterVec,
    pub rows_failed: IntCounterVec,
    pub rows_retried: IntCounterVec,
    pub rows_dropped_stale: IntCounterVec,
    pub leases_expired: IntCounterVec,
    pub dispatch_errors: IntCounterVec,
    pub batches_dispatched: IntCounterVec,
    pub batch_duration: HistogramVec,
    pub batch_queue_wait: HistogramVec,
    pub sweep_duration: HistogramVec,
    pub calls: IntCounterVec,
    pub call_duration: HistogramVec,
    pub call_cold_starts: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter"))
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
    register(registry, HistogramVec::new(opts, labels).expect("valid histogram"))
}

/// This process's platform metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let r = Registry::new();
    let m = Metrics {
        rows_completed: counter(&r, "layer_rows_completed_total", "Results written with their markers.", &["udf"]),
        rows_failed: counter(&r, "layer_rows_failed_total", "Rows moved to failed (attempts spent).", &["udf"]),
        rows_retried: counter(&r, "layer_rows_retried_total", "Row failures put back in the queue.", &["udf"]),
        rows_dropped_stale: counter(
            &r,
            "layer_rows_dropped_stale_total",
            "Results dropped because the row changed since its claim or the lease was lost.",
            &["udf"],
        ),
        leases_expired: counter(&r, "layer_lease_expiries_total", "Leases that ran out without a report.", &["udf"]),
        dispatch_errors: counter(
            &r,
            "layer_dispatch_errors_total",
            "Batches a runner refused (refused) or could not be sent (unreachable).",
            &["class"],
        ),
        batches_dispatched: counter(&r, "layer_batches_dispatched_total", "Batches a runner accepted.", &["udf"]),
        batch_duration: histogram(
            &r,
            "layer_batch_duration_seconds",
            "From a batch's lease to its report being written back.",
            &["udf"],
        ),
        batch_queue_wait: histogram(
            &r,
            "layer_batch_queue_wait_seconds",
            "How long a batch's oldest row waited in the queue before its lease.",
            &["udf"],
        ),
        sweep_duration: histogram(
            &r,
            "layer_discovery_sweep_duration_seconds",
            "One discovery sweep of one Function.",
            &["udf"],
        ),
        calls: counter(&r, "layer_calls_total", "Calls answered, by how they ended.", &["udf", "status"]),
        call_duration: histogram(
            &r,
            "layer_call_duration_seconds",
            "From a call's arrival to its answer, on the platform.",
            &["udf"],
        ),
        call_cold_starts: counter(&r, "layer_call_cold_starts_total", "Calls that started a worker.", &["udf"]),
        registry: r,
    };
    // Both classes read 0 until the first error.
    for class in ["refused", "unreachable"] {
        m.dispatch_errors.with_label_values(&[class]);
    }
    m
});

#[derive(sqlx::FromRow)]
struct QueueRow {
    function_id: String,
    depth: i64,
    failed: i64,
    in_flight: i64,
}

/// The `/metrics` text: this process's counters and the shared gauges.
pub async fn render(pool: &PgPool, lost_after_seconds: f64) -> crate::Result<String> {
    let scrape = Registry::new();
    let gauge = |name: &str, help: &str, labels: &[&str]| {
        register(&scrape, IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge"))
    };
    let depth =
        gauge("layer_udf_queue_depth", "Rows waiting for a result: pending or leased (what KEDA scales on).", &["udf"]);
    let failed = gauge("layer_udf_failed_rows", "Rows that spent their attempts, awaiting a reset.", &["udf"]);
    let in_flight = gauge("layer_batches_in_flight", "Batches leased and not yet reported.", &["udf"]);
    let runners = gauge("layer_runners", "Registered runners by state.", &["state"]);
    // Functions without work report zeros, so a drained queue reads 0.
    let rows: Vec<QueueRow> = sqlx::query_as(
        "SELECT f.id AS function_id,
             coalesce(q.depth, 0) AS depth, coalesce(q.failed, 0) AS failed, coalesce(q.in_flight, 0) AS in_flight
         FROM functions f LEFT JOIN (
             SELECT function_id,
                 count(*) FILTER (WHERE state <> 'failed') AS depth,
                 count(*) FILTER (WHERE state = 'failed') AS failed,
                 count(DISTINCT batch_id) FILTER (WHERE state = 'leased') AS in_flight
             FROM work_items GROUP BY function_id
         ) q ON q.function_id = f.id",
    )
    .fetch_all(pool)
    .await?;
    for r in rows {
        depth.with_label_values(&[&r.function_id]).set(r.depth);
        failed.with_label_values(&[&r.function_id]).set(r.failed);
        in_flight.with_label_values(&[&r.function_id]).set(r.in_flight);
    }
    for state in ["active", "draining", "lost"] {
        runners.with_label_values(&[state]).set(0);
    }
    for r in crate::runners::store::list(pool, lost_after_seconds).await? {
        let state = serde_json::to_value(r.state()).ok().and_then(|v| v.as_str().map(String::from));
        runners.with_label_values(&[state.as_deref().unwrap_or("unknown")]).inc();
    }
    let mut out = encode(&METRICS.registry);
    out.push_str(&encode(&scrape));
    Ok(out)
}
