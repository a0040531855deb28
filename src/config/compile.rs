//! Validation: turns a parsed [`FileConfig`] into [`Settings`], collecting every error
//! (each naming its field) instead of stopping at the first. What comes out is trusted on
//! the hot path without further checks.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::HeaderName;

use super::file::{
    FileConfig, HealthSection, RouteSection, SloSection, StepSection, UpstreamSection,
};
use super::net::{self, IpRange, Names};
use crate::proxy::split::{KeySource, SaltKey};

/// The validated config.
#[derive(Debug, Clone)]
pub struct Settings {
    pub server: ServerSettings,
    pub admin: AdminSettings,
    pub state_dir: PathBuf,
    pub upstreams: BTreeMap<String, UpstreamSpec>,
    pub routes: Vec<RouteSpec>,
    /// `None`: a single node (`[fleet]` absent or `backend = "none"`).
    pub fleet: Option<FleetSettings>,
    /// `resolver.hosts_file`: replaces DNS for instance names.
    pub hosts_file: Option<PathBuf>,
    /// `resolver.nameservers`: the DNS servers `resolve = "ttl"` asks (else the
    /// system's).
    pub nameservers: Vec<SocketAddr>,
    pub notify: Vec<NotifySpec>,
}

/// One `[[notify]]` webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifySpec {
    pub url: http::Uri,
    pub slack: bool,
    /// The events it gets (each a name from [`NOTIFY_EVENTS`]).
    pub events: Vec<String>,
    pub secret_env: Option<String>,
}

/// Every event a webhook can get.
pub const NOTIFY_EVENTS: &[&str] = &[
    "trip",
    "reset",
    "weight",
    "step",
    "paused",
    "waiting",
    "completed",
    "aborted",
    "instance",
];

/// `[fleet]` with `backend = "etcd"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    /// `http://host:port` of each etcd member.
    pub endpoints: Vec<String>,
    /// The key namespace: `/splitgate/v1/<cluster>/`.
    pub cluster: String,
    pub replica: String,
    pub request_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    /// Worker threads (at least 1; the file's 0 is resolved to one per core).
    pub workers: usize,
    /// Pin each worker to a CPU of its own.
    pub pin_workers: bool,
    pub trusted_proxies: Vec<IpRange>,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub client_body_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    pub drain_timeout: Duration,
    pub access_log: bool,
    pub tls: Option<TlsSettings>,
    /// Lower-case `Upgrade` protocol names that may go upstream (never `h2c`).
    pub upgrade_protocols: Vec<String>,
}

/// The HTTPS listener. Certificate files are read by `server::tls`, at check, start
/// and reload, so that a bad file is refused each time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub listen: SocketAddr,
    pub certs: Vec<(PathBuf, PathBuf)>,
    pub handshake_timeout: Duration,
    pub session_resumption: bool,
}

impl Settings {
    /// Every configured absolute latency limit, in seconds: each becomes a bucket
    /// boundary of the duration histogram.
    pub fn latency_thresholds(&self) -> Vec<f64> {
        self.routes
            .iter()
            .filter_map(|r| r.slo.as_ref())
            .flat_map(|slo| slo.latency.iter().map(|rule| rule.limit.as_secs_f64()))
            .collect()
    }
}

/// TLS towards an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// SNI and the name the certificate must carry.
    pub server_name: String,
    /// Trusted CAs from `ca`; `None` means the webpki roots.
    pub roots: Option<Vec<rustls::pki_types::CertificateDer<'static>>>,
}

#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    pub token_env: String,
}

/// One upstream pool. Compared on reload: an unchanged spec keeps its live connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamSpec {
    pub name: String,
    pub instances: Vec<SocketAddr>,
    /// The instances as written (before name resolution): what identifies a version.
    pub instance_names: Vec<String>,
    pub timeouts: Timeouts,
    pub max_idle_per_instance: usize,
    pub max_connections_per_instance: usize,
    pub eject_after: u32,
    pub eject_for: Duration,
    pub max_eject_for: Duration,
    pub tls: Option<UpstreamTls>,
    pub resolve: Resolve,
    /// With `resolve` set: some name did not resolve at load.
    pub unresolved: bool,
    pub health: Option<HealthSpec>,
    pub protocol: Protocol,
}

/// How splitgate speaks to an upstream's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/2 without TLS, by prior knowledge (RFC 9113 §3.3).
    H2c,
    /// HTTP/2 over TLS (ALPN `h2`; an instance that does not agree fails the handshake).
    H2,
    /// Over TLS, HTTP/2 when the instance's ALPN picks `h2`, else HTTP/1.1.
    Auto,
}

impl Protocol {
    /// Whether a TLS connection that negotiated `alpn` speaks HTTP/2.
    pub fn h2_over_tls(self, alpn: Option<&[u8]>) -> bool {
        match self {
            Protocol::H2 => true,
            Protocol::Auto => alpn == Some(b"h2"),
            Protocol::Http1 | Protocol::H2c => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::H2c => "h2c",
            Protocol::H2 => "h2",
            Protocol::Auto => "auto",
        }
    }
}

impl UpstreamSpec {
    /// Whether connection pools built for `other` serve this spec as well: everything
    /// but the instance list, name resolution and health checks is the same.
    pub fn same_pools(&self, other: &UpstreamSpec) -> bool {
        self.timeouts == other.timeouts
            && self.max_idle_per_instance == other.max_idle_per_instance
            && self.max_connections_per_instance == other.max_connections_per_instance
            && self.tls == other.tls
            && self.protocol == other.protocol
    }
}

/// When instance names are looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolve {
    /// When the config loads; a name's first address only.
    Once,
    /// Again at this interval, every address of every name an instance.
    Every(Duration),
    /// Again when the answers' TTL runs out (asking DNS directly), every address an
    /// instance.
    Ttl,
}

/// Active health checks of an upstream's instances.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthSpec {
    pub check: HealthCheck,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthCheck {
    /// A TCP connect (and TLS handshake, for a TLS upstream).
    Tcp,
    /// `GET path` with `Host: host` (the instance's address when `None`: the first
    /// instance was written as an address); passes when the status is in `expect`.
    Http {
        path: String,
        host: Option<String>,
        expect: std::ops::RangeInclusive<u16>,
    },
    /// The gRPC health protocol (`grpc.health.v1.Health/Check` for `service`, "" for
    /// the whole server) over HTTP/2, with `host` as the authority; passes on SERVING.
    Grpc {
        service: String,
        host: Option<String>,
    },
}

/// The bounds on one upstream exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect (and TLS handshake); 504 when exceeded.
    pub connect: Duration,
    /// Waiting for a connection at the instance's connection cap; 503 when exceeded.
    pub queue: Duration,
    /// Request sent to response head; 504 when exceeded.
    pub response: Duration,
    /// Between two reads of an HTTP/1.1 response body; the body is cut when exceeded.
    pub read: Duration,
}

