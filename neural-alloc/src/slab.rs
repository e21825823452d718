//! Slabs: the 256 KiB aligned regions pools carve into blocks, their headers, the
//! per-block state words, and the arena they all come from.
//!
//! Every slab of every instance lies in one reservation of address space made on first
//! use (the arena), which reads as zeros wherever no slab was ever written. That makes
//! an invalid free detectable without touching the freed pointer's block: an address is
//! in a slab only if it lies in the arena, and the header at its slab-aligned base
//! (always readable) names the instance and class owning it, or zero.

use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::class::{Geometry, SLAB_SIZE, STATE_WORDS_OFFSET};
use crate::sys;
use crate::track::TrackRecord;

/// Written at the start of every slab header so slabs are recognisable in a memory dump
/// or a debugger.
pub(crate) const SLAB_MAGIC: usize = 0x6e61_736c_6162_0001;

/// Per-block state word: the requested size in the low 16 bits, then flag bits, then a
/// two-bit lifecycle state in the top bits (zero: never handed out since the slab was
/// mapped).
pub(crate) mod word {
    /// Mask of the requested size.
    pub(crate) const SIZE_MASK: u32 = 0xffff;
    /// Guard bytes were written after the requested size.
    pub(crate) const GUARDED: u32 = 1 << 16;
    /// A tracking record describes this block.
    pub(crate) const TRACKED: u32 = 1 << 17;
    /// The block was filled with the poison pattern when freed.
    pub(crate) const POISONED: u32 = 1 << 18;
    /// Allocated from inside the allocator (a report being built); left out of reports.
    pub(crate) const INTERNAL: u32 = 1 << 19;
    /// Poison the block when it is freed (poisoning was on when it was allocated), so
    /// the free path needs no look at the settings.
    pub(crate) const POISON_ON_FREE: u32 = 1 << 20;
    /// Mask of the lifecycle state.
    pub(crate) const STATE_MASK: u32 = 0b11 << 30;
    /// Free: in a thread cache or in the shared pool.
    pub(crate) const FREE: u32 = 1 << 30;
    /// Live: owned by a caller.
    pub(crate) const LIVE: u32 = 2 << 30;
}

/// Set in the identity of every slab in use, so that no identity built for an owner
/// numbered zero (an instance without hit paths) matches a slab never used or given back.
const IN_USE: u64 = 1 << 63;

/// The identity word of a slab of `class` owned by the instance numbered `owner`: what
/// a slab header holds, and what a free compares it with in one load. Zero in slabs
/// never used or given back.
///
/// The number sits where the fast word keeps it (`fast::OWNER_SHIFT`), so the hit path
/// of a free builds the identity it expects with one mask and one `or`.
#[inline(always)]
pub(crate) const fn identity(owner: u32, class: usize) -> u64 {
    IN_USE | ((owner as u64) << crate::state::fast::OWNER_SHIFT) | class as u64
}

/// The owner's number and the class an identity word names, or `None` for a slab not in
/// use.
pub(crate) fn identity_parts(identity: u64) -> Option<(u32, usize)> {
    if identity & IN_USE == 0 {
        return None;
    }
    let owner = (identity & !IN_USE) >> crate::state::fast::OWNER_SHIFT;
    let class = identity & ((1 << crate::state::fast::OWNER_SHIFT) - 1);
    Some((u32::try_from(owner).ok()?, class as usize))
}

/// The start of every slab. Fields marked "pool lock" are read and written only while
/// holding the lock of the slab's class pool; the others are fixed at creation or atomic.
#[repr(C)]
pub(crate) struct SlabHeader {
    /// [`SLAB_MAGIC`].
    pub(crate) magic: usize,
    /// [`identity`] of the owning instance and class; written before the slab is first
    /// used, reset to zero before it is given back, read by every free.
    pub(crate) identity: AtomicU64,
    /// Class index of the blocks (the low bits of `identity`, fixed while the slab lives).
    pub(crate) class: usize,
    /// Pool lock: head of this slab's free list (linked through [`next_of`]).
    pub(crate) free_head: *mut u8,
    /// Pool lock: index of the first block never handed out.
    pub(crate) bump: usize,
    /// Pool lock: blocks handed out of this slab (live or in a thread cache).
    pub(crate) handed_out: usize,
    /// Pool lock: links of the list of slabs that still have blocks to give.
    pub(crate) partial_prev: *mut SlabHeader,
    /// Pool lock: see `partial_prev`.
    pub(crate) partial_next: *mut SlabHeader,
    /// Pool lock: whether the slab is on the partial list.
    pub(crate) in_partial: bool,
    /// Pool lock: previous slab on the list of all slabs of the class.
    pub(crate) all_prev: *mut SlabHeader,
    /// Next slab on the list of all slabs; written under the pool lock, read by walkers
    /// (leak reports, validation) without it.
    pub(crate) all_next: AtomicPtr<SlabHeader>,
    /// Side table of tracking records, one per block, mapped when first needed.
    pub(crate) tracking: AtomicPtr<TrackRecord>,
}

