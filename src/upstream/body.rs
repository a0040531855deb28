//! The body sent upstream: the client's streaming body, or nothing. An enum rather than
//! a boxed trait object, so a bodiless request allocates nothing for it.
//!
//! A client body that stops arriving for `client_body_timeout` fails with
//! [`ClientBodyTimeout`]; hyper then aborts the upstream request, and the client gets a
//! 408 (see `proxy::error`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The client sent no body bytes for the configured time.
#[derive(Debug, thiserror::Error)]
#[error("client sent no body bytes for {0:?}")]
pub struct ClientBodyTimeout(pub Duration);

/// The client's request body failed after the response head, and the stream to the
/// instance was cancelled for it: the response body's failure that follows is the
/// client's, not the instance's.
#[derive(Debug, thiserror::Error)]
#[error("the client's request body failed; the upstream stream was cancelled")]
pub struct ClientAborted;

pub enum UpstreamBody {
    Client(ClientBody),
    Empty,
}

/// The client's body with an idle timer that restarts on every frame.
pub struct ClientBody {
    inner: Incoming,
    timeout: Duration,
    /// `None` once stopped (see [`UpstreamBody::stop_idle_timer`]).
    timer: Option<Pin<Box<Sleep>>>,
}

impl ClientBody {
    pub fn new(inner: Incoming, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            timer: Some(Box::pin(tokio::time::sleep(timeout))),
        }
    }
}

impl UpstreamBody {
    /// Stops the idle timer: the body may pause for as long as it likes (a streaming
    /// gRPC call between messages, once the call is under way).
    pub fn stop_idle_timer(&mut self) {
        if let UpstreamBody::Client(body) = self {
            body.timer = None;
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let body = match self.get_mut() {
            UpstreamBody::Client(body) => body,
            UpstreamBody::Empty => return Poll::Ready(None),
        };
        match Pin::new(&mut body.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some(timer) = &mut body.timer {
                    timer.as_mut().reset(Instant::now() + body.timeout);
                }
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
            Poll::Pending => match body.timer.as_mut().map(|timer| timer.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => {
                    Poll::Ready(Some(Err(Box::new(ClientBodyTimeout(body.timeout)))))
                }
                _ => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Client(body) => body.inner.is_end_stream(),
            UpstreamBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Client(body) => body.inner.size_hint(),
            UpstreamBody::Empty => SizeHint::with_exact(0),
        }
    }
}
