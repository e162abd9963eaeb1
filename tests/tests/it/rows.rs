//! Row-store write semantics, fetches, queries and their errors.

use layer_tests::{PlatformOptions, TestPlatform};
use reqwest::Method;
use serde_json::{Value, json};

async fn write(p: &TestPlatform, ns: &str, body: Value) -> anyhow::Result<(u16, Value)> {
    p.call(Method::POST, &format!("/v2/namespaces/{ns}"), Some(body)).await
}

async fn doc(p: &TestPlatform, ns: &str, id: &str) -> anyhow::Result<(u16, Value)> {
    p.call(Method::GET, &format!("/v2/namespaces/{ns}/documents/{id}"), None).await
}

#[tokio::test]
async fn upsert_replaces_patch_merges_delete_removes() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let (s, r) =
        write(&p, "n", json!({"upsert_rows": [{"id": "a", "x": 1, "y": 2, "vector": [0.5, 1.5]}, {"id": 7, "x": 3}]}))
            .await?;
    assert_eq!((s, r["rows_upserted"].as_u64()), (200, Some(2)), "{r}");
    // Upsert replaces the whole row.
    write(&p, "n", json!({"upsert_rows": [{"id": "a", "z": 9}]})).await?;
    let (_, d) = doc(&p, "n", "a").await?;
    assert_eq!(d["attributes"], json!({"z": 9}));
    assert!(d.get("vector").is_none(), "an upsert without a vector clears it: {d}");
    // Patch merges, null removes, missing ids are ignored.
    let (_, r) =
        write(&p, "n", json!({"patch_rows": [{"id": "a", "w": [1], "z": null}, {"id": "ghost", "w": 1}]})).await?;
    assert_eq!(r["rows_patched"], 1, "{r}");
    let (_, d) = doc(&p, "n", "a").await?;
    assert_eq!(d["attributes"], json!({"w": [1]}));
    // Integer ids are the same id as their string.
    let (s, d) = doc(&p, "n", "7").await?;
    assert_eq!((s, &d["attributes"]), (200, &json!({"x": 3})));
    // Columns.
    let (_, r) =
        write(&p, "n", json!({"upsert_columns": {"id": ["c1", "c2"], "k": ["u", "v"], "vector": [[1, 2], null]}}))
            .await?;
    assert_eq!(r["rows_upserted"], 2);
    let (_, d) = doc(&p, "n", "c1").await?;
    assert_eq!(d["vector"], json!([1.0, 2.0]));
    // Deletes and delete_by_filter in one write.
    let (_, r) = write(&p, "n", json!({"deletes": ["c1", "nope"], "delete_by_filter": ["k", "Eq", "v"]})).await?;
    assert_eq!(r["rows_deleted"], 2, "{r}");
    let (s, _) = doc(&p, "n", "c2").await?;
    assert_eq!(s, 404);
    // row_count follows inserts and deletes, not updates.
    let (_, list) = p.call(Method::GET, "/v2/namespaces", None).await?;
    assert_eq!(list["namespaces"][0]["row_count"], 2, "{list}");
    let real: i64 = sqlx::query_scalar("SELECT count(*) FROM rows WHERE namespace = 'n'").fetch_one(&p.pool).await?;
    assert_eq!(real, 2);
    Ok(())
}

#[tokio::test]
async fn every_write_bumps_the_namespace_sequence_and_stamps_its_rows() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    write(&p, "s", json!({"upsert_rows": [{"id": "a"}, {"id": "b"}]})).await?;
    write(&p, "s", json!({"patch_rows": [{"id": "b", "x": 1}]})).await?;
    write(&p, "s", json!({"upsert_rows": [{"id": "c"}]})).await?;
    let seq: i64 = sqlx::query_scalar("SELECT write_seq FROM namespaces WHERE name = 's'").fetch_one(&p.pool).await?;
    assert_eq!(seq, 3);
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT id, write_seq FROM rows WHERE namespace = 's' ORDER BY id").fetch_all(&p.pool).await?;
    assert_eq!(rows, vec![("a".into(), 1), ("b".into(), 2), ("c".into(), 3)]);
    // Rows written since a sequence are found through the index.
    let changed: Vec<String> =
        sqlx::query_scalar("SELECT id FROM rows WHERE namespace = 's' AND write_seq > 1 ORDER BY id")
            .fetch_all(&p.pool)
            .await?;
    assert_eq!(changed, ["b", "c"]);
    Ok(())
}

#[tokio::test]
async fn concurrent_writers_to_one_namespace_lose_nothing() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let mut tasks = Vec::new();
    for w in 0..8 {
        let url = p.url.clone();
        let key = p.admin_key.clone();
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::new();
            for b in 0..5 {
                let rows: Vec<Value> = (0..50).map(|i| json!({"id": format!("{w}-{b}-{i}"), "w": w})).collect();
                let r = http
                    .post(format!("{url}/v2/namespaces/c"))
                    .bearer_auth(&key)
                    .json(&json!({"upsert_rows": rows}))
                    .send()
                    .await?;
                anyhow::ensure!(r.status() == 200, "write failed: {}", r.text().await?);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let (count, seq, distinct): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT row_count FROM namespaces WHERE name = 'c'), (SELECT write_seq FROM namespaces WHERE name = 'c'),
                (SELECT count(DISTINCT write_seq) FROM rows WHERE namespace = 'c')",
    )
    .fetch_one(&p.pool)
    .await?;
    assert_eq!((count, seq, distinct), (2000, 40, 40));
    Ok(())
}

