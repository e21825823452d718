//! Slabs: the 256 KiB aligned regions pools carve into blocks, their headers, the
//! per-block state words, and the process-wide registry that says whether an address
//! lies in a slab at all.
//!
//! The registry is what makes an invalid free detectable without touching the freed
//! pointer: it is a two-level table indexed by the slab number of an address, so a
//! lookup reads only the allocator's own memory.

use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};

use crate::class::{Geometry, SLAB_SHIFT, SLAB_SIZE, STATE_WORDS_OFFSET};
use crate::state::State;
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

/// The start of every slab. Fields marked "pool lock" are read and written only while
/// holding the lock of the slab's class pool; the others are fixed at creation or atomic.
#[repr(C)]
pub(crate) struct SlabHeader {
    /// [`SLAB_MAGIC`].
    pub(crate) magic: usize,
    /// The allocator instance owning this slab.
    pub(crate) owner: *const State,
    /// Class index of the blocks.
    pub(crate) class: usize,
    /// Pool lock: head of this slab's free list (link in the first word of each block).
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

/// Maps a new slab for `class`, writes its header and registers it.
pub(crate) fn create(owner: *const State, class: usize) -> Option<NonNull<SlabHeader>> {
    let base = sys::map_zeroed(SLAB_SIZE, SLAB_SIZE)?;
    let header = base.cast::<SlabHeader>();
    // SAFETY: the mapping is fresh, SLAB_SIZE long and aligned, so the header fits and
    // nothing else can see it yet. Zeroed memory already holds valid (zero) state words.
    unsafe {
        header.as_ptr().write(SlabHeader {
            magic: SLAB_MAGIC,
            owner,
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
    }
    if !registry::insert(header) {
        // SAFETY: the slab was mapped above with these arguments and never published.
        unsafe { sys::unmap(base, SLAB_SIZE, SLAB_SIZE) };
        return None;
    }
    Some(header)
}

/// Unregisters and unmaps a slab.
///
/// # Safety
///
/// - `slab` must come from [`create`] and be unlinked from every list of its pool.
/// - No block of it may be live or in a thread cache, and no walker may be reading it.
pub(crate) unsafe fn destroy(slab: NonNull<SlabHeader>) {
    let base = slab.cast::<u8>();
    registry::remove(base.as_ptr().addr());
    // SAFETY: the caller guarantees nothing refers to the slab any more; the tracking
    // table pointer is read before the header goes away.
    let tracking = unsafe { (*slab.as_ptr()).tracking.load(Ordering::Acquire) };
    // SAFETY: the caller guarantees exclusive access.
    let class = unsafe { (*slab.as_ptr()).class };
    if let Some(table) = NonNull::new(tracking) {
        let (len, align) = crate::track::table_size(class);
        // SAFETY: the table was mapped by `track::table_for` with this size.
        unsafe { sys::unmap(table.cast(), len, align) };
    }
    // SAFETY: the slab was mapped by `create` with these arguments.
    unsafe { sys::unmap(base, SLAB_SIZE, SLAB_SIZE) };
}

/// The slab holding `pointer`, if it lies in a registered slab. The returned pointer
/// carries the slab's own provenance, not `pointer`'s.
#[inline(always)]
pub(crate) fn containing(pointer: *const u8) -> Option<NonNull<SlabHeader>> {
    registry::get(pointer.addr() & !(SLAB_SIZE - 1))
}

/// `pointer`'s address with the provenance of `slab`, which covers the whole slab (guard
/// bytes and headers included) where a caller's pointer may cover only its own bytes.
#[inline(always)]
pub(crate) fn with_slab_provenance(slab: NonNull<SlabHeader>, pointer: NonNull<u8>) -> NonNull<u8> {
    slab.cast::<u8>().with_addr(pointer.addr())
}

/// The slab of a block known to lie in one of our slabs (no registry lookup).
#[inline(always)]
pub(crate) fn base_of(block: NonNull<u8>) -> NonNull<SlabHeader> {
    let base = block
        .as_ptr()
        .map_addr(|address| address & !(SLAB_SIZE - 1))
        .cast::<SlabHeader>();
    // Only a pointer below SLAB_SIZE masks to null, and no slab lies there; the dangling
    // fallback keeps this function total without being reachable for real blocks.
    NonNull::new(base).unwrap_or(NonNull::dangling())
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

/// Where a pointer sits in a slab.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Position {
    /// At the start of block `index`.
    BlockStart(usize),
    /// Inside the header, inside a block, or in the unused tail.
    NotBlockStart,
}

/// Locates `pointer` in `slab` of class geometry `geometry`.
#[inline(always)]
pub(crate) fn position(
    slab: NonNull<SlabHeader>,
    geometry: &Geometry,
    pointer: *const u8,
) -> Position {
    let offset = pointer.addr().wrapping_sub(slab.as_ptr().addr());
    let Some(from_first) = offset.checked_sub(geometry.first_block) else {
        return Position::NotBlockStart;
    };
    if from_first & (geometry.block_size - 1) != 0 {
        return Position::NotBlockStart;
    }
    let index = from_first >> geometry.block_shift;
    if index >= geometry.block_count {
        return Position::NotBlockStart;
    }
    Position::BlockStart(index)
}

/// The registry of slab addresses.
mod registry {
    use super::*;

    /// Address bits covered; addresses above are never slabs (the kernel hands out
    /// user addresses below 2^47 unless asked otherwise).
    const ADDRESS_BITS: u32 = 48;
    const LEAF_BITS: u32 = 16;
    const ROOT_BITS: u32 = ADDRESS_BITS - SLAB_SHIFT - LEAF_BITS;
    const LEAF_LEN: usize = 1 << LEAF_BITS;
    /// Bytes of one leaf: one slab pointer per slab number (mapped lazily, so only the
    /// touched pages cost memory).
    const LEAF_BYTES: usize = LEAF_LEN * size_of::<AtomicPtr<SlabHeader>>();

    /// Root of the table: lazily mapped leaves holding, per slab number, the slab's own
    /// pointer (or null). Handing out the stored pointer rather than one derived from the
    /// caller's means every header and block access carries the slab's provenance: a
    /// pointer given to `dealloc` by a `Box` may only reach that box's bytes.
    static ROOT: [AtomicPtr<AtomicPtr<SlabHeader>>; 1 << ROOT_BITS] =
        [const { AtomicPtr::new(ptr::null_mut()) }; 1 << ROOT_BITS];

    fn split(base: usize) -> Option<(usize, usize)> {
        if base >> ADDRESS_BITS != 0 {
            return None;
        }
        let slab_number = base >> SLAB_SHIFT;
        Some((slab_number >> LEAF_BITS, slab_number & (LEAF_LEN - 1)))
    }

    fn leaf_entry(
        leaf: *mut AtomicPtr<SlabHeader>,
        index: usize,
    ) -> &'static AtomicPtr<SlabHeader> {
        // SAFETY: leaves hold LEAF_LEN entries, are mapped zeroed (null entries), never
        // unmapped, and only accessed atomically; `index < LEAF_LEN` by `split`.
        unsafe { &*leaf.add(index) }
    }

    pub(super) fn insert(slab: NonNull<SlabHeader>) -> bool {
        let Some((root_index, leaf_index)) = split(slab.as_ptr().addr()) else {
            return false;
        };
        let root_slot = &ROOT[root_index];
        let mut leaf = root_slot.load(Ordering::Acquire);
        if leaf.is_null() {
            let Some(fresh) = sys::map_zeroed(LEAF_BYTES, sys::PAGE_SIZE) else {
                return false;
            };
            let fresh = fresh.cast::<AtomicPtr<SlabHeader>>().as_ptr();
            match root_slot.compare_exchange(
                ptr::null_mut(),
                fresh,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => leaf = fresh,
                Err(winner) => {
                    if let Some(fresh) = NonNull::new(fresh) {
                        // SAFETY: `fresh` was mapped just above with these arguments
                        // and lost the race, so nobody else ever saw it.
                        unsafe { sys::unmap(fresh.cast(), LEAF_BYTES, sys::PAGE_SIZE) };
                    }
                    leaf = winner;
                }
            }
        }
        leaf_entry(leaf, leaf_index).store(slab.as_ptr(), Ordering::Release);
        true
    }

    pub(super) fn remove(base: usize) {
        if let Some((root_index, leaf_index)) = split(base) {
            let leaf = ROOT[root_index].load(Ordering::Acquire);
            if !leaf.is_null() {
                leaf_entry(leaf, leaf_index).store(ptr::null_mut(), Ordering::Release);
            }
        }
    }

    /// The registered slab starting at `base`, with the slab's own provenance.
    #[inline(always)]
    pub(super) fn get(base: usize) -> Option<NonNull<SlabHeader>> {
        let (root_index, leaf_index) = split(base)?;
        let leaf = ROOT[root_index].load(Ordering::Acquire);
        if leaf.is_null() {
            return None;
        }
        NonNull::new(leaf_entry(leaf, leaf_index).load(Ordering::Acquire))
    }
}
