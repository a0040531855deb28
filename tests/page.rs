//! The operators' page in a real browser: headless Chromium, driven through its DevTools
//! protocol, against splitgate running the demo's config with an admin token. The page
//! shows the routes and weights; a weight set through the CLI moves the bar; an action
//! without the token is refused and changes nothing, with it goes through; a trip shows
//! within 2 s. With `SPLITGATE_SCREENSHOT=path` it also saves a screenshot
//! (`docs/screenshot.sh`).
//!
//! Needs `chromium` on PATH (`.ci/run` installs it, and sets
//! `SPLITGATE_REQUIRE_CHROMIUM` so that CI cannot skip this); elsewhere it is skipped,
//! saying so.

mod common;

use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use splitgate::state::Trip;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const TOKEN_ENV: &str = "SPLITGATE_PAGE_TEST_TOKEN";
const TOKEN: &str = "page-test-token";

fn chromium() -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("SPLITGATE_REQUIRE_CHROMIUM").is_none(),
            "SPLITGATE_REQUIRE_CHROMIUM is set but no chromium is on PATH (apt-get install chromium)"
        );
        eprintln!("SKIPPED: no chromium on PATH (apt-get install chromium; .ci/run does)");
    }
    found
}

/// One DevTools session on one page.
struct Page {
    socket: WebSocketStream<TcpStream>,
    next_id: u64,
}

