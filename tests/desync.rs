//! Replays the classified request corpus that the `http_desync_guardian` crate ships
//! (its tests/*.yaml) against the proxy over raw TCP. Severe requests must be refused
//! with a 4xx and never reach the upstream; compliant ones must be proxied.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use yaml_rust::{Yaml, YamlLoader};

/// The corpus, from the crate's sources in the cargo registry (a dev-dependency, so
/// cargo has fetched it).
fn corpus_dir() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cargo"));
    let registry = cargo_home.join("registry").join("src");
    for index in std::fs::read_dir(&registry).expect("cargo registry sources") {
        let dir = index
            .unwrap()
            .path()
            .join("http_desync_guardian-0.1.3")
            .join("tests");
        if dir.is_dir() {
            return dir;
        }
    }
    panic!(
        "http_desync_guardian-0.1.3 sources not found under {}",
        registry.display()
    );
}

struct Case {
    file: String,
    name: String,
    tier: String,
    request: Vec<u8>,
}

fn text(yaml: &Yaml) -> String {
    match yaml {
        Yaml::String(s) => s.clone(),
        Yaml::Integer(i) => i.to_string(),
        Yaml::Real(r) => r.clone(),
        Yaml::Boolean(b) => b.to_string(),
        _ => String::new(),
    }
}

fn load_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in files
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        let docs = YamlLoader::load_from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let Some(Yaml::Array(items)) = docs.into_iter().next() else {
            continue;
        };
        for item in items {
            let headers: Vec<(String, String)> = match &item["headers"] {
                Yaml::Array(hs) => hs
                    .iter()
                    .map(|h| (text(&h["name"]), text(&h["value"])))
                    .collect(),
                _ => Vec::new(),
            };
            let version = text(&item["version"]);
            let mut head = format!("{} {}", text(&item["method"]), text(&item["uri"]));
            if !version.is_empty() {
                head.push(' ');
                head.push_str(&version);
            }
            head.push_str("\r\n");
            if !headers
                .iter()
                .any(|(n, _)| n.trim().eq_ignore_ascii_case("host"))
            {
                head.push_str("Host: example.com\r\n");
            }
            for (name, value) in &headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            let mut request = head.into_bytes();
            // A body that fits the request's own framing, so nothing waits on it.
            let content_length = headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse::<usize>().ok());
            if headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
            {
                request.extend_from_slice(b"0\r\n\r\n");
            } else if let Some(n) = content_length {
                request.extend(std::iter::repeat_n(b'a', n));
            }
            cases.push(Case {
                file: path.file_name().unwrap().to_string_lossy().into_owned(),
                name: text(&item["name"]),
                tier: text(&item["expected"]["tier"]),
                request,
            });
        }
    }
    cases
}

/// Sends one raw request; returns the status code of the first response (0 when the
/// proxy closed without one).
async fn status_of(addr: std::net::SocketAddr, request: &[u8]) -> u16 {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let _ = stream.write_all(request).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while !out.windows(4).any(|w| w == b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&out);
    text.split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

/// splitgate's contract is stricter than RFC 9112 here: any Transfer-Encoding other than
/// exactly one `chunked` is refused (DESIGN.md and the security issue list `gzip,
/// chunked`, `identity` and repeated TE as shapes to refuse), so the corpus's compliant
/// cases that use other codings are expected to get 400.
fn refused_by_policy(request: &[u8]) -> bool {
    let text = String::from_utf8_lossy(request).to_ascii_lowercase();
    let encodings: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("transfer-encoding:"))
        .map(str::trim)
        .collect();
    !encodings.is_empty() && encodings != ["chunked"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_desync_corpus_is_classified_as_it_should_be() {
    let cases = load_cases();
    assert!(
        cases.len() > 150,
        "corpus not found or empty: {}",
        cases.len()
    );
    let mut problems = Vec::new();
    let (mut severe, mut compliant) = (0, 0);
    for case in &cases {
        // A proxy and upstream per case, so the upstream's count is this case's alone.
        // Reads the whole body before answering, as applications do.
        let upstream = upstream(|request: http::Request<hyper::body::Incoming>| async move {
            use http_body_util::BodyExt;
            let _ = request.into_body().collect().await;
            http::Response::new(full("ok"))
        })
        .await;
        let dir = Arc::new(TempDir::new("desync"));
        let proxy = start_proxy(
            dir.clone(),
            &config(dir.path(), &[upstream.addr], None, "", "", ""),
        )
        .await;
        let status = status_of(proxy.addr, &case.request).await;
        let reached = upstream.hits();
        match case.tier.as_str() {
            "Severe" => {
                severe += 1;
                if !(400..500).contains(&status) || reached > 0 {
                    problems.push(format!(
                        "SEVERE {}:{} got {status}, upstream saw {reached}",
                        case.file, case.name
                    ));
                }
            }
            // A request line without a target cannot be proxied; hyper refuses it.
            "Compliant" if case.name == "Empty URI" => {}
            "Compliant" if refused_by_policy(&case.request) => {
                problems.extend((status != 400 || reached > 0).then(|| {
                    format!(
                        "POLICY {}:{} got {status}, upstream saw {reached}",
                        case.file, case.name
                    )
                }))
            }
            "Compliant" => {
                compliant += 1;
                if status != 200 || reached != 1 {
                    problems.push(format!(
                        "COMPLIANT {}:{} got {status}, upstream saw {reached}",
                        case.file, case.name
                    ));
                }
            }
            _ => {}
        }
    }
    println!(
        "desync corpus: {} cases, {severe} severe refused, {compliant} compliant proxied",
        cases.len()
    );
    assert!(
        problems.is_empty(),
        "{} of {severe} severe and {compliant} compliant cases misclassified:\n{}",
        problems.len(),
        problems.join("\n")
    );
}
