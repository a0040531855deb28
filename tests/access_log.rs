//! The access log: one JSON line per request with the request ID, route, variant,
//! instance, status, duration and size, and never the user's key in clear.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::*;
use http::StatusCode;
use tracing_subscriber::fmt::MakeWriter;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test]
async fn one_json_line_per_request_without_the_user_id() {
    let captured = Captured::default();
    tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_writer(captured.clone())
        .with_env_filter("splitgate::access=info")
        .init();

    let stable = named_upstream("stable").await;
    let canary = named_upstream("canary").await;
    let dir = Arc::new(TempDir::new("access"));
    let text = config(
        dir.path(),
        &[stable.addr],
        Some(&[canary.addr]),
        "",
        "",
        "canary_weight = 50\nsplit_key = [\"header:x-user-id\"]",
    )
    .replace("access_log = false", "access_log = true");
    let proxy = start_proxy(dir, &text).await;

    let reply = get(
        proxy.addr,
        "/items/42",
        &[
            ("x-user-id", "secret-user-7"),
            ("x-request-id", "req-abc-123"),
            ("user-agent", "curl/8.5.0"),
            ("host", "shop.example.com"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["x-request-id"], "req-abc-123");
    assert!(
        reply.text().contains("x-request-id: req-abc-123"),
        "the request ID is forwarded upstream"
    );
    let generated = get(proxy.addr, "/other", &[("x-user-id", "u2")]).await;
    let generated_id = generated.headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(generated_id.len(), 32);
    assert!(generated
        .text()
        .contains(&format!("x-request-id: {generated_id}")));

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        !log.contains("secret-user-7"),
        "the user ID must never be logged:\n{log}"
    );
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{log}");
    let first = &lines[0];
    assert_eq!(first["target"], "splitgate::access");
    assert_eq!(first["level"], "INFO");
    assert_eq!(first["request_id"], "req-abc-123");
    assert_eq!(first["route"], "main");
    assert_eq!(first["path"], "/items/42");
    assert_eq!(first["status"], 200);
    assert!(first["bucket"].as_u64().unwrap() < 10_000);
    let variant = first["variant"].as_str().unwrap();
    let served_by = if variant == "canary" {
        canary.addr
    } else {
        stable.addr
    };
    assert_eq!(first["instance"], served_by.to_string());
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0);
    // Microsecond precision, no float noise.
    let duration = first["duration_ms"].to_string();
    assert!(
        duration.split('.').nth(1).is_none_or(|d| d.len() <= 3),
        "{duration}"
    );
    // What an NGINX `combined` line has: client address, Host, user agent.
    assert_eq!(first["client"], "127.0.0.1");
    assert_eq!(first["host"], "shop.example.com");
    assert_eq!(first["user_agent"], "curl/8.5.0");
    assert!(first["bytes"].as_u64().unwrap() > 0);
    assert_eq!(lines[1]["request_id"], generated_id.as_str());
}
