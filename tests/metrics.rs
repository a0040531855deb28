//! Metrics through a real scrape: known traffic in, exact counts out, parsed by a
//! Prometheus text-format parser.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use prometheus_parse::{Sample, Scrape, Value};

fn labels_match(sample: &Sample, want: &[(&str, &str)]) -> bool {
    want.iter().all(|(k, v)| sample.labels.get(k) == Some(*v))
}

fn value(scrape: &Scrape, name: &str, want: &[(&str, &str)]) -> f64 {
    let found: Vec<&Sample> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels_match(s, want))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "expected one {name}{want:?}, found {}",
        found.len()
    );
    match &found[0].value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{name} is not a plain value: {other:?}"),
    }
}

fn histogram_count(scrape: &Scrape, name: &str, want: &[(&str, &str)]) -> (f64, Vec<f64>) {
    let sample = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels_match(s, want))
        .unwrap_or_else(|| panic!("no histogram {name}{want:?}"));
    match &sample.value {
        Value::Histogram(buckets) => (
            buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map_or(buckets.last().unwrap().count, |b| b.count),
            buckets.iter().map(|b| b.less_than).collect(),
        ),
        other => panic!("{name} is not a histogram: {other:?}"),
    }
}

#[tokio::test]
async fn known_traffic_gives_exact_counts() {
    let stable = named_upstream("stable").await;
    let canary = named_upstream("canary").await;
    let closed = closed_port().await;
    let slow = slow_upstream(Duration::from_secs(10), "late").await;
    let dir = Arc::new(TempDir::new("metrics"));
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"
access_log = false
[admin]
listen = "127.0.0.1:0"
[state]
dir = "{state}"
[upstreams.v1]
instances = ["{stable}"]
[upstreams.v2]
instances = ["{canary}"]
[upstreams.gone]
instances = ["{closed}"]
[upstreams.slow]
instances = ["{slow}"]
response_timeout = "200ms"
[[routes]]
name = "main"
stable = "v1"
canary = "v2"
canary_weight = 12.5
override_enabled = true
[[routes]]
name = "broken"
path_prefix = "/broken"
stable = "gone"
[[routes]]
name = "sluggish"
path_prefix = "/slow"
stable = "slow"
"#,
        state = dir.path().display(),
        stable = stable.addr,
        canary = canary.addr,
        slow = slow.addr,
    );
    let proxy = start_proxy(dir, &text).await;
    let (n, m, k) = (7, 5, 3);
    for _ in 0..n {
        assert_eq!(
            get(proxy.addr, "/", &[("x-splitgate-variant", "stable")])
                .await
                .status,
            StatusCode::OK
        );
    }
    for _ in 0..m {
        assert_eq!(
            get(proxy.addr, "/", &[("x-splitgate-variant", "canary")])
                .await
                .status,
            StatusCode::OK
        );
    }
    for _ in 0..k {
        assert_eq!(
            get(proxy.addr, "/broken", &[]).await.status,
            StatusCode::BAD_GATEWAY
        );
    }
    assert_eq!(
        get(proxy.addr, "/slow", &[]).await.status,
        StatusCode::GATEWAY_TIMEOUT
    );

    let reply = get(proxy.admin, "/metrics", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let lines: Vec<std::io::Result<String>> =
        reply.text().lines().map(|l| Ok(l.to_string())).collect();
    let scrape = Scrape::parse(lines.into_iter()).expect("valid Prometheus text format");

    let req = "splitgate_requests_total";
    let main_stable = [("route", "main"), ("upstream", "v1"), ("variant", "stable")];
    let main_canary = [("route", "main"), ("upstream", "v2"), ("variant", "canary")];
    assert_eq!(
        value(
            &scrape,
            req,
            &[
                main_stable[0],
                main_stable[1],
                main_stable[2],
                ("code", "2xx")
            ]
        ),
        n as f64
    );
    assert_eq!(
        value(
            &scrape,
            req,
            &[
                main_canary[0],
                main_canary[1],
                main_canary[2],
                ("code", "2xx")
            ]
        ),
        m as f64
    );
    assert_eq!(
        value(&scrape, req, &[("route", "broken"), ("code", "error")]),
        k as f64
    );
    assert_eq!(
        value(&scrape, req, &[("route", "sluggish"), ("code", "error")]),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            req,
            &[
                main_stable[0],
                main_stable[1],
                main_stable[2],
                ("code", "5xx")
            ]
        ),
        0.0
    );

    let errors = "splitgate_upstream_errors_total";
    assert_eq!(
        value(
            &scrape,
            errors,
            &[
                ("route", "broken"),
                ("upstream", "gone"),
                ("kind", "connect")
            ]
        ),
        k as f64
    );
    assert_eq!(
        value(
            &scrape,
            errors,
            &[
                ("route", "sluggish"),
                ("upstream", "slow"),
                ("kind", "timeout")
            ]
        ),
        1.0
    );
    assert_eq!(
        value(
            &scrape,
            errors,
            &[("route", "main"), ("upstream", "v1"), ("kind", "reset")]
        ),
        0.0
    );

    let duration = "splitgate_request_duration_seconds";
    let (count, bounds) = histogram_count(&scrape, duration, &main_stable);
    assert_eq!(count, n as f64);
    assert_eq!(bounds.first(), Some(&0.001));
    assert!(bounds.contains(&10.0));
    assert_eq!(histogram_count(&scrape, duration, &main_canary).0, m as f64);
    assert_eq!(
        histogram_count(&scrape, duration, &[("route", "broken")]).0,
        k as f64
    );

    assert_eq!(
        value(&scrape, "splitgate_canary_weight", &[("route", "main")]),
        12.5
    );
    assert_eq!(
        value(&scrape, "splitgate_slo_state", &[("route", "main")]),
        0.0
    );
    assert!(value(&scrape, "splitgate_connections", &[("listener", "http")]) >= 0.0);

    // Every label value is bounded: no paths, no user IDs; instances only as configured.
    let instances: Vec<String> = [stable.addr, canary.addr, closed, slow.addr]
        .iter()
        .map(|a| a.to_string())
        .collect();
    let allowed: HashMap<&str, Vec<&str>> = HashMap::from([
        ("address", instances.iter().map(String::as_str).collect()),
        ("route", vec!["main", "broken", "sluggish"]),
        ("upstream", vec!["v1", "v2", "gone", "slow"]),
        ("variant", vec!["stable", "canary"]),
        (
            "code",
            vec![
                "1xx",
                "2xx",
                "3xx",
                "4xx",
                "5xx",
                "error",
                "grpc_ok",
                "grpc_error",
            ],
        ),
        ("kind", vec!["connect", "timeout", "reset", "protocol"]),
        ("listener", vec!["http", "https"]),
        ("outcome", vec!["ok", "error"]),
    ]);
    for sample in &scrape.samples {
        for (key, val) in sample.labels.iter() {
            if key == "le" || key == "quantile" {
                continue;
            }
            let ok = allowed
                .get(key.as_str())
                .is_some_and(|vals| vals.contains(&val.as_str()));
            assert!(ok, "{} has unexpected label {key}={val}", sample.metric);
        }
    }
}

