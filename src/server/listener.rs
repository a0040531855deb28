//! The proxy listener: accept under a connection cap, serve each connection with hyper
//! (HTTP/1.1 and h2c by prior knowledge), enforce the idle timeout, and drain on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

use super::activity::{Activity, Tracked};
use super::stopped;
use crate::config::compile::ServerSettings;
use crate::proxy::{ConnInfo, ProxyService};
use crate::state::Shared;
use crate::telemetry::names::{CONNECTIONS, LABEL_LISTENER};
use crate::telemetry::sharded::ShardedCounter;

/// Accept-queue length asked of the kernel (capped there by `net.core.somaxconn`).
/// tokio's `TcpListener::bind` asks for 1 024; a burst of more connects than that
/// overflows the queue, and the kernel drops the SYNs, which clients retry only
/// after a second. HAProxy sizes its backlog from maxconn for the same reason.
pub const BACKLOG: u32 = 4096;

/// While draining, a connection closes once it has been quiet for DRAIN_QUIET. One
/// that is never quiet (a busy keep-alive client) is closed from DRAIN_BUSY on, at the
/// next request in flight (which gets `Connection: close`; closing it between two
/// requests would race the client's next one), looked at every DRAIN_CHECK; and at
/// DRAIN_GIVE_UP whatever it does (an h2 client that only pings).
const DRAIN_QUIET: Duration = Duration::from_millis(250);
const DRAIN_BUSY: Duration = Duration::from_secs(1);
const DRAIN_CHECK: Duration = Duration::from_millis(10);
const DRAIN_GIVE_UP: Duration = Duration::from_secs(5);

/// Binds a listening socket on `addr` with address reuse and a long accept queue.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The limits of one listener, fixed when it starts.
#[derive(Clone)]
pub struct Limits {
    /// This listener's share of `server.max_connections`.
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
}

impl Limits {
    /// One worker's limits: `server.max_connections` split evenly over the workers
    /// (rounded up), the timeouts as configured.
    pub fn per_worker(server: &ServerSettings) -> Self {
        Self {
            max_connections: crate::worker::share(server.max_connections, server.workers),
            idle_timeout: server.idle_timeout,
            drain_timeout: server.drain_timeout,
        }
    }
}

/// Builds hyper's connection builder with every limit set. hyper's header-read
/// timeout is silently off without a timer, so one is always given.
pub fn connection_builder(server: &ServerSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .max_buf_size(server.max_header_bytes)
        .max_headers(server.max_headers);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(server.max_header_bytes as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(20)));
    builder
}

/// A running listener's parts that every connection shares.
struct Listener {
    shared: Arc<Shared>,
    builder: auto::Builder<TokioExecutor>,
    limits: Limits,
    /// Open connections, counted in this worker's shard.
    connections: Arc<ShardedCounter>,
    tls: Option<Tls>,
}

/// The TLS side of an HTTPS listener.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: TlsAcceptor,
    pub handshake_timeout: Duration,
}

/// Accepts until `shutdown` turns true, then waits up to the drain timeout for open
/// connections to finish their in-flight requests. Returns whether all finished.
/// With `tls`, each connection first completes a TLS handshake within its timeout.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<Tls>,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) -> bool {
    let server = shared.snapshot.load().settings.server.clone();
    let name = if tls.is_some() { "https" } else { "http" };
    let state = Arc::new(Listener {
        connections: shared
            .registry
            .sharded_counter(CONNECTIONS, &[(LABEL_LISTENER, name)]),
        builder: connection_builder(&server),
        shared,
        limits: limits.clone(),
        tls,
    });
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    tracing::debug!(%peer, "connection cap reached; closing new connection");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn = ConnInfo::new(peer, state.tls.is_some());
                match state.tls.clone() {
                    None => {
                        tokio::spawn(serve_connection(state.clone(), stream, conn, shutdown.clone(), permit));
                    }
                    Some(tls) => {
                        let (state, shutdown) = (state.clone(), shutdown.clone());
                        tokio::spawn(async move {
                            match tokio::time::timeout(tls.handshake_timeout, tls.acceptor.accept(stream)).await {
                                Ok(Ok(stream)) => serve_connection(state, stream, conn, shutdown, permit).await,
                                Ok(Err(error)) => tracing::debug!(%peer, %error, "TLS handshake failed"),
                                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                            }
                        });
                    }
                }
            }
            _ = stopped(&mut stop) => break,
        }
    }
    drop(listener);
    let all = limits.max_connections as u32;
    let drained = tokio::time::timeout(limits.drain_timeout, permits.acquire_many(all)).await;
    drained.is_ok()
}

