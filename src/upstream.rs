//! Upstream pools: the instances of one named upstream, their state and health,
//! round-robin selection, and pooled keep-alive HTTP/1.1 connections per instance.

pub mod body;
pub mod checker;
pub mod discovery;
pub mod h1;
pub mod h2;
pub mod health;
pub mod instance;
pub mod pool;
pub mod tls;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::header::UPGRADE;
use http::{Request, Response};

pub use body::{BoxError, UpstreamBody};
pub use instance::{Checked, Instance, InstanceState};
pub use pool::{InFlight, Pool, PooledBody};

use health::EjectPolicy;

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
    /// The gRPC caller's own deadline (`grpc-timeout`) ran out before the response head.
    #[error("the caller's grpc-timeout ran out before the response head")]
    DeadlineExceeded,
    #[error("connection closed or reset before the response: {0}")]
    Reset(BoxError),
    #[error("upstream broke HTTP: {0}")]
    Protocol(BoxError),
    /// The client's body failed (stalled past its timeout, or the client went away);
    /// not the upstream's fault.
    #[error("client body failed: {0}")]
    ClientBody(BoxError),
    #[error("upstream response framing is ambiguous: {0}")]
    Ambiguous(&'static str),
    /// The connection this request waited for (another request was opening it) could
    /// not be opened: the request moves on, and the failure is that request's to count.
    #[error("the connection this request waited for could not be opened")]
    OpenFailed,
    /// An upgrade (WebSocket) to an instance spoken to in HTTP/2, which has none.
    #[error("upgrades (WebSocket) need HTTP/1.1 to the instance, and this upstream speaks HTTP/2")]
    UpgradeOverH2,
    /// An `auto` instance's ALPN picked the other protocol: nothing was sent, and the
    /// request goes again the other way. Never leaves `Upstream::send`.
    #[error("the instance picked another protocol")]
    ProtocolSwitched,
    /// A gRPC call to an instance that speaks only HTTP/1.1 (gRPC needs HTTP/2).
    #[error("gRPC needs HTTP/2, and this instance speaks HTTP/1.1 (set the upstream's protocol to \"h2c\", \"h2\" or \"auto\")")]
    Http1Only,
}

impl UpstreamError {
    /// Sorts h2's errors into reset and protocol: the peer resetting the stream, going away or
    /// dropping the connection is a reset; h2 finding the peer broke the protocol (a
    /// malformed frame, an oversized header list) is a protocol error.
    pub fn from_h2(error: ::h2::Error) -> Self {
        if error.is_library() && !error.is_io() {
            UpstreamError::Protocol(Box::new(error))
        } else {
            UpstreamError::Reset(Box::new(error))
        }
    }

    /// Whether the failure says something about the instance (its health, and the
    /// canary's evidence), rather than the client, the caller's own deadline, the
    /// proxy's connection cap, or a request its protocol cannot carry (gRPC to an
    /// HTTP/1.1 instance, an upgrade to an HTTP/2 one: a client could send those at
    /// will).
    pub fn is_the_instances(&self) -> bool {
        !self.is_unsuitable()
            && !matches!(
                self,
                UpstreamError::ClientBody(_)
                    | UpstreamError::QueueTimeout
                    | UpstreamError::DeadlineExceeded
                    | UpstreamError::OpenFailed
            )
    }

    /// A request the instance's protocol cannot carry (gRPC to HTTP/1.1, an upgrade to
    /// HTTP/2, or an `auto` instance that kept switching): the client's to send at will.
    pub fn is_unsuitable(&self) -> bool {
        matches!(
            self,
            UpstreamError::Http1Only
                | UpstreamError::UpgradeOverH2
                | UpstreamError::ProtocolSwitched
        )
    }

