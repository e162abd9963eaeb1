//! The API fuzzed by schemathesis (PyPI) from the served OpenAPI document,
//! with an admin key: no generated request, valid or not, yields a 5xx or
//! a response the document does not describe, and requests built to be
//! invalid change nothing. Bounded by the number of examples per
//! operation, not by time, and seeded, so a run does the same work on a
//! slow machine as on a fast one and a failure reproduces with the command
//! it prints.

use std::time::Duration;

use layer_tests::TestPlatform;
use serde_json::json;

/// A platform with something to find: rows, a pull Function over them.
async fn platform() -> anyhow::Result<TestPlatform> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", json!([{"id": "a", "title": "Tent"}, {"id": "b", "title": "Lamp"}])).await?;
    p.apply_function(
        "tags",
        json!({"targetNamespaces": ["items"], "inputs": ["id", "title"],
                                    "worker": {"dispatch": "pull"}}),
    )
    .await?;
    Ok(p)
}

/// Runs `st run` against `p` with `args`; fails with its report unless it
/// passes.
async fn schemathesis(p: &TestPlatform, args: &[&str]) -> anyhow::Result<()> {
    let st = layer_tests::schemathesis()?;
    let auth = format!("Authorization: Bearer {}", p.admin_key);
    let document = format!("{}/openapi.json", p.url);
    let mut all: Vec<&str> = vec!["run", &document, "-u", &p.url, "-H", &auth, "-w", "1"];
    all.extend(["--generation-database", "none", "--no-color"]);
    all.extend(args);
    // Its caches and reports go to a scratch directory, not the checkout.
    let scratch = std::env::temp_dir().join(format!("layer-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let run = tokio::process::Command::new(&st).args(&all).current_dir(&scratch).kill_on_drop(true).output();
    let out = tokio::time::timeout(Duration::from_secs(180), run).await??;
    let _ = std::fs::remove_dir_all(&scratch);
    let report = String::from_utf8_lossy(&out.stdout).replace(&p.admin_key, "<admin key>");
    anyhow::ensure!(
        out.status.success(),
        "st {} failed ({}):\n{report}\n{}",
        all.join(" ").replace(&p.admin_key, "<admin key>"),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_generated_request_yields_a_5xx_or_an_undocumented_response() -> anyhow::Result<()> {
    let p = platform().await?;
    let checks = "not_a_server_error,response_schema_conformance";
    schemathesis(&p, &["--phases", "coverage,fuzzing", "--checks", checks, "--max-examples", "30", "--seed", "1"]).await
}

/// Each operation's documented examples (its parameters and request body,
/// against the rows and Function of [`platform`]) are accepted: answered
/// 2xx, or 404/409 where they name something absent or present, never a
/// 400; and answered as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_example_is_accepted_and_answered_as_documented() -> anyhow::Result<()> {
    let p = platform().await?;
    let checks = "not_a_server_error,response_schema_conformance,positive_data_acceptance";
    schemathesis(&p, &["--phases", "examples", "--checks", checks, "--seed", "3"]).await
}

/// The fuzzing phase only: in negative mode schemathesis' coverage phase
/// also sends each documented example as it is, which is valid and may
/// change things (its invalid variations still run, for 5xx, in the test
/// above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_built_to_be_invalid_change_nothing() -> anyhow::Result<()> {
    let p = platform().await?;
    let counts = || async {
        sqlx::query_as::<_, (i64, i64, i64, i64, i64)>(
            "SELECT (SELECT count(*) FROM rows), (SELECT count(*) FROM api_keys), (SELECT count(*) FROM functions),
                    (SELECT count(*) FROM namespaces), (SELECT count(*) FROM runners)",
        )
        .fetch_one(&p.pool)
        .await
    };
    let before = counts().await?;
    let args = ["--phases", "fuzzing", "--mode", "negative", "--checks", "not_a_server_error"];
    schemathesis(&p, &[&args[..], &["--max-examples", "20", "--seed", "2"]].concat()).await?;
    let after = counts().await?;
    anyhow::ensure!(before == after, "(rows, keys, Functions, namespaces, runners) went from {before:?} to {after:?}");
    Ok(())
}
