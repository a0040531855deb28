//! One request as an HTTP/2 stream: the head, the request body pumped with flow control
//! (in a task of its own once the response head is in), and the response body.
//!
//! A stream the instance refused without processing it (RST_STREAM REFUSED_STREAM, or
//! a graceful GOAWAY whose last-stream-id is below it: RFC 9113 §8.7) is sent again on
//! another connection, body included: the body sent so far is kept, up to
//! [`REPLAY_LIMIT`], until the response head arrives.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::{Reason, RecvStream, SendStream};
use http::header::{self, HeaderName, HOST};
use http::{HeaderMap, Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::{stream, StreamSlot};
use crate::config::compile::Timeouts;
use crate::config::Protocol;
use crate::upstream::body::{BoxError, ClientAborted, UpstreamBody};
use crate::upstream::pool::{InFlight, Pool};
use crate::upstream::UpstreamError;

/// Request body kept for sending again on a refused stream. A request whose body is
/// larger than this before its response head starts is not retried (a gRPC unary
/// call's message is nearly always smaller). Each piece is charged at least
/// [`PART_COST`], so a body of many tiny pieces cannot hold more than this in bookkeeping.
pub const REPLAY_LIMIT: usize = 64 * 1024;
const PART_COST: usize = 64;

/// Tries of one request on streams the instance refused before it fails.
const MAX_SEND_TRIES: usize = 3;

/// Connections found gone (a GOAWAY, a close) as a request was about to use them,
/// before it fails. Nothing was sent on them; each is taken out of use.
const MAX_STALE_CONNECTIONS: usize = 8;

/// Sends `request` as an HTTP/2 stream, on `first` (from [`stream`]), and waits for
/// the response head until `head_deadline` (`deadline_error` when it passes). The
/// request body streams on in a task of its own once the head is in; the stream counts
/// on its connection until both bodies are done.
pub async fn send(
    pool: &Arc<Pool>,
    first: StreamSlot,
    request: Request<UpstreamBody>,
    timeouts: Timeouts,
    head_deadline: Instant,
    deadline_error: fn() -> UpstreamError,
    in_flight: InFlight,
) -> Result<Response<H2Body>, UpstreamError> {
    let grpc = crate::grpc::is_grpc(request.headers());
    let (mut parts, body) = request.into_parts();
    let uri = target(pool, &mut parts)?;
    let bodiless = matches!(body, UpstreamBody::Empty);
    let mut source = Source::new(body);
    let (mut refusals, mut stale) = (0, 0);
    let mut first = Some(first);
    loop {
        let slot = match first.take() {
            Some(slot) => slot,
            // Another stream, within the caller's time.
            None => match tokio::time::timeout_at(head_deadline, stream(pool, timeouts)).await {
                Ok(slot) => slot?,
                Err(_) => return Err(deadline_error()),
            },
        };
        let mut sender = slot.conn.sender.clone();
        // A connection that failed or went away since its last stream: out of use, and
        // nothing was sent on it.
        if poll_fn(|cx| sender.poll_ready(cx)).await.is_err() {
            slot.conn.close();
            stale += 1;
            if stale >= MAX_STALE_CONNECTIONS {
                return Err(UpstreamError::Reset(
                    "every connection tried went away before taking the stream".into(),
                ));
            }
            continue;
        }
        let mut head = Request::new(());
        *head.method_mut() = parts.method.clone();
        *head.uri_mut() = uri.clone();
        *head.headers_mut() = parts.headers.clone();
        let (response, mut stream) = match sender.send_request(head, bodiless) {
            Ok(sent) => sent,
            Err(error) => {
                if is_refused_by_h2(&error) {
                    // h2 refused the head itself: nothing another connection would take.
                    return Err(UpstreamError::ClientBody(Box::new(error)));
                }
                slot.conn.close();
                stale += 1;
                if stale >= MAX_STALE_CONNECTIONS {
                    return Err(UpstreamError::from_h2(error));
                }
                continue;
            }
        };
        let head = {
            let mut response = response;
            let mut pump = std::pin::pin!(source.pump(&mut stream, None));
            let mut pumped = bodiless;
            let exchange = async {
                loop {
                    tokio::select! {
                        // A head that is in wins over what the pump has to say.
                        biased;
                        response = &mut response => break response.map_err(Failure::Upstream),
                        done = &mut pump, if !pumped => {
                            pumped = true;
                            // The upstream's own errors show on the response too.
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
                let slot = Arc::new(slot);
                let client_failed = Arc::new(AtomicBool::new(false));
                let response_ended = Arc::new(Notify::new());
                if !source.finished() {
                    source.forget_replay();
                    if grpc {
                        // A streaming call may pause between messages for as long as
                        // it likes once the call is under way.
                        source.body.stop_idle_timer();
                    }
                    let (slot, client_failed) = (slot.clone(), client_failed.clone());
                    let response_ended = response_ended.clone();
                    tokio::spawn(async move {
                        let pumped = source.pump(&mut stream, Some(&response_ended)).await;
                        if let Err(Failure::Client(_)) = pumped {
                            client_failed.store(true, Ordering::Relaxed);
                        }
                        drop(slot);
                    });
                }
                let (parts, recv) = head.into_parts();
                let body = H2Body {
                    recv,
                    state: Stage::Data,
                    slot: Some(slot),
                    in_flight: Some(in_flight),
                    client_failed,
                    response_ended,
                };
                let mut response = Response::from_parts(parts, body);
                if response.body().recv.is_end_stream() {
                    response.body_mut().release();
                }
                return Ok(response);
            }
            Err(Failure::Upstream(error)) if refused(&error) => {
                if error.is_go_away() {
                    slot.conn.close();
                }
                refusals += 1;
                if refusals < MAX_SEND_TRIES && source.rewind() {
                    tracing::debug!(%error, addr = %pool.addr(), "stream refused unprocessed; sending it again");
                    continue;
                }
                return Err(UpstreamError::from_h2(error));
            }
            Err(Failure::Upstream(error)) => {
                if error.is_go_away() || error.is_io() {
                    slot.conn.close();
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

/// The request target as HTTP/2 names it: `:scheme` by the protocol, `:authority` from
/// Host (which it replaces, RFC 9113 §8.3.1; the instance's address without one), and
/// the path.
fn target(pool: &Pool, parts: &mut http::request::Parts) -> Result<Uri, UpstreamError> {
    let scheme = match pool.protocol() {
        Protocol::H2c => "http",
        _ => "https",
    };
    let authority = parts
        .headers
        .remove(HOST)
        .and_then(|host| http::uri::Authority::try_from(host.as_bytes()).ok())
        .or_else(|| http::uri::Authority::try_from(pool.addr().to_string()).ok());
    let mut uri = Uri::builder().scheme(scheme);
    if let Some(authority) = authority {
        uri = uri.authority(authority);
    }
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    uri.path_and_query(path)
        .build()
        .map_err(|e| UpstreamError::Protocol(Box::new(e)))
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

/// Whether h2 refused what we handed it (a head or trailer it cannot carry) rather than
/// the peer or the connection failing: neither remote, nor h2's own protocol verdict on
/// the peer, nor I/O, and no reason code.
fn is_refused_by_h2(error: &h2::Error) -> bool {
    !error.is_remote() && !error.is_library() && !error.is_io() && error.reason().is_none()
}

/// Why a stream produced no response head, or the pump stopped.
enum Failure {
    Upstream(h2::Error),
    /// The client's side: its body failed, or it sent what HTTP/2 cannot carry.
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
    sent_cost: usize,
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
            sent_cost: 0,
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
    /// next frame of the client's body (empty data frames are skipped).
    async fn next(&mut self) -> Result<Part, BoxError> {
        if let Some(part) = self.current.take() {
            return Ok(part);
        }
        if let Some(part) = self.queue.pop_front() {
            return Ok(part);
        }
        let part = loop {
            let frame = poll_fn(|cx| Pin::new(&mut self.body).poll_frame(cx)).await;
            match frame {
                None => break Part::End,
                Some(Err(error)) => return Err(error),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if data.is_empty() => continue,
                    Ok(data) => break Part::Data(data),
                    Err(frame) => match frame.into_trailers() {
                        Ok(trailers) => break Part::Trailers(trailers_for_h2(trailers)),
                        Err(_) => continue,
                    },
                },
            }
        };
        if let Some(sent) = &mut self.sent {
            self.sent_cost += match &part {
                Part::Data(data) => data.len().max(PART_COST),
                _ => PART_COST,
            };
            if self.sent_cost > REPLAY_LIMIT {
                self.sent = None;
            } else {
                sent.push(part.clone());
            }
        }
        Ok(part)
    }

    /// Sends the body on `stream` with HTTP/2 flow control, until it ends, the client's
    /// body fails, the stream is reset or closed under it, or (`response_ended`) the
    /// response is over: the call is then done, and the stream is reset rather than
    /// held open for a client that never finishes. The stream is reset on any failure
    /// of ours, so the instance never waits on a half-sent body.
    async fn pump(
        &mut self,
        stream: &mut SendStream<Bytes>,
        response_ended: Option<&Notify>,
    ) -> Result<(), Failure> {
        while !self.done {
            let ended = async {
                match response_ended {
                    Some(ended) => ended.notified().await,
                    None => std::future::pending().await,
                }
            };
            let next = tokio::select! {
                // A reset or the response's end, when they are in, win over the next
                // part: it would go to a stream that no longer takes it.
                biased;
                // The instance reset the stream (or it closed): nothing more to send.
                _ = poll_fn(|cx| stream.poll_reset(cx)) => {
                    self.done = true;
                    return Ok(());
                }
                _ = ended => {
                    self.done = true;
                    stream.send_reset(Reason::NO_ERROR);
                    return Ok(());
                }
                next = self.next() => next,
            };
            let part = match next {
                Ok(part) => part,
                Err(error) => return self.fail(stream, Failure::Client(error)),
            };
            let sent = match part {
                Part::Data(mut data) => {
                    while !data.is_empty() {
                        stream.reserve_capacity(data.len());
                        self.current = Some(Part::Data(data.clone()));
                        let room = match poll_fn(|cx| stream.poll_capacity(cx)).await {
                            Some(Ok(room)) => room,
                            Some(Err(error)) => return self.fail(stream, Failure::Upstream(error)),
                            // The stream closed under the pump: the response side reports.
                            None => {
                                self.done = true;
                                return Ok(());
                            }
                        };
                        if room == 0 {
                            continue;
                        }
                        let chunk = data.split_to(room.min(data.len()));
                        self.current = (!data.is_empty()).then(|| Part::Data(data.clone()));
                        if let Err(error) = stream.send_data(chunk, false) {
                            return self.fail(stream, Failure::Upstream(error));
                        }
                    }
                    Ok(())
                }
                Part::Trailers(trailers) => {
                    self.done = true;
                    stream.send_trailers(trailers)
                }
                Part::End => {
                    self.done = true;
                    stream.send_data(Bytes::new(), true)
                }
            };
            if let Err(error) = sent {
                // h2 refusing what we hand it (a trailer it cannot carry) is the
                // client's doing; anything else is the stream's.
                let failure = match is_refused_by_h2(&error) {
                    true => Failure::Client(Box::new(error)),
                    false => Failure::Upstream(error),
                };
                return self.fail(stream, failure);
            }
        }
        Ok(())
    }

    /// Stops the pump: the stream is reset, so the instance does not wait for the rest.
    fn fail(&mut self, stream: &mut SendStream<Bytes>, failure: Failure) -> Result<(), Failure> {
        self.done = true;
        stream.send_reset(Reason::CANCEL);
        Err(failure)
    }
}

/// Request trailers without the fields HTTP/2 forbids (connection-specific ones, RFC
/// 9113 §8.2.2), which h2 would refuse, failing the stream.
fn trailers_for_h2(mut trailers: HeaderMap) -> HeaderMap {
    static FORBIDDEN: [HeaderName; 6] = [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
    ];
    for name in &FORBIDDEN {
        trailers.remove(name);
    }
    trailers
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
    slot: Option<Arc<StreamSlot>>,
    in_flight: Option<InFlight>,
    /// Set when the client's request body failed and the stream was cancelled for it:
    /// the failure that follows here is then the client's, not the instance's.
    client_failed: Arc<AtomicBool>,
    /// Told when the response is over, so the request body's pump stops.
    response_ended: Arc<Notify>,
}

impl H2Body {
    fn release(&mut self) {
        if !matches!(self.state, Stage::Done) {
            self.response_ended.notify_one();
        }
        self.state = Stage::Done;
        self.slot = None;
        self.in_flight = None;
    }

    /// The request's in-flight mark (an HTTP/2 upstream opens no upgrade tunnel, so
    /// there is nothing to hold it).
    pub fn take_in_flight(&mut self) -> Option<InFlight> {
        self.in_flight.take()
    }

    fn failed(&mut self, error: h2::Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.release();
        let error: BoxError = match self.client_failed.load(Ordering::Relaxed) {
            true => Box::new(ClientAborted),
            false => error.into(),
        };
        Poll::Ready(Some(Err(error)))
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
                    Poll::Ready(Some(Err(error))) => return this.failed(error),
                    Poll::Ready(None) => this.state = Stage::Trailers,
                    Poll::Pending => return Poll::Pending,
                },
                Stage::Trailers => {
                    return match this.recv.poll_trailers(cx) {
                        Poll::Ready(Ok(Some(trailers))) => {
                            this.release();
                            Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                        }
                        Poll::Ready(Ok(None)) => {
                            this.release();
                            Poll::Ready(None)
                        }
                        Poll::Ready(Err(error)) => this.failed(error),
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
