//! One instance's connection pool: idle HTTP/1.1 connections, checked out LIFO so the
//! warmest connection is reused. The lock is per instance and held only to push or pop.
//!
//! A connection goes back to the pool only after its response body ended cleanly (see
//! [`PooledBody`]); a connection that failed in any way is dropped, never reused.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::net::TcpStream;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use super::body::{BoxError, UpstreamBody};
use super::h1::{self, Conn, Exchange, Slot, Stream};
use super::h2::{H2Conn, H2Conns};
use super::instance::Instance;
use super::tls::UpstreamConnector;
use super::UpstreamError;
use crate::config::compile::Timeouts;
use crate::config::Protocol;

/// A connection taken for one request.
pub struct Connection {
    conn: Conn,
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
    /// Idle connections, and the requests queued for one at the connection cap.
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
    /// Idle connections and when each went idle.
    conns: Vec<(Conn, Instant)>,
    /// Requests waiting at the connection cap, oldest first. A returning connection goes
    /// straight to the oldest live one, so a newcomer cannot take it ahead of a request
    /// that has waited longer (HAProxy's server queue is FIFO for the same reason).
    waiters: VecDeque<oneshot::Sender<Conn>>,
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

    /// Closes the idle connections (a drain).
    /// HTTP/2 connections take no new streams and close when their last one ends.
    pub fn close_idle(&self) {
        let closed = std::mem::take(&mut self.idle().conns);
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
            Opened::Http1(conn) => {
                self.speaks_h2.store(false, Ordering::Relaxed);
                self.put_back(conn);
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
            false => self.checkout(),
        };
        let (conn, idle_since) = match pooled {
            Some((conn, since)) => (conn, Some(since)),
            // Connecting or queueing is the rarer path, and its state (TCP, TLS, the
            // queue wait) is large: boxed, so it does not bloat, and get copied with,
            // every request's future.
            None => Box::pin(self.acquire(upgrade, timeouts)).await?,
        };
        Ok(Connection {
            conn,
            idle_since,
            upgrade,
        })
    }

