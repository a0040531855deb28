//! One instance of an upstream as every worker shares it: its address, the operator's
//! state for it (ready, drain, maint), its passive health (ejections) and its active
//! health (checks). Workers only read these on the request path; the state writer sets
//! the state and the health checker the check results. Per-worker counts (in-flight
//! requests, open connections) live in each worker's `Pool`.

use std::net::SocketAddr;
use std::sync::atomic::{
    AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst,
};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::health::Health;

/// What the operator wants of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// In service (when healthy).
    #[default]
    Ready,
    /// No new requests; those in flight finish; idle pooled connections are closed.
    Drain,
    /// No requests and no health checks.
    Maint,
}

impl InstanceState {
    pub const ALL: [InstanceState; 3] = [
        InstanceState::Ready,
        InstanceState::Drain,
        InstanceState::Maint,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Ready => "ready",
            InstanceState::Drain => "drain",
            InstanceState::Maint => "maint",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    fn from_u8(value: u8) -> Self {
        match value {
            1 => InstanceState::Drain,
            2 => InstanceState::Maint,
            _ => InstanceState::Ready,
        }
    }
}

/// What the health checks say of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Not passed `rise` checks since it was added (or came back from drain or maint),
    /// failing or not: gets no traffic, but is not counted as failing.
    Pending = 0,
    Up = 1,
    /// Failed `fall` checks in a row.
    Down = 2,
}

impl Checked {
    pub fn as_str(self) -> &'static str {
        match self {
            Checked::Pending => "pending",
            Checked::Up => "up",
            Checked::Down => "down",
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            1 => Checked::Up,
            2 => Checked::Down,
            _ => Checked::Pending,
        }
    }
}

pub struct Instance {
    pub addr: SocketAddr,
    /// Passive health: consecutive request failures eject the instance for a while.
    pub passive: Health,
    state: AtomicU8,
    checked: AtomicU8,
    /// Checks in a row with the same result (the checker's counter).
    streak: AtomicU32,
    /// Consecutive failed checks, for the operator.
    failures: AtomicU32,
    /// Unix ms of the last check; 0 before the first.
    last_check_ms: AtomicU64,
    /// Why the last failed check failed.
    last_error: Mutex<Option<String>>,
    /// Gone from the upstream (by reload or DNS): like a drain, for good.
    retired: AtomicBool,
    /// Present when the process started (and in service since): as in Envoy, its first
    /// passing check is enough, so a restart does not keep every instance out for
    /// `rise` intervals.
    at_start: AtomicBool,
    /// Requests in flight to it (an open upgrade tunnel counts until it closes), one
    /// counter per worker: each worker writes only its own cache line, and a reload that
    /// rebuilds the pools keeps the count.
    in_flight: Box<[WorkerCount]>,
}

#[repr(align(128))]
#[derive(Default)]
struct WorkerCount(AtomicUsize);

impl Instance {
    /// A new instance; `checked` is where its health checks start (`Up` when the
    /// upstream has none).
    pub fn new(
        addr: SocketAddr,
        state: InstanceState,
        checked: Checked,
        at_start: bool,
        workers: usize,
    ) -> Self {
        Self {
            addr,
            passive: Health::new(),
            state: AtomicU8::new(state as u8),
            checked: AtomicU8::new(checked as u8),
            streak: AtomicU32::new(0),
            failures: AtomicU32::new(0),
            last_check_ms: AtomicU64::new(0),
            last_error: Mutex::new(None),
            retired: AtomicBool::new(false),
            at_start: AtomicBool::new(at_start),
            in_flight: (0..workers.max(1))
                .map(|_| WorkerCount::default())
                .collect(),
        }
    }

    pub fn state(&self) -> InstanceState {
        InstanceState::from_u8(self.state.load(SeqCst))
    }

    /// Sets the operator's state. Back to ready from drain or maint, an instance with
    /// health checks waits for `rise` passing checks again: what is behind the address
    /// may have been replaced meanwhile.
    pub fn set_state(&self, state: InstanceState, checks: bool) {
        // SeqCst with `InFlight::new`'s increment: see `Upstream::send`.
        let old = InstanceState::from_u8(self.state.swap(state as u8, SeqCst));
        if state == InstanceState::Ready && old != InstanceState::Ready {
            // Whatever is there now is new to this process: `rise` passes.
            self.at_start.store(false, Relaxed);
            if checks {
                self.checked.store(Checked::Pending as u8, Relaxed);
                self.streak.store(0, Relaxed);
            }
        }
    }

    /// Requests in flight to it on every worker.
    pub fn in_flight(&self) -> usize {
        self.in_flight.iter().map(|c| c.0.load(SeqCst)).sum()
    }

    /// Counts one more request in flight on the calling worker; returns the counter's
    /// index for [`Instance::finished`]. SeqCst: see `Upstream::claim`.
    pub fn started(&self) -> usize {
        let slot = crate::worker::index() % self.in_flight.len();
        self.in_flight[slot].0.fetch_add(1, SeqCst);
        slot
    }

    pub fn finished(&self, slot: usize) {
        self.in_flight[slot].0.fetch_sub(1, SeqCst);
    }

    pub fn checked(&self) -> Checked {
        Checked::from_u8(self.checked.load(Relaxed))
    }

