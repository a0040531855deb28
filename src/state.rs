//! The single writer of runtime state. Admin changes, reloads, SLO trips and rollout
//! steps are commands sent to one task; it applies each to the saved state, persists
//! it (before anyone is told it happened), builds a new [`Snapshot`] and swaps it in.
//! Nothing else writes, so changes are ordered and never lost to a race.

pub mod change;
pub mod merge;
pub mod snapshot;
pub mod store;
mod writer;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;

use arc_swap::ArcSwap;
use metrics::Counter;
use tokio::sync::{mpsc, oneshot};

pub use change::Change;
pub use snapshot::{LiveRoute, RolloutEnd, RolloutOutcome, RolloutProgress, Snapshot, Trip};
pub use store::{
    AuditEntry, FleetRoute, Freeze, InstanceAudit, InstanceStates, Loaded, SavedInstance,
    SavedRoute, StateDirError, Store,
};
pub use writer::start;

use crate::config::ConfigError;
use crate::server::tls::{Certificates, TlsError};
use crate::telemetry::Registry;

/// What every part of the running proxy shares.
pub struct Shared {
    /// Unique in the process: what a worker's snapshot cache is keyed by (an address
    /// could be reused once a `Shared` is gone).
    pub id: u64,
    /// The one snapshot requests read, swapped by the writer.
    pub snapshot: ArcSwap<Snapshot>,
    /// The generation of `snapshot`, stored after it: workers compare it with their
    /// cached copy's and reload only when it moved (see `worker::snapshot`), so a
    /// request reads a shared cache line but never writes one.
    pub generation: AtomicU64,
    pub registry: Registry,
    /// Set on SIGTERM; `/readyz` turns false.
    pub draining: AtomicBool,
    /// The fleet link, when `[fleet]` names a store; set once, after the writer starts.
    pub fleet: std::sync::OnceLock<Arc<crate::fleet::Fleet>>,
    /// While set, no rollout advances (`splitgate freeze on`); written by the writer.
    pub freeze: std::sync::Mutex<Option<Freeze>>,
    /// The HTTPS listener's certificates, replaced on reload.
    pub certificates: Option<Arc<Certificates>>,
    pub(crate) reloads_ok: Counter,
    pub(crate) reloads_failed: Counter,
    /// Failed writes of `state.dir` (`splitgate_state_persist_failures_total`).
    pub(crate) persist_failures: Counter,
    /// When the last write of `state.dir` failed, if no write has gone through since
    /// (unix ms; 0: none), for `/healthz?verbose=1`.
    pub last_persist_failure_ms: AtomicU64,
    /// When the process started serving, and the config file reloads re-read.
    pub started: std::time::Instant,
    pub config_path: Option<std::path::PathBuf>,
    /// The last trips applied, oldest first, at most [`RECENT_TRIPS`] per route: what
    /// the operators' page lists. Written by the writer.
    pub recent_trips: std::sync::Mutex<Vec<(String, Trip)>>,
}

/// Trips kept per route for `recent_trips`.
pub const RECENT_TRIPS: usize = 5;

impl Shared {
    /// A write of `state.dir` went through: `/healthz?verbose=1` is healthy again.
    pub(crate) fn persist_succeeded(&self) {
        self.last_persist_failure_ms
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts a failed write of `state.dir`.
    pub(crate) fn persist_failed(&self) {
        self.persist_failures.increment(1);
        self.last_persist_failure_ms.store(
            crate::timefmt::unix_ms(),
            std::sync::atomic::Ordering::Relaxed,
        );
    }
}

/// Who asked for a change; recorded in the audit log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Admin,
    /// The deploy CLI, through the admin API.
    Cli,
    Reload,
    Slo,
    Rollout,
    Start,
    /// Applied from the fleet store: another replica's change, or this one's once
    /// committed.
    Fleet,
}

impl Source {
    /// The source a fleet store's value names (see `FleetRoute::source`).
    pub fn from_name(name: &str) -> Option<Source> {
        [
            Source::Admin,
            Source::Cli,
            Source::Reload,
            Source::Slo,
            Source::Rollout,
            Source::Start,
        ]
        .into_iter()
        .find(|s| s.as_str() == name)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Admin => "admin",
            Source::Cli => "cli",
            Source::Reload => "reload",
            Source::Slo => "slo",
            Source::Rollout => "rollout",
            Source::Start => "start",
            Source::Fleet => "fleet",
        }
    }
}

