//! The watch: lists the fleet's routes, applies each, seeds the store with the routes
//! it does not know yet, then watches the prefix from the listed revision on. When the
//! watch ends (the store went away, this replica was cut off, or the revision it needs
//! was compacted) it lists again, which also catches up on everything missed.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::EventType;

use super::{Applied, Fleet};
use crate::state::{FleetRoute, Source, StateHandle};

/// Pause between two attempts while the store is unreachable (doubles to the maximum).
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);

pub async fn run(fleet: Arc<Fleet>, state: StateHandle) {
    let mut pause = RETRY_FIRST;
    loop {
        match list_and_watch(&fleet, &state).await {
            Ok(()) => pause = RETRY_FIRST,
            Err(error) => {
                fleet.mark_synced(false);
                fleet.store_answered(Err(&super::StoreError::from(error)));
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
        tokio::time::sleep(pause).await;
    }
}

/// One listing and the watch that follows it; returns when the watch ends.
async fn list_and_watch(fleet: &Fleet, state: &StateHandle) -> Result<(), String> {
    let prefix = fleet.prefix();
    let (kvs, listed_at) = fleet.store.list(&prefix).await.map_err(|e| e.to_string())?;
    fleet.store_answered(Ok(()));
    let saved = state.saved().await.map_err(|e| e.to_string())?;
    for (route, local) in &saved {
        let key = fleet.route_key(route);
        match kvs.iter().find(|kv| kv.key() == key.as_bytes()) {
            Some(kv) => {
                apply(fleet, state, &prefix, kv, Applied::Listed).await;
            }
            None => seed(fleet, state, route, local).await?,
        }
    }
    // The revision of the newest route state, not the listing's (which counts every
    // write, heartbeats included): replicas that agree show the same figure.
    if let Some(newest) = kvs.iter().map(|kv| kv.mod_revision()).max() {
        fleet.applied(newest);
    }
    fleet.mark_synced(true);
    // A trip or rollback made while the store was away goes out now.
    fleet.publish_soon();

    let mut watch = fleet.follow(&prefix, listed_at + 1).await?;
    while let Some(response) = watch.next().await? {
        for event in response.events() {
            let (EventType::Put, Some(kv)) = (event.event_type(), event.kv()) else {
                continue;
            };
            if !apply(fleet, state, &prefix, kv, Applied::Watched).await {
                // Listing again retries it.
                return Err(format!(
                    "could not apply revision {}; listing again",
                    kv.mod_revision()
                ));
            }
        }
    }
    Ok(())
}

/// Applies one route's value; false when this replica could not (see the log).
async fn apply(
    fleet: &Fleet,
    state: &StateHandle,
    prefix: &str,
    kv: &etcd_client::KeyValue,
    how: Applied,
) -> bool {
    let revision = kv.mod_revision();
    let Some(route) = kv
        .key()
        .strip_prefix(prefix.as_bytes())
        .and_then(|r| std::str::from_utf8(r).ok())
    else {
        return true;
    };
    let desired = match FleetRoute::parse(kv.value()) {
        Ok(desired) => desired,
        Err(problem) => {
            tracing::error!(route, revision, %problem, "fleet: unreadable route state in the store; this replica keeps its own until a valid one is written");
            return true;
        }
    };
    match state.apply_fleet(route, desired, revision, how).await {
        Ok(()) => {
            fleet.applied(revision);
            true
        }
        Err(error) => {
            tracing::error!(route, revision, %error, "fleet: could not apply the store's route state");
            // Applied in memory all the same: only the disk refused.
            matches!(error, crate::state::ChangeError::NotSaved { .. })
        }
    }
}

/// A route the store does not know yet starts from this replica's state (the file's
/// weight on a first start). Only created if still absent: another replica may seed it
/// first, and the watch then brings its value.
async fn seed(
    fleet: &Fleet,
    state: &StateHandle,
    route: &str,
    local: &crate::state::SavedRoute,
) -> Result<(), String> {
    let value = FleetRoute::from_saved(local, &fleet.settings.replica, Source::Start.as_str());
    if let Some(revision) = fleet
        .write(route, &value, 0)
        .await
        .map_err(|e| e.to_string())?
    {
        tracing::info!(
            route,
            revision,
            weight_bp = value.weight_bp,
            "fleet: seeded the store with this replica's route state"
        );
        if let Err(error) = state
            .apply_fleet(route, value, revision, Applied::Committed)
            .await
        {
            tracing::error!(route, %error, "fleet: could not apply the seeded state");
        }
    }
    Ok(())
}
