//! Upstream pools: the instances of one named upstream, round-robin selection, and
//! pooled keep-alive HTTP/1.1 connections per instance.

pub mod body;
pub mod health;
pub mod pool;
pub mod tls;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use std::net::SocketAddr;

use http::header::UPGRADE;
use http::{Request, Response};

pub use body::UpstreamBody;
pub use pool::{Pool, PooledBody};

use crate::config::UpstreamSpec;

/// What went wrong talking to an upstream. `kind()` is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("connect failed: {0}")]
    Connect(std::io::Error),
    #[error("connect timed out")]
    ConnectTimeout,
    /// Every connection to the instance stayed busy (at `max_connections_per_instance`)
    /// for the whole queue timeout: the proxy's own limit, not the instance's fault.
    #[error("no connection came free within the queue timeout (instance at its connection cap)")]
    QueueTimeout,
    #[error("no response head within the response timeout")]
    ResponseTimeout,
    #[error("connection closed or reset before the response: {0}")]
    Reset(hyper::Error),
    #[error("upstream broke HTTP: {0}")]
    Protocol(hyper::Error),
    /// The client's body failed (stalled past its timeout, or the client went away);
    /// not the upstream's fault.
    #[error("client body failed: {0}")]
    ClientBody(hyper::Error),
    #[error("upstream response framing is ambiguous: {0}")]
    Ambiguous(&'static str),
}

impl UpstreamError {
    /// Sorts hyper's errors into reset (the peer went away) and protocol (it spoke badly).
    pub fn from_hyper(error: hyper::Error) -> Self {
        if error.is_user() {
            return UpstreamError::ClientBody(error);
        }
        let reset = error.is_incomplete_message()
            || error.is_canceled()
            || error.is_closed()
            || std::error::Error::source(&error)
                .and_then(|s| s.downcast_ref::<std::io::Error>())
                .is_some();
        if reset {
            UpstreamError::Reset(error)
        } else {
            UpstreamError::Protocol(error)
        }
    }

    /// The `kind` label of `splitgate_upstream_errors_total`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            UpstreamError::Connect(_) => ErrorKind::Connect,
            UpstreamError::ConnectTimeout
            | UpstreamError::QueueTimeout
            | UpstreamError::ResponseTimeout => ErrorKind::Timeout,
            UpstreamError::Reset(_) | UpstreamError::ClientBody(_) => ErrorKind::Reset,
            UpstreamError::Protocol(_) | UpstreamError::Ambiguous(_) => ErrorKind::Protocol,
        }
    }
}

/// Bounded label values for upstream errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    Connect = 0,
    Timeout = 1,
    Reset = 2,
    Protocol = 3,
}

impl ErrorKind {
    pub const ALL: [ErrorKind; 4] = [
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Reset,
        ErrorKind::Protocol,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Reset => "reset",
            ErrorKind::Protocol => "protocol",
        }
    }
}

/// Instances a request may try when connects fail (nothing sent yet). Three keep the
/// worst case (every connect timing out) bounded while one or two dead instances among
/// healthy ones never reach a user.
pub const MAX_CONNECT_TRIES: usize = 3;

/// What [`Upstream::send`] did.
pub struct Sent {
    /// The instance that answered, or failed last.
    pub instance: Arc<Pool>,
    pub result: Result<Response<PooledBody>, UpstreamError>,
    /// Refused or timed-out connects that moved the request to another instance; the
    /// last failure, when nothing answered, is in `result` instead.
    pub failed_connects: usize,
}

/// A named upstream: per worker, a connection pool for each instance and a
/// round-robin cursor. Each worker uses only its own (see `worker::index`), so
/// connections are opened, used and pooled on one thread and no lock or cursor is
/// shared between cores; an instance's health is shared, so every worker stops sending
/// to an instance any worker found dead.
pub struct Upstream {
    pub spec: UpstreamSpec,
    workers: Box<[WorkerPools]>,
}

/// One worker's view of an upstream. Aligned to its own cache lines: the cursor is
/// written on every request, by that worker only.
#[repr(align(128))]
struct WorkerPools {
    instances: Box<[Arc<Pool>]>,
    next: AtomicUsize,
}

