//! A rolling window of time slices, recorded lock-free on every request.
//!
//! Each slice holds a request count, an error count and a log-linear latency histogram
//! (16 sub-buckets per power of two, so a percentile is within about 3 % of the truth).
//! A slice is reused when its time comes round again: the first recorder to notice
//! claims it with a compare-and-swap on its epoch and zeroes it. A record racing that
//! claim by a few nanoseconds can be lost; the verdict needs rates, not exact counts.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Sub-buckets per power of two.
const SUB: u64 = 16;
/// Latencies are kept in microseconds up to 2^31 µs (about 36 minutes); the last
/// reachable bucket is `BUCKETS - 17`, the rest of the array is headroom.
const MAX_EXP: u64 = 31;
pub(crate) const BUCKETS: usize = (SUB + (MAX_EXP - 3) * SUB) as usize;

/// Slices per window; one more is kept so the oldest is being reused while the
/// newest fills.
pub const SLICES: u64 = 10;
const SLOTS: usize = SLICES as usize + 2;

struct Slice {
    /// Which slice number (time / slice length) this slot currently holds, plus one;
    /// zero means never used.
    epoch: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    latency: Box<[AtomicU32]>,
}

impl Slice {
    fn new() -> Self {
        Self {
            epoch: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect(),
        }
    }
}

/// One worker's slices. Aligned so that two workers never write one cache line.
#[repr(align(128))]
struct Shard {
    slots: Box<[Slice]>,
}

/// The rolling window of one side of one route: a set of slices per worker (each
/// worker writes only its own), summed when read.
pub struct Window {
    slice_ms: u64,
    shards: Box<[Shard]>,
    /// Slices up to this number hold evidence from before a `clear` and are ignored.
    cleared_through: AtomicU64,
}

/// Figures over the window, for verdicts and the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WindowStats {
    pub requests: u64,
    pub errors: u64,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
}

impl WindowStats {
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }
}

impl Window {
    /// A window of `length`, cut into [`SLICES`] slices, with `shards` sets of them
    /// (one per worker).
    pub fn new(length: Duration, shards: usize) -> Self {
        let slice_ms = (length.as_millis() as u64 / SLICES).max(1);
        Self {
            slice_ms,
            shards: (0..shards.max(1))
                .map(|_| Shard {
                    slots: (0..SLOTS).map(|_| Slice::new()).collect(),
                })
                .collect(),
            cleared_through: AtomicU64::new(0),
        }
    }

    /// Forgets everything recorded up to `now_ms` (a `reset`: a route must never be
    /// judged again on samples from before it). Without touching the slices that
    /// recorders write, the current slice is ignored too, so up to one slice of fresh
    /// samples is lost: the judge waits a little longer, never trips on old evidence.
    pub fn clear(&self, now_ms: u64) {
        self.cleared_through
            .store(now_ms / self.slice_ms + 1, Relaxed);
    }

    /// Records one request at `now_ms` (milliseconds on the guard's clock).
    pub fn record(&self, now_ms: u64, error: bool, latency: Duration) {
        let slice_no = now_ms / self.slice_ms + 1;
        let shard = &self.shards[crate::worker::index() % self.shards.len()];
        let slot = &shard.slots[(slice_no % SLOTS as u64) as usize];
        let seen = slot.epoch.load(Relaxed);
        if seen != slice_no
            && seen < slice_no
            && slot
                .epoch
                .compare_exchange(seen, slice_no, Relaxed, Relaxed)
                .is_ok()
        {
            slot.requests.store(0, Relaxed);
            slot.errors.store(0, Relaxed);
            for bucket in slot.latency.iter() {
                bucket.store(0, Relaxed);
            }
        }
        slot.requests.fetch_add(1, Relaxed);
        if error {
            slot.errors.fetch_add(1, Relaxed);
        }
        slot.latency[bucket_of(latency)].fetch_add(1, Relaxed);
    }

    /// How much time the window figures span.
    pub fn span_ms(&self) -> u64 {
        self.slice_ms * SLICES
    }

