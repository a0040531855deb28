//! The split: which side (stable or canary) a request goes to.
//!
//! The contract (DESIGN.md, "Split semantics") in one place, pure and allocation-free on
//! the keyed path:
//! - key = the first configured source present (`header:`, `cookie:`, `query:`, `client_ip`),
//!   then the route's sticky cookie;
//! - bucket = SipHash-1-3(key bytes) with a 128-bit key derived from the route's salt,
//!   mod 10 000;
//! - canary iff bucket < weight in basis points.
//!
//! Because the bucket depends only on (salt, key), every replica decides alike, a user
//! keeps their side, and raising the weight only moves users from stable to canary.

use std::hash::Hasher;
use std::io::Write as _;
use std::net::IpAddr;

use http::header::COOKIE;
use http::{HeaderMap, HeaderName, Uri};
use siphasher::sip::SipHasher13;
use siphasher::sip128::{Hasher128, SipHasher13 as SipHasher13x128};

use crate::config::RouteSpec;

/// Number of buckets; a weight in basis points compares directly against a bucket.
pub const BUCKETS: u64 = 10_000;

/// Where a split key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Header(HeaderName),
    Cookie(String),
    Query(String),
    ClientIp,
}

impl KeySource {
    /// Parses `header:NAME`, `cookie:NAME`, `query:NAME` or `client_ip`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "client_ip" {
            return Ok(Self::ClientIp);
        }
        let (kind, name) = text.split_once(':').ok_or_else(|| {
            format!(
                "{text:?} is not a key source (header:NAME, cookie:NAME, query:NAME or client_ip)"
            )
        })?;
        if name.is_empty() {
            return Err(format!("{text:?} has an empty name"));
        }
        match kind {
            "header" => HeaderName::from_bytes(name.as_bytes())
                .map(Self::Header)
                .map_err(|_| format!("{name:?} is not a valid header name")),
            "cookie" => Ok(Self::Cookie(name.to_string())),
            "query" => Ok(Self::Query(name.to_string())),
            _ => Err(format!(
                "{text:?} has unknown source {kind:?} (header, cookie, query or client_ip)"
            )),
        }
    }
}

/// The 128-bit SipHash key of a route, derived from its salt: SipHash-1-3-128 with an
/// all-zero key over the salt's UTF-8 bytes, little-endian.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaltKey([u8; 16]);

impl SaltKey {
    pub fn derive(salt: &str) -> Self {
        let mut hasher = SipHasher13x128::new_with_keys(0, 0);
        hasher.write(salt.as_bytes());
        Self(hasher.finish128().as_bytes())
    }
}

/// The bucket (0..10 000) of a key under a salt. Never change this: it would move users.
pub fn bucket(salt: &SaltKey, key: &[u8]) -> u32 {
    let mut hasher = SipHasher13::new_with_key(&salt.0);
    hasher.write(key);
    (hasher.finish() % BUCKETS) as u32
}

/// Which pool serves a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Variant {
    Stable,
    Canary,
}

impl Variant {
    pub fn as_str(self) -> &'static str {
        match self {
            Variant::Stable => "stable",
            Variant::Canary => "canary",
        }
    }
}

/// Why a side was chosen; logged, never used as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The route has no canary, or the canary cannot take traffic.
    NoCanary,
    /// The override header or cookie.
    Override,
    /// The key is on the canary allow-list.
    AllowList,
    /// The key's bucket against the weight.
    Hash,
    /// No key: a fresh random one, now set as the sticky cookie.
    NewKey,
}

/// The outcome of a split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub variant: Variant,
    pub reason: Reason,
    /// The key's bucket, when a key was hashed. Logged instead of the key itself.
    pub bucket: Option<u32>,
    /// A freshly generated key to set as the sticky cookie.
    pub new_key: Option<String>,
}

/// Inputs of a split that come from the request.
pub struct RequestView<'a> {
    pub headers: &'a HeaderMap,
    pub uri: &'a Uri,
    pub client_ip: IpAddr,
}

