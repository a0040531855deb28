//! The access log: one INFO event per request on target `splitgate::access`. The
//! subscriber decides the format (text, or JSON with `--log-format json`).
//!
//! The user's key is never logged; the bucket it hashed to is, which is enough to tell
//! whether two requests came from the same user without revealing who.

use std::net::SocketAddr;
use std::time::Duration;

/// Everything one access-log line carries.
pub struct AccessRecord<'a> {
    pub request_id: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub route: &'a str,
    pub variant: &'a str,
    pub bucket: Option<u32>,
    pub instance: Option<SocketAddr>,
    pub status: u16,
    pub duration: Duration,
    /// Response body size when the upstream declared it (Content-Length).
    pub bytes: Option<u64>,
}

pub fn log(record: &AccessRecord<'_>) {
    tracing::info!(
        target: "splitgate::access",
        request_id = record.request_id,
        method = record.method,
        path = record.path,
        route = record.route,
        variant = record.variant,
        bucket = record.bucket,
        instance = record.instance.map(tracing::field::display),
        status = record.status,
        duration_ms = record.duration.as_secs_f64() * 1000.0,
        bytes = record.bytes,
    );
}