    /// The `kind` label of `splitgate_upstream_errors_total`.
    pub fn kind(&self) -> ErrorKind {
        match self {
            UpstreamError::Connect(_) | UpstreamError::OpenFailed => ErrorKind::Connect,
            UpstreamError::ConnectTimeout
            | UpstreamError::QueueTimeout
            | UpstreamError::ResponseTimeout
            | UpstreamError::DeadlineExceeded => ErrorKind::Timeout,
            UpstreamError::Reset(_) | UpstreamError::ClientBody(_) => ErrorKind::Reset,
            UpstreamError::Protocol(_)
            | UpstreamError::Ambiguous(_)
            | UpstreamError::Http1Only
            | UpstreamError::UpgradeOverH2
            | UpstreamError::ProtocolSwitched => ErrorKind::Protocol,
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

/// Runs `reconcile` at start and whenever the snapshot changes (checked every 500 ms),
/// until `shutdown`: the control tasks that keep one task per upstream or instance
/// (health checks, DNS) follow the snapshot this way.
pub(crate) async fn follow_snapshot(
    state: &crate::state::StateHandle,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut reconcile: impl FnMut(&crate::state::StateHandle),
) {
    let mut seen = u64::MAX;
    loop {
        let generation = state.shared.generation.load(Ordering::Acquire);
        if generation != seen {
            seen = generation;
            reconcile(state);
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {}
            _ = crate::server::stopped(&mut shutdown) => return,
        }
    }
}

/// Instances a request may try when connects fail (nothing sent yet). Three keep the
/// worst case (every connect timing out) bounded while one or two dead instances among
/// healthy ones never reach a user.
pub const MAX_CONNECT_TRIES: usize = 3;

/// A way to send one request to an instance.
enum Connection {
    Http1(pool::Connection),
    H2(h2::StreamSlot),
}

/// A connection (HTTP/1.1) or stream (HTTP/2) for one request to `pool`, in the
/// protocol the instance speaks. gRPC needs HTTP/2 and upgrades need HTTP/1.1: either
/// the other way fails here, before anything is sent.
async fn connection(
    pool: &Arc<Pool>,
    upgrade: bool,
    grpc: bool,
    timeouts: crate::config::compile::Timeouts,
) -> Result<Connection, UpstreamError> {
    if pool.speaks_h2() {
        if upgrade {
            return Err(UpstreamError::UpgradeOverH2);
        }
        return Ok(Connection::H2(h2::stream(pool, timeouts).await?));
    }
    if grpc && pool.protocol() == crate::config::Protocol::Http1 {
        return Err(UpstreamError::Http1Only);
    }
    let connection = pool.connection(upgrade, timeouts).await?;
    if grpc {
        pool.give_back(connection);
        return Err(UpstreamError::Http1Only);
    }
    Ok(Connection::Http1(connection))
}

/// The body of an upstream's response, by the protocol it came in.
pub enum ResponseBody {
    Http1(PooledBody),
    H2(h2::H2Body),
}

impl ResponseBody {
    /// The request's in-flight mark, for an upgrade tunnel to hold until it closes.
    pub fn take_in_flight(&mut self) -> Option<InFlight> {
        match self {
            ResponseBody::Http1(body) => body.take_in_flight(),
            ResponseBody::H2(body) => body.take_in_flight(),
        }
    }

    /// The instance's side of an upgrade tunnel, after a `101 Switching Protocols`.
    pub fn take_upgraded(&mut self) -> Option<h1::Upgraded> {
        match self {
            ResponseBody::Http1(body) => body.take_upgraded(),
            ResponseBody::H2(_) => None,
        }
    }
}

impl http_body::Body for ResponseBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Http1(body) => std::pin::Pin::new(body).poll_frame(cx),
            ResponseBody::H2(body) => std::pin::Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Http1(body) => body.is_end_stream(),
            ResponseBody::H2(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            ResponseBody::Http1(body) => body.size_hint(),
            ResponseBody::H2(body) => body.size_hint(),
        }
    }
}

/// What [`Upstream::send`] did.
pub struct Sent {
    /// The instance that answered, or failed last.
    pub instance: Arc<Pool>,
    pub result: Result<Response<ResponseBody>, UpstreamError>,
    /// Refused or timed-out connects that moved the request to another instance; the
    /// last failure, when nothing answered, is in `result` instead.
    pub failed_connects: usize,
}

/// A named upstream: its instances as every worker shares them, and per worker a
/// connection pool for each and a round-robin cursor. Each worker uses only its own
/// (see `worker::index`), so connections are opened, used and pooled on one thread and
/// no lock or cursor is shared between cores; an instance's state and health are
/// shared, so every worker stops sending to an instance any worker found dead, the
/// checker found down or the operator drained.
///
/// The instance list is fixed for the life of an `Upstream`: a reload or a DNS change
/// builds a new one (see [`Upstream::build`]) that keeps the instances and pools of the
/// addresses that stay.
pub struct Upstream {
    pub spec: UpstreamSpec,
    members: Box<[Arc<Instance>]>,
    workers: Box<[WorkerPools]>,
    policy: EjectPolicy,
}

/// One worker's view of an upstream. Aligned to its own cache lines: the cursor is
/// written on every request, by that worker only.
#[repr(align(128))]
struct WorkerPools {
    instances: Box<[Arc<Pool>]>,
    next: AtomicUsize,
}

impl Upstream {
    /// The upstream as the config gives it, every instance new.
    pub fn new(spec: UpstreamSpec, workers: usize) -> Self {
        let addrs = spec.instances.clone();
        Self::build(spec, &addrs, workers, None, &BTreeMap::new(), true)
    }

