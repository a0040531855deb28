//! Every second: keeps this replica's lease alive, publishes its member record (applied
//! revision and, per judged route, the running totals of both sides) under that lease,
//! and gives the fleet judge its turn. A replica that stops or is cut off loses its
//! lease after `LEASE_TTL`, and with it its member record and, if it judged, the
//! judge's key, so another replica takes over.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::judge::Judge;
use super::{Fleet, StoreError};
use crate::slo::evidence::Reading;
use crate::state::StateHandle;

const EVERY: Duration = Duration::from_secs(1);
/// After a failed beat.
const RETRY_SOON: Duration = Duration::from_millis(200);
/// Beats between two reads of the member list and the judge's name (for the view).
const VIEW_EVERY: u64 = 3;
/// Seconds; etcd may grant more (its minimum depends on its election timeout).
const LEASE_TTL: i64 = 3;

/// What each replica publishes at `/splitgate/v1/<cluster>/members/<replica>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberRecord {
    pub replica: String,
    /// Random per process start: the judge tells a restarted replica's totals (which
    /// start again from zero) from the ones before.
    pub incarnation: u64,
    pub version: String,
    pub started: String,
    pub applied_revision: i64,
    pub store_up: bool,
    /// Per route with a canary and an SLO: the canary's and stable's running totals.
    pub routes: BTreeMap<String, SideReadings>,
    /// Per instance this replica has out of service (drain, maint), keyed
    /// `upstream/addr`: its state here and the requests still in flight to it, so
    /// `drain --wait` against any replica waits for all of them.
    #[serde(default)]
    pub instances: BTreeMap<String, InstanceLoad>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InstanceLoad {
    pub state: crate::upstream::InstanceState,
    pub in_flight: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SideReadings {
    pub canary: Reading,
    pub stable: Reading,
}

pub async fn run(fleet: Arc<Fleet>, state: StateHandle) {
    let incarnation = fastrand::u64(..);
    let started = crate::timefmt::now_rfc3339();
    let mut lease = None;
    let mut judge = Judge::default();
    let mut beats = 0u64;
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // The member list `/admin/fleet` shows is read every `VIEW_EVERY` beats: every
        // replica reading it every second would cost the store N² reads a second.
        // While an instance is settling, every beat: `drain --wait` waits on what the
        // other replicas report.
        let read_members = beats.is_multiple_of(VIEW_EVERY) || fleet.instances_settling();
        beats += 1;
        let beat = beat(
            &fleet,
            &state,
            &mut lease,
            incarnation,
            &started,
            read_members,
        )
        .await;
        fleet.store_answered(beat.as_ref().map(|_| ()));
        match (beat, lease) {
            (Ok(()), Some(lease)) => judge.tick(&fleet, &state, lease).await,
            // A failed round leaves the judge as it is (its election key lives as long
            // as the lease) and is tried again soon: renewed quickly once the store is
            // back, the lease outlives a short outage.
            _ => tick.reset_after(RETRY_SOON),
        }
    }
}

async fn beat(
    fleet: &Fleet,
    state: &StateHandle,
    lease: &mut Option<i64>,
    incarnation: u64,
    started: &str,
    read_members: bool,
) -> Result<(), StoreError> {
    let id = match *lease {
        Some(id) if fleet.store.keep_alive(id).await? => id,
        previous => {
            if previous.is_some() {
                tracing::warn!("fleet: this replica's lease expired; taking a new one");
            }
            let (id, _ttl) = fleet.store.grant(LEASE_TTL).await?;
            *lease = Some(id);
            *fleet.lease.lock().expect("not poisoned") = Some(id);
            id
        }
    };
    fleet.store_answered(Ok(()));
    let snapshot = state.shared.snapshot.load();
    let routes = snapshot
        .routes
        .iter()
        .filter(|r| r.canary.is_some() && r.spec.slo.is_some())
        .map(|r| {
            let (canary, stable) = r.windows.totals();
            (r.spec.name.clone(), SideReadings { canary, stable })
        })
        .collect();
    let instances: BTreeMap<String, InstanceLoad> = snapshot
        .upstreams
        .iter()
        .flat_map(|u| {
            u.members()
                .iter()
                .filter(|m| m.state() != crate::upstream::InstanceState::Ready)
                .map(|m| {
                    let in_flight = m.in_flight();
                    (
                        format!("{}/{}", u.name(), m.addr),
                        InstanceLoad {
                            state: m.state(),
                            in_flight,
                        },
                    )
                })
        })
        .collect();
    let view = fleet.view();
    let record = MemberRecord {
        replica: fleet.settings.replica.clone(),
        incarnation,
        version: env!("CARGO_PKG_VERSION").to_string(),
        started: started.to_string(),
        applied_revision: view.applied_revision,
        store_up: view.store_up,
        routes,
        instances,
    };
    let bytes = serde_json::to_vec(&record).expect("a member record serializes");
    fleet
        .store
        .put_with_lease(&fleet.member_key(&fleet.settings.replica), &bytes, id)
        .await?;
    // What `/admin/fleet` shows: who judges (every beat: one small read), and every
    // member (every few beats).
    let judge = fleet
        .store
        .get(&fleet.judge_key())
        .await?
        .map(|(value, _)| String::from_utf8_lossy(&value).into_owned());
    let members = if read_members {
        let (kvs, _) = fleet.store.list(&fleet.member_prefix()).await?;
        Some(
            kvs.iter()
                .filter_map(|kv| serde_json::from_slice::<MemberRecord>(kv.value()).ok())
                .collect(),
        )
    } else {
        None
    };
    fleet.seen(members, judge);
    // The fleet's freeze, every beat (one small read): a replica that missed it, or
    // was cut off when it was set, follows within a second of reaching the store.
    let freeze = match fleet.store.get(&fleet.freeze_key()).await? {
        None => None,
        Some((bytes, _)) => match serde_json::from_slice(&bytes) {
            Ok(freeze) => Some(freeze),
            // Frozen, the safe side; a record that stays the same beat after beat.
            Err(error) => Some(crate::state::Freeze {
                reason: format!("unreadable freeze in the store ({error})"),
                by: "fleet".into(),
                at: String::new(),
            }),
        },
    };
    if freeze != state.freeze() {
        if let Err(error) = state.apply_freeze(freeze).await {
            tracing::error!(%error, "fleet: could not apply the fleet's freeze");
        }
    }
    Ok(())
}
