//! Bad input at the edge: text PostgreSQL cannot store (a NUL) is refused
//! with a 400 naming where it is, in a body, a path or a query string; a
//! cursor the API did not give out is a 400; a report naming a row twice
//! is a 400; a 401 says how to authenticate; a reference to something gone
//! is a 409 naming it. Refused requests change nothing.

use layer_tests::TestPlatform;
use reqwest::Method;
use serde_json::{Value, json};

/// (rows, keys, Functions) in the database.
async fn counts(p: &TestPlatform) -> anyhow::Result<(i64, i64, i64)> {
    Ok(sqlx::query_as(
        "SELECT (SELECT count(*) FROM rows), (SELECT count(*) FROM api_keys), (SELECT count(*) FROM functions)",
    )
    .fetch_one(&p.pool)
    .await?)
}

/// Sends a raw path (kept as written, `%00` and all) and returns (status, body).
async fn raw(p: &TestPlatform, method: Method, path: &str, body: Option<Value>) -> anyhow::Result<(u16, Value)> {
    let mut r = p.request(method, path, Some(&p.admin_key));
    if let Some(b) = body {
        r = r.json(&b);
    }
    let resp = r.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nul_anywhere_in_a_request_is_a_400_naming_where_and_changes_nothing() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", json!([{"id": "a", "x": 1}])).await?;
    let before = counts(&p).await?;
    let function = |spec: Value| {
        json!({"documents": [{"apiVersion": "hevlayer.com/v1alpha1", "kind": "Function", "metadata": {"name": "f"},
                              "spec": spec}]})
    };
    let cases: Vec<(Method, &str, Option<Value>, &str)> = vec![
        (
            Method::POST,
            "/v2/namespaces/items",
            Some(json!({"upsert_rows": [{"id": "b\u{0}", "x": 1}]})),
            "upsert_rows[0].id",
        ),
        (
            Method::POST,
            "/v2/namespaces/items",
            Some(json!({"upsert_rows": [{"id": "b", "x": "v\u{0}"}]})),
            "upsert_rows[0].x",
        ),
        (
            Method::POST,
            "/v2/namespaces/items",
            Some(json!({"upsert_rows": [{"id": "b", "k\u{0}": 1}]})),
            "upsert_rows[0].k\\u0000",
        ),
        (Method::POST, "/v2/namespaces/items/query", Some(json!({"filters": ["x", "Eq", "\u{0}"]})), "filters[2]"),
        (Method::POST, "/v2/keys", Some(json!({"name": "k\u{0}"})), "name"),
        (
            Method::POST,
            "/v2/apply",
            Some(function(json!({"targetNamespaces": ["items"], "inputs": ["id"], "version": "v\u{0}",
                                 "worker": {"dispatch": "pull"}}))),
            "documents[0].spec.version",
        ),
        (Method::GET, "/v2/namespaces?cursor=%00%ff", None, "cursor"),
        (Method::GET, "/v2/namespaces?prefix=a%00", None, "prefix"),
        (Method::GET, "/v2/udfs/x%00y", None, "id"),
        (Method::POST, "/v2/namespaces/it%00ems/query", Some(json!({})), "namespace"),
        (Method::GET, "/v2/nowhere%00", None, "path"),
    ];
    for (method, path, body, field) in cases {
        let (s, r) = raw(&p, method.clone(), path, body.clone()).await?;
        anyhow::ensure!(s == 400, "{method} {path} {body:?}: {s} {r}");
        anyhow::ensure!(r["field"] == field, "{method} {path} {body:?}: field {} not {field}: {r}", r["field"]);
        let message = r["message"].as_str().unwrap_or_default();
        anyhow::ensure!(message.contains("NUL") && !message.contains("UTF8"), "{path}: {r}");
    }
    anyhow::ensure!(counts(&p).await? == before, "a refused request changed something");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cursors_are_the_apis_own_and_a_401_says_how_to_authenticate() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    for ns in ["c1", "c2", "c3"] {
        p.upsert_rows(ns, json!([{"id": "a"}])).await?;
    }
    // Paging with the cursors it gives out reaches every namespace once.
    let mut seen = Vec::new();
    let mut path = "/v2/namespaces?page_size=2&prefix=c".to_string();
    loop {
        let (s, r) = p.call(Method::GET, &path, None).await?;
        anyhow::ensure!(s == 200, "{path}: {r}");
        seen.extend(r["namespaces"].as_array().into_iter().flatten().map(|n| n["name"].clone()));
        match r["next_cursor"].as_str() {
            Some(c) => path = format!("/v2/namespaces?page_size=2&prefix=c&cursor={c}"),
            None => break,
        }
    }
    anyhow::ensure!(seen == vec![json!("c1"), json!("c2"), json!("c3")], "{seen:?}");
    // One it did not give out is refused, naming the parameter.
    for bad in ["zzzz", "c1", "n", "nzz"] {
        let (s, r) = p.call(Method::GET, &format!("/v2/namespaces?cursor={bad}"), None).await?;
        anyhow::ensure!(s == 400 && r["field"] == "cursor", "cursor={bad}: {s} {r}");
    }
    // A boolean parameter is true or false, nothing else.
    let (s, r) = p.call(Method::GET, "/v2/keys?includeRevoked=maybe", None).await?;
    anyhow::ensure!(s == 400 && r["field"] == "includeRevoked", "{s} {r}");
    let (s, r) = p.call(Method::GET, "/v2/keys?includeRevoked=true", None).await?;
    anyhow::ensure!(s == 200, "{s} {r}");
    // RFC 6750: a 401 says how to authenticate.
    for key in [None, Some("lyr_not_a_key_0123456789")] {
        let resp = p.request(Method::GET, "/v2/udfs", key).send().await?;
        anyhow::ensure!(resp.status() == 401, "{}", resp.status());
        let how = resp.headers().get("www-authenticate").and_then(|v| v.to_str().ok()).unwrap_or_default();
        anyhow::ensure!(how.starts_with("Bearer"), "WWW-Authenticate: {how:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_naming_a_row_twice_is_refused_and_a_nul_result_fails_its_row_alone() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", json!([{"id": "a"}, {"id": "b"}, {"id": "c"}])).await?;
    p.apply_function(
        "pulled",
        json!({"targetNamespaces": ["items"], "inputs": ["id"],
                                      "worker": {"dispatch": "pull", "batchSize": 3}}),
    )
    .await?;
    p.wait_for_pending("pulled", 3).await?;
    let (s, r) = p.call(Method::POST, "/v2/udfs/pulled/claim", Some(json!({"worker_id": "w", "limit": 3}))).await?;
    anyhow::ensure!(s == 200 && r["items"].as_array().map(Vec::len) == Some(3), "{r}");
    let item = |id: &str, attrs: Value| json!({"namespace": "items", "id": id, "attributes": attrs});
    let twice = json!({"worker_id": "w", "items": [item("a", json!({"t": 1})), item("a", json!({"t": 2}))]});
    let (s, r) = p.call(Method::POST, "/v2/udfs/pulled/items/complete", Some(twice)).await?;
    anyhow::ensure!(s == 400 && r["field"] == "items[1]", "{s} {r}");
    anyhow::ensure!(r["message"].as_str().unwrap_or_default().contains("items[0] named it first"), "{r}");
    // A NUL in one result: that row fails, permanently, saying where; the
    // others are written.
    let report = json!({"worker_id": "w", "items": [item("a", json!({"t": "ok"})), item("b", json!({"t": "x\u{0}"})),
                                                     item("c", json!({"t": "ok"}))]});
    let (s, r) = p.call(Method::POST, "/v2/udfs/pulled/items/complete", Some(report)).await?;
    anyhow::ensure!(s == 200 && r["updated"] == 2, "{s} {r}");
    let failed = p.failed_rows("pulled").await?;
    let (kind, message, _) = failed.get("b").ok_or_else(|| anyhow::anyhow!("b did not fail: {failed:?}"))?;
    anyhow::ensure!(kind == "permanent" && message.contains("attributes.t: strings may not hold NUL"), "{message}");
    anyhow::ensure!(failed.len() == 1, "{failed:?}");
    Ok(())
}

/// A reference to something deleted meanwhile is a 409 that names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_reference_is_a_409_naming_it() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let e = sqlx::query("INSERT INTO discovery_cursors (function_id, namespace) VALUES ('gone-fn', 'x')")
        .execute(&p.pool)
        .await
        .expect_err("no Function gone-fn exists");
    let e = layer_platform::error::PlatformError::from(e);
    anyhow::ensure!(e.status() == 409, "{e}");
    anyhow::ensure!(e.to_string().contains("(function_id)=(gone-fn) is not present in table functions"), "{e}");
    Ok(())
}

/// Every request body is a JSON object: an array is not read field by
/// field in order (serde's way with structs), and a field kept only for
/// compatibility must still have its documented type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_is_not_the_documented_object_is_a_400() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", json!([{"id": "a", "title": "Tent"}])).await?;
    let before = counts(&p).await?;
    let (status, body) = raw(&p, Method::POST, "/v2/namespaces/items/query", Some(json!([null, null]))).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap_or_default().contains("JSON array"), "{body}");
    let write = json!({"upsert_rows": [{"id": "b"}], "schema": "AAA"});
    let (status, body) = raw(&p, Method::POST, "/v2/namespaces/items", Some(write)).await?;
    assert_eq!((status, body["field"].as_str()), (400, Some("schema")), "{body}");
    let (status, body) = raw(&p, Method::POST, "/v2/namespaces/items", Some(json!([[{"id": "b"}]]))).await?;
    assert_eq!(status, 400, "{body}");
    assert_eq!(counts(&p).await?, before, "a refused body changed something");
    Ok(())
}
