//! How saved runtime state and the config file combine, at start and on reload.
//!
//! The rules, in order:
//! 1. A tripped route stays tripped at weight 0 whatever the file says; only
//!    `reset` clears a trip.
//! 2. If what the canary points at changed (another upstream, or other instances), the
//!    live weight was earned by another version: the route starts at the file's weight.
//! 3. If the file's weight for a route is unchanged since the state was saved, the live
//!    weight (set through the admin API, the CLI or a rollout) wins.
//! 4. If the file's weight changed, the operator edited it on purpose: the file wins
//!    (not with a fleet, where the file's weight only seeds the store).
//! 5. A route with no canary has weight 0. A route that left the file leaves the state.
//! 6. A corrupt state file means nothing is known about what was reverted, so every
//!    canary starts at 0, tripped with reason `corrupt_state`, until an operator resets it.

use std::collections::BTreeMap;

use super::snapshot::Trip;
use super::store::SavedRoute;
use crate::config::{RouteSpec, Settings};

/// The merged state, and why routes changed where a reason is worth an audit line.
pub struct Merged {
    pub routes: BTreeMap<String, SavedRoute>,
    pub notes: BTreeMap<String, String>,
}

/// What a route's canary points at: the upstream's name and its instances as written
/// (sorted, so a reordering is no change; names, so a DNS answer that moves is none).
pub fn canary_target(settings: &Settings, spec: &RouteSpec) -> Option<String> {
    let name = spec.canary.as_ref()?;
    let mut instances = settings
        .upstreams
        .get(name)
        .map(|u| u.instance_names.clone())
        .unwrap_or_default();
    instances.sort();
    Some(format!("{name} [{}]", instances.join(", ")))
}

/// Combines the file with saved state.
pub fn merge(
    settings: &Settings,
    saved: &BTreeMap<String, SavedRoute>,
    corrupt: Option<&Trip>,
) -> Merged {
    // With a fleet the file's weight only seeds a route the store does not know yet:
    // the fleet's weight is the live one (rule 4 does not apply).
    let fleet = settings.fleet.is_some();
    let mut notes = BTreeMap::new();
    let routes = settings
        .routes
        .iter()
        .map(|spec| {
            let file_weight_bp = spec.file_weight_bp;
            let has_canary = spec.canary.is_some();
            let canary = canary_target(settings, spec);
            let old = saved.get(&spec.name);
            let fresh = SavedRoute {
                // How the last rollout ended stays (a reload or restart is not news).
                rollout_end: old.and_then(|o| o.rollout_end.clone()),
                weight_bp: if has_canary { file_weight_bp } else { 0 },
                file_weight_bp,
                trip: None,
                rollout: None,
                canary: canary.clone(),
                // The fleet's bookkeeping is kept whatever the file says.
                epoch: old.map_or(0, |o| o.epoch),
                revision: old.map_or(0, |o| o.revision),
                unpublished: old.is_some_and(|o| o.unpublished),
            };
            let route = match (saved.get(&spec.name), corrupt) {
                (_, Some(trip)) if has_canary => SavedRoute {
                    weight_bp: 0,
                    trip: Some(trip.clone()),
                    ..fresh
                },
                (Some(old), _) if old.trip.is_some() && has_canary => SavedRoute {
                    weight_bp: 0,
                    trip: old.trip.clone(),
                    ..fresh
                },
                (Some(old), _) if has_canary && old.canary.is_some() && old.canary != canary => {
                    notes.insert(
                        spec.name.clone(),
                        format!(
                            "canary changed from {} to {}: starting at the file's weight",
                            old.canary.as_deref().unwrap_or("-"),
                            canary.as_deref().unwrap_or("-"),
                        ),
                    );
                    fresh
                }
                (Some(old), _) if has_canary && (fleet || old.file_weight_bp == file_weight_bp) => {
                    // A step the (edited) plan no longer has ends the rollout where it
                    // stands; the weight stays.
                    let fits = |p: &crate::state::RolloutProgress| {
                        spec.rollout
                            .as_ref()
                            .is_some_and(|plan| p.step <= plan.last())
                    };
                    let rollout = old.rollout.clone().filter(fits);
                    let rollout_end = match (&old.rollout, &rollout) {
                        (Some(was), None) => Some(crate::state::RolloutEnd {
                            outcome: crate::state::RolloutOutcome::Aborted,
                            step: was.step + 1,
                            at: crate::timefmt::now_rfc3339(),
                            why: "aborted: the config's rollout no longer has this step".into(),
                        }),
                        _ => old.rollout_end.clone(),
                    };
                    SavedRoute {
                        weight_bp: old.weight_bp,
                        rollout,
                        rollout_end,
                        ..fresh
                    }
                }
                _ => fresh,
            };
            (spec.name.clone(), route)
        })
        .collect();
    Merged { routes, notes }
}
