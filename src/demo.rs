//! `splitgate demo`: two built-in upstreams (stable and canary) on loopback and the
//! proxy in front of them, with nothing to configure. The canary has a switch
//! (`POST /fail`, `POST /heal` on its own port) so a newcomer can watch the SLO guard
//! pull it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// A demo upstream: answers every request with its name, or 500 while failing.
pub struct DemoUpstream {
    pub addr: SocketAddr,
    pub failing: Arc<AtomicBool>,
}

/// Starts a demo upstream named `name` on `127.0.0.1:0`.
pub async fn start_upstream(name: &'static str) -> std::io::Result<DemoUpstream> {
    let listener = crate::server::listener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let addr = listener.local_addr()?;
    let failing = Arc::new(AtomicBool::new(false));
    let flag = failing.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let flag = flag.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| answer(name, flag.clone(), request));
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(DemoUpstream { addr, failing })
}

async fn answer(
    name: &'static str,
    failing: Arc<AtomicBool>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::POST, "/fail") => {
            failing.store(true, Ordering::Relaxed);
            (StatusCode::OK, format!("{name} now answers 500\n"))
        }
        (&Method::POST, "/heal") => {
            failing.store(false, Ordering::Relaxed);
            (StatusCode::OK, format!("{name} healed\n"))
        }
        _ if failing.load(Ordering::Relaxed) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{name} is failing\n"),
        ),
        _ => {
            let user = request
                .headers()
                .get("x-user-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-");
            (
                StatusCode::OK,
                format!(
                    "hello from {name} (user {user}, path {})\n",
                    request.uri().path()
                ),
            )
        }
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    Ok(response)
}

/// The demo's config: one route, 10 % canary by `X-User-Id`, an SLO and a rollout plan.
pub fn config_text(
    listen: SocketAddr,
    admin: SocketAddr,
    state_dir: &Path,
    stable: SocketAddr,
    canary: SocketAddr,
) -> String {
    format!(
        r#"[server]
listen = "{listen}"

[admin]
listen = "{admin}"

[state]
dir = "{state}"

[upstreams.demo-stable]
instances = ["{stable}"]

[upstreams.demo-canary]
instances = ["{canary}"]

[[routes]]
name = "demo"
stable = "demo-stable"
canary = "demo-canary"
canary_weight = 10
split_key = ["header:x-user-id", "client_ip"]

[routes.slo]
window = "1m"
min_requests = 10
max_error_rate = 0.1
max_p99_latency = "500ms"

[routes.rollout]
steps = [10, 25, 50, 100]
interval = "30s"
"#,
        state = state_dir.display().to_string().replace('\\', "/"),
    )
}
