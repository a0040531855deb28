//! One proxied request, in order: load the snapshot once, check framing, route, split,
//! rewrite headers, forward, record, respond. Each step is a function elsewhere; this
//! file only orders them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, HOST, SET_COOKIE, TE, USER_AGENT};
use http::{Request, Response, Version};
use hyper::body::Incoming;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::body::ProxyBody;
use super::error::{upstream_status, ProxyError};
use super::forward::{self, Peer};
use super::outcome::{grpc_outcome, Observed, Recorder};
use super::split::{self, RequestView, Variant};
use super::{framing, route, upgrade};
use crate::config::compile::CanaryUnavailable;
use crate::server::activity::Activity;
use crate::state::{LiveRoute, Shared};
use crate::telemetry::access_log::{self, AccessRecord};
use crate::telemetry::Outcome;
use crate::upstream::body::ClientBody;
use crate::upstream::{ErrorKind, Pool, Upstream, UpstreamBody, UpstreamError};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Facts about the client connection a request came in on.
#[derive(Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The peer's IP as a header value, for X-Forwarded-For; made once per connection.
    pub peer_ip_value: HeaderValue,
    pub tls: bool,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, tls: bool) -> Self {
        Self {
            peer,
            peer_ip_value: forward::ip_header_value(peer.ip()),
            tls,
        }
    }
}

/// The proxy service of one client connection, shared by its requests.
pub struct ProxyService {
    pub shared: Arc<Shared>,
    pub conn: ConnInfo,
    /// The connection's place under `server.max_connections`. An upgrade tunnel
    /// outlives hyper's connection and keeps a share of it, so open tunnels count.
    pub slot: Arc<OwnedSemaphorePermit>,
    /// The connection's activity and framing scan; told when a tunnel opens.
    pub activity: Arc<Activity>,
}

