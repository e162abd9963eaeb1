//! The runner protocol: registration and heartbeats (runner → platform),
//! batches pushed to runners (platform → runner), reports of their results
//! (runner → platform), and the push protocol between a runner and its
//! workers (`POST /run`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::work::ClaimedItem;

/// What a runner offers.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Capacity {
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Batches the runner runs at once.
    #[cfg_attr(feature = "openapi", schema(minimum = 1))]
    pub slots: u32,
    #[serde(default)]
    pub gpus: Vec<GpuInfo>,
}

/// One GPU, as the runner's inventory reports it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_bytes: u64,
}

/// `POST /v2/runners`, with an API key that has the `runner` claim or the
/// admin scope.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = RegisterRunner))]
pub struct RegisterRequest {
    #[cfg_attr(feature = "openapi", schema(min_length = 1, max_length = 128, pattern = "\\S"))]
    pub name: String,
    /// Where the platform reaches the runner (`http://host:port`).
    #[cfg_attr(feature = "openapi", schema(pattern = "^https?://"))]
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    /// Worker drivers the runner has: `process`, later `docker`.
    #[serde(default)]
    pub drivers: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RegisterResponse {
    pub runner_id: String,
    /// The runner's session token (a JWT) for heartbeats and deregistration;
    /// heartbeat answers carry its replacement before it expires.
    pub token: String,
    pub token_expires_in_seconds: u64,
    /// The key (hex) the platform signs this runner's tokens with; the runner
    /// checks the batches it is sent against it. Shown once.
    pub signing_key: String,
    pub heartbeat_interval_seconds: u32,
}

/// A runner's state as the platform sees it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum RunnerState {
    /// Heartbeating and taking batches.
    Active,
    /// Finishing its batches after SIGTERM; takes no new ones.
    Draining,
    /// Missed its heartbeats: takes no batches; its leases run out.
    Lost,
    /// Deregistered.
    Gone,
}

/// A warm (or starting) worker on a runner.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerView {
    pub udf_id: String,
    pub revision: i32,
    /// Push workers: `starting`, `idle` or `busy`. Pull workers: `starting`,
    /// `running`, or `backoff` (it exited; restarted after a doubling pause).
    pub state: String,
    /// `pull` for a pull worker the runner runs from the Function's image;
    /// absent for push workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Why a pull worker is in backoff: how it ended, with its last lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The process id, for the process driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The container id (12 characters), for the Docker driver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The UUIDs of the GPUs bound to the worker.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<String>,
}

/// How a runner's GPU stands, sampled with each heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct GpuStatus {
    pub uuid: String,
    /// `free`, `bound` (to `worker`) or `cordoned` (after an error; takes
    /// no work until the runner restarts).
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udf_id: Option<String>,
    /// GPU utilisation over the driver's last sample period, 0-100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utilization_percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_used_bytes: Option<u64>,
    pub memory_total_bytes: u64,
    /// Why the GPU was cordoned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunnerLoad {
    /// Batches accepted and not yet reported.
    pub batches: u32,
    #[serde(default)]
    pub workers: Vec<WorkerView>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<GpuStatus>,
}

/// One line of a worker's output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LogLine {
    /// When the runner read it (Unix milliseconds).
    pub at_unix_ms: u64,
    pub line: String,
}

/// A worker's recent output, as a runner keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerLogs {
    pub worker: String,
    pub udf_id: String,
    pub revision: i32,
    pub started_at_unix_ms: u64,
    /// Whether the worker's output is still open (it has not stopped).
    pub running: bool,
    pub lines: Vec<LogLine>,
}

/// `GET /v1/logs?udf=ID&lines=N` on a runner, signed by the platform.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunnerLogs {
    pub workers: Vec<WorkerLogs>,
}

/// A worker's output with the runner it ran on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FunctionWorkerLogs {
    pub runner_id: String,
    pub runner_name: String,
    #[serde(flatten)]
    pub logs: WorkerLogs,
}

/// A runner the platform could not ask for logs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UnreachableRunner {
    pub runner_id: String,
    pub runner_name: String,
    pub error: String,
}

/// `GET /v2/udfs/{id}/logs`: the recent output of the Function's workers
/// on every active runner.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FunctionLogs {
    pub udf_id: String,
    pub workers: Vec<FunctionWorkerLogs>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<UnreachableRunner>,
}

/// `POST /v2/runners/{id}/heartbeat`, with the session token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = RunnerHeartbeatRequest))]
pub struct HeartbeatRequest {
    /// `active` or `draining`.
    pub state: RunnerState,
    pub load: RunnerLoad,
    /// Batches the runner holds: their leases are extended.
    #[serde(default)]
    pub batch_ids: Vec<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = RunnerHeartbeatResponse))]