#[tokio::test]
async fn queries_rank_limit_and_project() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let rows: Vec<Value> =
        (0..30).map(|i| json!({"id": format!("r{i:02}"), "n": i % 7, "s": format!("v{i}")})).collect();
    write(&p, "q", json!({"upsert_rows": rows})).await?;
    let (s, r) = p
        .call(
            Method::POST,
            "/v2/namespaces/q/query",
            Some(json!({"rank_by": ["n", "desc"], "top_k": 5, "include_attributes": ["n"]})),
        )
        .await?;
    assert_eq!(s, 200, "{r}");
    let got: Vec<(String, i64)> = r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["id"].as_str().unwrap().into(), x["n"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        got,
        vec![("r06".into(), 6), ("r13".into(), 6), ("r20".into(), 6), ("r27".into(), 6), ("r05".into(), 5)]
    );
    assert!(r["rows"][0].get("s").is_none());
    // Default: ids only, ten rows, by id.
    let (_, r) = p.call(Method::POST, "/v2/namespaces/q/query", Some(json!({}))).await?;
    assert_eq!(r["rows"].as_array().unwrap().len(), 10);
    assert_eq!(r["rows"][0], json!({"id": "r00"}));
    // Several ordering terms.
    let (_, r) = p
        .call(
            Method::POST,
            "/v2/namespaces/q/query",
            Some(json!({"rank_by": [["n", "asc"], ["s", "desc"]], "top_k": 2, "include_attributes": true})),
        )
        .await?;
    // n = 0 for r00, r07, r14, r21, r28; "v7" sorts above "v28" as a string.
    let ids: Vec<&str> = r["rows"].as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["r07", "r28"], "{r}");
    Ok(())
}

#[tokio::test]
async fn bad_requests_name_what_is_wrong_and_change_nothing() -> anyhow::Result<()> {
    let p = TestPlatform::start_with(PlatformOptions { max_body_bytes: 4096, ..Default::default() }).await?;
    write(&p, "e", json!({"upsert_rows": [{"id": "keep", "v": 1}]})).await?;
    let cases = [
        (
            json!({"upsert_rows": [{"id": "a"}, {"id": "b", "_hevlayer_udf_t_v": "v1"}]}),
            "upsert_rows[1]._hevlayer_udf_t_v",
        ),
        (json!({"upsert_rows": [{"x": 1}]}), "upsert_rows[0].id"),
        (json!({"upsert_rows": [{"id": {"a": 1}}]}), "upsert_rows[0].id"),
        (json!({"upsert_columns": {"id": ["a"], "x": [1, 2]}}), "upsert_columns.x"),
        (json!({"upsert_rows": [{"id": "a"}], "delete_by_filter": ["v", "Between", [1, 2]]}), "delete_by_filter[1]"),
        (json!({"upsert_rows": [{"id": "a"}], "copy_from_namespace": "x"}), ""),
        (json!({"upsert_rows": "nope"}), "upsert_rows"),
        (json!({}), ""),
    ];
    for (body, field) in cases {
        let (s, r) = write(&p, "e", body.clone()).await?;
        assert_eq!(s, 400, "{body} -> {r}");
        assert_eq!(r["code"], "invalid_request", "{r}");
        if !field.is_empty() {
            assert_eq!(r["field"], field, "{body} -> {r}");
        }
    }
    let (s, r) = write(&p, "e", json!({"upsert_rows": [{"id": "big", "blob": "x".repeat(8000)}]})).await?;
    assert_eq!((s, r["code"].as_str()), (413, Some("payload_too_large")), "{r}");
    let r = p.request(Method::POST, "/v2/namespaces/e", Some(&p.admin_key)).body("{not json").send().await?;
    assert_eq!(r.status(), 400);
    // Nothing above changed the namespace.
    let (_, q) = p.call(Method::POST, "/v2/namespaces/e/query", Some(json!({"include_attributes": true}))).await?;
    assert_eq!(q["rows"], json!([{"id": "keep", "v": 1}]));

    let (s, r) = p.call(Method::POST, "/v2/namespaces/e/query", Some(json!({"vector": [1.0, 2.0]}))).await?;
    assert_eq!((s, r["code"].as_str()), (400, Some("unsupported")), "{r}");
    let (s, _) = p.call(Method::POST, "/v2/namespaces/e/query", Some(json!({"top_k": 0}))).await?;
    assert_eq!(s, 400);
    let (s, r) = p.call(Method::POST, "/v2/namespaces/e/query", Some(json!({"rank_by": ["v", "sideways"]}))).await?;
    assert_eq!((s, r["field"].as_str()), (400, Some("rank_by")), "{r}");
    let (s, _) = p.call(Method::POST, "/v2/namespaces/missing/query", Some(json!({}))).await?;
    assert_eq!(s, 404);
    let (s, _) = write(&p, "missing", json!({"patch_rows": [{"id": "a", "x": 1}]})).await?;
    assert_eq!(s, 404, "patches do not create namespaces");
    let (s, r) = write(&p, "bad%2Fname", json!({"upsert_rows": [{"id": "a"}]})).await?;
    assert_eq!(s, 400, "{r}");
    let (s, _) = p.call(Method::GET, "/v2/nothing-here", None).await?;
    assert_eq!(s, 404);
    let (s, r) = p.call(Method::PATCH, "/v2/namespaces/e", None).await?;
    assert_eq!((s, r["code"].as_str()), (405, Some("method_not_allowed")));

    let (s, r) = p.call(Method::DELETE, "/v2/namespaces/e", None).await?;
    assert_eq!((s, r["rows_affected"].as_u64()), (200, Some(1)));
    let (s, _) = p.call(Method::DELETE, "/v2/namespaces/e", None).await?;
    assert_eq!(s, 404);
    Ok(())
}
