//! One client connection, from accept to close: which protocol it speaks, hyper
//! serving it, the idle timeout, the drain, and releasing hyper's state while an
//! HTTP/1.1 connection is idle.
//!
//! An idle keep-alive connection served by hyper holds its read buffer, its write
//! buffer, a header map and the dispatcher: tens of KiB. NGINX frees its buffers while
//! a keep-alive connection waits; splitgate does the same by closing hyper's side of a
//! connection that has been idle for [`RELEASE_AFTER`] between two requests (hyper
//! hands the socket back, with any bytes it read but did not parse) and waiting for
//! the socket to become readable with nothing else held. When bytes arrive, a new
//! hyper connection and a new framing scan take over at the start of the next request,
//! so every check that applies to a connection's first request applies to each one.
//! HTTP/2 connections keep their hyper state (HPACK tables and stream state cannot be
//! rebuilt).

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use std::convert::Infallible;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::{service_fn, Service};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::activity::{Activity, Tracked};
use super::listener::Listener;
use super::rewind::Rewind;
use super::stopped;
use crate::proxy::{ConnInfo, ProxyBody, ProxyService};

/// An HTTP/1.1 connection idle this long between two requests gives up its hyper
/// state until the client sends again. Busy connections never reach it, so it costs
/// nothing under load; one that sends a request a second pays for a new hyper
/// connection (a few hundred ns) on each.
pub const RELEASE_AFTER: Duration = Duration::from_secs(1);

/// While draining, a connection closes once it has been quiet for DRAIN_QUIET. One
/// that is never quiet (a busy keep-alive client) is closed from DRAIN_BUSY on, at the
/// next request in flight (which gets `Connection: close`; closing it between two
/// requests would race the client's next one), looked at every DRAIN_CHECK; and at
/// DRAIN_GIVE_UP whatever it does (an h2 client that only pings).
const DRAIN_QUIET: Duration = Duration::from_millis(250);
const DRAIN_BUSY: Duration = Duration::from_secs(1);
const DRAIN_CHECK: Duration = Duration::from_millis(10);
const DRAIN_GIVE_UP: Duration = Duration::from_secs(5);

