//! Time to verdict: how long the SLO guard takes to pull a canary that starts failing,
//! at a steady 1 000 req/s with 10 % canary, and how many requests the broken canary
//! served meanwhile. `cargo bench --bench time_to_verdict` (a few seconds);
//! under `cargo test` it runs a short smoke version.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

const RATE_PER_SEC: u64 = 1_000;
const CLIENTS: u64 = 20;

struct Scenario {
    /// Healthy canary traffic before the failure begins.
    warm: Duration,
    min_requests: u64,
}

#[tokio::main]
async fn main() {
    let full_run = std::env::args().any(|a| a == "--bench");
    let scenarios: &[(&str, Scenario)] = if full_run {
        &[
            (
                "warm window (3 s healthy first)",
                Scenario {
                    warm: Duration::from_secs(3),
                    min_requests: 50,
                },
            ),
            (
                "cold window (failing from the first request)",
                Scenario {
                    warm: Duration::ZERO,
                    min_requests: 50,
                },
            ),
        ]
    } else {
        &[(
            "smoke",
            Scenario {
                warm: Duration::from_millis(300),
                min_requests: 10,
            },
        )]
    };
    for (name, scenario) in scenarios {
        let result = run(scenario).await;
        println!(
            "{name}: weight 0 after {:.0} ms from the first bad canary response ({:.0} ms past min_requests); canary served {} failing requests meanwhile, {} requests total",
            result.to_weight_zero.as_secs_f64() * 1000.0,
            result.past_min_requests.as_secs_f64() * 1000.0,
            result.bad_served,
            result.total
        );
        assert!(result.to_weight_zero < Duration::from_secs(5), "no verdict");
    }
}

struct Outcome {
    to_weight_zero: Duration,
    past_min_requests: Duration,
    bad_served: usize,
    total: usize,
}

async fn run(scenario: &Scenario) -> Outcome {
    let stable = named_upstream("stable").await;
    let failing = Arc::new(AtomicBool::new(false));
    let bad_served = Arc::new(AtomicUsize::new(0));
    let first_bad: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let (flag, served, first) = (failing.clone(), bad_served.clone(), first_bad.clone());
    let canary = upstream(move |_req: Request<Incoming>| {
        let failing = flag.load(Ordering::SeqCst);
        if failing {
            first.get_or_init(Instant::now);
            served.fetch_add(1, Ordering::SeqCst);
        }
        async move {
            let mut response = Response::new(full("canary"));
            if failing {
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
            response
        }
    })
    .await;
    let dir = Arc::new(TempDir::new("verdict"));
    let text = config(
        dir.path(),
        &[stable.addr],
        Some(&[canary.addr]),
        "",
        "",
        &format!(
            "canary_weight = 10\nsplit_key = [\"header:x-user-id\"]\n[routes.slo]\nwindow = \"10s\"\nmin_requests = {}\nmax_error_rate = 0.05\n",
            scenario.min_requests
        ),
    );
    let proxy = start_proxy(dir, &text).await;
    let total = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client(proxy.addr, c, total.clone(), stop.clone())))
        .collect();

    tokio::time::sleep(scenario.warm).await;
    failing.store(true, Ordering::SeqCst);
    let shared = proxy.state().shared.clone();
    let mut min_reached: Option<Instant> = None;
    let weight_zero = loop {
        let snapshot = shared.snapshot.load();
        let route = snapshot.route("main").unwrap();
        if min_reached.is_none() {
            let now = route.windows.now_ms();
            if route.windows.canary.stats(now).requests >= scenario.min_requests {
                min_reached = Some(Instant::now());
            }
        }
        if route.weight_bp == 0 {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        let _ = c.await;
    }
    let first = first_bad.get().copied().unwrap_or(weight_zero);
    let min_reached = min_reached.unwrap_or(weight_zero).max(first);
    Outcome {
        to_weight_zero: weight_zero - first,
        past_min_requests: weight_zero - min_reached,
        bad_served: bad_served.load(Ordering::SeqCst),
        total: total.load(Ordering::SeqCst),
    }
}

/// One keep-alive connection sending at RATE_PER_SEC / CLIENTS, with random user IDs.
async fn client(
    addr: std::net::SocketAddr,
    id: u64,
    total: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 * CLIENTS / RATE_PER_SEC));
    let mut n = 0u64;
    while !stop.load(Ordering::SeqCst) {
        tick.tick().await;
        n += 1;
        let user = format!("user-{id}-{}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40);
        let request = Request::get("/")
            .header("host", "bench")
            .header("x-user-id", user)
            .body(full(""))
            .unwrap();
        let Ok(response) = sender.send_request(request).await else {
            break;
        };
        let _ = response.into_body().collect().await;
        total.fetch_add(1, Ordering::SeqCst);
    }
}