/// Every family has `# HELP` and `# TYPE` (`promtool check metrics` fails without).
#[tokio::test]
async fn every_family_has_help_and_type() {
    let (proxy, _, _) = split_proxy("metrics-help", "", "").await;
    get(proxy.addr, "/", &[("x-user-id", "a")]).await;
    let text = get(proxy.admin, "/metrics", &[]).await.text();
    let typed: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(typed.len() >= 6, "{text}");
    for name in typed {
        assert!(
            text.lines()
                .any(|l| l.starts_with(&format!("# HELP {name} ")) && l.len() > name.len() + 10),
            "no HELP for {name}:\n{text}"
        );
    }
}

/// The p99 a PromQL query reads agrees with the guard on which side of each configured
/// threshold the canary is: every route's latency limit and every alert threshold is a
/// bucket boundary, with at least four buckets per decade from 1 ms to 10 s.
#[tokio::test]
async fn every_latency_threshold_is_a_bucket_boundary() {
    let route = "[routes.slo]\nmax_p99_latency = \"606ms\"\n";
    let (proxy, _, _) = split_proxy("metrics-buckets", "", route).await;
    get(proxy.addr, "/", &[("x-user-id", "a")]).await;
    let text = get(proxy.admin, "/metrics", &[]).await.text();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    let (_, bounds) = histogram_count(
        &scrape,
        "splitgate_request_duration_seconds",
        &[("variant", "stable")],
    );
    for threshold in [0.606, 0.8] {
        assert!(bounds.contains(&threshold), "{threshold} not in {bounds:?}");
    }
    for decade in [0.001, 0.01, 0.1, 1.0] {
        let inside = bounds
            .iter()
            .filter(|b| **b > decade && **b <= decade * 10.0)
            .count();
        assert!(inside >= 4, "{inside} buckets above {decade}: {bounds:?}");
    }
    assert_eq!(bounds.iter().copied().fold(f64::NAN, f64::min), 0.001);
}

