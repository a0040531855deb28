//! Faulty upstreams: ejection, a canary with no healthy instance, garbage and ambiguous
//! responses, stale keep-alive, and cross-talk under random aborts.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

#[tokio::test]
async fn a_failing_instance_is_ejected_and_traffic_goes_to_the_others() {
    let good = named_upstream("good").await;
    let dead = closed_port().await;
    let dir = Arc::new(TempDir::new("eject"));
    let text = config(
        dir.path(),
        &[dead, good.addr],
        None,
        "",
        "eject_after = 2\neject_for = \"30s\"",
        "",
    );
    let proxy = start_proxy(dir, &text).await;
    // A refused connect sent nothing: the request moves to the other instance, whatever
    // its method, so no user sees the dead one.
    for i in 0..26 {
        let reply = if i % 2 == 0 {
            get(proxy.addr, "/", &[]).await
        } else {
            send(
                proxy.addr,
                http::Request::post("/order")
                    .body(full("pay once"))
                    .unwrap(),
            )
            .await
        };
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "request {i}: {}",
            reply.text()
        );
    }
    assert_eq!(good.hits(), 26);
    // On-call still sees the dead instance: its refused connects are counted.
    let metrics = get(proxy.admin, "/metrics", &[]).await.text();
    let connect_errors = metrics
        .lines()
        .find(|l| {
            l.starts_with("splitgate_upstream_errors_total") && l.contains("kind=\"connect\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(connect_errors >= 1.0, "{metrics}");
}

async fn canary_down(policy: &str) -> (TestProxy, TestUpstream) {
    let stable = named_upstream("stable").await;
    let dead = closed_port().await;
    let dir = Arc::new(TempDir::new("canary-down"));
    let route = format!(
        "canary_weight = 100\ncanary_unavailable = \"{policy}\"\n[routes.slo]\nmin_requests = 5\nmax_error_rate = 0.1\n"
    );
    let text = config(
        dir.path(),
        &[stable.addr],
        Some(&[dead]),
        "",
        "eject_after = 1\neject_for = \"60s\"",
        &route,
    );
    (start_proxy(dir, &text).await, stable)
}

async fn wait_tripped(proxy: &TestProxy) -> serde_json::Value {
    wait_for_route(
        proxy.admin,
        Duration::from_secs(2),
        "the SLO guard to see the dead canary",
        |s| s["slo"]["state"] == "tripped",
    )
    .await
}

#[tokio::test]
async fn a_canary_with_no_healthy_instance_fails_fast_and_the_guard_sees_it() {
    let (proxy, _) = canary_down("fail").await;
    assert_eq!(
        get(proxy.addr, "/", &[]).await.status,
        StatusCode::BAD_GATEWAY,
        "the first failure ejects"
    );
    for _ in 0..5 {
        let started = std::time::Instant::now();
        assert_eq!(
            get(proxy.addr, "/", &[]).await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert!(started.elapsed() < Duration::from_millis(100));
    }
    let state = wait_tripped(&proxy).await;
    assert_eq!(state["canary_weight"], 0.0);
    assert_eq!(
        get(proxy.addr, "/", &[]).await.status,
        StatusCode::OK,
        "after the trip, stable serves"
    );
}

#[tokio::test]
async fn a_canary_with_no_healthy_instance_can_fall_back_to_stable() {
    let (proxy, stable) = canary_down("stable").await;
    get(proxy.addr, "/", &[]).await;
    for _ in 0..5 {
        let reply = get(proxy.addr, "/", &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(reply.headers["x-splitgate-variant"], "stable");
    }
    assert!(stable.hits() >= 5);
    wait_tripped(&proxy).await;
}

#[tokio::test]
async fn garbage_and_ambiguous_upstream_responses_give_502() {
    for reply in [
        &b""[..], // killed before answering
        b"this is not http\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ] {
        let bad = raw_upstream(Box::leak(reply.to_vec().into_boxed_slice())).await;
        let dir = Arc::new(TempDir::new("garbage"));
        let proxy = start_proxy(dir.clone(), &config(dir.path(), &[bad.addr], None, "", "", "")).await;
        let status = try_send(proxy.addr, Request::get("/").body(full("")).unwrap()).await.map(|r| r.status);
        assert!(
            matches!(status, Ok(StatusCode::BAD_GATEWAY)),
            "{:?} gave {status:?}",
            String::from_utf8_lossy(reply)
        );
    }
}

/// An upstream that serves keep-alive but closes a connection idle for `idle`, and
/// counts the requests by method.
async fn closing_upstream(
    idle: Duration,
) -> (std::net::SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (gets, posts) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (g, p) = (gets.clone(), posts.clone());
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let (g, p) = (g.clone(), p.clone());
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = match tokio::time::timeout(idle, stream.read(&mut chunk)).await {
                        Ok(Ok(n)) if n > 0 => n,
                        _ => return, // idle, closed or failed: close
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let body_len: usize = head
                            .lines()
                            .find_map(|l| {
                                l.strip_prefix("content-length: ")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap_or(0);
                        if buf.len() < end + 4 + body_len {
                            break;
                        }
                        buf.drain(..end + 4 + body_len);
                        if head.starts_with("post") {
                            p.fetch_add(1, Ordering::SeqCst)
                        } else {
                            g.fetch_add(1, Ordering::SeqCst)
                        };
                        if stream
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, gets, posts)
}

#[tokio::test]
async fn stale_keep_alive_connections_retry_gets_and_never_repeat_posts() {
    let idle = Duration::from_millis(400);
    let (addr, gets, posts) = closing_upstream(idle).await;
    let dir = Arc::new(TempDir::new("stale"));
    let proxy = start_proxy(dir.clone(), &config(dir.path(), &[addr], None, "", "", "")).await;
    let proxy_addr = proxy.addr;
    // 100 clients, each sending right around the moment the upstream closes idle
    // connections: 1 000 GETs and 200 POSTs in all.
    let flows: Vec<_> = (0..100u64)
        .map(|flow| {
            tokio::spawn(async move {
                let (mut get_errors, mut posts_ok) = (0, 0);
                for i in 0..12u64 {
                    let jitter = Duration::from_micros((flow * 37 + i * 350) % 4_000);
                    tokio::time::sleep(idle - Duration::from_millis(2) + jitter).await;
                    if i % 6 == 5 {
                        let request = Request::post("/")
                            .header("content-length", "4")
                            .body(full("data"))
                            .unwrap();
                        if send(proxy_addr, request).await.status == StatusCode::OK {
                            posts_ok += 1;
                        }
                    } else if get(proxy_addr, "/", &[]).await.status != StatusCode::OK {
                        get_errors += 1;
                    }
                }
                (get_errors, posts_ok)
            })
        })
        .collect();
    let (mut get_errors, mut posts_ok) = (0, 0);
    for flow in flows {
        let (errors, ok) = flow.await.unwrap();
        get_errors += errors;
        posts_ok += ok;
    }
    assert_eq!(
        get_errors, 0,
        "GETs on a stale connection are retried once on a fresh one"
    );
    assert!(gets.load(Ordering::SeqCst) >= 1_000);
    assert_eq!(
        posts.load(Ordering::SeqCst),
        posts_ok,
        "a POST is never sent twice"
    );
}

#[tokio::test]
async fn no_cross_talk_under_random_upstream_aborts() {
    // The aborts below are panics in the upstream's connection tasks; keep them quiet
    // and let every other panic report as usual.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !info.to_string().contains("simulated upstream abort") {
            default_hook(info);
        }
    }));
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    let echo = upstream(move |request: Request<Incoming>| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let id = request
            .headers()
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        async move {
            if n % 13 == 5 {
                // Abort: the connection task panics out of this response.
                tokio::time::sleep(Duration::from_millis(1)).await;
                panic!("simulated upstream abort");
            }
            Response::new(full(id))
        }
    })
    .await;
    let dir = Arc::new(TempDir::new("crosstalk"));
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[echo.addr], None, "", "eject_after = 0", ""),
    )
    .await;
    let addr = proxy.addr;
    let tasks: Vec<_> = (0..20)
        .map(|c| {
            tokio::spawn(async move {
                let mut ok = 0;
                for i in 0..500 {
                    let id = format!("req-{c}-{i}");
                    let reply = get(addr, "/", &[("x-request-id", &id)]).await;
                    if reply.status == StatusCode::OK {
                        assert_eq!(
                            reply.text(),
                            id,
                            "a response carried another request's body"
                        );
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        ok += task.await.unwrap();
    }
    assert!(ok > 8_000, "only {ok} of 10 000 succeeded");
}

#[tokio::test]
async fn a_full_backlog_gives_504_at_the_connect_timeout() {
    // A listener with the smallest backlog that never accepts: once the queue holds a
    // couple of connections, further handshakes get no answer at all.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..8 {
        if let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(stream);
        }
    }
    let dir = Arc::new(TempDir::new("backlog"));
    let extra = "connect_timeout = \"500ms\"\neject_after = 0";
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[addr], None, "", extra, ""),
    )
    .await;
    let started = std::time::Instant::now();
    let reply = get(proxy.addr, "/", &[]).await;
    let took = started.elapsed();
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_secs(2),
        "{took:?}"
    );
    drop(listener);
}

