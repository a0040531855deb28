//! The proxy's own HTTP/1.1 client (src/upstream/h1): request bodies framed as they
//! came, responses framed by length, chunks (with trailers) or the connection's end,
//! informational heads skipped, an instance that answers before reading the body heard,
//! and pooled connections that stay in step across HEAD and bodiless responses.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// An upstream that answers with the framing headers it received and the body's
/// length and last bytes.
async fn framing_echo() -> TestUpstream {
    upstream(|request: Request<Incoming>| async move {
        let header = |name| {
            request
                .headers()
                .get(name)
                .map_or("-".to_string(), |v| v.to_str().unwrap().to_string())
        };
        let (cl, te) = (header("content-length"), header("transfer-encoding"));
        let collected = request.into_body().collect().await.unwrap();
        let trailers = collected.trailers().map_or(0, |t| t.len());
        let body = collected.to_bytes();
        let tail = String::from_utf8_lossy(&body[body.len().saturating_sub(4)..]).into_owned();
        let text = format!("cl={cl} te={te} len={} tail={tail}", body.len());
        Response::new(full(match trailers {
            0 => text,
            n => format!("{text} trailers={n}"),
        }))
    })
    .await
}

/// A request body that streams `pieces` from a channel: no length known in advance.
fn streamed(pieces: Vec<Bytes>) -> TestBody {
    let (tx, body) = channel_body();
    tokio::spawn(async move {
        for piece in pieces {
            if tx.send(piece).await.is_err() {
                return;
            }
        }
    });
    body
}

/// A request body fed through a channel: it ends when the sender is dropped.
fn channel_body() -> (tokio::sync::mpsc::Sender<Bytes>, TestBody) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let frames = ReceiverStream::new(rx).map(|b| Ok::<_, hyper::Error>(Frame::data(b)));
    (tx, StreamBody::new(frames).boxed())
}

#[tokio::test]
async fn request_bodies_go_upstream_with_their_length_or_chunked() {
    let echo = framing_echo().await;
    let proxy = proxy_to(echo.addr, "h1-bodies").await;

    let sized = Request::post("/")
        .header("content-length", "5")
        .body(full("hello"))
        .unwrap();
    assert_eq!(
        send(proxy.addr, sized).await.text(),
        "cl=5 te=- len=5 tail=ello"
    );

    // A bodiless POST still says it has no body.
    let empty = Request::post("/").body(full("")).unwrap();
    assert_eq!(
        send(proxy.addr, empty).await.text(),
        "cl=0 te=- len=0 tail="
    );

    // A chunked client body of 1 MiB in uneven pieces goes on chunked, intact.
    let pieces: Vec<Bytes> = (0..64u8)
        .map(|i| Bytes::from(vec![b'a' + i % 26; 16_000 + usize::from(i)]))
        .collect();
    let total: usize = pieces.iter().map(Bytes::len).sum();
    let chunked = Request::post("/").body(streamed(pieces)).unwrap();
    assert_eq!(
        send(proxy.addr, chunked).await.text(),
        format!("cl=- te=chunked len={total} tail=llll")
    );

    // A client's trailers are not passed on: they would come after every check and
    // rewrite of the head (here a Host and an X-Forwarded-For of the client's choosing).
    let mut trailers = http::HeaderMap::new();
    trailers.insert("host", "evil.example".parse().unwrap());
    trailers.insert("x-forwarded-for", "6.6.6.6".parse().unwrap());
    let frames = vec![
        Ok::<_, hyper::Error>(Frame::data(Bytes::from_static(b"hello"))),
        Ok(Frame::trailers(trailers)),
    ];
    let with_trailers = StreamBody::new(tokio_stream::iter(frames)).boxed();
    let request = Request::post("/").body(with_trailers).unwrap();
    assert_eq!(
        send(proxy.addr, request).await.text(),
        "cl=- te=chunked len=5 tail=ello"
    );

    // An HTTP/2 client's body without content-length goes chunked too.
    let mut h2 = h2_client(proxy.addr).await;
    let request = Request::post(format!("http://{}/", proxy.addr))
        .body(streamed(vec![
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"defg"),
        ]))
        .unwrap();
    let response = h2.send_request(request).await.unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "cl=- te=chunked len=7 tail=defg");
}

