//! Unit tests of the allocator's paths and checks; small enough to run under Miri.

use std::alloc::Layout;
use std::panic::Location;

use crate::{Config, CorruptionAction, CorruptionKind, NeuralAlloc, SlabRelease};

/// An instance that only counts corruption, with tracking and poisoning on.
fn checking() -> NeuralAlloc {
    NeuralAlloc::with_config(checking_config())
}

/// Settings of [`checking`].
const fn checking_config() -> Config {
    Config {
        tracking: true,
        poison: true,
        guard_checks: true,
        on_corruption: CorruptionAction::Count,
        ..Config::DEFAULT
    }
}

/// Runs `body` on a new thread and waits until the thread has fully exited, including
/// its thread-local destructors (which scoped threads do not wait for).
fn on_other_thread(body: impl FnOnce() + Send + 'static) {
    std::thread::spawn(body).join().unwrap();
}

/// Blocks handed to another thread, which frees them.
struct Handover(Vec<std::ptr::NonNull<u8>>);

// SAFETY: the blocks are plain memory owned by the receiving thread from then on.
unsafe impl Send for Handover {}

impl Handover {
    /// Taking the whole value makes closures capture all of it, not its field.
    fn take(self) -> Vec<std::ptr::NonNull<u8>> {
        self.0
    }
}

fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

#[test]
fn every_class_and_the_large_path_round_trip_and_end_with_nothing_live() {
    let allocator = checking();
    for size in [
        0, 1, 56, 100, 250, 500, 1000, 2000, 4000, 8184, 8185, 100_000,
    ] {
        let block = allocator.allocate(layout(size, 8)).unwrap();
        // SAFETY: the block holds `size` bytes.
        unsafe { block.as_ptr().write_bytes(0x5a, size) };
        // SAFETY: the block is live and not used afterwards.
        unsafe { allocator.deallocate(block, layout(size, 8)) }.unwrap();
    }
    let stats = allocator.stats();
    assert_eq!((stats.current_bytes, stats.current_count), (0, 0));
    assert_eq!(stats.large.total_count, 2);
    assert_eq!(allocator.corruption_counts().total(), 0);
    assert_eq!(allocator.leak_report().blocks, 0);
}

#[test]
fn a_double_free_is_reported_with_its_allocation_and_free_sites() {
    let allocator = checking();
    let allocated_at = Location::caller();
    let block = allocator.allocate(layout(24, 8)).unwrap();
    // SAFETY: live block, not used afterwards.
    unsafe { allocator.deallocate(block, layout(24, 8)) }.unwrap();
    // SAFETY: deliberately a second free; detected and refused.
    let second = unsafe { allocator.deallocate(block, layout(24, 8)) };
    assert!(matches!(
        second,
        Err(crate::AllocError::Corruption {
            kind: CorruptionKind::DoubleFree,
            ..
        })
    ));
    let reports = allocator.corruption_reports();
    assert_eq!(reports.len(), 1);
    let report = reports[0];
    assert_eq!(report.kind, CorruptionKind::DoubleFree);
    assert_eq!(report.size, Some(24));
    assert_eq!(
        report.allocated_at.map(Location::file),
        Some(allocated_at.file())
    );
    assert_eq!(
        report.allocated_at.map(Location::line),
        Some(allocated_at.line() + 1)
    );
    assert_eq!(
        report.freed_at.map(Location::line),
        Some(allocated_at.line() + 3)
    );
    assert_eq!(
        report.detected_at.map(Location::line),
        Some(allocated_at.line() + 5)
    );
}

#[test]
fn pointers_that_are_not_block_starts_are_invalid_frees() {
    let allocator = checking();
    let other = checking();
    let block = allocator.allocate(layout(32, 8)).unwrap();
    let foreign = other.allocate(layout(32, 8)).unwrap();
    let on_stack = 0u64;
    // SAFETY: none of these is a live block of `allocator`; each is detected.
    let results = unsafe {
        [
            allocator.deallocate(block.add(8), layout(24, 8)),
            allocator.deallocate(foreign, layout(32, 8)),
            allocator.deallocate(std::ptr::NonNull::from(&on_stack).cast(), layout(8, 8)),
        ]
    };
    for result in results {
        assert!(matches!(
            result,
            Err(crate::AllocError::Corruption {
                kind: CorruptionKind::InvalidFree,
                ..
            })
        ));
    }
    assert_eq!(allocator.corruption_counts().invalid_frees, 3);
    // The refused frees changed nothing: both blocks are still live and freeable.
    // SAFETY: live blocks, not used afterwards.
    unsafe {
        allocator.deallocate(block, layout(32, 8)).unwrap();
        other.deallocate(foreign, layout(32, 8)).unwrap();
    }
}

