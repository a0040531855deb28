//! Tells systemd (`Type=notify`) where the service stands: ready, stopping, or (after a
//! takeover) that the unit's main process is now the successor. Without `NOTIFY_SOCKET`
//! (not started by systemd) every call does nothing.

/// Serving: `systemctl start` returns, dependants start.
pub fn ready() {
    #[cfg(target_os = "linux")]
    send(&[sd_notify::NotifyState::Ready]);
}

/// A successor took over: from now on systemd watches it, and this process's exit
/// does not stop the unit. The main process says it (so the unit keeps the default
/// `NotifyAccess=main`); from an unprivileged process systemd accepts only a PID inside
/// the unit, which a successor started by SIGUSR2 is (`takeover::successor`), and
/// under systemd no other may take over (`Successors::admit`).
pub fn main_process_is(pid: u32) {
    #[cfg(target_os = "linux")]
    send(&[sd_notify::NotifyState::MainPid(pid)]);
}

/// Draining for a stop.
pub fn stopping() {
    #[cfg(target_os = "linux")]
    send(&[sd_notify::NotifyState::Stopping]);
}

#[cfg(target_os = "linux")]
fn send(states: &[sd_notify::NotifyState]) {
    if let Err(error) = sd_notify::notify(states) {
        tracing::warn!(%error, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}