/// Decides the side of one request. `weight_bp` and `tripped` come from the live snapshot.
pub fn decide(
    route: &RouteSpec,
    weight_bp: u32,
    tripped: bool,
    request: &RequestView<'_>,
) -> Decision {
    let fixed = |variant, reason| Decision {
        variant,
        reason,
        bucket: None,
        new_key: None,
    };
    if route.canary.is_none() {
        return fixed(Variant::Stable, Reason::NoCanary);
    }
    // The override is honoured only from the configured peers (DESIGN.md §1.1).
    let override_name = route.override_name.as_ref().filter(|name| {
        let peer = request.client_ip.to_canonical();
        name.enabled && name.from.iter().any(|range| range.contains(peer))
    });
    if let Some(name) = override_name {
        let forced = request
            .headers
            .get(&name.header)
            .map(|v| v.as_bytes())
            .or_else(|| cookie(request.headers, &name.cookie));
        match forced {
            Some(b"canary") if !tripped => return fixed(Variant::Canary, Reason::Override),
            Some(b"stable") => return fixed(Variant::Stable, Reason::Override),
            _ => {}
        }
    }
    let mut ip_text = [0u8; 64];
    let key = first_key(route, request, &mut ip_text);
    let by_bucket = |bucket: u32| {
        if bucket < weight_bp {
            Variant::Canary
        } else {
            Variant::Stable
        }
    };
    match key {
        Some(key) => {
            if !tripped
                && !route.canary_allow_list.is_empty()
                && std::str::from_utf8(key).is_ok_and(|k| route.canary_allow_list.contains(k))
            {
                return fixed(Variant::Canary, Reason::AllowList);
            }
            let bucket = bucket(&route.salt, key);
            Decision {
                variant: by_bucket(bucket),
                reason: Reason::Hash,
                bucket: Some(bucket),
                new_key: None,
            }
        }
        None => {
            let new_key = format!("{:032x}", fastrand::u128(..));
            let bucket = bucket(&route.salt, new_key.as_bytes());
            Decision {
                variant: by_bucket(bucket),
                reason: Reason::NewKey,
                bucket: Some(bucket),
                new_key: route.sticky_cookie.is_some().then_some(new_key),
            }
        }
    }
}

/// The first configured key source present, then the sticky cookie. The client IP is
/// written as text into `ip_text`, so no source allocates.
fn first_key<'a>(
    route: &RouteSpec,
    request: &RequestView<'a>,
    ip_text: &'a mut [u8; 64],
) -> Option<&'a [u8]> {
    let present = |v: &'a [u8]| (!v.is_empty()).then_some(v);
    for source in &route.split_key {
        let key = match source {
            KeySource::Header(name) => request
                .headers
                .get(name)
                .and_then(|v| present(v.as_bytes())),
            KeySource::Cookie(name) => cookie(request.headers, name).and_then(present),
            KeySource::Query(name) => query_param(request.uri, name).and_then(present),
            KeySource::ClientIp => {
                let mut cursor = &mut ip_text[..];
                write!(cursor, "{}", request.client_ip).ok()?;
                let written = 64 - cursor.len();
                return Some(&ip_text[..written]);
            }
        };
        if key.is_some() {
            return key;
        }
    }
    route
        .sticky_cookie
        .as_deref()
        .and_then(|name| cookie(request.headers, name))
}

/// The raw value of a cookie, from any `Cookie` header.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers.get_all(COOKIE).iter().find_map(|value| {
        value.as_bytes().split(|&b| b == b';').find_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|&b| b == b'=')?;
            (&pair[..eq] == name.as_bytes()).then(|| &pair[eq + 1..])
        })
    })
}

/// The raw (not percent-decoded) value of a query parameter.
fn query_param<'a>(uri: &'a Uri, name: &str) -> Option<&'a [u8]> {
    uri.query()?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v.as_bytes())
    })
}
