//! Bearer-token check for admin changes, in constant time so the token cannot be
//! guessed byte by byte from response timings.

use http::header::AUTHORIZATION;
use http::HeaderMap;

/// Whether `headers` carry `Authorization: Bearer <token>`.
pub fn authorized(headers: &HeaderMap, token: &str) -> bool {
    let Some(given) = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    constant_time_eq(given, token.as_bytes())
}

/// Whether a change request without a bearer token cannot have come from a web page on
/// another site (CSRF) or through a rebound DNS name: it carries `Content-Type:
/// application/json`, which a browser sends cross-origin only after a CORS preflight
/// this API never grants, and its `Host` is an IP address or `localhost`, not a name an
/// attacker's page could point at this address. Bearer tokens are their own proof (a
/// browser never attaches one by itself).
pub fn browser_safe(headers: &HeaderMap) -> Result<(), &'static str> {
    let json = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(
            "changes need Content-Type: application/json (so that no other web page can send them)",
        );
    }
    addressed_locally(headers).map_err(|_| {
        "changes without a token must address the admin API by IP address or localhost"
    })
}

/// Whether the request names the admin API by an IP address or `localhost` in `Host`,
/// never by a DNS name: a tokenless (loopback) admin API must not answer a page that
/// re-pointed its own name at 127.0.0.1 (DNS rebinding), or that page could read the
/// routes, upstreams and metrics as if it were the operator.
pub fn addressed_locally(headers: &HeaderMap) -> Result<(), &'static str> {
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    if name.parse::<std::net::IpAddr>().is_err() && !name.eq_ignore_ascii_case("localhost") {
        return Err("an admin API without a token answers only requests addressed to an IP address or localhost (Host)");
    }
    Ok(())
}

/// Compares without an early exit on the first differing byte. The length is not
/// secret-dependent work: a different length is simply unequal.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn tokenless_changes_must_be_json_to_an_address() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in pairs {
                map.insert(*k, HeaderValue::from_static(v));
            }
            map
        };
        let json = ("content-type", "application/json; charset=utf-8");
        assert!(browser_safe(&headers(&[json, ("host", "127.0.0.1:9901")])).is_ok());
        assert!(browser_safe(&headers(&[json, ("host", "[::1]:9901")])).is_ok());
        assert!(browser_safe(&headers(&[json, ("host", "localhost:9901")])).is_ok());
        // A form post, or text/plain: what a cross-site page can send without asking.
        let form = ("content-type", "application/x-www-form-urlencoded");
        assert!(browser_safe(&headers(&[form, ("host", "127.0.0.1:9901")])).is_err());
        assert!(browser_safe(&headers(&[("host", "127.0.0.1:9901")])).is_err());
        // A rebound name.
        assert!(browser_safe(&headers(&[json, ("host", "evil.example:9901")])).is_err());
    }

    #[test]
    fn checks_the_bearer_token() {
        let mut headers = HeaderMap::new();
        assert!(!authorized(&headers, "s3cret"));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
        assert!(authorized(&headers, "s3cret"));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Bearer s3creT"));
        assert!(!authorized(&headers, "s3cret"));
        headers.insert(AUTHORIZATION, HeaderValue::from_static("Basic s3cret"));
        assert!(!authorized(&headers, "s3cret"));
    }
}
