//! The HTTP server: shared state, the JSON extractor, authentication and
//! request-id middleware, and the router that puts the domains together.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use sqlx::PgPool;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use layer_protocol::error::ErrorBody;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, PlatformError, REQUEST_ID};

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub settings: Arc<Settings>,
    pub engine: crate::engine::Engine,
    /// Runners' signing keys, for checking report tokens without a lookup.
    pub runner_keys: crate::runners::KeyCache,
    /// The client calls are sent to runners with.
    pub http: reqwest::Client,
    /// What calls are placed by, shared across calls.
    pub calls: Arc<crate::calls::Catalog>,
    /// Writes the records of calls.
    pub recorder: crate::calls::store::Recorder,
    /// API keys checked within the last second.
    pub keys: Arc<crate::auth::store::KeyCache>,
}

/// Limits the HTTP layer enforces.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_body_bytes: usize,
    pub runners: crate::runners::RunnerSettings,
}

/// A JSON request body. Errors name the JSON path of the offending field
/// (`upsert_rows[3].id: invalid type ...`), a NUL in any string or name is a
/// 400 naming its path (PostgreSQL stores none), and an oversized body is a
/// 413.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = body_bytes(req, state).await?;
        refuse_nul_json(&bytes)?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// A worker's report of results, as [`ApiJson`] but letting NULs through:
/// a result that holds one fails its row alone (see
/// `engine::api::accept_result`), never the whole report.
pub struct ReportJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ReportJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        parse_json(&body_bytes(req, state).await?).map(ReportJson)
    }
}

/// The path of the first string or name holding a NUL in a JSON body, as
/// a 400.
fn refuse_nul_json(bytes: &[u8]) -> Result<(), ApiError> {
    // A NUL can only be written `\u0000` in JSON: most bodies hold none.
    if !bytes.windows(6).any(|w| w == b"\\u0000") {
        return Ok(());
    }
    // A body that is not JSON gets the typed parser's error instead.
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) else { return Ok(()) };
    match layer_protocol::validate::nul_byte_path(&v, "") {
        Some(path) => Err(ApiError(PlatformError::invalid(path, layer_protocol::validate::NUL_MESSAGE))),
        None => Ok(()),
    }
}

async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    let bytes = Bytes::from_request(req, state).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError(PlatformError::PayloadTooLarge(
                "request body is larger than the platform's limit (--max-body-bytes); split the write".into(),
            ))
        } else {
            ApiError(PlatformError::invalid("", e.body_text()))
        }
    })?;
    if bytes.is_empty() {
        return Err(ApiError(PlatformError::invalid("", "the request body is empty; expected a JSON object")));
    }
    Ok(bytes)
}

/// Parses a JSON object with the path of any error. Every request body
/// of the API is an object: an array is refused, not read field by field
/// in order (which serde would do for a struct).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        Some(b'[') => {
            return Err(ApiError(PlatformError::invalid(
                "",
                "the request body is a JSON array; expected a JSON object",
            )));
        }
        _ => {}
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        ApiError(PlatformError::invalid(path, e.inner().to_string()))
    })
}

/// Query-string parameters, parsed by hand so a bad one gets a clear error.
pub type Params = axum::extract::Query<HashMap<String, String>>;

/// Reads an optional boolean parameter: `true`/`1` or `false`/`0`;
/// anything else is a 400 naming it.
pub fn bool_param(params: &HashMap<String, String>, name: &str) -> Result<bool, ApiError> {
    match params.get(name).map(String::as_str) {
        None | Some("false" | "0") => Ok(false),
        Some("true" | "1") => Ok(true),
        Some(other) => Err(ApiError(PlatformError::invalid(name, format!("\"{other}\" is not true or false")))),
    }
}

