//! Active health checks (control thread). One task per instance of every upstream
//! with a `health` section, whatever the number of workers: each check's result goes
//! into the instance every worker shares, so all of them stop (or start) sending to it
//! at once. Instances in maintenance are not checked. The set of tasks follows the
//! snapshot: an instance added by a reload or by DNS gets a task, one removed loses it.

mod grpc;

use std::sync::Arc;

use http::header::{CONNECTION, CONTENT_TYPE, HOST, TE, USER_AGENT};
use http::{HeaderValue, Request};
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use metrics::Counter;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::instance::{Checked, Instance, InstanceState};
use super::tls::UpstreamConnector;
use crate::config::Protocol;
use crate::config::{HealthCheck, HealthSpec, UpstreamSpec, UpstreamTls};
use crate::state::StateHandle;
use crate::telemetry::names::{HEALTH_CHECKS_TOTAL, LABEL_OUTCOME, LABEL_UPSTREAM};

/// What a check task was started for: when any of it changes, the task is replaced.
struct Task {
    upstream: String,
    instance: Arc<Instance>,
    health: HealthSpec,
    tls: Option<UpstreamTls>,
    handle: JoinHandle<()>,
}

impl Task {
    fn serves(&self, spec: &UpstreamSpec, health: &HealthSpec, instance: &Arc<Instance>) -> bool {
        self.upstream == spec.name
            && Arc::ptr_eq(&self.instance, instance)
            && self.health == *health
            && self.tls == spec.tls
    }
}

/// Runs the checks until `shutdown`.
pub async fn run(state: StateHandle, shutdown: watch::Receiver<bool>) {
    let mut tasks: Vec<Task> = Vec::new();
    super::follow_snapshot(&state, shutdown, |state| reconcile(state, &mut tasks)).await;
    for task in tasks {
        task.handle.abort();
    }
}

fn reconcile(state: &StateHandle, tasks: &mut Vec<Task>) {
    let snapshot = state.shared.snapshot.load();
    let mut wanted = Vec::new();
    for upstream in snapshot.upstreams.iter() {
        let Some(health) = &upstream.spec.health else {
            continue;
        };
        for instance in upstream.members() {
            wanted.push((&upstream.spec, health, instance));
        }
    }
    tasks.retain(|task| {
        let keep = wanted
            .iter()
            .any(|(spec, health, instance)| task.serves(spec, health, instance));
        if !keep {
            task.handle.abort();
        }
        keep
    });
    for (spec, health, instance) in wanted {
        if tasks.iter().any(|t| t.serves(spec, health, instance)) {
            continue;
        }
        let counter = |outcome| {
            state.shared.registry.counter(
                HEALTH_CHECKS_TOTAL,
                &[(LABEL_UPSTREAM, &spec.name), (LABEL_OUTCOME, outcome)],
            )
        };
        let checker = Checker {
            upstream: spec.name.clone(),
            instance: instance.clone(),
            health: health.clone(),
            tls: spec
                .tls
                .as_ref()
                .and_then(|t| UpstreamConnector::new(t, spec.protocol)),
            protocol: spec.protocol,
            passed: counter("pass"),
            failed: counter("fail"),
        };
        tasks.push(Task {
            upstream: spec.name.clone(),
            instance: instance.clone(),
            health: health.clone(),
            tls: spec.tls.clone(),
            handle: tokio::spawn(checker.run()),
        });
    }
}

struct Checker {
    upstream: String,
    instance: Arc<Instance>,
    health: HealthSpec,
    tls: Option<UpstreamConnector>,
    /// The check speaks what requests speak: an h2c-only gRPC server refuses HTTP/1.1.
    protocol: Protocol,
    passed: Counter,
    failed: Counter,
}

