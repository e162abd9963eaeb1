//! Failure classes and the retry policy: a pure function from an item's
//! attempts, an outcome and the Function's retry spec to the item's next
//! state. No I/O, so every branch is unit-tested.

use std::time::Duration;

use layer_protocol::function::RetrySpec;

/// Why an attempt did not complete. Retry logic matches on this, never on
/// message strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureClass {
    /// The worker said the input can never succeed (`PermanentError`).
    Permanent,
    /// The worker said to try again (`TransientError`, any other exception).
    Transient,
    /// The worker call ran past `timeoutSeconds`.
    Timeout,
    /// The worker ran out of memory.
    OutOfMemory,
    /// The lease expired without any report.
    LeaseExpired,
    /// The runner holding the batch disappeared, or could not run it.
    RunnerLost,
    /// The runner had no worker free in time: capacity, not a fault. The
    /// row is tried again after [`NO_WORKER_DELAY`], charged nothing.
    NoWorker,
    /// The platform restarted mid-batch.
    PlatformRestart,
}

impl FailureClass {
    /// Whether the failure spends one of the row's `maxAttempts`.
    pub fn counts_against_attempts(self) -> bool {
        !matches!(self, FailureClass::RunnerLost | FailureClass::PlatformRestart | FailureClass::NoWorker)
    }

    /// Whether the row is tried again at all.
    pub fn is_retriable(self) -> bool {
        self != FailureClass::Permanent
    }

    /// The stable name stored with the row's last error.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::Permanent => "permanent",
            FailureClass::Transient => "transient",
            FailureClass::Timeout => "timeout",
            FailureClass::OutOfMemory => "oom",
            FailureClass::LeaseExpired => "lease_expired",
            FailureClass::RunnerLost => "runner_lost",
            FailureClass::NoWorker => "no_worker",
            FailureClass::PlatformRestart => "platform_restart",
        }
    }
}

/// Free retries for infrastructure faults are bounded separately, so a
/// runner that keeps dying cannot hold a row forever.
pub const MAX_FREE_RETRIES: u32 = 20;

/// How long a row that found no free worker waits before it is claimable
/// again: the runner already waited, and a runner that answers at once
/// must not spin the queue.
pub const NO_WORKER_DELAY: Duration = Duration::from_secs(1);

/// Where an item goes after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// Back to the queue, claimable after `delay`.
    Retry { attempts: u32, free_retries: u32, delay: Duration },
    /// Out of the queue until `reset-failed`.
    Failed { attempts: u32, free_retries: u32 },
}

/// The backoff before attempt `attempts + 1`: `initial * 2^(attempts-1)`,
/// capped at `max`, scaled by `jitter` (in 0.5..=1.0, drawn by the caller).
pub fn backoff(attempts: u32, policy: &RetrySpec, jitter: f64) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    let base = (policy.initial_backoff_seconds as f64) * f64::from(1u32 << exp);
    let capped = base.min(policy.max_backoff_seconds as f64);
    Duration::from_secs_f64(capped * jitter.clamp(0.5, 1.0))
}

/// The next state of an item that has used `attempts` attempts and
/// `free_retries` free retries, after a failure of `class`.
pub fn next_state(attempts: u32, free_retries: u32, class: FailureClass, policy: &RetrySpec, jitter: f64) -> Next {
    if !class.is_retriable() {
        return Next::Failed { attempts: attempts + 1, free_retries };
    }
    if class == FailureClass::NoWorker {
        return Next::Retry { attempts, free_retries, delay: NO_WORKER_DELAY };
    }
    if !class.counts_against_attempts() {
        if free_retries + 1 > MAX_FREE_RETRIES {
            return Next::Failed { attempts, free_retries: free_retries + 1 };
        }
        return Next::Retry { attempts, free_retries: free_retries + 1, delay: Duration::ZERO };
    }
    let attempts = attempts + 1;
    if attempts >= policy.max_attempts {
        Next::Failed { attempts, free_retries }
    } else {
        Next::Retry { attempts, free_retries, delay: backoff(attempts, policy, jitter) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: u32) -> RetrySpec {
        RetrySpec { max_attempts, initial_backoff_seconds: 5, max_backoff_seconds: 60 }
    }

    #[test]
    fn transient_backs_off_doubling_to_the_cap() {
        let p = policy(10);
        let delays: Vec<u64> = (0..6)
            .map(|a| match next_state(a, 0, FailureClass::Transient, &p, 1.0) {
                Next::Retry { delay, .. } => delay.as_secs(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(delays, [5, 10, 20, 40, 60, 60]);
    }

    #[test]
    fn jitter_only_shortens() {
        let p = policy(10);
        assert_eq!(backoff(1, &p, 0.5), Duration::from_secs_f64(2.5));
        assert_eq!(backoff(1, &p, 7.0), Duration::from_secs(5));
    }

    #[test]
    fn attempts_run_out() {
        let p = policy(3);
        assert!(matches!(next_state(1, 0, FailureClass::Transient, &p, 1.0), Next::Retry { attempts: 2, .. }));
        assert_eq!(next_state(2, 0, FailureClass::Timeout, &p, 1.0), Next::Failed { attempts: 3, free_retries: 0 });
        assert_eq!(
            next_state(0, 0, FailureClass::LeaseExpired, &policy(1), 1.0),
            Next::Failed { attempts: 1, free_retries: 0 }
        );
    }

    #[test]
    fn permanent_fails_at_once() {
        assert_eq!(
            next_state(0, 0, FailureClass::Permanent, &policy(8), 1.0),
            Next::Failed { attempts: 1, free_retries: 0 }
        );
    }

    #[test]
    fn infrastructure_faults_are_free_but_bounded() {
        let p = policy(2);
        assert_eq!(
            next_state(1, 0, FailureClass::RunnerLost, &p, 1.0),
            Next::Retry { attempts: 1, free_retries: 1, delay: Duration::ZERO }
        );
        assert!(matches!(next_state(1, MAX_FREE_RETRIES, FailureClass::PlatformRestart, &p, 1.0), Next::Failed { .. }));
        assert!(FailureClass::OutOfMemory.counts_against_attempts());
    }

    #[test]
    fn waiting_for_a_worker_is_never_charged() {
        let p = policy(1);
        for _ in 0..(MAX_FREE_RETRIES * 3) {
            assert_eq!(
                next_state(0, MAX_FREE_RETRIES, FailureClass::NoWorker, &p, 1.0),
                Next::Retry { attempts: 0, free_retries: MAX_FREE_RETRIES, delay: NO_WORKER_DELAY }
            );
        }
    }
}
