//! Header rewriting on the way through (RFC 9110 §7.6): hop-by-hop headers are dropped
//! both ways, and the forwarding headers (Via, X-Forwarded-For, X-Forwarded-Proto) set.

use std::io::Write as _;
use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{uri, Uri, Version};

use crate::config::net::IpRange;

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1), plus
/// the non-standard `Proxy-Connection` some clients still send.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// The index of `name` in [`HOP_BY_HOP`]. A string match compiles to a switch on the
/// length and one compare, cheaper than comparing against each name in turn.
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    Some(match name.as_str() {
        "connection" => 0,
        "te" => 1,
        "trailer" => 2,
        "transfer-encoding" => 3,
        "upgrade" => 4,
        "proxy-authenticate" => 5,
        "proxy-authorization" => 6,
        "keep-alive" => 7,
        "proxy-connection" => 8,
        _ => return None,
    })
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Removes the hop-by-hop headers, including every header the `Connection` header names.
///
/// Most messages carry none, or only `Connection: keep-alive` (NGINX sends it on every
/// response). One pass over the names, with no hashing, finds which are present, and
/// only those are removed; `close` and `keep-alive` tokens name nothing further.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let mut present = [false; HOP_BY_HOP.len()];
    let mut any = false;
    for i in headers.keys().filter_map(hop_by_hop_index) {
        present[i] = true;
        any = true;
    }
    if !any {
        return;
    }
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|token| {
            !token.eq_ignore_ascii_case(b"close") && !token.eq_ignore_ascii_case(b"keep-alive")
        })
        .filter_map(|token| HeaderName::from_bytes(token).ok())
        .collect();
    for name in &listed {
        headers.remove(name);
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, here)| *here) {
        headers.remove(name);
    }
}

/// Whether the client's `TE` lists `trailers` (it reads trailers): the one TE value
/// passed on, since HTTP/2 allows no other and gRPC servers require it.
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers.get_all(header::TE).iter().any(|value| {
        value.as_bytes().split(|&b| b == b',').any(|token| {
            let token = token.split(|&b| b == b';').next().unwrap_or_default();
            token.trim_ascii().eq_ignore_ascii_case(b"trailers")
        })
    })
}

/// The Via entry this proxy adds, by the protocol version it received.
fn via_value(version: Version) -> HeaderValue {
    HeaderValue::from_static(match version {
        Version::HTTP_10 => "1.0 splitgate",
        Version::HTTP_2 => "2.0 splitgate",
        _ => "1.1 splitgate",
    })
}

/// Appends this hop to `Via`.
pub fn add_via(headers: &mut HeaderMap, version: Version) {
    headers.append(header::VIA, via_value(version));
}

/// Facts about the client connection the forwarding headers need.
pub struct Peer<'a> {
    pub ip: IpAddr,
    /// `ip` as a header value, made once per connection.
    pub ip_value: &'a HeaderValue,
    pub tls: bool,
    pub trusted_proxies: &'a [IpRange],
}

/// An IP address as a header value (its text form).
pub fn ip_header_value(ip: IpAddr) -> HeaderValue {
    let mut text = [0u8; 64];
    let mut cursor = &mut text[..];
    let _ = write!(cursor, "{ip}");
    let written = 64 - cursor.len();
    HeaderValue::from_bytes(&text[..written]).expect("an IP address is a valid header value")
}

impl Peer<'_> {
    pub fn is_trusted(&self) -> bool {
        self.trusted_proxies.iter().any(|r| r.contains(self.ip))
    }
}

/// Sets X-Forwarded-For and X-Forwarded-Proto. A trusted peer's X-Forwarded-For is
/// kept and the peer appended; anyone else's is replaced, so a client cannot forge the
/// chain.
pub fn set_forwarded(headers: &mut HeaderMap, peer: &Peer<'_>) {
    if peer.is_trusted() {
        let prior: Vec<&[u8]> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .map(|v| v.as_bytes())
            .collect();
        if !prior.is_empty() {
            let mut joined = prior.join(&b", "[..]);
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(peer.ip_value.as_bytes());
            if let Ok(value) = HeaderValue::from_bytes(&joined) {
                headers.insert(&X_FORWARDED_FOR, value);
                set_proto(headers, peer.tls, true);
                return;
            }
        }
    }
    headers.insert(&X_FORWARDED_FOR, peer.ip_value.clone());
    set_proto(headers, peer.tls, false);
}

