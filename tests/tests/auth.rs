//! Bearer authentication, scopes, namespace restrictions, revocation and
//! expiry, and that only hashes of keys are stored.

use layer_tests::TestPlatform;
use reqwest::Method;
use serde_json::json;

#[tokio::test]
async fn missing_or_bad_keys_get_401_and_healthz_is_open() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let r = p.request(Method::GET, "/v2/namespaces", None).send().await?;
    assert_eq!(r.status(), 401);
    let body: serde_json::Value = r.json().await?;
    assert_eq!(body["code"], "unauthorized", "{body}");
    assert!(body["message"].as_str().unwrap().contains("Authorization: Bearer"), "{body}");
    assert!(body["request_id"].as_str().is_some_and(|s| !s.is_empty()), "{body}");

    let (status, _) = p.call_as("lyr_not_a_key", Method::GET, "/v2/namespaces", None).await?;
    assert_eq!(status, 401);
    let r = p.request(Method::GET, "/v2/namespaces", None).header("authorization", "Basic abc").send().await?;
    assert_eq!(r.status(), 401);
    let r = p.request(Method::GET, "/healthz", None).send().await?;
    assert_eq!(r.status(), 200);
    Ok(())
}

#[tokio::test]
async fn scopes_namespaces_revocation_and_expiry() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let (s, _) = p.call(Method::POST, "/v2/namespaces/a", Some(json!({"upsert_rows": [{"id": 1}]}))).await?;
    assert_eq!(s, 200);
    let (s, _) = p.call(Method::POST, "/v2/namespaces/b", Some(json!({"upsert_rows": [{"id": 1}]}))).await?;
    assert_eq!(s, 200);

    let reader = p.mint_key(json!({"r": {"scopes": ["read"]}})).await?;
    let (s, body) =
        p.call_as(&reader, Method::POST, "/v2/namespaces/a", Some(json!({"upsert_rows": [{"id": 2}]}))).await?;
    assert_eq!(s, 403, "{body}");
    assert_eq!(body["code"], "forbidden");
    let (s, _) = p.call_as(&reader, Method::POST, "/v2/namespaces/a/query", Some(json!({}))).await?;
    assert_eq!(s, 200);
    let (s, _) = p.call_as(&reader, Method::GET, "/v2/keys", None).await?;
    assert_eq!(s, 403, "keys need admin");
    let (s, _) = p.call_as(&reader, Method::POST, "/v2/apply", Some(json!({"documents": []}))).await?;
    assert_eq!(s, 403, "apply needs write");

    // A writer limited to `a`: `b` does not exist for it.
    let scoped = p.mint_key(json!({"w": {"scopes": ["write"], "namespaces": ["a"]}})).await?;
    let (s, _) =
        p.call_as(&scoped, Method::POST, "/v2/namespaces/a", Some(json!({"upsert_rows": [{"id": 3}]}))).await?;
    assert_eq!(s, 200);
    let (s, body) = p.call_as(&scoped, Method::POST, "/v2/namespaces/b/query", Some(json!({}))).await?;
    assert_eq!(s, 404, "{body}");
    assert_eq!(body["message"], "namespace b not found");
    let (s, body) = p.call_as(&scoped, Method::GET, "/v2/namespaces", None).await?;
    assert_eq!(s, 200);
    let names: Vec<&str> = body["namespaces"].as_array().unwrap().iter().map(|n| n["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["a"]);
    let (s, _) = p.call_as(&scoped, Method::GET, "/v2/udfs", None).await?;
    assert_eq!(s, 403, "a namespace-scoped key has no platform-wide read");

    // Revoked: 403, and the key lists as Revoked.
    let (s, list) = p.call(Method::GET, "/v2/keys", None).await?;
    assert_eq!(s, 200);
    let reader_id =
        list["keys"].as_array().unwrap().iter().find(|k| k["entitlements"].get("r").is_some()).unwrap()["keyId"]
            .as_str()
            .unwrap()
            .to_string();
    let (s, k) = p.call(Method::POST, &format!("/v2/keys/{reader_id}/revoke"), None).await?;
    assert_eq!((s, k["phase"].as_str()), (200, Some("Revoked")));
    let (s, body) = p.call_as(&reader, Method::POST, "/v2/namespaces/a/query", Some(json!({}))).await?;
    assert_eq!(s, 403);
    assert!(body["message"].as_str().unwrap().contains("revoked"), "{body}");
    let (_, list) = p.call(Method::GET, "/v2/keys", None).await?;
    assert!(
        list["keys"].as_array().unwrap().iter().all(|k| k["keyId"] != reader_id.as_str()),
        "revoked keys are hidden by default"
    );
    let (_, list) = p.call(Method::GET, "/v2/keys?includeRevoked=true", None).await?;
    assert!(list["keys"].as_array().unwrap().iter().any(|k| k["keyId"] == reader_id.as_str()));

    // Expired: 403 too. Expiry is moved into the past in the database.
    let short = p.mint_key(json!({"r": {"scopes": ["read"]}})).await?;
    sqlx::query("UPDATE api_keys SET expires_at = now() - interval '1 second' WHERE revoked_at IS NULL AND name = 't' AND entitlements ? 'r'")
        .execute(&p.pool)
        .await?;
    let (s, body) = p.call_as(&short, Method::POST, "/v2/namespaces/a/query", Some(json!({}))).await?;
    assert_eq!(s, 403, "{body}");
    assert!(body["message"].as_str().unwrap().contains("expired"), "{body}");
    Ok(())
}

#[tokio::test]
async fn keys_are_stored_hashed_and_shown_once() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let token = p.mint_key(json!({"r": {"scopes": ["read"], "claims": ["runner"]}})).await?;
    assert!(token.starts_with("lyr_") && token.len() >= 40, "{token}");
    let rows: Vec<(String, Vec<u8>, serde_json::Value)> =
        sqlx::query_as("SELECT key_id, token_hash, entitlements FROM api_keys").fetch_all(&p.pool).await?;
    assert_eq!(rows.len(), 2, "bootstrap admin + minted");
    for (_, hash, _) in &rows {
        assert_eq!(hash.len(), 32, "sha-256");
        assert_ne!(hash.as_slice(), token.as_bytes());
    }
    let dump: String = sqlx::query_scalar("SELECT string_agg(t::text, ' ') FROM api_keys t").fetch_one(&p.pool).await?;
    assert!(!dump.contains(&token) && !dump.contains(layer_tests::ADMIN_KEY), "a secret is stored in clear");
    let (_, list) = p.call(Method::GET, "/v2/keys", None).await?;
    assert!(!list.to_string().contains(&token));
    assert!(list["keys"].as_array().unwrap().iter().all(|k| k.get("token").is_none()));
    // The runner claim is recorded for the runners to come.
    assert!(list.to_string().contains("\"runner\""));

    let (s, body) = p.call(Method::POST, "/v2/keys", Some(json!({"name": "x", "expiresAfter": "5y"}))).await?;
    assert_eq!(s, 400);
    assert_eq!(body["field"], "expiresAfter", "{body}");
    let (s, body) = p
        .call(Method::POST, "/v2/keys", Some(json!({"name": "x", "entitlements": {"a": {"scopes": ["root"]}}})))
        .await?;
    assert_eq!(s, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("entitlements.a.scopes"), "{body}");
    Ok(())
}
