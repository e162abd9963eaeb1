//! The client commands: apply, keys, udf, rows. Their output goes through
//! [`write_line`] (the `out!` and `note!` macros), never `println!`.

use std::fmt;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use layer_protocol::function::{Dispatch, GetUdfResponse, RevisionList, Udf, UdfList};
use layer_protocol::keys::{ApiKey, ApiKeyList, Entitlement, MintKeyRequest, MintKeyResponse, Scope};
use layer_protocol::namespace::{Document, NamespaceList, QueryResponse, StatusResponse, WriteResponse};
use layer_protocol::resource::{ApplyResponse, parse_documents};
use serde_json::{Value, json};

use crate::client::{ApiFailure, Client, seg};

/// Standard output (or error) was closed by its reader, as `| head` does:
/// the command stops there and `main` exits quietly, with status 0.
#[derive(Debug)]
pub struct OutputClosed;

impl fmt::Display for OutputClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the output was closed by its reader")
    }
}

impl std::error::Error for OutputClosed {}

/// Writes one line; a closed pipe is [`OutputClosed`], other failures
/// (a full disk) are errors of the command.
pub fn write_line(mut w: impl Write, line: fmt::Arguments<'_>) -> Result<()> {
    match writeln!(w, "{line}") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(OutputClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing the output")),
    }
}

/// A file's text; `-` reads standard input.
pub fn read_input(file: &Path) -> Result<String> {
    if file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).context("reading standard input")?;
        return Ok(s);
    }
    std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    out!("{}", serde_json::to_string_pretty(v)?)
}

/// An enum's wire name in lowercase (`pull`, `active`), the CLI's one
/// spelling of enum values, never Rust's (`Pull`).
fn wire_name(v: &impl serde::Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s.to_lowercase(),
        _ => "-".to_string(),
    }
}

/// Prints a table whose columns are as wide as their widest cell (the last
/// column is not padded), so every row lines up whatever it holds.
fn print_table(headers: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, cell) in cells.enumerate() {
            if i + 1 < widths.len() {
                out.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            } else {
                out.push_str(cell);
            }
        }
        out.trim_end().to_string()
    };
    out!("{}", line(&mut headers.iter().copied()))?;
    for row in rows {
        out!("{}", line(&mut row.iter().map(String::as_str)))?;
    }
    Ok(())
}

/// Every document of every file, each file read once (`-` is stdin).
pub fn read_documents(files: &[PathBuf]) -> Result<Vec<Value>> {
    let mut documents = Vec::new();
    for f in files {
        let text = read_input(f)?;
        let docs = parse_documents(&text).map_err(|e| anyhow!("{}: {e}", f.display()))?;
        documents.extend(docs);
    }
    Ok(documents)
}

/// `layer apply -f FILE...`: every document of every file, all or nothing.
pub async fn apply(client: &Client, files: &[PathBuf], json_out: bool) -> Result<()> {
    apply_documents(client, files, read_documents(files)?, json_out).await
}

/// Applies documents read from `files` (named in a refusal).
pub async fn apply_documents(client: &Client, files: &[PathBuf], documents: Vec<Value>, json_out: bool) -> Result<()> {
    let resp: ApplyResponse = match client.post("/v2/apply", &json!({ "documents": documents })).await {
        Ok(r) => r,
        Err(e) => {
            if let Some(f) = e.downcast_ref::<ApiFailure>()
                && let Some(body) = &f.body
                && body.code == "invalid_resource"
            {
                let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
                let mut msg = format!("{} was not applied (nothing changed):", names.join(", "));
                let problems: Vec<String> = if body.errors.is_empty() {
                    vec![body.message.clone()]
                } else {
                    body.errors.iter().map(|p| p.message.clone()).collect()
                };
                for p in problems {
                    msg.push_str(&format!("\n  {p}"));
                }
                bail!(msg);
            }
            return Err(e);
        }
    };
    if json_out {
        return print_json(&resp);
    }
    for r in resp.results {
        let rev = r.revision.map(|n| format!(" (revision {n})")).unwrap_or_default();
        let action = serde_json::to_value(r.action)?.as_str().unwrap_or_default().to_string();
        out!("{}/{} {action}{rev}", r.kind.to_lowercase(), r.name)?;
    }
    Ok(())
}

