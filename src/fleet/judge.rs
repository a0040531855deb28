//! The fleet judge: one replica, elected through a key bound to its lease, sums every
//! replica's running totals and judges the sum with the single node's judge
//! (`slo::rules::judge`, the same sequential test and error budget), so a bad canary
//! spread thinly over many replicas is caught even when each replica's own slice is
//! below `min_requests`. It trips through a transaction fenced on the election key's
//! create revision: a judge that lost its lease (cut off, paused) cannot write. Each
//! replica's own guard stays armed.

use std::collections::HashMap;
use std::time::Instant;

use super::heartbeat::{MemberRecord, SideReadings};
use super::Fleet;
use crate::slo::evidence::{Ledger, Reading};
use crate::slo::rules::{self, Verdict};
use crate::state::{FleetRoute, Source, StateHandle, Trip};

#[derive(Default)]
pub struct Judge {
    /// The election key's create revision while this replica judges.
    fence: Option<i64>,
    /// The latest totals of every (replica, incarnation) seen, per route. A replica
    /// that restarted keeps its old incarnation's last totals here, so the sum only
    /// ever grows.
    seen: HashMap<String, HashMap<(String, u64), SideReadings>>,
    routes: HashMap<String, RouteEvidence>,
    clock: Option<Instant>,
}

/// The evidence of one route since its current fleet epoch began (or since this
/// replica became the judge).
struct RouteEvidence {
    epoch: u64,
    canary: Ledger,
    stable: Ledger,
}

impl Judge {
    pub fn step_down(&mut self, fleet: &Fleet) {
        if self.fence.take().is_some() {
            tracing::warn!(replica = %fleet.settings.replica, "fleet judge: this replica no longer judges (its lease or the store is gone)");
        }
        self.routes.clear();
    }

    fn now_ms(&mut self) -> u64 {
        self.clock
            .get_or_insert_with(Instant::now)
            .elapsed()
            .as_millis() as u64
    }

    pub async fn tick(&mut self, fleet: &Fleet, state: &StateHandle, lease: i64) {
        if let Err(error) = self.try_tick(fleet, state, lease).await {
            tracing::warn!(%error, "fleet judge: this round failed");
        }
    }

    async fn try_tick(
        &mut self,
        fleet: &Fleet,
        state: &StateHandle,
        lease: i64,
    ) -> Result<(), super::StoreError> {
        let key = fleet.judge_key();
        match self.fence {
            None => {
                let name = fleet.settings.replica.as_bytes();
                let Some(revision) = fleet.store.create_with_lease(&key, name, lease).await? else {
                    return Ok(());
                };
                tracing::info!(replica = %fleet.settings.replica, revision, "fleet judge: this replica judges the fleet's canaries");
                self.fence = Some(revision);
                self.routes.clear();
            }
            Some(fence) => {
                if fleet.store.create_revision(&key).await? != Some(fence) {
                    self.step_down(fleet);
                    return Ok(());
                }
            }
        }
        let fence = self.fence.expect("set above");
        let (kvs, _) = fleet.store.list(&fleet.member_prefix()).await?;
        for record in kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<MemberRecord>(kv.value()).ok())
        {
            for (route, readings) in record.routes {
                self.seen
                    .entry(route)
                    .or_default()
                    .insert((record.replica.clone(), record.incarnation), readings);
            }
        }
        let snapshot = state.shared.snapshot.load_full();
        for route in snapshot.routes.iter() {
            let (Some(spec), Some(_)) = (&route.spec.slo, &route.canary) else {
                continue;
            };
            if spec.dry_run {
                continue;
            }
            let name = route.spec.name.as_str();
            let Ok(super::Stored::Value(desired, revision)) = fleet.read(name).await else {
                continue;
            };
            if desired.trip.is_some() {
                self.routes.remove(name);
                continue;
            }
            let sum = self.sum(name);
            let now = self.now_ms();
            let evidence = self
                .routes
                .entry(name.to_string())
                .or_insert_with(|| RouteEvidence::new(desired.epoch, &sum, now));
            if evidence.epoch != desired.epoch {
                *evidence = RouteEvidence::new(desired.epoch, &sum, now);
            }
            let window_ms = spec.window.as_millis() as u64;
            evidence.canary.update(sum.canary, now, window_ms);
            evidence.stable.update(sum.stable, now, window_ms);
            let reports = rules::judge(spec, &evidence.canary, &evidence.stable);
            let Some(breach) = reports.iter().find(|r| r.verdict == Verdict::Breach) else {
                continue;
            };
            let trip = Trip {
                reason: breach.rule.clone(),
                detail: format!(
                    "fleet judge ({} replicas' traffic): {}: {} (confidence {})",
                    self.seen.get(name).map_or(0, HashMap::len),
                    breach.rule,
                    breach.summary,
                    spec.confidence
                ),
                at: crate::timefmt::now_rfc3339(),
            };
            let tripped = FleetRoute {
                weight_bp: 0,
                trip: Some(trip.clone()),
                rollout: None,
                epoch: desired.epoch,
                by: fleet.settings.replica.clone(),
                source: Source::Slo.as_str().to_string(),
            };
            let bytes = serde_json::to_vec(&tripped).expect("a route state serializes");
            match fleet
                .store
                .put_fenced(&fleet.route_key(name), &bytes, revision, &key, fence)
                .await?
            {
                Some(committed) => {
                    tracing::warn!(route = name, reason = %trip.reason, detail = %trip.detail, revision = committed, "fleet judge: SLO breached across the fleet; canary weight set to 0 on every replica");
                    self.routes.remove(name);
                    if let Err(error) = state
                        .apply_fleet(name, tripped, committed, false)
                        .await
                    {
                        tracing::error!(route = name, %error, "fleet judge: could not apply its own trip here");
                    }
                }
                None => tracing::info!(
                    route = name,
                    "fleet judge: the route changed, or this replica lost the election, before the trip; judging again"
                ),
            }
        }
        Ok(())
    }

    /// Every (replica, incarnation)'s latest totals for `route`, added up.
    fn sum(&self, route: &str) -> SideReadings {
        let mut sum = SideReadings::default();
        for readings in self.seen.get(route).into_iter().flat_map(HashMap::values) {
            sum.canary.add(&readings.canary);
            sum.stable.add(&readings.stable);
        }
        sum
    }
}

impl RouteEvidence {
    fn new(epoch: u64, sum: &SideReadings, now_ms: u64) -> Self {
        RouteEvidence {
            epoch,
            canary: Ledger::new(Reading::clone(&sum.canary), now_ms),
            stable: Ledger::new(Reading::clone(&sum.stable), now_ms),
        }
    }
}
