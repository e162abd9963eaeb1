//! A Function's status with what the fleet says about it.

use std::time::Duration;

use layer_protocol::function::Udf;
use layer_protocol::function::{Dispatch, UdfStatus};
use sqlx::PgPool;

use crate::error::Result;

/// The queue's status of a Function (`engine::queue::status`) with its
/// conditions: why its push batches cannot be placed, or why its pull
/// workers do not run. Runners silent for `lost_after` do not count as able
/// to take its work.
pub async fn status(pool: &PgPool, udf: &Udf, lost_after: Duration) -> Result<UdfStatus> {
    let mut status = crate::engine::queue::status(pool, udf).await?;
    status.conditions = match udf.spec.worker.dispatch {
        Dispatch::Push => super::dispatch::conditions(pool, udf, lost_after).await?,
        Dispatch::Pull => super::scaling::conditions(pool, udf, lost_after, status.pending_count as u64).await?,
    };
    Ok(status)
}
