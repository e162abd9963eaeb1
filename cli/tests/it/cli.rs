//! The `layer` client commands as a well-kept CLI, through the real binary
//! against an in-process platform: rounded figures and true summaries in
//! `layer run`, a query that says when `--top-k` cut it, help on every
//! command and argument, no colour off a terminal or with `NO_COLOR`, a
//! quiet end on a closed pipe, empty tables that say why, and `layer apply`
//! reading YAML by the 1.2 core schema.

use std::io::Read as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::{ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use layer_tests::{TestPlatform, TestRunner};
use reqwest::Method;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_layer");

/// The binary against `p`, with none of the caller's settings.
fn layer_cmd(p: &TestPlatform, args: &[&str]) -> tokio::process::Command {
    let mut c = tokio::process::Command::new(BIN);
    c.args(args)
        .env("LAYER_URL", &p.url)
        .env("LAYER_API_KEY", &p.admin_key)
        .env_remove("NO_COLOR")
        .env_remove("CLICOLOR_FORCE")
        .env_remove("LAYER_LOG")
        .env_remove("LAYER_LOG_FORMAT")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    c
}

async fn layer(p: &TestPlatform, args: &[&str]) -> Result<Output> {
    let out = tokio::time::timeout(Duration::from_secs(120), layer_cmd(p, args).output())
        .await
        .with_context(|| format!("layer {args:?} did not finish"))??;
    Ok(out)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn both(o: &Output) -> String {
    format!("--- stdout\n{}--- stderr\n{}", stdout(o), stderr(o))
}

/// A scratch directory for this test process.
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("layer-cli-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A pull Function document over `namespace`, written as a JSON file.
fn pull_function_file(dir: &std::path::Path, name: &str, namespace: &str) -> PathBuf {
    let doc = json!({"apiVersion": "hevlayer.com/v1alpha1", "kind": "Function", "metadata": {"name": name},
                     "spec": pull_spec(namespace)});
    let f = dir.join(format!("{name}.json"));
    std::fs::write(&f, doc.to_string()).unwrap();
    f
}

fn pull_spec(namespace: &str) -> Value {
    json!({"targetNamespaces": [namespace], "inputs": ["id"], "version": "v1",
           "worker": {"dispatch": "pull", "batchSize": 32, "timeoutSeconds": 30},
           "triggers": ["discovery", "write"]})
}

fn rows(prefix: &str, n: usize) -> Value {
    json!((0..n).map(|i| json!({"id": format!("{prefix}{i:05}"), "pad": "x".repeat(32)})).collect::<Vec<_>>())
}

/// A pull worker played by the test: what it holds and what it reports.
struct PullWorker<'a> {
    p: &'a TestPlatform,
    udf: String,
    held: Vec<Value>,
}

impl<'a> PullWorker<'a> {
    fn new(p: &'a TestPlatform, udf: &str) -> Self {
        PullWorker { p, udf: udf.to_string(), held: Vec::new() }
    }

    /// Claims until it holds `n` rows (they may still be on their way to the queue).
    async fn claim(&mut self, n: usize) -> Result<()> {
        let start = Instant::now();
        while self.held.len() < n {
            let body = json!({"worker_id": "test-worker", "limit": n - self.held.len()});
            let (s, r) = self.p.call(Method::POST, &format!("/v2/udfs/{}/claim", self.udf), Some(body)).await?;
            ensure!(s == 200, "claim: {r}");
            self.held.extend(r["items"].as_array().cloned().unwrap_or_default());
            ensure!(start.elapsed() < Duration::from_secs(30), "only {} rows to claim after 30 s", self.held.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    async fn report(&mut self, n: usize, verb: &str, extra: Value) -> Result<()> {
        let items: Vec<Value> = self
            .held
            .drain(..n)
            .map(|i| {
                let mut item = json!({"namespace": i["namespace"], "id": i["id"]});
                item.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
                item
            })
            .collect();
        let body = json!({"worker_id": "test-worker", "items": items});
        let (s, r) = self.p.call(Method::POST, &format!("/v2/udfs/{}/items/{verb}", self.udf), Some(body)).await?;
        ensure!(s == 200 && r["updated"] == n, "{verb}: {r}");
        Ok(())
    }

    async fn complete(&mut self, n: usize) -> Result<()> {
        self.report(n, "complete", json!({"attributes": {"tag": "t"}})).await
    }

    async fn fail_permanently(&mut self, n: usize) -> Result<()> {
        self.report(n, "fail", json!({"kind": "permanent", "message": "bad row"})).await
    }
}

/// Waits until `read()` contains `needle`; returns what it read.
async fn wait_for(what: &str, needle: &str, read: impl Fn() -> String) -> Result<String> {
    let start = Instant::now();
    loop {
        let text = read();
        if text.contains(needle) {
            return Ok(text);
        }
        ensure!(start.elapsed() < Duration::from_secs(60), "{what} never showed {needle:?}:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every `N rows/s` figure has one decimal, and no rate is written any
/// other way (indicatif's `{per_sec}` writes `28.761299987/s`).
fn assert_rates_rounded(text: &str) {
    let mut figures = 0;
    for (at, _) in text.match_indices("/s") {
        let before = &text[..at];
        assert!(before.ends_with(" rows"), "a rate not in rows/s at {at}: {text}");
        let figure = before.trim_end_matches(" rows").rsplit([' ', '(', '\r', '\n']).next().unwrap_or_default();
        let (whole, decimals) = figure.split_once('.').unwrap_or((figure, ""));
        assert!(
            !whole.is_empty() && whole.bytes().all(|b| b.is_ascii_digit()) && decimals.len() == 1,
            "{figure:?} is not rounded to one decimal: {text}"
        );
        figures += 1;
    }
    assert!(figures > 0, "no rate at all: {text}");
}

/// The SGR (colour and style) escape sequences in `text`: `ESC [ ... m`.
/// Cursor movement (a progress bar redrawing itself) is not colour.
fn colour_codes(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("\x1b[") {
        let tail = &rest[i + 2..];
        let end = tail.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(tail.len());
        if tail[end..].starts_with('m') {
            found.push(format!("ESC[{}m", &tail[..end]));
        }
        rest = &tail[end..];
    }
    found
}

/// A pseudo-terminal for a child's stdout and stderr, read as it writes.
struct Pty {
    output: Arc<Mutex<Vec<u8>>>,
    reader: std::thread::JoinHandle<()>,
}

impl Pty {
    /// Puts `c`'s stdout and stderr on a new 50x200 terminal. Drop `c`
    /// after spawning it, so the child holds the last copy of the terminal.
    fn attach(c: &mut tokio::process::Command) -> Pty {
        let size = nix::pty::Winsize { ws_row: 50, ws_col: 200, ws_xpixel: 0, ws_ypixel: 0 };
        let pty = nix::pty::openpty(&size, None).expect("openpty");
        c.stdout(Stdio::from(pty.slave.try_clone().expect("dup"))).stderr(Stdio::from(pty.slave));
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut master = std::fs::File::from(pty.master);
        let sink = output.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            // EIO once the child has closed its side.
            while let Ok(n @ 1..) = master.read(&mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Pty { output, reader }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Everything the child wrote, once it has closed the terminal.
    fn finish(self) -> String {
        self.reader.join().unwrap();
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }
}

/// Runs the binary on a terminal to the end: its status and output.
async fn on_terminal(mut c: tokio::process::Command) -> Result<(ExitStatus, String)> {
    let pty = Pty::attach(&mut c);
    let mut child = c.spawn()?;
    drop(c);
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await.context("no exit")??;
    Ok((status, tokio::task::spawn_blocking(move || pty.finish()).await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_run_prints_rounded_rates_true_counts_and_already_complete() -> Result<()> {
    let p = TestPlatform::start().await?;
    let dir = scratch("run");
    p.upsert_rows("items", rows("i", 24)).await?;
    let file = pull_function_file(&dir, "tags", "items");
    let err_path = dir.join("run.err");
    let mut run = layer_cmd(&p, &["run", "-f", file.to_str().unwrap(), "--timeout", "60"])
        .stdout(std::fs::File::create(dir.join("run.out"))?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()?;
    let read = || std::fs::read_to_string(&err_path).unwrap_or_default();
    // The apply's own sweep queues the rows (discovery then finds nothing
    // new): `layer run` says what is queued, not "enqueued 0 rows".
    wait_for("layer run", "tags: 24 rows queued in items", read).await?;
    let mut worker = PullWorker::new(&p, "tags");
    worker.claim(24).await?;
    worker.complete(6).await?;
    // Off a terminal, a line every 2 s.
    wait_for("layer run", "tags: 6/24 rows, ", read).await?;
    worker.complete(18).await?;
    let status = tokio::time::timeout(Duration::from_secs(60), run.wait()).await??;
    let err = read();
    assert!(status.success(), "{status}: {err}");
    assert!(err.contains("tags: 24 rows done in "), "{err}");
    assert!(!err.contains("enqueued 0"), "{err}");
    assert_rates_rounded(&err);
    assert!(colour_codes(&err).is_empty(), "{err:?}");

    // Again: nothing is left to do, and it says so with the real numbers.
    let o = layer(&p, &["run", "-f", file.to_str().unwrap(), "--timeout", "60"]).await?;
    assert!(o.status.success(), "{}", both(&o));
    assert!(stderr(&o).contains("tags: already complete: 24 of 24 rows"), "{}", both(&o));
    assert!(!stderr(&o).contains("rows done") && !stderr(&o).contains("queued"), "{}", both(&o));

    // A new row that fails for good: nothing left to do, one failed, exit 1.
    p.upsert_rows("items", json!([{"id": "bad"}])).await?;
    worker.claim(1).await?;
    worker.fail_permanently(1).await?;
    let o = layer(&p, &["run", "-f", file.to_str().unwrap(), "--timeout", "60"]).await?;
    assert!(!o.status.success(), "{}", both(&o));
    assert!(stderr(&o).contains("tags: nothing left to do: 24 of 25 rows done, 1 failed"), "{}", both(&o));
    assert!(stderr(&o).contains("1 rows failed"), "{}", both(&o));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_run_on_a_terminal_draws_rounded_rates_and_no_bar_at_zero() -> Result<()> {
    let p = TestPlatform::start().await?;
    let dir = scratch("run-tty");
    p.upsert_rows("items", rows("i", 24)).await?;
    let file = pull_function_file(&dir, "tags", "items");
    let mut c = layer_cmd(&p, &["run", "-f", file.to_str().unwrap(), "--timeout", "60"]);
    let pty = Pty::attach(&mut c);
    let mut run = c.spawn()?;
    drop(c);
    wait_for("layer run", "tags: 24 rows queued", || pty.text()).await?;
    let mut worker = PullWorker::new(&p, "tags");
    worker.claim(24).await?;
    worker.complete(12).await?;
    // The bar, with the count and a rate.
    wait_for("the progress bar", "12/24 rows", || pty.text()).await?;
    worker.complete(12).await?;
    let status = tokio::time::timeout(Duration::from_secs(60), run.wait()).await??;
    let out = tokio::task::spawn_blocking(move || pty.finish()).await?;
    assert!(status.success(), "{status}: {out}");
    assert!(out.contains("24/24 rows"), "{out}");
    // On a line of its own, below the bar.
    assert!(out.contains("\r\ntags: 24 rows done in "), "{out:?}");
    assert_rates_rounded(&out);
    assert!(colour_codes(&out).is_empty(), "{out:?}");

    // Nothing to do: no bar at all (indicatif draws 0/0 as full).
    let (status, out) = on_terminal(layer_cmd(&p, &["run", "-f", file.to_str().unwrap()])).await?;
    assert!(status.success(), "{status}: {out}");
    assert!(out.contains("tags: already complete: 24 of 24 rows"), "{out}");
    assert!(!out.contains("0/0") && !out.contains("[="), "{out:?}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_query_says_when_top_k_cut_the_answer() -> Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("few", rows("f", 12)).await?;
    let lines = |o: &Output| stdout(o).lines().count();

    let o = layer(&p, &["rows", "query", "few", "--top-k", "10"]).await?;
    assert!(o.status.success(), "{}", both(&o));
    assert_eq!(lines(&o), 10, "{}", both(&o));
    assert!(
        stderr(&o).contains("showing the first 10 rows (--top-k 10); there are more: raise --top-k or narrow --filter"),
        "{}",
        both(&o)
    );
    // Exactly top_k rows exist: all shown, nothing said.
    for k in ["12", "20"] {
        let o = layer(&p, &["rows", "query", "few", "--top-k", k]).await?;
        assert_eq!((lines(&o), stderr(&o)), (12, String::new()), "--top-k {k}: {}", both(&o));
    }
    let o = layer(&p, &["rows", "query", "few", "--filter", r#"["id", "Eq", "nope"]"#]).await?;
    assert_eq!((lines(&o), stderr(&o).trim()), (0, "no rows of few match --filter"), "{}", both(&o));

    // At the platform's largest top_k one more cannot be asked for.
    p.upsert_rows("many", rows("m", 10_000)).await?;
    let o = layer(&p, &["rows", "query", "many", "--top-k", "10000"]).await?;
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(lines(&o), 10_000);
    assert!(stderr(&o).contains("showing the first 10000 rows (--top-k 10000); there may be more"), "{}", stderr(&o));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_stdout_pipe_ends_the_command_quietly() -> Result<()> {
    let p = TestPlatform::start().await?;
    // Far more than a pipe holds (64 KiB), so writes go on after `head` left.
    p.upsert_rows("many", rows("m", 10_000)).await?;
    let mut child = layer_cmd(&p, &["rows", "query", "many", "--top-k", "10000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut out = tokio::io::BufReader::new(child.stdout.take().context("stdout")?);
    let mut err = child.stderr.take().context("stderr")?;
    let mut first = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut first).await?;
    // The pipe's last reader goes, as `head -1` does.
    drop(out);
    assert!(first.starts_with("{\"id\":"), "{first}");
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait()).await??;
    let mut text = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut err, &mut text).await?;
    // println! panicked here: "failed printing to stdout: Broken pipe".
    assert!(!text.contains("panicked") && !text.contains("error"), "{text}");
    assert!(status.success() || status.signal() == Some(nix::sys::signal::Signal::SIGPIPE as i32), "{status}: {text}");
    Ok(())
}

/// The `Commands:`, `Arguments:` and `Options:` entries of a `-h` page
/// that have no description (on their line, or on the next as clap puts
/// it when the page is wide), and the subcommands listed.
fn undocumented_entries(help: &str) -> (Vec<String>, Vec<String>) {
    let lines: Vec<&str> = help.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let (mut missing, mut subcommands) = (Vec::new(), Vec::new());
    let mut section = "";
    for (i, line) in lines.iter().enumerate() {
        if !line.starts_with(' ') {
            section = line.trim();
            continue;
        }
        // Descriptions on their own line sit at 10 or more.
        if !matches!(section, "Commands:" | "Arguments:" | "Options:") || line.trim().is_empty() || indent(line) >= 10 {
            continue;
        }
        let entry = line.trim();
        let described_here = entry.split_once("  ").is_some_and(|(_, d)| !d.trim().is_empty());
        let described_below = lines.get(i + 1).is_some_and(|n| !n.trim().is_empty() && indent(n) >= 10);
        if !described_here && !described_below {
            missing.push(entry.to_string());
        }
        if section == "Commands:" {
            subcommands.push(entry.split_whitespace().next().unwrap_or_default().to_string());
        }
    }
    (missing, subcommands)
}

#[test]
fn every_command_and_argument_has_help() {
    // The reader itself finds what is missing, in both of clap's layouts.
    let sample = "Commands:\n  list\n  get   One Function\n\nArguments:\n  <NAME>\n\nOptions:\n      --limit <LIMIT>\n  \
                  -h, --help  Print help\n";
    assert_eq!(undocumented_entries(sample).0, ["list", "<NAME>", "--limit <LIMIT>"]);
    let wide = "Options:\n      --slots <SLOTS>\n          Batches run at once\n      --name <NAME>\n  -h, --help\n          Print help\n";
    assert_eq!(undocumented_entries(wide).0, ["--name <NAME>"]);

    let mut todo: Vec<Vec<String>> = vec![vec![]];
    let mut pages = 0;
    let mut missing = Vec::new();
    while let Some(path) = todo.pop() {
        let o = std::process::Command::new(BIN).args(&path).arg("-h").env_remove("NO_COLOR").output().unwrap();
        assert!(o.status.success(), "layer {path:?} -h: {}", both(&o));
        let help = stdout(&o);
        assert!(colour_codes(&help).is_empty() && !help.contains('\x1b'), "colour in a pipe: {help:?}");
        pages += 1;
        let (undocumented, subcommands) = undocumented_entries(&help);
        missing.extend(undocumented.into_iter().map(|e| format!("layer {} {e}", path.join(" "))));
        for s in subcommands.into_iter().filter(|s| s != "help") {
            todo.push([path.clone(), vec![s]].concat());
        }
    }
    // layer, its 10 commands, and the subcommands of runners, keys, udf, rows.
    assert!(pages >= 30, "only {pages} help pages walked");
    assert!(missing.is_empty(), "without help text:\n{}", missing.join("\n"));
}

/// Runs `layer platform` on a fresh database until it listens, then stops
/// it with SIGTERM; what it wrote.
async fn platform_output(db_url: &str, terminal: bool, env: &[(&str, &str)]) -> Result<String> {
    let dir = scratch("platform");
    let log = dir.join("platform.log");
    let mut c = tokio::process::Command::new(BIN);
    c.args(["platform", "--database-url", db_url, "--listen", "127.0.0.1:0"])
        .env_remove("NO_COLOR")
        .env_remove("LAYER_LOG")
        .env_remove("LAYER_LOG_FORMAT")
        .env_remove("LAYER_API_KEY")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let pty = if terminal {
        Some(Pty::attach(&mut c))
    } else {
        let f = std::fs::File::create(&log)?;
        c.stdout(f.try_clone()?).stderr(f);
        None
    };
    let mut child = c.spawn()?;
    drop(c);
    let read = || match &pty {
        Some(t) => t.text(),
        None => std::fs::read_to_string(&log).unwrap_or_default(),
    };
    wait_for("layer platform", "Layer platform listening on", read).await?;
    let pid = nix::unistd::Pid::from_raw(child.id().context("pid")? as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    let text = match pty {
        Some(t) => tokio::task::spawn_blocking(move || t.finish()).await?,
        None => read(),
    };
    let _ = std::fs::remove_dir_all(&dir);
    Ok(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_colour_off_a_terminal_or_with_no_color() -> Result<()> {
    let db = layer_tests::TestDb::create().await?;
    let url = db.url();
    // The log lines: a file gets none (tracing's default colours it).
    let log = platform_output(&url, false, &[]).await?;
    assert!(log.contains("platform listening"), "{log}");
    assert!(!log.contains('\x1b'), "{log:?}");
    // On a terminal: colour, unless NO_COLOR is set to anything but "".
    let log = platform_output(&url, true, &[]).await?;
    assert!(!colour_codes(&log).is_empty(), "a terminal gets colour: {log:?}");
    let log = platform_output(&url, true, &[("NO_COLOR", "1")]).await?;
    assert!(log.contains("platform listening") && !log.contains('\x1b'), "{log:?}");
    let log = platform_output(&url, true, &[("NO_COLOR", "")]).await?;
    assert!(!colour_codes(&log).is_empty(), "an empty NO_COLOR is unset: {log:?}");

    // clap's help and errors likewise.
    let help = |no_color: Option<&str>, args: &[&str]| {
        let mut c = tokio::process::Command::new(BIN);
        c.args(args).env_remove("NO_COLOR").env_remove("CLICOLOR_FORCE").stdin(Stdio::null());
        if let Some(v) = no_color {
            c.env("NO_COLOR", v);
        }
        on_terminal(c)
    };
    let (_, out) = help(None, &["udf", "batches", "-h"]).await?;
    assert!(!colour_codes(&out).is_empty(), "a terminal gets colour: {out:?}");
    for args in [&["udf", "batches", "-h"][..], &["udf", "nope"]] {
        let (_, out) = help(Some("1"), args).await?;
        assert!(out.contains("Usage") && !out.contains('\x1b'), "{args:?}: {out:?}");
        let o = std::process::Command::new(BIN).args(args).env_remove("NO_COLOR").output()?;
        assert!(!both(&o).contains('\x1b'), "{args:?}: {}", both(&o));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_tables_say_why() -> Result<()> {
    let p = TestPlatform::start().await?;
    let said = |o: &Output| stdout(o).trim().to_string();

    let o = layer(&p, &["udf", "list"]).await?;
    assert_eq!(said(&o), "no Functions yet: `layer apply -f FILE` creates one", "{}", both(&o));
    let o = layer(&p, &["runners", "list"]).await?;
    assert_eq!(
        said(&o),
        "no runners: push Functions need one (`layer runner --platform URL`; `layer dev` starts one); pull workers need none",
        "{}",
        both(&o)
    );
    let o = layer(&p, &["rows", "namespaces"]).await?;
    assert_eq!(said(&o), "no namespaces yet: `layer rows upsert NS -f FILE` creates one", "{}", both(&o));
    p.upsert_rows("items", rows("i", 3)).await?;
    let o = layer(&p, &["rows", "namespaces", "--prefix", "zz"]).await?;
    assert_eq!(said(&o), "no namespace starts with zz", "{}", both(&o));
    let o = layer(&p, &["rows", "namespaces"]).await?;
    assert!(said(&o).starts_with("NAMESPACE") && said(&o).contains("items"), "{}", both(&o));
    // JSON stays JSON.
    let o = layer(&p, &["runners", "list", "--json"]).await?;
    assert_eq!(said(&o), "[]", "{}", both(&o));

    // A pull Function has no batch records at all.
    p.apply_function("tags", pull_spec("items")).await?;
    let o = layer(&p, &["udf", "batches", "tags"]).await?;
    assert!(o.status.success(), "{}", both(&o));
    assert_eq!(
        said(&o),
        "no batch records: tags is a pull Function, whose workers claim rows themselves; \
         `layer udf get tags` shows its row counts",
        "{}",
        both(&o)
    );
    // A push Function with no runner: none yet.
    let push = json!({"targetNamespaces": ["items"], "inputs": ["id"],
                      "worker": {"dispatch": "push", "command": ["true"], "batchSize": 10}});
    p.apply_function("pushed", push).await?;
    let o = layer(&p, &["udf", "batches", "pushed"]).await?;
    assert_eq!(
        said(&o),
        "no batch records of pushed yet: one is written when a batch is sent to a runner \
         (`layer udf get pushed` says why none is)",
        "{}",
        both(&o)
    );
    let o = layer(&p, &["udf", "batches", "pushed", "--state", "reported"]).await?;
    assert_eq!(said(&o), "no batch records of pushed match --state, --runner and --since", "{}", both(&o));

    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_a_worker_that_printed_nothing_say_so() -> Result<()> {
    let p = TestPlatform::start().await?;
    let _runner = TestRunner::start(&p, |_| {}).await?;
    p.upsert_rows("echo", rows("e", 5)).await?;
    // The Rust echo worker writes nothing.
    let spec = json!({"targetNamespaces": ["echo"], "inputs": ["id"],
                      "worker": {"dispatch": "push", "command": [layer_tests::echo_worker_binary()?], "batchSize": 10},
                      "scaling": {"replicas": {"min": 1, "max": 1}}});
    p.apply_function("echo", spec).await?;
    p.drained("echo", Duration::from_secs(60)).await?;
    let o = layer(&p, &["logs", "echo"]).await?;
    assert!(o.status.success(), "{}", both(&o));
    let out = stdout(&o);
    let mut lines = out.lines();
    let header = lines.next().unwrap_or_default();
    assert!(header.starts_with("==> ") && header.ends_with(" <=="), "{out}");
    assert_eq!(lines.next(), Some("(this worker has printed nothing on stdout or stderr)"), "{out}");
    Ok(())
}

/// YAML 1.2 core schema through `layer apply -f`: an input, a filter value
/// or an Index label spelt `n`, `y`, `on`, `no`, `off` or `yes` stays a
/// string (YAML 1.1 would make it a boolean); `true`/`false` stay booleans
/// where a boolean is expected, and `yes` there is refused, naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_reads_yaml_by_the_1_2_core_schema() -> Result<()> {
    let p = TestPlatform::start().await?;
    let dir = scratch("yaml-core");
    let file = dir.join("norway.yaml");
    std::fs::write(
        &file,
        "apiVersion: hevlayer.com/v1alpha1
kind: Index
metadata:
  name: answers
  labels:
    on: yes
    y: n
    off: no
---
apiVersion: hevlayer.com/v1alpha1
kind: Function
metadata:
  name: norway
spec:
  targetNamespaces: [answers]
  inputs: [id, n, y, on, no, off, yes]
  filter: [And, [[country, Eq, no], [flag, In, [y, n, on, off]], [ok, Eq, true]]]
  paused: true
  worker:
    dispatch: pull
",
    )?;
    let o = layer(&p, &["apply", "-f", file.to_str().unwrap()]).await?;
    assert!(o.status.success(), "{}", both(&o));

    let (_, g) = p.call(Method::GET, "/v2/udfs/norway", None).await?;
    let spec = &g["udf"]["spec"];
    assert_eq!(spec["inputs"], json!(["id", "n", "y", "on", "no", "off", "yes"]), "{g}");
    let filter = json!(["And", [["country", "Eq", "no"], ["flag", "In", ["y", "n", "on", "off"]], ["ok", "Eq", true]]]);
    assert_eq!(spec["filter"], filter, "{g}");
    assert_eq!(g["udf"]["paused"], true, "{g}");
    let (_, list) = p.call(Method::GET, "/v2/indexes", None).await?;
    assert_eq!(list["indexes"][0]["labels"], json!({"on": "yes", "y": "n", "off": "no"}), "{list}");
    // The stored filter selects by those strings.
    p.upsert_rows(
        "answers",
        json!([{"id": "a", "country": "no", "flag": "on", "ok": true},
               {"id": "b", "country": false, "flag": false, "ok": true},
               {"id": "c", "country": "no", "flag": "y", "ok": "true"}]),
    )
    .await?;
    let (_, q) = p.call(Method::POST, "/v2/namespaces/answers/query", Some(json!({"filters": filter}))).await?;
    let ids: Vec<&str> = q["rows"].as_array().unwrap().iter().filter_map(|r| r["id"].as_str()).collect();
    assert_eq!(ids, ["a"], "{q}");

    // `yes` where a boolean is expected is a string, refused by name.
    let bad = dir.join("paused-yes.yaml");
    let text = std::fs::read_to_string(&file)?.replace("paused: true", "paused: yes");
    std::fs::write(&bad, text)?;
    let o = layer(&p, &["apply", "-f", bad.to_str().unwrap()]).await?;
    assert!(!o.status.success(), "{}", both(&o));
    assert!(stderr(&o).contains("spec.paused: expected true or false, got \"yes\""), "{}", both(&o));
    Ok(())
}

/// One convention across the commands: `rows get` and `rows query` print a
/// row in the same shape, enum values are lowercase, table columns line up
/// whatever a key's name, errors about flags are worded for the flags, a
/// missing key is called missing, and a spelled-out operator gets its name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_speaks_one_convention() -> Result<()> {
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", rows("i", 3)).await?;

    // The same row, the same shape: `id` and the attributes, flat.
    let got = layer(&p, &["rows", "get", "items", "i00001"]).await?;
    ensure!(got.status.success(), "{}", both(&got));
    let got: Value = serde_json::from_str(&stdout(&got))?;
    let queried = layer(&p, &["rows", "query", "items", "--filter", r#"["id", "Eq", "i00001"]"#]).await?;
    ensure!(queried.status.success(), "{}", both(&queried));
    let queried: Value = serde_json::from_str(stdout(&queried).lines().next().unwrap_or_default())?;
    ensure!(got["id"] == "i00001" && got["pad"] == "x".repeat(32) && got.get("attributes").is_none(), "{got}");
    let keys = |v: &Value| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()).unwrap_or_default();
    ensure!(keys(&got) == keys(&queried), "rows get {got} and rows query {queried} differ in shape");

    // Lowercase enum values, as in the resource YAML.
    p.apply_function("tags", pull_spec("items")).await?;
    let o = layer(&p, &["udf", "get", "tags"]).await?;
    ensure!(stdout(&o).contains("dispatch:   pull, batch 32 rows"), "{}", both(&o));
    let o = layer(&p, &["udf", "list"]).await?;
    ensure!(stdout(&o).lines().nth(1).is_some_and(|l| l.split_whitespace().nth(2) == Some("pull")), "{}", both(&o));

    // A worker key's long name does not push its row out of line.
    let _runner = TestRunner::start(&p, |_| {}).await?;
    let (s, r) = p.call(Method::GET, "/v2/runners", None).await?;
    ensure!(s == 200, "{r}");
    let runner = r["runners"][0].clone();
    let udf = layer_platform::functions::store::get(&p.pool, "tags").await?;
    layer_platform::auth::store::mint_worker_key(
        &p.pool,
        runner["id"].as_str().unwrap_or_default(),
        runner["name"].as_str().unwrap_or_default(),
        &udf,
    )
    .await?;
    let o = layer(&p, &["keys", "list"]).await?;
    let table = stdout(&o);
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    let (phase, created) = (header.find("PHASE").unwrap_or(0), header.find("CREATED").unwrap_or(0));
    ensure!(phase > 0 && created > phase, "{table}");
    let mut worker_rows = 0;
    for line in lines {
        ensure!(line.get(phase..).is_some_and(|rest| rest.starts_with("active ")), "PHASE out of line:\n{table}");
        ensure!(line.get(created..).is_some_and(|rest| rest.starts_with("20")), "CREATED out of line:\n{table}");
        worker_rows += usize::from(line.contains("worker tags on "));
    }
    ensure!(worker_rows == 1, "no worker key listed:\n{table}");

    // Errors in the CLI's words.
    let o = layer(&p, &["rows", "query", "items", "--rank-by", "pad:up"]).await?;
    ensure!(!o.status.success(), "{}", both(&o));
    ensure!(
        stderr(&o).contains("--rank-by pad:up: write ATTRIBUTE or ATTRIBUTE:asc or ATTRIBUTE:desc"),
        "{}",
        both(&o)
    );
    let o = layer(&p, &["rows", "query", "items", "--filter", r#"["pad", "Equals", "x"]"#]).await?;
    ensure!(!o.status.success() && stderr(&o).contains("(did you mean Eq?)"), "{}", both(&o));
    let o = tokio::time::timeout(
        Duration::from_secs(60),
        layer_cmd(&p, &["udf", "list"]).env_remove("LAYER_API_KEY").output(),
    )
    .await??;
    ensure!(!o.status.success() && stderr(&o).contains("no API key set: set LAYER_API_KEY"), "{}", both(&o));
    ensure!(!stderr(&o).contains("refused"), "{}", both(&o));
    let o = tokio::time::timeout(
        Duration::from_secs(60),
        layer_cmd(&p, &["udf", "list"]).env("LAYER_API_KEY", "lyr_not_a_key_0123456789").output(),
    )
    .await??;
    ensure!(!o.status.success() && stderr(&o).contains("the platform refused the API key"), "{}", both(&o));
    Ok(())
}

/// A Function paused while `layer run` waits: once nothing has moved for
/// the stall timeout it gives up, says the Function is paused and how to go
/// on, and exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_run_gives_up_on_a_paused_function_saying_how_to_go_on() -> Result<()> {
    use tokio::io::AsyncBufReadExt as _;
    let p = TestPlatform::start().await?;
    p.upsert_rows("items", rows("i", 3)).await?;
    let dir = scratch("paused");
    let file = pull_function_file(&dir, "tags", "items");
    let mut run = layer_cmd(&p, &["run", "-f", file.to_str().unwrap_or_default(), "--stall-timeout", "6"])
        .stderr(Stdio::piped())
        .spawn()?;
    let mut lines = tokio::io::BufReader::new(run.stderr.take().context("stderr")?).lines();
    let mut said = String::new();
    // Watching: it has printed the Function's condition (no worker yet).
    while !said.contains("tags: NoWorker") {
        let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await??;
        said.push_str(&line.context("layer run ended before it watched")?);
        said.push('\n');
    }
    let (s, r) = p.call(Method::POST, "/v2/udfs/tags/pause", None).await?;
    ensure!(s == 200, "pause: {r}");
    while let Some(line) = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await?? {
        said.push_str(&line);
        said.push('\n');
    }
    let status = run.wait().await?;
    ensure!(!status.success(), "{said}");
    ensure!(said.contains("tags: nothing moved for 6 s (3 rows pending, none processing)"), "{said}");
    ensure!(said.contains("it is paused: `layer udf resume tags` goes on"), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `layer invoke` writes the answer to stdout and fails with the problem's
/// title on stderr; `layer calls` lists the calls and `layer calls get`
/// shows one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layer_invoke_prints_the_answer_or_the_problem_and_layer_calls_lists_them() -> Result<()> {
    let p = TestPlatform::start().await?;
    let runner = TestRunner::start(&p, |_| {}).await?;
    let ws = layer_tests::workspace_dir();
    let worker = ws.join("examples/tag-products/worker.py");
    let spec = json!({"targetNamespaces": ["products"], "inputs": ["id", "title"],
                      "worker": {"dispatch": "push", "command": ["python3", worker]}});
    p.apply_function("tagger", spec).await?;

    let o = layer(&p, &["invoke", "tagger", "-d", r#"{"id": "p1", "title": "Wireless mouse"}"#]).await?;
    ensure!(o.status.success(), "{}", both(&o));
    ensure!(stdout(&o) == r#"{"tags":["wireless"]}"#, "the answer as it came: {}", both(&o));

    let dir = scratch("invoke");
    let input = dir.join("input.json");
    std::fs::write(&input, r#"{"id": "p2"}"#)?;
    let o = layer(&p, &["invoke", "tagger", "-d", &format!("@{}", input.display())]).await?;
    ensure!(o.status.code() == Some(1) && stdout(&o).is_empty(), "{}", both(&o));
    let err = stderr(&o);
    ensure!(err.contains("The Function refused the input") && err.contains("p2: missing title"), "{err}");
    ensure!(err.contains("(call call_"), "the call id is named: {err}");

    let o = layer(&p, &["invoke", "tagger", "-d", "{not json"]).await?;
    ensure!(!o.status.success() && stderr(&o).contains("-d is not JSON"), "{}", both(&o));
    let o = layer(&p, &["invoke", "no-such-fn"]).await?;
    ensure!(!o.status.success() && stderr(&o).contains("No such Function"), "{}", both(&o));

    // Both calls are listed once recorded (after their answers).
    let listed = wait_for("two recorded calls", "failed", || {
        let o = std::process::Command::new(BIN)
            .args(["calls", "tagger"])
            .env("LAYER_URL", &p.url)
            .env("LAYER_API_KEY", &p.admin_key)
            .output()
            .expect("layer calls runs");
        // Both records, whichever was written first.
        let text = stdout(&o);
        if text.contains("succeeded") { text } else { String::new() }
    })
    .await?;
    ensure!(listed.starts_with("CALL") && listed.contains("succeeded") && listed.contains("422"), "{listed}");
    let id = listed.lines().nth(1).and_then(|l| l.split_whitespace().next()).context("a call row")?.to_string();
    let o = layer(&p, &["calls", "get", &id]).await?;
    ensure!(o.status.success() && stdout(&o).contains(&format!("call:      {id}")), "{}", both(&o));
    ensure!(stdout(&o).contains("status:    failed (HTTP 422)"), "the newest call failed: {}", both(&o));
    runner.stop().await?;
    Ok(())
}
