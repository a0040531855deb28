//! gRPC and HTTP/2 to upstreams: a real gRPC client (tonic's) through splitgate to a
//! real gRPC server (tonic's codec over hyper's HTTP/2), unary and bidirectional
//! streaming; the judge tripping a canary whose failures arrive in the trailers; and
//! HTTP/2 upstreams that misbehave (streams reset part way, refused, GOAWAY, broken
//! frames), each a clean error, counted.

mod common;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status, Streaming};

/// Messages as raw bytes: the proxy never looks inside them, so no protobuf is needed.
#[derive(Clone, Copy, Default)]
struct BytesCodec;

impl Codec for BytesCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = BytesCodec;
    type Decoder = BytesCodec;
    fn encoder(&mut self) -> Self {
        *self
    }
    fn decoder(&mut self) -> Self {
        *self
    }
}

impl Encoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for BytesCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// How a unary method answers a message.
type Answer = dyn Fn(&Bytes) -> Result<Bytes, Status> + Send + Sync;

/// A unary method: each message answered by the function.
#[derive(Clone)]
struct Unary(Arc<Answer>);

impl tower_service::Service<tonic::Request<Bytes>> for Unary {
    type Response = tonic::Response<Bytes>;
    type Error = Status;
    type Future = BoxFuture<Result<tonic::Response<Bytes>, Status>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, request: tonic::Request<Bytes>) -> Self::Future {
        let reply = (self.0)(request.get_ref());
        Box::pin(async move { reply.map(tonic::Response::new) })
    }
}

/// `/test.Echo/Unary`: the message back, prefixed with the server's name.
fn echo(name: &'static str) -> Unary {
    Unary(Arc::new(move |message| {
        let mut reply = name.as_bytes().to_vec();
        reply.extend_from_slice(b": ");
        reply.extend_from_slice(message);
        Ok(Bytes::from(reply))
    }))
}

/// `/test.Echo/Chat`: every message back as it arrives (bidirectional streaming).
#[derive(Clone)]
struct Chat;

impl tower_service::Service<tonic::Request<Streaming<Bytes>>> for Chat {
    type Response = tonic::Response<ReceiverStream<Result<Bytes, Status>>>;
    type Error = Status;
    type Future = BoxFuture<Result<Self::Response, Status>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, request: tonic::Request<Streaming<Bytes>>) -> Self::Future {
        Box::pin(async move {
            let mut incoming = request.into_inner();
            let (sender, receiver) = tokio::sync::mpsc::channel(4);
            tokio::spawn(async move {
                while let Ok(Some(message)) = incoming.message().await {
                    if sender.send(Ok(message)).await.is_err() {
                        return;
                    }
                }
            });
            Ok(tonic::Response::new(ReceiverStream::new(receiver)))
        })
    }
}

/// A gRPC server over cleartext HTTP/2 (h2c). `fail_in_trailers`: every unary call
/// answers HTTP 200 with one message, then `grpc-status: 14` in the trailers.
async fn grpc_server(name: &'static str, fail_in_trailers: bool) -> TestUpstream {
    upstream_h2(move |request: Request<Incoming>| async move {
        if fail_in_trailers {
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "14".parse().unwrap());
            trailers.insert("grpc-message", "backend%20down".parse().unwrap());
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))),
                Ok(Frame::trailers(trailers)),
            ];
            let body = StreamBody::new(tokio_stream::iter(frames));
            return Response::builder()
                .header("content-type", "application/grpc")
                .body(tonic::body::Body::new(body))
                .unwrap();
        }
        let mut grpc = tonic::server::Grpc::new(BytesCodec);
        match request.uri().path() {
            "/test.Echo/Chat" => grpc.streaming(Chat, request).await,
            _ => grpc.unary(echo(name), request).await,
        }
    })
    .await
}

/// An HTTP/2-only (h2c prior knowledge) server running `handler` for each request.
async fn upstream_h2<F, Fut, B>(handler: F) -> TestUpstream
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (handler, counter) = (handler.clone(), counter.clone());
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let response = handler(request);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    TestUpstream { addr, hits }
}

async fn channel(proxy: &TestProxy) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", proxy.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    tonic::client::Grpc::new(channel)
}

