//! The per-request metrics (the request and upstream-error counters, the duration
//! histogram and the open-connections gauge), kept in per-worker shards and rendered by splitgate itself. Recording
//! is a relaxed add or two on a cache line only the recording worker writes (the
//! exporter's handles are one atomic per series that every worker writes, and its
//! histogram appended every sample to one shared list); a scrape sums the shards.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

/// One worker's counts. Aligned so that two workers never share a cache line.
#[repr(align(128))]
struct Shard {
    /// Per bucket (the last is +Inf), not cumulative.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

/// One worker's count. Aligned so that two workers never share a cache line.
#[repr(align(128))]
struct Count(AtomicU64);

/// One series (a label set) of a counter, or of a gauge that each worker moves up and
/// down by its own amounts (open connections: a connection opens and closes on one
/// worker, so no shard goes below zero).
pub struct ShardedCounter {
    labels: String,
    shards: Box<[Count]>,
}

impl ShardedCounter {
    pub fn new(labels: &[(&str, &str)], workers: usize) -> Self {
        Self {
            labels: label_text(labels),
            shards: (0..workers.max(1))
                .map(|_| Count(AtomicU64::new(0)))
                .collect(),
        }
    }

    /// Adds `n`, in the calling worker's shard.
    pub fn increment(&self, n: u64) {
        self.shards[crate::worker::index() % self.shards.len()]
            .0
            .fetch_add(n, Relaxed);
    }

    /// Subtracts `n` from the calling worker's shard (a gauge's decrease).
    pub fn decrement(&self, n: u64) {
        self.shards[crate::worker::index() % self.shards.len()]
            .0
            .fetch_sub(n, Relaxed);
    }

    pub fn value(&self) -> u64 {
        self.shards
            .iter()
            .fold(0u64, |sum, c| sum.wrapping_add(c.0.load(Relaxed)))
    }

    /// Appends this series' line for `name`.
    pub fn render(&self, name: &str, out: &mut String) {
        let _ = writeln!(out, "{name}{{{}}} {}", self.labels, self.value());
    }
}

/// `key="value",…`, escaped, as it goes between braces.
pub(crate) fn label_text(labels: &[(&str, &str)]) -> String {
    let mut text = String::new();
    for (i, (key, value)) in labels.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        let _ = write!(text, "{key}=\"{}\"", escape(value));
    }
    text
}

/// One series (a label set) of a duration histogram.
pub struct ShardedHistogram {
    /// `key="value",…`, escaped, as it goes between braces.
    labels: String,
    /// Upper bounds, in seconds, rising.
    bounds: Arc<[f64]>,
    shards: Box<[Shard]>,
}

impl ShardedHistogram {
    pub fn new(labels: &[(&str, &str)], bounds: Arc<[f64]>, workers: usize) -> Self {
        let text = label_text(labels);
        let shards = (0..workers.max(1))
            .map(|_| Shard {
                counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum_nanos: AtomicU64::new(0),
            })
            .collect();
        Self {
            labels: text,
            bounds,
            shards,
        }
    }

    /// Records one duration, in the calling worker's shard.
    pub fn record(&self, duration: Duration) {
        let shard = &self.shards[crate::worker::index() % self.shards.len()];
        let seconds = duration.as_secs_f64();
        // `le` buckets: the first bound at or above the value.
        let bucket = self.bounds.partition_point(|&bound| bound < seconds);
        shard.counts[bucket].fetch_add(1, Relaxed);
        shard.sum_nanos.fetch_add(
            duration.as_nanos().min(u128::from(u64::MAX)) as u64,
            Relaxed,
        );
    }

    /// Appends this series' `_bucket`, `_sum` and `_count` lines for `name`.
    pub fn render(&self, name: &str, out: &mut String) {
        let mut counts = vec![0u64; self.bounds.len() + 1];
        let mut sum_nanos = 0u64;
        for shard in self.shards.iter() {
            for (total, count) in counts.iter_mut().zip(shard.counts.iter()) {
                *total += count.load(Relaxed);
            }
            sum_nanos = sum_nanos.wrapping_add(shard.sum_nanos.load(Relaxed));
        }
        let separator = if self.labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, count) in counts.iter().enumerate() {
            cumulative += count;
            let le = match self.bounds.get(i) {
                Some(bound) => bound.to_string(),
                None => "+Inf".to_string(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{}{separator}le=\"{le}\"}} {cumulative}",
                self.labels
            );
        }
        let _ = writeln!(
            out,
            "{name}_sum{{{}}} {}",
            self.labels,
            sum_nanos as f64 / 1e9
        );
        let _ = writeln!(out, "{name}_count{{{}}} {cumulative}", self.labels);
    }
}

/// A label value as the text format wants it.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_cumulative_buckets_sum_and_count() {
        let histogram = ShardedHistogram::new(
            &[("route", "a\"b"), ("variant", "stable")],
            Arc::from(vec![0.01, 0.1]),
            2,
        );
        histogram.record(Duration::from_millis(5));
        histogram.record(Duration::from_millis(10));
        histogram.record(Duration::from_millis(50));
        histogram.record(Duration::from_secs(2));
        let mut out = String::new();
        histogram.render("d", &mut out);
        assert_eq!(
            out,
            "d_bucket{route=\"a\\\"b\",variant=\"stable\",le=\"0.01\"} 2\n\
             d_bucket{route=\"a\\\"b\",variant=\"stable\",le=\"0.1\"} 3\n\
             d_bucket{route=\"a\\\"b\",variant=\"stable\",le=\"+Inf\"} 4\n\
             d_sum{route=\"a\\\"b\",variant=\"stable\"} 2.065\n\
             d_count{route=\"a\\\"b\",variant=\"stable\"} 4\n"
        );
    }
}
