//! A small HTTP client for the platform API with errors a person can act on.

use anyhow::{Context, Result, anyhow};
use layer_protocol::error::ErrorBody;
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Where the platform is and how to authenticate.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    api_key: Option<String>,
    http: reqwest::Client,
}

/// A refusal from the platform, with its error body.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: StatusCode,
    pub body: Option<ErrorBody>,
    pub text: String,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.body {
            Some(b) if b.errors.len() > 1 => {
                writeln!(f, "{} ({}):", self.status, b.code)?;
                for p in &b.errors {
                    writeln!(f, "  - {}", p.message)?;
                }
                Ok(())
            }
            Some(b) => write!(f, "{} ({}): {}", self.status, b.code, b.message),
            None => write!(f, "{}: {}", self.status, self.text),
        }
    }
}

impl std::error::Error for ApiFailure {}

impl Client {
    pub fn new(base: &str, api_key: Option<String>) -> Result<Self> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("layer-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the HTTP client")?;
        Ok(Client { base: base.trim_end_matches('/').to_string(), api_key: api_key.filter(|k| !k.is_empty()), http })
    }

    /// Sends a request and decodes the JSON answer.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T> {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|e| {
            anyhow!(
                "cannot reach the platform at {}: {e}\n  is `layer dev` (or `layer platform`) running? set LAYER_URL or --url to point elsewhere",
                self.base
            )
        })?;
        let status = resp.status();
        let text = resp.text().await.context("reading the response")?;
        if !status.is_success() {
            let body: Option<ErrorBody> = serde_json::from_str(&text).ok();
            let failure = ApiFailure { status, body, text };
            if status == StatusCode::UNAUTHORIZED {
                let why = if self.api_key.is_none() {
                    "no API key set: set LAYER_API_KEY or pass --api-key (`layer dev` prints its admin key when it \
                     first starts)"
                } else {
                    "the platform refused the API key (LAYER_API_KEY or --api-key): it is unknown, revoked or expired"
                };
                return Err(anyhow!(failure).context(why));
            }
            return Err(anyhow!(failure));
        }
        serde_json::from_str(&text).with_context(|| format!("unexpected answer from the platform: {text}"))
    }

    /// Sends a body as it is and returns the answer as it is, whatever
    /// its status: a call's output or its problem.
    pub async fn send_raw(&self, method: Method, path: &str, body: Vec<u8>) -> Result<reqwest::Response> {
        let mut req = self.http.request(method, format!("{}{}", self.base, path));
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key);
        }
        if !body.is_empty() {
            req = req.header(reqwest::header::CONTENT_TYPE, "application/json").body(body);
        }
        req.send().await.map_err(|e| {
            anyhow!(
                "cannot reach the platform at {}: {e}\n  is `layer dev` (or `layer platform`) running? set LAYER_URL or --url to point elsewhere",
                self.base
            )
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call::<(), T>(Method::POST, path, None).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call::<(), T>(Method::DELETE, path, None).await
    }
}

/// Percent-encodes one path segment.
pub fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