/// An upstream that reads one request head per connection and answers `reply`, then
/// reads (and drops) whatever else comes until the client closes: a lingering close, so
/// its answer is not lost to a reset.
async fn scripted(reply: &'static [u8]) -> std::net::SocketAddr {
    scripted_then(reply, true).await
}

/// As [`scripted`]; `close`: shut the write side after the reply (else keep it open).
async fn scripted_then(reply: &'static [u8], close: bool) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_request_head(&mut stream, &mut Vec::new())
                    .await
                    .is_none()
                {
                    return;
                }
                let _ = stream.write_all(reply).await;
                if close {
                    let _ = stream.shutdown().await;
                }
                let mut buf = [0u8; 8192];
                while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

async fn proxy_to(addr: std::net::SocketAddr, name: &str) -> TestProxy {
    proxy_with(addr, name, "", "").await
}

/// A proxy in front of the one instance `addr`, with extra `[server]` and upstream lines.
async fn proxy_with(
    addr: std::net::SocketAddr,
    name: &str,
    server_extra: &str,
    upstream_extra: &str,
) -> TestProxy {
    let dir = Arc::new(TempDir::new(name));
    let text = config(dir.path(), &[addr], None, server_extra, upstream_extra, "");
    start_proxy(dir, &text).await
}

#[tokio::test]
async fn chunked_responses_arrive_with_their_trailers() {
    let addr = scripted(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nx-checksum: 42\r\n\r\n",
    )
    .await;
    let proxy = proxy_to(addr, "h1-trailers").await;
    // An HTTP/2 client, which takes trailers without their being announced.
    let mut sender = h2_client(proxy.addr).await;
    let request = Request::get(format!("http://{}/", proxy.addr))
        .header("te", "trailers")
        .body(full(""))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let collected = response.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().expect("trailers passed on");
    assert_eq!(trailers["x-checksum"], "42");
    assert_eq!(collected.to_bytes(), "hello, world");
}

#[tokio::test]
async fn informational_heads_are_skipped_and_a_body_may_run_to_the_close() {
    let addr = scripted(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    )
    .await;
    let proxy = proxy_to(addr, "h1-informational").await;
    let reply = get(proxy.addr, "/", &[]).await;
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (StatusCode::OK, "ok")
    );

    // No length and no chunks: the body is whatever comes before the instance closes.
    let long: &'static [u8] = Box::leak(
        [
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n".as_slice(),
            &[b'x'; 300_000],
        ]
        .concat()
        .into_boxed_slice(),
    );
    let addr = scripted(long).await;
    let proxy = proxy_to(addr, "h1-until-close").await;
    let reply = get(proxy.addr, "/", &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body.len(), 300_000);
}

#[tokio::test]
async fn an_instance_that_refuses_before_reading_the_body_is_heard() {
    let addr = scripted(
        b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\nconnection: close\r\n\r\ntoo big!",
    )
    .await;
    let proxy = proxy_to(addr, "h1-early").await;
    // The client sends the first piece of its upload and then stalls: the instance's
    // refusal must reach it anyway, long before any body timeout.
    let (tx, body) = channel_body();
    tx.send(Bytes::from(vec![b'u'; 64 * 1024])).await.unwrap();
    let request = Request::post("/upload")
        .header("host", "a")
        .body(body)
        .unwrap();
    let mut sender = h1_client(proxy.addr).await;
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .expect("the refusal arrives while the upload stalls")
        .unwrap();
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "too big!");
    drop(tx);
}