#[test]
fn a_one_byte_overflow_is_found_on_free_and_by_validation() {
    let allocator = checking();
    for size in [10, 20_000] {
        let block = allocator.allocate(layout(size, 1)).unwrap();
        // SAFETY: deliberately one byte past the requested size; the guard bytes are
        // still inside the allocator's block.
        unsafe { block.as_ptr().add(size).write(0) };
        let validation = allocator.validate_all();
        assert_eq!(validation.problems, 1, "size {size}");
        // SAFETY: live block, not used afterwards.
        unsafe { allocator.deallocate(block, layout(size, 1)) }.unwrap();
        let reports = allocator.corruption_reports();
        assert_eq!(reports.len(), 2);
        assert!(
            reports
                .iter()
                .all(|report| report.kind == CorruptionKind::GuardOverwritten
                    && report.size == Some(size))
        );
        allocator.clear_corruption_reports();
    }
}

#[test]
fn a_write_after_free_is_found_when_the_block_is_reused() {
    let allocator = checking();
    let block = allocator.allocate(layout(40, 8)).unwrap();
    // SAFETY: live block, freed here.
    unsafe { allocator.deallocate(block, layout(40, 8)) }.unwrap();
    // SAFETY: deliberately writes into the freed block, which stays mapped. Its first
    // word, where a stale owner most often writes, is poisoned too: the free list's
    // link lies in the block's last word.
    unsafe { block.as_ptr().write(1) };
    assert_eq!(allocator.validate_all().problems, 1);
    let again = allocator.allocate(layout(40, 8)).unwrap();
    assert_eq!(again, block, "the cache hands the same block back");
    assert_eq!(allocator.corruption_counts().uses_after_free, 2);
    // SAFETY: live block, not used afterwards.
    unsafe { allocator.deallocate(again, layout(40, 8)) }.unwrap();
}

#[test]
fn the_leak_report_names_the_site_and_exact_bytes() {
    let allocator = checking();
    let (first, line) = allocate_100_bytes(&allocator);
    let (second, same_line) = allocate_100_bytes(&allocator);
    assert_eq!(line, same_line);
    let report = allocator.leak_report();
    let entry = report
        .sites
        .iter()
        .find(|entry| entry.site.map(Location::line) == Some(line))
        .unwrap();
    assert_eq!(entry.site.map(Location::file), Some(file!()));
    assert_eq!((entry.blocks, entry.bytes), (2, 200));
    assert_eq!((report.blocks, report.bytes), (2, 200));
    for block in [first, second] {
        // SAFETY: live blocks, not used afterwards.
        unsafe { allocator.deallocate(block, layout(100, 8)) }.unwrap();
    }
    assert_eq!(allocator.leak_report().blocks, 0);
}

/// Allocates 100 bytes and says on which line.
fn allocate_100_bytes(allocator: &NeuralAlloc) -> (std::ptr::NonNull<u8>, u32) {
    (allocator.allocate(layout(100, 8)).unwrap(), line!())
}

#[test]
fn reallocation_keeps_bytes_across_classes_and_in_place_within_one() {
    let allocator = checking();
    let mut bytes = allocator.bytes(10).unwrap();
    bytes.copy_from_slice(b"0123456789");
    let first = bytes.as_ptr();
    bytes.resize(50).unwrap();
    assert_eq!(bytes.as_ptr(), first, "still fits the 64-byte class");
    bytes.resize(3000).unwrap();
    assert_eq!(&bytes[..10], b"0123456789");
    assert!(bytes[10..].iter().all(|&byte| byte == 0));
    bytes.resize(20_000).unwrap();
    bytes.resize(5).unwrap();
    assert_eq!(&bytes[..], b"01234");
    drop(bytes);
    assert_eq!(allocator.stats().current_bytes, 0);
    assert_eq!(allocator.corruption_counts().total(), 0);
}

