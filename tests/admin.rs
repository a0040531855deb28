//! The admin API and runtime state: hot weights, refusals, auth, reload, durability.

mod common;

use std::sync::Arc;

use common::*;
use http::StatusCode;
use serde_json::Value;
use splitgate::state::{Source, Trip};

struct Setup {
    proxy: TestProxy,
    stable: TestUpstream,
    canary: TestUpstream,
}

async fn setup(server_extra: &str, route_extra: &str) -> Setup {
    let (proxy, stable, canary) = split_proxy("admin", server_extra, route_extra).await;
    Setup {
        proxy,
        stable,
        canary,
    }
}

async fn weight_of(admin: std::net::SocketAddr) -> f64 {
    let (status, body) = common::admin(admin, "GET", "/admin/routes/main", "", None).await;
    assert_eq!(status, StatusCode::OK);
    body["canary_weight"].as_f64().unwrap()
}

fn audit_lines(proxy: &TestProxy) -> Vec<Value> {
    std::fs::read_to_string(proxy.dir.path().join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn weight_changes_take_effect_and_are_audited() {
    let s = setup("", "").await;
    let (status, list) = admin(s.proxy.admin, "GET", "/admin/routes", "", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(list["routes"][0]["name"], "main");
    assert_eq!(list["routes"][0]["canary_weight"], 10.0);

    let (status, body) = admin(
        s.proxy.admin,
        "PUT",
        "/admin/routes/main/weight",
        r#"{"canary_weight": 100}"#,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["canary_weight"], 100.0);
    for i in 0..20 {
        let reply = get(s.proxy.addr, "/", &[("x-user-id", &format!("u{i}"))]).await;
        assert!(reply.text().starts_with("canary"));
        assert_eq!(reply.headers["x-splitgate-variant"], "canary");
    }
    let (status, body) = admin(
        s.proxy.admin,
        "POST",
        "/admin/routes/main/rollback",
        "",
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["canary_weight"], 0.0);
    for i in 0..20 {
        assert!(get(s.proxy.addr, "/", &[("x-user-id", &format!("u{i}"))])
            .await
            .text()
            .starts_with("stable"));
    }
    assert_eq!(s.canary.hits(), 20);
    assert_eq!(s.stable.hits(), 20);

    let audit = audit_lines(&s.proxy);
    let changes: Vec<(f64, f64, &str)> = audit
        .iter()
        .filter(|l| l["action"] == "weight")
        .map(|l| {
            (
                l["old_weight"].as_f64().unwrap(),
                l["new_weight"].as_f64().unwrap(),
                l["source"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(changes, vec![(10.0, 100.0, "admin"), (100.0, 0.0, "admin")]);
    assert!(audit
        .iter()
        .all(|l| l["time"].as_str().unwrap().ends_with('Z')));
}

#[tokio::test]
async fn bad_admin_requests_are_refused_and_change_nothing() {
    let s = setup("", "").await;
    let a = s.proxy.admin;
    let cases: [(&str, &str, &str, StatusCode); 9] = [
        (
            "PUT",
            "/admin/routes/main/weight",
            "{not json",
            StatusCode::BAD_REQUEST,
        ),
        (
            "PUT",
            "/admin/routes/main/weight",
            r#"{"canary_weight": 101}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            "PUT",
            "/admin/routes/main/weight",
            r#"{"canary_weight": -1}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            "PUT",
            "/admin/routes/main/weight",
            r#"{"canary_weight": 12.345}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            "PUT",
            "/admin/routes/main/weight",
            r#"{"canary_weight": "25"}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            "PUT",
            "/admin/routes/main/weight",
            r#"{"canary_weight": 25, "extra": 1}"#,
            StatusCode::BAD_REQUEST,
        ),
        (
            "PUT",
            "/admin/routes/nope/weight",
            r#"{"canary_weight": 25}"#,
            StatusCode::NOT_FOUND,
        ),
        (
            "GET",
            "/admin/routes/main/weight",
            "",
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            "POST",
            "/admin/routes/main/weight",
            r#"{"canary_weight": 25}"#,
            StatusCode::METHOD_NOT_ALLOWED,
        ),
    ];
    for (method, path, body, want) in cases {
        let (status, reply) = admin(a, method, path, body, None).await;
        assert_eq!(status, want, "{method} {path} {body}: {reply}");
        assert!(
            reply["error"].is_string(),
            "{method} {path}: reason expected, got {reply}"
        );
    }
    let huge = format!(r#"{{"canary_weight": 25, "pad": "{}"}}"#, "x".repeat(5000));
    let (status, _) = admin(a, "PUT", "/admin/routes/main/weight", &huge, None).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, _) = admin(a, "POST", "/admin/routes/main/rollback", "{broken", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = admin(a, "GET", "/admin/nothing-here", "", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    assert_eq!(weight_of(a).await, 10.0);
    assert!(
        audit_lines(&s.proxy).iter().all(|l| l["action"] == "init"),
        "refusals must not be audited as changes"
    );
    // Two decimals are fine.
    let (status, body) = admin(
        a,
        "PUT",
        "/admin/routes/main/weight",
        r#"{"canary_weight": 12.34}"#,
        None,
    )
    .await;
    assert_eq!(
        (status, body["canary_weight"].as_f64()),
        (StatusCode::OK, Some(12.34))
    );
}

/// A tokenless admin API (loopback only) answers only requests that address it by IP
/// or `localhost`: a web page that re-pointed its own DNS name at 127.0.0.1 reads
/// nothing (DNS rebinding), and a change needs JSON, which a page elsewhere cannot send
/// without a preflight (CSRF). Liveness and readiness answer whatever the Host.
#[tokio::test]
async fn a_tokenless_admin_api_answers_only_requests_addressed_to_it_by_ip_or_localhost() {
    let s = setup("", "").await;
    let a = s.proxy.admin;
    let rebound = format!("evil.example:{}", a.port());
    for path in ["/admin/routes", "/metrics", "/", "/healthz?verbose=1"] {
        let reply = get(a, path, &[("host", &rebound)]).await;
        assert_eq!(reply.status, StatusCode::FORBIDDEN, "{path}");
        assert!(reply.text().contains("Host"), "{path}: {}", reply.text());
        assert!(!reply.text().contains("main"), "{path} leaked a route");
    }
    for path in ["/healthz", "/readyz"] {
        assert_eq!(
            get(a, path, &[("host", &rebound)]).await.status,
            StatusCode::OK
        );
    }
    for host in [format!("localhost:{}", a.port()), a.to_string()] {
        let reply = get(a, "/admin/routes", &[("host", &host)]).await;
        assert_eq!(reply.status, StatusCode::OK, "{host}");
        assert!(reply.text().contains("main"));
    }
    let form = send(
        a,
        http::Request::put("/admin/routes/main/weight")
            .header("content-type", "text/plain")
            .body(full(r#"{"canary_weight": 50}"#))
            .unwrap(),
    )
    .await;
    assert_eq!(form.status, StatusCode::FORBIDDEN, "{}", form.text());
    assert_eq!(weight_of(a).await, 10.0);
}

#[tokio::test]
async fn changes_need_the_bearer_token_when_one_is_set() {
    // A variable name of this test's own: tests share the process environment.
    std::env::set_var("SPLITGATE_TEST_TOKEN_AUTH", "s3cret-token");
    let s = setup("", "").await;
    drop(s);
    let stable = named_upstream("stable").await;
    let canary = named_upstream("canary").await;
    let dir = Arc::new(TempDir::new("auth"));
    let mut text = config(
        dir.path(),
        &[stable.addr],
        Some(&[canary.addr]),
        "",
        "",
        "canary_weight = 10",
    );
    text = text.replace(
        "[admin]\n",
        "[admin]\ntoken_env = \"SPLITGATE_TEST_TOKEN_AUTH\"\n",
    );
    let proxy = start_proxy(dir, &text).await;
    let a = proxy.admin;
    let body = r#"{"canary_weight": 50}"#;
    let (status, _) = admin(a, "PUT", "/admin/routes/main/weight", body, None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = admin(
        a,
        "PUT",
        "/admin/routes/main/weight",
        body,
        Some("wrong-token!"),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = admin(a, "POST", "/admin/reload", "", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        weight_of(a).await,
        10.0,
        "reads need no token; refused changes changed nothing"
    );
    let (status, _) = admin(
        a,
        "PUT",
        "/admin/routes/main/weight",
        body,
        Some("s3cret-token"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(weight_of(a).await, 50.0);
}

#[tokio::test]
async fn a_non_loopback_admin_address_without_a_token_refuses_to_start() {
    let stable = named_upstream("stable").await;
    let dir = TempDir::new("exposed");
    let text = config(dir.path(), &[stable.addr], None, "", "", "").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"0.0.0.0:0\"\ntoken_env = \"SPLITGATE_TEST_TOKEN_UNSET\"",
    );
    let settings = splitgate::config::parse(std::path::Path::new("x.toml"), &text).unwrap();
    let error = splitgate::app::start(settings, None)
        .await
        .err()
        .expect("must refuse");
    assert!(
        error
            .to_string()
            .contains("refusing to expose the admin API"),
        "{error}"
    );
}

fn trip() -> Trip {
    Trip {
        reason: "error_rate".into(),
        detail: "test".into(),
        at: "2026-01-01T00:00:00.000Z".into(),
    }
}

#[tokio::test]
async fn a_tripped_route_refuses_a_weight_increase_until_reset() {
    let s = setup("", "").await;
    s.proxy.state().trip("main", trip()).await.unwrap();
    let a = s.proxy.admin;
    let (status, body) = admin(a, "GET", "/admin/routes/main", "", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (
            body["canary_weight"].as_f64(),
            body["slo"]["state"].as_str()
        ),
        (Some(0.0), Some("tripped"))
    );
    let (status, body) = admin(
        a,
        "PUT",
        "/admin/routes/main/weight",
        r#"{"canary_weight": 5}"#,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(weight_of(a).await, 0.0);
    let (status, body) = admin(a, "POST", "/admin/routes/main/reset", "", None).await;
    assert_eq!(
        (status, body["slo"]["state"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let (status, _) = admin(
        a,
        "PUT",
        "/admin/routes/main/weight",
        r#"{"canary_weight": 5}"#,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn reload_applies_a_good_file_and_refuses_a_bad_one() {
    let s = setup("", "").await;
    let a = s.proxy.admin;
    // A runtime weight survives a reload that leaves the route's file weight alone.
    admin(
        a,
        "PUT",
        "/admin/routes/main/weight",
        r#"{"canary_weight": 30}"#,
        None,
    )
    .await;
    let original = std::fs::read_to_string(&s.proxy.config_path).unwrap();
    let with_second_route = format!("{original}\n[[routes]]\nname = \"extra\"\npath_prefix = \"/extra\"\nstable = \"stable-pool\"\n");
    std::fs::write(&s.proxy.config_path, &with_second_route).unwrap();
    let (status, body) = admin(a, "POST", "/admin/reload", "", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let (status, _) = admin(a, "GET", "/admin/routes/extra", "", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(weight_of(a).await, 30.0);

    // A bad file: 400 with every error, nothing changes.
    std::fs::write(
        &s.proxy.config_path,
        with_second_route
            .replace("stable = \"stable-pool\"\n\n", "stable = \"ghost\"\n\n")
            .replace("canary_weight = 10", "canary_weight = 500"),
    )
    .unwrap();
    let generation = admin(a, "GET", "/admin/routes", "", None).await.1["generation"].clone();
    let (status, body) = admin(a, "POST", "/admin/reload", "", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let errors = body["errors"].as_array().unwrap();
    assert!(
        errors
            .iter()
            .any(|e| e.as_str().unwrap().contains("canary_weight")),
        "{body}"
    );
    assert_eq!(
        admin(a, "GET", "/admin/routes", "", None).await.1["generation"],
        generation
    );
    assert_eq!(weight_of(a).await, 30.0);
    assert_eq!(
        get(s.proxy.addr, "/extra", &[]).await.status,
        StatusCode::OK
    );

    // Changing the file's weight is a deliberate edit: the file wins.
    std::fs::write(
        &s.proxy.config_path,
        with_second_route.replace("canary_weight = 10", "canary_weight = 2"),
    )
    .unwrap();
    let (status, _) = admin(a, "POST", "/admin/reload", "", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(weight_of(a).await, 2.0);
    let audit = audit_lines(&s.proxy);
    assert!(
        audit
            .iter()
            .any(|l| l["source"] == "reload" && l["new_weight"] == 2.0),
        "{audit:?}"
    );
    let metrics = get(a, "/metrics", &[]).await.text();
    assert!(
        metrics.contains("splitgate_config_reloads_total{outcome=\"ok\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("splitgate_config_reloads_total{outcome=\"error\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn weights_and_trips_survive_a_restart() {
    let s = setup("", "").await;
    admin(
        s.proxy.admin,
        "PUT",
        "/admin/routes/main/weight",
        r#"{"canary_weight": 42.5}"#,
        None,
    )
    .await;
    let dir = s.proxy.dir.clone();
    let text = std::fs::read_to_string(&s.proxy.config_path).unwrap();
    let mut proxy = s.proxy;
    proxy.shutdown().await;
    let proxy = start_proxy(dir.clone(), &text).await;
    assert_eq!(weight_of(proxy.admin).await, 42.5);

    proxy.state().trip("main", trip()).await.unwrap();
    let mut proxy = proxy;
    proxy.shutdown().await;
    let proxy = start_proxy(dir, &text).await;
    let (_, body) = admin(proxy.admin, "GET", "/admin/routes/main", "", None).await;
    assert_eq!(body["slo"]["state"], "tripped");
    assert_eq!(body["canary_weight"], 0.0);
}

#[tokio::test]
async fn a_corrupt_state_file_starts_every_canary_at_zero_tripped() {
    let s = setup("", "").await;
    let dir = s.proxy.dir.clone();
    let text = std::fs::read_to_string(&s.proxy.config_path).unwrap();
    let mut proxy = s.proxy;
    proxy.shutdown().await;
    std::fs::write(
        dir.path().join("state.json"),
        b"{\"version\": 1, \"routes\": {\"main\": tru",
    )
    .unwrap();
    let proxy = start_proxy(dir.clone(), &text).await;
    let (_, body) = admin(proxy.admin, "GET", "/admin/routes/main", "", None).await;
    assert_eq!(body["canary_weight"], 0.0);
    assert_eq!(body["slo"]["reason"], "corrupt_state");
    let kept = std::fs::read_dir(dir.path()).unwrap().filter(|e| {
        e.as_ref()
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("state.json.corrupt-")
    });
    assert_eq!(kept.count(), 1, "the corrupt file is kept for inspection");
    // Stable still serves.
    assert!(get(proxy.addr, "/", &[("x-user-id", "anyone")])
        .await
        .text()
        .starts_with("stable"));
}

#[tokio::test]
async fn weight_changes_and_reloads_under_load_drop_no_request_and_mix_no_generations() {
    let s = setup("", "").await;
    let addr = s.proxy.addr;
    let a = s.proxy.admin;
    let clients: Vec<_> = (0..4)
        .map(|c| {
            tokio::spawn(async move {
                let mut served = 0;
                for i in 0..150 {
                    let reply = get(addr, "/", &[("x-user-id", &format!("c{c}-u{i}"))]).await;
                    assert_eq!(reply.status, StatusCode::OK);
                    // The side named in the response header is the side that served it.
                    let side = reply.headers["x-splitgate-variant"]
                        .to_str()
                        .unwrap()
                        .to_string();
                    assert!(
                        reply.text().starts_with(&side),
                        "header says {side}, body {}",
                        reply.text()
                    );
                    served += 1;
                }
                served
            })
        })
        .collect();
    for i in 0..100 {
        let weight = (i * 37) % 101;
        let (status, _) = admin(
            a,
            "PUT",
            "/admin/routes/main/weight",
            &format!("{{\"canary_weight\": {weight}}}"),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        if i % 5 == 0 {
            let (status, _) = admin(a, "POST", "/admin/reload", "", None).await;
            assert_eq!(status, StatusCode::OK);
        }
    }
    let mut total = 0;
    for client in clients {
        total += client.await.unwrap();
    }
    assert_eq!(total, 600);
    assert_eq!(s.stable.hits() + s.canary.hits(), 600);
}

#[tokio::test]
async fn sticky_cookie_keeps_a_keyless_user_on_one_side() {
    let s = setup("", "").await;
    admin(
        s.proxy.admin,
        "PUT",
        "/admin/routes/main/weight",
        r#"{"canary_weight": 50}"#,
        None,
    )
    .await;
    let first = get(s.proxy.addr, "/", &[]).await;
    let cookie = first.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(cookie.starts_with("splitgate_uid="), "{cookie}");
    let side = first.headers["x-splitgate-variant"].clone();
    for _ in 0..10 {
        let again = get(s.proxy.addr, "/", &[("cookie", &cookie)]).await;
        assert_eq!(again.headers["x-splitgate-variant"], side);
        assert!(again.headers.get("set-cookie").is_none());
    }
}

/// The side user `key` gets with and without asking for the canary by header and cookie.
async fn sides(proxy: &TestProxy, key: &str) -> (String, String, String) {
    let side = |reply: Reply| reply.text().lines().next().unwrap_or_default().to_string();
    let plain = side(get(proxy.addr, "/", &[("x-user-id", key)]).await);
    let header = side(
        get(
            proxy.addr,
            "/",
            &[("x-splitgate-variant", "canary"), ("x-user-id", key)],
        )
        .await,
    );
    let cookie = side(
        get(
            proxy.addr,
            "/",
            &[("cookie", "x-splitgate-variant=canary"), ("x-user-id", key)],
        )
        .await,
    );
    (plain, header, cookie)
}

/// A user whose bucket puts them on stable at 10 %.
const STABLE_USER: &str = "x";

#[tokio::test]
async fn the_override_is_off_by_default_and_honoured_only_from_override_from() {
    // Off by default: anyone could otherwise opt into an unreleased canary.
    let s = setup("", "").await;
    let (plain, header, cookie) = sides(&s.proxy, STABLE_USER).await;
    assert_eq!(plain, "stable");
    assert_eq!((header.as_str(), cookie.as_str()), ("stable", "stable"));
    // Still stripped: an upstream that reads it must not be steered by any client.
    let reply = get(
        s.proxy.addr,
        "/",
        &[
            ("x-splitgate-variant", "canary"),
            ("x-user-id", STABLE_USER),
        ],
    )
    .await;
    assert!(
        !reply.text().contains("x-splitgate-variant"),
        "{}",
        reply.text()
    );

    // Enabled: honoured from loopback (the default override_from), and stripped.
    let s = setup("", "override_enabled = true").await;
    let (_, header, cookie) = sides(&s.proxy, STABLE_USER).await;
    assert_eq!((header.as_str(), cookie.as_str()), ("canary", "canary"));
    let reply = get(
        s.proxy.addr,
        "/",
        &[
            ("x-splitgate-variant", "canary"),
            ("x-user-id", STABLE_USER),
        ],
    )
    .await;
    assert!(
        !reply.text().contains("x-splitgate-variant"),
        "override header reached the upstream"
    );

    // Enabled, but this client (127.0.0.1) is not in override_from: ignored.
    let s = setup(
        "",
        "override_enabled = true\noverride_from = [\"10.0.0.0/8\"]",
    )
    .await;
    let (_, header, cookie) = sides(&s.proxy, STABLE_USER).await;
    assert_eq!((header.as_str(), cookie.as_str()), ("stable", "stable"));

    // override_name = "" switches it off even when enabled; so does a rollback.
    let s = setup(
        "",
        "override_enabled = true\noverride_name = \"\"\nvariant_header = \"\"",
    )
    .await;
    let reply = get(
        s.proxy.addr,
        "/",
        &[
            ("x-splitgate-variant", "canary"),
            ("x-user-id", STABLE_USER),
        ],
    )
    .await;
    assert!(reply.text().starts_with("stable\n"));
    assert!(reply.headers.get("x-splitgate-variant").is_none());
}

#[tokio::test]
async fn slo_source_is_recorded_in_the_audit_log() {
    let s = setup("", "").await;
    s.proxy.state().trip("main", trip()).await.unwrap();
    s.proxy.state().reset("main", Source::Cli).await.unwrap();
    let audit = audit_lines(&s.proxy);
    let trip_line = audit.iter().find(|l| l["action"] == "trip").unwrap();
    assert_eq!(
        (
            trip_line["source"].as_str(),
            trip_line["new_weight"].as_f64()
        ),
        (Some("slo"), Some(0.0))
    );
    assert_eq!(trip_line["detail"], "test");
    assert!(audit
        .iter()
        .any(|l| l["action"] == "reset" && l["source"] == "cli"));
}

/// After a rollout reached 100 %, pointing `canary` at a new version (or changing the
/// canary upstream's instances) must not send every user to the untested version: the
/// route starts at the file's weight, and the audit log says why.
#[tokio::test]
async fn a_new_canary_starts_at_the_files_weight_not_the_live_one() {
    let s = setup("", "").await;
    let (status, _) = admin(
        s.proxy.admin,
        "PUT",
        "/admin/routes/main/weight",
        r#"{"canary_weight": 100}"#,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    for i in 0..5 {
        get(s.proxy.addr, "/", &[("x-user-id", &format!("u{i}"))]).await;
    }
    let canary_requests = |state: &Value| state["window"]["canary"]["requests"].as_u64();
    // The same canary upstream, reloaded: the live weight and its evidence stay.
    let (status, _) = admin(s.proxy.admin, "POST", "/admin/reload", "", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(weight_of(s.proxy.admin).await, 100.0);
    let (_, state) = admin(s.proxy.admin, "GET", "/admin/routes/main", "", None).await;
    assert_eq!(canary_requests(&state), Some(5));

    // canary now points at another upstream.
    let v3 = named_upstream("v3").await;
    let text = std::fs::read_to_string(&s.proxy.config_path).unwrap();
    let text = text.replace(
        "[[routes]]",
        &format!(
            "[upstreams.v3]\ninstances = [\"{}\"]\n\n[[routes]]",
            v3.addr
        ),
    );
    let text = text.replace("canary = \"canary-pool\"", "canary = \"v3\"");
    std::fs::write(&s.proxy.config_path, &text).unwrap();
    let (status, body) = admin(s.proxy.admin, "POST", "/admin/reload", "", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(weight_of(s.proxy.admin).await, 10.0, "the file's weight");
    let (_, state) = admin(s.proxy.admin, "GET", "/admin/routes/main", "", None).await;
    assert_eq!(
        canary_requests(&state),
        Some(0),
        "the old version's samples are gone"
    );
    let line = audit_lines(&s.proxy)
        .into_iter()
        .rfind(|l| l["action"] == "canary_changed")
        .expect("an audit line for the canary change");
    assert_eq!(line["new_weight"], 10.0);
    assert!(
        line["detail"].as_str().unwrap().contains("canary-pool")
            && line["detail"].as_str().unwrap().contains("v3"),
        "{line}"
    );

    // The same upstream name with other instances is another version too.
    admin(
        s.proxy.admin,
        "PUT",
        "/admin/routes/main/weight",
        r#"{"canary_weight": 100}"#,
        None,
    )
    .await;
    let v4 = named_upstream("v4").await;
    let text = text.replace(&v3.addr.to_string(), &v4.addr.to_string());
    std::fs::write(&s.proxy.config_path, text).unwrap();
    let (status, _) = admin(s.proxy.admin, "POST", "/admin/reload", "", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(weight_of(s.proxy.admin).await, 10.0);
}

/// Only the documented object form sets a weight; every refusal names the field, and
/// none names an internal type.
#[tokio::test]
async fn weight_bodies_other_than_the_object_form_are_refused_naming_the_field() {
    let s = setup("", "").await;
    for (body, says) in [
        ("[20]", "JSON object"),
        ("[]", "JSON object"),
        ("20", "JSON object"),
        ("{}", "canary_weight: missing"),
        (
            r#"{"canary_weight": "25"}"#,
            "canary_weight: \"25\" is not a number",
        ),
        (
            r#"{"canary_weight": 101}"#,
            "canary_weight: weight 101 is outside",
        ),
        (r#"{"weight": 20}"#, "unknown field \"weight\""),
    ] {
        let (status, reply) = admin(
            s.proxy.admin,
            "PUT",
            "/admin/routes/main/weight",
            body,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        let error = reply["error"].as_str().unwrap();
        assert!(error.contains(says), "{body}: {error}");
        assert!(!error.contains("WeightBody"), "{body}: {error}");
    }
    assert_eq!(weight_of(s.proxy.admin).await, 10.0);
}

/// With several workers, each caching the snapshot: an acknowledged weight change is
/// seen by the very next request on every worker (new connections land on both).
#[tokio::test]
async fn a_weight_change_reaches_every_workers_next_request() {
    let s = setup("workers = 2", "").await;
    for (weight, side) in [(100, "canary"), (0, "stable"), (100, "canary")] {
        let (status, _) = admin(
            s.proxy.admin,
            "PUT",
            "/admin/routes/main/weight",
            &format!(r#"{{"canary_weight": {weight}}}"#),
            None,
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        for i in 0..20 {
            let reply = get(s.proxy.addr, "/", &[("x-user-id", &format!("u{i}"))]).await;
            assert_eq!(
                reply.headers["x-splitgate-variant"], side,
                "weight {weight}"
            );
        }
    }
}

#[tokio::test]
async fn verbose_health_says_version_config_state_and_instances_up() {
    let Setup { proxy, .. } = setup("workers = 2", "").await;
    // Plain /healthz stays the cheap answer.
    let plain = get(proxy.admin, "/healthz", &[]).await;
    assert_eq!(
        (plain.status, plain.text().as_str()),
        (StatusCode::OK, "ok\n")
    );

    let (status, health) = admin(proxy.admin, "GET", "/healthz?verbose=1", "", None).await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    assert!(health["uptime_seconds"].is_u64());
    assert_eq!(
        health["config"]["file"],
        proxy.config_path.display().to_string()
    );
    let generation = health["config"]["generation"].as_u64().unwrap();
    assert!(generation >= 1, "{health}");
    assert_eq!(health["workers"], 2);
    assert!(health["state"]["dir"].is_string());
    assert!(health["state"]["last_write_failed_at"].is_null());
    assert!(health["fleet"].is_null());
    let upstreams = health["upstreams"].as_array().unwrap();
    assert_eq!(upstreams.len(), 2, "{health}");
    for upstream in upstreams {
        assert_eq!(upstream["instances"], 1, "{health}");
        assert_eq!(upstream["up"], 1, "{health}");
        assert_eq!(upstream["protocol"], "http1");
    }

    // A change shows as a new config generation.
    let (status, _) = admin(
        proxy.admin,
        "PUT",
        "/admin/routes/main/weight",
        r#"{"canary_weight": 20}"#,
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let (_, health) = admin(proxy.admin, "GET", "/healthz?verbose", "", None).await;
    assert!(health["config"]["generation"].as_u64().unwrap() > generation);
}
