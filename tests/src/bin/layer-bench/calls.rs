//! W3: the overhead of a call through platform and runner
//! (`POST /v2/udfs/{id}/calls`) over calling the same warm worker directly
//! (the Rust echo worker's `POST /run`), at idle and at half the measured
//! peak, the peak calls/s, and, as the reference a user would otherwise
//! deploy, the same request through a two-hop nginx reverse-proxy chain
//! (skipped with a note where `nginx` is not installed).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};

use crate::drain::{KEY, call};
use crate::push::{echo_binary, start_runner, stop_runner, with_platform};

/// A child process stopped when dropped: asked to (SIGTERM), so a master
/// such as nginx's takes its workers with it.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_ready(http: &reqwest::Client, url: &str) -> Result<()> {
    let start = Instant::now();
    while !http.get(url).send().await.is_ok_and(|r| r.status().is_success()) {
        ensure!(start.elapsed() < Duration::from_secs(20), "{url} never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// One way to send the same call.
#[derive(Clone)]
struct Target {
    url: String,
    body: Value,
    auth: bool,
}

impl Target {
    async fn once(&self, http: &reqwest::Client) -> Result<Duration> {
        let t = Instant::now();
        let mut r = http.post(&self.url).json(&self.body);
        if self.auth {
            r = r.bearer_auth(KEY);
        }
        let resp = r.send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        ensure!(status.is_success(), "{}: {status} {}", self.url, String::from_utf8_lossy(&bytes));
        Ok(t.elapsed())
    }

    /// `n` calls one after another.
    async fn idle(&self, http: &reqwest::Client, n: usize) -> Result<Vec<Duration>> {
        for _ in 0..20 {
            self.once(http).await?;
        }
        let mut times = Vec::with_capacity(n);
        for _ in 0..n {
            times.push(self.once(http).await?);
        }
        times.sort();
        Ok(times)
    }

    /// As many calls as `clients` concurrent callers manage in `secs`.
    async fn peak(&self, http: &reqwest::Client, clients: usize, secs: f64) -> Result<f64> {
        let done = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..clients {
            let (t, http, done, stop) = (self.clone(), http.clone(), done.clone(), stop.clone());
            tasks.spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    t.once(&http).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<_, anyhow::Error>(())
            });
        }
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        let n = done.load(Ordering::Relaxed);
        let elapsed = start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        Ok(n as f64 / elapsed)
    }

    /// `n` calls started at `rate` per second (open loop), their latencies.
    async fn paced(&self, http: &reqwest::Client, rate: f64, n: usize) -> Result<Vec<Duration>> {
        let mut tasks = tokio::task::JoinSet::new();
        let start = Instant::now();
        for i in 0..n {
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(at.into()).await;
            let (t, http) = (self.clone(), http.clone());
            tasks.spawn(async move { t.once(&http).await });
        }
        let mut times = Vec::with_capacity(n);
        while let Some(r) = tasks.join_next().await {
            times.push(r??);
        }
        times.sort();
        Ok(times)
    }
}

fn ms(times: &[Duration], q: f64) -> f64 {
    crate::percentile(times, q).as_secs_f64() * 1000.0
}