#[test]
fn zero_size_huge_and_overaligned_requests() {
    let allocator = checking();
    let empty = allocator.allocate(layout(0, 1)).unwrap();
    let aligned = allocator.allocate(layout(16, 4096)).unwrap();
    assert_eq!(aligned.as_ptr().addr() % 4096, 0);
    let very_aligned = allocator.allocate(layout(16, 65536)).unwrap();
    assert_eq!(very_aligned.as_ptr().addr() % 65536, 0);
    let huge = allocator.allocate(layout(isize::MAX as usize - 64, 8));
    assert!(matches!(
        huge,
        Err(crate::AllocError::TooLarge { .. }) | Err(crate::AllocError::OutOfMemory { .. })
    ));
    // SAFETY: live blocks, not used afterwards.
    unsafe {
        allocator.deallocate(empty, layout(0, 1)).unwrap();
        allocator.deallocate(aligned, layout(16, 4096)).unwrap();
        allocator
            .deallocate(very_aligned, layout(16, 65536))
            .unwrap();
    }
    assert_eq!(allocator.stats().current_count, 0);
}

#[test]
fn blocks_freed_on_another_thread_and_caches_of_exited_threads_return_to_the_pool() {
    static ALLOCATOR: NeuralAlloc = NeuralAlloc::with_config(checking_config());
    let allocator = &ALLOCATOR;
    free_on_another_thread(allocator, 200);
}

/// Blocks the main thread's cache still holds for the 64-byte class.
/// Allocates `count` 48-byte blocks here, frees them on another thread that then exits,
/// and checks that nothing is live, that every block outside the pool is one this
/// thread's cache holds, and that no corruption was reported.
fn free_on_another_thread(allocator: &'static NeuralAlloc, count: usize) {
    let blocks = Handover(
        (0..count)
            .map(|_| allocator.allocate(layout(48, 8)).unwrap())
            .collect(),
    );
    on_other_thread(move || {
        for block in blocks.take() {
            // SAFETY: live blocks handed over from the main thread, not used again.
            unsafe { allocator.deallocate(block, layout(48, 8)) }.unwrap();
        }
    });
    let stats = allocator.stats();
    assert_eq!(stats.current_count, 0);
    assert_eq!(
        stats.classes[0].blocks_outside_pool as usize,
        main_thread_cached(allocator)
    );
    assert_eq!(allocator.corruption_counts().total(), 0);
}

fn main_thread_cached(allocator: &NeuralAlloc) -> usize {
    allocator.warm_thread_cache(1, 0)
}

#[test]
fn empty_slabs_go_back_to_the_system_when_asked() {
    static ALLOCATOR: NeuralAlloc = NeuralAlloc::with_config(Config {
        slab_release: SlabRelease::ReleaseEmpty,
        ..checking_config()
    });
    let allocator = &ALLOCATOR;
    let blocks: Vec<_> = (0..100)
        .map(|_| allocator.allocate(layout(4000, 8)).unwrap())
        .collect();
    let freed_later = blocks.clone();
    let blocks = Handover(blocks);
    assert!(allocator.stats().classes[6].slabs >= 2);
    on_other_thread(move || {
        for block in blocks.take() {
            // SAFETY: live blocks, not used afterwards.
            unsafe { allocator.deallocate(block, layout(4000, 8)) }.unwrap();
        }
    });
    // The freeing thread's cache went back to the pool at its exit; only slabs still
    // feeding this thread's cache remain.
    let stats = allocator.stats().classes[6];
    assert!(stats.slabs <= 1, "{stats:?}");
    assert!(stats.slabs_created >= 2);
    // Freeing the blocks again is refused without touching them: a double free in the
    // slab still held, an invalid free in the slabs given back, whose pages read as
    // zeros (no owner) now.
    for block in freed_later {
        // SAFETY: deliberately freed a second time; refused and counted.
        let _ = unsafe { allocator.deallocate(block, layout(4000, 8)) };
    }
    let counts = allocator.corruption_counts();
    assert_eq!(
        counts.double_frees + counts.invalid_frees,
        100,
        "{counts:?}"
    );
    assert!(counts.invalid_frees > 0, "{counts:?}");
}