/// Why a change was refused. Nothing changed when one of these comes back.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("no route named {0:?}")]
    UnknownRoute(String),
    #[error("no upstream named {0:?}")]
    UnknownUpstream(String),
    #[error("upstream {upstream:?} has no instance {addr} (it has: {known})")]
    UnknownInstance {
        upstream: String,
        addr: std::net::SocketAddr,
        known: String,
    },
    #[error("route {0:?} has no canary upstream")]
    NoCanary(String),
    #[error("route {0:?} has a rollout running ({1}); `splitgate weight --force` sets the weight by hand and aborts it, or abort it first")]
    RolloutRunning(String, String),
    #[error("route {route:?} is tripped ({reason}); reset it before raising the weight")]
    Tripped { route: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    /// Refused in the route's present state (409).
    #[error("{0}")]
    Refused(String),
    #[error("could not persist state, nothing changed: {0}")]
    Persist(std::io::Error),
    #[error("{0}")]
    Config(ConfigError),
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("no config file to reload")]
    NoConfigFile,
    #[error(transparent)]
    StateDir(#[from] StateDirError),
    #[error(
        "handing over to a new splitgate process (binary takeover): no change is accepted here"
    )]
    HandedOver,
    #[error("the state writer has stopped")]
    Stopped,
    /// With a fleet: the store cannot be reached, and the change is one that needs it.
    #[error("the fleet store (etcd) is unreachable ({0}); only rollbacks (weight 0), rollout aborts and SLO trips apply until it is back")]
    StoreUnavailable(String),
    /// With a fleet: committed to the store, applied here in memory, but not saved to
    /// `state.json` (the store has it; a restart re-reads it from there).
    #[error("committed to the fleet store at revision {revision} and applied here, but this replica could not save it: {source}")]
    NotSaved {
        revision: i64,
        source: Box<ChangeError>,
    },
    /// With a fleet: the route kept changing under this change.
    #[error("route {0:?} changed in the fleet store while this change was made; try again")]
    Conflict(String),
}

/// A rollout action from the admin API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    /// From step 1; `from_current`: from the first step at or above the live weight.
    Start {
        from_current: bool,
    },
    Pause,
    Resume,
    /// Weight 0, the rollout ended.
    Abort,
    /// Past a pause or the current hold to the next step; `full`: to the last step.
    Promote {
        full: bool,
        /// The step (1-based) the caller saw: refused if the rollout has moved on since
        /// (a promote racing the rollout's own advance must not open the next gate).
        seen: Option<usize>,
    },
    /// From step 1 again, after an abort or a trip and its reset.
    Retry,
}

pub(crate) type Reply<T> = oneshot::Sender<Result<T, ChangeError>>;

pub(crate) enum Command {
    /// A change made here. `unpublished`: with a fleet, a change that lowers exposure
    /// made while (or before) the store accepted it; the publisher pushes it later.
    Change {
        route: String,
        change: Change,
        source: Source,
        unpublished: bool,
        reply: Reply<()>,
    },
    /// A route's desired state as the fleet store holds it at `revision` (see
    /// `fleet::Applied` for how it was read).
    ApplyFleet {
        route: String,
        desired: FleetRoute,
        revision: i64,
        how: crate::fleet::Applied,
        reply: Reply<()>,
    },
    /// Every route's saved state (the fleet's publisher and seeding read it).
    Saved {
        reply: Reply<BTreeMap<String, SavedRoute>>,
    },
    /// The saved instance states (the fleet's first listing reads them).
    SavedInstances { reply: Reply<InstanceStates> },
    Reload {
        source: Source,
        reply: Reply<Vec<String>>,
    },
    /// An audit line from elsewhere (a webhook delivery's outcome), appended by the
    /// writer while it holds the state directory.
    Audit { line: serde_json::Value },
    /// Sets or clears the freeze (persisted, audited).
    Freeze {
        freeze: Option<Freeze>,
        reply: Reply<()>,
    },
    /// The addresses a re-resolved upstream now has (from DNS), looked up for
    /// `names`: an answer for names a reload has since replaced is dropped.
    Members {
        upstream: String,
        names: Vec<String>,
        addrs: Vec<std::net::SocketAddr>,
    },
    /// The operator's state for one instance; replies with the state it had.
    InstanceState {
        upstream: String,
        addr: std::net::SocketAddr,
        state: crate::upstream::InstanceState,
        source: Source,
        /// With a fleet, where it came from.
        origin: Option<InstanceOrigin>,
        reply: Reply<crate::upstream::InstanceState>,
    },
    /// Ends the writer and releases the state directory's lock (at shutdown, so a
    /// restart in the same process can take it).
    Stop { reply: Reply<()> },
    /// Releases the state directory to a successor (binary takeover); changes are
    /// refused until `Resume`.
    Release { reply: Reply<()> },
    /// Takes the state directory back after a takeover that did not complete; fails
    /// (and stays released) when the successor holds it.
    Resume { reply: Reply<()> },
}

