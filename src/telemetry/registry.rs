//! The Prometheus registry of one running splitgate, and the metric handles held in
//! snapshots. Handles are registered once (at compile or start), so recording a request
//! is a few atomic operations with no label lookup.
//!
//! Each [`Registry`] owns its recorder instead of installing a global one, so several
//! proxies in one process (tests, the demo) keep separate counts.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use metrics::{Counter, Gauge, Key, KeyName, Label, Level, Metadata, Recorder, SharedString};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

use super::names;
use super::sharded::{ShardedCounter, ShardedHistogram};

static METADATA: Metadata<'static> = Metadata::new("splitgate", Level::INFO, Some(module_path!()));

/// The registry: registers handles and renders the text format.
pub struct Registry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// The duration histogram's bucket boundaries, in seconds.
    buckets: Arc<[f64]>,
    /// Worker threads: the sharded histograms keep a shard for each.
    workers: usize,
    /// The sharded families' series, by family and label text: kept for the life of
    /// the process (as the exporter keeps its series), so a route rebuilt by a reload
    /// goes on counting where it was.
    sharded: Mutex<BTreeMap<&'static str, BTreeMap<String, Series>>>,
}

/// A series of a family splitgate renders itself.
#[derive(Clone)]
enum Series {
    Counter(Arc<ShardedCounter>),
    Histogram(Arc<ShardedHistogram>),
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(&[], 1)
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
    /// `latency_thresholds` (seconds): the configured SLO limits; with a shard per
    /// worker thread.
    pub fn new(latency_thresholds: &[f64], workers: usize) -> Self {
        let buckets: Arc<[f64]> = duration_buckets(latency_thresholds).into();
        let recorder = PrometheusBuilder::new().build_recorder();
        for &(name, kind, help) in names::FAMILIES {
            if names::SHARDED.contains(&name) || names::FROM_SNAPSHOT.contains(&name) {
                continue;
            }
            let (name, help) = (KeyName::from_const_str(name), SharedString::const_str(help));
            match kind {
                names::Kind::Counter => recorder.describe_counter(name, None, help),
                names::Kind::Gauge => recorder.describe_gauge(name, None, help),
                // Rendered here, not by the exporter (see `render`).
                names::Kind::Histogram => {}
            }
        }
        let handle = recorder.handle();
        Self {
            recorder,
            handle,
            buckets,
            workers: workers.max(1),
            sharded: Mutex::new(BTreeMap::new()),
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
        let mut out = self.handle.render();
        let sharded = self.sharded.lock().unwrap_or_else(|p| p.into_inner());
        for (&name, series) in sharded.iter() {
            let Some(&(_, kind, help)) = names::FAMILIES.iter().find(|(f, _, _)| *f == name) else {
                continue;
            };
            let kind = match kind {
                names::Kind::Counter => "counter",
                names::Kind::Gauge => "gauge",
                names::Kind::Histogram => "histogram",
            };
            if !out.is_empty() && !out.ends_with("\n\n") {
                out.push('\n');
            }
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
            for series in series.values() {
                match series {
                    Series::Counter(counter) => counter.render(name, &mut out),
                    Series::Histogram(histogram) => histogram.render(name, &mut out),
                }
            }
        }
        out
    }

    /// The whole text format: the registry's families, then `splitgate_instance_up`
    /// from the snapshot's upstreams (see `names::FROM_SNAPSHOT`).
    pub fn render_with_instances(&self, upstreams: &[Arc<crate::upstream::Upstream>]) -> String {
        let mut out = self.render();
        let Some(&(name, _, help)) = names::FAMILIES
            .iter()
            .find(|(f, _, _)| *f == names::INSTANCE_UP)
        else {
            return out;
        };
        if upstreams.iter().all(|u| u.members().is_empty()) {
            return out;
        }
        if !out.is_empty() && !out.ends_with("\n\n") {
            out.push('\n');
        }
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
        for upstream in upstreams {
            let checks = upstream.checks();
            for instance in upstream.members() {
                let labels = super::sharded::label_text(&[
                    (names::LABEL_UPSTREAM, upstream.name()),
                    (names::LABEL_ADDRESS, &instance.addr.to_string()),
                ]);
                let up = u8::from(instance.takes_requests(checks));
                out.push_str(&format!("{name}{{{labels}}} {up}\n"));
            }
        }
        out
    }

    /// The series of `name` for `labels`, made once by `make`, then shared.
    fn series(
        &self,
        name: &'static str,
        labels: &[(&'static str, &str)],
        make: impl FnOnce() -> Series,
    ) -> Series {
        let key: String = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}\u{0}"))
            .collect();
        self.sharded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(name)
            .or_default()
            .entry(key)
            .or_insert_with(make)
            .clone()
    }

    /// A request-duration series (see `sharded.rs`).
    pub fn duration(&self, labels: &[(&'static str, &str)]) -> Arc<ShardedHistogram> {
        self.histogram(
            names::REQUEST_DURATION_SECONDS,
            labels,
            self.buckets.clone(),
        )
    }

    /// A whole-exchange series (`splitgate_request_stream_seconds`): the duration
    /// buckets and longer ones, for streams that last minutes.
    pub fn stream_duration(&self, labels: &[(&'static str, &str)]) -> Arc<ShardedHistogram> {
        let buckets: Arc<[f64]> = self
            .buckets
            .iter()
            .chain(names::STREAM_EXTRA_BUCKETS)
            .copied()
            .collect();
        self.histogram(names::REQUEST_STREAM_SECONDS, labels, buckets)
    }

    fn histogram(
        &self,
        name: &'static str,
        labels: &[(&'static str, &str)],
        buckets: Arc<[f64]>,
    ) -> Arc<ShardedHistogram> {
        let make = || {
            Series::Histogram(Arc::new(ShardedHistogram::new(
                labels,
                buckets,
                self.workers,
            )))
        };
        match self.series(name, labels, make) {
            Series::Histogram(histogram) => histogram,
            Series::Counter(_) => unreachable!("a histogram family"),
        }
    }

    /// A per-request counter series, sharded per worker (see `sharded.rs`).
    pub fn sharded_counter(
        &self,
        name: &'static str,
        labels: &[(&'static str, &str)],
    ) -> Arc<ShardedCounter> {
        let make = || Series::Counter(Arc::new(ShardedCounter::new(labels, self.workers)));
        match self.series(name, labels, make) {
            Series::Counter(counter) => counter,
            Series::Histogram(_) => unreachable!("a counter family"),
        }
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
}

fn key(name: &'static str, labels: &[(&'static str, &str)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect();
    Key::from_parts(name, labels)
}
