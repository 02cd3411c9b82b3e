//! A persistent worker pool for the CPU kernels.
//!
//! Why not rayon: a decode step runs ~200 small matmuls of a few microseconds
//! each, so waking threads through a futex per call would cost as much as the
//! work. Workers here spin for a short while after each job (then yield, then
//! park), so back-to-back kernel calls reach them in well under a microsecond.
//! Candle keeps its own rayon pool for its own ops; our kernels run while candle
//! is idle, so the two don't compete for cores in practice.
//!
//! Work is a set of `n_tasks` independent task indices handed out through an
//! atomic counter (dynamic scheduling), and the calling thread works too.
//! Concurrent callers are serialized.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Spin (busy-wait) this long after a job before yielding the core.
const SPIN_FOR: Duration = Duration::from_micros(100);
/// Then yield the core between checks this long before parking.
const YIELD_FOR: Duration = Duration::from_millis(3);
/// Most threads a pool may use.
const MAX_THREADS: usize = 256;

type JobFn = dyn Fn(usize) + Sync;

#[derive(Clone, Copy)]
struct JobPtr(*const JobFn);
// SAFETY: the pointee is `Sync` and the pool protocol guarantees it outlives every
// use (the submitting call waits until no worker holds the pointer).
unsafe impl Send for JobPtr {}

struct Slot {
    job: Option<JobPtr>,
    open: bool,
    allowed: usize,
    sleeping: usize,
}

struct Shared {
    slot: Mutex<Slot>,
    wake: Condvar,
    generation: AtomicU64,
    next_task: AtomicUsize,
    n_tasks: AtomicUsize,
    active: AtomicUsize,
    panicked: AtomicBool,
}

struct Pool {
    shared: &'static Shared,
    submit: Mutex<usize>, // number of spawned workers
}

static DESIRED: AtomicUsize = AtomicUsize::new(0);
static POOL: OnceLock<Pool> = OnceLock::new();

fn default_threads() -> usize {
    physical_cores().min(MAX_THREADS)
}

/// Number of physical cores available to this process (SMT siblings counted once).
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let mut seen = std::collections::HashSet::new();
    for cpu in 0..logical.max(1) * 4 {
        let path = format!("/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list");
        if let Ok(s) = std::fs::read_to_string(path) {
            seen.insert(s.trim().to_string());
        }
    }
    if seen.is_empty() {
        logical
    } else {
        seen.len().clamp(1, logical)
    }
}

/// Threads the kernels use (the calling thread included): the number of
/// physical cores unless [`set_num_threads`] chose another (the model loader
/// applies the configured `kernels.threads` through it).
pub fn num_threads() -> usize {
    let n = DESIRED.load(Ordering::Relaxed);
    if n != 0 {
        return n;
    }
    let d = default_threads();
    let _ = DESIRED.compare_exchange(0, d, Ordering::Relaxed, Ordering::Relaxed);
    DESIRED.load(Ordering::Relaxed)
}

/// Sets the number of threads the kernels use (clamped to 1..=256). Takes
/// effect from the next kernel call; workers are spawned lazily and kept.
pub fn set_num_threads(n: usize) {
    DESIRED.store(n.clamp(1, MAX_THREADS), Ordering::Relaxed);
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            slot: Mutex::new(Slot { job: None, open: false, allowed: 0, sleeping: 0 }),
            wake: Condvar::new(),
            generation: AtomicU64::new(0),
            next_task: AtomicUsize::new(0),
            n_tasks: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        }));
        Pool { shared, submit: Mutex::new(0) }
    })
}

