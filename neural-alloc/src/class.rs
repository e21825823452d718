//! Size classes: which class serves a request, and how a slab of each class is laid out.

/// Number of pooled size classes.
pub(crate) const CLASS_COUNT: usize = 8;

/// Block sizes of the pooled classes, smallest first.
pub const CLASS_SIZES: [usize; CLASS_COUNT] = [64, 128, 256, 512, 1024, 2048, 4096, 8192];

/// Bytes reserved after every allocation for the guard pattern, pooled or not.
///
/// A request of `n` bytes needs a block of at least `n + GUARD_LEN` bytes, so a 64-byte
/// request is served by the 128-byte class.
pub const GUARD_LEN: usize = 8;

/// log2 of the smallest class.
const MIN_SHIFT: u32 = 6;

/// log2 of a slab's size: every slab is 256 KiB and aligned to its size, so the slab
/// holding any block is found by masking the block's address.
pub(crate) const SLAB_SHIFT: u32 = 18;
/// Size and alignment of a slab in bytes.
pub(crate) const SLAB_SIZE: usize = 1 << SLAB_SHIFT;

/// Largest block size, and so the largest request (minus the guard) a pool serves.
pub(crate) const MAX_CLASS_SIZE: usize = CLASS_SIZES[CLASS_COUNT - 1];

/// The class serving `size` bytes at alignment `align`, or `None` when the request goes
/// to the system allocator.
///
/// Blocks of a class are aligned to the class size, so a class fits when it holds the
/// request plus its guard bytes and is at least as large as the alignment.
#[inline(always)]
pub(crate) fn class_for(size: usize, align: usize) -> Option<usize> {
    class_of_need(size.saturating_add(GUARD_LEN).max(align))
}

/// [`class_for`] of a layout, whose size is at most `isize::MAX`, so adding the guard
/// bytes cannot overflow and needs no check: the hit paths use this one.
#[inline(always)]
pub(crate) fn class_for_layout(layout: std::alloc::Layout) -> Option<usize> {
    class_of_need((layout.size() + GUARD_LEN).max(layout.align()))
}

/// The class of blocks of at least `need` bytes (at least the guard's length, so never
/// zero).
#[inline(always)]
fn class_of_need(need: usize) -> Option<usize> {
    if need > MAX_CLASS_SIZE {
        return None;
    }
    // Rounding up to a power of two of at least the smallest class: the bit length of
    // `need - 1` (at least 7 bits when `need` exceeds 64, so the low bits set by the
    // `or` change nothing then).
    let shift = usize::BITS - ((need - 1) | (CLASS_SIZES[0] - 1)).leading_zeros();
    Some((shift - MIN_SHIFT) as usize)
}

/// How one slab of a class is carved: a header and one state word per block first, then
/// the blocks, each aligned to the block size.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    /// Bytes per block; a power of two.
    pub(crate) block_size: usize,
    /// log2 of `block_size`.
    pub(crate) block_shift: u32,
    /// Offset of the first block from the slab's start.
    pub(crate) first_block: usize,
    /// Number of blocks in a slab.
    pub(crate) block_count: usize,
    /// Offset of the link a free block keeps to the next block of its list: the
    /// block's last word (see `slab::next_of`).
    pub(crate) link: usize,
}

/// Offset of the state word array inside a slab: just after the header, rounded to 8.
pub(crate) const STATE_WORDS_OFFSET: usize =
    (std::mem::size_of::<crate::slab::SlabHeader>() + 7) & !7;

const fn geometry(class: usize) -> Geometry {
    let block_shift = MIN_SHIFT + class as u32;
    let block_size = 1usize << block_shift;
    let mut block_count = SLAB_SIZE / block_size;
    loop {
        let metadata_end = STATE_WORDS_OFFSET + block_count * 4;
        let first_block = (metadata_end + block_size - 1) & !(block_size - 1);
        if first_block + block_count * block_size <= SLAB_SIZE {
            return Geometry {
                block_size,
                block_shift,
                first_block,
                block_count,
                link: block_size - size_of::<*mut u8>(),
            };
        }
        block_count -= 1;
    }
}

/// Slab layout of every class, computed at compile time. A constant rather than a
/// static, so the hot paths inlined into other crates read it without an indirection.
pub(crate) const GEOMETRY: [Geometry; CLASS_COUNT] = [
    geometry(0),
    geometry(1),
    geometry(2),
    geometry(3),
    geometry(4),
    geometry(5),
    geometry(6),
    geometry(7),
];

#[cfg(test)]
mod tests {
    use super::*;

    fn check(size: usize, align: usize, expected: Option<usize>) {
        assert_eq!(
            class_for(size, align).map(|class| CLASS_SIZES[class]),
            expected,
            "size {size} align {align}"
        );
    }

    #[test]
    fn requests_go_to_the_smallest_class_that_fits_with_guard_and_alignment() {
        check(0, 1, Some(64));
        check(1, 1, Some(64));
        check(56, 8, Some(64));
        check(57, 8, Some(128));
        check(64, 8, Some(128));
        check(120, 16, Some(128));
        check(8, 256, Some(256));
        check(8, 4096, Some(4096));
        check(8184, 8, Some(8192));
        check(8185, 8, None);
        check(8, 16384, None);
        check(usize::MAX, 1, None);
        check(usize::MAX - 7, 1, None);
    }

    #[test]
    fn layouts_get_the_class_of_their_size_and_alignment() {
        for (size, align) in [(0, 1), (56, 8), (57, 8), (8, 4096), (8184, 8), (8185, 8)] {
            let layout = std::alloc::Layout::from_size_align(size, align).unwrap();
            assert_eq!(
                class_for_layout(layout),
                class_for(size, align),
                "{layout:?}"
            );
        }
        let huge = std::alloc::Layout::from_size_align(isize::MAX as usize, 1).unwrap();
        assert_eq!(class_for_layout(huge), None);
    }

    #[test]
    fn every_slab_holds_its_header_state_words_and_blocks() {
        for (class, geometry) in GEOMETRY.iter().enumerate() {
            assert_eq!(geometry.block_size, CLASS_SIZES[class]);
            assert!(geometry.first_block >= STATE_WORDS_OFFSET + geometry.block_count * 4);
            assert_eq!(geometry.first_block % geometry.block_size, 0);
            assert!(geometry.first_block + geometry.block_count * geometry.block_size <= SLAB_SIZE);
            assert!(geometry.block_count >= 16, "class {class} wastes its slab");
            assert_eq!(geometry.link % align_of::<*mut u8>(), 0);
            // The largest request of the class ends where its guard starts, so the link
            // lies in guard bytes or past them, never in the caller's.
            let largest = geometry.block_size - GUARD_LEN;
            assert_eq!(class_for(largest, 1), Some(class));
            assert_ne!(class_for(largest + 1, 1), Some(class));
            assert!(geometry.link >= largest && geometry.link < geometry.block_size);
        }
    }
}
