//! Many threads allocating and freeing at random, with frees on other threads.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use crate::{counting, layout};

#[cfg(not(miri))]
const THREADS: usize = 8;
#[cfg(not(miri))]
const OPERATIONS: usize = 100_000;
#[cfg(miri)]
const THREADS: usize = 2;
#[cfg(miri)]
const OPERATIONS: usize = 300;

/// A live block with the size and tag written into its first and last byte.
#[derive(Clone, Copy)]
struct Live {
    block: NonNull<u8>,
    size: usize,
    tag: u8,
}

// SAFETY: a block is plain memory owned by whichever thread holds the `Live`.
unsafe impl Send for Live {}

/// A small deterministic generator (xorshift64), one per thread.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

fn random_size(random: &mut Random) -> usize {
    match random.below(100) {
        0 => 8193 + random.below(40_000),
        1..=60 => random.below(120),
        61..=90 => random.below(1024),
        _ => random.below(8184),
    }
}

/// Frees a block after checking that nobody else wrote into it.
fn free(allocator: &neural_alloc::NeuralAlloc, live: Live) {
    if live.size > 0 {
        // SAFETY: the block holds `size` bytes owned by the caller.
        let (first, last) = unsafe {
            (
                live.block.as_ptr().read(),
                live.block.as_ptr().add(live.size - 1).read(),
            )
        };
        assert_eq!(
            (first, last),
            (live.tag, live.tag),
            "block handed out twice or overwritten"
        );
    }
    // SAFETY: the block is live and owned by the caller; not used afterwards.
    unsafe { allocator.deallocate(live.block, layout(live.size, 8)) }.unwrap();
}

#[test]
fn eight_threads_of_random_traffic_end_with_nothing_live() {
    let allocator = counting();
    // Blocks put here by one thread are freed by another.
    let exchange: Arc<Mutex<Vec<Live>>> = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..THREADS)
        .map(|thread| {
            let exchange = Arc::clone(&exchange);
            std::thread::spawn(move || {
                let mut random =
                    Random(0x9e37_79b9_7f4a_7c15 ^ ((thread as u64 + 1) * 0x1234_5678_9abc));
                let mut mine: Vec<Live> = Vec::new();
                for _ in 0..OPERATIONS {
                    match random.below(10) {
                        0..=4 => {
                            let size = random_size(&mut random);
                            let block = allocator.allocate(layout(size, 8)).unwrap();
                            let tag = random.next() as u8;
                            // SAFETY: the block holds `size` bytes.
                            unsafe { block.as_ptr().write_bytes(tag, size) };
                            mine.push(Live { block, size, tag });
                        }
                        5..=7 if !mine.is_empty() => {
                            let index = random.below(mine.len());
                            free(allocator, mine.swap_remove(index));
                        }
                        8 if !mine.is_empty() => {
                            let index = random.below(mine.len());
                            exchange.lock().unwrap().push(mine.swap_remove(index));
                        }
                        _ => {
                            let taken = exchange.lock().unwrap().pop();
                            if let Some(live) = taken {
                                free(allocator, live);
                            }
                        }
                    }
                }
                for live in mine {
                    free(allocator, live);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    for live in exchange.lock().unwrap().drain(..) {
        free(allocator, live);
    }
    let stats = allocator.stats();
    assert_eq!(
        (stats.current_bytes, stats.current_count),
        (0, 0),
        "{stats:#?}"
    );
    assert!(
        stats
            .classes
            .iter()
            .map(|class| class.total_count)
            .sum::<u64>()
            > (THREADS * OPERATIONS / 4) as u64
    );
    // Every block went back to the shared pool: the workers exited and flushed their
    // caches; only this thread's cache, which took the exchange's leftovers, holds some.
    for class in &stats.classes {
        let cached_here =
            allocator.warm_thread_cache(class.block_size - neural_alloc::GUARD_LEN, 0);
        assert_eq!(class.blocks_outside_pool, cached_here as u64, "{class:?}");
    }
    assert_eq!(allocator.leak_report().blocks, 0);
    assert_eq!(allocator.corruption_counts().total(), 0);
    assert_eq!(allocator.validate_all().problems, 0);
}