/// Options of `layer keys create`.
pub struct CreateKey {
    pub name: String,
    pub scopes: Vec<String>,
    pub namespaces: Vec<String>,
    pub functions: Vec<String>,
    pub claims: Vec<String>,
    pub expires_after: Option<String>,
    pub description: Option<String>,
    pub owner: Option<String>,
}

pub async fn keys_create(client: &Client, k: CreateKey, json_out: bool) -> Result<()> {
    let scopes = k
        .scopes
        .iter()
        .map(|s| match s.as_str() {
            "read" => Ok(Scope::Read),
            "write" => Ok(Scope::Write),
            "admin" => Ok(Scope::Admin),
            "invoke" => Ok(Scope::Invoke),
            other => Err(anyhow!("--scope {other}: use read, write, admin or invoke")),
        })
        .collect::<Result<Vec<_>>>()?;
    let ent = Entitlement {
        scopes: (!scopes.is_empty()).then_some(scopes),
        functions: (!k.functions.is_empty()).then_some(k.functions),
        namespaces: (!k.namespaces.is_empty()).then_some(k.namespaces),
        claims: (!k.claims.is_empty()).then_some(k.claims),
    };
    let req = MintKeyRequest {
        name: k.name,
        owner: k.owner,
        description: k.description,
        entitlements: Some([("default".to_string(), ent)].into()),
        expires_after: k.expires_after,
    };
    let resp: MintKeyResponse = client.post("/v2/keys", &req).await?;
    if json_out {
        return print_json(&resp);
    }
    out!("created key {} ({})", resp.key.key_id, resp.key.name)?;
    out!("token (shown this once; only its hash is stored):\n\n  {}\n", resp.token)
}

