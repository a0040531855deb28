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
use crate::takeover::Sockets;
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
    #[error(transparent)]
    Takeover(#[from] crate::takeover::TakeoverError),
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
    /// Health checks and DNS re-resolution.
    control: Vec<JoinHandle<()>>,
    /// Duplicates of the listening sockets, for a binary takeover (`takeover.rs`).
    sockets: Option<Sockets>,
    state_dir: PathBuf,
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
    start_with(settings, config_path, None).await
}

/// `start`, serving on `inherited` sockets (a binary takeover) instead of binding.
pub async fn start_with(
    settings: Settings,
    config_path: Option<PathBuf>,
    inherited: Option<Sockets>,
) -> Result<Running, StartError> {
    let token = admin_token(&settings);
    check_admin_exposure(&settings, token.as_deref())?;
    let listen = (settings.server.listen, settings.admin.listen);
    let tls_settings = settings.server.tls.clone();
    let pin = settings.server.pin_workers;
    // Every inherited socket is served: one left unserved would reset the
    // connections in its accept queue when the old process exits.
    let worker_count = settings
        .server
        .workers
        .max(inherited.as_ref().map_or(0, |s| s.proxy.len()));
    let mut settings = settings;
    settings.server.workers = worker_count;
    // Caps are split over the workers, each at least 1: say so where that exceeds one.
    for upstream in settings.upstreams.values() {
        if upstream.max_connections_per_instance < worker_count {
            tracing::warn!(
                upstream = %upstream.name,
                cap = upstream.max_connections_per_instance,
                workers = worker_count,
                "max_connections_per_instance is below the number of workers: each worker still opens up to one connection per instance"
            );
        }
    }
    let limits = Limits::per_worker(&settings.server);
    let state_dir = settings.state_dir.clone();
    if let Some(inherited) = &inherited {
        check_inherited(&settings, inherited, token.as_deref())?;
    }
    // State first: a second splitgate on the same state.dir is told so (with the
    // holder's PID), rather than about a port the first one holds.
    let fleet_settings = settings.fleet.clone();
    let state = state::start(settings, config_path).await?;
    if let Some(fleet_settings) = fleet_settings {
        crate::fleet::Fleet::start(fleet_settings, &state);
    }
    let tls_listen = tls_settings.as_ref().map(|t| t.listen);
    let listeners = match inherited {
        Some(sockets) => adopt(sockets, tls_listen, worker_count),
        None => bind_all(listen, tls_listen, worker_count),
    };
    let sockets = match listeners {
        Ok(sockets) => sockets,
        Err(error) => {
            if let Some(fleet) = state.shared.fleet.get() {
                fleet.stop().await;
            }
            state.stop().await;
            return Err(error);
        }
    };
    // Kept to hand over to a successor; without a duplicate there is nothing to hand.
    let handover = sockets.duplicate().ok();
    let admin_listener =
        TcpListener::from_std(sockets.admin).map_err(bind_error("admin.listen", listen.1))?;
    let proxy_sockets = sockets.proxy;
    let tls_sockets = Some(sockets.tls).filter(|t| !t.is_empty());
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
    // `resolve = "ttl"` names the config's load could not look up: asked before the
    // first request (a round trip to the writer then sees the answers applied).
    crate::upstream::discovery::prime(&state, std::time::Duration::from_secs(5)).await;
    let _ = state.saved().await;
    let (shutdown, stop) = watch::channel(false);
    let (stop_admin, admin_stop) = watch::channel(false);
    let workers = crate::worker::start(state.shared.clone(), assignments, limits, pin, stop)
        .map_err(StartError::Workers)?;
    let admin = tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(Admin {
            state: state.clone(),
            token,
        }),
        admin_stop.clone(),
    ));
    // Health checks and DNS go on through a drain: requests still in flight use them.
    let control = vec![
        tokio::spawn(crate::upstream::checker::run(
            state.clone(),
            admin_stop.clone(),
        )),
        tokio::spawn(crate::upstream::discovery::run(
            state.clone(),
            admin_stop.clone(),
        )),
    ];
    let guard = tokio::spawn(crate::slo::guard::run(state.clone(), admin_stop));
    tracing::info!(
        proxy = %proxy_addr,
        https = tls_addr.map(tracing::field::display),
        admin = %admin_addr,
        workers = worker_count,
        version = env!("CARGO_PKG_VERSION"),
        pid = std::process::id(),
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
        control,
        sockets: handover,
        state_dir,
    })
}

fn bind_error(field: &'static str, addr: SocketAddr) -> impl Fn(std::io::Error) -> StartError {
    move |source| StartError::Bind {
        field,
        addr,
        source,
    }
}