/// What a route does when every canary instance is ejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CanaryUnavailable {
    /// 503 at once.
    Fail,
    /// Serve from stable.
    Stable,
}

/// Which hosts a route answers for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    /// Lower-case, without port.
    Exact(String),
}

/// One route, validated. The weight here is the file's; the live weight is in the
/// runtime state, which may differ after admin changes or an SLO trip.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    pub name: String,
    pub host: HostMatch,
    pub path_prefix: String,
    pub stable: String,
    pub canary: Option<String>,
    /// Basis points: percent × 100, so 12.5 % is 1250.
    pub file_weight_bp: u32,
    pub split_key: Vec<KeySource>,
    pub salt: SaltKey,
    pub sticky_cookie: Option<String>,
    pub override_name: Option<OverrideName>,
    pub canary_allow_list: HashSet<String>,
    pub canary_unavailable: CanaryUnavailable,
    pub variant_header: Option<HeaderName>,
    /// gRPC statuses counted as the upstream's failure.
    pub grpc_errors: crate::grpc::CodeSet,
    pub slo: Option<SloSpec>,
    pub rollout: Option<RolloutSpec>,
}

/// The force-a-side header (and cookie of the same name), present only when enabled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverrideName {
    pub header: HeaderName,
    pub cookie: String,
    /// Whether it may force a side at all; when not, it is only stripped.
    pub enabled: bool,
    /// Peers whose override is honoured; from anyone else it is ignored.
    pub from: Vec<IpRange>,
}

/// A route's SLO: the judge's settings and its rules (see `slo::rules`).
#[derive(Debug, Clone, PartialEq)]
pub struct SloSpec {
    pub window: Duration,
    pub min_requests: u64,
    /// In (0.5, 1); `1 - confidence` bounds the false-trip chance per step.
    pub confidence: f64,
    pub dry_run: bool,
    pub max_error_rate: Option<f64>,
    pub max_error_rate_increase: Option<f64>,
    /// Absolute latency rules (`max_latency`, `max_p99_latency`).
    pub latency: Vec<LatencyLimit>,
    /// Relative latency rules (`max_latency_ratio`, `max_p99_ratio`).
    pub latency_ratio: Vec<LatencyRatio>,
    pub count_4xx: bool,
}

/// At most a `1 - quantile` share of canary requests slower than `limit`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyLimit {
    pub quantile: f64,
    pub limit: Duration,
}

/// The canary's `quantile` at most `ratio` × stable's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyRatio {
    pub quantile: f64,
    pub ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolloutSpec {
    /// Weights strictly rising, with gates between them.
    pub steps: Vec<Step>,
    /// How long past its hold a step may wait on an inconclusive judge, and whether it
    /// is then paused (`false`) or aborted (`true`).
    pub progress_deadline: Option<(Duration, bool)>,
    /// When steps may advance (`allowed_hours`); always when `None`.
    pub window: Option<Window>,
}

/// `allowed_hours`: days of the week and a time of day, in a named time zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// As written, for people.
    pub text: String,
    /// Monday first.
    days: [bool; 7],
    /// Minutes after midnight; an end at or before the start spans midnight.
    start: u16,
    end: u16,
    zone: String,
}

impl Window {
    /// Parses `"Mon-Fri 09:00-17:00 Europe/Berlin"` (days as `Mon-Fri`, `Sat,Sun`,
    /// `Mon-Wed,Fri` or `daily`; the zone an IANA name, or `UTC`).
    pub fn parse(text: &str) -> Result<Window, String> {
        const NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
        const FORM: &str = "write it as \"Mon-Fri 09:00-17:00 Europe/Berlin\"";
        let parts: Vec<&str> = text.split_whitespace().collect();
        let [days_text, hours, zone] = parts[..] else {
            return Err(format!("{text:?}: days, hours and a time zone; {FORM}"));
        };
        let day = |name: &str| {
            NAMES
                .iter()
                .position(|n| n.eq_ignore_ascii_case(name))
                .ok_or_else(|| format!("{name:?} is not a day (Mon … Sun); {FORM}"))
        };
        let mut days = [false; 7];
        if days_text.eq_ignore_ascii_case("daily") {
            days = [true; 7];
        } else {
            for part in days_text.split(',') {
                let (from, to) = part.split_once('-').unwrap_or((part, part));
                let (from, to) = (day(from)?, day(to)?);
                if from > to {
                    return Err(format!("{part:?}: days run Mon to Sun; {FORM}"));
                }
                days[from..=to].iter_mut().for_each(|d| *d = true);
            }
        }
        let minute = |hhmm: &str| {
            let (h, m) = hhmm.split_once(':').unwrap_or(("", ""));
            match (h.parse::<u16>(), m.parse::<u16>()) {
                (Ok(h), Ok(m)) if (h < 24 && m < 60) || (h == 24 && m == 0) => Ok(h * 60 + m),
                _ => Err(format!("{hhmm:?} is not a time (HH:MM); {FORM}")),
            }
        };
        let (start, end) = hours
            .split_once('-')
            .ok_or_else(|| format!("{hours:?} is not a time range (HH:MM-HH:MM); {FORM}"))?;
        let (start, end) = (minute(start)?, minute(end)?);
        if start == end {
            return Err(format!("{hours:?} is an empty range; {FORM}"));
        }
        jiff::tz::TimeZone::get(zone)
            .map_err(|e| format!("{zone:?} is not a time zone ({e}); {FORM}"))?;
        Ok(Window {
            text: text.to_string(),
            days,
            start,
            end,
            zone: zone.to_string(),
        })
    }

    /// Whether `now` is inside the window.
    pub fn is_open(&self, now: jiff::Timestamp) -> bool {
        let Ok(zone) = jiff::tz::TimeZone::get(&self.zone) else {
            return false;
        };
        let local = now.to_zoned(zone);
        let minute = local.hour() as u16 * 60 + local.minute() as u16;
        let weekday = local.weekday().to_monday_zero_offset() as usize;
        match self.start < self.end {
            true => self.days[weekday] && (self.start..self.end).contains(&minute),
            // Across midnight: the part after midnight belongs to the day before.
            false if minute >= self.start => self.days[weekday],
            false => minute < self.end && self.days[(weekday + 6) % 7],
        }
    }

    pub fn is_open_now(&self) -> bool {
        self.is_open(jiff::Timestamp::now())
    }
}

/// One step of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Set the weight (basis points), then hold it this long while the judge says ok.
    Weight { bp: u32, hold: Duration },
    /// Wait at the previous weight until an operator promotes.
    Pause,
}

