//! `layer run -f FILE`: apply, discover, and watch the queue drain with a
//! progress bar (rows done / total, rate, ETA, failures).
//!
//! On a terminal each Function gets a bar once it has rows to count (a bar
//! at 0/0 would show full); elsewhere a line every 2 s. Rates are rows a
//! second with one decimal. A Function with nothing left to do says so with
//! its real numbers (`already complete: 24 of 24 rows`).
//!
//! While it waits it shows the Function's conditions (`NoWorker`,
//! `NoRunner`, ...) as the platform reports them, each once as a line when
//! it appears. With rows left and none of them processing, it gives up once
//! nothing has moved for the stall timeout (default
//! [`DEFAULT_STALL_SECONDS`]), naming why, and exits non-zero.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressState, ProgressStyle};
use layer_protocol::function::{GetUdfResponse, UdfStatus};
use layer_protocol::namespace::{NamespaceList, QueryResponse};
use layer_protocol::work::DiscoverResponse;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::client::{ApiFailure, Client, seg};

/// How long `layer run` waits, by default, with rows left and nothing
/// processing or finishing, before it gives up.
pub const DEFAULT_STALL_SECONDS: u64 = 120;

/// One Function being watched: its counts before the apply, and what this
/// run has seen since.
struct Watched {
    name: String,
    /// Made on a terminal once there is something to count.
    bar: Option<ProgressBar>,
    completed_at_start: i64,
    failed_at_start: i64,
    /// When done, failed or processing last changed.
    last_progress: Instant,
    /// (done, failed, processing) at the last poll.
    seen: (i64, i64, i64),
    /// The conditions already printed as lines.
    said: Vec<String>,
    done: i64,
    failed_new: i64,
    /// Whether rows were pending or processing at some poll.
    had_work: bool,
    status: Option<UdfStatus>,
}

/// `28.8 rows/s`.
fn rate(rows: i64, elapsed: Duration) -> String {
    format!("{:.1} rows/s", rows as f64 / elapsed.as_secs_f64().max(1e-3))
}

fn completed(st: &UdfStatus) -> i64 {
    st.counts.get("completed").copied().unwrap_or(0)
}

