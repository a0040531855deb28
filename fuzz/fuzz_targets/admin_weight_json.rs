//! Any admin weight body: a weight in basis points (0–10 000) or a reason; never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(bp) = splitgate::admin::handlers::parse_weight(data) {
        assert!(bp <= 10_000);
    }
});