async fn unary(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    message: &'static [u8],
) -> Result<Bytes, Status> {
    unary_at(client, "/test.Echo/Unary", message).await
}

/// One unary call to `path`; the reply's message or its status.
async fn unary_at(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    path: &'static str,
    message: &'static [u8],
) -> Result<Bytes, Status> {
    client.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static(path);
    client
        .unary(
            tonic::Request::new(Bytes::from_static(message)),
            path,
            BytesCodec,
        )
        .await
        .map(|r| r.into_inner())
}

async fn metrics(proxy: &TestProxy) -> String {
    get(proxy.admin, "/metrics", &[]).await.text()
}

fn series(route_side: &str, code: &str) -> String {
    format!("splitgate_requests_total{{route=\"main\",{route_side},code=\"{code}\"}}")
}

const STABLE: &str = "upstream=\"stable-pool\",variant=\"stable\"";

#[tokio::test]
async fn unary_and_bidirectional_streaming_grpc_through_an_h2c_upstream() {
    let server = grpc_server("stable", false).await;
    let dir = Arc::new(TempDir::new("grpc-e2e"));
    // A short client_body_timeout: a streaming call may still pause longer between
    // messages once it is under way.
    let text = config(
        dir.path(),
        &[server.addr],
        None,
        "client_body_timeout = \"1s\"",
        "protocol = \"h2c\"",
        "",
    );
    let proxy = start_proxy(dir, &text).await;
    let mut client = channel(&proxy).await;
    for _ in 0..5 {
        let reply = unary(&mut client, b"hello").await.expect("a unary call");
        assert_eq!(&reply[..], b"stable: hello");
    }

    // Bidirectional: each message is answered before the next is sent, so nothing
    // may wait for the end of the request stream.
    let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(1);
    client.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/test.Echo/Chat");
    let call = client.streaming(
        tonic::Request::new(ReceiverStream::new(receiver)),
        path,
        BytesCodec,
    );
    sender.send(Bytes::from_static(b"one")).await.unwrap();
    let mut replies = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the response head while the request stream is open")
        .expect("a streaming call")
        .into_inner();
    for word in ["one", "two", "three"] {
        if word == "three" {
            tokio::time::sleep(Duration::from_millis(1500)).await;
        }
        if word != "one" {
            sender.send(Bytes::from(word)).await.unwrap();
        }
        let reply = tokio::time::timeout(Duration::from_secs(10), replies.message())
            .await
            .expect("an echo before the request stream ends")
            .unwrap()
            .unwrap();
        assert_eq!(reply, word.as_bytes());
    }
    drop(sender);
    // The server's OK comes in the trailers, after the last message.
    assert!(replies.message().await.unwrap().is_none());
    assert!(replies.trailers().await.unwrap().is_some());

    let text = metrics(&proxy).await;
    assert!(
        text.contains(&format!("{} 6", series(STABLE, "grpc_ok"))),
        "{text}"
    );
    assert!(
        text.contains("splitgate_request_stream_seconds_count{route=\"main\",upstream=\"stable-pool\",variant=\"stable\"} 6"),
        "{text}"
    );
    // Six calls, multiplexed: one HTTP/2 connection to the instance.
    let upstreams = get(proxy.admin, "/admin/upstreams/stable-pool", &[])
        .await
        .text();
    assert!(upstreams.contains("\"connections\": 1"), "{upstreams}");
}

