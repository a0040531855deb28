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
use crate::state::{change, Change, ChangeError, FleetRoute, Source, StateHandle};
use crate::telemetry::names::{FLEET_APPLIED_REVISION, FLEET_STORE_UP};

/// How often a change is re-read and retried when another replica changed the same
/// route between the read and the transaction.
const CONFLICT_RETRIES: usize = 5;

pub struct Fleet {
    pub settings: FleetSettings,
    store: Store,
    /// Wakes the publisher (a trip or rollback was made here).
    publish: Notify,
    status: Status,
    /// The watch, the publisher and the heartbeat; aborted by `stop`.
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// This replica's lease, revoked by `stop` so that its member record and (if it
    /// judged) the judge's key go at once rather than after the lease's TTL.
    lease: Mutex<Option<i64>>,
}

/// What `GET /admin/fleet` and the metrics show.
struct Status {
    store_up: AtomicBool,
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
            lease: Mutex::new(None),
            status: Status {
                store_up: AtomicBool::new(false),
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

    fn judge_key(&self) -> String {
        format!("/splitgate/v1/{}/judge", self.settings.cluster)
    }

    /// What the heartbeat last read: the members and the judge.
    fn seen(&self, members: Vec<heartbeat::MemberRecord>, judge: Option<String>) {
        *self.status.members.lock().expect("not poisoned") = members;
        *self.status.judge.lock().expect("not poisoned") = judge;
    }

    fn route_key(&self, route: &str) -> String {
        format!("{}{route}", self.prefix())
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
                tracing::info!(endpoint = self.store.endpoint(), "fleet store reachable")
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

    /// Reads a route's desired state from the store. `None`: no key yet.
    async fn read(&self, route: &str) -> Result<Option<(FleetRoute, i64)>, ChangeError> {
        let read = self.store.get(&self.route_key(route)).await;
        self.store_answered(read.as_ref().map(|_| ()));
        match read.map_err(|e| ChangeError::StoreUnavailable(e.to_string()))? {
            None => Ok(None),
            Some((bytes, revision)) => serde_json::from_slice(&bytes)
                .map(|value| Some((value, revision)))
                .map_err(|e| {
                    ChangeError::Invalid(format!(
                        "the fleet store's value at {} is not a route state: {e}",
                        self.route_key(route)
                    ))
                }),
        }
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
            let read = match self.read(route).await {
                Err(ChangeError::StoreUnavailable(why)) => {
                    return self.unreachable(state, route, change, source, why).await
                }
                other => other?,
            };
            let (current, expected) = match &read {
                Some((desired, revision)) => (desired.onto(&local), *revision),
                None => (local, 0),
            };
            let Some(next) = change::apply(&spec, &current, &change, crate::timefmt::unix_ms())?
            else {
                return Ok(());
            };
            let value = FleetRoute::from_saved(&next, &self.settings.replica, source.as_str());
            match self.write(route, &value, expected).await {
                Ok(Some(revision)) => {
                    self.applied(revision);
                    return state.apply_fleet(route, value, revision, source).await;
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