fn describe_entitlements(k: &ApiKey) -> String {
    k.entitlements
        .values()
        .map(|e| {
            let mut parts: Vec<String> = e
                .scopes
                .iter()
                .flatten()
                .map(|s| serde_json::to_value(s).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default())
                .collect();
            if let Some(c) = &e.claims {
                parts.extend(c.iter().map(|c| format!("claim:{c}")));
            }
            let ns = e.namespaces.as_ref().map(|n| format!(" on {}", n.join(","))).unwrap_or_default();
            format!("{}{ns}", parts.join("+"))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

pub async fn keys_list(client: &Client, all: bool, json_out: bool) -> Result<()> {
    let list: ApiKeyList = client.get(&format!("/v2/keys?includeRevoked={all}")).await?;
    if json_out {
        return print_json(&list.keys);
    }
    if list.keys.is_empty() {
        return out!("no keys{}", if all { "" } else { " (--all also lists revoked ones)" });
    }
    let rows: Vec<Vec<String>> = list
        .keys
        .iter()
        .map(|k| {
            vec![k.key_id.clone(), k.name.clone(), wire_name(&k.phase), k.created_at.clone(), describe_entitlements(k)]
        })
        .collect();
    print_table(&["KEY ID", "NAME", "PHASE", "CREATED", "GRANTS"], &rows)
}

pub async fn keys_revoke(client: &Client, key_id: &str) -> Result<()> {
    let k: ApiKey = client.post_empty(&format!("/v2/keys/{}/revoke", seg(key_id))).await?;
    out!("revoked {} ({}) at {}", k.key_id, k.name, k.revoked_at.unwrap_or_default())
}

pub async fn keys_delete(client: &Client, key_id: &str) -> Result<()> {
    let s: StatusResponse = client.delete(&format!("/v2/keys/{}", seg(key_id))).await?;
    out!("{}", s.message.unwrap_or(s.status))
}

pub async fn udf_list(client: &Client, json_out: bool) -> Result<()> {
    let list: UdfList = client.get("/v2/udfs").await?;
    if json_out {
        return print_json(&list.udfs);
    }
    if list.udfs.is_empty() {
        return out!("no Functions yet: `layer apply -f FILE` creates one");
    }
    let rows: Vec<Vec<String>> = list
        .udfs
        .iter()
        .map(|u| {
            let targets = if u.spec.target_namespaces.is_empty() {
                "indexSelector".to_string()
            } else {
                u.spec.target_namespaces.join(",")
            };
            vec![
                u.id.clone(),
                u.spec.version.clone(),
                wire_name(&u.spec.worker.dispatch),
                u.paused.to_string(),
                u.revision.to_string(),
                targets,
            ]
        })
        .collect();
    print_table(&["NAME", "VERSION", "DISPATCH", "PAUSED", "REVISION", "TARGETS"], &rows)
}

pub async fn udf_get(client: &Client, name: &str, json_out: bool) -> Result<()> {
    let r: GetUdfResponse = client.get(&format!("/v2/udfs/{}", seg(name))).await?;
    if json_out {
        return print_json(&json!({"udf": r.udf, "status": r.status}));
    }
    let u = &r.udf;
    let s = &r.status;
    out!("name:       {}", u.id)?;
    out!("revision:   {} (updated {})", u.revision, u.updated_at)?;
    out!(
        "version:    {}  marker: {}",
        u.spec.version,
        layer_protocol::function::FunctionSpec::marker_attribute(&u.id)
    )?;
    out!("paused:     {}", u.paused)?;
    out!(
        "dispatch:   {}, batch {} rows, timeout {} s",
        wire_name(&u.spec.worker.dispatch),
        u.spec.worker.batch_size,
        u.spec.worker.timeout_seconds
    )?;
    out!(
        "namespaces: {}",
        if s.active_namespaces.is_empty() { "(none exist yet)".into() } else { s.active_namespaces.join(", ") }
    )?;
    out!("rows:       {} pending, {} processing, {} failed", s.pending_count, s.processing_count, s.failed_count)?;
    for c in &s.conditions {
        out!("problem:    {}: {}", c.reason, c.message)?;
    }
    Ok(())
}

/// `layer logs FUNCTION`: each worker's recent lines under a header naming
/// the runner, the worker, its revision and whether it still runs.
pub async fn logs(client: &Client, name: &str, lines: u32, json_out: bool) -> Result<()> {
    let r: layer_protocol::runner::FunctionLogs =
        client.get(&format!("/v2/udfs/{}/logs?lines={lines}", seg(name))).await?;
    if json_out {
        return print_json(&r);
    }
    for u in &r.unreachable {
        note!("runner {} ({}) did not answer: {}", u.runner_name, u.runner_id, u.error)?;
    }
    if r.workers.is_empty() {
        out!("no worker of {} has run on an active runner (its output is kept per runner, in memory)", r.udf_id)?;
    }
    for w in &r.workers {
        let state = if w.logs.running { "running" } else { "stopped" };
        out!("==> {} on runner {} (revision {}, {state}) <==", w.logs.worker, w.runner_name, w.logs.revision)?;
        if w.logs.lines.is_empty() {
            out!("(this worker has printed nothing on stdout or stderr)")?;
        }
        for l in &w.logs.lines {
            out!("{}", l.line)?;
        }
    }
    Ok(())
}

/// Filters of `layer udf batches`.
pub struct BatchFilters {
    pub state: Option<String>,
    pub runner: Option<String>,
    pub since: Option<String>,
    pub limit: u32,
}

/// Milliseconds between two RFC 3339 times, for the tables.
fn millis_between(from: Option<&str>, to: Option<&str>) -> String {
    let parse = |t: Option<&str>| t.and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
    match (parse(from), parse(to)) {
        (Some(a), Some(b)) => format!("{}", (b - a).num_milliseconds()),
        _ => "-".into(),
    }
}

pub async fn udf_batches(client: &Client, name: &str, f: &BatchFilters, json_out: bool) -> Result<()> {
    let mut query = vec![format!("limit={}", f.limit)];
    for (k, v) in [("state", &f.state), ("runner", &f.runner), ("since", &f.since)] {
        if let Some(v) = v {
            query.push(format!("{k}={}", seg(v)));
        }
    }
    let r: layer_protocol::runner::ListBatchesResponse =
        client.get(&format!("/v2/udfs/{}/batches?{}", seg(name), query.join("&"))).await?;
    if json_out {
        return print_json(&r);
    }
    if r.batches.is_empty() {
        return explain_no_batches(client, name, f).await;
    }
    out!(
        "{:<10} {:<10} {:<24} {:>5} {:>5} {:>5} {:>5} {:>8} {:>8} {:<34} TRACE",
        "BATCH",
        "STATE",
        "DISPATCHED",
        "ROWS",
        "OK",
        "FAIL",
        "DROP",
        "WAIT_MS",
        "RUN_MS",
        "WORKER"
    )?;
    for b in &r.batches {
        let worker = match (&b.worker, b.cold_start) {
            (Some(w), Some(true)) => format!("{w} (cold)"),
            (Some(w), _) => w.clone(),
            (None, _) => "-".into(),
        };
        out!(
            "{:<10} {:<10} {:<24} {:>5} {:>5} {:>5} {:>5} {:>8} {:>8} {:<34} {}",
            b.id,
            b.state,
            b.dispatched_at,
            b.items,
            b.written,
            b.failed,
            b.dropped,
            millis_between(b.queued_at.as_deref(), Some(&b.dispatched_at)),
            millis_between(b.started_at.as_deref(), b.ended_at.as_deref()),
            worker,
            b.trace_id.as_deref().unwrap_or("-"),
        )?;
        if let Some(e) = &b.error {
            out!("           error: {e}")?;
        }
    }
    if r.next_cursor.is_some() {
        note!("(more: raise --limit, or page with GET /v2/udfs/{name}/batches?cursor=...)")?;
    }
    Ok(())
}

/// Why `layer udf batches` found nothing: a pull Function has no batch
/// records at all; a push one has none yet, or none that match.
async fn explain_no_batches(client: &Client, name: &str, f: &BatchFilters) -> Result<()> {
    let r: GetUdfResponse = client.get(&format!("/v2/udfs/{}", seg(name))).await?;
    if r.udf.spec.worker.dispatch == Dispatch::Pull {
        return out!(
            "no batch records: {name} is a pull Function, whose workers claim rows themselves; \
             `layer udf get {name}` shows its row counts"
        );
    }
    if f.state.is_some() || f.runner.is_some() || f.since.is_some() {
        return out!("no batch records of {name} match --state, --runner and --since");
    }
    out!(
        "no batch records of {name} yet: one is written when a batch is sent to a runner \
         (`layer udf get {name}` says why none is)"
    )
}

pub async fn udf_failed(client: &Client, name: &str, limit: u32, json_out: bool) -> Result<()> {
    let r: layer_protocol::runner::ListFailedResponse =
        client.get(&format!("/v2/udfs/{}/failed?limit={limit}", seg(name))).await?;
    if json_out {
        return print_json(&r);
    }
    if r.rows.is_empty() {
        out!("no failed rows")?;
    }
    for row in &r.rows {
        out!(
            "{}/{}  attempts={} kind={} at={}\n    {}",
            row.namespace,
            row.id,
            row.attempts,
            row.error_kind.as_deref().unwrap_or("-"),
            row.failed_at,
            row.error.as_deref().unwrap_or("")
        )?;
    }
    if r.next_cursor.is_some() {
        note!("(more: raise --limit)")?;
    }
    Ok(())
}

pub async fn udf_revisions(client: &Client, name: &str, json_out: bool) -> Result<()> {
    let r: RevisionList = client.get(&format!("/v2/udfs/{}/revisions", seg(name))).await?;
    if json_out {
        return print_json(&r.revisions);
    }
    out!("{:<9} {:<26} {:<22} CHANGED", "REVISION", "CREATED", "BY KEY")?;
    for rev in r.revisions {
        out!(
            "{:<9} {:<26} {:<22} {}",
            rev.revision,
            rev.created_at,
            rev.key_id.unwrap_or_default(),
            rev.changed.join(", ")
        )?;
    }
    Ok(())
}

pub async fn udf_set_paused(client: &Client, name: &str, paused: bool) -> Result<()> {
    let verb = if paused { "pause" } else { "resume" };
    let u: Udf = client.post_empty(&format!("/v2/udfs/{}/{verb}", seg(name))).await?;
    out!("{} {}", u.id, if u.paused { "paused" } else { "resumed" })
}

pub async fn udf_delete(client: &Client, name: &str) -> Result<()> {
    let s: StatusResponse = client.delete(&format!("/v2/udfs/{}", seg(name))).await?;
    out!("{}", s.message.unwrap_or(s.status))
}

pub async fn udf_reset_failed(client: &Client, name: &str) -> Result<()> {
    let r: layer_protocol::work::ItemsResponse =
        client.post_empty(&format!("/v2/udfs/{}/reset-failed", seg(name))).await?;
    out!("{} failed rows of {} are back in the queue", r.updated, r.udf_id)
}

/// Reads rows from a JSON array or JSON lines file.
fn read_rows(file: &Path) -> Result<Vec<Value>> {
    let text = read_input(file)?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        return serde_json::from_str(trimmed).with_context(|| format!("{}: not a JSON array of rows", file.display()));
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}:{}: not a JSON row", file.display(), i + 1)))
        .collect()
}

/// `layer rows upsert NS -f FILE`: sends the rows in writes of `batch`.
pub async fn rows_upsert(client: &Client, ns: &str, file: &Path, batch: usize) -> Result<()> {
    let rows = read_rows(file)?;
    let total = rows.len();
    let started = std::time::Instant::now();
    let mut done = 0usize;
    // A line redrawn in place, on a terminal only; best effort.
    let tty = std::io::stderr().is_terminal();
    for chunk in rows.chunks(batch.max(1)) {
        let r: WriteResponse =
            client.post(&format!("/v2/namespaces/{}", seg(ns)), &json!({ "upsert_rows": chunk })).await?;
        done += r.rows_upserted as usize;
        if tty {
            let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
            let _ = write!(std::io::stderr(), "\rupserted {done}/{total} rows ({rate:.0} rows/s)");
        }
    }
    if tty {
        let _ = writeln!(std::io::stderr());
    }
    out!("upserted {done} rows into {ns} in {:.2} s", started.elapsed().as_secs_f64())
}

/// `layer rows get NS ID`: the row as JSON, in the shape `rows query`
/// prints each row in (`id`, then its attributes, flat; `vector` where it
/// has one), indented.
pub async fn rows_get(client: &Client, ns: &str, id: &str) -> Result<()> {
    let d: Document = client.get(&format!("/v2/namespaces/{}/documents/{}", seg(ns), seg(id))).await?;
    let mut row = serde_json::Map::new();
    row.insert("id".into(), Value::String(d.id));
    row.extend(d.attributes);
    if let Some(v) = d.vector {
        row.insert("vector".into(), json!(v));
    }
    print_json(&row)
}

/// Options of `layer rows query`.
pub struct QueryArgs {
    pub filter: Option<String>,
    pub rank_by: Option<String>,
    pub top_k: i64,
    pub attributes: Option<String>,
}

/// The platform's largest `top_k` (`POST /v2/namespaces/{ns}/query`).
const MAX_TOP_K: i64 = 10_000;

/// `layer rows query`: asks for one row more than `--top-k` to know whether
/// the answer was cut, prints `--top-k` rows and says so on stderr.
pub async fn rows_query(client: &Client, ns: &str, q: QueryArgs) -> Result<()> {
    let top_k = q.top_k;
    let filtered = q.filter.is_some();
    // Out of range values go as they are: the platform's refusal names the range.
    let ask = if (1..MAX_TOP_K).contains(&top_k) { top_k + 1 } else { top_k };
    let mut body = json!({ "top_k": ask, "include_attributes": true });
    if let Some(f) = q.filter {
        body["filters"] = serde_json::from_str(&f)
            .context("--filter must be a JSON filter like '[\"category\", \"Eq\", \"outdoor\"]'")?;
    }
    if let Some(r) = q.rank_by {
        let (attr, dir) = r.split_once(':').unwrap_or((&r, "asc"));
        if attr.is_empty() || !matches!(dir, "asc" | "desc") {
            bail!(
                "--rank-by {r}: write ATTRIBUTE or ATTRIBUTE:asc or ATTRIBUTE:desc, for example --rank-by title:desc"
            );
        }
        body["rank_by"] = json!([attr, dir]);
    }
    if let Some(a) = q.attributes {
        body["include_attributes"] = json!(a.split(',').map(str::trim).collect::<Vec<_>>());
    }
    let r: QueryResponse = client.post(&format!("/v2/namespaces/{}/query", seg(ns)), &body).await?;
    let returned = r.rows.len() as i64;
    for row in r.rows.iter().take(top_k.max(0) as usize) {
        out!("{}", serde_json::to_string(row)?)?;
    }
    if returned > top_k {
        note!("showing the first {top_k} rows (--top-k {top_k}); there are more: raise --top-k or narrow --filter")?;
    } else if returned == top_k && ask == top_k {
        note!("showing the first {top_k} rows (--top-k {top_k}); there may be more")?;
    } else if returned == 0 && filtered {
        note!("no rows of {ns} match --filter")?;
    } else if returned == 0 {
        note!("{ns} has no rows")?;
    }
    Ok(())
}

/// `layer rows namespaces`: every page of namespaces, by name.
pub async fn rows_namespaces(client: &Client, prefix: Option<&str>) -> Result<()> {
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v2/namespaces?page_size=1000&prefix={}", seg(prefix.unwrap_or("")));
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={}", seg(c)));
        }
        let page: NamespaceList = client.get(&path).await?;
        if cursor.is_none() {
            if page.namespaces.is_empty() {
                return match prefix.filter(|p| !p.is_empty()) {
                    Some(p) => out!("no namespace starts with {p}"),
                    None => out!("no namespaces yet: `layer rows upsert NS -f FILE` creates one"),
                };
            }
            out!("{:<40} {:>12}  LABELS", "NAMESPACE", "ROWS")?;
        }
        for n in &page.namespaces {
            let labels: Vec<String> = n.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out!("{:<40} {:>12}  {}", n.name, n.row_count, labels.join(","))?;
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => return Ok(()),
        }
    }
}

