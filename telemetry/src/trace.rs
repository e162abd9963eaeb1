//! OpenTelemetry spans, W3C trace context and the OTLP/HTTP exporter.
//!
//! Spans are made with the OpenTelemetry API directly (no `tracing`
//! bridge): a batch's spans have exact start times, and the batch's trace
//! id is chosen before its lease so the batch record can carry it.

use std::cell::Cell;
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanId, Status, TraceContextExt, Tracer};
pub use opentelemetry::trace::{SpanKind, TraceId};
pub use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{Bytes, HeaderExtractor, HeaderInjector, HttpClient, HttpError, Request, Response};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator};

thread_local! {
    /// The trace id the next root span on this thread takes (see [`Span::root`]).
    static NEXT_TRACE_ID: Cell<Option<TraceId>> = const { Cell::new(None) };
}

/// Random ids, except for a root span whose trace id was chosen ahead.
#[derive(Debug, Default)]
pub(crate) struct Ids(RandomIdGenerator);

impl IdGenerator for Ids {
    fn new_trace_id(&self) -> TraceId {
        NEXT_TRACE_ID.with(Cell::take).unwrap_or_else(|| self.0.new_trace_id())
    }
    fn new_span_id(&self) -> SpanId {
        self.0.new_span_id()
    }
}

/// A fresh random trace id.
pub fn new_trace_id() -> TraceId {
    loop {
        let id = TraceId::from_bytes(rand::random::<[u8; 16]>());
        if id != TraceId::INVALID {
            return id;
        }
    }
}

fn tracer() -> opentelemetry::global::BoxedTracer {
    opentelemetry::global::tracer("layer")
}

/// A started span. It ends on [`Span::end`], or when the last copy of its
/// context is dropped.
#[derive(Debug, Clone)]
pub struct Span {
    cx: Context,
}

impl Span {
    /// A root span with the given trace id (a fresh one if `None`),
    /// started at `start` (now if `None`).
    pub fn root(
        name: &'static str,
        kind: SpanKind,
        trace_id: Option<TraceId>,
        start: Option<SystemTime>,
        attrs: Vec<KeyValue>,
    ) -> Span {
        NEXT_TRACE_ID.with(|n| n.set(trace_id));
        let span = Self::start(name, kind, &Context::new(), start, attrs);
        // A no-op tracer (no provider installed) takes no id.
        NEXT_TRACE_ID.with(|n| n.set(None));
        span
    }

    /// A span under `parent` (a remote context from [`extract`] or a span's).
    pub fn start(
        name: impl Into<std::borrow::Cow<'static, str>>,
        kind: SpanKind,
        parent: &Context,
        start: Option<SystemTime>,
        attrs: Vec<KeyValue>,
    ) -> Span {
        let tracer = tracer();
        let mut builder = tracer.span_builder(name.into()).with_kind(kind).with_attributes(attrs);
        if let Some(t) = start {
            builder = builder.with_start_time(t);
        }
        let span = tracer.build_with_context(builder, parent);
        Span { cx: parent.with_span(span) }
    }

    /// A child of this span, started now.
    pub fn child(&self, name: &'static str, kind: SpanKind, attrs: Vec<KeyValue>) -> Span {
        Self::start(name, kind, &self.cx, None, attrs)
    }

    /// A child of this span that started at `start`.
    pub fn child_from(&self, name: &'static str, kind: SpanKind, start: SystemTime, attrs: Vec<KeyValue>) -> Span {
        Self::start(name, kind, &self.cx, Some(start), attrs)
    }

    pub fn context(&self) -> &Context {
        &self.cx
    }

    pub fn set(&self, attrs: impl IntoIterator<Item = KeyValue>) {
        self.cx.span().set_attributes(attrs);
    }

    /// Marks the span failed with `message` (status and an `exception` event).
    pub fn error(&self, message: impl Into<String>) {
        let message = message.into();
        let span = self.cx.span();
        span.add_event("exception", vec![KeyValue::new("exception.message", message.clone())]);
        span.set_status(Status::error(message));
    }

    pub fn end(&self) {
        self.cx.span().end();
    }

