//! One instance's connection pool: idle HTTP/1.1 senders, checked out LIFO so the warmest
//! connection is reused. The lock is per instance and held only to push or pop.
//!
//! A sender goes back to the pool only after its response body ended cleanly (see
//! [`PooledBody`]); a connection that failed in any way is dropped, never reused.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::UpstreamBody;
use super::tls::UpstreamConnector;
use super::UpstreamError;

/// Idle connections to one upstream address.
pub struct Pool {
    addr: SocketAddr,
    max_idle: usize,
    tls: Option<UpstreamConnector>,
    idle: Mutex<Vec<SendRequest<UpstreamBody>>>,
}

impl Pool {
    pub fn new(addr: SocketAddr, max_idle: usize, tls: Option<UpstreamConnector>) -> Self {
        Self {
            addr,
            max_idle,
            tls,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Number of idle pooled connections (for tests and status).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|idle| idle.len()).unwrap_or(0)
    }

    /// Sends one request on a pooled or new connection. The response body holds the
    /// connection until it ends; then the connection returns to the pool.
    pub async fn send(
        self: &Arc<Self>,
        request: Request<UpstreamBody>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let mut sender = match self.checkout().await {
            Some(sender) => sender,
            None => self.connect(connect_timeout).await?,
        };
        let response = tokio::time::timeout(response_timeout, sender.send_request(request))
            .await
            .map_err(|_| UpstreamError::ResponseTimeout)?
            .map_err(UpstreamError::from_hyper)?;
        let (parts, body) = response.into_parts();
        let mut pooled = PooledBody {
            inner: body,
            lease: Some(Lease {
                pool: self.clone(),
                sender,
            }),
        };
        if pooled.inner.is_end_stream() {
            pooled.release();
        }
        Ok(Response::from_parts(parts, pooled))
    }

    async fn checkout(&self) -> Option<SendRequest<UpstreamBody>> {
        loop {
            let mut sender = self.idle.lock().ok()?.pop()?;
            if sender.is_closed() {
                continue;
            }
            if sender.is_ready() || sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
    }

    /// Opens a connection (TCP, then TLS when configured) within `timeout`. A failed
    /// TLS handshake or certificate verification is a connect error.
    async fn connect(&self, timeout: Duration) -> Result<SendRequest<UpstreamBody>, UpstreamError> {
        let connect = async {
            let stream = TcpStream::connect(self.addr)
                .await
                .map_err(UpstreamError::Connect)?;
            let _ = stream.set_nodelay(true);
            match &self.tls {
                None => handshake(stream).await,
                Some(tls) => {
                    let stream = tls
                        .connector
                        .connect(tls.server_name.clone(), stream)
                        .await
                        .map_err(UpstreamError::Connect)?;
                    handshake(stream).await
                }
            }
        };
        tokio::time::timeout(timeout, connect)
            .await
            .map_err(|_| UpstreamError::ConnectTimeout)?
    }

    fn put_back(&self, sender: SendRequest<UpstreamBody>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.max_idle {
                idle.push(sender);
            }
        }
    }
}

/// HTTP/1.1 over an open stream; the connection task runs until the peer or the pool
/// lets go of it.
async fn handshake<I>(io: I) -> Result<SendRequest<UpstreamBody>, UpstreamError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .handshake(TokioIo::new(io))
        .await
        .map_err(UpstreamError::from_hyper)?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// A connection on loan to one response.
struct Lease {
    pool: Arc<Pool>,
    sender: SendRequest<UpstreamBody>,
}

/// The upstream response body. It streams through unchanged; when it ends cleanly the
/// connection goes back to the pool, and when it fails or is dropped early the
/// connection is dropped with it.
pub struct PooledBody {
    inner: Incoming,
    lease: Option<Lease>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(lease) = self.lease.take() {
            lease.pool.put_back(lease.sender);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.lease = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
