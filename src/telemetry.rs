//! Metrics and logs: metric names (`names.rs`, the only place they are spelled), the
//! registry, per-route handles, and the access log.

pub mod access_log;
pub mod names;
pub mod registry;
pub mod route;
pub mod sharded;

pub use registry::Registry;
pub use route::{Outcome, RouteMetrics};
