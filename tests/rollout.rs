//! Rollouts a deploy pipeline drives: steps with their own holds and pause gates,
//! promote, retry, `rollout wait` and its exit codes, and the refusals that keep a
//! rollout from being undone by accident. Real proxy, real traffic, the real CLI.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::run_cli as cli;
use common::*;
use http::StatusCode;

const BIN: &str = env!("CARGO_BIN_EXE_splitgate");

/// Steps of 10 % (held 1 s), a pause, 50 % (held 1 s), 100 %.
const GATED: &str = "[routes.rollout]\nsteps = [{ weight = 10, hold = \"1s\" }, { pause = true }, { weight = 50, hold = \"1s\" }, { weight = 100 }]\n";

async fn proxy_with(name: &str, rollout: &str) -> (TestProxy, TestUpstream, TestUpstream) {
    let stable = named_upstream("stable").await;
    let canary = named_upstream("canary").await;
    let dir = Arc::new(TempDir::new(name));
    let text = config(
        dir.path(),
        &[stable.addr],
        Some(&[canary.addr]),
        "",
        "",
        &format!("canary_weight = 0\nsplit_key = [\"header:x-user-id\"]\n{rollout}"),
    );
    (start_proxy(dir, &text).await, stable, canary)
}

/// The share of 400 users the canary serves now.
async fn canary_share(proxy: SocketAddr) -> f64 {
    let mut canary = 0;
    for i in 0..400 {
        let reply = get(proxy, "/", &[("x-user-id", &format!("user-{i}"))]).await;
        if reply.text().starts_with("canary") {
            canary += 1;
        }
    }
    canary as f64 / 400.0
}

/// Asserts the rollout holds at step 1 (10 %), waiting for something that mentions `for_what`.
async fn held_waiting(admin: SocketAddr, for_what: &str) {
    let state = route(admin).await;
    assert_eq!(
        (
            state["rollout"]["step"].as_u64(),
            state["canary_weight"].as_f64()
        ),
        (Some(1), Some(10.0)),
        "held: {state}"
    );
    assert_eq!(state["rollout"]["state"], "waiting", "{state}");
    assert!(
        state["rollout"]["waiting_for"]
            .as_str()
            .unwrap()
            .contains(for_what),
        "{state}"
    );
}