impl Page {
    async fn call(&mut self, method: &str, params: Value) -> Value {
        use futures_sink::Sink as _;
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut self.socket).poll_ready(cx))
            .await
            .unwrap();
        std::pin::Pin::new(&mut self.socket)
            .start_send(Message::text(message))
            .unwrap();
        std::future::poll_fn(|cx| std::pin::Pin::new(&mut self.socket).poll_flush(cx))
            .await
            .unwrap();
        loop {
            let frame = std::future::poll_fn(|cx| {
                futures_core::Stream::poll_next(std::pin::Pin::new(&mut self.socket), cx)
            })
            .await
            .expect("the DevTools connection closed")
            .unwrap();
            let Message::Text(text) = frame else { continue };
            let reply: Value = serde_json::from_str(text.as_str()).unwrap();
            // Events carry no id; replies to this call carry its id.
            if reply["id"] == id {
                assert!(reply.get("error").is_none(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// Evaluates a JavaScript expression in the page; its value as JSON.
    async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .call(
                "Runtime.evaluate",
                json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
            )
            .await;
        result["result"]["value"].clone()
    }

    /// Polls `expression` every 50 ms until `check` holds; panics after `within`.
    async fn wait_for(
        &mut self,
        what: &str,
        within: Duration,
        expression: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            let value = self.eval(expression).await;
            if check(&value) {
                return value;
            }
            assert!(
                started.elapsed() < within,
                "{what}: not within {within:?}; last {value}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What the page shows of route `name`: [weight, bar width, SLO state].
fn route_view(name: &str) -> String {
    format!(
        "(() => {{ const h = document.getElementById('route-{name}'); if (!h) return null;
           const s = h.parentElement;
           return [s.querySelector('[data-weight]').dataset.weight,
                   s.querySelector('.bar > span').style.width,
                   (s.querySelector('[data-slo]') || {{dataset: {{}}}}).dataset.slo]; }})()"
    )
}

#[tokio::test]
async fn the_operators_page_shows_routes_follows_changes_and_refuses_actions_without_the_token() {
    let Some(chromium) = chromium() else { return };
    std::env::set_var(TOKEN_ENV, TOKEN);
    let stable = splitgate::demo::start_upstream("stable").await.unwrap();
    let canary = splitgate::demo::start_upstream("canary").await.unwrap();
    let dir = Arc::new(TempDir::new("page"));
    let localhost = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let text =
        splitgate::demo::config_text(localhost, localhost, dir.path(), stable.addr, canary.addr)
            .replacen(
                "[admin]\n",
                &format!("[admin]\ntoken_env = \"{TOKEN_ENV}\"\n"),
                1,
            );
    let proxy = start_proxy(dir.clone(), &text).await;

    // Chromium with a DevTools port of its own choosing, announced on stderr.
    let profile = dir.path().join("chromium-profile");
    let mut browser = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--window-size=1100,1400",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(browser.stderr.take().unwrap()).lines();
    let devtools = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if let Some(url) = line.split("DevTools listening on ").nth(1) {
                return url.trim().to_string();
            }
        }
        panic!("chromium exited without a DevTools address");
    })
    .await
    .expect("chromium announced its DevTools address");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let port: u16 = devtools
        .trim_start_matches("ws://127.0.0.1:")
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let devtools_addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    // A new tab on the page; its own DevTools socket.
    let page_url = format!("http://{}/", proxy.admin);
    let reply = send(
        devtools_addr,
        http::Request::put(format!("/json/new?{page_url}"))
            .body(full(""))
            .unwrap(),
    )
    .await;
    let target: Value = serde_json::from_slice(&reply.body).unwrap();
    let socket_url = target["webSocketDebuggerUrl"].as_str().unwrap().to_string();
    let stream = TcpStream::connect(devtools_addr).await.unwrap();
    let (socket, _) = tokio_tungstenite::client_async(socket_url, stream)
        .await
        .unwrap();
    let mut page = Page { socket, next_id: 0 };

    // The demo's routes and weights.
    let demo = page
        .wait_for(
            "the page shows route demo",
            Duration::from_secs(10),
            &route_view("demo"),
            |v| !v.is_null(),
        )
        .await;
    assert_eq!(demo, json!(["10", "10%", "ok"]));
    let grpc = page.eval(&route_view("demo-grpc")).await;
    assert_eq!(grpc[0], "10");
    let upstreams = page
        .eval("[...document.querySelectorAll('section.upstream h3')].map(h => h.textContent)")
        .await;
    assert!(
        upstreams.to_string().contains("Upstream demo-canary"),
        "{upstreams}"
    );

    // A weight set through the CLI moves the bar.
    let admin_url = format!("http://{}", proxy.admin);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_splitgate"))
        .args([
            "weight", "demo", "35", "--admin", &admin_url, "--token", TOKEN,
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    page.wait_for(
        "the bar moves to 35 %",
        Duration::from_secs(3),
        &route_view("demo"),
        |v| v[0] == "35" && v[1] == "35%",
    )
    .await;

    // An action without the token: refused, shown, nothing changed.
    page.eval("window.confirm = () => true; document.getElementById('token').value = ''; true")
        .await;
    let click_set_weight = |percent: u32| {
        format!(
            "(() => {{ const s = document.getElementById('route-demo').parentElement;
               s.querySelector('input[type=number]').value = '{percent}';
               [...s.querySelectorAll('button')].find(b => b.textContent === 'Set weight').click();
               return true; }})()"
        )
    };
    page.eval(&click_set_weight(50)).await;
    let status = page
        .wait_for(
            "the refusal is shown",
            Duration::from_secs(3),
            "document.getElementById('status').textContent",
            |v| v.as_str().is_some_and(|s| s.contains("refused")),
        )
        .await;
    assert!(status.as_str().unwrap().contains("401"), "{status}");
    let (_, route) = admin(proxy.admin, "GET", "/admin/routes/demo", "", None).await;
    assert_eq!(
        route["canary_weight"], 35.0,
        "a refused action changed the weight"
    );

    // With the token typed in, the same action goes through.
    page.eval(&format!(
        "document.getElementById('token').value = '{TOKEN}'; true"
    ))
    .await;
    page.eval(&click_set_weight(50)).await;
    page.wait_for(
        "the weight set from the page",
        Duration::from_secs(3),
        &route_view("demo"),
        |v| v[0] == "50",
    )
    .await;

    // A trip shows within 2 s, with the page already open.
    proxy
        .state()
        .trip(
            "demo",
            Trip {
                reason: "error_rate".into(),
                detail: "test".into(),
                at: "2026-11-27T00:00:00.000Z".into(),
            },
        )
        .await
        .unwrap();
    let tripped_at = Instant::now();
    page.wait_for(
        "the trip on the page",
        Duration::from_secs(2),
        &route_view("demo"),
        |v| v[2] == "tripped" && v[0] == "0",
    )
    .await;
    assert!(tripped_at.elapsed() <= Duration::from_secs(2));
    let trips = page
        .eval("document.querySelector('[aria-label=\"last trips of demo\"]').textContent")
        .await;
    assert!(
        trips
            .as_str()
            .is_some_and(|t| t.contains("error_rate (test)")),
        "{trips}"
    );

    if let Some(path) = std::env::var_os("SPLITGATE_SCREENSHOT") {
        page.eval(
            "document.getElementById('token').value = ''; document.activeElement.blur(); true",
        )
        .await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let shot = page
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .await;
        use base64::Engine as _;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(&path, png).unwrap();
    }
    reads_well(&mut page).await;
    let _ = browser.kill().await;
}

