//! A minimal push worker: `GET /healthz`; `POST /run`, which answers each
//! item (a row, or a call of the Function) with `{"attributes": {"echo":
//! <its input>}}`; and `POST /invoke`, which answers a call of a Function
//! with `worker.protocol: invoke` with the caller's body and content type
//! as they came. It listens on `127.0.0.1:$PORT`, as the runner's process
//! driver expects (`BIND` overrides the address, for containers).

use axum::Json;
use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// The caller's bytes back, with their content type.
async fn invoke(headers: HeaderMap, body: Bytes) -> ([(header::HeaderName, HeaderValue); 1], Bytes) {
    let content_type =
        headers.get(header::CONTENT_TYPE).cloned().unwrap_or(HeaderValue::from_static("application/octet-stream"));
    ([(header::CONTENT_TYPE, content_type)], body)
}

async fn run(Json(batch): Json<Value>) -> Json<Value> {
    let results: Vec<Value> = batch["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| json!({"namespace": i["namespace"], "id": i["id"], "attributes": {"echo": i["input"]}}))
                .collect()
        })
        .unwrap_or_default();
    Json(json!({ "results": results }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let port = std::env::var("PORT").unwrap_or_else(|_| "8080".into());
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1".into());
    let app = axum::Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/run", post(run))
        .route("/invoke", post(invoke))
        .layer(axum::extract::DefaultBodyLimit::max(256 << 20));
    let listener = tokio::net::TcpListener::bind(format!("{bind}:{port}")).await?;
    axum::serve(listener, app).await
}
