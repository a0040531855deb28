//! The admin listener: health and readiness, Prometheus metrics, and the JSON API that
//! changes weights, trips and rollouts. Every change needs the bearer token when one is
//! configured, is a POST or PUT with a body of at most 4 KiB, and goes through the
//! single state writer.

pub mod auth;
pub mod handlers;
pub mod health;
pub mod instances;
pub mod page;
pub mod view;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::state::{Source, StateHandle};

/// Request header naming the kind of caller, recorded as the audit `source`.
pub const SOURCE_HEADER: &str = "x-splitgate-source";

pub type AdminBody = Full<Bytes>;

/// Largest admin request body.
pub const MAX_BODY: usize = 4096;

/// The admin API's view of the world.
pub struct Admin {
    pub state: StateHandle,
    /// The bearer token, when one is configured.
    pub token: Option<String>,
}

/// Serves the admin API until `shutdown` turns true.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let admin = admin.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let admin = admin.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(&admin, request).await) }
                    });
                    let _ = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(std::time::Duration::from_secs(10))
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
            _ = crate::server::stopped(&mut shutdown) => break,
        }
    }
}

/// Routes one admin request.
pub async fn handle(admin: &Admin, request: Request<Incoming>) -> Response<AdminBody> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().trim_end_matches('/');
    let segments: Vec<&str> = path.split('/').skip(1).collect();
    let state = &admin.state;
    let method = &parts.method;

    // Without a token, only requests that name this API by address; liveness and
    // readiness probes, which reveal nothing, from anywhere.
    let probe = matches!(segments.as_slice(), ["readyz"])
        || (segments.as_slice() == ["healthz"] && !health::wants_verbose(parts.uri.query()));
    if admin.token.is_none() && !probe {
        if let Err(reason) = auth::addressed_locally(&parts.headers) {
            return json_error(StatusCode::FORBIDDEN, reason);
        }
    }

    // Reads.
    match segments.as_slice() {
        [] => return only(method, &Method::GET, page::index),
        ["ui", "app.js"] => return only(method, &Method::GET, page::script),
        ["healthz"] if health::wants_verbose(parts.uri.query()) => {
            return only(method, &Method::GET, || health::verbose(state))
        }
        ["healthz"] => return only(method, &Method::GET, || text(StatusCode::OK, "ok\n")),
        ["readyz"] => {
            return only(method, &Method::GET, || {
                if state.shared.draining.load(Ordering::Relaxed) {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
                } else if state.shared.fleet.get().is_some_and(|f| !f.synced()) {
                    text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "fleet: waiting for the first read of the fleet store\n",
                    )
                } else {
                    text(StatusCode::OK, "ready\n")
                }
            })
        }
        ["metrics"] => {
            return only(method, &Method::GET, || {
                let snapshot = state.shared.snapshot.load();
                let text = state
                    .shared
                    .registry
                    .render_with_instances(&snapshot.upstreams);
                let mut response = Response::new(Full::new(Bytes::from(text)));
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                response
            })
        }
        ["admin", "routes"] => return only(method, &Method::GET, || handlers::list_routes(state)),
        ["admin", "fleet"] => return only(method, &Method::GET, || handlers::fleet(state)),
        ["admin", "freeze"] if method == Method::GET || method == Method::HEAD => {
            return handlers::freeze(state)
        }
        ["admin", "routes", name] => {
            return only(method, &Method::GET, || handlers::show_route(state, name))
        }
        ["admin", "upstreams"] => return only(method, &Method::GET, || instances::list(state)),
        ["admin", "upstreams", name] => {
            return only(method, &Method::GET, || instances::show(state, name))
        }
        ["admin", "upstreams", name, "instances", addr] => {
            return only(method, &Method::GET, || {
                instances::show_instance(state, name, addr)
            })
        }
        _ => {}
    }

    // Changes.
    let wanted = match segments.as_slice() {
        ["admin", "routes", _, "weight"]
        | ["admin", "upstreams", _, "instances", _, "state"]
        | ["admin", "freeze"] => Method::PUT,
        ["admin", "routes", _, "rollback" | "reset"]
        | ["admin", "routes", _, "rollout", _]
        | ["admin", "reload"] => Method::POST,
        _ => return json_error(StatusCode::NOT_FOUND, "no such admin endpoint"),
    };
    if *method != wanted {
        return method_not_allowed(&wanted);
    }
    // Without a token (a loopback-only admin API), a web page the operator has open
    // must still not be able to make changes: see `auth::browser_safe`.
    if admin.token.is_none() {
        if let Err(reason) = auth::browser_safe(&parts.headers) {
            return json_error(StatusCode::FORBIDDEN, reason);
        }
    }
    if let Some(token) = &admin.token {
        if !auth::authorized(&parts.headers, token) {
            let mut response =
                json_error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
            response
                .headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
            return response;
        }
    }
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return json_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "admin request bodies are limited to 4 KiB",
            )
        }
    };
    if wanted == Method::POST
        && !body.is_empty()
        && serde_json::from_slice::<serde_json::Value>(&body).is_err()
    {
        return json_error(StatusCode::BAD_REQUEST, "body must be empty or JSON");
    }
    // The deploy CLI says who it is, so the audit log can tell scripts from people.
    let source = match parts.headers.get(SOURCE_HEADER) {
        Some(value) if value == "cli" => Source::Cli,
        _ => Source::Admin,
    };
    match segments.as_slice() {
        ["admin", "routes", name, "weight"] => {
            handlers::set_weight(state, name, &body, source).await
        }
        ["admin", "routes", name, "rollback"] => handlers::rollback(state, name, source).await,
        ["admin", "freeze"] => handlers::set_freeze(state, &body, source).await,
        ["admin", "upstreams", name, "instances", addr, "state"] => {
            instances::set_state(state, name, addr, &body, source).await
        }
        ["admin", "routes", name, "reset"] => handlers::reset(state, name, source).await,
        ["admin", "routes", name, "rollout", action] => {
            handlers::rollout(state, name, action, &body, source).await
        }
        _ => handlers::reload(state, source).await,
    }
}

fn only(
    method: &Method,
    allowed: &Method,
    respond: impl FnOnce() -> Response<AdminBody>,
) -> Response<AdminBody> {
    if method == allowed || (*allowed == Method::GET && method == Method::HEAD) {
        respond()
    } else {
        method_not_allowed(allowed)
    }
}

fn method_not_allowed(allowed: &Method) -> Response<AdminBody> {
    let mut response = json_error(StatusCode::METHOD_NOT_ALLOWED, &format!("use {allowed}"));
    if let Ok(value) = HeaderValue::from_str(allowed.as_str()) {
        response.headers_mut().insert(ALLOW, value);
    }
    response
}

fn text(status: StatusCode, body: &'static str) -> Response<AdminBody> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response
}

pub fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<AdminBody> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_else(|_| b"{}".to_vec());
    bytes.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub fn json_error(status: StatusCode, message: &str) -> Response<AdminBody> {
    json_response(status, &serde_json::json!({ "error": message }))
}
