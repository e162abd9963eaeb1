//! The `layer` binary as a newcomer uses it: `layer dev` on a fresh data
//! directory, a restart that keeps the data, a clean stop on SIGTERM, and
//! the client commands against it.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_layer");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn data_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("layer-dev-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

struct Dev {
    child: Child,
    url: String,
    stdout: PathBuf,
    /// The platform's log.
    stderr: PathBuf,
}

impl Dev {
    fn start(dir: &Path, port: u16, key: Option<&str>) -> Dev {
        Self::start_with_env(dir, port, key, &[])
    }

    fn start_with_env(dir: &Path, port: u16, key: Option<&str>, env: &[(&str, &str)]) -> Dev {
        Self::start_in(dir, port, key, env, None)
    }

    /// `cwd`: where `layer dev` runs (its runner starts local workers there).
    fn start_in(dir: &Path, port: u16, key: Option<&str>, env: &[(&str, &str)], cwd: Option<&Path>) -> Dev {
        std::fs::create_dir_all(dir).unwrap();
        let stdout = dir.with_extension(format!("{port}.out"));
        let stderr = dir.with_extension(format!("{port}.log"));
        let mut cmd = Command::new(BIN);
        cmd.args(["dev", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(dir)
            .env_remove("LAYER_API_KEY")
            .stdout(std::fs::File::create(&stdout).unwrap())
            .stderr(std::fs::File::create(&stderr).unwrap());
        if let Some(k) = key {
            cmd.env("LAYER_API_KEY", k);
        }
        cmd.envs(env.iter().copied());
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        let child = cmd.spawn().unwrap();
        Dev { child, url: format!("http://127.0.0.1:{port}"), stdout, stderr }
    }

    /// Waits for `/healthz`; returns how long it took.
    fn wait_healthy(&mut self) -> Duration {
        let start = Instant::now();
        loop {
            if let Ok(r) = reqwest::blocking::get(format!("{}/healthz", self.url))
                && r.status() == 200
            {
                return start.elapsed();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "layer dev exited early ({status}): {}",
                    std::fs::read_to_string(&self.stdout).unwrap_or_default()
                );
            }
            assert!(start.elapsed() < Duration::from_secs(120), "no /healthz after 120 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for it to exit by itself (a refusal); its exit status.
    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < within, "layer dev still runs after {within:?}: {}", self.output());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Its banner, once complete (the next steps follow the runner's start,
    /// which comes after `/healthz` answers).
    fn banner(&self) -> String {
        let start = Instant::now();
        loop {
            let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
            if out.contains("Stop with Ctrl-C") {
                return out;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "no complete banner after 60 s: {out}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What it printed, stdout then stderr.
    fn output(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
            + &std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    fn stop(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "layer dev did not stop on SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A test that fails before `stop` leaves no `layer dev` behind.
impl Drop for Dev {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SIGTERM first, so it stops its PostgreSQL too.
            let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let start = Instant::now();
            while matches!(self.child.try_wait(), Ok(None)) && start.elapsed() < Duration::from_secs(20) {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn layer(url: &str, key: &str, args: &[&str]) -> Output {
    Command::new(BIN).args(args).env("LAYER_URL", url).env("LAYER_API_KEY", key).output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn dev_starts_keeps_data_across_restarts_and_stops_cleanly() {
    let dir = data_dir("restart");
    let key = "lyr_dev_test_key_0123456789";
    let port = free_port();
    let mut dev = Dev::start(&dir, port, Some(key));
    let took = dev.wait_healthy();
    eprintln!("first start (initdb included) answered /healthz after {took:?}");

    let rows = dir.with_extension("rows.jsonl");
    std::fs::write(&rows, "{\"id\": \"p1\", \"title\": \"Wireless mouse\"}\n{\"id\": \"p2\", \"title\": \"Tent\"}\n")
        .unwrap();
    let o = layer(&dev.url, key, &["rows", "upsert", "products", "-f", rows.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("upserted 2 rows"), "{}", text(&o));

    let status = dev.stop();
    assert!(status.success(), "layer dev exited with {status}");
    assert!(!dir.join("pg/postmaster.pid").exists(), "PostgreSQL was not stopped");

    let mut dev = Dev::start(&dir, port, None);
    let took = dev.wait_healthy();
    eprintln!("restart answered /healthz after {took:?}");
    let o = layer(&dev.url, key, &["rows", "get", "products", "p2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("Tent"), "{}", text(&o));
    let banner = dev.banner();
    assert!(!banner.contains("was minted") && !banner.contains("lyr_"), "no key is minted on restart: {banner}");
    assert!(banner.contains("layer run -f examples/tag-products/function.yaml"), "the next steps: {banner}");

    // The client commands end to end.
    let f = dir.with_extension("fn.yaml");
    let yaml = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/functions/tag-products.yaml"))
        .unwrap();
    std::fs::write(&f, yaml.replace("batchSize", "batchsize")).unwrap();
    let o = layer(&dev.url, key, &["apply", "-f", f.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(text(&o).contains("spec.worker.batchsize: unknown field, did you mean batchSize"), "{}", text(&o));
    std::fs::write(&f, yaml).unwrap();
    let o = layer(&dev.url, key, &["apply", "-f", f.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "function/tag-products created (revision 1)");
    let o = layer(&dev.url, key, &["udf", "list"]);
    assert!(text(&o).contains("tag-products"), "{}", text(&o));

    let o = layer(&dev.url, key, &["keys", "create", "ci", "--scope", "read"]);
    assert!(o.status.success(), "{}", text(&o));
    let token = text(&o).split_whitespace().find(|w| w.starts_with("lyr_")).unwrap().to_string();
    let o = layer(&dev.url, &token, &["rows", "query", "products", "--filter", "[\"title\", \"Glob\", \"Wire*\"]"]);
    assert!(o.status.success() && text(&o).contains("p1") && !text(&o).contains("p2"), "{}", text(&o));
    let o = layer(&dev.url, &token, &["rows", "upsert", "products", "-f", rows.to_str().unwrap()]);
    assert!(!o.status.success() && text(&o).contains("403"), "{}", text(&o));
    let o = layer(&dev.url, "lyr_wrong", &["udf", "list"]);
    assert!(!o.status.success() && text(&o).contains("LAYER_API_KEY"), "{}", text(&o));

    assert!(dev.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_fresh_dev_without_a_key_mints_and_prints_one() {
    let dir = data_dir("mint");
    let mut dev = Dev::start(&dir, free_port(), None);
    dev.wait_healthy();
    let out = dev.banner();
    let key =
        out.split("export LAYER_API_KEY=").nth(1).and_then(|s| s.split_whitespace().next()).expect(&out).to_string();
    // The key in a block of its own, below everything start-up printed.
    let block: Vec<&str> = out.split("=".repeat(76).as_str()).collect();
    assert_eq!(block.len(), 3, "one ruled block: {out}");
    assert!(block[1].contains("An admin API key was minted") && block[1].contains(&key), "{out}");
    assert!(block[0].contains("runner ") && block[2].contains("Next, in another terminal"), "{out}");
    let o = layer(&dev.url, &key, &["keys", "list"]);
    assert!(o.status.success() && text(&o).contains("bootstrap-admin"), "{}", text(&o));
    // Use the key for a while (a bad one too), then look for it in every log.
    for args in [&["udf", "list"][..], &["rows", "namespaces"][..]] {
        assert!(layer(&dev.url, &key, args).status.success());
    }
    assert!(!layer(&dev.url, &format!("{key}x"), &["udf", "list"]).status.success());
    let log_path = dev.stderr.clone();
    assert!(dev.stop().success());
    let platform_log = std::fs::read_to_string(&log_path).unwrap();
    assert!(platform_log.contains("/v2/udfs"), "the platform logs its requests: {platform_log}");
    for log in [platform_log, std::fs::read_to_string(dir.join("postgres.log")).unwrap_or_default()] {
        assert!(!log.contains(&key), "the key reached a log");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// As root, a data directory under a directory PostgreSQL's user cannot
/// enter is refused before anything is initialised, with the `chmod` to run.
#[test]
fn a_data_dir_postgres_cannot_reach_is_refused_with_the_chmod_to_run() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("not root: PostgreSQL runs as the caller, so no directory can stop it");
        return;
    }
    let private = data_dir("private");
    std::fs::create_dir_all(&private).unwrap();
    std::fs::set_permissions(&private, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let dir = private.join("data");
    let o = Command::new(BIN).args(["dev", "--listen", "127.0.0.1:0", "--data-dir"]).arg(&dir).output().unwrap();
    let said = text(&o);
    let _ = std::fs::remove_dir_all(&private);
    assert!(!o.status.success(), "{said}");
    assert!(said.contains(&format!("chmod o+x {}", private.display())), "{said}");
    assert!(said.contains("mode 0700, owner root") && said.contains("nothing was initialised"), "{said}");
    assert!(!said.contains("initialising PostgreSQL"), "it went on to initdb: {said}");
}

#[test]
fn missing_postgres_binaries_say_what_to_install() {
    let o = Command::new(BIN)
        .args(["dev", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir("nobin"))
        .env("LAYER_PG_BINDIR", "/nonexistent/pg/bin")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("does not contain initdb and postgres"), "{}", text(&o));

    let o = Command::new(BIN).args(["udf", "list", "--url", "http://127.0.0.1:9"]).output().unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("is `layer dev` (or `layer platform`) running?"), "{}", text(&o));
}

#[test]
fn layer_run_drains_with_the_seed_worker_and_fails_on_failed_rows() {
    let dir = data_dir("run");
    let key = "lyr_run_test_key_0123456789";
    let mut dev = Dev::start(&dir, free_port(), Some(key));
    dev.wait_healthy();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tag-products-pull");
    let o = layer(&dev.url, key, &["rows", "upsert", "products", "-f", &format!("{example}/products.jsonl")]);
    assert!(o.status.success(), "{}", text(&o));
    let function = format!("{example}/function.yaml");
    // No worker yet: it shows the Function's condition once, then gives up
    // when nothing has moved for the stall timeout, and exits non-zero.
    let o = layer(&dev.url, key, &["run", "-f", &function, "--stall-timeout", "2", "--timeout", "60"]);
    let said = text(&o);
    assert!(!o.status.success(), "{said}");
    assert_eq!(said.matches("product-tags: NoWorker: 24 rows are pending").count(), 1, "{said}");
    assert!(
        said.contains("product-tags: nothing moved for 2 s (24 rows pending, none processing); NoWorker"),
        "{said}"
    );
    assert!(!said.contains("did not drain within"), "{said}");
    let python = layer_tests::python_with_hevlayer().unwrap();
    let mut worker = Command::new(python)
        .arg(format!("{example}/worker.py"))
        .env("HEVLAYER_BASE_URL", &dev.url)
        .env("LAYER_GATEWAY_API_KEY", key)
        .spawn()
        .unwrap();
    let o = layer(&dev.url, key, &["run", "-f", &function, "--timeout", "60"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("product-tags: 24 rows done"), "{}", text(&o));
    let o = layer(&dev.url, key, &["udf", "get", "product-tags"]);
    assert!(text(&o).contains("0 pending, 0 processing, 0 failed"), "{}", text(&o));
    let o = layer(&dev.url, key, &["rows", "get", "products", "p002"]);
    assert!(
        text(&o).contains("\"wireless\"") && text(&o).contains("\"_hevlayer_udf_product_tags_v\": \"v1\""),
        "{}",
        text(&o)
    );

    // A row without a title fails permanently: `layer run` says so and exits 1.
    let bad = dir.with_extension("bad.jsonl");
    std::fs::write(&bad, "{\"id\": \"untitled\", \"category\": \"outdoor\"}\n").unwrap();
    assert!(layer(&dev.url, key, &["rows", "upsert", "products", "-f", bad.to_str().unwrap()]).status.success());
    let o = layer(&dev.url, key, &["run", "-f", &function, "--timeout", "60"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("1 rows failed"), "{}", text(&o));
    let o = layer(&dev.url, key, &["udf", "reset-failed", "product-tags"]);
    assert!(text(&o).contains("1 failed rows of product-tags are back in the queue"), "{}", text(&o));

    worker.kill().unwrap();
    let _ = worker.wait();
    assert!(dev.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// The issue's "done when" for observability, on the real binary: a push
/// run under `layer dev` with `OTEL_EXPORTER_OTLP_ENDPOINT` set exports one
/// connected trace per batch, JSON log lines of a batch carry its trace id,
/// and `promtool` (where installed) accepts both `/metrics` outputs.
#[test]
fn a_push_run_under_dev_exports_one_trace_per_batch_with_json_logs() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (otlp, spans) = rt.block_on(layer_tests::otlp::otlp_receiver()).unwrap();
    let dir = data_dir("otel");
    let key = "lyr_otel_test_key_0123456789";
    let env = [("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()), ("LAYER_LOG_FORMAT", "json")];
    let mut dev = Dev::start_with_env(&dir, free_port(), Some(key), &env);
    dev.wait_healthy();
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/tag-products");
    let o = layer(&dev.url, key, &["rows", "upsert", "products", "-f", &format!("{example}/products.jsonl")]);
    assert!(o.status.success(), "{}", text(&o));
    // The example names its worker relative to the repository root.
    let doc = std::fs::read_to_string(format!("{example}/function.yaml"))
        .unwrap()
        .replace("examples/tag-products/worker.py", &format!("{example}/worker.py"));
    let function = dir.with_extension("function.yaml");
    std::fs::write(&function, doc).unwrap();
    let o = layer(&dev.url, key, &["run", "-f", function.to_str().unwrap(), "--timeout", "60"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = layer(&dev.url, key, &["udf", "batches", "product-tags-push", "--json"]);
    assert!(o.status.success(), "{}", text(&o));
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let traces: Vec<String> =
        list["batches"].as_array().unwrap().iter().map(|b| b["trace_id"].as_str().unwrap().to_string()).collect();
    assert_eq!(traces.len(), 3, "24 rows at batch 8: {list}");

    // Every batch: one trace, one root, the spans of platform, runner and report.
    let start = Instant::now();
    for trace in &traces {
        loop {
            let got: Vec<layer_tests::otlp::GotSpan> =
                spans.lock().unwrap().iter().filter(|s| &s.trace_id == trace).cloned().collect();
            if layer_tests::otlp::BATCH_SPANS.iter().all(|w| got.iter().any(|s| s.name == *w)) {
                let roots: Vec<&str> = got.iter().filter(|s| s.parent_id.is_empty()).map(|s| s.name.as_str()).collect();
                assert_eq!(roots, ["layer.batch"], "{got:#?}");
                for s in &got {
                    assert!(
                        s.parent_id.is_empty() || got.iter().any(|p| p.span_id == s.parent_id),
                        "{} is cut off from its trace: {got:#?}",
                        s.name
                    );
                    assert_eq!(s.service, "layer");
                }
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "trace {trace}: {got:#?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    // Metrics from both ports pass promtool.
    let runner = std::fs::read_to_string(&dev.stdout)
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("runner ").and_then(|r| r.split(" on ").nth(1)))
        .and_then(|r| r.split_whitespace().next())
        .map(str::to_string)
        .expect("the banner names the runner's address");
    for url in [dev.url.clone(), runner] {
        let text = reqwest::blocking::get(format!("{url}/metrics")).unwrap().text().unwrap();
        assert!(text.contains("layer_"), "{url}/metrics: {text}");
        layer_tests::otlp::promtool_accepts(&text, &url).unwrap();
    }

    let stderr = dev.stderr.clone();
    assert!(dev.stop().success());
    // Every log line is JSON; those written inside a batch carry its trace.
    let log = std::fs::read_to_string(&stderr).unwrap();
    let lines: Vec<serde_json::Value> =
        log.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect();
    let traced: Vec<&str> = lines.iter().filter_map(|l| l["span"]["trace_id"].as_str()).collect();
    assert!(traces.iter().any(|t| traced.contains(&t.as_str())), "no log line carries a batch's trace: {log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The pid in the cluster's `postmaster.pid`.
fn postmaster_pid(dir: &Path) -> i32 {
    let text = std::fs::read_to_string(dir.join("pg/postmaster.pid")).expect("postmaster.pid");
    text.lines().next().unwrap().trim().parse().unwrap()
}

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

fn healthz(url: &str) -> u16 {
    reqwest::blocking::get(format!("{url}/healthz")).map(|r| r.status().as_u16()).unwrap_or(0)
}

#[test]
fn a_second_dev_on_a_live_data_dir_refuses_at_once_and_leaves_the_first_alone() {
    let dir = data_dir("twice");
    let key = "lyr_twice_test_key_0123456789";
    let port = free_port();
    let mut first = Dev::start(&dir, port, Some(key));
    let first_pid = first.child.id();
    // As soon as the first holds the data directory (long before its
    // PostgreSQL answers), a second start on it.
    let start = Instant::now();
    while std::fs::read_to_string(dir.join("layer-dev.pid")).unwrap_or_default().trim() != first_pid.to_string() {
        assert!(start.elapsed() < Duration::from_secs(30), "the first layer dev never locked {}", dir.display());
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut early = Dev::start(&dir, free_port(), Some(key));
    let status = early.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    let refusal = format!("is in use by another `layer dev` (pid {first_pid})");
    assert!(early.output().contains(&refusal), "{}", early.output());

    first.wait_healthy();
    let postmaster = postmaster_pid(&dir);
    // Once it serves, another start (on its own port too) is refused the same way.
    let mut late = Dev::start(&dir, port, None);
    assert!(!late.wait_exit(Duration::from_secs(10)).success());
    assert!(late.output().contains(&refusal), "{}", late.output());
    assert!(!late.output().contains("adopting"), "{}", late.output());

    // The first is untouched: same PostgreSQL, still serving, keys valid.
    assert_eq!(postmaster_pid(&dir), postmaster);
    assert_eq!(healthz(&first.url), 200);
    let o = layer(&first.url, key, &["udf", "list"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(first.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_taken_listen_address_is_refused_before_anything_is_initialised() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = data_dir("taken");
    let mut dev = Dev::start(&dir, port, None);
    let status = dev.wait_exit(Duration::from_secs(10));
    assert!(!status.success());
    let out = dev.output();
    assert!(
        out.contains(&format!("cannot listen on 127.0.0.1:{port}")) && out.contains("another process listens there"),
        "{out}"
    );
    assert!(!dir.join("pg").exists(), "a PostgreSQL cluster was initialised for a start that could not listen");
    assert!(!dir.join("layer-dev.pid").exists(), "the refused start left its pid file behind");
    drop(taken);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_dev_killed_with_sigkill_leaves_a_postgres_that_the_next_start_adopts() {
    let dir = data_dir("adopt");
    let key = "lyr_adopt_test_key_0123456789";
    let port = free_port();
    let mut dev = Dev::start(&dir, port, Some(key));
    dev.wait_healthy();
    let rows = dir.with_extension("rows.jsonl");
    std::fs::write(&rows, "{\"id\": \"p1\", \"title\": \"Lamp\"}\n").unwrap();
    assert!(layer(&dev.url, key, &["rows", "upsert", "products", "-f", rows.to_str().unwrap()]).status.success());
    let postmaster = postmaster_pid(&dir);
    dev.child.kill().unwrap();
    dev.child.wait().unwrap();
    assert!(alive(postmaster), "PostgreSQL went down with its layer dev");

    let mut dev = Dev::start(&dir, port, None);
    dev.wait_healthy();
    assert!(dev.output().contains("adopting a PostgreSQL server left running"), "{}", dev.output());
    assert_eq!(postmaster_pid(&dir), postmaster);
    let o = layer(&dev.url, key, &["rows", "get", "products", "p1"]);
    assert!(o.status.success() && text(&o).contains("Lamp"), "{}", text(&o));
    assert!(dev.stop().success());
    assert!(!dir.join("pg/postmaster.pid").exists(), "the adopted PostgreSQL was not stopped");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The fenced block of `lang` that follows `heading` in the README.
fn readme_block(heading: &str, lang: &str) -> String {
    let readme = std::fs::read_to_string(layer_tests::workspace_dir().join("README.md")).unwrap();
    let section = readme.split(heading).nth(1).unwrap_or_else(|| panic!("README has no {heading}"));
    let open = format!("```{lang}\n");
    let body = section.split(&open).nth(1).unwrap_or_else(|| panic!("no {lang} block after {heading}"));
    body.split("```").next().unwrap().to_string()
}

/// The README's first session, typed as written against a fresh `layer
/// dev` started at the repository root; only the address, the key (from
/// the environment, as after its `export`) and the venv differ: the venv
/// line is checked to be there and stands for the harness's venv, made the
/// same way.
#[test]
fn the_readme_first_session_runs_line_by_line_as_written() {
    let ws = layer_tests::workspace_dir();
    let dir = data_dir("readme");
    let key = "lyr_readme_test_key_0123456789";
    let mut dev = Dev::start_in(&dir, free_port(), Some(key), &[], Some(&ws));
    dev.wait_healthy();
    layer_tests::python_with_hevlayer().unwrap();
    let venv = dir.with_extension("venv");
    let _ = std::fs::remove_file(&venv);
    std::os::unix::fs::symlink(ws.join("target/pyenv"), &venv).unwrap();
    let bin_dir = Path::new(BIN).parent().unwrap().display().to_string();

    let block = readme_block("### A first session", "sh");
    let venv_line = "python3 -m venv .venv && .venv/bin/pip install --quiet hevlayer==0.7.3";
    assert!(block.lines().any(|l| l == venv_line), "installing the client is a step of its own:\n{block}");
    let script: String = block
        .lines()
        .filter(|l| !l.starts_with("export LAYER_API_KEY="))
        .map(|l| if l == venv_line { "true" } else { l })
        .map(|l| {
            l.replace("http://127.0.0.1:8080", &dev.url)
                .replace("$PWD/target/release", &bin_dir)
                .replace(".venv/", &format!("{}/", venv.display()))
        })
        .collect::<Vec<_>>()
        .join("\n");
    let out = dir.with_extension("session.out");
    let mut session = Command::new("bash")
        .args(["-e", "-u", "-c", &script])
        .current_dir(&ws)
        .env("LAYER_API_KEY", key)
        .env("LAYER_URL", &dev.url)
        .env_remove("NO_COLOR")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::from(std::fs::File::options().append(true).open(&out).unwrap()))
        .process_group(0)
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = session.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(240) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(session.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("the first session did not finish in 240 s:\n{}", std::fs::read_to_string(&out).unwrap());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let said = std::fs::read_to_string(&out).unwrap();
    assert!(status.success(), "the first session failed ({status}):\n{said}");
    assert!(said.contains("\"_hevlayer_udf_product_tags_push_v\": \"v1\""), "{said}");
    assert!(said.contains("dev") && said.contains("product-tags-push"), "{said}");
    assert!(said.contains(r#"{"tags":["wireless"]}"#), "the call's answer: {said}");
    assert!(said.contains(r#"{"tags":["waterproof"]}"#), "layer invoke's answer: {said}");
    // The last status it shows, and both Functions' now: nothing left, no
    // problem the reader did not cause.
    let last = said.rsplit("name:       product-tags").next().unwrap_or_default();
    assert!(last.contains("0 pending, 0 processing, 0 failed") && !last.contains("problem:"), "{said}");
    for f in ["product-tags", "product-tags-push"] {
        let o = layer(&dev.url, key, &["udf", "get", f]);
        assert!(text(&o).contains("0 pending, 0 processing, 0 failed"), "{f}: {}", text(&o));
        assert!(!text(&o).contains("problem:"), "{f}: {}", text(&o));
    }
    // The banner's next steps are the session's first steps, in order.
    let banner = dev.banner();
    let steps: Vec<&str> = banner
        .split("Next, in another terminal")
        .nth(1)
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("layer "))
        .collect();
    let commands: Vec<&str> = block
        .lines()
        .filter(|l| l.starts_with("layer "))
        .map(|l| l.split("  #").next().unwrap_or_default().trim_end())
        .collect();
    assert!(!steps.is_empty() && commands.starts_with(&steps), "banner {steps:?}, README {commands:?}");
    // The minted key (none here: the test chose it) would be in its own block.
    assert!(!banner.contains("was minted"), "{banner}");

    // The Python snippet runs as a script.
    let py = dir.with_extension("first.py");
    std::fs::write(
        &py,
        readme_block("Or from Python with the public client", "python").replace("http://127.0.0.1:8080", &dev.url),
    )
    .unwrap();
    let o = Command::new(venv.join("bin/python")).arg(&py).env("LAYER_API_KEY", key).output().unwrap();
    assert!(o.status.success() && text(&o).contains("'title': 'Tent'"), "{}", text(&o));
    assert!(dev.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&venv);
}

/// The README's command to stop the harness's cluster works as root (where
/// `pg_ctl` refuses) and with or without TMPDIR.
#[test]
fn the_readme_command_stops_the_test_cluster() {
    let readme = std::fs::read_to_string(layer_tests::workspace_dir().join("README.md")).unwrap();
    let command = readme
        .lines()
        .find(|l| l.starts_with("kill -INT ") && l.contains("layer-test-pg-"))
        .expect("the README says how to stop the test cluster")
        .to_string();
    let tmp = data_dir("stopcmd");
    std::fs::create_dir_all(&tmp).unwrap();
    // Readable by the unprivileged user PostgreSQL runs as under root.
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let uid = nix::unistd::Uid::effective();
    let cluster = tmp.join(format!("layer-test-pg-{uid}"));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pg = rt
        .block_on(layer_platform::embedded::EmbeddedPostgres::start(layer_platform::embedded::EmbeddedOptions {
            data_dir: cluster.clone(),
            port: 5432,
            ephemeral: true,
        }))
        .unwrap();
    let postmaster = postmaster_pid(&cluster);
    std::mem::forget(pg);
    let o = Command::new("bash").args(["-c", &command]).env("TMPDIR", &tmp).output().unwrap();
    assert!(o.status.success(), "{command}: {}", text(&o));
    // PostgreSQL removes its pid file as it stops (the process itself lingers
    // as this test's zombie, so its pid says nothing).
    let start = Instant::now();
    while cluster.join("pg/postmaster.pid").exists() {
        assert!(start.elapsed() < Duration::from_secs(30), "{command} did not stop the cluster (pid {postmaster})");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Without TMPDIR the command names the default place, as the harness does.
    let path_only = command.replacen("kill -INT", "echo", 1).replacen("head -n 1", "echo", 1);
    let o = Command::new("bash").args(["-c", &path_only]).env_remove("TMPDIR").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), format!("/tmp/layer-test-pg-{uid}/pg/postmaster.pid"));
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `layer dev | head -n 1`: the banner's reader goes away, the platform
/// goes on serving and stops cleanly, nothing panics.
#[test]
fn dev_with_its_stdout_closed_goes_on_serving() {
    use std::io::BufRead as _;
    let dir = data_dir("pipe");
    std::fs::create_dir_all(&dir).unwrap();
    let port = free_port();
    let log = dir.with_extension("pipe.log");
    let mut child = Command::new(BIN)
        .args(["dev", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(&dir)
        .env_remove("LAYER_API_KEY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with("Layer platform listening on"), "{first}");
    // The reader is dropped here, with the rest of the banner still to come.
    let mut dev = Dev { child, url: format!("http://127.0.0.1:{port}"), stdout: log.clone(), stderr: log.clone() };
    dev.wait_healthy();
    let start = Instant::now();
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("runner registered") {
        assert!(start.elapsed() < Duration::from_secs(60), "{}", std::fs::read_to_string(&log).unwrap_or_default());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(healthz(&dev.url), 200);
    assert!(dev.stop().success());
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(!said.contains("panicked"), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}
