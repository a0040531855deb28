//! Shared helpers for the integration tests: real servers on 127.0.0.1:0, real HTTP.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use splitgate::app::Running;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub type TestBody = BoxBody<Bytes, hyper::Error>;

pub fn full(text: impl Into<Bytes>) -> TestBody {
    Full::new(text.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "splitgate-test-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An HTTP upstream on 127.0.0.1:0 that counts the requests it sees.
pub struct TestUpstream {
    pub addr: SocketAddr,
    pub hits: Arc<AtomicUsize>,
}

impl TestUpstream {
    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

pub async fn upstream<F, Fut>(handler: F) -> TestUpstream
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<TestBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let response = handler(request);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    TestUpstream { addr, hits }
}

/// An upstream that answers `name` and echoes the request headers it received, one per
/// line, as `name: value`.
pub async fn named_upstream(name: &'static str) -> TestUpstream {
    upstream(move |request: Request<Incoming>| async move {
        let mut text = format!("{name}\n");
        for (key, value) in request.headers() {
            text.push_str(&format!("{key}: {}\n", value.to_str().unwrap_or("?")));
        }
        Response::new(full(text))
    })
    .await
}

/// An upstream that answers `body` after `delay`.
pub async fn slow_upstream(delay: Duration, body: &'static str) -> TestUpstream {
    upstream(move |_request: Request<Incoming>| async move {
        tokio::time::sleep(delay).await;
        Response::new(full(body))
    })
    .await
}

/// An upstream that answers every request with 500.
pub async fn failing_upstream() -> TestUpstream {
    upstream(|_request: Request<Incoming>| async {
        let mut response = Response::new(full("boom"));
        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
        response
    })
    .await
}

/// A raw TCP upstream: reads a request head, writes `reply`, then closes.
pub async fn raw_upstream(reply: &'static [u8]) -> TestUpstream {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if read_request_head(&mut stream, &mut Vec::new())
                    .await
                    .is_none()
                {
                    return;
                }
                let _ = stream.write_all(reply).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    TestUpstream { addr, hits }
}

/// Reads from `stream` into `seen` until it holds a whole request head (up to its blank
/// line); returns where the head ends, or `None` if the peer closed first.
pub async fn read_request_head(stream: &mut TcpStream, seen: &mut Vec<u8>) -> Option<usize> {
    let mut buf = [0u8; 8192];
    loop {
        if let Some(at) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(at + 4);
        }
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// An address where nothing listens.
pub async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

/// A config for one route `main` with the given stable and optional canary.
/// `route_extra` lines go into the route table, `server_extra` into `[server]`.
pub fn config(
    state: &Path,
    stable: &[SocketAddr],
    canary: Option<&[SocketAddr]>,
    server_extra: &str,
    upstream_extra: &str,
    route_extra: &str,
) -> String {
    let list = |addrs: &[SocketAddr]| {
        addrs
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\naccess_log = false\n{server_extra}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n[state]\ndir = \"{}\"\n\n[upstreams.stable-pool]\ninstances = [{}]\n{upstream_extra}\n",
        state.display(),
        list(stable)
    );
    if let Some(canary) = canary {
        text.push_str(&format!(
            "\n[upstreams.canary-pool]\ninstances = [{}]\n{upstream_extra}\n",
            list(canary)
        ));
    }
    text.push_str("\n[[routes]]\nname = \"main\"\nstable = \"stable-pool\"\n");
    if canary.is_some() {
        text.push_str("canary = \"canary-pool\"\n");
    }
    text.push_str(route_extra);
    text.push('\n');
    text
}

/// A running proxy, its config file and state directory.
pub struct TestProxy {
    pub running: Option<Running>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub dir: Arc<TempDir>,
}

impl TestProxy {
    pub fn state(&self) -> &splitgate::state::StateHandle {
        &self.running.as_ref().unwrap().state
    }

    pub async fn shutdown(&mut self) -> bool {
        self.running.take().unwrap().shutdown().await
    }
}

/// Starts a proxy from config text written into `dir/splitgate.toml`.
pub async fn start_proxy(dir: Arc<TempDir>, text: &str) -> TestProxy {
    let config_path = dir.path().join("splitgate.toml");
    std::fs::write(&config_path, text).unwrap();
    let settings = splitgate::config::load(&config_path).unwrap();
    let running = splitgate::app::start(settings, Some(config_path.clone()))
        .await
        .unwrap();
    TestProxy {
        addr: running.proxy_addr,
        admin: running.admin_addr,
        running: Some(running),
        config_path,
        dir,
    }
}

/// A proxy in front of named stable and canary upstreams: route `main`, 10 % canary by
/// `X-User-Id`, plus `route_extra` in the route table and `server_extra` in `[server]`.
pub async fn split_proxy(
    name: &str,
    server_extra: &str,
    route_extra: &str,
) -> (TestProxy, TestUpstream, TestUpstream) {
    let stable = named_upstream("stable").await;
    let canary = named_upstream("canary").await;
    let dir = Arc::new(TempDir::new(name));
    let text = config(
        dir.path(),
        &[stable.addr],
        Some(&[canary.addr]),
        server_extra,
        "",
        &format!("canary_weight = 10\nsplit_key = [\"header:x-user-id\"]\n{route_extra}"),
    );
    (start_proxy(dir, &text).await, stable, canary)
}

/// Polls `GET /admin/routes/main` every 25 ms until `check` holds; panics with `what`
/// and the last state once `within` has passed.
pub async fn wait_for_route(
    admin_addr: SocketAddr,
    within: Duration,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for_admin(admin_addr, "/admin/routes/main", within, what, check).await
}

/// Polls `GET path` on the admin API every 25 ms until `check` holds; panics with
/// `what` and the last answer once `within` has passed.
pub async fn wait_for_admin(
    admin_addr: SocketAddr,
    path: &str,
    within: Duration,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = std::time::Instant::now() + within;
    loop {
        let (_, state) = admin(admin_addr, "GET", path, "", None).await;
        if check(&state) {
            return state;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}: {state}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A complete response: status, headers, body.
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request on a new HTTP/1.1 connection.
pub async fn send(addr: SocketAddr, request: Request<TestBody>) -> Reply {
    try_send(addr, request).await.expect("request failed")
}

pub async fn try_send(
    addr: SocketAddr,
    mut request: Request<TestBody>,
) -> Result<Reply, hyper::Error> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    if !request.headers().contains_key("host") {
        request
            .headers_mut()
            .insert("host", addr.to_string().parse().unwrap());
    }
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// An HTTP/2 client connection (h2c, prior knowledge) to `addr`, driven in the
/// background: one sender for many requests on the same connection.
pub async fn h2_client(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// An HTTP/1.1 client connection to `addr`, driven in the background: one sender for
/// several requests on the same connection.
pub async fn h1_client(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<TestBody> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

/// GET `path` with extra headers.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = Request::get(path);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    send(addr, request.body(full("")).unwrap()).await
}

/// Writes raw bytes on a new connection and reads until the peer closes (or 5 s pass).
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    // A connection the proxy closes at once may refuse the write; it reads as empty.
    let _ = stream.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends an admin request; returns status and parsed JSON (or Null).
pub async fn admin(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> (StatusCode, serde_json::Value) {
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let reply = send(addr, request.body(full(body.to_string())).unwrap()).await;
    (
        reply.status,
        serde_json::from_slice(&reply.body).unwrap_or(serde_json::Value::Null),
    )
}

/// A body of `remaining` copies of `chunk`, with no declared length.
pub struct Chunks {
    pub chunk: Bytes,
    pub remaining: usize,
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        if self.remaining == 0 {
            return std::task::Poll::Ready(None);
        }
        self.remaining -= 1;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(self.chunk.clone()))))
    }
}

/// Runs the `splitgate` binary with `ARGS --admin http://ADMIN`; the exit code and what
/// it printed (stdout, then stderr).
pub fn run_cli(
    admin: SocketAddr,
    args: &[&str],
) -> impl Future<Output = (i32, String)> + Send + 'static {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    async move {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_splitgate"))
            .args(&args)
            .args(["--admin", &format!("http://{admin}")])
            .output()
            .await
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }
}
