//! `splitgate demo`: two built-in upstreams (stable and canary) on loopback and the
//! proxy in front of them, with nothing to configure. The canary has a switch
//! (`POST /fail`, `POST /heal` on its own port) so a newcomer can watch the SLO guard
//! pull it.
//!
//! The same upstreams answer gRPC calls (any method, over h2c): the message back with
//! their name, `grpc-status: 0` in the trailers; while failing, still HTTP 200 with a
//! message, but `grpc-status: 14` in the trailers, which only a judge that reads
//! trailers sees. The demo config routes `/splitgate.demo.` to them as h2c upstreams.

use std::convert::Infallible;
use std::future::Ready;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::WithTrailers;
use http_body_util::{BodyExt, Full};
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
) -> Result<Response<DemoBody>, Infallible> {
    if crate::grpc::is_grpc(request.headers()) {
        return Ok(answer_grpc(name, failing.load(Ordering::Relaxed), request).await);
    }
    let (status, body) = match (request.method(), request.uri().path()) {
        (&Method::POST, "/fail") => {
            failing.store(true, Ordering::Relaxed);
            (
                StatusCode::OK,
                format!("{name} now fails: HTTP 500, and gRPC status 14 in the trailers\n"),
            )
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
    let mut response = Response::new(demo_body(Bytes::from(body), None));
    *response.status_mut() = status;
    Ok(response)
}

/// A gRPC call: one message back ("hello from NAME: " and the caller's message), and
/// the status in the trailers: 0, or 14 (UNAVAILABLE) while failing.
async fn answer_grpc(name: &str, failing: bool, request: Request<Incoming>) -> Response<DemoBody> {
    let body = request
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    // A gRPC message: a flag byte, a 4-byte length, the bytes.
    let said = body.get(5..).unwrap_or_default();
    let mut text = format!("hello from {name}: ").into_bytes();
    text.extend_from_slice(said);
    let mut message = BytesMut::with_capacity(5 + text.len());
    message.extend_from_slice(&[0]);
    message.extend_from_slice(&(text.len() as u32).to_be_bytes());
    message.extend_from_slice(&text);
    let mut trailers = HeaderMap::new();
    let status = if failing { "14" } else { "0" };
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    if failing {
        trailers.insert(
            "grpc-message",
            HeaderValue::from_static("demo upstream failing"),
        );
    }
    let mut response = Response::new(demo_body(message.freeze(), Some(trailers)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// A demo response body: its bytes, then trailers if it has any.
type DemoBody = WithTrailers<Full<Bytes>, Ready<Option<Result<HeaderMap, Infallible>>>>;

fn demo_body(data: Bytes, trailers: Option<HeaderMap>) -> DemoBody {
    Full::new(data).with_trailers(std::future::ready(trailers.map(Ok)))
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

# The same two servers, spoken to in HTTP/2 for gRPC.
[upstreams.demo-stable-grpc]
instances = ["{stable}"]
protocol = "h2c"

[upstreams.demo-canary-grpc]
instances = ["{canary}"]
protocol = "h2c"

[[routes]]
name = "demo-grpc"
path_prefix = "/splitgate.demo."
stable = "demo-stable-grpc"
canary = "demo-canary-grpc"
canary_weight = 10
split_key = ["header:x-user-id", "client_ip"]

[routes.slo]
window = "1m"
min_requests = 10
max_error_rate = 0.1

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
