//! JSON views of routes for `GET /admin/routes`.

use serde::Serialize;

use crate::config::bp_to_percent;
use crate::config::compile::Step;
use crate::slo::{RuleReport, Verdict, WindowStats};
use crate::state::RolloutOutcome;
use crate::state::{LiveRoute, Snapshot};

#[derive(Serialize)]
pub struct RouteView {
    pub name: String,
    pub generation: u64,
    pub stable: String,
    pub canary: Option<String>,
    pub canary_weight: f64,
    pub file_weight: f64,
    pub slo: SloView,
    /// This process's last trips of the route, newest first (at most
    /// [`crate::state::RECENT_TRIPS`]); the audit log has them all.
    pub recent_trips: Vec<crate::state::Trip>,
    pub window: WindowsView,
    pub rollout: Option<RolloutView>,
}

#[derive(Serialize)]
pub struct SloView {
    /// `ok` or `tripped`.
    pub state: &'static str,
    /// The judge's worst verdict over the rules (`ok`, `inconclusive`, `breach`), once
    /// it has judged the route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// Judged and reported, never tripped.
    pub dry_run: bool,
    /// Per rule: verdict, rate, allowed, interval, samples, samples needed, summary.
    pub rules: Vec<RuleReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

#[derive(Serialize)]
pub struct WindowsView {
    /// The time the figures span (the SLO window), for rates.
    pub seconds: f64,
    pub stable: StatsView,
    pub canary: StatsView,
}

#[derive(Serialize)]
pub struct StatsView {
    pub requests: u64,
    pub errors: u64,
    pub error_rate: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

#[derive(Serialize)]
pub struct RolloutView {
    pub steps: Vec<StepView>,
    /// The current step, 1-based (as in `splitgate_rollout_step`), while one runs.
    pub step: Option<usize>,
    /// `idle` (never started), `running`, `paused`, `waiting` (on the judge, or on
    /// `promote` at a pause step), `completed`, `aborted`, `tripped`.
    pub state: &'static str,
    pub running: bool,
    pub paused: bool,
    /// Seconds until the step's hold is over, while running and not paused.
    pub next_step_in_s: Option<f64>,
    /// While `waiting`: on what (`promote`, or what the judge has not yet confirmed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
    /// How the last rollout ended, until another starts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last: Option<crate::state::RolloutEnd>,
    /// When steps may advance (`allowed_hours`), and whether that is now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_hours: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_open: Option<bool>,
}

#[derive(Serialize)]
pub struct StepView {
    /// Percent; `null` at a pause (the weight before it stays).
    pub weight: Option<f64>,
    pub hold_s: Option<f64>,
    pub pause: bool,
}

impl From<WindowStats> for StatsView {
    fn from(s: WindowStats) -> Self {
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        Self {
            requests: s.requests,
            errors: s.errors,
            error_rate: s.error_rate(),
            p50_ms: ms(s.p50),
            p90_ms: ms(s.p90),
            p99_ms: ms(s.p99),
        }
    }
}

pub fn route_view(
    snapshot: &Snapshot,
    route: &LiveRoute,
    freeze: Option<&crate::state::Freeze>,
    recent_trips: Vec<crate::state::Trip>,
) -> RouteView {
    let spec = &route.spec;
    let now = route.windows.now_ms();
    let judgement = route.windows.last_judgement();
    let rollout = spec.rollout.as_ref().map(|plan| {
        let progress = route.rollout.as_ref();
        let remaining_ms = progress.filter(|p| !p.paused).and_then(|p| {
            let hold = plan.hold(p.step)?.as_millis() as u64;
            let held = p.held_ms + crate::timefmt::unix_ms().saturating_sub(p.step_started_ms);
            Some(hold.saturating_sub(held))
        });
        let gate = progress.is_some_and(|p| !p.paused && plan.hold(p.step).is_none());
        let judge = remaining_ms
            .filter(|&ms| ms == 0)
            .and_then(|_| judgement.as_ref()?.waiting_for());
        let frozen = freeze
            .filter(|_| progress.is_some_and(|p| !p.paused))
            .map(|f| format!("the freeze to be lifted ({})", f.reason));
        let closed = plan
            .window
            .as_ref()
            .filter(|w| progress.is_some_and(|p| !p.paused) && !w.is_open_now())
            .map(|w| format!("the rollout window ({})", w.text));
        let waiting_for = match (gate, frozen, closed) {
            (true, _, _) => Some("promote".to_string()),
            (false, Some(frozen), _) => Some(frozen),
            (false, None, Some(closed)) => Some(closed),
            (false, None, None) => judge,
        };
        let last = route.rollout_end.clone();
        let state = match (progress, &last) {
            (Some(p), _) if p.paused => "paused",
            (Some(_), _) if waiting_for.is_some() => "waiting",
            (Some(_), _) => "running",
            (None, _) if route.trip.is_some() => "tripped",
            (None, Some(end)) => match end.outcome {
                RolloutOutcome::Completed => "completed",
                RolloutOutcome::Tripped if route.trip.is_some() => "tripped",
                _ => "aborted",
            },
            (None, None) => "idle",
        };
        RolloutView {
            steps: plan
                .steps
                .iter()
                .map(|step| match step {
                    Step::Weight { bp, hold } => StepView {
                        weight: Some(bp_to_percent(*bp)),
                        hold_s: Some(hold.as_secs_f64()),
                        pause: false,
                    },
                    Step::Pause => StepView {
                        weight: None,
                        hold_s: None,
                        pause: true,
                    },
                })
                .collect(),
            step: progress.map(|p| p.step + 1),
            state,
            running: progress.is_some(),
            paused: progress.is_some_and(|p| p.paused),
            next_step_in_s: remaining_ms.map(|ms| ms as f64 / 1000.0),
            waiting_for,
            last,
            allowed_hours: plan.window.as_ref().map(|w| w.text.clone()),
            window_open: plan.window.as_ref().map(|w| w.is_open_now()),
        }
    });
    let dry_run = spec.slo.as_ref().is_some_and(|s| s.dry_run);
    RouteView {
        name: spec.name.clone(),
        generation: snapshot.generation,
        stable: spec.stable.clone(),
        canary: spec.canary.clone(),
        canary_weight: bp_to_percent(route.weight_bp),
        file_weight: bp_to_percent(spec.file_weight_bp),
        slo: match &route.trip {
            None => SloView {
                state: "ok",
                verdict: judgement.as_ref().map(|j| j.verdict()),
                dry_run,
                rules: judgement.map(|j| j.rules.clone()).unwrap_or_default(),
                reason: None,
                detail: None,
                at: None,
            },
            Some(trip) => SloView {
                state: "tripped",
                verdict: None,
                dry_run,
                rules: Vec::new(),
                reason: Some(trip.reason.clone()),
                detail: Some(trip.detail.clone()),
                at: Some(trip.at.clone()),
            },
        },
        recent_trips,
        window: WindowsView {
            seconds: route.windows.stable.span_ms() as f64 / 1000.0,
            stable: route.windows.stable.stats(now).into(),
            canary: route.windows.canary.stats(now).into(),
        },
        rollout,
    }
}
