//! The SLO judge in simulation, side by side with the point-estimate rule it replaced.
//! Deterministic (seeded) and reproducible: `cargo bench --bench judge_sim` runs 10 000
//! one-hour steps per scenario (a few minutes on 2 cores); under `cargo test` a short
//! smoke run checks that it works.
//!
//! Each step is looked at every 250 ms, as the guard does. Per look, canary requests
//! arrive as a Poisson count and each is bad (an error, or slower than the latency
//! limit) with the scenario's probability. The judge is the library's own breach rule
//! (`slo::rules::breaches`) on the library's ledger, with `confidence = 0.99`,
//! `min_requests = 10` and 5-minute epochs (the defaults). The old rule is what
//! splitgate did before: a 30 s rolling window (10 slices), at least 50 requests,
//! point estimate above the limit (error rate; for latency, the window's p99).

use splitgate::slo::evidence::{Ledger, Reading};
use splitgate::slo::rules;

const TICK_MS: u64 = 250;
const STEP_MS: u64 = 3_600_000;
const EPOCH_MS: u64 = 300_000;
const ALPHA: f64 = 0.01;
const MIN_REQUESTS: u64 = 10;
const OLD_MIN_REQUESTS: u64 = 50;
const OLD_SLICES: usize = 10;
const OLD_SLICE_MS: u64 = 3_000;

/// What the rule limits: the error rate (a share of requests) or a quantile (the share
/// slower than the limit may be at most `1 - quantile`).
#[derive(Clone, Copy)]
enum Kind {
    ErrorRate,
    /// p99 latency: bad = slower than the limit.
    P99,
}

impl Kind {
    fn allowed(self) -> f64 {
        match self {
            Kind::ErrorRate => 0.05,
            Kind::P99 => 0.01,
        }
    }

    /// Whether the old rule trips on a window of `requests` with `bad` bad ones.
    fn old_trips(self, requests: u64, bad: u64) -> bool {
        if requests < OLD_MIN_REQUESTS {
            return false;
        }
        match self {
            Kind::ErrorRate => bad as f64 / requests as f64 > self.allowed(),
            // The window's p99 is the sample at rank ceil(0.99 n): above the limit iff
            // more than n - ceil(0.99 n) samples are.
            Kind::P99 => bad > requests - (0.99 * requests as f64).ceil() as u64,
        }
    }
}

#[derive(Clone, Copy)]
struct Scenario {
    kind: Kind,
    per_second: f64,
    /// Multiple of the limit before and after `change_at_ms`.
    before: f64,
    after: f64,
    change_at_ms: u64,
}

/// How one step ended for one rule.
#[derive(Clone, Copy, Default)]
struct Outcome {
    tripped: bool,
    /// Tripped while the canary was still healthy (a false trip).
    early: bool,
    /// Bad canary requests served from the change until the trip (or the end).
    bad_served: u64,
}

/// A Poisson count (Knuth; the means here are at most ~12).
fn poisson(rng: &mut fastrand::Rng, mean: f64) -> u64 {
    let limit = (-mean).exp();
    let (mut count, mut product) = (0, rng.f64());
    while product > limit {
        count += 1;
        product *= rng.f64();
    }
    count
}

fn run(scenario: Scenario, seed: u64) -> (Outcome, Outcome) {
    let mut rng = fastrand::Rng::with_seed(seed);
    let allowed = scenario.kind.allowed();
    let mut totals = Reading::default();
    let mut ledger = Ledger::new(totals.clone(), 0);
    let (mut new, mut old) = (Outcome::default(), Outcome::default());
    let mut slices = [(0u64, 0u64); OLD_SLICES];
    let mut current_slice = 0u64;
    let mut now = 0;
    while now < STEP_MS && !(new.tripped && old.tripped) {
        now += TICK_MS;
        let changed = now > scenario.change_at_ms;
        let rate = allowed
            * if changed {
                scenario.after
            } else {
                scenario.before
            };
        let requests = poisson(&mut rng, scenario.per_second * TICK_MS as f64 / 1000.0);
        let bad = (0..requests).filter(|_| rng.f64() < rate).count() as u64;
        totals.requests += requests;
        totals.errors += bad;
        if changed {
            new.bad_served += u64::from(!new.tripped) * bad;
            old.bad_served += u64::from(!old.tripped) * bad;
        }
        let epoch_opened = (now - TICK_MS) / EPOCH_MS != now / EPOCH_MS;
        let floor_reached =
            totals.requests >= MIN_REQUESTS && totals.requests - requests < MIN_REQUESTS;
        ledger.update(totals.clone(), now, EPOCH_MS);
        // The e-process only rises with a bad request or when an epoch opens (its new
        // test starts at 1), and a verdict may first be given when the floor is
        // reached: a look at any other time cannot trip, so it is skipped.
        if !new.tripped && (bad > 0 || epoch_opened || floor_reached) {
            let since = ledger.since_start();
            new.tripped = rules::breaches(
                since.errors(),
                &ledger.epochs(Reading::errors),
                allowed,
                ALPHA,
                MIN_REQUESTS,
            );
            new.early = new.tripped && !changed;
        }
        let slice = now / OLD_SLICE_MS;
        if slice != current_slice {
            current_slice = slice;
            slices[slice as usize % OLD_SLICES] = (0, 0);
        }
        let entry = &mut slices[slice as usize % OLD_SLICES];
        entry.0 += requests;
        entry.1 += bad;
        if !old.tripped {
            let (n, k) = slices.iter().fold((0, 0), |(n, k), s| (n + s.0, k + s.1));
            old.tripped = scenario.kind.old_trips(n, k);
            old.early = old.tripped && !changed;
        }
    }
    (new, old)
}