fn run_tasks(shared: &Shared, f: &(dyn Fn(usize) + Sync + '_)) {
    let n = shared.n_tasks.load(Ordering::Acquire);
    loop {
        let t = shared.next_task.fetch_add(1, Ordering::AcqRel);
        if t >= n {
            break;
        }
        f(t);
    }
}

fn worker_main(shared: &'static Shared, index: usize) {
    let mut seen = shared.generation.load(Ordering::Acquire);
    loop {
        // Wait for a new job: spin, then yield, then park.
        let start = Instant::now();
        let mut iter = 0u32;
        loop {
            let g = shared.generation.load(Ordering::Acquire);
            if g != seen {
                seen = g;
                break;
            }
            iter = iter.wrapping_add(1);
            if !iter.is_multiple_of(64) {
                std::hint::spin_loop();
                continue;
            }
            let waited = start.elapsed();
            if waited < SPIN_FOR {
                std::hint::spin_loop();
            } else if waited < SPIN_FOR + YIELD_FOR {
                std::thread::yield_now();
            } else {
                let mut slot = shared.slot.lock().unwrap_or_else(|e| e.into_inner());
                slot.sleeping += 1;
                while shared.generation.load(Ordering::SeqCst) == seen {
                    slot = shared.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
                }
                slot.sleeping -= 1;
            }
        }
        // Join the job if it is still open and this worker is allowed in.
        let job = {
            let slot = shared.slot.lock().unwrap_or_else(|e| e.into_inner());
            if slot.open && index < slot.allowed {
                shared.active.fetch_add(1, Ordering::AcqRel);
                slot.job
            } else {
                None
            }
        };
        if let Some(JobPtr(ptr)) = job {
            // SAFETY: `active` was incremented under the slot lock while the job was
            // open, and the submitter waits for `active == 0` after closing the job
            // before its closure goes out of scope, so `ptr` is valid here.
            let f: &JobFn = unsafe { &*ptr };
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_tasks(shared, f)));
            if r.is_err() {
                shared.panicked.store(true, Ordering::Release);
            }
            shared.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Runs `f(t)` for every `t` in `0..n_tasks`, spread over the pool's threads
/// and the calling thread; returns when all tasks are done.
pub fn parallel_for<'a>(n_tasks: usize, f: &'a (dyn Fn(usize) + Sync + 'a)) {
    if n_tasks == 0 {
        return;
    }
    let threads = num_threads();
    if threads <= 1 || n_tasks == 1 {
        for t in 0..n_tasks {
            f(t);
        }
        return;
    }
    let pool = pool();
    let shared = pool.shared;
    let mut spawned = pool.submit.lock().unwrap_or_else(|e| e.into_inner());
    while *spawned < threads - 1 {
        let index = *spawned;
        let ok = std::thread::Builder::new()
            .name(format!("salus-kernel-{index}"))
            .spawn(move || worker_main(shared, index))
            .is_ok();
        if !ok {
            break;
        }
        *spawned += 1;
    }
    let workers = (*spawned).min(threads - 1);
    if workers == 0 {
        for t in 0..n_tasks {
            f(t);
        }
        return;
    }
    // SAFETY: only the lifetime is erased. The pointer is published while the
    // job is open and we wait below until no worker holds it before returning.
    let raw: *const (dyn Fn(usize) + Sync + 'a) = f;
    let ptr: *const JobFn = unsafe { std::mem::transmute::<*const (dyn Fn(usize) + Sync + 'a), *const JobFn>(raw) };
    {
        let mut slot = shared.slot.lock().unwrap_or_else(|e| e.into_inner());
        shared.next_task.store(0, Ordering::Release);
        shared.n_tasks.store(n_tasks, Ordering::Release);
        slot.job = Some(JobPtr(ptr));
        slot.open = true;
        slot.allowed = workers;
        shared.generation.fetch_add(1, Ordering::SeqCst);
        if slot.sleeping > 0 {
            shared.wake.notify_all();
        }
    }
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_tasks(shared, f)));
    {
        let mut slot = shared.slot.lock().unwrap_or_else(|e| e.into_inner());
        slot.open = false;
        slot.job = None;
    }
    let mut iter = 0u32;
    while shared.active.load(Ordering::Acquire) != 0 {
        iter = iter.wrapping_add(1);
        if iter.is_multiple_of(1024) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    drop(spawned);
    if let Err(p) = r {
        std::panic::resume_unwind(p);
    }
    if shared.panicked.swap(false, Ordering::AcqRel) {
        panic!("a kernel worker thread panicked");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_task_runs_exactly_once() {
        set_num_threads(2);
        for n in [0usize, 1, 2, 3, 17, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            parallel_for(n, &|t| {
                hits[t].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n}");
        }
    }

    #[test]
    fn concurrent_callers_are_serialized_correctly() {
        set_num_threads(2);
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| {
                    for _ in 0..200 {
                        parallel_for(8, &|t| {
                            total.fetch_add(t + 1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 3 * 200 * 36);
    }
}
