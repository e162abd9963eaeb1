//! Telemetry shared by the platform and the runner.
//!
//! - Logs: `tracing` to stderr, text or JSON (`LAYER_LOG_FORMAT=json`),
//!   filtered by `LAYER_LOG`. Log lines written inside a batch carry the
//!   batch's `trace_id` as a span field.
//! - Traces ([`trace`]): OpenTelemetry spans with W3C trace context on
//!   every hop (platform → runner → worker → platform), exported over
//!   OTLP/HTTP (protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` or
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, sampled by the standard
//!   `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG`. Without an endpoint
//!   spans still get ids (batch records and workers see them) and nothing
//!   is sent.
//! - Metrics ([`metrics`]): Prometheus registries and the text format.

pub mod metrics;
pub mod trace;

use std::time::Duration;

use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

/// Where spans go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceExport {
    /// Nowhere: spans get ids and are dropped.
    Off,
    /// Where the standard `OTEL_EXPORTER_OTLP_*` variables say.
    FromEnv,
    /// To this OTLP/HTTP traces URL (`http://host:4318/v1/traces`).
    Endpoint(String),
}

impl TraceExport {
    /// [`TraceExport::FromEnv`] when an OTLP endpoint variable is set (and
    /// `OTEL_TRACES_EXPORTER` is not `none`), else [`TraceExport::Off`].
    pub fn from_env() -> TraceExport {
        let set = |v: &str| std::env::var(v).is_ok_and(|s| !s.trim().is_empty());
        let disabled = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none")
            || std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.trim() == "true");
        if !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")) {
            TraceExport::FromEnv
        } else {
            TraceExport::Off
        }
    }
}

/// Keeps the tracer provider; dropping it flushes the spans not yet sent.
#[must_use = "dropping the guard flushes and stops trace export"]
#[derive(Debug)]
pub struct TraceGuard {
    provider: SdkTracerProvider,
}

impl TraceGuard {
    /// Sends the spans ended so far.
    pub fn flush(&self) {
        let _ = self.provider.force_flush();
    }
}

impl Drop for TraceGuard {
    fn drop(&mut self) {
        let _ = self.provider.force_flush();
        let _ = self.provider.shutdown();
    }
}

/// Installs the process's tracer provider. `service_name` is the default
/// `service.name`; `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` win.
pub fn init_traces(service_name: &str, export: TraceExport) -> Result<TraceGuard, String> {
    // The default detectors read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES.
    let mut resource = Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").is_err() {
        resource = resource.with_service_name(service_name.to_string());
    }
    let mut builder =
        SdkTracerProvider::builder().with_resource(resource.build()).with_id_generator(trace::Ids::default());
    let endpoint = match &export {
        TraceExport::Off => None,
        TraceExport::FromEnv => Some(None),
        TraceExport::Endpoint(url) => Some(Some(url.clone())),
    };
    if let Some(endpoint) = endpoint {
        builder = builder.with_batch_exporter(trace::otlp_exporter(endpoint, export_timeout())?);
    }
    let provider = builder.build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(TraceGuard { provider })
}

/// `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` / `OTEL_EXPORTER_OTLP_TIMEOUT` in
/// milliseconds; 10 s by default.
fn export_timeout() -> Duration {
    ["OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis)
}

/// Logs to stderr: `LAYER_LOG` filters (default `info,sqlx=warn`),
/// `LAYER_LOG_FORMAT=json` writes one JSON object a line with the fields
/// of the spans it was written in (a batch's `trace_id` among them). Text
/// is coloured only on a terminal, and never with `NO_COLOR` set.
pub fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("LAYER_LOG").unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,tower_http=info"));
    let ansi = colour_allowed(std::io::IsTerminal::is_terminal(&std::io::stderr()), std::env::var_os("NO_COLOR"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match std::env::var("LAYER_LOG_FORMAT").as_deref() {
        Ok("json") => builder.json().with_current_span(true).with_span_list(false).init(),
        Ok("text") | Err(_) => builder.init(),
        Ok(other) => {
            builder.init();
            tracing::warn!(format = other, "LAYER_LOG_FORMAT must be `text` or `json`; writing text");
        }
    }
}

/// Whether to write ANSI colour: on a terminal, unless `NO_COLOR` is set to
/// anything but the empty string (<https://no-color.org>). The fmt layer's
/// default colours a file or a pipe too.
fn colour_allowed(terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::colour_allowed;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour_allowed(true, None));
        assert!(colour_allowed(true, Some("".into())));
        assert!(!colour_allowed(true, Some("1".into())));
        assert!(!colour_allowed(false, None));
        assert!(!colour_allowed(false, Some("1".into())));
    }
}