impl RolloutSpec {
    /// The weight in force at `step` (a pause keeps the weight before it).
    pub fn weight_at(&self, step: usize) -> u32 {
        self.steps[..=step.min(self.steps.len() - 1)]
            .iter()
            .rev()
            .find_map(|s| match s {
                Step::Weight { bp, .. } => Some(*bp),
                Step::Pause => None,
            })
            .unwrap_or(0)
    }

    /// How long `step` is held; `None` at a pause (only `promote` passes it).
    pub fn hold(&self, step: usize) -> Option<Duration> {
        match self.steps.get(step)? {
            Step::Weight { hold, .. } => Some(*hold),
            Step::Pause => None,
        }
    }

    /// The last step's index (always a weight).
    pub fn last(&self) -> usize {
        self.steps.len() - 1
    }
}

/// Converts a percent with at most two decimals into basis points.
pub fn weight_to_bp(percent: f64) -> Result<u32, String> {
    if !percent.is_finite() || !(0.0..=100.0).contains(&percent) {
        return Err(format!("weight {percent} is outside 0–100"));
    }
    let scaled = percent * 100.0;
    let bp = scaled.round();
    if (scaled - bp).abs() > 1e-6 {
        return Err(format!("weight {percent} has more than two decimals"));
    }
    Ok(bp as u32)
}

/// Formats basis points back as a percent for humans and JSON.
pub fn bp_to_percent(bp: u32) -> f64 {
    f64::from(bp) / 100.0
}

/// Collects errors, each prefixed with the field it is about.
#[derive(Default)]
struct Errors(Vec<String>);

impl Errors {
    fn push(&mut self, field: &str, message: impl std::fmt::Display) {
        self.0.push(format!("{field}: {message}"));
    }
}

/// Validates the whole file, returning every problem found.
pub fn compile(file: &FileConfig, names: Names) -> Result<Settings, Vec<String>> {
    let mut errors = Errors::default();
    let server = compile_server(file, names, &mut errors);
    let admin = AdminSettings {
        listen: net::socket_addr(&file.admin.listen, names)
            .map_err(|e| errors.push("admin.listen", e))
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0))),
        token_env: file.admin.token_env.clone(),
    };
    if admin.token_env.is_empty() {
        errors.push("admin.token_env", "must name an environment variable");
    }
    if let Some(server) = &server {
        check_listeners_apart(server, &admin, &mut errors);
    }
    let nameservers: Vec<SocketAddr> = file
        .resolver
        .nameservers
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            text.parse::<SocketAddr>()
                .or_else(|_| {
                    text.parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                })
                .map_err(|_| {
                    errors.push(
                        &format!("resolver.nameservers[{i}]"),
                        format!("{text:?} is not an IP address (with an optional :port)"),
                    )
                })
                .ok()
        })
        .collect();
    let upstreams = file
        .upstreams
        .iter()
        .filter_map(|(name, section)| {
            compile_upstream(
                name,
                section,
                names,
                file.resolver.hosts_file.as_deref(),
                !nameservers.is_empty(),
                &mut errors,
            )
            .map(|spec| (name.clone(), spec))
        })
        .collect::<BTreeMap<_, _>>();
    if file.routes.is_empty() {
        errors.push("routes", "at least one route is required");
    }
    let mut seen = HashSet::new();
    let mut places = HashSet::new();
    let routes = file
        .routes
        .iter()
        .enumerate()
        .filter_map(|(index, route)| {
            let field = format!("routes[{index}] ({})", route.name);
            if !seen.insert(route.name.as_str()) {
                errors.push(
                    &format!("{field}.name"),
                    format!("duplicate route name {:?}", route.name),
                );
            }
            let place = (route.host.to_ascii_lowercase(), route.path_prefix.as_str());
            if !places.insert(place) {
                errors.push(
                    &format!("{field}.path_prefix"),
                    format!(
                        "another route already has host {:?} and path_prefix {:?}; this one would never match",
                        route.host, route.path_prefix
                    ),
                );
            }
            compile_route(&field, route, file, &mut errors)
        })
        .collect();
    let fleet = compile_fleet(&file.fleet, &mut errors);
    let notify = file
        .notify
        .iter()
        .enumerate()
        .filter_map(|(i, section)| compile_notify(&format!("notify[{i}]"), section, &mut errors))
        .collect();
    if errors.0.is_empty() {
        Ok(Settings {
            server: server.expect("server settings exist when there are no errors"),
            admin,
            state_dir: file.state.dir.clone(),
            upstreams,
            routes,
            fleet,
            hosts_file: file.resolver.hosts_file.clone(),
            nameservers,
            notify,
        })
    } else {
        Err(errors.0)
    }
}

/// A name that is safe in an etcd key and readable in a log line.
fn is_key_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn compile_fleet(
    section: &super::file::FleetSection,
    errors: &mut Errors,
) -> Option<FleetSettings> {
    match section.backend.as_deref() {
        None | Some("none") => {
            if !section.endpoints.is_empty()
                || section.cluster.is_some()
                || section.replica.is_some()
                || section.request_timeout.is_some()
            {
                errors.push(
                    "fleet.backend",
                    "endpoints, cluster, replica or request_timeout are set but backend is not \"etcd\"; set backend = \"etcd\" (or remove them)",
                );
            }
            return None;
        }
        Some("etcd") => {}
        Some(other) => {
            errors.push(
                "fleet.backend",
                format!("{other:?} is not a backend; expected \"none\" or \"etcd\""),
            );
            return None;
        }
    }
    if section.endpoints.is_empty() {
        errors.push(
            "fleet.endpoints",
            "at least one etcd endpoint is required, e.g. [\"http://10.0.0.1:2379\"]",
        );
    }
    for (index, endpoint) in section.endpoints.iter().enumerate() {
        if let Err(problem) = check_endpoint(endpoint) {
            errors.push(&format!("fleet.endpoints[{index}]"), problem);
        }
    }
    let cluster = section.cluster.clone().unwrap_or_default();
    if !is_key_name(&cluster) {
        errors.push(
            "fleet.cluster",
            format!("{cluster:?} must be 1 to 64 letters, digits, '-', '_' or '.'"),
        );
    }
    let replica = section.replica.clone().unwrap_or_else(default_replica_name);
    if !is_key_name(&replica) {
        let from = if section.replica.is_none() {
            " (the host name, the default: set fleet.replica)"
        } else {
            ""
        };
        errors.push(
            "fleet.replica",
            format!("{replica:?}{from} must be 1 to 64 letters, digits, '-', '_' or '.'"),
        );
    }
    let request_timeout = section.request_timeout.unwrap_or(Duration::from_secs(2));
    if request_timeout.is_zero() {
        errors.push("fleet.request_timeout", "must be more than 0");
    }
    Some(FleetSettings {
        endpoints: section.endpoints.clone(),
        cluster,
        replica,
        request_timeout,
    })
}

