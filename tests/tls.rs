//! TLS termination and upstream TLS, with certificates made at test time (rcgen).

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{client::TlsStream, TlsAcceptor, TlsConnector};

/// A test certificate authority.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Self {
            cert: params.self_signed(&key).unwrap(),
            key,
        }
    }

    /// Issues a leaf for `names`; writes `stem.pem` and `stem.key` into `dir`.
    fn issue(
        &self,
        dir: &Path,
        stem: &str,
        names: &[&str],
        expired: bool,
    ) -> (PathBuf, PathBuf, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        if expired {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        }
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{stem}.pem")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path, cert.der().clone())
    }

    fn write(&self, path: &Path) {
        std::fs::write(path, self.cert.pem()).unwrap();
    }

    fn client(&self, alpn: &[&[u8]]) -> TlsConnector {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).unwrap();
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        TlsConnector::from(Arc::new(config))
    }
}

async fn tls_connect(
    connector: &TlsConnector,
    addr: std::net::SocketAddr,
    name: &str,
) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .unwrap()
}

fn peer_cert(stream: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

struct Setup {
    proxy: TestProxy,
    ca: Ca,
    a: (PathBuf, PathBuf, CertificateDer<'static>),
    b: CertificateDer<'static>,
    tls: std::net::SocketAddr,
}

async fn setup() -> Setup {
    let stable = named_upstream("stable").await;
    let dir = Arc::new(TempDir::new("tls"));
    let ca = Ca::new("splitgate test CA");
    let a = ca.issue(dir.path(), "a", &["a.test"], false);
    let b = ca.issue(dir.path(), "b", &["b.test"], false);
    let tls = format!(
        "[server.tls]\nlisten = \"127.0.0.1:0\"\nhandshake_timeout = \"500ms\"\ncerts = [{{ cert = \"{}\", key = \"{}\" }}, {{ cert = \"{}\", key = \"{}\" }}]\n",
        a.0.display(),
        a.1.display(),
        b.0.display(),
        b.1.display()
    );
    let text = config(dir.path(), &[stable.addr], None, "", "", "")
        .replace("\n[admin]", &format!("{tls}\n[admin]"));
    let proxy = start_proxy(dir, &text).await;
    let tls = proxy.running.as_ref().unwrap().tls_addr.unwrap();
    Setup {
        proxy,
        ca,
        a,
        b: b.2,
        tls,
    }
}

async fn h1_get(
    stream: TlsStream<TcpStream>,
    path: &str,
) -> (hyper::client::conn::http1::SendRequest<TestBody>, Reply) {
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let reply = h1_again(&mut sender, path).await;
    (sender, reply)
}

async fn h1_again(
    sender: &mut hyper::client::conn::http1::SendRequest<TestBody>,
    path: &str,
) -> Reply {
    let request = Request::get(path)
        .header("host", "a.test")
        .body(full(""))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.unwrap().to_bytes(),
    }
}

#[tokio::test]
async fn http1_and_h2_over_tls_with_forwarded_proto_https() {
    let s = setup().await;
    let stream = tls_connect(&s.ca.client(&[b"http/1.1"]), s.tls, "a.test").await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (_, reply) = h1_get(stream, "/one").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(
        reply.text().contains("x-forwarded-proto: https"),
        "{}",
        reply.text()
    );

    let stream = tls_connect(&s.ca.client(&[b"h2", b"http/1.1"]), s.tls, "a.test").await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(Request::get("https://a.test/two").body(full("")).unwrap())
        .await
        .unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&body).contains("x-forwarded-proto: https"));
    let metrics = get(s.proxy.admin, "/metrics", &[]).await.text();
    assert!(
        metrics.contains("splitgate_connections{listener=\"https\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn sni_picks_the_certificate_for_each_name() {
    let s = setup().await;
    let client = s.ca.client(&[b"http/1.1"]);
    assert_eq!(
        peer_cert(&tls_connect(&client, s.tls, "a.test").await),
        s.a.2
    );
    assert_eq!(peer_cert(&tls_connect(&client, s.tls, "b.test").await), s.b);
}

#[tokio::test]
async fn rotation_reaches_new_connections_while_old_ones_keep_going() {
    let s = setup().await;
    let client = s.ca.client(&[b"http/1.1"]);
    let old = tls_connect(&client, s.tls, "a.test").await;
    assert_eq!(peer_cert(&old), s.a.2);
    let (mut old_sender, first) = h1_get(old, "/before").await;
    assert_eq!(first.status, StatusCode::OK);

    // Rotate a.test: a new key and certificate in the same files, then reload.
    let dir = s.a.0.parent().unwrap();
    let rotated = s.ca.issue(dir, "a", &["a.test"], false);
    let (status, body) = admin(s.proxy.admin, "POST", "/admin/reload", "", None).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    // A fresh client: one that resumes its old session keeps that session's certificate.
    let fresh = || s.ca.client(&[b"http/1.1"]);
    assert_eq!(
        peer_cert(&tls_connect(&fresh(), s.tls, "a.test").await),
        rotated.2
    );
    assert_eq!(
        h1_again(&mut old_sender, "/after").await.status,
        StatusCode::OK,
        "the old connection keeps going"
    );

    // A broken certificate is refused, and the rotated one stays.
    std::fs::write(
        &rotated.0,
        "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (status, body) = admin(s.proxy.admin, "POST", "/admin/reload", "", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(body["error"].as_str().unwrap().contains("a.pem"), "{body}");
    assert_eq!(
        peer_cert(&tls_connect(&fresh(), s.tls, "a.test").await),
        rotated.2
    );
}

#[tokio::test]
async fn a_stalled_handshake_is_dropped() {
    let s = setup().await;
    let mut stream = TcpStream::connect(s.tls).await.unwrap();
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut stream, &mut buf),
    )
    .await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "expected the server to close, got {read:?}"
    );
    assert!(started.elapsed() >= std::time::Duration::from_millis(400));
}