pub async fn rows_drop(client: &Client, ns: &str) -> Result<()> {
    let s: StatusResponse = client.delete(&format!("/v2/namespaces/{}", seg(ns))).await?;
    out!("{} ({} rows)", s.message.unwrap_or(s.status), s.rows_affected.unwrap_or(0))
}

pub async fn runners_list(client: &Client, json_out: bool) -> Result<()> {
    let list: layer_protocol::runner::RunnerList = client.get("/v2/runners").await?;
    if json_out {
        return print_json(&list.runners);
    }
    if list.runners.is_empty() {
        return out!(
            "no runners: push Functions need one (`layer runner --platform URL`; `layer dev` starts one); \
             pull workers need none"
        );
    }
    out!(
        "{:<36} {:<12} {:<9} {:>5} {:>6} {:>4} {:>7}  WORKERS",
        "ID",
        "NAME",
        "STATE",
        "CPUS",
        "SLOTS",
        "GPUS",
        "BATCHES"
    )?;
    for r in list.runners {
        let workers: Vec<String> =
            r.load.workers.iter().map(|w| format!("{}@r{}:{}", w.udf_id, w.revision, w.state)).collect();
        out!(
            "{:<36} {:<12} {:<9} {:>5} {:>6} {:>4} {:>7}  {}",
            r.id,
            r.name,
            wire_name(&r.state),
            r.capacity.cpus,
            r.capacity.slots,
            r.capacity.gpus.len(),
            r.batches_in_flight,
            if workers.is_empty() { "-".to_string() } else { workers.join(" ") }
        )?;
    }
    Ok(())
}