/// Where a fleet's instance state came from.
#[derive(Debug, Clone)]
pub struct InstanceOrigin {
    /// The replica it was set through.
    pub by: String,
    /// The store's revision of it: from the watch, one older than this replica applied
    /// is ignored.
    pub revision: i64,
    pub how: crate::fleet::Applied,
}

/// The handle the admin API, signal handlers and the SLO guard use to ask for changes.
#[derive(Clone)]
pub struct StateHandle {
    pub(crate) tx: mpsc::Sender<Command>,
    pub shared: Arc<Shared>,
}

impl StateHandle {
    /// The route's last trips in this process, newest first.
    pub fn recent_trips(&self, route: &str) -> Vec<Trip> {
        let trips = self
            .shared
            .recent_trips
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        trips
            .iter()
            .rev()
            .filter(|(r, _)| r == route)
            .map(|(_, trip)| trip.clone())
            .collect()
    }

    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, ChangeError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| ChangeError::Stopped)?;
        answer.await.map_err(|_| ChangeError::Stopped)?
    }

    /// Applies `change` to `route`: here, or with a fleet as one etcd transaction that
    /// every replica then applies (see `fleet`).
    pub async fn change(
        &self,
        route: &str,
        change: Change,
        source: Source,
    ) -> Result<(), ChangeError> {
        match self.shared.fleet.get() {
            Some(fleet) => fleet.propose(self, route, change, source).await,
            None => self.change_here(route, change, source, false).await,
        }
    }

    /// Applies `change` to this replica's state only.
    pub(crate) async fn change_here(
        &self,
        route: &str,
        change: Change,
        source: Source,
        unpublished: bool,
    ) -> Result<(), ChangeError> {
        let route = route.to_string();
        self.ask(|reply| Command::Change {
            route,
            change,
            source,
            unpublished,
            reply,
        })
        .await
    }

    /// A weight set by hand; `force` also ends a running rollout (else that is a 409).
    pub async fn set_weight(
        &self,
        route: &str,
        weight_bp: u32,
        force: bool,
        source: Source,
    ) -> Result<(), ChangeError> {
        let change = match force {
            true => Change::ForceWeight(weight_bp),
            false => Change::SetWeight(weight_bp),
        };
        self.change(route, change, source).await
    }

    pub async fn reset(&self, route: &str, source: Source) -> Result<(), ChangeError> {
        self.change(route, Change::Reset, source).await
    }

    /// An SLO trip: applied and persisted here first, whatever the fleet store's state,
    /// then published (see `fleet::publish`).
    pub async fn trip(&self, route: &str, trip: Trip) -> Result<(), ChangeError> {
        let fleet = self.shared.fleet.get();
        let result = self
            .change_here(route, Change::Trip(trip), Source::Slo, fleet.is_some())
            .await;
        if let Some(fleet) = fleet {
            fleet.publish_soon();
        }
        result
    }

    pub async fn rollout(
        &self,
        route: &str,
        action: RolloutAction,
        source: Source,
    ) -> Result<(), ChangeError> {
        // Frozen (incident mode): nothing raises exposure; pause, resume and abort do not.
        let raises = matches!(
            action,
            RolloutAction::Start { .. } | RolloutAction::Retry | RolloutAction::Promote { .. }
        );
        if let (true, Some(freeze)) = (raises, self.freeze()) {
            return Err(ChangeError::Refused(format!(
                "rollouts are frozen ({}, by {} since {}): `splitgate freeze off` first",
                freeze.reason, freeze.by, freeze.at
            )));
        }
        self.change(route, Change::Rollout(action), source).await
    }

    /// Moves a running rollout from step `step` to the next; a stale request (the
    /// rollout moved on or stopped meanwhile) is ignored.
    pub async fn rollout_advance(&self, route: &str, step: usize) -> Result<(), ChangeError> {
        if self.freeze().is_some() {
            return Ok(());
        }
        self.change(route, Change::Advance(step), Source::Rollout)
            .await
    }

    /// Applies a route's state as the fleet store holds it.
    pub(crate) async fn apply_fleet(
        &self,
        route: &str,
        desired: FleetRoute,
        revision: i64,
        how: crate::fleet::Applied,
    ) -> Result<(), ChangeError> {
        let route = route.to_string();
        self.ask(|reply| Command::ApplyFleet {
            route,
            desired,
            revision,
            how,
            reply,
        })
        .await
    }

    pub(crate) async fn saved(&self) -> Result<BTreeMap<String, SavedRoute>, ChangeError> {
        self.ask(|reply| Command::Saved { reply }).await
    }

    pub(crate) async fn saved_instances(&self) -> Result<InstanceStates, ChangeError> {
        self.ask(|reply| Command::SavedInstances { reply }).await
    }

    /// Re-reads the config file. Returns warnings (e.g. a listen address that needs a
    /// restart); a bad file is an error and changes nothing.
    pub async fn reload(&self, source: Source) -> Result<Vec<String>, ChangeError> {
        self.ask(|reply| Command::Reload { source, reply }).await
    }

    /// Sets the operator's state of an instance (ready, drain, maint); returns the
    /// state it had.
    /// With a fleet, it is written to the store first and applied here once committed
    /// (the watch brings it to the other replicas); refused while the store is
    /// unreachable.
    pub async fn set_instance_state(
        &self,
        upstream: &str,
        addr: std::net::SocketAddr,
        state: crate::upstream::InstanceState,
        source: Source,
    ) -> Result<crate::upstream::InstanceState, ChangeError> {
        let Some(fleet) = self.shared.fleet.get() else {
            return self
                .apply_instance_state(upstream, addr, state, source, None)
                .await;
        };
        // Refused here, before the store, when this replica does not know the instance.
        let snapshot = self.shared.snapshot.load();
        let known = snapshot
            .upstream(upstream)
            .ok_or_else(|| ChangeError::UnknownUpstream(upstream.to_string()))?;
        if known.member(addr).is_none() {
            return Err(ChangeError::UnknownInstance {
                upstream: upstream.to_string(),
                addr,
                known: known
                    .members()
                    .iter()
                    .map(|m| m.addr.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let origin = fleet
            .put_instance_state(upstream, addr, state, source)
            .await?;
        self.apply_instance_state(upstream, addr, state, source, Some(origin))
            .await
    }

    /// Sets an instance's state here only; `origin` says where a fleet's came from.
    pub(crate) async fn apply_instance_state(
        &self,
        upstream: &str,
        addr: std::net::SocketAddr,
        state: crate::upstream::InstanceState,
        source: Source,
        origin: Option<InstanceOrigin>,
    ) -> Result<crate::upstream::InstanceState, ChangeError> {
        let upstream = upstream.to_string();
        self.ask(|reply| Command::InstanceState {
            upstream,
            addr,
            state,
            source,
            origin,
            reply,
        })
        .await
    }

    /// The freeze in force, if any.
    pub fn freeze(&self) -> Option<Freeze> {
        self.shared
            .freeze
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Freezes every rollout (`Some`) or lifts the freeze; with a fleet, for every
    /// replica (written to the store first; refused while it is unreachable).
    pub async fn set_freeze(&self, freeze: Option<Freeze>) -> Result<(), ChangeError> {
        if let Some(fleet) = self.shared.fleet.get() {
            fleet.put_freeze(freeze.as_ref()).await?;
        }
        self.apply_freeze(freeze).await
    }

    /// Sets the freeze here only (the fleet's heartbeat brings the store's).
    pub(crate) async fn apply_freeze(&self, freeze: Option<Freeze>) -> Result<(), ChangeError> {
        self.ask(|reply| Command::Freeze { freeze, reply }).await
    }

    /// Tells the writer the addresses a re-resolved upstream now has.
    pub(crate) async fn set_members(
        &self,
        upstream: &str,
        names: Vec<String>,
        addrs: Vec<std::net::SocketAddr>,
    ) {
        let _ = self
            .tx
            .send(Command::Members {
                upstream: upstream.to_string(),
                names,
                addrs,
            })
            .await;
    }

    /// Stops the writer; it has released the state directory when this returns.
    pub async fn stop(&self) {
        let _ = self.ask(|reply| Command::Stop { reply }).await;
    }

    /// Releases the state directory to a successor (see `Command::Release`).
    pub async fn release(&self) -> Result<(), ChangeError> {
        self.ask(|reply| Command::Release { reply }).await
    }

    /// Takes the state directory back (see `Command::Resume`).
    pub async fn resume(&self) -> Result<(), ChangeError> {
        self.ask(|reply| Command::Resume { reply }).await
    }
}
