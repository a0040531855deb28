//! Instances for rolling deploys: active health checks, drain and maintenance through
//! the admin API and the `splitgate instance` CLI, DNS re-resolution through a hosts
//! file the test controls (no real DNS traffic), and a rolling deploy under load. Real
//! backends on loopback addresses, real traffic, the real binary for the CLI.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::run_cli as cli;
use common::*;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A backend: `/healthz` answers 200 or 503 as `healthy` says; anything else counts a
/// hit, waits `delay`, counts a completion and answers its name.
struct Backend {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    completed: Arc<AtomicUsize>,
    healthy: Arc<AtomicBool>,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Backend {
    async fn start(bind: SocketAddr, name: &'static str, delay: Duration) -> Backend {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(AtomicUsize::new(0));
        let completed = Arc::new(AtomicUsize::new(0));
        let healthy = Arc::new(AtomicBool::new(true));
        let tasks = Arc::new(Mutex::new(Vec::new()));
        let (h, c, ok, t) = (
            hits.clone(),
            completed.clone(),
            healthy.clone(),
            tasks.clone(),
        );
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (h, c, ok) = (h.clone(), c.clone(), ok.clone());
                let connection = tokio::spawn(async move {
                    let service = service_fn(move |request: Request<Incoming>| {
                        let (h, c, ok) = (h.clone(), c.clone(), ok.clone());
                        async move {
                            if request.uri().path() == "/healthz" {
                                let mut response = Response::new(full("health"));
                                if !ok.load(Ordering::SeqCst) {
                                    *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                                }
                                return Ok::<_, std::convert::Infallible>(response);
                            }
                            h.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(delay).await;
                            c.fetch_add(1, Ordering::SeqCst);
                            Ok(Response::new(full(name)))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
                t.lock().unwrap().push(connection);
            }
        });
        tasks.lock().unwrap().push(accept);
        Backend {
            addr,
            hits,
            completed,
            healthy,
            tasks,
        }
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Stops like a killed process: the listener and every connection go at once.
    fn stop(&self) {
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

/// Requests sent by `concurrency` clients in a loop, each on a keep-alive connection;
/// anything but a 200 (or a failed exchange) is counted as failed.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
    clients: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(proxy: SocketAddr, concurrency: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let clients = (0..concurrency)
            .map(|client| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut sender = None;
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        if sender.is_none() {
                            let stream = TcpStream::connect(proxy).await.unwrap();
                            let (s, connection) =
                                hyper::client::conn::http1::handshake(TokioIo::new(stream))
                                    .await
                                    .unwrap();
                            tokio::spawn(connection);
                            sender = Some(s);
                        }
                        let s: &mut hyper::client::conn::http1::SendRequest<TestBody> =
                            sender.as_mut().unwrap();
                        n += 1;
                        let request = Request::get("/")
                            .header("host", "app")
                            .header("x-user-id", format!("user-{client}-{n}"))
                            .body(full(""))
                            .unwrap();
                        let outcome = match s.send_request(request).await {
                            Ok(response) => {
                                let status = response.status();
                                match http_body_util::BodyExt::collect(response.into_body()).await {
                                    Ok(_) if status == StatusCode::OK => Ok(()),
                                    Ok(_) => Err(format!("status {status}")),
                                    Err(e) => Err(format!("body: {e}")),
                                }
                            }
                            Err(e) => Err(format!("send: {e}")),
                        };
                        match outcome {
                            Ok(()) => {
                                ok.fetch_add(1, Ordering::SeqCst);
                            }
                            Err(e) => {
                                failed.lock().unwrap().push(e);
                                sender = None;
                            }
                        }
                        if sender.as_ref().is_some_and(|s| s.is_closed()) {
                            sender = None;
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            clients,
        }
    }

    /// Stops; asserts that nothing failed and more than `min_ok` requests succeeded.
    async fn finish_without_failures(self, min_ok: usize) {
        let (ok, failed) = self.finish().await;
        assert!(
            failed.is_empty(),
            "{} failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        assert!(ok > min_ok, "only {ok} requests");
    }

    /// Stops and returns (succeeded, failures).
    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for client in self.clients {
            client.await.unwrap();
        }
        let failed = self.failed.lock().unwrap().clone();
        (self.ok.load(Ordering::SeqCst), failed)
    }
}

fn proxy_config(state: &Path, instances: &str, upstream_extra: &str, extra: &str) -> String {
    format!(
        r#"{extra}
[server]
listen = "127.0.0.1:0"
access_log = false

[admin]
listen = "127.0.0.1:0"

[state]
dir = "{}"

[upstreams.app]
instances = [{instances}]
{upstream_extra}

[[routes]]
name = "main"
stable = "app"
"#,
        state.display()
    )
}

const HEALTH: &str = "[upstreams.app.health]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 2\nfall = 2\n";

async fn instance(admin: SocketAddr, addr: SocketAddr) -> serde_json::Value {
    let (status, value) = common::admin(
        admin,
        "GET",
        &format!("/admin/upstreams/app/instances/{addr}"),
        "",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{value}");
    value
}

/// Polls `app`'s instance every 20 ms until `check` holds, or panics after `within`.
async fn wait_instance(
    admin: SocketAddr,
    addr: SocketAddr,
    within: Duration,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) {
    wait_instance_in(admin, "app", addr, within, what, check).await
}

/// The addresses `GET /admin/upstreams/app` lists.
async fn members(admin: SocketAddr) -> Vec<String> {
    let (_, value) = common::admin(admin, "GET", "/admin/upstreams/app", "", None).await;
    value["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["addr"].as_str().unwrap().to_string())
        .collect()
}

async fn wait_members(admin: SocketAddr, wanted: &[SocketAddr], within: Duration) {
    let wanted: Vec<String> = wanted.iter().map(|a| a.to_string()).collect();
    let deadline = Instant::now() + within;
    loop {
        let now = members(admin).await;
        if now == wanted {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "instances are {now:?}, wanted {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `splitgate instance STATE app ADDR --wait --timeout TIMEOUT`.
fn cli_wait(
    admin: SocketAddr,
    state: &str,
    addr: SocketAddr,
    timeout: &str,
) -> impl std::future::Future<Output = (i32, String)> + Send + 'static {
    cli(
        admin,
        &[
            "instance",
            state,
            "app",
            &addr.to_string(),
            "--wait",
            "--timeout",
            timeout,
        ],
    )
}

/// `PUT /admin/upstreams/{upstream}/instances/{addr}/state`; asserts 200, returns the body.
async fn set_state(
    admin: SocketAddr,
    upstream: &str,
    addr: SocketAddr,
    to: &str,
) -> serde_json::Value {
    let (status, value) = common::admin(
        admin,
        "PUT",
        &format!("/admin/upstreams/{upstream}/instances/{addr}/state"),
        &format!("{{\"state\": \"{to}\"}}"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{value}");
    value
}

fn list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(|a| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Writes the hosts file in one step (a reader never sees half of it).
fn write_hosts(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_health_check_takes_an_instance_out_and_rise_brings_it_back() {
    let a = Backend::start(localhost(), "a", Duration::ZERO).await;
    let b = Backend::start(localhost(), "b", Duration::ZERO).await;
    let dir = Arc::new(TempDir::new("health-checks"));
    let text = proxy_config(dir.path(), &list(&[a.addr, b.addr]), HEALTH, "");
    let mut proxy = start_proxy(dir, &text).await;
    for addr in [a.addr, b.addr] {
        wait_instance(
            proxy.admin,
            addr,
            Duration::from_secs(5),
            "first checks",
            |i| i["serving"] == true && i["health"] == "up",
        )
        .await;
    }
    let load = Load::start(proxy.addr, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.hits() > 0, "a gets traffic while healthy");

    a.healthy.store(false, Ordering::SeqCst);
    let failed_at = Instant::now();
    wait_instance(proxy.admin, a.addr, Duration::from_secs(5), "a down", |i| {
        i["health"] == "down" && i["serving"] == false
    })
    .await;
    // interval × fall is 200 ms; the bound is generous for a loaded machine.
    assert!(failed_at.elapsed() < Duration::from_secs(3));
    let (_, metrics) = {
        let reply = get(proxy.admin, "/metrics", &[]).await;
        (reply.status, reply.text())
    };
    assert!(
        metrics.contains(&format!(
            "splitgate_instance_up{{upstream=\"app\",address=\"{}\"}} 0",
            a.addr
        )),
        "{metrics}"
    );
    assert!(metrics.contains("splitgate_health_checks_total{upstream=\"app\",outcome=\"fail\"}"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let hits_when_down = a.hits();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        a.hits(),
        hits_when_down,
        "no request reaches a failing instance"
    );

    a.healthy.store(true, Ordering::SeqCst);
    wait_instance(proxy.admin, a.addr, Duration::from_secs(5), "a back", |i| {
        i["serving"] == true
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(a.hits() > hits_when_down, "a gets traffic again after rise");
    load.finish_without_failures(100).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_wait_returns_after_the_last_request_in_flight_and_nothing_new_arrives() {
    let a = Backend::start(localhost(), "a", Duration::from_millis(1500)).await;
    let b = Backend::start(localhost(), "b", Duration::ZERO).await;
    let dir = Arc::new(TempDir::new("drain-wait"));
    let text = proxy_config(dir.path(), &list(&[a.addr, b.addr]), "", "");
    let mut proxy = start_proxy(dir, &text).await;
    // Everything to a: 50 slow requests in flight there.
    set_state(proxy.admin, "app", b.addr, "drain").await;
    let slow: Vec<_> = (0..50)
        .map(|i| {
            let proxy = proxy.addr;
            tokio::spawn(async move {
                get(proxy, "/", &[("x-user-id", &format!("slow-{i}"))])
                    .await
                    .status
            })
        })
        .collect();
    wait_instance(
        proxy.admin,
        a.addr,
        Duration::from_secs(5),
        "50 in flight",
        |i| i["in_flight"] == 50,
    )
    .await;
    set_state(proxy.admin, "app", b.addr, "ready").await;

    let started = Instant::now();
    let drain = tokio::spawn(cli_wait(proxy.admin, "drain", a.addr, "30s"));
    // New requests while a drains go to b.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..20 {
        let reply = get(proxy.addr, "/", &[("x-user-id", &format!("new-{i}"))]).await;
        assert_eq!(reply.text(), "b");
    }
    let (code, output) = drain.await.unwrap();
    assert_eq!(code, 0, "{output}");
    assert_eq!(
        a.completed.load(Ordering::SeqCst),
        50,
        "drain --wait returned before the last request finished: {output}"
    );
    assert!(started.elapsed() >= Duration::from_millis(900), "{output}");
    assert!(output.contains("nothing in flight"), "{output}");
    for request in slow {
        assert_eq!(request.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(a.hits(), 50, "no new request reached the draining instance");
    assert_eq!(instance(proxy.admin, a.addr).await["state"], "drain");
    wait_instance(
        proxy.admin,
        a.addr,
        Duration::from_secs(5),
        "connections to a drained instance closed",
        |i| i["connections"] == 0,
    )
    .await;

    // A wait that cannot finish times out with exit 2 and says why.
    set_state(proxy.admin, "app", a.addr, "ready").await;
    set_state(proxy.admin, "app", b.addr, "drain").await;
    let hung = tokio::spawn(get(proxy.addr, "/", &[]));
    wait_instance(
        proxy.admin,
        a.addr,
        Duration::from_secs(5),
        "1 in flight",
        |i| i["in_flight"] == 1,
    )
    .await;
    let (code, output) = cli_wait(proxy.admin, "drain", a.addr, "200ms").await;
    assert_eq!(code, 2, "{output}");
    assert!(output.contains("1 requests still in flight"), "{output}");
    assert_eq!(hung.await.unwrap().status, StatusCode::OK);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maint_survives_a_restart_and_bad_requests_change_nothing() {
    let a = Backend::start(localhost(), "a", Duration::ZERO).await;
    let b = Backend::start(localhost(), "b", Duration::ZERO).await;
    let dir = Arc::new(TempDir::new("maint-restart"));
    let text = proxy_config(dir.path(), &list(&[a.addr, b.addr]), HEALTH, "");
    let mut proxy = start_proxy(dir.clone(), &text).await;
    let path = format!("/admin/upstreams/app/instances/{}/state", a.addr);
    for (body, status, says) in [
        (r#"{"state": "down"}"#, StatusCode::BAD_REQUEST, "state"),
        (
            r#"{"stat": "maint"}"#,
            StatusCode::BAD_REQUEST,
            "unknown field",
        ),
        ("maint", StatusCode::BAD_REQUEST, "not JSON"),
    ] {
        let (got, value) = common::admin(proxy.admin, "PUT", &path, body, None).await;
        assert_eq!(got, status, "{body}: {value}");
        assert!(value["error"].as_str().unwrap().contains(says), "{value}");
    }
    let (got, value) = common::admin(
        proxy.admin,
        "PUT",
        "/admin/upstreams/app/instances/127.0.0.1:1/state",
        r#"{"state": "maint"}"#,
        None,
    )
    .await;
    assert_eq!(got, StatusCode::NOT_FOUND);
    assert!(
        value["error"]
            .as_str()
            .unwrap()
            .contains(&a.addr.to_string()),
        "names the instances it has: {value}"
    );
    let (got, _) = common::admin(
        proxy.admin,
        "PUT",
        "/admin/upstreams/nope/instances/127.0.0.1:1/state",
        r#"{"state": "maint"}"#,
        None,
    )
    .await;
    assert_eq!(got, StatusCode::NOT_FOUND);
    assert_eq!(
        instance(proxy.admin, a.addr).await["state"],
        "ready",
        "bad requests changed nothing"
    );

    let (code, output) = cli(
        proxy.admin,
        &["instance", "maint", "app", &a.addr.to_string()],
    )
    .await;
    assert_eq!(code, 0, "{output}");
    let before = a.hits();
    for i in 0..20 {
        assert_eq!(
            get(proxy.addr, "/", &[("x-user-id", &format!("u{i}"))])
                .await
                .text(),
            "b"
        );
    }
    assert_eq!(a.hits(), before);
    // Taking out the last serving instance is allowed, and the answer says what follows.
    let last = set_state(proxy.admin, "app", b.addr, "drain").await;
    assert!(
        last["warning"].as_str().unwrap_or_default().contains("503"),
        "{last}"
    );
    let back = set_state(proxy.admin, "app", b.addr, "ready").await;
    assert!(back["warning"].is_null(), "{back}");
    wait_instance(proxy.admin, b.addr, Duration::from_secs(5), "b back", |i| {
        i["serving"] == true
    })
    .await;
    let (code, table) = cli(proxy.admin, &["upstreams"]).await;
    assert_eq!(code, 0, "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains(&a.addr.to_string()) && l.contains("maint")),
        "{table}"
    );

    proxy.shutdown().await;
    let mut proxy = start_proxy(dir.clone(), &text).await;
    assert_eq!(
        instance(proxy.admin, a.addr).await["state"],
        "maint",
        "maint survives a restart"
    );
    wait_instance(proxy.admin, b.addr, Duration::from_secs(5), "b up", |i| {
        i["serving"] == true
    })
    .await;
    for i in 0..20 {
        assert_eq!(
            get(proxy.addr, "/", &[("x-user-id", &format!("v{i}"))])
                .await
                .text(),
            "b"
        );
    }
    assert_eq!(
        a.hits(),
        before,
        "no request reaches a maint instance after a restart"
    );
    let value = instance(proxy.admin, a.addr).await;
    assert_eq!(
        value["last_check"],
        serde_json::Value::Null,
        "maint is not health-checked: {value}"
    );
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"action\":\"instance_state\"")
            && audit.contains("\"new_state\":\"maint\""),
        "{audit}"
    );

    // Back to ready: with health checks, it serves again once it passes them.
    let (code, output) = cli_wait(proxy.admin, "ready", a.addr, "10s").await;
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("serving"), "{output}");
    proxy.shutdown().await;
}

/// A backend on 127.0.0.N with the same port as `first` (names resolve to addresses,
/// not ports).
async fn sibling(first: SocketAddr, n: u8, name: &'static str, delay: Duration) -> Backend {
    Backend::start(
        SocketAddr::from(([127, 0, 0, n], first.port())),
        name,
        delay,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_changes_move_traffic_without_a_failed_request_and_an_empty_answer_keeps_the_last_set()
{
    let a = Backend::start(localhost(), "a", Duration::ZERO).await;
    let b = sibling(a.addr, 2, "b", Duration::ZERO).await;
    let dir = Arc::new(TempDir::new("dns"));
    let hosts = dir.path().join("hosts");
    write_hosts(&hosts, "127.0.0.1 app.test\n");
    let text = proxy_config(
        dir.path(),
        &format!("\"app.test:{}\"", a.addr.port()),
        &format!("resolve = \"100ms\"\n{HEALTH}"),
        &format!("[resolver]\nhosts_file = \"{}\"\n", hosts.display()),
    );
    let mut proxy = start_proxy(dir.clone(), &text).await;
    wait_instance(proxy.admin, a.addr, Duration::from_secs(5), "a up", |i| {
        i["serving"] == true
    })
    .await;
    let load = Load::start(proxy.addr, 4);
    tokio::time::sleep(Duration::from_millis(200)).await;

    write_hosts(&hosts, "127.0.0.2 app.test\n");
    wait_members(proxy.admin, &[b.addr], Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let a_hits = a.hits();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        a.hits(),
        a_hits,
        "the address that went away gets nothing new"
    );
    assert!(b.hits() > 0, "the new address gets the traffic");

    // Nothing listed: the lookup fails, the last good set stays.
    write_hosts(&hosts, "# nothing\n");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(members(proxy.admin).await, vec![b.addr.to_string()]);
    let metrics = get(proxy.admin, "/metrics", &[]).await.text();
    assert!(
        metrics.contains("splitgate_dns_resolutions_total{upstream=\"app\",outcome=\"failed\"}"),
        "{metrics}"
    );
    assert!(
        !metrics.contains(&format!("address=\"{}\"", a.addr)),
        "no stale series for a removed instance"
    );
    load.finish_without_failures(100).await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_that_does_not_resolve_yet_is_a_warning_with_resolve_and_an_error_without() {
    let a = Backend::start(localhost(), "a", Duration::ZERO).await;
    let dir = Arc::new(TempDir::new("dns-late"));
    let hosts = dir.path().join("hosts");
    write_hosts(&hosts, "");
    let instances = format!("\"late.test:{}\"", a.addr.port());
    let resolver = format!("[resolver]\nhosts_file = \"{}\"\n", hosts.display());
    let without = proxy_config(dir.path(), &instances, "", &resolver);
    let error = splitgate::config::parse(Path::new("x.toml"), &without)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("upstreams.app.instances[0]") && error.contains("late.test"),
        "{error}"
    );

    let text = proxy_config(dir.path(), &instances, "resolve = \"100ms\"", &resolver);
    let mut proxy = start_proxy(dir.clone(), &text).await;
    assert_eq!(
        get(proxy.addr, "/", &[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    write_hosts(&hosts, "127.0.0.1 late.test\n");
    wait_members(proxy.admin, &[a.addr], Duration::from_secs(5)).await;
    assert_eq!(get(proxy.addr, "/", &[]).await.text(), "a");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_deploy_of_three_instances_under_load_fails_no_request() {
    let first = Backend::start(localhost(), "v1", WORK).await;
    let port = first.addr.port();
    let mut old = vec![
        first,
        sibling(first_addr(port), 2, "v1", WORK).await,
        sibling(first_addr(port), 3, "v1", WORK).await,
    ];
    let dir = Arc::new(TempDir::new("rolling"));
    let hosts = dir.path().join("hosts");
    let hosts_text = |ips: &[u8]| {
        ips.iter()
            .map(|n| format!("127.0.0.{n} app.test\n"))
            .collect::<String>()
    };
    let mut ips = vec![1u8, 2, 3];
    write_hosts(&hosts, &hosts_text(&ips));
    let text = proxy_config(
        dir.path(),
        &format!("\"app.test:{port}\""),
        &format!("resolve = \"100ms\"\n{HEALTH}"),
        &format!("[resolver]\nhosts_file = \"{}\"\n", hosts.display()),
    );
    let mut proxy = start_proxy(dir.clone(), &text).await;
    for backend in &old {
        wait_instance(
            proxy.admin,
            backend.addr,
            Duration::from_secs(5),
            "up",
            |i| i["serving"] == true,
        )
        .await;
    }
    let load = Load::start(proxy.addr, 8);
    let mut new = Vec::new();
    for step in 0..3usize {
        let retiring = old.remove(0);
        let (code, output) = cli_wait(proxy.admin, "drain", retiring.addr, "30s").await;
        assert_eq!(code, 0, "{output}");
        retiring.stop();
        let replacement = sibling(first_addr(port), 4 + step as u8, "v2", WORK).await;
        ips.retain(|&n| n != step as u8 + 1);
        ips.push(4 + step as u8);
        write_hosts(&hosts, &hosts_text(&ips));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !members(proxy.admin)
            .await
            .contains(&replacement.addr.to_string())
        {
            assert!(Instant::now() < deadline, "the new instance never appeared");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (code, output) = cli_wait(proxy.admin, "ready", replacement.addr, "30s").await;
        assert_eq!(code, 0, "{output}");
        new.push(replacement);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    load.finish_without_failures(300).await;
    for backend in &new {
        assert!(backend.hits() > 0, "{} got no traffic", backend.addr);
    }
    let now: Vec<String> = new.iter().map(|b| b.addr.to_string()).collect();
    let mut listed = members(proxy.admin).await;
    listed.sort();
    assert_eq!(listed, now);
    proxy.shutdown().await;
}

/// Each request of the rolling deploy takes this long, so some are always in flight:
/// stopping an instance before its drain finished would fail them.
const WORK: Duration = Duration::from_millis(20);

fn first_addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_canary_drained_or_pending_is_not_charged_to_the_judge() {
    let stable = Backend::start(localhost(), "stable", Duration::ZERO).await;
    let canary = Backend::start(localhost(), "canary", Duration::ZERO).await;
    let next = Backend::start(localhost(), "next", Duration::ZERO).await;
    next.healthy.store(false, Ordering::SeqCst);
    let dir = Arc::new(TempDir::new("canary-out"));
    let config = |canary: SocketAddr| {
        format!(
            r#"[server]
listen = "127.0.0.1:0"
access_log = false
[admin]
listen = "127.0.0.1:0"
[state]
dir = "{}"
[upstreams.app]
instances = ["{}"]
[upstreams.next]
instances = ["{canary}"]
[upstreams.next.health]
path = "/healthz"
interval = "100ms"
timeout = "100ms"
[[routes]]
name = "main"
stable = "app"
canary = "next"
canary_weight = 50
canary_unavailable = "stable"
split_key = ["header:x-user-id"]
[routes.slo]
max_error_rate = 0.01
min_requests = 5
"#,
            dir.path().display(),
            stable.addr,
        )
    };
    let mut proxy = start_proxy(dir.clone(), &config(canary.addr)).await;
    wait_instance_in(
        proxy.admin,
        "next",
        canary.addr,
        Duration::from_secs(5),
        "canary up",
        |i| i["serving"] == true,
    )
    .await;
    set_state(proxy.admin, "next", canary.addr, "drain").await;
    for i in 0..40 {
        let reply = get(proxy.addr, "/", &[("x-user-id", &format!("d{i}"))]).await;
        assert_eq!(reply.text(), "stable");
    }
    // A new canary instance that fails its first checks (still starting) is pending,
    // not failing.
    std::fs::write(&proxy.config_path, config(next.addr)).unwrap();
    let (status, value) = common::admin(proxy.admin, "POST", "/admin/reload", "", None).await;
    assert_eq!(status, StatusCode::OK, "{value}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, pending) = common::admin(
        proxy.admin,
        "GET",
        &format!("/admin/upstreams/next/instances/{}", next.addr),
        "",
        None,
    )
    .await;
    assert_eq!(pending["health"], "pending", "{pending}");
    for i in 0..40 {
        let reply = get(proxy.addr, "/", &[("x-user-id", &format!("p{i}"))]).await;
        assert_eq!(reply.text(), "stable");
    }
    let (_, route) = common::admin(proxy.admin, "GET", "/admin/routes/main", "", None).await;
    assert_eq!(route["slo"]["state"], "ok", "{route}");
    assert_eq!(route["window"]["canary"]["errors"], 0, "{route}");
    proxy.shutdown().await;
}

async fn wait_instance_in(
    admin: SocketAddr,
    upstream: &str,
    addr: SocketAddr,
    within: Duration,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) {
    let path = format!("/admin/upstreams/{upstream}/instances/{addr}");
    wait_for_admin(admin, &path, within, what, check).await;
}

/// A DNS server on 127.0.0.1 (UDP) that answers A queries for `name` with the addresses
/// in `answers` and a TTL of `ttl` seconds (AAAA: no records), counting the queries.
async fn dns_server(
    name: &'static str,
    answers: Arc<Mutex<Vec<std::net::Ipv4Addr>>>,
    ttl: u32,
    queries: Arc<AtomicUsize>,
) -> SocketAddr {
    use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
    use hickory_resolver::proto::rr::{rdata::A, RData, Record, RecordType};
    use hickory_resolver::proto::serialize::binary::BinEncodable;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 1500];
        while let Ok((n, peer)) = socket.recv_from(&mut buf).await {
            let Ok(query) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            queries.fetch_add(1, Ordering::SeqCst);
            let mut reply = Message::new();
            reply
                .set_id(query.id())
                .set_message_type(MessageType::Response)
                .set_op_code(query.op_code())
                .set_recursion_desired(query.recursion_desired())
                .set_recursion_available(true)
                .set_response_code(ResponseCode::NoError);
            for q in query.queries() {
                reply.add_query(q.clone());
                let ours = q
                    .name()
                    .to_ascii()
                    .trim_end_matches('.')
                    .eq_ignore_ascii_case(name);
                if ours && q.query_type() == RecordType::A {
                    for ip in answers.lock().unwrap().iter() {
                        reply.add_answer(Record::from_rdata(
                            q.name().clone(),
                            ttl,
                            RData::A(A(*ip)),
                        ));
                    }
                }
            }
            let _ = socket.send_to(&reply.to_bytes().unwrap(), peer).await;
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolve_ttl_follows_the_dns_answer_when_its_ttl_runs_out() {
    let a = Backend::start(localhost(), "a", Duration::ZERO).await;
    let b = sibling(a.addr, 2, "b", Duration::ZERO).await;
    let answers = Arc::new(Mutex::new(vec![std::net::Ipv4Addr::new(127, 0, 0, 1)]));
    let queries = Arc::new(AtomicUsize::new(0));
    let dns = dns_server("app.test", answers.clone(), 1, queries.clone()).await;
    let dir = Arc::new(TempDir::new("dns-ttl"));
    let text = proxy_config(
        dir.path(),
        &format!("\"app.test:{}\"", a.addr.port()),
        "resolve = \"ttl\"",
        &format!("[resolver]\nnameservers = [\"{dns}\"]\n"),
    );
    let mut proxy = start_proxy(dir, &text).await;
    wait_members(proxy.admin, &[a.addr], Duration::from_secs(5)).await;
    let load = Load::start(proxy.addr, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let asked = queries.load(Ordering::SeqCst);
    *answers.lock().unwrap() = vec![std::net::Ipv4Addr::new(127, 0, 0, 2)];
    wait_members(proxy.admin, &[b.addr], Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(b.hits() > 0, "the new address gets the traffic");
    // A TTL of 1 s: a lookup (A and AAAA) about once a second, not a flood.
    let before = queries.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = queries.load(Ordering::SeqCst) - before;
    assert!(
        (2..=16).contains(&during),
        "{during} queries in 3 s (and {asked} at start)"
    );
    load.finish_without_failures(100).await;
    let (_, upstream) = common::admin(proxy.admin, "GET", "/admin/upstreams/app", "", None).await;
    assert_eq!(upstream["resolve"], "ttl");
    proxy.shutdown().await;
}

#[test]
fn a_bad_health_or_resolve_section_is_refused_with_the_field_named() {
    let dir = TempDir::new("bad-health");
    let cases = [
        ("interval = \"0s\"", "upstreams.app.health.interval"),
        ("rise = 0", "upstreams.app.health.rise"),
        ("fall = 0", "upstreams.app.health.fall"),
        ("path = \"healthz\"", "upstreams.app.health.path"),
        ("expect = \"200-99\"", "upstreams.app.health.expect"),
        ("expect = \"600\"", "upstreams.app.health.expect"),
        ("timeout = \"10s\"", "upstreams.app.health.timeout"),
        ("check = \"icmp\"", "upstreams.app.health.check"),
        (
            "check = \"tcp\"\npath = \"/x\"",
            "upstreams.app.health.path",
        ),
        ("service = \"api\"", "upstreams.app.health.service"),
        // gRPC needs HTTP/2 to the upstream, and has no path or expected status.
        ("check = \"grpc\"", "upstreams.app.health.check"),
        (
            "check = \"grpc\"\nexpect = \"200\"",
            "upstreams.app.health.expect",
        ),
    ];
    for (line, field) in cases {
        let text = proxy_config(
            dir.path(),
            "\"127.0.0.1:1\"",
            &format!("[upstreams.app.health]\n{line}\n"),
            "",
        );
        let error = splitgate::config::parse(Path::new("x.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(error.contains(field), "{line}: {error}");
    }
    for (extra, upstream_extra, field) in [
        ("", "resolve = \"sometimes\"", "upstreams.app.resolve"),
        ("", "resolve = \"10ms\"", "upstreams.app.resolve"),
        (
            "[resolver]\nnameservers = [\"dns.example\"]\n",
            "",
            "resolver.nameservers[0]",
        ),
    ] {
        let text = proxy_config(dir.path(), "\"127.0.0.1:1\"", upstream_extra, extra);
        let error = splitgate::config::parse(Path::new("x.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(error.contains(field), "{upstream_extra}{extra}: {error}");
    }
}
