//! A Function's status with what the fleet says about it.

use std::time::Duration;

use layer_protocol::function::{Dispatch, Udf, UdfCondition, UdfStatus};
use sqlx::PgPool;

use super::dispatch::{compute_pools, scheduling, unmet};
use super::{scaling, store};
use crate::error::Result;

/// The queue's status of a Function (`engine::queue::status`) with its
/// conditions: a rejection by its compute pool, no active runner that can
/// run its push batches or its pull workers, or what
/// [`scaling::conditions`] finds. Runners silent for `lost_after` do not
/// count as able to take its work.
pub async fn status(pool: &PgPool, udf: &Udf, lost_after: Duration) -> Result<UdfStatus> {
    let mut status = crate::engine::queue::status(pool, udf).await?;
    let pools = compute_pools(crate::resources::store::list_infra_rules(pool).await?);
    let s = match scheduling(udf, &pools) {
        Ok(s) => s,
        Err(c) => {
            status.conditions = vec![c];
            return Ok(status);
        }
    };
    let push = udf.spec.worker.dispatch == Dispatch::Push;
    // A pull Function without an image has its workers elsewhere: the
    // runners do not matter to it.
    let runners = if push || scaling::runs_pull_workers(udf) {
        store::list(pool, lost_after.as_secs_f64()).await?
    } else {
        Vec::new()
    };
    status.conditions = if push {
        unmet(&s, &runners).map(|why| UdfCondition::new("NoRunner", why)).into_iter().collect()
    } else {
        scaling::conditions(pool, udf, &s, &runners, status.pending_count as u64).await?
    };
    Ok(status)
}