/// The HTTP/2 connection preface a prior-knowledge (h2c, or h2 over TLS) client sends.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A client stream whose incoming bytes can be awaited without reading them.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Whether the stream may hold bytes already read from the socket when it is
    /// handed over (TLS: the request can arrive with the handshake's last flight), so
    /// that a fresh connection must read before waiting on the socket.
    const MAY_HOLD_READ_BYTES: bool;

    /// Ready once the client has sent something (or closed, or failed).
    fn poll_sent(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// Peeks rather than asking for readiness: tokio's cached readiness can say "ready"
/// when nothing is there, and a peek that finds nothing clears it.
fn poll_peek_one(stream: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    let mut byte = [0u8; 1];
    let mut buf = tokio::io::ReadBuf::new(&mut byte);
    stream.poll_peek(cx, &mut buf).map_ok(|_| ())
}

impl ClientIo for TcpStream {
    const MAY_HOLD_READ_BYTES: bool = false;

    fn poll_sent(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        poll_peek_one(self, cx)
    }
}

/// Ready when TLS records arrive. hyper reads until the stream has nothing more before
/// a connection counts as idle, so no decrypted bytes wait inside rustls then; right
/// after the handshake they may.
impl ClientIo for tokio_rustls::server::TlsStream<TcpStream> {
    const MAY_HOLD_READ_BYTES: bool = true;

    fn poll_sent(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        poll_peek_one(self.get_ref().0, cx)
    }
}

/// Where a connection's drain stands.
struct Drain {
    shutdown: watch::Receiver<bool>,
    started: Option<Instant>,
}

impl Drain {
    /// When a draining connection should next look at whether it can close.
    fn wake(&self, activity: &Activity) -> Instant {
        let now = Instant::now();
        let busy_from = self.started.unwrap_or(now) + DRAIN_BUSY;
        if now >= busy_from {
            return now + DRAIN_CHECK;
        }
        // In flight: look again once it could be quiet.
        let quiet_at = activity
            .idle_deadline(DRAIN_QUIET)
            .unwrap_or(now + DRAIN_QUIET);
        quiet_at.min(busy_from)
    }

    /// Whether a draining connection should close now: quiet long enough, busy past
    /// DRAIN_BUSY (a request in flight then gets `Connection: close` or GOAWAY), or
    /// past DRAIN_GIVE_UP whatever it does.
    fn should_close(&self, activity: &Activity) -> bool {
        let now = Instant::now();
        let draining_for = self.started.map_or(Duration::ZERO, |at| now - at);
        let quiet_at = activity.idle_deadline(DRAIN_QUIET);
        let quiet = quiet_at.is_some_and(|at| at <= now);
        let busy = quiet_at.is_none() && draining_for >= DRAIN_BUSY;
        quiet || busy || draining_for >= DRAIN_GIVE_UP
    }
}

/// Polls `future` once: its output if it is ready at once.
async fn poll_once<F: std::future::Future + Unpin>(future: &mut F) -> Option<F::Output> {
    poll_fn(|cx| {
        Poll::Ready(match std::pin::Pin::new(&mut *future).poll(cx) {
            Poll::Ready(output) => Some(output),
            Poll::Pending => None,
        })
    })
    .await
}

/// What a connection's hyper side ended with.
enum Served<I> {
    /// Closed (by either side, the idle timeout or the drain).
    Closed,
    /// Released while idle between two requests: the socket and the bytes read but not
    /// yet parsed.
    Released(I, Bytes),
}

/// Serves one accepted connection until it closes.
pub async fn serve<I: ClientIo>(
    listener: Arc<Listener>,
    io: I,
    conn: ConnInfo,
    shutdown: watch::Receiver<bool>,
    slot: OwnedSemaphorePermit,
) {
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
    let started = shutdown.borrow().then(Instant::now);
    let mut drain = Drain { shutdown, started };
    let mut io = io;
    let mut prefix = Bytes::new();
    let mut first = true;
    loop {
        // Idle: nothing of hyper's is held until the client sends.
        if prefix.is_empty() && !(first && I::MAY_HOLD_READ_BYTES) {
            listener.idle.increment(1);
            let sent = wait_for_bytes(&listener, &io, &activity, &mut drain).await;
            listener.idle.decrement(1);
            if !sent {
                break;
            }
        }
        let h2 = if first {
            first = false;
            match sniff(&listener, &mut io, &mut prefix).await {
                Some(h2) => h2,
                None => break,
            }
        } else {
            false
        };
        let stream = Rewind::new(io, std::mem::take(&mut prefix));
        // Boxed, so that hyper's state is allocated only while it serves.
        let served = if h2 {
            Box::pin(serve_h2(
                &listener, stream, &activity, &service, &mut drain, peer,
            ))
            .await
        } else {
            Box::pin(serve_h1(
                &listener, stream, &activity, &service, &mut drain, peer,
            ))
            .await
        };
        match served {
            Served::Closed => break,
            Served::Released(stream, unread) => {
                io = stream;
                prefix = unread;
            }
        }
    }
    listener.connections.decrement(1);
}

/// Waits for the client to send, with no hyper state held. False when the connection
/// should close instead: the idle timeout passed, or a drain found it quiet.
async fn wait_for_bytes<I: ClientIo>(
    listener: &Listener,
    io: &I,
    activity: &Activity,
    drain: &mut Drain,
) -> bool {
    loop {
        let idle_at = activity
            .idle_deadline(listener.limits.idle_timeout)
            .unwrap_or_else(|| Instant::now() + listener.limits.idle_timeout);
        let drain_wake = drain.wake(activity);
        tokio::select! {
            sent = poll_fn(|cx| io.poll_sent(cx)) => return sent.is_ok(),
            _ = tokio::time::sleep_until(idle_at) => return false,
            _ = stopped(&mut drain.shutdown), if drain.started.is_none() => {
                drain.started = Some(Instant::now());
            }
            _ = tokio::time::sleep_until(drain_wake), if drain.started.is_some() => {
                if drain.should_close(activity) {
                    return false;
                }
            }
        }
    }
}

/// Reads the connection's first bytes, as far as they tell HTTP/2's preface from an
/// HTTP/1.1 request, into `read`. Whether it is HTTP/2; `None` when the client closed
/// or sent nothing telling within the header-read timeout.
async fn sniff<I: ClientIo>(listener: &Listener, io: &mut I, read: &mut Bytes) -> Option<bool> {
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len());
    let telling = async {
        while buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&buf) {
            if io.read_buf(&mut buf).await.ok()? == 0 {
                return None;
            }
        }
        Some(())
    };
    let outcome = tokio::time::timeout(listener.header_read_timeout, telling).await;
    let h2 = buf.starts_with(H2_PREFACE);
    *read = buf.freeze();
    match outcome {
        Ok(Some(())) => Some(h2),
        // Whatever came is hyper's to answer (400 or 408 with a reason); nothing at all
        // is a plain close.
        _ if !read.is_empty() => Some(false),
        _ => None,
    }
}

