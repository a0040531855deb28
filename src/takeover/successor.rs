//! SIGUSR2: this process starts its own successor, as NGINX's binary upgrade does: the
//! binary now at the path this process was started from, with this process's arguments
//! and `--takeover`. A child of the running process stays inside its systemd unit (its
//! cgroup), and only a process inside the unit can become its main process
//! (`crate::systemd`), so this is how a takeover works under systemd; from a shell,
//! `splitgate run --takeover …` does the same by hand.
//!
//! The successor is watched without being reaped once it has taken over: when this
//! process exits, the service manager inherits it, and with it the successor's exit
//! status, so a successor that dies later is seen (and restarted) like any main process.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a successor may take to start and take over before it is stopped.
const START_DEADLINE: Duration = Duration::from_secs(60);
/// After SIGTERM, how long before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How often a successor is looked at.
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// Starts successors, one at a time, and reports how each one ended.
#[derive(Clone)]
pub struct Successors {
    /// The binary to start: where this one was started from.
    exe: PathBuf,
    /// The arguments after the program name, `--takeover` included.
    args: Vec<OsString>,
    phase: Arc<Mutex<Phase>>,
    /// This process drains (for a stop, or after any takeover).
    draining: Arc<AtomicBool>,
}

#[derive(Clone, Copy, PartialEq)]
enum Phase {
    Idle,
    /// Started, not yet serving.
    Starting(u32),
    /// Serving in this process's place.
    HandedOver(u32),
}

impl Successors {
    /// Reads this process's path and arguments. systemd starts a unit with the absolute
    /// path of `ExecStart`, which is used as given (through a symbolic link, as a
    /// release-directory install has it); otherwise the binary's own path.
    pub fn of_this_process() -> std::io::Result<Self> {
        let mut args = std::env::args_os();
        let argv0 = args.next().map(PathBuf::from);
        let exe = match argv0 {
            Some(path) if path.is_absolute() => path,
            _ => {
                let exe = std::env::current_exe()?;
                // Replaced since this process started: the path it had.
                match exe.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
                    Some(path) => PathBuf::from(path),
                    None => exe,
                }
            }
        };
        let mut args: Vec<OsString> = args.collect();
        if !args.iter().any(|arg| arg == "--takeover") {
            args.push("--takeover".into());
        }
        Ok(Self {
            exe,
            args,
            phase: Arc::new(Mutex::new(Phase::Idle)),
            draining: Arc::default(),
        })
    }

    fn phase(&self) -> std::sync::MutexGuard<'_, Phase> {
        self.phase.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether process `pid` may take over. Under systemd (any unit: `INVOCATION_ID`,
    /// or the notify socket) only the successor this process started may: one started
    /// from a shell would be outside the unit, and systemd would take this process's
    /// exit for the service's end.
    pub fn admit(&self, pid: u32) -> Result<(), String> {
        let under_systemd = std::env::var_os("NOTIFY_SOCKET").is_some()
            || std::env::var_os("INVOCATION_ID").is_some();
        if !under_systemd || *self.phase() == Phase::Starting(pid) {
            return Ok(());
        }
        Err("this splitgate runs under systemd: a takeover must start inside its unit; send the running process SIGUSR2 instead (see deploy/systemd/splitgate.service)".into())
    }

    /// This process drains: a successor still starting will find no one to take over
    /// from.
    pub fn draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Marks the takeover by `pid` done (this process now drains).
    pub fn handed_over(&self, pid: u32) {
        self.draining();
        let mut phase = self.phase();
        if *phase == Phase::Starting(pid) {
            *phase = Phase::HandedOver(pid);
        }
    }

    /// Starts a successor unless one is starting already, or unless a successor could
    /// not outlive this process here. Its log goes where this process's goes.
    pub fn start(&self) {
        if let Some(why) = cannot_outlive_this_process() {
            tracing::error!("SIGUSR2 ignored: {why}");
            return;
        }
        let mut phase = self.phase();
        if let Phase::Starting(pid) | Phase::HandedOver(pid) = *phase {
            tracing::warn!(pid, "SIGUSR2 ignored: a successor has already been started");
            return;
        }
        let spawned = std::process::Command::new(&self.exe)
            .args(&self.args)
            .stdin(std::process::Stdio::null())
            .spawn();
        let pid = match spawned {
            // Dropping the handle neither kills nor reaps it: `watch` does what is due.
            Ok(child) => child.id(),
            Err(error) => {
                tracing::error!(exe = %self.exe.display(), %error, "SIGUSR2: cannot start a successor; this process serves on");
                return;
            }
        };
        tracing::info!(pid, exe = %self.exe.display(), "SIGUSR2: started a successor to take over");
        *phase = Phase::Starting(pid);
        tokio::spawn(self.clone().watch(pid));
    }

    /// Until the successor exits: one that has not taken over by [`START_DEADLINE`] is
    /// stopped; one that exits before taking over is reaped and logged, and this
    /// process serves on; one that exits after is logged and left to the service
    /// manager.
    async fn watch(self, pid: u32) {
        let started = tokio::time::Instant::now();
        let mut terminated_at = None;
        let mut every = tokio::time::interval(WATCH_EVERY);
        loop {
            every.tick().await;
            let phase = *self.phase();
            match process::exit_of(pid) {
                Some(status) if phase == Phase::HandedOver(pid) => {
                    tracing::error!(pid, %status, "the new main process exited while this one drains; the service manager sees it");
                    return;
                }
                Some(status) => {
                    process::reap(pid);
                    *self.phase() = Phase::Idle;
                    if self.draining.load(Ordering::Relaxed) {
                        tracing::warn!(pid, %status, "the successor exited without taking over; this process was draining already");
                    } else {
                        tracing::error!(pid, %status, "the successor exited before taking over (its log says why); this process serves on");
                    }
                    return;
                }
                None if phase != Phase::Starting(pid) => {}
                None => match terminated_at {
                    None if started.elapsed() >= START_DEADLINE => {
                        tracing::error!(pid, deadline = ?START_DEADLINE, "the successor has not taken over in time; stopping it");
                        process::signal(pid, process::Stop::Term);
                        terminated_at = Some(tokio::time::Instant::now());
                    }
                    Some(at) if at.elapsed() >= STOP_GRACE => {
                        process::signal(pid, process::Stop::Kill);
                    }
                    _ => {}
                },
            }
        }
    }
}

