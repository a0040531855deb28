//! DNS re-resolution (control thread). For every upstream with `resolve` set, one task
//! looks its instance names up again, on the control runtime (never on a worker), and
//! sends the state writer the new address list; the writer keeps the pools of
//! addresses that stay and retires those that went. A lookup that fails or finds
//! nothing keeps the last good set, counted and logged.
//!
//! `resolve = "<interval>"` uses the system resolver (getaddrinfo, on the blocking pool)
//! at that interval. `resolve = "ttl"` asks DNS directly (hickory-resolver: the system's
//! nameservers, or `resolver.nameservers`) and looks again when the shortest TTL of
//! the answers runs out, as NGINX Plus's `resolve` and Envoy's `STRICT_DNS` with
//! `respect_dns_ttl` do. With `resolver.hosts_file`, the file replaces DNS in both.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use metrics::Counter;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::net::{self, Names};
use crate::config::Resolve;
use crate::state::StateHandle;
use crate::telemetry::names::{DNS_RESOLUTIONS_TOTAL, LABEL_OUTCOME, LABEL_UPSTREAM};

/// With `ttl`: bounds on the wait for the next lookup, whatever the TTL says (a TTL of
/// 0 must not become a busy loop, nor a day-long TTL a day without a look), and the
/// wait after a failed lookup (or with a hosts file, which has no TTL).
const TTL_MIN: Duration = Duration::from_secs(1);
const TTL_MAX: Duration = Duration::from_secs(300);
const TTL_RETRY: Duration = Duration::from_secs(5);
/// Addresses one upstream takes from DNS at most: each is a pool per worker and a
/// health check, and an answer with thousands must not stall the control thread.
const MAX_INSTANCES: usize = 256;

/// What a resolver task was started for; when it changes, the task is replaced.
#[derive(PartialEq)]
struct Key {
    upstream: String,
    names: Vec<String>,
    resolve: Resolve,
    hosts_file: Option<PathBuf>,
    nameservers: Vec<SocketAddr>,
}

/// Runs the re-resolution tasks until `shutdown`.
pub async fn run(state: StateHandle, shutdown: watch::Receiver<bool>) {
    let mut tasks: Vec<(Key, JoinHandle<()>)> = Vec::new();
    super::follow_snapshot(&state, shutdown, |state| reconcile(state, &mut tasks)).await;
    for (_, handle) in tasks {
        handle.abort();
    }
}

fn reconcile(state: &StateHandle, tasks: &mut Vec<(Key, JoinHandle<()>)>) {
    let snapshot = state.shared.snapshot.load();
    let settings = &snapshot.settings;
    let wanted: Vec<Key> = snapshot
        .upstreams
        .iter()
        .filter(|u| u.spec.resolve != Resolve::Once)
        .map(|u| Key {
            upstream: u.spec.name.clone(),
            names: u.spec.instance_names.clone(),
            resolve: u.spec.resolve,
            hosts_file: settings.hosts_file.clone(),
            nameservers: settings.nameservers.clone(),
        })
        .collect();
    tasks.retain(|(key, handle)| {
        let keep = wanted.contains(key);
        if !keep {
            handle.abort();
        }
        keep
    });
    for key in wanted {
        if tasks.iter().any(|(k, _)| *k == key) {
            continue;
        }
        let counter = |outcome| {
            state.shared.registry.counter(
                DNS_RESOLUTIONS_TOTAL,
                &[(LABEL_UPSTREAM, &key.upstream), (LABEL_OUTCOME, outcome)],
            )
        };
        let resolver = Resolver {
            state: state.clone(),
            upstream: key.upstream.clone(),
            names: key.names.clone(),
            hosts_file: key.hosts_file.clone(),
            ok: counter("ok"),
            failed: counter("failed"),
            last_good: HashMap::new(),
        };
        let task = match key.resolve {
            Resolve::Every(interval) => tokio::spawn(resolver.every(interval)),
            _ => tokio::spawn(resolver.by_ttl(key.nameservers.clone())),
        };
        tasks.push((key, task));
    }
}

struct Resolver {
    state: StateHandle,
    upstream: String,
    names: Vec<String>,
    hosts_file: Option<PathBuf>,
    ok: Counter,
    failed: Counter,
    /// Each name's last good answer: a name that fails keeps it, the others move on.
    last_good: HashMap<String, Vec<SocketAddr>>,
}

