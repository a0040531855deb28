//! The `splitgate` binary as an operator runs it: `check`, `run` with a bad config,
//! SIGTERM drain, kill -9 and restart, and the deploy CLI against a live admin API.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;
use http::{Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_splitgate");

fn check(text: &str) -> (i32, String, String) {
    let dir = TempDir::new("check");
    let path = dir.path().join("c.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_example_config_checks_ok() {
    let out = Command::new(BIN)
        .args(["check", "-c", "config/splitgate.toml"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
}

#[test]
fn check_lists_every_semantic_error_with_its_field_and_exits_2() {
    let (code, stdout, stderr) = check(
        r#"
[server]
listen = "not-an-address"
[upstreams.empty]
instances = []
[upstreams.good]
instances = ["127.0.0.1:1"]
[[routes]]
name = "r"
stable = "missing"
canary = "good"
canary_weight = 150
[[routes]]
name = "r"
stable = "good"
"#,
    );
    assert_eq!(code, 2);
    assert!(stdout.is_empty());
    for expected in [
        "server.listen: \"not-an-address\" is not an address",
        "upstreams.empty.instances: must list at least one instance",
        "routes[0] (r).stable: unknown upstream \"missing\"",
        "routes[0] (r).canary_weight: weight 150 is outside 0–100",
        "routes[1] (r).name: duplicate route name \"r\"",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
    assert!(
        stderr.lines().all(|l| l.contains("c.toml")),
        "every line names the file:\n{stderr}"
    );
}

#[test]
fn check_names_unknown_fields_and_bad_durations() {
    let base =
        "[upstreams.a]\ninstances = [\"127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\nstable = \"a\"\n";
    let (code, _, stderr) = check(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nlisten_backlog = 5\n{base}"
    ));
    assert_eq!(code, 2);
    assert!(
        stderr.contains("unknown field `listen_backlog`"),
        "{stderr}"
    );
    let (code, _, stderr) = check(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nidle_timeout = \"ten seconds\"\n{base}"
    ));
    assert_eq!(code, 2);
    assert!(stderr.contains("idle_timeout"), "{stderr}");
    assert!(stderr.contains("duration"), "{stderr}");
}

#[test]
fn check_refuses_unreachable_routes_and_shared_listeners() {
    let (code, _, stderr) = check(
        r#"
[server]
listen = "127.0.0.1:8080"
max_headers = 1000
[admin]
listen = "127.0.0.1:8080"
[upstreams.a]
instances = ["127.0.0.1:1"]
[[routes]]
name = "."
stable = "a"
[[routes]]
name = ".."
stable = "a"
path_prefix = "/x"
[[routes]]
name = "api"
host = "Example.com"
path_prefix = "/api"
stable = "a"
[[routes]]
name = "api-again"
host = "example.com"
path_prefix = "/api"
stable = "a"
"#,
    );
    assert_eq!(code, 2);
    for expected in [
        "admin.listen: 127.0.0.1:8080 is also server.listen",
        "server.max_headers: must be at most 256",
        "routes[0] (.).name: \".\" is not a usable name",
        "routes[1] (..).name: \"..\" is not a usable name",
        "routes[3] (api-again).path_prefix: another route already has host",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

/// serde stops at the first schema error; check still names every one, by field.
#[test]
fn check_lists_every_schema_error() {
    let (code, _, stderr) = check(
        r#"
[server]
listen = "127.0.0.1:0"
max_conections = 5
[upstreams.a]
instances = ["127.0.0.1:1"]
eject_after = "five"
[[routes]]
name = "r"
stable = "a"
canary_wieght = 5
"#,
    );
    assert_eq!(code, 2);
    for expected in [
        "server.max_conections: unknown field `max_conections`",
        "upstreams.a.eject_after: invalid type: string \"five\"",
        "routes[0].canary_wieght: unknown field `canary_wieght`",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

/// Configs that loaded before `max_eject_for` existed still load: its default is never
/// below `eject_for`.
#[test]
fn a_long_eject_for_needs_no_max_eject_for() {
    let (code, _, stderr) = check(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.a]\ninstances = [\"127.0.0.1:1\"]\neject_for = \"10m\"\n[[routes]]\nname = \"r\"\nstable = \"a\"\n",
    );
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn check_refuses_judge_settings_that_make_no_sense() {
    let (code, _, stderr) = check(
        r#"
[server]
listen = "127.0.0.1:0"
[upstreams.a]
instances = ["127.0.0.1:1"]
[[routes]]
name = "r"
stable = "a"
canary = "a"
[routes.slo]
confidence = 1.0
max_error_rate = 0
max_latency = { quantile = 1.5, limit = "0ms" }
max_latency_ratio = { quantile = 0.99, ratio = 1.0 }
"#,
    );
    assert_eq!(code, 2);
    for expected in [
        "routes[0] (r).slo.confidence: 1 is outside (0.5, 1)",
        "routes[0] (r).slo.max_error_rate: 0 is outside (0, 1)",
        "routes[0] (r).slo.max_latency: quantile 1.5 is outside (0, 1)",
        "routes[0] (r).slo.max_latency: a limit of 0",
        "routes[0] (r).slo.max_latency_ratio: ratio 1 must be above 1",
    ] {
        assert!(
            stderr.contains(expected),
            "missing {expected:?} in:\n{stderr}"
        );
    }
}

#[test]
fn run_refuses_a_bad_config_with_exit_2() {
    let dir = TempDir::new("run-bad");
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:0\"\n").unwrap();
    let out = Command::new(BIN)
        .args(["run", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("routes: at least one route is required"));
}

/// A splitgate process; killed on drop.
struct Process {
    child: Child,
    proxy: SocketAddr,
    admin: SocketAddr,
    /// Every JSON log line the process has written to stderr so far.
    log: std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `splitgate run` and reads the bound addresses from its log.
fn spawn(config: &std::path::Path) -> Process {
    spawn_with(config, &[])
}

/// `spawn` with more arguments after `run -c CONFIG`.
fn spawn_with(config: &std::path::Path, extra: &[&str]) -> Process {
    spawn_with_env(config, extra, &[])
}

/// `spawn_with`, and environment variables for the process.
fn spawn_with_env(
    config: &std::path::Path,
    extra: &[&str],
    env: &[(&str, &std::path::Path)],
) -> Process {
    let mut child = Command::new(BIN)
        .args(["--log-format", "json", "run", "-c"])
        .arg(config)
        .args(extra)
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let (proxy, admin) = loop {
        let line = lines
            .next()
            .expect("splitgate exited before serving")
            .unwrap();
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if event["message"] == "splitgate serving" {
            break (
                event["proxy"].as_str().unwrap().parse().unwrap(),
                event["admin"].as_str().unwrap().parse().unwrap(),
            );
        }
    };
    // Keep draining stderr so the process never blocks on a full pipe.
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Ok(event) = serde_json::from_str(&line) {
                kept.lock().unwrap().push(event);
            }
        }
    });
    Process {
        child,
        proxy,
        admin,
        log,
    }
}

fn signal(process: &Process, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(process.child.id().to_string())
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_200_in_flight_requests_sends_h2_goaway_and_exits_0() {
    let slow = slow_upstream(Duration::from_secs(2), "done").await;
    let dir = TempDir::new("sigterm");
    let path = dir.path().join("c.toml");
    let text = config(
        dir.path(),
        &[slow.addr],
        None,
        "drain_timeout = \"10s\"",
        "",
        "",
    );
    std::fs::write(&path, text).unwrap();
    let mut process = spawn(&path);
    let addr = process.proxy;

    // An idle h2 client: on SIGTERM it must get GOAWAY, which ends its connection.
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut h2, h2_conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let h2_conn = tokio::spawn(h2_conn);
    let warm = Request::get(format!("http://{addr}/"))
        .body(full(""))
        .unwrap();
    assert_eq!(
        h2.send_request(warm).await.unwrap().status(),
        StatusCode::OK
    );

    let in_flight: Vec<_> = (0..200)
        .map(|_| tokio::spawn(async move { get(addr, "/", &[]).await }))
        .collect();
    // Signal only once all 200 are in flight at the upstream.
    for _ in 0..250 {
        if slow.hits() >= 201 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(slow.hits(), 201);
    let signalled = std::time::Instant::now();
    signal(&process, "TERM");
    for request in in_flight {
        let reply = request.await.unwrap();
        assert_eq!(
            (reply.status, reply.text().as_str()),
            (StatusCode::OK, "done")
        );
    }
    let ended = tokio::time::timeout(Duration::from_secs(2), h2_conn).await;
    assert!(ended.is_ok(), "the h2 connection did not end: no GOAWAY");
    let status = tokio::task::spawn_blocking(move || process.child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "exit took {took:?}, deadline 10s"
    );
}

fn cli(admin: SocketAddr, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .args(["--admin", &format!("http://{admin}")])
        .env_remove("SPLITGATE_ADMIN_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn two_pool_config(dir: &TempDir) -> (std::path::PathBuf, TestUpstream, TestUpstream) {
    let stable = named_upstream("stable").await;
    let canary = named_upstream("canary").await;
    let path = dir.path().join("c.toml");
    let text = config(
        dir.path(),
        &[stable.addr],
        Some(&[canary.addr]),
        "",
        "",
        "canary_weight = 5",
    );
    std::fs::write(&path, text).unwrap();
    (path, stable, canary)
}

#[tokio::test]
async fn deploy_cli_moves_weights_and_a_weight_survives_kill_9() {
    let dir = TempDir::new("deploy");
    let (path, _stable, _canary) = two_pool_config(&dir).await;
    let process = spawn(&path);
    let admin = process.admin;
    for (pct, shown) in [("25", "5% -> 25%"), ("50", "25% -> 50%")] {
        let (code, stdout, stderr) =
            tokio::task::spawn_blocking(move || cli(admin, &["weight", "main", pct]))
                .await
                .unwrap();
        assert_eq!(code, 0, "{stderr}");
        assert!(stdout.contains(shown), "{stdout}");
    }
    let (code, _, stderr) =
        tokio::task::spawn_blocking(move || cli(admin, &["weight", "main", "250"]))
            .await
            .unwrap();
    assert_eq!(code, 1);
    assert!(stderr.contains("outside 0–100"), "{stderr}");
    let (code, stdout, _) = tokio::task::spawn_blocking(move || cli(admin, &["status"]))
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("main") && l.contains("50%")),
        "{stdout}"
    );

    // kill -9: nothing gets to flush, yet the acknowledged weight holds.
    signal(&process, "KILL");
    drop(process);
    let process = spawn(&path);
    let admin = process.admin;
    let (_, stdout, _) =
        tokio::task::spawn_blocking(move || cli(admin, &["status", "main", "--json"]))
            .await
            .unwrap();
    let state: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(state["canary_weight"], 50.0);
    let (code, stdout, _) = tokio::task::spawn_blocking(move || cli(admin, &["rollback", "main"]))
        .await
        .unwrap();
    assert_eq!(code, 0);
    assert!(stdout.contains("50% -> 0%"), "{stdout}");
    // The process log says what changed, not only audit.jsonl.
    let logged_rollback = |e: &serde_json::Value| {
        e["message"] == "route state changed"
            && e["level"] == "INFO"
            && e["route"] == "main"
            && e["new_weight"] == 0.0
            && e["by"] == "cli"
    };
    for _ in 0..100 {
        if process.log.lock().unwrap().iter().any(logged_rollback) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let logged = process.log.lock().unwrap().clone();
    assert!(logged.iter().any(logged_rollback), "{logged:?}");
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audit
            .lines()
            .filter(|l| l.contains("\"source\":\"cli\""))
            .count()
            >= 3,
        "{audit}"
    );
}

#[tokio::test]
async fn sighup_reloads_the_config_file() {
    let dir = TempDir::new("sighup");
    let (path, _stable, _canary) = two_pool_config(&dir).await;
    let process = spawn(&path);
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("canary_weight = 5", "canary_weight = 7");
    std::fs::write(&path, text).unwrap();
    signal(&process, "HUP");
    let admin = process.admin;
    let mut weight = 0.0;
    for _ in 0..50 {
        let reply = get(admin, "/admin/routes/main", &[]).await;
        let state: serde_json::Value = serde_json::from_slice(&reply.body).unwrap();
        weight = state["canary_weight"].as_f64().unwrap();
        if weight == 7.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(weight, 7.0);
}

#[tokio::test]
async fn kill_9_right_after_an_slo_trip_keeps_the_route_tripped() {
    let stable = named_upstream("stable").await;
    let failing = failing_upstream().await;
    let dir = TempDir::new("kill-trip");
    let path = dir.path().join("c.toml");
    let route = "canary_weight = 50\noverride_enabled = true\n[routes.slo]\nmin_requests = 5\nmax_error_rate = 0.1\n";
    std::fs::write(
        &path,
        config(
            dir.path(),
            &[stable.addr],
            Some(&[failing.addr]),
            "",
            "",
            route,
        ),
    )
    .unwrap();
    let process = spawn(&path);
    for _ in 0..10 {
        get(process.proxy, "/", &[("x-splitgate-variant", "canary")]).await;
    }
    wait_for_route(process.admin, Duration::from_secs(1), "the trip", |s| {
        s["slo"]["state"] == "tripped"
    })
    .await;
    signal(&process, "KILL");
    drop(process);

    let process = spawn(&path);
    let state: serde_json::Value =
        serde_json::from_slice(&get(process.admin, "/admin/routes/main", &[]).await.body).unwrap();
    assert_eq!(state["slo"]["state"], "tripped");
    assert_eq!(state["canary_weight"], 0.0);
    // A deploy script's `splitgate status` fails on a tripped route.
    let admin = process.admin;
    let (code, stdout, stderr) = tokio::task::spawn_blocking(move || cli(admin, &["status"]))
        .await
        .unwrap();
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stdout.contains("tripped"), "{stdout}");
    assert!(stderr.contains("SLO tripped on main"), "{stderr}");
    let reply = get(process.proxy, "/", &[("x-user-id", "anyone")]).await;
    assert_eq!(reply.headers["x-splitgate-variant"], "stable");
}

/// Runs `splitgate run` on a config expected to fail at start; returns exit code and stderr.
fn run_fails(args: &[&str], config: &std::path::Path) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .args(["run", "-c"])
        .arg(config)
        .env_remove("SPLITGATE_ADMIN_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_second_process_on_the_same_state_dir_refuses_to_start_naming_the_holder() {
    let dir = TempDir::new("state-lock");
    let (path, _stable, _canary) = two_pool_config(&dir).await;
    let first = spawn(&path);
    // The same config as the first, its ports included: the state dir is what the
    // second is told about, not a port in use.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replacen("127.0.0.1:0", &first.proxy.to_string(), 1)
        .replacen("127.0.0.1:0", &first.admin.to_string(), 1);
    let second = dir.path().join("same.toml");
    std::fs::write(&second, text).unwrap();
    let (code, stderr) =
        tokio::task::spawn_blocking(move || run_fails(&["--log-format", "json"], &second))
            .await
            .unwrap();
    assert_ne!(code, 0);
    // Fatal start errors follow --log-format json.
    let event: serde_json::Value = stderr
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("no JSON error line: {stderr}"));
    assert_eq!(event["level"], "ERROR", "{event}");
    let error = event["error"].as_str().unwrap();
    assert!(
        error.contains(&format!("pid {}", first.child.id())),
        "{error}"
    );
    assert!(error.contains(&dir.path().display().to_string()), "{error}");
    assert!(!error.contains("listen"), "{error}");
    // The first is untouched and still serving.
    assert_eq!(
        get(first.admin, "/healthz", &[]).await.status,
        StatusCode::OK
    );
}

#[test]
fn start_errors_name_the_problem_once() {
    let dir = TempDir::new("start-errors");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let path = dir.path().join("c.toml");
    let text = config(
        dir.path(),
        &["127.0.0.1:1".parse().unwrap()],
        None,
        "",
        "",
        "",
    )
    .replace(
        "listen = \"127.0.0.1:0\"\naccess_log",
        &format!("listen = \"127.0.0.1:{port}\"\naccess_log"),
    );
    std::fs::write(&path, text).unwrap();
    let (code, stderr) = run_fails(&[], &path);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&format!("server.listen 127.0.0.1:{port}")),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );

    // A state.dir that cannot be created names its path.
    let text = config(
        std::path::Path::new("/proc/splitgate-no-such-dir"),
        &["127.0.0.1:1".parse().unwrap()],
        None,
        "",
        "",
        "",
    );
    std::fs::write(&path, text).unwrap();
    let (code, stderr) = run_fails(&[], &path);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("state.dir /proc/splitgate-no-such-dir"),
        "{stderr}"
    );
}

/// The image's config: admin API on all interfaces (so Prometheus and the CLI can reach
/// it), which splitgate accepts only with the token set.
#[test]
fn the_container_config_needs_the_token_and_exposes_the_admin_api() {
    let checked = |token: Option<&str>| {
        let mut command = Command::new(BIN);
        command.args(["check", "-c", "config/container.toml"]);
        match token {
            Some(token) => command.env("SPLITGATE_ADMIN_TOKEN", token),
            None => command.env_remove("SPLITGATE_ADMIN_TOKEN"),
        };
        let out = command.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = checked(Some("s3cret"));
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = checked(None);
    assert_eq!(code, Some(2));
    assert!(stderr.contains("admin.listen 0.0.0.0:9901"), "{stderr}");
    let dockerfile = std::fs::read_to_string("Dockerfile").unwrap();
    assert!(dockerfile.contains("COPY config/container.toml /etc/splitgate/splitgate.toml"));
}

/// `config/splitgate.toml` shows every field of the README's config reference (set, or
/// commented where optional), and still loads as written (`the_example_config_checks_ok`).
#[test]
fn the_example_config_shows_every_documented_field() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let example = std::fs::read_to_string("config/splitgate.toml").unwrap();
    let reference = readme
        .split("## Config reference")
        .nth(1)
        .unwrap()
        .split("\n## ")
        .next()
        .unwrap();
    let mut checked = 0;
    for row in reference.lines().filter(|l| l.starts_with("| `")) {
        let cell = row.split('|').nth(1).unwrap();
        for field in cell.split('`').skip(1).step_by(2) {
            let name = field.rsplit('.').next().unwrap().trim_end_matches(']');
            if name == "*" || name.is_empty() {
                continue;
            }
            let shown = example.lines().any(|line| {
                let line = line.trim_start_matches(['#', ' ']);
                line.starts_with(&format!("{name} ")) || line.starts_with(&format!("{name}="))
            });
            assert!(shown, "config/splitgate.toml does not show {field}");
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} fields found in the README");
}

/// A binary takeover under load: a second `splitgate run --takeover` receives the
/// running one's listening sockets and state; the first drains and exits 0; no
/// request fails, before, during or after.
#[tokio::test]
async fn a_new_binary_takes_over_under_load_without_a_failed_request() {
    let dir = TempDir::new("takeover");
    let (path, _stable, _canary) = two_pool_config(&dir).await;
    // A webhook too: its delivery must not hold the state directory a successor takes.
    let hook = closed_port().await;
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("access_log = false", "access_log = false\nworkers = 2")
        + &format!("\n[[notify]]\nurl = \"http://{hook}/\"\n");
    std::fs::write(&path, text).unwrap();
    let first = spawn(&path);
    let (proxy, admin_addr) = (first.proxy, first.admin);
    let admin = admin_addr;
    let (code, _, stderr) =
        tokio::task::spawn_blocking(move || cli(admin, &["weight", "main", "30"]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{stderr}");

    let load = Load::start(proxy, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A probe of the control socket (connect, say nothing useful, leave) changes nothing.
    let control = dir.path().join("splitgate.sock");
    wait_for_file(&control).await;
    {
        use std::io::Write as _;
        let mut probe = std::os::unix::net::UnixStream::connect(&control).unwrap();
        let _ = probe.write_all(b"{\"hello\":1}\n");
    }
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&control).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the control socket is private");

    let second_path = path.clone();
    let second = tokio::task::spawn_blocking(move || spawn_with(&second_path, &["--takeover"]))
        .await
        .unwrap();
    assert_eq!(
        (second.proxy, second.admin),
        (proxy, admin_addr),
        "the same sockets"
    );
    let (_, exit) = exit_within_20_s(first).await;
    assert_eq!(exit, Some(0), "the first did not drain and exit");
    tokio::time::sleep(Duration::from_millis(300)).await;
    load.finish_without_a_failure().await;
    // The successor has the state and answers the admin API.
    let state: serde_json::Value =
        serde_json::from_slice(&get(second.admin, "/admin/routes/main", &[]).await.body).unwrap();
    assert_eq!(state["canary_weight"], 30.0);
}

/// Waits up to 20 s for `process` to exit; its exit code, if it exited with one.
async fn exit_within_20_s(mut process: Process) -> (Process, Option<i32>) {
    tokio::task::spawn_blocking(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = process.child.try_wait().unwrap() {
                return (process, status.code());
            }
            if std::time::Instant::now() > deadline {
                return (process, None);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
    .await
    .unwrap()
}

/// Clients sending requests one after another on fresh connections, each counting what
/// failed.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<(u32, Vec<String>)>>,
}

impl Load {
    fn start(proxy: SocketAddr, clients: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = (0..clients)
            .map(|client| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0u32, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let request = Request::get("/")
                            .header("x-user-id", format!("u{client}-{ok}"))
                            .body(full(""))
                            .unwrap();
                        match try_send(proxy, request).await {
                            Ok(reply) if reply.status == StatusCode::OK => ok += 1,
                            Ok(reply) => failed.push(format!("status {}", reply.status)),
                            Err(error) => failed.push(error.to_string()),
                        }
                    }
                    (ok, failed)
                })
            })
            .collect();
        Load { stop, clients }
    }

    /// Stops the clients; asserts none failed and enough went through to mean something.
    async fn finish_without_a_failure(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let mut total = 0;
        for client in self.clients {
            let (ok, failed) = client.await.unwrap();
            assert!(failed.is_empty(), "failed requests: {failed:?}");
            total += ok;
        }
        assert!(total > 100, "too little load to mean anything: {total}");
    }
}

/// SIGUSR2, as a systemd unit's upgrade sends it (`deploy/systemd`): the running process
/// starts its own successor (the binary at its path, its arguments, `--takeover`); once
/// that one serves, the old one tells the notify socket the successor is the unit's main
/// process, drains and exits 0, and no request fails. A successor that cannot start
/// (the config broken meanwhile) leaves the old process serving, and its log says so; a
/// takeover started from a shell, outside the unit, is refused.
#[tokio::test]
async fn sigusr2_starts_a_successor_that_becomes_the_units_main_process() {
    let dir = TempDir::new("usr2");
    let (path, _stable, _canary) = two_pool_config(&dir).await;
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let next_notice = move || {
        let mut buffer = [0u8; 512];
        let n = notify.recv(&mut buffer).expect("no notice within 20 s");
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    };
    let first = spawn_with_env(&path, &[], &[("NOTIFY_SOCKET", &notify_path)]);
    let (next_notice, notice) = tokio::task::spawn_blocking(move || {
        let notice = next_notice();
        (next_notice, notice)
    })
    .await
    .unwrap();
    assert_eq!(notice, "READY=1\n", "the first process is ready");

    // Under systemd, a takeover started from a shell (outside the unit) is refused.
    let manual = Command::new(BIN)
        .args(["run", "--takeover", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&manual.stderr);
    assert_eq!(manual.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("runs under systemd") && stderr.contains("SIGUSR2"),
        "{stderr}"
    );

    // A successor that fails: the config is broken before SIGUSR2.
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, "[server\n").unwrap();
    signal(&first, "USR2");
    let exited_early = |log: &[serde_json::Value]| {
        log.iter().any(|event| {
            event["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("the successor exited before taking over"))
        })
    };
    for _ in 0..100 {
        if exited_early(&first.log.lock().unwrap()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        exited_early(&first.log.lock().unwrap()),
        "{:?}",
        first.log.lock().unwrap()
    );
    assert_eq!(get(first.proxy, "/", &[]).await.status, StatusCode::OK);
    std::fs::write(&path, good).unwrap();

    // The real one, under load.
    let load = Load::start(first.proxy, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&first, "USR2");
    let (next_notice, notice) = tokio::task::spawn_blocking(move || {
        let notice = next_notice();
        (next_notice, notice)
    })
    .await
    .unwrap();
    let successor: u32 = notice
        .strip_prefix("MAINPID=")
        .and_then(|rest| rest.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("not a main-process notice: {notice:?}"))
        .parse()
        .unwrap();
    assert_ne!(successor, first.child.id());
    let (first, exit) = exit_within_20_s(first).await;
    assert_eq!(exit, Some(0), "the first did not drain and exit");
    tokio::time::sleep(Duration::from_millis(300)).await;
    load.finish_without_a_failure().await;
    let answers: Vec<u32> = first
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|event| event["message"] == "SIGUSR2: started a successor to take over")
        .filter_map(|event| event["pid"].as_u64().map(|pid| pid as u32))
        .collect();
    assert_eq!(
        answers.last(),
        Some(&successor),
        "the log names the successor"
    );

    // The successor has the sockets: it answers the admin API, and a stop is announced.
    assert_eq!(
        get(first.admin, "/readyz", &[]).await.status,
        StatusCode::OK
    );
    let kill = Command::new("kill")
        .args(["-TERM", &successor.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let (_, notice) = tokio::task::spawn_blocking(move || {
        let notice = next_notice();
        (next_notice, notice)
    })
    .await
    .unwrap();
    assert_eq!(notice, "STOPPING=1\n");
    // It is nobody's child here: wait for it to leave (or turn into a zombie).
    for _ in 0..200 {
        match std::fs::read_to_string(format!("/proc/{successor}/stat")) {
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z') =>
            {
                break
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(_) => break,
        }
    }
}

/// A successor that breaks off after the state directory was released (it died while
/// starting, say): the running process takes `state.dir` back and goes on, changes
/// included, and a later takeover still works.
#[tokio::test]
async fn a_takeover_broken_off_after_the_release_leaves_the_old_process_in_charge() {
    let dir = TempDir::new("takeover-broken");
    let (path, _stable, _canary) = two_pool_config(&dir).await;
    let first = spawn(&path);
    let control = dir.path().join("splitgate.sock");
    wait_for_file(&control).await;
    let released = tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(&control).unwrap();
        stream.write_all(b"{\"takeover\":true}\n").unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        // The header, then (the sockets themselves are dropped unread) the release.
        let mut lines = std::io::BufReader::new(stream).lines();
        let header = lines.next().unwrap().unwrap();
        let released = lines.next().unwrap().unwrap();
        (header, released)
        // The stream closes here without "ready".
    })
    .await
    .unwrap();
    assert!(released.0.contains("\"proxy\""), "{released:?}");
    assert!(released.1.contains("released"), "{released:?}");

    // The old process resumes: changes are accepted again and it still serves.
    let admin = first.admin;
    let mut code = -1;
    for _ in 0..50 {
        code = tokio::task::spawn_blocking(move || cli(admin, &["weight", "main", "20"]).0)
            .await
            .unwrap();
        if code == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(code, 0, "changes stay refused after a broken takeover");
    assert_eq!(get(first.proxy, "/", &[]).await.status, StatusCode::OK);

    // And a real takeover afterwards succeeds.
    let second_path = path.clone();
    let second = tokio::task::spawn_blocking(move || spawn_with(&second_path, &["--takeover"]))
        .await
        .unwrap();
    let state: serde_json::Value =
        serde_json::from_slice(&get(second.admin, "/admin/routes/main", &[]).await.body).unwrap();
    assert_eq!(state["canary_weight"], 20.0);
}

/// Waits (up to 5 s) for a file to appear: the control socket is bound just after the
/// process logs that it serves.
async fn wait_for_file(path: &std::path::Path) {
    for _ in 0..100 {
        if path.exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{} never appeared", path.display());
}

/// The CPUs a thread may run on, from `/proc` (`Cpus_allowed_list`, such as `0-3,6`).
fn allowed_cpus(status: &str) -> Vec<usize> {
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    list.split(',')
        .flat_map(|part| match part.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<usize>>(),
            None => vec![part.parse().unwrap()],
        })
        .collect()
}

/// `pin_workers`: worker i runs on the i-th CPU the process may use, and only there;
/// without it, workers may run anywhere.
#[tokio::test]
async fn pinned_workers_each_run_on_a_cpu_of_their_own() {
    let dir = TempDir::new("pin");
    let (path, _stable, _canary) = two_pool_config(&dir).await;
    let base = std::fs::read_to_string(&path).unwrap();
    let allowed = allowed_cpus(&std::fs::read_to_string("/proc/self/status").unwrap());
    for pin in [true, false] {
        let text = base.replace(
            "access_log = false",
            &format!("access_log = false\nworkers = 2\npin_workers = {pin}"),
        );
        std::fs::write(&path, text).unwrap();
        let process = spawn(&path);
        let mut workers = std::collections::BTreeMap::new();
        for task in std::fs::read_dir(format!("/proc/{}/task", process.child.id())).unwrap() {
            let task = task.unwrap().path();
            let name = std::fs::read_to_string(task.join("comm")).unwrap();
            if let Some(index) = name.trim().strip_prefix("splitgate-w") {
                let status = std::fs::read_to_string(task.join("status")).unwrap();
                workers.insert(index.parse::<usize>().unwrap(), allowed_cpus(&status));
            }
        }
        assert_eq!(workers.len(), 2, "two named worker threads: {workers:?}");
        for (index, cpus) in &workers {
            if pin {
                assert_eq!(
                    cpus,
                    &vec![allowed[index % allowed.len()]],
                    "worker {index}"
                );
            } else {
                assert_eq!(cpus, &allowed, "worker {index} is not pinned");
            }
        }
        // Requests are served either way.
        let reply = send(process.proxy, Request::get("/").body(full("")).unwrap()).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
}

/// The README shows `examples/rolling-deploy.sh` as shipped.
#[test]
fn the_readme_shows_the_rolling_deploy_script_as_shipped() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let script = std::fs::read_to_string("examples/rolling-deploy.sh").unwrap();
    assert!(
        readme.contains(&format!("```sh\n{script}```")),
        "README and examples/rolling-deploy.sh differ"
    );
}

#[test]
fn check_names_protocol_and_grpc_status_mistakes() {
    let (code, _, stderr) = check(
        r#"
[server]
listen = "127.0.0.1:0"
[upstreams.plain]
instances = ["127.0.0.1:1"]
protocol = "h2"
[upstreams.cleartext]
instances = ["127.0.0.1:2"]
protocol = "h2c"
tls = true
sni = "upstream.test"
[upstreams.typo]
instances = ["127.0.0.1:3"]
protocol = "http2"
[[routes]]
name = "r"
stable = "plain"
grpc_error_statuses = ["UNAVAILABLE", "BROKEN"]
"#,
    );
    assert_eq!(code, 2);
    for expected in [
        "upstreams.plain.protocol: \"h2\" is negotiated over TLS and needs tls = true; for HTTP/2 without TLS use \"h2c\"",
        "upstreams.cleartext.protocol: \"h2c\" is HTTP/2 without TLS; with tls = true use \"h2\" (or \"auto\")",
        "upstreams.typo.protocol: \"http2\" is not one of \"http1\", \"h2c\", \"h2\", \"auto\"",
        "routes[0] (r).grpc_error_statuses: \"BROKEN\" is not a gRPC status",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in:\n{stderr}");
    }
}

#[test]
fn completions_and_the_man_page_come_from_the_command_line_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(BIN)
            .args(["completions", shell])
            .output()
            .unwrap();
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        // Every subcommand is offered, nested ones included.
        for word in [
            "rollout",
            "instance",
            "freeze",
            "upstreams",
            "promote",
            "drain",
        ] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let out = std::process::Command::new(BIN)
        .args(["completions", "tcsh"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "an unknown shell is a usage error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("possible values"));

    // Every subcommand's help ends with an example.
    for sub in [
        "run",
        "check",
        "demo",
        "weight",
        "status",
        "rollback",
        "reset",
        "health",
        "rollout",
        "instance",
        "freeze",
        "upstreams",
        "completions",
        "man",
        "fleet",
    ] {
        let out = std::process::Command::new(BIN)
            .args([sub, "--help"])
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("Example") && help.contains(&format!("splitgate {sub}")),
            "{sub} --help has no example:\n{help}"
        );
    }

    let out = std::process::Command::new(BIN).arg("man").output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains(".TH splitgate 1"), "{page}");
    assert!(
        page.contains("splitgate rollout api start"),
        "the man page has the examples"
    );
    for section in [".SH NAME", ".SH SYNOPSIS", ".SH SUBCOMMANDS"] {
        assert!(page.contains(section), "man page lacks {section}");
    }
    // A subcommand's own page, which the main page's SUBCOMMANDS section points to.
    let out = std::process::Command::new(BIN)
        .args(["man", "run"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let page = String::from_utf8_lossy(&out.stdout);
    assert!(page.contains(".TH splitgate-run 1"), "{page}");
    assert!(
        page.contains("SIGUSR2") && page.contains("\\-\\-takeover"),
        "{page}"
    );
    let out = std::process::Command::new(BIN)
        .args(["man", "nosuch"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
