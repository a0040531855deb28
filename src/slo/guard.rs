//! The background guard: every 250 ms it judges each route's step so far (see
//! `rules.rs`), trips a breaching route through the state writer, and advances
//! progressive rollouts whose step has been held for its interval with the judge's ok.
//! Every 5 s it also folds histogram samples into buckets (see
//! `telemetry::Registry::upkeep`).

use std::time::Duration;

use tokio::sync::watch;

use super::{Judgement, Verdict};
use crate::state::{LiveRoute, RolloutAction, Snapshot, Source, StateHandle, Trip};
use crate::telemetry::names::{LABEL_ROUTE, LABEL_RULE, SLO_BREACHES_TOTAL};

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

/// One pass over every route: judge the step so far, trip a breach (or report it, in
/// a dry run), and advance a rollout whose step has been held while the judge says ok.
pub async fn evaluate(state: &StateHandle, snapshot: &Snapshot) {
    let frozen = state.freeze().is_some();
    for route in snapshot.routes.iter() {
        if route.canary.is_none() || route.trip.is_some() {
            continue;
        }
        let name = &route.spec.name;
        let mut judged = None;
        if let Some(spec) = &route.spec.slo {
            let before = route.windows.last_judgement();
            let judgement = route.windows.judge(spec);
            publish(state, route, before.as_deref(), &judgement, spec.dry_run);
            if let Some(breach) = judgement
                .rules
                .iter()
                .find(|r| r.verdict == Verdict::Breach)
            {
                if spec.dry_run {
                    continue;
                }
                let trip = Trip {
                    reason: breach.rule.clone(),
                    detail: format!(
                        "{}: {} (confidence {})",
                        breach.rule, breach.summary, spec.confidence
                    ),
                    at: crate::timefmt::now_rfc3339(),
                };
                if let Err(error) = state.trip(name, trip).await {
                    tracing::error!(route = %name, %error, "could not record SLO trip");
                }
                continue;
            }
            judged = Some(judgement);
        }
        let (Some(plan), Some(progress)) = (&route.spec.rollout, &route.rollout) else {
            continue;
        };
        if progress.paused {
            continue;
        }
        let held =
            progress.held_ms + crate::timefmt::unix_ms().saturating_sub(progress.step_started_ms);
        // A step advances only on the judge's "ok": an inconclusive one waits.
        let judge_ok = judged.is_none_or(|j| j.verdict() == Verdict::Ok);
        // Frozen (incident mode): no rollout advances; trips above still apply.
        if frozen {
            continue;
        }
        // Outside its window (allowed_hours) a rollout waits where it is.
        if plan.window.as_ref().is_some_and(|w| !w.is_open_now()) {
            continue;
        }
        // A pause step is a gate: only `promote` passes it.
        let Some(hold) = plan.hold(progress.step) else {
            continue;
        };
        let hold_ms = hold.as_millis() as u64;
        // Held, and waiting on an inconclusive judge past the deadline: paused (or
        // aborted) for a person to look, and the webhooks say so.
        if let Some((deadline, abort)) = plan.progress_deadline {
            if !judge_ok && held >= hold_ms + deadline.as_millis() as u64 {
                let (action, what) = match abort {
                    true => (RolloutAction::Abort, "aborted"),
                    false => (RolloutAction::Pause, "paused"),
                };
                tracing::warn!(route = %name, step = progress.step + 1, waited_s = (held - hold_ms) / 1000, "rollout {what}: the judge stayed inconclusive past the progress deadline");
                if let Err(error) = state.rollout(name, action, Source::Rollout).await {
                    tracing::error!(route = %name, %error, "could not stop a rollout past its progress deadline");
                }
                continue;
            }
        }
        if held >= hold_ms && judge_ok {
            match state.shared.fleet.get() {
                Some(fleet) => fleet.advance(state, name, progress.step),
                None => {
                    if let Err(error) = state.rollout_advance(name, progress.step).await {
                        tracing::error!(route = %name, %error, "could not advance rollout");
                    }
                }
            }
        }
    }
}

/// Moves the verdict gauges, and counts and logs each rule that newly breaches.
fn publish(
    state: &StateHandle,
    route: &LiveRoute,
    before: Option<&Judgement>,
    now: &Judgement,
    dry_run: bool,
) {
    for report in &now.rules {
        if let Some((_, gauge)) = route
            .metrics
            .verdicts
            .iter()
            .find(|(r, _)| *r == report.rule)
        {
            gauge.set(report.verdict.gauge());
        }
        let was_breach = before.is_some_and(|b| {
            b.rules
                .iter()
                .any(|r| r.rule == report.rule && r.verdict == Verdict::Breach)
        });
        if report.verdict != Verdict::Breach || was_breach {
            continue;
        }
        let route_name = route.spec.name.as_str();
        state
            .shared
            .registry
            .counter(
                SLO_BREACHES_TOTAL,
                &[(LABEL_ROUTE, route_name), (LABEL_RULE, &report.rule)],
            )
            .increment(1);
        if dry_run {
            tracing::warn!(
                route = route_name,
                rule = %report.rule,
                evidence = %report.summary,
                "SLO breach (dry run: the canary keeps its weight)"
            );
        }
    }
}
