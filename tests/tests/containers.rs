//! The Docker driver against the machine's real Docker engine: Functions
//! with `worker.image` run as warm, hardened containers of the example
//! images that `deploy/images/build.sh` builds (built here if missing).
//! Each test names its runner after its own pid, so the containers it
//! looks at (by the runner label) are its own.

use std::process::Command;
use std::time::{Duration, Instant};

use layer_tests::{TestPlatform, TestRunner, workspace_dir};
use reqwest::Method;
use serde_json::{Value, json};

/// Builds the image set (`echo` or `python`) unless `image` exists. Tests
/// run as separate processes, so builds take turns on a file lock.
fn ensure_image(image: &str, set: &str) -> anyhow::Result<()> {
    if let Err(e) = Command::new("docker").arg("--version").output() {
        anyhow::bail!(
            "no Docker client here ({e}): this test needs a Docker engine; `./test.sh` counts the container tests \
             as skipped on a machine without Docker"
        );
    }
    let present = |image: &str| {
        Command::new("docker").args(["image", "inspect", image]).output().is_ok_and(|o| o.status.success())
    };
    if present(image) {
        return Ok(());
    }
    let script = workspace_dir().join("deploy/images/build.sh");
    let out = Command::new("flock").arg("/tmp/layer-images.lock").arg(&script).arg(set).output()?;
    anyhow::ensure!(
        out.status.success() && present(image),
        "{} {set} failed: {}{}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The containers a runner of this name has, running or not.
fn containers_of(runner: &str) -> anyhow::Result<Vec<String>> {
    let filter = format!("label=com.hevlayer.layer.runner={runner}");
    let out = Command::new("docker").args(["ps", "-aq", "--no-trunc", "--filter", &filter]).output()?;
    anyhow::ensure!(out.status.success(), "docker ps: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect())
}

fn inspect(id: &str) -> anyhow::Result<Value> {
    let out = Command::new("docker").args(["inspect", id]).output()?;
    anyhow::ensure!(out.status.success(), "docker inspect: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_slice::<Value>(&out.stdout)?[0].clone())
}

/// Removes a test runner's containers however the test ends: a failed
/// test drops its runner without the drain that would remove them.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(ids) = containers_of(&self.0)
            && !ids.is_empty()
        {
            let _ = Command::new("docker").args(["rm", "-f"]).args(&ids).output();
        }
    }
}

async fn drained(p: &TestPlatform, f: &str, n: usize, within: Duration) -> anyhow::Result<Value> {
    let start = Instant::now();
    loop {
        let (_, st) = p.call(Method::GET, &format!("/v2/udfs/{f}/status"), None).await?;
        if st["counts"]["completed"].as_u64() == Some(n as u64) && st["pending_count"] == 0 {
            return Ok(st);
        }
        anyhow::ensure!(start.elapsed() < within, "not drained after {within:?}: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for<T>(
    what: &str,
    within: Duration,
    mut probe: impl AsyncFnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = probe().await? {
            return Ok(v);
        }
        anyhow::ensure!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_echo_image_runs_as_warm_hardened_containers_that_stop_when_idle() -> anyhow::Result<()> {
    ensure_image("layer/echo-rust:dev", "echo")?;
    let p = TestPlatform::start().await?;
    let name = format!("containers-echo-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    // A container a killed earlier run of this runner left behind.
    let label = format!("com.hevlayer.layer.runner={name}");
    let out = Command::new("docker").args(["create", "--label", &label, "layer/echo-rust:dev"]).output()?;
    anyhow::ensure!(out.status.success(), "docker create: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(containers_of(&name)?.len(), 1);
    let runner = TestRunner::start(&p, |c| {
        c.name = name.clone();
        c.idle_timeout = Duration::from_secs(2);
    })
    .await?;
    assert_eq!(containers_of(&name)?, Vec::<String>::new(), "the runner removes what its last run left");
    let (_, list) = p.call(Method::GET, "/v2/runners", None).await?;
    assert_eq!(list["runners"][0]["drivers"], json!(["process", "docker"]), "{list}");

    let rows: Vec<Value> = (0..300).map(|i| json!({"id": format!("c{i:03}"), "title": format!("t{i}")})).collect();
    p.upsert_rows("echo", json!(rows)).await?;
    let spec = json!({
        "targetNamespaces": ["echo"], "inputs": ["id", "title"], "triggers": ["discovery"],
        "worker": {"dispatch": "push", "image": "layer/echo-rust:dev", "batchSize": 50, "timeoutSeconds": 30},
        "scaling": {"replicas": {"min": 0, "max": 2}},
    });
    p.apply_function("echo-image", spec).await?;
    drained(&p, "echo-image", 300, Duration::from_secs(90)).await?;
    let (_, d) = p.call(Method::GET, "/v2/namespaces/echo/documents/c042", None).await?;
    assert_eq!(d["attributes"]["echo"], json!({"id": "c042", "title": "t42"}), "{d}");
    assert_eq!(d["attributes"]["_hevlayer_udf_echo_image_v"], "v1", "{d}");

    // Warm: at most replicas.max containers served all six batches.
    let workers: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT worker FROM batches WHERE function_id = 'echo-image' AND worker IS NOT NULL",
    )
    .fetch_all(&p.pool)
    .await?;
    assert!(!workers.is_empty() && workers.len() <= 2, "{workers:?}");
    // The heartbeat (every 2 s) shows the containers.
    wait_for("containers in the runner's load", Duration::from_secs(10), async || {
        let (_, list) = p.call(Method::GET, "/v2/runners", None).await?;
        let shown = list["runners"][0]["load"]["workers"].as_array().cloned().unwrap_or_default();
        Ok((!shown.is_empty() && shown.iter().all(|w| w["container"].is_string())).then_some(()))
    })
    .await?;

    // Hardened, whatever the image asks.
    let ids = containers_of(&name)?;
    assert!(!ids.is_empty() && ids.len() <= 2, "{ids:?}");
    let info = inspect(&ids[0])?;
    let host = &info["HostConfig"];
    assert_eq!(host["Privileged"], false, "{host}");
    assert_eq!(host["ReadonlyRootfs"], true, "{host}");
    assert_eq!(host["CapDrop"], json!(["ALL"]), "{host}");
    assert_eq!(host["SecurityOpt"], json!(["no-new-privileges"]), "{host}");
    assert_eq!(host["PidsLimit"], 512, "{host}");
    assert_eq!(host["Init"], true, "{host}");
    // Writable by the image's user (65534) whatever its /tmp is.
    assert!(
        host["Tmpfs"]["/tmp"].as_str().is_some_and(|o| o.contains("size=256m,mode=1777,uid=65534,gid=65534")),
        "{host}"
    );
    assert_eq!(host["PortBindings"]["8080/tcp"][0]["HostIp"], "127.0.0.1", "{host}");
    let mounts = info["Mounts"].as_array().cloned().unwrap_or_default();
    assert!(mounts.iter().all(|m| !m["Source"].as_str().unwrap_or("").contains("docker.sock")), "{mounts:?}");
    let env = info["Config"]["Env"].as_array().cloned().unwrap_or_default();
    assert!(env.contains(&json!("HEVLAYER_UDF_ID=echo-image")), "{env:?}");
    assert!(env.contains(&json!("PORT=8080")), "{env:?}");

    // Idle containers past the window (replicas.min is 0) are removed.
    wait_for("idle containers removed", Duration::from_secs(30), async || {
        Ok(containers_of(&name)?.is_empty().then_some(()))
    })
    .await?;
    runner.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_classifier_image_tags_every_product_and_a_stopped_runner_leaves_no_container() -> anyhow::Result<()>
{
    ensure_image("layer/tag-products:dev", "python")?;
    let p = TestPlatform::start().await?;
    let name = format!("containers-python-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    let runner = TestRunner::start(&p, |c| c.name = name.clone()).await?;
    let text = std::fs::read_to_string(workspace_dir().join("examples/tag-products/products.jsonl"))?;
    let rows: Vec<Value> =
        text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?;
    p.upsert_rows("products", json!(rows)).await?;
    let spec = json!({
        "targetNamespaces": ["products"], "inputs": ["id", "title", "description"], "triggers": ["discovery"],
        "worker": {"dispatch": "push", "image": "layer/tag-products:dev", "batchSize": 8, "timeoutSeconds": 30},
        "scaling": {"replicas": {"min": 1, "max": 1}},
    });
    p.apply_function("product-tags-image", spec).await?;
    drained(&p, "product-tags-image", rows.len(), Duration::from_secs(90)).await?;
    let (_, d) = p.call(Method::GET, "/v2/namespaces/products/documents/p002", None).await?;
    assert_eq!(d["attributes"]["tags"], json!(["wireless", "waterproof"]), "{d}");
    // replicas.min keeps one warm container.
    assert_eq!(containers_of(&name)?.len(), 1);
    runner.stop().await?;
    assert_eq!(containers_of(&name)?, Vec::<String>::new(), "a stopped runner removes its containers");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_apply_an_oom_kill_is_classified_and_a_hung_container_is_replaced() -> anyhow::Result<()> {
    ensure_image("layer/test-worker:dev", "test")?;
    let p = TestPlatform::start().await?;
    let name = format!("containers-limits-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    let runner = TestRunner::start(&p, |c| c.name = name.clone()).await?;
    let spec = json!({
        "targetNamespaces": ["jobs"], "inputs": ["id", "mode"], "triggers": ["discovery", "write"],
        "worker": {"dispatch": "push", "image": "layer/test-worker:dev", "batchSize": 4, "timeoutSeconds": 3,
                   "resources": {"cpu": "500m", "memory": "64Mi", "ephemeralDisk": "16Mi"}},
        "retry": {"maxAttempts": 1},
        "scaling": {"replicas": {"min": 1, "max": 1}},
    });
    p.apply_function("limits", spec).await?;
    p.upsert_rows("jobs", json!([{"id": "a", "mode": "ok"}])).await?;
    drained(&p, "limits", 1, Duration::from_secs(60)).await?;

    // The limits are the container's.
    let ids = containers_of(&name)?;
    assert_eq!(ids.len(), 1, "{ids:?}");
    let host = inspect(&ids[0])?["HostConfig"].clone();
    assert_eq!(host["Memory"], 64 << 20, "{host}");
    assert_eq!(host["MemorySwap"], 64 << 20, "no swap: {host}");
    assert_eq!(host["NanoCpus"], 500_000_000, "{host}");
    assert!(host["Tmpfs"]["/tmp"].as_str().is_some_and(|o| o.contains(&format!("size={}", 16 << 20))), "{host}");

    // A row that takes 512 MB in a 64 MiB container: the kernel kills it,
    // the row fails as `oom`, and its neighbour completes in a new one.
    p.upsert_rows("jobs", json!([{"id": "h", "mode": "hog"}, {"id": "b", "mode": "ok"}])).await?;
    let failed = wait_for("the hog row failed", Duration::from_secs(60), async || {
        let f = p.failed_rows("limits").await?;
        Ok(f.contains_key("h").then_some(f))
    })
    .await?;
    let (kind, message, _) = &failed["h"];
    assert_eq!(kind, "oom", "{message}");
    assert!(message.contains("out of memory") && message.contains("OOM"), "{message}");
    drained(&p, "limits", 2, Duration::from_secs(60)).await?;

    // The container's output outlives it: `layer logs` shows the killed
    // worker, stopped, beside its replacement.
    let logs = wait_for("the logs of both containers", Duration::from_secs(20), async || {
        let (_, l) = p.call(reqwest::Method::GET, "/v2/udfs/limits/logs?lines=5", None).await?;
        let workers = l["workers"].as_array().cloned().unwrap_or_default();
        Ok((workers.len() >= 2 && workers[0]["running"] == false).then_some(workers))
    })
    .await?;
    for w in &logs {
        assert_eq!(w["runner_name"], name.as_str(), "{w}");
        let lines: Vec<&str> = w["lines"].as_array().unwrap().iter().filter_map(|l| l["line"].as_str()).collect();
        assert!(lines.iter().any(|l| l.contains("push_worker ready on 8080 for limits")), "{w}");
    }

    // A hung call: after timeoutSeconds the container is removed and a new
    // one takes its place (replicas.min: 1).
    // The runner's own pool says which container is warm (Docker may still
    // list the OOM-killed one while it is being removed).
    let status_url = format!("http://{}/v1/status", runner.addr);
    let before: String = wait_for("one warm container", Duration::from_secs(30), async || {
        let st: Value = reqwest::get(&status_url).await?.json().await?;
        let workers = st["workers"].as_array().cloned().unwrap_or_default();
        Ok(match workers.as_slice() {
            [w] if w["state"] == "idle" => w["container"].as_str().map(str::to_string),
            _ => None,
        })
    })
    .await?;
    p.upsert_rows("jobs", json!([{"id": "z", "mode": "hang"}])).await?;
    let failed = wait_for("the hung row failed", Duration::from_secs(60), async || {
        let f = p.failed_rows("limits").await?;
        Ok(f.contains_key("z").then_some(f))
    })
    .await?;
    assert_eq!(failed["z"].0, "timeout", "{:?}", failed["z"]);
    wait_for("the hung container replaced", Duration::from_secs(30), async || {
        let ids = containers_of(&name)?;
        Ok((ids.len() == 1 && !ids[0].starts_with(&before)).then_some(()))
    })
    .await?;
    runner.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_root_worker_writes_under_tmp_though_the_images_tmp_is_roots_0700() -> anyhow::Result<()> {
    const IMAGE: &str = "layer/test-worker-tmp0700:dev";
    ensure_image(IMAGE, "test")?;
    // The image's own /tmp: root's, mode 0700, and the worker runs as nobody.
    let out = Command::new("docker")
        .args(["run", "--rm", "--entrypoint", "stat", IMAGE, "-c", "%a %u:%g", "/tmp"])
        .output()?;
    anyhow::ensure!(out.status.success(), "docker run stat: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "700 0:0", "the image's /tmp is not locked");
    let user = inspect_image_user(IMAGE)?;
    assert_eq!(user, "65534:65534", "the worker must not be root");

    let p = TestPlatform::start().await?;
    let name = format!("containers-tmp-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    let runner = TestRunner::start(&p, |c| c.name = name.clone()).await?;
    p.upsert_rows("tmpjobs", json!([{"id": "t1", "mode": "tmpwrite"}, {"id": "t2", "mode": "tmpwrite"}])).await?;
    let spec = json!({
        "targetNamespaces": ["tmpjobs"], "inputs": ["id", "mode"], "triggers": ["discovery"],
        "worker": {"dispatch": "push", "image": IMAGE, "batchSize": 2, "timeoutSeconds": 30},
        "retry": {"maxAttempts": 1},
        "scaling": {"replicas": {"min": 0, "max": 1}},
    });
    p.apply_function("tmp-writer", spec).await?;
    let st = p.drained("tmp-writer", Duration::from_secs(90)).await?;
    let failed = p.failed_rows("tmp-writer").await?;
    assert!(failed.is_empty(), "the worker could not write under /tmp: {failed:?} {st}");
    for id in ["t1", "t2"] {
        let (_, d) = p.call(Method::GET, &format!("/v2/namespaces/tmpjobs/documents/{id}"), None).await?;
        let a = &d["attributes"];
        assert_eq!(a["tmp_read_back"], format!("written by {id}"), "{d}");
        assert_eq!(a["uid"], 65534, "{d}");
        // Everyone's and sticky where the runtime honours mode=1777 (runc
        // 1.1.8 and later); older runc copies the image's 0700 onto it,
        // and then the worker's user owns it.
        let everyones = a["tmp_mode"] == "1777";
        let owned = a["tmp_mode"] == "700" && a["tmp_owner"] == 65534;
        assert!(everyones || owned, "{d}");
    }
    runner.stop().await?;
    Ok(())
}

fn inspect_image_user(image: &str) -> anyhow::Result<String> {
    let out = Command::new("docker").args(["image", "inspect", "--format", "{{.Config.User}}", image]).output()?;
    anyhow::ensure!(out.status.success(), "docker image inspect: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_container_asks_the_engine_for_its_gpu_by_uuid() -> anyhow::Result<()> {
    ensure_image("layer/echo-rust:dev", "echo")?;
    let p = TestPlatform::start().await?;
    let name = format!("containers-gpu-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    let runner = TestRunner::start(&p, |c| {
        c.name = name.clone();
        c.gpus = std::sync::Arc::new(layer_runner::inventory::SimulatedGpus::new(1));
    })
    .await?;
    p.upsert_rows("gpu-echo", json!([{"id": "g1", "text": "hi"}])).await?;
    let spec = json!({
        "targetNamespaces": ["gpu-echo"], "inputs": ["id", "text"],
        "worker": {"dispatch": "push", "image": "layer/echo-rust:dev", "computeClass": "gpu", "timeoutSeconds": 10},
        "retry": {"maxAttempts": 1},
    });
    p.apply_function("gpu-echo", spec).await?;
    // This engine has no NVIDIA runtime, so the device request for the
    // simulated GPU's UUID is refused: the row fails naming why, and no
    // container is left behind.
    let failed = wait_for("the row failed", Duration::from_secs(60), async || {
        let f = p.failed_rows("gpu-echo").await?;
        Ok(f.contains_key("g1").then_some(f))
    })
    .await?;
    let (_, message, _) = &failed["g1"];
    assert!(message.contains("did not start") && message.contains("nvidia"), "{message}");
    assert_eq!(containers_of(&name)?, Vec::<String>::new());
    runner.stop().await?;
    Ok(())
}
