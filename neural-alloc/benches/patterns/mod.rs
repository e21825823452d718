//! The allocators and the single-thread patterns both benchmarks run: a hot loop
//! (allocate, free, repeat) and a batch (allocate 1,000, then free them in order),
//! optionally writing the ends of each block.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::time::{Duration, Instant};

use mimalloc::MiMalloc;
use neural_alloc::{CLASS_SIZES, Config, GUARD_LEN, NeuralAlloc};
use tikv_jemallocator::Jemalloc;

pub static NEURAL: NeuralAlloc = NeuralAlloc::with_config(Config {
    tracking: false,
    poison: false,
    ..Config::DEFAULT
});
pub static NEURAL_NO_GUARD: NeuralAlloc = NeuralAlloc::with_config(Config {
    tracking: false,
    poison: false,
    guard_checks: false,
    ..Config::DEFAULT
});
pub static MIMALLOC: MiMalloc = MiMalloc;
pub static JEMALLOC: Jemalloc = Jemalloc;
pub static SYSTEM: System = System;

/// Blocks per batch in the batch pattern.
pub const BATCH: usize = 1000;
/// The largest request each class serves (its size minus our guard bytes), used for every
/// allocator so they all get the same requests.
pub fn request_sizes() -> Vec<usize> {
    CLASS_SIZES.iter().map(|class| class - GUARD_LEN).collect()
}

/// Inlined into its callers, so a constant layout stays constant inside the loop.
#[inline(always)]
pub fn hot_loop<A: GlobalAlloc>(allocator: &A, layout: Layout, iterations: u64) -> Duration {
    let start = Instant::now();
    for _ in 0..iterations {
        // SAFETY: a non-zero layout; the block is freed at once with the same layout.
        unsafe {
            let block = black_box(allocator.alloc(layout));
            allocator.dealloc(block, layout);
        }
    }
    start.elapsed()
}

/// The batch pattern; with `TOUCH`, the caller writes the first and the last byte of
/// each block it gets, as one that fills its buffer would.
pub fn batch<A: GlobalAlloc, const TOUCH: bool>(
    allocator: &A,
    layout: Layout,
    iterations: u64,
) -> Duration {
    let mut blocks = vec![std::ptr::null_mut::<u8>(); BATCH];
    let mut elapsed = Duration::ZERO;
    for _ in 0..iterations {
        let start = Instant::now();
        for slot in blocks.iter_mut() {
            // SAFETY: a non-zero layout; freed below.
            *slot = unsafe { allocator.alloc(layout) };
            if TOUCH {
                assert!(!slot.is_null(), "out of memory");
                // SAFETY: a block of `layout.size()` writable bytes.
                unsafe {
                    slot.write(1);
                    slot.add(layout.size() - 1).write(1);
                }
            }
        }
        for &block in blocks.iter() {
            // SAFETY: allocated above with this layout and not freed yet.
            unsafe { allocator.dealloc(black_box(block), layout) };
        }
        elapsed += start.elapsed();
    }
    // Reported per allocate/free pair.
    elapsed / BATCH as u32
}
