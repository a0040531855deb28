//! HTTP/2 to an instance (protocol `h2c`, `h2`, or `auto` when ALPN picks h2): one
//! worker's connections to one instance, each carrying many requests as streams.
//! `exchange.rs` sends one request on a stream and streams its bodies.
//!
//! A request takes a stream on the first connection below the concurrent-stream limit
//! the instance advertised (SETTINGS_MAX_CONCURRENT_STREAMS, known before a connection
//! takes streams: see [`handshake`]); only when every one is full does the pool open
//! another, one at a time, within the instance's connection cap, and at the cap a
//! request waits (within the queue timeout) for a stream to end or a connection to
//! close. A connection that failed, got a GOAWAY or stopped answering PINGs takes no
//! new streams; streams already on it finish or fail alone.

mod exchange;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;

pub use exchange::{send, H2Body, REPLAY_LIMIT};

use super::pool::Pool;
use super::UpstreamError;
use crate::config::compile::Timeouts;

/// Streams assumed per connection until the instance's SETTINGS say otherwise (RFC 9113
/// §6.5.2 recommends a limit of at least 100).
const INITIAL_STREAMS: usize = 100;

/// How often an HTTP/2 connection is checked with a PING, and how long the answer may
/// take: a connection whose peer vanished (no FIN, no RST) is found within a minute,
/// not when the kernel gives up on it.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// One HTTP/2 connection to the instance.
pub struct H2Conn {
    sender: SendRequest<Bytes>,
    /// Streams of ours open on it.
    active: AtomicUsize,
    /// The connection ended, failed, was told to go away, or stopped answering PINGs:
    /// no new streams.
    closed: Arc<AtomicBool>,
}

impl H2Conn {
    fn usable(&self) -> bool {
        !self.closed.load(Ordering::Relaxed)
    }

    fn has_room(&self) -> bool {
        self.usable()
            && self.active.load(Ordering::Relaxed) < self.sender.current_max_send_streams()
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}

/// A worker's HTTP/2 connections to one instance.
#[derive(Default)]
pub struct H2Conns {
    conns: Mutex<Vec<Arc<H2Conn>>>,
    /// Told whenever a stream ends, a connection opens (or fails to) or one closes
    /// (freeing a slot under the cap), for requests waiting for room.
    freed: Arc<Notify>,
    /// A connection is being opened: requests that find no room wait for it rather
    /// than each opening one of their own.
    opening: AtomicBool,
    /// Connections that failed to open: requests that waited behind one see it and
    /// move to another instance rather than each trying in turn.
    open_failures: AtomicUsize,
}

/// Marks a connection being opened; when dropped (opened, failed, or the request
/// went away), the waiting requests look again.
struct Opening<'a>(&'a H2Conns);

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.0.opening.store(false, Ordering::Relaxed);
        self.0.freed.notify_waiters();
    }
}

impl H2Conns {
    fn conns(&self) -> std::sync::MutexGuard<'_, Vec<Arc<H2Conn>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a connection task tells when it ends and frees its slot.
    pub(super) fn freed(&self) -> Arc<Notify> {
        self.freed.clone()
    }

    /// Takes every connection out of use (a drain): streams on them finish, and each
    /// connection closes when its last one ends.
    pub fn close_all(&self) {
        self.conns().clear();
    }

    /// A stream on a connection with room for it, counted as open.
    fn take_stream(&self) -> Option<Arc<H2Conn>> {
        let mut conns = self.conns();
        conns.retain(|c| c.usable());
        let conn = conns.iter().find(|c| c.has_room())?.clone();
        conn.active.fetch_add(1, Ordering::Relaxed);
        Some(conn)
    }

    /// Keeps a connection for later streams (an `auto` probe that found h2).
    pub(super) fn keep(&self, conn: Arc<H2Conn>) {
        self.conns().push(conn);
    }

    /// Ends one stream on `conn`. When that leaves the connection idle and another
    /// idle one is open, it closes: one idle connection per instance and worker is
    /// enough for the next burst.
    fn stream_ended(&self, conn: &Arc<H2Conn>) {
        if conn.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            let mut conns = self.conns();
            let idle = |c: &Arc<H2Conn>| c.active.load(Ordering::Relaxed) == 0;
            if conns.iter().filter(|c| idle(c)).count() > 1 {
                // Checked again under the lock: a request may have just taken it.
                conns.retain(|c| !(Arc::ptr_eq(c, conn) && idle(c)));
            }
        }
        self.freed.notify_waiters();
    }
}

