//! One instance's connection pool: idle HTTP/1.1 senders, checked out LIFO so the warmest
//! connection is reused. The lock is per instance and held only to push or pop.
//!
//! A sender goes back to the pool only after its response body ended cleanly (see
//! [`PooledBody`]); a connection that failed in any way is dropped, never reused.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::body::UpstreamBody;
use super::h2::{H2Conn, H2Conns};
use super::instance::Instance;
use super::tls::UpstreamConnector;
use super::UpstreamError;
use crate::config::compile::Timeouts;
use crate::config::Protocol;

/// A connection taken for one request.
pub struct Connection {
    sender: SendRequest<UpstreamBody>,
    /// When it went idle, for a pooled or handed-over connection; `None` when new.
    idle_since: Option<Instant>,
    upgrade: bool,
}

/// One worker's connections to one instance.
pub struct Pool {
    addr: SocketAddr,
    max_idle: usize,
    max_connections: usize,
    tls: Option<UpstreamConnector>,
    /// The instance as every worker shares it: its state and health.
    pub instance: Arc<Instance>,
    /// Connection slots: at most this many connections to the instance at once.
    slots: Arc<Semaphore>,
    /// Idle senders, and the requests queued for one at the connection cap.
    idle: Mutex<Idle>,
    /// HTTP/2 connections (protocol `h2c`, `h2`, or `auto` once ALPN picked h2).
    pub(super) h2: H2Conns,
    protocol: Protocol,
    /// Requests go out as HTTP/2 streams: set by the protocol, or for `auto` by what
    /// the instance's ALPN picked on the last connection opened.
    speaks_h2: AtomicBool,
}

/// What sits behind the pool's lock.
#[derive(Default)]
struct Idle {
    /// Idle senders and when each went idle.
    senders: Vec<(SendRequest<UpstreamBody>, Instant)>,
    /// Requests waiting at the connection cap, oldest first. A returning connection goes
    /// straight to the oldest live one, so a newcomer cannot take it ahead of a request
    /// that has waited longer (HAProxy's server queue is FIFO for the same reason).
    waiters: VecDeque<oneshot::Sender<SendRequest<UpstreamBody>>>,
}

