//! The SLO guard: per-route rolling windows for both sides (`window.rs`) and running
//! totals (`evidence.rs`), recorded on every request; the judge (`sequential.rs`, the
//! test; `rules.rs`, the rules), pure; and the background guard that runs it.

pub mod evidence;
pub mod guard;
pub mod rules;
pub mod sequential;
pub mod window;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

pub use rules::{RuleReport, Verdict};
pub use window::{Window, WindowStats};

use crate::config::SloSpec;
use crate::proxy::split::Variant;
use crate::telemetry::Outcome;
use evidence::{Ledger, SideTotals};

/// Default window when a route has no `[routes.slo]`: its figures still show in the
/// admin API.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);

/// Both sides' windows and totals of one route, the clock they share, and the judge's
/// state (only the guard writes it; the admin API reads its last report).
pub struct RouteWindows {
    origin: Instant,
    count_4xx: bool,
    pub stable: Window,
    pub canary: Window,
    /// The absolute latency limits the totals count slow requests against.
    limits: Box<[Duration]>,
    stable_totals: SideTotals,
    canary_totals: SideTotals,
    /// Bumped when the canary's evidence starts over (a reset, a new canary version).
    /// Weight changes do not restart it: whether a request is bad does not depend on
    /// the weight, so one e-process covers a whole rollout with one error budget.
    step: AtomicU64,
    /// The totals when the latest step began, taken by the state writer as it made the
    /// change (so requests before it never count towards the new step).
    step_base: Mutex<Option<StepBase>>,
    judge: Mutex<Option<JudgeState>>,
}

/// Where a step's evidence starts.
struct StepBase {
    step: u64,
    at_ms: u64,
    canary: evidence::Reading,
    stable: evidence::Reading,
}

/// What the judge said about a route's current step.
#[derive(Debug, Clone)]
pub struct Judgement {
    pub rules: Vec<RuleReport>,
}

impl Judgement {
    /// The worst verdict of any rule.
    pub fn verdict(&self) -> Verdict {
        self.rules
            .iter()
            .map(|r| r.verdict)
            .max()
            .unwrap_or(Verdict::Ok)
    }

    /// The first rule that is not `ok`, in words (what a rollout is waiting for).
    pub fn waiting_for(&self) -> Option<String> {
        self.rules
            .iter()
            .find(|r| r.verdict != Verdict::Ok)
            .map(|r| format!("{}: {}, {}", r.rule, r.verdict.as_str(), r.summary))
    }
}

/// The evidence of the current step.
struct JudgeState {
    step: u64,
    canary: Ledger,
    stable: Ledger,
    last: Arc<Judgement>,
}

impl RouteWindows {
    /// Windows and totals for a route with `spec`, sharded `shards` ways (one per
    /// worker).
    pub fn new(spec: Option<&SloSpec>, shards: usize) -> Self {
        let length = spec.map_or(DEFAULT_WINDOW, |s| s.window);
        let limits: Box<[Duration]> = spec
            .map(|s| s.latency.iter().map(|l| l.limit).collect())
            .unwrap_or_default();
        let histogram = spec.is_some_and(|s| !s.latency_ratio.is_empty());
        Self {
            origin: Instant::now(),
            count_4xx: spec.is_some_and(|s| s.count_4xx),
            stable: Window::new(length, shards),
            canary: Window::new(length, shards),
            stable_totals: SideTotals::new(limits.len(), histogram, shards),
            canary_totals: SideTotals::new(limits.len(), histogram, shards),
            limits,
            step: AtomicU64::new(0),
            step_base: Mutex::new(None),
            judge: Mutex::new(None),
        }
    }

    /// The running totals of the canary and the stable side (what a replica publishes
    /// to the fleet judge).
    pub fn totals(&self) -> (evidence::Reading, evidence::Reading) {
        (self.canary_totals.read(), self.stable_totals.read())
    }

    /// Milliseconds on this route's window clock.
    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// The evidence step requests routed now belong to (see `record_in_step`).
    pub fn current_step(&self) -> u64 {
        self.step.load(Ordering::Relaxed)
    }

    /// Records one finished request in the current step.
    pub fn record(&self, variant: Variant, outcome: Outcome, latency: Duration) {
        self.record_in_step(variant, outcome, latency, self.current_step());
    }

    /// Records one finished request that was routed in `step`. A request routed before
    /// the evidence started over (to the previous canary version, say) still shows in
    /// the window figures but is never held against the new step.
    pub fn record_in_step(&self, variant: Variant, outcome: Outcome, latency: Duration, step: u64) {
        let error = match outcome {
            Outcome::Error(_) => true,
            Outcome::Grpc { failed } => failed,
            Outcome::Status(status) => {
                status >= 500 || (self.count_4xx && (400..500).contains(&status))
            }
        };
        let (window, totals) = match variant {
            Variant::Stable => (&self.stable, &self.stable_totals),
            Variant::Canary => (&self.canary, &self.canary_totals),
        };
        window.record(self.now_ms(), error, latency);
        if step == self.current_step() {
            totals.record(error, latency, &self.limits);
        }
    }