#[tokio::test]
async fn grpc_to_an_http1_upstream_is_a_clear_grpc_error() {
    let plain = named_upstream("plain").await;
    let dir = Arc::new(TempDir::new("grpc-h1"));
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[plain.addr], None, "", "", ""),
    )
    .await;
    let mut client = channel(&proxy).await;
    let status = unary(&mut client, b"x").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("needs HTTP/2"), "{status:?}");
    assert_eq!(plain.hits(), 0, "nothing downgraded to HTTP/1.1 reached it");
    // A client's gRPC call is no evidence against the instance: not an upstream error,
    // not an ejection.
    let text = metrics(&proxy).await;
    assert!(
        text.contains(&format!("{} 1", series(STABLE, "5xx"))),
        "{text}"
    );
    assert!(
        !text.contains("splitgate_upstream_errors_total{route=\"main\",upstream=\"stable-pool\",kind=\"protocol\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_canary_failing_in_its_trailers_is_tripped_by_the_judge() {
    let stable = grpc_server("stable", false).await;
    let canary = grpc_server("canary", true).await;
    let dir = Arc::new(TempDir::new("grpc-trip"));
    let text = config(
        dir.path(),
        &[stable.addr],
        Some(&[canary.addr]),
        "",
        "protocol = \"h2c\"",
        "canary_weight = 50\nsplit_key = [\"header:x-user-id\"]\n[routes.slo]\nwindow = \"10s\"\nmin_requests = 20\nmax_error_rate = 0.1\n",
    );
    let proxy = start_proxy(dir, &text).await;
    let mut client = channel(&proxy).await;
    let (mut ok, mut failed) = (0, 0);
    for i in 0..400 {
        client.ready().await.unwrap();
        let mut request = tonic::Request::new(Bytes::from_static(b"x"));
        request
            .metadata_mut()
            .insert("x-user-id", format!("user-{i}").parse().unwrap());
        let path = http::uri::PathAndQuery::from_static("/test.Echo/Unary");
        match client.unary::<_, Bytes, _>(request, path, BytesCodec).await {
            Ok(_) => ok += 1,
            Err(status) => {
                // HTTP 200 with a message: only the trailers say it failed.
                assert_eq!(status.code(), Code::Unavailable);
                assert_eq!(status.message(), "backend down");
                failed += 1;
            }
        }
        let state = admin(proxy.admin, "GET", "/admin/routes/main", "", None)
            .await
            .1;
        if state["slo"]["state"] == "tripped" {
            break;
        }
    }
    assert!(failed >= 20 && ok > 0, "ok {ok}, failed {failed}");
    let state = wait_for_route(proxy.admin, Duration::from_secs(10), "the trip", |s| {
        s["slo"]["state"] == "tripped"
    })
    .await;
    assert_eq!(state["canary_weight"], 0.0, "{state}");
    let text = metrics(&proxy).await;
    let canary_series = series("upstream=\"canary-pool\",variant=\"canary\"", "grpc_error");
    assert!(
        text.contains(&format!("{canary_series} {failed}")),
        "{text}"
    );
    // The failed calls were HTTP 200s: none is counted as 2xx.
    let canary_2xx = series("upstream=\"canary-pool\",variant=\"canary\"", "2xx");
    assert!(text.contains(&format!("{canary_2xx} 0")), "{text}");
    // From now on every call gets stable.
    for _ in 0..10 {
        assert!(unary(&mut client, b"x")
            .await
            .unwrap()
            .starts_with(b"stable"));
    }
}

#[tokio::test]
async fn a_stream_reset_mid_body_is_an_error() {
    // Raw h2: the head and part of the body, then RST_STREAM.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut connection = h2::server::handshake(stream).await.unwrap();
                while let Some(Ok((_request, mut respond))) = connection.accept().await {
                    // Its own task: the connection is driven (and the head flushed)
                    // by `accept` while the body waits.
                    tokio::spawn(async move {
                        let response = Response::builder()
                            .header("content-type", "text/plain")
                            .body(())
                            .unwrap();
                        let mut body = respond.send_response(response, false).unwrap();
                        body.send_data(Bytes::from_static(b"partial "), false)
                            .unwrap();
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        body.send_reset(h2::Reason::INTERNAL_ERROR);
                    });
                }
            });
        }
    });
    let dir = Arc::new(TempDir::new("h2-reset"));
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[addr], None, "", "protocol = \"h2c\"", ""),
    )
    .await;
    let result = try_send(proxy.addr, Request::get("/").body(full("")).unwrap()).await;
    match result {
        Ok(reply) => panic!("a body cut short arrived whole: {:?}", reply.body),
        Err(error) => assert!(!error.to_string().is_empty()),
    }
    let text = wait_for_metric(&proxy, &format!("{} 1", series(STABLE, "error"))).await;
    assert!(
        text.contains("splitgate_upstream_errors_total{route=\"main\",upstream=\"stable-pool\",kind=\"reset\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} 0", series(STABLE, "2xx"))),
        "{text}"
    );
}

