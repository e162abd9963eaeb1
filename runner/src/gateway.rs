//! The worker-facing address: how container workers reach the platform.
//!
//! A container on Docker's default bridge network cannot reach the node's
//! loopback, where the platform of `layer dev` listens, and on a fleet the
//! platform's address may not be routable from the bridge either. So the
//! runner listens on the bridge's gateway address (the node's side of
//! `docker0`, e.g. `172.17.0.1`), on a port of its own, and forwards every
//! request there to the platform as it came: method, path, query, headers
//! (the worker's own `Authorization` among them) and body, streamed both
//! ways. Containers get that address as `HEVLAYER_BASE_URL`; no host
//! networking is needed. The runner counts what its workers call
//! (`layer_runner_gateway_requests_total`).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use bollard::Docker;
use futures_util::TryStreamExt;
use tokio_util::sync::CancellationToken;

/// Headers that belong to one hop, not to the request.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

#[derive(Clone)]
struct Forward {
    platform: String,
    http: reqwest::Client,
}

/// The node's address on Docker's default `bridge` network: the network's
/// IPAM gateway when the engine records one, else the IPv4 address of its
/// bridge interface (`com.docker.network.bridge.name`, usually `docker0`).
pub async fn bridge_gateway(docker: &Docker) -> Result<std::net::IpAddr, String> {
    let net = docker
        .inspect_network("bridge", None::<bollard::query_parameters::InspectNetworkOptions>)
        .await
        .map_err(|e| format!("cannot inspect Docker's bridge network: {e}"))?;
    let recorded =
        net.ipam.and_then(|i| i.config).into_iter().flatten().filter_map(|c| c.gateway).find_map(|g| g.parse().ok());
    if let Some(ip) = recorded {
        return Ok(ip);
    }
    let interface = net
        .options
        .and_then(|o| o.get("com.docker.network.bridge.name").cloned())
        .unwrap_or_else(|| "docker0".to_string());
    let addrs = nix::ifaddrs::getifaddrs().map_err(|e| format!("cannot list the node's interfaces: {e}"))?;
    addrs
        .filter(|a| a.interface_name == interface)
        .find_map(|a| a.address.and_then(|s| s.as_sockaddr_in().map(|v4| std::net::IpAddr::V4(v4.ip()))))
        .ok_or_else(|| {
            format!("Docker's bridge network records no gateway and interface {interface} has no IPv4 address")
        })
}

/// Starts forwarding `addr` (port 0 picks one) to `platform`; returns the
/// URL containers use. Stops with `stop`.
pub async fn start(addr: SocketAddr, platform: &str, stop: CancellationToken) -> Result<String, String> {
    let listener =
        tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr} for workers: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| e.to_string())?;
    let app = Router::new()
        .fallback(forward)
        .with_state(Forward { platform: platform.trim_end_matches('/').to_string(), http });
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
        if let Err(e) = served {
            tracing::warn!(error = %e, "the worker gateway stopped");
        }
    });
    Ok(format!("http://{bound}"))
}

async fn forward(State(f): State<Forward>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let route = path.split('?').next().unwrap_or("/");
    crate::metrics::gateway_request(route);
    let mut out = f.http.request(parts.method.clone(), format!("{}{path}", f.platform));
    for (name, value) in &parts.headers {
        if name == "host" || HOP_BY_HOP.contains(&name.as_str()) {
            continue;
        }
        out = out.header(name, value);
    }
    let body = reqwest::Body::wrap_stream(body.into_data_stream());
    match out.body(body).send().await {
        Ok(r) => {
            let mut resp = Response::builder().status(r.status());
            for (name, value) in r.headers() {
                if HOP_BY_HOP.contains(&name.as_str()) {
                    continue;
                }
                resp = resp.header(HeaderName::from(name), value);
            }
            let stream = r.bytes_stream().map_err(std::io::Error::other);
            resp.body(Body::from_stream(stream)).unwrap_or_else(|e| {
                (StatusCode::BAD_GATEWAY, format!("the platform's answer could not be passed on: {e}")).into_response()
            })
        }
        Err(e) => {
            tracing::warn!(error = %e, "a worker's call could not reach the platform");
            let body = serde_json::json!({
                "status": "error",
                "error": "bad_gateway",
                "message": format!("the runner could not reach the platform: {e}"),
            });
            (StatusCode::BAD_GATEWAY, axum::Json(body)).into_response()
        }
    }
}
