//! The access log: one INFO event per request on target `splitgate::access`. The
//! subscriber decides the format (text, or JSON with `--log-format json`).
//!
//! The user's key is never logged; the bucket it hashed to is, which is enough to tell
//! whether two requests came from the same user without revealing who.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// Everything one access-log line carries.
pub struct AccessRecord<'a> {
    /// The TCP peer (what NGINX's `$remote_addr` is).
    pub client: IpAddr,
    pub request_id: &'a str,
    pub host: Option<&'a str>,
    pub user_agent: Option<&'a str>,
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
        client = %record.client,
        request_id = record.request_id,
        host = record.host,
        user_agent = record.user_agent,
        method = record.method,
        path = record.path,
        route = record.route,
        variant = record.variant,
        bucket = record.bucket,
        instance = record.instance.map(tracing::field::display),
        status = record.status,
        duration_ms = duration_ms(record.duration),
        bytes = record.bytes,
    );
}

/// Milliseconds with microsecond precision: `0.368`, not `0.36834599999999995`.
fn duration_ms(duration: Duration) -> f64 {
    duration.as_micros() as f64 / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_without_float_noise() {
        assert_eq!(
            duration_ms(Duration::from_nanos(368_345_999)).to_string(),
            "368.345"
        );
        assert_eq!(
            duration_ms(Duration::from_nanos(368_346)).to_string(),
            "0.368"
        );
    }
}