/// The service hyper calls for each request on this connection.
fn service_for(
    activity: &Arc<Activity>,
    service: &Arc<ProxyService>,
) -> impl Service<
    Request<Incoming>,
    Response = Response<ProxyBody>,
    Error = Infallible,
    Future: Send + 'static,
> + Unpin {
    let (activity, service) = (activity.clone(), service.clone());
    service_fn(move |request| {
        let (guard, rejection) = activity.begin_request();
        let service = service.clone();
        async move {
            let response = service.handle(request, rejection).await;
            drop(guard);
            response
        }
    })
}

/// HTTP/1.1 with hyper until the connection closes, or until it has been idle between
/// two requests for [`RELEASE_AFTER`]: then hyper's side closes without shutting the
/// socket, which comes back with the bytes hyper read but did not parse.
async fn serve_h1<I: ClientIo>(
    listener: &Listener,
    stream: Rewind<I>,
    activity: &Arc<Activity>,
    service: &Arc<ProxyService>,
    drain: &mut Drain,
    peer: SocketAddr,
) -> Served<I> {
    activity.resume();
    let io = TokioIo::new(Tracked::new(stream, activity.clone()));
    let mut connection = listener
        .http1
        .serve_connection(io, service_for(activity, service))
        .with_upgrades();
    let ended = drive(listener, &mut connection, activity, drain, peer, true).await;
    if ended != Ended::Released {
        return Served::Closed;
    }
    let Some(parts) = connection.into_parts() else {
        return Served::Closed;
    };
    // What hyper read but did not parse must start with a head the framing scan saw
    // whole (a pipelined request), never with the rest of something else.
    if !parts.read_buf.is_empty() && !activity.head_pending() {
        return Served::Closed;
    }
    let (io, unread_by_rewind) = parts.io.into_inner().into_inner().into_parts();
    // Copied, even when short: a slice of hyper's read buffer would keep all of it.
    let mut unread = BytesMut::with_capacity(parts.read_buf.len() + unread_by_rewind.len());
    unread.extend_from_slice(&parts.read_buf);
    unread.extend_from_slice(&unread_by_rewind);
    let unread = unread.freeze();
    Served::Released(io, unread)
}

/// HTTP/2 with hyper until the connection closes.
async fn serve_h2<I: ClientIo>(
    listener: &Listener,
    stream: Rewind<I>,
    activity: &Arc<Activity>,
    service: &Arc<ProxyService>,
    drain: &mut Drain,
    peer: SocketAddr,
) -> Served<I> {
    let io = TokioIo::new(Tracked::new(stream, activity.clone()));
    let mut connection = listener
        .http2
        .serve_connection(io, service_for(activity, service));
    drive(listener, &mut connection, activity, drain, peer, false).await;
    Served::Closed
}