#[tokio::test]
async fn a_malformed_chunk_aborts_the_upstream_body_and_desynchronises_nothing() {
    use std::sync::Mutex;
    let seen: Arc<Mutex<Vec<(String, bool)>>> = Arc::default();
    let log = seen.clone();
    let collecting = upstream(move |request: Request<Incoming>| {
        let log = log.clone();
        async move {
            use http_body_util::BodyExt;
            let path = request.uri().path().to_string();
            let complete = request.into_body().collect().await.is_ok();
            log.lock().unwrap().push((path, complete));
            Response::new(full("ok"))
        }
    })
    .await;
    let dir = Arc::new(TempDir::new("bad-chunk"));
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[collecting.addr], None, "", "", ""),
    )
    .await;
    let mut stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    // A good first chunk, then a chunk-size line that is not hex, then a request that
    // would be smuggled if anything resynchronised on it.
    let attack = b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nZZ\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    stream.write_all(attack).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.starts_with("HTTP/1.1 400"),
        "the broken request gets 400: {text}"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = seen.lock().unwrap().clone();
    assert!(seen.iter().all(|(path, _)| path != "/smuggled"), "{seen:?}");
    assert!(
        seen.iter().all(|(_, complete)| !complete),
        "the upstream must see an aborted body: {seen:?}"
    );
    // The proxy and its pool are fine afterwards.
    assert_eq!(get(proxy.addr, "/after", &[]).await.status, StatusCode::OK);
}