fn set_proto(headers: &mut HeaderMap, tls: bool, keep_existing: bool) {
    if keep_existing && headers.contains_key(&X_FORWARDED_PROTO) {
        return;
    }
    headers.insert(
        &X_FORWARDED_PROTO,
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
}

/// The request target as an upstream HTTP/1.1 server expects it: origin form.
/// For absolute-form and HTTP/2 requests the authority moves into `Host`.
pub fn to_origin_form(uri: &mut Uri, headers: &mut HeaderMap) {
    if let Some(authority) = uri.authority() {
        if !headers.contains_key(header::HOST) {
            if let Ok(host) = HeaderValue::from_str(authority.as_str()) {
                headers.insert(header::HOST, host);
            }
        }
        let path = uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| uri::PathAndQuery::from_static("/"));
        *uri = Uri::from(path);
    }
}

/// Moves every header value into one allocation of the response's own.
///
/// Why: hyper parses an upstream response's header values as slices of the upstream
/// connection's read buffer (8 KiB or more), and an HTTP/2 client connection's HPACK
/// encoder keeps the values it indexes for the life of the connection. Without the
/// copy, every idle HTTP/2 client connection pinned an upstream read buffer. One
/// allocation of the values' total length per response is the price.
pub fn detach_values(headers: &mut HeaderMap) {
    let total = headers.values().map(HeaderValue::len).sum();
    let mut copy = bytes::BytesMut::with_capacity(total);
    for value in headers.values() {
        copy.extend_from_slice(value.as_bytes());
    }
    let copy = copy.freeze();
    let mut at = 0;
    for value in headers.values_mut() {
        let end = at + value.len();
        if let Ok(mut detached) = HeaderValue::from_maybe_shared(copy.slice(at..end)) {
            detached.set_sensitive(value.is_sensitive());
            *value = detached;
        }
        at = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detached_values_are_equal_and_no_longer_share_the_read_buffer() {
        let read_buffer = bytes::Bytes::from(b"nginx\"abc\"secret".to_vec());
        let value = |range| HeaderValue::from_maybe_shared(read_buffer.slice(range)).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert(header::SERVER, value(0..5));
        headers.append(header::ETAG, value(5..10));
        let mut secret = value(10..16);
        secret.set_sensitive(true);
        headers.insert(header::SET_COOKIE, secret);

        detach_values(&mut headers);

        assert_eq!(headers[header::SERVER], "nginx");
        assert_eq!(headers[header::ETAG], "\"abc\"");
        assert_eq!(headers[header::SET_COOKIE], "secret");
        assert!(headers[header::SET_COOKIE].is_sensitive());
        // The values no longer hold the read buffer: ours is its only owner again.
        assert!(read_buffer.is_unique());
    }

    #[test]
    fn strips_connection_listed_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        headers.insert("x-secret", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1);
        assert!(headers.contains_key("x-kept"));

        // Tokens are case-insensitive and may repeat across several Connection lines;
        // Proxy-Connection and the other fixed hop-by-hop names go too.
        let mut headers = HeaderMap::new();
        headers.append(header::CONNECTION, HeaderValue::from_static("Close"));
        headers.append(header::CONNECTION, HeaderValue::from_static(" X-Other ,te"));
        headers.insert("x-other", HeaderValue::from_static("1"));
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
        headers.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        headers.insert(header::HOST, HeaderValue::from_static("a"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.keys().collect::<Vec<_>>(), [header::HOST]);
    }

    #[test]
    fn untrusted_forwarded_for_is_replaced_and_trusted_is_appended() {
        let mut headers = HeaderMap::new();
        headers.insert(&X_FORWARDED_FOR, HeaderValue::from_static("6.6.6.6"));
        let ip = "10.0.0.7".parse().unwrap();
        let ip_value = ip_header_value(ip);
        set_forwarded(
            &mut headers,
            &Peer {
                ip,
                ip_value: &ip_value,
                tls: false,
                trusted_proxies: &[],
            },
        );
        assert_eq!(headers[&X_FORWARDED_FOR], "10.0.0.7");

        let trusted = [IpRange::parse("10.0.0.0/8").unwrap()];
        let mut headers = HeaderMap::new();
        headers.insert(&X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        set_forwarded(
            &mut headers,
            &Peer {
                ip,
                ip_value: &ip_value,
                tls: true,
                trusted_proxies: &trusted,
            },
        );
        assert_eq!(headers[&X_FORWARDED_FOR], "1.2.3.4, 10.0.0.7");
        assert_eq!(headers[&X_FORWARDED_PROTO], "https");
    }
}
