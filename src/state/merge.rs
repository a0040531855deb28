//! How saved runtime state and the config file combine, at start and on reload.
//!
//! The rules, in order:
//! 1. A tripped route stays tripped at weight 0 whatever the file says; only
//!    `reset` clears a trip.
//! 2. If the file's weight for a route is unchanged since the state was saved, the live
//!    weight (set through the admin API, the CLI or a rollout) wins.
//! 3. If the file's weight changed, the operator edited it on purpose: the file wins.
//! 4. A route with no canary has weight 0. A route that left the file leaves the state.
//! 5. A corrupt state file means nothing is known about what was reverted, so every
//!    canary starts at 0, tripped with reason `corrupt_state`, until an operator resets it.

use std::collections::BTreeMap;

use super::snapshot::Trip;
use super::store::SavedRoute;
use crate::config::Settings;

/// Combines the file with saved state. Returns the new state.
pub fn merge(
    settings: &Settings,
    saved: &BTreeMap<String, SavedRoute>,
    corrupt: Option<&Trip>,
) -> BTreeMap<String, SavedRoute> {
    settings
        .routes
        .iter()
        .map(|spec| {
            let file_weight_bp = spec.file_weight_bp;
            let has_canary = spec.canary.is_some();
            let route = match (saved.get(&spec.name), corrupt) {
                (_, Some(trip)) if has_canary => SavedRoute {
                    weight_bp: 0,
                    file_weight_bp,
                    trip: Some(trip.clone()),
                    rollout: None,
                },
                (Some(old), _) if old.trip.is_some() && has_canary => SavedRoute {
                    weight_bp: 0,
                    file_weight_bp,
                    trip: old.trip.clone(),
                    rollout: None,
                },
                (Some(old), _) if old.file_weight_bp == file_weight_bp && has_canary => {
                    SavedRoute {
                        weight_bp: old.weight_bp,
                        file_weight_bp,
                        trip: None,
                        rollout: old.rollout.clone().filter(|_| spec.rollout.is_some()),
                    }
                }
                _ => SavedRoute {
                    weight_bp: if has_canary { file_weight_bp } else { 0 },
                    file_weight_bp,
                    trip: None,
                    rollout: None,
                },
            };
            (spec.name.clone(), route)
        })
        .collect()
}
