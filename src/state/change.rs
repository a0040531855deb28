//! What each change does to a route's saved state, as pure functions: the state writer
//! applies them to `state.json`, and with a fleet the same function is applied to the
//! state read from etcd before the transaction that writes it, so both paths refuse and
//! allow exactly the same things.

use super::{
    ChangeError, RolloutAction, RolloutEnd, RolloutOutcome, RolloutProgress, SavedRoute, Trip,
};
use crate::config::compile::{RolloutSpec, Step};
use crate::config::{bp_to_percent, RouteSpec};

/// A change to one route.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// A weight set by hand: refused while a rollout runs, except 0 (a rollback), which
    /// ends it.
    SetWeight(u32),
    /// A weight set by hand that ends a running rollout (`weight --force`).
    ForceWeight(u32),
    Reset,
    Rollout(RolloutAction),
    /// The rollout driver moving on from this (0-based) step.
    Advance(usize),
    Trip(Trip),
}

impl Change {
    /// A change that only moves users back to stable: with a fleet whose store is
    /// unreachable it still applies locally and is published later. Everything else
    /// needs the store.
    pub fn lowers_exposure(&self) -> bool {
        matches!(
            self,
            Change::SetWeight(0)
                | Change::ForceWeight(0)
                | Change::Trip(_)
                | Change::Rollout(RolloutAction::Abort)
        )
    }
}

/// The route's state after `change`, or `None` when it changes nothing (a trip of a
/// tripped route, a stale rollout step).
pub fn apply(
    spec: &RouteSpec,
    current: &SavedRoute,
    change: &Change,
    now_ms: u64,
) -> Result<Option<SavedRoute>, ChangeError> {
    let route = spec.name.as_str();
    let tripped = |current: &SavedRoute| match &current.trip {
        Some(trip) => Err(ChangeError::Tripped {
            route: route.to_string(),
            reason: trip.reason.clone(),
        }),
        None => Ok(()),
    };
    let at_step = |progress: &RolloutProgress| {
        let steps = spec.rollout.as_ref().map_or(0, |p| p.steps.len());
        format!("step {} of {steps}", progress.step + 1)
    };
    let ended = |outcome, progress: &RolloutProgress, why: String| RolloutEnd {
        outcome,
        step: progress.step + 1,
        at: crate::timefmt::rfc3339(now_ms),
        why,
    };
    let mut next = current.clone();
    match change {
        Change::SetWeight(weight_bp) | Change::ForceWeight(weight_bp) => {
            if spec.canary.is_none() && *weight_bp > 0 {
                return Err(ChangeError::NoCanary(route.to_string()));
            }
            if *weight_bp > 0 {
                tripped(current)?;
            }
            if let Some(progress) = &current.rollout {
                let forced = matches!(change, Change::ForceWeight(_));
                if *weight_bp > 0 && !forced {
                    return Err(ChangeError::RolloutRunning(
                        route.to_string(),
                        at_step(progress),
                    ));
                }
                let why = match *weight_bp {
                    0 => "aborted: rolled back to 0%".to_string(),
                    bp => format!(
                        "aborted: weight set by hand to {}% (--force)",
                        bp_to_percent(bp)
                    ),
                };
                next.rollout_end = Some(ended(RolloutOutcome::Aborted, progress, why));
            }
            next.weight_bp = *weight_bp;
            next.rollout = None;
        }
        Change::Reset => {
            next.trip = None;
            // A trip made before this reset (by a replica cut off from the fleet) is
            // recognised by its older epoch and never re-applied.
            next.epoch += 1;
        }
        Change::Trip(trip) => {
            if current.trip.is_some() {
                return Ok(None);
            }
            if let Some(progress) = &current.rollout {
                let why = format!("SLO trip: {}", trip.detail);
                next.rollout_end = Some(ended(RolloutOutcome::Tripped, progress, why));
            }
            next.weight_bp = 0;
            next.rollout = None;
            next.trip = Some(trip.clone());
        }
        Change::Rollout(action) => {
            let Some(plan) = &spec.rollout else {
                return Err(ChangeError::Invalid(format!(
                    "route {route:?} has no [routes.rollout] in the config"
                )));
            };
            let not_running =
                || ChangeError::Invalid(format!("route {route:?} has no rollout running"));
            match action {
                RolloutAction::Start { .. } | RolloutAction::Retry => {
                    tripped(current)?;
                    if let Some(progress) = &current.rollout {
                        return Err(ChangeError::RolloutRunning(
                            route.to_string(),
                            at_step(progress),
                        ));
                    }
                    let first = plan.weight_at(0);
                    if *action == RolloutAction::Retry
                        && !current
                            .rollout_end
                            .as_ref()
                            .is_some_and(|end| end.outcome != RolloutOutcome::Completed)
                    {
                        return Err(ChangeError::Refused(format!(
                            "route {route:?}: retry follows an aborted or tripped rollout; use start"
                        )));
                    }
                    let (step, weight_bp) = match action {
                        RolloutAction::Start { from_current: true } => {
                            from_current(plan, current.weight_bp).ok_or_else(|| {
                                ChangeError::Refused(format!(
                                    "route {route:?} is at {}%, above the rollout's last step ({}%): there is nothing to roll out",
                                    bp_to_percent(current.weight_bp),
                                    bp_to_percent(plan.weight_at(plan.last()))
                                ))
                            })?
                        }
                        _ if current.weight_bp > first => {
                            return Err(ChangeError::Refused(format!(
                                "route {route:?} is at {}%, above step 1 ({}%): starting would move users back to stable; start --from-current begins at the first step at or above {}%",
                                bp_to_percent(current.weight_bp),
                                bp_to_percent(first),
                                bp_to_percent(current.weight_bp)
                            )))
                        }
                        _ => (0, first),
                    };
                    next.rollout = Some(RolloutProgress {
                        step,
                        paused: false,
                        step_started_ms: now_ms,
                        held_ms: 0,
                    });
                    next.rollout_end = None;
                    next.weight_bp = weight_bp;
                }
                RolloutAction::Pause | RolloutAction::Resume => {
                    let progress = next.rollout.as_mut().ok_or_else(not_running)?;
                    let pause = *action == RolloutAction::Pause;
                    if progress.paused != pause {
                        if pause {
                            progress.held_ms += now_ms.saturating_sub(progress.step_started_ms);
                        } else {
                            progress.step_started_ms = now_ms;
                        }
                        progress.paused = pause;
                    }
                }
                RolloutAction::Abort => {
                    let progress = next.rollout.take().ok_or_else(not_running)?;
                    next.rollout_end = Some(ended(
                        RolloutOutcome::Aborted,
                        &progress,
                        "aborted: weight 0".to_string(),
                    ));
                    next.weight_bp = 0;
                }
                RolloutAction::Promote { full, seen } => {
                    let progress = current.rollout.as_ref().ok_or_else(not_running)?;
                    tripped(current)?;
                    if let Some(seen) = seen.filter(|&s| s != progress.step + 1) {
                        return Err(ChangeError::Refused(format!(
                            "route {route:?}: the rollout moved on from step {seen} to {} meanwhile; look again before promoting",
                            progress.step + 1
                        )));
                    }
                    // An operator's pause (on-call looking at something) is not a gate
                    // a pipeline may open.
                    if progress.paused {
                        return Err(ChangeError::Refused(format!(
                            "route {route:?}: the rollout is paused by an operator ({}); resume it first",
                            at_step(progress)
                        )));
                    }
                    let to = if *full {
                        plan.last()
                    } else {
                        progress.step + 1
                    };
                    enter(plan, &mut next, progress, to, now_ms);
                }
            }
        }
        Change::Advance(step) => {
            let (Some(plan), Some(progress)) = (&spec.rollout, &current.rollout) else {
                return Ok(None);
            };
            if progress.step != *step || progress.paused || current.trip.is_some() {
                return Ok(None);
            }
            enter(plan, &mut next, progress, step + 1, now_ms);
        }
    }
    Ok(Some(next))
}

