//! The fleet judge: one replica, elected through a key bound to its lease, sums every
//! replica's running totals and judges the sum with the single node's judge
//! (`slo::rules::judge`, the same sequential test and error budget), so a bad canary
//! spread thinly over many replicas is caught even when each replica's own slice is
//! below `min_requests`. It trips through a transaction fenced on the election key's
//! create revision: a judge that lost its lease (cut off, paused) cannot write. Each
//! replica's own guard stays armed.
//!
//! Counting: each (replica, incarnation) contributes only what its totals gained since
//! this judge first saw it, so a member that reappears after a partition brings no old
//! traffic in as new evidence; totals that went down (a reload rebuilt the route's
//! windows) start a new count rather than erasing the old one; a member that left keeps
//! what it contributed. The sum therefore only grows.

use std::collections::HashMap;
use std::time::Instant;

use super::heartbeat::{MemberRecord, SideReadings};
use super::Fleet;
use crate::slo::evidence::{Ledger, Reading};
use crate::slo::rules::{self, Verdict};
use crate::state::{FleetRoute, Source, StateHandle, Trip};
use crate::telemetry::names::{LABEL_REASON, LABEL_ROUTE, SLO_TRIPS_TOTAL};

#[derive(Default)]
pub struct Judge {
    /// While this replica judges: the lease its election key is bound to, and the key's
    /// create revision (the fence every trip compares).
    held: Option<(i64, i64)>,
    /// Per route: what each (replica, incarnation) contributed, and what members that
    /// left contributed.
    counts: HashMap<String, RouteCounts>,
    routes: HashMap<String, RouteEvidence>,
    clock: Option<Instant>,
}

#[derive(Default)]
struct RouteCounts {
    members: HashMap<(String, u64), MemberCount>,
    departed: SideReadings,
}

/// One (replica, incarnation)'s contribution to a route's sum.
struct MemberCount {
    last: SideReadings,
    gained: SideReadings,
}

/// The evidence of one route since its current fleet epoch began (or since this
/// replica became the judge, or its canary changed).
struct RouteEvidence {
    epoch: u64,
    canary_target: Option<String>,
    canary: Ledger,
    stable: Ledger,
}

impl Judge {
    /// Stops judging: the lease is gone (a new one was granted), or the key is someone
    /// else's.
    fn step_down(&mut self, fleet: &Fleet, why: &str) {
        if self.held.take().is_some() {
            tracing::warn!(replica = %fleet.settings.replica, why, "fleet judge: this replica no longer judges");
        }
        self.routes.clear();
    }

    fn now_ms(&mut self) -> u64 {
        self.clock
            .get_or_insert_with(Instant::now)
            .elapsed()
            .as_millis() as u64
    }

    /// One round with this replica's live `lease`.
    pub async fn tick(&mut self, fleet: &Fleet, state: &StateHandle, lease: i64) {
        if let Err(error) = self.try_tick(fleet, state, lease).await {
            // Transient: the election key lives as long as the lease, so this replica
            // still judges at the next round.
            tracing::warn!(%error, "fleet judge: this round failed");
        }
    }

    /// Whether this replica judges now: holds the election key under `lease`, winning
    /// it if nobody holds it, or taking it back after a round that failed half-way.
    async fn elected(
        &mut self,
        fleet: &Fleet,
        lease: i64,
    ) -> Result<Option<i64>, super::StoreError> {
        let key = fleet.judge_key();
        if let Some((held_lease, fence)) = self.held {
            if held_lease == lease {
                match fleet.store.key_owner(&key).await? {
                    Some((created, owner)) if created == fence && owner == lease => {
                        return Ok(Some(fence))
                    }
                    _ => self.step_down(fleet, "the election key is gone or someone else's"),
                }
            } else {
                self.step_down(fleet, "this replica's lease expired");
            }
        }
        let name = fleet.settings.replica.as_bytes();
        let fence = match fleet.store.create_with_lease(&key, name, lease).await? {
            Some(revision) => revision,
            // Held under this very lease (a create that committed but whose answer was
            // lost): it is ours.
            None => match fleet.store.key_owner(&key).await? {
                Some((created, owner)) if owner == lease => created,
                _ => return Ok(None),
            },
        };
        tracing::info!(replica = %fleet.settings.replica, fence, "fleet judge: this replica judges the fleet's canaries");
        self.held = Some((lease, fence));
        self.routes.clear();
        Ok(Some(fence))
    }

