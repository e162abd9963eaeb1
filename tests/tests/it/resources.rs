//! Resource documents through `POST /v2/apply` (what `layer apply` sends):
//! the seed's YAML, validation with field paths, revisions, atomicity,
//! Index selection, InfraRules.

use layer_protocol::resource::parse_documents;
use layer_tests::{TestPlatform, workspace_dir};
use reqwest::Method;
use serde_json::{Value, json};

fn example(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(workspace_dir().join("examples/functions").join(name)).unwrap();
    parse_documents(&text).unwrap()
}

async fn apply(p: &TestPlatform, documents: Vec<Value>) -> anyhow::Result<(u16, Value)> {
    p.call(Method::POST, "/v2/apply", Some(json!({ "documents": documents }))).await
}

#[tokio::test]
async fn both_seed_functions_apply_unchanged() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let mut docs = example("tag-products.yaml");
    docs.extend(example("product-color.yaml"));
    let (s, r) = apply(&p, docs.clone()).await?;
    assert_eq!(s, 200, "{r}");
    assert_eq!(
        r["results"],
        json!([
            {"kind": "Function", "name": "tag-products", "action": "created", "revision": 1},
            {"kind": "Function", "name": "product-color", "action": "created", "revision": 1}
        ])
    );
    // Every field is kept, in the client's snake_case.
    let (_, g) = p.call(Method::GET, "/v2/udfs/tag-products", None).await?;
    let spec = &g["udf"]["spec"];
    assert_eq!(spec["filter"], json!(["category", "Eq", "outdoor"]));
    assert_eq!(spec["schedule"]["discovery_interval_seconds"], 300);
    assert_eq!(spec["schedule"]["max_concurrent_scans"], 1);
    assert_eq!(spec["worker"]["image"], "ghcr.io/hev/tag-products:latest");
    assert_eq!(spec["scaling"], json!({"pool": "cpu", "mode": "autoscale", "replicas": {"min": 0, "max": 6}}));
    let (_, g) = p.call(Method::GET, "/v2/udfs/product-color", None).await?;
    assert_eq!(g["udf"]["spec"]["worker"]["compute_class"], "gpu");
    assert_eq!(
        g["udf"]["spec"]["retry"],
        json!({"max_attempts": 8, "initial_backoff_seconds": 5, "max_backoff_seconds": 300})
    );
    // Re-applying the same file changes nothing and stores no revision.
    let (_, r) = apply(&p, docs).await?;
    assert_eq!(r["results"][0]["action"], "unchanged");
    let (_, revs) = p.call(Method::GET, "/v2/udfs/tag-products/revisions", None).await?;
    assert_eq!(revs["revisions"].as_array().unwrap().len(), 1);
    Ok(())
}

#[tokio::test]
async fn misspelt_and_invalid_fields_are_400s_naming_the_path() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let mut doc = example("tag-products.yaml").remove(0);
    let worker = doc["spec"]["worker"].as_object_mut().unwrap();
    let size = worker.remove("batchSize").unwrap();
    worker.insert("batchsize".into(), size);
    doc["spec"]["retry"]["maxAttempts"] = json!(0);
    doc["spec"]["triggers"] = json!(["discovery", "sometimes"]);
    let (s, r) = apply(&p, vec![doc]).await?;
    assert_eq!(s, 400, "{r}");
    assert_eq!(r["code"], "invalid_resource");
    assert_eq!(r["field"], "documents[0].spec.worker.batchsize");
    let messages: Vec<&str> = r["errors"].as_array().unwrap().iter().map(|e| e["message"].as_str().unwrap()).collect();
    assert_eq!(
        messages,
        [
            "document 1 (Function/tag-products): spec.worker.batchsize: unknown field, did you mean batchSize",
            "document 1 (Function/tag-products): spec.retry.maxAttempts: 0 is out of range; allowed 1..=100",
            "document 1 (Function/tag-products): spec.triggers[1]: \"sometimes\" is not allowed; allowed: discovery, write, schedule",
        ]
    );
    let (s, _) = p.call(Method::GET, "/v2/udfs/tag-products", None).await?;
    assert_eq!(s, 404, "nothing was applied");

    let (s, r) = apply(&p, vec![json!({"apiVersion": "hevlayer.com/v1alpha1", "kind": "Function", "metadata": {"name": "Bad_Name"}, "spec": {"worker": {}, "targetNamespaces": ["x"], "filter": ["a", "Near", 1]}})]).await?;
    assert_eq!(s, 400);
    let text = r.to_string();
    assert!(text.contains("metadata.name: \\\"Bad_Name\\\" is not a valid name"), "{text}");
    assert!(text.contains("spec.filter[1]: unknown filter operator \\\"Near\\\""), "{text}");
    Ok(())
}

#[tokio::test]
async fn one_bad_document_applies_nothing() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let mut docs = example("tag-products.yaml");
    docs.push(json!({"apiVersion": "hevlayer.com/v1alpha1", "kind": "Index", "metadata": {"name": "products"}, "spec": {"distanceMetric": "manhattan"}}));
    let (s, r) = apply(&p, docs).await?;
    assert_eq!(s, 400, "{r}");
    assert!(r["message"].as_str().unwrap().starts_with("document 2 (Index/products): spec.distanceMetric"), "{r}");
    let (_, list) = p.call(Method::GET, "/v2/udfs", None).await?;
    assert_eq!(list["udfs"], json!([]));
    Ok(())
}

