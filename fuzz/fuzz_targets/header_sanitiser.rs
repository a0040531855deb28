//! Any header set: hop-by-hop stripping leaves no hop-by-hop header and no header the
//! Connection header named.
#![no_main]
use libfuzzer_sys::fuzz_target;
use splitgate::proxy::forward::strip_hop_by_hop;

fuzz_target!(|data: &[u8]| {
    let mut headers = http::HeaderMap::new();
    let mut named = Vec::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(&line[..colon]),
            http::HeaderValue::from_bytes(&line[colon + 1..]),
        ) else {
            continue;
        };
        if name == http::header::CONNECTION {
            for token in value.as_bytes().split(|&b| b == b',') {
                if let Ok(listed) = http::HeaderName::from_bytes(token.trim_ascii()) {
                    named.push(listed);
                }
            }
        }
        headers.append(name, value);
    }
    strip_hop_by_hop(&mut headers);
    for gone in [
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-connection",
    ] {
        assert!(!headers.contains_key(gone), "{gone} survived");
    }
    for name in &named {
        assert!(
            !headers.contains_key(name),
            "{name} was named in Connection but survived"
        );
    }
});