/// `http://host:port`: the client speaks plain HTTP/2 to etcd (see the README's fleet
/// section for TLS).
fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let uri: http::Uri = endpoint
        .parse()
        .map_err(|e| format!("{endpoint:?} is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "{endpoint:?}: https endpoints are not supported by this build; reach etcd over http on a private network or through a local TLS tunnel"
            ))
        }
        _ => return Err(format!("{endpoint:?} must start with http://")),
    }
    if uri.port_u16().is_none() || uri.host().is_none_or(str::is_empty) {
        return Err(format!("{endpoint:?} must name a host and a port"));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!("{endpoint:?} must not have a path"));
    }
    Ok(())
}

/// The host name, as `hostname` prints it.
#[cfg(target_os = "linux")]
fn default_replica_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

#[cfg(not(target_os = "linux"))]
fn default_replica_name() -> String {
    std::env::var("COMPUTERNAME").unwrap_or_else(|_| "splitgate".into())
}

/// Two listeners on one address would fail at bind with a less helpful message, and a
/// proxy and admin API sharing a port is never meant.
fn check_listeners_apart(server: &ServerSettings, admin: &AdminSettings, errors: &mut Errors) {
    let mut listeners = vec![
        ("server.listen", server.listen),
        ("admin.listen", admin.listen),
    ];
    if let Some(tls) = &server.tls {
        listeners.push(("server.tls.listen", tls.listen));
    }
    for (i, (field, addr)) in listeners.iter().enumerate() {
        if addr.port() == 0 {
            continue;
        }
        let clash = |a: &SocketAddr| {
            a.port() == addr.port()
                && (a.ip() == addr.ip() || a.ip().is_unspecified() || addr.ip().is_unspecified())
        };
        if let Some((other, _)) = listeners[..i].iter().find(|(_, a)| clash(a)) {
            errors.push(
                field,
                format!("{addr} is also {other}; each listener needs its own address"),
            );
        }
    }
}

fn compile_server(file: &FileConfig, names: Names, errors: &mut Errors) -> Option<ServerSettings> {
    let s = &file.server;
    let listen = net::socket_addr(&s.listen, names)
        .map_err(|e| errors.push("server.listen", e))
        .ok();
    let trusted_proxies = s
        .trusted_proxies
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            IpRange::parse(text)
                .map_err(|e| errors.push(&format!("server.trusted_proxies[{i}]"), e))
                .ok()
        })
        .collect();
    if s.workers > 1024 {
        errors.push("server.workers", "must be at most 1024");
    }
    for (field, value) in [
        ("server.max_connections", s.max_connections),
        ("server.max_headers", s.max_headers),
        ("server.max_header_bytes", s.max_header_bytes),
        ("server.max_uri_bytes", s.max_uri_bytes),
    ] {
        if value == 0 {
            errors.push(field, "must be greater than 0");
        }
    }
    if s.max_header_bytes < 8192 {
        errors.push("server.max_header_bytes", "must be at least 8192");
    }
    // Beyond these the framing scan (server/head_scan.rs) cannot follow a head and
    // would stop checking the rest of the connection.
    if s.max_header_bytes > crate::server::head_scan::MAX_HEAD {
        errors.push(
            "server.max_header_bytes",
            format!("must be at most {}", crate::server::head_scan::MAX_HEAD),
        );
    }
    if s.max_headers > crate::server::head_scan::MAX_HEADERS {
        errors.push(
            "server.max_headers",
            format!("must be at most {}", crate::server::head_scan::MAX_HEADERS),
        );
    }
    for (field, value) in [
        ("server.header_read_timeout", s.header_read_timeout),
        ("server.client_body_timeout", s.client_body_timeout),
        ("server.idle_timeout", s.idle_timeout),
    ] {
        if value.is_zero() {
            errors.push(field, "must be longer than 0");
        }
    }
    let upgrade_protocols = s
        .upgrade_protocols
        .iter()
        .enumerate()
        .filter_map(|(i, name)| {
            let field = format!("server.upgrade_protocols[{i}]");
            let lower = name.to_ascii_lowercase();
            if lower == "h2c" {
                errors.push(&field, "h2c upgrades are never forwarded: a tunnel to an HTTP/2 upstream would carry requests past every check");
                None
            } else if !is_token(&lower) {
                errors.push(&field, format!("{name:?} is not a protocol name"));
                None
            } else {
                Some(lower)
            }
        })
        .collect();
    let tls = s.tls.as_ref().and_then(|t| {
        let listen = net::socket_addr(&t.listen, names)
            .map_err(|e| errors.push("server.tls.listen", e))
            .ok();
        if t.certs.is_empty() {
            errors.push(
                "server.tls.certs",
                "must list at least one { cert, key } pair",
            );
        }
        if t.handshake_timeout.is_zero() {
            errors.push("server.tls.handshake_timeout", "must be longer than 0");
        }
        Some(TlsSettings {
            listen: listen?,
            certs: t
                .certs
                .iter()
                .map(|p| (p.cert.clone(), p.key.clone()))
                .collect(),
            handshake_timeout: t.handshake_timeout,
            session_resumption: t.session_resumption,
        })
    });
    Some(ServerSettings {
        tls,
        listen: listen?,
        workers: match s.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        },
        pin_workers: s.pin_workers,
        trusted_proxies,
        max_connections: s.max_connections,
        header_read_timeout: s.header_read_timeout,
        client_body_timeout: s.client_body_timeout,
        idle_timeout: s.idle_timeout,
        max_headers: s.max_headers,
        max_header_bytes: s.max_header_bytes,
        max_uri_bytes: s.max_uri_bytes,
        drain_timeout: s.drain_timeout,
        access_log: s.access_log,
        upgrade_protocols,
    })
}