/// Takes a slab for `class` of the instance numbered `owner` from the arena and writes
/// its header; `None` when the arena is full or cannot be reserved.
pub(crate) fn create(owner: u32, class: usize) -> Option<NonNull<SlabHeader>> {
    let base = arena::take()?;
    let header = base.cast::<SlabHeader>();
    // SAFETY: the arena hands out each slab to one taker at a time; its memory reads as
    // zeros (never used, or discarded when given back), so its state words are valid
    // (zero) and only the header needs writing. No free can match the slab before the
    // identity is published with release ordering.
    unsafe {
        header.as_ptr().write(SlabHeader {
            magic: SLAB_MAGIC,
            identity: AtomicU64::new(0),
            class,
            free_head: ptr::null_mut(),
            bump: 0,
            handed_out: 0,
            partial_prev: ptr::null_mut(),
            partial_next: ptr::null_mut(),
            in_partial: false,
            all_prev: ptr::null_mut(),
            all_next: AtomicPtr::new(ptr::null_mut()),
            tracking: AtomicPtr::new(ptr::null_mut()),
        });
        (*header.as_ptr())
            .identity
            .store(identity(owner, class), Ordering::Release);
    }
    Some(header)
}

/// Gives a slab back to the arena: its pages go back to the system and read as zeros,
/// so a later free of a stale pointer into it finds no owner.
///
/// # Safety
///
/// - `slab` must come from [`create`] and be unlinked from every list of its pool.
/// - No block of it may be live or in a thread cache, and no walker may be reading it.
pub(crate) unsafe fn destroy(slab: NonNull<SlabHeader>) {
    // SAFETY: the caller guarantees nothing refers to the slab any more; the tracking
    // table pointer and class are read before the header goes away.
    let (tracking, class) = unsafe {
        let header = &*slab.as_ptr();
        header.identity.store(0, Ordering::Release);
        (header.tracking.load(Ordering::Acquire), header.class)
    };
    if let Some(table) = NonNull::new(tracking) {
        let (len, align) = crate::track::table_size(class);
        // SAFETY: the table was mapped by `track::table_for` with this size.
        unsafe { sys::unmap(table.cast(), len, align) };
    }
    // SAFETY: the caller guarantees the slab is unused; it came from the arena.
    unsafe { arena::give_back(slab.cast()) };
}

/// The slab holding `pointer`, if it lies in the arena (whether or not a live slab is
/// there: the header's identity says). The returned pointer carries the arena's
/// provenance, not `pointer`'s.
#[inline(always)]
pub(crate) fn containing(pointer: *const u8) -> Option<NonNull<SlabHeader>> {
    let (base, len) = arena::bounds();
    if pointer.addr().wrapping_sub(base.addr()) >= len {
        return None;
    }
    let slab = base.with_addr(pointer.addr() & !(SLAB_SIZE - 1));
    // SAFETY: a non-zero length means the arena exists, so `base` is not null, and
    // `slab` lies at or after it (the arena is slab-aligned).
    Some(unsafe { NonNull::new_unchecked(slab) }.cast())
}

/// The identity word of the slab at `slab`.
///
/// # Safety
///
/// - `slab` must come from [`containing`] (any slab-aligned address in the arena).
#[inline(always)]
pub(crate) unsafe fn identity_of(slab: NonNull<SlabHeader>) -> u64 {
    // SAFETY: every slab-aligned address of the arena is readable, and the identity is
    // only ever accessed atomically.
    unsafe { (*slab.as_ptr()).identity.load(Ordering::Acquire) }
}

/// `pointer`'s address with the provenance of `slab` (the arena's), which covers the
/// whole slab (guard bytes and headers included) where a caller's pointer may cover only
/// its own bytes.
#[inline(always)]
pub(crate) fn with_slab_provenance(slab: NonNull<SlabHeader>, pointer: NonNull<u8>) -> NonNull<u8> {
    slab.cast::<u8>().with_addr(pointer.addr())
}

