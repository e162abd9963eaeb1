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

/// How many containers of a test runner the engine created between two
/// Unix times (`docker events`, which answers at once for a past window).
/// When (Unix seconds) the engine created each container of a runner from
/// `since` until now, oldest first.
fn containers_created(runner: &str, since: f64) -> anyhow::Result<Vec<f64>> {
    let filter = format!("label=com.hevlayer.layer.runner={runner}");
    let until = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    let out = Command::new("docker")
        .args(["events", "--since", &format!("{since:.3}"), "--until", &format!("{until:.3}")])
        .args(["--filter", &filter, "--filter", "type=container", "--filter", "event=create"])
        .args(["--format", "{{.TimeNano}}"])
        .output()?;
    anyhow::ensure!(out.status.success(), "docker events: {}", String::from_utf8_lossy(&out.stderr));
    let mut at: Vec<f64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse::<f64>().ok())
        .map(|n| n / 1e9)
        .collect();
    at.sort_by(f64::total_cmp);
    Ok(at)
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
    // The same container answers a call of the Function, warm.
    let r = p
        .request(Method::POST, "/v2/udfs/product-tags-image/calls", Some(&p.admin_key))
        .json(&json!({"id": "c1", "title": "Waterproof jacket"}))
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    let timing = r.headers().get("server-timing").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    assert!(timing.starts_with("queue;"), "the warm container took it: {timing}");
    assert_eq!(r.json::<Value>().await?, json!({"tags": ["waterproof"]}));
    assert_eq!(containers_of(&name)?.len(), 1, "no container was started for the call");
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

/// Applies a YAML file of the repository, unchanged.
async fn apply_file(p: &TestPlatform, path: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(workspace_dir().join(path))?;
    let docs = layer_protocol::resource::parse_documents(&text)?;
    let (s, r) = p.call(Method::POST, "/v2/apply", Some(json!({"documents": docs}))).await?;
    anyhow::ensure!(s == 200, "apply {path}: {r}");
    Ok(())
}