fn compile_upstream(
    name: &str,
    section: &UpstreamSection,
    names: Names,
    hosts_file: Option<&std::path::Path>,
    own_nameservers: bool,
    errors: &mut Errors,
) -> Option<UpstreamSpec> {
    let field = format!("upstreams.{name}");
    if section.instances.is_empty() {
        errors.push(
            &format!("{field}.instances"),
            "must list at least one instance",
        );
    }
    let resolve = match section.resolve.as_deref() {
        None | Some("once") => Resolve::Once,
        Some("ttl") => Resolve::Ttl,
        Some(text) => match super::duration::parse(text) {
            Ok(interval) if interval >= Duration::from_millis(100) => Resolve::Every(interval),
            Ok(_) => {
                errors.push(&format!("{field}.resolve"), "must be at least 100ms");
                Resolve::Once
            }
            Err(e) => {
                errors.push(
                    &format!("{field}.resolve"),
                    format!("{e}; use \"once\", \"ttl\" or an interval such as \"10s\""),
                );
                Resolve::Once
            }
        },
    };
    let mut instances = Vec::with_capacity(section.instances.len());
    let mut bad_instances = false;
    let mut unresolved = false;
    for (i, text) in section.instances.iter().enumerate() {
        // With `ttl` and nameservers of its own, the system resolver would ask other
        // servers: names are first looked up by the re-resolution, at start.
        let host_port = text
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if resolve == Resolve::Ttl
            && own_nameservers
            && hosts_file.is_none()
            && host_port
            && text.parse::<SocketAddr>().is_err()
        {
            unresolved = true;
            continue;
        }
        match (net::instance_addrs(text, names, hosts_file), resolve) {
            (Ok(addrs), Resolve::Once) => instances.push(addrs[0]),
            (Ok(addrs), Resolve::Every(_) | Resolve::Ttl) => {
                for addr in addrs {
                    if !instances.contains(&addr) {
                        instances.push(addr);
                    }
                }
            }
            // It may resolve later: the upstream starts without it (503 while empty).
            (Err(net::LookupError::Unresolved(e)), Resolve::Every(_) | Resolve::Ttl) => {
                unresolved = true;
                tracing::warn!(upstream = name, instance = %text, error = %e, resolve = section.resolve.as_deref().unwrap_or_default(), "instance name does not resolve yet; the upstream starts without it and looks again");
            }
            (Err(e), _) => {
                bad_instances = true;
                errors.push(&format!("{field}.instances[{i}]"), e.to_string());
            }
        }
    }
    // Apps that check Host (allow-lists) want the name they are known by, not an IP:
    // the first instance's name, as written, unless it is an address.
    let default_host = section
        .instances
        .first()
        .filter(|text| text.parse::<SocketAddr>().is_err())
        .cloned();
    let protocol = compile_protocol(&field, section, errors);
    let health = section.health.as_ref().and_then(|health| {
        compile_health(
            &format!("{field}.health"),
            health,
            default_host,
            protocol,
            errors,
        )
    });
    for (key, value) in [
        ("connect_timeout", section.connect_timeout),
        ("queue_timeout", section.queue_timeout),
        ("response_timeout", section.response_timeout),
        ("read_timeout", section.read_timeout),
    ] {
        if value.is_zero() {
            errors.push(&format!("{field}.{key}"), "must be longer than 0");
        }
    }
    if section.max_connections_per_instance == 0 {
        errors.push(
            &format!("{field}.max_connections_per_instance"),
            "must be greater than 0",
        );
    }
    let max_eject_for = section
        .max_eject_for
        .unwrap_or_else(|| super::file::defaults::max_eject_for(section.eject_for));
    if max_eject_for < section.eject_for {
        errors.push(
            &format!("{field}.max_eject_for"),
            "must be at least eject_for",
        );
    }
    let tls = compile_upstream_tls(&field, section, errors);
    if !section.tls && (section.sni.is_some() || section.ca.is_some()) {
        errors.push(&format!("{field}.tls"), "sni and ca need tls = true");
    }
    (!bad_instances && !section.instances.is_empty()).then(|| UpstreamSpec {
        protocol,
        tls,
        resolve,
        unresolved,
        health,
        name: name.to_string(),
        instances,
        instance_names: section.instances.clone(),
        timeouts: Timeouts {
            connect: section.connect_timeout,
            queue: section.queue_timeout,
            response: section.response_timeout,
            read: section.read_timeout,
        },
        max_idle_per_instance: section.max_idle_per_instance,
        max_connections_per_instance: section.max_connections_per_instance,
        eject_after: section.eject_after,
        eject_for: section.eject_for,
        max_eject_for,
    })
}

fn compile_notify(
    field: &str,
    section: &super::file::NotifySection,
    errors: &mut Errors,
) -> Option<NotifySpec> {
    let before = errors.0.len();
    let url = match section.url.parse::<http::Uri>() {
        Ok(url)
            if matches!(url.scheme_str(), Some("http" | "https"))
                && url.host().is_some()
                && !url.authority().is_some_and(|a| a.as_str().contains('@')) =>
        {
            Some(url)
        }
        _ => {
            errors.push(
                &format!("{field}.url"),
                format!(
                    "{:?} is not an http:// or https:// URL (without user:password@)",
                    section.url
                ),
            );
            None
        }
    };
    let slack = match section.format.as_deref() {
        None | Some("json") => false,
        Some("slack") => true,
        Some(other) => {
            errors.push(
                &format!("{field}.format"),
                format!("unknown format {other:?} (use \"json\" or \"slack\")"),
            );
            false
        }
    };
    let events = match &section.events {
        None => NOTIFY_EVENTS.iter().map(|e| e.to_string()).collect(),
        Some(events) => {
            for (i, event) in events.iter().enumerate() {
                if !NOTIFY_EVENTS.contains(&event.as_str()) {
                    errors.push(
                        &format!("{field}.events[{i}]"),
                        format!(
                            "unknown event {event:?} (one of {})",
                            NOTIFY_EVENTS.join(", ")
                        ),
                    );
                }
            }
            if events.is_empty() {
                errors.push(&format!("{field}.events"), "lists no event");
            }
            events.clone()
        }
    };
    if section.secret_env.as_deref() == Some("") {
        errors.push(
            &format!("{field}.secret_env"),
            "must name an environment variable",
        );
    }
    (errors.0.len() == before).then(|| NotifySpec {
        url: url.expect("checked above"),
        slack,
        events,
        secret_env: section.secret_env.clone(),
    })
}

