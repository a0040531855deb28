//! One request and its response on an HTTP/1.1 connection, as one state machine: the
//! request head and body go out while the response is read, so an instance that
//! answers before the body is all sent (a 413, an early 200) is heard, and the body
//! keeps streaming while the response body streams back.
//!
//! After the response ends, the connection may carry another request only if both
//! messages ended cleanly: the request body all sent, the response framed by length
//! or chunks, nothing unasked-for after it, and no `Connection: close`.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{request, response};
use http_body::{Body, Frame, SizeHint};
use tokio::io::AsyncWrite as _;
use tokio::time::{Instant, Sleep};

use super::chunked::{self, Step};
use super::head::{self, BodyLength};
use super::request::{self as encode, Framing};
use super::{Conn, H1Error};
use crate::upstream::body::{BoxError, ClientAborted, UpstreamBody};
use crate::upstream::UpstreamError;

/// Bytes read from the instance at a time.
const READ_CHUNK: usize = 16 * 1024;

pub struct Exchange {
    conn: Conn,
    /// The request body still to send; `None` once it all went (or sending stopped).
    /// Boxed: most requests have none, and this struct lives in every response body.
    body: Option<Box<UpstreamBody>>,
    framing: Framing,
    /// What of `conn.write` is already written.
    written: usize,
    /// A body chunk being written after `conn.write`, then the last `suffix` bytes of
    /// the CRLF that ends a chunk.
    data: Bytes,
    suffix: u8,
    /// Sending stopped before the whole request went: the connection is not reused.
    send_cut: bool,
    /// The write side failed: the response may still come (an instance that answered
    /// and closed), and if it does not, this is the error.
    send_error: Option<io::Error>,
    to_head_request: bool,
    response: Reading,
    keep_alive: bool,
    /// Armed the first time a body read has to wait (a response read in one go never
    /// makes one), and pushed back by every read that brings bytes.
    stall: Option<Pin<Box<Sleep>>>,
}

/// Where reading the response is.
enum Reading {
    Head,
    Exact(u64),
    Chunked(chunked::Decoder),
    UntilClose,
    /// The response ended (or switched protocols).
    Done,
}

impl Exchange {
    /// Starts a request on `conn`: its head is encoded now and written on the first poll.
    pub fn new(
        mut conn: Conn,
        parts: &request::Parts,
        body: UpstreamBody,
        read_timeout: Duration,
    ) -> Self {
        conn.0.write.clear();
        conn.0.read_timeout = read_timeout;
        let framing = encode::encode(&mut conn.0.write, parts, &body);
        let body = match body {
            UpstreamBody::Empty => None,
            body => Some(Box::new(body)),
        };
        Self {
            conn,
            body,
            framing,
            written: 0,
            data: Bytes::new(),
            suffix: 0,
            send_cut: false,
            send_error: None,
            to_head_request: parts.method == http::Method::HEAD,
            response: Reading::Head,
            keep_alive: false,
            stall: None,
        }
    }

    /// Whether anything of the request is still to be written.
    fn sending(&self) -> bool {
        self.body.is_some() || self.has_pending_bytes()
    }

