//! The Prometheus registry of one running splitgate, and the metric handles held in
//! snapshots. Handles are registered once (at compile or start), so recording a request
//! is a few atomic operations with no label lookup.
//!
//! Each [`Registry`] owns its recorder instead of installing a global one, so several
//! proxies in one process (tests, the demo) keep separate counts.

use metrics::{
    Counter, Gauge, Histogram, Key, KeyName, Label, Level, Metadata, Recorder, SharedString,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use super::names;

static METADATA: Metadata<'static> = Metadata::new("splitgate", Level::INFO, Some(module_path!()));

/// The registry: registers handles and renders the text format.
pub struct Registry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// The duration histogram's bucket boundaries, in seconds.
    buckets: Vec<f64>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(&[])
    }
}

/// The duration buckets: the standard ones plus `thresholds` (seconds), sorted.
pub fn duration_buckets(thresholds: &[f64]) -> Vec<f64> {
    let mut buckets: Vec<f64> = names::DURATION_BUCKETS
        .iter()
        .chain(names::ALERT_LATENCY_THRESHOLDS)
        .chain(thresholds.iter().filter(|t| t.is_finite() && **t > 0.0))
        .copied()
        .collect();
    buckets.sort_by(f64::total_cmp);
    buckets.dedup();
    buckets
}

impl Registry {
    /// A registry whose duration histogram has a bucket boundary at each of
    /// `latency_thresholds` (seconds): the configured SLO limits.
    pub fn new(latency_thresholds: &[f64]) -> Self {
        let buckets = duration_buckets(latency_thresholds);
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(names::REQUEST_DURATION_SECONDS.to_string()),
                &buckets,
            )
            .expect("duration buckets are never empty")
            .build_recorder();
        for &(name, kind, help) in names::FAMILIES {
            let (name, help) = (KeyName::from_const_str(name), SharedString::const_str(help));
            match kind {
                names::Kind::Counter => recorder.describe_counter(name, None, help),
                names::Kind::Gauge => recorder.describe_gauge(name, None, help),
                names::Kind::Histogram => recorder.describe_histogram(name, None, help),
            }
        }
        let handle = recorder.handle();
        Self {
            recorder,
            handle,
            buckets,
        }
    }

    /// Whether `seconds` is a bucket boundary of the duration histogram (a reload that
    /// brings a new latency limit warns when it is not: buckets are fixed at start).
    pub fn has_duration_boundary(&self, seconds: f64) -> bool {
        self.buckets.contains(&seconds)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        self.handle.run_upkeep();
        self.handle.render()
    }

    /// Folds recorded histogram samples into their buckets. The recorder keeps raw
    /// samples until then, so without a scrape memory would grow with traffic; the
    /// guard calls this every few seconds.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }

    pub fn counter(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Counter {
        self.recorder
            .register_counter(&key(name, labels), &METADATA)
    }

    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Gauge {
        self.recorder.register_gauge(&key(name, labels), &METADATA)
    }

    pub fn histogram(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Histogram {
        self.recorder
            .register_histogram(&key(name, labels), &METADATA)
    }
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect();
    Key::from_parts(name, labels)
}
