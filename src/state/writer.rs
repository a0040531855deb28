//! The writer task: applies each command to the saved state, persists it, then builds
//! and swaps in the new snapshot. See the parent module for why there is only one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use super::{
    change, merge, AuditEntry, Change, ChangeError, Command, FleetRoute, InstanceAudit,
    InstanceOrigin, InstanceStates, LiveRoute, Loaded, SavedInstance, SavedRoute, Shared, Snapshot,
    Source, StateHandle, Store, Trip,
};
use crate::config::Resolve;
use crate::config::{self, bp_to_percent, RouteSpec, Settings};
use crate::fleet::Applied;
use crate::proxy::route::sort_for_matching;
use crate::server::tls::{self, Certificates};
use crate::slo::rules::Rule;
use crate::slo::RouteWindows;
use crate::telemetry::names::{
    CONFIG_RELOADS_TOTAL, LABEL_OUTCOME, LABEL_REASON, LABEL_ROUTE, SLO_TRIPS_TOTAL,
    STATE_PERSIST_FAILURES_TOTAL,
};
use crate::telemetry::{Registry, RouteMetrics};
use crate::upstream::{InstanceState, Upstream};

/// Per-route runtime objects kept across snapshots while the route's shape is unchanged.
struct RouteParts {
    key: (String, Option<String>, Option<crate::config::SloSpec>),
    metrics: Arc<RouteMetrics>,
    windows: Arc<RouteWindows>,
}

struct Writer {
    shared: Arc<Shared>,
    config_path: Option<PathBuf>,
    settings: Arc<Settings>,
    specs: Vec<Arc<RouteSpec>>,
    saved: BTreeMap<String, SavedRoute>,
    /// The operator's state of instances not `ready`; saved with `saved`.
    instance_states: InstanceStates,
    upstreams: BTreeMap<String, Arc<Upstream>>,
    parts: BTreeMap<String, RouteParts>,
    /// `None` while handed over to a successor (a binary takeover): every change is
    /// refused, since another process may be writing `state.dir`.
    store: Option<Store>,
    state_dir: PathBuf,
    generation: u64,
    /// Worker threads, fixed at start: each upstream keeps a pool per worker.
    workers: usize,
    /// Past the first install: instances added from now on are new to a running proxy.
    started: bool,
    /// Instances with a saved state that left their upstream, and since when.
    gone_since: BTreeMap<(String, SocketAddr), std::time::Instant>,
    /// The `[[notify]]` webhooks (fixed at start).
    notifier: crate::notify::Notifier,
}

/// How long the state (drain, maint) of an instance that left its upstream is kept, in
/// case it comes back.
const FORGET_GONE_AFTER: std::time::Duration = std::time::Duration::from_secs(600);