/// Reads an optional RFC 3339 time parameter; a bad one is a 400 naming it.
pub fn time_param(
    params: &HashMap<String, String>,
    name: &str,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
    params
        .get(name)
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(s).map(|t| t.with_timezone(&chrono::Utc)).map_err(|e| {
                ApiError(PlatformError::invalid(
                    name,
                    format!("\"{s}\" is not an RFC 3339 time ({e}); e.g. 2026-01-31T12:00:00Z"),
                ))
            })
        })
        .transpose()
}

/// Pages read `limit + 1` rows: the extra one says there is a next page,
/// which starts after the last row kept; returns its cursor.
pub fn next_page<T>(rows: &mut Vec<T>, limit: i64, cursor: impl Fn(&T) -> String) -> Option<String> {
    if rows.len() as i64 <= limit {
        return None;
    }
    rows.truncate(limit as usize);
    rows.last().map(cursor)
}

/// Reads an optional integer parameter within bounds.
pub fn int_param(
    params: &HashMap<String, String>,
    name: &str,
    default: i64,
    min: i64,
    max: i64,
) -> Result<i64, ApiError> {
    match params.get(name) {
        None => Ok(default),
        Some(s) => match s.parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(n),
            _ => Err(ApiError(PlatformError::invalid(name, format!("\"{s}\" is not an integer in {min}..={max}")))),
        },
    }
}

/// As [`authenticate`], but a request with no `Authorization` header goes
/// on as [`crate::auth::Principal::anonymous`], for the handler to refuse
/// unless what it serves allows it (a Function's `calls.anonymous`).
async fn authenticate_or_anonymous(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    if req.headers().contains_key(header::AUTHORIZATION) {
        return authenticate(State(state), req, next).await;
    }
    req.extensions_mut().insert(crate::auth::Principal::anonymous());
    next.run(req).await
}

/// Resolves the bearer token to a [`crate::auth::Principal`] for the handlers.
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let token = match header.map(str::trim) {
        Some(h) if h.len() > 7 && h[..7].eq_ignore_ascii_case("bearer ") => h[7..].trim().to_string(),
        Some(_) => {
            return ApiError(PlatformError::Unauthorized("the Authorization header must be `Bearer <api key>`".into()))
                .into_response();
        }
        None => {
            return ApiError(PlatformError::Unauthorized(
                "missing API key: send `Authorization: Bearer <api key>`".into(),
            ))
            .into_response();
        }
    };
    match state.keys.authenticate(&state.pool, &token).await {
        Ok(principal) => {
            tracing::Span::current().record("key_id", principal.key_id.as_str());
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(e) => ApiError(e).into_response(),
    }
}

/// Makes the request id available to error bodies.
async fn request_context(req: Request, next: Next) -> Response {
    let id = req
        .extensions()
        .get::<RequestId>()
        .and_then(|r| r.header_value().to_str().ok())
        .unwrap_or_default()
        .to_string();
    REQUEST_ID.scope(id, next.run(req)).await
}

/// One server span per API request (`<method> <route>`), under the
/// caller's `traceparent` if it sent one; handlers' spans nest under it.
/// Never records headers (keys) or bodies.
async fn trace_request(req: Request, next: Next) -> Response {
    use layer_telemetry::trace::{KeyValue, Span, SpanKind};
    use opentelemetry::trace::FutureExt;
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string());
    // Probes, scrapes and runner heartbeats (every 2 s each) are not traced.
    if matches!(route.as_deref(), Some("/metrics" | "/healthz" | "/v2/runners/{id}/heartbeat")) {
        return next.run(req).await;
    }
    let parent = layer_telemetry::trace::extract(req.headers());
    let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let mut attrs = vec![
        KeyValue::new("http.request.method", req.method().to_string()),
        KeyValue::new("url.path", req.uri().path().to_string()),
        KeyValue::new("layer.request_id", request_id),
    ];
    if let Some(r) = &route {
        attrs.push(KeyValue::new("http.route", r.clone()));
    }
    let name = format!("{} {}", req.method(), route.as_deref().unwrap_or("(no route)"));
    let span = Span::start(name, SpanKind::Server, &parent, None, attrs);
    // Log lines of the request carry its trace (a runner's report: the batch's).
    tracing::Span::current().record("trace_id", span.trace_id().as_str());
    let response = next.run(req).with_context(span.context().clone()).await;
    let status = response.status();
    span.set([KeyValue::new("http.response.status_code", i64::from(status.as_u16()))]);
    if status.is_server_error() {
        span.error(format!("HTTP {status}"));
    }
    span.end();
    response
}

