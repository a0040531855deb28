//! Per-route metric handles, registered when a snapshot is compiled.

use std::time::Duration;

use std::sync::Arc;

use metrics::Gauge;

use super::names::*;
use super::registry::Registry;
use super::sharded::{ShardedCounter, ShardedHistogram};
use crate::proxy::split::Variant;
use crate::upstream::ErrorKind;

/// How a proxied request ended, as far as metrics and the SLO judge care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered with this status, and its body (if any) ended cleanly.
    Status(u16),
    /// No response from the upstream, or its body failed part way.
    Error(ErrorKind),
    /// A gRPC call ended with a `grpc-status`; `failed` when the route counts that
    /// status as the upstream's failure (`grpc_error_statuses`).
    Grpc { failed: bool },
}

const CODE_LABELS: [&str; 8] = [
    "1xx",
    "2xx",
    "3xx",
    "4xx",
    "5xx",
    "error",
    "grpc_ok",
    "grpc_error",
];

impl Outcome {
    fn code_index(self) -> usize {
        match self {
            Outcome::Status(status) => (usize::from(status / 100)).clamp(1, 5) - 1,
            Outcome::Error(_) => 5,
            Outcome::Grpc { failed: false } => 6,
            Outcome::Grpc { failed: true } => 7,
        }
    }
}

/// Handles for one side (stable or canary) of a route.
pub struct SideMetrics {
    requests: [Arc<ShardedCounter>; 8],
    duration: Arc<ShardedHistogram>,
    stream: Arc<ShardedHistogram>,
    errors: [Arc<ShardedCounter>; 4],
}

impl SideMetrics {
    fn new(registry: &Registry, route: &str, upstream: &str, variant: Variant) -> Self {
        let side = [
            (LABEL_ROUTE, route),
            (LABEL_UPSTREAM, upstream),
            (LABEL_VARIANT, variant.as_str()),
        ];
        let requests = CODE_LABELS.map(|code| {
            let [r, u, v] = side;
            registry.sharded_counter(REQUESTS_TOTAL, &[r, u, v, (LABEL_CODE, code)])
        });
        let errors = ErrorKind::ALL.map(|kind| {
            registry.sharded_counter(
                UPSTREAM_ERRORS_TOTAL,
                &[
                    (LABEL_ROUTE, route),
                    (LABEL_UPSTREAM, upstream),
                    (LABEL_KIND, kind.as_str()),
                ],
            )
        });
        Self {
            requests,
            duration: registry.duration(&side),
            stream: registry.stream_duration(&side),
            errors,
        }
    }

    /// Counts an upstream error that a retry elsewhere hid from the user (a refused
    /// connect), so on-call still sees the instance failing.
    pub fn record_hidden_error(&self, kind: ErrorKind) {
        self.errors[kind as usize].increment(1);
    }

    /// Records one request: its outcome, its duration to response head, and the error
    /// kind when the upstream failed.
    pub fn record(&self, outcome: Outcome, elapsed: Duration) {
        self.requests[outcome.code_index()].increment(1);
        self.duration.record(elapsed);
        if let Outcome::Error(kind) = outcome {
            self.errors[kind as usize].increment(1);
        }
    }
}

impl SideMetrics {
    /// Records the whole exchange's duration, from request received to the end of
    /// the response body.
    pub fn record_stream(&self, total: Duration) {
        self.stream.record(total);
    }
}

/// Handles for a route.
pub struct RouteMetrics {
    pub stable: SideMetrics,
    pub canary: Option<SideMetrics>,
    pub canary_weight: Gauge,
    pub slo_state: Gauge,
    /// Current rollout step, 1-based; 0 when no rollout runs.
    pub rollout_step: Gauge,
    /// `splitgate_slo_verdict` per SLO rule, by rule name.
    pub verdicts: Vec<(String, Gauge)>,
}

impl RouteMetrics {
    /// `rules` are the names of the route's SLO rules.
    pub fn new(
        registry: &Registry,
        route: &str,
        stable: &str,
        canary: Option<&str>,
        rules: &[String],
    ) -> Self {
        Self {
            verdicts: rules
                .iter()
                .map(|rule| {
                    let labels = [(LABEL_ROUTE, route), (LABEL_RULE, rule.as_str())];
                    (rule.clone(), registry.gauge(SLO_VERDICT, &labels))
                })
                .collect(),
            stable: SideMetrics::new(registry, route, stable, Variant::Stable),
            canary: canary.map(|c| SideMetrics::new(registry, route, c, Variant::Canary)),
            canary_weight: registry.gauge(CANARY_WEIGHT, &[(LABEL_ROUTE, route)]),
            slo_state: registry.gauge(SLO_STATE, &[(LABEL_ROUTE, route)]),
            rollout_step: registry.gauge(ROLLOUT_STEP, &[(LABEL_ROUTE, route)]),
        }
    }

    pub fn side(&self, variant: Variant) -> &SideMetrics {
        match (variant, &self.canary) {
            (Variant::Canary, Some(canary)) => canary,
            _ => &self.stable,
        }
    }
}