/// The slab of a block known to lie in one of our slabs (no arena check), with the
/// block pointer's provenance.
///
/// # Safety
///
/// - `block` must point into a slab of the arena, with the arena's provenance.
#[inline(always)]
pub(crate) unsafe fn base_of(block: NonNull<u8>) -> NonNull<SlabHeader> {
    // SAFETY: the slab's start lies before the block in the same slab, so inside the
    // arena, which is one allocation.
    unsafe { block.byte_sub(block.addr().get() & (SLAB_SIZE - 1)) }.cast()
}

/// The state word of block `index` of `slab`.
///
/// # Safety
///
/// - `slab` must be a live slab and `index` below its class's block count.
#[inline(always)]
pub(crate) unsafe fn state_word<'a>(slab: NonNull<SlabHeader>, index: usize) -> &'a AtomicU32 {
    // SAFETY: state words start at STATE_WORDS_OFFSET and the geometry reserves
    // `block_count` of them before the first block; slab memory stays mapped while the
    // slab lives, and words are only ever accessed atomically.
    unsafe {
        &*slab
            .cast::<u8>()
            .as_ptr()
            .add(STATE_WORDS_OFFSET + index * 4)
            .cast::<AtomicU32>()
    }
}

/// The address of block `index`.
///
/// # Safety
///
/// - `slab` must be a live slab and `index` below its block count.
#[inline(always)]
pub(crate) unsafe fn block_at(
    slab: NonNull<SlabHeader>,
    geometry: &Geometry,
    index: usize,
) -> NonNull<u8> {
    // SAFETY: the geometry keeps `first_block + index * block_size` inside the slab.
    unsafe {
        slab.cast::<u8>()
            .add(geometry.first_block + (index << geometry.block_shift))
    }
}

/// The block after `block` on its free list (a thread cache's or a slab's), null at the
/// end.
///
/// A free block keeps its link in its last word, at `link` (its class's
/// [`Geometry::link`]). That word is never a caller's: a block always holds the
/// guard's length after the largest request its class serves. So a free may write it
/// while the caller still holds a borrow of its own bytes, and for a request that fills
/// its class, the guard and the link share one cache line: the only line of the block
/// that its free and its next allocation touch.
///
/// # Safety
///
/// - `block` must be a free block of a class whose link offset is `link`, on a list,
///   with a provenance covering its last word (the slab's).
#[inline(always)]
pub(crate) unsafe fn next_of(block: NonNull<u8>, link: usize) -> *mut u8 {
    // SAFETY: as required of our caller; blocks and so their last words are aligned.
    unsafe { block.add(link).cast::<*mut u8>().read() }
}

/// Links `block` to `next` (see [`next_of`]).
///
/// # Safety
///
/// - `block` must be a free block owned by the caller, of a class whose link offset is
///   `link`, with a provenance covering its last word (the slab's).
#[inline(always)]
pub(crate) unsafe fn set_next(block: NonNull<u8>, link: usize, next: *mut u8) {
    // SAFETY: as required of our caller.
    unsafe { block.add(link).cast::<*mut u8>().write(next) }
}

/// Where a pointer sits in a slab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Position {
    /// At the start of block `index`.
    BlockStart(usize),
    /// Inside the header, inside a block, or in the unused tail.
    NotBlockStart,
}

/// Locates `pointer` in `slab` of class geometry `geometry`: a few instructions and one
/// branch, since any address outside the slab's blocks wraps to a large offset.
#[inline(always)]
pub(crate) fn position(
    slab: NonNull<SlabHeader>,
    geometry: &Geometry,
    pointer: *const u8,
) -> Position {
    let from_first = pointer
        .addr()
        .wrapping_sub(slab.as_ptr().addr())
        .wrapping_sub(geometry.first_block);
    // Rotating moves any bits below the block size to the top, so one comparison
    // refuses addresses inside a block as well as those outside the blocks.
    let index = from_first.rotate_right(geometry.block_shift);
    if index >= geometry.block_count {
        return Position::NotBlockStart;
    }
    Position::BlockStart(index)
}

/// Environment variable capping the arena, in mebibytes (read once, without allocating,
/// when the first slab is needed).
pub(crate) const ARENA_VARIABLE: &std::ffi::CStr = c"HOTPATCH_ALLOC_ARENA_MIB";

/// Bytes of address space reserved for slabs (zero before the first slab), and bytes of
/// it handed out as slabs so far.
pub(crate) fn arena_usage() -> (usize, usize) {
    arena::usage()
}

/// The arena: one reservation of address space that every slab is carved from, slabs
/// given back kept on a list for reuse.
mod arena {
    use super::*;