/// nginx with two proxies in a chain, the first on `port` → the second →
/// `upstream`; none where `nginx` is not installed.
fn nginx_chain(dir: &Path, port: u16, upstream: &str) -> Result<Option<Proc>> {
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"].into_iter().map(PathBuf::from).find(|p| p.exists());
    let Some(nginx) = nginx else { return Ok(None) };
    let inner = free_port()?;
    std::fs::create_dir_all(dir.join("logs"))?;
    let conf = format!(
        "worker_processes 2; daemon off; pid {dir}/nginx.pid; error_log {dir}/logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fcgi; uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream worker {{ server {upstream}; keepalive 32; }}
  upstream hop2 {{ server 127.0.0.1:{inner}; keepalive 32; }}
  server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://hop2; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}
  server {{ listen 127.0.0.1:{inner}; location / {{ proxy_pass http://worker; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}
}}
",
        dir = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new(nginx)
        .args(["-p", &dir.display().to_string(), "-c", &path.display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx")?;
    Ok(Some(Proc(child)))
}

pub async fn w3(samples: usize, clients: usize) -> Result<()> {
    let echo = echo_binary()?;
    with_platform("w3", |http, platform, _, _| async move {
        let runner = start_runner(&http, &platform, 4).await?;
        // Two warm workers, the most the runner keeps: one per core.
        let doc = json!({"apiVersion": "hevlayer.com/v1alpha1", "kind": "Function", "metadata": {"name": "echo"},
            "spec": {"targetNamespaces": ["echo"], "inputs": ["id"],
                     "worker": {"dispatch": "push", "command": [echo], "timeoutSeconds": 30},
                     "scaling": {"mode": "fixed", "replicas": {"min": 2, "max": 2}}}});
        call(&http, reqwest::Method::POST, format!("{}/v2/apply", platform.url), json!({"documents": [doc]})).await?;
        let input = json!({"id": "p1", "title": "Wireless speaker"});

        // The same worker binary, called directly, with the batch of one
        // item the runner sends it.
        let port = free_port()?;
        let direct = Proc(Command::new(&echo).env("PORT", port.to_string()).stdout(Stdio::null()).spawn()?);
        let direct_url = format!("127.0.0.1:{port}");
        wait_ready(&http, &format!("http://{direct_url}/healthz")).await?;
        let batch = json!({"udf_id": "echo", "version": "v1", "batch_id": 0,
                           "items": [{"namespace": "", "id": "call_x", "input": input}]});
        let alone = Target { url: format!("http://{direct_url}/run"), body: batch.clone(), auth: false };
        let through = Target { url: format!("{}/v2/udfs/echo/calls", platform.url), body: input, auth: true };
        // The first calls start the workers; then they are warm.
        through.once(&http).await?;

        let dir = std::env::temp_dir().join(format!("layer-bench-w3-nginx-{}", std::process::id()));
        let nginx_port = free_port()?;
        let nginx = nginx_chain(&dir, nginx_port, &direct_url)?;
        let proxied = Target { url: format!("http://127.0.0.1:{nginx_port}/run"), body: batch, auth: false };
        if nginx.is_some() {
            wait_ready(&http, &format!("http://127.0.0.1:{nginx_port}/healthz")).await?;
        }

        let a = alone.idle(&http, samples).await?;
        let t = through.idle(&http, samples).await?;
        let n = if nginx.is_some() { Some(proxied.idle(&http, samples).await?) } else { None };
        let over = |q: f64| ms(&t, q) - ms(&a, q);
        println!(
            "W3 idle, {samples} calls one after another: worker alone p50 {:.3} ms p99 {:.3} ms; through platform+runner p50 {:.3} ms p99 {:.3} ms: overhead p50 {:.3} ms p99 {:.3} ms",
            ms(&a, 0.5),
            ms(&a, 0.99),
            ms(&t, 0.5),
            ms(&t, 0.99),
            over(0.5),
            over(0.99)
        );
        match &n {
            Some(n) => {
                let added = |q: f64| ms(n, q) - ms(&a, q);
                println!(
                    "W3 idle, reference: two-hop nginx chain p50 {:.3} ms p99 {:.3} ms: added p50 {:.3} ms p99 {:.3} ms; Layer's overhead / nginx's: p50 {:.2}x p99 {:.2}x",
                    ms(n, 0.5),
                    ms(n, 0.99),
                    added(0.5),
                    added(0.99),
                    over(0.5) / added(0.5),
                    over(0.99) / added(0.99)
                );
            }
            None => println!("W3 reference skipped: nginx is not installed (apt-get install nginx)"),
        }

        let peak = through.peak(&http, clients, 10.0).await?;
        let peak_alone = alone.peak(&http, clients, 5.0).await?;
        println!(
            "W3 peak, {clients} concurrent callers: {peak:.0} calls/s through platform+runner ({peak_alone:.0}/s to the worker alone)"
        );
        let half = peak / 2.0;
        let n_half = (half * 10.0) as usize;
        let th = through.paced(&http, half, n_half).await?;
        let ah = alone.paced(&http, half, n_half).await?;
        println!(
            "W3 at half the peak ({half:.0} calls/s, {n_half} calls): worker alone p50 {:.3} ms p99 {:.3} ms; through p50 {:.3} ms p99 {:.3} ms: overhead p50 {:.3} ms p99 {:.3} ms",
            ms(&ah, 0.5),
            ms(&ah, 0.99),
            ms(&th, 0.5),
            ms(&th, 0.99),
            ms(&th, 0.5) - ms(&ah, 0.5),
            ms(&th, 0.99) - ms(&ah, 0.99)
        );
        drop(nginx);
        let _ = std::fs::remove_dir_all(&dir);
        drop(direct);
        stop_runner(&http, &platform, runner).await?;
        if peak <= 0.0 {
            bail!("no call completed");
        }
        Ok(())
    })
    .await
}