/// `-d`: JSON as written, `@file` a file's, `@-` standard input's.
fn call_body(data: Option<&str>) -> Result<Vec<u8>> {
    let text = match data {
        None => return Ok(Vec::new()),
        Some(d) => match d.strip_prefix('@') {
            Some(file) => read_input(Path::new(file))?,
            None => d.to_string(),
        },
    };
    // Checked here, so a typo is named before anything is sent.
    serde_json::from_str::<Value>(&text).context("-d is not JSON")?;
    Ok(text.into_bytes())
}

/// `layer invoke`: calls a Function and writes its answer to standard
/// output; a problem goes to standard error as its title and detail, and
/// the command fails.
pub async fn invoke(client: &Client, name: &str, data: Option<&str>) -> Result<()> {
    let body = call_body(data)?;
    let r = client.send_raw(reqwest::Method::POST, &format!("/v2/udfs/{}/calls", seg(name)), body).await?;
    let status = r.status();
    let call_id = r.headers().get("layer-call-id").and_then(|v| v.to_str().ok()).map(str::to_string);
    let bytes = r.bytes().await.context("reading the answer")?;
    if !status.is_success() {
        let problem: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        let title = problem["title"].as_str().map_or_else(|| status.to_string(), str::to_string);
        let detail = problem["detail"].as_str().or(problem["message"].as_str()).unwrap_or_default();
        let call = call_id.map(|c| format!(" (call {c})")).unwrap_or_default();
        bail!("{title}{call}: {detail}");
    }
    let mut stdout = std::io::stdout().lock();
    let written = stdout.write_all(&bytes).and_then(|()| {
        // A terminal gets the line ended; a pipe gets the bytes as they came.
        if stdout.is_terminal() && !bytes.ends_with(b"\n") { stdout.write_all(b"\n") } else { Ok(()) }
    });
    match written.and_then(|()| stdout.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(OutputClosed.into()),
        other => other.context("writing the answer"),
    }
}

