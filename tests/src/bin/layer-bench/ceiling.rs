//! The ceiling of the row path: the writeback statement alone, merging
//! attributes and a marker into rows found by key, `batch` rows per
//! statement, from one and from two backends, on the same PostgreSQL and
//! row shape as W1. No queue, no leases, no HTTP: what PostgreSQL itself
//! can write, against which W1-pull, W1-push and PgQueuer are read.

use std::time::Instant;

use anyhow::{Result, ensure};
use sqlx::postgres::PgPoolOptions;
use sqlx::{ConnectOptions, Executor};

use crate::drain::postgres_cpu;

/// One ceiling run: rows/s and PostgreSQL CPU-seconds per 1,000 rows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ceiling {
    pub(crate) rate: f64,
    pub(crate) pg_cpu_per_k: f64,
}

/// Updates every row of `ns` once, `batch` per statement, from `backends`
/// connections that split the ids between them; asynchronous commit and
/// key lookups, as the platform's writeback runs.
pub(crate) async fn writeback_alone(
    db_url: &str,
    postmaster: u32,
    ns: &str,
    batch: usize,
    backends: usize,
) -> Result<Ceiling> {
    let options: sqlx::postgres::PgConnectOptions = db_url.parse()?;
    let pool = PgPoolOptions::new()
        .max_connections(backends as u32)
        .after_connect(|conn, _| {
            Box::pin(async move {
                conn.execute(
                    "SET synchronous_commit = off; SET enable_seqscan = off; \
                     SET enable_hashjoin = off; SET enable_mergejoin = off",
                )
                .await?;
                Ok(())
            })
        })
        .connect_with(options.disable_statement_logging())
        .await?;
    // Settled first: autovacuum's first pass over freshly written rows
    // would otherwise run inside the measurement (its CPU is PostgreSQL's).
    sqlx::query("VACUUM (ANALYZE) rows").execute(&pool).await?;
    let ids: Vec<String> =
        sqlx::query_scalar("SELECT id FROM rows WHERE namespace = $1 ORDER BY id").bind(ns).fetch_all(&pool).await?;
    ensure!(!ids.is_empty(), "namespace {ns} is empty");
    let chunks: Vec<Vec<String>> = ids.chunks(batch).map(<[String]>::to_vec).collect();
    let g0 = postgres_cpu(postmaster);
    let start = Instant::now();
    let tasks: Vec<_> = (0..backends)
        .map(|b| {
            let pool = pool.clone();
            let ns = ns.to_string();
            let mine: Vec<Vec<String>> = chunks.iter().skip(b).step_by(backends).cloned().collect();
            tokio::spawn(async move {
                let mut conn = pool.acquire().await?;
                let mut written = 0u64;
                for ids in mine {
                    let attrs = vec![r#"{"echo": {"title": "x"}}"#.to_string(); ids.len()];
                    written += sqlx::query(
                        "UPDATE rows r
                         SET attributes = r.attributes || u.attrs::jsonb || jsonb_build_object('_hevlayer_udf_ceiling_v', 'v1')
                         FROM unnest($2::text[], $3::text[]) AS u(id, attrs)
                         WHERE r.namespace = $1 AND r.id = u.id",
                    )
                    .bind(&ns)
                    .bind(&ids)
                    .bind(&attrs)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                }
                anyhow::Ok(written)
            })
        })
        .collect();
    let mut written = 0;
    for t in tasks {
        written += t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let g1 = postgres_cpu(postmaster);
    pool.close().await;
    ensure!(written == ids.len() as u64, "wrote {written} of {}", ids.len());
    let rows = ids.len() as f64;
    Ok(Ceiling { rate: rows / elapsed, pg_cpu_per_k: (g1 - g0) / (rows / 1000.0) })
}