/// Waits for a condition of `udf`'s status with `reason` whose message
/// contains `needle`; returns it.
async fn condition(p: &TestPlatform, udf: &str, reason: &str, needle: &str) -> anyhow::Result<Value> {
    wait_for(&format!("condition {reason} with {needle:?}"), Duration::from_secs(40), async || {
        let (_, st) = p.call(Method::GET, &format!("/v2/udfs/{udf}/status"), None).await?;
        let hit = st["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["reason"] == reason && c["message"].as_str().is_some_and(|m| m.contains(needle)));
        Ok(hit.cloned())
    })
    .await
}

/// The pull workers of a Function running in the runner's containers.
fn pull_containers(runner: &str, udf: &str) -> anyhow::Result<usize> {
    let out = Command::new("docker")
        .args(["ps", "-q", "--filter", &format!("label=com.hevlayer.layer.runner={runner}")])
        .args(["--filter", &format!("label=com.hevlayer.layer.udf={udf}")])
        .args(["--filter", "label=com.hevlayer.layer.dispatch=pull"])
        .output()?;
    anyhow::ensure!(out.status.success(), "docker ps: {}", String::from_utf8_lossy(&out.stderr));
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

/// Seed 000's products: outdoor ones the Function tags, some without a
/// title (a permanent failure), and indoor ones it leaves alone.
fn seed_products(n: usize) -> Vec<Value> {
    (0..n)
        .map(|i| {
            let category = if i % 10 == 9 { "indoor" } else { "outdoor" };
            let title = match i % 4 {
                0 => json!(format!("Wireless speaker {i}")),
                1 => json!(format!("Waterproof jacket {i}")),
                2 => json!(format!("Tent {i}")),
                _ if i % 40 == 3 => Value::Null,
                _ => json!(format!("Wireless waterproof radio {i}")),
            };
            json!({"id": format!("p{i:04}"), "title": title, "category": category})
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_tag_products_runs_unchanged_in_runner_containers_from_zero_to_max_and_back() -> anyhow::Result<()> {
    ensure_image("ghcr.io/hev/tag-products:latest", "pull")?;
    let p = TestPlatform::start_with(layer_tests::PlatformOptions {
        scale_down_after: Duration::from_secs(3),
        ..Default::default()
    })
    .await?;
    let name = format!("containers-pull-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    let runner = TestRunner::start(&p, |c| c.name = name.clone()).await?;
    let products = seed_products(1200);
    p.upsert_rows("products", json!(products)).await?;
    // Seed 000's YAML, as written: pull, worker.image, autoscale 0..6.
    apply_file(&p, "examples/functions/tag-products.yaml").await?;

    // Drains, scaling up from zero and never above replicas.max.
    let start = Instant::now();
    let mut most = 0;
    let st = loop {
        most = most.max(pull_containers(&name, "tag-products")?);
        let (_, st) = p.call(Method::GET, "/v2/udfs/tag-products/status", None).await?;
        if st["pending_count"] == 0 && st["processing_count"] == 0 && st["counts"]["completed"].as_u64() > Some(0) {
            break st;
        }
        anyhow::ensure!(start.elapsed() < Duration::from_secs(180), "not drained: {st}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(most >= 2, "the queue called for more than one worker; at most {most} ran");
    assert!(most <= 6, "{most} workers ran at replicas.max 6");
    let assigned: i64 =
        sqlx::query_scalar("SELECT coalesce(sum(replicas), 0) FROM pull_assignments").fetch_one(&p.pool).await?;
    assert!(assigned <= 6, "{assigned}");
    let outdoor: Vec<&Value> = products.iter().filter(|r| r["category"] == "outdoor").collect();
    let untitled = outdoor.iter().filter(|r| r["title"].is_null()).count();
    assert_eq!(st["counts"]["completed"].as_u64(), Some((outdoor.len() - untitled) as u64), "{st}");
    assert_eq!(st["failed_count"].as_u64(), Some(untitled as u64), "{st}");
    let (_, d) = p.call(Method::GET, "/v2/namespaces/products/documents/p0005", None).await?;
    assert_eq!(d["attributes"]["tags"], json!(["waterproof"]), "{d}");
    assert_eq!(d["attributes"]["_hevlayer_udf_tag_products_v"], "v1", "{d}");
    let (_, d) = p.call(Method::GET, "/v2/namespaces/products/documents/p0009", None).await?;
    assert!(d["attributes"].get("tags").is_none(), "indoor rows are not the Function's: {d}");

    // What the containers were given: the seed's environment, the runner's
    // gateway as the base URL, a key minted for the Function's workers.
    let ids = containers_of(&name)?;
    anyhow::ensure!(!ids.is_empty(), "no container left to inspect");
    let info = inspect(&ids[0])?;
    let env: Vec<String> = info["Config"]["Env"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let var = |k: &str| env.iter().find_map(|e| e.strip_prefix(&format!("{k}="))).map(str::to_string);
    assert_eq!(var("HEVLAYER_UDF_ID").as_deref(), Some("tag-products"), "{env:?}");
    assert_eq!(var("HEVLAYER_UDF_BATCH_SIZE").as_deref(), Some("32"), "{env:?}");
    assert_eq!(var("HEVLAYER_UDF_TIMEOUT_SECONDS").as_deref(), Some("30"), "{env:?}");
    assert_eq!(var("HEVLAYER_UDF_LEASE_SECONDS").as_deref(), Some("120"), "{env:?}");
    assert!(var("PORT").is_none(), "a pull worker listens nowhere: {env:?}");
    let base = var("HEVLAYER_BASE_URL").unwrap_or_default();
    assert!(!base.contains("127.0.0.1") && base.starts_with("http://"), "{base}");
    let mode = info["HostConfig"]["NetworkMode"].as_str().unwrap_or_default().to_string();
    assert!(mode == "default" || mode == "bridge", "the default bridge, no host networking: {mode}");
    assert_eq!(info["HostConfig"]["ReadonlyRootfs"], true);
    let key = var("LAYER_GATEWAY_API_KEY").unwrap_or_default();
    assert!(!key.is_empty() && key != p.admin_key, "the worker's key is its own");
    // That key is the Function's workers' alone.
    let (s, _) = p.call_as(&key, Method::GET, "/v2/udfs/tag-products/status", None).await?;
    assert_eq!(s, 200);
    let (s, r) = p.call_as(&key, Method::GET, "/v2/udfs", None).await?;
    assert_eq!(s, 403, "{r}");
    p.upsert_rows("elsewhere", json!([{"id": "x"}])).await?;
    let (s, r) = p.call_as(&key, Method::POST, "/v2/namespaces/elsewhere/query", Some(json!({"top_k": 1}))).await?;
    assert_eq!(s, 404, "{r}");
    let (s, r) = p.call_as(&key, Method::POST, "/v2/apply", Some(json!({"documents": [{"kind": "Index"}]}))).await?;
    assert!(s == 403 || s == 400, "{s} {r}");
    let owner: Option<String> = sqlx::query_scalar(
        "SELECT worker_function_id FROM api_keys WHERE worker_runner_id = $1 AND revoked_at IS NULL",
    )
    .bind(&runner.id)
    .fetch_optional(&p.pool)
    .await?
    .flatten();
    assert_eq!(owner.as_deref(), Some("tag-products"));
    // Their calls went through the runner's gateway, and were counted.
    let (_, m) = layer_tests::scrape(&format!("http://{}", runner.addr)).await?;
    let through = m.get("layer_runner_gateway_requests_total{area=\"/v2/udfs\"}").copied().unwrap_or(0.0);
    assert!(through >= 1.0, "claims through the gateway: {through}");
    // The workers' output is in `layer logs`.
    let (_, logs) = p.call(Method::GET, "/v2/udfs/tag-products/logs", None).await?;
    assert!(logs.to_string().contains("pull worker for tag-products starting"), "{logs}");

    // An empty queue, past the scale-down window: back to zero.
    wait_for("pull workers gone", Duration::from_secs(40), async || {
        Ok((pull_containers(&name, "tag-products")? == 0).then_some(()))
    })
    .await?;
    // Deleting the Function deletes its workers' key.
    let (s, _) = p.call(Method::DELETE, "/v2/udfs/tag-products", None).await?;
    assert_eq!(s, 200);
    let (s, _) = p.call_as(&key, Method::GET, "/v2/udfs/tag-products/status", None).await?;
    assert_eq!(s, 401);
    runner.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_worker_that_exits_backs_off_and_its_status_says_why() -> anyhow::Result<()> {
    ensure_image("ghcr.io/hev/tag-products:latest", "pull")?;
    let p = TestPlatform::start().await?;
    let name = format!("containers-crash-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    p.upsert_rows("crash", json!([{"id": "a", "title": "Wireless a"}, {"id": "b", "title": "b"}])).await?;
    // No runner with the docker driver yet: the status says so.
    let no_docker = TestRunner::start(&p, |c| {
        c.name = format!("{name}-nodocker");
        c.docker = false;
    })
    .await?;
    let spec = |image: &str, env: Value| {
        json!({
            "targetNamespaces": ["crash"], "inputs": ["id", "title"],
            "worker": {"dispatch": "pull", "image": image, "batchSize": 8, "env": env},
            "scaling": {"mode": "fixed", "replicas": {"min": 0, "max": 1}},
        })
    };
    // The entrypoint's LAYER_UDF_FUNCTION names a function worker.py lacks.
    let broken = json!({"LAYER_UDF_FUNCTION": "no_such_function"});
    p.apply_function("crashy", spec("ghcr.io/hev/tag-products:latest", broken)).await?;
    condition(&p, "crashy", "NoRunner", "docker driver").await?;
    no_docker.stop().await?;

    // The image's worker exits at once: restarted with a growing pause,
    // and the status carries its last lines.
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
    let runner = TestRunner::start(&p, |c| c.name = name.clone()).await?;
    let c = condition(&p, "crashy", "WorkerFailing", "has no attribute 'no_such_function'").await?;
    assert!(c["message"].as_str().unwrap_or("").contains("exit code"), "{c}");
    // Read from the engine's own record of the containers created since the
    // runner's start (each lives too briefly for a poll to see them all):
    // the pauses between starts grow (1 s, 2 s, 4 s, ...), where a worker
    // restarted on every tick would leave even gaps. Each gap also holds
    // the start of a container, however long the machine takes for it, so
    // the test compares the gaps with each other, not with a clock.
    let started = Instant::now();
    let created = loop {
        let created = containers_created(&name, since)?;
        if created.len() >= 4 {
            break created;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "only {} containers created: {created:?}", created.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let gaps: Vec<f64> = created.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps[0] >= 0.5, "a pause before the first restart: {gaps:?}");
    // 4 s against 1 s of pause: the third gap is longer by about 3 s.
    assert!(gaps[2] - gaps[0] > 1.5, "the pause grows: {gaps:?}");

    // An image that does not exist says so.
    p.apply_function("crashy", spec("layer/no-such-image:dev", json!({}))).await?;
    condition(&p, "crashy", "WorkerFailing", "No such image").await?;
    let (_, st) = p.call(Method::GET, "/v2/udfs/crashy/status", None).await?;
    assert_eq!(st["pending_count"], 2, "nothing is lost meanwhile: {st}");
    runner.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_product_color_places_a_gpu_container_and_the_engines_refusal_shows() -> anyhow::Result<()> {
    ensure_image("ghcr.io/hev/tag-products:latest", "pull")?;
    // The seed's GPU image needs torch and a model, which cannot be had
    // here: a local image stands in under its name.
    let image = "ghcr.io/hev/hev-shop-udf-product-color:latest";
    let out = Command::new("docker").args(["tag", "ghcr.io/hev/tag-products:latest", image]).output()?;
    anyhow::ensure!(out.status.success(), "docker tag: {}", String::from_utf8_lossy(&out.stderr));
    let p = TestPlatform::start().await?;
    let name = format!("containers-gpu-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    let runner = TestRunner::start(&p, |c| {
        c.name = name.clone();
        c.gpus = std::sync::Arc::new(layer_runner::inventory::SimulatedGpus::new(1));
    })
    .await?;
    p.upsert_rows("amazon-products", json!([{"id": "a", "image_url": "http://example.invalid/a.jpg"}])).await?;
    apply_file(&p, "examples/functions/product-color.yaml").await?;
    let placed: (String, i32) = wait_for("a pull assignment", Duration::from_secs(20), async || {
        Ok(sqlx::query_as("SELECT runner_id, replicas FROM pull_assignments WHERE function_id = 'product-color'")
            .fetch_optional(&p.pool)
            .await?)
    })
    .await?;
    assert_eq!(placed, (runner.id.clone(), 1));
    // The device request for the bound GPU reached the engine, which has no
    // NVIDIA runtime here and refused it.
    let refusal = condition(&p, "product-color", "WorkerFailing", "nvidia").await?;
    assert!(refusal["message"].as_str().unwrap_or("").contains(image), "{refusal}");
    // A refused container is removed (in the background, while the runner
    // backs off before its next try): none lingers.
    wait_for("the refused containers removed", Duration::from_secs(20), async || {
        Ok(containers_of(&name)?.is_empty().then_some(()))
    })
    .await?;
    runner.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_through_image_completes_every_row_it_wrote_itself() -> anyhow::Result<()> {
    ensure_image("ghcr.io/hev/tag-products-writethrough:latest", "pull")?;
    let p = TestPlatform::start().await?;
    let name = format!("containers-wt-{}", std::process::id());
    let _cleanup = Cleanup(name.clone());
    let runner = TestRunner::start(&p, |c| c.name = name.clone()).await?;
    let rows: Vec<Value> =
        (0..40).map(|i| json!({"id": format!("w{i:02}"), "title": format!("Wireless {i}")})).collect();
    p.upsert_rows("products", json!(rows)).await?;
    apply_file(&p, "examples/tag-products-writethrough/function.yaml").await?;
    let st = p.drained("tag-products-wt", Duration::from_secs(120)).await?;
    assert_eq!(st["counts"]["completed"], 40, "{st}");
    assert_eq!(st["counts"]["dropped"], 0, "its own writes never make it stale: {st}");
    assert_eq!(st["failed_count"], 0, "{st}");
    let (_, d) = p.call(Method::GET, "/v2/namespaces/products/documents/w07", None).await?;
    assert_eq!(d["attributes"]["tags"], json!(["wireless"]), "{d}");
    assert_eq!(d["attributes"]["_hevlayer_udf_tag_products_wt_v"], "v1", "{d}");
    runner.stop().await?;
    Ok(())
}