/// Starts the writer: loads saved state, merges it with `settings`, persists the result
/// and publishes the first snapshot. `config_path` is what reloads re-read.
pub async fn start(
    settings: Settings,
    config_path: Option<PathBuf>,
) -> Result<StateHandle, ChangeError> {
    let store = Store::open(&settings.state_dir)?;
    let loaded = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.load())
            .await
            .map_err(|e| ChangeError::Persist(std::io::Error::other(e)))?
            .map_err(ChangeError::Persist)?
    };
    let (saved, corrupt) = match loaded {
        Loaded::Fresh => (BTreeMap::new(), None),
        Loaded::Routes(routes) => (routes, None),
        Loaded::Corrupt { reason, moved_to } => {
            tracing::error!(
                %reason,
                moved_to = %moved_to.display(),
                "state file is corrupt; every canary starts at weight 0, tripped, until reset"
            );
            let trip = Trip {
                reason: "corrupt_state".into(),
                detail: format!(
                    "state file unreadable ({reason}); kept as {}",
                    moved_to.display()
                ),
                at: crate::timefmt::now_rfc3339(),
            };
            (BTreeMap::new(), Some(trip))
        }
    };
    let freeze = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.load_freeze())
            .await
            .map_err(|e| ChangeError::Persist(std::io::Error::other(e)))?
            .map_err(ChangeError::Persist)?
    };
    if let Some(freeze) = &freeze {
        tracing::warn!(reason = %freeze.reason, by = %freeze.by, since = %freeze.at, "rollouts are frozen (splitgate freeze off lifts it)");
    }
    let instance_states = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.load_instances())
            .await
            .map_err(|e| ChangeError::Persist(std::io::Error::other(e)))?
            .map_err(ChangeError::Persist)?
    };
    let certificates = match &settings.server.tls {
        Some(tls_settings) => {
            let (set, warnings) = tls::load(tls_settings)?;
            for warning in warnings {
                tracing::warn!("{warning}");
            }
            Some(Certificates::new(set))
        }
        None => None,
    };
    let registry = Registry::new(&settings.latency_thresholds(), settings.server.workers);
    let reloads_ok = registry.counter(CONFIG_RELOADS_TOTAL, &[(LABEL_OUTCOME, "ok")]);
    let reloads_failed = registry.counter(CONFIG_RELOADS_TOTAL, &[(LABEL_OUTCOME, "error")]);
    let persist_failures = registry.counter(STATE_PERSIST_FAILURES_TOTAL, &[]);
    let merged = merge::merge(&settings, &saved, corrupt.as_ref());
    let placeholder = Snapshot {
        generation: 0,
        settings: Arc::new(settings.clone()),
        routes: Box::new([]),
        upstreams: Box::new([]),
    };
    static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let shared = Arc::new(Shared {
        id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        snapshot: ArcSwap::from_pointee(placeholder),
        registry,
        draining: AtomicBool::new(false),
        generation: std::sync::atomic::AtomicU64::new(0),
        certificates,
        reloads_ok,
        reloads_failed,
        persist_failures,
        last_persist_failure_ms: std::sync::atomic::AtomicU64::new(0),
        started: std::time::Instant::now(),
        config_path: config_path.clone(),
        recent_trips: std::sync::Mutex::new(Vec::new()),
        fleet: std::sync::OnceLock::new(),
        freeze: std::sync::Mutex::new(freeze),
    });
    let workers = settings.server.workers;
    let state_dir = settings.state_dir.clone();
    let settings_notify = settings.notify.clone();
    let (tx, rx) = mpsc::channel(64);
    let mut writer = Writer {
        shared: shared.clone(),
        config_path,
        settings: Arc::new(settings),
        specs: Vec::new(),
        saved: BTreeMap::new(),
        instance_states,
        upstreams: BTreeMap::new(),
        parts: BTreeMap::new(),
        store: Some(store),
        state_dir,
        generation: 0,
        workers,
        started: false,
        gone_since: BTreeMap::new(),
        notifier: crate::notify::Notifier::start(&settings_notify, &shared.registry, tx.clone()),
    };
    writer.install(writer.settings.clone());
    writer.started = true;
    for upstream in writer.upstreams.values() {
        for instance in upstream.members() {
            if instance.state() != InstanceState::Ready {
                tracing::info!(upstream = upstream.name(), instance = %instance.addr, state = instance.state().as_str(), "instance restored out of service (splitgate instance ready … puts it back)");
            }
        }
    }
    writer.forget_canary_evidence(merged.notes.keys().map(String::as_str));
    writer
        .commit_noted(merged.routes, Source::Start, &merged.notes)
        .await?;
    tokio::spawn(writer.run(rx));
    Ok(StateHandle { tx, shared })
}

impl Writer {
    /// Runs a write of `state.dir` off the runtime and records how it went, so the
    /// failure counter and `/healthz?verbose=1` see every write alike.
    async fn persist(
        &self,
        write: impl FnOnce() -> std::io::Result<()> + Send + 'static,
    ) -> Result<(), ChangeError> {
        let persisted = tokio::task::spawn_blocking(write)
            .await
            .map_err(|e| ChangeError::Persist(std::io::Error::other(e)))
            .and_then(|saved| saved.map_err(ChangeError::Persist));
        match &persisted {
            Ok(()) => self.shared.persist_succeeded(),
            Err(_) => self.shared.persist_failed(),
        }
        persisted
    }

