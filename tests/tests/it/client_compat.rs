//! The public `hevlayer` Python client, unchanged, against the platform.

use layer_tests::{TestPlatform, run_python};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hevlayer_client_round_trip() -> anyhow::Result<()> {
    let platform = TestPlatform::start().await?;
    let out = run_python("client_compat.py", &platform, &[]).await?;
    assert!(out.contains("all checks passed"), "{out}");
    Ok(())
}
