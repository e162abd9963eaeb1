//! Several platform replicas starting together on one fresh database: the
//! migrations run once and exactly one bootstrap admin key is minted.

use layer_tests::TestDb;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_start_together_migrate_once_and_mint_one_key() -> anyhow::Result<()> {
    let db = TestDb::create().await?;
    let shutdown = CancellationToken::new();
    let mut starts = Vec::new();
    for _ in 0..4 {
        let mut config = layer_platform::Config::new(db.options.clone());
        config.listen = "127.0.0.1:0".parse()?;
        config.max_connections = 2;
        starts.push(tokio::spawn(layer_platform::start(config, shutdown.clone())));
    }
    let mut minted = 0;
    for s in starts {
        let started = s.await??;
        minted += usize::from(started.minted_admin_key.is_some());
        let r = reqwest::get(format!("http://{}/healthz", started.addr)).await?;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(minted, 1, "exactly one replica mints the bootstrap key");
    let pool = db.pool().await?;
    let keys: i64 = sqlx::query_scalar("SELECT count(*) FROM api_keys").fetch_one(&pool).await?;
    let migrations: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations").fetch_one(&pool).await?;
    assert_eq!((keys, migrations), (1, layer_platform::db::MIGRATOR.iter().count() as i64));
    shutdown.cancel();
    Ok(())
}
