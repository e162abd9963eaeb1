//! The shape of the hot statements' work, not their speed. On 100,000
//! queued rows with 2,000 of them leased (two batches of 1,000), each
//! writeback statement is EXPLAINed (ANALYZE, BUFFERS) with a batch of
//! 1,000 rows: under stale statistics (the tables analysed while they held
//! ten rows, autovacuum off, as after a fresh start) and fresh ones, with
//! custom and generic plans; the claim of 1,000 rows (for a pull worker and
//! for a runner) and the incremental sweep of 1,000 new rows under both
//! statistics, with the plan PostgreSQL makes for their arguments. None may scan `work_items` or `rows`
//! sequentially, no index lookup may filter through other rows (the
//! signature of a lookup that half-matched a partial index), and each stays
//! under a bound of buffers per 1,000 rows.

use layer_platform::engine::discovery::{Needs, SweepRange, spec_key, sweep_statement};
use layer_platform::engine::queue::{self, Claimer};
use layer_protocol::function::FunctionSpec;
use layer_tests::TestPlatform;

/// Rows queued for the plan tests, and the batch each statement handles.
const QUEUED: usize = 100_000;
const BATCH: usize = 1_000;
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

/// A statement to EXPLAIN: its SQL and its arguments as SQL literals.
struct Probe {
    name: &'static str,
    sql: &'static str,
    args: Vec<String>,
    /// Shared buffers (hit and read) it may touch for its 1,000 rows.
    max_buffers: u64,
}

fn text(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn text_array(items: &[String]) -> String {
    format!("ARRAY[{}]::text[]", items.iter().map(|s| text(s)).collect::<Vec<_>>().join(","))
}

fn repeat(literal: &str, n: usize, ty: &str) -> String {
    format!("array_fill({literal}::{ty}, ARRAY[{n}])")
}

/// `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` of the statement, prepared
/// and executed with its arguments under `plan_cache_mode`, rolled back.
async fn explain(conn: &mut PgConnection, probe: &Probe, mode: &str) -> anyhow::Result<Value> {
    sqlx::query("BEGIN").execute(&mut *conn).await?;
    // The writeback's own settings, then the plan cache mode under test.
    sqlx::raw_sql(queue::KEYED_SETTINGS).execute(&mut *conn).await?;
    sqlx::query(&format!("SET LOCAL plan_cache_mode = {mode}")).execute(&mut *conn).await?;
    sqlx::query(&format!("PREPARE plan_probe AS {}", probe.sql)).execute(&mut *conn).await?;
    let explained: Result<(sqlx::types::Json<Value>,), sqlx::Error> = sqlx::query_as(&format!(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) EXECUTE plan_probe({})",
        probe.args.join(", ")
    ))
    .fetch_one(&mut *conn)
    .await;
    sqlx::query("ROLLBACK").execute(&mut *conn).await?;
    sqlx::query("DEALLOCATE plan_probe").execute(&mut *conn).await?;
    Ok(explained?.0.0[0].clone())
}

/// Every node of a plan tree.
fn nodes(plan: &Value, out: &mut Vec<Value>) {
    out.push(plan.clone());
    for child in plan["Plans"].as_array().into_iter().flatten() {
        nodes(child, out);
    }
}

/// What is wrong with the shape of one EXPLAINed statement, if anything.
fn shape_problems(explained: &Value, max_buffers: u64) -> Vec<String> {
    let top = &explained["Plan"];
    let mut all = Vec::new();
    nodes(top, &mut all);
    let mut problems = Vec::new();
    for n in &all {
        let relation = n["Relation Name"].as_str().unwrap_or_default();
        if !["work_items", "rows"].contains(&relation) {
            continue;
        }
        let kind = n["Node Type"].as_str().unwrap_or_default();
        let index = n["Index Name"].as_str().unwrap_or("-");
        if kind == "Seq Scan" {
            problems.push(format!("a sequential scan of {relation}"));
        }
        // EXPLAIN gives these per loop already.
        let loops = n["Actual Loops"].as_f64().unwrap_or(1.0);
        let removed = n["Rows Removed by Filter"].as_f64().unwrap_or(0.0)
            + n["Rows Removed by Index Recheck"].as_f64().unwrap_or(0.0);
        if removed > 1.0 {
            problems.push(format!(
                "{kind} of {relation} using {index} filters {removed:.0} rows per lookup ({loops} loops)"
            ));
        }
    }
    let buffers = top["Shared Hit Blocks"].as_u64().unwrap_or(0) + top["Shared Read Blocks"].as_u64().unwrap_or(0);
    if buffers > max_buffers {
        problems.push(format!("{buffers} shared buffers, over {max_buffers}"));
    }
    problems
}