#[tokio::test]
async fn pooled_connections_stay_in_step_across_bodiless_responses() {
    let upstream = upstream(|request: Request<Incoming>| async move {
        match request.uri().path() {
            "/empty" => {
                let mut response = Response::new(full(""));
                *response.status_mut() = StatusCode::NO_CONTENT;
                response
            }
            path => Response::new(full(format!("body of {path}"))),
        }
    })
    .await;
    let proxy = proxy_to(upstream.addr, "h1-bodiless").await;
    // A HEAD's answer announces a length it does not send, and a 204 sends nothing: a
    // client that read either wrongly would take the next response's bytes as a body.
    for round in 0..3 {
        let head = send(proxy.addr, Request::head("/page").body(full("")).unwrap()).await;
        assert_eq!(head.status, StatusCode::OK, "round {round}");
        assert_eq!(head.headers["content-length"], "13");
        assert!(head.body.is_empty());
        let empty = get(proxy.addr, "/empty", &[]).await;
        assert_eq!(empty.status, StatusCode::NO_CONTENT);
        let page = get(proxy.addr, &format!("/next{round}"), &[]).await;
        assert_eq!(page.text(), format!("body of /next{round}"));
    }
    assert_eq!(upstream.hits(), 9);
}

#[tokio::test]
async fn a_bodiless_response_still_has_its_length_checked() {
    // A HEAD's answer sends no body, but its Content-Length reaches the client.
    let addr = scripted(b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n").await;
    let proxy = proxy_to(addr, "h1-head-length").await;
    let reply = send(proxy.addr, Request::head("/").body(full("")).unwrap()).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);

    // The same length twice is one length.
    let addr =
        scripted(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 2\r\n\r\nok").await;
    let proxy = proxy_to(addr, "h1-twice").await;
    let reply = get(proxy.addr, "/", &[]).await;
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (StatusCode::OK, "ok")
    );
    assert_eq!(reply.headers.get_all("content-length").iter().count(), 1);
}

