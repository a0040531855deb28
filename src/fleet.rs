//! Replicas that agree on weights, trips and rollouts (control plane), through etcd.
//!
//! Each route's desired state is one key, `/splitgate/v1/<cluster>/routes/<route>`,
//! holding a [`FleetRoute`]. A change made through any replica's admin API is the same
//! pure function the single node applies ([`crate::state::change::apply`]), run on the
//! state read from etcd and written back in one transaction that compares the key's
//! revision; it is acknowledged once committed. Every replica watches the prefix
//! (`sync`) and applies what it sees through its state writer, which persists it to
//! `state.json` with the revision, so a replica restarted while etcd is down serves the
//! last state it applied.
//!
//! Trips are applied and persisted locally first and then published (`publish`), retried
//! until they land, as are rollbacks made while etcd is unreachable. A reset bumps the
//! route's epoch; a local trip from an older epoch is stale and dropped, never
//! re-published.

mod heartbeat;
mod instances;
mod judge;
mod publish;
mod store;
mod sync;

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use metrics::Gauge;
use serde::Serialize;
use tokio::sync::Notify;

pub use store::{Store, StoreError};

use crate::config::FleetSettings;
use crate::state::{change, Change, ChangeError, FleetRoute, SavedRoute, Source, StateHandle};
use crate::telemetry::names::{FLEET_APPLIED_REVISION, FLEET_STORE_UP};

/// How often a change is re-read and retried when another replica changed the same
/// route between the read and the transaction.
const CONFLICT_RETRIES: usize = 5;

/// The store's state onto this replica's, with the epoch never going back: a store
/// restored from an older backup (or a hand-written value) may hold an older epoch
/// than this replica applied, and what is written goes forward from the newer.
fn store_onto_local(stored: &FleetRoute, local: &SavedRoute) -> SavedRoute {
    let mut current = stored.onto(local);
    current.epoch = current.epoch.max(local.epoch);
    current
}

/// The state a change through this replica starts from: the store's
/// (`store_onto_local`), except that a trip made here and not yet accepted by the store
/// still counts (no raise through this replica while it is pending). A pending rollback
/// does not: a change made through this replica after it supersedes it.
fn as_seen_here(stored: &FleetRoute, local: &SavedRoute) -> SavedRoute {
    let mut current = store_onto_local(stored, local);
    if local.unpublished && local.epoch >= stored.epoch && current.trip.is_none() {
        current.trip = local.trip.clone();
    }
    current
}

/// How a value from the store reached the state writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// From the watch: applied only when newer than what this replica has.
    Watched,
    /// From listing the store: its current state, applied even when its revision is
    /// not newer (etcd restored or rebuilt), except that nothing reverted here is
    /// re-exposed.
    Listed,
    /// Committed by this replica (an admin change, a publication, the judge's trip).
    Committed,
}

/// A watch of one prefix.
struct Following {
    stream: etcd_client::WatchStream,
    prefix: String,
}

impl Following {
    /// The next batch of events; `None` when the revision this replica needs was
    /// compacted (list again at once); an error when the stream ended or was cancelled
    /// (list again after a pause).
    async fn next(&mut self) -> Result<Option<etcd_client::WatchResponse>, String> {
        let response = match self.stream.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return Err("the watch stream ended".into()),
            Err(error) => return Err(format!("watch: {error}")),
        };
        if response.compact_revision() != 0 {
            tracing::warn!(
                prefix = %self.prefix,
                compacted = response.compact_revision(),
                "fleet: the revision this replica needs was compacted; listing again"
            );
            return Ok(None);
        }
        if response.canceled() {
            return Err(format!("watch cancelled: {}", response.cancel_reason()));
        }
        Ok(Some(response))
    }
}

/// A route's key in the store.
enum Stored {
    Absent,
    Value(Box<FleetRoute>, i64),
    /// A value that does not parse (hand-written, or from a newer splitgate), and its
    /// revision.
    Corrupt(String, i64),
}

pub struct Fleet {
    pub settings: FleetSettings,
    store: Store,
    /// Wakes the publisher (a trip or rollback was made here).
    publish: Notify,
    status: Status,
    /// The watch, the publisher and the heartbeat; aborted by `stop`.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Routes whose rollout step is being moved on (see `advance`).
    advancing: Mutex<std::collections::HashSet<String>>,
    /// This replica's lease, revoked by `stop` so that its member record and (if it
    /// judged) the judge's key go at once rather than after the lease's TTL.
    lease: Mutex<Option<i64>>,
    /// When an instance state last changed (see `instances_settling`).
    instance_changed: Mutex<Option<std::time::Instant>>,
}