    /// The upstream with instances at `addrs`: an address `previous` had keeps its
    /// instance (state, health) and, when the pool settings did not change, its pools;
    /// a new one starts in the state `states` saved for it (else ready) and, when the
    /// upstream has health checks, pending until it passes them. `workers` pools per
    /// instance; `max_connections_per_instance` and `max_idle_per_instance` are split
    /// evenly between them. `at_start`: the process is starting (see
    /// [`Instance::record_check`]).
    pub fn build(
        spec: UpstreamSpec,
        addrs: &[SocketAddr],
        workers: usize,
        previous: Option<&Upstream>,
        states: &BTreeMap<SocketAddr, InstanceState>,
        at_start: bool,
    ) -> Self {
        let workers = workers.max(1);
        let checked = match spec.health {
            Some(_) => Checked::Pending,
            None => Checked::Up,
        };
        let members: Box<[Arc<Instance>]> = addrs
            .iter()
            .map(|&addr| {
                previous
                    .and_then(|p| p.member(addr))
                    .cloned()
                    .unwrap_or_else(|| {
                        let state = states.get(&addr).copied().unwrap_or_default();
                        Arc::new(Instance::new(addr, state, checked, at_start, workers))
                    })
            })
            .collect();
        let reuse_pools =
            previous.filter(|p| p.spec.same_pools(&spec) && p.workers.len() == workers);
        // One TLS client config per upstream, shared by its pools.
        let tls = spec
            .tls
            .as_ref()
            .and_then(|t| tls::UpstreamConnector::new(t, spec.protocol));
        let pools = (0..workers)
            .map(|worker| WorkerPools {
                instances: members
                    .iter()
                    .map(|instance| {
                        let kept = reuse_pools.and_then(|p| {
                            p.workers[worker]
                                .instances
                                .iter()
                                .find(|pool| Arc::ptr_eq(&pool.instance, instance))
                        });
                        match kept {
                            Some(pool) => pool.clone(),
                            None => Arc::new(Pool::new(
                                instance.clone(),
                                // 0 idle stays 0: no pooling.
                                spec.max_idle_per_instance.div_ceil(workers),
                                crate::worker::share(spec.max_connections_per_instance, workers),
                                tls.clone(),
                                spec.protocol,
                            )),
                        }
                    })
                    .collect(),
                next: AtomicUsize::new(0),
            })
            .collect();
        Self {
            policy: EjectPolicy {
                after: spec.eject_after,
                eject_for: spec.eject_for,
                max_eject_for: spec.max_eject_for,
            },
            spec,
            members,
            workers: pools,
        }
    }

