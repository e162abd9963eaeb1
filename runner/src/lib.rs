//! The Layer node runner. This crate is a skeleton: registration, warm
//! worker pools, timeouts and NVML GPU binding arrive with the push-dispatch
//! and container issues. What is here is the shape they fill in.

use tokio_util::sync::CancellationToken;

/// What a runner needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// The platform's base URL.
    pub platform: String,
}

/// Why a runner stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("the runner is not implemented yet: push dispatch arrives with a later issue")]
    NotImplemented,
}

/// Runs a runner until `shutdown` is cancelled.
pub async fn run(_config: Config, _shutdown: CancellationToken) -> Result<(), RunnerError> {
    Err(RunnerError::NotImplemented)
}
