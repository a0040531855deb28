//! HTTP/1.1 upgrades (WebSocket and the like). An upgrade goes upstream only when the
//! client's own `Connection` lists `upgrade` and the protocol is on
//! `server.upgrade_protocols`; `h2c` never does (a tunnel to an HTTP/2 upstream would
//! carry requests past every check this proxy makes: "h2c smuggling"). Anything else is
//! proxied as a plain request with `Upgrade` stripped.
//!
//! The request goes upstream on a connection of its own. Only when the upstream answers
//! `101 Switching Protocols` to a protocol the client asked for does a tunnel open,
//! copying bytes both ways; any other answer is an ordinary response, and the client
//! connection carries on as HTTP (still scanned for framing).

use http::header::{HeaderValue, CONNECTION, UPGRADE};
use http::{request, response, HeaderMap, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// An upgrade asked for by the client, and allowed.
pub struct ClientUpgrade {
    pub protocol: Protocol,
    on_upgrade: OnUpgrade,
}

/// The allowed protocols named in an `Upgrade` header, to put back after hop-by-hop
/// stripping.
pub struct Protocol(HeaderValue);

impl Protocol {
    pub fn restore(&self, headers: &mut HeaderMap) {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, self.0.clone());
    }
}

/// The tokens of a comma-separated header, trimmed.
fn tokens(headers: &HeaderMap, name: http::header::HeaderName) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(name)
        .into_iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|token| !token.is_empty())
}

/// Whether a protocol token (`websocket`, `websocket/13`) is on the allowed list.
fn allowed(token: &[u8], protocols: &[String]) -> bool {
    let name = token.split(|&b| b == b'/').next().unwrap_or_default();
    !name.eq_ignore_ascii_case(b"h2c")
        && protocols
            .iter()
            .any(|p| name.eq_ignore_ascii_case(p.as_bytes()))
}

/// Takes the upgrade out of an HTTP/1.1 request that asks for an allowed one. `None`
/// leaves the request as it is: its `Upgrade` is hop-by-hop and gets stripped.
pub fn take(parts: &mut request::Parts, protocols: &[String]) -> Option<ClientUpgrade> {
    if parts.version != Version::HTTP_11 {
        return None;
    }
    let asked = tokens(&parts.headers, CONNECTION).any(|t| t.eq_ignore_ascii_case(b"upgrade"));
    if !asked {
        return None;
    }
    let wanted: Vec<&[u8]> = tokens(&parts.headers, UPGRADE)
        .filter(|token| allowed(token, protocols))
        .collect();
    if wanted.is_empty() {
        return None;
    }
    let protocol = Protocol(HeaderValue::from_bytes(&wanted.join(&b", "[..])).ok()?);
    let on_upgrade = parts.extensions.remove::<OnUpgrade>()?;
    Some(ClientUpgrade {
        protocol,
        on_upgrade,
    })
}

/// Whether a `101` from the upstream switches to a protocol the client asked for.
/// Anything else (a 101 nobody asked for, or to another protocol) is refused as a
/// broken upstream response, and no tunnel opens.
pub fn accepts(client: Option<&ClientUpgrade>, head: &HeaderMap) -> bool {
    let Some(client) = client else {
        return false;
    };
    let asked: Vec<&[u8]> = client
        .protocol
        .0
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .collect();
    let mut answered = tokens(head, UPGRADE).peekable();
    answered.peek().is_some()
        && answered.all(|token| asked.iter().any(|a| a.eq_ignore_ascii_case(token)))
}

/// On an accepted 101 from the upstream: spawns the tunnel between the two upgraded
/// connections and returns the protocol to name in the response. The tunnel holds
/// `hold` (the client connection's place under the connection cap, and its mark as in
/// flight to the instance) until it closes.
pub fn tunnel(
    client: ClientUpgrade,
    head: &response::Parts,
    mut upstream: crate::upstream::h1::Upgraded,
    hold: impl Send + 'static,
) -> Protocol {
    let protocol = head
        .headers
        .get(UPGRADE)
        .cloned()
        .map_or(client.protocol, Protocol);
    tokio::spawn(async move {
        let client = match client.on_upgrade.await {
            Ok(client) => client,
            Err(error) => {
                tracing::debug!(%error, "upgrade did not complete");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream.io).await {
            tracing::debug!(%error, "upgraded tunnel ended with an error");
        }
        drop((hold, upstream.slot));
    });
    protocol
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(headers: &[(&str, &str)]) -> request::Parts {
        let mut builder = http::Request::get("/ws");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let (mut parts, ()) = builder.body(()).unwrap().into_parts();
        // hyper puts this in every HTTP/1.1 request; a test stands in for it.
        let on_upgrade = hyper::upgrade::on(http::Request::new(()));
        parts.extensions.insert(on_upgrade);
        parts
    }

    fn websocket() -> Vec<String> {
        vec!["websocket".into()]
    }

    #[test]
    fn only_an_allowed_protocol_the_client_asked_for_is_taken() {
        let mut ok = parts(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ]);
        assert!(take(&mut ok, &websocket()).is_some());

        // Upgrade without `Connection: upgrade` is not an upgrade request.
        let mut unasked = parts(&[("upgrade", "websocket")]);
        assert!(take(&mut unasked, &websocket()).is_none());
        // h2c never, even when configured by mistake.
        let mut h2c = parts(&[
            ("connection", "upgrade, HTTP2-Settings"),
            ("upgrade", "h2c"),
        ]);
        assert!(take(&mut h2c, &["h2c".to_string()]).is_none());
        let mut other = parts(&[("connection", "upgrade"), ("upgrade", "echo")]);
        assert!(take(&mut other, &websocket()).is_none());
        // Of several, only the allowed ones go upstream.
        let mut mixed = parts(&[("connection", "upgrade"), ("upgrade", "h2c, websocket")]);
        let taken = take(&mut mixed, &websocket()).unwrap();
        assert_eq!(taken.protocol.0, "websocket");
    }

    #[test]
    fn a_101_must_switch_to_what_the_client_asked() {
        let mut request = parts(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        let client = take(&mut request, &websocket()).unwrap();
        let mut head = HeaderMap::new();
        assert!(!accepts(Some(&client), &head), "101 without Upgrade");
        head.insert(UPGRADE, HeaderValue::from_static("h2c"));
        assert!(!accepts(Some(&client), &head));
        head.insert(UPGRADE, HeaderValue::from_static("WebSocket"));
        assert!(accepts(Some(&client), &head));
        assert!(!accepts(None, &head), "a 101 nobody asked for");
    }
}
