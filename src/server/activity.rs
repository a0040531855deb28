//! Per-connection state shared by the IO wrapper and the service:
//! - activity, for the idle keep-alive timeout: the IO wrapper stamps the time of the
//!   last byte read or written, and the service counts requests in flight. A connection
//!   is idle when nothing is in flight and no byte has moved for a while;
//! - the framing scan (`head_scan.rs`): the IO wrapper feeds it what the client sends,
//!   and records the first request head it refuses, which the service then answers 400;
//! - whether hyper's state may be released (`connection.rs`): the scan is at rest
//!   between two requests, and while it is being released, closing hyper's side does
//!   not shut the socket.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::head_scan::{Finding, HeadScanner, Rejection};

pub struct Activity {
    origin: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    /// Requests begun on this connection, numbering them in order (HTTP/1.1 serves
    /// them one at a time, in the order their heads arrived).
    requests: AtomicU64,
    /// The first request head the framing scan refused, by sequence number.
    rejected: OnceLock<(u64, Rejection)>,
    /// Set when an upgrade tunnel opens: the bytes that follow are the tunnelled
    /// protocol's, not HTTP, and the framing scan stops.
    tunneled: AtomicBool,
    /// The framing scan has seen whole requests only (see `HeadScanner::at_rest`), and
    /// is still following: false once it stopped (HTTP/2, a tunnel, a refused head).
    at_rest: AtomicBool,
    /// hyper's state is being released: its closing must leave the socket open.
    releasing: AtomicBool,
    /// Request heads the current framing scan has seen (numbered like `requests`).
    heads_seen: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            rejected: OnceLock::new(),
            tunneled: AtomicBool::new(false),
            at_rest: AtomicBool::new(true),
            releasing: AtomicBool::new(false),
            heads_seen: AtomicU64::new(0),
        })
    }

    /// Whether the connection is between two requests with nothing of the next one
    /// read, and the current hyper connection has served one at least (a fresh one
    /// has not yet settled into keep-alive: asked to close, it would answer its next
    /// request with `Connection: close`): hyper's state can then be released and
    /// rebuilt when bytes arrive.
    pub fn at_rest(&self) -> bool {
        self.at_rest.load(Relaxed)
            && self.rejected.get().is_none()
            && self.requests.load(Relaxed) > 0
            && self.in_flight.load(Relaxed) == 0
    }

    /// Whether the framing scan has seen a request head that no request has begun
    /// for yet: bytes left unparsed by hyper then start with that head (and are not,
    /// say, the rest of a body hyper did not read).
    pub fn head_pending(&self) -> bool {
        self.heads_seen.load(Relaxed) > self.requests.load(Relaxed)
    }

    /// hyper's state is being released: from now until [`Activity::resume`], closing
    /// it does not shut the socket down.
    pub fn release(&self) {
        self.releasing.store(true, Relaxed);
    }

    /// The release was given up: closing hyper's side shuts the socket again.
    pub fn cancel_release(&self) {
        self.releasing.store(false, Relaxed);
    }

    /// A fresh hyper connection and framing scan take over from the start of the next
    /// request: requests are numbered from 0 again, as the new scan numbers heads. The
    /// bytes that woke the connection count as activity.
    pub fn resume(&self) {
        self.releasing.store(false, Relaxed);
        self.requests.store(0, Relaxed);
        self.heads_seen.store(0, Relaxed);
        self.at_rest.store(true, Relaxed);
        self.touch();
    }

    fn touch(&self) {
        self.last_ms
            .store(self.origin.elapsed().as_millis() as u64, Relaxed);
    }

    /// When the connection will have been idle for `timeout`, if nothing happens first;
    /// `None` while a request is in flight.
    pub fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Relaxed) > 0 {
            return None;
        }
        Some(self.origin + Duration::from_millis(self.last_ms.load(Relaxed)) + timeout)
    }

    /// The connection became a tunnel (an upstream accepted its upgrade).
    pub fn tunnel_opened(&self) {
        self.tunneled.store(true, Relaxed);
    }

    /// Marks a request in flight until the guard drops. Returns the guard and, when the
    /// framing scan refused this request's head, why.
    pub fn begin_request(self: &Arc<Self>) -> (InFlight, Option<Rejection>) {
        self.in_flight.fetch_add(1, Relaxed);
        let sequence = self.requests.fetch_add(1, Relaxed);
        let rejection = self
            .rejected
            .get()
            .and_then(|&(bad, reason)| (sequence >= bad).then_some(reason));
        (InFlight(self.clone()), rejection)
    }
}

pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Relaxed);
    }
}

/// An IO stream that stamps activity on every byte moved and scans what the client
/// sends for ambiguous framing.
pub struct Tracked<I> {
    inner: I,
    activity: Arc<Activity>,
    scanner: Option<HeadScanner>,
}

impl<I> Tracked<I> {
    pub fn new(inner: I, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            activity,
            scanner: Some(HeadScanner::new()),
        }
    }

    pub fn into_inner(self) -> I {
        self.inner
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
            let this = &mut *self;
            if this.scanner.is_some() && this.activity.tunneled.load(Relaxed) {
                this.scanner = None;
            }
            if let Some(scanner) = this.scanner.as_mut() {
                if let Finding::Rejected { sequence, reason } =
                    scanner.feed(&buf.filled()[before..])
                {
                    let _ = this.activity.rejected.set((sequence, reason));
                    this.scanner = None;
                }
            }
            let at_rest = this.scanner.as_ref().is_some_and(HeadScanner::at_rest);
            this.activity.at_rest.store(at_rest, Relaxed);
            if let Some(scanner) = this.scanner.as_ref() {
                this.activity.heads_seen.store(scanner.heads(), Relaxed);
            }
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.activity.releasing.load(Relaxed) {
            // hyper closes its side to hand the socket back, not to end the connection.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
