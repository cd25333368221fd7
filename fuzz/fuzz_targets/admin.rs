#![no_main]
//! Fuzz target `admin`: see fuzz/harness.rs (`Target::from_name("admin")`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = inferd_fuzz::run(inferd_fuzz::Target::Admin, data) {
        panic!("{e}");
    }
});