#[test]
fn bad_certificate_configs_are_refused_with_clear_messages() {
    use splitgate::config::TlsSettings;
    use splitgate::server::tls;
    let dir = TempDir::new("tls-bad");
    let ca = Ca::new("ca");
    let a = ca.issue(dir.path(), "a", &["a.test"], false);
    let b = ca.issue(dir.path(), "b", &["b.test"], false);
    let old = ca.issue(dir.path(), "old", &["old.test"], true);
    let settings = |certs: Vec<(PathBuf, PathBuf)>| TlsSettings {
        listen: "127.0.0.1:0".parse().unwrap(),
        certs,
        handshake_timeout: std::time::Duration::from_secs(1),
        session_resumption: true,
    };
    let missing = tls::load(&settings(vec![(dir.path().join("nope.pem"), a.1.clone())]))
        .err()
        .unwrap();
    assert!(missing.to_string().contains("nope.pem"), "{missing}");
    let mismatch = tls::load(&settings(vec![(a.0.clone(), b.1.clone())]))
        .err()
        .unwrap();
    assert!(
        mismatch.to_string().contains("does not match"),
        "{mismatch}"
    );
    assert!(tls::load(&settings(vec![]))
        .err()
        .unwrap()
        .to_string()
        .contains("no certificates"));
    let (_, warnings) = tls::load(&settings(vec![(old.0.clone(), old.1.clone())])).unwrap();
    assert_eq!(warnings.len(), 1);
    assert!(
        warnings[0].contains("expired at 2020-01-01"),
        "{warnings:?}"
    );

    // `splitgate check` refuses the mismatch with exit 2 and warns on the expired one.
    let stable =
        "[upstreams.s]\ninstances = [\"127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\nstable = \"s\"\n";
    let check = |cert: &Path, key: &Path| {
        let path = dir.path().join("c.toml");
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[server.tls]\nlisten = \"127.0.0.1:0\"\ncerts = [{{ cert = \"{}\", key = \"{}\" }}]\n{stable}",
            cert.display(),
            key.display()
        );
        std::fs::write(&path, text).unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_splitgate"))
            .args(["check", "-c"])
            .arg(&path)
            .output()
            .unwrap()
    };
    let out = check(&a.0, &b.1);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not match"));
    let out = check(&old.0, &old.1);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("warning"));
}

/// An HTTPS upstream presenting a certificate for `upstream.test` from `ca`.
async fn tls_upstream(ca: &Ca, dir: &Path) -> std::net::SocketAddr {
    tls_upstream_alpn(ca, dir, &[]).await
}