/// `layer calls NAME`: a Function's calls, newest first.
pub async fn calls_list(client: &Client, name: &str, status: Option<&str>, limit: u32, json_out: bool) -> Result<()> {
    let mut query = format!("limit={limit}");
    if let Some(s) = status {
        query.push_str(&format!("&status={}", seg(s)));
    }
    let r: layer_protocol::call::CallList = client.get(&format!("/v2/udfs/{}/calls?{query}", seg(name))).await?;
    if json_out {
        return print_json(&r);
    }
    if r.calls.is_empty() {
        return out!("no calls of {name} recorded (calls are kept for the platform's call retention)");
    }
    let rows: Vec<Vec<String>> = r
        .calls
        .iter()
        .map(|c| {
            let worker = match &c.worker {
                Some(w) if c.cold_start => format!("{w} (cold)"),
                Some(w) => w.clone(),
                None => "-".into(),
            };
            vec![
                c.call_id.clone(),
                wire_name(&c.status),
                c.http_status.to_string(),
                c.queued_at.clone(),
                millis_between(Some(&c.queued_at), Some(&c.finished_at)),
                c.revision.to_string(),
                worker,
                c.error.clone().unwrap_or_default().chars().take(60).collect(),
            ]
        })
        .collect();
    print_table(&["CALL", "STATUS", "HTTP", "ARRIVED", "MS", "REVISION", "WORKER", "ERROR"], &rows)
}

