//! The proxy core through real sockets: streaming, HTTP/2, errors, framing, headers, drain.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::net::TcpStream;

async fn simple_proxy(stable: &TestUpstream, route_extra: &str) -> TestProxy {
    let dir = Arc::new(TempDir::new("proxy"));
    let text = config(dir.path(), &[stable.addr], None, "", "", route_extra);
    start_proxy(dir, &text).await
}

/// Echoes the request body back, streaming.
async fn echo_upstream() -> TestUpstream {
    upstream(|request: Request<Incoming>| async move { Response::new(request.into_body().boxed()) })
        .await
}

#[tokio::test]
async fn get_arrives_intact() {
    let stable = named_upstream("stable").await;
    let proxy = simple_proxy(&stable, "").await;
    let reply = get(proxy.addr, "/hello?x=1", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.text().starts_with("stable\n"), "{}", reply.text());
    assert_eq!(stable.hits(), 1);
}

#[tokio::test]
async fn streamed_post_of_several_mib_arrives_intact() {
    let stable = echo_upstream().await;
    let proxy = simple_proxy(&stable, "").await;
    // 8 MiB in 64 KiB chunks with no Content-Length: the body must stream, chunked.
    let chunk: Vec<u8> = (0..65_536u32).map(|i| (i % 251) as u8).collect();
    let body = Chunks {
        chunk: Bytes::from(chunk.clone()),
        remaining: 128,
    }
    .boxed();
    let request = Request::post("/upload").body(body).unwrap();
    let reply = send(proxy.addr, request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len(), 128 * 65_536);
    assert!(reply.body.chunks(65_536).all(|c| c == &chunk[..]));
}

#[tokio::test]
async fn http2_client_reaches_http1_upstream() {
    let stable = named_upstream("stable").await;
    let proxy = simple_proxy(&stable, "").await;
    let mut sender = h2_client(proxy.addr).await;
    let uri = format!("http://{}/h2", proxy.addr);
    let response = sender
        .send_request(Request::get(uri).body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let text = String::from_utf8_lossy(&body);
    assert!(text.starts_with("stable\n"));
    // The :authority became a Host header for the HTTP/1.1 upstream.
    assert!(text.contains(&format!("host: {}", proxy.addr)), "{text}");
    assert!(text.contains("via: 2.0 splitgate"), "{text}");
}

/// An HTTP/2 connection gives up its read and write buffers whenever it waits (the
/// patched h2 in vendor/h2), and its HPACK table keeps copies, not slices of a freed
/// buffer. After each pause, requests that refer to the table (`:authority` and a
/// header indexed by the first request) arrive intact, and bodies larger than the
/// released buffers stream both ways.
#[tokio::test]
async fn an_http2_connection_serves_across_its_buffer_release() {
    let stable = upstream(|request: Request<Incoming>| async move {
        let mut text = String::new();
        for name in ["host", "x-trace"] {
            let value = request
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_owned());
            text.push_str(&format!("{name}: {}\n", value.unwrap_or_default()));
        }
        let body = request.into_body().collect().await.unwrap().to_bytes();
        text.push_str(&String::from_utf8_lossy(&body));
        Response::new(full(text))
    })
    .await;
    let proxy = simple_proxy(&stable, "").await;
    let mut sender = h2_client(proxy.addr).await;
    for (round, size) in [(1, 0), (2, 40_000), (3, 0), (4, 100_000)] {
        let body: String = (0..size)
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let request = Request::post(format!("http://h2-idle.test/round/{round}"))
            .header(
                "x-trace",
                "the same value every round, from the HPACK table",
            )
            .body(full(body.clone()))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "round {round}");
        let reply = response.into_body().collect().await.unwrap().to_bytes();
        let expected = format!(
            "host: h2-idle.test\nx-trace: the same value every round, from the HPACK table\n{body}"
        );
        assert!(
            reply == expected.as_bytes(),
            "round {round}: {} bytes back",
            reply.len()
        );
        // Idle long enough for every buffer to be released and the task to sleep.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(stable.hits(), 4);
}

