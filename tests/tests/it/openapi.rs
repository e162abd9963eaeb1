//! The OpenAPI document and the router agree: every route the platform's
//! source declares is documented, and every documented operation is served.

use std::collections::BTreeSet;

use layer_tests::{TestPlatform, workspace_dir};
use reqwest::Method;
use serde_json::Value;

/// `{anything}` → `{}`, so parameter names may differ.
fn normalise(path: &str) -> String {
    let mut out = String::new();
    let mut in_param = false;
    for c in path.chars() {
        match c {
            '{' => {
                in_param = true;
                out.push('{');
            }
            '}' => {
                in_param = false;
                out.push('}');
            }
            _ if in_param => {}
            c => out.push(c),
        }
    }
    out
}

/// `(METHOD, path)` of every `.route("path", get(..).post(..))` in the source.
fn routes_in_source() -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    let mut stack = vec![workspace_dir().join("platform/src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let src = std::fs::read_to_string(&path).unwrap();
            // Generated routes: `#[utoipa::path(get, path = "/v2/keys", ...`.
            for (at, _) in src.match_indices("#[utoipa::path(") {
                let rest = &src[at + 15..];
                let method = rest.split(',').next().unwrap_or_default().trim().to_uppercase();
                let Some(p) = rest.find("path = \"") else { continue };
                let route = &rest[p + 8..];
                out.insert((method, normalise(&route[..route.find('"').unwrap()])));
            }
            for (at, _) in src.match_indices(".route(\"") {
                let rest = &src[at + 8..];
                let route_path = &rest[..rest.find('"').unwrap()];
                // The handler expression: up to the `)` closing `.route(`.
                let mut depth = 1;
                let mut end = 0;
                for (i, c) in rest.char_indices() {
                    match c {
                        '(' => depth += 1,
                        ')' => {
                            depth -= 1;
                            if depth == 0 {
                                end = i;
                                break;
                            }
                        }
                        _ => {}
                    }
                }
                let handlers = &rest[route_path.len()..end];
                for method in ["get", "post", "put", "delete", "patch"] {
                    let called = handlers.match_indices(&format!("{method}(")).any(|(i, _)| {
                        i == 0
                            || !handlers.as_bytes()[i - 1].is_ascii_alphanumeric() && handlers.as_bytes()[i - 1] != b'_'
                    });
                    if called {
                        out.insert((method.to_uppercase(), normalise(route_path)));
                    }
                }
            }
        }
    }
    out
}

fn routes_in_document() -> BTreeSet<(String, String)> {
    let doc: Value = serde_json::from_str(layer_platform::openapi::document()).unwrap();
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys().filter(|k| *k != "parameters") {
            out.insert((method.to_uppercase(), normalise(path)));
        }
    }
    out
}

#[test]
fn every_route_is_documented_and_every_documented_route_exists() {
    let source = routes_in_source();
    let document = routes_in_document();
    assert!(source.len() > 20, "the route scan found too little: {source:?}");
    let undocumented: Vec<_> = source.difference(&document).collect();
    let unserved: Vec<_> = document.difference(&source).collect();
    assert!(undocumented.is_empty(), "routes missing from the document: {undocumented:?}");
    assert!(unserved.is_empty(), "the document lists routes the router lacks: {unserved:?}");
}

#[tokio::test]
async fn documented_operations_are_served() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    for (method, path) in routes_in_document() {
        let concrete = path.replace("{}", "x");
        let m = Method::from_bytes(method.as_bytes())?;
        let (status, body) = p.call(m, &concrete, None).await?;
        assert_ne!(status, 405, "{method} {concrete}: {body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(!message.starts_with("no such endpoint"), "{method} {concrete}: {body}");
    }
    let (status, body) = p.call(Method::GET, "/openapi.json", None).await?;
    assert_eq!(status, 200);
    assert_eq!(body["openapi"], "3.1.0");
    Ok(())
}

/// Every operation that takes input documents an example of it (each path
/// parameter, each required query parameter, the request body), which the
/// fuzz suite sends and expects accepted: a new route without one fails
/// here.
#[test]
fn every_operation_that_takes_input_documents_an_example() {
    let doc: Value = serde_json::from_str(layer_platform::openapi::document()).unwrap();
    let mut missing = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for p in op["parameters"].as_array().into_iter().flatten() {
                let needed = p["in"] == "path" || p["required"] == true;
                if needed && p.get("example").is_none() {
                    missing.push(format!("{method} {path}: parameter {}", p["name"]));
                }
            }
            if let Some(body) = op.get("requestBody")
                && body["content"]["application/json"].get("example").is_none()
            {
                missing.push(format!("{method} {path}: request body"));
            }
        }
    }
    assert!(missing.is_empty(), "no documented example: {missing:#?}");
}

/// Every documented example validates against the schema it illustrates
/// (schemathesis takes one that does not for a negative case and expects
/// nothing of it). And the routes that take a runner token, which the fuzz
/// suite reaches only as far as their 401: a runner registered with the
/// documented example sends the documented examples of its own calls with
/// its real id and token, and each answer is a 200 that validates against
/// the document.
#[tokio::test]
async fn every_example_is_valid_and_the_runner_routes_answer_theirs_as_documented() -> anyhow::Result<()> {
    // The validator comes with schemathesis.
    layer_tests::schemathesis()?;
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", serde_json::json!([{"id": "a", "title": "Tent"}])).await?;
    p.apply_function(
        "tags",
        serde_json::json!({"targetNamespaces": ["items"], "inputs": ["title"], "worker": {"dispatch": "pull"}}),
    )
    .await?;
    layer_tests::run_python("examples.py", &p, &[]).await?;
    Ok(())
}
