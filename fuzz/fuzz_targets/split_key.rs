//! Any headers and query: the split decides without panicking, and decides the same
//! way twice.
#![no_main]
use libfuzzer_sys::fuzz_target;
use splitgate::proxy::split::{decide, RequestView};

fuzz_target!(|data: &[u8]| {
    let Some((&weight, rest)) = data.split_first() else {
        return;
    };
    let mid = rest.len() / 2;
    let (header, query) = rest.split_at(mid);
    let text = "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.s]\ninstances = [\"127.0.0.1:1\"]\n[upstreams.c]\ninstances = [\"127.0.0.1:2\"]\n[[routes]]\nname = \"r\"\nstable = \"s\"\ncanary = \"c\"\nsplit_key = [\"header:x-user-id\", \"cookie:session\", \"query:uid\"]\n";
    let route = splitgate::config::parse(std::path::Path::new("f.toml"), text)
        .unwrap()
        .routes
        .remove(0);
    let mut headers = http::HeaderMap::new();
    if let Ok(value) = http::HeaderValue::from_bytes(header) {
        headers.insert("x-user-id", value.clone());
        headers.insert("cookie", value);
    }
    let uri = std::str::from_utf8(query)
        .ok()
        .and_then(|q| format!("/p?{q}").parse::<http::Uri>().ok())
        .unwrap_or_else(|| http::Uri::from_static("/"));
    let view = RequestView {
        headers: &headers,
        uri: &uri,
        client_ip: [127, 0, 0, 1].into(),
    };
    let bp = u32::from(weight) * 40;
    let a = decide(&route, bp, false, &view);
    let b = decide(&route, bp, false, &view);
    if a.new_key.is_none() {
        assert_eq!(a, b);
    }
});
