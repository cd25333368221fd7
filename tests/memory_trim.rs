//! Freed memory goes back to the OS (found by bench/soak.py, issue 19 item 1): glibc's malloc kept
//! the KV caches the server had freed resident, ~1 GiB after 3 minutes of load on SmolLM2, and the
//! resident size kept growing. `inferd::memory::release_free_memory` (`malloc_trim(0)`) hands free
//! heap pages back, and the server calls it from its own thread every few seconds.
mod e2e_common;

/// VmRSS of this process, KiB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn rss_kib(pid: &str) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn freed_heap_blocks_leave_the_resident_set() {
    use std::hint::black_box;
    // Free one large block first: glibc then raises its mmap threshold and the blocks below come
    // from the heap, as the server's KV caches do once it has freed a few.
    drop(black_box(vec![1u8; 8 << 20]));
    const N: usize = 400;
    const SIZE: usize = 256 << 10;
    let mut blocks: Vec<Vec<u8>> = (0..N).map(|i| black_box(vec![(i % 255) as u8 + 1; SIZE])).collect();
    // The last block stays: it pins the heap's top, so free() alone cannot shrink the heap.
    let last = blocks.pop().unwrap();
    drop(blocks);
    let before = rss_kib("self");
    assert!(inferd::memory::release_free_memory(), "malloc_trim released nothing");
    let after = rss_kib("self");
    black_box(&last);
    eprintln!("VmRSS {before} KiB -> {after} KiB after release_free_memory ({} KiB freed by the test)", (N - 1) * SIZE / 1024);
    assert!(
        before.saturating_sub(after) > (N - 1) * SIZE / 1024 / 2,
        "VmRSS went from {before} KiB to {after} KiB: the {} KiB freed stayed resident",
        (N - 1) * SIZE / 1024
    );
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn the_server_runs_the_trim_thread() {
    let Some(model) = e2e_common::tiny_model("tiny-llama.q4_1.gguf") else { return };
    let s = e2e_common::Server::tiny(&model, &[]);
    let tasks = std::fs::read_dir(format!("/proc/{}/task", s.pid())).unwrap();
    let names: Vec<String> = tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect();
    // Thread names are cut to 15 bytes.
    assert!(names.iter().any(|n| n == "inferd-malloc-t"), "no trim thread among {names:?}");
}