impl Checker {
    /// Checks now, then every `interval`.
    async fn run(self) {
        let mut ticks = tokio::time::interval(self.health.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            if self.instance.state() == InstanceState::Maint || self.instance.is_retired() {
                continue;
            }
            let result = match tokio::time::timeout(self.health.timeout, self.check()).await {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "no answer within {}ms",
                    self.health.timeout.as_millis()
                )),
            };
            match &result {
                Ok(()) => self.passed.increment(1),
                Err(_) => self.failed.increment(1),
            }
            let error = result.as_ref().err().cloned();
            let changed = self.instance.record_check(
                result,
                self.health.rise,
                self.health.fall,
                crate::timefmt::unix_ms(),
            );
            match changed {
                Some(Checked::Up) => tracing::info!(
                    upstream = %self.upstream,
                    instance = %self.instance.addr,
                    "instance passed its health checks: in service"
                ),
                Some(Checked::Down) => tracing::warn!(
                    upstream = %self.upstream,
                    instance = %self.instance.addr,
                    error = error.as_deref().unwrap_or_default(),
                    fall = self.health.fall,
                    "instance failed its health checks: out of service"
                ),
                _ => {}
            }
        }
    }

    /// One check: a connect (and TLS handshake), then for HTTP a GET whose status must
    /// be in the expected range, for gRPC a health call that must say SERVING. A fresh
    /// connection each time, closed after.
    async fn check(&self) -> Result<(), String> {
        let addr = self.instance.addr;
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = stream.set_nodelay(true);
        match &self.tls {
            None => self.exchange(stream, self.protocol == Protocol::H2c).await,
            Some(tls) => {
                let stream = tls
                    .connector
                    .connect(tls.server_name.clone(), stream)
                    .await
                    .map_err(|e| format!("tls: {e}"))?;
                let h2 = self
                    .protocol
                    .h2_over_tls(stream.get_ref().1.alpn_protocol());
                self.exchange(stream, h2).await
            }
        }
    }

    async fn exchange<I>(&self, io: I, h2: bool) -> Result<(), String>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (path, host, expect) = match &self.health.check {
            HealthCheck::Tcp => return Ok(()),
            HealthCheck::Grpc { service, host } if h2 => {
                return self.grpc(io, service, self.host(host)?).await
            }
            HealthCheck::Grpc { .. } => {
                return Err("the instance did not pick HTTP/2 (ALPN), which gRPC needs".into())
            }
            HealthCheck::Http { path, host, expect } => (path, self.host(host)?, expect),
        };
        let status = match h2 {
            true => self.get_h2(io, path, host).await?,
            false => {
                let (mut sender, connection) =
                    hyper::client::conn::http1::handshake(TokioIo::new(io))
                        .await
                        .map_err(|e| format!("http: {e}"))?;
                let connection = tokio::spawn(connection);
                let request = Request::get(path.as_str())
                    .header(HOST, host)
                    .header(USER_AGENT, "splitgate-health-check")
                    .header(CONNECTION, "close")
                    .body(Empty::<bytes::Bytes>::new())
                    .map_err(|e| format!("request: {e}"))?;
                let response = sender
                    .send_request(request)
                    .await
                    .map_err(|e| format!("http: {e}"));
                connection.abort();
                response?.status().as_u16()
            }
        };
        if expect.contains(&status) {
            Ok(())
        } else {
            Err(format!(
                "status {status} (expected {}-{})",
                expect.start(),
                expect.end()
            ))
        }
    }

    /// The `Host` (authority) a check sends: as configured, else the instance's address.
    fn host(&self, host: &Option<String>) -> Result<HeaderValue, String> {
        match host {
            Some(host) => HeaderValue::from_str(host),
            None => HeaderValue::from_str(&self.instance.addr.to_string()),
        }
        .map_err(|e| format!("host header: {e}"))
    }

    /// The check's GET as an HTTP/2 stream; its status.
    async fn get_h2<I>(&self, io: I, path: &str, host: HeaderValue) -> Result<u16, String>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let request = self.h2_request(http::Method::GET, path, &host)?.body(());
        let request = request.map_err(|e| format!("request: {e}"))?;
        let (response, _connection) = h2_exchange(io, request, None).await?;
        Ok(response.status().as_u16())
    }

    /// The gRPC health call for `service`: passes on SERVING.
    async fn grpc<I>(&self, io: I, service: &str, host: HeaderValue) -> Result<(), String>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let request = self
            .h2_request(http::Method::POST, grpc::PATH, &host)?
            .header(CONTENT_TYPE, "application/grpc")
            .header(TE, "trailers")
            .body(())
            .map_err(|e| format!("request: {e}"))?;
        let (response, _connection) =
            h2_exchange(io, request, Some(grpc::request(service))).await?;
        let status = response.status();
        if status != http::StatusCode::OK {
            return Err(format!("status {}", status.as_u16()));
        }
        // A refusal may come as headers alone ("trailers-only").
        grpc_status(response.headers())?;
        let mut body = response.into_body();
        let mut message = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| format!("h2: {e}"))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            message.extend_from_slice(&chunk);
            if message.len() > grpc::MAX_RESPONSE {
                return Err("a health response over 1 KiB".into());
            }
        }
        let trailers = body.trailers().await.map_err(|e| format!("h2: {e}"))?;
        match trailers {
            Some(trailers) => grpc_status(&trailers)?,
            None if message.is_empty() => {}
            None => return Err("no grpc-status in the response".into()),
        }
        grpc::serving(&message)
    }

    /// An HTTP/2 request head to this instance.
    fn h2_request(
        &self,
        method: http::Method,
        path: &str,
        host: &HeaderValue,
    ) -> Result<http::request::Builder, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let uri = http::Uri::builder()
            .scheme(scheme)
            .authority(host.as_bytes())
            .path_and_query(path)
            .build()
            .map_err(|e| format!("request: {e}"))?;
        Ok(Request::builder()
            .method(method)
            .uri(uri)
            .header(USER_AGENT, "splitgate-health-check"))
    }
}

/// One HTTP/2 stream on a fresh connection: the request, with `body` if any, and the
/// response head. The connection lives as long as the returned guard (for the body).
async fn h2_exchange<I>(
    io: I,
    request: Request<()>,
    body: Option<bytes::Bytes>,
) -> Result<(http::Response<::h2::RecvStream>, AbortOnDrop<()>), String>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = ::h2::client::handshake(io)
        .await
        .map_err(|e| format!("h2: {e}"))?;
    // Aborted however the check ends, a timeout included.
    let connection = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let response = async {
        let mut sender = sender.ready().await?;
        let (response, mut stream) = sender.send_request(request, body.is_none())?;
        if let Some(body) = body {
            stream.send_data(body, true)?;
        }
        response.await
    }
    .await
    .map_err(|e| format!("h2: {e}"))?;
    Ok((response, connection))
}

/// A non-zero `grpc-status` as the check's failure (with its `grpc-message`).
fn grpc_status(headers: &http::HeaderMap) -> Result<(), String> {
    match crate::grpc::status_in(headers) {
        None | Some(0) => Ok(()),
        Some(code) => {
            let message = headers
                .get(&crate::grpc::GRPC_MESSAGE)
                .and_then(|m| m.to_str().ok())
                .unwrap_or_default();
            let message: String = message.chars().take(100).collect();
            Err(format!("grpc-status {code} {message}"))
        }
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