    pub fn retire(&self) {
        self.retired.store(true, Relaxed);
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Relaxed)
    }

    /// Whether the operator has it in service: ready and still part of the upstream.
    pub fn in_rotation(&self) -> bool {
        self.state() == InstanceState::Ready && !self.is_retired()
    }

    /// Whether it takes new requests: in rotation, passing its checks (if `checks`),
    /// and not ejected.
    pub fn takes_requests(&self, checks: bool) -> bool {
        self.in_rotation()
            && (!checks || self.checked() == Checked::Up)
            && self.passive.is_available()
    }

    /// In rotation and known (not pending), so not taking requests means it failed.
    pub fn is_failing(&self, checks: bool) -> bool {
        self.in_rotation()
            && !(checks && self.checked() == Checked::Pending)
            && !self.takes_requests(checks)
    }

    /// Records one check. Returns the new health when it changed.
    pub fn record_check(
        &self,
        passed: Result<(), String>,
        rise: u32,
        fall: u32,
        now_ms: u64,
    ) -> Option<Checked> {
        let first = self.last_check_ms.swap(now_ms, Relaxed) == 0;
        let at_start = self.at_start.load(Relaxed);
        let rise = if first && at_start { 1 } else { rise };
        let before = self.checked();
        let was_passing = self.last_error_is_none();
        let same = passed.is_ok() == was_passing;
        let streak = if same {
            self.streak.load(Relaxed).saturating_add(1)
        } else {
            1
        };
        self.streak.store(streak, Relaxed);
        let after = match &passed {
            Ok(()) => {
                self.failures.store(0, Relaxed);
                if before != Checked::Up && streak >= rise {
                    Checked::Up
                } else {
                    before
                }
            }
            Err(_) => {
                self.failures.fetch_add(1, Relaxed);
                // An instance added to a running proxy stays pending until it first
                // passes: one still starting is not failing (its canary is not charged
                // for it). One there at start is judged at once: the proxy restarted,
                // not the instance.
                let judged = before == Checked::Up || (before == Checked::Pending && at_start);
                if judged && streak >= fall {
                    Checked::Down
                } else {
                    before
                }
            }
        };
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = passed.err();
        (after != before).then(|| {
            self.checked.store(after as u8, Relaxed);
            after
        })
    }

    fn last_error_is_none(&self) -> bool {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none()
    }

    /// What the operator sees of its checks.
    pub fn check_report(&self) -> CheckReport {
        CheckReport {
            checked: self.checked(),
            failures: self.failures.load(Relaxed),
            last_check_ms: self.last_check_ms.load(Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

pub struct CheckReport {
    pub checked: Checked,
    pub failures: u32,
    pub last_check_ms: u64,
    pub last_error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(checked: Checked) -> Instance {
        Instance::new(
            "127.0.0.1:1".parse().unwrap(),
            InstanceState::Ready,
            checked,
            false,
            1,
        )
    }

    #[test]
    fn rise_and_fall_count_checks_in_a_row() {
        let i = instance(Checked::Pending);
        assert!(!i.takes_requests(true));
        assert!(!i.is_failing(true), "pending is not failing");
        assert_eq!(i.record_check(Ok(()), 2, 3, 1), None);
        assert_eq!(i.record_check(Ok(()), 2, 3, 2), Some(Checked::Up));
        assert!(i.takes_requests(true));
        assert_eq!(i.record_check(Err("503".into()), 2, 3, 3), None);
        assert_eq!(i.record_check(Err("503".into()), 2, 3, 4), None);
        assert_eq!(i.record_check(Ok(()), 2, 3, 5), None, "a pass in between");
        for t in 6..8 {
            assert_eq!(i.record_check(Err("503".into()), 2, 3, t), None);
        }
        assert_eq!(
            i.record_check(Err("503".into()), 2, 3, 8),
            Some(Checked::Down)
        );
        assert!(i.is_failing(true));
        assert_eq!(i.check_report().failures, 3);
        assert_eq!(i.record_check(Ok(()), 2, 3, 9), None);
        assert_eq!(i.record_check(Ok(()), 2, 3, 10), Some(Checked::Up));
    }

    #[test]
    fn at_start_the_first_pass_is_enough() {
        let i = Instance::new(
            "127.0.0.1:1".parse().unwrap(),
            InstanceState::Ready,
            Checked::Pending,
            true,
            1,
        );
        assert_eq!(i.record_check(Ok(()), 3, 3, 1), Some(Checked::Up));
        let dead = Instance::new(
            "127.0.0.1:1".parse().unwrap(),
            InstanceState::Ready,
            Checked::Pending,
            true,
            1,
        );
        for t in 1..3 {
            assert_eq!(dead.record_check(Err("refused".into()), 2, 3, t), None);
        }
        assert_eq!(
            dead.record_check(Err("refused".into()), 2, 3, 3),
            Some(Checked::Down),
            "one dead at start is down, not pending"
        );
    }

    #[test]
    fn a_pending_instance_that_fails_stays_pending() {
        let i = instance(Checked::Pending);
        for t in 1..10 {
            assert_eq!(i.record_check(Err("refused".into()), 2, 3, t), None);
        }
        assert_eq!(i.checked(), Checked::Pending);
        assert!(!i.is_failing(true));
        assert_eq!(i.record_check(Ok(()), 2, 3, 10), None);
        assert_eq!(i.record_check(Ok(()), 2, 3, 11), Some(Checked::Up));
    }

    #[test]
    fn back_to_ready_waits_for_rise_when_checked() {
        let i = instance(Checked::Up);
        i.set_state(InstanceState::Drain, true);
        assert!(!i.takes_requests(true));
        i.set_state(InstanceState::Ready, true);
        assert_eq!(i.checked(), Checked::Pending);
        let unchecked = instance(Checked::Up);
        unchecked.set_state(InstanceState::Maint, false);
        unchecked.set_state(InstanceState::Ready, false);
        assert!(unchecked.takes_requests(false));
    }
}
