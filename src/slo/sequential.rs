//! The anytime-valid sequential test behind every SLO rule: pure functions of counts.
//!
//! Each rule asks one question about a rate: "is the fraction of canary requests that
//! are bad (an error, or slower than a latency limit) at most `p0`?" The guard asks it
//! every 250 ms for as long as a step lasts. A fixed-size test asked that often is
//! "peeking": its false-alarm rate grows with every look. This one does not, by
//! construction (Ville's inequality), following the e-process approach of Lindon et
//! al., "Rapid Regression Detection in Software Deployments through Sequential Testing"
//! (KDD 2022) and Howard et al., "Time-uniform, nonparametric, nonasymptotic confidence
//! sequences" (2021):
//!
//! - For a bad rate `q > p0`, the likelihood ratio `(q/p0)^k ((1-q)/(1-p0))^(n-k)` of
//!   `k` bad out of `n` is a nonnegative supermartingale with mean at most 1 whenever
//!   the true rate is at most `p0`. An average of such ratios over a fixed grid of `q`
//!   (an e-process) is one too, so the chance that it *ever* reaches `1/alpha`, however
//!   often it is looked at, is at most `alpha`. Reaching it is a breach.
//! - A canary that goes bad late in a long step must not be drowned by its healthy
//!   start. So the average also runs over where the bad stretch may have begun: the
//!   evidence is kept per epoch (`slo.window` long), and the test that starts at epoch
//!   `j` (1-based) gets prior weight `1/(j(j+1))`. Those weights sum to 1, so the mixture
//!   is still one supermartingale and the bound above still holds for the whole step.
//!   The price of a late start is `ln(j(j+1))` nats of extra evidence.
//! - "ok" is the mirror test (is the rate at least `p0`? rejected at the same level)
//!   over the whole step; it never trips anything, it lets a rollout advance.

/// Offsets, in log-odds, of the alternatives from the limit: from 1.13× to about 270×
/// the odds, denser near the limit so that a rate close to it is still told apart in
/// time. A mixture over the grid loses `ln 10` nats against knowing the true rate.
const OFFSETS: [f64; 10] = [0.12, 0.22, 0.35, 0.7, 1.0, 1.4, 2.0, 2.8, 4.0, 5.6];

/// Samples and bad samples.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub samples: u64,
    pub bad: u64,
}

impl Counts {
    pub fn new(samples: u64, bad: u64) -> Self {
        Self {
            samples,
            bad: bad.min(samples),
        }
    }

    pub fn add(&mut self, other: Counts) {
        self.samples += other.samples;
        self.bad += other.bad;
    }

    /// The observed rate; 0 without samples.
    pub fn rate(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            self.bad as f64 / self.samples as f64
        }
    }
}

/// Which way a test looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Evidence that the rate is above the reference (a breach).
    Above,
    /// Evidence that the rate is below the reference (the rule holds).
    Below,
}

