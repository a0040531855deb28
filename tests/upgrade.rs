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
    let text = config(dir.path(), &[echo], None, "max_connections = 1", "", "");
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
/// then an echo of whatever follows; any other request gets 200 "plain".
async fn upgrade_or_plain_upstream() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&seen[..end]).to_ascii_lowercase();
                    seen.drain(..end + 4);
                    if head.contains("\r\nupgrade:") {
                        let switch = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n";
                        if stream.write_all(switch).await.is_err() {
                            return;
                        }
                        let (mut reader, mut writer) = stream.split();
                        let _ = writer.write_all(&seen).await;
                        let _ = tokio::io::copy(&mut reader, &mut writer).await;
                        return;
                    }
                    let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain";
                    if stream.write_all(plain).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_upgrade_at_the_instance_connection_cap_closes_an_idle_pooled_connection() {
    let upstream = upgrade_or_plain_upstream().await;
    let dir = Arc::new(TempDir::new("ws-upstream-cap"));
    let extra = "max_connections_per_instance = 1\nqueue_timeout = \"3s\"";
    let text = config(dir.path(), &[upstream], None, "", extra, "");
    let proxy = start_proxy(dir.clone(), &text).await;
    // The one allowed upstream connection is now idle in the pool.
    let reply = get(proxy.addr, "/", &[]).await;
    assert_eq!(reply.text(), "plain");

    let started = std::time::Instant::now();
    let mut stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream
        .write_all(
            b"GET /tunnel HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
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