pub struct HeartbeatResponse {
    /// A fresh session token once the current one is past half its life.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Leases extended.
    pub extended: u64,
    /// The pull workers this runner is to keep running, every Function's
    /// (none: stop them all). Older platforms send nothing here.
    #[serde(default)]
    pub pull: Vec<PullWorkers>,
}

/// Pull workers of one Function that the platform's scaler assigned to a
/// runner: `replicas` containers of the revision's image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PullWorkers {
    pub udf_id: String,
    pub revision: i32,
    pub replicas: u32,
    pub plan: WorkerPlan,
}

/// `POST /v2/runners/{id}/worker-slots`, with the session token: may this
/// runner start one more push worker of the Function?
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerSlotRequest {
    pub udf_id: String,
    /// The push workers of the Function this runner has besides the one it
    /// asks for (running, stopping or starting). The platform brings the
    /// runner's slots down to it before counting, so the slot of a worker
    /// that crashed or was killed is free at once rather than at the next
    /// heartbeat. Absent: the runner's slots are left as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub others: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerSlotResponse {
    pub granted: bool,
    /// The workers of the Function the fleet may run (`replicas.max`).
    pub max: u32,
    /// Slots held across the fleet, this one included when granted.
    pub held: u32,
}

/// `POST /v2/runners/{id}/worker-keys`, with the session token: a key for
/// the workers of one Function on this runner.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerKeyRequest {
    pub udf_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerKeyResponse {
    pub udf_id: String,
    pub key_id: String,
    /// Shown once; the runner hands it to the workers as
    /// `LAYER_GATEWAY_API_KEY`.
    pub token: String,
    /// The namespaces the key may read and write.
    pub namespaces: Vec<String>,
}

/// A runner in `GET /v2/runners`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunnerView {
    pub id: String,
    pub name: String,
    pub address: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: Capacity,
    pub drivers: Vec<String>,
    pub state: RunnerState,
    pub load: RunnerLoad,
    pub batches_in_flight: i64,
    pub registered_at: String,
    pub last_heartbeat_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RunnerList {
    pub runners: Vec<RunnerView>,
}

/// How the runner runs a Function's workers: the parts of the spec it needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerPlan {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub batch_size: u32,
    pub timeout_seconds: u32,
    pub lease_seconds: u32,
    pub replicas_min: u32,
    pub replicas_max: u32,
    /// `worker.resources`, read: CPUs, memory and scratch space per worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ephemeral_disk_bytes: Option<u64>,
    /// Whole GPUs bound to each worker, exclusively.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gpus: u32,
    /// How calls reach the worker.
    #[serde(default)]
    pub protocol: crate::function::CallProtocol,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `POST /v1/batches` on a runner, signed by the platform
/// (`Authorization: Bearer <dispatch token>`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BatchAssignment {
    pub batch_id: i64,
    pub udf_id: String,
    pub revision: i32,
    pub version: String,
    pub worker: WorkerPlan,
    pub items: Vec<ClaimedItem>,
    /// The token the runner presents when it reports this batch.
    pub report_token: String,
}

/// How a row failed, as workers and runners classify it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Try again later (spends an attempt).
    Transient,
    /// Can never succeed: fails at once.
    Permanent,
    /// The worker call ran past `timeoutSeconds`.
    Timeout,
    /// The worker ran out of memory.
    Oom,
    /// The runner could not run the batch for reasons of its own (it is
    /// shutting down, a GPU was cordoned, the platform did not answer): a
    /// free retry, bounded separately.
    RunnerLost,
    /// No worker came free on the runner in time (every one busy, no slot
    /// in the fleet, no GPU free): the rows go back to the queue charged
    /// nothing, not even a free retry. Waiting for capacity never fails a row.
    NoWorker,
}

impl FailureKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Transient => "transient",
            FailureKind::Permanent => "permanent",
            FailureKind::Timeout => "timeout",
            FailureKind::Oom => "oom",
            FailureKind::RunnerLost => "runner_lost",
            FailureKind::NoWorker => "no_worker",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RowError {
    pub kind: FailureKind,
    pub message: String,
}

/// One row's outcome: `attributes` (and optionally `vector`), or `error`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RowResult {
    pub namespace: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub attributes: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vector: Option<Vec<f64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RowError>,
}

