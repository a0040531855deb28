//! The config file as written by the operator: serde structs, defaults, nothing checked
//! beyond syntax. `compile.rs` validates these and turns them into the runtime form.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::duration;

/// The whole file. Unknown fields anywhere are errors, so a typo never silently
/// becomes a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub server: ServerSection,
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub state: StateSection,
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamSection>,
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    #[serde(default)]
    pub fleet: FleetSection,
    #[serde(default)]
    pub resolver: ResolverSection,
    #[serde(default)]
    pub notify: Vec<NotifySection>,
}

/// `[[notify]]`: a webhook told about trips, resets, weights, rollout steps and
/// instance state changes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifySection {
    pub url: String,
    /// `"json"` (the default) or `"slack"`.
    #[serde(default)]
    pub format: Option<String>,
    /// Which events; every one when absent.
    #[serde(default)]
    pub events: Option<Vec<String>>,
    /// Environment variable holding the HMAC-SHA256 key for `X-Splitgate-Signature`.
    #[serde(default)]
    pub secret_env: Option<String>,
}

/// `[resolver]`: how instance names are looked up.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolverSection {
    /// A hosts-format file (`ADDRESS NAME...` per line) that replaces DNS for instance
    /// names: read at every lookup, a name takes every address it lists.
    #[serde(default)]
    pub hosts_file: Option<PathBuf>,
    /// DNS servers (`ip` or `ip:port`) that `resolve = "ttl"` asks instead of the
    /// system's (e.g. Consul's `127.0.0.1:8600`).
    #[serde(default)]
    pub nameservers: Vec<String>,
}

/// `[upstreams.X.health]`: active health checks of every instance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSection {
    /// `"http"` (the default: a GET of `path`), `"tcp"` (a connect) or `"grpc"` (the
    /// gRPC health protocol).
    #[serde(default)]
    pub check: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    #[serde(
        default = "defaults::health_interval",
        deserialize_with = "duration::deserialize"
    )]
    pub interval: Duration,
    #[serde(
        default = "defaults::health_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub timeout: Duration,
    /// Consecutive passing checks that bring an instance (back) into service.
    #[serde(default = "defaults::health_rise")]
    pub rise: u32,
    /// Consecutive failing checks that take it out.
    #[serde(default = "defaults::health_fall")]
    pub fall: u32,
    /// Statuses that pass, as `"200-399"` or `"204"`.
    #[serde(default)]
    pub expect: Option<String>,
    /// The `Host` header of HTTP checks (the authority of gRPC ones); the instance's
    /// address when absent.
    #[serde(default)]
    pub host: Option<String>,
    /// The service a gRPC check asks about; "" (the default) asks about the server.
    #[serde(default)]
    pub service: Option<String>,
}

/// `[fleet]`: replicas that share weights, trips and rollouts through etcd.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetSection {
    /// `"none"` (the default: this replica's `state.json` only) or `"etcd"`.
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub cluster: Option<String>,
    /// This replica's name in the fleet; the host name when absent.
    #[serde(default)]
    pub replica: Option<String>,
    /// How long one etcd request may take before the next endpoint is tried.
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub request_timeout: Option<Duration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    pub listen: String,
    /// Runtime worker threads; 0 means one per core.
    #[serde(default)]
    pub workers: usize,
    /// Pin worker i to the i-th CPU the process may use (Linux).
    #[serde(default)]
    pub pin_workers: bool,
    /// Peers (CIDR or single address) whose `X-Forwarded-For` is trusted and appended to.
    /// From anyone else the header is replaced by the peer address.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Time a client has to send a complete request head.
    #[serde(
        default = "defaults::header_read_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub header_read_timeout: Duration,
    /// A request body that stops arriving for this long is abandoned with a 408.
    #[serde(
        default = "defaults::client_body_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub client_body_timeout: Duration,
    /// A keep-alive connection with no request in flight and no bytes moving is closed after this.
    #[serde(
        default = "defaults::idle_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub idle_timeout: Duration,
    #[serde(default = "defaults::max_headers")]
    pub max_headers: usize,
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: usize,
    #[serde(default = "defaults::max_uri_bytes")]
    pub max_uri_bytes: usize,
    /// On SIGTERM, how long in-flight requests get to finish.
    #[serde(
        default = "defaults::drain_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub drain_timeout: Duration,
    /// One INFO line per request.
    #[serde(default = "defaults::yes")]
    pub access_log: bool,
    /// Optional HTTPS listener.
    #[serde(default)]
    pub tls: Option<TlsSection>,
    /// `Upgrade` protocols forwarded upstream (when the client's `Connection` lists
    /// `upgrade`); any other `Upgrade` is stripped and the request proxied as plain HTTP.
    #[serde(default = "defaults::upgrade_protocols")]
    pub upgrade_protocols: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub listen: String,
    /// Certificate chains and keys (PEM). SNI picks the first whose names match; the
    /// first is also the default for clients that send no SNI or an unknown name.
    #[serde(default)]
    pub certs: Vec<CertPair>,
    /// A client that has not finished the handshake by then is dropped.
    #[serde(
        default = "defaults::handshake_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub handshake_timeout: Duration,
    /// TLS session resumption (tickets for 1.3, session IDs for 1.2).
    #[serde(default = "defaults::yes")]
    pub session_resumption: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPair {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    #[serde(default = "defaults::admin_listen")]
    pub listen: String,
    /// Name of the environment variable that holds the bearer token.
    #[serde(default = "defaults::token_env")]
    pub token_env: String,
}

