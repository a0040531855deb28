//! The SLO guard's inputs and verdicts: per-route rolling windows for both sides
//! (`window.rs`), recorded on every request, and the background guard that reads them.

pub mod guard;
pub mod verdict;
pub mod window;

use std::time::Duration;

use tokio::time::Instant;

pub use window::{Window, WindowStats};

use crate::proxy::split::Variant;
use crate::telemetry::Outcome;

/// Default window when a route has no `[routes.slo]`: its figures still show in the
/// admin API.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(30);

/// Both sides' windows of one route, and the clock they share.
pub struct RouteWindows {
    origin: Instant,
    count_4xx: bool,
    pub stable: Window,
    pub canary: Window,
}

impl RouteWindows {
    pub fn new(length: Duration, count_4xx: bool) -> Self {
        Self {
            origin: Instant::now(),
            count_4xx,
            stable: Window::new(length),
            canary: Window::new(length),
        }
    }

    /// Milliseconds on this route's window clock.
    pub fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Records one finished request.
    pub fn record(&self, variant: Variant, outcome: Outcome, latency: Duration) {
        let error = match outcome {
            Outcome::Error(_) => true,
            Outcome::Status(status) => {
                status >= 500 || (self.count_4xx && (400..500).contains(&status))
            }
        };
        let window = match variant {
            Variant::Stable => &self.stable,
            Variant::Canary => &self.canary,
        };
        window.record(self.now_ms(), error, latency);
    }
}