    /// Writes what is pending and pulls the body on; `Ready(Ok)` once all is sent. A
    /// failed write is kept in `send_error` (the response is still read); a failed
    /// client body is returned.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            // Pull the body on while nothing of it waits to be written.
            while self.data.is_empty() && self.suffix == 0 {
                let Some(body) = self.body.as_mut() else {
                    break;
                };
                match Pin::new(body.as_mut()).poll_frame(cx) {
                    Poll::Ready(Some(Ok(frame))) => self.queue(frame),
                    Poll::Ready(None) => self.queue_end(),
                    Poll::Ready(Some(Err(error))) => {
                        self.stop_sending();
                        return Poll::Ready(Err(error));
                    }
                    Poll::Pending => break,
                }
            }
            if self.send_error.is_some() || !self.has_pending_bytes() {
                return match self.body.is_some() {
                    true => Poll::Pending,
                    false => Poll::Ready(Ok(())),
                };
            }
            let conn = &mut *self.conn.0;
            let slices = [
                IoSlice::new(&conn.write[self.written..]),
                IoSlice::new(&self.data),
                IoSlice::new(&b"\r\n"[2 - usize::from(self.suffix)..]),
            ];
            let written = match Pin::new(&mut conn.io).poll_write_vectored(cx, &slices) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) => Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(result) => result,
            };
            match written {
                Ok(n) => self.advance(n),
                Err(error) => {
                    self.stop_sending();
                    self.send_error = Some(error);
                }
            }
        }
    }

    fn has_pending_bytes(&self) -> bool {
        self.written < self.conn.0.write.len() || !self.data.is_empty() || self.suffix > 0
    }

    /// Marks `n` bytes written, in order: the head buffer, the data, the suffix.
    fn advance(&mut self, mut n: usize) {
        let head = (self.conn.0.write.len() - self.written).min(n);
        self.written += head;
        n -= head;
        if self.written == self.conn.0.write.len() {
            self.conn.0.write.clear();
            self.written = 0;
        }
        let data = self.data.len().min(n);
        self.data.advance(data);
        n -= data;
        self.suffix -= n.min(usize::from(self.suffix)) as u8;
    }

    /// Queues one frame of the request body.
    fn queue(&mut self, frame: Frame<Bytes>) {
        let frame = match frame.into_data() {
            Ok(data) if data.is_empty() => return,
            Ok(data) => {
                if let Framing::Length(left) = &mut self.framing {
                    // The client's body is held to its length by hyper; a body that
                    // ran over anyway is cut, never sent past what was announced.
                    let len = (data.len() as u64).min(*left);
                    *left -= len;
                    self.data = data.slice(..len as usize);
                } else {
                    chunked::encode_size(&mut self.conn.0.write, data.len());
                    self.data = data;
                    self.suffix = 2;
                }
                return;
            }
            Err(frame) => frame,
        };
        // Request trailers are not passed on: over HTTP/1.1 nothing needs them (gRPC
        // goes over HTTP/2), and a client could otherwise send Host, Content-Length or
        // X-Forwarded-For after every check and rewrite the proxy made to the head
        // (hyper's client dropped them too, for want of a `Trailer` header).
        if frame.is_trailers() {
            self.queue_end();
        }
    }

    /// The body ended.
    fn queue_end(&mut self) {
        self.body = None;
        match self.framing {
            Framing::Chunked => self.conn.0.write.extend_from_slice(b"0\r\n\r\n"),
            // Shorter than announced: the instance would wait for the rest.
            Framing::Length(left) if left > 0 => self.stop_sending(),
            Framing::Length(_) => {}
        }
    }

    /// Gives up on the rest of the request: the connection closes after this exchange.
    fn stop_sending(&mut self) {
        self.body = None;
        self.send_cut = true;
        self.data = Bytes::new();
        self.suffix = 0;
        self.conn.0.write.clear();
        self.written = 0;
    }

    /// Reads more of the response into the connection's read buffer: `Ok(0)` at the
    /// end of the connection.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let conn = &mut *self.conn.0;
        if conn.read.capacity() - conn.read.len() < READ_CHUNK / 4 {
            conn.read.reserve(READ_CHUNK);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.read)
    }

    /// Sends the request and reads up to the final response head (skipping `100
    /// Continue` and other informational heads).
    pub fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<response::Parts, UpstreamError>> {
        loop {
            if self.still_sending() {
                if let Poll::Ready(Err(error)) = self.poll_send(cx) {
                    return Poll::Ready(Err(UpstreamError::ClientBody(error)));
                }
            }
            if !self.conn.0.read.is_empty() {
                let parsed = head::parse(&mut self.conn.0.read).map_err(|problem| {
                    UpstreamError::Protocol(Box::new(H1Error::Protocol(problem)))
                })?;
                if let Some(mut parts) = parsed {
                    if parts.status.is_informational() && parts.status != 101 {
                        continue;
                    }
                    let (length, keep_alive) = head::body_length(&mut parts, self.to_head_request)
                        .map_err(UpstreamError::Ambiguous)?;
                    self.keep_alive = keep_alive;
                    self.response = match length {
                        BodyLength::Empty | BodyLength::Switched => Reading::Done,
                        BodyLength::Exact(n) => Reading::Exact(n),
                        BodyLength::Chunked => Reading::Chunked(chunked::Decoder::Size),
                        BodyLength::UntilClose => Reading::UntilClose,
                    };
                    return Poll::Ready(Ok(parts));
                }
            }
            match ready!(self.poll_fill(cx)) {
                Ok(0) => {
                    let error = self.send_error.take().map_or(H1Error::Closed, H1Error::Io);
                    return Poll::Ready(Err(UpstreamError::Reset(Box::new(error))));
                }
                Ok(_) => {}
                Err(error) => {
                    return Poll::Ready(Err(UpstreamError::Reset(Box::new(H1Error::Io(error)))))
                }
            }
        }
    }

    /// The next piece of the response body (the request body keeps going meanwhile).
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.still_sending() {
            if let Poll::Ready(Err(_)) = self.poll_send(cx) {
                // The client's body failed: the response is abandoned with it.
                self.response = Reading::Done;
                self.keep_alive = false;
                return Poll::Ready(Some(Err(Box::new(ClientAborted))));
            }
        }
        loop {
            let read = &mut self.conn.0.read;
            match &mut self.response {
                Reading::Head | Reading::Done => return Poll::Ready(None),
                Reading::Exact(left) if !read.is_empty() => {
                    let n = (*left).min(read.len() as u64);
                    let data = read.split_to(n as usize).freeze();
                    *left -= n;
                    if *left == 0 {
                        self.response = Reading::Done;
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Reading::Chunked(decoder) => match decoder.step(read) {
                    Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Step::Trailers(trailers)) => {
                        self.response = Reading::Done;
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    Ok(Step::End) => {
                        self.response = Reading::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Step::NeedMore) => {}
                    Err(problem) => return self.fail(H1Error::Protocol(problem)),
                },
                Reading::UntilClose if !read.is_empty() => {
                    let data = read.split().freeze();
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Reading::Exact(_) | Reading::UntilClose => {}
            }
            let filled = match self.poll_fill(cx) {
                Poll::Ready(filled) => {
                    if let Some(stall) = self.stall.as_mut() {
                        stall
                            .as_mut()
                            .reset(Instant::now() + self.conn.0.read_timeout);
                    }
                    filled
                }
                Poll::Pending => {
                    let timeout = self.conn.0.read_timeout;
                    let stall = self
                        .stall
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                    if stall.as_mut().poll(cx).is_ready() {
                        return self.fail(H1Error::Stalled(timeout));
                    }
                    return Poll::Pending;
                }
            };
            match filled {
                Ok(0) if matches!(self.response, Reading::UntilClose) => {
                    self.response = Reading::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => return self.fail(H1Error::Closed),
                Ok(_) => {}
                Err(error) => return self.fail(H1Error::Io(error)),
            }
        }
    }

    fn fail(&mut self, error: H1Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.response = Reading::Done;
        self.keep_alive = false;
        Poll::Ready(Some(Err(Box::new(error))))
    }

    pub fn is_end_stream(&self) -> bool {
        matches!(self.response, Reading::Done)
    }

    pub fn size_hint(&self) -> SizeHint {
        match self.response {
            Reading::Done => SizeHint::with_exact(0),
            Reading::Exact(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }

    /// Whether the request body is still going out (the response ended first).
    pub fn still_sending(&self) -> bool {
        self.sending() && self.send_error.is_none()
    }

    /// Sends the rest of the request body: an instance that answered before reading
    /// an upload still gets all of it (or the client's failure), as hyper's client did,
    /// so the client can finish sending and is not cut off mid-upload. An instance that
    /// stops taking the upload for the upstream's `read_timeout` is given up on (the
    /// connection, its slot and the in-flight mark go with it), as is a client whose
    /// body stalls (its `client_body_timeout`).
    pub async fn finish_sending(mut self) -> Self {
        let timeout = self.conn.0.read_timeout;
        let mut stall = Box::pin(tokio::time::sleep(timeout));
        std::future::poll_fn(|cx| {
            let before = self.progress();
            if self.poll_send(cx).is_ready() {
                return Poll::Ready(());
            }
            if self.progress() != before {
                stall.as_mut().reset(Instant::now() + timeout);
            }
            if stall.as_mut().poll(cx).is_ready() {
                self.stop_sending();
                return Poll::Ready(());
            }
            Poll::Pending
        })
        .await;
        self
    }

    /// Where sending stands, to tell whether a poll moved it on.
    fn progress(&self) -> (usize, usize, usize, u8) {
        (
            self.written,
            self.conn.0.write.len(),
            self.data.len(),
            self.suffix,
        )
    }

    /// The connection, once the response ended, if it can carry another request.
    pub fn reusable(self) -> Option<Conn> {
        let clean = matches!(self.response, Reading::Done)
            && self.keep_alive
            && !self.sending()
            && !self.send_cut
            && self.send_error.is_none()
            && self.conn.0.read.is_empty();
        clean.then_some(self.conn)
    }

    /// The connection after a `101 Switching Protocols`, with the bytes the instance
    /// already sent in the new protocol.
    pub fn into_switched(self) -> (Conn, Bytes) {
        let mut conn = self.conn;
        let early = conn.0.read.split().freeze();
        (conn, early)
    }
}
