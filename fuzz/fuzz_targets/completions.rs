#![no_main]
//! Fuzz target `completions`: see fuzz/harness.rs (`Target::from_name("completions")`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = inferd_fuzz::run(inferd_fuzz::Target::Completions, data) {
        panic!("{e}");
    }
});