    /// Sums the slices of the last window ending at `now_ms`.
    pub fn stats(&self, now_ms: u64) -> WindowStats {
        let newest = now_ms / self.slice_ms + 1;
        let oldest = newest
            .saturating_sub(SLICES - 1)
            .max(self.cleared_through.load(Relaxed) + 1);
        let mut stats = WindowStats::default();
        let mut histogram = [0u64; BUCKETS];
        for slot in self.shards.iter().flat_map(|shard| shard.slots.iter()) {
            let epoch = slot.epoch.load(Relaxed);
            if epoch == 0 || epoch < oldest || epoch > newest {
                continue;
            }
            stats.requests += slot.requests.load(Relaxed);
            stats.errors += slot.errors.load(Relaxed);
            for (sum, bucket) in histogram.iter_mut().zip(slot.latency.iter()) {
                *sum += u64::from(bucket.load(Relaxed));
            }
        }
        let total: u64 = histogram.iter().sum();
        stats.p50 = percentile(&histogram, total, 0.50);
        stats.p90 = percentile(&histogram, total, 0.90);
        stats.p99 = percentile(&histogram, total, 0.99);
        stats
    }
}

pub(crate) fn bucket_of(latency: Duration) -> usize {
    let micros = (latency.as_micros() as u64).clamp(0, (1 << MAX_EXP) - 1);
    if micros < SUB {
        return micros as usize;
    }
    let exp = 63 - u64::from(micros.leading_zeros());
    let mantissa = (micros >> (exp - 4)) & (SUB - 1);
    (SUB + (exp - 4) * SUB + mantissa) as usize
}

/// The lower edge of a bucket, in microseconds (`BUCKETS` gives the top of the last).
pub(crate) fn bucket_low_micros(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < SUB {
        return bucket;
    }
    let exp = (bucket - SUB) / SUB + 4;
    let mantissa = (bucket - SUB) % SUB;
    (SUB + mantissa) << (exp - 4)
}

/// The middle of a bucket, in microseconds.
fn bucket_value(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < SUB {
        return bucket;
    }
    let exp = (bucket - SUB) / SUB + 4;
    let mantissa = (bucket - SUB) % SUB;
    let low = (SUB + mantissa) << (exp - 4);
    let width = 1u64 << (exp - 4);
    low + width / 2
}

fn percentile(histogram: &[u64], total: u64, q: f64) -> Duration {
    if total == 0 {
        return Duration::ZERO;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (bucket, &count) in histogram.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return Duration::from_micros(bucket_value(bucket));
        }
    }
    Duration::ZERO
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_edges_enclose_their_values() {
        for micros in [0u64, 7, 16, 100, 999, 12_345, 800_000, 5_000_000] {
            let bucket = bucket_of(Duration::from_micros(micros));
            assert!(bucket_low_micros(bucket) <= micros, "{micros}");
            assert!(bucket_low_micros(bucket + 1) > micros, "{micros}");
        }
    }

    #[test]
    fn buckets_round_trip_within_a_few_percent() {
        for micros in [1u64, 15, 16, 17, 100, 999, 12_345, 800_000, 5_000_000] {
            let back = bucket_value(bucket_of(Duration::from_micros(micros)));
            let error = (back as f64 - micros as f64).abs() / micros as f64;
            assert!(error <= 0.035, "{micros} µs came back as {back} µs");
        }
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let window = Window::new(Duration::from_secs(10), 1);
        for i in 1..=1000u64 {
            window.record(500, i % 10 == 0, Duration::from_millis(i));
        }
        let stats = window.stats(500);
        assert_eq!(stats.requests, 1000);
        assert_eq!(stats.errors, 100);
        for (got, want) in [(stats.p50, 500.0), (stats.p90, 900.0), (stats.p99, 990.0)] {
            let ms = got.as_secs_f64() * 1000.0;
            assert!(
                (ms - want).abs() / want < 0.04,
                "got {ms} ms, want about {want}"
            );
        }
    }

    #[test]
    fn old_slices_fall_out_of_the_window() {
        let window = Window::new(Duration::from_secs(10), 1);
        window.record(0, true, Duration::from_millis(5));
        assert_eq!(window.stats(9_000).requests, 1);
        assert_eq!(window.stats(10_000).requests, 0);
        // The slot comes round again and is reset before reuse.
        window.record(12_000, false, Duration::from_millis(5));
        window.record(24_000, false, Duration::from_millis(5));
        let stats = window.stats(24_000);
        assert_eq!((stats.requests, stats.errors), (1, 0));
    }

    #[test]
    fn a_cleared_window_forgets_what_came_before() {
        let window = Window::new(Duration::from_secs(10), 1);
        for at in [0, 1_500, 2_100] {
            window.record(at, true, Duration::from_millis(5));
        }
        window.clear(2_200);
        assert_eq!(window.stats(2_200).requests, 0);
        assert_eq!(window.stats(9_000).requests, 0, "old slices stay forgotten");
        window.record(3_000, false, Duration::from_millis(5));
        let stats = window.stats(3_000);
        assert_eq!((stats.requests, stats.errors), (1, 0));
    }
}