impl ProxyService {
    /// Serves one request. `framing_rejection` is the connection's framing scan's verdict
    /// on this request's head (see `server::head_scan`).
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        framing_rejection: Option<&'static str>,
    ) -> Result<Response<ProxyBody>, std::convert::Infallible> {
        let started = Instant::now();
        let snapshot = crate::worker::snapshot(&self.shared);
        let server = &snapshot.settings.server;
        let (mut parts, body) = request.into_parts();

        let checked = match framing_rejection {
            Some(reason) => Err(ProxyError::BadRequest(reason)),
            None => framing::check(&parts, server.max_uri_bytes),
        };
        // A gRPC caller gets its errors as gRPC statuses, which is all it reads.
        let grpc = crate::grpc::is_grpc(&parts.headers);
        if let Err(error) = checked {
            tracing::debug!(peer = %self.conn.peer, %error, "request rejected");
            return Ok(error.into_response_for(grpc));
        }
        let host = framing::request_host(&parts.uri, &parts.headers);
        let Some(route_index) = route::find_index(&snapshot.routes, host, parts.uri.path()) else {
            return Ok(ProxyError::NoRoute.into_response_for(grpc));
        };
        let route = &snapshot.routes[route_index];
        let decision = split::decide(
            &route.spec,
            route.weight_bp,
            route.trip.is_some(),
            &RequestView {
                headers: &parts.headers,
                uri: &parts.uri,
                client_ip: self.conn.peer.ip(),
            },
        );
        // The judge's evidence step this request belongs to: if the canary's evidence
        // starts over while it is in flight, its outcome is not held against the new one.
        let evidence_step = route.windows.current_step();
        let choice = match choose_instance(route, decision.variant, started) {
            Ok(choice) => choice,
            Err(error) => return Ok(error.into_response_for(grpc)),
        };
        let Choice {
            upstream,
            variant,
            instance,
        } = choice;

        let request_id = match parts.headers.get(&X_REQUEST_ID) {
            Some(id) if !id.is_empty() && id.len() <= 128 => id.clone(),
            _ => {
                let id = new_request_id();
                parts.headers.insert(&X_REQUEST_ID, id.clone());
                id
            }
        };
        let client_version = parts.version;
        let access = server.access_log.then(|| AccessHead {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            host: parts.headers.get(HOST).cloned(),
            user_agent: parts.headers.get(USER_AGENT).cloned(),
        });
        // An allowed upgrade (WebSocket) keeps its Upgrade header and goes upstream on
        // a connection of its own; the tunnel opens only if the upstream answers 101.
        let upgrade = upgrade::take(&mut parts, &server.upgrade_protocols);
        let accepts_trailers = forward::accepts_trailers(&parts.headers);
        forward::strip_hop_by_hop(&mut parts.headers);
        if accepts_trailers {
            // The one TE an HTTP/2 request may carry, and one gRPC servers require.
            parts
                .headers
                .insert(TE, HeaderValue::from_static("trailers"));
        }
        if let Some(upgrade) = &upgrade {
            upgrade.protocol.restore(&mut parts.headers);
        }
        if let Some(name) = &route.spec.override_name {
            parts.headers.remove(&name.header);
        }
        forward::to_origin_form(&mut parts.uri, &mut parts.headers);
        forward::add_via(&mut parts.headers, client_version);
        forward::set_forwarded(
            &mut parts.headers,
            &Peer {
                ip: self.conn.peer.ip(),
                ip_value: &self.conn.peer_ip_value,
                tls: self.conn.tls,
                trusted_proxies: &server.trusted_proxies,
            },
        );
        parts.version = Version::HTTP_11;
        let upstream_body = if body_is_empty(&body) {
            UpstreamBody::Empty
        } else {
            UpstreamBody::Client(ClientBody::new(body, server.client_body_timeout))
        };

        let deadline = grpc
            .then(|| crate::grpc::timeout_in(&parts.headers))
            .flatten();
        let sent = upstream
            .send(
                instance,
                Request::from_parts(parts, upstream_body),
                grpc,
                deadline,
            )
            .await;
        let (instance, result) = (sent.instance, sent.result);
        let elapsed = started.elapsed();
        for _ in 0..sent.failed_connects {
            route
                .metrics
                .side(variant)
                .record_hidden_error(ErrorKind::Connect);
        }
        // A response framed ambiguously never gets here: the HTTP/1.1 codec refuses it
        // as it reads the head (`upstream::h1::head::body_length`), and HTTP/2 has no
        // Transfer-Encoding (h2 refuses one). Nor is a 101 switching to a protocol the
        // client did not ask for passed on: its connection is dropped with it.
        let result = result.and_then(|response| {
            if response.status() == http::StatusCode::SWITCHING_PROTOCOLS
                && !upgrade::accepts(upgrade.as_ref(), response.headers())
            {
                return Err(UpstreamError::Ambiguous(
                    "101 Switching Protocols to a protocol the client did not ask for",
                ));
            }
            Ok(response)
        });
        // A response's outcome is recorded when it ends (see `outcome.rs`); a failure
        // without one, now.
        if let Err(error) = &result {
            // A request the instance's protocol cannot carry (gRPC to HTTP/1.1, an
            // upgrade to HTTP/2) is the client's to send at will: no evidence.
            let unsuitable = error.is_unsuitable();
            let outcome = match error {
                // The caller's deadline ran out first: as the instance's own
                // DEADLINE_EXCEEDED would count (a hanging canary must not hide).
                UpstreamError::DeadlineExceeded => {
                    grpc_outcome(route, crate::grpc::DEADLINE_EXCEEDED)
                }
                // The client's own body failed: counted by the status it got.
                UpstreamError::ClientBody(_) => Outcome::Status(upstream_status(error).as_u16()),
                _ if unsuitable => Outcome::Status(upstream_status(error).as_u16()),
                error => Outcome::Error(error.kind()),
            };
            let side = route.metrics.side(variant);
            side.record(outcome, elapsed);
            side.record_stream(elapsed);
            if !unsuitable {
                route
                    .windows
                    .record_in_step(variant, outcome, elapsed, evidence_step);
            }
        }

        let mut response = match result {
            Ok(response) => {
                let (mut head, mut body) = response.into_parts();
                let switching = head.status == http::StatusCode::SWITCHING_PROTOCOLS;
                let upstream_side = switching.then(|| body.take_upgraded()).flatten();
                let response_upgrade = match (upstream_side, upgrade) {
                    (Some(upstream_side), Some(client)) => {
                        self.activity.tunnel_opened();
                        // The tunnel counts as in flight to the instance until it closes.
                        let hold = (self.slot.clone(), body.take_in_flight());
                        Some(upgrade::tunnel(client, &head, upstream_side, hold))
                    }
                    _ => None,
                };
                forward::strip_hop_by_hop(&mut head.headers);
                if let Some(upgrade) = &response_upgrade {
                    upgrade.restore(&mut head.headers);
                }
                forward::add_via(&mut head.headers, head.version);
                // The client gets this proxy's own HTTP version (RFC 9110 §6.2), not an
                // HTTP/1.0 instance's, which would end its keep-alive connection.
                if head.version == Version::HTTP_10 {
                    head.version = Version::HTTP_11;
                }
                if client_version == Version::HTTP_2 {
                    forward::detach_values(&mut head.headers);
                }
                let grpc_head = (grpc
                    && head.status == http::StatusCode::OK
                    && crate::grpc::is_grpc(&head.headers))
                .then_some(&head.headers);
                let recorder = Recorder::new(
                    snapshot.clone(),
                    route_index,
                    variant,
                    evidence_step,
                    started,
                    elapsed,
                    head.status.as_u16(),
                    grpc_head,
                );
                // A gRPC call's deadline bounds the rest of the call too.
                let call_deadline = deadline
                    .filter(|_| grpc_head.is_some())
                    .map(|within| started + within);
                let body = Observed::new(body, recorder, call_deadline);
                Response::from_parts(head, ProxyBody::Upstream(body))
            }
            Err(source) => {
                tracing::warn!(
                    route = %route.spec.name,
                    upstream = upstream.name(),
                    instance = %instance.addr(),
                    error = %source,
                    "upstream request failed"
                );
                ProxyError::Upstream {
                    upstream: upstream.name().to_string(),
                    source,
                }
                .into_response_for(grpc)
            }
        };
        let headers = response.headers_mut();
        if let Some(name) = &route.spec.variant_header {
            headers.insert(name, HeaderValue::from_static(variant.as_str()));
        }
        if let (Some(key), Some(cookie)) = (&decision.new_key, &route.spec.sticky_cookie) {
            if let Ok(value) = HeaderValue::try_from(format!(
                "{cookie}={key}; Path=/; Max-Age=31536000; HttpOnly; SameSite=Lax"
            )) {
                headers.append(SET_COOKIE, value);
            }
        }
        headers.insert(&X_REQUEST_ID, request_id.clone());

        if let Some(head) = access {
            access_log::log(&AccessRecord {
                client: self.conn.peer.ip(),
                request_id: request_id.to_str().unwrap_or("-"),
                host: head
                    .uri
                    .authority()
                    .map(|a| a.as_str())
                    .or_else(|| head.host.as_ref().and_then(|v| v.to_str().ok())),
                user_agent: head.user_agent.as_ref().and_then(|v| v.to_str().ok()),
                method: head.method.as_str(),
                path: head.uri.path(),
                route: &route.spec.name,
                variant: variant.as_str(),
                bucket: decision.bucket,
                instance: Some(instance.addr()),
                status: response.status().as_u16(),
                duration: elapsed,
                bytes: response
                    .headers()
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
            });
        }
        Ok(response)
    }
}

