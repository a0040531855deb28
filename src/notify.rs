//! Webhooks (control thread): `[[notify]]` sinks told about trips, resets, weights,
//! rollout steps and instance state changes.
//!
//! The state writer hands each event over with `try_send` to a bounded queue per sink
//! and goes on: a slow or dead receiver never delays a trip or a request. One task per
//! sink delivers its queue in order, each POST bounded by a timeout and retried with
//! exponential backoff a bounded number of times; every outcome is an audit line and a
//! count in `splitgate_notifications_total{outcome}`. With a secret, the body is signed:
//! `X-Splitgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`, so a
//! receiver can check it and refuse a replay of an old timestamp.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, USER_AGENT};
use http::Request;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use metrics::Counter;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::config::{NotifySpec, UpstreamTls};
use crate::telemetry::names::{LABEL_OUTCOME, NOTIFICATIONS_TOTAL};
use crate::telemetry::Registry;
use crate::upstream::tls::UpstreamConnector;

/// Events waiting per sink; beyond, new ones are dropped (counted, logged).
const QUEUE: usize = 256;
/// Tries per event, and the bounds of each.
const ATTEMPTS: u32 = 5;
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// The sinks, each with its queue.
#[derive(Default)]
pub struct Notifier {
    sinks: Vec<Sink>,
}

struct Sink {
    events: Vec<String>,
    queue: mpsc::Sender<Arc<Value>>,
    dropped: Counter,
}

impl Notifier {
    /// Starts a delivery task per sink. Audit lines go to `audit` (the state writer, which
    /// alone holds the state directory: a binary takeover must be able to take it).
    pub(crate) fn start(
        specs: &[NotifySpec],
        registry: &Registry,
        audit: mpsc::Sender<crate::state::Command>,
    ) -> Self {
        let count = |outcome| registry.counter(NOTIFICATIONS_TOTAL, &[(LABEL_OUTCOME, outcome)]);
        let sinks = specs
            .iter()
            .map(|spec| {
                let (queue, rx) = mpsc::channel(QUEUE);
                let secret = spec.secret_env.as_ref().and_then(|name| {
                    let secret = std::env::var(name).ok().filter(|s| !s.is_empty());
                    if secret.is_none() {
                        tracing::warn!(url = %shown(&spec.url), secret_env = %name, "notify: the secret's environment variable is not set; webhooks go unsigned");
                    }
                    secret
                });
                let delivery = Delivery {
                    spec: spec.clone(),
                    secret: secret.map(|s| ring::hmac::Key::new(ring::hmac::HMAC_SHA256, s.as_bytes())),
                    tls: tls_for(&spec.url),
                    delivered: count("delivered"),
                    failed: count("failed"),
                    audit: audit.clone(),
                };
                tokio::spawn(delivery.run(rx));
                Sink {
                    events: spec.events.clone(),
                    queue,
                    dropped: count("dropped"),
                }
            })
            .collect();
        Self { sinks }
    }

    /// Queues `event` (its `event` field names it) for every sink that wants it; never
    /// waits.
    pub fn send(&self, event: Value) {
        let name = event["event"].as_str().unwrap_or_default().to_string();
        let event = Arc::new(event);
        for sink in self.sinks.iter().filter(|s| s.events.contains(&name)) {
            if sink.queue.try_send(event.clone()).is_err() {
                sink.dropped.increment(1);
                tracing::warn!(event = %name, "notify: a webhook's queue is full (its receiver is slow or down); event dropped");
            }
        }
    }
}

/// A TLS client for an https URL (the webpki roots).
fn tls_for(url: &http::Uri) -> Option<UpstreamConnector> {
    (url.scheme_str() == Some("https")).then(|| {
        UpstreamConnector::new(
            &UpstreamTls {
                server_name: url
                    .host()
                    .unwrap_or_default()
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                roots: None,
            },
            crate::config::Protocol::Http1,
        )
    })?
}

/// A URL as logs and the audit show it: scheme and authority, never the path (a Slack
/// webhook's path is its credential).
fn shown(url: &http::Uri) -> String {
    format!(
        "{}://{}/…",
        url.scheme_str().unwrap_or("?"),
        url.authority().map_or("?", |a| a.as_str())
    )
}

struct Delivery {
    spec: NotifySpec,
    secret: Option<ring::hmac::Key>,
    tls: Option<UpstreamConnector>,
    delivered: Counter,
    failed: Counter,
    audit: mpsc::Sender<crate::state::Command>,
}

