//! Passive health of one instance: consecutive transport failures (connect, timeout,
//! reset, protocol) eject it for a while; any success clears the count. Recorded with
//! atomics on the request path, no lock.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::time::Instant;

pub struct Health {
    origin: Instant,
    eject_after: u32,
    eject_for: Duration,
    failures: AtomicU32,
    /// Milliseconds since `origin` until which the instance gets no traffic.
    ejected_until_ms: AtomicU64,
}

impl Health {
    pub fn new(eject_after: u32, eject_for: Duration) -> Self {
        Self {
            origin: Instant::now(),
            eject_after,
            eject_for,
            failures: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    pub fn is_available(&self) -> bool {
        self.ejected_until_ms.load(Relaxed) <= self.now_ms()
    }

    pub fn success(&self) {
        if self.failures.load(Relaxed) != 0 {
            self.failures.store(0, Relaxed);
        }
    }

    pub fn failure(&self, addr: SocketAddr) {
        if self.eject_after == 0 {
            return;
        }
        let failures = self.failures.fetch_add(1, Relaxed) + 1;
        if failures >= self.eject_after {
            self.failures.store(0, Relaxed);
            let until = self.now_ms() + self.eject_for.as_millis() as u64;
            self.ejected_until_ms.store(until, Relaxed);
            tracing::warn!(
                instance = %addr,
                failures,
                ejected_for = ?self.eject_for,
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
        let health = Health::new(3, Duration::from_secs(10));
        health.failure(addr);
        health.failure(addr);
        health.success();
        health.failure(addr);
        health.failure(addr);
        assert!(
            health.is_available(),
            "a success in between resets the count"
        );
        health.failure(addr);
        assert!(!health.is_available());
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!health.is_available());
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(health.is_available());
    }
}
