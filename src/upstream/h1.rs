//! HTTP/1.1 to an instance, with a codec of our own rather than hyper's client.
//!
//! Why: a proxy's upstream side needs little of a general client (no redirects, no
//! pooling policy of its own, no dispatcher task), and hyper's client was a third of
//! the instructions of a proxied request (callgrind: 13.2 k of 39.7 k). Here a pooled
//! connection is a plain struct, a request is one state machine polled by the request's
//! own task ([`Exchange`]): no task per connection, no channel between the request and
//! its connection, and the response head's values point into the read buffer. The
//! parsing is httparse (hyper's own parser), strict; framing follows RFC 9112 §6.3 and
//! refuses what two readers could read differently.
//!
//! `head.rs` parses the response head and its framing, `chunked.rs` the chunked
//! coding, `request.rs` writes the request head, `exchange.rs` runs one request.

// `head` and `chunked` are public for the fuzz target (fuzz/fuzz_targets/upstream_response.rs).
pub mod chunked;
mod exchange;
pub mod head;
mod request;
mod stream;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::{Notify, OwnedSemaphorePermit};

pub use exchange::Exchange;
pub use stream::Stream;

use crate::server::rewind::Rewind;

/// What went wrong on an HTTP/1.1 connection to an instance.
#[derive(Debug, thiserror::Error)]
pub enum H1Error {
    #[error("the instance broke HTTP/1.1: {0}")]
    Protocol(&'static str),
    #[error("the instance closed the connection before the response ended")]
    Closed,
    #[error("connection failed: {0}")]
    Io(io::Error),
    /// No bytes of the response body for the upstream's `read_timeout`.
    #[error("no response bytes for {0:?} (read_timeout)")]
    Stalled(std::time::Duration),
}

impl H1Error {
    /// Whether the instance spoke badly (rather than went away).
    pub fn is_protocol(&self) -> bool {
        matches!(self, H1Error::Protocol(_))
    }

    /// Whether the response stalled past the read timeout.
    pub fn is_stall(&self) -> bool {
        matches!(self, H1Error::Stalled(_))
    }
}

/// One of an instance's connection slots, held by a connection until it closes; the
/// pool is told when one comes free (an `auto` pool's HTTP/2 requests may wait for it).
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    freed: Arc<Notify>,
}

impl Slot {
    pub fn new(permit: OwnedSemaphorePermit, freed: Arc<Notify>) -> Self {
        Self {
            _permit: permit,
            freed,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.freed.notify_waiters();
    }
}

/// An open HTTP/1.1 connection to an instance, idle or carrying one exchange. Boxed
/// once when opened, so that the futures and bodies that hold it move a pointer.
pub struct Conn(Box<ConnState>);

struct ConnState {
    io: Stream,
    /// Bytes read and not yet parsed.
    read: BytesMut,
    /// The request head (and chunk framing) being written.
    write: Vec<u8>,
    slot: Slot,
    /// The longest wait for the next bytes of a response body (the upstream's
    /// `read_timeout`); kept here rather than in every response body.
    read_timeout: std::time::Duration,
}

impl Conn {
    pub fn new(io: Stream, slot: Slot) -> Self {
        Self(Box::new(ConnState {
            io,
            read: BytesMut::new(),
            write: Vec::new(),
            slot,
            read_timeout: std::time::Duration::MAX,
        }))
    }

    /// Whether an idle connection can still carry a request: the instance has neither
    /// closed it nor sent anything unasked. Costs no system call unless the socket
    /// became readable while idle (then one read, which for TLS also takes in session
    /// tickets and the like).
    pub fn is_alive(&mut self) -> bool {
        let conn = &mut *self.0;
        if !conn.read.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match conn.io.tcp().poll_read_ready(&mut cx) {
            Poll::Pending => return true,
            Poll::Ready(Err(_)) => return false,
            Poll::Ready(Ok(())) => {}
        }
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        matches!(
            Pin::new(&mut conn.io).poll_read(&mut cx, &mut probe),
            Poll::Pending
        )
    }
}

/// The instance's side of an upgraded connection (after `101 Switching Protocols`):
/// the bytes it sent early, then the connection, and the connection's slot, held until
/// the tunnel closes.
pub struct Upgraded {
    pub io: Rewind<Stream>,
    pub slot: Slot,
}

impl Upgraded {
    pub fn new(exchange: Exchange) -> Self {
        let (conn, early) = exchange.into_switched();
        let ConnState { io, slot, .. } = *conn.0;
        Self {
            io: Rewind::new(io, early),
            slot,
        }
    }
}
