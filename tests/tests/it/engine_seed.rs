//! Seed 000's Python classifier, verbatim, with the public `hevlayer`
//! client from PyPI, tags 10,000 rows through the pull protocol.

use std::time::{Duration, Instant};

use layer_protocol::resource::parse_documents;
use layer_tests::{TestPlatform, python_with_hevlayer, workspace_dir};
use reqwest::Method;
use serde_json::{Value, json};

const TITLES: [&str; 4] = ["Wireless mouse", "Waterproof jacket", "Wireless waterproof speaker", "Desk lamp"];

fn expected_tags(title: &str, description: Option<&str>) -> Vec<&'static str> {
    let text = format!("{title} {}", description.unwrap_or("")).to_lowercase();
    let mut tags = Vec::new();
    if text.contains("wireless") {
        tags.push("wireless");
    }
    if text.contains("waterproof") {
        tags.push("waterproof");
    }
    if tags.is_empty() {
        tags.push("uncategorized");
    }
    tags
}

fn row(i: usize) -> (Value, Vec<&'static str>) {
    let title = format!("{} {i}", TITLES[i % 4]);
    let description = match i % 5 {
        0 => Some("now wireless"),
        1 => Some("fully WATERPROOF"),
        2 => None,
        _ => Some("plain"),
    };
    let mut v = json!({"id": format!("p{i:05}"), "title": title, "category": "outdoor"});
    if let Some(d) = description {
        v["description"] = json!(d);
    }
    let tags = expected_tags(&title, description);
    (v, tags)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_worker_tags_ten_thousand_rows() -> anyhow::Result<()> {
    const N: usize = 10_000;
    let p = TestPlatform::start().await?;
    let rows: Vec<(Value, Vec<&str>)> = (0..N).map(row).collect();
    for chunk in rows.chunks(2_500) {
        let docs: Vec<&Value> = chunk.iter().map(|(v, _)| v).collect();
        let (s, r) = p.call(Method::POST, "/v2/namespaces/products", Some(json!({"upsert_rows": docs}))).await?;
        assert_eq!(s, 200, "{r}");
    }
    let text = std::fs::read_to_string(workspace_dir().join("examples/tag-products-pull/function.yaml"))?;
    let (s, r) = p.call(Method::POST, "/v2/apply", Some(json!({"documents": parse_documents(&text)?}))).await?;
    assert_eq!(s, 200, "{r}");

    let worker = workspace_dir().join("examples/tag-products-pull/worker.py");
    let mut child = tokio::process::Command::new(python_with_hevlayer()?)
        .arg(&worker)
        .env("HEVLAYER_BASE_URL", &p.url)
        .env("LAYER_GATEWAY_API_KEY", &p.admin_key)
        .env_remove("HEVLAYER_API_KEY")
        .kill_on_drop(true)
        .spawn()?;

    let started = Instant::now();
    let status = loop {
        let (s, st) = p.call(Method::GET, "/v2/udfs/product-tags/status", None).await?;
        assert_eq!(s, 200, "{st}");
        if st["counts"]["completed"] == N as u64 && st["pending_count"] == 0 && st["processing_count"] == 0 {
            break st;
        }
        if let Some(exit) = child.try_wait()? {
            panic!("the worker exited ({exit}) with status {st}");
        }
        assert!(started.elapsed() < Duration::from_secs(240), "not drained after 240 s: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    child.kill().await?;
    eprintln!("tagged {N} rows in {:?}", started.elapsed());
    assert_eq!(status["failed_count"], 0, "{status}");
    assert!(status["discovery"]["sweeps_completed"].as_i64().unwrap() >= 1, "{status}");
    assert!(status["indexed_rate_per_min"].as_f64().unwrap() > 0.0, "{status}");

    let stored: Vec<(String, Value, Option<String>)> = sqlx::query_as(
        "SELECT id, attributes -> 'tags', attributes ->> '_hevlayer_udf_product_tags_v' FROM rows
         WHERE namespace = 'products' ORDER BY id",
    )
    .fetch_all(&p.pool)
    .await?;
    assert_eq!(stored.len(), N);
    for ((id, tags, marker), (v, want)) in stored.iter().zip(&rows) {
        assert_eq!(id, v["id"].as_str().unwrap());
        assert_eq!(tags, &json!(want), "row {id}");
        assert_eq!(marker.as_deref(), Some("v1"), "row {id}");
    }
    let left: i64 = sqlx::query_scalar("SELECT count(*) FROM work_items").fetch_one(&p.pool).await?;
    assert_eq!(left, 0, "the queue is empty");
    Ok(())
}
