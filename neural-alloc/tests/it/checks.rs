//! Leaks, double frees, invalid frees, overflows and the abort action.

use std::panic::Location;
use std::ptr::NonNull;

use neural_alloc::{AllocError, CorruptionKind, NeuralAlloc};

use crate::{counting, layout};

/// Allocates `size` bytes and says on which line.
fn allocate_here(allocator: &NeuralAlloc, size: usize) -> (NonNull<u8>, u32) {
    (allocator.allocate(layout(size, 8)).unwrap(), line!())
}

#[test]
fn a_leak_is_reported_with_its_exact_bytes_and_call_site() {
    let allocator = counting();
    let kept: Vec<_> = (0..3).map(|_| allocate_here(allocator, 333)).collect();
    let (large, large_line) = allocate_here(allocator, 50_000);
    let (freed, _) = allocate_here(allocator, 333);
    // SAFETY: live block, not used afterwards.
    unsafe { allocator.deallocate(freed, layout(333, 8)) }.unwrap();

    let report = allocator.leak_report();
    assert_eq!(report.blocks, 4);
    assert_eq!(report.bytes, 3 * 333 + 50_000);
    assert_eq!(
        report.sites.len(),
        1,
        "both sizes come from one line:\n{report}"
    );
    let site = &report.sites[0];
    let location = site.site.unwrap();
    assert_eq!((location.file(), location.line()), (file!(), large_line));
    assert_eq!((site.blocks, site.bytes), (4, 50_999));
    let text = report.to_string();
    assert!(text.contains("4 live blocks, 50999 bytes"), "{text}");
    assert!(
        text.contains(&format!("{}:{}", file!(), large_line)),
        "{text}"
    );

    for (block, _) in kept {
        // SAFETY: live blocks, not used afterwards.
        unsafe { allocator.deallocate(block, layout(333, 8)) }.unwrap();
    }
    // SAFETY: as above.
    unsafe { allocator.deallocate(large, layout(50_000, 8)) }.unwrap();
    assert_eq!(allocator.leak_report().blocks, 0);
}

#[test]
fn a_double_free_names_where_the_block_was_allocated_and_first_freed() {
    let allocator = counting();
    let (block, allocated_line) = allocate_here(allocator, 40);
    let first_free = Location::caller();
    // SAFETY: live block, freed once here.
    unsafe { allocator.deallocate(block, layout(40, 8)) }.unwrap();
    // SAFETY: deliberately freed twice; detected and refused.
    let second = unsafe { allocator.deallocate(block, layout(40, 8)) };
    assert_eq!(
        second,
        Err(AllocError::Corruption {
            kind: CorruptionKind::DoubleFree,
            address: block.as_ptr().addr()
        })
    );
    let [report] = allocator.corruption_reports()[..] else {
        panic!("expected one report: {:?}", allocator.corruption_reports());
    };
    assert_eq!(report.kind, CorruptionKind::DoubleFree);
    assert_eq!(
        report.allocated_at.map(Location::line),
        Some(allocated_line)
    );
    let freed_at = report.freed_at.unwrap();
    let detected_at = report.detected_at.unwrap();
    assert_eq!(freed_at.file(), file!());
    assert!(freed_at.line() > first_free.line() && freed_at.line() < detected_at.line());
    assert!(report.to_string().contains("double free"), "{report}");
}

#[test]
fn invalid_frees_are_refused_and_leave_live_blocks_intact() {
    let allocator = counting();
    let block = allocator.allocate(layout(100, 8)).unwrap();
    // SAFETY: the block holds 100 bytes.
    unsafe { block.as_ptr().write_bytes(7, 100) };
    let large = allocator.allocate(layout(40_000, 8)).unwrap();
    let from_the_system = Box::new([0u8; 32]);
    let inside = NonNull::from(&from_the_system[8]);
    // SAFETY: none of these is a live block start; each is detected and refused.
    let results = unsafe {
        [
            allocator.deallocate(block.add(1), layout(99, 1)),
            allocator.deallocate(block.add(64), layout(36, 1)),
            allocator.deallocate(large.add(16), layout(8, 8)),
            allocator.deallocate(inside, layout(8, 1)),
        ]
    };
    for result in results {
        assert!(
            matches!(
                result,
                Err(AllocError::Corruption {
                    kind: CorruptionKind::InvalidFree,
                    ..
                })
            ),
            "{result:?}"
        );
    }
    assert_eq!(allocator.corruption_counts().invalid_frees, 4);
    // SAFETY: the block is still live and was not touched by the refused frees.
    let kept = unsafe { std::slice::from_raw_parts(block.as_ptr(), 100) };
    assert!(kept.iter().all(|&byte| byte == 7));
    // SAFETY: live blocks, not used afterwards.
    unsafe {
        allocator.deallocate(block, layout(100, 8)).unwrap();
        allocator.deallocate(large, layout(40_000, 8)).unwrap();
    }
    assert_eq!(allocator.stats().current_count, 0);
}

