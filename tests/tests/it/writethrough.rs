//! Write-through completion: a pull worker that writes its results itself
//! (with the key it claimed with) while it holds the lease, then completes
//! with no attributes, completes; a write by another key during the lease
//! still makes the result stale, and the row runs again.

use layer_tests::TestPlatform;
use reqwest::Method;
use serde_json::{Value, json};

async fn claim(p: &TestPlatform, key: &str, worker: &str) -> anyhow::Result<Vec<String>> {
    let (s, r) =
        p.call_as(key, Method::POST, "/v2/udfs/wt/claim", Some(json!({"worker_id": worker, "limit": 10}))).await?;
    anyhow::ensure!(s == 200, "claim: {r}");
    let mut ids: Vec<String> =
        r["items"].as_array().into_iter().flatten().filter_map(|i| i["id"].as_str().map(str::to_string)).collect();
    ids.sort();
    Ok(ids)
}

async fn patch(p: &TestPlatform, key: &str, id: &str, tags: Value) -> anyhow::Result<()> {
    let body = json!({"patch_rows": [{"id": id, "tags": tags}]});
    let (s, r) = p.call_as(key, Method::POST, "/v2/namespaces/wt", Some(body)).await?;
    anyhow::ensure!(s == 200, "patch {id}: {r}");
    Ok(())
}

/// Completes the ids with no attributes; returns how many were written.
async fn complete(p: &TestPlatform, key: &str, worker: &str, ids: &[&str]) -> anyhow::Result<u64> {
    let items: Vec<Value> = ids.iter().map(|id| json!({"namespace": "wt", "id": id})).collect();
    let (s, r) = p
        .call_as(key, Method::POST, "/v2/udfs/wt/items/complete", Some(json!({"worker_id": worker, "items": items})))
        .await?;
    anyhow::ensure!(s == 200, "complete: {r}");
    Ok(r["updated"].as_u64().unwrap_or_default())
}

async fn row(p: &TestPlatform, id: &str) -> anyhow::Result<Value> {
    let (_, d) = p.call(Method::GET, &format!("/v2/namespaces/wt/documents/{id}"), None).await?;
    Ok(d["attributes"].clone())
}

#[tokio::test]
async fn the_worker_s_own_write_keeps_its_lease_and_anyone_else_s_makes_it_stale() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let worker_key = p.mint_key(json!({"w": {"scopes": ["write"]}})).await?;
    let other_key = p.mint_key(json!({"o": {"scopes": ["write"]}})).await?;
    p.upsert_rows("wt", json!([{"id": "a", "title": "A"}, {"id": "b", "title": "B"}, {"id": "c", "title": "C"}]))
        .await?;
    p.apply_function(
        "wt",
        json!({"targetNamespaces": ["wt"], "inputs": ["id", "title"], "triggers": ["discovery"],
               "worker": {"dispatch": "pull", "batchSize": 10}}),
    )
    .await?;
    p.wait_for_pending("wt", 3).await?;
    assert_eq!(claim(&p, &worker_key, "w1").await?, ["a", "b", "c"]);

    // a: the worker writes it itself. b: someone else writes it meanwhile,
    // after the worker's own write. c: the worker writes nothing.
    patch(&p, &worker_key, "a", json!(["mine"])).await?;
    patch(&p, &worker_key, "b", json!(["mine"])).await?;
    patch(&p, &other_key, "b", json!(["theirs"])).await?;
    assert_eq!(complete(&p, &worker_key, "w1", &["a", "b", "c"]).await?, 2);

    let a = row(&p, "a").await?;
    assert_eq!((&a["tags"], &a["_hevlayer_udf_wt_v"]), (&json!(["mine"]), &json!("v1")), "{a}");
    let b = row(&p, "b").await?;
    assert_eq!(b["tags"], json!(["theirs"]), "the other write stands: {b}");
    assert!(b.get("_hevlayer_udf_wt_v").is_none(), "a stale result stamps no marker: {b}");
    assert_eq!(row(&p, "c").await?["_hevlayer_udf_wt_v"], "v1");
    let (_, st) = p.call(Method::GET, "/v2/udfs/wt/status", None).await?;
    assert_eq!(st["counts"]["completed"], 2, "{st}");
    assert_eq!(st["counts"]["dropped"], 1, "{st}");

    // b runs again, on its new content; this time the worker's write is
    // the only one.
    assert_eq!(claim(&p, &worker_key, "w2").await?, ["b"]);
    patch(&p, &worker_key, "b", json!(["theirs", "mine"])).await?;
    assert_eq!(complete(&p, &worker_key, "w2", &["b"]).await?, 1);
    let b = row(&p, "b").await?;
    assert_eq!((&b["tags"], &b["_hevlayer_udf_wt_v"]), (&json!(["theirs", "mine"]), &json!("v1")), "{b}");

    // A write by another key holding no lease, before the worker's own,
    // also makes the result stale.
    p.upsert_rows("wt", json!([{"id": "d", "title": "D"}])).await?;
    p.call(Method::POST, "/v2/udfs/wt/discover", None).await?;
    p.wait_for_pending("wt", 1).await?;
    assert_eq!(claim(&p, &worker_key, "w3").await?, ["d"]);
    patch(&p, &other_key, "d", json!(["theirs"])).await?;
    patch(&p, &worker_key, "d", json!(["mine"])).await?;
    assert_eq!(complete(&p, &worker_key, "w3", &["d"]).await?, 0);
    assert!(row(&p, "d").await?.get("_hevlayer_udf_wt_v").is_none());
    Ok(())
}