/// An upstream that answers every GET after `delay` and closes a connection idle for
/// `idle`.
async fn closing_after(idle: Duration, delay: Duration) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match tokio::time::timeout(idle, stream.read(&mut buf)).await {
                        Ok(Ok(n)) if n > 0 => seen.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                    while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                        seen.drain(..end + 4);
                        tokio::time::sleep(delay).await;
                        let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if stream.write_all(reply).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn idle_connections_the_instance_closed_are_let_go_while_a_newer_one_stays_busy() {
    let addr = closing_after(Duration::from_millis(300), Duration::from_millis(100)).await;
    let proxy = proxy_with(addr, "h1-reap", "workers = 1", "").await;
    let path = format!("/admin/upstreams/stable-pool/instances/{addr}");
    let connections = || async {
        let (status, value) = admin(proxy.admin, "GET", &path, "", None).await;
        assert_eq!(status, StatusCode::OK, "{value}");
        value["connections"].as_u64().unwrap()
    };
    // Ten at once: (nearly always) ten pooled connections.
    let burst: Vec<_> = (0..10)
        .map(|_| tokio::spawn(get(proxy.addr, "/", &[])))
        .collect();
    for request in burst {
        assert_eq!(request.await.unwrap().status, StatusCode::OK);
    }
    let opened = connections().await;
    assert!(opened >= 5, "the burst opened {opened} connections");
    // One request at a time keeps the newest connection in use, never idle long
    // enough for the instance to close it, while the instance closes those beneath
    // it. Those go as connections come back, not only when a request reaches them.
    for _ in 0..20 {
        assert_eq!(get(proxy.addr, "/", &[]).await.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(connections().await, 1);
}

/// An upstream that answers each request as soon as its head is in (as NGINX's
/// `return 200` does), then reads its body (by Content-Length), keeping the connection;
/// counts the body bytes it received.
async fn answers_before_reading() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let counter = received.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = vec![0u8; 65536];
                loop {
                    let Some(end) = read_request_head(&mut stream, &mut seen).await else {
                        return;
                    };
                    let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                    let mut left: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: ")?.trim().parse().ok())
                        .unwrap_or(0);
                    seen.drain(..end);
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(reply).await.is_err() {
                        return;
                    }
                    while left > 0 {
                        if seen.is_empty() {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => seen.extend_from_slice(&buf[..n]),
                            }
                        }
                        let take = left.min(seen.len());
                        seen.drain(..take);
                        left -= take;
                        counter.fetch_add(take, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    (addr, received)
}

#[tokio::test]
async fn an_upload_answered_early_still_goes_out_whole_and_the_client_gets_the_answer() {
    // The client, still sending, must neither be cut off nor lose the answer, the
    // upload reaches the instance whole, and the client's connection stays usable: a
    // second request sent right after the first upload is answered too.
    let (addr, received) = answers_before_reading().await;
    let proxy = proxy_to(addr, "h1-early-ok").await;
    let upload = vec![b'u'; 4 * 1024 * 1024];
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let sending = tokio::spawn(async move {
        let head = format!(
            "POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: {}\r\n\r\n",
            upload.len()
        );
        writer.write_all(head.as_bytes()).await?;
        writer.write_all(&upload).await?;
        writer
            .write_all(b"GET /next HTTP/1.1\r\nhost: a\r\n\r\n")
            .await?;
        Ok::<_, std::io::Error>(writer)
    });
    let mut answers = Vec::new();
    let mut buf = [0u8; 4096];
    let read_both = async {
        while answers.windows(2).filter(|w| w == b"ok").count() < 2 {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answers.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read_both)
        .await
        .expect("both answers arrive");
    let text = String::from_utf8_lossy(&answers);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    let _writer = sending.await.unwrap().expect("the upload was not cut off");
    // The rest of the upload may still be going out from the proxy: give it time.
    let whole = async {
        while received.load(std::sync::atomic::Ordering::SeqCst) < 4 * 1024 * 1024 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), whole)
        .await
        .expect("the whole upload reaches the instance");
}

#[tokio::test]
async fn an_http_1_0_instance_does_not_end_the_clients_keep_alive() {
    let addr = scripted(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let proxy = proxy_to(addr, "h1-http10").await;
    let mut sender = h1_client(proxy.addr).await;
    for _ in 0..3 {
        let request = Request::get("/")
            .header("host", "a")
            .body(full(""))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.version(), http::Version::HTTP_11);
        assert_eq!(response.headers()["via"], "1.0 splitgate");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "ok");
    }
}

#[tokio::test]
async fn a_response_body_that_stalls_is_cut_at_the_read_timeout() {
    // Seven of a hundred bytes, then nothing, on a connection the instance keeps open.
    let addr = scripted_then(
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n1234567",
        false,
    )
    .await;
    let proxy = proxy_with(addr, "h1-stall", "", "read_timeout = \"300ms\"").await;
    let mut sender = h1_client(proxy.addr).await;
    let request = Request::get("/")
        .header("host", "a")
        .body(full(""))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let started = std::time::Instant::now();
    let body = tokio::time::timeout(Duration::from_secs(10), response.into_body().collect())
        .await
        .expect("the stalled body ends");
    assert!(body.is_err(), "a cut body is not a complete one");
    assert!(started.elapsed() >= Duration::from_millis(250));
    // On-call sees it as the instance's timeout.
    let metrics = get(proxy.admin, "/metrics", &[]).await.text();
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("kind=\"timeout\"") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_instance_that_answers_early_and_stops_reading_is_let_go() {
    // It answers at once and never reads the upload: the rest of the upload cannot go
    // out, and the connection, its slot and the in-flight mark must not stay taken.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = read_request_head(&mut stream, &mut Vec::new()).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nearly")
                .await;
            held.push(stream);
        }
    });
    let proxy = proxy_with(
        addr,
        "h1-no-reader",
        "workers = 1",
        "read_timeout = \"300ms\"",
    )
    .await;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    tokio::spawn(async move {
        let head = "POST /u HTTP/1.1\r\nhost: a\r\ncontent-length: 64000000\r\n\r\n";
        let _ = writer.write_all(head.as_bytes()).await;
        let chunk = vec![b'u'; 1 << 20];
        for _ in 0..64 {
            if writer.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"early") {
        let n = tokio::time::timeout(Duration::from_secs(5), reader.read(&mut buf))
            .await
            .expect("the early answer arrives")
            .unwrap();
        assert!(n > 0, "closed before the answer");
        answer.extend_from_slice(&buf[..n]);
    }
    let path = format!("/admin/upstreams/stable-pool/instances/{addr}");
    let started = std::time::Instant::now();
    loop {
        let (_, value) = admin(proxy.admin, "GET", &path, "", None).await;
        if value["in_flight"] == 0 && value["connections"] == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still held: {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