    /// Starts the canary's evidence over, window figures included (a reset, or a new
    /// canary version): the judge weighs only what comes after. Called by the state
    /// writer as it makes the change.
    pub fn restart_evidence(&self) {
        self.canary.clear(self.now_ms());
        // The last judgement was about the old evidence: show none until the next.
        if let Some(state) = self.state().as_mut() {
            state.last = Arc::new(Judgement { rules: Vec::new() });
        }
        // The step and its base change together, under the lock the judge reads them
        // under, so the judge never pairs a new step with an old base.
        let mut base = self.step_base.lock().unwrap_or_else(|p| p.into_inner());
        let step = self.step.fetch_add(1, Ordering::Relaxed) + 1;
        *base = Some(StepBase {
            step,
            at_ms: self.now_ms(),
            canary: self.canary_totals.read(),
            stable: self.stable_totals.read(),
        });
    }

    fn state(&self) -> std::sync::MutexGuard<'_, Option<JudgeState>> {
        self.judge.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the step's evidence up to date and judges it. For the guard.
    pub fn judge(&self, spec: &SloSpec) -> Arc<Judgement> {
        let now = self.now_ms();
        let epoch_ms = spec.window.as_millis() as u64;
        let mut state = self.state();
        let base = self.step_base.lock().unwrap_or_else(|p| p.into_inner());
        let step = self.step.load(Ordering::Relaxed);
        let (canary, stable) = (self.canary_totals.read(), self.stable_totals.read());
        if state.as_ref().is_none_or(|current| current.step != step) {
            // The step's evidence starts where the writer marked it; the first step
            // of these windows starts at their creation.
            let (canary_base, stable_base, at_ms) = match base.as_ref() {
                Some(base) if base.step == step => {
                    (base.canary.clone(), base.stable.clone(), base.at_ms)
                }
                _ if step == 0 => Default::default(),
                _ => (canary.clone(), stable.clone(), now),
            };
            *state = Some(JudgeState {
                step,
                canary: Ledger::new(canary_base, at_ms),
                stable: Ledger::new(stable_base, at_ms),
                last: Arc::new(Judgement { rules: Vec::new() }),
            });
        }
        let current = state.as_mut().expect("set above");
        current.canary.update(canary, now, epoch_ms);
        current.stable.update(stable, now, epoch_ms);
        current.last = Arc::new(Judgement {
            rules: rules::judge(spec, &current.canary, &current.stable),
        });
        current.last.clone()
    }

    /// The guard's last judgement, if it has judged this route.
    pub fn last_judgement(&self) -> Option<Arc<Judgement>> {
        self.state().as_ref().map(|s| s.last.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::compile::LatencyLimit;

    fn spec() -> SloSpec {
        SloSpec {
            window: Duration::from_secs(60),
            min_requests: 1,
            confidence: 0.99,
            dry_run: false,
            max_error_rate: Some(0.05),
            max_error_rate_increase: None,
            latency: vec![LatencyLimit {
                quantile: 0.99,
                limit: Duration::from_millis(500),
            }],
            latency_ratio: Vec::new(),
            count_4xx: false,
        }
    }

    /// A request routed before a reset (or to the previous canary version) finishes
    /// after it: it must not count towards the new evidence.
    #[tokio::test]
    async fn requests_routed_before_the_evidence_restarted_do_not_count() {
        let spec = spec();
        let windows = RouteWindows::new(Some(&spec), 2);
        let in_flight = windows.current_step();
        windows.record(
            Variant::Canary,
            Outcome::Status(500),
            Duration::from_millis(5),
        );
        assert_eq!(windows.judge(&spec).rules[0].bad, 1);
        windows.restart_evidence();
        assert!(windows.last_judgement().is_none_or(|j| j.rules.is_empty()));
        windows.record_in_step(
            Variant::Canary,
            Outcome::Status(500),
            Duration::from_millis(900),
            in_flight,
        );
        windows.record(
            Variant::Canary,
            Outcome::Status(200),
            Duration::from_millis(5),
        );
        let judged = windows.judge(&spec);
        assert_eq!(
            (judged.rules[0].samples, judged.rules[0].bad),
            (1, 0),
            "{judged:?}"
        );
        assert_eq!(judged.rules[1].bad, 0);
    }

    /// A weight change is no new step: the evidence (and its single error budget)
    /// carries across a rollout.
    #[tokio::test]
    async fn the_evidence_carries_across_weight_changes() {
        let spec = spec();
        let windows = RouteWindows::new(Some(&spec), 2);
        for _ in 0..10 {
            windows.record(
                Variant::Canary,
                Outcome::Status(200),
                Duration::from_millis(5),
            );
        }
        windows.judge(&spec);
        for _ in 0..10 {
            windows.record(
                Variant::Canary,
                Outcome::Status(200),
                Duration::from_millis(5),
            );
        }
        assert_eq!(windows.judge(&spec).rules[0].samples, 20);
    }
}
