//! HTTP/2 to an instance (protocol `h2c`, `h2`, or `auto` when ALPN picks h2): one
//! worker's connections to one instance, each carrying many requests as streams.
//!
//! A request takes a stream on the first connection below the concurrent-stream limit
//! the instance advertised (SETTINGS_MAX_CONCURRENT_STREAMS); only when every one is
//! full does the pool open another, within the instance's connection cap, and at the
//! cap a request waits (within the queue timeout) for a stream to end. A connection
//! that failed or got a GOAWAY takes no new streams; streams already on it finish.
//!
//! A stream the instance refused without processing it (RST_STREAM REFUSED_STREAM, or
//! a graceful GOAWAY whose last-stream-id is below it: RFC 9113 §8.7) is sent again on
//! another connection, body included: the body sent so far is kept, up to
//! [`REPLAY_LIMIT`], until the response head arrives.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::header::HOST;
use http::{HeaderMap, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;

use super::body::{BoxError, UpstreamBody};
use super::pool::{InFlight, Pool};
use super::UpstreamError;
use crate::config::compile::Timeouts;
use crate::config::Protocol;

/// Request body bytes kept for sending again on a refused stream. A request whose body
/// is larger than this before its response head starts is not retried (a gRPC unary
/// call's message is nearly always smaller).
pub const REPLAY_LIMIT: usize = 64 * 1024;

/// Streams assumed per connection until the instance's SETTINGS say otherwise (RFC 9113
/// §6.5.2 recommends a limit of at least 100).
const INITIAL_STREAMS: usize = 100;

/// Tries of one request on refused streams or closed connections before it fails.
const MAX_SEND_TRIES: usize = 3;

/// One HTTP/2 connection to the instance.
pub struct H2Conn {
    sender: SendRequest<Bytes>,
    /// Streams of ours open on it.
    active: AtomicUsize,
    /// The connection ended, failed, or was told to go away: no new streams.
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
}

/// A worker's HTTP/2 connections to one instance.
#[derive(Default)]
pub struct H2Conns {
    conns: Mutex<Vec<Arc<H2Conn>>>,
    /// Told whenever a stream ends or a connection opens (or fails to), for requests
    /// waiting for room.
    freed: Notify,
    /// A connection is being opened: requests that find no room wait for it rather
    /// than each opening one of their own.
    opening: AtomicBool,
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

    /// Keeps a connection opened for another purpose (an `auto` probe that found h2).
    pub(super) fn keep(&self, conn: Arc<H2Conn>) {
        self.conns().push(conn);
    }

    /// Adds a new connection and takes a stream on it.
    fn add(&self, conn: Arc<H2Conn>) -> Arc<H2Conn> {
        conn.active.fetch_add(1, Ordering::Relaxed);
        self.conns().push(conn.clone());
        conn
    }

    /// Ends one stream on `conn`. When that leaves the connection idle and another
    /// idle one is open, it closes: one idle connection per instance and worker is
    /// enough for the next burst.
    fn stream_ended(&self, conn: &Arc<H2Conn>) {
        if conn.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            let mut conns = self.conns();
            let idle = conns
                .iter()
                .filter(|c| c.active.load(Ordering::Relaxed) == 0)
                .count();
            if idle > 1 {
                conns.retain(|c| !Arc::ptr_eq(c, conn));
            }
        }
        self.freed.notify_waiters();
    }
}

/// An HTTP/2 handshake over an open stream. The connection task runs until the
/// instance or the pool lets go of the connection, and holds `permit` (one of the
/// instance's connection slots) until then.
pub async fn handshake<I>(io: I, permit: OwnedSemaphorePermit) -> Result<Arc<H2Conn>, UpstreamError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, mut connection) = h2::client::Builder::new()
        .initial_max_send_streams(INITIAL_STREAMS)
        .enable_push(false)
        // Room for a burst of responses without stalling on WINDOW_UPDATEs, while
        // bounding what one slow client can make us buffer per stream.
        .initial_window_size(256 * 1024)
        .initial_connection_window_size(1024 * 1024)
        .max_header_list_size(64 * 1024)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(UpstreamError::from_h2)?;
    let mut ping = connection.ping_pong();
    let closed = Arc::new(AtomicBool::new(false));
    let flag = closed.clone();
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream HTTP/2 connection ended with an error");
        }
        flag.store(true, Ordering::Relaxed);
        drop(permit);
    });
    // The instance's SETTINGS are the first frame it sends, so once a PING comes back
    // its concurrent-stream limit is known: streams are then placed by the real limit,
    // not the assumed one. One round trip, once per connection.
    if let Some(ping) = ping.as_mut() {
        ping.ping(h2::Ping::opaque())
            .await
            .map_err(UpstreamError::from_h2)?;
    }
    Ok(Arc::new(H2Conn {
        sender,
        active: AtomicUsize::new(0),
        closed,
    }))
}

