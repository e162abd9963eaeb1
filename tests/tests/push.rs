//! Push dispatch end to end: the platform leases batches and sends them to
//! a runner, which runs them on warm worker processes and reports back.

use std::time::{Duration, Instant};

use layer_tests::{TestPlatform, TestRunner, repo_root};
use reqwest::Method;
use serde_json::{Value, json};

async fn apply(p: &TestPlatform, name: &str, spec: Value) -> anyhow::Result<()> {
    let doc =
        json!({"apiVersion": "hevlayer.com/v1alpha1", "kind": "Function", "metadata": {"name": name}, "spec": spec});
    let (s, r) = p.call(Method::POST, "/v2/apply", Some(json!({"documents": [doc]}))).await?;
    anyhow::ensure!(s == 200, "apply: {r}");
    Ok(())
}

async fn upsert(p: &TestPlatform, ns: &str, rows: Value) -> anyhow::Result<()> {
    let (s, r) = p.call(Method::POST, &format!("/v2/namespaces/{ns}"), Some(json!({"upsert_rows": rows}))).await?;
    anyhow::ensure!(s == 200, "upsert: {r}");
    Ok(())
}

/// Waits until the Function has nothing pending or processing.
async fn drained(p: &TestPlatform, f: &str, within: Duration) -> anyhow::Result<Value> {
    let start = Instant::now();
    loop {
        let (_, st) = p.call(Method::GET, &format!("/v2/udfs/{f}/status"), None).await?;
        let idle = st["pending_count"] == 0 && st["processing_count"] == 0;
        let touched = st["counts"]["completed"].as_i64() > Some(0) || st["failed_count"].as_i64() > Some(0);
        if idle && touched {
            return Ok(st);
        }
        anyhow::ensure!(start.elapsed() < within, "not drained after {within:?}: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn products() -> anyhow::Result<Value> {
    let text = std::fs::read_to_string(repo_root().join("examples/tag-products/products.jsonl"))?;
    Ok(Value::Array(text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_push_example_tags_every_product() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let runner = TestRunner::start(&p, |_| {}).await?;
    let rows = products()?;
    upsert(&p, "products", rows.clone()).await?;
    let doc = std::fs::read_to_string(repo_root().join("examples/tag-products/function.yaml"))?;
    let mut doc: Value = serde_json::to_value(layer_protocol::resource::parse_documents(&doc)?.remove(0))?;
    let script = repo_root().join("examples/tag-products/worker.py");
    doc["spec"]["worker"]["command"] = json!(["python3", script]);
    apply(&p, "product-tags-push", doc["spec"].clone()).await?;
    let st = drained(&p, "product-tags-push", Duration::from_secs(60)).await?;
    assert_eq!(st["counts"]["completed"], rows.as_array().unwrap().len(), "{st}");
    let (_, d) = p.call(Method::GET, "/v2/namespaces/products/documents/p002", None).await?;
    assert_eq!(d["attributes"]["tags"], json!(["wireless", "waterproof"]), "{d}");
    assert_eq!(d["attributes"]["_hevlayer_udf_product_tags_push_v"], "v1");
    let (_, list) = p.call(Method::GET, "/v2/runners", None).await?;
    assert_eq!(list["runners"][0]["id"], runner.id, "{list}");
    assert_eq!(list["runners"][0]["state"], "active");
    let batches: i64 =
        sqlx::query_scalar("SELECT count(*) FROM batches WHERE state = 'reported'").fetch_one(&p.pool).await?;
    assert!(batches >= 3, "24 rows at batch 8: {batches} batches");
    runner.stop().await?;
    let (_, list) = p.call(Method::GET, "/v2/runners", None).await?;
    assert_eq!(list["runners"], json!([]), "a drained runner deregisters: {list}");
    Ok(())
}
