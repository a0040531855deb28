//! The judge: each SLO rule of a route becomes a test on a rate (see `sequential.rs`)
//! and gets a verdict with its evidence. Pure: the same evidence gives the same report.
//!
//! - `max_error_rate`: errors among canary requests, against the limit.
//! - `max_latency` (and `max_p99_latency`): canary requests slower than the limit,
//!   against `1 - quantile`.
//! - `max_error_rate_increase`: the canary's error rate against stable's upper
//!   confidence bound plus the margin.
//! - `max_latency_ratio` (and `max_p99_ratio`): canary requests slower than `ratio` ×
//!   stable's quantile (its upper confidence bound, for a breach), against
//!   `1 - quantile`.
//!
//! Absolute rules also look for a late change (change points per epoch); relative
//! rules compare both sides over the same span, the whole evidence, since stable's
//! bound is over that span too (a late incident both sides share must not read as the
//! canary's).
//!
//! Each route's false-trip budget, `1 - confidence`, is split evenly over its rules,
//! and a relative rule spends half of its share on stable's bound, so the bound holds
//! for the route as a whole. In baseline mode (any relative rule), an absolute breach
//! that stable shares (an outage of both sides) is not held against the canary.

use serde::Serialize;

use super::evidence::{Ledger, Reading};
use super::sequential::{self, Counts, Direction};
use super::window;
use crate::config::compile::{LatencyLimit, LatencyRatio};
use crate::config::SloSpec;

/// A rule's verdict, from best to worst. Only a breach trips.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Ok,
    Inconclusive,
    Breach,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Inconclusive => "inconclusive",
            Verdict::Breach => "breach",
        }
    }

    /// The value of `splitgate_slo_verdict`.
    pub fn gauge(self) -> f64 {
        match self {
            Verdict::Ok => 0.0,
            Verdict::Inconclusive => 1.0,
            Verdict::Breach => 2.0,
        }
    }
}

/// One rule of a route's SLO.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rule {
    ErrorRate(f64),
    ErrorRateIncrease(f64),
    /// The index into `SloSpec::latency` (and so into the slow counters).
    Latency(usize, LatencyLimit),
    LatencyRatio(LatencyRatio),
}

impl Rule {
    /// Every rule of `spec`, in a fixed order.
    pub fn all(spec: &SloSpec) -> Vec<Rule> {
        let mut rules = Vec::new();
        rules.extend(spec.max_error_rate.map(Rule::ErrorRate));
        rules.extend(spec.max_error_rate_increase.map(Rule::ErrorRateIncrease));
        rules.extend(
            spec.latency
                .iter()
                .enumerate()
                .map(|(i, &limit)| Rule::Latency(i, limit)),
        );
        rules.extend(spec.latency_ratio.iter().copied().map(Rule::LatencyRatio));
        rules
    }

    /// The rule's name: a metric label and a trip reason (`error_rate`,
    /// `error_rate_increase`, `p99_latency`, `p95_ratio`, …). Bounded by the config.
    pub fn name(&self) -> String {
        match self {
            Rule::ErrorRate(_) => "error_rate".into(),
            Rule::ErrorRateIncrease(_) => "error_rate_increase".into(),
            Rule::Latency(_, rule) => format!("{}_latency", quantile_name(rule.quantile)),
            Rule::LatencyRatio(rule) => format!("{}_ratio", quantile_name(rule.quantile)),
        }
    }

    fn is_relative(&self) -> bool {
        matches!(self, Rule::ErrorRateIncrease(_) | Rule::LatencyRatio(_))
    }
}

/// `p99`, `p95`, `p99.9`.
fn quantile_name(quantile: f64) -> String {
    let percent = format!("{:.3}", quantile * 100.0);
    format!("p{}", percent.trim_end_matches('0').trim_end_matches('.'))
}

/// A rule's verdict and the evidence behind it, as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct RuleReport {
    pub rule: String,
    pub verdict: Verdict,
    /// The share of canary requests that were bad (errors, or slower than the
    /// threshold) since the step began.
    pub rate: f64,
    /// The share the rule allows.
    pub allowed: f64,
    /// The anytime-valid confidence interval of `rate`.
    pub interval: [f64; 2],
    /// Canary requests judged, and how many were bad.
    pub samples: u64,
    pub bad: u64,
    /// About how many more canary requests, at the rate seen so far, would let the
    /// judge decide; `None` when decided, or when the rate sits at the limit.
    pub samples_needed: Option<u64>,
    /// The evidence in words, for `splitgate status`, logs and the audit line.
    pub summary: String,
}

