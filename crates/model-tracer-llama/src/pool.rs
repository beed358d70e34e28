//! Worker threads that live as long as their model, for products split by
//! output rows.
//!
//! A decode step runs about seven products per layer, each a few tens of
//! microseconds on one core: a thread spawned per product would cost more
//! than the work. A [`Pool`] of `n` threads keeps `n - 1` workers waiting;
//! [`Pool::run`] publishes a job of some parts, every thread (the calling
//! one too) takes the next part not yet taken until none is left, and
//! `run` returns when all are done. Parts are taken, not assigned: a
//! worker that its core's scheduler keeps waiting (a machine busy with
//! other work) leaves its parts to the others instead of holding them up,
//! and a worker that comes late to a finished job takes nothing of it.
//! Between jobs a worker spins on an atomic for a while (the next product
//! of the step comes within microseconds), then sleeps on a condition
//! variable until the next job, so an idle model holds no core.
//!
//! Each part of a product computes whole output rows, with the kernel and
//! the summation order of one thread: a product's result does not depend
//! on the number of threads or on who took which part, to the bit.
//! Everything else of a forward (norms, attention, the tracer's hooks)
//! runs on the calling thread.

use std::cell::UnsafeCell;
use std::fmt;
use std::ops::Range;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

/// The most threads a pool holds.
pub const MAX_THREADS: usize = 256;

/// The most parts a job has (they are counted in 16 bits).
pub const MAX_PARTS: usize = 1 << 15;

/// Iterations a waiting worker spins before it sleeps: some tens of
/// microseconds, longer than the gap between two products of a step.
const SPINS: u32 = 1 << 12;

/// A job: part `k` of it is `job(k)`.
type Job = dyn Fn(usize) + Sync;

/// The word the threads take parts from: the job's generation (32 bits),
/// its number of parts (16) and the next part not taken (16).
fn word(generation: u64, parts: usize, next: usize) -> u64 {
    (generation << 32) | ((parts as u64) << 16) | next as u64
}

fn fields(w: u64) -> (u64, usize, usize) {
    (
        w >> 32,
        ((w >> 16) & 0xffff) as usize,
        (w & 0xffff) as usize,
    )
}

struct Shared {
    /// The job in flight: written by the calling thread before it
    /// publishes the job's generation in `take`, read by a thread only
    /// after it took a part of that generation, and valid until every
    /// part is done.
    job: UnsafeCell<Option<*const Job>>,
    /// Generation, parts and the next part to take ([`word`]).
    take: AtomicU64,
    /// Parts of the job in flight that are done.
    done: AtomicUsize,
    /// A part of the job in flight panicked.
    panicked: AtomicBool,
    /// A thread is in `run`: a second one runs its job alone.
    busy: AtomicBool,
    /// The pool is being dropped.
    stop: AtomicBool,
    /// Workers asleep on `wake` (or about to be).
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
}

// SAFETY: `job` is written only in `run`, by the thread that holds `busy`,
// before it publishes a new generation and while no part of the previous
// job is in flight (`run` returned only when all were done); a thread reads
// it only after taking a part of the generation published after the write
// (the Acquire of its compare-and-swap on `take`), and that job stays valid
// until the part is done. The closure it points to is `Sync`.
unsafe impl Sync for Shared {}
// SAFETY: as above; the pointer is only dereferenced under that protocol.
unsafe impl Send for Shared {}

impl Shared {
    /// Takes and runs the parts of generation `generation` until none is
    /// left; false if it took none.
    fn work(&self, generation: u64) -> bool {
        let mut worked = false;
        let mut w = self.take.load(Ordering::Acquire);
        loop {
            let (g, parts, next) = fields(w);
            if g != generation || next >= parts {
                return worked;
            }
            match self
                .take
                .compare_exchange_weak(w, w + 1, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    // SAFETY: a part of this generation is taken and not
                    // done, so its job is the one `job` holds, and valid.
                    if let Some(job) = unsafe { *self.job.get() } {
                        let job = unsafe { &*job };
                        if catch_unwind(AssertUnwindSafe(|| job(next))).is_err() {
                            self.panicked.store(true, Ordering::Relaxed);
                        }
                    }
                    self.done.fetch_add(1, Ordering::Release);
                    worked = true;
                    w = self.take.load(Ordering::Acquire);
                }
                Err(now) => w = now,
            }
        }
    }
}

/// A fixed set of threads that run the parts of a job together; the thread
/// that calls [`run`](Self::run) is one of them. One thread: no worker, no
/// synchronization, `run` calls the parts in turn.
pub struct Pool {
    threads: usize,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("threads", &self.threads)
            .finish()
    }
}

