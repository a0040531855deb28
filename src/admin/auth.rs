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