impl Pool {
    pub fn new(
        instance: Arc<Instance>,
        max_idle: usize,
        max_connections: usize,
        tls: Option<UpstreamConnector>,
        protocol: Protocol,
    ) -> Self {
        Self {
            h2: H2Conns::default(),
            protocol,
            speaks_h2: AtomicBool::new(matches!(protocol, Protocol::H2c | Protocol::H2)),
            slots: Arc::new(Semaphore::new(max_connections)),
            addr: instance.addr,
            max_idle,
            max_connections,
            tls,
            instance,
            idle: Mutex::new(Idle::default()),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Open connections, busy or idle.
    pub fn connections(&self) -> usize {
        self.max_connections - self.slots.available_permits()
    }

    /// Whether requests go to the instance as HTTP/2 streams.
    pub fn speaks_h2(&self) -> bool {
        self.speaks_h2.load(Ordering::Relaxed)
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Closes the idle connections (a drain): their tasks end as the senders drop.
    /// HTTP/2 connections take no new streams and close when their last one ends.
    pub fn close_idle(&self) {
        let closed = std::mem::take(&mut self.idle().senders);
        drop(closed);
        self.h2.close_all();
    }

    /// One of the instance's connection slots, if the instance is below its cap.
    pub(super) fn free_slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// A new HTTP/2 connection in `permit`'s slot. With `auto`, an instance whose ALPN
    /// picked HTTP/1.1 instead gets its connection pooled as such and
    /// [`UpstreamError::ProtocolSwitched`].
    pub(super) async fn open_h2(
        &self,
        permit: OwnedSemaphorePermit,
        timeout: Duration,
    ) -> Result<Arc<H2Conn>, UpstreamError> {
        match self.open(permit, timeout).await? {
            Opened::H2(conn) => Ok(conn),
            Opened::Http1(sender) => {
                self.speaks_h2.store(false, Ordering::Relaxed);
                self.put_back(sender);
                Err(UpstreamError::ProtocolSwitched)
            }
        }
    }

    /// A connection for one request: pooled, new, or handed over at the connection
    /// cap. An upgrade takes its connection for good: never from or back to the pool.
    /// Nothing has been sent when this fails, so the request may go elsewhere.
    pub async fn connection(
        &self,
        upgrade: bool,
        timeouts: Timeouts,
    ) -> Result<Connection, UpstreamError> {
        let pooled = match upgrade {
            true => None,
            false => self.checkout().await,
        };
        let (sender, idle_since) = match pooled {
            Some((sender, since)) => (sender, Some(since)),
            // Connecting or queueing is the rarer path, and its state (TCP, TLS, the
            // queue wait) is large: boxed, so it does not bloat, and get copied with,
            // every request's future.
            None => Box::pin(self.acquire(upgrade, timeouts)).await?,
        };
        Ok(Connection {
            sender,
            idle_since,
            upgrade,
        })
    }

    /// Gives a connection back unused (the request could not go on it).
    pub fn give_back(&self, connection: Connection) {
        if !connection.upgrade {
            self.put_back(connection.sender);
        }
    }

    /// Sends one request on `connection` (from [`Pool::connection`]). The response
    /// body holds the connection until it ends; then the connection returns to the pool.
    pub async fn send_on(
        self: &Arc<Self>,
        connection: Connection,
        request: Request<UpstreamBody>,
        timeouts: Timeouts,
        in_flight: InFlight,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let Connection {
            mut sender,
            idle_since,
            upgrade,
        } = connection;
        // A connection that sat idle may have been closed by the upstream just as we
        // send. A bodiless idempotent request is then safe to send again, once, on a
        // fresh connection; keep a copy of its head for that. Connections reused under
        // load (idle for less than STALE_AFTER) skip the copy.
        let retry = match idle_since {
            Some(since) if since.elapsed() >= STALE_AFTER => retry_copy(&request),
            _ => None,
        };
        let response = match within(timeouts.response, sender.try_send_request(request)).await? {
            Ok(response) => response,
            Err(mut failure) => {
                // hyper hands back a request it never wrote: always safe to send again.
                // One it wrote may go again only if it is idempotent and bodiless.
                let unsent = failure.take_message();
                let error = failure.into_error();
                let again = match (unsent, retry) {
                    (Some(unsent), _) if idle_since.is_some() => unsent,
                    (_, Some(copy)) if !error.is_user() => copy,
                    _ => return Err(UpstreamError::from_hyper(error)),
                };
                tracing::debug!(%error, addr = %self.addr, "stale pooled connection; retrying once on a fresh one");
                sender = Box::pin(self.acquire(true, timeouts)).await?.0;
                within(timeouts.response, sender.send_request(again))
                    .await?
                    .map_err(UpstreamError::from_hyper)?
            }
        };
        let (parts, body) = response.into_parts();
        let lease = (!upgrade).then(|| Lease {
            pool: self.clone(),
            sender,
        });
        let mut body = PooledBody {
            inner: body,
            lease,
            in_flight: Some(in_flight),
        };
        if body.inner.is_end_stream() {
            body.release();
        }
        Ok(Response::from_parts(parts, body))
    }

    /// The idle list and queue. Every change under the lock is a single push or pop, so
    /// the data is whole even if a holder panicked: poisoning is ignored.
    fn idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn checkout(&self) -> Option<(SendRequest<UpstreamBody>, Instant)> {
        loop {
            let (sender, idle_since) = self.idle().senders.pop()?;
            if let Some(sender) = ready(sender).await {
                return Some((sender, idle_since));
            }
        }
    }

    /// A connection for one request: an idle pooled one (returned with the time it went
    /// idle), else a new one if the instance is below its connection cap, else the first
    /// to come: a connection handed over in queue order, or a freed slot, within the
    /// queue timeout. `fresh` skips the pool (upgrades, retries).
    async fn acquire(
        &self,
        fresh: bool,
        timeouts: Timeouts,
    ) -> Result<(SendRequest<UpstreamBody>, Option<Instant>), UpstreamError> {
        let deadline = Instant::now() + timeouts.queue;
        loop {
            if !fresh {
                if let Some((sender, idle_since)) = self.checkout().await {
                    return Ok((sender, Some(idle_since)));
                }
            }
            if let Ok(permit) = self.slots.clone().try_acquire_owned() {
                return Ok((self.connect(permit, timeouts.connect).await?, None));
            }
            let mut handed = match fresh {
                // A request that needs a connection of its own (an upgrade, a retry)
                // must not wait behind idle pooled ones: close the oldest, and its slot
                // comes free as its connection task ends.
                true => {
                    self.evict_oldest_idle();
                    None
                }
                false => match self.enqueue() {
                    Some(receiver) => Some(receiver),
                    // A connection came back since the checkout above.
                    None => continue,
                },
            };
            let handover = async {
                match handed.as_mut() {
                    Some(receiver) => receiver.await.ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(sender) = handover => match ready(sender).await {
                    Some(sender) => return Ok((sender, Some(Instant::now()))),
                    None => continue,
                },
                permit = self.slots.clone().acquire_owned() => {
                    let permit = permit.map_err(|_| UpstreamError::QueueTimeout)?;
                    // A connection handed over at the same moment is not lost.
                    if let Some(sender) = handed.as_mut().and_then(|r| { r.close(); r.try_recv().ok() }) {
                        self.put_back(sender);
                    }
                    return Ok((self.connect(permit, timeouts.connect).await?, None));
                }
                _ = tokio::time::sleep_until(deadline) => return Err(UpstreamError::QueueTimeout),
            }
        }
    }

    fn evict_oldest_idle(&self) {
        let mut idle = self.idle();
        if !idle.senders.is_empty() {
            idle.senders.remove(0);
        }
    }

    /// Joins the queue for a returning connection, unless one is already idle (checked
    /// under the same lock, so a connection returned in between is not missed).
    fn enqueue(&self) -> Option<oneshot::Receiver<SendRequest<UpstreamBody>>> {
        let mut idle = self.idle();
        if !idle.senders.is_empty() {
            return None;
        }
        // Waiters that gave up sit at the front: they all waited the same timeout.
        while idle.waiters.front().is_some_and(|w| w.is_closed()) {
            idle.waiters.pop_front();
        }
        let (sender, receiver) = oneshot::channel();
        idle.waiters.push_back(sender);
        Some(receiver)
    }

    /// Opens an HTTP/1.1 connection (see [`Pool::open`]). With `auto`, an instance whose
    /// ALPN picked h2 gets its connection kept for HTTP/2 streams instead and
    /// [`UpstreamError::ProtocolSwitched`].
    async fn connect(
        &self,
        permit: OwnedSemaphorePermit,
        timeout: Duration,
    ) -> Result<SendRequest<UpstreamBody>, UpstreamError> {
        match self.open(permit, timeout).await? {
            Opened::Http1(sender) => Ok(sender),
            Opened::H2(conn) => {
                self.speaks_h2.store(true, Ordering::Relaxed);
                self.h2.keep(conn);
                // Idle HTTP/1.1 connections would only hold slots the streams need.
                drop(std::mem::take(&mut self.idle().senders));
                Err(UpstreamError::ProtocolSwitched)
            }
        }
    }

    /// Opens a connection (TCP, then TLS when configured) within `timeout`, speaking
    /// HTTP/2 for `h2c` and `h2`, HTTP/1.1 for `http1`, and for `auto` what ALPN picked.
    /// A failed TLS handshake or certificate verification is a connect error. The
    /// connection holds `permit`, one of the instance's connection slots, until it
    /// closes.
    async fn open(
        &self,
        permit: OwnedSemaphorePermit,
        timeout: Duration,
    ) -> Result<Opened, UpstreamError> {
        let connect = async {
            let stream = TcpStream::connect(self.addr)
                .await
                .map_err(UpstreamError::Connect)?;
            let _ = stream.set_nodelay(true);
            match &self.tls {
                None if self.protocol == Protocol::H2c => Ok(Opened::H2(
                    super::h2::handshake(stream, permit, self.h2.freed()).await?,
                )),
                None => Ok(Opened::Http1(
                    handshake(stream, permit, self.h2.freed()).await?,
                )),
                Some(tls) => {
                    let stream = tls
                        .connector
                        .connect(tls.server_name.clone(), stream)
                        .await
                        .map_err(UpstreamError::Connect)?;
                    let h2 = self
                        .protocol
                        .h2_over_tls(stream.get_ref().1.alpn_protocol());
                    match h2 {
                        true => Ok(Opened::H2(
                            super::h2::handshake(stream, permit, self.h2.freed()).await?,
                        )),
                        false => Ok(Opened::Http1(
                            handshake(stream, permit, self.h2.freed()).await?,
                        )),
                    }
                }
            }
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout)?
    }

    /// Returns a connection: to the oldest waiting request, else to the idle list.
    fn put_back(&self, mut sender: SendRequest<UpstreamBody>) {
        // A draining or removed instance keeps no connection once its request is done.
        if sender.is_closed() || !self.instance.in_rotation() {
            return;
        }
        let mut idle = self.idle();
        while let Some(waiter) = idle.waiters.pop_front() {
            match waiter.send(sender) {
                Ok(()) => return,
                // That request gave up waiting; try the next.
                Err(returned) => sender = returned,
            }
        }
        if idle.senders.len() < self.max_idle {
            idle.senders.push((sender, Instant::now()));
        }
    }
}

/// A connection just opened, in the protocol it speaks.
enum Opened {
    Http1(SendRequest<UpstreamBody>),
    H2(Arc<H2Conn>),
}

/// The sender once it can take a request; `None` when its connection has closed.
async fn ready(mut sender: SendRequest<UpstreamBody>) -> Option<SendRequest<UpstreamBody>> {
    if sender.is_closed() {
        return None;
    }
    if sender.is_ready() || sender.ready().await.is_ok() {
        return Some(sender);
    }
    None
}

/// Waits for the response head for at most `timeout`.
async fn within<T>(
    timeout: Duration,
    response: impl Future<Output = T>,
) -> Result<T, UpstreamError> {
    tokio::time::timeout(timeout, response)
        .await
        .map_err(|_| UpstreamError::ResponseTimeout)
}

/// A pooled connection idle this long may have been closed by the upstream's own
/// keep-alive timeout; requests sent on it keep a copy for one retry.
const STALE_AFTER: Duration = Duration::from_millis(50);

/// A copy of a request that may be sent again: GET, HEAD or OPTIONS without a body.
fn retry_copy(request: &Request<UpstreamBody>) -> Option<Request<UpstreamBody>> {
    let idempotent = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !idempotent || !matches!(request.body(), UpstreamBody::Empty) {
        return None;
    }
    let mut copy = Request::new(UpstreamBody::Empty);
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    Some(copy)
}

/// HTTP/1.1 over an open stream; the connection task runs until the peer or the pool
/// lets go of it.
async fn handshake<I>(
    io: I,
    permit: OwnedSemaphorePermit,
    freed: Arc<tokio::sync::Notify>,
) -> Result<SendRequest<UpstreamBody>, UpstreamError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(UpstreamError::from_hyper)?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upstream connection ended with an error");
        }
        drop(permit);
        // An `auto` pool's HTTP/2 requests may be waiting at the cap for this slot.
        freed.notify_waiters();
    });
    Ok(sender)
}

/// One request in flight to an instance, from the moment it is sent there until its
/// response ends (or its upgrade tunnel closes): what `drain --wait` waits for.
pub struct InFlight {
    instance: Arc<Instance>,
    slot: usize,
}

impl InFlight {
    pub fn new(pool: &Pool) -> Self {
        let instance = pool.instance.clone();
        let slot = instance.started();
        Self { instance, slot }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.instance.finished(self.slot);
    }
}

/// A connection on loan to one response.
struct Lease {
    pool: Arc<Pool>,
    sender: SendRequest<UpstreamBody>,
}

/// The upstream response body. It streams through unchanged; when it ends cleanly the
/// connection goes back to the pool, and when it fails or is dropped early the
/// connection is dropped with it.
pub struct PooledBody {
    inner: Incoming,
    lease: Option<Lease>,
    in_flight: Option<InFlight>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.pool.put_back(lease.sender);
        }
        self.in_flight = None;
    }

    /// The request's in-flight mark, for an upgrade tunnel to hold until it closes.
    pub fn take_in_flight(&mut self) -> Option<InFlight> {
        self.in_flight.take()
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => {
                self.lease = None;
                self.in_flight = None;
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