impl Default for Pool {
    /// One thread.
    fn default() -> Self {
        Self::new(1)
    }
}

impl Clone for Pool {
    /// A pool of as many threads of its own.
    fn clone(&self) -> Self {
        Self::new(self.threads)
    }
}

/// Threads the machine can run at once (1 if it cannot tell).
pub fn available_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl Pool {
    /// A pool of `threads` threads (clamped to `1..=MAX_THREADS`): the
    /// calling thread and `threads - 1` workers. A worker that cannot be
    /// started leaves the pool smaller.
    pub fn new(threads: usize) -> Self {
        let shared = Arc::new(Shared {
            job: UnsafeCell::new(None),
            take: AtomicU64::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            busy: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
        });
        let wanted = threads.clamp(1, MAX_THREADS);
        let mut workers = Vec::with_capacity(wanted - 1);
        for k in 1..wanted {
            let s = Arc::clone(&shared);
            let spawned = std::thread::Builder::new()
                .name(format!("model-tracer-{k}"))
                .spawn(move || worker(&s));
            match spawned {
                Ok(h) => workers.push(h),
                Err(_) => break,
            }
        }
        Self {
            threads: workers.len() + 1,
            shared,
            workers,
        }
    }

    /// Threads that run a job's parts, the calling one included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Parts to split `len` output rows into: a few per thread (so that
    /// a thread its core keeps waiting holds up little), none of fewer
    /// than `min_len` rows (a part that small costs more to hand over than
    /// it saves); 1 on one thread.
    pub fn parts_for(&self, len: usize, min_len: usize) -> usize {
        if self.threads == 1 {
            return 1;
        }
        (len / min_len.max(1)).clamp(1, 4 * self.threads)
    }

    /// Runs `job(0)`, ..., `job(parts - 1)` (at most [`MAX_PARTS`]) on the
    /// threads of the pool, the calling one too, and returns when all are
    /// done. Which thread runs which part is not fixed.
    ///
    /// # Panics
    /// If a part panicked (on whichever thread), once every part is done.
    pub fn run(&self, parts: usize, job: &(dyn Fn(usize) + Sync)) {
        let parts = parts.min(MAX_PARTS);
        let s = &*self.shared;
        if parts <= 1
            || self.workers.is_empty()
            || s.busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
        {
            (0..parts).for_each(job);
            return;
        }
        // Only the thread that holds `busy` changes the generation.
        let generation = (fields(s.take.load(Ordering::Relaxed)).0 + 1) & 0xffff_ffff;
        // SAFETY: no part of an earlier job is in flight (the last `run`
        // returned when all were done), and no thread reads `job` before
        // it takes a part of the generation published below; this call
        // returns only when every part is done, so the closure outlives its
        // use although its lifetime is erased here.
        unsafe {
            let erased: *const (dyn Fn(usize) + Sync + '_) = job;
            *s.job.get() = Some(std::mem::transmute::<
                *const (dyn Fn(usize) + Sync + '_),
                *const Job,
            >(erased));
        }
        s.done.store(0, Ordering::Relaxed);
        s.take.store(word(generation, parts, 0), Ordering::SeqCst);
        if s.sleepers.load(Ordering::SeqCst) > 0 {
            let _sleeping = s.sleep.lock().unwrap_or_else(PoisonError::into_inner);
            s.wake.notify_all();
        }
        s.work(generation);
        // Every part is taken; wait for those still running elsewhere.
        let mut spins = 0u32;
        while s.done.load(Ordering::Acquire) < parts {
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let panicked = s.panicked.swap(false, Ordering::Relaxed);
        s.busy.store(false, Ordering::Release);
        if panicked {
            panic!("a part of a pooled job panicked");
        }
    }
}

/// A worker's loop: wait for a new generation, take its parts while any
/// is left; until the pool stops.
fn worker(s: &Shared) {
    let mut seen = fields(s.take.load(Ordering::Acquire)).0;
    loop {
        let mut spins = 0u32;
        let generation = loop {
            if s.stop.load(Ordering::Acquire) {
                return;
            }
            let g = fields(s.take.load(Ordering::Acquire)).0;
            if g != seen {
                break g;
            }
            if spins < SPINS {
                spins += 1;
                std::hint::spin_loop();
                continue;
            }
            let guard = s.sleep.lock().unwrap_or_else(PoisonError::into_inner);
            s.sleepers.fetch_add(1, Ordering::SeqCst);
            let g = fields(s.take.load(Ordering::SeqCst)).0;
            if g == seen && !s.stop.load(Ordering::SeqCst) {
                // A spurious wake-up only goes round the loop again.
                drop(s.wake.wait(guard).unwrap_or_else(PoisonError::into_inner));
            }
            s.sleepers.fetch_sub(1, Ordering::SeqCst);
            spins = 0;
        };
        seen = generation;
        s.work(generation);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let s = &*self.shared;
        s.stop.store(true, Ordering::SeqCst);
        {
            let _sleeping = s.sleep.lock().unwrap_or_else(PoisonError::into_inner);
            s.wake.notify_all();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Part `k` of `n` of `0..len`: the parts are contiguous, in order, and
/// differ in length by at most one.
pub fn part(len: usize, n: usize, k: usize) -> Range<usize> {
    let n = n.max(1);
    (len * k / n)..(len * (k + 1) / n)
}

/// A pointer to an output buffer that the parts of a job write in
/// disjoint ranges.
pub(crate) struct Out<T = f32>(*mut T, usize);

impl<T> Clone for Out<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Out<T> {}

// SAFETY: the parts that share an `Out` write disjoint ranges of it
// (`Out::range`), the buffer outlives the job (`Pool::run` returns only
// when every part is done), and its elements may go to another thread.
unsafe impl<T: Send> Sync for Out<T> {}
unsafe impl<T: Send> Send for Out<T> {}

impl<T> Out<T> {
    pub(crate) fn new(out: &mut [T]) -> Self {
        Self(out.as_mut_ptr(), out.len())
    }

    /// The elements `range` of the buffer.
    ///
    /// # Safety
    /// No other part of the job may access those elements while this slice
    /// lives; `range` must lie inside the buffer (checked).
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn range(&self, range: Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.1);
        // SAFETY: inside the buffer (asserted); exclusive by the caller's
        // contract.
        unsafe { std::slice::from_raw_parts_mut(self.0.add(range.start), range.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_part_runs_once_on_any_number_of_threads() {
        for threads in [1, 2, 3, 8] {
            let pool = Pool::new(threads);
            assert_eq!(pool.threads(), threads);
            for parts in 0..=threads + 2 {
                let hits: Vec<AtomicUsize> =
                    (0..threads + 2).map(|_| AtomicUsize::new(0)).collect();
                pool.run(parts, &|k| {
                    hits[k].fetch_add(1, Ordering::Relaxed);
                });
                for (k, h) in hits.iter().enumerate() {
                    let want = usize::from(k < parts);
                    assert_eq!(
                        h.load(Ordering::Relaxed),
                        want,
                        "{threads} threads, {parts} parts, part {k}"
                    );
                }
            }
        }
    }

    #[test]
    fn many_jobs_in_a_row_and_after_a_sleep() {
        let pool = Pool::new(3);
        let total = AtomicUsize::new(0);
        for i in 0..2000 {
            pool.run(3, &|k| {
                total.fetch_add(k + 1, Ordering::Relaxed);
            });
            if i == 1000 {
                // Long enough for the workers to go to sleep.
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        assert_eq!(total.load(Ordering::Relaxed), 2000 * 6);
    }

    #[test]
    fn a_panicking_part_panics_the_caller_and_the_pool_goes_on() {
        let pool = Pool::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(2, &|k| {
                if k == 1 {
                    panic!("part 1");
                }
            })
        }));
        assert!(r.is_err());
        let hits = AtomicUsize::new(0);
        pool.run(2, &|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn parts_cover_the_range_in_order() {
        for len in [0, 1, 5, 576, 1536, 49152] {
            for n in 1..=5 {
                let parts: Vec<_> = (0..n).map(|k| part(len, n, k)).collect();
                assert_eq!(parts[0].start, 0);
                assert_eq!(parts[n - 1].end, len);
                for w in parts.windows(2) {
                    assert_eq!(w[0].end, w[1].start);
                }
            }
        }
        let pool = Pool::new(4);
        assert_eq!(pool.parts_for(576, 64), 9);
        assert_eq!(pool.parts_for(49152, 64), 16);
        assert_eq!(pool.parts_for(100, 64), 1);
        assert_eq!(Pool::new(1).parts_for(49152, 64), 1);
    }

    #[test]
    fn a_dropped_pool_joins_its_workers() {
        for _ in 0..20 {
            let pool = Pool::new(3);
            pool.run(3, &|_| {});
            drop(pool);
        }
    }
}