/// A stream counted on its connection until dropped.
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
/// when the instance is below its cap, else the first stream to end within the queue
/// timeout. Nothing has been sent when this fails.
pub async fn stream(pool: &Arc<Pool>, timeouts: Timeouts) -> Result<StreamSlot, UpstreamError> {
    let queue_deadline = Instant::now() + timeouts.queue;
    loop {
        let freed = pool.h2.freed.notified();
        if let Some(conn) = pool.h2.take_stream() {
            return Ok(StreamSlot {
                pool: pool.clone(),
                conn,
            });
        }
        // Below the cap, and nobody else opening one: open a connection.
        let opening = pool.free_slot().filter(|_| {
            pool.h2
                .opening
                .compare_exchange(false, true, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        });
        if let Some(permit) = opening {
            let opening = Opening(&pool.h2);
            let conn = pool.open_h2(permit, timeouts.connect).await?;
            let conn = pool.h2.add(conn);
            drop(opening);
            return Ok(StreamSlot {
                pool: pool.clone(),
                conn,
            });
        }
        tokio::select! {
            _ = freed => {}
            _ = tokio::time::sleep_until(queue_deadline) => return Err(UpstreamError::QueueTimeout),
        }
    }
}

/// Sends `request` as an HTTP/2 stream, on `first` (from [`stream`]), and waits for
/// the response head until `head_deadline` (`deadline_error` when it passes). The
/// request body streams on in a task of its own once the head is in; the response
/// body holds the stream until it ends.
pub async fn send(
    pool: &Arc<Pool>,
    first: StreamSlot,
    request: Request<UpstreamBody>,
    timeouts: Timeouts,
    head_deadline: Instant,
    deadline_error: fn() -> UpstreamError,
    in_flight: InFlight,
) -> Result<Response<H2Body>, UpstreamError> {
    let scheme = match pool.protocol() {
        Protocol::H2c => "http",
        _ => "https",
    };
    let (mut parts, body) = request.into_parts();
    // HTTP/2 names the target with :scheme and :authority, not Host (RFC 9113 §8.3.1).
    let authority = parts
        .headers
        .remove(HOST)
        .and_then(|host| http::uri::Authority::try_from(host.as_bytes()).ok())
        .or_else(|| http::uri::Authority::try_from(pool.addr().to_string()).ok());
    let mut uri = Uri::builder().scheme(scheme);
    if let Some(authority) = authority {
        uri = uri.authority(authority);
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let uri = uri
        .path_and_query(path)
        .build()
        .map_err(|e| UpstreamError::Protocol(Box::new(e)))?;
    let bodiless = matches!(body, UpstreamBody::Empty);
    let mut source = Source::new(body);
    let mut tries = 0;
    let mut first = Some(first);
    loop {
        tries += 1;
        let slot = match first.take() {
            Some(slot) => slot,
            None => stream(pool, timeouts).await?,
        };
        let mut sender = slot.conn.sender.clone();
        // A connection that failed or went away since its last stream: out of use, and
        // nothing was sent on it.
        if poll_fn(|cx| sender.poll_ready(cx)).await.is_err() {
            slot.conn.closed.store(true, Ordering::Relaxed);
            continue;
        }
        let mut head = Request::new(());
        *head.method_mut() = parts.method.clone();
        *head.uri_mut() = uri.clone();
        *head.headers_mut() = parts.headers.clone();
        let (response, mut stream) = match sender.send_request(head, bodiless) {
            Ok(sent) => sent,
            Err(error) => {
                slot.conn.closed.store(true, Ordering::Relaxed);
                if tries < MAX_SEND_TRIES {
                    continue;
                }
                return Err(UpstreamError::from_h2(error));
            }
        };
        let head = {
            let mut response = response;
            let mut pump = std::pin::pin!(source.pump(&mut stream));
            let mut pumped = bodiless;
            let exchange = async {
                loop {
                    tokio::select! {
                        response = &mut response => break response.map_err(Failure::Upstream),
                        done = &mut pump, if !pumped => {
                            pumped = true;
                            if let Err(Failure::Client(error)) = done {
                                break Err(Failure::Client(error));
                            }
                        }
                    }
                }
            };
            tokio::select! {
                head = exchange => head,
                _ = tokio::time::sleep_until(head_deadline) => Err(Failure::Deadline),
            }
        };
        match head {
            Ok(head) => {
                if !source.finished() {
                    source.forget_replay();
                    tokio::spawn(async move {
                        let _ = source.pump(&mut stream).await;
                    });
                }
                let (parts, recv) = head.into_parts();
                let body = H2Body {
                    recv,
                    state: Stage::Data,
                    slot: Some(slot),
                    in_flight: Some(in_flight),
                };
                let mut response = Response::from_parts(parts, body);
                if response.body().recv.is_end_stream() {
                    response.body_mut().release();
                }
                return Ok(response);
            }
            Err(Failure::Upstream(error)) if refused(&error) => {
                if error.is_go_away() {
                    slot.conn.closed.store(true, Ordering::Relaxed);
                }
                if tries < MAX_SEND_TRIES && source.rewind() {
                    tracing::debug!(%error, addr = %pool.addr(), "stream refused unprocessed; sending it again");
                    continue;
                }
                return Err(UpstreamError::from_h2(error));
            }
            Err(Failure::Upstream(error)) => {
                if error.is_go_away() || error.is_io() {
                    slot.conn.closed.store(true, Ordering::Relaxed);
                }
                return Err(UpstreamError::from_h2(error));
            }
            Err(Failure::Client(error)) => {
                stream.send_reset(Reason::CANCEL);
                return Err(UpstreamError::ClientBody(error));
            }
            Err(Failure::Deadline) => {
                stream.send_reset(Reason::CANCEL);
                return Err(deadline_error());
            }
        }
    }
}

/// Whether the instance said it did not process the stream, so that sending it again
/// cannot repeat its effect: REFUSED_STREAM, or a graceful GOAWAY that left it out
/// (a GOAWAY with an error code also fails streams it did process, when the connection
/// then closes, so only NO_ERROR counts).
fn refused(error: &h2::Error) -> bool {
    error.is_remote()
        && match error.reason() {
            Some(Reason::REFUSED_STREAM) => error.is_reset(),
            Some(Reason::NO_ERROR) => error.is_go_away(),
            _ => false,
        }
}

/// Why a stream produced no response head.
enum Failure {
    Upstream(h2::Error),
    Client(BoxError),
    Deadline,
}

/// One piece of the request body, as sent.
#[derive(Clone)]
enum Part {
    Data(Bytes),
    Trailers(HeaderMap),
    End,
}

/// The request body as the pump sends it: the client's body, with what was sent kept
/// for a replay until the response head arrives. Every await in [`Source::pump`] leaves
/// this consistent, so the pump can stop at any point and go on later (in a task of its
/// own once the head is in) or start over on a new stream.
struct Source {
    body: UpstreamBody,
    /// What was read from `body`, for a replay; `None` once past [`REPLAY_LIMIT`] or
    /// no longer needed.
    sent: Option<Vec<Part>>,
    sent_bytes: usize,
    /// Parts to send before reading more of the body (a replay).
    queue: VecDeque<Part>,
    /// The part being sent: what of it is left.
    current: Option<Part>,
    done: bool,
}

impl Source {
    fn new(body: UpstreamBody) -> Self {
        let done = matches!(body, UpstreamBody::Empty);
        Self {
            body,
            sent: Some(Vec::new()),
            sent_bytes: 0,
            queue: VecDeque::new(),
            current: None,
            done,
        }
    }

    fn finished(&self) -> bool {
        self.done
    }

    fn forget_replay(&mut self) {
        self.sent = None;
    }

    /// Starts over for a new stream; `false` when the body sent so far was not kept.
    fn rewind(&mut self) -> bool {
        let Some(sent) = &self.sent else {
            return false;
        };
        self.queue = sent.iter().cloned().collect();
        self.current = None;
        self.done = matches!(self.body, UpstreamBody::Empty);
        true
    }

    /// The next part to send: the unsent rest of the current one, a queued one, or the
    /// next frame of the client's body.
    async fn next(&mut self) -> Result<Part, BoxError> {
        if let Some(part) = self.current.take() {
            return Ok(part);
        }
        if let Some(part) = self.queue.pop_front() {
            return Ok(part);
        }
        let frame = poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await;
        let part = match frame {
            None => Part::End,
            Some(Err(error)) => return Err(error),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => Part::Data(data),
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => Part::Trailers(trailers),
                    Err(_) => return Ok(Part::Data(Bytes::new())),
                },
            },
        };
        if let Some(sent) = &mut self.sent {
            if let Part::Data(data) = &part {
                self.sent_bytes += data.len();
            }
            if self.sent_bytes > REPLAY_LIMIT {
                self.sent = None;
            } else {
                sent.push(part.clone());
            }
        }
        Ok(part)
    }

    /// Sends the body on `stream` with HTTP/2 flow control, until it ends, the client's
    /// body fails (the stream is then reset) or the instance resets the stream.
    async fn pump(&mut self, stream: &mut SendStream<Bytes>) -> Result<(), Failure> {
        while !self.done {
            let part = match self.next().await {
                Ok(part) => part,
                Err(error) => {
                    stream.send_reset(Reason::CANCEL);
                    self.done = true;
                    return Err(Failure::Client(error));
                }
            };
            match part {
                Part::Data(mut data) => {
                    while !data.is_empty() {
                        stream.reserve_capacity(data.len());
                        self.current = Some(Part::Data(data.clone()));
                        let room = match poll_fn(|cx| stream.poll_capacity(cx)).await {
                            Some(Ok(room)) => room,
                            Some(Err(error)) => return self.stop(error),
                            None => return self.stop_closed(),
                        };
                        if room == 0 {
                            continue;
                        }
                        let chunk = data.split_to(room.min(data.len()));
                        self.current = (!data.is_empty()).then(|| Part::Data(data.clone()));
                        if let Err(error) = stream.send_data(chunk, false) {
                            return self.stop(error);
                        }
                    }
                }
                Part::Trailers(trailers) => {
                    self.done = true;
                    if let Err(error) = stream.send_trailers(trailers) {
                        return Err(Failure::Upstream(error));
                    }
                }
                Part::End => {
                    self.done = true;
                    if let Err(error) = stream.send_data(Bytes::new(), true) {
                        return Err(Failure::Upstream(error));
                    }
                }
            }
        }
        Ok(())
    }

    fn stop(&mut self, error: h2::Error) -> Result<(), Failure> {
        self.done = true;
        Err(Failure::Upstream(error))
    }

    /// The stream closed under the pump (the instance answered and reset it, or the
    /// connection went): what happened is the response side's to report.
    fn stop_closed(&mut self) -> Result<(), Failure> {
        self.done = true;
        Ok(())
    }
}

