//! A bump allocator for instruction-count benchmarks.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The instruction-count benchmarks' allocator: a bump allocator over one
/// region, blocks aligned to 64 bytes, nothing freed.
///
/// glibc's `malloc` costs a number of instructions that depends on the heap
/// the process had before: where the heap starts (after the binary, whose
/// size differs between a build with hooks and one without) and what the
/// harness allocated. A measured region that allocates at all (a buffer
/// grown on its first use) then counts differently in two builds of the
/// same model code. A bump allocation costs the same instructions wherever
/// its region starts, and 64-byte blocks give every copy the same alignment
/// in both builds.
pub struct BumpAllocator;

/// Bytes reserved for the process: the model, its set-up and the measured
/// work (reserved, not touched: pages are used as the cursor reaches them).
const REGION: usize = 8 << 30;
static NEXT: AtomicUsize = AtomicUsize::new(0);
static END: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every block returned lies inside the region, aligned as asked and
// disjoint from every other (the cursor only moves forward); a failure to
// reserve the region or a full region returns null, as allocators do.
unsafe impl GlobalAlloc for BumpAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if NEXT.load(Ordering::Relaxed) == 0 {
            // SAFETY: a valid non-zero layout; the first allocation happens
            // on the main thread, before any other thread exists.
            let region = unsafe { System.alloc(Layout::from_size_align_unchecked(REGION, 4096)) };
            if region.is_null() {
                return region;
            }
            NEXT.store(region as usize, Ordering::Relaxed);
            END.store(region as usize + REGION, Ordering::Relaxed);
        }
        let align = layout.align().max(64);
        let size = layout.size().div_ceil(64) * 64;
        let mut next = NEXT.load(Ordering::Relaxed);
        loop {
            let start = next.div_ceil(align) * align;
            if start + size > END.load(Ordering::Relaxed) {
                return std::ptr::null_mut();
            }
            match NEXT.compare_exchange_weak(
                next,
                start + size,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return start as *mut u8,
                Err(now) => next = now,
            }
        }
    }

    unsafe fn dealloc(&self, _ptr: *mut u8, _layout: Layout) {}
}
