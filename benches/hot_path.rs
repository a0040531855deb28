//! Micro-benchmarks of the per-request work: the split decision, route matching,
//! metrics recording and SLO window recording. `cargo bench --bench hot_path`.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue, Uri};
use splitgate::config;
use splitgate::proxy::route::{find, sort_for_matching, Matchable};
use splitgate::proxy::split::{decide, RequestView, Variant};
use splitgate::slo::RouteWindows;
use splitgate::telemetry::{Outcome, Registry, RouteMetrics};

fn route() -> config::RouteSpec {
    let text = r#"
[server]
listen = "127.0.0.1:0"
[upstreams.s]
instances = ["127.0.0.1:1"]
[upstreams.c]
instances = ["127.0.0.1:2"]
[[routes]]
name = "api"
stable = "s"
canary = "c"
canary_weight = 10
split_key = ["header:x-user-id", "cookie:session", "client_ip"]
"#;
    config::parse(Path::new("bench.toml"), text)
        .unwrap()
        .routes
        .remove(0)
}

fn split(c: &mut Criterion) {
    let route = route();
    let mut headers = HeaderMap::new();
    headers.insert("host", HeaderValue::from_static("api.example.com"));
    headers.insert("accept", HeaderValue::from_static("*/*"));
    headers.insert("x-user-id", HeaderValue::from_static("user-123456"));
    let uri = Uri::from_static("/api/items?x=1");
    let view = RequestView {
        headers: &headers,
        uri: &uri,
        client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
    };
    c.bench_function("split decision (header key)", |b| {
        b.iter(|| decide(black_box(&route), black_box(1_000), false, black_box(&view)))
    });
    let no_header = HeaderMap::new();
    let by_ip = RequestView {
        headers: &no_header,
        uri: &uri,
        client_ip: IpAddr::V4(Ipv4Addr::new(203, 0, 113, 9)),
    };
    c.bench_function("split decision (client_ip fallback)", |b| {
        b.iter(|| {
            decide(
                black_box(&route),
                black_box(1_000),
                false,
                black_box(&by_ip),
            )
        })
    });
}

struct R(config::HostMatch, String);
impl Matchable for R {
    fn host(&self) -> &config::HostMatch {
        &self.0
    }
    fn path_prefix(&self) -> &str {
        &self.1
    }
}

fn route_match(c: &mut Criterion) {
    let mut routes: Vec<R> = (0..20)
        .map(|i| R(config::HostMatch::Any, format!("/service-{i}/v1")))
        .chain([
            R(config::HostMatch::Any, "/".into()),
            R(
                config::HostMatch::Exact("shop.example".into()),
                "/cart".into(),
            ),
        ])
        .collect();
    sort_for_matching(&mut routes);
    c.bench_function("route match (22 routes)", |b| {
        b.iter(|| {
            find(
                black_box(&routes),
                black_box("api.example.com"),
                black_box("/service-7/v1/items"),
            )
        })
    });
}

fn recording(c: &mut Criterion) {
    let registry = Registry::new(&[], 1);
    let metrics = RouteMetrics::new(&registry, "api", "s", Some("c"), &[]);
    c.bench_function("metrics record (one request)", |b| {
        b.iter(|| {
            metrics.side(Variant::Canary).record(
                black_box(Outcome::Status(200)),
                black_box(Duration::from_micros(850)),
            )
        })
    });
    let windows = RouteWindows::new(None, 1);
    c.bench_function("SLO window record (one request)", |b| {
        b.iter(|| {
            windows.record(
                Variant::Canary,
                black_box(Outcome::Status(200)),
                black_box(Duration::from_micros(850)),
            )
        })
    });
}

criterion_group!(benches, split, route_match, recording);
criterion_main!(benches);
