//! TLS connections per second (a handshake and one request each) against splitgate's
//! HTTPS listener, with session resumption on and off (client and server in one process, sharing the 2 cores).
//! `cargo bench --bench tls_handshakes`; under `cargo test` a short smoke run.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use rcgen::{CertificateParams, KeyPair};
use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

#[tokio::main]
async fn main() {
    let full_run = std::env::args().any(|a| a == "--bench");
    let duration = if full_run {
        Duration::from_secs(5)
    } else {
        Duration::from_millis(300)
    };
    for server_resumption in [false, true] {
        let (addr, cert_der, _proxy) = start(server_resumption).await;
        for client_resumption in [false, true] {
            if client_resumption && !server_resumption {
                continue;
            }
            let rate = handshakes(addr, &cert_der, client_resumption, duration).await;
            println!(
                "server resumption {}, client resumption {}: {rate:.0} connections/s (TLS 1.3 handshake + one HTTP/1.1 request; ECDSA P-256; 4 concurrent clients)",
                if server_resumption { "on " } else { "off" },
                if client_resumption { "on " } else { "off" }
            );
        }
    }
}

async fn start(
    session_resumption: bool,
) -> (
    std::net::SocketAddr,
    rustls::pki_types::CertificateDer<'static>,
    TestProxy,
) {
    let stable = named_upstream("stable").await;
    let dir = Arc::new(TempDir::new("tls-bench"));
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["bench.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("c.pem"), dir.path().join("c.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let tls = format!(
        "[server.tls]\nlisten = \"127.0.0.1:0\"\nsession_resumption = {session_resumption}\ncerts = [{{ cert = \"{}\", key = \"{}\" }}]\n",
        cert_path.display(),
        key_path.display()
    );
    let text = config(dir.path(), &[stable.addr], None, "", "", "")
        .replace("\n[admin]", &format!("{tls}\n[admin]"));
    let proxy = start_proxy(dir, &text).await;
    let addr = proxy.running.as_ref().unwrap().tls_addr.unwrap();
    (addr, cert.der().clone(), proxy)
}

async fn handshakes(
    addr: std::net::SocketAddr,
    cert: &rustls::pki_types::CertificateDer<'static>,
    resumption: bool,
    duration: Duration,
) -> f64 {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).unwrap();
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.resumption = if resumption {
        Resumption::in_memory_sessions(256)
    } else {
        Resumption::disabled()
    };
    let connector = TlsConnector::from(Arc::new(config));
    let started = Instant::now();
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let connector = connector.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                while started.elapsed() < duration {
                    let tcp = TcpStream::connect(addr).await.unwrap();
                    tcp.set_nodelay(true).unwrap();
                    let name = ServerName::try_from("bench.test").unwrap();
                    let mut stream = connector.connect(name, tcp).await.unwrap();
                    // One request, so the client also reads the server's session ticket.
                    stream
                        .write_all(
                            b"GET / HTTP/1.1\r\nHost: bench.test\r\nConnection: close\r\n\r\n",
                        )
                        .await
                        .unwrap();
                    let mut sink = Vec::new();
                    let _ = stream.read_to_end(&mut sink).await;
                    done += 1;
                }
                done
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.unwrap();
    }
    total as f64 / started.elapsed().as_secs_f64()
}
