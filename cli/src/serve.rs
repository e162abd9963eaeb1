//! `layer dev` and `layer platform`: run the control plane.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use layer_platform::embedded::{EmbeddedOptions, EmbeddedPostgres};
use layer_platform::{Config, db};
use tokio_util::sync::CancellationToken;

/// Cancels `token` on Ctrl-C or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        token.cancel();
    });
}

fn print_banner(addr: SocketAddr, minted: Option<&str>, data_dir: Option<&PathBuf>) {
    println!("Layer platform listening on http://{addr}");
    if let Some(dir) = data_dir {
        println!("  data: {} (PostgreSQL log in postgres.log)", dir.display());
    }
    if let Some(key) = minted {
        println!();
        println!("  An admin API key was minted. It is shown this once and stored only as a hash:");
        println!();
        println!("    export LAYER_API_KEY={key}");
        println!();
        println!("  (Set LAYER_API_KEY before the first start to choose the key yourself.)");
    }
    println!("  Stop with Ctrl-C.");
}

/// `layer dev`: embedded PostgreSQL plus the platform.
pub async fn dev(listen: SocketAddr, data_dir: PathBuf, api_key: Option<String>) -> Result<()> {
    let pg = EmbeddedPostgres::start(EmbeddedOptions { data_dir: data_dir.clone(), port: 5432, ephemeral: false })
        .await
        .context("starting the embedded PostgreSQL")?;
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let mut config = Config::new(pg.options(layer_platform::embedded::DATABASE));
    config.listen = listen;
    config.bootstrap_admin_key = api_key;
    let started = match layer_platform::start(config, shutdown.clone()).await {
        Ok(s) => s,
        Err(e) => {
            pg.stop().await.ok();
            return Err(e).context("starting the platform");
        }
    };
    print_banner(started.addr, started.minted_admin_key.as_deref(), Some(&data_dir));
    let served = started.wait().await;
    pg.stop().await.context("stopping PostgreSQL")?;
    served.context("serving")?;
    Ok(())
}

/// Settings of `layer platform`.
pub struct PlatformArgs {
    pub database_url: String,
    pub listen: SocketAddr,
    pub max_connections: u32,
    pub max_body_bytes: usize,
    pub api_key: Option<String>,
}

/// `layer platform`: a replica against an existing database.
pub async fn platform(args: PlatformArgs) -> Result<()> {
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let mut config = Config::new(db::parse_url(&args.database_url)?);
    config.listen = args.listen;
    config.max_connections = args.max_connections;
    config.max_body_bytes = args.max_body_bytes;
    config.bootstrap_admin_key = args.api_key;
    let started = layer_platform::start(config, shutdown).await.context("starting the platform")?;
    print_banner(started.addr, started.minted_admin_key.as_deref(), None);
    started.wait().await.context("serving")?;
    Ok(())
}
