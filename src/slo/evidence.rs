//! What the judge weighs. On every request, each side of a route adds to running
//! totals (lock-free, only ever growing): requests, errors, requests slower than each
//! latency limit, and a latency histogram when a ratio rule needs one. The guard reads
//! the totals every 250 ms and keeps, per side, the evidence of the current step: the
//! totals when the step began, and the counts of each epoch (`slo.window`) since.

use std::collections::VecDeque;
use std::sync::atomic::{
    AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::time::Duration;

use super::sequential::Counts;
use super::window;

/// The running totals of one side of a route: a shard per worker (each worker writes
/// only its own), summed when read.
pub struct SideTotals {
    shards: Box<[TotalsShard]>,
}

/// One worker's totals. Aligned so that two workers never write one cache line.
#[repr(align(128))]
struct TotalsShard {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Requests slower than each absolute latency limit, in `SloSpec::latency` order.
    slow: Box<[AtomicU64]>,
    /// Latency histogram in the window's buckets, when a ratio rule needs one.
    histogram: Option<Box<[AtomicU64]>>,
}

/// A reading of the totals (or the difference of two). With a fleet, each replica
/// publishes its readings and the elected judge sums them (see `fleet::judge`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Reading {
    pub requests: u64,
    pub errors: u64,
    pub slow: Vec<u64>,
    pub histogram: Vec<u64>,
}

impl SideTotals {
    /// Totals counting requests slower than each of `limits` latency limits, with a
    /// latency histogram when `histogram`, in `shards` shards (one per worker).
    pub fn new(limits: usize, histogram: bool, shards: usize) -> Self {
        Self {
            shards: (0..shards.max(1))
                .map(|_| TotalsShard {
                    requests: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                    slow: (0..limits).map(|_| AtomicU64::new(0)).collect(),
                    histogram: histogram
                        .then(|| (0..window::BUCKETS).map(|_| AtomicU64::new(0)).collect()),
                })
                .collect(),
        }
    }

    /// Adds one finished request. `limits` are the latency limits `slow` counts against.
    /// The request is counted before its badness (Release), and `read` loads the bad
    /// counts first (Acquire), so a reading never holds a bad request without it.
    pub fn record(&self, error: bool, latency: Duration, limits: &[Duration]) {
        let shard = &self.shards[crate::worker::index() % self.shards.len()];
        shard.requests.fetch_add(1, Relaxed);
        if error {
            shard.errors.fetch_add(1, Release);
        }
        for (counter, limit) in shard.slow.iter().zip(limits) {
            if latency > *limit {
                counter.fetch_add(1, Release);
            }
        }
        if let Some(histogram) = &shard.histogram {
            histogram[window::bucket_of(latency)].fetch_add(1, Relaxed);
        }
    }

    /// The sum of the shards.
    pub fn read(&self) -> Reading {
        let mut total = Reading::default();
        for shard in self.shards.iter() {
            let errors = shard.errors.load(Acquire);
            let slow: Vec<u64> = shard.slow.iter().map(|c| c.load(Acquire)).collect();
            total.requests += shard.requests.load(Relaxed);
            total.errors += errors;
            add(&mut total.slow, &slow);
            if let Some(histogram) = &shard.histogram {
                let counts: Vec<u64> = histogram.iter().map(|c| c.load(Relaxed)).collect();
                add(&mut total.histogram, &counts);
            }
        }
        total
    }
}

