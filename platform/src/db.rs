//! Connecting to PostgreSQL and applying the embedded migrations.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::error::{PlatformError, Result};

/// The migrations in `migrations/`, compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// The advisory lock held while a replica bootstraps (first admin key).
/// sqlx's migrator takes its own lock around the migrations themselves, so
/// several replicas can start together and the migrations run once.
pub const BOOTSTRAP_LOCK: i64 = 0x4c41_5945_5201; // "LAYER" 1
/// Taken by the replica whose scaler decides pull workers this tick.
pub const SCALER_LOCK: i64 = 0x4c41_5945_5202; // "LAYER" 2

/// Opens a pool. `max_connections` bounds what one replica takes.
pub async fn connect(options: PgConnectOptions, max_connections: u32) -> Result<PgPool> {
    // Statements are prepared once per connection and PostgreSQL's own
    // plan cache decides (`plan_cache_mode = auto`): re-planning the large
    // queue statements on every run cost about 2 ms of the ~9 ms a single
    // row took from write to marker, and forcing custom plans bought no
    // throughput once claims and completions were written to look rows up
    // by primary key (docs/benchmarks.md, "What keeps the row path fast").
    let options = options.application_name("layer-platform");
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await
        .map_err(|e| PlatformError::Setup(format!("cannot connect to PostgreSQL: {e}")))
}

/// Applies pending migrations (once, under sqlx's advisory lock).
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Parses a `postgres://` URL, with a clear error.
pub fn parse_url(url: &str) -> Result<PgConnectOptions> {
    url.parse::<PgConnectOptions>().map_err(|e| PlatformError::Setup(format!("invalid database URL: {e}")))
}
