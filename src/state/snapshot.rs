//! The immutable snapshot every request reads: config, live weights and trips, and the
//! runtime objects (pools, metric handles, SLO windows) they point at. Everything that
//! must change together lives here, behind one `ArcSwap`, so no request ever sees a
//! weight from one generation and a route table from another.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::{HostMatch, RouteSpec, Settings};
use crate::proxy::route::Matchable;
use crate::proxy::split::Variant;
use crate::slo::RouteWindows;
use crate::telemetry::RouteMetrics;
use crate::upstream::Upstream;

/// One generation of the proxy's world.
pub struct Snapshot {
    /// Bumped on every change (weight, trip, reload).
    pub generation: u64,
    pub settings: Arc<Settings>,
    /// In match order (see `proxy::route::sort_for_matching`).
    pub routes: Box<[LiveRoute]>,
    /// Every upstream, by name.
    pub upstreams: Box<[Arc<Upstream>]>,
}

impl Snapshot {
    pub fn route(&self, name: &str) -> Option<&LiveRoute> {
        self.routes.iter().find(|r| r.spec.name == name)
    }

    pub fn upstream(&self, name: &str) -> Option<&Arc<Upstream>> {
        self.upstreams.iter().find(|u| u.name() == name)
    }
}

/// Why and when a route's canary was pulled.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Trip {
    /// Bounded: `error_rate`, `p99_latency`, `error_rate_increase`, `p99_ratio`, `corrupt_state`.
    pub reason: String,
    /// The figures behind the verdict, for humans.
    pub detail: String,
    /// RFC 3339, UTC.
    pub at: String,
}

/// Where a progressive rollout stands (while it runs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutProgress {
    /// Index into the route's steps.
    pub step: usize,
    pub paused: bool,
    /// Unix milliseconds when the current step began (or resumed).
    pub step_started_ms: u64,
    /// Time already held at this step before a pause.
    pub held_ms: u64,
}

/// How the route's last rollout ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RolloutEnd {
    pub outcome: RolloutOutcome,
    /// The step it ended at, 1-based.
    pub step: usize,
    /// RFC 3339, UTC.
    pub at: String,
    /// Why, for people: "completed at 100%", "aborted by admin", "SLO trip: …".
    pub why: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RolloutOutcome {
    Completed,
    Aborted,
    Tripped,
}

/// A route as requests see it.
#[derive(Clone)]
pub struct LiveRoute {
    pub spec: Arc<RouteSpec>,
    /// Live canary weight in basis points.
    pub weight_bp: u32,
    pub trip: Option<Arc<Trip>>,
    pub rollout: Option<RolloutProgress>,
    pub rollout_end: Option<RolloutEnd>,
    pub stable: Arc<Upstream>,
    pub canary: Option<Arc<Upstream>>,
    pub metrics: Arc<RouteMetrics>,
    pub windows: Arc<RouteWindows>,
}

impl LiveRoute {
    /// The upstream serving a side; a route without a canary serves everything stable.
    pub fn upstream(&self, variant: Variant) -> (&Arc<Upstream>, Variant) {
        match (variant, &self.canary) {
            (Variant::Canary, Some(canary)) => (canary, Variant::Canary),
            _ => (&self.stable, Variant::Stable),
        }
    }
}

impl Matchable for LiveRoute {
    fn host(&self) -> &HostMatch {
        &self.spec.host
    }
    fn path_prefix(&self) -> &str {
        &self.spec.path_prefix
    }
}
