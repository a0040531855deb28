//! The publisher: pushes this replica's unpublished trips and rollbacks to the store,
//! woken when one is made and every second while one is pending, until each lands or
//! turns out stale (the route was reset fleet-wide since: its epoch moved on).
//!
//! What is published is the change, applied to the store's current state (a trip, or
//! weight 0), never this replica's whole state: a rollback made here while cut off
//! must not clear a trip another replica made meanwhile.

use std::sync::Arc;
use std::time::Duration;

use super::{Applied, Fleet, Stored};
use crate::state::{change, Change, ChangeError, FleetRoute, SavedRoute, StateHandle};

const RETRY: Duration = Duration::from_secs(1);

pub async fn run(fleet: Arc<Fleet>, state: StateHandle) {
    loop {
        let _ = tokio::time::timeout(RETRY, fleet.publish.notified()).await;
        let Ok(saved) = state.saved().await else {
            return;
        };
        for (route, local) in saved.iter().filter(|(_, s)| s.unpublished) {
            match publish(&fleet, &state, route, local).await {
                Ok(()) => {}
                // Tried again at the next round.
                Err(ChangeError::StoreUnavailable(_)) => break,
                Err(error) => {
                    tracing::error!(route = %route, %error, "fleet: could not publish a local trip or rollback")
                }
            }
        }
    }
}

async fn publish(
    fleet: &Fleet,
    state: &StateHandle,
    route: &str,
    local: &SavedRoute,
) -> Result<(), ChangeError> {
    let Some(spec) = state
        .shared
        .snapshot
        .load()
        .route(route)
        .map(|r| r.spec.clone())
    else {
        return Ok(());
    };
    let (current, expected, stored) = match fleet.read(route).await? {
        Stored::Value(desired, revision) if desired.epoch > local.epoch => {
            // Reset fleet-wide since: applying the store's state drops the stale one.
            return state
                .apply_fleet(route, *desired, revision, Applied::Listed)
                .await;
        }
        Stored::Value(desired, revision) => (
            super::store_onto_local(&desired, local),
            revision,
            Some(desired),
        ),
        Stored::Absent => (local.clone(), 0, None),
        Stored::Corrupt(_, revision) => (local.clone(), revision, None),
    };
    let (change, source) = match &local.trip {
        Some(trip) => (Change::Trip(trip.clone()), "slo"),
        None => (Change::ForceWeight(local.weight_bp), "rollback"),
    };
    let next = change::apply(&spec, &current, &change, crate::timefmt::unix_ms())?;
    let Some(next) = next.filter(|next| next.weight_bp <= current.weight_bp) else {
        // The store already has it (or lower): take the store's state.
        return match stored {
            Some(desired) => {
                state
                    .apply_fleet(route, *desired, expected, Applied::Listed)
                    .await
            }
            None => Ok(()),
        };
    };
    let value = FleetRoute::from_saved(&next, &fleet.settings.replica, source);
    if let Some(revision) = fleet.write(route, &value, expected).await? {
        tracing::info!(
            route,
            revision,
            source,
            "fleet: published a change made here"
        );
        state
            .apply_fleet(route, value, revision, Applied::Committed)
            .await?;
        fleet.applied(revision);
    }
    Ok(())
}
