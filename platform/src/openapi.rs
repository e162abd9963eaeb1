//! The OpenAPI document of the whole API, served at `GET /openapi.json`.
//!
//! Being generated from the handlers (`#[utoipa::path]`) and the wire types
//! (`utoipa::ToSchema`), one domain at a time: the keys, batch-record
//! row (scans included) and
//! pull-protocol routes are; the rest is still read from `openapi.json`, kept by hand, into which the
//! generated paths and schemas are merged. A test checks that every route
//! the router serves is in the document and every documented one served,
//! and the fuzz suite checks the answers against it.

use std::sync::LazyLock;

use serde_json::Value;

/// The hand-kept part, shrinking as domains are generated.
const HAND_KEPT: &str = include_str!("openapi.json");

/// The routes of the domains whose document is generated, with that
/// document: the router serves them and [`document`] describes them, from
/// this one list.
pub(crate) fn generated_routes() -> utoipa_axum::router::OpenApiRouter<crate::http::AppState> {
    crate::auth::api::routes()
        .merge(crate::rows::api::routes())
        .merge(crate::engine::api::routes())
        .merge(crate::runners::records::routes())
}

/// The generated part of the document.
fn generated() -> utoipa::openapi::OpenApi {
    generated_routes().split_for_parts().1
}

/// OpenAPI 3.1, JSON: the hand-kept document with the generated paths and
/// schemas merged in (a generated one replaces a hand-kept one of the same
/// name).
pub fn document() -> &'static str {
    static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
        let mut doc: Value = serde_json::from_str(HAND_KEPT).expect("openapi.json is JSON");
        let generated = serde_json::to_value(generated()).expect("the generated document serialises");
        if let (Some(paths), Some(new)) = (doc["paths"].as_object_mut(), generated["paths"].as_object()) {
            paths.extend(new.clone());
        }
        if let (Some(schemas), Some(new)) =
            (doc["components"]["schemas"].as_object_mut(), generated["components"]["schemas"].as_object())
        {
            schemas.extend(new.clone());
        }
        serde_json::to_string(&doc).expect("the document serialises")
    });
    &DOCUMENT
}