/// What `GET /admin/fleet` and the metrics show.
struct Status {
    store_up: AtomicBool,
    /// Whether the store has been listed once, or found unreachable: `/readyz` waits
    /// for it, so a replica restarted after downtime does not serve a weight the fleet
    /// has since moved before it has asked.
    synced: AtomicBool,
    applied_revision: AtomicI64,
    last_error: Mutex<Option<String>>,
    /// As last read by the heartbeat.
    members: Mutex<Vec<heartbeat::MemberRecord>>,
    judge: Mutex<Option<String>>,
    store_up_gauge: Gauge,
    applied_revision_gauge: Gauge,
}

#[derive(Serialize)]
pub struct FleetView {
    pub backend: &'static str,
    pub cluster: String,
    pub replica: String,
    pub endpoints: Vec<String>,
    /// The endpoint requests go to now.
    pub endpoint: String,
    pub store_up: bool,
    pub applied_revision: i64,
    pub last_error: Option<String>,
    /// The replica judging the fleet's canaries (as last read).
    pub judge: Option<String>,
    pub members: Vec<MemberView>,
}

/// One instance as the fleet's members report it.
#[derive(Serialize)]
pub struct InstanceReport {
    /// Requests in flight to it on every member.
    pub in_flight: usize,
    pub replicas: Vec<ReplicaLoad>,
}

#[derive(Serialize)]
pub struct ReplicaLoad {
    pub replica: String,
    /// The instance's state on that replica (`ready` when it reports nothing of it).
    pub state: crate::upstream::InstanceState,
    pub in_flight: usize,
}

#[derive(Serialize)]
pub struct MemberView {
    pub replica: String,
    pub version: String,
    pub started: String,
    pub applied_revision: i64,
    pub store_up: bool,
}

impl Fleet {
    /// Links `state` to the fleet store and starts the watch and the publisher.
    pub fn start(settings: FleetSettings, state: &StateHandle) -> Arc<Fleet> {
        let registry = &state.shared.registry;
        let fleet = Arc::new(Fleet {
            store: Store::new(&settings),
            settings,
            publish: Notify::new(),
            tasks: Mutex::new(Vec::new()),
            advancing: Mutex::new(Default::default()),
            lease: Mutex::new(None),
            instance_changed: Mutex::new(None),
            status: Status {
                store_up: AtomicBool::new(false),
                synced: AtomicBool::new(false),
                applied_revision: AtomicI64::new(0),
                last_error: Mutex::new(None),
                members: Mutex::new(Vec::new()),
                judge: Mutex::new(None),
                store_up_gauge: registry.gauge(FLEET_STORE_UP, &[]),
                applied_revision_gauge: registry.gauge(FLEET_APPLIED_REVISION, &[]),
            },
        });
        if state.shared.fleet.set(fleet.clone()).is_err() {
            tracing::error!("a fleet link was already set for this state; the second is ignored");
        }
        *fleet.tasks.lock().expect("not poisoned") = vec![
            tokio::spawn(sync::run(fleet.clone(), state.clone())),
            tokio::spawn(publish::run(fleet.clone(), state.clone())),
            tokio::spawn(heartbeat::run(fleet.clone(), state.clone())),
            tokio::spawn(instances::run(fleet.clone(), state.clone())),
        ];
        tracing::info!(
            cluster = %fleet.settings.cluster,
            replica = %fleet.settings.replica,
            endpoints = ?fleet.settings.endpoints,
            "fleet: state shared through etcd"
        );
        fleet
    }

    /// Stops the fleet's tasks and revokes this replica's lease (at shutdown).
    pub async fn stop(&self) {
        for task in self.tasks.lock().expect("not poisoned").drain(..) {
            task.abort();
        }
        let lease = self.lease.lock().expect("not poisoned").take();
        if let Some(lease) = lease {
            let revoked =
                tokio::time::timeout(std::time::Duration::from_secs(1), self.store.revoke(lease));
            if let Err(error) = revoked
                .await
                .unwrap_or_else(|_| Err(StoreError::from("no answer within 1s".to_string())))
            {
                tracing::warn!(%error, "fleet: could not revoke this replica's lease; it expires on its own");
            }
        }
    }