/// `POST /v2/runners/{id}/batches/{batch_id}/report`, with the batch's
/// report token. Idempotent: a repeat changes nothing and is acknowledged.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchReport {
    pub results: Vec<RowResult>,
    /// The worker that ran the batch (for the batch record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// When the runner began working on the batch and when its worker
    /// calls ended, in Unix milliseconds (for the batch record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at_ms: Option<i64>,
    /// The UUIDs of the GPUs the worker held.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<String>,
    /// Whether a worker was started for the batch (a cold start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start: Option<bool>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ReportResponse {
    pub batch_id: i64,
    /// Results written with their markers.
    pub written: u64,
    /// Failures recorded.
    pub failed: u64,
    /// Results dropped: the lease was lost or the row changed since.
    pub dropped: u64,
}

/// The push protocol: what a worker's `POST /run` receives.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRequest {
    pub udf_id: String,
    pub version: String,
    pub batch_id: i64,
    pub items: Vec<ClaimedItem>,
}

/// The claims of every token the platform signs (HS256, per-runner key).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TokenClaims {
    /// Always [`TOKEN_ISSUER`].
    pub iss: String,
    /// [`AUDIENCE_PLATFORM`] for tokens the runner presents,
    /// [`AUDIENCE_RUNNER`] for batches the platform sends.
    pub aud: String,
    /// The runner id.
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    /// The batch a dispatch or report token is for; none on session tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<i64>,
    /// The call a call token is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<String>,
}

pub const TOKEN_ISSUER: &str = "layer-platform";
pub const AUDIENCE_PLATFORM: &str = "layer-platform";
pub const AUDIENCE_RUNNER: &str = "layer-runner";