/// The workers' proxy (and HTTPS) sockets, one per worker each, and the admin listener.
fn bind_all(
    (proxy, admin): (SocketAddr, SocketAddr),
    tls: Option<SocketAddr>,
    workers: usize,
) -> Result<Sockets, StartError> {
    let group =
        |field, addr| crate::worker::bind_group(addr, workers).map_err(bind_error(field, addr));
    Ok(Sockets {
        proxy: group("server.listen", proxy)?,
        tls: match tls {
            Some(addr) => group("server.tls.listen", addr)?,
            None => Vec::new(),
        },
        admin: crate::server::listener::bind(admin)
            .and_then(TcpListener::into_std)
            .map_err(bind_error("admin.listen", admin))?,
    })
}

/// A successor serves where its predecessor listened: say so where the config names
/// other addresses, and refuse an admin socket reachable from the network without a
/// token, whatever the config says.
fn check_inherited(
    settings: &Settings,
    inherited: &Sockets,
    token: Option<&str>,
) -> Result<(), StartError> {
    let admin = inherited
        .admin
        .local_addr()
        .map_err(bind_error("admin.listen", settings.admin.listen))?;
    let mut actual = settings.clone();
    actual.admin.listen = admin;
    check_admin_exposure(&actual, token)?;
    let proxy = inherited.proxy.first().and_then(|s| s.local_addr().ok());
    for (field, configured, serving) in [
        ("server.listen", settings.server.listen, proxy),
        ("admin.listen", settings.admin.listen, Some(admin)),
    ] {
        if serving.is_some_and(|serving| serving != configured && configured.port() != 0) {
            tracing::warn!(
                field,
                %configured,
                serving = serving.map(tracing::field::display),
                "taken over: serving on the predecessor's address, not the configured one (restart to move)"
            );
        }
    }
    Ok(())
}

/// Sockets inherited in a takeover, completed for `workers` workers: where the
/// predecessor had fewer workers (or no HTTPS), more sockets are bound beside its
/// with `SO_REUSEPORT`.
fn adopt(
    mut sockets: Sockets,
    tls: Option<SocketAddr>,
    workers: usize,
) -> Result<Sockets, StartError> {
    let complete = |group: &mut Vec<std::net::TcpListener>, field, fallback: SocketAddr| {
        let addr = match group.first() {
            Some(first) => first.local_addr().map_err(bind_error(field, fallback))?,
            None => fallback,
        };
        if group.is_empty() {
            *group = crate::worker::bind_group(addr, workers).map_err(bind_error(field, addr))?;
        }
        while group.len() < workers {
            group.push(crate::worker::bind_one(addr).map_err(bind_error(field, addr))?);
        }
        Ok::<_, StartError>(())
    };
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    complete(&mut sockets.proxy, "server.listen", any)?;
    match tls {
        Some(addr) => complete(&mut sockets.tls, "server.tls.listen", addr)?,
        None if !sockets.tls.is_empty() => {
            tracing::warn!(
                "the predecessor served HTTPS and this config does not: its HTTPS listener closes"
            );
            sockets.tls.clear();
        }
        None => {}
    }
    for socket in sockets
        .proxy
        .iter()
        .chain(&sockets.tls)
        .chain([&sockets.admin])
    {
        socket
            .set_nonblocking(true)
            .map_err(bind_error("server.listen", any))?;
    }
    Ok(sockets)
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
    pub async fn shutdown(mut self) -> bool {
        self.state.shared.draining.store(true, Ordering::Relaxed);
        // The listening sockets close with the workers' listeners: new connections are
        // refused from now on, not queued where nobody will accept them.
        drop(self.sockets.take());
        let _ = self.shutdown.send(true);
        let drained = self.workers.drained().await;
        let _ = self.stop_admin.send(true);
        let _ = self.admin.await;
        let _ = self.guard.await;
        for task in self.control.drain(..) {
            let _ = task.await;
        }
        if let Some(fleet) = self.state.shared.fleet.get() {
            fleet.stop().await;
        }
        self.state.stop().await;
        drained
    }
}