#[test]
fn a_one_byte_overflow_is_reported_on_free_with_its_sites() {
    let allocator = counting();
    for size in [1, 63, 500, 8000, 70_000] {
        let (block, line) = allocate_here(allocator, size);
        // SAFETY: deliberately one byte past the end; the guard bytes absorb it.
        unsafe { block.as_ptr().add(size).write(0x42) };
        // SAFETY: live block, not used afterwards.
        unsafe { allocator.deallocate(block, layout(size, 8)) }.unwrap();
        let reports = allocator.corruption_reports();
        let report = reports.last().unwrap();
        assert_eq!(report.kind, CorruptionKind::GuardOverwritten);
        assert_eq!(report.size, Some(size));
        assert_eq!(report.allocated_at.map(Location::line), Some(line));
        assert!(report.detected_at.is_some());
    }
    assert_eq!(allocator.corruption_counts().guard_overwrites, 5);
    assert_eq!(allocator.corruption_counts().total(), 5);
}

#[test]
fn validation_finds_an_overflow_in_a_block_still_live() {
    let allocator = counting();
    let blocks: Vec<_> = (0..50)
        .map(|size| allocator.allocate(layout(size * 10, 8)).unwrap())
        .collect();
    // SAFETY: deliberately one byte past block 20's 200 bytes.
    unsafe { blocks[20].as_ptr().add(200).write(1) };
    let validation = allocator.validate_all();
    assert_eq!(validation.problems, 1);
    assert!(validation.blocks_checked >= 50);
    assert_eq!(
        allocator.corruption_reports()[0].address,
        blocks[20].as_ptr().addr()
    );
    allocator.clear_corruption_reports();
    for (size, block) in blocks.into_iter().enumerate() {
        // SAFETY: live blocks, not used afterwards.
        unsafe { allocator.deallocate(block, layout(size * 10, 8)) }.unwrap();
    }
    assert_eq!(
        allocator.corruption_counts().guard_overwrites,
        1,
        "reported again on free"
    );
}

/// Set in the child process of `the_abort_action_stops_the_process`.
const ABORT_CHILD: &str = "NEURAL_ALLOC_TEST_ABORT_CHILD";

/// The child process of [`the_abort_action_stops_the_process`]: frees a block twice
/// under the abort action.
#[test]
#[ignore = "runs as the child process of checks::the_abort_action_stops_the_process"]
fn abort_child() {
    assert!(
        std::env::var_os(ABORT_CHILD).is_some(),
        "run checks::the_abort_action_stops_the_process instead"
    );
    let allocator = NeuralAlloc::new();
    let block = allocator.allocate(layout(16, 8)).unwrap();
    // SAFETY: freed twice on purpose; the second free must abort the process.
    unsafe {
        allocator.deallocate(block, layout(16, 8)).unwrap();
        let _ = allocator.deallocate(block, layout(16, 8));
    }
    println!("still alive after a double free");
}

#[cfg(all(unix, not(miri)))]
#[test]
fn the_abort_action_stops_the_process() {
    use std::os::unix::process::ExitStatusExt;
    let output = crate::run_child("checks::abort_child", &[(ABORT_CHILD, "1")], None);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        output.status.signal(),
        Some(libc_sigabrt()),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stderr.contains("neural-alloc: double free"), "{stderr}");
    assert!(!stdout.contains("still alive"));
}

/// SIGABRT, which is 6 on every Unix this crate supports.
#[cfg(all(unix, not(miri)))]
fn libc_sigabrt() -> i32 {
    6
}