    /// Retires the instances of `self` that `next` does not have (all of them when the
    /// upstream is gone): no new requests, idle connections closed, those in flight
    /// finish (a drain for good).
    pub fn retire_missing(&self, next: Option<&Upstream>) {
        for instance in self.members.iter() {
            if next.and_then(|n| n.member(instance.addr)).is_none() {
                instance.retire();
                self.close_idle(instance.addr);
                tracing::info!(upstream = self.name(), instance = %instance.addr, "instance removed; requests in flight finish");
            }
        }
    }

    /// The instances, in the order requests rotate through them.
    pub fn members(&self) -> &[Arc<Instance>] {
        &self.members
    }

    pub fn member(&self, addr: SocketAddr) -> Option<&Arc<Instance>> {
        self.members.iter().find(|m| m.addr == addr)
    }

    /// Every worker's pool for the instance at `addr`.
    pub fn pools_of(&self, addr: SocketAddr) -> impl Iterator<Item = &Arc<Pool>> {
        self.workers
            .iter()
            .flat_map(move |w| w.instances.iter().filter(move |p| p.addr() == addr))
    }

    /// Closes every worker's idle connections to `addr`.
    pub fn close_idle(&self, addr: SocketAddr) {
        self.pools_of(addr).for_each(|pool| pool.close_idle());
    }

    /// Whether the upstream has active health checks.
    pub fn checks(&self) -> bool {
        self.spec.health.is_some()
    }

