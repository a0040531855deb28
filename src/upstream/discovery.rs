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

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig};
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

/// How often the task set is compared with the snapshot.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);
/// With `ttl`: bounds on the wait for the next lookup, whatever the TTL says (a TTL of
/// 0 must not become a busy loop, nor a day-long TTL a day without a look), and the
/// wait after a failed lookup (or with a hosts file, which has no TTL).
const TTL_MIN: Duration = Duration::from_secs(1);
const TTL_MAX: Duration = Duration::from_secs(300);
const TTL_RETRY: Duration = Duration::from_secs(5);

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
pub async fn run(state: StateHandle, mut shutdown: watch::Receiver<bool>) {
    let mut tasks: Vec<(Key, JoinHandle<()>)> = Vec::new();
    let mut seen = u64::MAX;
    loop {
        let generation = state.shared.generation.load(Ordering::Acquire);
        if generation != seen {
            seen = generation;
            reconcile(&state, &mut tasks);
        }
        tokio::select! {
            _ = tokio::time::sleep(RECONCILE_EVERY) => {}
            _ = crate::server::stopped(&mut shutdown) => break,
        }
    }
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
}

impl Resolver {
    /// Looks the names up every `interval` (the config's load has just done it once).
    async fn every(self, interval: Duration) {
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
    async fn by_ttl(self, nameservers: Vec<SocketAddr>) {
        let dns = match dns_client(&nameservers) {
            Ok(dns) => Arc::new(dns),
            Err(error) => {
                tracing::error!(upstream = %self.upstream, %error, "resolve = \"ttl\": no DNS client (check /etc/resolv.conf or resolver.nameservers); looking names up every 30s instead");
                return self.every(Duration::from_secs(30)).await;
            }
        };
        loop {
            let mut answers = Vec::new();
            let mut expires = TTL_MAX;
            for name in &self.names {
                let (answer, ttl) = self.lookup_ttl(&dns, name).await;
                answers.push(answer);
                expires = expires.min(ttl);
            }
            self.apply(answers).await;
            tokio::time::sleep(expires.clamp(TTL_MIN, TTL_MAX)).await;
        }
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
            (None, Some((host, port)), None) => match dns.lookup_ip(host).await {
                Ok(found) => {
                    let ttl = found
                        .valid_until()
                        .saturating_duration_since(std::time::Instant::now());
                    let mut addrs: Vec<SocketAddr> = Vec::new();
                    for ip in found.iter() {
                        let addr = SocketAddr::new(ip, port);
                        if !addrs.contains(&addr) {
                            addrs.push(addr);
                        }
                    }
                    match addrs.is_empty() {
                        true => (Err(format!("{name:?} resolves to no address")), TTL_RETRY),
                        false => (Ok(addrs), ttl),
                    }
                }
                Err(error) => (Err(format!("{name:?}: {error}")), TTL_RETRY),
            },
            (None, None, _) => (Err(format!("{name:?} is not host:port")), TTL_MAX),
        }
    }

    /// Sends the writer the addresses of every name, or keeps the last good set when a
    /// name failed.
    async fn apply(&self, answers: Vec<Result<Vec<SocketAddr>, String>>) {
        let mut addrs = Vec::new();
        let mut errors = Vec::new();
        for answer in answers {
            match answer {
                Ok(found) => {
                    for addr in found {
                        if !addrs.contains(&addr) {
                            addrs.push(addr);
                        }
                    }
                }
                Err(error) => errors.push(error),
            }
        }
        if !errors.is_empty() {
            self.failed.increment(1);
            tracing::warn!(
                upstream = %self.upstream,
                errors = ?errors,
                "instance names did not resolve; keeping the last good addresses"
            );
            return;
        }
        self.ok.increment(1);
        self.state
            .set_members(&self.upstream, self.names.clone(), addrs)
            .await;
    }
}

/// The DNS client for `ttl`: the system's nameservers, or `nameservers` when set. A and
/// AAAA are both asked (every address an instance, as with the system resolver).
fn dns_client(nameservers: &[SocketAddr]) -> Result<TokioResolver, String> {
    let mut builder = if nameservers.is_empty() {
        TokioResolver::builder_tokio().map_err(|e| e.to_string())?
    } else {
        let mut config = ResolverConfig::new();
        for &server in nameservers {
            config.add_name_server(NameServerConfig::new(server, Protocol::Udp));
            config.add_name_server(NameServerConfig::new(server, Protocol::Tcp));
        }
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
    };
    builder.options_mut().ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    Ok(builder.build())
}
