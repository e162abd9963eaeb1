//! The OpenAPI 3.1 document of the whole API, served at `GET /openapi.json`,
//! generated from the handlers (`#[utoipa::path]`) and the wire types
//! (`utoipa::ToSchema`, the `hevlayer` client's model names kept with
//! `schema(as = ...)`). The router serves the routes listed here and the
//! document describes the same lists, so the two cannot drift; a test
//! checks it all the same, and the fuzz suite checks the answers against
//! the document.

use std::sync::LazyLock;

use utoipa::OpenApi as _;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa_axum::router::OpenApiRouter;

use crate::http::AppState;

/// What the document says outside the operations: title, server, the two
/// security schemes and the default one (an API key).
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Layer platform API",
        description = "The /v2 gateway API the hevlayer client speaks, plus Layer's own resources. Every endpoint but /healthz and /metrics needs `Authorization: Bearer <api key>`; the runners' own calls take the platform's runner tokens instead. Errors are `{error, code, message, field?, errors?, request_id}` with a stable `code`."
    ),
    servers((url = "http://127.0.0.1:8080", description = "`layer dev`")),
    security(("bearer" = [])),
    modifiers(&SecuritySchemes),
    tags(
        (name = "rows", description = "Namespaces and their rows (the hevlayer client's API)"),
        (name = "functions", description = "Functions, their revisions, status, batches and failed rows"),
        (name = "scans", description = "Scans of a namespace: ids or value counts, kept as jobs"),
        (name = "pull", description = "The pull protocol of hevlayer workers"),
        (name = "batches", description = "Batch records and failed rows: what happened to the work"),
        (name = "resources", description = "Resource documents: Function, Index, InfraRules"),
        (name = "calls", description = "Functions called over HTTP, and the records of their calls"),
        (name = "keys", description = "API keys"),
        (name = "runners", description = "Runners: registration, and their own calls with runner tokens"),
        (name = "platform", description = "Health, metrics, this document"),
    )
)]
struct Base;

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)));
        let mut runner = Http::new(HttpAuthScheme::Bearer);
        runner.bearer_format = Some("JWT".into());
        runner.description = Some("An HS256 token the platform issued to the runner (session or report)".into());
        components.add_security_scheme("runnerToken", SecurityScheme::Http(runner));
    }
}

/// The routes that take an API key, each domain's with its part of the
/// document: the router serves them and [`document`] describes them.
pub(crate) fn key_routes() -> OpenApiRouter<AppState> {
    crate::auth::api::routes()
        .merge(crate::rows::api::routes())
        .merge(crate::engine::api::routes())
        .merge(crate::runners::records::routes())
        .merge(crate::runners::api::routes())
        .merge(crate::functions::api::routes())
        .merge(crate::resources::api::routes())
        .merge(crate::calls::api::routes())
        .merge(crate::http::document_routes())
}

/// The routes that take an API key or, where what they serve allows it,
/// none: calling a Function.
pub(crate) fn open_routes() -> OpenApiRouter<AppState> {
    crate::calls::api::call_routes()
}

/// The routes runners call with the platform's tokens instead of an API
/// key.
pub(crate) fn token_routes() -> OpenApiRouter<AppState> {
    crate::runners::api::token_routes()
}

/// The routes that need no key: health and metrics.
pub(crate) fn public_routes() -> OpenApiRouter<AppState> {
    crate::http::public_routes()
}

/// The document, as JSON.
pub fn document() -> &'static str {
    static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
        let routes = OpenApiRouter::with_openapi(Base::openapi())
            .merge(key_routes())
            .merge(token_routes())
            .merge(open_routes())
            .merge(public_routes());
        routes.split_for_parts().1.to_json().expect("the document serialises")
    });
    &DOCUMENT
}
