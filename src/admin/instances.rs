//! `/admin/upstreams`: every instance with its state, health and load, and the
//! operator's state changes (ready, drain, maint).

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Response, StatusCode};
use serde::Serialize;
use serde_json::json;

use super::handlers::change_error;
use super::{json_error, json_response, AdminBody};
use crate::config::{HealthCheck, Resolve};
use crate::state::{Source, StateHandle};
use crate::upstream::{Instance, InstanceState, Upstream};

#[derive(Serialize)]
pub struct UpstreamView {
    pub name: String,
    /// `"once"` or the re-resolution interval.
    pub resolve: String,
    /// The instances as the config names them.
    pub configured: Vec<String>,
    /// `"http GET /healthz every 5s"`, or `null` without active checks.
    pub health_checks: Option<String>,
    pub instances: Vec<InstanceView>,
}

#[derive(Serialize)]
pub struct InstanceView {
    pub addr: SocketAddr,
    /// The operator's state: `ready`, `drain` or `maint`.
    pub state: InstanceState,
    /// `up`, `down` or `pending` (not yet passed its checks); `unchecked` without
    /// active checks or in maintenance.
    pub health: &'static str,
    /// Whether it gets new requests now.
    pub serving: bool,
    /// Ejected by passive health (consecutive request failures).
    pub ejected: bool,
    pub ejections: u64,
    pub consecutive_failures: u32,
    pub last_check: Option<String>,
    pub last_error: Option<String>,
    /// Requests in flight to it, on every worker (open upgrade tunnels included).
    pub in_flight: usize,
    /// Open connections to it, busy or idle, on every worker.
    pub connections: usize,
    /// With a fleet: what every replica reports of it (as last read, within seconds).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::InstanceReport>,
}

pub fn upstream_view(upstream: &Upstream) -> UpstreamView {
    let spec = &upstream.spec;
    UpstreamView {
        name: spec.name.clone(),
        resolve: match spec.resolve {
            Resolve::Once => "once".into(),
            Resolve::Every(interval) => format!("{}ms", interval.as_millis()),
            Resolve::Ttl => "ttl".into(),
        },
        configured: spec.instance_names.clone(),
        health_checks: spec.health.as_ref().map(|h| {
            let what = match &h.check {
                HealthCheck::Tcp => "tcp connect".to_string(),
                HealthCheck::Http { path, .. } => format!("http GET {path}"),
                HealthCheck::Grpc { service, .. } if service.is_empty() => {
                    "grpc health of the server".to_string()
                }
                HealthCheck::Grpc { service, .. } => format!("grpc health of {service:?}"),
            };
            format!(
                "{what} every {}ms (timeout {}ms, rise {}, fall {})",
                h.interval.as_millis(),
                h.timeout.as_millis(),
                h.rise,
                h.fall
            )
        }),
        instances: upstream
            .members()
            .iter()
            .map(|m| instance_view(upstream, m))
            .collect(),
    }
}

pub fn instance_view(upstream: &Upstream, instance: &Instance) -> InstanceView {
    let checks = upstream.checks();
    let report = instance.check_report();
    let in_flight = instance.in_flight();
    let connections = upstream
        .pools_of(instance.addr)
        .map(|pool| pool.connections())
        .sum();
    InstanceView {
        addr: instance.addr,
        state: instance.state(),
        // In maintenance nothing is checked: the last result would be stale.
        health: if checks && instance.state() != InstanceState::Maint {
            report.checked.as_str()
        } else {
            "unchecked"
        },
        serving: instance.takes_requests(checks),
        ejected: !instance.passive.is_available(),
        ejections: instance.passive.ejections(),
        consecutive_failures: report.failures,
        last_check: (report.last_check_ms > 0)
            .then(|| crate::timefmt::rfc3339(report.last_check_ms)),
        last_error: report.last_error,
        in_flight,
        connections,
        fleet: None,
    }
}

/// One instance's view, with a fleet also what every replica reports of it.
fn with_fleet(state: &StateHandle, upstream: &Upstream, instance: &Instance) -> InstanceView {
    let mut view = instance_view(upstream, instance);
    view.fleet = state
        .shared
        .fleet
        .get()
        .map(|fleet| fleet.instance_report(upstream.name(), instance.addr));
    view
}

pub fn list(state: &StateHandle) -> Response<AdminBody> {
    let snapshot = state.shared.snapshot.load();
    let upstreams: Vec<UpstreamView> = snapshot
        .upstreams
        .iter()
        .map(|u| upstream_view(u))
        .collect();
    json_response(StatusCode::OK, &json!({ "upstreams": upstreams }))
}

