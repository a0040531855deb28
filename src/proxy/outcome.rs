//! A proxied request's outcome, recorded when its response ends rather than at the
//! response head: a gRPC call's status usually arrives in the trailers, after every
//! message, and a body that fails part way is a failure the head never shows. Both
//! feed the metrics and the SLO judge. Latency stays measured to the head (what the
//! latency SLOs mean); the whole exchange goes to `splitgate_request_stream_seconds`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::grpc;
use crate::proxy::split::Variant;
use crate::state::LiveRoute;
use crate::telemetry::Outcome;
use crate::upstream::body::ClientAborted;
use crate::upstream::{BoxError, ErrorKind, ResponseBody};
use crate::worker::snapshot::Local;

/// What is needed to record one request's outcome once its response ends.
pub struct Recorder {
    /// The snapshot the request was routed in (the worker's own handle on it), which
    /// keeps its route's metrics and evidence alive while the response streams.
    snapshot: Arc<Local>,
    route: usize,
    variant: Variant,
    /// The judge's evidence step the request was routed in.
    step: u64,
    started: Instant,
    /// Request received to response head.
    head_latency: Duration,
    status: u16,
    /// The response is a gRPC call's (status 200, `application/grpc`): its outcome is
    /// its `grpc-status`. A trailers-only response's status is in the head.
    grpc: Option<Option<u32>>,
}

/// How a response ended.
pub enum End<'a> {
    /// The body ended cleanly, with these trailers if it had any.
    Complete(Option<&'a HeaderMap>),
    /// The body failed part way.
    Failed(ErrorKind),
    /// The client stopped reading before the end (it went away or cancelled): not held
    /// against the upstream.
    Abandoned,
    /// The caller's gRPC deadline passed before the end: the call was cut there.
    DeadlineExceeded,
}

impl Recorder {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        snapshot: Arc<Local>,
        route: usize,
        variant: Variant,
        step: u64,
        started: Instant,
        head_latency: Duration,
        status: u16,
        grpc_head: Option<&HeaderMap>,
    ) -> Self {
        Self {
            snapshot,
            route,
            variant,
            step,
            started,
            head_latency,
            status,
            grpc: grpc_head.map(grpc::status_in),
        }
    }

    fn route(&self) -> &LiveRoute {
        &self.snapshot.routes[self.route]
    }

    /// The outcome for the metrics and the judge, by how the response ended.
    pub fn outcome(&self, end: End<'_>) -> Outcome {
        let code = match (end, self.grpc) {
            (End::Failed(kind), _) => return Outcome::Error(kind),
            // As the instance's own DEADLINE_EXCEEDED would count: a canary that
            // streams too slowly must not look healthy.
            (End::DeadlineExceeded, _) => grpc::DEADLINE_EXCEEDED,
            (_, None) => return Outcome::Status(self.status),
            (End::Complete(trailers), Some(in_head)) => trailers
                .and_then(grpc::status_in)
                .or(in_head)
                // A call that ends without a status failed (gRPC clients read it as
                // UNKNOWN).
                .unwrap_or(grpc::UNKNOWN),
            // The caller cancelled: an answer about the call, not the server.
            (End::Abandoned, Some(_)) => return Outcome::Grpc { failed: false },
        };
        grpc_outcome(self.route(), code)
    }

    /// Records the outcome.
    pub fn finish(self, end: End<'_>) {
        let outcome = self.outcome(end);
        let route = self.route();
        let side = route.metrics.side(self.variant);
        side.record(outcome, self.head_latency);
        side.record_stream(self.started.elapsed());
        route
            .windows
            .record_in_step(self.variant, outcome, self.head_latency, self.step);
    }
}

/// A gRPC call that ended with `code`: failed when the route counts that code as the
/// server's failure (`grpc_error_statuses`).
pub fn grpc_outcome(route: &LiveRoute, code: u32) -> Outcome {
    Outcome::Grpc {
        failed: route.spec.grpc_errors.contains(code),
    }
}

/// The upstream's response body on its way to the client, recording the outcome when
/// it ends, fails, or is dropped unfinished.
pub struct Observed {
    /// `None` once a deadline cut the call (dropping it cancels the upstream stream).
    inner: Option<ResponseBody>,
    recorder: Option<Recorder>,
    /// A gRPC call's deadline (the caller's `grpc-timeout`), which bounds the whole
    /// call, not only the wait for its head: a stream still open when it passes ends
    /// with DEADLINE_EXCEEDED in its trailers, as the caller expects.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Observed {
    /// Wraps `inner`; a body that is already over is recorded at once.
    pub fn new(inner: ResponseBody, recorder: Recorder, deadline: Option<Instant>) -> Self {
        let mut body = Self {
            inner: Some(inner),
            recorder: Some(recorder),
            deadline: deadline.map(|at| Box::pin(tokio::time::sleep_until(at))),
        };
        if body.inner.as_ref().is_some_and(Body::is_end_stream) {
            body.finish(End::Complete(None));
        }
        body
    }

    /// The deadline passed: cancel the upstream stream and end the call for the client.
    fn cut(&mut self) -> Frame<Bytes> {
        self.inner = None;
        self.finish(End::DeadlineExceeded);
        Frame::trailers(grpc::status_trailers(
            grpc::DEADLINE_EXCEEDED,
            "deadline exceeded while the upstream was answering",
        ))
    }

    fn finish(&mut self, end: End<'_>) {
        if let Some(recorder) = self.recorder.take() {
            recorder.finish(end);
        }
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref() {
                    self.finish(End::Complete(Some(trailers)));
                } else if self.inner.as_ref().is_some_and(Body::is_end_stream) {
                    self.finish(End::Complete(None));
                }
            }
            Poll::Ready(None) => self.finish(End::Complete(None)),
            // The client's request body failed and the stream was cancelled for it.
            Poll::Ready(Some(Err(error))) if error.is::<ClientAborted>() => {
                self.finish(End::Abandoned)
            }
            Poll::Ready(Some(Err(error))) => self.finish(End::Failed(body_error_kind(error))),
            Poll::Pending => {
                let passed = self
                    .deadline
                    .as_mut()
                    .is_some_and(|deadline| deadline.as_mut().poll(cx).is_ready());
                if passed {
                    return Poll::Ready(Some(Ok(self.cut())));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.finish(End::Abandoned);
    }
}

/// The error kind of a response body that failed: the peer broke the protocol, or the
/// connection or stream went away (a reset).
fn body_error_kind(error: &BoxError) -> ErrorKind {
    if let Some(error) = error.downcast_ref::<h2::Error>() {
        if error.is_library() && !error.is_io() {
            return ErrorKind::Protocol;
        }
    }
    if let Some(error) = error.downcast_ref::<crate::upstream::h1::H1Error>() {
        if error.is_protocol() {
            return ErrorKind::Protocol;
        }
        if error.is_stall() {
            return ErrorKind::Timeout;
        }
    }
    ErrorKind::Reset
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_bodies_are_errors_by_kind() {
        let io: BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(body_error_kind(&io), ErrorKind::Reset);
        let reset: BoxError = Box::new(h2::Error::from(h2::Reason::INTERNAL_ERROR));
        assert_eq!(body_error_kind(&reset), ErrorKind::Reset);
    }
}