    /// Awaits `work` inside this span: an error marks the span failed; the
    /// span ends either way.
    pub async fn run<T, E: std::fmt::Display>(&self, work: impl Future<Output = Result<T, E>>) -> Result<T, E> {
        let out = work.await;
        if let Err(e) = &out {
            self.error(e.to_string());
        }
        self.end();
        out
    }

    pub fn end_at(&self, at: SystemTime) {
        self.cx.span().end_with_timestamp(at);
    }

    /// The trace id in hex, or "" when no tracer is installed.
    pub fn trace_id(&self) -> String {
        span_trace_id(&self.cx)
    }

    /// Adds `traceparent` (and `tracestate`) for this span to `headers`.
    pub fn inject(&self, headers: &mut http::HeaderMap) {
        inject(&self.cx, headers);
    }
}

/// Adds `traceparent` (and `tracestate`) for the context's span.
pub fn inject(cx: &Context, headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(cx, &mut HeaderInjector(headers));
}

/// The remote parent a request's `traceparent` names (an empty context if
/// none or malformed).
pub fn extract(headers: &http::HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The hex trace id of the context's span, or "".
pub fn span_trace_id(cx: &Context) -> String {
    let span = cx.span();
    let sc = span.span_context();
    if sc.is_valid() { sc.trace_id().to_string() } else { String::new() }
}

/// OTLP/HTTP (protobuf) span exporter; `endpoint` `None` reads the
/// standard variables.
pub(crate) fn otlp_exporter(
    endpoint: Option<String>,
    timeout: Duration,
) -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
    let client = BlockingClient::new(timeout)?;
    let mut builder =
        opentelemetry_otlp::SpanExporter::builder().with_http().with_http_client(client).with_timeout(timeout);
    if let Some(url) = endpoint {
        builder = builder.with_endpoint(url);
    }
    builder.build().map_err(|e| format!("OTLP trace exporter: {e}"))
}

/// The exporter's HTTP client. The batch span processor exports from its
/// own thread without an async runtime, so the client is a blocking one
/// (an async client there would drop spans).
#[derive(Debug)]
struct BlockingClient(reqwest::blocking::Client);

impl BlockingClient {
    fn new(timeout: Duration) -> Result<Self, String> {
        // Built off any async runtime, as reqwest's blocking client wants.
        std::thread::spawn(move || reqwest::blocking::Client::builder().timeout(timeout).build())
            .join()
            .map_err(|_| "building the OTLP HTTP client panicked".to_string())?
            .map(BlockingClient)
            .map_err(|e| format!("building the OTLP HTTP client: {e}"))
    }
}

#[async_trait::async_trait]
impl HttpClient for BlockingClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let response =
            self.0.request(parts.method, parts.uri.to_string()).headers(parts.headers).body(body.to_vec()).send()?;
        let status = response.status();
        let headers = response.headers().clone();
        let mut out = Response::builder().status(status).body(response.bytes()?)?;
        *out.headers_mut() = headers;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_context_round_trips_through_headers() {
        let _guard = crate::init_traces("test", crate::TraceExport::Off).expect("provider");
        let id = new_trace_id();
        let root = Span::root("root", SpanKind::Internal, Some(id), None, vec![]);
        assert_eq!(root.trace_id(), id.to_string(), "the root span takes the chosen trace id");
        let child = root.child("child", SpanKind::Client, vec![]);
        let mut headers = http::HeaderMap::new();
        child.inject(&mut headers);
        let tp = headers.get("traceparent").and_then(|v| v.to_str().ok()).expect("traceparent").to_string();
        let span_id = child.context().span().span_context().span_id().to_string();
        assert_eq!(tp, format!("00-{id}-{span_id}-01"));
        let remote = extract(&headers);
        let server = Span::start("server", SpanKind::Server, &remote, None, vec![]);
        assert_eq!(server.trace_id(), id.to_string());
        // The next root span gets a fresh id again.
        let other = Span::root("other", SpanKind::Internal, None, None, vec![]);
        assert_ne!(other.trace_id(), id.to_string());
        assert!(!other.trace_id().is_empty());
        // A malformed header is no parent.
        let mut bad = http::HeaderMap::new();
        bad.insert("traceparent", http::HeaderValue::from_static("00-xyz-01"));
        assert!(span_trace_id(&extract(&bad)).is_empty());
    }
}
