//! The Prometheus registry of one running splitgate, and the metric handles held in
//! snapshots. Handles are registered once (at compile or start), so recording a request
//! is a few atomic operations with no label lookup.
//!
//! Each [`Registry`] owns its recorder instead of installing a global one, so several
//! proxies in one process (tests, the demo) keep separate counts.

use metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use super::names;

static METADATA: Metadata<'static> = Metadata::new("splitgate", Level::INFO, Some(module_path!()));

/// The registry: registers handles and renders the text format.
pub struct Registry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full(names::REQUEST_DURATION_SECONDS.to_string()),
                names::DURATION_BUCKETS,
            )
            .expect("duration buckets are a non-empty constant")
            .build_recorder();
        let handle = recorder.handle();
        Self { recorder, handle }
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