pub fn show(state: &StateHandle, name: &str) -> Response<AdminBody> {
    let snapshot = state.shared.snapshot.load();
    match snapshot.upstream(name) {
        Some(upstream) => json_response(StatusCode::OK, &upstream_view(upstream)),
        None => json_error(
            StatusCode::NOT_FOUND,
            &format!("no upstream named {name:?}"),
        ),
    }
}

pub fn show_instance(state: &StateHandle, name: &str, addr: &str) -> Response<AdminBody> {
    let snapshot = state.shared.snapshot.load();
    let Some(upstream) = snapshot.upstream(name) else {
        return json_error(
            StatusCode::NOT_FOUND,
            &format!("no upstream named {name:?}"),
        );
    };
    let addr = match parse_addr(addr) {
        Ok(addr) => addr,
        Err(reason) => return json_error(StatusCode::BAD_REQUEST, &reason),
    };
    match upstream.member(addr) {
        Some(instance) => json_response(StatusCode::OK, &with_fleet(state, upstream, instance)),
        None => json_error(
            StatusCode::NOT_FOUND,
            &format!("upstream {name:?} has no instance {addr}"),
        ),
    }
}

/// `PUT /admin/upstreams/{u}/instances/{addr}/state` with `{"state": "drain"}`.
pub async fn set_state(
    state: &StateHandle,
    name: &str,
    addr: &str,
    body: &Bytes,
    source: Source,
) -> Response<AdminBody> {
    let addr = match parse_addr(addr) {
        Ok(addr) => addr,
        Err(reason) => return json_error(StatusCode::BAD_REQUEST, &reason),
    };
    let wanted = match parse_state(body) {
        Ok(wanted) => wanted,
        Err(reason) => return json_error(StatusCode::BAD_REQUEST, &reason),
    };
    if let Err(error) = state.set_instance_state(name, addr, wanted, source).await {
        return change_error(error);
    }
    let snapshot = state.shared.snapshot.load();
    let Some(upstream) = snapshot.upstream(name) else {
        return show_instance(state, name, &addr.to_string());
    };
    let Some(instance) = upstream.member(addr) else {
        return show_instance(state, name, &addr.to_string());
    };
    let mut view = instance_view(upstream, instance);
    view.fleet = state
        .shared
        .fleet
        .get()
        .map(|f| f.instance_report(name, addr));
    let checks = upstream.checks();
    let others_serve = upstream
        .members()
        .iter()
        .any(|m| m.addr != addr && m.takes_requests(checks));
    let mut value = serde_json::to_value(&view).unwrap_or_default();
    if wanted != InstanceState::Ready && !others_serve {
        value["warning"] = json!(format!(
            "no other instance of {name} is serving: new requests to it get 503 until one is"
        ));
    }
    json_response(StatusCode::OK, &value)
}

/// An instance address from a path segment (`10.0.0.1:8080`, `[::1]:8080`, either
/// percent-encoded or not).
fn parse_addr(segment: &str) -> Result<SocketAddr, String> {
    let decoded = segment
        .replace("%3A", ":")
        .replace("%3a", ":")
        .replace("%5B", "[")
        .replace("%5b", "[")
        .replace("%5D", "]")
        .replace("%5d", "]");
    decoded.parse().map_err(|_| {
        format!(
            "{segment:?} is not an instance address (ip:port, as GET /admin/upstreams lists them)"
        )
    })
}

/// The `{"state": "..."}` body, or what is wrong with it.
pub fn parse_state(body: &[u8]) -> Result<InstanceState, String> {
    const FORM: &str = "the body is {\"state\": \"ready\" | \"drain\" | \"maint\"}";
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON ({e}); {FORM}"))?;
    let serde_json::Value::Object(fields) = value else {
        return Err(format!("body must be a JSON object; {FORM}"));
    };
    if let Some(unknown) = fields.keys().find(|k| *k != "state") {
        return Err(format!("unknown field {unknown:?}; {FORM}"));
    }
    let text = fields
        .get("state")
        .ok_or_else(|| format!("state: missing; {FORM}"))?;
    text.as_str()
        .and_then(InstanceState::parse)
        .ok_or_else(|| format!("state: {text} is not one of \"ready\", \"drain\", \"maint\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_bodies() {
        assert_eq!(
            parse_state(br#"{"state":"drain"}"#),
            Ok(InstanceState::Drain)
        );
        for bad in [
            &b"{}"[..],
            br#"{"state":"down"}"#,
            br#"{"state":1}"#,
            br#"["drain"]"#,
            br#"{"state":"ready","x":1}"#,
        ] {
            let error = parse_state(bad).unwrap_err();
            assert!(
                error.contains("state") || error.contains("field"),
                "{error}"
            );
        }
        assert!(parse_addr("127.0.0.1%3A80").is_ok());
        assert!(parse_addr("%5B%3A%3A1%5D%3A80").is_ok());
        assert!(parse_addr("nope").is_err());
    }
}
