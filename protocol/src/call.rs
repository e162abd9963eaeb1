//! Calls: a Function run once over HTTP (`POST /v2/udfs/{id}/calls`),
//! through the same runners and warm workers as its row batches.
//!
//! The platform places a call on a runner and sends it a
//! [`CallAssignment`] (`POST /v1/calls`, signed with a call token); the
//! runner runs it on a worker of the Function's pool, as a batch of one
//! item whose `id` is the call id and whose `input` is the caller's
//! object, and answers a [`CallAnswer`]. Every finished call leaves a
//! [`CallRecord`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::runner::WorkerPlan;

/// Platform → runner: `POST /v1/calls`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallAssignment {
    pub call_id: String,
    pub udf_id: String,
    pub revision: i32,
    pub version: String,
    pub worker: WorkerPlan,
    /// The item's `input`: the caller's JSON object (`run` protocol).
    #[serde(default)]
    pub input: Map<String, Value>,
    /// The caller's body as it came, base64 (`invoke` protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// The caller's `Content-Type` (`invoke` protocol).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
}

/// How a call ended, on the runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallOutcome {
    /// The worker answered with the item's attributes.
    Succeeded,
    /// The worker answered the item with a `permanent` error.
    Failed,
    /// The worker answered the item with a `transient` error.
    Transient,
    /// The worker did not answer within `timeoutSeconds`; it was replaced.
    TimedOut,
    /// The worker crashed, ran out of memory, would not start, or answered
    /// something that is not a result.
    WorkerFailed,
    /// No worker of the Function came free in time.
    Busy,
    /// This runner cannot run the Function now.
    Unavailable,
}

/// Runner → platform: the answer to a [`CallAssignment`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CallAnswer {
    pub outcome: CallOutcome,
    /// With `succeeded`: the item's attributes, the caller's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Map<String, Value>>,
    /// Otherwise: what went wrong, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// Whether a worker was started for the call.
    #[serde(default)]
    pub cold_start: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<String>,
    /// With the `invoke` protocol: the worker's answer, passed to the
    /// caller as it is (any status, `succeeded` included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passthrough: Option<Passthrough>,
    /// Milliseconds spent getting a worker (a cold start included).
    pub acquire_ms: f64,
    /// Milliseconds of the worker's call.
    pub worker_ms: f64,
}

/// A worker's own answer to an `invoke` call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Passthrough {
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// The body, base64.
    pub body: String,
}

/// Where a call stands. Synchronous calls are recorded once they end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum CallStatus {
    /// The Function answered.
    Succeeded,
    /// The Function answered with an error, or its worker failed.
    Failed,
    /// The worker did not answer within `timeoutSeconds`.
    TimedOut,
    /// No worker or runner could take the call; it did not run.
    Rejected,
}

impl CallStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CallStatus::Succeeded => "succeeded",
            CallStatus::Failed => "failed",
            CallStatus::TimedOut => "timed_out",
            CallStatus::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [CallStatus::Succeeded, CallStatus::Failed, CallStatus::TimedOut, CallStatus::Rejected]
            .into_iter()
            .find(|c| c.as_str() == s)
    }
}

/// `GET /v2/calls/{call_id}`: one finished call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CallRecord {
    pub call_id: String,
    pub udf_id: String,
    pub revision: i32,
    pub status: CallStatus,
    /// The HTTP status the caller got.
    pub http_status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runner_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
    /// The key that made the call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    pub request_bytes: u64,
    pub response_bytes: u64,
    /// RFC 3339: when the platform accepted the call.
    pub queued_at: String,
    /// RFC 3339: when a worker had it, if one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    /// RFC 3339: when the answer was sent.
    pub finished_at: String,
    pub cold_start: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /v2/udfs/{id}/calls`: newest first.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CallList {
    pub calls: Vec<CallRecord>,
    /// Pass as `cursor` for the next page; absent on the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}