/// Polls the metrics until `wanted` shows (the outcome of a response cut short is
/// recorded when the proxy sees the failure, which may be just after the client does).
async fn wait_for_metric(proxy: &TestProxy, wanted: &str) -> String {
    for _ in 0..100 {
        let text = metrics(proxy).await;
        if text.contains(wanted) {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{wanted} never showed: {}", metrics(proxy).await);
}

#[tokio::test]
async fn refused_streams_and_goaway_are_sent_again_on_another_connection() {
    // The first stream on each connection is refused (REFUSED_STREAM); the next ones
    // are answered. A POST with a body: what was refused unprocessed is safe to resend.
    let refused = Arc::new(AtomicUsize::new(0));
    let count = refused.clone();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let refusing = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut connection = h2::server::handshake(stream).await.unwrap();
                let mut first = true;
                while let Some(Ok((request, mut respond))) = connection.accept().await {
                    if std::mem::take(&mut first) {
                        count.fetch_add(1, Ordering::SeqCst);
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    tokio::spawn(async move {
                        let body = request.into_body().collect_h2().await;
                        let mut send = respond.send_response(Response::new(()), false).unwrap();
                        send.send_data(body, true).unwrap();
                    });
                }
            });
        }
    });
    let dir = Arc::new(TempDir::new("h2-refused"));
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[refusing], None, "", "protocol = \"h2c\"", ""),
    )
    .await;
    let reply = send(
        proxy.addr,
        Request::post("/").body(full("the body")).unwrap(),
    )
    .await;
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (StatusCode::OK, "the body")
    );
    assert_eq!(refused.load(Ordering::SeqCst), 1);

    // A graceful GOAWAY that leaves the stream out (last-stream-id 0): the first
    // connection refuses it that way, the second answers.
    let goaway = goaway_then_h2(1).await;
    let dir = Arc::new(TempDir::new("h2-goaway"));
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[goaway], None, "", "protocol = \"h2c\"", ""),
    )
    .await;
    let reply = send(proxy.addr, Request::post("/").body(full("again")).unwrap()).await;
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (StatusCode::OK, "again")
    );
}

#[tokio::test]
async fn misbehaving_h2_upstreams_are_clean_errors() {
    // Every connection answers with a GOAWAY (a storm): a few tries, then 502.
    let storm = goaway_then_h2(usize::MAX).await;
    // Every stream gets a DATA frame on stream 0: a connection-level protocol error.
    let broken = raw_h2(|stream_id| {
        let _ = stream_id;
        // DATA, flags 0, stream 0: "DATA frames MUST be associated with a stream".
        vec![0, 0, 1, 0, 0, 0, 0, 0, 0, b'x']
    })
    .await;
    // A response head far over the header-list limit.
    let huge = upstream_h2(|_request: Request<Incoming>| async {
        Response::builder()
            .header("x-huge", "a".repeat(100_000))
            .body(full("never"))
            .unwrap()
    })
    .await;
    // Every stream reset at once: with an error, and as refused (sent again, a few
    // times, then given up).
    let reset = raw_h2(|stream_id| rst_stream(stream_id, 2)).await;
    let refuse_all = raw_h2(|stream_id| rst_stream(stream_id, 7)).await;
    for (name, addr, kind) in [
        ("reset", reset, "reset"),
        ("refuse-all", refuse_all, "reset"),
        ("storm", storm, "reset"),
        ("broken", broken, "protocol"),
        ("huge", huge.addr, "protocol"),
    ] {
        let dir = Arc::new(TempDir::new(&format!("h2-bad-{name}")));
        let proxy = start_proxy(
            dir.clone(),
            &config(
                dir.path(),
                &[addr],
                None,
                "",
                "protocol = \"h2c\"\nresponse_timeout = \"5s\"",
                "",
            ),
        )
        .await;
        let reply = tokio::time::timeout(Duration::from_secs(10), get(proxy.addr, "/", &[]))
            .await
            .unwrap_or_else(|_| panic!("{name}: the request hung"));
        assert_eq!(reply.status, StatusCode::BAD_GATEWAY, "{name}");
        let text = metrics(&proxy).await;
        assert!(
            text.contains(&format!("{} 1", series(STABLE, "error"))),
            "{name}: {text}"
        );
        assert!(
            text.contains(&format!("splitgate_upstream_errors_total{{route=\"main\",upstream=\"stable-pool\",kind=\"{kind}\"}} 1")),
            "{name}: {text}"
        );
        // And a gRPC caller gets UNAVAILABLE, not an HTML page.
        let mut client = channel(&proxy).await;
        let status = unary(&mut client, b"x").await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{name}: {status:?}");
    }
}