async fn upsert(p: &TestPlatform, namespace: &str, from: usize, n: usize) -> anyhow::Result<()> {
    let rows: Vec<Value> = (from..from + n)
        .map(|i| json!({"id": format!("r{i:06}"), "title": format!("Wireless thing {i}"), "size": i % 7}))
        .collect();
    p.upsert_rows(namespace, json!(rows)).await
}

/// Rows `from..to` written straight into the store (the set-up, not the
/// subject): each run of 1,000 rows shares a write sequence, as one upsert
/// of 1,000 would, and the namespace's counters move with them.
async fn bulk_rows(conn: &mut PgConnection, namespace: &str, from: usize, to: usize) -> anyhow::Result<()> {
    sqlx::query(
        "WITH ns AS (SELECT write_seq FROM namespaces WHERE name = $1),
         ins AS (
             INSERT INTO rows (namespace, id, attributes, write_seq)
             SELECT $1, 'r' || lpad(i::text, 6, '0'),
                    jsonb_build_object('title', 'Wireless thing ' || i, 'size', i % 7),
                    ns.write_seq + 1 + (i - $2) / 1000
             FROM ns, generate_series($2::int, $3::int - 1) i
             RETURNING write_seq
         )
         UPDATE namespaces SET write_seq = (SELECT max(write_seq) FROM ins),
                               row_count = row_count + (SELECT count(*) FROM ins), last_write_at = now()
         WHERE name = $1",
    )
    .bind(namespace)
    .bind(i32::try_from(from)?)
    .bind(i32::try_from(to)?)
    .execute(conn)
    .await?;
    Ok(())
}

/// The Function `udf` over 100,000 queued rows of `big` (with `spec`), two
/// batches of 1,000 of them leased to `w1` and `w2`, and the statistics of
/// `rows` and `work_items` taken while they held ten rows, never again
/// (autovacuum off), as after a fresh start. Returns the ids `w1` holds.
async fn queued_on_stale_statistics(
    p: &TestPlatform,
    conn: &mut PgConnection,
    udf: &str,
    spec: Value,
) -> anyhow::Result<Vec<String>> {
    p.apply_function(udf, spec).await?;
    upsert(p, "big", 0, 10).await?;
    p.wait_for_pending(udf, 10).await?;
    for table in ["rows", "work_items"] {
        sqlx::query(&format!("ANALYZE {table}")).execute(&mut *conn).await?;
        sqlx::query(&format!("ALTER TABLE {table} SET (autovacuum_enabled = false)")).execute(&mut *conn).await?;
    }
    bulk_rows(conn, "big", 10, QUEUED).await?;
    let (s, r) = p.call(Method::POST, &format!("/v2/udfs/{udf}/discover"), None).await?;
    anyhow::ensure!(s == 200, "discover: {r}");
    p.wait_for_pending(udf, QUEUED as u64).await?;
    let mine = claim(p, udf, "w1", BATCH).await?;
    claim(p, udf, "w2", BATCH).await?;
    Ok(mine)
}