/// What the access log needs of the request head, kept before the head goes upstream.
struct AccessHead {
    method: http::Method,
    uri: http::Uri,
    /// The Host header (a shared-buffer clone, no copy); h2's `:authority` is in `uri`.
    host: Option<HeaderValue>,
    user_agent: Option<HeaderValue>,
}

/// Where a request goes.
struct Choice<'a> {
    upstream: &'a Arc<Upstream>,
    variant: Variant,
    instance: Arc<Pool>,
}

/// The upstream, side and instance that serve a request. When no canary instance
/// takes requests, the route answers 503 at once or falls back to stable, as
/// configured; the canary's SLO window records an error only when one failed (ejected,
/// or failing its checks), not when they are only out of service (drained, in
/// maintenance, waiting for their first checks, or none resolved). When no stable
/// instance takes requests, one in service is tried anyway; with none in service, 503.
fn choose_instance(
    route: &LiveRoute,
    wanted: Variant,
    started: Instant,
) -> Result<Choice<'_>, ProxyError> {
    let (upstream, variant) = route.upstream(wanted);
    let chosen = |upstream, variant, instance: &Arc<Pool>| Choice {
        upstream,
        variant,
        instance: instance.clone(),
    };
    if let Some(instance) = upstream.pick() {
        return Ok(chosen(upstream, variant, instance));
    }
    if variant == Variant::Stable {
        return upstream
            .pick_any()
            .map(|instance| chosen(upstream, variant, instance))
            .ok_or(ProxyError::NoHealthyInstance);
    }
    let serve_stable = || {
        let (upstream, variant) = route.upstream(Variant::Stable);
        upstream
            .pick()
            .or_else(|| upstream.pick_any())
            .map(|instance| chosen(upstream, variant, instance))
            .ok_or(ProxyError::NoHealthyInstance)
    };
    // Drained, in maintenance or not yet checked: the canary is out of service, not
    // failing, and nothing is held against it.
    let outcome = Outcome::Error(ErrorKind::Connect);
    if upstream.has_failing() {
        route
            .windows
            .record(Variant::Canary, outcome, Duration::ZERO);
    }
    match route.spec.canary_unavailable {
        CanaryUnavailable::Fail => {
            route
                .metrics
                .side(Variant::Canary)
                .record(outcome, started.elapsed());
            Err(ProxyError::NoHealthyInstance)
        }
        CanaryUnavailable::Stable => serve_stable(),
    }
}

/// A fresh request ID: 128 random bits as 32 lower-case hex digits, without `format!`.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bits = fastrand::u128(..);
    let mut text = [0u8; 32];
    for (i, digit) in text.iter_mut().enumerate() {
        *digit = HEX[((bits >> (124 - 4 * i)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&text).expect("hex digits are a valid header value")
}

/// A request without a body sends none upstream (and could be rebuilt for a retry).
fn body_is_empty(body: &Incoming) -> bool {
    use http_body::Body as _;
    body.is_end_stream()
}