/// `/healthz` and `/metrics`, which need no key, with their document.
pub(crate) fn public_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(healthz)).routes(routes!(metrics))
}

/// `/openapi.json`, with its own description.
pub(crate) fn document_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(openapi))
}

#[utoipa::path(get, path = "/metrics", tag = "platform", operation_id = "metrics", security(()),
    summary = "Prometheus metrics (no key)",
    description = "The Prometheus text format (0.0.4): queue depth, rows completed, failed, retried and dropped, batches in flight, batch latency, dispatch errors, lease expiries, sweep duration, runners. See docs/observability.md.",
    responses((status = 200, description = "OK", body = String, content_type = "text/plain"),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn metrics(State(state): State<AppState>) -> Response {
    match crate::metrics::render(&state.pool, state.settings.runners.lost_after.as_secs_f64()).await {
        Ok(text) => ([(header::CONTENT_TYPE, layer_telemetry::metrics::CONTENT_TYPE)], text).into_response(),
        Err(e) => ApiError(e).into_response(),
    }
}

/// `GET /healthz`'s answer.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Health {
    /// `ok`.
    status: &'static str,
}

#[utoipa::path(get, path = "/healthz", tag = "platform", operation_id = "healthz", security(()),
    summary = "Liveness and database reachability (no key)",
    responses((status = 200, description = "The platform is up and its database answers", body = Health),
              (status = 503, description = "The database does not answer", body = ErrorBody)))]
async fn healthz(State(state): State<AppState>) -> Response {
    match sqlx::query("SELECT 1").execute(&state.pool).await {
        Ok(_) => axum::Json(Health { status: "ok" }).into_response(),
        Err(e) => ApiError(match PlatformError::from(e) {
            PlatformError::Database(e) => {
                tracing::warn!(error = %e, "the health check's query failed");
                PlatformError::Unavailable("database unreachable".into())
            }
            other => other,
        })
        .into_response(),
    }
}

#[utoipa::path(get, path = "/openapi.json", tag = "platform", operation_id = "openapi",
    summary = "This document", description = "Needs any valid key.",
    responses((status = 200, description = "OK", body = Object),
              (status = "default", description = "Error", body = ErrorBody)))]
async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], crate::openapi::document()).into_response()
}

async fn no_route() -> ApiError {
    ApiError(PlatformError::NotFound("no such endpoint; GET /openapi.json lists them".into()))
}

async fn wrong_method() -> Response {
    let body = layer_protocol::error::ErrorBody {
        error: "method_not_allowed".into(),
        code: "method_not_allowed".into(),
        message: "this endpoint does not accept that method; GET /openapi.json lists them".into(),
        field: None,
        errors: Vec::new(),
        request_id: REQUEST_ID.try_with(Clone::clone).ok(),
    };
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}