/// Why a successor would die with this process, if it would: as PID 1 (a container's
/// init) every process goes when it exits; under a systemd unit without the notify
/// socket (`Type=simple`, or this unit installed without a restart since), systemd
/// would stop the unit, successor included, when this process exits.
fn cannot_outlive_this_process() -> Option<&'static str> {
    if std::process::id() == 1 {
        return Some("this process is PID 1 (a container's init), and a successor would end with it; replace the container instead");
    }
    if std::env::var_os("INVOCATION_ID").is_some() && std::env::var_os("NOTIFY_SOCKET").is_none() {
        return Some("started by systemd without Type=notify, which would stop the unit when this process exits; install deploy/systemd/splitgate.service, run systemctl daemon-reload and restart the unit once");
    }
    None
}

/// Looking at a child without reaping it (`waitid` with `WNOWAIT`), reaping it, and
/// stopping it: only while it is unreaped is its PID sure to be this child's.
#[cfg(target_os = "linux")]
mod process {
    use rustix::process::{waitid, Pid, Signal, WaitId, WaitIdOptions, WaitOptions};

    pub enum Stop {
        Term,
        Kill,
    }

    fn pid(raw: u32) -> Option<Pid> {
        Pid::from_raw(i32::try_from(raw).ok()?)
    }

    /// How the child exited, if it has (it stays reapable).
    pub fn exit_of(raw: u32) -> Option<String> {
        let options = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT | WaitIdOptions::NOHANG;
        let status = waitid(WaitId::Pid(pid(raw)?), options).ok()??;
        Some(match (status.exit_status(), status.terminating_signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (_, Some(signal)) => format!("killed by signal {signal}"),
            _ => "ended".into(),
        })
    }

    pub fn reap(raw: u32) {
        if let Some(pid) = pid(raw) {
            let _ = rustix::process::waitpid(Some(pid), WaitOptions::NOHANG);
        }
    }

    pub fn signal(raw: u32, stop: Stop) {
        let signal = match stop {
            Stop::Term => Signal::TERM,
            Stop::Kill => Signal::KILL,
        };
        if let Some(pid) = pid(raw) {
            let _ = rustix::process::kill_process(pid, signal);
        }
    }
}

/// Elsewhere a takeover is not supported (`takeover::passing`), so neither is watching.
#[cfg(not(target_os = "linux"))]
mod process {
    pub enum Stop {
        Term,
        Kill,
    }
    pub fn exit_of(_: u32) -> Option<String> {
        Some("not supported on this system".into())
    }
    pub fn reap(_: u32) {}
    pub fn signal(_: u32, _: Stop) {}
}
