#![no_main]
//! Fuzz target `tokenize`: see fuzz/harness.rs (`Target::from_name("tokenize")`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = inferd_fuzz::run(inferd_fuzz::Target::Tokenize, data) {
        panic!("{e}");
    }
});
