//! Giving freed memory back to the operating system.
//!
//! glibc's malloc keeps what the server frees: after the first large block is freed it raises its
//! mmap threshold, so KV caches (hundreds of KB to MBs per layer) come from the heap, and the heap
//! only shrinks from its top. Long-lived kept caches (the prefix cache) sit between short-lived
//! ones and the free space between them stays resident. bench/soak.py measured it on SmolLM2: the
//! resident size grew from 1.2 to 1.9 GiB in under 3 minutes of load while what was live stayed
//! under 0.8 GiB (one `malloc_trim(0)` brought it from 1,945 to 912 MiB). A thread of the server
//! calls `malloc_trim(0)` every few seconds, which hands the free pages inside the heap back.
use std::time::Duration;

/// How often the server hands free heap pages back.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// Hands free heap memory back to the OS (glibc: `malloc_trim(0)`, which also releases free
/// pages in the middle of every arena). Returns whether anything was released; a no-op returning
/// false on other C libraries.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes each arena's lock; it is safe to call from any thread.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Starts the thread that calls [`release_free_memory`] every `interval` (glibc only).
pub fn spawn_trimmer(interval: Duration) {
    if cfg!(all(target_os = "linux", target_env = "gnu")) {
        let spawned = std::thread::Builder::new().name("inferd-malloc-trim".into()).spawn(move || loop {
            std::thread::sleep(interval);
            release_free_memory();
        });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the malloc_trim thread: {e}");
        }
    }
}