struct Summary {
    tripped: f64,
    /// Share tripped while still healthy.
    early: f64,
    median: u64,
    p95: u64,
}

fn summarise(outcomes: &[Outcome]) -> Summary {
    let mut served: Vec<u64> = outcomes
        .iter()
        .filter(|o| o.tripped && !o.early)
        .map(|o| o.bad_served)
        .collect();
    served.sort_unstable();
    let at = |q: f64| {
        served
            .get(((served.len() as f64 * q) as usize).min(served.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    Summary {
        tripped: outcomes.iter().filter(|o| o.tripped).count() as f64 / outcomes.len() as f64,
        early: outcomes.iter().filter(|o| o.early).count() as f64 / outcomes.len() as f64,
        median: at(0.5),
        p95: at(0.95),
    }
}

/// Runs `rollouts` steps of a scenario on two threads; (new judge, old rule).
fn simulate(scenario: Scenario, rollouts: u64, seed: u64) -> (Summary, Summary) {
    let halves: Vec<Vec<(Outcome, Outcome)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..2u64)
            .map(|half| {
                scope.spawn(move || {
                    (half..rollouts)
                        .step_by(2)
                        .map(|i| run(scenario, seed.wrapping_mul(1_000_003).wrapping_add(i)))
                        .collect()
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let all: Vec<(Outcome, Outcome)> = halves.into_iter().flatten().collect();
    let new: Vec<Outcome> = all.iter().map(|o| o.0).collect();
    let old: Vec<Outcome> = all.iter().map(|o| o.1).collect();
    (summarise(&new), summarise(&old))
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    // JUDGE_SIM_ROLLOUTS overrides the count (a quicker look while tuning).
    let rollouts = std::env::var("JUDGE_SIM_ROLLOUTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(if full { 10_000 } else { 40 });
    let kinds = [
        (Kind::ErrorRate, "error rate ≤ 5 %"),
        (Kind::P99, "p99 latency ≤ limit (1 % slower)"),
    ];
    println!(
        "judge_sim: {rollouts} one-hour steps per row, looks every 250 ms, confidence 0.99 (new) vs 30 s point estimate (old)\n"
    );
    for (kind, name) in kinds {
        println!("## {name}: false trips per 1-hour step (healthy canary)\n");
        println!("| canary req/s | true rate | new judge | old rule |");
        println!("|---|---|---|---|");
        for per_second in [1.0, 5.0, 50.0] {
            for multiple in [0.5, 1.0] {
                let scenario = Scenario {
                    kind,
                    per_second,
                    before: multiple,
                    after: multiple,
                    change_at_ms: 0,
                };
                let (new, old) = simulate(scenario, rollouts, 11);
                println!(
                    "| {per_second} | {multiple}× limit | {:.2} % | {:.2} % |",
                    new.tripped * 100.0,
                    old.tripped * 100.0
                );
            }
        }
        println!("\n## {name}: bad requests served before the trip, 4 canary req/s (median / p95; share tripped within the hour)\n");
        println!("| canary | new judge | old rule |");
        println!("|---|---|---|");
        let failing = [
            ("2× limit from the start", 2.0, 0),
            ("5× limit from the start", 5.0, 0),
            ("20× limit from the start", 20.0, 0),
            ("30 % bad from the start", 0.3 / kind.allowed(), 0),
            ("healthy (0.5×) 30 min, then 5×", 5.0, 1_800_000),
            (
                "healthy (0.5×) 30 min, then 30 % bad",
                0.3 / kind.allowed(),
                1_800_000,
            ),
        ];
        for (label, after, change_at_ms) in failing {
            let scenario = Scenario {
                kind,
                per_second: 4.0,
                before: if change_at_ms == 0 { after } else { 0.5 },
                after: after.min(1.0 / kind.allowed()),
                change_at_ms,
            };
            let (new, old) = simulate(scenario, rollouts, 29);
            let cell = |s: &Summary| {
                let mut text = format!("{} / {} ({:.1} %)", s.median, s.p95, s.tripped * 100.0);
                if s.early > 0.0 {
                    text.push_str(&format!(
                        ", {:.1} % falsely before the change",
                        s.early * 100.0
                    ));
                }
                text
            };
            println!("| {label} | {} | {} |", cell(&new), cell(&old));
        }
        println!();
    }
}
