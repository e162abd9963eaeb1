//! Prometheus metrics: registries are the components' own; this module
//! holds what they share.

pub use prometheus;
use prometheus::{Encoder, Registry, TextEncoder};

/// The `Content-Type` of [`encode`]'s output (text format 0.0.4).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets for latencies from a millisecond to ten minutes, in seconds.
pub const LATENCY_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 180.0, 600.0];

/// The registry's metrics in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut out) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Registers a collector built by `make`, panicking on a programming error
/// (a name registered twice, an invalid name).
pub fn register<C: prometheus::core::Collector + Clone + 'static>(registry: &Registry, c: C) -> C {
    registry.register(Box::new(c.clone())).expect("metric names are unique and valid");
    c
}
