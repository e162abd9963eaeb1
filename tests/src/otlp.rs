//! An OTLP/HTTP trace receiver for tests: it decodes what the platform,
//! the runner (protobuf) and the Python test worker (JSON) export.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::HeaderMap;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::Value;

/// One exported span, from either encoding.
#[derive(Debug, Clone)]
pub struct GotSpan {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_id: String,
    pub attrs: BTreeMap<String, String>,
    /// The span's status is an error.
    pub error: bool,
}

pub type Spans = Arc<Mutex<Vec<GotSpan>>>;

/// An OTLP/HTTP receiver on an ephemeral port: protobuf (the platform and
/// runner) and JSON (the Python worker) on `POST /v1/traces`.
pub async fn otlp_receiver() -> anyhow::Result<(String, Spans)> {
    let spans: Spans = Arc::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let sink = sink.clone();
            async move {
                let json = headers.get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").contains("json");
                let got = if json { decode_json(&body) } else { decode_proto(&body) };
                match got {
                    Ok(got) => {
                        sink.lock().unwrap().extend(got);
                        (axum::http::StatusCode::OK, Vec::new())
                    }
                    Err(e) => (axum::http::StatusCode::BAD_REQUEST, e.into_bytes()),
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok((url, spans))
}

fn decode_proto(body: &[u8]) -> Result<Vec<GotSpan>, String> {
    let req = ExportTraceServiceRequest::decode(body).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for rs in req.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
            .map(|v| match v {
                AnyValue::StringValue(s) => s.clone(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        for ss in rs.scope_spans {
            for s in ss.spans {
                let attrs = s
                    .attributes
                    .iter()
                    .map(|kv| {
                        let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                            Some(AnyValue::StringValue(s)) => s.clone(),
                            Some(AnyValue::IntValue(i)) => i.to_string(),
                            Some(AnyValue::BoolValue(b)) => b.to_string(),
                            Some(AnyValue::DoubleValue(d)) => d.to_string(),
                            other => format!("{other:?}"),
                        };
                        (kv.key.clone(), v)
                    })
                    .collect();
                out.push(GotSpan {
                    service: service.clone(),
                    name: s.name.clone(),
                    trace_id: hex::encode(&s.trace_id),
                    span_id: hex::encode(&s.span_id),
                    parent_id: hex::encode(&s.parent_span_id),
                    attrs,
                    error: s.status.as_ref().is_some_and(|st| st.code == 2),
                });
            }
        }
    }
    Ok(out)
}

fn decode_json(body: &[u8]) -> Result<Vec<GotSpan>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for rs in v["resourceSpans"].as_array().into_iter().flatten() {
        let service = rs["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .and_then(|a| a["value"]["stringValue"].as_str())
            .unwrap_or_default()
            .to_string();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                let text = |k: &str| s[k].as_str().unwrap_or_default().to_string();
                out.push(GotSpan {
                    service: service.clone(),
                    name: text("name"),
                    trace_id: text("traceId"),
                    span_id: text("spanId"),
                    parent_id: text("parentSpanId"),
                    attrs: BTreeMap::new(),
                    error: false,
                });
            }
        }
    }
    Ok(out)
}

/// The spans every push batch's trace has, whatever happens: the platform's
/// (`layer.queued` is left out: a batch leased as soon as its rows were
/// queued has none), the runner's, and the report request's.
pub const BATCH_SPANS: [&str; 9] = [
    "layer.batch",
    "layer.lease",
    "layer.dispatch",
    "layer.runner.batch",
    "layer.worker.acquire",
    "layer.worker.call",
    "layer.report",
    "POST /v2/runners/{id}/batches/{batch}/report",
    "layer.writeback",
];

/// Runs `promtool check metrics` on `text` where promtool is installed
/// (CI installs it); says so on stderr where it is not.
pub fn promtool_accepts(text: &str, what: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("promtool is not installed; the {what} metrics were only parsed");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    child.stdin.take().expect("piped").write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "promtool rejects the {what} metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
