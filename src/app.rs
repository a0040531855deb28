//! Wires the pieces: the state writer, the proxy and admin listeners, the SLO guard and
//! signal handling, and runs the shutdown sequence (not ready → stop accepting → drain
//! under a deadline → stop).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use tokio_rustls::TlsAcceptor;

use crate::admin::{self, Admin};
use crate::config::Settings;
use crate::server::listener::{Limits, Tls};
use crate::state::{self, Source, StateHandle};
use crate::worker::Assignment;

/// Why splitgate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("admin.listen {listen} is not a loopback address and {token_env} is not set (or empty): refusing to expose the admin API without a token")]
    ExposedAdmin {
        listen: SocketAddr,
        token_env: String,
    },
    #[error("{field} {addr}: cannot listen: {source}")]
    Bind {
        field: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Tls(#[from] crate::server::tls::TlsError),
    #[error(transparent)]
    Restore(#[from] state::ChangeError),
    #[error("signal handling: {0}")]
    Signals(std::io::Error),
    #[error("cannot start worker threads: {0}")]
    Workers(std::io::Error),
}

/// A started splitgate.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The HTTPS listener's address, when `[server.tls]` is configured.
    pub tls_addr: Option<SocketAddr>,
    pub state: StateHandle,
    /// Stops the workers' listeners (first).
    shutdown: watch::Sender<bool>,
    /// Stops the admin API and the guard (after the drain, so `/readyz` stays answerable).
    stop_admin: watch::Sender<bool>,
    workers: crate::worker::Workers,
    admin: JoinHandle<()>,
    guard: JoinHandle<()>,
}

/// The admin token from the configured environment variable, if set and non-empty.
pub fn admin_token(settings: &Settings) -> Option<String> {
    std::env::var(&settings.admin.token_env)
        .ok()
        .filter(|t| !t.is_empty())
}

/// Refuses an admin listener reachable from the network without a token.
pub fn check_admin_exposure(settings: &Settings, token: Option<&str>) -> Result<(), StartError> {
    if !settings.admin.listen.ip().is_loopback() && token.is_none() {
        return Err(StartError::ExposedAdmin {
            listen: settings.admin.listen,
            token_env: settings.admin.token_env.clone(),
        });
    }
    Ok(())
}

/// Binds the listeners and starts serving. `config_path` is what reloads re-read.
pub async fn start(
    settings: Settings,
    config_path: Option<PathBuf>,
) -> Result<Running, StartError> {
    let token = admin_token(&settings);
    check_admin_exposure(&settings, token.as_deref())?;
    let listen = (settings.server.listen, settings.admin.listen);
    let tls_settings = settings.server.tls.clone();
    let worker_count = settings.server.workers;
    let limits = Limits::per_worker(&settings.server);
    // State first: a second splitgate on the same state.dir is told so (with the
    // holder's PID), rather than about a port the first one holds.
    let state = state::start(settings, config_path).await?;
    let listeners = bind_all(
        listen,
        tls_settings.as_ref().map(|t| t.listen),
        worker_count,
    );
    let (proxy_sockets, admin_listener, tls_sockets) = match listeners {
        Ok(listeners) => listeners,
        Err(error) => {
            state.stop().await;
            return Err(error);
        }
    };
    let proxy_addr = local_addr("server.listen", &proxy_sockets[0], listen.0)?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            field: "admin.listen",
            addr: listen.1,
            source,
        })?;
    let tls_addr = match (&tls_sockets, &tls_settings) {
        (Some(sockets), Some(tls)) => {
            Some(local_addr("server.tls.listen", &sockets[0], tls.listen)?)
        }
        _ => None,
    };
    let acceptor = match (&tls_settings, &state.shared.certificates) {
        (Some(tls), Some(certificates)) => Some(Tls {
            acceptor: TlsAcceptor::from(crate::server::tls::server_config(
                certificates.clone(),
                tls.session_resumption,
            )?),
            handshake_timeout: tls.handshake_timeout,
        }),
        _ => None,
    };
    let mut tls_sockets = tls_sockets.map(Vec::into_iter);
    let assignments = proxy_sockets
        .into_iter()
        .map(|plain| Assignment {
            plain,
            tls: tls_sockets
                .as_mut()
                .and_then(Iterator::next)
                .zip(acceptor.clone()),
        })
        .collect();
    let (shutdown, stop) = watch::channel(false);
    let (stop_admin, admin_stop) = watch::channel(false);
    let workers = crate::worker::start(state.shared.clone(), assignments, limits, stop)
        .map_err(StartError::Workers)?;
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(Admin {
            state: state.clone(),
            token,
        }),
        admin_stop.clone(),
    ));
    let guard = tokio::spawn(crate::slo::guard::run(state.clone(), admin_stop));
    tracing::info!(
        proxy = %proxy_addr,
        https = tls_addr.map(tracing::field::display),
        admin = %admin_addr,
        workers = worker_count,
        "splitgate serving"
    );
    Ok(Running {
        proxy_addr,
        admin_addr,
        tls_addr,
        state,
        shutdown,
        stop_admin,
        workers,
        admin,
        guard,
    })
}

