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
use crate::server::listener::Tls;
use crate::state::{self, Source, StateHandle};

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
}

/// A started splitgate.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The HTTPS listener's address, when `[server.tls]` is configured.
    pub tls_addr: Option<SocketAddr>,
    pub state: StateHandle,
    /// Stops the proxy listener (first).
    shutdown: watch::Sender<bool>,
    /// Stops the admin API and the guard (after the drain, so `/readyz` stays answerable).
    stop_admin: watch::Sender<bool>,
    proxy: JoinHandle<bool>,
    proxy_tls: Option<JoinHandle<bool>>,
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
    // State first: a second splitgate on the same state.dir is told so (with the
    // holder's PID), rather than about a port the first one holds.
    let state = state::start(settings, config_path).await?;
    let listeners = bind_all(listen, tls_settings.as_ref().map(|t| t.listen));
    let (proxy_listener, admin_listener, tls_listener) = match listeners {
        Ok(listeners) => listeners,
        Err(error) => {
            state.stop().await;
            return Err(error);
        }
    };
    let proxy_addr = local_addr("server.listen", &proxy_listener, listen.0)?;
    let admin_addr = local_addr("admin.listen", &admin_listener, listen.1)?;
    let (shutdown, stop) = watch::channel(false);
    let (stop_admin, admin_stop) = watch::channel(false);
    let proxy = tokio::spawn(crate::server::serve(
        proxy_listener,
        state.shared.clone(),
        None,
        stop.clone(),
    ));
    let mut tls_addr = None;
    let proxy_tls = match (tls_listener, tls_settings, &state.shared.certificates) {
        (Some(listener), Some(tls), Some(certificates)) => {
            tls_addr = Some(local_addr("server.tls.listen", &listener, tls.listen)?);
            let config =
                crate::server::tls::server_config(certificates.clone(), tls.session_resumption)?;
            let tls = Tls {
                acceptor: TlsAcceptor::from(config),
                handshake_timeout: tls.handshake_timeout,
            };
            Some(tokio::spawn(crate::server::serve(
                listener,
                state.shared.clone(),
                Some(tls),
                stop,
            )))
        }
        _ => None,
    };
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
        "splitgate serving"
    );
    Ok(Running {
        proxy_addr,
        admin_addr,
        tls_addr,
        state,
        shutdown,
        stop_admin,
        proxy,
        proxy_tls,
        admin,
        guard,
    })
}

/// The proxy, admin and (optional) HTTPS listeners.
fn bind_all(
    (proxy, admin): (SocketAddr, SocketAddr),
    tls: Option<SocketAddr>,
) -> Result<(TcpListener, TcpListener, Option<TcpListener>), StartError> {
    let proxy = bind("server.listen", proxy)?;
    let admin = bind("admin.listen", admin)?;
    let tls = tls
        .map(|addr| bind("server.tls.listen", addr))
        .transpose()?;
    Ok((proxy, admin, tls))
}

fn bind(field: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    crate::server::listener::bind(addr).map_err(|source| StartError::Bind {
        field,
        addr,
        source,
    })
}

fn local_addr(
    field: &'static str,
    listener: &TcpListener,
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
        let mut drained = self.proxy.await.unwrap_or(false);
        if let Some(tls) = self.proxy_tls {
            drained &= tls.await.unwrap_or(false);
        }
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