impl Resolver {
    /// Looks the names up every `interval` (the config's load has just done it once).
    async fn every(mut self, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            let names = self.names.clone();
            let hosts_file = self.hosts_file.clone();
            let looked_up = tokio::task::spawn_blocking(move || {
                names
                    .iter()
                    .map(|name| net::instance_addrs(name, Names::Resolve, hosts_file.as_deref()))
                    .map(|answer| answer.map_err(|e| e.to_string()))
                    .collect::<Vec<_>>()
            })
            .await;
            if let Ok(answers) = looked_up {
                self.apply(answers).await;
            }
        }
    }

    /// Looks the names up in DNS now, then again when the shortest TTL runs out.
    async fn by_ttl(mut self, nameservers: Vec<SocketAddr>) {
        let built = tokio::task::spawn_blocking(move || dns_client(&nameservers))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let dns = match built {
            Ok(dns) => dns,
            Err(error) => {
                tracing::error!(upstream = %self.upstream, %error, "resolve = \"ttl\": no DNS client (check /etc/resolv.conf or resolver.nameservers); looking names up every 30s instead");
                return self.every(Duration::from_secs(30)).await;
            }
        };
        loop {
            let expires = self.ttl_round(&dns).await;
            tokio::time::sleep(expires.clamp(TTL_MIN, TTL_MAX)).await;
        }
    }

    /// Looks every name up once and applies the answers; how long until the first of
    /// them expires.
    async fn ttl_round(&mut self, dns: &TokioResolver) -> Duration {
        let mut answers = Vec::new();
        let mut expires = TTL_MAX;
        for name in &self.names {
            let (answer, ttl) = self.lookup_ttl(dns, name).await;
            answers.push(answer);
            expires = expires.min(ttl);
        }
        self.apply(answers).await;
        expires
    }

    /// One name's addresses and how long they are valid.
    async fn lookup_ttl(
        &self,
        dns: &TokioResolver,
        name: &str,
    ) -> (Result<Vec<SocketAddr>, String>, Duration) {
        let literal = name.parse::<SocketAddr>().ok();
        let split = name
            .rsplit_once(':')
            .and_then(|(host, port)| Some((host, port.parse::<u16>().ok()?)));
        match (literal, split, &self.hosts_file) {
            (Some(addr), _, _) => (Ok(vec![addr]), TTL_MAX),
            (None, Some(_), Some(hosts_file)) => {
                let (name, hosts_file) = (name.to_string(), hosts_file.clone());
                let answer = tokio::task::spawn_blocking(move || {
                    net::instance_addrs(&name, Names::Resolve, Some(&hosts_file))
                        .map_err(|e| e.to_string())
                })
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
                (answer, TTL_RETRY)
            }
            (None, Some((host, port)), None) => match ask(dns, host, port).await {
                Ok((addrs, _)) if addrs.is_empty() => {
                    (Err(format!("{name:?} resolves to no address")), TTL_RETRY)
                }
                Ok((addrs, ttl)) => (Ok(addrs), ttl),
                Err(error) => (Err(format!("{name:?}: {error}")), TTL_RETRY),
            },
            (None, None, _) => (Err(format!("{name:?} is not host:port")), TTL_MAX),
        }
    }

    /// Sends the writer the addresses of every name: a name that failed keeps its last
    /// good answer (counted and logged), the others take their new one.
    async fn apply(&mut self, answers: Vec<Result<Vec<SocketAddr>, String>>) {
        let mut addrs = Vec::new();
        let mut errors = Vec::new();
        for (name, answer) in self.names.iter().zip(answers) {
            let found = match answer {
                Ok(found) => {
                    self.last_good.insert(name.clone(), found.clone());
                    found
                }
                Err(error) => {
                    errors.push(error);
                    self.last_good.get(name).cloned().unwrap_or_default()
                }
            };
            for addr in found {
                if addrs.len() >= MAX_INSTANCES {
                    tracing::warn!(upstream = %self.upstream, max = MAX_INSTANCES, "DNS gives the upstream more addresses than splitgate takes; the rest are left out");
                    break;
                }
                if !addrs.contains(&addr) {
                    addrs.push(addr);
                }
            }
        }
        if errors.is_empty() {
            self.ok.increment(1);
        } else {
            self.failed.increment(1);
            tracing::warn!(
                upstream = %self.upstream,
                errors = ?errors,
                "instance names did not resolve; they keep their last good addresses"
            );
            if addrs.is_empty() {
                return;
            }
        }
        self.state
            .set_members(&self.upstream, self.names.clone(), addrs)
            .await;
    }
}