#[test]
fn history_records_allocations_and_frees_and_can_be_cleared() {
    let allocator = checking();
    let site = Location::caller();
    let boxed = allocator.boxed(7u32).unwrap();
    assert_eq!(boxed.into_inner(), 7);
    let history = allocator.history();
    assert_eq!(history.len(), 2);
    assert_eq!(history[0].event, crate::HistoryEvent::Allocate);
    assert_eq!(history[0].site.map(Location::line), Some(site.line() + 1));
    assert_eq!(history[1].event, crate::HistoryEvent::Free);
    assert_eq!(history[1].site.map(Location::line), Some(site.line() + 2));
    allocator.clear_history();
    assert!(allocator.history().is_empty());
}

#[test]
fn warming_fills_the_cache_and_later_allocations_hit_it() {
    let allocator = checking();
    let held = allocator.warm_thread_cache(200, 20);
    assert!(held >= 20);
    let before = allocator.stats().classes[2];
    let block = allocator.allocate(layout(200, 8)).unwrap();
    // SAFETY: live block, not used afterwards.
    unsafe { allocator.deallocate(block, layout(200, 8)) }.unwrap();
    let after = allocator.stats().classes[2];
    assert_eq!(after.refills, before.refills);
    assert_eq!(after.cache_hits, before.cache_hits + 1);
}

#[test]
fn the_global_alloc_adapter_serves_collections() {
    use std::alloc::GlobalAlloc;
    let allocator = checking();
    // SAFETY: a non-zero layout; the block is freed below with the same layout.
    let raw = unsafe { allocator.alloc(layout(100, 16)) };
    assert!(!raw.is_null());
    // SAFETY: `raw` is live with this layout; grown across classes then freed.
    unsafe {
        raw.write_bytes(3, 100);
        let grown = allocator.realloc(raw, layout(100, 16), 10_000);
        assert_eq!(*grown.add(99), 3);
        allocator.dealloc(grown, layout(10_000, 16));
    }
    assert_eq!(allocator.stats().current_count, 0);
}

#[test]
fn the_history_ring_keeps_the_most_recent_entries() {
    let allocator = checking();
    let mut last_address = 0;
    for round in 0..crate::HISTORY_LEN {
        let block = allocator.allocate(layout(round % 200, 8)).unwrap();
        last_address = block.as_ptr().addr();
        // SAFETY: live block, not used afterwards.
        unsafe { allocator.deallocate(block, layout(round % 200, 8)) }.unwrap();
    }
    let history = allocator.history();
    assert_eq!(history.len(), crate::HISTORY_LEN);
    let newest = history.last().unwrap();
    assert_eq!(
        (newest.event, newest.address),
        (crate::HistoryEvent::Free, last_address)
    );
    assert_eq!(newest.size, (crate::HISTORY_LEN - 1) % 200);
    assert!(
        history
            .windows(2)
            .all(|pair| pair[0].nanos <= pair[1].nanos)
    );
}

/// An instance with tracking and poisoning off, as release builds have it: allocations
/// and frees that hit the thread cache take the inline hit paths.
fn untracked() -> NeuralAlloc {
    NeuralAlloc::with_config(Config {
        tracking: false,
        poison: false,
        guard_checks: true,
        on_corruption: CorruptionAction::Count,
        ..Config::DEFAULT
    })
}

/// Sums one field over the pooled classes.
fn pooled_sum(stats: &crate::Stats, field: impl Fn(&crate::ClassStats) -> u64) -> u64 {
    stats.classes.iter().map(field).sum()
}