/// When a draining connection should next look at whether it can close.
fn drain_wake(activity: &Activity, drain_started: Option<Instant>) -> Instant {
    let now = Instant::now();
    let busy_from = drain_started.unwrap_or(now) + DRAIN_BUSY;
    if now >= busy_from {
        return now + DRAIN_CHECK;
    }
    // In flight: look again once it could be quiet.
    let quiet_at = activity
        .idle_deadline(DRAIN_QUIET)
        .unwrap_or(now + DRAIN_QUIET);
    quiet_at.min(busy_from)
}

async fn serve_connection<I>(
    listener: Arc<Listener>,
    io: I,
    conn: ConnInfo,
    mut shutdown: watch::Receiver<bool>,
    slot: OwnedSemaphorePermit,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    listener.connections.increment(1);
    let peer = conn.peer;
    let activity = Activity::new();
    // One allocation per connection; each request then clones one Arc.
    let service = Arc::new(ProxyService {
        shared: listener.shared.clone(),
        conn,
        slot: Arc::new(slot),
        activity: activity.clone(),
    });
    let in_flight = activity.clone();
    let svc = service_fn(move |request| {
        let (guard, rejection) = in_flight.begin_request();
        let service = service.clone();
        async move {
            let response = service.handle(request, rejection).await;
            drop(guard);
            response
        }
    });
    let connection = listener
        .builder
        .serve_connection_with_upgrades(TokioIo::new(Tracked::new(io, activity.clone())), svc);
    tokio::pin!(connection);
    let idle_timeout = listener.limits.idle_timeout;
    // Draining (shutdown or takeover): the connection closes once a request is in
    // flight (it gets `Connection: close` or GOAWAY) or after a short quiet spell. Not
    // at once: a client whose request is already on the wire, on a connection just
    // accepted or idle in keep-alive, would see it closed unanswered.
    let mut drain_started = shutdown.borrow().then(Instant::now);
    let mut closing = false;
    // Set when the idle timeout asked hyper to close: if the connection is still stuck
    // (a client that stopped reading a response) one more idle period later, it is
    // dropped outright.
    let mut hard_close_at: Option<Instant> = None;
    loop {
        let idle_at = activity
            .idle_deadline(idle_timeout)
            .unwrap_or_else(|| Instant::now() + idle_timeout);
        let wake_at = hard_close_at.map_or(idle_at, |hard| hard.max(idle_at));
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "client connection ended with an error");
                }
                break;
            }
            _ = tokio::time::sleep_until(wake_at) => {
                if activity.idle_deadline(idle_timeout).is_some_and(|at| at <= Instant::now()) {
                    if hard_close_at.is_some() {
                        tracing::debug!(%peer, "idle connection did not close gracefully; dropping it");
                        break;
                    }
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                    hard_close_at = Some(Instant::now() + idle_timeout);
                }
            }
            _ = stopped(&mut shutdown), if drain_started.is_none() => {
                drain_started = Some(Instant::now());
            }
            // Wakes when the connection will have been quiet long enough (a request in
            // flight finishes first), or at the latest DRAIN_FORCE into the drain; a
            // request in flight then gets `Connection: close` (or the h2 GOAWAY).
            _ = tokio::time::sleep_until(drain_wake(&activity, drain_started)), if drain_started.is_some() && !closing => {
                let now = Instant::now();
                let draining_for = drain_started.map_or(Duration::ZERO, |at| now - at);
                let quiet_at = activity.idle_deadline(DRAIN_QUIET);
                let quiet = quiet_at.is_some_and(|at| at <= now);
                let busy = quiet_at.is_none() && draining_for >= DRAIN_BUSY;
                if quiet || busy || draining_for >= DRAIN_GIVE_UP {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
    listener.connections.decrement(1);
}