    /// The calling worker's pools.
    fn local(&self) -> &WorkerPools {
        &self.workers[crate::worker::index() % self.workers.len()]
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The next instance in round-robin order that takes requests; `None` when none
    /// does.
    pub fn pick(&self) -> Option<&Arc<Pool>> {
        self.pick_untried(&[])
    }

    /// The next instance in round-robin order that the operator has in service,
    /// ejected, failing its checks or not: when every instance is out, trying one
    /// beats refusing everyone (Envoy's "panic mode"). `None` when every instance is
    /// drained, in maintenance, or there is none.
    pub fn pick_any(&self) -> Option<&Arc<Pool>> {
        let local = self.local();
        let start = local.next.fetch_add(1, Ordering::Relaxed);
        let n = local.instances.len();
        let mut ring = (0..n).map(|i| &local.instances[(start + i) % n]);
        ring.clone()
            .find(|pool| pool.instance.in_rotation())
            // A request that read the snapshot just before its instances were replaced
            // (DNS, reload) still has the removed ones: better tried than a 503.
            .or_else(|| {
                ring.find(|pool| {
                    pool.instance.is_retired() && pool.instance.state() == InstanceState::Ready
                })
            })
    }

    /// Whether some instance in service is out because it failed (ejected or failing
    /// its checks), rather than every one drained, in maintenance or not yet checked:
    /// only the first is held against a canary.
    pub fn has_failing(&self) -> bool {
        let checks = self.checks();
        self.members.iter().any(|m| m.is_failing(checks))
    }

    /// Counts a request in flight to `instance` and only then checks that it is still
    /// in service; one drained (or removed) since it was picked is swapped for another
    /// when there is one. Counted first, checked second (both SeqCst), while the writer
    /// stores the state first and `drain --wait` reads the counts after: so the wait
    /// never sees 0 while a request is on its way to the instance.
    fn claim(&self, mut instance: Arc<Pool>) -> (Arc<Pool>, InFlight) {
        let mut in_flight = InFlight::new(&instance);
        for _ in 0..2 {
            if instance.instance.in_rotation() {
                break;
            }
            match self.pick().or_else(|| self.pick_any()) {
                Some(other) if other.instance.in_rotation() => {
                    instance = other.clone();
                    in_flight = InFlight::new(&instance);
                }
                _ => break,
            }
        }
        (instance, in_flight)
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
        let checks = self.spec.health.is_some();
        (0..n)
            .map(|i| &local.instances[(start + i) % n])
            .find(|pool| pool.instance.takes_requests(checks) && !tried.contains(&pool.addr()))
    }

    /// Sends a request, starting with `instance`: the connect (when no pooled
    /// connection or HTTP/2 stream is free) and the wait for the response head are each
    /// bounded by their timeout; `deadline`, the gRPC caller's own (`grpc-timeout`),
    /// bounds the wait for the head too when it is shorter. `grpc`: the request is a
    /// gRPC call (`grpc::is_grpc`, which the caller has already asked). A refused or timed-out
    /// connect sent nothing, so the request moves to another instance (any method), up
    /// to [`MAX_CONNECT_TRIES`] instances in all. Returns the instance that answered (or
    /// failed last) and the connect failures that moved the request on.
    pub async fn send(
        &self,
        instance: Arc<Pool>,
        request: Request<UpstreamBody>,
        grpc: bool,
        deadline: Option<std::time::Duration>,
    ) -> Sent {
        let timeouts = self.spec.timeouts;
        let upgrade = request.headers().contains_key(UPGRADE);
        let mut tried = Vec::new();
        let mut failed_connects = 0;
        let (mut instance, mut in_flight) = self.claim(instance);
        let mut switches = 0;
        let connection = loop {
            match connection(&instance, upgrade, grpc, timeouts).await {
                Ok(connection) => break connection,
                // An `auto` instance picked the other protocol; nothing was sent.
                Err(UpstreamError::ProtocolSwitched) if switches < 2 => switches += 1,
                Err(
                    error @ (UpstreamError::Connect(_)
                    | UpstreamError::ConnectTimeout
                    | UpstreamError::OpenFailed),
                ) => {
                    // Another request's failed connect is that request's to count.
                    let own = !matches!(error, UpstreamError::OpenFailed);
                    if own {
                        instance
                            .instance
                            .passive
                            .failure(instance.addr(), self.policy);
                    }
                    tried.push(instance.addr());
                    let next = (tried.len() < MAX_CONNECT_TRIES)
                        .then(|| self.pick_untried(&tried).cloned())
                        .flatten();
                    let Some(next) = next else {
                        return Sent {
                            instance,
                            result: Err(error),
                            failed_connects,
                        };
                    };
                    failed_connects += usize::from(own);
                    tracing::debug!(
                        upstream = self.name(),
                        failed = %instance.addr(),
                        next = %next.addr(),
                        %error,
                        "connect failed; trying another instance"
                    );
                    (instance, in_flight) = self.claim(next);
                }
                Err(error) => {
                    return Sent {
                        instance,
                        result: Err(error),
                        failed_connects,
                    }
                }
            }
        };
        let result = match connection {
            Connection::Http1(connection) => instance
                .send_on(connection, request, timeouts, in_flight)
                .await
                .map(|response| response.map(ResponseBody::Http1)),
            Connection::H2(stream) => {
                let (head_deadline, deadline_error): (_, fn() -> UpstreamError) = match deadline {
                    Some(deadline) if deadline < timeouts.response => {
                        (deadline, || UpstreamError::DeadlineExceeded)
                    }
                    _ => (timeouts.response, || UpstreamError::ResponseTimeout),
                };
                h2::send(
                    &instance,
                    stream,
                    request,
                    timeouts,
                    tokio::time::Instant::now() + head_deadline,
                    deadline_error,
                    in_flight,
                )
                .await
                .map(|response| response.map(ResponseBody::H2))
            }
        };
        let passive = &instance.instance.passive;
        match &result {
            Ok(_) => passive.success(),
            // Neither the client's body, our own connection cap, the caller's own
            // deadline, nor a request the instance's protocol cannot carry says
            // anything about the instance's health.
            Err(error) if !error.is_the_instances() => {}
            Err(_) => passive.failure(instance.addr(), self.policy),
        }
        Sent {
            instance,
            result,
            failed_connects,
        }
    }
}
