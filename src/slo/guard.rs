//! The background guard: every 250 ms it judges each route's canary window, trips a
//! breaching route through the state writer, and advances progressive rollouts whose
//! step has been held for its interval while the SLO held. Every 5 s it also folds
//! histogram samples into buckets (see `telemetry::Registry::upkeep`).

use std::time::Duration;

use tokio::sync::watch;

use super::verdict;
use crate::state::{Snapshot, StateHandle, Trip};

/// How often the windows are judged.
pub const EVALUATION_INTERVAL: Duration = Duration::from_millis(250);

/// How often histogram samples are folded into buckets when nobody scrapes.
const METRICS_UPKEEP_EVERY: u32 = 20;

/// Runs until `shutdown` turns true.
pub async fn run(state: StateHandle, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(EVALUATION_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                evaluate(&state, &state.shared.snapshot.load_full()).await;
                ticks = ticks.wrapping_add(1);
                if ticks.is_multiple_of(METRICS_UPKEEP_EVERY) {
                    state.shared.registry.upkeep();
                }
            }
            _ = crate::server::stopped(&mut shutdown) => return,
        }
    }
}

/// One pass over every route.
pub async fn evaluate(state: &StateHandle, snapshot: &Snapshot) {
    for route in snapshot.routes.iter() {
        if route.canary.is_none() || route.trip.is_some() {
            continue;
        }
        let now = route.windows.now_ms();
        let canary = route.windows.canary.stats(now);
        let stable = route.windows.stable.stats(now);
        let name = &route.spec.name;
        if let Some(spec) = &route.spec.slo {
            if let Some(breach) = verdict::judge(spec, &canary, &stable) {
                let trip = Trip {
                    reason: breach.reason.to_string(),
                    detail: breach.detail,
                    at: crate::timefmt::now_rfc3339(),
                };
                if let Err(error) = state.trip(name, trip).await {
                    tracing::error!(route = %name, %error, "could not record SLO trip");
                }
                continue;
            }
        }
        let (Some(plan), Some(progress)) = (&route.spec.rollout, &route.rollout) else {
            continue;
        };
        if progress.paused {
            continue;
        }
        let held =
            progress.held_ms + crate::timefmt::unix_ms().saturating_sub(progress.step_started_ms);
        let slo_holds = route
            .spec
            .slo
            .as_ref()
            .is_none_or(|spec| verdict::has_enough(spec, &canary));
        if held >= plan.interval.as_millis() as u64 && slo_holds {
            if let Err(error) = state.rollout_advance(name, progress.step).await {
                tracing::error!(route = %name, %error, "could not advance rollout");
            }
        }
    }
}
