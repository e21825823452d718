//! The arena every slab comes from, in child processes whose address space or arena is
//! limited from their start: a smaller reservation under `ulimit -v`, and pooled
//! requests served by the system allocator once the arena is full.

#![cfg(all(target_os = "linux", not(miri)))]

use std::process::Output;

use neural_alloc::{CorruptionAction, NeuralAlloc};

use crate::{layout, run_child};

/// Set in the child processes; each child test refuses to run without it.
const CHILD: &str = "NEURAL_ALLOC_TEST_ARENA_CHILD";

fn assert_child_passed(output: &Output, marker: &str) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && stdout.contains(marker),
        "status {:?}\nstdout: {stdout}\nstderr: {stderr}",
        output.status
    );
}

fn assert_in_child(parent: &str) {
    assert!(
        std::env::var_os(CHILD).is_some(),
        "run arena::{parent} instead"
    );
}

/// An untracked instance that counts corruption instead of aborting.
fn untracked() -> NeuralAlloc {
    NeuralAlloc::with_config(neural_alloc::Config {
        tracking: false,
        poison: false,
        guard_checks: true,
        on_corruption: CorruptionAction::Count,
        ..neural_alloc::Config::DEFAULT
    })
}

#[test]
fn an_address_space_limit_gets_a_smaller_arena() {
    // 2 GiB of address space: the 64, 16 and 4 GiB reservations fail, 1 GiB fits.
    let output = run_child(
        "arena::limited_address_space_child",
        &[(CHILD, "1")],
        Some(2 << 30),
    );
    assert_child_passed(&output, "limited arena child done");
}

#[test]
#[ignore = "runs as the child process of arena::an_address_space_limit_gets_a_smaller_arena"]
fn limited_address_space_child() {
    assert_in_child("an_address_space_limit_gets_a_smaller_arena");
    let allocator = untracked();
    let blocks: Vec<_> = (0..1000)
        .map(|index| allocator.allocate(layout(24 + index % 1000, 8)).unwrap())
        .collect();
    let stats = allocator.stats();
    assert!(
        stats.arena_bytes > 0 && stats.arena_bytes <= 1 << 30,
        "arena of {} bytes",
        stats.arena_bytes
    );
    assert_eq!(stats.large.total_count, 0, "pooled sizes stayed pooled");
    for (index, block) in blocks.into_iter().enumerate() {
        // SAFETY: live blocks, freed once with their layouts.
        unsafe { allocator.deallocate(block, layout(24 + index % 1000, 8)) }.unwrap();
    }
    assert_eq!(allocator.stats().current_count, 0);
    println!("limited arena child done");
}

#[test]
fn a_full_arena_sends_pooled_requests_to_the_system_allocator() {
    let output = run_child(
        "arena::full_arena_child",
        &[(CHILD, "1"), ("HOTPATCH_ALLOC_ARENA_MIB", "32")],
        None,
    );
    assert_child_passed(&output, "full arena child done");
}

#[test]
#[ignore = "runs as the child process of arena::a_full_arena_sends_pooled_requests_to_the_system_allocator"]
fn full_arena_child() {
    assert_in_child("a_full_arena_sends_pooled_requests_to_the_system_allocator");
    let allocator = untracked();
    let request = layout(8184, 8);
    let arena_bytes = allocator.stats().arena_bytes;
    assert_eq!(
        arena_bytes,
        32 << 20,
        "HOTPATCH_ALLOC_ARENA_MIB caps the arena"
    );
    // More 8 KiB blocks than the whole arena could hold.
    let count = (arena_bytes / 8192 + 1024) as usize;
    let blocks: Vec<_> = (0..count)
        .map(|index| {
            let block = allocator.allocate(request).unwrap();
            // SAFETY: a fresh block of 8184 bytes.
            unsafe { block.as_ptr().write_bytes(index as u8, 8184) };
            block
        })
        .collect();
    let stats = allocator.stats();
    assert_eq!(stats.arena_used_bytes, stats.arena_bytes);
    assert!(stats.large.current_count >= 1024, "{:?}", stats.large);
    assert_eq!(stats.current_count, count as u64);
    for (index, block) in blocks.into_iter().enumerate() {
        // SAFETY: live blocks, each written whole above.
        let bytes = unsafe { std::slice::from_raw_parts(block.as_ptr(), 8184) };
        assert!(
            bytes.iter().all(|&byte| byte == index as u8),
            "block {index}"
        );
        // SAFETY: live blocks, freed once with their layout.
        unsafe { allocator.deallocate(block, request) }.unwrap();
    }
    assert_eq!(allocator.stats().current_count, 0);
    assert_eq!(allocator.corruption_counts().total(), 0);
    println!("full arena child done");
}