/// An HTTP/2 handshake over an open stream. The connection task runs until the
/// instance or the pool lets go of the connection, or it stops answering PINGs; it
/// holds `permit` (one of the instance's connection slots) until then, and tells
/// `freed` when it lets go.
///
/// The instance's SETTINGS are the first frame it sends, so once a first PING comes
/// back its concurrent-stream limit is known, and streams are placed by the real
/// limit rather than the assumed one: one round trip, once per connection.
pub async fn handshake<I>(
    io: I,
    permit: OwnedSemaphorePermit,
    freed: Arc<Notify>,
) -> Result<Arc<H2Conn>, UpstreamError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, mut connection) = h2::client::Builder::new()
        .initial_max_send_streams(INITIAL_STREAMS)
        .enable_push(false)
        // A stream's window bounds what one slow client can make us buffer (256 KiB);
        // the connection's is large enough that a few slow clients cannot starve the
        // other streams on it.
        .initial_window_size(256 * 1024)
        .initial_connection_window_size(16 * 1024 * 1024)
        .max_header_list_size(64 * 1024)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(UpstreamError::from_h2)?;
    let Some(mut ping_pong) = connection.ping_pong() else {
        return Err(UpstreamError::Reset(
            "no PING handle on a new connection".into(),
        ));
    };
    let closed = Arc::new(AtomicBool::new(false));
    // However the task ends (a panic in h2 included): closed, the slot freed, told.
    let ending = Ending {
        closed: closed.clone(),
        permit: Some(permit),
        freed,
    };
    let (settled, settled_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let _ending = ending;
        let keepalive = async move {
            let first = ping_pong.ping(h2::Ping::opaque()).await;
            let ok = first.is_ok();
            let _ = settled.send(first);
            if !ok {
                return;
            }
            loop {
                tokio::time::sleep(KEEPALIVE_INTERVAL).await;
                let ping = ping_pong.ping(h2::Ping::opaque());
                if !matches!(
                    tokio::time::timeout(KEEPALIVE_TIMEOUT, ping).await,
                    Ok(Ok(_))
                ) {
                    tracing::warn!(
                        "upstream HTTP/2 connection stopped answering PINGs; closing it"
                    );
                    return;
                }
            }
        };
        tokio::select! {
            ended = &mut connection => if let Err(error) = ended {
                tracing::debug!(%error, "upstream HTTP/2 connection ended with an error");
            },
            _ = keepalive => {}
        }
    });
    match settled_rx.await {
        Ok(Ok(_)) => Ok(Arc::new(H2Conn {
            sender,
            active: AtomicUsize::new(0),
            closed,
        })),
        Ok(Err(error)) => Err(UpstreamError::from_h2(error)),
        Err(_) => Err(UpstreamError::Reset(
            "the connection closed during its handshake".into(),
        )),
    }
}

/// What a connection task does when it ends: the connection takes no more streams, its
/// slot under the instance's cap is freed, and requests waiting for room look again.
struct Ending {
    closed: Arc<AtomicBool>,
    permit: Option<OwnedSemaphorePermit>,
    freed: Arc<Notify>,
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
        drop(self.permit.take());
        self.freed.notify_waiters();
    }
}

/// A stream counted on its connection until dropped. Shared by the response body and
/// the task sending the request body: the stream counts until both are done.
pub struct StreamSlot {
    pool: Arc<Pool>,
    conn: Arc<H2Conn>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.pool.h2.stream_ended(&self.conn);
    }
}

/// A stream on one of the pool's connections: one with room, else a new connection
/// when the instance is below its cap (one opened at a time), else the first stream
/// to end or slot to free within the queue timeout. Nothing has been sent when this
/// fails; a connect error (this request's, or the one opening the connection it
/// waited for) lets the request move to another instance.
pub async fn stream(pool: &Arc<Pool>, timeouts: Timeouts) -> Result<StreamSlot, UpstreamError> {
    let queue_deadline = Instant::now() + timeouts.queue;
    let h2 = &pool.h2;
    loop {
        // An `auto` instance that now picks HTTP/1.1: the request goes that way.
        if !pool.speaks_h2() {
            return Err(UpstreamError::ProtocolSwitched);
        }
        let freed = h2.freed.notified();
        if let Some(conn) = h2.take_stream() {
            return Ok(StreamSlot {
                pool: pool.clone(),
                conn,
            });
        }
        let failures = h2.open_failures.load(Ordering::Relaxed);
        // Below the cap, and nobody else opening one: open a connection.
        let opening = pool.free_slot().filter(|_| {
            h2.opening
                .compare_exchange(false, true, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        });
        if let Some(permit) = opening {
            let _opening = Opening(h2);
            let conn = match pool.open_h2(permit, timeouts.connect).await {
                Ok(conn) => conn,
                Err(UpstreamError::ProtocolSwitched) => {
                    return Err(UpstreamError::ProtocolSwitched)
                }
                Err(error) => {
                    h2.open_failures.fetch_add(1, Ordering::Relaxed);
                    return Err(error);
                }
            };
            conn.active.fetch_add(1, Ordering::Relaxed);
            // A drained instance's connection serves this request only.
            if pool.instance.in_rotation() {
                h2.keep(conn.clone());
            }
            return Ok(StreamSlot {
                pool: pool.clone(),
                conn,
            });
        }
        tokio::select! {
            _ = freed => {
                if h2.open_failures.load(Ordering::Relaxed) != failures {
                    return Err(UpstreamError::OpenFailed);
                }
            }
            _ = tokio::time::sleep_until(queue_deadline) => return Err(UpstreamError::QueueTimeout),
        }
    }
}
