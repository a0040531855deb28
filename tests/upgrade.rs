//! Upgrades through the proxy: a real WebSocket echo, and an upgrade the upstream
//! declines, with a request pipelined behind it.

mod common;

use std::sync::Arc;

use common::*;
use futures_like::{next_message, send_message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// Minimal stream helpers over tungstenite's Sink/Stream without a futures crate.
mod futures_like {
    use std::future::poll_fn;
    use std::pin::Pin;

    use tokio::io::{AsyncRead, AsyncWrite};
    use tokio_tungstenite::tungstenite::{Error, Message};
    use tokio_tungstenite::WebSocketStream;

    pub async fn send_message<S: AsyncRead + AsyncWrite + Unpin>(
        ws: &mut WebSocketStream<S>,
        message: Message,
    ) -> Result<(), Error> {
        use futures_sink::Sink;
        poll_fn(|cx| Pin::new(&mut *ws).poll_ready(cx)).await?;
        Pin::new(&mut *ws).start_send(message)?;
        poll_fn(|cx| Pin::new(&mut *ws).poll_flush(cx)).await
    }

    pub async fn next_message<S: AsyncRead + AsyncWrite + Unpin>(
        ws: &mut WebSocketStream<S>,
    ) -> Option<Result<Message, Error>> {
        use futures_core::Stream;
        poll_fn(|cx| Pin::new(&mut *ws).poll_next(cx)).await
    }
}

/// A WebSocket echo server on 127.0.0.1:0.
async fn websocket_echo() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = next_message(&mut ws).await {
                    if message.is_close() {
                        break;
                    }
                    if send_message(&mut ws, message).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_websocket_echo_works_through_the_proxy() {
    let echo = websocket_echo().await;
    let dir = Arc::new(TempDir::new("ws"));
    let proxy = start_proxy(dir.clone(), &config(dir.path(), &[echo], None, "", "", "")).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let url = format!("ws://{}/chat", proxy.addr);
    let (mut ws, response) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    assert_eq!(response.status(), 101);
    for text in ["hello", "through", "splitgate"] {
        send_message(&mut ws, Message::Text(text.into()))
            .await
            .unwrap();
        let echoed = next_message(&mut ws).await.unwrap().unwrap();
        assert_eq!(echoed, Message::Text(text.into()));
    }
    send_message(&mut ws, Message::Binary(vec![0, 1, 2, 255]))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut ws).await.unwrap().unwrap(),
        Message::Binary(vec![0, 1, 2, 255])
    );
}

#[tokio::test]
async fn a_declined_upgrade_opens_no_tunnel_and_the_next_request_is_routed() {
    let echo = named_upstream("plain").await;
    let dir = Arc::new(TempDir::new("ws-declined"));
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[echo.addr], None, "", "", ""),
    )
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let pipelined = b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    stream.write_all(pipelined).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut out),
    )
    .await
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 2, "{text}");
    assert!(!text.contains("HTTP/1.1 101"), "{text}");
    assert_eq!(echo.hits(), 2, "both requests were routed as HTTP");
}