fn compile_health(
    field: &str,
    section: &HealthSection,
    default_host: Option<String>,
    protocol: Protocol,
    errors: &mut Errors,
) -> Option<HealthSpec> {
    let before = errors.0.len();
    if section.interval < Duration::from_millis(100) {
        errors.push(&format!("{field}.interval"), "must be at least 100ms");
    }
    if section.timeout.is_zero() {
        errors.push(&format!("{field}.timeout"), "must be longer than 0");
    } else if section.timeout > section.interval && !section.interval.is_zero() {
        errors.push(
            &format!("{field}.timeout"),
            format!(
                "{}ms must not be longer than interval ({}ms; default 5s): checks of one instance never overlap",
                section.timeout.as_millis(),
                section.interval.as_millis()
            ),
        );
    }
    for (key, value) in [("rise", section.rise), ("fall", section.fall)] {
        if !(1..=1000).contains(&value) {
            errors.push(&format!("{field}.{key}"), "must be from 1 to 1000");
        }
    }
    let only_http = "applies to check = \"http\" only";
    let only_grpc = "applies to check = \"grpc\" only";
    let check = match section.check.as_deref() {
        None | Some("http") => {
            unused_by_check(
                field,
                &[("service", section.service.is_some())],
                only_grpc,
                errors,
            );
            let path = section.path.clone().unwrap_or_else(|| "/".to_string());
            if !path.starts_with('/') || http::uri::PathAndQuery::try_from(path.as_str()).is_err() {
                errors.push(
                    &format!("{field}.path"),
                    format!("{path:?} must be a path starting with /"),
                );
            }
            check_host(field, section, "Host header", errors);
            let expect = match section.expect.as_deref() {
                None => 200..=399,
                Some(text) => match parse_status_range(text) {
                    Ok(range) => range,
                    Err(e) => {
                        errors.push(&format!("{field}.expect"), e);
                        200..=399
                    }
                },
            };
            HealthCheck::Http {
                path,
                host: section.host.clone().or(default_host),
                expect,
            }
        }
        Some("grpc") => {
            unused_by_check(
                field,
                &[
                    ("path", section.path.is_some()),
                    ("expect", section.expect.is_some()),
                ],
                "applies to check = \"http\" only (a gRPC check asks grpc.health.v1.Health/Check)",
                errors,
            );
            if protocol == Protocol::Http1 {
                errors.push(
                    &format!("{field}.check"),
                    "\"grpc\" needs HTTP/2 to the upstream: set protocol = \"h2c\", \"h2\" or \"auto\"",
                );
            }
            check_host(field, section, "authority", errors);
            HealthCheck::Grpc {
                service: section.service.clone().unwrap_or_default(),
                host: section.host.clone().or(default_host),
            }
        }
        Some("tcp") => {
            unused_by_check(
                field,
                &[
                    ("path", section.path.is_some()),
                    ("expect", section.expect.is_some()),
                    ("host", section.host.is_some()),
                ],
                only_http,
                errors,
            );
            unused_by_check(
                field,
                &[("service", section.service.is_some())],
                only_grpc,
                errors,
            );
            HealthCheck::Tcp
        }
        Some(other) => {
            errors.push(
                &format!("{field}.check"),
                format!("unknown check {other:?} (use \"http\", \"tcp\" or \"grpc\")"),
            );
            HealthCheck::Tcp
        }
    };
    (errors.0.len() == before).then_some(HealthSpec {
        check,
        interval: section.interval,
        timeout: section.timeout,
        rise: section.rise,
        fall: section.fall,
    })
}

/// An error for each of `fields` (name, whether set) that is set although this kind
/// of check does not use it.
fn unused_by_check(field: &str, fields: &[(&str, bool)], why: &str, errors: &mut Errors) {
    for (key, _) in fields.iter().filter(|(_, set)| *set) {
        errors.push(&format!("{field}.{key}"), why);
    }
}

/// `health.host`, if set, must be an authority (no user info): what the check sends
/// as its `what` (the HTTP Host header, or a gRPC call's authority).
fn check_host(field: &str, section: &HealthSection, what: &str, errors: &mut Errors) {
    if let Some(host) = &section.host {
        if host.parse::<http::uri::Authority>().is_err() || host.contains('@') {
            errors.push(
                &format!("{field}.host"),
                format!("{host:?} is not a valid {what}"),
            );
        }
    }
}

/// `"200-399"` or `"204"`: statuses from 100 to 599.
fn parse_status_range(text: &str) -> Result<std::ops::RangeInclusive<u16>, String> {
    let (low, high) = text.split_once('-').unwrap_or((text, text));
    let status = |s: &str| {
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|s| (100..=599).contains(s))
    };
    match (status(low), status(high)) {
        (Some(low), Some(high)) if low <= high => Ok(low..=high),
        _ => Err(format!(
            "{text:?} is not a status range (such as \"200-399\" or \"204\", within 100-599)"
        )),
    }
}

/// The upstream protocol, checked against `tls`: HTTP/2 over TLS and ALPN need TLS, and
/// cleartext h2c refuses it (it would be h2).
fn compile_protocol(field: &str, section: &UpstreamSection, errors: &mut Errors) -> Protocol {
    let field = format!("{field}.protocol");
    let protocol = match section.protocol.as_str() {
        "http1" => Protocol::Http1,
        "h2c" => Protocol::H2c,
        "h2" => Protocol::H2,
        "auto" => Protocol::Auto,
        other => {
            errors.push(
                &field,
                format!("{other:?} is not one of \"http1\", \"h2c\", \"h2\", \"auto\""),
            );
            return Protocol::Http1;
        }
    };
    match (protocol, section.tls) {
        (Protocol::H2 | Protocol::Auto, false) => errors.push(
            &field,
            format!(
                "\"{}\" is negotiated over TLS and needs tls = true; for HTTP/2 without TLS use \"h2c\"",
                protocol.as_str()
            ),
        ),
        (Protocol::H2c, true) => errors.push(
            &field,
            "\"h2c\" is HTTP/2 without TLS; with tls = true use \"h2\" (or \"auto\")",
        ),
        _ => {}
    }
    protocol
}

fn compile_upstream_tls(
    field: &str,
    section: &UpstreamSection,
    errors: &mut Errors,
) -> Option<UpstreamTls> {
    if !section.tls {
        return None;
    }
    let server_name = match &section.sni {
        Some(name) => name.clone(),
        None => {
            let first = section
                .instances
                .first()
                .map(String::as_str)
                .unwrap_or_default();
            let host = first.rsplit_once(':').map_or(first, |(host, _)| host);
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        }
    };
    if rustls::pki_types::ServerName::try_from(server_name.as_str()).is_err() {
        errors.push(
            &format!("{field}.sni"),
            format!("{server_name:?} is not a valid server name"),
        );
    }
    let roots = section.ca.as_ref().and_then(|path| {
        use rustls::pki_types::pem::PemObject;
        let certs: Result<Vec<_>, _> =
            rustls::pki_types::CertificateDer::pem_file_iter(path).and_then(|iter| iter.collect());
        match certs {
            Ok(certs) if !certs.is_empty() => Some(certs),
            Ok(_) => {
                errors.push(
                    &format!("{field}.ca"),
                    format!("{} holds no PEM certificate", path.display()),
                );
                None
            }
            Err(e) => {
                errors.push(&format!("{field}.ca"), format!("{}: {e}", path.display()));
                None
            }
        }
    });
    Some(UpstreamTls { server_name, roots })
}