    /// Keeps the trips among `lines` for `StateHandle::recent_trips`, at most
    /// [`super::RECENT_TRIPS`] per route.
    fn remember_trips(
        &self,
        lines: &[(String, &'static str, u32, u32, Option<String>)],
        next: &BTreeMap<String, SavedRoute>,
    ) {
        let mut trips = self
            .shared
            .recent_trips
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for (route, ..) in lines.iter().filter(|(_, action, ..)| *action == "trip") {
            let Some(trip) = next.get(route).and_then(|r| r.trip.clone()) else {
                continue;
            };
            trips.push((route.clone(), trip));
            let kept = trips.iter().filter(|(r, _)| r == route).count();
            if kept > super::RECENT_TRIPS {
                if let Some(oldest) = trips.iter().position(|(r, _)| r == route) {
                    trips.remove(oldest);
                }
            }
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        while let Some(command) = rx.recv().await {
            match command {
                Command::Stop { reply } => {
                    drop(rx);
                    drop(self);
                    let _ = reply.send(Ok(()));
                    return;
                }
                Command::Release { reply } => {
                    self.store = None;
                    tracing::info!("state.dir released for a new process");
                    let _ = reply.send(Ok(()));
                }
                Command::Resume { reply } => {
                    let result = match &self.store {
                        Some(_) => Ok(()),
                        None => Store::open(&self.state_dir)
                            .map(|store| {
                                self.store = Some(store);
                                tracing::warn!(
                                    "took state.dir back: the takeover did not complete"
                                );
                            })
                            .map_err(ChangeError::StateDir),
                    };
                    let _ = reply.send(result);
                }
                Command::Change {
                    route,
                    change,
                    source,
                    unpublished,
                    reply,
                } => {
                    let _ = reply.send(self.change(&route, change, source, unpublished).await);
                }
                Command::ApplyFleet {
                    route,
                    desired,
                    revision,
                    how,
                    reply,
                } => {
                    let _ = reply.send(self.apply_fleet(&route, desired, revision, how).await);
                }
                Command::Saved { reply } => {
                    let _ = reply.send(Ok(self.saved.clone()));
                }
                Command::SavedInstances { reply } => {
                    let _ = reply.send(Ok(self.saved_instances()));
                }
                Command::Reload { source, reply } => {
                    let _ = reply.send(self.reload(source).await);
                }
                Command::Audit { line } => {
                    if let Some(store) = self.store.clone() {
                        let _ = tokio::task::spawn_blocking(move || store.audit(&[line])).await;
                    }
                }
                Command::Freeze { freeze, reply } => {
                    let _ = reply.send(self.set_freeze(freeze).await);
                }
                Command::Members {
                    upstream,
                    names,
                    addrs,
                } => self.set_members(&upstream, &names, addrs),
                Command::InstanceState {
                    upstream,
                    addr,
                    state,
                    source,
                    origin,
                    reply,
                } => {
                    let _ = reply.send(
                        self.set_instance_state(&upstream, addr, state, source, origin)
                            .await,
                    );
                }
            }
        }
    }

    fn route_state(&self, route: &str) -> Result<(&Arc<RouteSpec>, &SavedRoute), ChangeError> {
        let spec = self
            .specs
            .iter()
            .find(|s| s.name == route)
            .ok_or_else(|| ChangeError::UnknownRoute(route.to_string()))?;
        Ok((spec, &self.saved[route]))
    }

    async fn change(
        &mut self,
        route: &str,
        change: Change,
        source: Source,
        unpublished: bool,
    ) -> Result<(), ChangeError> {
        let (spec, current) = self.route_state(route)?;
        let Some(mut entry) = change::apply(spec, current, &change, crate::timefmt::unix_ms())?
        else {
            return Ok(());
        };
        entry.unpublished |= unpublished;
        let mut next = self.saved.clone();
        next.insert(route.to_string(), entry);
        match change {
            // The canary's evidence goes with the trip: judged again on the samples
            // that tripped it, the route would trip again at once. Cleared before the
            // untripped snapshot is published, so the guard never sees one without the
            // other.
            Change::Reset => self.forget_canary_evidence([route]),
            Change::Trip(trip) => return self.commit_trip(route, &trip, next).await,
            _ => {}
        }
        self.commit(next, source).await
    }

    async fn commit_trip(
        &mut self,
        route: &str,
        trip: &Trip,
        next: BTreeMap<String, SavedRoute>,
    ) -> Result<(), ChangeError> {
        tracing::warn!(route, reason = %trip.reason, detail = %trip.detail, "SLO breached: canary weight set to 0");
        self.shared
            .registry
            .counter(
                SLO_TRIPS_TOTAL,
                &[(LABEL_ROUTE, route), (LABEL_REASON, &trip.reason)],
            )
            .increment(1);
        match self.commit(next.clone(), Source::Slo).await {
            Ok(()) => Ok(()),
            Err(error) => {
                // Safety first: stop the canary in memory even if the disk refused.
                tracing::error!(route, %error, "trip could not be persisted; applied in memory only");
                // On-call hears of it all the same (the audit line could not be written).
                self.notifier.send(serde_json::json!({
                    "event": "trip",
                    "route": route,
                    "time": crate::timefmt::now_rfc3339(),
                    "source": Source::Slo.as_str(),
                    "replica": self.settings.fleet.as_ref().map(|f| f.replica.clone()),
                    "old_weight": self.saved.get(route).map(|r| bp_to_percent(r.weight_bp)),
                    "new_weight": 0.0,
                    "detail": format!("{} (NOT SAVED: {error})", trip.detail),
                }));
                self.saved = next;
                self.publish();
                Err(error)
            }
        }
    }

    /// Applies the fleet store's state of `route` at `revision`. A local trip or
    /// rollback the store has not accepted yet is kept (the publisher is pushing it),
    /// unless a reset has happened since: then it is stale, audited and dropped. Like a
    /// trip, what the store says is applied in memory even when `state.json` cannot be
    /// written.
    async fn apply_fleet(
        &mut self,
        route: &str,
        desired: FleetRoute,
        revision: i64,
        how: Applied,
    ) -> Result<(), ChangeError> {
        let Ok((_, current)) = self.route_state(route) else {
            tracing::debug!(route, "fleet state for a route this replica does not have");
            return Ok(());
        };
        let exposes_more = (current.trip.is_some() && desired.trip.is_none())
            || desired.weight_bp > current.weight_bp;
        let older = revision < current.revision || desired.epoch < current.epoch;
        if older && how == Applied::Listed {
            tracing::warn!(route, revision, applied = current.revision, epoch = desired.epoch, applied_epoch = current.epoch, "the fleet store holds an older revision or epoch than this replica applied (etcd restored or rebuilt?)");
            if exposes_more {
                // What was reverted here stays reverted: kept, and pushed to the store.
                let mut next = self.saved.clone();
                let entry = next.get_mut(route).expect("route_state checked it exists");
                entry.unpublished = true;
                entry.revision = revision;
                self.commit(next, Source::Fleet).await?;
                if let Some(fleet) = self.shared.fleet.get() {
                    fleet.publish_soon();
                }
                return Ok(());
            }
        } else if older || revision == current.revision {
            return Ok(());
        }
        let mut note = None;
        // A change committed through this replica supersedes a rollback pending here (a
        // pending trip refuses raises before they reach the store: `fleet::propose`).
        let superseded = how == Applied::Committed && current.trip.is_none();
        if current.unpublished && !superseded {
            if desired.epoch == current.epoch && exposes_more {
                return Ok(());
            }
            if desired.epoch > current.epoch {
                let what = match &current.trip {
                    Some(trip) => format!("trip ({})", trip.detail),
                    None => format!("rollback to {}%", bp_to_percent(current.weight_bp)),
                };
                tracing::warn!(route, epoch = current.epoch, fleet_epoch = desired.epoch, "a {what} made here while the store was unreachable predates a fleet-wide reset: dropped, not re-applied");
                note = Some(format!(
                    "stale {what} from epoch {} dropped (the fleet was reset to epoch {})",
                    current.epoch, desired.epoch
                ));
            }
        }
        let mut entry = desired.onto(current);
        entry.revision = revision;
        entry.unpublished = false;
        if desired.epoch > current.epoch || (current.trip.is_some() && desired.trip.is_none()) {
            self.forget_canary_evidence([route]);
        }
        let mut next = self.saved.clone();
        next.insert(route.to_string(), entry);
        let notes = note
            .map(|note| BTreeMap::from([(route.to_string(), note)]))
            .unwrap_or_default();
        let source = Source::from_name(&desired.source).unwrap_or(Source::Fleet);
        let committed = self
            .commit_from(next.clone(), source, &notes, Some((&desired.by, revision)))
            .await;
        if let Err(error) = committed {
            // The store is the truth: serve it even if the disk refused.
            tracing::error!(route, revision, %error, "fleet state could not be saved; applied in memory only");
            self.saved = next;
            self.publish();
            return Err(ChangeError::NotSaved {
                revision,
                source: Box::new(error),
            });
        }
        Ok(())
    }

    async fn reload(&mut self, source: Source) -> Result<Vec<String>, ChangeError> {
        let result = self.try_reload(source).await;
        match &result {
            Ok(_) => self.shared.reloads_ok.increment(1),
            Err(error) => {
                self.shared.reloads_failed.increment(1);
                tracing::warn!(%error, "config reload refused; nothing changed");
            }
        }
        result
    }

    async fn try_reload(&mut self, source: Source) -> Result<Vec<String>, ChangeError> {
        let path = self.config_path.clone().ok_or(ChangeError::NoConfigFile)?;
        let settings = tokio::task::spawn_blocking(move || config::load(&path))
            .await
            .map_err(|e| ChangeError::Invalid(e.to_string()))?
            .map_err(ChangeError::Config)?;
        let mut warnings = Vec::new();
        let old = &self.settings;
        if settings.server.listen != old.server.listen {
            warnings.push("server.listen changed; it takes effect at the next restart".to_string());
        }
        if settings.admin.listen != old.admin.listen {
            warnings.push("admin.listen changed; it takes effect at the next restart".to_string());
        }
        if settings.server.tls.as_ref().map(|t| t.listen)
            != old.server.tls.as_ref().map(|t| t.listen)
        {
            warnings.push("server.tls.listen changed (or TLS was added or removed); it takes effect at the next restart".to_string());
        }
        // Certificates are read before anything changes: a bad one refuses the reload.
        let new_certificates = match (&settings.server.tls, &self.shared.certificates) {
            (Some(tls_settings), Some(_)) => {
                let tls_settings = tls_settings.clone();
                let (set, cert_warnings) =
                    tokio::task::spawn_blocking(move || tls::load(&tls_settings))
                        .await
                        .map_err(|e| ChangeError::Invalid(e.to_string()))??;
                warnings.extend(cert_warnings);
                Some(set)
            }
            _ => None,
        };
        for threshold in settings.latency_thresholds() {
            if !self.shared.registry.has_duration_boundary(threshold) {
                warnings.push(format!("latency limit {threshold}s is not a bucket of splitgate_request_duration_seconds until the next restart (PromQL quantiles near it are approximate until then)"));
            }
        }
        if settings.server.workers != self.workers {
            warnings
                .push("server.workers changed; it takes effect at the next restart".to_string());
        }
        if settings.server.pin_workers != old.server.pin_workers {
            warnings.push(
                "server.pin_workers changed; it takes effect at the next restart".to_string(),
            );
        }
        if settings.notify != old.notify {
            warnings.push("[[notify]] changed; it takes effect at the next restart".to_string());
        }
        if settings.fleet != old.fleet {
            warnings.push("[fleet] changed; it takes effect at the next restart".to_string());
        }
        if settings.state_dir != old.state_dir {
            warnings.push("state.dir changed; it takes effect at the next restart".to_string());
        }
        let merged = merge::merge(&settings, &self.saved, None);
        let previous = self.settings.clone();
        let kept = (
            self.upstreams.clone(),
            self.instance_states.clone(),
            self.gone_since.clone(),
        );
        self.install(Arc::new(settings));
        // A new canary version is judged on its own samples only.
        self.forget_canary_evidence(merged.notes.keys().map(String::as_str));
        // Weight changes a reload causes come from the file, whoever asked for the reload.
        if let Err(error) = self
            .commit_noted(merged.routes, Source::Reload, &merged.notes)
            .await
        {
            // Put the old config back: a reload that cannot be persisted changes nothing
            // (the instances, their states and pools are the ones requests still use).
            (self.upstreams, self.instance_states, self.gone_since) = kept;
            self.install(previous);
            return Err(error);
        }
        if let (Some(set), Some(certificates)) = (new_certificates, &self.shared.certificates) {
            certificates.replace(set);
        }
        tracing::info!(
            generation = self.generation,
            by = source.as_str(),
            "config reloaded"
        );
        Ok(warnings)
    }

    /// Clears the canary windows of `routes` (a reset, or a new canary version).
    fn forget_canary_evidence<'a>(&self, routes: impl IntoIterator<Item = &'a str>) {
        for route in routes {
            if let Some(parts) = self.parts.get(route) {
                parts.windows.restart_evidence();
            }
        }
    }

    /// Makes `settings` current: reuses upstream pools and route parts that did not change.
    fn install(&mut self, settings: Arc<Settings>) {
        let mut upstreams = BTreeMap::new();
        for (name, spec) in &settings.upstreams {
            let previous = self.upstreams.get(name);
            // A name that does not resolve now: the upstream keeps the addresses it had
            // (as the re-resolution does).
            let addrs = match previous {
                Some(previous)
                    if spec.unresolved
                        && spec.resolve != Resolve::Once
                        && previous.spec.instance_names == spec.instance_names =>
                {
                    previous.members().iter().map(|m| m.addr).collect()
                }
                _ => spec.instances.clone(),
            };
            upstreams.insert(name.clone(), self.build_upstream(spec.clone(), &addrs));
        }
        self.forget_states_of_gone(&upstreams);
        let mut parts = BTreeMap::new();
        for spec in &settings.routes {
            let key = (spec.stable.clone(), spec.canary.clone(), spec.slo.clone());
            let part = match self.parts.remove(&spec.name) {
                Some(existing) if existing.key == key => existing,
                _ => {
                    let rules: Vec<String> = spec
                        .slo
                        .as_ref()
                        .map(|slo| Rule::all(slo).iter().map(Rule::name).collect())
                        .unwrap_or_default();
                    RouteParts {
                        metrics: Arc::new(RouteMetrics::new(
                            &self.shared.registry,
                            &spec.name,
                            &spec.stable,
                            spec.canary.as_deref(),
                            &rules,
                        )),
                        windows: Arc::new(RouteWindows::new(spec.slo.as_ref(), self.workers)),
                        key,
                    }
                }
            };
            parts.insert(spec.name.clone(), part);
        }
        self.specs = settings.routes.iter().cloned().map(Arc::new).collect();
        self.upstreams = upstreams;
        self.parts = parts;
        self.settings = settings;
    }

    /// `spec`'s upstream with instances at `addrs`, keeping what the current one has
    /// of them (see [`Upstream::build`]).
    fn build_upstream(
        &self,
        spec: crate::config::UpstreamSpec,
        addrs: &[SocketAddr],
    ) -> Arc<Upstream> {
        let states = self
            .instance_states
            .get(&spec.name)
            .map(|states| {
                states
                    .iter()
                    .map(|(addr, saved)| (*addr, saved.state))
                    .collect()
            })
            .unwrap_or_default();
        let previous = self.upstreams.get(&spec.name).map(|u| &**u);
        Arc::new(Upstream::build(
            spec,
            addrs,
            self.workers,
            previous,
            &states,
            !self.started,
        ))
    }

    /// A new address list for a re-resolved upstream: the instances that stay keep
    /// their pools, those that went are retired.
    fn set_members(&mut self, name: &str, names: &[String], addrs: Vec<SocketAddr>) {
        let Some(current) = self.upstreams.get(name).cloned() else {
            return;
        };
        if current.spec.instance_names != names {
            return;
        }
        let now: Vec<SocketAddr> = current.members().iter().map(|m| m.addr).collect();
        // The same set in another order (DNS servers rotate answers) changes nothing.
        if now.len() == addrs.len() && addrs.iter().all(|a| now.contains(a)) {
            let upstreams = self.upstreams.clone();
            self.forget_states_of_gone(&upstreams);
            return;
        }
        let next = self.build_upstream(current.spec.clone(), &addrs);
        let added: Vec<String> = addrs
            .iter()
            .filter(|a| !now.contains(a))
            .map(|a| a.to_string())
            .collect();
        let removed: Vec<String> = now
            .iter()
            .filter(|a| !addrs.contains(a))
            .map(|a| a.to_string())
            .collect();
        tracing::info!(upstream = name, added = ?added, removed = ?removed, "upstream instances changed (DNS)");
        self.upstreams.insert(name.to_string(), next);
        let upstreams = self.upstreams.clone();
        self.forget_states_of_gone(&upstreams);
        self.publish();
    }

    /// Drops the saved state (drain, maint) of instances gone for `FORGET_GONE_AFTER`:
    /// an address a platform reuses later (a new pod, a new VM) must not inherit it,
    /// while one a DNS answer leaves out for a while (a subset, a pod not ready) keeps
    /// it. Written with the next save. A fleet's states (revision > 0) stay: the store
    /// holds them, and `ready` removes them.
    fn forget_states_of_gone(&mut self, upstreams: &BTreeMap<String, Arc<Upstream>>) {
        let now = std::time::Instant::now();
        let gone_since = &mut self.gone_since;
        self.instance_states.retain(|name, states| {
            states.retain(|addr, saved| {
                let key = (name.clone(), *addr);
                let present = upstreams
                    .get(name)
                    .is_some_and(|u| u.member(*addr).is_some());
                if present || saved.revision > 0 {
                    gone_since.remove(&key);
                    return true;
                }
                let since = *gone_since.entry(key.clone()).or_insert(now);
                let keep = now.duration_since(since) < FORGET_GONE_AFTER;
                if !keep {
                    gone_since.remove(&key);
                }
                keep
            });
            !states.is_empty()
        });
    }

    /// Sets the operator's state of one instance, persisted first (and audited). With a
    /// fleet (`origin`), the state of an instance this replica does not have is kept
    /// too, for when it appears (its DNS answer may differ or lag).
    async fn set_instance_state(
        &mut self,
        upstream: &str,
        addr: SocketAddr,
        state: InstanceState,
        source: Source,
        origin: Option<InstanceOrigin>,
    ) -> Result<InstanceState, ChangeError> {
        let current = self
            .upstreams
            .get(upstream)
            .cloned()
            .ok_or_else(|| ChangeError::UnknownUpstream(upstream.to_string()))?;
        let instance = current.member(addr).cloned();
        if instance.is_none() && origin.is_none() {
            let known: Vec<String> = current
                .members()
                .iter()
                .map(|m| m.addr.to_string())
                .collect();
            return Err(ChangeError::UnknownInstance {
                upstream: upstream.to_string(),
                addr,
                known: known.join(", "),
            });
        }
        let saved_old = self
            .instance_states
            .get(upstream)
            .and_then(|states| states.get(&addr))
            .copied();
        let old = instance
            .as_ref()
            .map(|i| i.state())
            .or(saved_old.map(|s| s.state))
            .unwrap_or_default();
        let revision = origin.as_ref().map_or(0, |o| o.revision);
        if let Some(origin) = &origin {
            // The watch and this replica's own commit race: from the watch, only a newer
            // revision applies. A listing is the store's truth (etcd may have been
            // restored), and so is what this replica just committed.
            let applied = saved_old.map_or(0, |s| s.revision);
            if origin.how == Applied::Watched && applied >= origin.revision {
                return Ok(old);
            }
        }
        let by = origin.as_ref().map(|o| o.by.as_str());
        let mut next = self.instance_states.clone();
        let entry = next.entry(upstream.to_string()).or_default();
        match state {
            InstanceState::Ready => entry.remove(&addr),
            other => entry.insert(
                addr,
                SavedInstance {
                    state: other,
                    revision,
                },
            ),
        };
        if entry.is_empty() {
            next.remove(upstream);
        }
        if next != self.instance_states {
            let Some(store) = self.store.clone() else {
                return Err(ChangeError::HandedOver);
            };
            let states = next.clone();
            let line = (old != state)
                .then(|| InstanceAudit {
                    time: crate::timefmt::now_rfc3339(),
                    upstream,
                    instance: addr,
                    action: "instance_state",
                    old_state: old.as_str(),
                    new_state: state.as_str(),
                    source: source.as_str(),
                    replica: by.or(self.settings.fleet.as_ref().map(|f| f.replica.as_str())),
                })
                .map(|line| serde_json::to_value(&line))
                .transpose()
                .map_err(|e| ChangeError::Persist(std::io::Error::other(e)))?;
            let persisted = self
                .persist(move || {
                    store.save_instances(&states)?;
                    match line {
                        Some(line) => store.audit(&[line]),
                        None => Ok(()),
                    }
                })
                .await;
            if let Err(error) = persisted {
                tracing::error!(upstream, instance = %addr, %error, "could not write state; the instance state change was refused");
                return Err(error);
            }
            if old != state {
                tracing::info!(upstream, instance = %addr, old_state = old.as_str(), new_state = state.as_str(), by = source.as_str(), replica = by, "instance state changed");
                let this_replica = self.settings.fleet.as_ref().map(|f| f.replica.as_str());
                if by.is_none() || by == this_replica {
                    self.notifier.send(serde_json::json!({
                        "event": "instance",
                        "upstream": upstream,
                        "instance": addr.to_string(),
                        "old_state": old.as_str(),
                        "new_state": state.as_str(),
                        "time": crate::timefmt::now_rfc3339(),
                        "source": source.as_str(),
                        "replica": by.or(this_replica),
                    }));
                }
            }
        }
        self.instance_states = next;
        if let Some(instance) = instance {
            instance.set_state(state, current.checks());
            if state != InstanceState::Ready {
                current.close_idle(addr);
            }
        }
        Ok(old)
    }

    /// Sets or lifts the freeze: persisted (and audited) first, then in force.
    async fn set_freeze(
        &mut self,
        freeze: Option<crate::state::Freeze>,
    ) -> Result<(), ChangeError> {
        let current = self
            .shared
            .freeze
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if current == freeze {
            return Ok(());
        }
        let Some(store) = self.store.clone() else {
            return Err(ChangeError::HandedOver);
        };
        let line = serde_json::json!({
            "time": crate::timefmt::now_rfc3339(),
            "action": "freeze",
            "frozen": freeze.is_some(),
            "reason": freeze.as_ref().map(|f| f.reason.clone()),
            "by": freeze.as_ref().map(|f| f.by.clone()),
        });
        let to_save = freeze.clone();
        self.persist(move || {
            store.save_freeze(to_save.as_ref())?;
            store.audit(&[line])
        })
        .await?;
        match &freeze {
            Some(f) => {
                tracing::warn!(reason = %f.reason, by = %f.by, "rollouts frozen: none advances until `splitgate freeze off`")
            }
            None => tracing::info!("rollout freeze lifted"),
        }
        *self.shared.freeze.lock().unwrap_or_else(|p| p.into_inner()) = freeze;
        Ok(())
    }

    /// This replica's saved instance states (the fleet's first listing seeds the store
    /// with those set here alone, and clears those the store no longer has).
    fn saved_instances(&self) -> InstanceStates {
        self.instance_states.clone()
    }

    /// Persists `next` and the audit lines for what it changes, then publishes it.
    /// On a persist error nothing changes.
    async fn commit(
        &mut self,
        next: BTreeMap<String, SavedRoute>,
        source: Source,
    ) -> Result<(), ChangeError> {
        self.commit_noted(next, source, &BTreeMap::new()).await
    }

    async fn commit_noted(
        &mut self,
        next: BTreeMap<String, SavedRoute>,
        source: Source,
        notes: &BTreeMap<String, String>,
    ) -> Result<(), ChangeError> {
        self.commit_from(next, source, notes, None).await
    }

    /// `commit`, with a reason for some routes' change (from a merge) that goes into
    /// their audit line, and with a fleet the replica and store revision it came from.
    async fn commit_from(
        &mut self,
        next: BTreeMap<String, SavedRoute>,
        source: Source,
        notes: &BTreeMap<String, String>,
        origin: Option<(&str, i64)>,
    ) -> Result<(), ChangeError> {
        let replica = origin
            .map(|(replica, _)| replica.to_string())
            .or_else(|| self.settings.fleet.as_ref().map(|f| f.replica.clone()));
        let revision = origin.map(|(_, revision)| revision);
        let time = crate::timefmt::now_rfc3339();
        let time_for_events = time.clone();
        let mut lines = Vec::new();
        for (route, new) in &next {
            let old = self.saved.get(route);
            let old_weight = old.map_or(new.file_weight_bp, |o| o.weight_bp);
            let note = notes.get(route);
            let action = match (old.and_then(|o| o.trip.as_ref()), &new.trip) {
                _ if revision.is_some() && note.is_some_and(|n| n.starts_with("stale trip")) => {
                    "stale_trip"
                }
                _ if revision.is_some() && note.is_some() => "stale_rollback",
                _ if note.is_some() => "canary_changed",
                _ if old.is_none() => "init",
                (None, Some(_)) => "trip",
                (Some(_), None) => "reset",
                _ if old.map(|o| &o.rollout) != Some(&new.rollout) => "rollout",
                _ if old_weight != new.weight_bp => "weight",
                _ => continue,
            };
            let detail = note
                .cloned()
                .or_else(|| new.trip.as_ref().map(|t| t.detail.clone()));
            lines.push((route.clone(), action, old_weight, new.weight_bp, detail));
        }
        let Some(store) = self.store.clone() else {
            return Err(ChangeError::HandedOver);
        };
        let to_save = next.clone();
        let audited = lines.clone();
        let audit_replica = replica.clone();
        let persisted = self
            .persist(move || {
                store.save(&to_save)?;
                let entries: Vec<AuditEntry<'_>> = audited
                    .iter()
                    .map(|(route, action, old, new, detail)| AuditEntry {
                        time: time.clone(),
                        route,
                        action,
                        old_weight: bp_to_percent(*old),
                        new_weight: bp_to_percent(*new),
                        source: source.as_str(),
                        detail: detail.as_deref(),
                        replica: audit_replica.as_deref(),
                        revision,
                    })
                    .collect();
                store.audit(&entries)
            })
            .await;
        if let Err(error) = persisted {
            tracing::error!(
                state_dir = %self.state_dir.display(),
                by = source.as_str(),
                %error,
                "could not write state; the change was refused"
            );
            return Err(error);
        }
        self.remember_trips(&lines, &next);
        // Webhooks hear of a change once: from the replica it was made on.
        let made_here = match origin {
            None => true,
            Some((by, _)) => self.settings.fleet.as_ref().is_none_or(|f| f.replica == by),
        };
        if made_here {
            for (route, action, old, new, detail) in &lines {
                let before = self.saved.get(route);
                let after = &next[route];
                let plan = self
                    .specs
                    .iter()
                    .find(|s| &s.name == route)
                    .and_then(|s| s.rollout.as_ref());
                let Some(event) = route_event(action, before, after, plan) else {
                    continue;
                };
                self.notifier.send(serde_json::json!({
                    "event": event,
                    "route": route,
                    "time": time_for_events,
                    "source": source.as_str(),
                    "replica": replica,
                    "old_weight": bp_to_percent(*old),
                    "new_weight": bp_to_percent(*new),
                    "detail": detail,
                    "rollout": {
                        "step": after.rollout.as_ref().map(|p| p.step + 1),
                        "paused": after.rollout.as_ref().map(|p| p.paused),
                        "last": after.rollout_end,
                    },
                }));
            }
        }
        // The process log says what changed too, not only audit.jsonl: it is what
        // on-call reads first.
        for (route, action, old, new, detail) in &lines {
            tracing::info!(
                route = %route,
                action = *action,
                old_weight = bp_to_percent(*old),
                new_weight = bp_to_percent(*new),
                by = source.as_str(),
                detail = detail.as_deref(),
                replica = replica.as_deref(),
                revision,
                "route state changed"
            );
        }
        self.saved = next;
        self.publish();
        Ok(())
    }

    /// Builds the snapshot from the current settings and state, and swaps it in.
    fn publish(&mut self) {
        self.generation += 1;
        let mut routes: Vec<LiveRoute> = self
            .specs
            .iter()
            .map(|spec| {
                let saved = &self.saved[&spec.name];
                let parts = &self.parts[&spec.name];
                parts
                    .metrics
                    .canary_weight
                    .set(bp_to_percent(saved.weight_bp));
                parts
                    .metrics
                    .slo_state
                    .set(if saved.trip.is_some() { 1.0 } else { 0.0 });
                parts
                    .metrics
                    .rollout_step
                    .set(saved.rollout.as_ref().map_or(0.0, |r| (r.step + 1) as f64));
                LiveRoute {
                    spec: spec.clone(),
                    weight_bp: saved.weight_bp,
                    trip: saved.trip.clone().map(Arc::new),
                    rollout: saved.rollout.clone(),
                    rollout_end: saved.rollout_end.clone(),
                    stable: self.upstreams[&spec.stable].clone(),
                    canary: spec.canary.as_ref().map(|c| self.upstreams[c].clone()),
                    metrics: parts.metrics.clone(),
                    windows: parts.windows.clone(),
                }
            })
            .collect();
        sort_for_matching(&mut routes);
        let previous = self.shared.snapshot.swap(Arc::new(Snapshot {
            generation: self.generation,
            settings: self.settings.clone(),
            routes: routes.into_boxed_slice(),
            upstreams: self.upstreams.values().cloned().collect(),
        }));
        self.shared
            .generation
            .store(self.generation, std::sync::atomic::Ordering::Release);
        // Only once no new request can find them: an instance retired earlier would
        // leave requests still reading the old snapshot with nowhere to go.
        for old in previous.upstreams.iter() {
            let next = self.upstreams.get(old.name());
            if !next.is_some_and(|next| Arc::ptr_eq(next, old)) {
                old.retire_missing(next.map(|u| &**u));
            }
        }
    }
}

/// The webhook event an audited route change is, if any: `trip`, `reset`, `weight`, and
/// for rollouts `step`, `paused`, `waiting` (at a pause step), `completed`, `aborted`.
fn route_event(
    action: &str,
    before: Option<&SavedRoute>,
    after: &SavedRoute,
    plan: Option<&crate::config::compile::RolloutSpec>,
) -> Option<&'static str> {
    match action {
        "trip" => Some("trip"),
        "reset" => Some("reset"),
        "weight" => Some("weight"),
        "rollout" => {
            let ended = after.rollout_end.is_some()
                && before.map(|b| &b.rollout_end) != Some(&after.rollout_end);
            if ended {
                return match after.rollout_end.as_ref()?.outcome {
                    crate::state::RolloutOutcome::Completed => Some("completed"),
                    crate::state::RolloutOutcome::Aborted => Some("aborted"),
                    // Told as the trip itself.
                    crate::state::RolloutOutcome::Tripped => None,
                };
            }
            let progress = after.rollout.as_ref()?;
            let was = before.and_then(|b| b.rollout.as_ref());
            match was {
                Some(was) if progress.paused && !was.paused => Some("paused"),
                Some(was) if was.step == progress.step => None,
                _ if plan.is_some_and(|p| p.hold(progress.step).is_none()) => Some("waiting"),
                _ => Some("step"),
            }
        }
        _ => None,
    }
}
