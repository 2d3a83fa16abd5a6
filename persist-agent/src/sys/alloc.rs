//! An allocator that remembers the largest allocation asked of it, for the
//! fuzzer to tell a parser that allocates what a length field says from one
//! that bounds it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, recording the largest size requested since the
/// last [`LargestAlloc::reset`]. Install it with `#[global_allocator]`.
#[derive(Debug, Default)]
pub struct LargestAlloc {
    largest: AtomicUsize,
}

impl LargestAlloc {
    /// A new allocator, nothing recorded.
    pub const fn new() -> Self {
        Self {
            largest: AtomicUsize::new(0),
        }
    }

    /// Forgets what was recorded.
    pub fn reset(&self) {
        self.largest.store(0, Ordering::Relaxed);
    }

    /// The largest size requested (by any thread) since the last reset.
    pub fn largest(&self) -> usize {
        self.largest.load(Ordering::Relaxed)
    }
}

// SAFETY: every call is passed on unchanged to the system allocator, which
// upholds GlobalAlloc's contract; recording a size touches no memory that
// was allocated.
unsafe impl GlobalAlloc for LargestAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.largest.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's guarantees for `layout` are System's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.largest.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from System with this layout, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.largest.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: as for `dealloc`; `new_size` is the caller's to vouch for.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Gives the memory the C allocator keeps free back to the kernel
/// (`malloc_trim(0)`): after an image is built or kept, the buffers it
/// needed stay cached in the agent's heaps otherwise, and a daemon that
/// built one image held megabytes more for as long as it ran.
pub fn give_back_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists, under
    // its locks; it takes no pointer from us.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Allocations at least this large get pages of their own (`mmap`), given
/// back the moment they are freed.
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Free memory at the top of a heap past which the allocator gives it back.
const TRIM_THRESHOLD: i32 = 512 * 1024;

/// Makes the C allocator keep little free memory, in every thread's heap.
///
/// By default glibc raises its mmap threshold to the size of the largest
/// block freed (up to 32 MiB) and its trim threshold to twice that, and
/// `malloc_trim` never shrinks the top of a thread's own heap: a restore
/// thread that once read a large /proc file or built a large table kept
/// megabytes free, for good (a daemon holding one parked python held 11 MiB
/// of such free memory). Fixed thresholds turn that adjustment off.
///
/// It also keeps one heap per CPU instead of glibc's eight: the threads
/// that come and go (the async runtime's blocking threads, the restore
/// pool's) each took a heap of their own, so every service's long-lived
/// records were spread over 16 heaps between the free remains of image
/// builds, none of which could be given back whole (at 1,000 services,
/// 16 heaps held 8 MiB free; docs/scale.md, Agent memory).
pub fn keep_little_free_memory() {
    let heaps = std::thread::available_parallelism().map_or(2, |cpus| cpus.get());
    let heaps = i32::try_from(heaps).unwrap_or(i32::MAX);
    // SAFETY: mallopt only sets the allocator's parameters, under its lock.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
        libc::mallopt(libc::M_ARENA_MAX, heaps);
    }
}