fn logit(p: f64) -> f64 {
    (p / (1.0 - p)).ln()
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Keeps a reference rate strictly inside (0, 1), where the logarithms are finite.
fn clamp_rate(p: f64) -> f64 {
    p.clamp(1e-9, 1.0 - 1e-9)
}

/// The grid of alternatives to `p0` in one direction.
fn alternatives(p0: f64, direction: Direction) -> [f64; OFFSETS.len()] {
    let base = logit(clamp_rate(p0));
    OFFSETS.map(|offset| match direction {
        Direction::Above => sigmoid(base + offset),
        Direction::Below => sigmoid(base - offset),
    })
}

/// `ln(sum(exp(terms)))`, without overflow. A NaN term (impossible with the validated
/// config) makes the whole NaN, never a silently smaller value.
fn log_sum_exp(terms: impl Iterator<Item = f64> + Clone) -> f64 {
    if terms.clone().any(f64::is_nan) {
        debug_assert!(false, "NaN evidence");
        return f64::NAN;
    }
    let max = terms.clone().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + terms.map(|t| (t - max).exp()).sum::<f64>().ln()
}

/// Log likelihood ratio of `counts` under rate `q` against rate `p0`.
fn log_ratio(counts: Counts, q: f64, p0: f64) -> f64 {
    let good = (counts.samples - counts.bad) as f64;
    let mut total = 0.0;
    if counts.bad > 0 {
        total += counts.bad as f64 * (q / p0).ln();
    }
    if good > 0.0 {
        total += good * ((1.0 - q) / (1.0 - p0)).ln();
    }
    total
}

/// Log of the e-value against "the rate is at most `p0`" (`Above`) or "at least `p0`"
/// (`Below`) from `counts` gathered since one start: the grid mixture, equal weights.
pub fn log_evalue(counts: Counts, p0: f64, direction: Direction) -> f64 {
    let p0 = clamp_rate(p0);
    let grid = alternatives(p0, direction);
    log_sum_exp(grid.iter().map(|&q| log_ratio(counts, q, p0))) - (grid.len() as f64).ln()
}

/// Prior weight of a test that starts at epoch `index` (1-based): `1/(j(j+1))`.
pub fn start_weight(index: u64) -> f64 {
    let j = index.max(1) as f64;
    1.0 / (j * (j + 1.0))
}

/// Log of the e-value against "the rate is at most `p0`", mixed over where a bad
/// stretch may have begun. `epochs` are `(index, counts)` in order, oldest first, with
/// 1-based indices that may skip (epochs dropped to bound memory just lose their test).
/// `since_start` is the step's whole evidence (the test from epoch 1).
pub fn log_evalue_change(since_start: Counts, epochs: &[(u64, Counts)], p0: f64) -> f64 {
    let p0 = clamp_rate(p0);
    let grid = alternatives(p0, Direction::Above);
    let mut suffix = Counts::default();
    let mut starts: Vec<(f64, Counts)> = Vec::with_capacity(epochs.len() + 1);
    for &(index, counts) in epochs.iter().rev() {
        suffix.add(counts);
        if index > 1 {
            starts.push((start_weight(index).ln(), suffix));
        }
    }
    starts.push((start_weight(1).ln(), since_start));
    let terms = starts
        .iter()
        .flat_map(|&(weight, counts)| grid.iter().map(move |&q| weight + log_ratio(counts, q, p0)));
    log_sum_exp(terms) - (grid.len() as f64).ln()
}

/// The confidence sequence for the rate: every `p` that neither direction's test
/// rejects at `alpha`. It covers the true rate at all times with probability at least
/// `1 - 2 alpha` (each side `alpha`).
pub fn interval(counts: Counts, alpha: f64) -> (f64, f64) {
    let threshold = (1.0 / alpha).ln();
    let rejected = |p: f64, direction| log_evalue(counts, p, direction) >= threshold;
    // The lower end: the largest p still rejected as "at most p", by bisection on the
    // log-odds scale (each test's e-value is monotone in p).
    let estimate = counts.rate().clamp(1e-9, 1.0 - 1e-9);
    let bisect = |direction: Direction, from: f64, to: f64| {
        let (mut inside, mut outside) = (logit(from), logit(to));
        for _ in 0..48 {
            let middle = (inside + outside) / 2.0;
            if rejected(sigmoid(middle), direction) {
                outside = middle;
            } else {
                inside = middle;
            }
        }
        sigmoid(inside)
    };
    let low = if rejected(1e-9, Direction::Above) {
        bisect(Direction::Above, estimate, 1e-9)
    } else {
        0.0
    };
    let high = if rejected(1.0 - 1e-9, Direction::Below) {
        bisect(Direction::Below, estimate, 1.0 - 1e-9)
    } else {
        1.0
    };
    (low.min(estimate), high.max(estimate))
}

/// About how many more samples, at the rate seen so far, would let one of the tests
/// decide (cross `threshold` nats). `None` when the rate sits so close to `p0` that no
/// amount of traffic at this rate is expected to decide.
pub fn samples_needed(counts: Counts, p0: f64, threshold: f64) -> Option<u64> {
    let p0 = clamp_rate(p0);
    // A little prior keeps a run of zeros from reading as a rate of exactly 0.
    let rate = (counts.bad as f64 + 0.5) / (counts.samples as f64 + 1.0);
    let drift = |q: f64| rate * (q / p0).ln() + (1.0 - rate) * ((1.0 - q) / (1.0 - p0)).ln();
    let overhead = (OFFSETS.len() as f64).ln() + start_weight(1).recip().ln();
    let best = [Direction::Above, Direction::Below]
        .into_iter()
        .flat_map(|direction| alternatives(p0, direction))
        .map(drift)
        .fold(f64::NEG_INFINITY, f64::max);
    if best <= 1e-12 {
        return None;
    }
    let total = (threshold + overhead) / best;
    let more = (total - counts.samples as f64).ceil().max(1.0);
    Some(more.min(1e9) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tolerance: f64) -> bool {
        (a - b).abs() <= tolerance * b.abs().max(1e-12)
    }

    /// Known answers, computed independently (Python, on the same definition: the mean
    /// over the 10 alternatives of the binomial likelihood ratio).
    #[test]
    fn evalues_match_exact_binomial_likelihood_ratios() {
        // 2 errors in 34 requests against a 5 % limit: far from a breach.
        let e = log_evalue(Counts::new(34, 2), 0.05, Direction::Above).exp();
        assert!(close(e, 0.438_220_990_2, 1e-9), "{e}");
        // 10 errors in 30 requests (33 %) against 5 %: a breach at 99 %.
        let e = log_evalue(Counts::new(30, 10), 0.05, Direction::Above).exp();
        assert!(close(e, 18_829.134_261, 1e-9), "{e}");
        // 0 errors in 300 requests: strong evidence of being below 5 %.
        let e = log_evalue(Counts::new(300, 0), 0.05, Direction::Below).exp();
        assert!(close(e, 1_069_299.149_716, 1e-9), "{e}");
        // No data: every e-value is exactly 1.
        assert_eq!(log_evalue(Counts::default(), 0.05, Direction::Above), 0.0);
    }

    #[test]
    fn the_change_mixture_weighs_starts_as_documented() {
        let epochs = [(1, Counts::new(100, 1)), (2, Counts::new(40, 12))];
        let whole = Counts::new(140, 13);
        let expected = (0.5 * log_evalue(whole, 0.05, Direction::Above).exp()
            + (1.0 / 6.0) * log_evalue(Counts::new(40, 12), 0.05, Direction::Above).exp())
        .ln();
        let got = log_evalue_change(whole, &epochs, 0.05);
        assert!(close(got, expected, 1e-9), "{got} vs {expected}");
        // The recent stretch carries the evidence the whole step dilutes.
        assert!(got > (0.5 * log_evalue(whole, 0.05, Direction::Above).exp()).ln());
    }

    #[test]
    fn the_interval_covers_the_estimate_and_narrows() {
        let (low, high) = interval(Counts::new(40, 2), 0.01);
        assert!(low < 0.05 && high > 0.05 && high < 0.4, "{low} {high}");
        let (low, high) = interval(Counts::new(40_000, 2_000), 0.01);
        assert!(low > 0.044 && high < 0.056, "{low} {high}");
        assert_eq!(interval(Counts::default(), 0.01), (0.0, 1.0));
    }

    #[test]
    fn samples_needed_shrinks_as_the_rate_moves_away_from_the_limit() {
        let threshold = (100.0f64).ln();
        let near = samples_needed(Counts::new(40, 2), 0.05, threshold);
        let far = samples_needed(Counts::new(40, 12), 0.05, threshold);
        assert!(far.unwrap() < near.unwrap_or(u64::MAX), "{far:?} {near:?}");
        assert!(samples_needed(Counts::new(40, 0), 0.05, threshold).unwrap() > 0);
    }
}
