//! `layer run -f FILE`: apply, discover, and watch the queue drain with a
//! progress bar (rows done / total, rate, ETA, failures).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use layer_protocol::function::UdfStatus;
use layer_protocol::resource::parse_documents;
use layer_protocol::work::DiscoverResponse;
use serde_json::json;

use crate::client::{Client, seg};

struct Watched {
    name: String,
    bar: ProgressBar,
    completed_at_start: i64,
    failed_at_start: i64,
    started: Instant,
    last_progress: Instant,
    last_done: i64,
}

/// Applies the files, starts discovery for every Function in them, and waits
/// until their queues drain. Fails if rows ended in `failed`.
pub async fn run(client: &Client, files: &[PathBuf], timeout: Option<Duration>) -> Result<()> {
    crate::commands::apply(client, files, false).await?;
    let mut names = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f)?;
        for doc in parse_documents(&text)? {
            if doc["kind"] == "Function"
                && let Some(n) = doc["metadata"]["name"].as_str()
            {
                names.push(n.to_string());
            }
        }
    }
    if names.is_empty() {
        bail!(
            "no Function in {}: nothing to run",
            files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    let multi = MultiProgress::new();
    let tty = std::io::stderr().is_terminal();
    let style =
        ProgressStyle::with_template("{prefix:>16} [{bar:32}] {pos}/{len} rows  {per_sec:>9}  eta {eta:<4} {msg}")?
            .progress_chars("=> ");
    let mut watched = Vec::new();
    for name in names {
        let st: UdfStatus = client.get(&format!("/v2/udfs/{}/status", seg(&name))).await?;
        let d: DiscoverResponse = client.post(&format!("/v2/udfs/{}/discover", seg(&name)), &json!({})).await?;
        eprintln!("{name}: discovery enqueued {} rows over {}", d.enqueued, d.namespaces.join(", "));
        let bar = multi.add(ProgressBar::new(0));
        bar.set_style(style.clone());
        bar.set_prefix(name.clone());
        if !tty {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        watched.push(Watched {
            name,
            bar,
            completed_at_start: st.counts.get("completed").copied().unwrap_or(0),
            failed_at_start: st.failed_count,
            started: Instant::now(),
            last_progress: Instant::now(),
            last_done: 0,
        });
    }
    let begun = Instant::now();
    let mut last_line = Instant::now();
    let mut failed_total;
    loop {
        let mut all_drained = true;
        failed_total = 0;
        for w in &mut watched {
            let st: UdfStatus = client.get(&format!("/v2/udfs/{}/status", seg(&w.name))).await?;
            let done = st.counts.get("completed").copied().unwrap_or(0) - w.completed_at_start;
            let failed_new = (st.failed_count - w.failed_at_start).max(0);
            let remaining = st.pending_count + st.processing_count;
            failed_total += st.failed_count;
            w.bar.set_length((done + failed_new + remaining) as u64);
            w.bar.set_position((done + failed_new) as u64);
            if done != w.last_done {
                w.last_done = done;
                w.last_progress = Instant::now();
            }
            let mut msg = if st.failed_count > 0 { format!("{} failed", st.failed_count) } else { String::new() };
            if st.paused {
                msg.push_str(" (paused)");
            } else if remaining > 0 && st.processing_count == 0 && w.last_progress.elapsed() > Duration::from_secs(10) {
                msg.push_str(" waiting for workers: start one for this Function");
            }
            w.bar.set_message(msg.clone());
            if !tty && last_line.elapsed() > Duration::from_secs(2) {
                let rate = done as f64 / w.started.elapsed().as_secs_f64().max(1e-3);
                eprintln!("{}: {done}/{} rows, {rate:.0} rows/s, {msg}", w.name, done + failed_new + remaining);
            }
            if remaining > 0 {
                all_drained = false;
            }
        }
        if !tty && last_line.elapsed() > Duration::from_secs(2) {
            last_line = Instant::now();
        }
        if all_drained {
            break;
        }
        if let Some(t) = timeout
            && begun.elapsed() > t
        {
            for w in &watched {
                w.bar.abandon();
            }
            bail!("the queue did not drain within {} s", t.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for w in &watched {
        w.bar.finish();
        eprintln!("{}: {} rows done in {:.1} s", w.name, w.last_done, w.started.elapsed().as_secs_f64());
    }
    if failed_total > 0 {
        bail!(
            "{failed_total} rows failed: `layer udf get NAME` shows the counts, `layer udf reset-failed NAME` retries them"
        );
    }
    Ok(())
}