impl Upstream {
    /// `workers` pools per instance; `max_connections_per_instance` and
    /// `max_idle_per_instance` are split evenly between them.
    pub fn new(spec: UpstreamSpec, workers: usize) -> Self {
        let workers = workers.max(1);
        let health: Vec<Arc<health::Health>> = spec
            .instances
            .iter()
            .map(|_| {
                Arc::new(health::Health::new(
                    spec.eject_after,
                    spec.eject_for,
                    spec.max_eject_for,
                ))
            })
            .collect();
        // One TLS client config per upstream, shared by its pools.
        let tls = spec.tls.as_ref().and_then(tls::UpstreamConnector::new);
        let pools = (0..workers)
            .map(|_| WorkerPools {
                instances: spec
                    .instances
                    .iter()
                    .zip(&health)
                    .map(|(&addr, health)| {
                        Arc::new(Pool::new(
                            addr,
                            // 0 idle stays 0: no pooling.
                            spec.max_idle_per_instance.div_ceil(workers),
                            crate::worker::share(spec.max_connections_per_instance, workers),
                            tls.clone(),
                            health.clone(),
                        ))
                    })
                    .collect(),
                next: AtomicUsize::new(0),
            })
            .collect();
        Self {
            spec,
            workers: pools,
        }
    }

    /// The calling worker's pools.
    fn local(&self) -> &WorkerPools {
        &self.workers[crate::worker::index() % self.workers.len()]
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The next instance in round-robin order that is not ejected; `None` when every
    /// instance is.
    pub fn pick(&self) -> Option<&Arc<Pool>> {
        self.pick_untried(&[])
    }

    /// The next instance in round-robin order, ejected or not: when every instance is
    /// ejected, trying one beats refusing everyone (Envoy's "panic mode").
    pub fn pick_any(&self) -> &Arc<Pool> {
        let local = self.local();
        let i = local.next.fetch_add(1, Ordering::Relaxed) % local.instances.len();
        &local.instances[i]
    }

    /// The calling worker's pool for each instance.
    pub fn instances(&self) -> &[Arc<Pool>] {
        &self.local().instances
    }

    /// The next available instance in round-robin order that is not in `tried`.
    fn pick_untried(&self, tried: &[SocketAddr]) -> Option<&Arc<Pool>> {
        let local = self.local();
        let start = local.next.fetch_add(1, Ordering::Relaxed);
        let n = local.instances.len();
        (0..n)
            .map(|i| &local.instances[(start + i) % n])
            .find(|instance| instance.health.is_available() && !tried.contains(&instance.addr()))
    }

    /// Sends a request, starting with `instance`: the connect (when no pooled
    /// connection is free) and the wait for the response head are each bounded by
    /// their timeout. A refused or timed-out connect sent nothing, so the request moves
    /// to another instance (any method), up to [`MAX_CONNECT_TRIES`] instances in all.
    /// Returns the instance that answered (or failed last) and the connect failures
    /// that moved the request on.
    pub async fn send(&self, mut instance: Arc<Pool>, request: Request<UpstreamBody>) -> Sent {
        let timeouts = self.spec.timeouts;
        let upgrade = request.headers().contains_key(UPGRADE);
        let mut tried = Vec::new();
        let connection = loop {
            match instance.connection(upgrade, timeouts).await {
                Ok(connection) => break connection,
                Err(error @ (UpstreamError::Connect(_) | UpstreamError::ConnectTimeout)) => {
                    instance.health.failure(instance.addr());
                    tried.push(instance.addr());
                    let next = (tried.len() < MAX_CONNECT_TRIES)
                        .then(|| self.pick_untried(&tried).cloned())
                        .flatten();
                    let Some(next) = next else {
                        tried.pop();
                        return Sent {
                            instance,
                            result: Err(error),
                            failed_connects: tried.len(),
                        };
                    };
                    tracing::debug!(
                        upstream = self.name(),
                        failed = %instance.addr(),
                        next = %next.addr(),
                        %error,
                        "connect failed; trying another instance"
                    );
                    instance = next;
                }
                Err(error) => {
                    return Sent {
                        instance,
                        result: Err(error),
                        failed_connects: tried.len(),
                    }
                }
            }
        };
        let result = instance.send_on(connection, request, timeouts).await;
        match &result {
            Ok(_) => instance.health.success(),
            // Neither the client's body nor our own connection cap says anything
            // about the instance's health.
            Err(UpstreamError::ClientBody(_) | UpstreamError::QueueTimeout) => {}
            Err(_) => instance.health.failure(instance.addr()),
        }
        Sent {
            instance,
            result,
            failed_connects: tried.len(),
        }
    }
}