async fn route(admin: SocketAddr) -> serde_json::Value {
    common::admin(admin, "GET", "/admin/routes/main", "", None)
        .await
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_waits_at_a_pause_promotes_and_waits_for_completion() {
    let (mut proxy, _, _) = proxy_with("rollout-gate", GATED).await;
    // The 1 s hold of step 1 counts from the start, not from when `wait` is asked.
    let started = Instant::now();
    let (code, output) = cli(proxy.admin, &["rollout", "main", "start"]).await;
    assert_eq!(code, 0, "{output}");
    let share = canary_share(proxy.addr).await;
    assert!((0.05..0.16).contains(&share), "step 1 is 10 %: {share}");

    // Held 1 s, then the pause step: `wait` exits 3 there, at the weight before it.
    let (code, output) = cli(
        proxy.admin,
        &["rollout", "main", "wait", "--timeout", "30s"],
    )
    .await;
    assert_eq!(code, 3, "{output}");
    assert!(started.elapsed() >= Duration::from_millis(900), "{output}");
    assert!(
        output.contains("waiting at step 2 of 4 for promote"),
        "{output}"
    );
    let state = route(proxy.admin).await;
    assert_eq!(state["rollout"]["state"], "waiting", "{state}");
    assert_eq!(
        state["canary_weight"], 10.0,
        "a pause keeps the weight before it"
    );
    // It stays there: a gate only opens on promote.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(route(proxy.admin).await["rollout"]["step"], 2);

    // An operator's pause is not a gate a pipeline may open.
    assert_eq!(cli(proxy.admin, &["rollout", "main", "pause"]).await.0, 0);
    let (code, output) = cli(proxy.admin, &["rollout", "main", "promote"]).await;
    assert_eq!(code, 1, "{output}");
    assert!(output.contains("paused by an operator"), "{output}");
    assert_eq!(cli(proxy.admin, &["rollout", "main", "resume"]).await.0, 0);
    // A promote for a step the rollout has left is refused.
    let (status, body) = common::admin(
        proxy.admin,
        "POST",
        "/admin/routes/main/rollout/promote",
        r#"{"step": 1}"#,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (code, output) = cli(proxy.admin, &["rollout", "main", "promote"]).await;
    assert_eq!(code, 0, "{output}");
    let share = canary_share(proxy.addr).await;
    assert!((0.42..0.58).contains(&share), "step 3 is 50 %: {share}");
    let (code, output) = cli(
        proxy.admin,
        &["rollout", "main", "wait", "--timeout", "30s"],
    )
    .await;
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("completed"), "{output}");
    assert_eq!(canary_share(proxy.addr).await, 1.0);
    let state = route(proxy.admin).await;
    assert_eq!(state["rollout"]["state"], "completed", "{state}");
    assert_eq!(state["rollout"]["last"]["step"], 4, "{state}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_during_a_hold_ends_wait_with_1_and_retry_starts_over() {
    let (mut proxy, _, _) = proxy_with("rollout-trip", GATED).await;
    assert_eq!(cli(proxy.admin, &["rollout", "main", "start"]).await.0, 0);
    let waiting = tokio::spawn(cli(proxy.admin, &["rollout", "main", "wait"]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let tripped_at = Instant::now();
    proxy
        .state()
        .trip(
            "main",
            splitgate::state::Trip {
                reason: "error_rate".into(),
                detail: "error_rate: 40% of 50".into(),
                at: "2026-11-27T00:00:00Z".into(),
            },
        )
        .await
        .unwrap();
    let (code, output) = waiting.await.unwrap();
    assert_eq!(code, 1, "{output}");
    assert!(tripped_at.elapsed() < Duration::from_secs(2), "{output}");
    assert!(output.contains("tripped"), "{output}");
    let state = route(proxy.admin).await;
    assert_eq!(state["rollout"]["state"], "tripped", "{state}");
    assert!(
        state["rollout"]["last"]["why"]
            .as_str()
            .unwrap()
            .contains("40%"),
        "{state}"
    );

    // Retry needs the reset first; then it starts from step 1.
    let (code, output) = cli(proxy.admin, &["rollout", "main", "retry"]).await;
    assert_eq!(code, 1, "{output}");
    assert!(output.contains("tripped"), "{output}");
    assert_eq!(cli(proxy.admin, &["reset", "main"]).await.0, 0);
    assert_eq!(route(proxy.admin).await["rollout"]["state"], "aborted");
    let (code, output) = cli(proxy.admin, &["rollout", "main", "retry"]).await;
    assert_eq!(code, 0, "{output}");
    let state = route(proxy.admin).await;
    assert_eq!(
        (
            state["rollout"]["step"].as_u64(),
            state["canary_weight"].as_f64()
        ),
        (Some(1), Some(10.0)),
        "{state}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_undoes_a_rollout_by_accident() {
    let (mut proxy, _, _) = proxy_with("rollout-guards", GATED).await;
    // A live weight above step 1: start would move users back to stable.
    assert_eq!(cli(proxy.admin, &["weight", "main", "30"]).await.0, 0);
    let (code, output) = cli(proxy.admin, &["rollout", "main", "start"]).await;
    assert_eq!(code, 1, "{output}");
    assert!(
        output.contains("409") && output.contains("--from-current"),
        "{output}"
    );
    assert_eq!(
        route(proxy.admin).await["canary_weight"],
        30.0,
        "refused: nothing changed"
    );
    // --from-current: the first step at or above 30 % is 50 %, but a pause comes first:
    // it begins at the pause, at 30 % (a gate is never skipped).
    let (code, output) = cli(proxy.admin, &["rollout", "main", "start", "--from-current"]).await;
    assert_eq!(code, 0, "{output}");
    let state = route(proxy.admin).await;
    assert_eq!(
        (
            state["rollout"]["step"].as_u64(),
            state["canary_weight"].as_f64(),
            state["rollout"]["waiting_for"].as_str()
        ),
        (Some(2), Some(30.0), Some("promote")),
        "{state}"
    );

    // A hand-set weight during the rollout is refused; --force sets it and aborts.
    let (code, output) = cli(proxy.admin, &["weight", "main", "70"]).await;
    assert_eq!(code, 1, "{output}");
    assert!(
        output.contains("409") && output.contains("--force"),
        "{output}"
    );
    let (status, body) = common::admin(
        proxy.admin,
        "POST",
        "/admin/routes/main/rollout/start",
        "{}",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "a second start: {body}");
    let (code, output) = cli(proxy.admin, &["weight", "main", "70", "--force"]).await;
    assert_eq!(code, 0, "{output}");
    let state = route(proxy.admin).await;
    assert_eq!(state["canary_weight"], 70.0);
    assert_eq!(state["rollout"]["state"], "aborted", "{state}");
    assert!(
        state["rollout"]["last"]["why"]
            .as_str()
            .unwrap()
            .contains("--force"),
        "{state}"
    );
    let audit = std::fs::read_to_string(proxy.dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audit.lines().last().unwrap().contains("\"new_weight\":70"),
        "{audit}"
    );

    // promote --full goes straight to the last step; a rollback always works.
    assert_eq!(
        cli(proxy.admin, &["rollout", "main", "start", "--from-current"])
            .await
            .0,
        0
    );
    assert_eq!(
        cli(proxy.admin, &["rollout", "main", "promote", "--full"])
            .await
            .0,
        0
    );
    let state = route(proxy.admin).await;
    assert_eq!(
        (
            state["rollout"]["step"].as_u64(),
            state["canary_weight"].as_f64()
        ),
        (Some(4), Some(100.0)),
        "{state}"
    );
    assert_eq!(cli(proxy.admin, &["rollback", "main"]).await.0, 0);
    let state = route(proxy.admin).await;
    assert_eq!(
        (
            state["rollout"]["state"].as_str(),
            state["canary_weight"].as_f64()
        ),
        (Some("aborted"), Some(0.0)),
        "{state}"
    );
    let (status, body) = common::admin(
        proxy.admin,
        "POST",
        "/admin/routes/main/rollout/promote",
        r#"{"fast": true}"#,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (code, help) = {
        let out = std::process::Command::new(BIN)
            .args(["rollout", "--help"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    assert_eq!(code, Some(0));
    for action in [
        "start",
        "pause",
        "resume",
        "abort",
        "promote",
        "retry",
        "wait",
        "--full",
        "--from-current",
    ] {
        assert!(
            help.contains(action),
            "rollout --help lists {action}: {help}"
        );
    }
    proxy.shutdown().await;
}

#[test]
fn bad_rollout_steps_are_refused_with_the_field_named() {
    let dir = TempDir::new("rollout-bad");
    let cases = [
        ("steps = []", "rollout.steps"),
        ("steps = [10, 5]\ninterval = \"1s\"", "rollout.steps[1]"),
        (
            "steps = [{ weight = 10, hold = \"0s\" }, 20]\ninterval = \"1s\"",
            "rollout.steps[0].hold",
        ),
        (
            "steps = [{ pause = true }, 20]\ninterval = \"1s\"",
            "rollout.steps[0]",
        ),
        (
            "steps = [10, { pause = true }]\ninterval = \"1s\"",
            "rollout.steps[1]",
        ),
        (
            "steps = [10, { weight = 20, pause = true }]\ninterval = \"1s\"",
            "rollout.steps[1]",
        ),
        ("steps = [10, 20]", "rollout.steps[0]"),
        (
            "steps = [10, 20]\ninterval = \"1s\"\non_deadline = \"panic\"\nprogress_deadline = \"1m\"",
            "rollout.on_deadline",
        ),
        (
            "steps = [10, 20]\ninterval = \"1s\"\non_deadline = \"abort\"",
            "rollout.on_deadline",
        ),
        (
            "steps = [10, 20]\ninterval = \"1s\"\nallowed_hours = \"Mon-Fri 9-17 UTC\"",
            "rollout.allowed_hours",
        ),
    ];
    for (steps, field) in cases {
        let text = config(
            dir.path(),
            &["127.0.0.1:1".parse().unwrap()],
            Some(&["127.0.0.1:2".parse().unwrap()]),
            "",
            "",
            &format!("[routes.rollout]\n{steps}\n"),
        );
        let error = splitgate::config::parse(std::path::Path::new("x.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(error.contains(field), "{steps}: {error}");
    }
    // The old form stays valid.
    let text = config(
        dir.path(),
        &["127.0.0.1:1".parse().unwrap()],
        Some(&["127.0.0.1:2".parse().unwrap()]),
        "",
        "",
        "[routes.rollout]\nsteps = [5, 25, 50, 100]\ninterval = \"5m\"\n",
    );
    splitgate::config::parse(std::path::Path::new("x.toml"), &text).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_stops_every_rollout_across_a_restart_until_lifted() {
    let steps = "[routes.rollout]\nsteps = [10, 50, 100]\ninterval = \"1s\"\n";
    let (mut proxy, _, _) = proxy_with("rollout-freeze", steps).await;
    assert_eq!(cli(proxy.admin, &["rollout", "main", "start"]).await.0, 0);
    let (code, output) = cli(proxy.admin, &["freeze", "on", "--reason", "incident 42"]).await;
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("incident 42"), "{output}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    held_waiting(proxy.admin, "incident 42").await;
    let (_, table) = cli(proxy.admin, &["status"]).await;
    assert!(
        table.contains("ROLLOUTS FROZEN") && table.contains("incident 42"),
        "{table}"
    );
    let (status, body) = common::admin(
        proxy.admin,
        "PUT",
        "/admin/freeze",
        r#"{"frozen": "yes"}"#,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");

    // The freeze is durable: a restart keeps it.
    let config_path = proxy.config_path.clone();
    let dir = proxy.dir.clone();
    proxy.shutdown().await;
    let mut proxy = start_proxy(dir, &std::fs::read_to_string(&config_path).unwrap()).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        route(proxy.admin).await["rollout"]["step"],
        1,
        "still frozen after a restart"
    );
    assert_eq!(cli(proxy.admin, &["freeze", "off"]).await.0, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while route(proxy.admin).await["rollout"]["step"] != 2 {
        assert!(
            Instant::now() < deadline,
            "the rollout never moved on after the freeze was lifted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let audit = std::fs::read_to_string(proxy.dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"action\":\"freeze\",\"by\":\"cli\",\"frozen\":true")
            || audit
                .lines()
                .any(|l| l.contains("\"action\":\"freeze\"") && l.contains("\"frozen\":true")),
        "{audit}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inconclusive_hold_past_its_progress_deadline_pauses_or_aborts() {
    for (on_deadline, state, weight) in [("pause", "paused", 10.0), ("abort", "aborted", 0.0)] {
        let rollout = format!(
            "[routes.slo]\nmin_requests = 50\nmax_error_rate = 0.05\n[routes.rollout]\nsteps = [10, 50]\ninterval = \"1s\"\nprogress_deadline = \"1s\"\non_deadline = \"{on_deadline}\"\n"
        );
        let (mut proxy, _, _) =
            proxy_with(&format!("rollout-deadline-{on_deadline}"), &rollout).await;
        assert_eq!(cli(proxy.admin, &["rollout", "main", "start"]).await.0, 0);
        // Without traffic the judge stays inconclusive: held 1 s, then 1 s more.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = route(proxy.admin).await;
            if now["rollout"]["state"] == state {
                assert_eq!(now["canary_weight"], weight, "{now}");
                break;
            }
            assert_ne!(
                now["canary_weight"], 50.0,
                "an inconclusive hold never advances: {now}"
            );
            assert!(Instant::now() < deadline, "never {state}: {now}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_its_allowed_hours_a_rollout_waits() {
    // A one-hour window twelve hours from now (UTC): closed for the whole test.
    let hour = (splitgate::timefmt::unix_ms() / 3_600_000 + 12) % 24;
    let window = format!("daily {hour:02}:00-{:02}:00 UTC", (hour + 1) % 24);
    let rollout = format!(
        "[routes.rollout]\nsteps = [10, 50]\ninterval = \"500ms\"\nallowed_hours = \"{window}\"\n"
    );
    let (mut proxy, _, _) = proxy_with("rollout-window", &rollout).await;
    assert_eq!(cli(proxy.admin, &["rollout", "main", "start"]).await.0, 0);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    held_waiting(proxy.admin, &window).await;
    proxy.shutdown().await;
}
