//! The CPU thread pool of the forward pass: the calling thread plus `threads - 1` workers that
//! claim chunks of one job at a time.
//!
//! A step issues about five matmuls per layer, each a few tens of microseconds on a small model,
//! so waking threads must cost far less than that. Workers spin for a short while after each job
//! (then park on a condvar), and chunks are claimed dynamically: the caller works too and takes
//! whatever chunks a slow or descheduled worker has not claimed yet, so a busy core delays a job
//! by at most one chunk instead of a whole scheduler time slice.
//!
//! One process-wide pool (`global`), sized once by `configure` (the server's `threads` setting)
//! or else by the number of CPUs. Jobs from several threads (several models) take turns.
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::*};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(300);
/// Largest number of chunks in one job (the claim counter has 16 bits).
pub const MAX_CHUNKS: usize = u16::MAX as usize;

type JobFn<'a> = dyn Fn(usize) + Sync + 'a;

struct Job<'a> {
    f: &'a JobFn<'a>,
}

struct Shared {
    /// generation (32 bits) | chunk count (16) | next unclaimed chunk (16).
    state: AtomicU64,
    /// The current generation's job, on the caller's stack; valid while any of its chunks runs.
    job: AtomicPtr<Job<'static>>,
    /// Chunks finished by workers in the current generation.
    done: AtomicUsize,
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    stop: AtomicBool,
    park: Mutex<()>,
    wake: Condvar,
}

fn pack(gen: u32, n: usize, next: usize) -> u64 {
    (u64::from(gen) << 32) | ((n as u64) << 16) | next as u64
}

fn unpack(s: u64) -> (u32, usize, usize) {
    ((s >> 32) as u32, ((s >> 16) & 0xffff) as usize, (s & 0xffff) as usize)
}

impl Shared {
    /// Claims the next chunk of generation `gen`, if any is left.
    fn claim(&self, gen: u32) -> Option<usize> {
        let mut s = self.state.load(Acquire);
        loop {
            let (g, n, next) = unpack(s);
            if g != gen || next >= n {
                return None;
            }
            match self.state.compare_exchange_weak(s, pack(g, n, next + 1), AcqRel, Acquire) {
                Ok(_) => return Some(next),
                Err(now) => s = now,
            }
        }
    }

    /// Waits (spinning, then parked) for a generation other than `seen`; None once stopping.
    fn next_gen(&self, seen: u32) -> Option<u32> {
        let mut since = Instant::now();
        let mut spins = 0u32;
        loop {
            if self.stop.load(Acquire) {
                return None;
            }
            let g = unpack(self.state.load(Acquire)).0;
            if g != seen {
                return Some(g);
            }
            spins = spins.wrapping_add(1);
            if spins % 256 != 0 || since.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut guard = self.park.lock().unwrap_or_else(|e| e.into_inner());
            self.sleepers.fetch_add(1, SeqCst);
            while !self.stop.load(SeqCst) && unpack(self.state.load(SeqCst)).0 == seen {
                guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
            self.sleepers.fetch_sub(1, SeqCst);
            since = Instant::now();
        }
    }

    fn worker(&self) {
        IN_POOL.with(|c| c.set(true));
        let mut seen = 0u32;
        while let Some(gen) = self.next_gen(seen) {
            seen = gen;
            while let Some(i) = self.claim(gen) {
                // SAFETY: chunk `i` of generation `gen` was claimed, so its job is still running:
                // the caller does not return (and drop the job) until every chunk is done.
                let job = unsafe { &*self.job.load(Acquire) };
                let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (job.f)(i)));
                if ok.is_err() {
                    self.panicked.store(true, Release);
                }
                self.done.fetch_add(1, Release);
            }
        }
    }
}

thread_local! {
    /// Set on pool workers and on a caller while it runs a job: nested jobs run inline.
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

/// A pool of `threads` threads (the caller counts as one).
pub struct Pool {
    shared: Arc<Shared>,
    threads: usize,
    /// One job at a time.
    turn: Mutex<()>,
    handles: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `threads - 1` workers (at least none).
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            park: Mutex::new(()),
            wake: Condvar::new(),
        });
        let handles = (1..threads)
            .filter_map(|i| {
                let s = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("inferd-cpu-{i}"))
                    .spawn(move || s.worker())
                    .ok()
            })
            .collect::<Vec<_>>();
        Pool { threads: handles.len() + 1, shared, turn: Mutex::new(()), handles }
    }

    /// Number of threads that work on a job, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `f(i)` for every `i` in `0..chunks`, spread over the pool; returns when all are done.
    /// Panics (after all chunks finished) if any call panicked.
    pub fn run(&self, chunks: usize, f: &(dyn Fn(usize) + Sync)) {
        if chunks <= 1 || self.threads == 1 || IN_POOL.with(Cell::get) {
            (0..chunks).for_each(f);
            return;
        }
        assert!(chunks <= MAX_CHUNKS, "a pool job has at most {MAX_CHUNKS} chunks");
        let _turn = self.turn.lock().unwrap_or_else(|e| e.into_inner());
        let sh = &*self.shared;
        let job = Job { f };
        // SAFETY (lifetime erasure): workers only dereference the job while running one of its
        // chunks, and this function waits below until every chunk has finished.
        let ptr = &job as *const Job<'_> as *mut Job<'static>;
        sh.job.store(ptr, Release);
        sh.done.store(0, Relaxed);
        sh.panicked.store(false, Relaxed);
        let gen = unpack(sh.state.load(Relaxed)).0.wrapping_add(1);
        sh.state.store(pack(gen, chunks, 0), SeqCst);
        if sh.sleepers.load(SeqCst) > 0 {
            let _g = sh.park.lock().unwrap_or_else(|e| e.into_inner());
            sh.wake.notify_all();
        }
        IN_POOL.with(|c| c.set(true));
        let mut mine = 0;
        let mut caller_panic = None;
        while let Some(i) = sh.claim(gen) {
            if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i))) {
                caller_panic.get_or_insert(p);
            }
            mine += 1;
        }
        IN_POOL.with(|c| c.set(false));
        let mut spins = 0u32;
        while sh.done.load(Acquire) + mine < chunks {
            spins = spins.saturating_add(1);
            if spins < 4096 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        if let Some(p) = caller_panic {
            std::panic::resume_unwind(p);
        }
        assert!(!sh.panicked.load(Acquire), "a pool worker panicked");
    }
}

