//! Fleet: replicas that agree through a real etcd cluster (3 members on loopback, short
//! election timeouts). Each replica reaches each member through a TCP forwarder the test
//! can cut, so a partition needs no root. `.ci/run` installs `etcd-server`; without an
//! `etcd` binary these tests say so and pass, unless SPLITGATE_REQUIRE_ETCD is set.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};

/// `None` when there is no etcd to test against (and it is not required).
fn etcd_binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("etcd"))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("SPLITGATE_REQUIRE_ETCD").is_none(),
            "SPLITGATE_REQUIRE_ETCD is set but no etcd binary is on PATH (apt-get install etcd-server)"
        );
        eprintln!("SKIPPED: no etcd on PATH (apt-get install etcd-server; .ci/run does)");
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One fleet test at a time: each runs 3 etcd members and 3 replicas, and two at once
/// on a 2-core machine would make their timing bounds a matter of luck.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A 3-member etcd cluster on loopback; killed when dropped.
struct Etcd {
    /// Held while the cluster runs; handed back when a start is retried.
    one_at_a_time: Option<tokio::sync::MutexGuard<'static, ()>>,
    binary: PathBuf,
    dir: TempDir,
    members: Vec<Member>,
    initial_cluster: String,
}

struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
}

impl Etcd {
    /// Starts a cluster on free ports. A port found free can be taken by another test
    /// before etcd binds it, so a cluster that does not come up is started again on
    /// fresh ports (twice at most); each member's log says why it did not.
    async fn start(binary: PathBuf) -> Etcd {
        let mut one_at_a_time = Some(ONE_AT_A_TIME.lock().await);
        let mut failures = Vec::new();
        for attempt in 1..=3 {
            let dir = TempDir::new(&format!("etcd-{attempt}"));
            let members: Vec<Member> = (1..=3)
                .map(|i| Member {
                    name: format!("e{i}"),
                    client: SocketAddr::from(([127, 0, 0, 1], free_port())),
                    peer: SocketAddr::from(([127, 0, 0, 1], free_port())),
                    child: None,
                })
                .collect();
            let initial_cluster = members
                .iter()
                .map(|m| format!("{}=http://{}", m.name, m.peer))
                .collect::<Vec<_>>()
                .join(",");
            let mut etcd = Etcd {
                one_at_a_time: one_at_a_time.take(),
                binary: binary.clone(),
                dir,
                members,
                initial_cluster,
            };
            for i in 0..3 {
                etcd.start_member(i);
            }
            let mut unhealthy = None;
            for i in 0..3 {
                if !etcd.healthy_within(i, Duration::from_secs(20)).await {
                    unhealthy = Some(i);
                    break;
                }
            }
            let Some(i) = unhealthy else { return etcd };
            failures.push(format!("attempt {attempt}: {}", etcd.unhealthy(i)));
            for i in 0..3 {
                etcd.kill_member(i);
            }
            one_at_a_time = etcd.one_at_a_time.take();
        }
        panic!("no etcd cluster came up:\n{}", failures.join("\n"));
    }