#[tokio::test]
async fn no_route_gives_404() {
    let stable = named_upstream("stable").await;
    let proxy = simple_proxy(&stable, "path_prefix = \"/api\"").await;
    let reply = get(proxy.addr, "/other", &[]).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert!(reply.text().contains("no route"), "{}", reply.text());
    assert_eq!(stable.hits(), 0);
    assert_eq!(get(proxy.addr, "/api/x", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn closed_upstream_port_gives_502() {
    let closed = closed_port().await;
    let dir = Arc::new(TempDir::new("502"));
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[closed], None, "", "", ""),
    )
    .await;
    let started = std::time::Instant::now();
    let reply = get(proxy.addr, "/", &[]).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn silent_upstream_gives_504_at_the_response_timeout() {
    let silent = slow_upstream(Duration::from_secs(30), "too late").await;
    let dir = Arc::new(TempDir::new("504"));
    let text = config(
        dir.path(),
        &[silent.addr],
        None,
        "",
        "response_timeout = \"300ms\"",
        "",
    );
    let proxy = start_proxy(dir, &text).await;
    let started = std::time::Instant::now();
    let reply = get(proxy.addr, "/", &[]).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );
}

#[tokio::test]
async fn upstream_dying_mid_response_truncates_the_client_response() {
    // Declares 1000 bytes, sends 10, closes.
    let dying = raw_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n0123456789").await;
    let proxy = simple_proxy(&dying, "").await;
    let result = try_send(proxy.addr, Request::get("/").body(full("")).unwrap()).await;
    assert!(result.is_err(), "a truncated body must not look complete");

    // Chunked: two chunks, then the connection drops without the last chunk.
    let dying = raw_upstream(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n5\r\nworld\r\n",
    )
    .await;
    let proxy = simple_proxy(&dying, "").await;
    let result = try_send(proxy.addr, Request::get("/").body(full("")).unwrap()).await;
    assert!(
        result.is_err(),
        "a chunked body without its last chunk must not look complete"
    );
}

#[tokio::test]
async fn failed_upstream_connection_is_not_reused() {
    // Every connection: one good response, then garbage in place of the next.
    let flaky = raw_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokXXXX garbage").await;
    let proxy = simple_proxy(&flaky, "").await;
    for _ in 0..3 {
        assert_eq!(get(proxy.addr, "/", &[]).await.status, StatusCode::OK);
    }
    // Each request needed a fresh upstream connection: the broken one was dropped.
    assert_eq!(flaky.hits(), 3);
}

/// Sends raw request bytes and returns the status line and whether the proxy closed.
async fn rejected(proxy: &TestProxy, request: &str) -> String {
    raw(proxy.addr, request.as_bytes()).await
}

#[tokio::test]
async fn ambiguous_requests_get_400_close_and_never_reach_the_upstream() {
    let stable = named_upstream("stable").await;
    let proxy = simple_proxy(&stable, "").await;
    let cases = [
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "GET / HTTP/1.1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        "GET http://evil.example/ HTTP/1.1\r\nHost: good.example\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
    ];
    for case in cases {
        let reply = rejected(&proxy, case).await;
        assert!(
            reply.starts_with("HTTP/1.1 400") || reply.starts_with("HTTP/1.0 400"),
            "{case:?} got {reply:?}"
        );
        assert!(
            reply.to_ascii_lowercase().contains("connection: close"),
            "{case:?} got {reply:?}"
        );
    }
    assert_eq!(
        stable.hits(),
        0,
        "no rejected request may reach the upstream"
    );
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_and_forwarding_headers_set() {
    let stable = upstream(|_req: Request<Incoming>| async {
        let mut response = Response::new(full("ok"));
        let h = response.headers_mut();
        h.insert("connection", "x-upstream-secret".parse().unwrap());
        h.insert("x-upstream-secret", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-kept", "yes".parse().unwrap());
        response
    })
    .await;
    let echo = named_upstream("stable").await;
    let proxy = simple_proxy(&echo, "").await;
    let reply = get(
        proxy.addr,
        "/",
        &[
            ("connection", "x-client-secret, keep-alive"),
            ("x-client-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "deflate, trailers;q=1"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("x-forwarded-for", "6.6.6.6"),
            ("host", "app.example"),
            ("x-end-to-end", "kept"),
        ],
    )
    .await;
    let seen = reply.text();
    for gone in [
        "x-client-secret",
        "keep-alive",
        "deflate",
        "proxy-authorization",
        "connection:",
        "6.6.6.6",
    ] {
        assert!(!seen.contains(gone), "{gone} reached the upstream:\n{seen}");
    }
    for kept in [
        // TE is hop-by-hop, but whether the client reads trailers is not: `trailers`
        // alone goes on (gRPC servers require it).
        "te: trailers\n",
        "host: app.example",
        "x-end-to-end: kept",
        "x-forwarded-for: 127.0.0.1",
        "x-forwarded-proto: http",
        "via: 1.1 splitgate",
        "x-request-id: ",
    ] {
        assert!(seen.contains(kept), "{kept} missing upstream:\n{seen}");
    }

    let proxy = simple_proxy(&stable, "").await;
    let reply = get(proxy.addr, "/", &[]).await;
    assert!(reply.headers.get("x-upstream-secret").is_none());
    assert!(reply.headers.get("keep-alive").is_none());
    assert_eq!(reply.headers["x-kept"], "yes");
    assert_eq!(reply.headers["via"], "1.1 splitgate");
}

#[tokio::test]
async fn trusted_proxies_forwarded_for_is_appended() {
    let echo = named_upstream("stable").await;
    let dir = Arc::new(TempDir::new("xff"));
    let text = config(
        dir.path(),
        &[echo.addr],
        None,
        "trusted_proxies = [\"127.0.0.0/8\"]",
        "",
        "",
    );
    let proxy = start_proxy(dir, &text).await;
    let reply = get(proxy.addr, "/", &[("x-forwarded-for", "203.0.113.9")]).await;
    assert!(
        reply
            .text()
            .contains("x-forwarded-for: 203.0.113.9, 127.0.0.1"),
        "{}",
        reply.text()
    );
}

#[tokio::test]
async fn oversized_heads_and_targets_are_refused() {
    let stable = named_upstream("stable").await;
    let dir = Arc::new(TempDir::new("limits"));
    let text = config(
        dir.path(),
        &[stable.addr],
        None,
        "max_headers = 20\nmax_uri_bytes = 100",
        "",
        "",
    );
    let proxy = start_proxy(dir, &text).await;
    let many: String = (0..30).map(|i| format!("x-h{i}: v\r\n")).collect();
    let reply = raw(
        proxy.addr,
        format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply:?}");
    let big = "a".repeat(20_000);
    let reply = raw(
        proxy.addr,
        format!("GET / HTTP/1.1\r\nHost: a\r\nx-big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply:?}");
    let long = "b".repeat(200);
    let reply = raw(
        proxy.addr,
        format!("GET /{long} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 414"), "{reply:?}");
    assert_eq!(stable.hits(), 0);
}

#[tokio::test]
async fn graceful_drain_lets_a_slow_request_finish() {
    let slow = slow_upstream(Duration::from_millis(700), "slow but sure").await;
    let mut proxy = simple_proxy(&slow, "").await;
    let addr = proxy.addr;
    let in_flight = tokio::spawn(async move { get(addr, "/", &[]).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let admin = proxy.admin;
    let drained = tokio::spawn(async move { proxy.shutdown().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Readiness is false while draining; new connections are no longer accepted.
    let ready = get(admin, "/readyz", &[]).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener still accepting while draining"
    );
    let reply = in_flight.await.unwrap();
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.text(), "slow but sure");
    assert!(
        drained.await.unwrap(),
        "drain should complete before the deadline"
    );
}

/// Reads until the peer closes; returns the bytes and how long it took.
async fn read_until_closed(stream: &mut TcpStream) -> (String, Duration) {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    (
        String::from_utf8_lossy(&out).into_owned(),
        started.elapsed(),
    )
}

fn within(took: Duration, target: Duration) -> bool {
    // The configured timeout, +10 % and a little scheduling slack.
    took >= target.mul_f64(0.9) && took <= target.mul_f64(1.1) + Duration::from_millis(100)
}

#[tokio::test]
async fn slow_clients_are_closed_at_their_timeouts() {
    use tokio::io::AsyncWriteExt;
    // Reads the whole body before answering, as most applications do.
    let stable = upstream(|request: Request<Incoming>| async move {
        let body = request
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        Response::new(full(format!("got {} bytes", body.len())))
    })
    .await;
    let big = upstream(|_req: Request<Incoming>| async {
        Response::new(full(vec![b'x'; 64 * 1024 * 1024]))
    })
    .await;
    let dir = Arc::new(TempDir::new("slow"));
    let server = "header_read_timeout = \"600ms\"\nclient_body_timeout = \"600ms\"\nidle_timeout = \"600ms\"";
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[stable.addr], None, server, "", ""),
    )
    .await;
    let target = Duration::from_millis(600);

    // Slowloris: a head that never ends.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
        .await
        .unwrap();
    let (_, took) = read_until_closed(&mut stream).await;
    assert!(within(took, target), "slowloris closed after {took:?}");

    // A body that stops halfway: 408, closed.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nhalf")
        .await
        .unwrap();
    let (reply, took) = read_until_closed(&mut stream).await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply:?}");
    assert!(within(took, target), "slow body closed after {took:?}");

    // A reader that stops reading a large response: closed at the idle timeout.
    let dir = Arc::new(TempDir::new("slow-reader"));
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[big.addr], None, server, "", ""),
    )
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let (reply, _) = read_until_closed(&mut stream).await;
    assert!(
        reply.starts_with("HTTP/1.1 200"),
        "{}",
        &reply[..reply.len().min(100)]
    );
    assert!(
        reply.len() < 64 * 1024 * 1024,
        "a reader that stalls past the idle timeout must not get the whole body"
    );
}

#[tokio::test]
async fn at_the_connection_cap_new_connections_are_refused_and_the_others_served() {
    let stable = named_upstream("stable").await;
    let dir = Arc::new(TempDir::new("cap"));
    let proxy = start_proxy(
        dir.clone(),
        &config(
            dir.path(),
            &[stable.addr],
            None,
            "max_connections = 3\nworkers = 1",
            "",
            "",
        ),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut sender = h1_client(proxy.addr).await;
        let response = sender
            .send_request(
                Request::get("/")
                    .header("host", "a")
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        held.push(sender);
    }
    // The fourth is accepted and closed at once.
    let extra = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        extra.is_empty(),
        "the connection over the cap got {extra:?}"
    );
    // The held connections keep working.
    for sender in &mut held {
        let response = sender
            .send_request(
                Request::get("/")
                    .header("host", "a")
                    .body(full(""))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}

/// `splitgate_connections_idle`, the connections holding no buffers, from a scrape.
async fn idle_connections(admin_addr: std::net::SocketAddr) -> u64 {
    let text = get(admin_addr, "/metrics", &[]).await.text();
    text.lines()
        .find_map(|line| line.strip_prefix("splitgate_connections_idle{listener=\"http\"} "))
        .map_or(0, |value| value.trim().parse().unwrap())
}

/// Waits until `count` connections hold no buffers (released after a second idle).
async fn wait_until_idle(admin_addr: std::net::SocketAddr, count: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while idle_connections(admin_addr).await != count {
        assert!(tokio::time::Instant::now() < deadline, "never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An HTTP/1.1 connection idle between requests gives up its buffers, and what the
/// client sends after that is served as on a fresh connection: a pipelined pair is
/// answered in order, and an ambiguous framing shape is still refused.
#[tokio::test]
async fn a_connection_idle_across_the_buffer_release_still_serves_and_still_refuses() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let stable = named_upstream("stable").await;
    let dir = Arc::new(TempDir::new("release"));
    let text = config(dir.path(), &[stable.addr], None, "workers = 1", "", "");
    let proxy = start_proxy(dir, &text).await;

    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    // A new connection that has sent nothing holds no buffers either.
    wait_until_idle(proxy.admin, 1).await;
    stream
        .write_all(b"GET /first HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let mut reply = vec![0u8; 4096];
    let n = stream.read(&mut reply).await.unwrap();
    assert!(reply[..n].starts_with(b"HTTP/1.1 200"));
    wait_until_idle(proxy.admin, 1).await;

    // After the release the connection is still keep-alive (no `Connection: close`).
    stream
        .write_all(b"GET /kept HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let n = stream.read(&mut reply).await.unwrap();
    let head = String::from_utf8_lossy(&reply[..n]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    wait_until_idle(proxy.admin, 1).await;

    // A pipelined pair in one write, the first with a body, after the release.
    stream
        .write_all(
            b"POST /second HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
              GET /third HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut all))
        .await
        .expect("the pair is answered and the connection closed")
        .unwrap();
    let all = String::from_utf8_lossy(&all);
    assert_eq!(all.matches("HTTP/1.1 200 OK").count(), 2, "{all}");
    assert_eq!(stable.hits(), 4);

    // A smuggling shape after the release is refused like on a fresh connection.
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(b"GET /ok HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let n = stream.read(&mut reply).await.unwrap();
    assert!(reply[..n].starts_with(b"HTTP/1.1 200"));
    wait_until_idle(proxy.admin, 1).await;
    stream
        .write_all(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
        )
        .await
        .unwrap();
    let mut all = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut all))
        .await
        .expect("refused and closed")
        .unwrap();
    let all = String::from_utf8_lossy(&all);
    assert!(all.starts_with("HTTP/1.1 400"), "{all}");
    assert_eq!(
        all.matches("HTTP/1.1").count(),
        1,
        "nothing else answered: {all}"
    );
    assert_eq!(
        stable.hits(),
        5,
        "the smuggled request never reached the upstream"
    );
    assert_eq!(idle_connections(proxy.admin).await, 0);
}

/// A connection whose buffers were released still closes at the idle timeout, counted
/// from its last byte, and a drain closes it at once (it has been quiet long enough).
#[tokio::test]
async fn a_released_connection_keeps_its_idle_timeout_and_drains_at_once() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let stable = named_upstream("stable").await;
    let dir = Arc::new(TempDir::new("release-timeout"));
    let server = "workers = 1\nidle_timeout = \"3s\"";
    let mut proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[stable.addr], None, server, "", ""),
    )
    .await;
    let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    let mut reply = vec![0u8; 4096];

    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let answered = std::time::Instant::now();
    let n = stream.read(&mut reply).await.unwrap();
    assert!(reply[..n].starts_with(b"HTTP/1.1 200"));
    wait_until_idle(proxy.admin, 1).await;
    let (rest, _) = read_until_closed(&mut stream).await;
    assert_eq!(rest, "", "closed without a word");
    let lived = answered.elapsed();
    assert!(
        lived >= Duration::from_millis(2_700) && lived <= Duration::from_millis(4_500),
        "closed {lived:?} after its last request (idle timeout 3 s)"
    );

    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let n = stream.read(&mut reply).await.unwrap();
    assert!(reply[..n].starts_with(b"HTTP/1.1 200"));
    wait_until_idle(proxy.admin, 1).await;
    let started = std::time::Instant::now();
    assert!(proxy.shutdown().await, "drained");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let (rest, _) = read_until_closed(&mut stream).await;
    assert_eq!(rest, "");
}
