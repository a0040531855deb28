//! The SLO guard: verdicts from the rolling windows, trips through the state writer, and
//! progressive rollouts. Window contents are recorded directly where the test is about
//! the verdict, and through real traffic where it is about the whole path.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::StatusCode;
use splitgate::proxy::split::Variant;
use splitgate::slo::guard;
use splitgate::telemetry::Outcome;
use splitgate::upstream::ErrorKind;

const SLO: &str = "[routes.slo]\nwindow = \"30s\"\nmin_requests = 50\nmax_error_rate = 0.05\nmax_p99_latency = \"800ms\"\n";

async fn setup(route_extra: &str) -> (TestProxy, TestUpstream, TestUpstream) {
    split_proxy("slo", "", route_extra).await
}

/// Records `count` requests on one side of route `main`.
fn record(
    proxy: &TestProxy,
    variant: Variant,
    count: usize,
    error_every: usize,
    latency: impl Fn(usize) -> Duration,
) {
    let snapshot = proxy.state().shared.snapshot.load_full();
    let route = snapshot.route("main").unwrap();
    for i in 0..count {
        let outcome = if error_every > 0 && i % error_every == 0 {
            Outcome::Status(503)
        } else {
            Outcome::Status(200)
        };
        route.windows.record(variant, outcome, latency(i));
    }
}

async fn evaluate(proxy: &TestProxy) {
    let snapshot = proxy.state().shared.snapshot.load_full();
    guard::evaluate(proxy.state(), &snapshot).await;
}

async fn route_state(proxy: &TestProxy) -> serde_json::Value {
    admin(proxy.admin, "GET", "/admin/routes/main", "", None)
        .await
        .1
}