impl Pool {
    /// Splits `0..len` into about `per_thread` ranges per thread, each at least `min_len` long,
    /// and calls `f` on every range over the pool.
    pub fn run_ranges(&self, len: usize, per_thread: usize, min_len: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
        if len == 0 {
            return;
        }
        let per = len.div_ceil(self.threads * per_thread).max(min_len).max(len.div_ceil(MAX_CHUNKS)).max(1);
        self.run(len.div_ceil(per), &|c| f(c * per..((c + 1) * per).min(len)));
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        {
            let _g = self.shared.park.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

static GLOBAL: OnceLock<Pool> = OnceLock::new();

/// Sizes the process-wide pool; returns false if it was already started (with its old size).
pub fn configure(threads: usize) -> bool {
    let mut fresh = false;
    GLOBAL.get_or_init(|| {
        fresh = true;
        Pool::new(threads)
    });
    fresh
}

/// The process-wide pool; `INFERD_THREADS` or the number of CPUs unless `configure` ran first.
pub fn global() -> &'static Pool {
    GLOBAL.get_or_init(|| Pool::new(default_threads()))
}

/// `INFERD_THREADS` if set to a positive number, else the CPUs this process may use.
pub fn default_threads() -> usize {
    std::env::var("INFERD_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// A raw pointer that chunks of one job may write through, each to its own disjoint elements.
#[derive(Clone, Copy)]
pub struct SharedMut<T>(pub *mut T);
// SAFETY: users promise disjoint writes (see each use); the pointee outlives the job.
unsafe impl<T: Send> Sync for SharedMut<T> {}
unsafe impl<T: Send> Send for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so that closures capture the `Sync` wrapper, not the raw field).
    pub fn ptr(&self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn every_chunk_runs_exactly_once_across_many_jobs() {
        let pool = Pool::new(3);
        for chunks in [0usize, 1, 2, 7, 64, 1000] {
            let hits: Vec<AtomicU32> = (0..chunks).map(|_| AtomicU32::new(0)).collect();
            for _ in 0..50 {
                pool.run(chunks, &|i| {
                    hits[i].fetch_add(1, Relaxed);
                });
            }
            assert!(hits.iter().all(|h| h.load(Relaxed) == 50), "chunks={chunks}");
        }
    }

    #[test]
    fn jobs_from_several_threads_take_turns() {
        let pool = Arc::new(Pool::new(2));
        let total = Arc::new(AtomicUsize::new(0));
        let ts: Vec<_> = (0..4)
            .map(|_| {
                let (p, t) = (Arc::clone(&pool), Arc::clone(&total));
                std::thread::spawn(move || {
                    for _ in 0..200 {
                        p.run(16, &|i| {
                            t.fetch_add(i, Relaxed);
                        });
                    }
                })
            })
            .collect();
        ts.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(total.load(Relaxed), 4 * 200 * (0..16).sum::<usize>());
    }

    #[test]
    fn parked_workers_wake_up_for_the_next_job() {
        let pool = Pool::new(2);
        std::thread::sleep(Duration::from_millis(20));
        let count = AtomicUsize::new(0);
        pool.run(100, &|_| {
            count.fetch_add(1, Relaxed);
        });
        assert_eq!(count.load(Relaxed), 100);
    }

    #[test]
    fn nested_jobs_run_inline() {
        let pool = Pool::new(2);
        let count = AtomicUsize::new(0);
        pool.run(4, &|_| {
            pool.run(3, &|_| {
                count.fetch_add(1, Relaxed);
            })
        });
        assert_eq!(count.load(Relaxed), 12);
    }

    #[test]
    fn a_panicking_chunk_panics_the_caller_and_the_pool_survives() {
        let pool = Pool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(8, &|i| assert!(i != 5, "chunk five"));
        }));
        assert!(r.is_err());
        let count = AtomicUsize::new(0);
        pool.run(8, &|_| {
            count.fetch_add(1, Relaxed);
        });
        assert_eq!(count.load(Relaxed), 8);
    }
}
