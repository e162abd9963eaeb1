//! Benchmarks that print figures (never timed tests). See docs/benchmarks.md
//! for how to run them and the figures recorded.
//!
//! `upsert`: starts an embedded PostgreSQL with the same durable settings as
//! `layer dev` and the platform in this process, then upserts `--rows`
//! documents through the HTTP API in writes of `--batch`, with `--writers`
//! concurrent clients, and prints rows/s and per-write latency.
//!
//! `drain` (W1-pull): runs `layer platform` as its own process over an
//! embedded PostgreSQL, fills a namespace, and drains it with no-op pull
//! workers at each `--batch`, printing rows/s and CPU-seconds per 1,000 rows
//! for the platform and for PostgreSQL.
//!
//! `push` (W1-push): the same drain through platform → `layer runner` →
//! the Rust echo worker, after the pull drain of the same size in the same
//! run, with CPU-seconds per process; before them the ceiling (the
//! writeback statement alone, one and two backends) and after them
//! PgQueuer, all on the same PostgreSQL, then each figure's ratio to the
//! two-backend ceiling and to PgQueuer. `latency` (W2): write-to-marker
//! latency of single rows with the `write` trigger and a warm worker.
//!
//! `containers` (W6): write-to-marker with a cold and a warm worker
//! container, and the container's start alone.
//!
//! `calls` (W3): the overhead of a call through platform and runner over
//! calling the same warm worker directly, at idle and at half the peak,
//! the peak calls/s, and a two-hop nginx chain as the reference.
//!
//! `discovery`: a namespace of `--rows` rows that are already complete, then
//! `--new` rows written; prints how long the incremental sweep takes.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::{Parser, Subcommand};

mod calls;
mod ceiling;
mod drain;
mod push;
use layer_platform::embedded::{EmbeddedOptions, EmbeddedPostgres};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "Layer benchmarks")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Upsert documents through the API.
    Upsert {
        #[arg(long, default_value_t = 200_000)]
        rows: usize,
        #[arg(long, default_value_t = 1_000)]
        batch: usize,
        /// Concurrent writers (each writes its share of the batches).
        #[arg(long, default_value_t = 1)]
        writers: usize,
        /// Where the throwaway cluster lives (removed afterwards).
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
    },
    /// W1-pull: drain a namespace with no-op pull workers.
    Drain {
        #[arg(long, default_value_t = 200_000)]
        rows: usize,
        /// Batch sizes to measure, one drain each.
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        batch: Vec<usize>,
        /// Concurrent workers.
        #[arg(long, default_value_t = 2)]
        workers: usize,
    },
    /// W1-push: drain through platform → runner → Rust echo worker, beside
    /// the pull path.
    Push {
        #[arg(long, default_value_t = 200_000)]
        rows: usize,
        #[arg(long, value_delimiter = ',', default_value = "100,1000")]
        batch: Vec<usize>,
        /// Pull workers for the pull drain of the same run.
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// The runner's slots (batches at once).
        #[arg(long, default_value_t = 4)]
        slots: u32,
    },
    /// W2: single-row write-to-marker latency at idle (write trigger, push).
    Latency {
        #[arg(long, default_value_t = 200)]
        samples: usize,
    },
    /// W6: write-to-marker with a cold and a warm worker container, and the
    /// container's own start alone (needs `layer/echo-rust:dev`).
    Containers {
        #[arg(long, default_value_t = 10)]
        samples: usize,
    },
    /// W3: calls through platform and runner against the worker alone and
    /// a two-hop nginx chain.
    Calls {
        /// Calls per idle measurement.
        #[arg(long, default_value_t = 2_000)]
        samples: usize,
        /// Concurrent callers for the peak.
        #[arg(long, default_value_t = 16)]
        clients: usize,
    },
    /// Incremental discovery over a large, already complete namespace.
    Discovery {
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
        #[arg(long, default_value_t = 1_000)]
        new: usize,
        /// Incremental sweeps to measure.
        #[arg(long, default_value_t = 5)]
        repeat: usize,
    },
}

const CATEGORIES: [&str; 4] = ["outdoor", "indoor", "kitchen", "garden"];