/// The judge's settings for one route: the threshold each rule's test must reach.
struct Budget {
    /// `1 - confidence`, split over the rules.
    alpha: f64,
    min_requests: u64,
}

impl Budget {
    fn threshold(&self) -> f64 {
        (1.0 / self.alpha).ln()
    }

    /// Half of this budget: a relative rule spends the other half on stable's bound.
    fn half(&self) -> Budget {
        Budget {
            alpha: self.alpha / 2.0,
            min_requests: self.min_requests,
        }
    }
}

/// Judges every rule of `spec` on the step's evidence.
pub fn judge(spec: &SloSpec, canary: &Ledger, stable: &Ledger) -> Vec<RuleReport> {
    let rules = Rule::all(spec);
    let budget = Budget {
        alpha: (1.0 - spec.confidence) / rules.len().max(1) as f64,
        min_requests: spec.min_requests,
    };
    let baseline = rules.iter().any(Rule::is_relative);
    let (canary_all, stable_all) = (canary.since_start(), stable.since_start());
    rules
        .iter()
        .map(|rule| {
            let mut report = match *rule {
                Rule::ErrorRate(limit) => absolute(
                    rule,
                    &budget,
                    canary_all.errors(),
                    &canary.epochs(Reading::errors),
                    limit,
                    "errors",
                ),
                Rule::Latency(i, latency) => absolute(
                    rule,
                    &budget,
                    canary_all.slow(i),
                    &canary.epochs(|r| r.slow(i)),
                    1.0 - latency.quantile,
                    &format!("slower than {:?}", latency.limit),
                ),
                Rule::ErrorRateIncrease(margin) => increase(
                    rule,
                    &budget,
                    canary_all.errors(),
                    stable_all.errors(),
                    margin,
                ),
                Rule::LatencyRatio(ratio) => {
                    latency_ratio(rule, &budget, &canary_all, &stable_all, ratio)
                }
            };
            // Baseline mode: an outage both sides share is not the canary's doing.
            // Stable is judged the way the canary was (change points included), so a
            // late shared outage is recognised as one.
            let shared = match *rule {
                Rule::ErrorRate(limit) => {
                    Some((stable_all.errors(), stable.epochs(Reading::errors), limit))
                }
                Rule::Latency(i, latency) => Some((
                    stable_all.slow(i),
                    stable.epochs(|r| r.slow(i)),
                    1.0 - latency.quantile,
                )),
                _ => None,
            };
            if let (true, Verdict::Breach, Some((stable_counts, stable_epochs, allowed))) =
                (baseline, report.verdict, shared)
            {
                if sequential::log_evalue_change(stable_counts, &stable_epochs, allowed)
                    >= budget.threshold()
                {
                    report.verdict = Verdict::Inconclusive;
                    report.summary.push_str(
                        "; stable breaches too (shared outage, not held against the canary)",
                    );
                }
            }
            report
        })
        .collect()
}

/// Too few requests for any verdict yet (`min_requests`).
fn below_floor(budget: &Budget, counts: Counts) -> Option<u64> {
    (counts.samples < budget.min_requests).then(|| budget.min_requests - counts.samples)
}

fn percent(rate: f64) -> String {
    format!("{:.2}%", rate * 100.0)
}

fn needed_text(needed: Option<u64>) -> String {
    match needed {
        Some(n) => format!("need ~{n} more requests"),
        None => "at this rate the judge may never decide".into(),
    }
}

/// Whether a rate test breaches: enough samples, and the change-point e-process
/// against `allowed` at `alpha`. The one rule every breach decision uses (the guard's,
/// and the simulation's in `benches/judge_sim.rs`).
pub fn breaches(
    counts: Counts,
    epochs: &[(u64, Counts)],
    allowed: f64,
    alpha: f64,
    min_requests: u64,
) -> bool {
    counts.samples >= min_requests
        && sequential::log_evalue_change(counts, epochs, allowed) >= (1.0 / alpha).ln()
}