fn compile_route(
    field: &str,
    r: &RouteSection,
    file: &FileConfig,
    errors: &mut Errors,
) -> Option<RouteSpec> {
    let before = errors.0.len();
    if r.name.is_empty()
        || !r
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        errors.push(
            &format!("{field}.name"),
            "must be non-empty and use only letters, digits, '-', '_' and '.'",
        );
    } else if r.name.chars().all(|c| c == '.') {
        // `.` and `..` are path segments HTTP clients resolve away: /admin/routes/..
        // could never be reached.
        errors.push(
            &format!("{field}.name"),
            format!("{:?} is not a usable name (it is a path segment)", r.name),
        );
    }
    let host = if r.host == "*" {
        HostMatch::Any
    } else if r.host.is_empty() || r.host.contains(['/', ' ', ':']) {
        errors.push(
            &format!("{field}.host"),
            format!("{:?} is not a host name or \"*\"", r.host),
        );
        HostMatch::Any
    } else {
        HostMatch::Exact(r.host.to_ascii_lowercase())
    };
    if !r.path_prefix.starts_with('/') {
        errors.push(&format!("{field}.path_prefix"), "must start with '/'");
    }
    for (key, upstream) in [("stable", Some(&r.stable)), ("canary", r.canary.as_ref())] {
        if let Some(upstream) = upstream {
            if !file.upstreams.contains_key(upstream) {
                errors.push(
                    &format!("{field}.{key}"),
                    format!("unknown upstream {upstream:?}"),
                );
            }
        }
    }
    let file_weight_bp = weight_to_bp(r.canary_weight)
        .map_err(|e| errors.push(&format!("{field}.canary_weight"), e))
        .unwrap_or(0);
    if r.canary.is_none() && file_weight_bp > 0 {
        errors.push(
            &format!("{field}.canary_weight"),
            "is above 0 but the route has no canary",
        );
    }
    if r.split_key.is_empty() {
        errors.push(
            &format!("{field}.split_key"),
            "must list at least one key source",
        );
    }
    let split_key = r
        .split_key
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            KeySource::parse(text)
                .map_err(|e| errors.push(&format!("{field}.split_key[{i}]"), e))
                .ok()
        })
        .collect();
    let sticky_cookie = non_empty(&r.sticky_cookie);
    if let Some(name) = &sticky_cookie {
        if !is_token(name) {
            errors.push(
                &format!("{field}.sticky_cookie"),
                format!("{name:?} is not a valid cookie name"),
            );
        }
    }
    let override_from: Vec<IpRange> = r
        .override_from
        .iter()
        .enumerate()
        .filter_map(|(i, text)| {
            IpRange::parse(text)
                .map_err(|e| errors.push(&format!("{field}.override_from[{i}]"), e))
                .ok()
        })
        .collect();
    let override_name = non_empty(&r.override_name).and_then(|name| {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(header) => Some(OverrideName {
                header,
                cookie: name,
                enabled: r.override_enabled,
                from: override_from,
            }),
            Err(_) => {
                errors.push(
                    &format!("{field}.override_name"),
                    format!("{name:?} is not a valid header name"),
                );
                None
            }
        }
    });
    let variant_header = non_empty(&r.variant_header).and_then(|name| {
        HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| {
                errors.push(
                    &format!("{field}.variant_header"),
                    format!("{name:?} is not a valid header name"),
                )
            })
            .ok()
    });
    let grpc_errors = crate::grpc::CodeSet::parse(&r.grpc_error_statuses).unwrap_or_else(|e| {
        errors.push(&format!("{field}.grpc_error_statuses"), e);
        crate::grpc::CodeSet::SERVER_FAILURES
    });
    let canary_unavailable = match r.canary_unavailable.as_str() {
        "fail" => CanaryUnavailable::Fail,
        "stable" => CanaryUnavailable::Stable,
        other => {
            errors.push(
                &format!("{field}.canary_unavailable"),
                format!("{other:?} is not \"fail\" or \"stable\""),
            );
            CanaryUnavailable::Fail
        }
    };
    let slo = r
        .slo
        .as_ref()
        .map(|s| compile_slo(&format!("{field}.slo"), s, errors));
    let rollout = r.rollout.as_ref().map(|ro| {
        let steps_field = format!("{field}.rollout.steps");
        let mut steps = Vec::with_capacity(ro.steps.len());
        let mut last_bp = 0;
        for (i, step) in ro.steps.iter().enumerate() {
            let at = format!("{steps_field}[{i}]");
            let (weight, hold, pause) = match step {
                StepSection::Weight(w) => (Some(*w), None, false),
                StepSection::Table(t) => (t.weight, t.hold, t.pause),
            };
            let step = match (weight, pause) {
                (Some(_), true) => {
                    errors.push(&at, "a step is a weight or a pause, not both");
                    continue;
                }
                (None, false) => {
                    errors.push(&at, "needs a weight (or pause = true)");
                    continue;
                }
                (None, true) => {
                    if hold.is_some() {
                        errors.push(&at, "a pause has no hold: it waits for promote");
                    }
                    if i == 0 || i + 1 == ro.steps.len() {
                        errors.push(&at, "a pause goes between two weights");
                    }
                    Step::Pause
                }
                (Some(w), false) => {
                    let bp = match weight_to_bp(w) {
                        Ok(bp) => bp,
                        Err(e) => {
                            errors.push(&at, e);
                            continue;
                        }
                    };
                    if bp <= last_bp {
                        errors.push(
                            &at,
                            format!("weight {w} must be above the step before it (weights rise, from above 0)"),
                        );
                    }
                    last_bp = bp;
                    let hold = match (hold, ro.interval) {
                        (Some(hold), _) if hold.is_zero() => {
                            errors.push(&format!("{at}.hold"), "must be longer than 0");
                            hold
                        }
                        (Some(hold), _) => hold,
                        (None, Some(interval)) => interval,
                        // The last weight needs no hold: reaching it completes the rollout.
                        (None, None) if i + 1 == ro.steps.len() => Duration::ZERO,
                        (None, None) => {
                            errors.push(&at, "needs a hold (or a rollout interval)");
                            Duration::ZERO
                        }
                    };
                    Step::Weight { bp, hold }
                }
            };
            steps.push(step);
        }
        if ro.steps.is_empty() {
            errors.push(&steps_field, "must list at least one step");
        }
        if ro.interval.is_some_and(|i| i.is_zero()) {
            errors.push(
                &format!("{field}.rollout.interval"),
                "must be longer than 0",
            );
        }
        if r.canary.is_none() {
            errors.push(&format!("{field}.rollout"), "needs a canary upstream");
        }
        let abort = match ro.on_deadline.as_deref() {
            None | Some("pause") => false,
            Some("abort") => true,
            Some(other) => {
                errors.push(
                    &format!("{field}.rollout.on_deadline"),
                    format!("unknown action {other:?} (use \"pause\" or \"abort\")"),
                );
                false
            }
        };
        if ro.progress_deadline.is_some_and(|d| d.is_zero()) {
            errors.push(
                &format!("{field}.rollout.progress_deadline"),
                "must be longer than 0",
            );
        }
        if ro.on_deadline.is_some() && ro.progress_deadline.is_none() {
            errors.push(
                &format!("{field}.rollout.on_deadline"),
                "needs a progress_deadline",
            );
        }
        let window = ro.allowed_hours.as_deref().and_then(|text| {
            Window::parse(text)
                .map_err(|e| errors.push(&format!("{field}.rollout.allowed_hours"), e))
                .ok()
        });
        RolloutSpec {
            steps,
            progress_deadline: ro.progress_deadline.map(|d| (d, abort)),
            window,
        }
    });
    (errors.0.len() == before).then(|| RouteSpec {
        name: r.name.clone(),
        host,
        path_prefix: r.path_prefix.clone(),
        stable: r.stable.clone(),
        canary: r.canary.clone(),
        file_weight_bp,
        split_key,
        salt: SaltKey::derive(r.hash_salt.as_deref().unwrap_or(&r.name)),
        sticky_cookie,
        override_name,
        canary_allow_list: r.canary_allow_list.iter().cloned().collect(),
        canary_unavailable,
        variant_header,
        grpc_errors,
        slo,
        rollout,
    })
}