/// Whether the proxy closes a new connection at once (over its connection cap) rather
/// than answering it.
async fn refused(proxy: std::net::SocketAddr) -> bool {
    raw(
        proxy,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await
    .is_empty()
}

#[tokio::test]
async fn an_open_tunnel_counts_against_the_connection_cap_until_it_closes() {
    let echo = websocket_echo().await;
    let dir = Arc::new(TempDir::new("ws-cap"));
    let text = config(
        dir.path(),
        &[echo],
        None,
        "max_connections = 1\nworkers = 1",
        "",
        "",
    );
    let proxy = start_proxy(dir.clone(), &text).await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let url = format!("ws://{}/chat", proxy.addr);
    let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    send_message(&mut ws, Message::Text("up".into()))
        .await
        .unwrap();
    assert_eq!(
        next_message(&mut ws).await.unwrap().unwrap(),
        Message::Text("up".into())
    );
    assert!(refused(proxy.addr).await, "a tunnel's slot was given away");

    drop(ws);
    // Once the tunnel has closed, its slot is free again.
    let mut served = false;
    for _ in 0..50 {
        if !refused(proxy.addr).await {
            served = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(served, "the closed tunnel never gave its slot back");
}

/// A raw upstream that keeps connections alive: a request with `Upgrade` gets 101 and
/// then an echo of whatever follows; any other request gets 200 "plain". Every byte it
/// receives is kept in the returned log.
async fn upgrade_or_plain_upstream() -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let received = log.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let received = received.clone();
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                received.lock().unwrap().extend_from_slice(&buf[..n]);
                                seen.extend_from_slice(&buf[..n]);
                            }
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                    seen.drain(..end + 4);
                    if head.contains("\r\nupgrade:") {
                        let switch = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n";
                        if stream.write_all(switch).await.is_err() {
                            return;
                        }
                        let _ = stream.write_all(&seen).await;
                        loop {
                            match stream.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => {
                                    received.lock().unwrap().extend_from_slice(&buf[..n]);
                                    if stream.write_all(&buf[..n]).await.is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    }
                    let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain";
                    if stream.write_all(plain).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, log)
}

#[tokio::test]
async fn an_upgrade_at_the_instance_connection_cap_closes_an_idle_pooled_connection() {
    let (upstream, _) = upgrade_or_plain_upstream().await;
    let dir = Arc::new(TempDir::new("ws-upstream-cap"));
    let extra = "max_connections_per_instance = 1\nqueue_timeout = \"3s\"";
    let text = config(dir.path(), &[upstream], None, "workers = 1", extra, "");
    let proxy = start_proxy(dir.clone(), &text).await;
    // The one allowed upstream connection is now idle in the pool.
    let reply = get(proxy.addr, "/", &[]).await;
    assert_eq!(reply.text(), "plain");

    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"GET /tunnel HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "closed: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "the upgrade waited for the queue: {:?}",
        started.elapsed()
    );
    stream.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping");
}

/// Reads from `stream` until the peer closes or 5 s pass.
async fn read_all(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        stream.read_to_end(&mut out),
    )
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The "h2c smuggling" shape: an h2c upgrade to an upstream that would switch, with a
/// CL+TE request behind it. No tunnel may open: the upgrade goes upstream as a plain
/// request, and the smuggled request is refused before it reaches the upstream.
#[tokio::test]
async fn an_h2c_upgrade_is_never_forwarded_and_what_follows_is_still_checked() {
    let (upstream, received) = upgrade_or_plain_upstream().await;
    let dir = Arc::new(TempDir::new("h2c-smuggle"));
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[upstream], None, "", "", ""),
    )
    .await;
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    let attack = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\nPOST /admin HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    stream.write_all(attack).await.unwrap();
    let text = read_all(&mut stream).await;
    assert!(!text.contains(" 101 "), "a tunnel opened: {text}");
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    assert!(text.contains("HTTP/1.1 400 Bad Request"), "{text}");
    let seen = String::from_utf8_lossy(&received.lock().unwrap()).to_ascii_lowercase();
    assert!(
        !seen.contains("upgrade"),
        "the upstream saw an upgrade: {seen}"
    );
    assert!(
        !seen.contains("/admin") && !seen.contains("/smuggled"),
        "{seen}"
    );
}

/// `Upgrade` without `Connection: upgrade` is no upgrade request: it goes upstream as a
/// plain request, without `Upgrade` and without a `Connection: upgrade` the client never
/// sent; an allowed protocol the client did ask for still tunnels.
#[tokio::test]
async fn an_upgrade_goes_upstream_only_when_the_client_asked_for_an_allowed_protocol() {
    let (upstream, received) = upgrade_or_plain_upstream().await;
    let dir = Arc::new(TempDir::new("upgrade-asked"));
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[upstream], None, "", "", ""),
    )
    .await;
    for request in [
        &b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: close\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: echo\r\nConnection: upgrade, close\r\n\r\n",
    ] {
        let reply = raw(proxy.addr, request).await;
        assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
        assert!(reply.ends_with("plain"), "{reply}");
    }
    let seen = String::from_utf8_lossy(&received.lock().unwrap()).to_ascii_lowercase();
    assert!(!seen.contains("upgrade"), "{seen}");

    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nping",
        )
        .await
        .unwrap();
    let mut head = vec![0u8; 64];
    let n = stream.read(&mut head).await.unwrap();
    assert!(String::from_utf8_lossy(&head[..n]).starts_with("HTTP/1.1 101"));
}

/// An upstream that answers 101 to a request that asked for no upgrade is broken: 502,
/// and no tunnel.
#[tokio::test]
async fn an_unasked_101_from_the_upstream_is_a_502() {
    let upstream = raw_upstream(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n",
    )
    .await;
    let dir = Arc::new(TempDir::new("unasked-101"));
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[upstream.addr], None, "", "", ""),
    )
    .await;
    let reply = raw(
        proxy.addr,
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 502"), "{reply}");
}

#[tokio::test]
async fn connect_is_refused_and_closes_the_connection() {
    let upstream = named_upstream("plain").await;
    let dir = Arc::new(TempDir::new("connect"));
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[upstream.addr], None, "", "", ""),
    )
    .await;
    let reply = raw(
        proxy.addr,
        b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\nPOST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert_eq!(reply.matches("HTTP/1.1").count(), 1, "{reply}");
    assert_eq!(upstream.hits(), 0);
}
