//! Wires the pieces: the state writer, the proxy and admin listeners, the SLO guard and
//! signal handling, and runs the shutdown sequence (not ready → stop accepting → drain
//! under a deadline → stop).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::{self, Admin};
use crate::config::Settings;
use crate::state::{self, Source, StateHandle};

/// A started splitgate.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub state: StateHandle,
    shutdown: watch::Sender<bool>,
    proxy: JoinHandle<bool>,
    admin: JoinHandle<()>,
    guard: JoinHandle<()>,
}

/// The admin token from the configured environment variable, if set and non-empty.
pub fn admin_token(settings: &Settings) -> Option<String> {
    std::env::var(&settings.admin.token_env).ok().filter(|t| !t.is_empty())
}

/// Refuses an admin listener reachable from the network without a token.
pub fn check_admin_exposure(settings: &Settings, token: Option<&str>) -> anyhow::Result<()> {
    if !settings.admin.listen.ip().is_loopback() && token.is_none() {
        anyhow::bail!(
            "admin.listen {} is not a loopback address and {} is not set: refusing to expose the admin API without a token",
            settings.admin.listen,
            settings.admin.token_env
        );
    }
    Ok(())
}

/// Binds the listeners and starts serving. `config_path` is what reloads re-read.
pub async fn start(settings: Settings, config_path: Option<PathBuf>) -> anyhow::Result<Running> {
    let token = admin_token(&settings);
    check_admin_exposure(&settings, token.as_deref())?;
    let proxy_listener = TcpListener::bind(settings.server.listen)
        .await
        .with_context(|| format!("server.listen {}", settings.server.listen))?;
    let admin_listener = TcpListener::bind(settings.admin.listen)
        .await
        .with_context(|| format!("admin.listen {}", settings.admin.listen))?;
    let state = state::start(settings, config_path).await?;
    let (shutdown, stop) = watch::channel(false);
    let proxy_addr = proxy_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let proxy = tokio::spawn(crate::server::serve(proxy_listener, state.shared.clone(), stop.clone()));
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(Admin { state: state.clone(), token }),
        stop.clone(),
    ));
    let guard = tokio::spawn(crate::slo::guard::run(state.clone(), stop));
    tracing::info!(proxy = %proxy_addr, admin = %admin_addr, "splitgate serving");
    Ok(Running { proxy_addr, admin_addr, state, shutdown, proxy, admin, guard })
}

impl Running {
    /// Drains: readiness turns false, the proxy stops accepting, in-flight requests get
    /// the drain timeout to finish. Returns whether they all did.
    pub async fn shutdown(self) -> bool {
        self.state.shared.draining.store(true, Ordering::Relaxed);
        let _ = self.shutdown.send(true);
        let drained = self.proxy.await.unwrap_or(false);
        let _ = self.admin.await;
        let _ = self.guard.await;
        drained
    }
}

/// Serves until SIGTERM or SIGINT, reloading on SIGHUP.
pub async fn run(settings: Settings, config_path: PathBuf) -> anyhow::Result<()> {
    let running = start(settings, Some(config_path)).await?;
    wait_for_signals(&running.state).await?;
    tracing::info!("shutting down: draining in-flight requests");
    if running.shutdown().await {
        tracing::info!("drained; bye");
    } else {
        tracing::warn!("drain deadline passed with requests still in flight");
    }
    Ok(())
}

#[cfg(unix)]
async fn wait_for_signals(state: &StateHandle) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = hup.recv() => {
                match state.reload(Source::Reload).await {
                    Ok(warnings) => {
                        for warning in warnings {
                            tracing::warn!("{warning}");
                        }
                    }
                    Err(error) => tracing::error!(%error, "SIGHUP reload refused; nothing changed"),
                }
            }
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signals(_state: &StateHandle) -> anyhow::Result<()> {
    tokio::signal::ctrl_c().await?;
    Ok(())
}