    fn start_member(&mut self, i: usize) {
        let member = &self.members[i];
        let data = self.dir.path().join(&member.name);
        let child = Command::new(&self.binary)
            .args(["--name", &member.name])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &format!("http://{}", member.client)])
            .args([
                "--advertise-client-urls",
                &format!("http://{}", member.client),
            ])
            .args(["--listen-peer-urls", &format!("http://{}", member.peer)])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://{}", member.peer),
            ])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "splitgate-test"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "250"])
            .args([
                "--unsafe-no-fsync",
                "--logger",
                "zap",
                "--log-level",
                "error",
            ])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.log(i)).expect("etcd log"))
            .spawn()
            .expect("etcd starts");
        self.members[i].child = Some(child);
    }

    fn kill_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", self.members[i].name))
    }

    /// Why member `i` is not healthy: the end of its log.
    fn unhealthy(&self, i: usize) -> String {
        let log = std::fs::read_to_string(self.log(i)).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        format!(
            "etcd member {i} never became healthy; its log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    }

    async fn healthy_within(&self, i: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let reply = match TcpStream::connect(self.members[i].client).await {
                Ok(_) => try_send(
                    self.members[i].client,
                    http::Request::get("/health").body(full("")).unwrap(),
                )
                .await
                .ok(),
                Err(_) => None,
            };
            if let Some(reply) = reply {
                if reply.status == StatusCode::OK && reply.text().contains("true") {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn clients(&self) -> Vec<SocketAddr> {
        self.members.iter().map(|m| m.client).collect()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }
}

/// A TCP forwarder to one address that the test can cut (every open connection closed,
/// new ones refused) and heal.
#[derive(Clone)]
struct Link {
    addr: SocketAddr,
    cut: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Link {
    async fn to(target: SocketAddr) -> Link {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let link = Link {
            addr: listener.local_addr().unwrap(),
            cut: Arc::new(AtomicBool::new(false)),
            open: Arc::new(Mutex::new(Vec::new())),
        };
        let forwarder = link.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                // Registered before the check, so a cut in between still closes it.
                forwarder.open.lock().unwrap().push(task.abort_handle());
                if forwarder.cut.load(Ordering::SeqCst) {
                    task.abort();
                }
            }
        });
        link
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for task in self.open.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }
}

/// One splitgate replica: its links to each etcd member, and its state directory.
struct Replica {
    proxy: TestProxy,
    links: Vec<Link>,
    text: String,
}

impl Replica {
    async fn start(
        name: &str,
        etcd: &Etcd,
        stable: SocketAddr,
        canary: SocketAddr,
        route_extra: &str,
    ) -> Replica {
        Replica::start_with(name, etcd, &[stable], canary, route_extra).await
    }

    async fn start_with(
        name: &str,
        etcd: &Etcd,
        stable: &[SocketAddr],
        canary: SocketAddr,
        route_extra: &str,
    ) -> Replica {
        let mut links = Vec::new();
        for client in etcd.clients() {
            links.push(Link::to(client).await);
        }
        let dir = Arc::new(TempDir::new(name));
        let endpoints = links
            .iter()
            .map(|l| format!("\"http://{}\"", l.addr))
            .collect::<Vec<_>>()
            .join(", ");
        let mut text = config(
            dir.path(),
            stable,
            Some(&[canary]),
            "",
            "",
            &format!("canary_weight = 0\nsplit_key = [\"header:x-user-id\"]\n{route_extra}"),
        );
        text.push_str(&format!(
            "\n[fleet]\nbackend = \"etcd\"\nendpoints = [{endpoints}]\ncluster = \"test\"\nreplica = \"{name}\"\nrequest_timeout = \"500ms\"\n"
        ));
        let proxy = start_proxy(dir, &text).await;
        Replica { proxy, links, text }
    }

    fn cut(&self) {
        self.links.iter().for_each(Link::cut);
    }

    fn heal(&self) {
        self.links.iter().for_each(Link::heal);
    }

    async fn route(&self) -> serde_json::Value {
        admin(self.proxy.admin, "GET", "/admin/routes/main", "", None)
            .await
            .1
    }

    /// `POST /admin/routes/main/{action}` (`reset`, `rollback`).
    async fn post(&self, action: &str) -> (StatusCode, serde_json::Value) {
        admin(
            self.proxy.admin,
            "POST",
            &format!("/admin/routes/main/{action}"),
            "",
            None,
        )
        .await
    }

    async fn fleet(&self) -> serde_json::Value {
        admin(self.proxy.admin, "GET", "/admin/fleet", "", None)
            .await
            .1
    }

    async fn wait(&self, within: Duration, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
        wait_for_route(self.proxy.admin, within, what, check).await;
    }

    async fn wait_store(&self, up: bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let fleet = self.fleet().await;
            if fleet["store_up"] == up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "store_up never became {up}: {fleet}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn set_weight(&self, weight: u32) -> (StatusCode, serde_json::Value) {
        admin(
            self.proxy.admin,
            "PUT",
            "/admin/routes/main/weight",
            &format!("{{\"canary_weight\": {weight}}}"),
            None,
        )
        .await
    }
}

async fn fleet_of_three(
    name: &str,
    route_extra: &str,
) -> Option<(Etcd, Vec<Replica>, TestUpstream, TestUpstream)> {
    fleet_with(name, route_extra, named_upstream("canary").await).await
}

async fn fleet_with(
    name: &str,
    route_extra: &str,
    canary: TestUpstream,
) -> Option<(Etcd, Vec<Replica>, TestUpstream, TestUpstream)> {
    let etcd = Etcd::start(etcd_binary()?).await;
    let stable = named_upstream("stable").await;
    let replicas = start_replicas(&etcd, name, 1..=3, &stable, &canary, route_extra).await;
    Some((etcd, replicas, stable, canary))
}

/// In-process replicas `{name}-{i}` for each `i` of `numbers`, each once it reaches the
/// store.
async fn start_replicas(
    etcd: &Etcd,
    name: &str,
    numbers: std::ops::RangeInclusive<usize>,
    stable: &TestUpstream,
    canary: &TestUpstream,
    route_extra: &str,
) -> Vec<Replica> {
    let mut replicas = Vec::new();
    for i in numbers {
        let replica = Replica::start(
            &format!("{name}-{i}"),
            etcd,
            stable.addr,
            canary.addr,
            route_extra,
        )
        .await;
        replica.wait_store(true).await;
        replicas.push(replica);
    }
    replicas
}

/// Sets the weight through replica 1 and waits until every replica serves it.
async fn set_everywhere(replicas: &[Replica], weight: u32) {
    let (status, body) = replicas[0].set_weight(weight).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for replica in replicas {
        replica
            .wait(
                Duration::from_secs(1),
                &format!("weight {weight} everywhere"),
                weight_is(f64::from(weight)),
            )
            .await;
    }
}

fn weight_is(weight: f64) -> impl Fn(&serde_json::Value) -> bool {
    move |route| route["canary_weight"] == weight
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_set_through_one_replica_is_served_by_all_within_a_second() {
    let Some((_etcd, replicas, _stable, _canary)) = fleet_of_three("fleet-weight", "").await else {
        return;
    };
    let (status, body) = replicas[0].set_weight(40).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(
        body["canary_weight"], 40.0,
        "acknowledged after commit: {body}"
    );
    for replica in &replicas[1..] {
        replica
            .wait(
                Duration::from_secs(1),
                "the weight on every replica",
                weight_is(40.0),
            )
            .await;
    }
    // Each replica serves it: a user in the canary at 40 % is sent there by all three.
    for replica in &replicas {
        let mut canary = 0;
        for i in 0..50 {
            let reply = get(replica.proxy.addr, "/", &[("x-user-id", &format!("u{i}"))]).await;
            if reply.text().starts_with("canary\n") {
                canary += 1;
            }
        }
        assert!(
            (5..=35).contains(&canary),
            "about 40 % of 50 users on the canary, got {canary}"
        );
    }
    // Every replica applied the same revision, and says so.
    let revisions: Vec<_> = applied_revisions(&replicas).await;
    assert!(
        revisions.iter().all(|r| *r == revisions[0] && *r > 0),
        "{revisions:?}"
    );
    // The audit line names the replica the change was made on and the revision.
    let audit = std::fs::read_to_string(replicas[2].proxy.dir.path().join("audit.jsonl")).unwrap();
    let line = audit
        .lines()
        .rev()
        .find(|l| l.contains("\"action\":\"weight\""))
        .unwrap();
    assert!(line.contains("\"replica\":\"fleet-weight-1\""), "{line}");
    assert!(line.contains("\"revision\":"), "{line}");
}

async fn applied_revisions(replicas: &[Replica]) -> Vec<i64> {
    let mut revisions = Vec::new();
    for replica in replicas {
        revisions.push(replica.fleet().await["applied_revision"].as_i64().unwrap());
    }
    revisions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_errors_through_one_replica_trip_all_three_within_three_seconds() {
    let slo = "[routes.slo]\nwindow = \"30s\"\nmin_requests = 10\nmax_error_rate = 0.1\n";
    let Some((_etcd, replicas, _stable, _canary)) =
        fleet_with("fleet-trip", slo, failing_upstream().await).await
    else {
        return;
    };
    set_everywhere(&replicas, 50).await;
    // Failing canary traffic through replica 2 only, until its guard pulls the canary.
    let mut sent = 0;
    while replicas[1].route().await["slo"]["state"] != "tripped" {
        get(
            replicas[1].proxy.addr,
            "/",
            &[("x-user-id", &format!("t{sent}"))],
        )
        .await;
        sent += 1;
        assert!(sent < 2_000, "replica 2 never tripped");
    }
    let tripped = Instant::now();
    for replica in &replicas {
        replica
            .wait(Duration::from_secs(3), "the trip on every replica", |r| {
                r["canary_weight"] == 0.0 && r["slo"]["state"] == "tripped"
            })
            .await;
    }
    assert!(tripped.elapsed() < Duration::from_secs(3));
    // Tripped fleet-wide: a raise through another replica is refused.
    let (status, body) = replicas[2].set_weight(10).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    // A reset through any replica clears it everywhere.
    let (status, _) = replicas[2].post("reset").await;
    assert_eq!(status, StatusCode::OK);
    for replica in &replicas {
        replica
            .wait(Duration::from_secs(1), "the reset on every replica", |r| {
                r["slo"]["state"] != "tripped"
            })
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_store_down_raises_are_refused_and_a_rollback_applies_and_lands_later() {
    let Some((_etcd, replicas, _stable, _canary)) = fleet_of_three("fleet-down", "").await else {
        return;
    };
    set_everywhere(&replicas, 30).await;
    replicas[0].cut();
    let (status, body) = replicas[0].set_weight(60).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body["error"].as_str().unwrap().contains("etcd"), "{body}");
    replicas[0].wait_store(false).await;
    // Serving goes on at the last applied weight.
    assert_eq!(replicas[0].route().await["canary_weight"], 30.0);
    // A rollback applies here at once, and reaches the others once the store is back.
    let (status, body) = replicas[0].post("rollback").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["canary_weight"], 0.0);
    assert_eq!(replicas[1].route().await["canary_weight"], 30.0);
    replicas[0].heal();
    for replica in &replicas {
        replica
            .wait(
                Duration::from_secs(5),
                "the rollback on every replica",
                weight_is(0.0),
            )
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_restarted_with_the_store_down_serves_its_saved_state_not_the_file() {
    let Some((mut etcd, mut replicas, _stable, _canary)) =
        fleet_of_three("fleet-restart", "").await
    else {
        return;
    };
    assert_eq!(replicas[0].set_weight(25).await.0, StatusCode::OK);
    replicas[2]
        .wait(Duration::from_secs(1), "weight 25", weight_is(25.0))
        .await;
    for i in 0..3 {
        etcd.kill_member(i);
    }
    let replica = &mut replicas[2];
    assert!(replica.proxy.shutdown().await);
    // The file says 0; the fleet said 25, and the replica saved it.
    replica.proxy = start_proxy(replica.proxy.dir.clone(), &replica.text).await;
    assert_eq!(replica.route().await["canary_weight"], 25.0);
    assert_eq!(replica.fleet().await["store_up"], false);
    // Ready once the store was found unreachable: it serves what it saved.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ready = get(replica.proxy.admin, "/readyz", &[]).await;
        if ready.status == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {}", ready.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_made_before_a_fleet_wide_reset_is_not_re_applied() {
    let Some((_etcd, replicas, _stable, _canary)) = fleet_of_three("fleet-epoch", "").await else {
        return;
    };
    set_everywhere(&replicas, 20).await;
    // Replica 3 is cut off, trips on its own, and cannot publish it.
    replicas[2].cut();
    replicas[2].wait_store(false).await;
    replicas[2]
        .proxy
        .state()
        .trip("main", test_trip("test: seen while cut off"))
        .await
        .unwrap();
    assert_eq!(replicas[2].route().await["canary_weight"], 0.0);
    // Meanwhile the fleet is reset and raised again.
    let (status, _) = replicas[0].post("reset").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(replicas[0].set_weight(35).await.0, StatusCode::OK);
    replicas[2].heal();
    // Replica 3 drops its stale trip and follows the fleet; nobody is tripped.
    replicas[2]
        .wait(
            Duration::from_secs(5),
            "replica 3 following the fleet",
            |r| r["canary_weight"] == 35.0 && r["slo"]["state"] != "tripped",
        )
        .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for replica in &replicas {
        let route = replica.route().await;
        assert_eq!(route["canary_weight"], 35.0, "{route}");
    }
    let audit = std::fs::read_to_string(replicas[2].proxy.dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"action\":\"stale_trip\""), "{audit}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_fleet_section_is_refused_with_the_field_named() {
    let dir = TempDir::new("fleet-config");
    let base = config(
        dir.path(),
        &["127.0.0.1:1".parse().unwrap()],
        None,
        "",
        "",
        "",
    );
    for (fleet, expected) in [
        (
            "backend = \"etcd\"\ncluster = \"a\"",
            "fleet.endpoints: at least one etcd endpoint",
        ),
        (
            "backend = \"etcd\"\nendpoints = [\"10.0.0.1:2379\"]\ncluster = \"a\"",
            "fleet.endpoints[0]",
        ),
        (
            "backend = \"etcd\"\nendpoints = [\"https://10.0.0.1:2379\"]\ncluster = \"a\"",
            "https endpoints are not supported",
        ),
        (
            "backend = \"etcd\"\nendpoints = [\"http://10.0.0.1:2379\"]\ncluster = \"\"",
            "fleet.cluster",
        ),
        (
            "backend = \"etcd\"\nendpoints = [\"http://10.0.0.1:2379\"]",
            "fleet.cluster",
        ),
        (
            "backend = \"zookeeper\"",
            "fleet.backend: \"zookeeper\" is not a backend",
        ),
        ("endpoints = [\"http://10.0.0.1:2379\"]", "fleet.backend"),
    ] {
        let text = format!("{base}\n[fleet]\n{fleet}\n");
        let error = splitgate::config::parse(std::path::Path::new("t.toml"), &text)
            .err()
            .unwrap_or_else(|| panic!("accepted: {fleet}"))
            .to_string();
        assert!(error.contains(expected), "{fleet:?}: {error}");
    }
}

impl Etcd {
    async fn client(&self, i: usize) -> etcd_client::Client {
        etcd_client::Client::connect([format!("http://{}", self.members[i].client)], None)
            .await
            .unwrap()
    }

    /// The index of the member that leads now.
    async fn leader(&self) -> usize {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                continue;
            }
            let status = self.client(i).await.status().await.unwrap();
            if status.header().unwrap().member_id() == status.leader() {
                return i;
            }
        }
        panic!("no etcd member leads");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_within_three_seconds_of_killing_the_etcd_leader_and_no_weight_flaps() {
    let Some((mut etcd, replicas, _stable, _canary)) = fleet_of_three("fleet-leader", "").await
    else {
        return;
    };
    assert_eq!(replicas[0].set_weight(10).await.0, StatusCode::OK);
    let leader = etcd.leader().await;
    etcd.kill_member(leader);
    let killed = Instant::now();
    loop {
        let (status, body) = replicas[0].set_weight(20).await;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(
            killed.elapsed() < Duration::from_secs(3),
            "writes did not resume within 3 s of the leader's death: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for replica in &replicas {
        replica
            .wait(Duration::from_secs(1), "weight 20", weight_is(20.0))
            .await;
    }
    // No flapping: every replica stays at 20 while the cluster settles.
    for _ in 0..10 {
        for replica in &replicas {
            assert_eq!(replica.route().await["canary_weight"], 20.0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_while_the_store_compacts_relists_and_converges() {
    let Some((etcd, replicas, _stable, _canary)) = fleet_of_three("fleet-compact", "").await else {
        return;
    };
    replicas[2].cut();
    replicas[2].wait_store(false).await;
    for weight in [5, 15, 45] {
        assert_eq!(replicas[0].set_weight(weight).await.0, StatusCode::OK);
    }
    // Everything replica 3 would resume its watch from is compacted away.
    let mut client = etcd.client(0).await;
    let revision = client
        .get("/", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client.compact(revision, None).await.unwrap();
    assert_eq!(replicas[2].route().await["canary_weight"], 0.0);
    replicas[2].heal();
    replicas[2]
        .wait(
            Duration::from_secs(5),
            "replica 3 converging",
            weight_is(45.0),
        )
        .await;
    replicas[2].wait_store(true).await;
    assert!(
        replicas[2].fleet().await["applied_revision"]
            .as_i64()
            .unwrap()
            >= revision
    );
}

/// A replica run as its own `splitgate run` process, so the test can `kill -9` it.
struct ChildReplica {
    child: std::process::Child,
    config: PathBuf,
    admin: SocketAddr,
    proxy: SocketAddr,
    _dir: TempDir,
}

impl ChildReplica {
    async fn start(
        name: &str,
        etcd: &Etcd,
        stable: SocketAddr,
        canary: SocketAddr,
        route_extra: &str,
    ) -> ChildReplica {
        let dir = TempDir::new(name);
        let proxy = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let endpoints = etcd
            .clients()
            .iter()
            .map(|c| format!("\"http://{c}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let text = config(
            dir.path(),
            &[stable],
            Some(&[canary]),
            "",
            "",
            &format!("canary_weight = 0\nsplit_key = [\"header:x-user-id\"]\n{route_extra}"),
        )
        .replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"{proxy}\""), 1)
        .replacen("listen = \"127.0.0.1:0\"", &format!("listen = \"{admin}\""), 1)
            + &format!(
                "\n[fleet]\nbackend = \"etcd\"\nendpoints = [{endpoints}]\ncluster = \"test\"\nreplica = \"{name}\"\nrequest_timeout = \"500ms\"\n"
            );
        let config_path = dir.path().join("splitgate.toml");
        std::fs::write(&config_path, text).unwrap();
        let child = Self::spawn(&config_path);
        let replica = ChildReplica {
            child,
            config: config_path,
            admin,
            proxy,
            _dir: dir,
        };
        replica.wait_ready().await;
        replica
    }

    fn spawn(config: &std::path::Path) -> std::process::Child {
        Command::new(env!("CARGO_BIN_EXE_splitgate"))
            .args(["run", "-c"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if TcpStream::connect(self.admin).await.is_ok()
                && get(self.admin, "/readyz", &[]).await.status == StatusCode::OK
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the replica process never became ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn kill_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = Self::spawn(&self.config);
        self.wait_ready().await;
    }

    async fn route(&self) -> serde_json::Value {
        admin(self.admin, "GET", "/admin/routes/main", "", None)
            .await
            .1
    }
}

impl Drop for ChildReplica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_quorum_serving_goes_on_and_a_trip_survives_kill_9_and_lands_when_quorum_returns() {
    let Some(binary) = etcd_binary() else {
        return;
    };
    let mut etcd = Etcd::start(binary).await;
    let stable = named_upstream("stable").await;
    // A canary that is healthy until the test breaks it.
    let broken = Arc::new(AtomicBool::new(false));
    let switch = broken.clone();
    let canary = upstream(move |_request| {
        let broken = switch.load(Ordering::SeqCst);
        async move {
            let mut response = http::Response::new(full("canary\n"));
            if broken {
                *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            }
            response
        }
    })
    .await;
    let slo = "[routes.slo]\nwindow = \"30s\"\nmin_requests = 10\nmax_error_rate = 0.1\n";
    let mut child =
        ChildReplica::start("fleet-quorum-1", &etcd, stable.addr, canary.addr, slo).await;
    let others = start_replicas(&etcd, "fleet-quorum", 2..=3, &stable, &canary, slo).await;
    assert_eq!(others[0].set_weight(50).await.0, StatusCode::OK);
    for replica in &others {
        replica
            .wait(Duration::from_secs(1), "weight 50", weight_is(50.0))
            .await;
    }
    wait_for_route(
        child.admin,
        Duration::from_secs(2),
        "weight 50",
        weight_is(50.0),
    )
    .await;

    etcd.kill_member(1);
    etcd.kill_member(2);
    // Serving goes on: no failed request on any replica.
    for addr in [child.proxy, others[0].proxy.addr, others[1].proxy.addr] {
        for i in 0..30 {
            let reply = get(addr, "/", &[("x-user-id", &format!("q{i}"))]).await;
            assert_eq!(reply.status, StatusCode::OK);
        }
    }
    let (status, body) = others[0].set_weight(70).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    // The canary breaks; the replica process's own guard trips while quorum is lost.
    broken.store(true, Ordering::SeqCst);
    let mut sent = 0;
    while child.route().await["slo"]["state"] != "tripped" {
        get(child.proxy, "/", &[("x-user-id", &format!("k{sent}"))]).await;
        sent += 1;
        assert!(sent < 2_000, "the replica never tripped");
    }
    // kill -9 before it could publish: the trip was saved first, and survives.
    child.kill_and_restart().await;
    let route = child.route().await;
    assert_eq!(route["slo"]["state"], "tripped", "{route}");
    assert_eq!(route["canary_weight"], 0.0);
    assert_eq!(others[0].route().await["canary_weight"], 50.0);
    // Quorum returns: the trip reaches the store and every replica.
    etcd.start_member(1);
    etcd.start_member(2);
    for replica in &others {
        replica
            .wait(Duration::from_secs(10), "the trip on every replica", |r| {
                r["canary_weight"] == 0.0 && r["slo"]["state"] == "tripped"
            })
            .await;
    }
}

/// Each replica's own slice stays below `min_requests`; only the sum can be judged.
const THIN_SLO: &str = "[routes.slo]\nwindow = \"30s\"\nmin_requests = 30\nmax_error_rate = 0.1\n";

impl Replica {
    /// The replica that judges the fleet, as this one last saw it.
    async fn judge(&self) -> Option<String> {
        self.fleet().await["judge"].as_str().map(str::to_string)
    }

    /// Sends `n` requests from distinct users; returns how many failed.
    async fn traffic(&self, n: usize, tag: &str) -> usize {
        let mut failed = 0;
        for i in 0..n {
            let reply = get(
                self.proxy.addr,
                "/",
                &[("x-user-id", &format!("{tag}-{i}"))],
            )
            .await;
            if reply.status != StatusCode::OK {
                failed += 1;
            }
        }
        failed
    }
}

async fn wait_for_judge(replicas: &[Replica], not: Option<&str>, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(judge) = replicas[0].judge().await {
            if Some(judge.as_str()) != not {
                return judge;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no (new) judge within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for a judge and until it has seen every replica's member record: the judge
/// counts a replica's traffic from when it first sees it, so traffic sent before that
/// would be its starting point, not evidence. Records are written and read every
/// second, so two seconds after all three show, the judge has seen them.
async fn wait_until_the_judge_sees_everyone(replicas: &[Replica]) -> String {
    let judge = wait_for_judge(replicas, None, Duration::from_secs(5)).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while replicas[0].fleet().await["members"]
        .as_array()
        .map_or(0, Vec::len)
        < replicas.len()
    {
        assert!(Instant::now() < deadline, "not every member shows");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    judge
}

async fn wait_fleet_tripped(replicas: &[Replica]) {
    for replica in replicas {
        replica
            .wait(Duration::from_secs(10), "the fleet judge's trip", |r| {
                r["canary_weight"] == 0.0
                    && r["slo"]["state"] == "tripped"
                    && r["slo"]["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("fleet judge"))
            })
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_judge_trips_a_canary_every_replica_saw_too_little_of_alone() {
    let Some((_etcd, replicas, _stable, _canary)) =
        fleet_with("fleet-judge", THIN_SLO, failing_upstream().await).await
    else {
        return;
    };
    wait_until_the_judge_sees_everyone(&replicas).await;
    set_everywhere(&replicas, 100).await;
    // 9 failing canary requests per replica: 27 in all, below min_requests (30): no
    // verdict yet, not even from the fleet judge (it counts each request once).
    for (i, replica) in replicas.iter().enumerate() {
        assert_eq!(replica.traffic(9, &format!("r{i}")).await, 9);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for replica in &replicas {
        let route = replica.route().await;
        assert_ne!(
            route["slo"]["state"], "tripped",
            "judged below min_requests: {route}"
        );
    }
    // 3 more on each: 12 per replica (each still below 30), 36 in all.
    for (i, replica) in replicas.iter().enumerate() {
        assert_eq!(replica.traffic(3, &format!("s{i}")).await, 3);
    }
    wait_fleet_tripped(&replicas).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_judge_replica_dies_another_judges_within_the_lease() {
    let Some((_etcd, replicas, _stable, _canary)) =
        fleet_with("fleet-handover", THIN_SLO, failing_upstream().await).await
    else {
        return;
    };
    let judge = wait_for_judge(&replicas, None, Duration::from_secs(5)).await;
    let index = replicas
        .iter()
        .position(|r| {
            judge.ends_with(&format!(
                "-{}",
                replicas.iter().position(|x| std::ptr::eq(x, r)).unwrap() + 1
            ))
        })
        .unwrap();
    // Cut off from etcd, the judge is as good as dead to the fleet: its lease expires.
    replicas[index].cut();
    let died = Instant::now();
    let others: Vec<&Replica> = replicas
        .iter()
        .filter(|r| !std::ptr::eq(*r, &replicas[index]))
        .collect();
    let deadline = died + Duration::from_secs(8);
    let successor = loop {
        if let Some(now) = others[0].judge().await {
            if now != judge {
                break now;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no new judge 8 s after the judge died"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "judge {judge} replaced by {successor} after {:?}",
        died.elapsed()
    );
    // The new judge judges: a thin bad canary across the two live replicas trips.
    assert_eq!(others[0].set_weight(100).await.0, StatusCode::OK);
    for replica in &others {
        replica
            .wait(Duration::from_secs(1), "weight 100", weight_is(100.0))
            .await;
    }
    for (i, replica) in others.iter().enumerate() {
        assert_eq!(replica.traffic(20, &format!("h{i}")).await, 20);
    }
    for replica in &others {
        replica
            .wait(Duration::from_secs(10), "the new judge's trip", |r| {
                r["slo"]["state"] == "tripped"
                    && r["slo"]["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("fleet judge"))
            })
            .await;
    }
}

fn test_trip(detail: &str) -> splitgate::state::Trip {
    splitgate::state::Trip {
        reason: "error_rate".into(),
        detail: detail.into(),
        at: "2026-11-27T00:00:00Z".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollback_made_while_cut_off_never_clears_a_trip_made_meanwhile() {
    let Some((_etcd, replicas, _stable, _canary)) = fleet_of_three("fleet-rollback", "").await
    else {
        return;
    };
    assert_eq!(replicas[0].set_weight(40).await.0, StatusCode::OK);
    replicas[2]
        .wait(Duration::from_secs(1), "weight 40", weight_is(40.0))
        .await;
    replicas[2].cut();
    replicas[2].wait_store(false).await;
    let (status, _) = replicas[2].post("rollback").await;
    assert_eq!(status, StatusCode::OK);
    replicas[0]
        .proxy
        .state()
        .trip("main", test_trip("test: tripped by replica 1"))
        .await
        .unwrap();
    replicas[1]
        .wait(Duration::from_secs(3), "replica 2 tripped", |r| {
            r["slo"]["state"] == "tripped"
        })
        .await;
    replicas[2].heal();
    // The rollback lands without clearing the trip: every replica stays tripped, and a
    // raise is refused everywhere.
    replicas[2]
        .wait(Duration::from_secs(5), "replica 3 tripped", |r| {
            r["slo"]["state"] == "tripped"
        })
        .await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for replica in &replicas {
        let route = replica.route().await;
        assert_eq!(route["slo"]["state"], "tripped", "{route}");
        assert_eq!(route["canary_weight"], 0.0);
        assert_eq!(replica.set_weight(10).await.0, StatusCode::CONFLICT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trip_made_while_cut_off_refuses_raises_there_and_lands_once_healed() {
    let Some((_etcd, replicas, _stable, _canary)) = fleet_of_three("fleet-pending", "").await
    else {
        return;
    };
    assert_eq!(replicas[0].set_weight(20).await.0, StatusCode::OK);
    replicas[0]
        .wait(Duration::from_secs(1), "weight 20", weight_is(20.0))
        .await;
    // Tripped here while cut off: a raise through this replica is refused. (Once the
    // store answers, a raise while the trip is still being published is a 409:
    // `fleet::tests::a_pending_local_trip_counts_until_the_store_has_it`.)
    replicas[0].cut();
    replicas[0].wait_store(false).await;
    replicas[0]
        .proxy
        .state()
        .trip("main", test_trip("test: pending"))
        .await
        .unwrap();
    let (status, body) = replicas[0].set_weight(60).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    replicas[0].heal();
    replicas[1]
        .wait(Duration::from_secs(5), "the trip published", |r| {
            r["slo"]["state"] == "tripped"
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_written_values_in_the_store_never_expose_a_tripped_canary_nor_block_a_rollback() {
    let Some((etcd, replicas, _stable, _canary)) = fleet_of_three("fleet-values", "").await else {
        return;
    };
    let mut client = etcd.client(0).await;
    let key = "/splitgate/v1/test/routes/main";
    // A tripped value that claims a weight: the route serves weight 0.
    client
        .put(
            key,
            r#"{"weight_bp": 5000, "trip": {"reason": "manual", "detail": "etcdctl", "at": "2026-11-27T00:00:00Z"}}"#,
            None,
        )
        .await
        .unwrap();
    for replica in &replicas {
        replica
            .wait(Duration::from_secs(2), "the hand-written trip", |r| {
                r["slo"]["state"] == "tripped" && r["canary_weight"] == 0.0
            })
            .await;
    }
    for i in 0..40 {
        let reply = get(
            replicas[1].proxy.addr,
            "/",
            &[("x-user-id", &format!("v{i}"))],
        )
        .await;
        assert!(reply.text().starts_with("stable\n"));
    }
    // A value nobody can read: changes are refused with the key named, a rollback is not.
    client.put(key, "not json", None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, body) = replicas[0].post("reset").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().unwrap().contains(key), "{body}");
    let (status, body) = replicas[0].post("rollback").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let value = client.get(key, None).await.unwrap();
    let value = std::str::from_utf8(value.kvs()[0].value())
        .unwrap()
        .to_string();
    assert!(value.contains("\"weight_bp\":0"), "{value}");
}

/// Runs the deploy CLI against a replica's admin API.
fn cli(args: &[&str], admin: SocketAddr) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_splitgate"))
        .args(args)
        .args(["--admin", &format!("http://{admin}")])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_status_shows_every_member_and_the_judge_and_fails_when_the_store_is_gone() {
    let Some((_etcd, replicas, _stable, _canary)) = fleet_of_three("fleet-cli", "").await else {
        return;
    };
    let judge = wait_for_judge(&replicas, None, Duration::from_secs(5)).await;
    let admin = replicas[1].proxy.admin;
    // Every member shows once each replica has published its record.
    let deadline = Instant::now() + Duration::from_secs(5);
    let text = loop {
        let (ok, text) = tokio::task::spawn_blocking(move || cli(&["fleet", "status"], admin))
            .await
            .unwrap();
        assert!(ok, "{text}");
        // Replica 2 reads the judge's key each beat: it may name it a beat after replica 1.
        if (1..=3).all(|i| text.contains(&format!("fleet-cli-{i} ")))
            && text.contains(&format!("judge: {judge}"))
        {
            break text;
        }
        assert!(Instant::now() < deadline, "not every member shows: {text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        text.contains("cluster test, replica fleet-cli-2: store up"),
        "{text}"
    );
    assert!(text.contains(&format!("judge: {judge}")), "{text}");
    // The same weight change is visible through the deploy CLI on any replica.
    let (ok, text) = tokio::task::spawn_blocking(move || cli(&["weight", "main", "15"], admin))
        .await
        .unwrap();
    assert!(ok, "{text}");
    replicas[0]
        .wait(Duration::from_secs(1), "weight 15", weight_is(15.0))
        .await;
    // Cut off: the command says so and exits 1.
    replicas[1].cut();
    replicas[1].wait_store(false).await;
    let (ok, text) = tokio::task::spawn_blocking(move || cli(&["fleet", "status"], admin))
        .await
        .unwrap();
    assert!(!ok, "{text}");
    assert!(text.contains("store DOWN"), "{text}");
    assert!(text.contains("cannot reach the fleet store"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_judge_keeps_judging_after_a_store_outage_shorter_than_its_lease() {
    let Some((_etcd, replicas, _stable, _canary)) =
        fleet_with("fleet-blip", THIN_SLO, failing_upstream().await).await
    else {
        return;
    };
    let judge = wait_until_the_judge_sees_everyone(&replicas).await;
    let index = (0..replicas.len())
        .find(|i| judge == format!("fleet-blip-{}", i + 1))
        .unwrap();
    // Cut off for well under the lease (3 s, renewed every second): its rounds fail,
    // its lease and key survive.
    replicas[index].cut();
    tokio::time::sleep(Duration::from_millis(500)).await;
    replicas[index].heal();
    replicas[index].wait_store(true).await;
    assert_eq!(replicas[0].set_weight(100).await.0, StatusCode::OK);
    for replica in &replicas {
        replica
            .wait(Duration::from_secs(2), "weight 100", weight_is(100.0))
            .await;
    }
    for (i, replica) in replicas.iter().enumerate() {
        assert_eq!(replica.traffic(12, &format!("b{i}")).await, 12);
    }
    wait_fleet_tripped(&replicas).await;
    // Still the same judge: it never lost its key.
    assert_eq!(replicas[0].judge().await.as_deref(), Some(judge.as_str()));
}

/// `GET /admin/upstreams/stable-pool/instances/{addr}` on `replica`.
async fn instance_on(replica: &Replica, addr: SocketAddr) -> serde_json::Value {
    admin(
        replica.proxy.admin,
        "GET",
        &format!("/admin/upstreams/stable-pool/instances/{addr}"),
        "",
        None,
    )
    .await
    .1
}

async fn wait_instance_on(
    replica: &Replica,
    addr: SocketAddr,
    what: &str,
    check: impl Fn(&serde_json::Value) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let value = instance_on(replica, addr).await;
        if check(&value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {value}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_through_one_replica_applies_to_all_and_waits_for_their_requests() {
    let Some(binary) = etcd_binary() else { return };
    let etcd = Etcd::start(binary).await;
    let a = slow_upstream(Duration::from_millis(1500), "a").await;
    let b = named_upstream("b").await;
    let canary = named_upstream("canary").await;
    let mut replicas = Vec::new();
    for i in 1..=2 {
        let replica = Replica::start_with(
            &format!("inst-{i}"),
            &etcd,
            &[a.addr, b.addr],
            canary.addr,
            "",
        )
        .await;
        replica.wait_store(true).await;
        replicas.push(replica);
    }
    let set = |replica: &Replica, addr: SocketAddr, to: &str| {
        let admin_addr = replica.proxy.admin;
        let path = format!("/admin/upstreams/stable-pool/instances/{addr}/state");
        let body = format!("{{\"state\": \"{to}\"}}");
        async move {
            let (status, value) = admin(admin_addr, "PUT", &path, &body, None).await;
            assert_eq!(status, StatusCode::OK, "{value}");
        }
    };
    // b drained through replica 1 is drained on replica 2: its slow requests go to a.
    set(&replicas[0], b.addr, "drain").await;
    wait_instance_on(&replicas[1], b.addr, "b drained on replica 2", |i| {
        i["state"] == "drain"
    })
    .await;
    let started = Instant::now();
    let proxy = replicas[1].proxy.addr;
    let slow: Vec<_> = (0..10)
        .map(|i| {
            tokio::spawn(async move {
                get(proxy, "/", &[("x-user-id", &format!("s{i}"))])
                    .await
                    .text()
            })
        })
        .collect();
    wait_instance_on(&replicas[1], a.addr, "10 in flight on replica 2", |i| {
        i["in_flight"] == 10
    })
    .await;
    set(&replicas[0], b.addr, "ready").await;
    wait_instance_on(&replicas[1], b.addr, "b ready on replica 2", |i| {
        i["state"] == "ready"
    })
    .await;

    // Drain a through replica 1, which has nothing in flight to it: the wait is for
    // replica 2's requests.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_splitgate"))
        .args([
            "instance",
            "drain",
            "stable-pool",
            &a.addr.to_string(),
            "--wait",
            "--timeout",
            "30s",
        ])
        .args(["--admin", &format!("http://{}", replicas[0].proxy.admin)])
        .output()
        .await
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{output}");
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "returned after {:?}, before replica 2's requests could finish: {output}",
        started.elapsed()
    );
    for request in slow {
        assert_eq!(request.await.unwrap(), "a");
    }
    wait_instance_on(&replicas[1], a.addr, "a drained on replica 2", |i| {
        i["state"] == "drain"
    })
    .await;
    for i in 0..10 {
        let text = get(proxy, "/", &[("x-user-id", &format!("n{i}"))])
            .await
            .text();
        assert!(
            text.starts_with("b\n"),
            "a drained instance gets no new request: {text}"
        );
    }
    let audit = std::fs::read_to_string(replicas[1].proxy.dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("instance_state") && l.contains("\"replica\":\"inst-1\"")),
        "replica 2 audits the change with the replica it was made through: {audit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_freeze_through_one_replica_holds_every_replica() {
    let Some((_etcd, replicas, _stable, _canary)) = fleet_of_three("fleet-freeze", "").await else {
        return;
    };
    let frozen_everywhere = |reason: Option<&'static str>| {
        let admins: Vec<SocketAddr> = replicas.iter().map(|r| r.proxy.admin).collect();
        async move {
            let deadline = Instant::now() + Duration::from_secs(5);
            for admin_addr in admins {
                loop {
                    let (_, value) = admin(admin_addr, "GET", "/admin/freeze", "", None).await;
                    if value["frozen"]["reason"].as_str() == reason {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "freeze {reason:?} never reached {admin_addr}: {value}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    let (status, body) = admin(
        replicas[0].proxy.admin,
        "PUT",
        "/admin/freeze",
        r#"{"frozen": true, "reason": "incident 7"}"#,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body["frozen"]["by"]
            .as_str()
            .unwrap()
            .contains("fleet-freeze-1"),
        "{body}"
    );
    frozen_everywhere(Some("incident 7")).await;
    let (status, body) = admin(
        replicas[2].proxy.admin,
        "PUT",
        "/admin/freeze",
        r#"{"frozen": false}"#,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    frozen_everywhere(None).await;
}
