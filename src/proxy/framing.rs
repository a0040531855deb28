//! Request checks before anything is forwarded: the message-framing and Host rules of
//! RFC 9110/9112 that hyper lets through, each of which is a request-smuggling vector
//! when a proxy and its upstream read a message differently. A failure here is a 400
//! and the client connection is closed.

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::request::Parts;
use http::{HeaderMap, Version};

use super::error::ProxyError;
use crate::upstream::h1::head::plain_length;

/// Checks one request head. `max_uri_bytes` bounds the request target.
pub fn check(parts: &Parts, max_uri_bytes: usize) -> Result<(), ProxyError> {
    // A reverse proxy opens no tunnels by CONNECT; hyper would treat the connection as
    // switching protocols, beyond every framing check.
    if parts.method == http::Method::CONNECT {
        return Err(ProxyError::BadRequest("CONNECT is not proxied"));
    }
    let headers = &parts.headers;
    let uri_len = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if uri_len > max_uri_bytes {
        return Err(ProxyError::UriTooLong);
    }
    // One pass over the headers, comparing names, instead of a hashed lookup per rule.
    let (mut te_count, mut cl_count, mut host_count) = (0, 0, 0);
    for name in headers.iter().map(|(name, _)| name) {
        if *name == TRANSFER_ENCODING {
            te_count += 1;
        } else if *name == CONTENT_LENGTH {
            cl_count += 1;
        } else if *name == HOST {
            host_count += 1;
        }
    }
    if te_count > 0 && cl_count > 0 {
        return Err(ProxyError::BadRequest(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    if cl_count > 1 {
        return Err(ProxyError::BadRequest("more than one Content-Length"));
    }
    if let Some(cl) = headers.get(CONTENT_LENGTH) {
        if plain_length(cl.as_bytes()).is_none() {
            return Err(ProxyError::BadRequest(
                "Content-Length is not a plain number",
            ));
        }
    }
    if te_count > 0 {
        if parts.version == Version::HTTP_10 {
            return Err(ProxyError::BadRequest("Transfer-Encoding on HTTP/1.0"));
        }
        let only_chunked = te_count == 1
            && headers
                .get(TRANSFER_ENCODING)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"chunked"));
        if !only_chunked {
            return Err(ProxyError::BadRequest(
                "Transfer-Encoding other than exactly \"chunked\"",
            ));
        }
    }
    check_host(parts, host_count)
}

fn check_host(parts: &Parts, hosts: usize) -> Result<(), ProxyError> {
    if hosts > 1 {
        return Err(ProxyError::BadRequest("more than one Host"));
    }
    let host = parts.headers.get(HOST);
    if let Some(host) = host {
        if host.is_empty() && parts.uri.authority().is_none() && parts.version == Version::HTTP_11 {
            return Err(ProxyError::BadRequest("empty Host"));
        }
    }
    match (parts.version, parts.uri.authority(), host) {
        (Version::HTTP_11, _, None) => Err(ProxyError::BadRequest("missing Host")),
        (_, Some(authority), Some(host))
            if !authority
                .as_str()
                .as_bytes()
                .eq_ignore_ascii_case(host.as_bytes()) =>
        {
            Err(ProxyError::BadRequest(
                if parts.version == Version::HTTP_2 {
                    "Host disagrees with :authority"
                } else {
                    "absolute-form URI disagrees with Host"
                },
            ))
        }
        _ => Ok(()),
    }
}

/// The host a request is for, lower-cased by the caller's comparison, without port:
/// the URI authority (absolute form, HTTP/2) or else the Host header.
pub fn request_host<'a>(uri: &'a http::Uri, headers: &'a HeaderMap) -> &'a str {
    let raw = uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| headers.get(HOST).and_then(|h| h.to_str().ok()))
        .unwrap_or("");
    strip_port(raw)
}

fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_ports() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "::1");
    }
}
