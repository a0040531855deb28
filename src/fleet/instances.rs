//! Instance states (ready, drain, maint) shared by the fleet. One key per instance an
//! operator has set, `/splitgate/v1/<cluster>/instances/<upstream>/<addr>`, holding a
//! [`FleetInstance`]. A change through any replica is written to the store (the
//! operator's latest word wins) and applied there once committed; every replica watches
//! the prefix and applies what it sees through its state writer, which persists it.
//! `ready` deletes the key. States set on a replica before it joined a fleet seed the
//! store if it has none; a state this replica applied from the store that the store no
//! longer has was set ready meanwhile.
//!
//! While the store is unreachable, state changes are refused: one applied only here
//! would be overwritten by the store's when it comes back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::EventType;
use serde::{Deserialize, Serialize};

use super::{Applied, Fleet};
use crate::state::{ChangeError, InstanceOrigin, Source, StateHandle};
use crate::upstream::InstanceState;

const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// The value of an instance's key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetInstance {
    pub state: InstanceState,
    /// The replica it was set through, and who asked (`admin`, `cli`).
    #[serde(default)]
    pub by: String,
    #[serde(default)]
    pub source: String,
    /// Unix ms when it was set, for people reading the store.
    #[serde(default)]
    pub at_ms: u64,
}

impl Fleet {
    fn instance_prefix(&self) -> String {
        format!("/splitgate/v1/{}/instances/", self.settings.cluster)
    }

    fn instance_key(&self, upstream: &str, addr: SocketAddr) -> String {
        format!("{}{upstream}/{addr}", self.instance_prefix())
    }

    /// Writes an instance's state to the store (`ready` removes its key); where it now
    /// comes from.
    pub async fn put_instance_state(
        &self,
        upstream: &str,
        addr: SocketAddr,
        state: InstanceState,
        source: Source,
    ) -> Result<InstanceOrigin, ChangeError> {
        let key = self.instance_key(upstream, addr);
        let written = match state {
            InstanceState::Ready => self.store.delete(&key).await,
            _ => {
                let value = FleetInstance {
                    state,
                    by: self.settings.replica.clone(),
                    source: source.as_str().to_string(),
                    at_ms: crate::timefmt::unix_ms(),
                };
                let bytes = serde_json::to_vec(&value).expect("an instance state serializes");
                self.store.put(&key, &bytes).await
            }
        };
        self.store_answered(written.as_ref().map(|_| ()));
        self.instance_changed();
        let revision = written.map_err(|e| ChangeError::StoreUnavailable(e.to_string()))?;
        Ok(InstanceOrigin {
            by: self.settings.replica.clone(),
            revision,
            how: Applied::Committed,
        })
    }
}

pub async fn run(fleet: Arc<Fleet>, state: StateHandle) {
    let mut pause = RETRY_FIRST;
    loop {
        match list_and_watch(&fleet, &state).await {
            Ok(()) => pause = RETRY_FIRST,
            Err(error) => {
                tracing::debug!(%error, "fleet: instance states: listing again");
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
        tokio::time::sleep(pause).await;
    }
}

async fn list_and_watch(fleet: &Fleet, state: &StateHandle) -> Result<(), String> {
    let prefix = fleet.instance_prefix();
    let (kvs, listed_at) = fleet.store.list(&prefix).await.map_err(|e| e.to_string())?;
    for kv in &kvs {
        apply(fleet, state, &prefix, kv, Applied::Listed).await;
    }
    let saved = state.saved_instances().await.map_err(|e| e.to_string())?;
    for (upstream, states) in saved {
        for (addr, saved) in states {
            let key = fleet.instance_key(&upstream, addr);
            if kvs.iter().any(|kv| kv.key() == key.as_bytes()) {
                continue;
            }
            if saved.revision > 0 {
                // Applied from the store once, gone from it since: set ready meanwhile.
                let origin = InstanceOrigin {
                    by: String::new(),
                    revision: listed_at,
                    how: Applied::Listed,
                };
                let _ = state
                    .apply_instance_state(
                        &upstream,
                        addr,
                        InstanceState::Ready,
                        Source::Fleet,
                        Some(origin),
                    )
                    .await;
                continue;
            }
            // Set here before this replica joined a fleet: it seeds the store.
            let value = FleetInstance {
                state: saved.state,
                by: fleet.settings.replica.clone(),
                source: Source::Start.as_str().to_string(),
                at_ms: crate::timefmt::unix_ms(),
            };
            let bytes = serde_json::to_vec(&value).expect("an instance state serializes");
            fleet
                .store
                .put_if(&key, &bytes, 0)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    let mut watch = fleet.follow(&prefix, listed_at + 1).await?;
    while let Some(response) = watch.next().await? {
        for event in response.events() {
            if let Some(kv) = event.kv() {
                match event.event_type() {
                    EventType::Put => apply(fleet, state, &prefix, kv, Applied::Watched).await,
                    EventType::Delete => cleared(fleet, state, &prefix, kv).await,
                }
            }
        }
    }
    Ok(())
}

/// The upstream and address of an instance key.
fn parse_key(prefix: &str, key: &[u8]) -> Option<(String, SocketAddr)> {
    let rest = std::str::from_utf8(key.strip_prefix(prefix.as_bytes())?).ok()?;
    let (upstream, addr) = rest.split_once('/')?;
    Some((upstream.to_string(), addr.parse().ok()?))
}

/// A deleted key: the instance is ready again.
async fn cleared(fleet: &Fleet, state: &StateHandle, prefix: &str, kv: &etcd_client::KeyValue) {
    fleet.instance_changed();
    let Some((upstream, addr)) = parse_key(prefix, kv.key()) else {
        return;
    };
    let origin = InstanceOrigin {
        by: String::new(),
        revision: kv.mod_revision(),
        how: Applied::Watched,
    };
    if let Err(error) = state
        .apply_instance_state(
            &upstream,
            addr,
            InstanceState::Ready,
            Source::Fleet,
            Some(origin),
        )
        .await
    {
        tracing::error!(upstream, instance = %addr, %error, "fleet: could not apply an instance set ready");
    }
}

/// Applies one instance's state (also for an instance this replica does not have yet:
/// kept for when it appears).
async fn apply(
    fleet: &Fleet,
    state: &StateHandle,
    prefix: &str,
    kv: &etcd_client::KeyValue,
    how: Applied,
) {
    fleet.instance_changed();
    let Some((upstream, addr)) = parse_key(prefix, kv.key()) else {
        return;
    };
    let value: FleetInstance = match serde_json::from_slice(kv.value()) {
        Ok(value) => value,
        Err(problem) => {
            tracing::error!(upstream, instance = %addr, %problem, "fleet: unreadable instance state in the store; ignored");
            return;
        }
    };
    let source = Source::from_name(&value.source).unwrap_or(Source::Fleet);
    let origin = InstanceOrigin {
        by: value.by,
        revision: kv.mod_revision(),
        how,
    };
    match state
        .apply_instance_state(&upstream, addr, value.state, source, Some(origin))
        .await
    {
        Ok(_) => {}
        Err(error @ ChangeError::UnknownUpstream(_)) => {
            tracing::debug!(%error, "fleet: instance state for an upstream this replica does not have");
        }
        Err(error) => {
            tracing::error!(upstream, instance = %addr, %error, "fleet: could not apply the store's instance state");
        }
    }
}
