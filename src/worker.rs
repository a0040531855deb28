//! The data plane's threads. Each worker is an OS thread running a current-thread
//! tokio runtime with its own listening sockets (`SO_REUSEPORT` on Linux: the kernel
//! spreads new connections over the workers' sockets) and its own upstream connection
//! pools (see `upstream::Upstream`). A connection is accepted, proxied and answered on
//! one thread: no work stealing, no cross-core wake-ups, no pool lock another core
//! contends for. The control plane (admin API, state writer, SLO guard) runs on the
//! runtime that called [`start`].
//!
//! Envoy's threading model is the reference: a main thread for admin and stats,
//! workers that own their listeners and connection pools.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpSocket;
use tokio::sync::{oneshot, watch};

use crate::server::listener::{Limits, Tls, BACKLOG};
use crate::state::{Shared, Snapshot};

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
    /// This thread's copy of the current snapshot: the `Shared` it came from (by id),
    /// its generation, the copy.
    static SNAPSHOT: RefCell<Option<(u64, u64, Arc<Local>)>> = const { RefCell::new(None) };
}

/// A worker's own handle on a snapshot. Requests clone this `Arc`, whose count lives
/// on a cache line only its worker writes, instead of the shared snapshot's (which
/// every worker would otherwise write on every request).
pub struct Local(Arc<Snapshot>);

impl std::ops::Deref for Local {
    type Target = Snapshot;

    fn deref(&self) -> &Snapshot {
        &self.0
    }
}

/// How often an idle worker lets go of a snapshot the writer has replaced (and with
/// it the old upstream pools and their idle connections).
const SNAPSHOT_SWEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// Drops this thread's cached snapshot if the writer has published a newer one.
fn sweep_snapshot(shared: &Shared) {
    let generation = shared.generation.load(Ordering::Acquire);
    SNAPSHOT.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached
            .as_ref()
            .is_some_and(|(owner, seen, _)| *owner == shared.id && *seen != generation)
        {
            *cached = None;
        }
    });
}

/// The current snapshot for a request on this thread: the cached copy while the
/// writer's generation has not moved, else a fresh load. A change the writer has
/// published is seen by the next request on every worker.
pub fn snapshot(shared: &Arc<Shared>) -> Arc<Local> {
    let key = shared.id;
    let generation = shared.generation.load(Ordering::Acquire);
    SNAPSHOT.with(|cell| {
        let mut cached = cell.borrow_mut();
        match cached.as_ref() {
            Some((owner, seen, local)) if *owner == key && *seen == generation => local.clone(),
            _ => {
                let local = Arc::new(Local(shared.snapshot.load_full()));
                *cached = Some((key, generation, local.clone()));
                local
            }
        }
    })
}

/// One worker's share of a limit that is a total across `workers`: split evenly,
/// rounded up, and never 0 (so a limit below the worker count allows one per worker).
pub fn share(limit: usize, workers: usize) -> usize {
    limit.div_ceil(workers.max(1)).max(1)
}

/// The calling thread's worker index (0 on any thread that is not a worker, such as
/// the control thread or a test's runtime).
pub fn index() -> usize {
    INDEX.with(Cell::get)
}

/// One listening socket per worker on `addr`. The first binds (resolving port 0); on
/// Linux the others bind the same port with `SO_REUSEPORT`, so the kernel balances new
/// connections over them; elsewhere they share the first socket.
pub fn bind_group(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let first = bind_one(addr)?;
    let bound = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..count.max(1) {
        sockets.push(if cfg!(target_os = "linux") {
            bind_one(bound)?
        } else {
            sockets[0].try_clone()?
        });
    }
    Ok(sockets)
}

/// A listening socket with address reuse, `SO_REUSEPORT` (Linux) and a long accept
/// queue, not yet registered with any runtime.
pub fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    #[cfg(target_os = "linux")]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)?.into_std()
}

/// What one worker serves.
pub struct Assignment {
    pub plain: std::net::TcpListener,
    /// The HTTPS listener's socket and acceptor, when `[server.tls]` is set.
    pub tls: Option<(std::net::TcpListener, Tls)>,
}

/// The running workers.
pub struct Workers {
    /// One per worker: whether its connections all finished within the drain timeout.
    drained: Vec<oneshot::Receiver<bool>>,
}

/// Starts one worker thread per assignment, and returns once each has taken its
/// listeners (a worker that cannot would leave its socket's share of connections
/// queued with nobody accepting: that fails the start instead). Each serves until
/// `shutdown` turns true, then drains its connections under `limits.drain_timeout`.
pub fn start(
    shared: Arc<Shared>,
    assignments: Vec<Assignment>,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) -> io::Result<Workers> {
    let mut drained = Vec::with_capacity(assignments.len());
    let (started, confirmations) = std::sync::mpsc::channel::<io::Result<()>>();
    for (index, assignment) in assignments.into_iter().enumerate() {
        let (done, finished) = oneshot::channel();
        let (shared, limits, shutdown) = (shared.clone(), limits.clone(), shutdown.clone());
        let started = started.clone();
        std::thread::Builder::new()
            .name(format!("splitgate-worker-{index}"))
            .spawn(move || {
                INDEX.with(|cell| cell.set(index));
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        let _ = started.send(Err(error));
                        let _ = done.send(false);
                        return;
                    }
                };
                let all = runtime.block_on(async move {
                    let listeners = match take(assignment) {
                        Ok(listeners) => listeners,
                        Err(error) => {
                            let _ = started.send(Err(error));
                            return false;
                        }
                    };
                    let _ = started.send(Ok(()));
                    serve(shared, listeners, limits, shutdown).await
                });
                let _ = done.send(all);
            })?;
        drained.push(finished);
    }
    drop(started);
    for confirmation in confirmations.iter().take(drained.len()) {
        confirmation?;
    }
    Ok(Workers { drained })
}

/// A worker's listeners, registered with its runtime.
struct Listeners {
    plain: tokio::net::TcpListener,
    https: Option<(tokio::net::TcpListener, Tls)>,
}

fn take(assignment: Assignment) -> io::Result<Listeners> {
    Ok(Listeners {
        plain: tokio::net::TcpListener::from_std(assignment.plain)?,
        https: match assignment.tls {
            Some((socket, tls)) => Some((tokio::net::TcpListener::from_std(socket)?, tls)),
            None => None,
        },
    })
}

/// One worker's listeners, until shutdown and drain.
async fn serve(
    shared: Arc<Shared>,
    listeners: Listeners,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) -> bool {
    let Listeners { plain, https } = listeners;
    let sweeper = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SNAPSHOT_SWEEP);
            loop {
                tick.tick().await;
                sweep_snapshot(&shared);
            }
        })
    };
    let plain = crate::server::serve(
        plain,
        shared.clone(),
        None,
        limits.clone(),
        shutdown.clone(),
    );
    let drained = match https {
        None => plain.await,
        Some((listener, tls)) => {
            let https = crate::server::serve(listener, shared, Some(tls), limits, shutdown);
            let (plain, https) = tokio::join!(plain, https);
            plain && https
        }
    };
    sweeper.abort();
    drained
}

impl Workers {
    /// Waits for every worker to finish its drain; whether all drained in time.
    pub async fn drained(self) -> bool {
        let mut all = true;
        for worker in self.drained {
            all &= worker.await.unwrap_or(false);
        }
        all
    }
}