#[tokio::test]
async fn every_spec_change_is_a_revision_with_key_and_changed_paths() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let mut doc = example("tag-products.yaml").remove(0);
    apply(&p, vec![doc.clone()]).await?;
    let writer = p.mint_key(json!({"w": {"scopes": ["write"]}})).await?;
    doc["spec"]["version"] = json!("v2");
    doc["spec"]["worker"]["batchSize"] = json!(64);
    let (s, r) = p.call_as(&writer, Method::POST, "/v2/apply", Some(json!({"documents": [doc.clone()]}))).await?;
    assert_eq!(s, 200, "{r}");
    assert_eq!(
        r["results"][0],
        json!({"kind": "Function", "name": "tag-products", "action": "updated", "revision": 2})
    );
    // Pausing is not a spec change.
    doc["spec"]["paused"] = json!(true);
    let (_, r) = apply(&p, vec![doc.clone()]).await?;
    assert_eq!(r["results"][0]["revision"], 2);
    let (_, g) = p.call(Method::GET, "/v2/udfs/tag-products", None).await?;
    assert_eq!(g["udf"]["paused"], true);

    let (_, revs) = p.call(Method::GET, "/v2/udfs/tag-products/revisions", None).await?;
    let revs = revs["revisions"].as_array().unwrap();
    assert_eq!(revs.len(), 2);
    assert_eq!(revs[0]["changed"], json!(["spec"]));
    assert_eq!(revs[1]["changed"], json!(["version", "worker.batch_size"]));
    assert_eq!(revs[0]["spec"]["version"], "v1");
    assert_eq!(revs[1]["spec"]["version"], "v2");
    let admin_id: String =
        sqlx::query_scalar("SELECT key_id FROM api_keys WHERE name = 'bootstrap-admin'").fetch_one(&p.pool).await?;
    assert_eq!(revs[0]["key_id"], admin_id.as_str());
    assert_ne!(revs[1]["key_id"], admin_id.as_str());
    assert!(revs[1]["key_id"].as_str().unwrap().starts_with("key_"));

    // Deleting keeps the history; re-creating continues it.
    let (s, _) = p.call(Method::DELETE, "/v2/udfs/tag-products", None).await?;
    assert_eq!(s, 200);
    let (s, _) = p.call(Method::GET, "/v2/udfs/tag-products/revisions", None).await?;
    assert_eq!(s, 200);
    doc["spec"]["version"] = json!("v3");
    let (_, r) = apply(&p, vec![doc]).await?;
    assert_eq!(
        r["results"][0],
        json!({"kind": "Function", "name": "tag-products", "action": "created", "revision": 3})
    );
    Ok(())
}

#[tokio::test]
async fn index_labels_drive_index_selector_and_infra_rules_need_admin() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let (s, r) = apply(&p, example("indexes.yaml")).await?;
    assert_eq!(s, 200, "{r}");
    let (_, g) = p.call(Method::GET, "/v2/udfs/shop-embed", None).await?;
    assert_eq!(g["status"]["active_namespaces"], json!(["products"]), "{g}");
    let (_, list) = p.call(Method::GET, "/v2/namespaces", None).await?;
    let labels = &list["namespaces"].as_array().unwrap().iter().find(|n| n["name"] == "products").unwrap()["labels"];
    assert_eq!(labels, &json!({"team": "shop", "tier": "gold"}));

    let writer = p.mint_key(json!({"w": {"scopes": ["write"]}})).await?;
    let (s, _) =
        p.call_as(&writer, Method::POST, "/v2/apply", Some(json!({"documents": example("infra-rules.yaml")}))).await?;
    assert_eq!(s, 403, "InfraRules need admin");
    let (s, r) = apply(&p, example("infra-rules.yaml")).await?;
    assert_eq!((s, &r["results"][0]["action"]), (200, &json!("created")), "{r}");
    let (_, rules) = p.call(Method::GET, "/v2/infrarules", None).await?;
    assert_eq!(rules["infra_rules"][0]["spec"]["compute_pools"][1]["max_replicas_per_workload"], 4);
    Ok(())
}

#[tokio::test]
async fn the_snake_case_api_validates_like_the_documents() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let (s, r) = p
        .call(Method::POST, "/v2/udfs", Some(json!({"id": "x", "spec": {"target_namespaces": ["a"], "worker": {"batch_size": 0, "timeout_seconds": 10}}})))
        .await?;
    assert_eq!(s, 400);
    assert_eq!(r["field"], "spec.worker.batch_size", "{r}");
    let (s, r) = p.call(Method::POST, "/v2/udfs", Some(json!({"spec": {"worker": {}}}))).await?;
    assert_eq!(s, 400);
    let text = r.to_string();
    assert!(
        text.contains("id: required")
            && text.contains("spec.target_namespaces: one of target_namespaces or index_selector is required"),
        "{text}"
    );
    let (s, r) = p
        .call(Method::PUT, "/v2/udfs/x", Some(json!({"id": "y", "spec": {"target_namespaces": ["a"], "worker": {}}})))
        .await?;
    assert_eq!(s, 400, "{r}");
    let (s, r) =
        p.call(Method::PUT, "/v2/udfs/x", Some(json!({"spec": {"target_namespaces": ["a"], "worker": {}}}))).await?;
    assert_eq!((s, &r["revision"]), (200, &json!(1)), "{r}");
    Ok(())
}
