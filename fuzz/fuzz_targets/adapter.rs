#![no_main]
//! Fuzz target `adapter`: see fuzz/harness.rs (`Target::from_name("adapter")`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = inferd_fuzz::run(inferd_fuzz::Target::Adapter, data) {
        panic!("{e}");
    }
});
