//! The publisher: pushes this replica's unpublished trips and rollbacks to the store,
//! woken when one is made and every second while one is pending, until each lands or
//! turns out stale (the route was reset fleet-wide since: its epoch moved on).

use std::sync::Arc;
use std::time::Duration;

use super::Fleet;
use crate::state::{ChangeError, FleetRoute, SavedRoute, Source, StateHandle};

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
    let read = fleet.read(route).await?;
    if let Some((desired, revision)) = &read {
        if desired.epoch > local.epoch {
            // Reset fleet-wide since: applying the store's state drops the stale one.
            return state
                .apply_fleet(route, desired.clone(), *revision, Source::Fleet)
                .await;
        }
    }
    let source = if local.trip.is_some() {
        "slo"
    } else {
        "rollback"
    };
    let value = FleetRoute::from_saved(local, &fleet.settings.replica, source);
    let expected = read.as_ref().map_or(0, |(_, revision)| *revision);
    if let Some(revision) = fleet.write(route, &value, expected).await? {
        tracing::info!(
            route,
            revision,
            source,
            "fleet: published a change made here"
        );
        fleet.applied(revision);
        state
            .apply_fleet(route, value, revision, Source::Fleet)
            .await?;
    }
    Ok(())
}
