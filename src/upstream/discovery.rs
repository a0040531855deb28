//! DNS re-resolution (control thread). For every upstream with `resolve = "<interval>"`,
//! one task looks its instance names up again at that interval, on the blocking pool
//! (never on a worker), and sends the state writer the new address list; the writer
//! keeps the pools of addresses that stay and retires those that went. A lookup that
//! fails or finds nothing keeps the last good set, counted and logged.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use metrics::Counter;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::net::{self, Names};
use crate::config::Resolve;
use crate::state::StateHandle;
use crate::telemetry::names::{DNS_RESOLUTIONS_TOTAL, LABEL_OUTCOME, LABEL_UPSTREAM};

/// How often the task set is compared with the snapshot.
const RECONCILE_EVERY: Duration = Duration::from_millis(500);

/// What a resolver task was started for; when it changes, the task is replaced.
#[derive(PartialEq)]
struct Key {
    upstream: String,
    names: Vec<String>,
    interval: Duration,
    hosts_file: Option<PathBuf>,
}

/// Runs the re-resolution tasks until `shutdown`.
pub async fn run(state: StateHandle, mut shutdown: watch::Receiver<bool>) {
    let mut tasks: Vec<(Key, JoinHandle<()>)> = Vec::new();
    let mut seen = u64::MAX;
    loop {
        let generation = state.shared.generation.load(Ordering::Acquire);
        if generation != seen {
            seen = generation;
            let snapshot = state.shared.snapshot.load();
            let wanted: Vec<Key> = snapshot
                .upstreams
                .iter()
                .filter_map(|u| match u.spec.resolve {
                    Resolve::Every(interval) => Some(Key {
                        upstream: u.spec.name.clone(),
                        names: u.spec.instance_names.clone(),
                        interval,
                        hosts_file: snapshot.settings.hosts_file.clone(),
                    }),
                    Resolve::Once => None,
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
                    interval: key.interval,
                    hosts_file: key.hosts_file.clone(),
                    ok: counter("ok"),
                    failed: counter("failed"),
                };
                tasks.push((key, tokio::spawn(resolver.run())));
            }
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

struct Resolver {
    state: StateHandle,
    upstream: String,
    names: Vec<String>,
    interval: Duration,
    hosts_file: Option<PathBuf>,
    ok: Counter,
    failed: Counter,
}

impl Resolver {
    /// Looks the names up every `interval` (the config's load has just done it once).
    async fn run(self) {
        loop {
            tokio::time::sleep(self.interval).await;
            let names = self.names.clone();
            let hosts_file = self.hosts_file.clone();
            let looked_up = tokio::task::spawn_blocking(move || {
                names
                    .iter()
                    .map(|name| net::instance_addrs(name, Names::Resolve, hosts_file.as_deref()))
                    .collect::<Vec<_>>()
            })
            .await;
            let Ok(answers) = looked_up else {
                continue;
            };
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
                    Err(error) => errors.push(error.to_string()),
                }
            }
            if !errors.is_empty() {
                self.failed.increment(1);
                tracing::warn!(
                    upstream = %self.upstream,
                    errors = ?errors,
                    "instance names did not resolve; keeping the last good addresses"
                );
                continue;
            }
            self.ok.increment(1);
            self.state
                .set_members(&self.upstream, self.names.clone(), addrs)
                .await;
        }
    }
}