    fn prefix(&self) -> String {
        format!("/splitgate/v1/{}/routes/", self.settings.cluster)
    }

    fn member_prefix(&self) -> String {
        format!("/splitgate/v1/{}/members/", self.settings.cluster)
    }

    fn member_key(&self, replica: &str) -> String {
        format!("{}{replica}", self.member_prefix())
    }

    fn freeze_key(&self) -> String {
        format!("/splitgate/v1/{}/freeze", self.settings.cluster)
    }

    /// Writes the fleet's freeze (`None`: deletes it).
    pub async fn put_freeze(
        &self,
        freeze: Option<&crate::state::Freeze>,
    ) -> Result<(), ChangeError> {
        let key = self.freeze_key();
        let written = match freeze {
            Some(freeze) => {
                let bytes = serde_json::to_vec(freeze).expect("a freeze serializes");
                self.store.put(&key, &bytes).await
            }
            None => self.store.delete(&key).await,
        };
        self.store_answered(written.as_ref().map(|_| ()));
        written
            .map(|_| ())
            .map_err(|e| ChangeError::StoreUnavailable(e.to_string()))
    }

    fn judge_key(&self) -> String {
        format!("/splitgate/v1/{}/judge", self.settings.cluster)
    }

    /// What the heartbeat last read: the judge, and the members when it read them.
    fn seen(&self, members: Option<Vec<heartbeat::MemberRecord>>, judge: Option<String>) {
        if let Some(members) = members {
            *self.status.members.lock().expect("not poisoned") = members;
        }
        *self.status.judge.lock().expect("not poisoned") = judge;
    }

    fn route_key(&self, route: &str) -> String {
        format!("{}{route}", self.prefix())
    }

