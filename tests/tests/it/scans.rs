//! Scan jobs (`/v2/namespaces/{ns}/scans`): every `TpufClient` method and
//! scan call through the public Python client, then the error cases, the
//! namespace read scope, the timeout, and pruning.

use layer_tests::{TestPlatform, run_python};
use reqwest::Method;
use serde_json::{Value, json};

const SCANS: &str = "/v2/namespaces/items/scans";

async fn items(p: &TestPlatform, n: usize) -> anyhow::Result<()> {
    let rows: Vec<Value> = (0..n).map(|i| json!({"id": format!("i{i:03}"), "k": i % 3})).collect();
    p.upsert_rows("items", json!(rows)).await
}

async fn create(p: &TestPlatform, body: Value) -> anyhow::Result<(u16, Value)> {
    p.call(Method::POST, SCANS, Some(body)).await
}

/// Asserts a 4xx with this field and a message containing `needle`.
fn assert_4xx(got: (u16, Value), status: u16, field: Option<&str>, needle: &str) {
    let (s, body) = got;
    assert_eq!(s, status, "{body}");
    assert_eq!(body["field"].as_str(), field, "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(needle), "{needle:?} not in {message:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_tpuf_client_method_and_scan_call_works_through_the_python_client() -> anyhow::Result<()> {
    let platform = TestPlatform::start().await?;
    let out = run_python("scans.py", &platform, &[]).await?;
    assert!(out.contains("scans: all checks passed"), "{out}");
    Ok(())
}

#[tokio::test]
async fn bad_scan_requests_are_clear_4xx_errors() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    items(&p, 5).await?;
    let unknown_op = create(&p, json!({"filters": ["And", [["k", "Eq", 1], ["k", "Near", 2]]]})).await?;
    assert_4xx(unknown_op, 400, Some("filters[1][1][1]"), "unknown filter operator \"Near\"");
    for bad in [json!(0), json!(10_001), json!(-1)] {
        assert_4xx(
            create(&p, json!({"page_size": bad})).await?,
            400,
            Some("page_size"),
            "out of range; allowed 1..=10000",
        );
    }
    assert_4xx(create(&p, json!({"page_size": "ten"})).await?, 400, Some("page_size"), "invalid type");
    assert_4xx(create(&p, json!({"page_size": 1.5})).await?, 400, Some("page_size"), "invalid type");
    assert_4xx(create(&p, json!({"timeout_seconds": 301})).await?, 400, Some("timeout_seconds"), "1..=300");
    assert_4xx(create(&p, json!({"mode": "rows"})).await?, 400, Some("mode"), "unknown variant `rows`");
    assert_4xx(create(&p, json!({"source": "s3"})).await?, 400, Some("source"), "unknown variant `s3`");
    assert_4xx(create(&p, json!({"filter": ["k", "Eq", 1]})).await?, 400, Some("filter"), "unknown field `filter`");
    assert_4xx(create(&p, json!({"mode": "values"})).await?, 400, Some("field"), "needs the attribute");
    assert_4xx(create(&p, json!({"field": "k"})).await?, 400, Some("field"), "only a values scan");
    assert_4xx(create(&p, json!({"ann": {"vector": [1.0], "radius": 1.0}})).await?, 400, None, "ann is not supported");
    // NUL bytes, which PostgreSQL cannot store, are named before any SQL.
    assert_4xx(create(&p, json!({"filters": ["k", "Eq", "a\u{0}b"]})).await?, 400, Some("filters[2]"), "NUL");
    assert_4xx(create(&p, json!({"filters": ["k\u{0}", "Eq", 1]})).await?, 400, Some("filters[0]"), "NUL");
    assert_4xx(create(&p, json!({"mode": "values", "field": "k\u{0}"})).await?, 400, Some("field"), "NUL");
    let resp = p.request(Method::POST, SCANS, Some(&p.admin_key)).body("{not json").send().await?;
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(resp.json::<Value>().await?["code"], "invalid_request");
    assert_4xx(
        p.call(Method::POST, "/v2/namespaces/nowhere/scans", Some(json!({}))).await?,
        404,
        None,
        "namespace nowhere not found",
    );
    assert_4xx(
        p.call(Method::GET, "/v2/namespaces/a%00b/scans", None).await?,
        400,
        Some("namespace"),
        "strings may not hold NUL",
    );

    // Unknown and malformed scan ids are 404s, never 500s.
    let (s, job) = create(&p, json!({"mode": "count"})).await?;
    assert_eq!((s, job["count"].as_i64()), (200, Some(5)), "{job}");
    let ghost = "scan_0123456789abcdef0123456789abcdef";
    for path in [format!("{SCANS}/{ghost}"), format!("{SCANS}/{ghost}/results"), format!("{SCANS}/nope")] {
        let (s, body) = p.call(Method::GET, &path, None).await?;
        assert_eq!(s, 404, "{path}: {body}");
        assert!(
            body["message"].as_str().unwrap_or_default().contains("not found in namespace items"),
            "{path}: {body}"
        );
    }
    // A NUL in a scan id is no scan id: a 400 naming it.
    for path in [format!("{SCANS}/scan_%00/results"), format!("{SCANS}/%00")] {
        assert_4xx(p.call(Method::GET, &path, None).await?, 400, Some("scan_id"), "strings may not hold NUL");
    }
    let (s, body) = p.call(Method::DELETE, &format!("{SCANS}/{ghost}"), None).await?;
    assert_eq!(s, 404, "{body}");

    // Bad paging parameters name themselves.
    let (_, ids) = create(&p, json!({"page_size": 2})).await?;
    let id = ids["id"].as_str().unwrap();
    for (query, field) in
        [("limit=0", "limit"), ("limit=10001", "limit"), ("limit=x", "limit"), ("offset=-1", "offset")]
    {
        let got = p.call(Method::GET, &format!("{SCANS}/{id}/results?{query}"), None).await?;
        assert_4xx(got, 400, Some(field), "is not an integer in");
    }
    let (s, page) = p.call(Method::GET, &format!("{SCANS}/{id}/results"), None).await?;
    assert_eq!((s, &page), (200, &json!({"ids": ["i000", "i001"], "total": 5, "next_offset": 2})), "{page}");
    let (_, page) = p.call(Method::GET, &format!("{SCANS}/{id}/results?offset=4&limit=10"), None).await?;
    assert_eq!(page, json!({"ids": ["i004"], "total": 5}));
    let (_, page) = p.call(Method::GET, &format!("{SCANS}/{id}/results?offset=99"), None).await?;
    assert_eq!(page, json!({"ids": [], "total": 5}));
    // A count scan has nothing to page.
    let got = p.call(Method::GET, &format!("{SCANS}/{}/results", job["id"].as_str().unwrap()), None).await?;
    assert_4xx(got, 400, Some("mode"), "is a count scan");

    // The NUL backstop: a write holding one is a 400, not a 500.
    let (s, body) = p
        .call(Method::POST, "/v2/namespaces/items", Some(json!({"upsert_rows": [{"id": "z", "a": "b\u{0}"}]})))
        .await?;
    assert_eq!(s, 400, "{body}");
    assert!(body["message"].as_str().unwrap_or_default().contains("NUL"), "{body}");
    let (s, body) =
        p.call(Method::POST, "/v2/namespaces/items/query", Some(json!({"filters": ["k", "Eq", "\u{0}"]}))).await?;
    assert_eq!((s, body["field"].as_str()), (400, Some("filters[2]")), "{body}");
    Ok(())
}

#[tokio::test]
async fn scans_need_read_on_their_namespace() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    items(&p, 3).await?;
    p.upsert_rows("secret", json!([{"id": "s"}])).await?;
    let reader = p.mint_key(json!({"r": {"scopes": ["read"], "namespaces": ["items"]}})).await?;
    let (s, job) = p.call_as(&reader, Method::POST, SCANS, Some(json!({}))).await?;
    assert_eq!((s, job["documents_scanned"].as_i64()), (200, Some(3)), "{job}");
    let id = job["id"].as_str().unwrap();
    let (s, page) = p.call_as(&reader, Method::GET, &format!("{SCANS}/{id}/results"), None).await?;
    assert_eq!((s, page["total"].as_i64()), (200, Some(3)), "{page}");
    // Another namespace is invisible to it, as every namespace route has it.
    for (m, path) in [
        (Method::POST, "/v2/namespaces/secret/scans".to_string()),
        (Method::GET, "/v2/namespaces/secret/scans".to_string()),
        (Method::GET, format!("/v2/namespaces/secret/scans/{id}")),
        (Method::DELETE, format!("/v2/namespaces/secret/scans/{id}")),
        (Method::GET, format!("/v2/namespaces/secret/scans/{id}/results")),
    ] {
        let body = (m == Method::POST).then(|| json!({}));
        let (s, r) = p.call_as(&reader, m.clone(), &path, body).await?;
        assert_eq!(s, 404, "{m} {path}: {r}");
    }
    // A scan belongs to its namespace: the same id under another one is no scan.
    let (s, r) = p.call(Method::GET, &format!("/v2/namespaces/secret/scans/{id}"), None).await?;
    assert_eq!(s, 404, "{r}");
    let (s, _) = p.call_as("lyr_wrong", Method::GET, SCANS, None).await?;
    assert_eq!(s, 401);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_past_its_timeout_is_recorded_failed_with_no_results() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    items(&p, 3).await?;
    // Hold the rows table so the scan must wait: its one-second
    // statement_timeout passes while it waits (no sleeping on our side).
    let mut lock = p.pool.begin().await?;
    sqlx::query("LOCK TABLE rows IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await?;
    let (s, job) = create(&p, json!({"timeout_seconds": 1})).await?;
    lock.rollback().await?;
    assert_eq!(s, 200, "{job}");
    assert_eq!(job["status"], "failed", "{job}");
    assert!(job["error"].as_str().unwrap_or_default().contains("timeout_seconds (1 s)"), "{job}");
    assert!(job["elapsed_ms"].as_i64() >= Some(1000), "{job}");
    let id = job["id"].as_str().unwrap();
    let (s, got) = p.call(Method::GET, &format!("{SCANS}/{id}"), None).await?;
    assert_eq!((s, &got), (200, &job), "the failed job is kept as answered");
    let got = p.call(Method::GET, &format!("{SCANS}/{id}/results"), None).await?;
    assert_4xx(got, 409, None, "failed and has no results");
    let held: i64 =
        sqlx::query_scalar("SELECT count(*) FROM scan_results WHERE scan_id = $1").bind(id).fetch_one(&p.pool).await?;
    assert_eq!(held, 0);
    // With the table free the same scan completes.
    let (_, job) = create(&p, json!({"timeout_seconds": 1})).await?;
    assert_eq!((job["status"].as_str(), job["documents_scanned"].as_i64()), (Some("completed"), Some(3)), "{job}");
    Ok(())
}

async fn scans_held(p: &TestPlatform) -> anyhow::Result<Vec<String>> {
    Ok(sqlx::query_scalar("SELECT id FROM scans ORDER BY created_at, id").fetch_all(&p.pool).await?)
}

#[tokio::test]
async fn old_scans_expire_are_pruned_and_a_namespace_keeps_at_most_a_hundred() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    items(&p, 2).await?;
    let (_, old) = create(&p, json!({})).await?;
    let old = old["id"].as_str().unwrap().to_string();
    // Two hours ago: past the hour a scan is kept.
    sqlx::query("UPDATE scans SET created_at = now() - interval '2 hours' WHERE id = $1")
        .bind(&old)
        .execute(&p.pool)
        .await?;
    let (s, _) = p.call(Method::GET, &format!("{SCANS}/{old}"), None).await?;
    assert_eq!(s, 404, "an expired scan is gone at once");
    let (_, list) = p.call(Method::GET, SCANS, None).await?;
    assert_eq!(list, json!({"scans": []}));
    // The next create deletes it, with its results.
    let (_, first) = create(&p, json!({})).await?;
    let first = first["id"].as_str().unwrap().to_string();
    assert_eq!(scans_held(&p).await?, std::slice::from_ref(&first));
    let results: i64 = sqlx::query_scalar("SELECT count(*) FROM scan_results WHERE scan_id = $1")
        .bind(&old)
        .fetch_one(&p.pool)
        .await?;
    assert_eq!(results, 0);

    // A hundred more: the oldest goes, a hundred stay, newest first.
    let mut made = vec![first.clone()];
    for _ in 0..100 {
        let (s, j) = create(&p, json!({})).await?;
        assert_eq!(s, 200, "{j}");
        made.push(j["id"].as_str().unwrap().to_string());
    }
    let held = scans_held(&p).await?;
    assert_eq!(held.len(), 100);
    assert!(!held.contains(&first), "the oldest was pruned");
    let (_, list) = p.call(Method::GET, SCANS, None).await?;
    let listed: Vec<&str> = list["scans"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap()).collect();
    let newest_first: Vec<&str> = made[1..].iter().rev().map(String::as_str).collect();
    assert_eq!(listed, newest_first);

    // Deleting the namespace deletes its scans.
    p.call(Method::DELETE, "/v2/namespaces/items", None).await?;
    assert_eq!(scans_held(&p).await?, Vec::<String>::new());
    Ok(())
}
