//! The runner's calls to the platform: registration, heartbeats (which
//! rotate the session token), reports (retried until acknowledged) and
//! deregistration.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use layer_protocol::runner::{
    BatchReport, Capacity, HeartbeatRequest, HeartbeatResponse, RegisterRequest, RegisterResponse, ReportResponse,
    RunnerLoad, RunnerState, WorkerKeyRequest, WorkerKeyResponse, WorkerSlotRequest, WorkerSlotResponse,
};
use tokio_util::sync::CancellationToken;

use crate::Shared;

#[derive(Default)]
struct Session {
    runner_id: String,
    token: String,
}

/// A client for the platform's runner API.
#[derive(Clone)]
pub struct PlatformClient {
    base: String,
    http: reqwest::Client,
    session: Arc<Mutex<Session>>,
}

async fn error_text(r: reqwest::Response) -> String {
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_string))
        .unwrap_or(body);
    format!("{status}: {message}")
}

impl PlatformClient {
    pub fn new(base: String, http: reqwest::Client) -> Self {
        PlatformClient { base: base.trim_end_matches('/').to_string(), http, session: Arc::default() }
    }

    pub fn set_session(&self, runner_id: &str, token: String) {
        let mut s = self.session.lock().unwrap_or_else(|e| e.into_inner());
        s.runner_id = runner_id.to_string();
        s.token = token;
    }

    fn session(&self) -> (String, String) {
        let s = self.session.lock().unwrap_or_else(|e| e.into_inner());
        (s.runner_id.clone(), s.token.clone())
    }

    pub async fn register(
        &self,
        api_key: &str,
        name: &str,
        address: &str,
        labels: &BTreeMap<String, String>,
        capacity: Capacity,
        drivers: Vec<String>,
    ) -> Result<RegisterResponse, String> {
        let req = RegisterRequest {
            name: name.to_string(),
            address: address.to_string(),
            labels: labels.clone(),
            capacity,
            drivers,
        };
        let r = self
            .http
            .post(format!("{}/v2/runners", self.base))
            .bearer_auth(api_key)
            .json(&req)
            .send()
            .await
            .map_err(|e| format!("cannot reach the platform at {}: {e}", self.base))?;
        if !r.status().is_success() {
            return Err(error_text(r).await);
        }
        r.json().await.map_err(|e| format!("the platform's answer to registration is not valid: {e}"))
    }

    /// One heartbeat: state, load and the batches held (their leases are
    /// extended). Takes a rotated token when the platform offers one.
    pub async fn heartbeat_once(&self, shared: &Shared) -> Result<HeartbeatResponse, String> {
        let (id, token) = self.session();
        let held = shared.held_ids();
        let req = HeartbeatRequest {
            state: if shared.is_draining() { RunnerState::Draining } else { RunnerState::Active },
            load: RunnerLoad {
                batches: held.len() as u32,
                workers: {
                    let mut w = shared.exec.pools.views();
                    w.extend(shared.pull.views());
                    w
                },
                gpus: shared.gpus.statuses(),
            },
            batch_ids: held,
        };
        let r = self
            .http
            .post(format!("{}/v2/runners/{id}/heartbeat", self.base))
            .bearer_auth(token)
            .timeout(Duration::from_secs(5))
            .json(&req)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !r.status().is_success() {
            return Err(error_text(r).await);
        }
        let resp: HeartbeatResponse = r.json().await.map_err(|e| e.to_string())?;
        if let Some(t) = &resp.token {
            self.set_session(&id, t.clone());
            tracing::debug!("session token rotated");
        }
        // A draining runner keeps no pull workers, whatever it is told.
        let pull = if shared.is_draining() { Vec::new() } else { resp.pull.clone() };
        shared.pull.assign(pull);
        shared.pull.tick();
        Ok(resp)
    }