/// Refuses a NUL written into the path or the query string (`%00`) with a
/// 400 naming where (the query parameter, or `path`), before any handler
/// can hand it to PostgreSQL.
async fn refuse_nul_uri(req: Request, next: Next) -> Response {
    let nul = |s: &str| s.contains("%00");
    let path = req.uri().path();
    if nul(path) {
        // Named by the route's parameter where the segment is one
        // (`/v2/namespaces/{namespace}/query`: `namespace`).
        let template = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_default();
        let at = path.split('/').position(nul).unwrap_or_default();
        let field = template
            .split('/')
            .nth(at)
            .and_then(|t| t.strip_prefix('{').and_then(|t| t.strip_suffix('}')))
            // The rows routes' `{ns}` is a namespace, as their errors say.
            .map(|t| if t == "ns" { "namespace" } else { t })
            .unwrap_or("path")
            .to_string();
        return ApiError(PlatformError::invalid(field, layer_protocol::validate::NUL_MESSAGE)).into_response();
    }
    if let Some(query) = req.uri().query()
        && let Some(pair) = query.split('&').find(|p| nul(p))
    {
        let name = pair.split('=').next().unwrap_or_default();
        let name = if nul(name) { "query" } else { name };
        return ApiError(PlatformError::invalid(name, layer_protocol::validate::NUL_MESSAGE)).into_response();
    }
    next.run(req).await
}

/// The answer to a request whose handler panicked.
fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic without a message");
    ApiError(PlatformError::Internal(format!("a handler panicked: {what}"))).into_response()
}

/// The whole API.
pub fn router(state: AppState) -> Router {
    let (with_key, _) = crate::openapi::key_routes().split_for_parts();
    let authenticated = with_key.route_layer(from_fn_with_state(state.clone(), authenticate));
    let (open, _) = crate::openapi::open_routes().split_for_parts();
    let open = open.route_layer(from_fn_with_state(state.clone(), authenticate_or_anonymous));
    let max_body = state.settings.max_body_bytes;
    Router::new()
        .merge(crate::openapi::public_routes().split_for_parts().0)
        .merge(authenticated)
        .merge(open)
        // Runners authenticate these with the platform's tokens.
        .merge(crate::openapi::token_routes().split_for_parts().0)
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        // A handler that panics answers a logged 500 with its request id,
        // not a dropped connection (a bug all the same: the fuzz suite
        // fails on both).
        .layer(CatchPanicLayer::custom(panicked))
        .layer(from_fn(refuse_nul_uri))
        .layer(from_fn(trace_request))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(from_fn(request_context))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default();
                    // A span's level is fixed where it is written: one
                    // spelling, two levels.
                    macro_rules! request_span {
                        ($level:expr) => {
                            tracing::span!(
                                $level,
                                "request",
                                method = %req.method(),
                                path = %req.uri().path(),
                                request_id = %id,
                                key_id = tracing::field::Empty,
                                trace_id = tracing::field::Empty
                            )
                        };
                    }
                    // Runner heartbeats (every 2 s each) log at debug.
                    let path = req.uri().path();
                    if path.starts_with("/v2/runners/") && path.ends_with("/heartbeat") {
                        request_span!(tracing::Level::DEBUG)
                    } else {
                        request_span!(tracing::Level::INFO)
                    }
                })
                // One line per request, with status and latency, at the
                // level of its span; headers (and so keys) are never logged.
                .on_response(|res: &Response, latency: std::time::Duration, span: &tracing::Span| {
                    let status = res.status().as_u16();
                    let latency_ms = latency.as_secs_f64() * 1000.0;
                    if span.metadata().is_some_and(|m| *m.level() == tracing::Level::INFO) {
                        tracing::info!(status, latency_ms, "finished processing request");
                    } else {
                        tracing::debug!(status, latency_ms, "finished processing request");
                    }
                }),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::routing::get;
    use tower::ServiceExt as _;

    use super::*;

    #[tokio::test]
    async fn a_panicking_handler_answers_a_500_not_a_dropped_connection() {
        async fn boom() -> StatusCode {
            panic!("boom")
        }
        // Not a route of the API: the path is a variable, so the OpenAPI
        // test, which reads the routes with literal paths, passes it by.
        let path = "/boom";
        let app = Router::new().route(path, get(boom)).layer(CatchPanicLayer::custom(panicked));
        let res = app.oneshot(Request::builder().uri("/boom").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(res.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(res.into_body(), 1 << 16).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "internal", "{body}");
    }
}
