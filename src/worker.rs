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

mod memory;
mod pin;
pub mod snapshot;
mod sockets;

use std::cell::Cell;
use std::io;
use std::sync::Arc;

use tokio::sync::{oneshot, watch};

use crate::server::listener::{Limits, Tls};
use crate::state::Shared;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

pub use snapshot::{snapshot, Local};
pub use sockets::{bind_group, bind_one};

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
/// With `pin`, each worker is pinned to a CPU of its own (see `pin.rs`); where that
/// cannot be done, the workers run unpinned and a warning says why.
pub fn start(
    shared: Arc<Shared>,
    assignments: Vec<Assignment>,
    limits: Limits,
    pin: bool,
    shutdown: watch::Receiver<bool>,
) -> io::Result<Workers> {
    let cpus = match pin.then(|| pin::plan(assignments.len())) {
        Some(Ok(cpus)) => Some(cpus),
        Some(Err(reason)) => {
            tracing::warn!(%reason, "pin_workers: workers run unpinned");
            None
        }
        None => None,
    };
    let mut drained = Vec::with_capacity(assignments.len());
    let (started, confirmations) = std::sync::mpsc::channel::<io::Result<()>>();
    for (index, assignment) in assignments.into_iter().enumerate() {
        let (done, finished) = oneshot::channel();
        let (shared, limits, shutdown) = (shared.clone(), limits.clone(), shutdown.clone());
        let started = started.clone();
        let cpu = cpus.as_ref().map(|cpus| cpus[index]);
        // Short enough for the kernel's 15-byte thread names, so `top -H` and
        // `/proc/PID/task/*/comm` tell the workers apart.
        std::thread::Builder::new()
            .name(format!("splitgate-w{index}"))
            .spawn(move || {
                INDEX.with(|cell| cell.set(index));
                if let Some(cpu) = cpu {
                    match pin::pin_current_thread(cpu) {
                        Ok(()) => tracing::debug!(worker = index, cpu, "worker pinned"),
                        Err(error) => {
                            tracing::warn!(worker = index, cpu, %error, "pin_workers: cannot pin this worker")
                        }
                    }
                }
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
            let mut tick = tokio::time::interval(snapshot::SNAPSHOT_SWEEP);
            loop {
                tick.tick().await;
                snapshot::sweep(&shared);
                memory::give_back_free_pages();
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