/// The thresholds in the shipped `config/alerts.yml` are the ones the registry makes
/// boundaries of.
#[test]
fn alert_latency_thresholds_match_the_shipped_rules() {
    let text = std::fs::read_to_string("config/alerts.yml").unwrap();
    let docs = yaml_rust::YamlLoader::load_from_str(&text).unwrap();
    let mut found = Vec::new();
    for rule in docs[0]["groups"][0]["rules"].as_vec().unwrap() {
        let expr = rule["expr"].as_str().unwrap();
        if !expr.contains("splitgate_request_duration_seconds_bucket") {
            continue;
        }
        let threshold: f64 = expr.rsplit('>').next().unwrap().trim().parse().unwrap();
        found.push(threshold);
    }
    assert!(!found.is_empty());
    assert_eq!(
        found,
        splitgate::telemetry::names::ALERT_LATENCY_THRESHOLDS,
        "update ALERT_LATENCY_THRESHOLDS with config/alerts.yml"
    );
}

/// A state write that fails refuses the change, logs an error, and counts in
/// `splitgate_state_persist_failures_total` (an alert watches it).
#[tokio::test]
async fn a_failed_state_write_refuses_the_change_and_is_counted() {
    let (proxy, _, _) = split_proxy("metrics-persist", "", "").await;
    // A directory where the temp file goes makes the next write fail, even as root.
    std::fs::create_dir(proxy.dir.path().join("state.json.tmp")).unwrap();
    let (status, body) = admin(
        proxy.admin,
        "PUT",
        "/admin/routes/main/weight",
        r#"{"canary_weight": 40}"#,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("could not persist"),
        "{body}"
    );
    let text = get(proxy.admin, "/metrics", &[]).await.text();
    let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
    assert_eq!(
        value(&scrape, "splitgate_state_persist_failures_total", &[]),
        1.0
    );
    assert_eq!(
        value(&scrape, "splitgate_canary_weight", &[("route", "main")]),
        10.0,
        "nothing changed"
    );
}

/// `splitgate_connections` counts open client connections across every worker: up
/// while they are open (idle in keep-alive, here), back to 0 once they close.
#[tokio::test]
async fn the_connections_gauge_counts_open_connections_on_every_worker() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (proxy, _stable, _canary) = split_proxy("connections", "workers = 2", "").await;
    let open = |proxy: &TestProxy| {
        let admin = proxy.admin;
        async move {
            let text = get(admin, "/metrics", &[]).await.text();
            let scrape = Scrape::parse(text.lines().map(|l| Ok(l.to_string()))).unwrap();
            value(&scrape, "splitgate_connections", &[("listener", "http")])
        }
    };
    let mut clients = Vec::new();
    for _ in 0..6 {
        let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        stream.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 200");
        clients.push(stream);
    }
    assert_eq!(open(&proxy).await, 6.0);
    drop(clients);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while open(&proxy).await != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "connections still counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