#[test]
fn untracked_cache_hits_keep_exact_statistics() {
    use std::alloc::GlobalAlloc;
    let allocator = untracked();
    let rounds: u64 = if cfg!(miri) { 20 } else { 10_000 };
    let sizes = [1, 100, 1000, 4000, 8184];
    let mut expected_bytes = 0;
    for _ in 0..rounds {
        for size in sizes {
            // SAFETY: non-zero layouts; each block is freed at once with its layout.
            unsafe {
                let block = allocator.alloc(layout(size, 8));
                assert!(!block.is_null());
                allocator.dealloc(block, layout(size, 8));
            }
            expected_bytes += size as u64;
        }
    }
    let stats = allocator.stats();
    let total_count = pooled_sum(&stats, |class| class.total_count);
    assert_eq!(total_count, rounds * sizes.len() as u64);
    assert_eq!(
        pooled_sum(&stats, |class| class.total_bytes),
        expected_bytes
    );
    assert_eq!((stats.current_count, stats.current_bytes), (0, 0));
    // Only the first allocation of each class (one class per size) missed the cache.
    let refills = pooled_sum(&stats, |class| class.refills);
    assert_eq!(refills, sizes.len() as u64);
    assert_eq!(
        pooled_sum(&stats, |class| class.cache_hits),
        total_count - refills
    );
    assert_eq!(allocator.corruption_counts().total(), 0);
}

#[test]
fn untracked_pending_bytes_past_two_gibibytes_stay_exact() {
    let allocator = untracked();
    // Pending bytes pile up in each thread's cache between publishes; 2 GiB of 8184-byte
    // requests (about 262,000) is past any 32-bit counter.
    let rounds: u64 = if cfg!(miri) { 20 } else { 300_000 };
    for _ in 0..rounds {
        let block = allocator.allocate(layout(8184, 8)).unwrap();
        // SAFETY: live block, not used afterwards.
        unsafe { allocator.deallocate(block, layout(8184, 8)) }.unwrap();
    }
    let stats = allocator.stats().classes[7];
    assert_eq!(stats.total_count, rounds);
    assert_eq!(stats.total_bytes, rounds * 8184);
    assert_eq!((stats.current_count, stats.current_bytes), (0, 0));
}

#[test]
fn untracked_frees_still_refuse_double_and_invalid_frees_and_find_overflows() {
    use std::alloc::GlobalAlloc;
    let allocator = untracked();
    let block = allocator.allocate(layout(24, 8)).unwrap();
    // SAFETY: live block, freed once here.
    unsafe { allocator.deallocate(block, layout(24, 8)) }.unwrap();
    // SAFETY: deliberately a second free, through both entry points; both are refused.
    let second = unsafe { allocator.deallocate(block, layout(24, 8)) };
    assert!(matches!(
        second,
        Err(crate::AllocError::Corruption {
            kind: CorruptionKind::DoubleFree,
            ..
        })
    ));
    // SAFETY: as above.
    unsafe { allocator.dealloc(block.as_ptr(), layout(24, 8)) };
    let live = allocator.allocate(layout(32, 8)).unwrap();
    // SAFETY: not a block start; refused without touching the block.
    let inside = unsafe { allocator.deallocate(live.add(8), layout(24, 8)) };
    assert!(matches!(
        inside,
        Err(crate::AllocError::Corruption {
            kind: CorruptionKind::InvalidFree,
            ..
        })
    ));
    let overflowed = allocator.allocate(layout(10, 1)).unwrap();
    // SAFETY: deliberately one byte past the requested size, inside the guard bytes.
    unsafe { overflowed.as_ptr().add(10).write(0) };
    // SAFETY: live blocks, not used afterwards; the damaged one is reported and freed.
    unsafe {
        allocator.deallocate(overflowed, layout(10, 1)).unwrap();
        allocator.deallocate(live, layout(32, 8)).unwrap();
    }
    let counts = allocator.corruption_counts();
    assert_eq!(
        (
            counts.double_frees,
            counts.invalid_frees,
            counts.guard_overwrites
        ),
        (2, 1, 1)
    );
    let stats = allocator.stats();
    assert_eq!((stats.current_count, stats.current_bytes), (0, 0));
}

#[test]
fn untracked_blocks_freed_on_another_thread_return_at_its_exit() {
    static ALLOCATOR: NeuralAlloc = NeuralAlloc::with_config(Config {
        tracking: false,
        poison: false,
        guard_checks: true,
        on_corruption: CorruptionAction::Count,
        ..Config::DEFAULT
    });
    let allocator = &ALLOCATOR;
    free_on_another_thread(allocator, 300);
}
