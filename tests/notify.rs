//! Webhooks (`[[notify]]`): a receiver on loopback gets a trip exactly once, signed,
//! with the evidence; a dead or slow receiver never delays a trip or a request, and
//! every delivery outcome is audited.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;

/// What a receiver got: the signature header and the body of each POST.
type Received = Arc<Mutex<Vec<(Option<String>, serde_json::Value)>>>;

/// A webhook receiver that answers 200 after `delay`.
async fn receiver(delay: Duration) -> (SocketAddr, Received) {
    let received: Received = Arc::new(Mutex::new(Vec::new()));
    let log = received.clone();
    let upstream = upstream(move |request: Request<Incoming>| {
        let log = log.clone();
        async move {
            let signature = request
                .headers()
                .get("x-splitgate-signature")
                .map(|v| v.to_str().unwrap().to_string());
            let body = request.into_body().collect().await.unwrap().to_bytes();
            tokio::time::sleep(delay).await;
            log.lock()
                .unwrap()
                .push((signature, serde_json::from_slice(&body).unwrap()));
            Response::new(full("ok"))
        }
    })
    .await;
    (upstream.addr, received)
}

fn trip(detail: &str) -> splitgate::state::Trip {
    splitgate::state::Trip {
        reason: "error_rate".into(),
        detail: detail.into(),
        at: "2026-11-27T00:00:00Z".into(),
    }
}

async fn proxy_with(name: &str, notify: &str) -> TestProxy {
    let stable = named_upstream("stable").await;
    let canary = named_upstream("canary").await;
    let dir = Arc::new(TempDir::new(name));
    let mut text = config(
        dir.path(),
        &[stable.addr],
        Some(&[canary.addr]),
        "",
        "",
        "canary_weight = 20\nsplit_key = [\"header:x-user-id\"]\n",
    );
    text.push_str(notify);
    start_proxy(dir, &text).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_reaches_the_webhook_once_signed_with_the_evidence() {
    const SECRET_ENV: &str = "SPLITGATE_TEST_WEBHOOK_SECRET_1";
    std::env::set_var(SECRET_ENV, "s3cret");
    let (hook, received) = receiver(Duration::ZERO).await;
    let mut proxy = proxy_with(
        "notify-trip",
        &format!("\n[[notify]]\nurl = \"http://{hook}/hook\"\nevents = [\"trip\", \"reset\"]\nsecret_env = \"{SECRET_ENV}\"\n"),
    )
    .await;
    // A weight change is not among this webhook's events.
    assert_eq!(
        admin(
            proxy.admin,
            "PUT",
            "/admin/routes/main/weight",
            r#"{"canary_weight": 25}"#,
            None
        )
        .await
        .0,
        http::StatusCode::OK
    );
    proxy
        .state()
        .trip("main", trip("error_rate: 40% of 50 requests (allowed 5%)"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while received.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the trip never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "exactly once: {got:?}");
    let (signature, event) = &got[0];
    assert_eq!(event["event"], "trip");
    assert_eq!(event["route"], "main");
    assert_eq!(
        (event["old_weight"].as_f64(), event["new_weight"].as_f64()),
        (Some(25.0), Some(0.0))
    );
    assert!(
        event["detail"].as_str().unwrap().contains("40% of 50"),
        "{event}"
    );
    // t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>; the body as sent is JSON.
    let signature = signature.as_deref().expect("signed");
    let (t, v1) = signature
        .strip_prefix("t=")
        .and_then(|s| s.split_once(",v1="))
        .expect("t=…,v1=…");
    let now = splitgate::timefmt::unix_ms() / 1000;
    assert!(
        now.abs_diff(t.parse::<u64>().unwrap()) < 60,
        "a fresh timestamp: {signature}"
    );
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"s3cret");
    let body = serde_json::to_vec(event).unwrap();
    let tag: Vec<u8> = (0..v1.len() / 2)
        .map(|i| u8::from_str_radix(&v1[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(&body);
    ring::hmac::verify(&key, &signed, &tag).expect("a valid signature");
    // The delivery is audited.
    let audit = std::fs::read_to_string(proxy.dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"action\":\"notification\"")
                && l.contains("\"outcome\":\"delivered\"")),
        "{audit}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_and_slow_receivers_never_delay_a_trip_or_a_request() {
    let dead = closed_port().await;
    let (slow, _) = receiver(Duration::from_secs(10)).await;
    let mut proxy = proxy_with(
        "notify-dead",
        &format!("\n[[notify]]\nurl = \"http://{dead}/\"\n\n[[notify]]\nurl = \"http://{slow}/\"\nformat = \"slack\"\n"),
    )
    .await;
    // Many events queued for both.
    for weight in [21, 22, 23, 24, 25] {
        let body = format!("{{\"canary_weight\": {weight}}}");
        admin(proxy.admin, "PUT", "/admin/routes/main/weight", &body, None).await;
    }
    let started = Instant::now();
    proxy
        .state()
        .trip("main", trip("error_rate: breach"))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the trip waited on a webhook: {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    for i in 0..50 {
        let reply = get(proxy.addr, "/", &[("x-user-id", &format!("u{i}"))]).await;
        assert!(reply.text().starts_with("stable"));
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "requests waited: {:?}",
        started.elapsed()
    );
    // The dead receiver's first event fails after its bounded retries (0.5+1+2+4 s of
    // backoff), audited with the attempts.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let audit =
            std::fs::read_to_string(proxy.dir.path().join("audit.jsonl")).unwrap_or_default();
        if let Some(line) = audit
            .lines()
            .find(|l| l.contains("\"action\":\"notification\"") && l.contains(&dead.to_string()))
        {
            assert!(
                line.contains("\"outcome\":\"failed\"") && line.contains("\"attempts\":5"),
                "{line}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no audited outcome for the dead receiver: {audit}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = get(proxy.admin, "/metrics", &[]).await.text();
    assert!(
        metrics.contains("splitgate_notifications_total{outcome=\"failed\"}"),
        "{metrics}"
    );
    proxy.shutdown().await;
}

#[test]
fn a_bad_notify_section_is_refused_with_the_field_named() {
    let dir = TempDir::new("notify-bad");
    for (section, field) in [
        ("url = \"ftp://x/\"", "notify[0].url"),
        ("url = \"http://x/\"\nformat = \"xml\"", "notify[0].format"),
        (
            "url = \"http://x/\"\nevents = [\"trip\", \"explode\"]",
            "notify[0].events[1]",
        ),
        ("url = \"http://x/\"\nevents = []", "notify[0].events"),
    ] {
        let mut text = config(
            dir.path(),
            &["127.0.0.1:1".parse().unwrap()],
            None,
            "",
            "",
            "",
        );
        text.push_str(&format!("\n[[notify]]\n{section}\n"));
        let error = splitgate::config::parse(std::path::Path::new("x.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(error.contains(field), "{section}: {error}");
    }
}