/// A rate against a fixed limit, with change detection.
fn absolute(
    rule: &Rule,
    budget: &Budget,
    counts: Counts,
    epochs: &[(u64, Counts)],
    allowed: f64,
    what: &str,
) -> RuleReport {
    let threshold = budget.threshold();
    let (low, high) = sequential::interval(counts, budget.alpha);
    let verdict = if below_floor(budget, counts).is_some() {
        Verdict::Inconclusive
    } else if breaches(counts, epochs, allowed, budget.alpha, 0) {
        Verdict::Breach
    } else if sequential::log_evalue(counts, allowed, Direction::Below) >= threshold {
        Verdict::Ok
    } else {
        Verdict::Inconclusive
    };
    report(rule, verdict, counts, allowed, (low, high), budget, what)
}

fn report(
    rule: &Rule,
    verdict: Verdict,
    counts: Counts,
    allowed: f64,
    interval: (f64, f64),
    budget: &Budget,
    what: &str,
) -> RuleReport {
    let samples_needed = match verdict {
        Verdict::Inconclusive => {
            let needed = sequential::samples_needed(counts, allowed, budget.threshold());
            match below_floor(budget, counts) {
                Some(floor) => Some(needed.map_or(floor, |n| n.max(floor))),
                None => needed,
            }
        }
        _ => None,
    };
    let mut summary = format!(
        "{}/{} {what} ({}, allowed {}, interval {}–{})",
        counts.bad,
        counts.samples,
        percent(counts.rate()),
        percent(allowed),
        percent(interval.0),
        percent(interval.1),
    );
    if verdict == Verdict::Inconclusive {
        summary.push_str(", ");
        summary.push_str(&needed_text(samples_needed));
    }
    RuleReport {
        rule: rule.name(),
        verdict,
        rate: counts.rate(),
        allowed,
        interval: [interval.0, interval.1],
        samples: counts.samples,
        bad: counts.bad,
        samples_needed,
        summary,
    }
}

/// The canary's error rate against stable's plus a margin, both over the whole
/// evidence. Stable's upper bound and the canary's test each spend half the budget;
/// the canary's e-value only falls as the reference rises, so testing against a bound
/// at least stable's true rate is conservative whenever the bound holds.
fn increase(
    rule: &Rule,
    budget: &Budget,
    canary: Counts,
    stable: Counts,
    margin: f64,
) -> RuleReport {
    let half = budget.half();
    let (stable_low, stable_high) = sequential::interval(stable, half.alpha);
    let (low, high) = sequential::interval(canary, half.alpha);
    // Breach: above even the highest rate stable may have, plus the margin.
    let allowed = (stable_high + margin).min(1.0);
    let verdict = if below_floor(budget, canary).is_some() {
        Verdict::Inconclusive
    } else if allowed < 1.0
        && sequential::log_evalue(canary, allowed, Direction::Above) >= half.threshold()
    {
        Verdict::Breach
    } else if high <= stable_low + margin {
        Verdict::Ok
    } else {
        Verdict::Inconclusive
    };
    let mut report = report(rule, verdict, canary, allowed, (low, high), &half, "errors");
    report.summary.push_str(&format!(
        "; stable {}/{} ({}), margin {}",
        stable.bad,
        stable.samples,
        percent(stable.rate()),
        percent(margin)
    ));
    report
}