    /// Size of the reservation tried first unless `HOTPATCH_ALLOC_ARENA_MIB` says
    /// otherwise. On failure (`ulimit -v`, strict overcommit) each next try is a quarter
    /// of the last, down to [`SMALLEST_TRY`]. When the arena is full, pooled requests go
    /// to the system allocator like large ones.
    const FIRST_TRY: usize = if cfg!(miri) { 64 << 20 } else { 64 << 30 };
    /// Below this, quartering stops.
    const SMALLEST_TRY: usize = 16 << 20;

    /// The sizes to try, largest first, each a whole number of slabs.
    fn sizes() -> impl Iterator<Item = usize> {
        let first = sys::env_number(ARENA_VARIABLE)
            .map_or(FIRST_TRY, |mebibytes| mebibytes.saturating_mul(1 << 20))
            .max(SLAB_SIZE)
            & !(SLAB_SIZE - 1);
        std::iter::successors(Some(first), |&size| {
            (size > SMALLEST_TRY).then(|| (size / 4).max(SLAB_SIZE) & !(SLAB_SIZE - 1))
        })
    }

    /// Where the reservation lies: one static, so the hit path finds both words with one
    /// address.
    struct Bounds {
        /// Start of the reservation (null until made), with the provenance of all of it.
        base: AtomicPtr<u8>,
        /// Its length, published after `base` (zero until then), so a reader that sees a
        /// length also sees the base.
        len: AtomicUsize,
    }

    static BOUNDS: Bounds = Bounds {
        base: AtomicPtr::new(ptr::null_mut()),
        len: AtomicUsize::new(0),
    };

    struct Carver {
        /// Offset of the first slab never handed out.
        next: usize,
        /// Slabs given back, linked through their header's `free_head` field.
        given_back: *mut SlabHeader,
        /// The reservation failed at every size; do not try again.
        failed: bool,
    }

    // SAFETY: the pointer names arena memory only followed under the mutex.
    unsafe impl Send for Carver {}

    static CARVER: Mutex<Carver> = Mutex::new(Carver {
        next: 0,
        given_back: ptr::null_mut(),
        failed: false,
    });

    /// The arena's start and length; a zero length before it exists.
    #[inline(always)]
    pub(super) fn bounds() -> (*mut u8, usize) {
        let len = BOUNDS.len.load(Ordering::Acquire);
        (BOUNDS.base.load(Ordering::Relaxed), len)
    }

    /// A slab-aligned slab of zeros, or `None` when the arena is full.
    pub(super) fn take() -> Option<NonNull<u8>> {
        let mut carver = CARVER.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(slab) = NonNull::new(carver.given_back) {
            // SAFETY: slabs on the list are ours; their header holds the next link.
            carver.given_back = unsafe { (*slab.as_ptr()).free_head }.cast();
            // SAFETY: the link was the only byte written since the slab was discarded.
            unsafe { (*slab.as_ptr()).free_head = ptr::null_mut() };
            return Some(slab.cast());
        }
        let (mut base, mut len) = bounds();
        if len == 0 {
            if carver.failed {
                return None;
            }
            let Some((fresh, fresh_len)) =
                sizes().find_map(|size| Some((sys::reserve(size, SLAB_SIZE)?, size)))
            else {
                carver.failed = true;
                return None;
            };
            BOUNDS.base.store(fresh.as_ptr(), Ordering::Relaxed);
            BOUNDS.len.store(fresh_len, Ordering::Release);
            (base, len) = (fresh.as_ptr(), fresh_len);
        }
        if carver.next + SLAB_SIZE > len {
            return None;
        }
        // SAFETY: `next + SLAB_SIZE <= len`, so the slab lies inside the reservation.
        let slab = unsafe { base.add(carver.next) };
        carver.next += SLAB_SIZE;
        NonNull::new(slab)
    }

    /// Bytes reserved, and bytes of them handed out as slabs so far (including slabs
    /// given back and kept for reuse).
    pub(super) fn usage() -> (usize, usize) {
        let carver = CARVER.lock().unwrap_or_else(PoisonError::into_inner);
        (bounds().1, carver.next)
    }

    /// Discards a slab's pages and keeps it for reuse.
    ///
    /// # Safety
    ///
    /// - `slab` must come from [`take`] and be unused from now on.
    pub(super) unsafe fn give_back(slab: NonNull<u8>) {
        // SAFETY: as required of our caller; slabs are page-aligned.
        unsafe { sys::discard(slab, SLAB_SIZE) };
        let mut carver = CARVER.lock().unwrap_or_else(PoisonError::into_inner);
        let header = slab.cast::<SlabHeader>().as_ptr();
        // SAFETY: the slab is ours again; its (zero) header's list field holds the link.
        unsafe { (*header).free_head = carver.given_back.cast() };
        carver.given_back = header;
    }
}