fn document(i: usize) -> Value {
    json!({
        "id": format!("p{i:08}"),
        "title": format!("Product {i} wireless waterproof edition"),
        "description": "A sturdy thing for everyday use, tested in rain and sun.",
        "category": CATEGORIES[i % 4],
        "price": (i % 1000) as f64 + 0.99,
        "tags": ["sale", CATEGORIES[(i / 4) % 4]],
    })
}

/// `LAYER_LOG` for the platform and runners the benchmarks start:
/// `LAYER_BENCH_LOG` when set (e.g. `info,sqlx::query=debug` to see every
/// statement's time), else `warn`.
fn child_log() -> String {
    std::env::var("LAYER_BENCH_LOG").unwrap_or_else(|_| "warn".into())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn upsert(rows: usize, batch: usize, writers: usize, data_dir: Option<std::path::PathBuf>) -> Result<()> {
    let dir = data_dir.unwrap_or_else(|| std::env::temp_dir().join(format!("layer-bench-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&dir);
    let pg = EmbeddedPostgres::start(EmbeddedOptions { data_dir: dir.clone(), port: 5432, ephemeral: false }).await?;
    let shutdown = CancellationToken::new();
    let mut config = layer_platform::Config::new(pg.options(layer_platform::embedded::DATABASE));
    config.listen = "127.0.0.1:0".parse()?;
    config.bootstrap_admin_key = Some("lyr_bench_admin_key_0123456789".into());
    let started = layer_platform::start(config, shutdown.clone()).await?;
    let url = format!("http://{}/v2/namespaces/bench", started.addr);

    // Bodies are serialised before the clock starts: the figure is the
    // platform's, not the client's JSON encoder's.
    let bodies: Vec<Vec<u8>> = (0..rows)
        .step_by(batch)
        .map(|start| {
            let docs: Vec<Value> = (start..(start + batch).min(rows)).map(document).collect();
            serde_json::to_vec(&json!({ "upsert_rows": docs })).unwrap()
        })
        .collect();
    let bytes: usize = bodies.iter().map(Vec::len).sum();
    let http = reqwest::Client::new();
    let chunks: Vec<Vec<Vec<u8>>> =
        (0..writers).map(|w| bodies.iter().skip(w).step_by(writers).cloned().collect()).collect();

    eprintln!(
        "upserting {rows} documents ({:.1} MiB of JSON) in writes of {batch} with {writers} writer(s)...",
        bytes as f64 / 1048576.0
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for chunk in chunks {
        let http = http.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(chunk.len());
            for body in chunk {
                let t = Instant::now();
                let r = http
                    .post(&url)
                    .bearer_auth("lyr_bench_admin_key_0123456789")
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await?;
                ensure!(r.status() == 200, "write failed: {}", r.text().await?);
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let elapsed = start.elapsed();
    lat.sort();
    let check = reqwest::Client::new()
        .get(format!("http://{}/v2/namespaces?prefix=bench", started.addr))
        .bearer_auth("lyr_bench_admin_key_0123456789")
        .send()
        .await?
        .json::<Value>()
        .await?;
    let stored = check["namespaces"][0]["row_count"].as_i64().context("row count")?;
    ensure!(stored as usize == rows, "stored {stored} rows, expected {rows}");

    println!(
        "upsert: {rows} docs, writes of {batch}, {writers} writer(s): {:.2} s, {:.0} rows/s",
        elapsed.as_secs_f64(),
        rows as f64 / elapsed.as_secs_f64()
    );
    println!(
        "  per write: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3
    );
    shutdown.cancel();
    started.wait().await?;
    pg.stop().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().bench {
        Bench::Upsert { rows, batch, writers, data_dir } => upsert(rows, batch, writers, data_dir).await,
        Bench::Drain { rows, batch, workers } => drain::run(rows, &batch, workers).await,
        Bench::Push { rows, batch, workers, slots } => push::w1_push(rows, &batch, workers, slots).await,
        Bench::Latency { samples } => push::w2(samples).await,
        Bench::Containers { samples } => push::w6(samples).await,
        Bench::Calls { samples, clients } => calls::w3(samples, clients).await,
        Bench::Discovery { rows, new, repeat } => drain::discovery(rows, new, repeat).await,
    }
}