fn compile_slo(field: &str, s: &SloSection, errors: &mut Errors) -> SloSpec {
    if s.window < Duration::from_secs(1) {
        errors.push(&format!("{field}.window"), "must be at least 1s");
    }
    if !(s.confidence > 0.5 && s.confidence < 1.0) {
        errors.push(
            &format!("{field}.confidence"),
            format!("{} is outside (0.5, 1)", s.confidence),
        );
    }
    for (key, value) in [
        ("max_error_rate", s.max_error_rate),
        ("max_error_rate_increase", s.max_error_rate_increase),
    ] {
        if let Some(v) = value {
            if !(v > 0.0 && v < 1.0) {
                errors.push(
                    &format!("{field}.{key}"),
                    format!("{v} is outside (0, 1): a limit of 0 would trip on the first error"),
                );
            }
        }
    }
    let latency: Vec<(&str, LatencyLimit)> = [
        s.max_p99_latency.map(|limit| {
            let quantile = 0.99;
            ("max_p99_latency", LatencyLimit { quantile, limit })
        }),
        s.max_latency.as_ref().map(|rule| {
            let (quantile, limit) = (rule.quantile, rule.limit);
            ("max_latency", LatencyLimit { quantile, limit })
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    for (key, rule) in &latency {
        check_quantile(&format!("{field}.{key}"), rule.quantile, errors);
        if rule.limit.is_zero() {
            errors.push(
                &format!("{field}.{key}"),
                "a limit of 0 would trip on every request",
            );
        }
    }
    let latency_ratio: Vec<(&str, LatencyRatio)> = [
        s.max_p99_ratio.map(|ratio| {
            let quantile = 0.99;
            ("max_p99_ratio", LatencyRatio { quantile, ratio })
        }),
        s.max_latency_ratio.as_ref().map(|rule| {
            let (quantile, ratio) = (rule.quantile, rule.ratio);
            ("max_latency_ratio", LatencyRatio { quantile, ratio })
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    for (key, rule) in &latency_ratio {
        check_quantile(&format!("{field}.{key}"), rule.quantile, errors);
        if !(rule.ratio.is_finite() && rule.ratio > 1.0) {
            errors.push(
                &format!("{field}.{key}"),
                format!("ratio {} must be above 1", rule.ratio),
            );
        }
    }
    if s.max_error_rate.is_none()
        && s.max_error_rate_increase.is_none()
        && latency.is_empty()
        && latency_ratio.is_empty()
    {
        errors.push(field, "sets no rule (max_error_rate, max_error_rate_increase, max_latency, max_latency_ratio, max_p99_latency or max_p99_ratio)");
    }
    SloSpec {
        window: s.window,
        min_requests: s.min_requests,
        confidence: s.confidence,
        dry_run: s.dry_run,
        max_error_rate: s.max_error_rate,
        max_error_rate_increase: s.max_error_rate_increase,
        latency: latency.into_iter().map(|(_, rule)| rule).collect(),
        latency_ratio: latency_ratio.into_iter().map(|(_, rule)| rule).collect(),
        count_4xx: s.count_4xx,
    }
}

fn check_quantile(field: &str, quantile: f64, errors: &mut Errors) {
    if !(quantile > 0.0 && quantile < 1.0) {
        errors.push(field, format!("quantile {quantile} is outside (0, 1)"));
    }
}

fn non_empty(text: &str) -> Option<String> {
    (!text.is_empty()).then(|| text.to_string())
}

/// RFC 9110 token characters, as cookie and header names need.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_convert_to_basis_points() {
        assert_eq!(weight_to_bp(0.0), Ok(0));
        assert_eq!(weight_to_bp(12.5), Ok(1250));
        assert_eq!(weight_to_bp(0.01), Ok(1));
        assert_eq!(weight_to_bp(100.0), Ok(10_000));
        assert!(weight_to_bp(100.01).is_err());
        assert!(weight_to_bp(-1.0).is_err());
        assert!(weight_to_bp(0.001).is_err());
        assert!(weight_to_bp(f64::NAN).is_err());
    }
}

#[cfg(test)]
mod window_tests {
    use super::Window;

    fn at(text: &str) -> jiff::Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn a_window_is_open_on_its_days_and_hours_in_its_zone() {
        let w = Window::parse("Mon-Fri 09:00-17:00 Europe/Berlin").unwrap();
        // 2026-11-27 is a Friday; Berlin is UTC+1 in November.
        assert!(w.is_open(at("2026-11-27T08:00:00Z")), "09:00 in Berlin");
        assert!(!w.is_open(at("2026-11-27T07:59:00Z")), "08:59 in Berlin");
        assert!(
            !w.is_open(at("2026-11-27T16:00:00Z")),
            "17:00 in Berlin: closed"
        );
        assert!(!w.is_open(at("2026-11-28T10:00:00Z")), "Saturday");
        let night = Window::parse("Sat,Sun 22:00-06:00 UTC").unwrap();
        assert!(night.is_open(at("2026-11-28T23:00:00Z")), "Saturday night");
        assert!(
            night.is_open(at("2026-11-30T05:00:00Z")),
            "early Monday belongs to Sunday"
        );
        assert!(!night.is_open(at("2026-11-27T23:00:00Z")), "Friday night");
        assert!(Window::parse("daily 00:00-24:00 UTC")
            .unwrap()
            .is_open(at("2026-11-27T12:00:00Z")));
    }

    #[test]
    fn a_malformed_window_says_what_is_wrong() {
        for (bad, says) in [
            ("Mon-Fri 09:00-17:00", "time zone"),
            ("Mon-Fry 09:00-17:00 UTC", "\"Fry\""),
            ("Fri-Mon 09:00-17:00 UTC", "days run Mon to Sun"),
            ("Mon-Fri 9-17 UTC", "not a time"),
            ("Mon-Fri 09:00-09:00 UTC", "empty range"),
            ("Mon-Fri 09:00-17:00 Mars/Olympus", "not a time zone"),
        ] {
            let error = Window::parse(bad).unwrap_err();
            assert!(error.contains(says), "{bad}: {error}");
        }
    }
}
