//! Models loaded at the same time (a server's workers, tests in one process) each get inferd's
//! kernels. ONNX Runtime adds a custom operator domain to a process-wide map with a check and an
//! add that are not atomic together; before `runtime::open_session` serialised them, about one
//! run in 16 of two loads at once had one session fall back to ONNX Runtime's kernels, whose
//! logits differ in the last bits (and are not batch-invariant).
//!
//! Only a process's first registration can race, so the test runs its loads in fresh processes
//! (this test binary again, with one test selected).
mod reference_common;
use std::path::PathBuf;
use std::sync::{Arc, Barrier};

use inferd::backend::onnx::{op_edit, OnnxBackend};
use inferd::backend::{Backend, StepInput};

fn load(dir: &str) -> OnnxBackend {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/onnx").join(dir);
    reference_common::load_onnx(&path, 1, 1, Some(64), None)
}

const CHILD: &str = "INFERD_TEST_CONCURRENT_LOAD_CHILD";

#[test]
fn models_loaded_at_once_all_run_on_inferds_kernels_with_the_same_logits() {
    if !matches!(
        reference_common::onnx_test_device(),
        inferd::config::Device::Cpu
    ) {
        return; // inferd's kernels are CPU kernels
    }
    let exe = std::env::current_exe().expect("test binary");
    for process in 0..24 {
        let out = std::process::Command::new(&exe)
            .args([
                "--exact",
                "loads_in_this_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .output()
            .expect("run the test binary");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "process {process}:\n{text}"
        );
    }
}

/// Four models loaded at once in this process, twice; runs only under the test above.
#[test]
fn loads_in_this_process() {
    if std::env::var_os(CHILD).is_none() {
        return;
    }
    let prompt: Vec<u32> = (5..25).collect();
    let mut first_logits: Option<Vec<f32>> = None;
    for round in 0..2 {
        let dirs = [
            "tiny-qwen2",
            "tiny-qwen2-int4",
            "tiny-qwen2",
            "tiny-qwen2-int4",
        ];
        let start = Arc::new(Barrier::new(dirs.len()));
        let loads: Vec<_> = dirs
            .iter()
            .map(|&dir| {
                let start = start.clone();
                std::thread::spawn(move || {
                    start.wait();
                    (dir, load(dir))
                })
            })
            .collect();
        for handle in loads {
            let (dir, mut b) = handle.join().expect("load thread");
            let moved = b.kernels_on_inferd();
            assert!(
                moved.attention > 0,
                "round {round}, {dir}: attention fell back to ONNX Runtime's kernel ({moved:?})"
            );
            if dir.ends_with("int4") && op_edit::matmul_kernel_available() {
                assert!(moved.matmul > 0, "round {round}, {dir}: int4 matmuls fell back to ONNX Runtime's kernel ({moved:?})");
            }
            if dir == "tiny-qwen2" {
                let l = b
                    .step(&[StepInput {
                        seq: 1,
                        tokens: &prompt,
                        adapter: None,
                        want_logits: true,
                    }])
                    .expect("step")
                    .remove(0)
                    .expect("logits");
                match &first_logits {
                    None => first_logits = Some(l),
                    Some(want) => assert_eq!(
                        reference_common::max_abs_diff(&l, want),
                        0.0,
                        "round {round}: a session's logits differ"
                    ),
                }
            }
        }
    }
}
