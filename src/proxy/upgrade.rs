//! HTTP/1.1 upgrades (WebSocket and the like). The request keeps its `Upgrade` header
//! and goes upstream on a connection of its own. Only when the upstream answers
//! `101 Switching Protocols` does a tunnel open, copying bytes both ways; any other
//! answer is an ordinary response, and the client connection carries on as HTTP.

use std::sync::Arc;

use http::header::{HeaderValue, CONNECTION, UPGRADE};
use http::{request, response, HeaderMap, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::sync::OwnedSemaphorePermit;

/// An upgrade asked for by the client.
pub struct ClientUpgrade {
    pub protocol: Protocol,
    on_upgrade: OnUpgrade,
}

/// The protocol named in an `Upgrade` header, to put back after hop-by-hop stripping.
pub struct Protocol(HeaderValue);

impl Protocol {
    pub fn restore(&self, headers: &mut HeaderMap) {
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(UPGRADE, self.0.clone());
    }
}

/// Takes the upgrade out of an HTTP/1.1 request that asks for one.
pub fn take(parts: &mut request::Parts) -> Option<ClientUpgrade> {
    if parts.version != Version::HTTP_11 {
        return None;
    }
    let protocol = Protocol(parts.headers.get(UPGRADE)?.clone());
    let on_upgrade = parts.extensions.remove::<OnUpgrade>()?;
    Some(ClientUpgrade {
        protocol,
        on_upgrade,
    })
}

/// On a 101 from the upstream: spawns the tunnel between the two upgraded connections
/// and returns the protocol to name in the response. The tunnel holds `slot`, the
/// client connection's place under the connection cap, until it closes.
pub fn tunnel(
    client: ClientUpgrade,
    head: &mut response::Parts,
    slot: Arc<OwnedSemaphorePermit>,
) -> Option<Protocol> {
    let upstream = head.extensions.remove::<OnUpgrade>()?;
    let protocol = head
        .headers
        .get(UPGRADE)
        .cloned()
        .map_or(client.protocol, Protocol);
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client.on_upgrade, upstream) {
            Ok(pair) => pair,
            Err(error) => {
                tracing::debug!(%error, "upgrade did not complete");
                return;
            }
        };
        let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
        if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(%error, "upgraded tunnel ended with an error");
        }
        drop(slot);
    });
    Some(protocol)
}
