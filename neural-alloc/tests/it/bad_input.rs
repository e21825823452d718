//! Zero-size, huge and over-aligned requests, reallocation across classes, and frees on
//! another thread than the allocating one.

use neural_alloc::{AllocError, CLASS_SIZES, GUARD_LEN};

use crate::{Handover, counting, layout};

#[test]
fn zero_size_requests_get_distinct_freeable_blocks() {
    let allocator = counting();
    let first = allocator.allocate(layout(0, 1)).unwrap();
    let second = allocator.allocate(layout(0, 1)).unwrap();
    assert_ne!(first, second);
    let boxed = allocator.boxed(()).unwrap();
    drop(boxed);
    // SAFETY: live blocks, not used afterwards.
    unsafe {
        allocator.deallocate(first, layout(0, 1)).unwrap();
        allocator.deallocate(second, layout(0, 1)).unwrap();
    }
    assert_eq!(allocator.stats().current_count, 0);
    assert_eq!(allocator.corruption_counts().total(), 0);
}

#[test]
fn huge_requests_fail_cleanly() {
    let allocator = counting();
    // Miri stops the whole run instead of failing a system allocation it cannot make,
    // so under Miri only requests whose size with header and guard overflows are tried.
    let sizes: &[usize] = if cfg!(miri) {
        &[isize::MAX as usize - 8]
    } else {
        &[isize::MAX as usize - 8, isize::MAX as usize - 4096, 1 << 60]
    };
    for &size in sizes {
        let result = allocator.allocate(layout(size, 8));
        assert!(
            matches!(
                result,
                Err(AllocError::TooLarge { .. } | AllocError::OutOfMemory { .. })
            ),
            "{size}: {result:?}"
        );
    }
    let bytes = allocator.bytes(usize::MAX / 2);
    assert!(bytes.is_err());
    assert_eq!(allocator.stats().current_count, 0);
}

#[test]
fn alignment_larger_than_the_size_class_is_honoured() {
    let allocator = counting();
    let mut blocks = Vec::new();
    for align in [1, 8, 64, 128, 512, 4096, 8192, 16384, 65536, 1 << 20] {
        for size in [0, 1, 24, 100] {
            let block = allocator.allocate(layout(size, align)).unwrap();
            assert_eq!(
                block.as_ptr().addr() % align,
                0,
                "size {size} align {align}"
            );
            // SAFETY: the block holds `size` bytes.
            unsafe { block.as_ptr().write_bytes(0xee, size) };
            blocks.push((block, size, align));
        }
    }
    assert_eq!(allocator.validate_all().problems, 0);
    for (block, size, align) in blocks {
        // SAFETY: live blocks, not used afterwards.
        unsafe { allocator.deallocate(block, layout(size, align)) }.unwrap();
    }
    let stats = allocator.stats();
    assert_eq!(stats.current_count, 0);
    assert!(
        stats.large.total_count >= 12,
        "alignments above 8192 go to the system allocator"
    );
    assert_eq!(allocator.corruption_counts().total(), 0);
}

#[test]
fn reallocation_across_every_class_and_the_large_path_keeps_the_bytes() {
    let allocator = counting();
    let mut sizes: Vec<usize> = CLASS_SIZES.iter().map(|class| class - GUARD_LEN).collect();
    sizes.extend([20_000, 100_000, 3, 9000, 0, 77]);
    let mut block = allocator.allocate(layout(1, 16)).unwrap();
    let mut size = 1;
    // SAFETY: one byte to start with.
    unsafe { block.as_ptr().write(0) };
    for &new_size in &sizes {
        // SAFETY: `block` is live with `size` bytes; after success only the returned
        // pointer is used.
        block = unsafe { allocator.reallocate(block, layout(size, 16), new_size) }.unwrap();
        assert_eq!(block.as_ptr().addr() % 16, 0);
        // SAFETY: the block holds `new_size` bytes, of which the first `size` were kept.
        let bytes = unsafe { std::slice::from_raw_parts_mut(block.as_ptr(), new_size) };
        for (index, byte) in bytes.iter().enumerate().take(size.min(new_size)) {
            assert_eq!(
                *byte, index as u8,
                "kept byte {index} going {size} -> {new_size}"
            );
        }
        for (index, byte) in bytes.iter_mut().enumerate() {
            *byte = index as u8;
        }
        size = new_size;
    }
    // SAFETY: live block, not used afterwards.
    unsafe { allocator.deallocate(block, layout(size, 16)) }.unwrap();
    assert_eq!(allocator.stats().current_bytes, 0);
    assert_eq!(allocator.corruption_counts().total(), 0);
}

#[test]
fn a_block_freed_on_another_thread_is_reused_correctly() {
    let allocator = counting();
    let sizes = [10, 100, 1000, 5000, 50_000];
    let blocks: Vec<_> = sizes
        .iter()
        .map(|&size| allocator.allocate(layout(size, 8)).unwrap())
        .collect();
    let handover = Handover(blocks);
    std::thread::spawn(move || {
        for (block, size) in handover.take().into_iter().zip(sizes) {
            // SAFETY: live blocks handed over from the allocating thread.
            unsafe { allocator.deallocate(block, layout(size, 8)) }.unwrap();
        }
    })
    .join()
    .unwrap();
    let stats = allocator.stats();
    assert_eq!((stats.current_count, stats.current_bytes), (0, 0));
    // The freeing thread's cache went back to the shared pool at its exit, so this
    // thread gets the same blocks again.
    let again = allocator.allocate(layout(5000, 8)).unwrap();
    // SAFETY: live block, not used afterwards.
    unsafe { allocator.deallocate(again, layout(5000, 8)) }.unwrap();
    assert_eq!(allocator.corruption_counts().total(), 0);
}