/// The Function's status, or `None` where it does not exist yet.
async fn status_if_exists(client: &Client, name: &str) -> Result<Option<UdfStatus>> {
    match client.get(&format!("/v2/udfs/{}/status", seg(name))).await {
        Ok(st) => Ok(Some(st)),
        Err(e) if e.downcast_ref::<ApiFailure>().is_some_and(|f| f.status == StatusCode::NOT_FOUND) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Applies the files, starts discovery for every Function in them, and waits
/// until their queues drain. Fails if rows ended in `failed`.
/// `stall`: give up when a Function has rows left, none processing, and
/// nothing has moved for this long (`None`: wait regardless).
pub async fn run(client: &Client, files: &[PathBuf], timeout: Option<Duration>, stall: Option<Duration>) -> Result<()> {
    let documents = crate::commands::read_documents(files)?;
    let names: Vec<String> = documents
        .iter()
        .filter(|d| d["kind"] == "Function")
        .filter_map(|d| d["metadata"]["name"].as_str().map(String::from))
        .collect();
    if names.is_empty() {
        bail!(
            "no Function in {}: nothing to run",
            files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    // Counted before the apply, which may start the work: rows a worker
    // finishes right after it are this run's.
    let mut before = Vec::new();
    for name in &names {
        before.push(status_if_exists(client, name).await?);
    }
    let begun = Instant::now();
    crate::commands::apply_documents(client, files, documents, false).await?;
    let mut watched = Vec::new();
    for (name, st) in names.into_iter().zip(before) {
        // The apply's own sweep may have queued the rows already; this one
        // makes sure every row that needs work is queued before we count.
        let d: DiscoverResponse = client.post(&format!("/v2/udfs/{}/discover", seg(&name)), &json!({})).await?;
        let now: UdfStatus = client.get(&format!("/v2/udfs/{}/status", seg(&name))).await?;
        let queued = now.pending_count + now.processing_count;
        if d.namespaces.is_empty() {
            note!("{name}: none of its namespaces exists yet")?;
        } else if queued > 0 {
            note!("{name}: {queued} rows queued in {}", d.namespaces.join(", "))?;
        }
        watched.push(Watched {
            name,
            bar: None,
            completed_at_start: st.as_ref().map_or(0, completed),
            failed_at_start: st.as_ref().map_or(0, |s| s.failed_count),
            last_progress: Instant::now(),
            seen: (0, 0, 0),
            said: Vec::new(),
            done: 0,
            failed_new: 0,
            had_work: false,
            status: None,
        });
    }
    let multi = MultiProgress::new();
    let tty = std::io::stderr().is_terminal();
    // indicatif's own `{per_sec}` prints every digit it has (28.761299987/s).
    let style =
        ProgressStyle::with_template("{prefix:>16} [{bar:32}] {pos}/{len} rows  {rate:>13}  eta {eta:<4} {msg}")?
            .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                let _ = write!(w, "{:.1} rows/s", s.per_sec());
            })
            .progress_chars("=> ");
    let mut last_line = Instant::now();
    let mut failed_total;
    loop {
        let mut all_drained = true;
        let mut stalled_at: Option<String> = None;
        failed_total = 0;
        let line_due = !tty && last_line.elapsed() >= Duration::from_secs(2);
        for w in &mut watched {
            let st: UdfStatus = client.get(&format!("/v2/udfs/{}/status", seg(&w.name))).await?;
            let done = completed(&st) - w.completed_at_start;
            let failed_new = (st.failed_count - w.failed_at_start).max(0);
            let remaining = st.pending_count + st.processing_count;
            let total = done + failed_new + remaining;
            failed_total += st.failed_count;
            w.had_work |= remaining > 0;
            let seen = (done, failed_new, st.processing_count);
            if seen != w.seen {
                w.seen = seen;
                w.last_progress = Instant::now();
            }
            w.done = done;
            w.failed_new = failed_new;
            let mut notes = Vec::new();
            if st.failed_count > 0 {
                notes.push(format!("{} failed", st.failed_count));
            }
            if st.paused {
                notes.push("paused".to_string());
            }
            for c in &st.conditions {
                notes.push(c.reason.clone());
                let line = format!("{}: {}: {}", w.name, c.reason, c.message);
                if !w.said.contains(&line) {
                    w.said.push(line.clone());
                    multi.suspend(|| note!("{line}"))?;
                }
            }
            if st.conditions.is_empty()
                && !st.paused
                && remaining > 0
                && st.processing_count == 0
                && w.last_progress.elapsed() > Duration::from_secs(10)
            {
                notes.push("waiting for workers: start one for this Function".to_string());
            }
            let msg = notes.join(", ");
            if tty && total > 0 {
                let bar = w.bar.get_or_insert_with(|| {
                    let b = multi.add(ProgressBar::new(total as u64));
                    b.set_style(style.clone());
                    b.set_prefix(w.name.clone());
                    b
                });
                bar.set_length(total as u64);
                bar.set_position((done + failed_new) as u64);
                bar.set_message(msg.clone());
            }
            if line_due && total > 0 {
                let msg = if msg.is_empty() { String::new() } else { format!(", {msg}") };
                note!("{}: {}/{total} rows, {}{msg}", w.name, done + failed_new, rate(done, begun.elapsed()))?;
            }
            if remaining > 0 {
                all_drained = false;
            }
            if let Some(stall) = stall
                && remaining > 0
                && st.processing_count == 0
                && w.last_progress.elapsed() >= stall
            {
                stalled_at.get_or_insert_with(|| stalled(&w.name, &st, stall));
            }
            w.status = Some(st);
        }
        if line_due {
            last_line = Instant::now();
        }
        if let Some(why) = stalled_at {
            end_bars(&watched, true)?;
            bail!("{why}");
        }
        if all_drained {
            break;
        }
        if let Some(t) = timeout
            && begun.elapsed() > t
        {
            end_bars(&watched, true)?;
            bail!("the queue did not drain within {} s", t.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    end_bars(&watched, false)?;
    for w in &watched {
        match &w.status {
            Some(st) if !w.had_work && w.done == 0 && w.failed_new == 0 => {
                note!("{}", nothing_left(client, &w.name, st).await?)?;
            }
            _ => {
                let failed = if w.failed_new > 0 { format!(", {} failed", w.failed_new) } else { String::new() };
                note!(
                    "{}: {} rows done in {:.1} s ({}){failed}",
                    w.name,
                    w.done,
                    begun.elapsed().as_secs_f64(),
                    rate(w.done, begun.elapsed())
                )?;
            }
        }
    }
    if failed_total > 0 {
        bail!(
            "{failed_total} rows failed: `layer udf get NAME` shows the counts, `layer udf reset-failed NAME` retries them"
        );
    }
    Ok(())
}

/// Why `layer run` gave up on a Function that stopped moving.
fn stalled(name: &str, st: &UdfStatus, stall: Duration) -> String {
    let why = if st.paused {
        format!("it is paused: `layer udf resume {name}` goes on")
    } else if let Some(c) = st.conditions.first() {
        format!("{}: {}", c.reason, c.message)
    } else {
        format!("no worker is taking its rows: start one for {name}")
    };
    format!(
        "{name}: nothing moved for {} s ({} rows pending, none processing); {why}. The rows stay queued; \
         pass --stall-timeout 0 to wait regardless",
        stall.as_secs(),
        st.pending_count
    )
}

/// Stops the bars where they are and puts the cursor below them (indicatif
/// leaves it at the end of the last one).
fn end_bars(watched: &[Watched], abandon: bool) -> Result<()> {
    let mut drawn = false;
    for b in watched.iter().filter_map(|w| w.bar.as_ref()) {
        if abandon {
            b.abandon();
        } else {
            b.finish();
        }
        drawn = true;
    }
    if drawn {
        note!("")?;
    }
    Ok(())
}

/// The line for a Function that had nothing left to do: with nothing
/// pending or processing after a sweep, every row it covers is done or failed.
async fn nothing_left(client: &Client, name: &str, st: &UdfStatus) -> Result<String> {
    if st.active_namespaces.is_empty() {
        return Ok(format!("{name}: nothing to do: none of its namespaces exists yet"));
    }
    let udf: GetUdfResponse = client.get(&format!("/v2/udfs/{}", seg(name))).await?;
    let filter = udf.udf.spec.filter.as_ref();
    let mut covered = 0;
    for ns in &st.active_namespaces {
        covered += match filter {
            None => namespace_rows(client, ns).await?,
            Some(f) => matching_rows(client, ns, f).await?,
        };
    }
    let failed = st.failed_count;
    let done = (covered - failed).max(0);
    Ok(match (covered, failed) {
        (0, _) if filter.is_some() => format!("{name}: nothing to do: no row matches its filter"),
        (0, _) => format!("{name}: nothing to do: its namespaces hold no rows"),
        (_, 0) => format!("{name}: already complete: {done} of {covered} rows"),
        _ => format!("{name}: nothing left to do: {done} of {covered} rows done, {failed} failed"),
    })
}

/// A namespace's row count (0 if it is gone).
async fn namespace_rows(client: &Client, ns: &str) -> Result<i64> {
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v2/namespaces?page_size=1000&prefix={}", seg(ns));
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={}", seg(c)));
        }
        let page: NamespaceList = client.get(&path).await?;
        if let Some(n) = page.namespaces.iter().find(|n| n.name == ns) {
            return Ok(n.row_count);
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(0),
        }
    }
}

/// Rows of `ns` that match `filter`, counted a page of ids at a time.
async fn matching_rows(client: &Client, ns: &str, filter: &Value) -> Result<i64> {
    const PAGE: usize = 10_000;
    let mut count = 0;
    let mut after: Option<String> = None;
    loop {
        let filters = match &after {
            None => filter.clone(),
            Some(id) => json!(["And", [filter, ["id", "Gt", id]]]),
        };
        let body = json!({"filters": filters, "rank_by": ["id", "asc"], "top_k": PAGE, "include_attributes": false});
        let r: QueryResponse = client.post(&format!("/v2/namespaces/{}/query", seg(ns)), &body).await?;
        count += r.rows.len() as i64;
        match r.rows.last().and_then(|row| row.get("id")).and_then(Value::as_str) {
            Some(id) if r.rows.len() == PAGE => after = Some(id.to_string()),
            _ => return Ok(count),
        }
    }
}