/// Adds `b` into `a` element by element, growing `a` as needed.
fn add(a: &mut Vec<u64>, b: &[u64]) {
    a.resize(a.len().max(b.len()), 0);
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

impl Reading {
    /// Adds `other` into this reading.
    pub fn add(&mut self, other: &Reading) {
        self.requests += other.requests;
        self.errors += other.errors;
        add(&mut self.slow, &other.slow);
        add(&mut self.histogram, &other.histogram);
    }

    /// What was added since `base`.
    pub fn since(&self, base: &Reading) -> Reading {
        let minus = |a: &[u64], b: &[u64]| {
            a.iter()
                .enumerate()
                .map(|(i, v)| v.saturating_sub(b.get(i).copied().unwrap_or(0)))
                .collect()
        };
        Reading {
            requests: self.requests.saturating_sub(base.requests),
            errors: self.errors.saturating_sub(base.errors),
            slow: minus(&self.slow, &base.slow),
            histogram: minus(&self.histogram, &base.histogram),
        }
    }

    pub fn errors(&self) -> Counts {
        Counts::new(self.requests, self.errors)
    }

    /// Requests slower than latency limit `i`.
    pub fn slow(&self, i: usize) -> Counts {
        Counts::new(self.requests, self.slow.get(i).copied().unwrap_or(0))
    }
}

/// Epochs kept per step; older ones only lose their own change-point test (the
/// whole-step test still counts them), so memory stays bounded in a step of any length.
const MAX_EPOCHS: usize = 64;

/// One epoch's counts.
#[derive(Debug, Clone)]
struct Epoch {
    /// 1-based position in the step.
    index: u64,
    counts: Reading,
}

/// The evidence of one side over one step.
#[derive(Debug, Clone)]
pub struct Ledger {
    base: Reading,
    last: Reading,
    epochs: VecDeque<Epoch>,
    epoch_started_ms: u64,
}

impl Ledger {
    /// A step that begins now, with the totals as they are.
    pub fn new(reading: Reading, now_ms: u64) -> Self {
        Self {
            last: reading.clone(),
            base: reading,
            epochs: VecDeque::from([Epoch {
                index: 1,
                counts: Reading::default(),
            }]),
            epoch_started_ms: now_ms,
        }
    }

    /// Adds what the totals gained since the last update to the current epoch, first
    /// opening a new epoch when the current one is `epoch_ms` old.
    pub fn update(&mut self, reading: Reading, now_ms: u64, epoch_ms: u64) {
        if now_ms.saturating_sub(self.epoch_started_ms) >= epoch_ms.max(1) {
            let index = self.epochs.back().map_or(1, |e| e.index + 1);
            self.epochs.push_back(Epoch {
                index,
                counts: Reading::default(),
            });
            if self.epochs.len() > MAX_EPOCHS {
                self.epochs.pop_front();
            }
            self.epoch_started_ms = now_ms;
        }
        let gained = reading.since(&self.last);
        if let Some(current) = self.epochs.back_mut() {
            current.counts.requests += gained.requests;
            current.counts.errors += gained.errors;
            add(&mut current.counts.slow, &gained.slow);
        }
        self.last = reading;
    }

    /// Everything since the step began.
    pub fn since_start(&self) -> Reading {
        self.last.since(&self.base)
    }

    /// `(index, counts)` per epoch, oldest first, for one kind of bad sample.
    pub fn epochs(&self, select: impl Fn(&Reading) -> Counts) -> Vec<(u64, Counts)> {
        self.epochs
            .iter()
            .map(|epoch| (epoch.index, select(&epoch.counts)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_cut_the_step_and_the_whole_step_adds_up() {
        let totals = SideTotals::new(1, false, 2);
        let limits = [Duration::from_millis(100)];
        totals.record(true, Duration::from_millis(5), &limits);
        let mut ledger = Ledger::new(totals.read(), 0);
        for i in 0..10 {
            totals.record(i % 2 == 0, Duration::from_millis(150), &limits);
        }
        ledger.update(totals.read(), 500, 1_000);
        totals.record(false, Duration::from_millis(5), &limits);
        ledger.update(totals.read(), 1_200, 1_000);
        assert_eq!(ledger.since_start().errors(), Counts::new(11, 5));
        assert_eq!(ledger.since_start().slow(0), Counts::new(11, 10));
        assert_eq!(
            ledger.epochs(Reading::errors),
            [(1, Counts::new(10, 5)), (2, Counts::new(1, 0))]
        );
    }
}
