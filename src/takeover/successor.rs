//! SIGUSR2: this process starts its own successor, as NGINX's binary upgrade does: the
//! binary now at the path this process was started from, with this process's arguments
//! and `--takeover`. A child of the running process stays inside its systemd unit (its
//! cgroup), and only a process inside the unit may become its main process
//! (`crate::systemd`), so this is how a takeover works under systemd; from a shell,
//! `splitgate run --takeover …` does the same by hand.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Starts successors, one at a time, and reports how each one ended.
#[derive(Clone)]
pub struct Successors {
    /// This binary's path, read at start: after an upgrade the new binary is there.
    exe: PathBuf,
    /// The arguments after the program name, `--takeover` included.
    args: Vec<OsString>,
    /// The PID of a successor still starting, so a second SIGUSR2 starts no second one.
    starting: Arc<Mutex<Option<u32>>>,
    /// Set once a successor has taken over: its later exit is its own business.
    handed_over: Arc<AtomicBool>,
}

impl Successors {
    /// Reads this process's path and arguments; call it before an upgrade replaces the
    /// binary (at start).
    pub fn of_this_process() -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut args: Vec<OsString> = std::env::args_os().skip(1).collect();
        if !args.iter().any(|arg| arg == "--takeover") {
            args.push("--takeover".into());
        }
        Ok(Self {
            exe,
            args,
            starting: Arc::default(),
            handed_over: Arc::default(),
        })
    }

    /// Marks the takeover done (this process now drains).
    pub fn handed_over(&self) {
        self.handed_over.store(true, Ordering::Relaxed);
    }

    /// Starts a successor unless one is starting already. Its log goes where this
    /// process's goes; if it exits before taking over (a bad new binary or config),
    /// this process says so and serves on.
    pub fn start(&self) {
        let mut starting = self.starting.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pid) = *starting {
            tracing::warn!(
                pid,
                "SIGUSR2 ignored: a successor is already starting; send it again once that one has taken over or exited"
            );
            return;
        }
        let spawned = tokio::process::Command::new(&self.exe)
            .args(&self.args)
            .stdin(std::process::Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(error) => {
                tracing::error!(exe = %self.exe.display(), %error, "SIGUSR2: cannot start a successor; this process serves on");
                return;
            }
        };
        let pid = child.id().unwrap_or_default();
        tracing::info!(pid, exe = %self.exe.display(), "SIGUSR2: started a successor to take over");
        *starting = Some(pid);
        let this = self.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            *this.starting.lock().unwrap_or_else(|e| e.into_inner()) = None;
            if this.handed_over.load(Ordering::Relaxed) {
                return;
            }
            match status {
                Ok(status) => tracing::error!(
                    pid,
                    %status,
                    "the successor exited before taking over (its log says why); this process serves on"
                ),
                Err(error) => tracing::error!(pid, %error, "lost track of the successor"),
            }
        });
    }
}
