#![no_main]
//! Fuzz target `raw_http`: see fuzz/harness.rs (`Target::from_name("raw_http")`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = inferd_fuzz::run(inferd_fuzz::Target::RawHttp, data) {
        panic!("{e}");
    }
});
