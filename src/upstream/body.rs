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

pub enum UpstreamBody {
    Client(ClientBody),
    Empty,
}

/// The client's body with an idle timer that restarts on every frame.
pub struct ClientBody {
    inner: Incoming,
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
}

impl ClientBody {
    pub fn new(inner: Incoming, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            timer: Box::pin(tokio::time::sleep(timeout)),
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
                let deadline = Instant::now() + body.timeout;
                body.timer.as_mut().reset(deadline);
                Poll::Ready(frame.map(|f| f.map_err(BoxError::from)))
            }
            Poll::Pending => match body.timer.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    Poll::Ready(Some(Err(Box::new(ClientBodyTimeout(body.timeout)))))
                }
                Poll::Pending => Poll::Pending,
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
