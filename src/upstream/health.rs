//! Passive health of one instance: consecutive transport failures (connect, timeout,
//! reset, protocol) eject it for a while; any success clears the count. Recorded with
//! atomics on the request path, no lock.
//!
//! An instance that comes back from an ejection is on probation until it succeeds: one
//! more failure ejects it again, each time for longer (`eject_for` × consecutive
//! ejections, capped at `max_eject_for`, as Envoy's outlier detection does), so a dead
//! instance does not cost `eject_after` failed requests every `eject_for`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

/// When failures eject an instance, and for how long (from the upstream's config, so a
/// reload that changes them applies to instances that stay).
#[derive(Debug, Clone, Copy)]
pub struct EjectPolicy {
    pub after: u32,
    pub eject_for: Duration,
    pub max_eject_for: Duration,
}

pub struct Health {
    origin: Instant,
    failures: AtomicU32,
    /// Ejections since the last success.
    ejections: AtomicU32,
    /// Every ejection since the instance was added, for the operator.
    ejections_total: AtomicU64,
    /// Milliseconds since `origin` until which the instance gets no traffic.
    ejected_until_ms: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

impl Health {
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
            failures: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejections_total: AtomicU64::new(0),
            ejected_until_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Every ejection since the instance was added.
    pub fn ejections(&self) -> u64 {
        self.ejections_total.load(Relaxed)
    }

    pub fn is_available(&self) -> bool {
        self.ejected_until_ms.load(Relaxed) <= self.now_ms()
    }

    pub fn success(&self) {
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
        if self.ejections.load(Relaxed) != 0 {
            self.ejections.store(0, Relaxed);
        }
    }

    pub fn failure(&self, addr: SocketAddr, policy: EjectPolicy) {
        // Failures of requests that were already under way when it was ejected say
        // nothing new.
        let was_until = self.ejected_until_ms.load(Relaxed);
        if policy.after == 0 || was_until > self.now_ms() {
            return;
        }
        let failures = self.failures.fetch_add(1, Relaxed) + 1;
        let on_probation = self.ejections.load(Relaxed) > 0;
        if failures >= policy.after || on_probation {
            let ejections = self.ejections.load(Relaxed) + 1;
            let ejected_for = policy
                .eject_for
                .saturating_mul(ejections)
                .min(policy.max_eject_for);
            let until = self.now_ms() + ejected_for.as_millis() as u64;
            // One winner per ejection: failures racing on other workers must not stack
            // a second, longer ejection on top of it.
            if self
                .ejected_until_ms
                .compare_exchange(was_until, until, Relaxed, Relaxed)
                .is_err()
            {
                return;
            }
            self.ejections.store(ejections, Relaxed);
            self.ejections_total.fetch_add(1, Relaxed);
            self.failures.store(0, Relaxed);
            tracing::warn!(
                instance = %addr,
                failures,
                ejections,
                ejected_for = ?ejected_for,
                "upstream instance ejected after consecutive failures"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn ejects_after_consecutive_failures_and_comes_back() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let policy = EjectPolicy {
            after: 3,
            eject_for: Duration::from_secs(10),
            max_eject_for: Duration::from_secs(300),
        };
        let health = Health::new();
        health.failure(addr, policy);
        health.failure(addr, policy);
        health.success();
        health.failure(addr, policy);
        health.failure(addr, policy);
        assert!(
            health.is_available(),
            "a success in between resets the count"
        );
        health.failure(addr, policy);
        assert!(!health.is_available());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!health.is_available());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(health.is_available());
    }

    #[tokio::test(start_paused = true)]
    async fn repeated_ejections_grow_until_a_success() {
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let policy = EjectPolicy {
            after: 2,
            eject_for: Duration::from_secs(10),
            max_eject_for: Duration::from_secs(25),
        };
        let health = Health::new();
        health.failure(addr, policy);
        health.failure(addr, policy);
        assert!(!health.is_available(), "first ejection");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(health.is_available());
        // On probation: one failure ejects again, for twice as long.
        health.failure(addr, policy);
        assert!(!health.is_available());
        tokio::time::advance(Duration::from_secs(19)).await;
        assert!(!health.is_available(), "the second ejection lasts 20 s");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(health.is_available());
        // The third would last 30 s, capped at 25 s.
        health.failure(addr, policy);
        tokio::time::advance(Duration::from_secs(25)).await;
        assert!(health.is_available());
        // A success ends probation: it takes eject_after failures again.
        health.success();
        health.failure(addr, policy);
        assert!(health.is_available());
    }
}