/// A server whose first `goaways` connections each answer the first request with a
/// graceful GOAWAY (NO_ERROR, last-stream-id 0: the request was not processed); later
/// connections are served by hyper, echoing the request body.
async fn goaway_then_h2(goaways: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut served = 0;
        while let Ok((stream, _)) = listener.accept().await {
            served += 1;
            if served <= goaways {
                tokio::spawn(raw_h2_conn(stream, |_| {
                    // GOAWAY: last-stream-id 0, NO_ERROR.
                    vec![0, 0, 8, 7, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
                }));
                continue;
            }
            tokio::spawn(async move {
                let service = service_fn(|request: Request<Incoming>| async move {
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    Ok::<_, Infallible>(Response::new(full(body)))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// An RST_STREAM frame for `stream_id` with error `code` (2 INTERNAL_ERROR, 7
/// REFUSED_STREAM).
fn rst_stream(stream_id: u32, code: u32) -> Vec<u8> {
    let mut frame = vec![0, 0, 4, 3, 0];
    frame.extend_from_slice(&stream_id.to_be_bytes());
    frame.extend_from_slice(&code.to_be_bytes());
    frame
}

/// A hand-rolled HTTP/2 server: SETTINGS, then for each HEADERS frame it reads, the
/// bytes `reply` gives for that stream.
async fn raw_h2(reply: fn(u32) -> Vec<u8>) -> SocketAddr {
    raw_h2_with(&[], reply).await
}

/// As [`raw_h2`], each connection sending `settings` (id and value pairs, 6 bytes each).
async fn raw_h2_with(settings: &'static [u8], reply: fn(u32) -> Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(raw_h2_conn_with(stream, settings, reply));
        }
    });
    addr
}

async fn raw_h2_conn(stream: tokio::net::TcpStream, reply: fn(u32) -> Vec<u8>) {
    raw_h2_conn_with(stream, &[], reply).await
}

/// As [`raw_h2_conn`], sending `settings` (id and value pairs, 6 bytes each).
async fn raw_h2_conn_with(
    mut stream: tokio::net::TcpStream,
    settings: &[u8],
    reply: fn(u32) -> Vec<u8>,
) {
    let mut preface = [0u8; 24];
    if stream.read_exact(&mut preface).await.is_err() {
        return;
    }
    // Our SETTINGS, then frames as they come.
    let mut frame = vec![0, 0, settings.len() as u8, 4, 0, 0, 0, 0, 0];
    frame.extend_from_slice(settings);
    let _ = stream.write_all(&frame).await;
    loop {
        let mut head = [0u8; 9];
        if stream.read_exact(&mut head).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        if stream.read_exact(&mut payload).await.is_err() {
            return;
        }
        let stream_id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        match head[3] {
            // SETTINGS without ACK: acknowledge.
            4 if head[4] & 1 == 0 => {
                let _ = stream.write_all(&[0, 0, 0, 4, 1, 0, 0, 0, 0]).await;
            }
            // PING without ACK: answer it.
            6 if head[4] & 1 == 0 => {
                let mut pong = vec![0, 0, 8, 6, 1, 0, 0, 0, 0];
                pong.extend_from_slice(&payload);
                let _ = stream.write_all(&pong).await;
            }
            // HEADERS.
            1 => {
                let _ = stream.write_all(&reply(stream_id)).await;
            }
            _ => {}
        }
    }
}

/// Collecting an h2 crate request body (test helper).
trait CollectH2 {
    async fn collect_h2(self) -> Bytes;
}

impl CollectH2 for h2::RecvStream {
    async fn collect_h2(mut self) -> Bytes {
        let mut all = bytes::BytesMut::new();
        while let Some(Ok(chunk)) = self.data().await {
            let _ = self.flow_control().release_capacity(chunk.len());
            all.extend_from_slice(&chunk);
        }
        all.freeze()
    }
}

#[tokio::test]
async fn the_demo_answers_grpc_through_its_h2c_route() {
    let stable = splitgate::demo::start_upstream("stable").await.unwrap();
    let canary = splitgate::demo::start_upstream("canary").await.unwrap();
    let dir = Arc::new(TempDir::new("grpc-demo"));
    let localhost = SocketAddr::from(([127, 0, 0, 1], 0));
    let text =
        splitgate::demo::config_text(localhost, localhost, dir.path(), stable.addr, canary.addr);
    let proxy = start_proxy(dir, &text).await;
    let mut client = channel(&proxy).await;
    let path = "/splitgate.demo.Greeter/Hello";
    let reply = unary_at(&mut client, path, b"hi").await.unwrap();
    assert!(reply.starts_with(b"hello from"), "{reply:?}");
    // A failing demo server still answers HTTP 200 with its message; the status is in
    // the trailers.
    canary.failing.store(true, Ordering::SeqCst);
    stable.failing.store(true, Ordering::SeqCst);
    let status = unary_at(&mut client, path, b"hi").await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "demo upstream failing");
}

#[tokio::test]
async fn streams_fill_the_advertised_limit_before_a_new_connection_opens() {
    // The instance allows 2 concurrent streams per connection and answers after 300 ms.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let opened = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            opened.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut connection = h2::server::Builder::new()
                    .max_concurrent_streams(2)
                    .handshake::<_, Bytes>(stream)
                    .await
                    .unwrap();
                while let Some(Ok((_request, mut respond))) = connection.accept().await {
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                        let mut body = respond.send_response(Response::new(()), false).unwrap();
                        body.send_data(Bytes::from_static(b"ok"), true).unwrap();
                    });
                }
            });
        }
    });
    let run = |cap: &'static str, name: &'static str| {
        let connections = connections.clone();
        async move {
            connections.store(0, Ordering::SeqCst);
            let dir = Arc::new(TempDir::new(name));
            let extra = format!("protocol = \"h2c\"\n{cap}");
            // One worker: each has connections of its own.
            let proxy = start_proxy(
                dir.clone(),
                &config(dir.path(), &[addr], None, "workers = 1", &extra, ""),
            )
            .await;
            // Warm one connection, so that its SETTINGS (2 streams) are known.
            assert_eq!(get(proxy.addr, "/", &[]).await.status, StatusCode::OK);
            let calls: Vec<_> = (0..6)
                .map(|_| tokio::spawn(get(proxy.addr, "/", &[])))
                .collect();
            for call in calls {
                assert_eq!(call.await.unwrap().text(), "ok");
            }
            connections.load(Ordering::SeqCst)
        }
    };
    // Six at once, two per connection: three connections.
    assert_eq!(run("", "h2-streams").await, 3);
    // At a cap of one connection, the six share its two streams in turn.
    let started = std::time::Instant::now();
    assert_eq!(
        run(
            "max_connections_per_instance = 1\nqueue_timeout = \"5s\"",
            "h2-cap"
        )
        .await,
        1
    );
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "three rounds of two"
    );
}