    /// Watches `prefix` from revision `from` (for the route and instance watches).
    async fn follow(&self, prefix: &str, from: i64) -> Result<Following, String> {
        let stream = self
            .store
            .watch(prefix, from)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Following {
            stream,
            prefix: prefix.to_string(),
        })
    }

    /// Moves a rollout on from `step`, in a task of its own: the guard's pass over the
    /// routes must never wait on the store (a breach elsewhere would wait behind it).
    /// One at a time per route.
    pub fn advance(self: &Arc<Self>, state: &StateHandle, route: &str, step: usize) {
        if !self
            .advancing
            .lock()
            .expect("not poisoned")
            .insert(route.to_string())
        {
            return;
        }
        let (fleet, state, route) = (self.clone(), state.clone(), route.to_string());
        tokio::spawn(async move {
            if let Err(error) = state.rollout_advance(&route, step).await {
                tracing::warn!(route = %route, %error, "could not advance rollout; tried again at the next evaluation");
            }
            fleet.advancing.lock().expect("not poisoned").remove(&route);
        });
    }

    /// Whether `drain --wait` may be waiting on the member list: an instance state
    /// changed in the last few seconds, or a member (as last read) still has requests in
    /// flight to an instance out of service (for at most 10 minutes after the change).
    fn instances_settling(&self) -> bool {
        let recent = self
            .instance_changed
            .lock()
            .expect("not poisoned")
            .is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(15));
        // Requests still in flight keep it going for a while, not forever (one open
        // WebSocket to an instance in `maint` for days).
        let lately = self
            .instance_changed
            .lock()
            .expect("not poisoned")
            .is_some_and(|at| at.elapsed() < std::time::Duration::from_secs(600));
        recent
            || (lately
                && self
                    .status
                    .members
                    .lock()
                    .expect("not poisoned")
                    .iter()
                    .any(|m| m.instances.values().any(|i| i.in_flight > 0)))
    }

    /// An instance state changed (here or through another replica).
    fn instance_changed(&self) {
        *self.instance_changed.lock().expect("not poisoned") = Some(std::time::Instant::now());
    }

    /// What every member (as last read, within a few seconds) reports of one instance:
    /// for `drain --wait` against a fleet.
    pub fn instance_report(&self, upstream: &str, addr: std::net::SocketAddr) -> InstanceReport {
        let key = format!("{upstream}/{addr}");
        let members = self.status.members.lock().expect("not poisoned");
        let replicas: Vec<ReplicaLoad> = members
            .iter()
            .map(|m| {
                let load = m.instances.get(&key);
                ReplicaLoad {
                    replica: m.replica.clone(),
                    state: load.map_or(crate::upstream::InstanceState::Ready, |l| l.state),
                    in_flight: load.map_or(0, |l| l.in_flight),
                }
            })
            .collect();
        InstanceReport {
            in_flight: replicas.iter().map(|r| r.in_flight).sum(),
            replicas,
        }
    }

    /// False until the first listing of the store (or the first failure to reach it).
    pub fn synced(&self) -> bool {
        self.status.synced.load(Ordering::Relaxed)
    }

    fn mark_synced(&self, listed: bool) {
        if !self.status.synced.swap(true, Ordering::Relaxed) && !listed {
            tracing::warn!(
                "fleet store unreachable at start: serving the state saved in state.dir"
            );
        }
    }

    pub fn publish_soon(&self) {
        self.publish.notify_one();
    }

    pub fn view(&self) -> FleetView {
        FleetView {
            backend: "etcd",
            cluster: self.settings.cluster.clone(),
            replica: self.settings.replica.clone(),
            endpoints: self.settings.endpoints.clone(),
            endpoint: self.store.endpoint().to_string(),
            store_up: self.status.store_up.load(Ordering::Relaxed),
            applied_revision: self.status.applied_revision.load(Ordering::Relaxed),
            last_error: self.status.last_error.lock().expect("not poisoned").clone(),
            judge: self.status.judge.lock().expect("not poisoned").clone(),
            members: self
                .status
                .members
                .lock()
                .expect("not poisoned")
                .iter()
                .map(|m| MemberView {
                    replica: m.replica.clone(),
                    version: m.version.clone(),
                    started: m.started.clone(),
                    applied_revision: m.applied_revision,
                    store_up: m.store_up,
                })
                .collect(),
        }
    }

    /// Records whether the store answered; logs only the transitions.
    fn store_answered(&self, result: Result<(), &StoreError>) {
        let up = result.is_ok();
        let was = self.status.store_up.swap(up, Ordering::Relaxed);
        self.status.store_up_gauge.set(if up { 1.0 } else { 0.0 });
        match result {
            Ok(()) if !was => {
                tracing::info!(endpoint = self.store.endpoint(), "fleet store reachable");
                *self.status.last_error.lock().expect("not poisoned") = None;
            }
            Err(error) => {
                if was {
                    tracing::error!(%error, "fleet store unreachable: serving the last applied state; only trips and rollbacks apply until it is back");
                }
                *self.status.last_error.lock().expect("not poisoned") = Some(error.to_string());
            }
            Ok(()) => {}
        }
    }

    fn applied(&self, revision: i64) {
        let previous = self
            .status
            .applied_revision
            .fetch_max(revision, Ordering::Relaxed);
        self.status
            .applied_revision_gauge
            .set(previous.max(revision) as f64);
    }

    /// Reads a route's desired state from the store.
    async fn read(&self, route: &str) -> Result<Stored, ChangeError> {
        let read = self.store.get(&self.route_key(route)).await;
        self.store_answered(read.as_ref().map(|_| ()));
        Ok(
            match read.map_err(|e| ChangeError::StoreUnavailable(e.to_string()))? {
                None => Stored::Absent,
                Some((bytes, revision)) => match FleetRoute::parse(&bytes) {
                    Ok(value) => Stored::Value(Box::new(value), revision),
                    Err(problem) => {
                        tracing::error!(route, revision, key = %self.route_key(route), %problem, "fleet: unreadable route state in the store");
                        Stored::Corrupt(problem, revision)
                    }
                },
            },
        )
    }

    /// Writes `value` if the route's key is still at `expected`; the committed revision.
    async fn write(
        &self,
        route: &str,
        value: &FleetRoute,
        expected: i64,
    ) -> Result<Option<i64>, ChangeError> {
        let bytes = serde_json::to_vec(value).expect("a route state serializes");
        let written = self
            .store
            .put_if(&self.route_key(route), &bytes, expected)
            .await;
        self.store_answered(written.as_ref().map(|_| ()));
        written.map_err(|e| ChangeError::StoreUnavailable(e.to_string()))
    }

    /// A change through this replica: one transaction on the store, then applied here
    /// at the revision it committed (the watch brings it to the other replicas). With
    /// the store unreachable, a change that only lowers exposure applies here and is
    /// published later; any other is refused.
    pub async fn propose(
        &self,
        state: &StateHandle,
        route: &str,
        change: Change,
        source: Source,
    ) -> Result<(), ChangeError> {
        let spec = state
            .shared
            .snapshot
            .load()
            .route(route)
            .map(|r| r.spec.clone())
            .ok_or_else(|| ChangeError::UnknownRoute(route.to_string()))?;
        for _ in 0..CONFLICT_RETRIES {
            let local = state
                .saved()
                .await?
                .remove(route)
                .ok_or_else(|| ChangeError::UnknownRoute(route.to_string()))?;
            let stored = match self.read(route).await {
                Err(ChangeError::StoreUnavailable(why)) => {
                    return self.unreachable(state, route, change, source, why).await
                }
                other => other?,
            };
            let (current, expected) = match stored {
                Stored::Value(desired, revision) => (as_seen_here(&desired, &local), revision),
                Stored::Absent => (local.clone(), 0),
                // Only a change that lowers exposure may overwrite what nobody can read.
                Stored::Corrupt(problem, revision) if change.lowers_exposure() => {
                    tracing::warn!(route, %problem, "fleet: overwriting an unreadable route state with a rollback or trip");
                    (local.clone(), revision)
                }
                Stored::Corrupt(problem, _) => {
                    return Err(ChangeError::Invalid(format!(
                        "the fleet store's value at {} is unreadable ({problem}); only a rollback, a rollout abort or a trip may overwrite it",
                        self.route_key(route)
                    )))
                }
            };
            let Some(next) = change::apply(&spec, &current, &change, crate::timefmt::unix_ms())?
            else {
                return Ok(());
            };
            let value = FleetRoute::from_saved(&next, &self.settings.replica, source.as_str());
            match self.write(route, &value, expected).await {
                Ok(Some(revision)) => {
                    state
                        .apply_fleet(route, value, revision, Applied::Committed)
                        .await?;
                    self.applied(revision);
                    return Ok(());
                }
                Ok(None) => continue,
                Err(ChangeError::StoreUnavailable(why)) => {
                    return self.unreachable(state, route, change, source, why).await
                }
                Err(other) => return Err(other),
            }
        }
        Err(ChangeError::Conflict(route.to_string()))
    }

    async fn unreachable(
        &self,
        state: &StateHandle,
        route: &str,
        change: Change,
        source: Source,
        why: String,
    ) -> Result<(), ChangeError> {
        if !change.lowers_exposure() {
            return Err(ChangeError::StoreUnavailable(why));
        }
        tracing::warn!(route, error = %why, "fleet store unreachable: applied here, published when it is back");
        let result = state.change_here(route, change, source, true).await;
        self.publish_soon();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Trip;

    fn local(trip: Option<Trip>, unpublished: bool, epoch: u64) -> SavedRoute {
        SavedRoute {
            rollout_end: None,
            weight_bp: 0,
            file_weight_bp: 0,
            trip,
            rollout: None,
            canary: None,
            epoch,
            revision: 7,
            unpublished,
        }
    }

    fn stored(epoch: u64) -> FleetRoute {
        FleetRoute {
            rollout_end: None,
            weight_bp: 2000,
            trip: None,
            rollout: None,
            epoch,
            by: "edge-2".into(),
            source: "admin".into(),
        }
    }

    fn trip() -> Trip {
        Trip {
            reason: "error_rate".into(),
            detail: "seen here".into(),
            at: "2026-11-27T00:00:00Z".into(),
        }
    }

    #[test]
    fn a_pending_local_trip_counts_until_the_store_has_it() {
        let seen = as_seen_here(&stored(3), &local(Some(trip()), true, 3));
        assert_eq!(seen.trip, Some(trip()));
        assert_eq!(seen.weight_bp, 2000);
    }

    #[test]
    fn the_epoch_never_goes_back() {
        assert_eq!(as_seen_here(&stored(1), &local(None, false, 4)).epoch, 4);
        assert_eq!(as_seen_here(&stored(5), &local(None, false, 4)).epoch, 5);
    }

    #[test]
    fn a_published_or_stale_local_trip_does_not() {
        assert_eq!(
            as_seen_here(&stored(3), &local(Some(trip()), false, 3)).trip,
            None
        );
        // Reset fleet-wide since (epoch 4): the local trip is stale.
        assert_eq!(
            as_seen_here(&stored(4), &local(Some(trip()), true, 3)).trip,
            None
        );
    }
}