    /// Gives a connection back unused (the request could not go on it).
    pub fn give_back(&self, connection: Connection) {
        if !connection.upgrade {
            self.put_back(connection.conn);
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
            conn,
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
        let (parts, body) = request.into_parts();
        let mut exchange = Exchange::new(conn, &parts, body, timeouts.read);
        let head = match within(timeouts.response, poll_fn(|cx| exchange.poll_head(cx))).await? {
            Ok(head) => head,
            Err(error @ UpstreamError::Reset(_)) => {
                let Some(copy) = retry else {
                    return Err(error);
                };
                tracing::debug!(%error, addr = %self.addr, "stale pooled connection; retrying once on a fresh one");
                let conn = Box::pin(self.acquire(true, timeouts)).await?.0;
                exchange = Exchange::new(conn, &copy, UpstreamBody::Empty, timeouts.read);
                within(timeouts.response, poll_fn(|cx| exchange.poll_head(cx))).await??
            }
            Err(error) => return Err(error),
        };
        let mut body = PooledBody {
            switched: head.status == StatusCode::SWITCHING_PROTOCOLS,
            exchange: Some(exchange),
            pool: (!upgrade).then(|| self.clone()),
            in_flight: Some(in_flight),
        };
        if body.is_end_stream() && !body.switched {
            body.release();
        }
        Ok(Response::from_parts(head, body))
    }

    /// The idle list and queue. Every change under the lock is a single push or pop, so
    /// the data is whole even if a holder panicked: poisoning is ignored.
    fn idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The newest idle connection the instance has not closed.
    fn checkout(&self) -> Option<(Conn, Instant)> {
        loop {
            let (mut conn, idle_since) = self.idle().conns.pop()?;
            if conn.is_alive() {
                return Some((conn, idle_since));
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
    ) -> Result<(Conn, Option<Instant>), UpstreamError> {
        let deadline = Instant::now() + timeouts.queue;
        loop {
            if !fresh {
                if let Some((conn, idle_since)) = self.checkout() {
                    return Ok((conn, Some(idle_since)));
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
                Some(mut conn) = handover => match conn.is_alive() {
                    true => return Ok((conn, Some(Instant::now()))),
                    false => continue,
                },
                permit = self.slots.clone().acquire_owned() => {
                    let permit = permit.map_err(|_| UpstreamError::QueueTimeout)?;
                    // A connection handed over at the same moment is not lost.
                    if let Some(conn) = handed.as_mut().and_then(|r| { r.close(); r.try_recv().ok() }) {
                        self.put_back(conn);
                    }
                    return Ok((self.connect(permit, timeouts.connect).await?, None));
                }
                _ = tokio::time::sleep_until(deadline) => return Err(UpstreamError::QueueTimeout),
            }
        }
    }

    fn evict_oldest_idle(&self) {
        let mut idle = self.idle();
        if !idle.conns.is_empty() {
            idle.conns.remove(0);
        }
    }

    /// Joins the queue for a returning connection, unless one is already idle (checked
    /// under the same lock, so a connection returned in between is not missed).
    fn enqueue(&self) -> Option<oneshot::Receiver<Conn>> {
        let mut idle = self.idle();
        if !idle.conns.is_empty() {
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
    ) -> Result<Conn, UpstreamError> {
        match self.open(permit, timeout).await? {
            Opened::Http1(conn) => Ok(conn),
            Opened::H2(conn) => {
                self.speaks_h2.store(true, Ordering::Relaxed);
                self.h2.keep(conn);
                // Idle HTTP/1.1 connections would only hold slots the streams need.
                drop(std::mem::take(&mut self.idle().conns));
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
                None => Ok(Opened::Http1(Conn::new(
                    Stream::Plain(stream),
                    Slot::new(permit, self.h2.freed()),
                ))),
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
                        false => Ok(Opened::Http1(Conn::new(
                            Stream::Tls(Box::new(stream)),
                            Slot::new(permit, self.h2.freed()),
                        ))),
                    }
                }
            }
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout)?
    }

    /// Returns a connection: to the oldest waiting request, else to the idle list.
    fn put_back(&self, mut conn: Conn) {
        // A draining or removed instance keeps no connection once its request is done.
        if !self.instance.in_rotation() {
            return;
        }
        let mut idle = self.idle();
        while let Some(waiter) = idle.waiters.pop_front() {
            match waiter.send(conn) {
                Ok(()) => return,
                // That request gave up waiting; try the next.
                Err(returned) => conn = returned,
            }
        }
        // Connections are checked out newest first, so one the instance closed deep in
        // the list would otherwise sit there (a socket, a buffer and a slot) for as
        // long as a newer one stays busy: each return looks at the oldest.
        if idle
            .conns
            .first_mut()
            .is_some_and(|(oldest, _)| !oldest.is_alive())
        {
            idle.conns.remove(0);
        }
        if idle.conns.len() < self.max_idle {
            idle.conns.push((conn, Instant::now()));
        }
    }
}

/// A connection just opened, in the protocol it speaks.
enum Opened {
    Http1(Conn),
    H2(Arc<H2Conn>),
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

/// A copy of the head of a request that may be sent again: GET, HEAD or OPTIONS
/// without a body.
fn retry_copy(request: &Request<UpstreamBody>) -> Option<http::request::Parts> {
    let idempotent = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !idempotent || !matches!(request.body(), UpstreamBody::Empty) {
        return None;
    }
    let (mut copy, ()) = Request::new(()).into_parts();
    copy.method = request.method().clone();
    copy.uri = request.uri().clone();
    copy.version = request.version();
    copy.headers = request.headers().clone();
    Some(copy)
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

/// The upstream response body. It streams through unchanged; when it ends cleanly the
/// connection goes back to the pool, and when it fails or is dropped early the
/// connection is closed with it.
pub struct PooledBody {
    /// The request and response on their connection; `None` once released or failed.
    exchange: Option<Exchange>,
    /// Where the connection returns; `None` for an upgrade's own connection.
    pool: Option<Arc<Pool>>,
    in_flight: Option<InFlight>,
    /// The instance answered `101 Switching Protocols`: the connection is the tunnel's.
    switched: bool,
}

impl PooledBody {
    /// The response ended: the connection goes back to the pool, once the request
    /// body (if the instance answered before taking it all) has gone out too, in a task
    /// of its own. The request stays in flight to the instance until then.
    fn release(&mut self) {
        let in_flight = self.in_flight.take();
        let Some(exchange) = self.exchange.take() else {
            return;
        };
        let pool = self.pool.take();
        let put_back = |exchange: Exchange| {
            if let (Some(pool), Some(conn)) = (pool, exchange.reusable()) {
                pool.put_back(conn);
            }
        };
        if !exchange.still_sending() {
            return put_back(exchange);
        }
        tokio::spawn(async move {
            put_back(exchange.finish_sending().await);
            drop(in_flight);
        });
    }

    /// The request's in-flight mark, for an upgrade tunnel to hold until it closes.
    pub fn take_in_flight(&mut self) -> Option<InFlight> {
        self.in_flight.take()
    }

    /// The instance's side of the tunnel, after a `101 Switching Protocols`.
    pub fn take_upgraded(&mut self) -> Option<h1::Upgraded> {
        match self.switched {
            true => self.exchange.take().map(h1::Upgraded::new),
            false => None,
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(exchange) = self.exchange.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = exchange.poll_frame(cx);
        let ended = exchange.is_end_stream();
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if ended => self.release(),
            Poll::Ready(Some(Err(_))) => {
                self.exchange = None;
                self.in_flight = None;
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.exchange.as_ref().is_none_or(Exchange::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.exchange
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Exchange::size_hint)
    }
}