/// The canary's requests slower than `ratio` × stable's quantile.
fn latency_ratio(
    rule: &Rule,
    budget: &Budget,
    canary: &Reading,
    stable: &Reading,
    ratio: LatencyRatio,
) -> RuleReport {
    let half = budget.half();
    let allowed = 1.0 - ratio.quantile;
    // Stable's quantile is bounded at one of the histogram's edges. The nulls "more
    // than `allowed` of stable is above edge e" are nested (fewer samples lie above a
    // higher edge), so searching the edges for the first rejection needs no split of
    // the budget: if any true null is rejected, so is the highest true one.
    let threshold = half.threshold();
    let stable_total = stable.requests;
    let above = |edge: usize| {
        let slower: u64 = stable.histogram.iter().skip(edge).sum();
        Counts::new(stable_total, slower)
    };
    // Upper bound: the lowest edge with confidently at most `allowed` of stable above.
    let upper = (0..=window::BUCKETS)
        .find(|&edge| sequential::log_evalue(above(edge), allowed, Direction::Below) >= threshold)
        .map(window::bucket_low_micros);
    // Lower bound: the highest edge with confidently more than `allowed` above.
    let lower = (0..=window::BUCKETS)
        .rev()
        .find(|&edge| sequential::log_evalue(above(edge), allowed, Direction::Above) >= threshold)
        .map(window::bucket_low_micros);
    let canary_total = canary.requests;
    // Canary requests surely slower than `limit` (their whole bucket is), or possibly.
    let slower_than = |limit: f64, surely: bool| {
        let slower: u64 = canary
            .histogram
            .iter()
            .enumerate()
            .filter(|&(bucket, _)| {
                let edge = if surely { bucket } else { bucket + 1 };
                window::bucket_low_micros(edge) as f64 > limit
            })
            .map(|(_, count)| count)
            .sum();
        Counts::new(canary_total, slower)
    };
    let breach_counts = upper.map(|u| slower_than(ratio.ratio * u as f64, true));
    let ok_counts = lower.map(|l| slower_than(ratio.ratio * l as f64, false));
    let shown = breach_counts.unwrap_or(Counts::new(canary_total, 0));
    let verdict = if below_floor(budget, shown).is_some() {
        Verdict::Inconclusive
    } else if breach_counts
        .is_some_and(|c| sequential::log_evalue(c, allowed, Direction::Above) >= half.threshold())
    {
        Verdict::Breach
    } else if ok_counts
        .is_some_and(|c| sequential::log_evalue(c, allowed, Direction::Below) >= half.threshold())
    {
        Verdict::Ok
    } else {
        Verdict::Inconclusive
    };
    let interval = sequential::interval(shown, half.alpha);
    let what = match upper {
        Some(u) => format!(
            "slower than {}× stable's {} ({:.1} ms at most)",
            ratio.ratio,
            quantile_name(ratio.quantile),
            u as f64 / 1000.0
        ),
        None => format!("(stable's {} not known yet)", quantile_name(ratio.quantile)),
    };
    report(rule, verdict, shown, allowed, interval, &half, &what)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::slo::evidence::SideTotals;

    fn spec(extra: impl FnOnce(&mut SloSpec)) -> SloSpec {
        let mut spec = SloSpec {
            window: Duration::from_secs(30),
            min_requests: 20,
            confidence: 0.99,
            dry_run: false,
            max_error_rate: Some(0.05),
            max_error_rate_increase: None,
            latency: vec![LatencyLimit {
                quantile: 0.95,
                limit: Duration::from_millis(800),
            }],
            latency_ratio: Vec::new(),
            count_4xx: false,
        };
        extra(&mut spec);
        spec
    }

    /// A ledger over `requests` requests, every `error_every`-th an error, with
    /// latencies from `latency`.
    fn ledger(
        spec: &SloSpec,
        requests: u64,
        error_every: u64,
        latency: impl Fn(u64) -> Duration,
    ) -> Ledger {
        let limits: Vec<Duration> = spec.latency.iter().map(|l| l.limit).collect();
        let totals = SideTotals::new(limits.len(), !spec.latency_ratio.is_empty(), 1);
        let mut ledger = Ledger::new(totals.read(), 0);
        for i in 0..requests {
            let error = error_every > 0 && i % error_every == 0;
            totals.record(error, latency(i), &limits);
        }
        ledger.update(totals.read(), 100, 30_000);
        ledger
    }

    fn fast(_: u64) -> Duration {
        Duration::from_millis(20)
    }

    fn verdicts(reports: &[RuleReport]) -> Vec<(&str, Verdict)> {
        reports
            .iter()
            .map(|r| (r.rule.as_str(), r.verdict))
            .collect()
    }

    #[test]
    fn names_are_stable_labels() {
        let spec = spec(|s| {
            s.max_error_rate_increase = Some(0.01);
            s.latency_ratio.push(LatencyRatio {
                quantile: 0.999,
                ratio: 1.5,
            });
        });
        let names: Vec<String> = Rule::all(&spec).iter().map(Rule::name).collect();
        assert_eq!(
            names,
            [
                "error_rate",
                "error_rate_increase",
                "p95_latency",
                "p99.9_ratio"
            ]
        );
    }

    #[test]
    fn few_requests_are_inconclusive_and_say_how_many_more() {
        let spec = spec(|_| {});
        let canary = ledger(&spec, 34, 17, fast);
        let stable = ledger(&spec, 1000, 0, fast);
        let reports = judge(&spec, &canary, &stable);
        assert_eq!(reports[0].verdict, Verdict::Inconclusive);
        assert_eq!((reports[0].samples, reports[0].bad), (34, 2));
        assert!(reports[0].samples_needed.unwrap() > 0);
        assert!(
            reports[0].summary.contains("2/34 errors"),
            "{}",
            reports[0].summary
        );
    }

    #[test]
    fn a_clearly_broken_canary_breaches_and_a_healthy_one_is_ok() {
        let spec = spec(|_| {});
        let stable = ledger(&spec, 5000, 0, fast);
        // 30 % errors.
        let broken = ledger(&spec, 40, 3, fast);
        assert_eq!(judge(&spec, &broken, &stable)[0].verdict, Verdict::Breach);
        // 1 % errors over 2 000 requests: confidently under 5 %.
        let healthy = ledger(&spec, 2000, 100, fast);
        assert_eq!(
            verdicts(&judge(&spec, &healthy, &stable)),
            [("error_rate", Verdict::Ok), ("p95_latency", Verdict::Ok)]
        );
        // Every request at 900 ms: the p95 limit of 800 ms is breached.
        let slow = ledger(&spec, 60, 0, |_| Duration::from_millis(900));
        assert_eq!(judge(&spec, &slow, &stable)[1].verdict, Verdict::Breach);
    }

    #[test]
    fn baseline_mode_ignores_a_shared_outage() {
        let spec = spec(|s| s.max_error_rate_increase = Some(0.05));
        let canary = ledger(&spec, 200, 2, fast);
        let stable_down = ledger(&spec, 2000, 2, fast);
        let reports = judge(&spec, &canary, &stable_down);
        assert_eq!(reports[0].verdict, Verdict::Inconclusive, "{reports:?}");
        assert!(reports[0].summary.contains("shared outage"));
        assert_ne!(reports[1].verdict, Verdict::Breach);
        let stable_up = ledger(&spec, 2000, 0, fast);
        assert_eq!(
            verdicts(&judge(&spec, &canary, &stable_up))[..2],
            [
                ("error_rate", Verdict::Breach),
                ("error_rate_increase", Verdict::Breach)
            ]
        );
    }

    /// Both sides go bad late in a long step (a shared incident): neither the relative
    /// rule nor, in baseline mode, the absolute one holds it against the canary.
    #[test]
    fn a_late_shared_incident_is_not_the_canarys() {
        let spec = spec(|s| {
            s.latency.clear();
            s.max_error_rate_increase = Some(0.02);
        });
        let side = |per_epoch: u64| {
            let totals = SideTotals::new(0, false, 1);
            let mut ledger = Ledger::new(totals.read(), 0);
            for epoch in 0..12u64 {
                let bad_every = if epoch < 10 { 200 } else { 10 };
                for i in 0..per_epoch {
                    totals.record(i % bad_every == 0, Duration::from_millis(5), &[]);
                }
                ledger.update(totals.read(), epoch * 300_000 + 1, 300_000);
            }
            ledger
        };
        let (canary, stable) = (side(600), side(5400));
        let reports = judge(&spec, &canary, &stable);
        assert!(
            reports.iter().all(|r| r.verdict != Verdict::Breach),
            "{reports:#?}"
        );
    }

    #[test]
    fn a_latency_ratio_against_stable() {
        let spec = spec(|s| {
            s.max_error_rate = None;
            s.latency.clear();
            s.latency_ratio.push(LatencyRatio {
                quantile: 0.9,
                ratio: 1.5,
            });
        });
        let stable = ledger(&spec, 5000, 0, |i| Duration::from_millis(10 + i % 20));
        let slow = ledger(&spec, 300, 0, |i| Duration::from_millis(60 + i % 20));
        assert_eq!(judge(&spec, &slow, &stable)[0].verdict, Verdict::Breach);
        let alike = ledger(&spec, 3000, 0, |i| Duration::from_millis(10 + i % 20));
        assert_eq!(judge(&spec, &alike, &stable)[0].verdict, Verdict::Ok);
    }
}