/// `layer calls get CALL_ID`: one call's record.
pub async fn calls_get(client: &Client, call_id: &str, json_out: bool) -> Result<()> {
    let c: layer_protocol::call::CallRecord = client.get(&format!("/v2/calls/{}", seg(call_id))).await?;
    if json_out {
        return print_json(&c);
    }
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    out!("call:      {}", c.call_id)?;
    out!("function:  {} (revision {})", c.udf_id, c.revision)?;
    out!("status:    {} (HTTP {})", wire_name(&c.status), c.http_status)?;
    out!("runner:    {}", or_dash(&c.runner_id))?;
    out!("worker:    {}{}", or_dash(&c.worker), if c.cold_start { " (cold start)" } else { "" })?;
    out!("key:       {}", or_dash(&c.key_id))?;
    out!("arrived:   {}", c.queued_at)?;
    out!("started:   {}", or_dash(&c.started_at))?;
    out!("finished:  {} ({} ms)", c.finished_at, millis_between(Some(&c.queued_at), Some(&c.finished_at)))?;
    out!("bytes:     {} in, {} out", c.request_bytes, c.response_bytes)?;
    out!("trace:     {}", or_dash(&c.trace_id))?;
    if let Some(e) = &c.error {
        out!("error:     {e}")?;
    }
    Ok(())
}