/// Serves until SIGTERM or SIGINT (reloading on SIGHUP), or until a new binary takes
/// over (`takeover.rs`; SIGUSR2 starts one). With `takeover`, first takes over from the
/// running process.
pub async fn run(
    settings: Settings,
    config_path: PathBuf,
    takeover: bool,
) -> Result<(), StartError> {
    // Handlers first: a SIGHUP that arrives once "serving" is logged must reload, not
    // take the default action and end the process.
    let mut signals = Signals::install()?;
    // Before anything can replace the binary at this path.
    let successors = crate::takeover::Successors::of_this_process()
        .map_err(|error| tracing::warn!(%error, "SIGUSR2 cannot start a successor"))
        .ok();
    let (inherited, ready) = if takeover {
        let state_dir = settings.state_dir.clone();
        let (sockets, ready) =
            tokio::task::spawn_blocking(move || crate::takeover::request(&state_dir))
                .await
                .map_err(|e| crate::takeover::TakeoverError::Exchange(e.to_string()))??;
        (Some(sockets), Some(ready))
    } else {
        (None, None)
    };
    let mut running = start_with(settings, Some(config_path), inherited).await?;
    if let Some(ready) = ready {
        // Serving already: a predecessor gone before hearing it changes nothing here.
        match tokio::task::spawn_blocking(move || ready.send()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "the predecessor did not hear that this process is ready")
            }
            Err(error) => {
                tracing::warn!(%error, "the predecessor did not hear that this process is ready")
            }
        }
    }
    // Listen for a successor (a binary takeover), with duplicates of the sockets.
    let admit = {
        let successors = successors.clone();
        move |pid| successors.as_ref().map_or(Ok(()), |s| s.admit(pid))
    };
    let control = running.sockets.take().and_then(|sockets| {
        crate::takeover::listen(&running.state_dir, sockets, running.state.clone(), admit)
            .map_err(|error| tracing::warn!(%error, "no control socket: binary takeover is off"))
            .ok()
    });
    if !takeover {
        // Once a SIGUSR2 could find the control socket bound.
        crate::systemd::ready();
    }
    // A SIGUSR2 that came while starting (`systemctl kill` without `--kill-who=main`
    // reaches a starting successor too) asked the predecessor, not this process.
    signals.forget_early_upgrades().await;
    let (socket_file, successor) = match control {
        Some((file, successor)) => (Some(file), Some(successor)),
        None => (None, None),
    };
    let taken_over = async {
        match successor {
            Some(successor) => successor.await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = signals.wait(&running.state, successors.as_ref()) => {
            tracing::info!("shutting down: draining in-flight requests");
            crate::systemd::stopping();
            if let Some(successors) = &successors {
                successors.draining();
            }
            // The control socket goes, and with it the sockets it would hand over.
            if let Some(file) = &socket_file {
                file.remove();
            }
        }
        pid = taken_over => {
            tracing::info!(successor = pid, "a new splitgate took over: draining in-flight requests");
            // Before this process exits, so systemd finds the unit still running.
            crate::systemd::main_process_is(pid);
            if let Some(successors) = &successors {
                successors.handed_over(pid);
            }
            // The successor answers the admin API from now on.
            let _ = running.stop_admin.send(true);
        }
    }
    // A reload or upgrade asked of this process now (systemd may not have moved the
    // unit's main process yet) would be lost without a word.
    tokio::spawn(async move { signals.refuse_while_draining().await });
    if running.shutdown().await {
        tracing::info!("drained; bye");
    } else {
        tracing::warn!("drain deadline passed with requests still in flight");
    }
    Ok(())
}

impl crate::takeover::StateDir for StateHandle {
    async fn release(&self) -> Result<(), String> {
        StateHandle::release(self).await.map_err(|e| e.to_string())
    }

    async fn resume(&self) -> Result<(), String> {
        StateHandle::resume(self).await.map_err(|e| e.to_string())
    }
}

/// SIGTERM and SIGINT drain; SIGHUP reloads; SIGUSR2 starts a successor.
#[cfg(unix)]
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr2: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn install() -> Result<Self, StartError> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate()).map_err(StartError::Signals)?,
            int: signal(SignalKind::interrupt()).map_err(StartError::Signals)?,
            hup: signal(SignalKind::hangup()).map_err(StartError::Signals)?,
            usr2: signal(SignalKind::user_defined2()).map_err(StartError::Signals)?,
        })
    }

    /// Logs, for as long as this process drains, each SIGHUP and SIGUSR2 it no longer
    /// acts on.
    async fn refuse_while_draining(&mut self) {
        loop {
            let signal = tokio::select! {
                _ = self.hup.recv() => "SIGHUP",
                _ = self.usr2.recv() => "SIGUSR2",
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            };
            tracing::warn!(
                signal,
                "ignored: this process is draining (after a takeover, send it to the new process)"
            );
        }
    }

    /// Drops the SIGUSR2s received so far.
    async fn forget_early_upgrades(&mut self) {
        while tokio::time::timeout(std::time::Duration::ZERO, self.usr2.recv())
            .await
            .is_ok()
        {
            tracing::warn!("SIGUSR2 received while starting: ignored");
        }
    }

    /// Returns on SIGTERM or SIGINT, reloading on each SIGHUP and starting a successor
    /// on each SIGUSR2 meanwhile.
    async fn wait(
        &mut self,
        state: &StateHandle,
        successors: Option<&crate::takeover::Successors>,
    ) {
        loop {
            tokio::select! {
                _ = self.term.recv() => return,
                _ = self.int.recv() => return,
                _ = self.usr2.recv() => match successors {
                    Some(successors) => successors.start(),
                    None => tracing::warn!("SIGUSR2 ignored: this process cannot start a successor (see the start log)"),
                },
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

    async fn forget_early_upgrades(&mut self) {}

    async fn refuse_while_draining(&mut self) {
        std::future::pending::<()>().await
    }

    async fn wait(
        &mut self,
        _state: &StateHandle,
        _successors: Option<&crate::takeover::Successors>,
    ) {
        let _ = tokio::signal::ctrl_c().await;
    }
}
