//! The proxy listener: accept under a connection cap, hand each connection to
//! `connection.rs` (HTTP/1.1, and HTTP/2 by prior knowledge or ALPN), and on shutdown
//! wait for them to drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

use super::connection;
use super::stopped;
use crate::config::compile::ServerSettings;
use crate::proxy::ConnInfo;
use crate::state::Shared;
use crate::telemetry::names::{CONNECTIONS, CONNECTIONS_IDLE, LABEL_LISTENER};
use crate::telemetry::sharded::ShardedCounter;

/// Accept-queue length asked of the kernel (capped there by `net.core.somaxconn`).
/// tokio's `TcpListener::bind` asks for 1 024; a burst of more connects than that
/// overflows the queue, and the kernel drops the SYNs, which clients retry only
/// after a second. HAProxy sizes its backlog from maxconn for the same reason.
pub const BACKLOG: u32 = 4096;

/// Binds a listening socket on `addr` with address reuse and a long accept queue.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    bind_with(addr, false)
}

/// [`bind`], and with `reuse_port` (Linux: `SO_REUSEPORT`) other sockets may bind the
/// same port, the kernel spreading new connections over them.
pub fn bind_with(addr: SocketAddr, reuse_port: bool) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    #[cfg(target_os = "linux")]
    socket.set_reuseport(reuse_port)?;
    #[cfg(not(target_os = "linux"))]
    let _ = reuse_port;
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

/// hyper's HTTP/1.1 connection builder with every limit set. hyper's header-read
/// timeout is silently off without a timer, so one is always given.
pub fn http1_builder(server: &ServerSettings) -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(server.header_read_timeout)
        .max_buf_size(server.max_header_bytes)
        .max_headers(server.max_headers);
    builder
}

/// hyper's HTTP/2 connection builder with every limit set.
pub fn http2_builder(server: &ServerSettings) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(server.max_header_bytes as u32)
        .max_concurrent_streams(256)
        .keep_alive_interval(Some(Duration::from_secs(20)));
    builder
}

/// A running listener's parts that every connection shares.
pub struct Listener {
    pub shared: Arc<Shared>,
    pub http1: http1::Builder,
    pub http2: http2::Builder<TokioExecutor>,
    /// Also the time a new connection has to say which protocol it speaks.
    pub header_read_timeout: Duration,
    pub limits: Limits,
    /// Open connections, counted in this worker's shard.
    pub connections: Arc<ShardedCounter>,
    /// Of those, the ones waiting for bytes with no hyper state held.
    pub idle: Arc<ShardedCounter>,
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
        idle: shared
            .registry
            .sharded_counter(CONNECTIONS_IDLE, &[(LABEL_LISTENER, name)]),
        http1: http1_builder(&server),
        http2: http2_builder(&server),
        header_read_timeout: server.header_read_timeout,
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
                        tokio::spawn(connection::serve(state.clone(), stream, conn, shutdown.clone(), permit));
                    }
                    Some(tls) => {
                        let (state, shutdown) = (state.clone(), shutdown.clone());
                        tokio::spawn(async move {
                            // Boxed, so the task does not keep the handshake's size for life.
                            let handshake = Box::pin(tls.acceptor.accept(stream));
                            match tokio::time::timeout(tls.handshake_timeout, handshake).await {
                                Ok(Ok(stream)) => connection::serve(state, stream, conn, shutdown, permit).await,
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