    /// Reports a batch, retrying with backoff (doubling from 100 ms to 5 s,
    /// with jitter) until the platform acknowledges it (it does so only
    /// after the writeback commits), it refuses it for good (4xx other than
    /// 429: a data problem is never retried), or `give_up_after` passes.
    pub async fn report(
        &self,
        batch_id: i64,
        token: &str,
        report: &BatchReport,
        give_up_after: Duration,
        span: &layer_telemetry::trace::Span,
    ) -> Result<ReportResponse, String> {
        let mut headers = http::HeaderMap::new();
        span.inject(&mut headers);
        let (id, _) = self.session();
        let url = format!("{}/v2/runners/{id}/batches/{batch_id}/report", self.base);
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            let outcome = self
                .http
                .post(&url)
                .headers(headers.clone())
                .bearer_auth(token)
                .timeout(Duration::from_secs(30))
                .json(report)
                .send()
                .await;
            let error = match outcome {
                Ok(r) if r.status().is_success() => return r.json().await.map_err(|e| e.to_string()),
                Ok(r) if r.status().is_client_error() && r.status().as_u16() != 429 => {
                    return Err(error_text(r).await);
                }
                Ok(r) => error_text(r).await,
                Err(e) => e.to_string(),
            };
            if started.elapsed() > give_up_after {
                return Err(format!("gave up after {} s: {error}", give_up_after.as_secs()));
            }
            tracing::warn!(batch_id, error = %error, "report failed; retrying");
            // Each batch's report retries on its own task; the jitter keeps
            // the batches of one outage from retrying in step.
            tokio::time::sleep(pause.mul_f64(rand::random_range(0.5..=1.0))).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// Asks the platform whether this runner may start one more push
    /// worker of a Function (`replicas.max` across the fleet).
    pub async fn worker_slot(&self, udf_id: &str, others: u32) -> Result<WorkerSlotResponse, String> {
        let req = WorkerSlotRequest { udf_id: udf_id.to_string(), others: Some(others) };
        self.session_call("worker-slots", &req).await.map_err(|e| format!("no worker slot for {udf_id}: {e}"))
    }

    /// Asks the platform for a key for one Function's workers on this
    /// runner (it replaces the one minted before).
    pub async fn worker_key(&self, udf_id: &str) -> Result<WorkerKeyResponse, String> {
        let req = WorkerKeyRequest { udf_id: udf_id.to_string() };
        self.session_call("worker-keys", &req).await.map_err(|e| format!("no worker key for {udf_id}: {e}"))
    }

    /// `POST /v2/runners/{id}/{path}` with the session token.
    async fn session_call<Req: serde::Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        req: &Req,
    ) -> Result<Resp, String> {
        let (id, token) = self.session();
        let r = self
            .http
            .post(format!("{}/v2/runners/{id}/{path}", self.base))
            .bearer_auth(token)
            .timeout(Duration::from_secs(10))
            .json(req)
            .send()
            .await
            .map_err(|e| format!("cannot reach the platform: {e}"))?;
        if !r.status().is_success() {
            return Err(error_text(r).await);
        }
        r.json().await.map_err(|e| format!("the platform's answer is not valid: {e}"))
    }

    pub async fn deregister(&self) -> Result<(), String> {
        let (id, token) = self.session();
        let r = self
            .http
            .post(format!("{}/v2/runners/{id}/deregister", self.base))
            .bearer_auth(token)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if r.status().is_success() { Ok(()) } else { Err(error_text(r).await) }
    }
}

/// Heartbeats every `every` until `stop`.
pub async fn heartbeat_loop(shared: Arc<Shared>, every: Duration, stop: CancellationToken) {
    let mut failing = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        // NVML calls block: read the GPUs off the async threads.
        let gpus = shared.gpus.clone();
        let _ = tokio::task::spawn_blocking(move || gpus.sample()).await;
        match shared.platform.heartbeat_once(&shared).await {
            Ok(_) if failing => {
                tracing::info!("heartbeats reach the platform again");
                failing = false;
            }
            Ok(_) => {}
            Err(e) if !failing => {
                tracing::warn!(error = %e, "heartbeat failed; the platform will stop sending batches if this lasts");
                failing = true;
            }
            Err(_) => {}
        }
    }
}
