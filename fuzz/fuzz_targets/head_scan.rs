//! Any byte stream from a client, cut at any point: the framing scanner never panics,
//! and feeding it whole or in two pieces finds the same thing.
#![no_main]
use libfuzzer_sys::fuzz_target;
use splitgate::server::head_scan::HeadScanner;

fuzz_target!(|data: &[u8]| {
    let whole = HeadScanner::new().feed(data);
    let cut = data.first().map_or(0, |&b| usize::from(b)).min(data.len());
    let mut split = HeadScanner::new();
    let first = split.feed(&data[..cut]);
    let second = split.feed(&data[cut..]);
    let pieces = if first != splitgate::server::head_scan::Finding::Nothing {
        first
    } else {
        second
    };
    assert_eq!(whole, pieces);
});