/// What a screen reader and a narrow window get: every control has an accessible name
/// (Chromium's accessibility tree, what assistive technology reads), text meets WCAG's
/// 4.5:1 contrast, and at 400 px nothing needs a sideways scroll.
async fn reads_well(page: &mut Page) {
    page.call("Accessibility.enable", json!({})).await;
    let tree = page.call("Accessibility.getFullAXTree", json!({})).await;
    let nodes = tree["nodes"].as_array().unwrap();
    let controls = [
        "button",
        "textbox",
        "spinbutton",
        "combobox",
        "checkbox",
        "link",
    ];
    let mut named = 0;
    for node in nodes {
        let role = node["role"]["value"].as_str().unwrap_or("");
        if node["ignored"] == true || !controls.contains(&role) {
            continue;
        }
        let name = node["name"]["value"].as_str().unwrap_or("").trim();
        assert!(
            !name.is_empty(),
            "a {role} without an accessible name: {node}"
        );
        named += 1;
    }
    assert!(named >= 10, "only {named} named controls in the tree");
    let headings = nodes
        .iter()
        .filter(|n| n["role"]["value"] == "heading")
        .count();
    assert!(headings >= 4, "{headings} headings");

    let low_contrast = page
        .eval(
            "(() => {
               const rgb = c => (c.match(/[\\d.]+/g) || []).map(Number);
               const lum = ([r, g, b]) => [r, g, b].map(v => { v /= 255;
                 return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
                 .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
               const background = e => { for (; e; e = e.parentElement) {
                 const c = rgb(getComputedStyle(e).backgroundColor);
                 if (c.length === 3 || c[3] > 0) return c.slice(0, 3); } return [255, 255, 255]; };
               const bad = [];
               for (const e of document.querySelectorAll('body *')) {
                 const own = [...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
                 if (!own || !e.getClientRects().length) continue;
                 const [a, b] = [lum(rgb(getComputedStyle(e).color).slice(0, 3)), lum(background(e))];
                 const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
                 if (ratio < 4.5) bad.push(e.tagName + ' ' + e.textContent.trim().slice(0, 30) + ' ' + ratio.toFixed(2));
               }
               return bad; })()",
        )
        .await;
    assert_eq!(low_contrast, json!([]), "text below 4.5:1 contrast");

    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 400, "height": 900, "deviceScaleFactor": 1, "mobile": true}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let widths = page
        .eval("[document.documentElement.scrollWidth, window.innerWidth]")
        .await;
    assert!(
        widths[0].as_f64() <= widths[1].as_f64(),
        "a sideways scroll at 400 px: {widths}"
    );
}