/// A hyper connection that can be asked to close gracefully.
trait Graceful: std::future::Future<Output = hyper::Result<()>> + Unpin {
    fn graceful_shutdown(&mut self);
}

impl<I, S, B> Graceful for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    Self: std::future::Future<Output = hyper::Result<()>> + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: http_body::Body + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn graceful_shutdown(&mut self) {
        std::pin::Pin::new(self).graceful_shutdown();
    }
}

impl<I, S, B, E> Graceful for hyper::server::conn::http2::Connection<I, S, E>
where
    Self: std::future::Future<Output = hyper::Result<()>> + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: http_body::Body + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(&mut self) {
        std::pin::Pin::new(self).graceful_shutdown();
    }
}

/// How a hyper connection ended.
#[derive(PartialEq, Eq)]
enum Ended {
    /// Closed, by either side, or dropped.
    Closed,
    /// Closed on our side to release its state, the socket left open.
    Released,
}

/// Polls a hyper connection to its end, closing it gracefully at the idle timeout
/// (and dropping it if it is still stuck one idle period later) and during a drain.
/// With `releasable`, a connection idle between two requests for [`RELEASE_AFTER`]
/// (and not draining) is closed on hyper's side only, to be released.
async fn drive<C: Graceful>(
    listener: &Listener,
    connection: &mut C,
    activity: &Activity,
    drain: &mut Drain,
    peer: SocketAddr,
    releasable: bool,
) -> Ended {
    let idle_timeout = listener.limits.idle_timeout;
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
        // Looked at once the connection could have been idle long enough; whether it
        // is between two requests is checked then.
        let release_due = releasable && !closing && drain.started.is_none();
        let release_at = activity
            .idle_deadline(RELEASE_AFTER)
            .unwrap_or_else(|| Instant::now() + RELEASE_AFTER);
        let drain_wake = drain.wake(activity);
        // One timer for both the idle timeout and the release: every poll of the
        // connection polls the timers too, and each costs.
        let timer_at = if release_due {
            wake_at.min(release_at)
        } else {
            wake_at
        };
        tokio::select! {
            result = &mut *connection => {
                if let Err(error) = result {
                    tracing::debug!(%peer, %error, "client connection ended with an error");
                }
                return Ended::Closed;
            }
            _ = tokio::time::sleep_until(timer_at) => {
                let now = Instant::now();
                if activity.idle_deadline(idle_timeout).is_some_and(|at| at <= now) {
                    if hard_close_at.is_some() {
                        tracing::debug!(%peer, "idle connection did not close gracefully; dropping it");
                        return Ended::Closed;
                    }
                    connection.graceful_shutdown();
                    closing = true;
                    hard_close_at = Some(now + idle_timeout);
                    continue;
                }
                let idle = activity.idle_deadline(RELEASE_AFTER).is_some_and(|at| at <= now);
                if release_due && idle && activity.at_rest() {
                    // hyper closes an idle connection at once, writing nothing. One
                    // that does not (a response still being written to a client that
                    // stopped reading) is not idle: it closes for real instead.
                    activity.release();
                    connection.graceful_shutdown();
                    match poll_once(&mut *connection).await {
                        Some(Ok(())) => return Ended::Released,
                        Some(Err(error)) => {
                            tracing::debug!(%peer, %error, "client connection ended with an error");
                            return Ended::Closed;
                        }
                        None => {
                            activity.cancel_release();
                            closing = true;
                        }
                    }
                }
            }
            _ = stopped(&mut drain.shutdown), if drain.started.is_none() => {
                drain.started = Some(Instant::now());
            }
            // Wakes when the connection will have been quiet long enough (a request in
            // flight finishes first), or at the latest DRAIN_BUSY into the drain; a
            // request in flight then gets `Connection: close` (or the h2 GOAWAY).
            _ = tokio::time::sleep_until(drain_wake), if drain.started.is_some() && !closing => {
                if drain.should_close(activity) {
                    connection.graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}