    async fn try_tick(
        &mut self,
        fleet: &Fleet,
        state: &StateHandle,
        lease: i64,
    ) -> Result<(), super::StoreError> {
        let Some(fence) = self.elected(fleet, lease).await? else {
            return Ok(());
        };
        let (kvs, _) = fleet.store.list(&fleet.member_prefix()).await?;
        let records: Vec<MemberRecord> = kvs
            .iter()
            .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
            .collect();
        self.count(&records);
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
            let canary_target = crate::state::merge::canary_target(&snapshot.settings, &route.spec);
            let sum = self.sum(name);
            let now = self.now_ms();
            let evidence = self
                .routes
                .entry(name.to_string())
                .or_insert_with(|| RouteEvidence::new(desired.epoch, &canary_target, &sum, now));
            // A fleet-wide reset or a new canary version: judged on what comes after.
            if evidence.epoch != desired.epoch || evidence.canary_target != canary_target {
                *evidence = RouteEvidence::new(desired.epoch, &canary_target, &sum, now);
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
                    records.len(),
                    breach.rule,
                    breach.summary,
                    spec.confidence
                ),
                at: crate::timefmt::now_rfc3339(),
            };
            let rollout_end = desired
                .rollout
                .as_ref()
                .map(|progress| crate::state::RolloutEnd {
                    outcome: crate::state::RolloutOutcome::Tripped,
                    step: progress.step + 1,
                    at: trip.at.clone(),
                    why: format!("SLO trip: {}", trip.detail),
                });
            let tripped = FleetRoute {
                weight_bp: 0,
                trip: Some(trip.clone()),
                rollout: None,
                rollout_end: rollout_end.or(desired.rollout_end.clone()),
                epoch: desired.epoch,
                by: fleet.settings.replica.clone(),
                source: Source::Slo.as_str().to_string(),
            };
            let bytes = serde_json::to_vec(&tripped).expect("a route state serializes");
            let key = fleet.judge_key();
            match fleet
                .store
                .put_fenced(&fleet.route_key(name), &bytes, revision, &key, fence)
                .await?
            {
                Some(committed) => {
                    tracing::warn!(route = name, reason = %trip.reason, detail = %trip.detail, revision = committed, "fleet judge: SLO breached across the fleet; canary weight set to 0 on every replica");
                    state
                        .shared
                        .registry
                        .counter(
                            SLO_TRIPS_TOTAL,
                            &[(LABEL_ROUTE, name), (LABEL_REASON, &trip.reason)],
                        )
                        .increment(1);
                    self.routes.remove(name);
                    if let Err(error) = state
                        .apply_fleet(name, tripped, committed, super::Applied::Committed)
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

    /// Adds what each member's totals gained since the last round.
    fn count(&mut self, records: &[MemberRecord]) {
        for (route, counts) in self.counts.iter_mut() {
            // Members gone from the store keep what they contributed.
            let gone: Vec<(String, u64)> = counts
                .members
                .keys()
                .filter(|(replica, incarnation)| {
                    !records.iter().any(|r| {
                        &r.replica == replica
                            && r.incarnation == *incarnation
                            && r.routes.contains_key(route)
                    })
                })
                .cloned()
                .collect();
            for key in gone {
                if let Some(member) = counts.members.remove(&key) {
                    counts.departed.canary.add(&member.gained.canary);
                    counts.departed.stable.add(&member.gained.stable);
                }
            }
        }
        for record in records {
            for (route, now) in &record.routes {
                let counts = self.counts.entry(route.clone()).or_default();
                let key = (record.replica.clone(), record.incarnation);
                match counts.members.get_mut(&key) {
                    // First seen: only what comes after counts.
                    None => {
                        counts.members.insert(
                            key,
                            MemberCount {
                                last: now.clone(),
                                gained: SideReadings::default(),
                            },
                        );
                    }
                    Some(member) => {
                        let restarted = now.canary.requests < member.last.canary.requests
                            || now.stable.requests < member.last.stable.requests;
                        let (canary, stable) = if restarted {
                            // The route's windows were rebuilt (a reload): counting
                            // starts again from zero.
                            (now.canary.clone(), now.stable.clone())
                        } else {
                            (
                                now.canary.since(&member.last.canary),
                                now.stable.since(&member.last.stable),
                            )
                        };
                        member.gained.canary.add(&canary);
                        member.gained.stable.add(&stable);
                        member.last = now.clone();
                    }
                }
            }
        }
    }

    /// What every member contributed to `route`, added up.
    fn sum(&self, route: &str) -> SideReadings {
        let mut sum = SideReadings::default();
        if let Some(counts) = self.counts.get(route) {
            sum.canary.add(&counts.departed.canary);
            sum.stable.add(&counts.departed.stable);
            for member in counts.members.values() {
                sum.canary.add(&member.gained.canary);
                sum.stable.add(&member.gained.stable);
            }
        }
        sum
    }
}

impl RouteEvidence {
    fn new(epoch: u64, canary_target: &Option<String>, sum: &SideReadings, now_ms: u64) -> Self {
        RouteEvidence {
            epoch,
            canary_target: canary_target.clone(),
            canary: Ledger::new(Reading::clone(&sum.canary), now_ms),
            stable: Ledger::new(Reading::clone(&sum.stable), now_ms),
        }
    }
}