#[tokio::test]
async fn the_callers_grpc_timeout_bounds_the_wait_for_the_head() {
    let slow = upstream_h2(|_request: Request<Incoming>| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Response::new(full("late"))
    })
    .await;
    let dir = Arc::new(TempDir::new("grpc-deadline"));
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[slow.addr], None, "", "protocol = \"h2c\"", ""),
    )
    .await;
    let started = std::time::Instant::now();
    let response = call_with_deadline(&proxy, "/test.Echo/Unary", "200m").await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["grpc-status"], "4", "{response:?}");
    // Counted as the instance's own DEADLINE_EXCEEDED would be (in the route's
    // grpc_error_statuses by default: a hanging canary must not look healthy).
    let text = metrics(&proxy).await;
    assert!(
        text.contains(&format!("{} 1", series(STABLE, "grpc_error"))),
        "{text}"
    );
    assert!(
        text.contains(&format!("{} 0", series(STABLE, "error"))),
        "{text}"
    );
}

/// A gRPC call with `grpc-timeout: timeout` through the proxy, from a plain HTTP/2
/// client (tonic's would give up on its own at the deadline); the response head.
async fn call_with_deadline(proxy: &TestProxy, path: &str, timeout: &str) -> Response<Incoming> {
    let mut sender = h2_client(proxy.addr).await;
    let request = Request::post(format!("http://{}{path}", proxy.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("grpc-timeout", timeout)
        .body(full(Bytes::from_static(b"\0\0\0\0\x01x")))
        .unwrap();
    sender.send_request(request).await.unwrap()
}

/// The deadline bounds the whole call: a response that starts in time but then stalls
/// ends at the deadline with DEADLINE_EXCEEDED in its trailers, after the messages
/// already sent, and the upstream's stream is cancelled.
#[tokio::test]
async fn the_callers_grpc_timeout_bounds_a_stalled_stream_too() {
    let (cancelled_tx, mut cancelled) = tokio::sync::mpsc::channel::<()>(1);
    let stalling = upstream_h2(move |_request: Request<Incoming>| {
        let cancelled_tx = cancelled_tx.clone();
        async move {
            // One message, then nothing: the sender is kept until the stream goes.
            let (frames, receiver) =
                tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
            frames
                .send(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x02hi"))))
                .await
                .unwrap();
            tokio::spawn(async move {
                frames.closed().await;
                let _ = cancelled_tx.send(()).await;
            });
            Response::builder()
                .header("content-type", "application/grpc")
                .body(StreamBody::new(ReceiverStream::new(receiver)))
                .unwrap()
        }
    })
    .await;
    let dir = Arc::new(TempDir::new("grpc-stream-deadline"));
    let proxy = start_proxy(
        dir.clone(),
        &config(
            dir.path(),
            &[stalling.addr],
            None,
            "",
            "protocol = \"h2c\"",
            "",
        ),
    )
    .await;
    let started = std::time::Instant::now();
    let response = call_with_deadline(&proxy, "/test.Echo/Stream", "300m").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers().get("grpc-status").is_none());
    let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
        .await
        .expect("the call ends at its deadline")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    let trailers = body.trailers().cloned().expect("trailers");
    assert_eq!(trailers["grpc-status"], "4", "{trailers:?}");
    assert_eq!(
        &body.to_bytes()[..],
        b"\0\0\0\0\x02hi",
        "the message sent in time"
    );
    tokio::time::timeout(Duration::from_secs(5), cancelled.recv())
        .await
        .expect("the upstream's stream is cancelled");
    let text = metrics(&proxy).await;
    assert!(
        text.contains(&format!("{} 1", series(STABLE, "grpc_error"))),
        "{text}"
    );
}

#[tokio::test]
async fn a_stream_whose_response_ended_frees_its_place_though_the_client_keeps_sending() {
    // One stream at a time (SETTINGS_MAX_CONCURRENT_STREAMS 1): the instance answers
    // each call at once with a bare `:status 200` and END_STREAM, never reads the
    // request and never resets it, so the stream stays half open until we let go.
    let addr = raw_h2_with(&[0, 3, 0, 0, 0, 1], |stream_id| {
        // HEADERS, END_STREAM | END_HEADERS, HPACK static index 8 (:status 200).
        let mut frame = vec![0, 0, 1, 1, 5];
        frame.extend_from_slice(&stream_id.to_be_bytes());
        frame.push(0x88);
        frame
    })
    .await;
    let dir = Arc::new(TempDir::new("h2-ended"));
    let extra = "protocol = \"h2c\"\nmax_connections_per_instance = 1\nqueue_timeout = \"3s\"";
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[addr], None, "workers = 1", extra, ""),
    )
    .await;
    let mut sender = h2_client(proxy.addr).await;
    let call = |body: TestBody| {
        Request::post(format!("http://{}/test.Echo/Chat", proxy.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .unwrap()
    };
    // A request stream that stays open.
    let (frames, receiver) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, hyper::Error>>(1);
    frames
        .send(Ok(Frame::data(Bytes::from_static(b"\0\0\0\0\x01a"))))
        .await
        .unwrap();
    let open = BodyExt::boxed(StreamBody::new(ReceiverStream::new(receiver)));
    let first = sender.send_request(call(open)).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    // The next call gets the instance's one stream, though the first client is still
    // sending: its response is over, so its stream was let go.
    let started = std::time::Instant::now();
    let second = sender
        .send_request(call(full(Bytes::from_static(b"\0\0\0\0\x01b"))))
        .await
        .unwrap();
    assert_eq!(second.status(), StatusCode::OK, "{second:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(frames);
}

/// `grpc.health.v1.Health/Check` for service "api": SERVING or NOT_SERVING as `serving`
/// says; any other service is NOT_FOUND, as a gRPC health server answers.
fn health(serving: Arc<std::sync::atomic::AtomicBool>) -> Unary {
    Unary(Arc::new(move |request| {
        // HealthCheckRequest { service: "api" }: field 1, 3 bytes.
        if request[..] != b"\x0a\x03api"[..] {
            return Err(Status::not_found("unknown service"));
        }
        let status = if serving.load(Ordering::SeqCst) { 1 } else { 2 };
        Ok(Bytes::from(vec![0x08, status]))
    }))
}

/// `check = "grpc"`: the gRPC health protocol over h2c against a gRPC server (tonic's):
/// SERVING keeps the instance in, NOT_SERVING takes it out with the reason, SERVING
/// brings it back; a service the server does not know fails with its grpc-status; a
/// plain HTTP/1.1 upstream cannot have the check at all.
#[tokio::test]
async fn grpc_health_checks_follow_the_servers_health_status() {
    let serving = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let paths = Arc::new(std::sync::Mutex::new(Vec::new()));
    let server = {
        let (serving, paths) = (serving.clone(), paths.clone());
        upstream_h2(move |request: Request<Incoming>| {
            let (serving, paths) = (serving.clone(), paths.clone());
            async move {
                paths.lock().unwrap().push(request.uri().path().to_string());
                let mut grpc = tonic::server::Grpc::new(BytesCodec);
                grpc.unary(health(serving), request).await
            }
        })
        .await
    };
    let section = |service: &str| {
        format!(
            "protocol = \"h2c\"\n[upstreams.stable-pool.health]\ncheck = \"grpc\"\nservice = \"{service}\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n"
        )
    };
    let dir = Arc::new(TempDir::new("grpc-health"));
    let text = config(dir.path(), &[server.addr], None, "", &section("api"), "");
    let mut proxy = start_proxy(dir.clone(), &text).await;
    let instance = format!("/admin/upstreams/stable-pool/instances/{}", server.addr);
    let wait = |what, check: fn(&serde_json::Value) -> bool| {
        wait_for_admin(proxy.admin, &instance, Duration::from_secs(5), what, check)
    };
    wait("SERVING: up", |i| i["health"] == "up").await;
    serving.store(false, Ordering::SeqCst);
    let down = wait("NOT_SERVING: down", |i| i["health"] == "down").await;
    assert!(
        down["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("NOT_SERVING")),
        "{down}"
    );
    serving.store(true, Ordering::SeqCst);
    wait("SERVING again: up", |i| i["health"] == "up").await;
    assert!(paths
        .lock()
        .unwrap()
        .iter()
        .all(|p| p == "/grpc.health.v1.Health/Check"));
    proxy.shutdown().await;

    // A service the server does not know: its grpc-status is the reason.
    let dir = Arc::new(TempDir::new("grpc-health-unknown"));
    let text = config(
        dir.path(),
        &[server.addr],
        None,
        "",
        &section("billing"),
        "",
    );
    let proxy = start_proxy(dir, &text).await;
    let wait = |what, check: fn(&serde_json::Value) -> bool| {
        wait_for_admin(proxy.admin, &instance, Duration::from_secs(5), what, check)
    };
    let down = wait("unknown service: down", |i| i["health"] == "down").await;
    assert!(
        down["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("grpc-status 5")),
        "{down}"
    );

    // Without HTTP/2 to the upstream the check cannot run: refused, naming the field.
    let dir = TempDir::new("grpc-health-http1");
    let text = config(dir.path(), &[server.addr], None, "", &section("api"), "")
        .replace("protocol = \"h2c\"\n", "");
    let errors = splitgate::config::parse(std::path::Path::new("c.toml"), &text)
        .unwrap_err()
        .to_string();
    assert!(
        errors.contains("upstreams.stable-pool.health.check") && errors.contains("h2c"),
        "{errors}"
    );
}