/// A name's A and AAAA records (asked apart: one family failing is a failed lookup,
/// not an answer without it; "no records" is an empty family) and how long they hold.
async fn ask(
    dns: &TokioResolver,
    host: &str,
    port: u16,
) -> Result<(Vec<SocketAddr>, Duration), String> {
    let now = std::time::Instant::now();
    let (v4, v6) = tokio::join!(dns.ipv4_lookup(host), dns.ipv6_lookup(host));
    let mut addrs = Vec::new();
    let mut ttl = TTL_MAX;
    match v4 {
        Ok(found) => {
            ttl = ttl.min(found.valid_until().saturating_duration_since(now));
            addrs.extend(found.iter().map(|a| SocketAddr::new(a.0.into(), port)));
        }
        Err(e) if e.is_no_records_found() => {}
        Err(e) => return Err(e.to_string()),
    }
    match v6 {
        Ok(found) => {
            ttl = ttl.min(found.valid_until().saturating_duration_since(now));
            addrs.extend(found.iter().map(|a| SocketAddr::new(a.0.into(), port)));
        }
        Err(e) if e.is_no_records_found() => {}
        Err(e) => return Err(e.to_string()),
    }
    addrs.dedup();
    Ok((addrs, ttl))
}

/// Resolves, before the workers start, every `ttl` upstream whose names the config's
/// load could not look up (with `resolver.nameservers`, none are), so that a start or a
/// takeover does not serve 503s from an empty upstream. Bounded by `within`.
pub async fn prime(state: &StateHandle, within: Duration) {
    let snapshot = state.shared.snapshot.load();
    let pending: Vec<_> = snapshot
        .upstreams
        .iter()
        .filter(|u| u.spec.resolve == Resolve::Ttl && u.spec.unresolved)
        .map(|u| (u.spec.name.clone(), u.spec.instance_names.clone()))
        .collect();
    if pending.is_empty() {
        return;
    }
    let nameservers = snapshot.settings.nameservers.clone();
    let hosts_file = snapshot.settings.hosts_file.clone();
    let work = async {
        let Ok(Ok(dns)) = tokio::task::spawn_blocking(move || dns_client(&nameservers)).await
        else {
            return;
        };
        for (upstream, names) in pending {
            let mut resolver = Resolver {
                state: state.clone(),
                upstream,
                names,
                hosts_file: hosts_file.clone(),
                ok: Counter::noop(),
                failed: Counter::noop(),
                last_good: HashMap::new(),
            };
            resolver.ttl_round(&dns).await;
        }
    };
    if tokio::time::timeout(within, work).await.is_err() {
        tracing::warn!("DNS did not answer for every upstream within {within:?}; those start empty and fill in as answers come");
    }
}

/// The DNS client for `ttl`: the system's nameservers, or `nameservers` when set (and
/// then not /etc/hosts). A and AAAA are both asked (every address an instance, as with
/// the system resolver). Its cache keeps nothing longer than splitgate waits between
/// lookups, so the bounds above hold. Reads /etc/resolv.conf: call it off the control
/// thread.
fn dns_client(nameservers: &[SocketAddr]) -> Result<TokioResolver, String> {
    let mut builder = if nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| e.to_string())?
    } else {
        let mut config = ResolverConfig::new();
        for &server in nameservers {
            config.add_name_server(NameServerConfig::new(server, Protocol::Udp));
            config.add_name_server(NameServerConfig::new(server, Protocol::Tcp));
        }
        let mut builder =
            TokioResolver::builder_with_config(config, TokioConnectionProvider::default());
        builder.options_mut().use_hosts_file = ResolveHosts::Never;
        builder
    };
    let options = builder.options_mut();
    options.positive_max_ttl = Some(TTL_MAX);
    options.negative_max_ttl = Some(TTL_RETRY);
    Ok(builder.build())
}