/// Signing and checking the platform's tokens. HS256 only (the algorithm is
/// pinned on both sides), with the runner's own key, so a runner can neither
/// forge another runner's tokens nor present one of them.
pub mod tokens {
    use super::{AUDIENCE_PLATFORM, AUDIENCE_RUNNER, TOKEN_ISSUER, TokenClaims};
    use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};

    /// Session tokens live this long; heartbeats replace them at half-life.
    pub const SESSION_TTL_SECONDS: u64 = 600;
    /// Dispatch tokens only need to outlive the HTTP call that carries them.
    pub const DISPATCH_TTL_SECONDS: u64 = 60;

    /// What a token is for.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Purpose<'a> {
        /// Runner → platform: heartbeats, deregistration.
        Session,
        /// Platform → runner: one batch.
        Dispatch(i64),
        /// Platform → runner: a read of the runner's state (logs).
        Inspect,
        /// Runner → platform: the report of one batch.
        Report(i64),
        /// Platform → runner: one call.
        Call(&'a str),
    }

    impl Purpose<'_> {
        fn audience(self) -> &'static str {
            match self {
                Purpose::Dispatch(_) | Purpose::Inspect | Purpose::Call(_) => AUDIENCE_RUNNER,
                Purpose::Session | Purpose::Report(_) => AUDIENCE_PLATFORM,
            }
        }
        fn batch(self) -> Option<i64> {
            match self {
                Purpose::Session | Purpose::Inspect | Purpose::Call(_) => None,
                Purpose::Dispatch(b) | Purpose::Report(b) => Some(b),
            }
        }
        fn call(self) -> Option<String> {
            match self {
                Purpose::Call(c) => Some(c.to_string()),
                _ => None,
            }
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or_default()
    }

    /// Signs a token for `runner_id` valid for `ttl_seconds`.
    pub fn sign(key: &[u8], runner_id: &str, purpose: Purpose, ttl_seconds: u64) -> String {
        let iat = now();
        let claims = TokenClaims {
            iss: TOKEN_ISSUER.into(),
            aud: purpose.audience().into(),
            sub: runner_id.into(),
            iat,
            exp: iat + ttl_seconds,
            batch: purpose.batch(),
            call: purpose.call(),
        };
        // HS256 over a serialisable struct cannot fail.
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(key))
            .unwrap_or_default()
    }

    /// Checks signature (HS256 only), issuer, audience, expiry (no leeway),
    /// the runner and the purpose. The error says which check failed.
    pub fn verify(key: &[u8], token: &str, runner_id: &str, purpose: Purpose) -> Result<TokenClaims, String> {
        let mut v = Validation::new(Algorithm::HS256);
        v.set_issuer(&[TOKEN_ISSUER]);
        v.set_audience(&[purpose.audience()]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.leeway = 0;
        let data = jsonwebtoken::decode::<TokenClaims>(token, &DecodingKey::from_secret(key), &v)
            .map_err(|e| format!("token refused: {e}"))?;
        let c = data.claims;
        if c.sub != runner_id {
            return Err(format!("token refused: it was issued to runner {}, not {runner_id}", c.sub));
        }
        if c.batch != purpose.batch() || c.call != purpose.call() {
            return Err("token refused: it was issued for another purpose or batch".into());
        }
        Ok(c)
    }

    /// Seconds a token has left (for rotation), without checking it.
    pub fn seconds_left(claims: &TokenClaims) -> u64 {
        claims.exp.saturating_sub(now())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn tokens_are_bound_to_key_runner_purpose_and_time() {
            let key = b"0123456789abcdef0123456789abcdef";
            let t = sign(key, "r1", Purpose::Report(7), 60);
            assert!(verify(key, &t, "r1", Purpose::Report(7)).is_ok());
            assert!(verify(b"another key, same length.........", &t, "r1", Purpose::Report(7)).is_err());
            assert!(verify(key, &t, "r2", Purpose::Report(7)).unwrap_err().contains("issued to runner r1"));
            assert!(verify(key, &t, "r1", Purpose::Report(8)).is_err());
            assert!(verify(key, &t, "r1", Purpose::Session).is_err());
            // The dispatch audience differs from the report audience.
            assert!(verify(key, &t, "r1", Purpose::Dispatch(7)).is_err());
            // An inspection token is neither a session token nor a batch's.
            let inspect = sign(key, "r1", Purpose::Inspect, 60);
            assert!(verify(key, &inspect, "r1", Purpose::Inspect).is_ok());
            assert!(verify(key, &inspect, "r1", Purpose::Session).is_err());
            assert!(verify(key, &inspect, "r1", Purpose::Dispatch(7)).is_err());
            assert!(verify(key, &sign(key, "r1", Purpose::Session, 60), "r1", Purpose::Inspect).is_err());
            // A call token is for that call alone.
            let call = sign(key, "r1", Purpose::Call("call_a"), 60);
            assert!(verify(key, &call, "r1", Purpose::Call("call_a")).is_ok());
            assert!(verify(key, &call, "r1", Purpose::Call("call_b")).is_err());
            assert!(verify(key, &call, "r1", Purpose::Inspect).is_err());
            assert!(verify(key, &inspect, "r1", Purpose::Call("call_a")).is_err());
            let expired = {
                let claims = TokenClaims {
                    iss: TOKEN_ISSUER.into(),
                    aud: AUDIENCE_PLATFORM.into(),
                    sub: "r1".into(),
                    iat: 1,
                    exp: now() - 1,
                    batch: None,
                    call: None,
                };
                jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(key)).unwrap()
            };
            assert!(verify(key, &expired, "r1", Purpose::Session).unwrap_err().contains("Expired"));
            // Another algorithm is refused even with the right key.
            let hs512 = jsonwebtoken::encode(
                &Header::new(Algorithm::HS512),
                &TokenClaims {
                    iss: TOKEN_ISSUER.into(),
                    aud: AUDIENCE_PLATFORM.into(),
                    sub: "r1".into(),
                    iat: 1,
                    exp: now() + 60,
                    batch: None,
                    call: None,
                },
                &EncodingKey::from_secret(key),
            )
            .unwrap();
            assert!(verify(key, &hs512, "r1", Purpose::Session).is_err());
        }
    }
}

/// One batch's record (`GET /v2/batches/{id}`, `GET /v2/udfs/{id}/batches`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchRecord {
    pub id: i64,
    pub udf_id: String,
    pub revision: i32,
    pub runner_id: String,
    /// `dispatched` (on a runner), `reported`, or `abandoned` (refused by
    /// the runner, or its leases expired).
    pub state: String,
    /// Rows leased.
    pub items: i32,
    pub written: i32,
    pub failed: i32,
    pub dropped: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold_start: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The OpenTelemetry trace of the batch (32 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// When the batch's longest-waiting row became claimable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queued_at: Option<String>,
    /// When it was leased and sent to the runner.
    pub dispatched_at: String,
    /// When the runner began working on it, and when its worker calls ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_at: Option<String>,
    /// When its report was written back (or it was abandoned).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = BatchList))]
pub struct ListBatchesResponse {
    pub batches: Vec<BatchRecord>,
    /// Pass as `cursor` for the next (older) page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A row that spent its attempts (`GET /v2/udfs/{id}/failed`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FailedRow {
    pub namespace: String,
    pub id: String,
    pub attempts: i32,
    pub free_retries: i32,
    /// The class of the last failure (`permanent`, `transient`, `timeout`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The version the row was to be brought to.
    pub version: String,
    pub failed_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(feature = "openapi", schema(as = FailedRowList))]
pub struct ListFailedResponse {
    pub rows: Vec<FailedRow>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}