/// Where an [`H2Body`] is in its stream.
enum Stage {
    Data,
    Trailers,
    Done,
}

/// The response body of one HTTP/2 stream: data, then trailers. It returns flow-control
/// credit as the client takes the data (so a slow client slows the instance rather than
/// filling our memory), and holds its place on the connection until it ends.
pub struct H2Body {
    recv: RecvStream,
    state: Stage,
    slot: Option<StreamSlot>,
    in_flight: Option<InFlight>,
}

impl H2Body {
    fn release(&mut self) {
        self.state = Stage::Done;
        self.slot = None;
        self.in_flight = None;
    }

    /// The request's in-flight mark (an HTTP/2 upstream opens no upgrade tunnel, so
    /// there is nothing to hold it).
    pub fn take_in_flight(&mut self) -> Option<InFlight> {
        self.in_flight.take()
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match this.state {
                Stage::Data => match this.recv.poll_data(cx) {
                    Poll::Ready(Some(Ok(data))) => {
                        let _ = this.recv.flow_control().release_capacity(data.len());
                        if this.recv.is_end_stream() {
                            this.release();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                    Poll::Ready(Some(Err(error))) => {
                        this.release();
                        return Poll::Ready(Some(Err(error.into())));
                    }
                    Poll::Ready(None) => this.state = Stage::Trailers,
                    Poll::Pending => return Poll::Pending,
                },
                Stage::Trailers => {
                    let polled = this.recv.poll_trailers(cx);
                    if polled.is_ready() {
                        this.release();
                    }
                    return match polled {
                        Poll::Ready(Ok(Some(trailers))) => {
                            Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                        }
                        Poll::Ready(Ok(None)) => Poll::Ready(None),
                        Poll::Ready(Err(error)) => Poll::Ready(Some(Err(error.into()))),
                        Poll::Pending => Poll::Pending,
                    };
                }
                Stage::Done => return Poll::Ready(None),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, Stage::Done)
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
