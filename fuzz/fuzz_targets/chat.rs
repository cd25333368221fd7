#![no_main]
//! Fuzz target `chat`: see fuzz/harness.rs (`Target::from_name("chat")`).
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(e) = inferd_fuzz::run(inferd_fuzz::Target::Chat, data) {
        panic!("{e}");
    }
});
