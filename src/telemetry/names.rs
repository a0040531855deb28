//! Metric names and label keys: the only place they are spelled. Dashboards and alerts
//! depend on them, so they are part of the contract (DESIGN.md, "Metrics").

pub const REQUESTS_TOTAL: &str = "splitgate_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "splitgate_request_duration_seconds";
pub const UPSTREAM_ERRORS_TOTAL: &str = "splitgate_upstream_errors_total";
pub const CANARY_WEIGHT: &str = "splitgate_canary_weight";
pub const SLO_STATE: &str = "splitgate_slo_state";
pub const SLO_TRIPS_TOTAL: &str = "splitgate_slo_trips_total";
pub const CONFIG_RELOADS_TOTAL: &str = "splitgate_config_reloads_total";
pub const CONNECTIONS: &str = "splitgate_connections";
pub const ROLLOUT_STEP: &str = "splitgate_rollout_step";

pub const LABEL_ROUTE: &str = "route";
pub const LABEL_UPSTREAM: &str = "upstream";
pub const LABEL_VARIANT: &str = "variant";
pub const LABEL_CODE: &str = "code";
pub const LABEL_KIND: &str = "kind";
pub const LABEL_REASON: &str = "reason";
pub const LABEL_OUTCOME: &str = "outcome";
pub const LABEL_LISTENER: &str = "listener";

/// Histogram buckets of request duration: 1 ms to 10 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
