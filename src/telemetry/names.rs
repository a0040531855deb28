//! Metric names and label keys: the only place they are spelled. Dashboards and alerts
//! depend on them, so they are part of the contract (DESIGN.md, "Metrics").

pub const REQUESTS_TOTAL: &str = "splitgate_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "splitgate_request_duration_seconds";
pub const REQUEST_STREAM_SECONDS: &str = "splitgate_request_stream_seconds";
pub const UPSTREAM_ERRORS_TOTAL: &str = "splitgate_upstream_errors_total";
pub const CANARY_WEIGHT: &str = "splitgate_canary_weight";
pub const SLO_STATE: &str = "splitgate_slo_state";
pub const SLO_TRIPS_TOTAL: &str = "splitgate_slo_trips_total";
pub const CONFIG_RELOADS_TOTAL: &str = "splitgate_config_reloads_total";
pub const CONNECTIONS: &str = "splitgate_connections";
pub const CONNECTIONS_IDLE: &str = "splitgate_connections_idle";
pub const ROLLOUT_STEP: &str = "splitgate_rollout_step";

pub const LABEL_ROUTE: &str = "route";
pub const LABEL_UPSTREAM: &str = "upstream";
pub const LABEL_VARIANT: &str = "variant";
pub const LABEL_CODE: &str = "code";
pub const LABEL_KIND: &str = "kind";
pub const LABEL_REASON: &str = "reason";
pub const LABEL_OUTCOME: &str = "outcome";
pub const LABEL_LISTENER: &str = "listener";
pub const LABEL_RULE: &str = "rule";

pub const STATE_PERSIST_FAILURES_TOTAL: &str = "splitgate_state_persist_failures_total";
pub const SLO_VERDICT: &str = "splitgate_slo_verdict";
pub const SLO_BREACHES_TOTAL: &str = "splitgate_slo_breaches_total";
pub const FLEET_STORE_UP: &str = "splitgate_fleet_store_up";
pub const FLEET_APPLIED_REVISION: &str = "splitgate_fleet_applied_revision";
pub const INSTANCE_UP: &str = "splitgate_instance_up";
pub const NOTIFICATIONS_TOTAL: &str = "splitgate_notifications_total";
pub const HEALTH_CHECKS_TOTAL: &str = "splitgate_health_checks_total";
pub const DNS_RESOLUTIONS_TOTAL: &str = "splitgate_dns_resolutions_total";
/// An upstream instance's `ip:port`. Not `instance`: Prometheus sets that label on every
/// series to the scrape target, and renames a scraped one to `exported_instance`.
pub const LABEL_ADDRESS: &str = "address";

/// The type of a metric family, for its `# TYPE` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every family with its `# HELP` text (`promtool check metrics` wants one on each).
pub const FAMILIES: &[(&str, Kind, &str)] = &[
    (REQUESTS_TOTAL, Kind::Counter, "Proxied requests by route, upstream, variant and outcome, counted when the response ends: code is the status class (1xx-5xx), error (no response, or the response body failed), grpc_ok or grpc_error (a gRPC call's grpc-status, from headers or trailers, outside or inside the route's grpc_error_statuses)."),
    (REQUEST_DURATION_SECONDS, Kind::Histogram, "Time from request received to response head sent, by route, upstream and variant."),
    (REQUEST_STREAM_SECONDS, Kind::Histogram, "Time from request received to the end of the response body (the whole exchange, streams included), by route, upstream and variant."),
    (UPSTREAM_ERRORS_TOTAL, Kind::Counter, "Failed upstream exchanges by route, upstream and kind (connect, timeout, reset, protocol)."),
    (CANARY_WEIGHT, Kind::Gauge, "Live canary weight of a route, in percent."),
    (SLO_STATE, Kind::Gauge, "SLO state of a route: 0 ok, 1 tripped (canary pulled to weight 0)."),
    (SLO_TRIPS_TOTAL, Kind::Counter, "SLO trips by route and reason."),
    (CONFIG_RELOADS_TOTAL, Kind::Counter, "Config reloads by outcome (ok, error)."),
    (CONNECTIONS, Kind::Gauge, "Open client connections by listener."),
    (
        CONNECTIONS_IDLE,
        Kind::Gauge,
        "Open client connections waiting for the client's next bytes with no buffers held (HTTP/1.1 idle between requests for over a second, or new and silent).",
    ),
    (ROLLOUT_STEP, Kind::Gauge, "Step of a route's running rollout, 1-based; 0 when none runs."),
    (SLO_VERDICT, Kind::Gauge, "The judge's verdict per route and rule: 0 ok, 1 inconclusive, 2 breach."),
    (SLO_BREACHES_TOTAL, Kind::Counter, "Breaches the judge found, per route and rule, whether they tripped the route or (dry run) only were reported."),
    (STATE_PERSIST_FAILURES_TOTAL, Kind::Counter, "Writes of state.dir that failed; the change they carried was refused (a trip is still applied in memory)."),
    (FLEET_STORE_UP, Kind::Gauge, "With [fleet]: 1 while the fleet store (etcd) answers this replica, 0 while it does not (the last applied state is served)."),
    (FLEET_APPLIED_REVISION, Kind::Gauge, "With [fleet]: the etcd revision of the fleet state this replica has applied."),
    (INSTANCE_UP, Kind::Gauge, "1 while an upstream instance gets new requests (ready, passing its health checks, not ejected), else 0. One series per instance the config or DNS gives."),
    (NOTIFICATIONS_TOTAL, Kind::Counter, "Webhook ([[notify]]) events by outcome: delivered, failed (after every retry), dropped (the sink's queue was full)."),
    (HEALTH_CHECKS_TOTAL, Kind::Counter, "Active health checks by upstream and outcome (pass, fail)."),
    (DNS_RESOLUTIONS_TOTAL, Kind::Counter, "Re-resolutions of an upstream's instance names by outcome (ok; failed: a name did not resolve, the last good addresses are kept)."),
];

/// The families rendered at each scrape from the current snapshot, so a removed
/// instance leaves no stale series.
pub const FROM_SNAPSHOT: &[&str] = &[INSTANCE_UP];

/// The families recorded on every request or connection, which splitgate shards per worker and
/// renders itself (see `sharded.rs`).
pub const SHARDED: &[&str] = &[
    REQUESTS_TOTAL,
    UPSTREAM_ERRORS_TOTAL,
    REQUEST_DURATION_SECONDS,
    REQUEST_STREAM_SECONDS,
    CONNECTIONS,
    CONNECTIONS_IDLE,
];

/// Histogram buckets of request duration, 1 ms to 10 s, four per decade (1, 2.5, 5,
/// 8: the earlier 1-2.5-5 boundaries stay, so existing queries on `le` keep working).
/// `0.8` is the p99 threshold in `config/alerts.yml`; every route's latency limit is
/// added at start (see `Registry::new`), so PromQL's quantiles and the SLO guard agree
/// on which side of a threshold a canary is.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.008, 0.01, 0.025, 0.05, 0.08, 0.1, 0.25, 0.5, 0.8, 1.0, 2.5, 5.0, 8.0,
    10.0,
];

/// Buckets `splitgate_request_stream_seconds` adds above the duration buckets: a
/// streaming call may last minutes.
pub const STREAM_EXTRA_BUCKETS: &[f64] = &[30.0, 60.0, 300.0, 1800.0];

/// The latency thresholds of the alerts shipped in `config/alerts.yml` (a test checks
/// the file against this list).
pub const ALERT_LATENCY_THRESHOLDS: &[f64] = &[0.8];