/// As [`tls_upstream`], offering `alpn` (none: HTTP/1.1 only) and answering with the
/// protocol version each request came in.
async fn tls_upstream_alpn(ca: &Ca, dir: &Path, alpn: &[&[u8]]) -> std::net::SocketAddr {
    let (cert, key, _) = ca.issue(dir, "upstream", &["upstream.test"], false);
    use rustls::pki_types::pem::PemObject;
    let chain = vec![CertificateDer::from_pem_file(&cert).unwrap()];
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let mut config = config;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let versions = !alpn.is_empty();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = service_fn(move |request: Request<Incoming>| async move {
                    let text = match versions {
                        true => format!("secure upstream over {:?}", request.version()),
                        false => "secure upstream".to_string(),
                    };
                    Ok::<_, std::convert::Infallible>(Response::new(full(text)))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn h2_and_auto_upstreams_negotiate_http2_by_alpn() {
    let ca = Ca::new("upstream CA");
    for (protocol, offered, expected) in [
        ("h2", &[&b"h2"[..]][..], "HTTP/2.0"),
        ("auto", &[&b"h2"[..], &b"http/1.1"[..]][..], "HTTP/2.0"),
        ("auto", &[&b"http/1.1"[..]][..], "HTTP/1.1"),
        ("http1", &[&b"h2"[..], &b"http/1.1"[..]][..], "HTTP/1.1"),
    ] {
        let dir = Arc::new(TempDir::new(&format!("up-alpn-{protocol}")));
        let upstream = tls_upstream_alpn(&ca, dir.path(), offered).await;
        let ca_path = dir.path().join("ca.pem");
        ca.write(&ca_path);
        let extra = format!(
            "tls = true\nsni = \"upstream.test\"\nca = \"{}\"\nprotocol = \"{protocol}\"",
            ca_path.display()
        );
        let proxy = start_proxy(
            dir.clone(),
            &config(dir.path(), &[upstream], None, "", &extra, ""),
        )
        .await;
        // Twice: the second goes on the pooled connection or stream.
        for _ in 0..2 {
            let reply = get(proxy.addr, "/", &[]).await;
            assert_eq!(
                (reply.status, reply.text()),
                (StatusCode::OK, format!("secure upstream over {expected}")),
                "{protocol} with ALPN {offered:?}"
            );
        }
    }
    // protocol = "h2" to an instance that does not offer h2 fails the handshake: 502.
    let dir = Arc::new(TempDir::new("up-alpn-refused"));
    let upstream = tls_upstream_alpn(&ca, dir.path(), &[b"http/1.1"]).await;
    let ca_path = dir.path().join("ca.pem");
    ca.write(&ca_path);
    let extra = format!(
        "tls = true\nsni = \"upstream.test\"\nca = \"{}\"\nprotocol = \"h2\"",
        ca_path.display()
    );
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[upstream], None, "", &extra, ""),
    )
    .await;
    assert_eq!(
        get(proxy.addr, "/", &[]).await.status,
        StatusCode::BAD_GATEWAY
    );
}

#[tokio::test]
async fn upstream_tls_verifies_against_the_configured_ca() {
    let dir = Arc::new(TempDir::new("up-tls"));
    let ca = Ca::new("upstream CA");
    let upstream = tls_upstream(&ca, dir.path()).await;
    let ca_path = dir.path().join("ca.pem");
    ca.write(&ca_path);
    let extra = format!(
        "tls = true\nsni = \"upstream.test\"\nca = \"{}\"",
        ca_path.display()
    );
    let proxy = start_proxy(
        dir.clone(),
        &config(dir.path(), &[upstream], None, "", &extra, ""),
    )
    .await;
    let reply = get(proxy.addr, "/", &[]).await;
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (StatusCode::OK, "secure upstream")
    );

    // The wrong CA: verification fails, which is a connect error and a 502.
    let other = Ca::new("some other CA");
    let other_path = dir.path().join("other.pem");
    other.write(&other_path);
    let dir2 = Arc::new(TempDir::new("up-tls-wrong"));
    let extra = format!(
        "tls = true\nsni = \"upstream.test\"\nca = \"{}\"",
        other_path.display()
    );
    let proxy = start_proxy(
        dir2.clone(),
        &config(dir2.path(), &[upstream], None, "", &extra, ""),
    )
    .await;
    assert_eq!(
        get(proxy.addr, "/", &[]).await.status,
        StatusCode::BAD_GATEWAY
    );
    let metrics = get(proxy.admin, "/metrics", &[]).await.text();
    assert!(
        metrics.contains("splitgate_upstream_errors_total{route=\"main\",upstream=\"stable-pool\",kind=\"connect\"} 1"),
        "{metrics}"
    );
}

/// A request written right after the handshake (it can arrive with the client's last
/// handshake flight, already read by rustls) is answered at once; and a keep-alive TLS
/// connection idle long enough to release its buffers serves its next request.
#[tokio::test]
async fn a_request_sent_with_the_handshake_and_one_after_the_buffer_release_are_served() {
    use std::time::Duration;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let s = setup().await;
    let connector = s.ca.client(&[]);
    for _ in 0..20 {
        let mut stream = tls_connect(&connector, s.tls, "a.test").await;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut reply = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply))
            .await
            .expect("answered and closed at once")
            .unwrap();
        assert!(reply.starts_with(b"HTTP/1.1 200"));
    }

    let stream = tls_connect(&connector, s.tls, "a.test").await;
    let (mut sender, first) = h1_get(stream, "/first").await;
    assert_eq!(first.status, StatusCode::OK);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = get(s.proxy.admin, "/metrics", &[]).await.text();
        if metrics.contains("splitgate_connections_idle{listener=\"https\"} 1") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let again = h1_again(&mut sender, "/again").await;
    assert_eq!(again.status, StatusCode::OK);
    assert!(
        again.headers.get("connection").is_none(),
        "still keep-alive"
    );
}
