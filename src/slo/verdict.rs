//! The SLO verdict: pure, from one route's window figures and its thresholds.
//!
//! Absolute rules (`max_error_rate`, `max_p99_latency`) judge the canary alone.
//! Relative rules (`max_error_rate_increase`, `max_p99_ratio`) judge it against stable
//! over the same window. When a route has any relative rule, it is in *baseline mode*:
//! an absolute breach then trips only if stable is not breaching the same rule, so an
//! outage that hits both sides (a shared database, say) does not pull the canary.

use crate::config::SloSpec;

use super::WindowStats;

/// A breach: the bounded reason label and the figures for humans.
#[derive(Debug, Clone, PartialEq)]
pub struct Breach {
    pub reason: &'static str,
    pub detail: String,
}

/// Whether the canary has enough samples for any verdict.
pub fn has_enough(spec: &SloSpec, canary: &WindowStats) -> bool {
    canary.requests >= spec.min_requests.max(1)
}

/// Judges one route. `None` means the SLO holds (or there are too few samples).
pub fn judge(spec: &SloSpec, canary: &WindowStats, stable: &WindowStats) -> Option<Breach> {
    if !has_enough(spec, canary) {
        return None;
    }
    let baseline = spec.max_error_rate_increase.is_some() || spec.max_p99_ratio.is_some();
    let stable_known = stable.requests >= spec.min_requests.max(1);
    let (c_err, s_err) = (canary.error_rate(), stable.error_rate());
    let (c_p99, s_p99) = (canary.p99, stable.p99);
    let n = canary.requests;

    if let Some(max) = spec.max_error_rate {
        if c_err > max && !(baseline && stable_known && s_err > max) {
            return Some(Breach {
                reason: "error_rate",
                detail: format!(
                    "canary error rate {c_err:.4} > {max} over {n} requests (stable {s_err:.4})"
                ),
            });
        }
    }
    if let Some(max) = spec.max_p99_latency {
        if c_p99 > max && !(baseline && stable_known && s_p99 > max) {
            return Some(Breach {
                reason: "p99_latency",
                detail: format!(
                    "canary p99 {c_p99:?} > {max:?} over {n} requests (stable {s_p99:?})"
                ),
            });
        }
    }
    if !stable_known {
        return None;
    }
    if let Some(max) = spec.max_error_rate_increase {
        if c_err - s_err > max {
            return Some(Breach {
                reason: "error_rate_increase",
                detail: format!("canary error rate {c_err:.4} exceeds stable {s_err:.4} by more than {max} over {n} requests"),
            });
        }
    }
    if let Some(max) = spec.max_p99_ratio {
        if !s_p99.is_zero() && c_p99.as_secs_f64() / s_p99.as_secs_f64() > max {
            return Some(Breach {
                reason: "p99_ratio",
                detail: format!("canary p99 {c_p99:?} is more than {max}× stable p99 {s_p99:?} over {n} requests"),
            });
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn spec() -> SloSpec {
        SloSpec {
            window: Duration::from_secs(30),
            min_requests: 50,
            max_error_rate: Some(0.05),
            max_p99_latency: Some(Duration::from_millis(800)),
            max_error_rate_increase: None,
            max_p99_ratio: None,
            count_4xx: false,
        }
    }

    fn stats(requests: u64, errors: u64, p99_ms: u64) -> WindowStats {
        WindowStats {
            requests,
            errors,
            p99: Duration::from_millis(p99_ms),
            ..Default::default()
        }
    }

    #[test]
    fn absolute_rules() {
        let healthy = stats(1000, 0, 10);
        assert_eq!(
            judge(&spec(), &stats(100, 10, 10), &healthy)
                .unwrap()
                .reason,
            "error_rate"
        );
        assert_eq!(
            judge(&spec(), &stats(100, 0, 900), &healthy)
                .unwrap()
                .reason,
            "p99_latency"
        );
        assert!(judge(&spec(), &stats(100, 5, 700), &healthy).is_none());
    }

    #[test]
    fn too_few_samples_never_trip() {
        assert!(judge(&spec(), &stats(49, 49, 5000), &stats(0, 0, 0)).is_none());
    }

    #[test]
    fn baseline_mode_ignores_a_shared_outage() {
        let mut spec = spec();
        spec.max_error_rate_increase = Some(0.05);
        let both_down = (stats(100, 60, 10), stats(1000, 580, 10));
        assert!(judge(&spec, &both_down.0, &both_down.1).is_none());
        let canary_only = (stats(100, 60, 10), stats(1000, 5, 10));
        assert_eq!(
            judge(&spec, &canary_only.0, &canary_only.1).unwrap().reason,
            "error_rate"
        );
        let mut relative_only = spec.clone();
        relative_only.max_error_rate = None;
        assert_eq!(
            judge(&relative_only, &canary_only.0, &canary_only.1)
                .unwrap()
                .reason,
            "error_rate_increase"
        );
    }

    #[test]
    fn p99_ratio() {
        let mut spec = spec();
        spec.max_p99_latency = None;
        spec.max_error_rate = None;
        spec.max_p99_ratio = Some(2.0);
        assert_eq!(
            judge(&spec, &stats(100, 0, 300), &stats(1000, 0, 100))
                .unwrap()
                .reason,
            "p99_ratio"
        );
        assert!(judge(&spec, &stats(100, 0, 150), &stats(1000, 0, 100)).is_none());
    }
}
