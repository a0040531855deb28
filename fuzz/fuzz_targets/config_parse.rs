//! Any text given as a config file: an error or settings, never a panic. Host names are
//! not resolved, so random input never turns into DNS queries.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = splitgate::config::parse_with(
            std::path::Path::new("fuzz.toml"),
            text,
            splitgate::config::net::Names::LiteralOnly,
        );
    }
});