/// Where `start --from-current` begins with the live weight at `live_bp`: the first
/// step at or above it; or, when a pause comes first (the live weight is past the steps
/// before it), that pause with the live weight kept: a gate is never skipped. `None`
/// above the last step.
fn from_current(plan: &RolloutSpec, live_bp: u32) -> Option<(usize, u32)> {
    for (i, step) in plan.steps.iter().enumerate() {
        match *step {
            Step::Weight { bp, .. } if bp >= live_bp => return Some((i, bp)),
            Step::Pause => return Some((i, live_bp)),
            Step::Weight { .. } => {}
        }
    }
    None
}

/// Moves a running rollout to step `to` (0-based): its weight (a pause keeps the one
/// before it), its hold starting now. Past the last step, the rollout has completed at
/// its final weight.
fn enter(
    plan: &RolloutSpec,
    next: &mut SavedRoute,
    progress: &RolloutProgress,
    to: usize,
    now_ms: u64,
) {
    if to > plan.last() {
        next.rollout = None;
        next.weight_bp = plan.weight_at(plan.last());
        next.rollout_end = Some(RolloutEnd {
            outcome: RolloutOutcome::Completed,
            step: plan.steps.len(),
            at: crate::timefmt::rfc3339(now_ms),
            why: format!("completed at {}%", bp_to_percent(next.weight_bp)),
        });
        return;
    }
    next.weight_bp = plan.weight_at(to);
    next.rollout = Some(RolloutProgress {
        step: to,
        paused: progress.paused && to == progress.step,
        step_started_ms: now_ms,
        held_ms: 0,
    });
}