/// Leases `n` items to `worker`; returns their ids.
async fn claim(p: &TestPlatform, udf: &str, worker: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let body = json!({"worker_id": worker, "limit": n, "lease_seconds": 600});
    let (s, r) = p.call(Method::POST, &format!("/v2/udfs/{udf}/claim"), Some(body)).await?;
    anyhow::ensure!(s == 200, "claim: {r}");
    let ids: Vec<String> =
        r["items"].as_array().into_iter().flatten().filter_map(|i| i["id"].as_str().map(str::to_string)).collect();
    anyhow::ensure!(ids.len() == n, "claimed {} of {n}", ids.len());
    Ok(ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writeback_statements_look_rows_up_by_key_whatever_the_statistics() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let mut conn = PgConnection::connect_with(&p.db.options).await?;
    let spec = json!({"targetNamespaces": ["big"], "inputs": ["id", "title"], "worker": {"dispatch": "pull"},
                      "schedule": {"leaseSeconds": 600}});
    let mine = queued_on_stale_statistics(&p, &mut conn, "plans", spec).await?;
    let batch: i64 = sqlx::query_scalar("SELECT batch_id FROM work_items WHERE worker_id = 'w1' LIMIT 1")
        .fetch_one(&mut conn)
        .await?;

    let ns = repeat("'big'", BATCH, "text");
    let ids = text_array(&mine);
    let (udf, holder) = (text("plans"), text("w1"));
    let probes = [
        Probe {
            name: "complete (pull completion, push report)",
            sql: queue::COMPLETE_SQL,
            args: vec![
                udf.clone(),
                holder.clone(),
                ns.clone(),
                ids.clone(),
                repeat(r#"'{"tags": ["wireless"]}'"#, BATCH, "text"),
                repeat("NULL", BATCH, "text"),
                text(&FunctionSpec::marker_attribute("plans")),
                text(&FunctionSpec::stale_after_attribute("plans")),
                "NULL::float8".into(),
            ],
            // 21,100-21,700 measured first; 62,500-71,800 before the lookups
            // were by key. Each EXPLAIN ANALYZE before it leaves the
            // versions it rolled back in the indexes, so later ones read
            // more: the bounds leave room for that.
            max_buffers: 45_000,
        },
        Probe {
            name: "fail: the leases held",
            sql: queue::FAIL_HELD_SQL,
            args: vec![udf.clone(), holder.clone(), ns.clone(), ids.clone()],
            // 5,000-10,700 measured.
            max_buffers: 16_000,
        },
        Probe {
            name: "fail: the moves",
            sql: queue::TRANSITION_SQL,
            args: vec![
                udf.clone(),
                ns.clone(),
                ids.clone(),
                repeat("'pending'", BATCH, "text"),
                repeat("1", BATCH, "int"),
                repeat("0", BATCH, "int"),
                repeat("1.5", BATCH, "float8"),
                repeat("'transient'", BATCH, "text"),
                repeat("'trouble'", BATCH, "text"),
            ],
            // 14,100-20,500 measured.
            max_buffers: 30_000,
        },
        Probe {
            name: "report: the rows it left out",
            sql: queue::UNREPORTED_SQL,
            args: vec![udf.clone(), batch.to_string(), holder.clone()],
            // 25-55 measured: the batch's entries of the in-flight index.
            max_buffers: 500,
        },
        Probe {
            name: "pull heartbeat",
            sql: queue::HEARTBEAT_SQL,
            args: vec![udf.clone(), holder.clone(), ns.clone(), ids.clone()],
            // 24,700-35,100 measured: each moved lease is a new entry in
            // every index of the leased items.
            max_buffers: 50_000,
        },
    ];
    let mut problems = Vec::new();
    for stats in ["stale statistics", "fresh statistics"] {
        if stats.starts_with("fresh") {
            sqlx::query("ANALYZE rows, work_items").execute(&mut conn).await?;
        }
        for mode in ["force_custom_plan", "force_generic_plan"] {
            for probe in &probes {
                let explained = explain(&mut conn, probe, mode).await?;
                for problem in shape_problems(&explained, probe.max_buffers) {
                    problems.push(format!("{}, {stats}, {mode}: {problem}\n{:#}", probe.name, explained["Plan"]));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    Ok(())
}

/// EXPLAIN (ANALYZE, BUFFERS) of one claim round of `limit` rows, in a
/// claim's own transaction, rolled back.
async fn explain_claim(
    pool: &sqlx::PgPool,
    udf: &layer_protocol::function::Udf,
    claimer: Claimer<'_>,
    limit: i64,
) -> anyhow::Result<Value> {
    let needs = Needs::of(udf)?;
    let holder = match claimer {
        Claimer::Worker { id, .. } => id.to_string(),
        Claimer::Runner { id, .. } => queue::batch_holder(id, i64::MAX),
    };
    let round = queue::ClaimRound {
        udf,
        needs: &needs,
        claimer,
        batch_id: i64::MAX,
        holder: &holder,
        cap: 1_000,
        want: limit,
        lease_seconds: 600,
        first: true,
    };
    let mut tx = queue::begin_claim(pool).await?;
    let mut qb = queue::claim_statement("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ", round);
    let explained: (sqlx::types::Json<Value>,) = qb.build_query_as().fetch_one(&mut *tx).await?;
    tx.rollback().await?;
    Ok(explained.0.0[0].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_and_the_incremental_sweep_use_their_indexes_whatever_the_statistics() -> anyhow::Result<()> {
    let p = TestPlatform::start().await?;
    let mut conn = PgConnection::connect_with(&p.db.options).await?;
    // A filter and an input, so the claim's check of each row is the
    // one real Functions make.
    let spec = json!({"targetNamespaces": ["big"], "inputs": ["id", "title"], "worker": {"dispatch": "pull"},
                      "filter": ["size", "Lt", 100], "schedule": {"leaseSeconds": 600}});
    queued_on_stale_statistics(&p, &mut conn, "claims", spec).await?;
    // 1,000 rows written since the last sweep, for the incremental sweep's
    // plan; paused, so no sweep of the platform's takes them first.
    let (s, r) = p.call(Method::POST, "/v2/udfs/claims/pause", None).await?;
    anyhow::ensure!(s == 200, "pause: {r}");
    let (from, _): (i64, String) = sqlx::query_as(
        "SELECT last_seq, spec_key FROM discovery_cursors WHERE function_id = 'claims' AND namespace = 'big'",
    )
    .fetch_one(&mut conn)
    .await?;
    bulk_rows(&mut conn, "big", QUEUED, QUEUED + BATCH).await?;
    let to: i64 =
        sqlx::query_scalar("SELECT write_seq FROM namespaces WHERE name = 'big'").fetch_one(&mut conn).await?;
    let udf = layer_platform::functions::store::get(&p.pool, "claims").await?;
    let mut problems = Vec::new();
    for stats in ["stale statistics", "fresh statistics"] {
        if stats.starts_with("fresh") {
            sqlx::query("ANALYZE rows, work_items").execute(&mut conn).await?;
        }
        let claimers = [
            ("a pull worker's claim", Claimer::Worker { id: "w3", key: "k" }),
            ("a runner's batch", Claimer::Runner { id: "rn_plans", trace_id: "00000000000000000000000000000000" }),
        ];
        for (name, claimer) in claimers {
            let explained = explain_claim(&p.pool, &udf, claimer, BATCH as i64).await?;
            // It picked its 1,000 rows from the claimable index.
            let mut all = Vec::new();
            nodes(&explained["Plan"], &mut all);
            let picked = all.iter().any(|n| n["Index Name"] == "work_items_claimable" && n["Actual Rows"] == 1_000);
            anyhow::ensure!(
                picked,
                "{name}: 1,000 rows were not picked by the claimable index: {:#}",
                explained["Plan"]
            );
            // 5,045-5,056 measured.
            for problem in shape_problems(&explained, 10_000) {
                problems.push(format!("{name}, {stats}: {problem}\n{:#}", explained["Plan"]));
            }
        }
        // The incremental sweep reads the 1,000 new rows by their write
        // sequence and enqueues them by key.
        let needs = Needs::of(&udf)?;
        let key = spec_key(&udf.spec);
        let range = SweepRange { udf: &udf, needs: &needs, namespace: "big", key: &key, same_key: true, from, to };
        let mut tx = p.pool.begin().await?;
        let mut qb = sweep_statement("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) ", range);
        let explained: (sqlx::types::Json<Value>,) = qb.build_query_as().fetch_one(&mut *tx).await?;
        tx.rollback().await?;
        let explained = explained.0.0[0].clone();
        let mut all = Vec::new();
        nodes(&explained["Plan"], &mut all);
        let read = all.iter().any(|n| n["Index Name"] == "rows_namespace_write_seq" && n["Actual Rows"] == 1_000);
        if !read {
            problems.push(format!(
                "the sweep, {stats}: the new rows were not read by write sequence\n{:#}",
                explained["Plan"]
            ));
        }
        // 8,200-10,500 measured.
        for problem in shape_problems(&explained, 16_000) {
            problems.push(format!("the sweep, {stats}: {problem}\n{:#}", explained["Plan"]));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    Ok(())
}