impl Delivery {
    async fn run(self, mut rx: mpsc::Receiver<Arc<Value>>) {
        while let Some(event) = rx.recv().await {
            let body = Bytes::from(
                match self.spec.slack {
                    true => serde_json::to_vec(&slack(&event)),
                    false => serde_json::to_vec(&*event),
                }
                .unwrap_or_default(),
            );
            let mut backoff = FIRST_BACKOFF;
            let mut attempts = 0;
            let result = loop {
                attempts += 1;
                let tried = tokio::time::timeout(ATTEMPT_TIMEOUT, self.post(&event, body.clone()))
                    .await
                    .unwrap_or_else(|_| Err(format!("no answer within {ATTEMPT_TIMEOUT:?}")));
                match tried {
                    Ok(()) => break Ok(()),
                    // A 4xx other than 408/429 says the request is wrong: trying again
                    // would not help.
                    Err(error) if attempts >= ATTEMPTS || error.starts_with("refused") => {
                        break Err(error)
                    }
                    Err(_) => {
                        tokio::time::sleep(backoff).await;
                        backoff *= 2;
                    }
                }
            };
            let (outcome, error) = match &result {
                Ok(()) => {
                    self.delivered.increment(1);
                    ("delivered", None)
                }
                Err(error) => {
                    self.failed.increment(1);
                    tracing::warn!(url = %shown(&self.spec.url), event = %event["event"], attempts, %error, "notify: webhook not delivered");
                    ("failed", Some(error.clone()))
                }
            };
            let line = json!({
                "time": crate::timefmt::now_rfc3339(),
                "action": "notification",
                "url": shown(&self.spec.url),
                "event": event["event"],
                "route": event["route"],
                "outcome": outcome,
                "attempts": attempts,
                "error": error,
            });
            let _ = self.audit.try_send(crate::state::Command::Audit { line });
        }
    }

    /// One POST; Ok on a 2xx answer.
    async fn post(&self, event: &Value, body: Bytes) -> Result<(), String> {
        let url = &self.spec.url;
        let host = url.host().unwrap_or_default();
        let https = url.scheme_str() == Some("https");
        if https && self.tls.is_none() {
            // Never in the clear what was meant to be encrypted.
            return Err(format!("refused: no TLS client for {host}"));
        }
        let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
        let stream = TcpStream::connect((host.trim_start_matches('[').trim_end_matches(']'), port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let mut request = Request::post(url.path_and_query().map_or("/", |p| p.as_str()))
            .header(HOST, url.authority().map_or(host, |a| a.as_str()))
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("splitgate/", env!("CARGO_PKG_VERSION")))
            .header(
                "x-splitgate-event",
                event["event"].as_str().unwrap_or_default(),
            );
        if let Some(key) = &self.secret {
            request = request.header(
                "x-splitgate-signature",
                signature(key, &body, crate::timefmt::unix_ms() / 1000),
            );
        }
        let request = request.body(Full::new(body)).map_err(|e| e.to_string())?;
        let status = match &self.tls {
            None => send(TokioIo::new(stream), request).await?,
            Some(tls) => {
                let stream = tls
                    .connector
                    .connect(tls.server_name.clone(), stream)
                    .await
                    .map_err(|e| format!("tls: {e}"))?;
                send(TokioIo::new(stream), request).await?
            }
        };
        match status.as_u16() {
            200..=299 => Ok(()),
            408 | 429 | 500..=599 => Err(format!("status {status}")),
            _ => Err(format!("refused: status {status}")),
        }
    }
}

async fn send<I>(io: I, request: Request<Full<Bytes>>) -> Result<http::StatusCode, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("http: {e}"))?;
    let connection = tokio::spawn(connection);
    let response = sender.send_request(request).await;
    connection.abort();
    response
        .map(|r| r.status())
        .map_err(|e| format!("http: {e}"))
}

/// `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`.
pub fn signature(key: &ring::hmac::Key, body: &[u8], unix_s: u64) -> String {
    let mut signed = format!("{unix_s}.").into_bytes();
    signed.extend_from_slice(body);
    format!("t={unix_s},v1={}", hex_hmac(key, &signed))
}

fn hex_hmac(key: &ring::hmac::Key, data: &[u8]) -> String {
    ring::hmac::sign(key, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A Slack message: one line saying what happened, then the figures.
fn slack(event: &Value) -> Value {
    let name = event["event"].as_str().unwrap_or("event");
    let subject = match (event["route"].as_str(), event["upstream"].as_str()) {
        (Some(route), _) => format!("route *{route}*"),
        (None, Some(upstream)) => format!(
            "instance `{}` of *{upstream}*",
            event["instance"].as_str().unwrap_or("?")
        ),
        _ => "splitgate".to_string(),
    };
    let mut lines = vec![format!(":rotating_light: splitgate {name}: {subject}")];
    if let (Some(old), Some(new)) = (event["old_weight"].as_f64(), event["new_weight"].as_f64()) {
        lines.push(format!("canary weight {old}% → {new}%"));
    }
    if let (Some(old), Some(new)) = (event["old_state"].as_str(), event["new_state"].as_str()) {
        lines.push(format!("{old} → {new}"));
    }
    if let Some(detail) = event["detail"].as_str() {
        lines.push(format!("> {detail}"));
    }
    lines.push(format!(
        "by {} on {} at {}",
        event["source"].as_str().unwrap_or("?"),
        event["replica"].as_str().unwrap_or("this replica"),
        event["time"].as_str().unwrap_or("?")
    ));
    json!({ "text": lines.join("\n") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231, test case 2.
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        assert_eq!(
            hex_hmac(&key, b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let signed = signature(&key, b"{}", 1700000000);
        assert_eq!(
            signed,
            format!("t=1700000000,v1={}", hex_hmac(&key, b"1700000000.{}"))
        );
    }
}