/// Sockets bound for each worker.
type Group = Vec<std::net::TcpListener>;

/// The workers' proxy (and HTTPS) sockets, one per worker each, and the admin listener.
fn bind_all(
    (proxy, admin): (SocketAddr, SocketAddr),
    tls: Option<SocketAddr>,
    workers: usize,
) -> Result<(Group, TcpListener, Option<Group>), StartError> {
    let group = |field, addr| {
        crate::worker::bind_group(addr, workers).map_err(|source| StartError::Bind {
            field,
            addr,
            source,
        })
    };
    let proxy = group("server.listen", proxy)?;
    let admin = crate::server::listener::bind(admin).map_err(|source| StartError::Bind {
        field: "admin.listen",
        addr: admin,
        source,
    })?;
    let tls = tls
        .map(|addr| group("server.tls.listen", addr))
        .transpose()?;
    Ok((proxy, admin, tls))
}

fn local_addr(
    field: &'static str,
    listener: &std::net::TcpListener,
    addr: SocketAddr,
) -> Result<SocketAddr, StartError> {
    listener.local_addr().map_err(|source| StartError::Bind {
        field,
        addr,
        source,
    })
}

impl Running {
    /// Drains: readiness turns false, the proxy stops accepting, in-flight requests get
    /// the drain timeout to finish. Returns whether they all did.
    pub async fn shutdown(self) -> bool {
        self.state.shared.draining.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        let drained = self.workers.drained().await;
        let _ = self.stop_admin.send(true);
        let _ = self.admin.await;
        let _ = self.guard.await;
        self.state.stop().await;
        drained
    }
}

/// Serves until SIGTERM or SIGINT, reloading on SIGHUP.
pub async fn run(settings: Settings, config_path: PathBuf) -> Result<(), StartError> {
    // Handlers first: a SIGHUP that arrives once "serving" is logged must reload, not
    // take the default action and end the process.
    let signals = Signals::install()?;
    let running = start(settings, Some(config_path)).await?;
    signals.wait(&running.state).await;
    tracing::info!("shutting down: draining in-flight requests");
    if running.shutdown().await {
        tracing::info!("drained; bye");
    } else {
        tracing::warn!("drain deadline passed with requests still in flight");
    }
    Ok(())
}

/// SIGTERM and SIGINT drain; SIGHUP reloads.
#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> Result<Self, StartError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(StartError::Signals)?,
            int: signal(SignalKind::interrupt()).map_err(StartError::Signals)?,
            hup: signal(SignalKind::hangup()).map_err(StartError::Signals)?,
        })
    }

    /// Returns on SIGTERM or SIGINT, reloading on each SIGHUP meanwhile.
    async fn wait(mut self, state: &StateHandle) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.hup.recv() => match state.reload(Source::Reload).await {
                    Ok(warnings) => {
                        for warning in warnings {
                            tracing::warn!("{warning}");
                        }
                    }
                    Err(error) => tracing::error!(%error, "SIGHUP reload refused; nothing changed"),
                },
            }
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> Result<Self, StartError> {
        Ok(Self)
    }

    async fn wait(self, _state: &StateHandle) {
        let _ = tokio::signal::ctrl_c().await;
    }
}