impl Default for AdminSection {
    fn default() -> Self {
        Self {
            listen: defaults::admin_listen(),
            token_env: defaults::token_env(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSection {
    #[serde(default = "defaults::state_dir")]
    pub dir: PathBuf,
}

impl Default for StateSection {
    fn default() -> Self {
        Self {
            dir: defaults::state_dir(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSection {
    pub instances: Vec<String>,
    #[serde(
        default = "defaults::connect_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub connect_timeout: Duration,
    /// Time from the request sent to the response head received.
    #[serde(
        default = "defaults::response_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub response_timeout: Duration,
    /// Longest wait for the next bytes of an HTTP/1.1 response body (NGINX's
    /// `proxy_read_timeout`): a response that stalls is cut rather than held forever.
    #[serde(
        default = "defaults::read_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub read_timeout: Duration,
    /// Idle pooled connections kept per instance.
    #[serde(default = "defaults::max_idle_per_instance")]
    pub max_idle_per_instance: usize,
    /// Connections to one instance at most; further requests wait (within the queue
    /// timeout) for one to come free, as HAProxy's per-server maxconn queues.
    #[serde(default = "defaults::max_connections_per_instance")]
    pub max_connections_per_instance: usize,
    /// How long a request may wait at the connection cap before it gets 503.
    #[serde(
        default = "defaults::queue_timeout",
        deserialize_with = "duration::deserialize"
    )]
    pub queue_timeout: Duration,
    /// Consecutive connect, timeout or reset failures that eject an instance; 0 never ejects.
    #[serde(default = "defaults::eject_after")]
    pub eject_after: u32,
    /// How long an ejected instance gets no traffic.
    #[serde(
        default = "defaults::eject_for",
        deserialize_with = "duration::deserialize"
    )]
    pub eject_for: Duration,
    /// Repeated ejections of the same instance last `eject_for` × the number of
    /// consecutive ejections, up to this (Envoy's `max_ejection_time`).
    /// Default: 300 s, or `eject_for` when that is longer.
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub max_eject_for: Option<Duration>,
    /// Speak TLS to the instances, verifying their certificates.
    #[serde(default)]
    pub tls: bool,
    /// Name to send as SNI and to verify the certificate against; defaults to the
    /// first instance's host.
    #[serde(default)]
    pub sni: Option<String>,
    /// PEM file of CA certificates to trust instead of the webpki roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// `"once"` (the default: names are resolved when the config loads, first address
    /// only), an interval such as `"10s"`, or `"ttl"`: every address of every name is
    /// an instance, and names are looked up again at that interval (or when the DNS
    /// answer's TTL runs out).
    #[serde(default)]
    pub resolve: Option<String>,
    #[serde(default)]
    pub health: Option<HealthSection>,
    /// How to speak to the instances: "http1" (the default), "h2c" (HTTP/2 without
    /// TLS, prior knowledge), "h2" (HTTP/2 over TLS) or "auto" (over TLS, HTTP/2 when
    /// the instance's ALPN offers it, else HTTP/1.1).
    #[serde(default = "defaults::protocol")]
    pub protocol: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub name: String,
    #[serde(default = "defaults::any_host")]
    pub host: String,
    #[serde(default = "defaults::root_prefix")]
    pub path_prefix: String,
    pub stable: String,
    #[serde(default)]
    pub canary: Option<String>,
    /// Percent, 0–100, up to two decimals.
    #[serde(default)]
    pub canary_weight: f64,
    #[serde(default = "defaults::split_key")]
    pub split_key: Vec<String>,
    /// Keys the hash; defaults to the route name. Change it to reshuffle users.
    #[serde(default)]
    pub hash_salt: Option<String>,
    /// Cookie set when a request carries no key, so the user stays on one side.
    /// An empty string switches it off.
    #[serde(default = "defaults::sticky_cookie")]
    pub sticky_cookie: String,
    /// Whether the override header/cookie may force a side. Off by default: from the
    /// internet it would let anyone opt into an unreleased version, or drive failing
    /// traffic into the canary to trip it.
    #[serde(default)]
    pub override_enabled: bool,
    /// Header and cookie name that force a side (`canary` or `stable`). Empty switches it off.
    #[serde(default = "defaults::override_name")]
    pub override_name: String,
    /// Client addresses (CIDR or single address; the TCP peer, never X-Forwarded-For)
    /// whose override is honoured.
    #[serde(default = "defaults::override_from")]
    pub override_from: Vec<String>,
    /// Keys always sent to the canary while it has a non-zero weight, e.g. testers' user IDs.
    #[serde(default)]
    pub canary_allow_list: Vec<String>,
    /// When every canary instance is ejected: "fail" answers 503 at once, "stable" sends
    /// the request to stable. Either way the canary's SLO window records an error.
    #[serde(default = "defaults::canary_unavailable")]
    pub canary_unavailable: String,
    /// Response header naming the side that served. Empty switches it off.
    #[serde(default = "defaults::variant_header")]
    pub variant_header: String,
    /// gRPC statuses that count as the upstream's failure (in the metrics' `code` and
    /// for the SLO judge), by name or number. The default: the server-side failures.
    #[serde(default = "defaults::grpc_error_statuses")]
    pub grpc_error_statuses: Vec<String>,
    #[serde(default)]
    pub slo: Option<SloSection>,
    #[serde(default)]
    pub rollout: Option<RolloutSection>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SloSection {
    /// Epoch length of the judge's change detection, and the span of the window
    /// figures in the admin API.
    #[serde(
        default = "defaults::slo_window",
        deserialize_with = "duration::deserialize"
    )]
    pub window: Duration,
    /// No verdict before this many canary requests in the step (the test needs no
    /// minimum; this is a floor an operator may want on top).
    #[serde(default = "defaults::min_requests")]
    pub min_requests: u64,
    /// How sure the judge must be before it trips: 1 − confidence bounds the chance
    /// that a healthy canary is ever tripped during a step.
    #[serde(default = "defaults::confidence")]
    pub confidence: f64,
    /// Judge, log, count and show, but never trip.
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub max_error_rate: Option<f64>,
    /// `{ quantile = 0.95, limit = "800ms" }`.
    #[serde(default)]
    pub max_latency: Option<LatencySection>,
    /// `{ quantile = 0.99, ratio = 1.5 }`: canary quantile against stable's.
    #[serde(default)]
    pub max_latency_ratio: Option<LatencyRatioSection>,
    /// The same as `max_latency = { quantile = 0.99, limit = … }`.
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub max_p99_latency: Option<Duration>,
    /// Relative rule: canary error rate minus stable error rate.
    #[serde(default)]
    pub max_error_rate_increase: Option<f64>,
    /// Relative rule: canary p99 divided by stable p99.
    #[serde(default)]
    pub max_p99_ratio: Option<f64>,
    /// Whether 4xx responses count as errors.
    #[serde(default)]
    pub count_4xx: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencySection {
    pub quantile: f64,
    #[serde(deserialize_with = "duration::deserialize")]
    pub limit: Duration,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LatencyRatioSection {
    pub quantile: f64,
    pub ratio: f64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSection {
    pub steps: Vec<StepSection>,
    /// How long a step without its own `hold` is held.
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub interval: Option<Duration>,
    /// How long a held step may wait on an inconclusive judge before `on_deadline`.
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub progress_deadline: Option<Duration>,
    /// `"pause"` (the default) or `"abort"`.
    #[serde(default)]
    pub on_deadline: Option<String>,
    /// When steps may advance: `"Mon-Fri 09:00-17:00 Europe/Berlin"`.
    #[serde(default)]
    pub allowed_hours: Option<String>,
}

/// One rollout step: a weight (`5`, or `{ weight = 5, hold = "10m" }`), or a manual
/// gate (`{ pause = true }`) that only `promote` passes.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StepSection {
    Weight(f64),
    Table(StepTable),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepTable {
    #[serde(default)]
    pub weight: Option<f64>,
    #[serde(default, deserialize_with = "duration::deserialize_opt")]
    pub hold: Option<Duration>,
    #[serde(default)]
    pub pause: bool,
}

pub(super) mod defaults {
    use std::path::PathBuf;
    use std::time::Duration;

    pub fn yes() -> bool {
        true
    }
    pub fn max_connections() -> usize {
        10_000
    }
    pub fn header_read_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn client_body_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn idle_timeout() -> Duration {
        Duration::from_secs(60)
    }
    pub fn max_headers() -> usize {
        100
    }
    pub fn max_header_bytes() -> usize {
        16 * 1024
    }
    pub fn max_uri_bytes() -> usize {
        8 * 1024
    }
    pub fn handshake_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn drain_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn admin_listen() -> String {
        "127.0.0.1:9901".into()
    }
    pub fn token_env() -> String {
        "SPLITGATE_ADMIN_TOKEN".into()
    }
    pub fn state_dir() -> PathBuf {
        PathBuf::from("state")
    }
    pub fn health_interval() -> Duration {
        Duration::from_secs(5)
    }
    pub fn health_timeout() -> Duration {
        Duration::from_secs(1)
    }
    pub fn health_rise() -> u32 {
        2
    }
    pub fn health_fall() -> u32 {
        3
    }
    pub fn connect_timeout() -> Duration {
        Duration::from_secs(2)
    }
    pub fn response_timeout() -> Duration {
        Duration::from_secs(30)
    }
    pub fn read_timeout() -> Duration {
        Duration::from_secs(60)
    }
    /// Apart from the connect timeout (HAProxy's `timeout queue` vs `timeout connect`):
    /// a connect timeout says the host is unreachable, a queue wait only that a burst
    /// is larger than the cap, and the burst drains in well under this.
    pub fn queue_timeout() -> Duration {
        Duration::from_secs(10)
    }
    pub fn max_idle_per_instance() -> usize {
        // Enough for 1 000 concurrent client connections without churning upstream
        // connections (measured in benches/compare.sh with 1 000 connections).
        1024
    }
    pub fn max_connections_per_instance() -> usize {
        1024
    }
    pub fn eject_after() -> u32 {
        5
    }
    pub fn eject_for() -> Duration {
        Duration::from_secs(10)
    }
    pub fn canary_unavailable() -> String {
        "fail".into()
    }
    pub fn any_host() -> String {
        "*".into()
    }
    pub fn root_prefix() -> String {
        "/".into()
    }
    pub fn split_key() -> Vec<String> {
        vec!["client_ip".into()]
    }
    pub fn sticky_cookie() -> String {
        "splitgate_uid".into()
    }
    pub fn override_from() -> Vec<String> {
        vec!["127.0.0.0/8".into(), "::1/128".into()]
    }
    pub fn upgrade_protocols() -> Vec<String> {
        vec!["websocket".into()]
    }
    /// Envoy's default `max_ejection_time`.
    pub fn max_eject_for(eject_for: Duration) -> Duration {
        eject_for.max(Duration::from_secs(300))
    }
    pub fn override_name() -> String {
        "x-splitgate-variant".into()
    }
    pub fn protocol() -> String {
        "http1".into()
    }

    pub fn grpc_error_statuses() -> Vec<String> {
        crate::grpc::CodeSet::SERVER_FAILURES
            .names()
            .into_iter()
            .map(String::from)
            .collect()
    }

    pub fn variant_header() -> String {
        "x-splitgate-variant".into()
    }
    /// Long enough that the change-point test of a long step stays cheap in evidence
    /// (12 epochs an hour), short enough to judge late failures on recent traffic.
    pub fn slo_window() -> Duration {
        Duration::from_secs(300)
    }
    pub fn min_requests() -> u64 {
        10
    }
    pub fn confidence() -> f64 {
        0.99
    }
}