/// An upstream that answers after `delay` and records the most requests it ever had in
/// flight at once.
async fn counting_upstream(delay: Duration) -> (TestUpstream, Arc<AtomicUsize>) {
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let (now, most) = (in_flight.clone(), peak.clone());
    let upstream = upstream(move |_request: Request<Incoming>| {
        let (now, most) = (now.clone(), most.clone());
        async move {
            let current = now.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(current, Ordering::SeqCst);
            tokio::time::sleep(delay).await;
            now.fetch_sub(1, Ordering::SeqCst);
            Response::new(full("ok"))
        }
    })
    .await;
    (upstream, peak)
}

#[tokio::test]
async fn at_the_instance_connection_cap_requests_queue_and_all_get_served() {
    let (slow, peak) = counting_upstream(Duration::from_millis(100)).await;
    let dir = Arc::new(TempDir::new("cap-queue"));
    let extra = "max_connections_per_instance = 1\nqueue_timeout = \"10s\"";
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[slow.addr], None, "workers = 1", extra, ""),
    )
    .await;
    let tasks: Vec<_> = (0..5)
        .map(|_| tokio::spawn(async move { get(proxy.addr, "/", &[]).await.status }))
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(slow.hits(), 5);
    assert_eq!(
        peak.load(Ordering::SeqCst),
        1,
        "the cap of one was exceeded"
    );
}

/// With several workers the instance's cap is a total: split evenly between them.
#[tokio::test]
async fn the_instance_connection_cap_is_a_total_across_workers() {
    let (slow, peak) = counting_upstream(Duration::from_millis(100)).await;
    let dir = Arc::new(TempDir::new("cap-workers"));
    let extra = "max_connections_per_instance = 2\nqueue_timeout = \"10s\"";
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[slow.addr], None, "workers = 2", extra, ""),
    )
    .await;
    let tasks: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { get(proxy.addr, "/", &[]).await.status }))
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(slow.hits(), 10);
    assert!(
        peak.load(Ordering::SeqCst) <= 2,
        "the cap of two was exceeded"
    );
}

#[tokio::test]
async fn a_queue_timeout_gives_503_and_does_not_eject_the_instance() {
    let (slow, _) = counting_upstream(Duration::from_secs(3)).await;
    let dir = Arc::new(TempDir::new("cap-timeout"));
    // One failure would eject the instance, if the queue timeout counted as one.
    let extra = "max_connections_per_instance = 1\nqueue_timeout = \"300ms\"\neject_after = 1";
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[slow.addr], None, "workers = 1", extra, ""),
    )
    .await;
    let holder = tokio::spawn(async move { get(proxy.addr, "/", &[]).await.status });
    while slow.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = std::time::Instant::now();
    let queued = get(proxy.addr, "/", &[]).await;
    let took = started.elapsed();
    assert_eq!(queued.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    assert_eq!(holder.await.unwrap(), StatusCode::OK);
    let after = get(proxy.addr, "/", &[]).await;
    assert_eq!(after.status, StatusCode::OK, "{}", after.text());
}
