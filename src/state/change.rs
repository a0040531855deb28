//! What each change does to a route's saved state, as pure functions: the state writer
//! applies them to `state.json`, and with a fleet the same function is applied to the
//! state read from etcd before the transaction that writes it, so both paths refuse and
//! allow exactly the same things.

use super::{ChangeError, RolloutAction, RolloutProgress, SavedRoute, Trip};
use crate::config::RouteSpec;

/// A change to one route.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    SetWeight(u32),
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
            Change::SetWeight(0) | Change::Trip(_) | Change::Rollout(RolloutAction::Abort)
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
    let mut next = current.clone();
    match change {
        Change::SetWeight(weight_bp) => {
            if spec.canary.is_none() && *weight_bp > 0 {
                return Err(ChangeError::NoCanary(route.to_string()));
            }
            if *weight_bp > 0 {
                tripped(current)?;
            }
            next.weight_bp = *weight_bp;
            // A hand-set weight takes over from a running rollout.
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
            match action {
                RolloutAction::Start => {
                    tripped(current)?;
                    next.rollout = Some(RolloutProgress {
                        step: 0,
                        paused: false,
                        step_started_ms: now_ms,
                        held_ms: 0,
                    });
                    next.weight_bp = plan.steps[0];
                }
                RolloutAction::Pause | RolloutAction::Resume => {
                    let Some(progress) = next.rollout.as_mut() else {
                        return Err(ChangeError::Invalid(format!(
                            "route {route:?} has no rollout running"
                        )));
                    };
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
                    if next.rollout.take().is_none() {
                        return Err(ChangeError::Invalid(format!(
                            "route {route:?} has no rollout running"
                        )));
                    }
                    next.weight_bp = 0;
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
            let next_step = step + 1;
            match plan.steps.get(next_step) {
                Some(&weight_bp) => {
                    next.weight_bp = weight_bp;
                    next.rollout = Some(RolloutProgress {
                        step: next_step,
                        paused: false,
                        step_started_ms: now_ms,
                        held_ms: 0,
                    });
                }
                // The last step has been held: the rollout is complete at its final weight.
                None => next.rollout = None,
            }
        }
    }
    Ok(Some(next))
}
