//! The fuzz targets' harness (`../harness.rs`, shared with `tests/fuzz_corpus.rs`).
#[path = "../harness.rs"]
mod harness;
pub use harness::*;