#[tokio::test]
async fn a_canary_returning_500s_is_pulled_end_to_end() {
    let stable = named_upstream("stable").await;
    let failing = failing_upstream().await;
    let dir = Arc::new(TempDir::new("slo-e2e"));
    let text = config(
        dir.path(),
        &[stable.addr],
        Some(&[failing.addr]),
        "",
        "",
        "canary_weight = 50\nsplit_key = [\"header:x-user-id\"]\n[routes.slo]\nwindow = \"10s\"\nmin_requests = 20\nmax_error_rate = 0.1\n",
    );
    let proxy = start_proxy(dir.clone(), &text).await;
    let mut canary_served = 0;
    for i in 0..400 {
        let reply = get(proxy.addr, "/", &[("x-user-id", &format!("user-{i}"))]).await;
        if reply.headers["x-splitgate-variant"] == "canary" {
            canary_served += 1;
        }
        if route_state(&proxy).await["canary_weight"] == 0.0 {
            break;
        }
    }
    assert!(
        canary_served >= 20,
        "the guard judged before min_requests ({canary_served})"
    );
    // The guard runs every 250 ms; give it a generous bound.
    let state = wait_for(&proxy, "the trip", |s| s["slo"]["state"] == "tripped").await;
    assert_eq!(state["slo"]["state"], "tripped", "{state}");
    assert_eq!(state["slo"]["reason"], "error_rate");
    assert_eq!(state["canary_weight"], 0.0);
    // From now on every user gets stable.
    for i in 0..50 {
        let reply = get(proxy.addr, "/", &[("x-user-id", &format!("user-{i}"))]).await;
        assert_eq!(reply.headers["x-splitgate-variant"], "stable");
    }
    let metrics = get(proxy.admin, "/metrics", &[]).await.text();
    assert!(
        metrics.contains("splitgate_slo_trips_total{route=\"main\",reason=\"error_rate\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("splitgate_slo_state{route=\"main\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("splitgate_canary_weight{route=\"main\"} 0"),
        "{metrics}"
    );
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let trip = audit
        .lines()
        .find(|l| l.contains("\"action\":\"trip\""))
        .expect("a trip line");
    assert!(
        trip.contains("\"source\":\"slo\"")
            && trip.contains("error_rate:")
            && trip.contains("errors ("),
        "{trip}"
    );
}

#[tokio::test]
async fn a_slow_canary_trips_on_p99() {
    let (proxy, _, _) = setup(SLO).await;
    record(&proxy, Variant::Stable, 500, 0, |_| {
        Duration::from_millis(20)
    });
    record(&proxy, Variant::Canary, 100, 0, |i| {
        Duration::from_millis(if i % 50 == 0 { 5 } else { 1_200 })
    });
    evaluate(&proxy).await;
    let state = route_state(&proxy).await;
    assert_eq!(
        (
            state["slo"]["reason"].as_str(),
            state["canary_weight"].as_f64()
        ),
        (Some("p99_latency"), Some(0.0))
    );
}

#[tokio::test]
async fn below_min_requests_nothing_trips() {
    let (proxy, _, _) = setup(SLO).await;
    record(&proxy, Variant::Canary, 49, 1, |_| Duration::from_secs(3));
    for _ in 0..5 {
        evaluate(&proxy).await;
    }
    let state = route_state(&proxy).await;
    assert_eq!(
        (
            state["slo"]["state"].as_str(),
            state["canary_weight"].as_f64()
        ),
        (Some("ok"), Some(10.0))
    );
    // One more request reaches min_requests, and the verdict comes.
    record(&proxy, Variant::Canary, 1, 1, |_| Duration::from_secs(3));
    evaluate(&proxy).await;
    assert_eq!(route_state(&proxy).await["slo"]["state"], "tripped");
}

#[tokio::test]
async fn a_healthy_canary_never_trips_under_jitter() {
    let (proxy, _, _) = setup(SLO).await;
    // Deterministic jitter: latencies spread over 1–700 ms, 2 % errors.
    let mut seed: u64 = 7;
    let mut jitter = move || {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        Duration::from_millis(1 + (seed >> 33) % 700)
    };
    for _ in 0..20 {
        let latencies: Vec<Duration> = (0..500).map(|_| jitter()).collect();
        record(&proxy, Variant::Canary, 500, 50, |i| latencies[i]);
        record(&proxy, Variant::Stable, 500, 50, |i| latencies[i]);
        evaluate(&proxy).await;
    }
    let state = route_state(&proxy).await;
    assert_eq!(state["slo"]["state"], "ok", "{state}");
    assert_eq!(state["window"]["canary"]["requests"], 10_000);
}

#[tokio::test]
async fn the_relative_rule_ignores_a_shared_outage() {
    let relative =
        "[routes.slo]\nmin_requests = 50\nmax_error_rate = 0.05\nmax_error_rate_increase = 0.05\n";
    let (proxy, _, _) = setup(relative).await;
    // Both sides fail half their requests: a shared outage, not a bad canary.
    record(&proxy, Variant::Stable, 1_000, 2, |_| {
        Duration::from_millis(5)
    });
    record(&proxy, Variant::Canary, 100, 2, |_| {
        Duration::from_millis(5)
    });
    evaluate(&proxy).await;
    assert_eq!(route_state(&proxy).await["slo"]["state"], "ok");

    // Only the canary fails: that trips.
    let (proxy, _, _) = setup(relative).await;
    record(&proxy, Variant::Stable, 1_000, 0, |_| {
        Duration::from_millis(5)
    });
    record(&proxy, Variant::Canary, 100, 2, |_| {
        Duration::from_millis(5)
    });
    evaluate(&proxy).await;
    assert_eq!(route_state(&proxy).await["slo"]["state"], "tripped");
}

#[tokio::test]
async fn transport_errors_count_and_4xx_do_not_by_default() {
    let (proxy, _, _) = setup(SLO).await;
    let snapshot = proxy.state().shared.snapshot.load_full();
    let route = snapshot.route("main").unwrap();
    for _ in 0..100 {
        route.windows.record(
            Variant::Canary,
            Outcome::Status(404),
            Duration::from_millis(5),
        );
    }
    evaluate(&proxy).await;
    assert_eq!(route_state(&proxy).await["slo"]["state"], "ok");
    for _ in 0..40 {
        route.windows.record(
            Variant::Canary,
            Outcome::Error(ErrorKind::Reset),
            Duration::from_millis(5),
        );
    }
    evaluate(&proxy).await;
    assert_eq!(route_state(&proxy).await["slo"]["reason"], "error_rate");
}

const ROLLOUT: &str = "[routes.slo]\nmin_requests = 5\nmax_error_rate = 0.05\n[routes.rollout]\nsteps = [10, 50, 100]\ninterval = \"1s\"\n";

/// Feeds healthy canary traffic into the window until the returned handle is dropped.
fn keep_healthy(proxy: &TestProxy) -> tokio::task::JoinHandle<()> {
    let shared = proxy.state().shared.clone();
    tokio::spawn(async move {
        loop {
            let snapshot = shared.snapshot.load_full();
            let route = snapshot.route("main").unwrap();
            route.windows.record(
                Variant::Canary,
                Outcome::Status(200),
                Duration::from_millis(3),
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

async fn wait_for(
    proxy: &TestProxy,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    wait_for_route(proxy.admin, Duration::from_secs(10), what, check).await
}

#[tokio::test]
async fn a_rollout_walks_its_steps_while_the_slo_holds() {
    let (proxy, _, _) = setup(ROLLOUT).await;
    let (status, body) = admin(
        proxy.admin,
        "POST",
        "/admin/routes/main/rollout/start",
        "",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        (
            body["canary_weight"].as_f64(),
            body["rollout"]["step"].as_u64()
        ),
        (Some(10.0), Some(1)),
        "steps are 1-based, as in the metric"
    );
    assert_eq!(body["rollout"]["state"], "running", "{body}");

    // Without samples, the step is held past its interval, and says what it waits for.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let held = route_state(&proxy).await;
    assert_eq!(held["canary_weight"], 10.0);
    let waiting = held["rollout"]["waiting_for"].as_str().unwrap_or_default();
    assert_eq!(held["rollout"]["state"], "waiting", "{held}");
    assert!(
        waiting.starts_with("error_rate: inconclusive") && waiting.contains("more requests"),
        "{held}"
    );

    let feeder = keep_healthy(&proxy);
    wait_for(&proxy, "step 2 (50 %)", |s| s["canary_weight"] == 50.0).await;
    let metrics = get(proxy.admin, "/metrics", &[]).await.text();
    assert!(
        metrics.contains("splitgate_rollout_step{route=\"main\"} 2"),
        "{metrics}"
    );
    let done = wait_for(&proxy, "the rollout to finish at 100 %", |s| {
        s["rollout"]["running"] == false
    })
    .await;
    feeder.abort();
    assert_eq!(done["canary_weight"], 100.0);
    assert_eq!(done["rollout"]["state"], "completed", "{done}");
    assert_eq!(done["rollout"]["last"]["step"], 3, "{done}");
    let metrics = get(proxy.admin, "/metrics", &[]).await.text();
    assert!(
        metrics.contains("splitgate_canary_weight{route=\"main\"} 100"),
        "{metrics}"
    );
    assert!(
        metrics.contains("splitgate_rollout_step{route=\"main\"} 0"),
        "{metrics}"
    );
}

#[tokio::test]
async fn pause_holds_a_rollout_and_a_trip_aborts_it_at_zero() {
    let (proxy, _, _) = setup(ROLLOUT).await;
    admin(
        proxy.admin,
        "POST",
        "/admin/routes/main/rollout/start",
        "",
        None,
    )
    .await;
    let (status, body) = admin(
        proxy.admin,
        "POST",
        "/admin/routes/main/rollout/pause",
        "",
        None,
    )
    .await;
    assert_eq!(
        (status, body["rollout"]["paused"].as_bool()),
        (StatusCode::OK, Some(true))
    );
    let feeder = keep_healthy(&proxy);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        route_state(&proxy).await["canary_weight"],
        10.0,
        "a paused rollout must not advance"
    );
    admin(
        proxy.admin,
        "POST",
        "/admin/routes/main/rollout/resume",
        "",
        None,
    )
    .await;
    wait_for(&proxy, "step 2", |s| s["canary_weight"] == 50.0).await;
    feeder.abort();

    record(&proxy, Variant::Canary, 200, 1, |_| {
        Duration::from_millis(3)
    });
    let state = wait_for(&proxy, "the trip", |s| s["slo"]["state"] == "tripped").await;
    assert_eq!(state["canary_weight"], 0.0);
    assert_eq!(state["rollout"]["running"], false);
    let (status, _) = admin(
        proxy.admin,
        "POST",
        "/admin/routes/main/rollout/start",
        "",
        None,
    )
    .await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "a tripped route cannot start a rollout"
    );
}

/// `reset` clears the canary's evidence with the trip: the samples that tripped the
/// route must not trip it again (the README walkthrough's last step, and any deploy
/// script doing `reset && weight`).
#[tokio::test]
async fn a_reset_route_never_retrips_on_samples_from_before_the_reset() {
    let (proxy, _, _) = setup(SLO).await;
    record(&proxy, Variant::Canary, 100, 2, |_| {
        Duration::from_millis(5)
    });
    evaluate(&proxy).await;
    assert_eq!(route_state(&proxy).await["slo"]["state"], "tripped");

    let (status, _) = admin(proxy.admin, "POST", "/admin/routes/main/reset", "", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = admin(
        proxy.admin,
        "PUT",
        "/admin/routes/main/weight",
        r#"{"canary_weight": 50}"#,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for _ in 0..4 {
        evaluate(&proxy).await;
    }
    let state = route_state(&proxy).await;
    assert_eq!(state["slo"]["state"], "ok", "{state}");
    assert_eq!(state["canary_weight"], 50.0);
    assert_eq!(state["window"]["canary"]["requests"], 0);
}

/// An upstream whose `n`-th request (from 0) fails with 500 when `fails(n)`.
async fn patterned_upstream(fails: fn(usize) -> bool) -> TestUpstream {
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    upstream(move |_request| {
        let n = seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            let mut response = http::Response::new(full("canary"));
            if fails(n) {
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
            response
        }
    })
    .await
}

/// The low-traffic scenario that tripped healthy canaries on noise: four routes at
/// 50 %, `window = "10s"`, `min_requests = 20`, `max_error_rate = 0.05`. Three
/// canaries fail 2.5 % of requests (half the limit) and must not trip; one fails 30 %
/// and must, after at most 15 failures. Real sockets, the real guard.
#[tokio::test]
async fn low_traffic_healthy_canaries_do_not_trip_and_a_broken_one_does() {
    let stable = named_upstream("stable").await;
    let healthy = |n: usize| n % 40 == 39;
    let broken = |n: usize| n % 10 < 3;
    let canaries = [
        patterned_upstream(healthy).await,
        patterned_upstream(healthy).await,
        patterned_upstream(healthy).await,
        patterned_upstream(broken).await,
    ];
    let dir = Arc::new(TempDir::new("slo-low-traffic"));
    let mut text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\naccess_log = false\n[admin]\nlisten = \"127.0.0.1:0\"\n[state]\ndir = \"{}\"\n[upstreams.stable]\ninstances = [\"{}\"]\n",
        dir.path().display(),
        stable.addr
    );
    for (i, canary) in canaries.iter().enumerate() {
        text.push_str(&format!(
            "[upstreams.canary{i}]\ninstances = [\"{}\"]\n",
            canary.addr
        ));
    }
    for i in 0..canaries.len() {
        text.push_str(&format!(
            "[[routes]]\nname = \"r{i}\"\npath_prefix = \"/r{i}\"\nstable = \"stable\"\ncanary = \"canary{i}\"\ncanary_weight = 50\nsplit_key = [\"header:x-user-id\"]\n[routes.slo]\nwindow = \"10s\"\nmin_requests = 20\nmax_error_rate = 0.05\n"
        ));
    }
    let proxy = start_proxy(dir, &text).await;
    // About 150 canary requests per route, paced at ~30 requests/s per route so that
    // the guard (every 250 ms) looks at every few of them, as at low traffic.
    for round in 0..300 {
        for route in 0..canaries.len() {
            let path = format!("/r{route}");
            get(proxy.addr, &path, &[("x-user-id", &format!("u{round}"))]).await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    tokio::time::sleep(Duration::from_millis(600)).await;
    let state = |name: &'static str| async move {
        let (_, body) = admin(
            proxy.admin,
            "GET",
            &format!("/admin/routes/{name}"),
            "",
            None,
        )
        .await;
        body
    };
    for name in ["r0", "r1", "r2"] {
        let route = state(name).await;
        assert_eq!(route["slo"]["state"], "ok", "{route}");
        let served = route["slo"]["rules"][0]["samples"].as_u64().unwrap();
        assert!(
            served >= 100,
            "too little canary traffic to mean anything: {route}"
        );
    }
    let route = state("r3").await;
    assert_eq!(route["slo"]["state"], "tripped", "{route}");
    assert_eq!(route["slo"]["reason"], "error_rate");
    let detail = route["slo"]["detail"].as_str().unwrap();
    let failures: u64 = detail
        .split_once(": ")
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no failure count in {detail:?}"));
    assert!(
        failures <= 15,
        "tripped only after {failures} failures: {detail}"
    );
}

/// A canary that goes bad half an hour into a long step is caught on recent evidence,
/// not drowned by its healthy start. The guard's clock is paused and driven by hand.
#[tokio::test(start_paused = true)]
async fn a_canary_that_goes_bad_late_in_a_long_step_is_caught() {
    let (proxy, _, _) =
        setup("[routes.slo]\nwindow = \"5m\"\nmin_requests = 20\nmax_error_rate = 0.05\n").await;
    let snapshot = proxy.state().shared.snapshot.load_full();
    let route = snapshot.route("main").unwrap();
    // Records one second of traffic: 4 canary requests; returns how many failed.
    let record = |served: &mut usize, bad: fn(usize) -> bool| {
        let mut failed = 0;
        for _ in 0..4 {
            let fails = bad(*served);
            *served += 1;
            failed += usize::from(fails);
            let status = if fails { 500 } else { 200 };
            route.windows.record(
                Variant::Canary,
                Outcome::Status(status),
                Duration::from_millis(5),
            );
        }
        failed
    };
    let mut served = 0;
    // 30 minutes at 4 canary requests/s, 2.5 % errors.
    for _ in 0..1800 {
        record(&mut served, |n| n % 40 == 39);
        tokio::time::advance(Duration::from_secs(1)).await;
        evaluate(&proxy).await;
    }
    assert_eq!(route_state(&proxy).await["slo"]["state"], "ok");
    // Then 30 % errors, until the judge pulls it.
    let mut failures = 0;
    for second in 0..600 {
        failures += record(&mut served, |n| n % 10 < 3);
        tokio::time::advance(Duration::from_secs(1)).await;
        evaluate(&proxy).await;
        if route_state(&proxy).await["slo"]["state"] == "tripped" {
            assert!(
                failures <= 25,
                "caught after {failures} failures ({second} s)"
            );
            return;
        }
    }
    panic!("a canary failing 30 % for 10 minutes was never tripped");
}

/// `dry_run` judges, counts and shows a breach, but never trips.
#[tokio::test]
async fn a_dry_run_reports_a_breach_without_tripping() {
    let (proxy, _, _) =
        setup("[routes.slo]\ndry_run = true\nmin_requests = 20\nmax_error_rate = 0.05\n").await;
    record(&proxy, Variant::Canary, 100, 2, |_| {
        Duration::from_millis(5)
    });
    evaluate(&proxy).await;
    let state = route_state(&proxy).await;
    assert_eq!(state["slo"]["state"], "ok", "{state}");
    assert_eq!(state["slo"]["dry_run"], true);
    assert_eq!(state["slo"]["rules"][0]["verdict"], "breach", "{state}");
    assert_eq!(state["canary_weight"], 10.0);
    let metrics = get(proxy.admin, "/metrics", &[]).await.text();
    assert!(
        metrics.contains("splitgate_slo_verdict{route=\"main\",rule=\"error_rate\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("splitgate_slo_breaches_total{route=\"main\",rule=\"error_rate\"} 1"),
        "{metrics}"
    );
}

/// What the operator sees per rule: verdict, rate, interval, samples, samples needed;
/// and `splitgate status` prints it.
#[tokio::test]
async fn each_rule_shows_its_evidence_in_the_api_and_the_cli() {
    let (proxy, _, _) = setup(
        "[routes.slo]\nmin_requests = 20\nmax_error_rate = 0.05\nmax_latency = { quantile = 0.95, limit = \"800ms\" }\n",
    )
    .await;
    record(&proxy, Variant::Canary, 41, 20, |_| {
        Duration::from_millis(5)
    });
    evaluate(&proxy).await;
    let state = route_state(&proxy).await;
    let rules = state["slo"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 2, "{state}");
    let error_rate = &rules[0];
    assert_eq!(error_rate["rule"], "error_rate");
    assert_eq!(error_rate["verdict"], "inconclusive");
    assert_eq!(
        (error_rate["samples"].as_u64(), error_rate["bad"].as_u64()),
        (Some(41), Some(3))
    );
    let [low, high] = [0, 1].map(|i| error_rate["interval"][i].as_f64().unwrap());
    assert!(low < 3.0 / 41.0 && 3.0 / 41.0 < high, "{error_rate}");
    assert!(error_rate["samples_needed"].as_u64().unwrap() > 0);
    assert_eq!(rules[1]["rule"], "p95_latency");
    assert_eq!(state["slo"]["verdict"], "inconclusive");

    let admin_url = format!("http://{}", proxy.admin);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_splitgate"))
            .args(["status", "--admin", &admin_url])
            .env_remove("SPLITGATE_ADMIN_TOKEN")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("error_rate: inconclusive, 3/41 errors")
            && stdout.contains("more requests"),
        "{stdout}"
    );
}
