//! What splitgate knows of gRPC: which requests are gRPC calls, their status codes and
//! which of them count as the upstream's failure, the `grpc-timeout` deadline, and the
//! trailers-only error responses the proxy sends a gRPC client instead of an HTTP error
//! page (a gRPC client reads `grpc-status`, never a 502's body).
//!
//! gRPC rides on HTTP/2 with HTTP status 200 for nearly every outcome: the real status is
//! `grpc-status`, in the response headers ("trailers-only", when the call failed before
//! any message) or in the trailers after the last message.

use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

/// The gRPC status codes by number (grpc/doc/statuscodes.md).
pub const CODE_NAMES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

pub const UNKNOWN: u32 = 2;
pub const DEADLINE_EXCEEDED: u32 = 4;
pub const UNAVAILABLE: u32 = 14;
pub const INTERNAL: u32 = 13;

/// A set of gRPC status codes (bit n: code n), such as the codes a route counts as the
/// upstream's failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodeSet(u32);

impl CodeSet {
    /// The statuses that say the server failed, not the caller: UNKNOWN,
    /// DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, UNAVAILABLE, DATA_LOSS. The
    /// others (NOT_FOUND, INVALID_ARGUMENT, CANCELLED, …) are answers about the request.
    pub const SERVER_FAILURES: CodeSet =
        CodeSet(1 << 2 | 1 << 4 | 1 << 8 | 1 << 13 | 1 << 14 | 1 << 15);

    /// Parses a list of names (`"UNAVAILABLE"`, any case) or numbers (`14`); the error
    /// names the entry that is neither.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, String> {
        let mut bits = 0u32;
        for entry in entries {
            let entry = entry.as_ref().trim();
            let code = match entry.parse::<u32>() {
                Ok(n) if (n as usize) < CODE_NAMES.len() => n,
                _ => CODE_NAMES
                    .iter()
                    .position(|name| name.eq_ignore_ascii_case(entry))
                    .ok_or_else(|| {
                        format!(
                            "{entry:?} is not a gRPC status; use a name such as \"UNAVAILABLE\" or a number 0-16"
                        )
                    })? as u32,
            };
            bits |= 1 << code;
        }
        Ok(Self(bits))
    }

    pub fn contains(self, code: u32) -> bool {
        code < 32 && self.0 & (1 << code) != 0
    }

    /// The names in the set, in code order.
    pub fn names(self) -> Vec<&'static str> {
        (0..CODE_NAMES.len() as u32)
            .filter(|&c| self.contains(c))
            .map(|c| CODE_NAMES[c as usize])
            .collect()
    }
}

/// Whether a request is a gRPC call: `content-type: application/grpc`, alone or with a
/// `+codec` or `;params` suffix (gRPC-Web's `application/grpc-web` is a different wire
/// format and is not).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|value| {
        let value = value.as_bytes();
        value.len() >= 16
            && value[..16].eq_ignore_ascii_case(b"application/grpc")
            && matches!(value.get(16), None | Some(b'+' | b';'))
    })
}

/// The `grpc-status` in a header block, if it has one. A value that is not a number
/// reads as UNKNOWN, as gRPC clients read it.
pub fn status_in(headers: &HeaderMap) -> Option<u32> {
    let value = headers.get(&GRPC_STATUS)?;
    Some(
        std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(UNKNOWN),
    )
}

/// The deadline a `grpc-timeout` header asks for ("100m", "5S": at most 8 digits and a
/// unit, H M S m u n); `None` when absent or malformed.
pub fn timeout_in(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(&GRPC_TIMEOUT)?.as_bytes();
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b"H" => Duration::from_secs(n * 3600),
        b"M" => Duration::from_secs(n * 60),
        b"S" => Duration::from_secs(n),
        b"m" => Duration::from_millis(n),
        b"u" => Duration::from_micros(n),
        b"n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A trailers-only gRPC response: HTTP 200 with the status and message in the headers,
/// and no body.
pub fn error_response<B: Default>(code: u32, message: &str) -> Response<B> {
    let mut response = Response::new(B::default());
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.extend(status_trailers(code, message));
    response
}

/// `grpc-status` and `grpc-message` (percent-encoded, as the gRPC spec asks), for
/// trailers or a trailers-only head.
pub fn status_trailers(code: u32, message: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(&GRPC_STATUS, HeaderValue::from(code));
    if let Ok(value) = HeaderValue::from_maybe_shared(Bytes::from(percent_encode(message))) {
        headers.insert(&GRPC_MESSAGE, value);
    }
    headers
}

/// The gRPC status a proxy error becomes, from the HTTP status it would have had
/// (grpc/doc/http-grpc-status-mapping.md, with the proxy's own timeouts as
/// DEADLINE_EXCEEDED only when the caller's deadline ran out).
pub fn code_for_http(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => INTERNAL,
        401 => 16,
        403 => 7,
        404 => 12,
        408 => DEADLINE_EXCEEDED,
        429 | 502 | 503 | 504 => UNAVAILABLE,
        _ => UNKNOWN,
    }
}

/// Percent-encodes what gRPC's `grpc-message` may not carry as is (outside printable
/// ASCII, and `%`).
fn percent_encode(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for byte in message.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_grpc_content_types_only() {
        let with = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(value));
            is_grpc(&headers)
        };
        assert!(with("application/grpc"));
        assert!(with("application/grpc+proto"));
        assert!(with("Application/GRPC;charset=utf-8"));
        assert!(!with("application/grpc-web"));
        assert!(!with("application/grpcx"));
        assert!(!with("application/json"));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn parses_grpc_timeouts() {
        let timeout = |value: &'static str| {
            let mut headers = HeaderMap::new();
            headers.insert(&GRPC_TIMEOUT, HeaderValue::from_static(value));
            timeout_in(&headers)
        };
        assert_eq!(timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout("7n"), Some(Duration::from_nanos(7)));
        assert_eq!(timeout("123456789S"), None, "at most 8 digits");
        assert_eq!(timeout("m"), None);
        assert_eq!(timeout("10x"), None);
        assert_eq!(timeout("-1S"), None);
    }

    #[test]
    fn code_sets_parse_names_and_numbers_and_name_the_bad_entry() {
        let set = CodeSet::parse(&["unavailable", "13"]).unwrap();
        assert!(set.contains(14) && set.contains(13) && !set.contains(0));
        assert_eq!(set.names(), ["INTERNAL", "UNAVAILABLE"]);
        let error = CodeSet::parse(&["UNAVAILABLE", "BROKEN"]).unwrap_err();
        assert!(error.contains("\"BROKEN\""), "{error}");
        assert!(CodeSet::parse(&["17"]).is_err());
        let default = CodeSet::SERVER_FAILURES.names();
        assert_eq!(
            default,
            [
                "UNKNOWN",
                "DEADLINE_EXCEEDED",
                "RESOURCE_EXHAUSTED",
                "INTERNAL",
                "UNAVAILABLE",
                "DATA_LOSS"
            ]
        );
    }

    #[test]
    fn error_responses_are_trailers_only_with_an_encoded_message() {
        let response: Response<()> = error_response(UNAVAILABLE, "upstream down: 100%\n");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[&GRPC_STATUS], "14");
        assert_eq!(response.headers()[CONTENT_TYPE], "application/grpc");
        assert_eq!(
            response.headers()[&GRPC_MESSAGE],
            "upstream down: 100%25%0A"
        );
        let mut headers = HeaderMap::new();
        headers.insert(&GRPC_STATUS, HeaderValue::from_static("x"));
        assert_eq!(status_in(&headers), Some(UNKNOWN));
    }
}
