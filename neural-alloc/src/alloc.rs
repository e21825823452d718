//! The allocation, free and reallocation paths of one instance, with their checks.

use std::alloc::Layout;
use std::panic::Location;
use std::ptr::{self, NonNull};
use std::sync::atomic::Ordering;

use crate::cache::{self, batch_len, cache_capacity};
use crate::class::{
    CLASS_COUNT, GEOMETRY, GUARD_LEN, Geometry, SLAB_SIZE, class_for, class_for_layout,
};
use crate::error::AllocError;
use crate::large::LargeHeader;
use crate::report::{CorruptionKind, CorruptionReport};
use crate::slab::{self, Position, SlabHeader, word};
use crate::state::{State, action_of, fast, flag};
use crate::track::{self, HistoryEntry, HistoryEvent, TrackRecord};

/// A call site as captured by `#[track_caller]`, or none (the `GlobalAlloc` adapter).
pub(crate) type Site = Option<&'static Location<'static>>;

/// Written after each allocation. Its bytes all differ, so a stray write of any single
/// byte value changes it.
pub(crate) const GUARD_PATTERN: [u8; GUARD_LEN] = [0xf1, 0x3c, 0xa7, 0x5e, 0x92, 0x0d, 0xc8, 0x6b];

/// Fills freed blocks when poisoning is on.
pub(crate) const POISON_BYTE: u8 = 0xdd;

/// Index of the counters of the system-allocator path.
pub(crate) const LARGE: usize = CLASS_COUNT;

/// A live pooled block found from a caller's pointer.
struct LiveBlock {
    /// The block's address with the slab's provenance (see `slab::with_slab_provenance`).
    block: NonNull<u8>,
    slab: NonNull<SlabHeader>,
    index: usize,
    word: u32,
    class: usize,
}

/// Why a pointer is not a live pooled block.
enum NotLive {
    /// Not in any slab: maybe a large block.
    Unpooled,
    /// In a slab but wrong; report this. Carries the slab, index and state word when
    /// the pointer is a block start, so the report can name the block's sites.
    Bad(CorruptionKind, Option<(NonNull<SlabHeader>, usize, u32)>),
}

/// What the tracking record of a bad block says.
#[derive(Clone, Copy)]
struct LiveBlockSites {
    size: Option<usize>,
    allocated_at: Site,
    freed_at: Site,
}

/// Index of a block known to be the start of a block of a slab of `geometry`.
#[inline(always)]
fn block_index(geometry: &Geometry, block: NonNull<u8>) -> usize {
    ((block.addr().get() & (SLAB_SIZE - 1)) - geometry.first_block) >> geometry.block_shift
}

/// Whether the guard after `size` bytes of `block` is intact.
///
/// # Safety
///
/// - `block` must point to at least `size + GUARD_LEN` bytes of allocator memory.
#[inline]
unsafe fn guard_intact(block: NonNull<u8>, size: usize) -> bool {
    // SAFETY: the caller guarantees the guard bytes are inside the block.
    let guard = unsafe { block.add(size).cast::<[u8; GUARD_LEN]>().read_unaligned() };
    guard == GUARD_PATTERN
}

/// Writes the guard after `size` bytes of `block`.
///
/// # Safety
///
/// - As for [`guard_intact`], and the bytes must not be in use by anyone.
#[inline]
unsafe fn write_guard(block: NonNull<u8>, size: usize) {
    // SAFETY: the caller guarantees the bytes are inside the block and unused.
    unsafe {
        block
            .add(size)
            .cast::<[u8; GUARD_LEN]>()
            .write_unaligned(GUARD_PATTERN)
    };
}

fn sites_of(record: Option<&TrackRecord>, word: u32, size: Option<usize>) -> LiveBlockSites {
    let record = record.filter(|_| word & word::TRACKED != 0);
    LiveBlockSites {
        size,
        allocated_at: record.and_then(TrackRecord::alloc_site),
        freed_at: record.and_then(TrackRecord::free_site),
    }
}

impl State {
    /// Files a corruption report and returns the error for the caller.
    #[cold]
    #[inline(never)]
    fn corrupt(
        &self,
        kind: CorruptionKind,
        address: usize,
        sites: Option<LiveBlockSites>,
        detected_at: Site,
    ) -> AllocError {
        let report = CorruptionReport {
            kind,
            address,
            size: sites.and_then(|sites| sites.size),
            allocated_at: sites.and_then(|sites| sites.allocated_at),
            freed_at: sites.and_then(|sites| sites.freed_at),
            detected_at,
        };
        self.reports
            .file(report, action_of(self.flags.load(Ordering::Relaxed)));
        AllocError::Corruption { kind, address }
    }

    /// Allocates `size` bytes aligned to `align` (a power of two).
    #[inline]
    pub(crate) fn allocate(
        &self,
        size: usize,
        align: usize,
        site: Site,
    ) -> Result<NonNull<u8>, AllocError> {
        let cached = Layout::from_size_align(size, align)
            .ok()
            .and_then(|layout| try_allocate_cached(self.fast_word(), layout));
        match cached {
            Some(block) => Ok(block),
            None => self.allocate_uncached(size, align, site),
        }
    }

    /// Allocates when the hit path cannot: large requests, tracking or poisoning on, an
    /// empty thread cache, a thread without caching.
    #[inline(never)]
    pub(crate) fn allocate_uncached(
        &self,
        size: usize,
        align: usize,
        site: Site,
    ) -> Result<NonNull<u8>, AllocError> {
        let flags = self.flags.load(Ordering::Relaxed);
        match class_for(size, align) {
            Some(class) => self.allocate_pooled(class, size, align, flags, site),
            None => self.allocate_large(size, align, flags, site),
        }
    }

    #[inline(always)]
    fn allocate_pooled(
        &self,
        class: usize,
        size: usize,
        align: usize,
        flags: u32,
        site: Site,
    ) -> Result<NonNull<u8>, AllocError> {
        // SAFETY: the reference is used only within this call, on this thread.
        let cached = unsafe { cache::current_slot(self.slot) }.map(|slot| {
            let class_cache = &slot.classes[class];
            self.publish_if_due(class, class_cache);
            if class_cache.head.get().is_null() && !class_cache.restock() {
                self.refill_cache(class, class_cache)?;
            }
            class_cache.pop_allocation(size, GEOMETRY[class].link)
        });
        let block = match cached {
            Some(Some(block)) => block,
            // The arena is full (or could not be reserved): the system allocator serves
            // the request instead, tracked like a large one.
            Some(None) => return self.allocate_large(size, align, flags, site),
            None => match self.refill(class, 1) {
                Some((block, _)) => {
                    self.count(class, 1, 0, size as u64, 0);
                    block
                }
                None => return self.allocate_large(size, align, flags, site),
            },
        };
        // SAFETY: the block was just taken from this instance's pool of `class`, so it
        // is a free block of a live slab, and it is ours alone.
        unsafe { self.prepare_block(class, block, size, flags, site) };
        Ok(block)
    }

    /// Refills an empty thread cache from the shared pool; `None` when the system is out
    /// of memory.
    #[cold]
    #[inline(never)]
    fn refill_cache(&self, class: usize, class_cache: &cache::ClassCache) -> Option<()> {
        class_cache
            .cache_misses
            .set(class_cache.cache_misses.get() + 1);
        let (chain, count) = self.refill(class, batch_len(class))?;
        class_cache.head.set(chain.as_ptr());
        class_cache.set_len(count);
        Some(())
    }

    /// Checks the poison of a reused block, writes the guard and the tracking record, and
    /// marks the block live.
    ///
    /// # Safety
    ///
    /// - `block` must be a free block of a live slab of `class` of this instance, owned
    ///   by the caller.
    #[inline(always)]
    unsafe fn prepare_block(
        &self,
        class: usize,
        block: NonNull<u8>,
        size: usize,
        flags: u32,
        site: Site,
    ) {
        // SAFETY: as required of our caller.
        let slab = unsafe { slab::base_of(block) };
        let index = block_index(&GEOMETRY[class], block);
        let mut bits = 0;
        if flags & (flag::POISON | flag::TRACKING) != 0 {
            // SAFETY: as required of our caller.
            bits = unsafe { self.prepare_checked(slab, index, block, size, flags, site) };
        }
        // SAFETY: as required of our caller; `index` is the block's index in `slab`.
        unsafe { mark_live(slab, index, block, size, flags & flag::GUARD != 0, bits) };
    }

    /// The slower part of handing out a block: the poison check and tracking. Returns
    /// the state word bits to add.
    ///
    /// # Safety
    ///
    /// - As for [`Self::prepare_block`]; `index` must be the block's index in `slab`.
    #[inline(never)]
    unsafe fn prepare_checked(
        &self,
        slab: NonNull<SlabHeader>,
        index: usize,
        block: NonNull<u8>,
        size: usize,
        flags: u32,
        site: Site,
    ) -> u32 {
        // SAFETY: live slab, index in range.
        let old = unsafe { slab::state_word(slab, index) }.load(Ordering::Relaxed);
        // SAFETY: `class` never changes after slab creation.
        let geometry = &GEOMETRY[unsafe { (*slab.as_ptr()).class }];
        if old & word::POISONED != 0 && flags & flag::POISON != 0 {
            // SAFETY: the block spans `block_size` bytes and is ours; its last word
            // held the free-list link and is skipped.
            let intact = unsafe { std::slice::from_raw_parts(block.as_ptr(), geometry.link) }
                .iter()
                .all(|&byte| byte == POISON_BYTE);
            if !intact {
                // SAFETY: live slab, index in range.
                let record = unsafe { track::existing_record(slab, index) };
                let sites = sites_of(record, old, Some((old & word::SIZE_MASK) as usize));
                self.corrupt(
                    CorruptionKind::UseAfterFree,
                    block.as_ptr().addr(),
                    Some(sites),
                    site,
                );
            }
        }
        let mut bits = 0;
        if flags & flag::POISON != 0 {
            bits |= word::POISON_ON_FREE;
        }
        if flags & flag::TRACKING != 0 {
            if cache::is_reentrant() {
                bits |= word::INTERNAL;
            // SAFETY: live slab, index in range.
            } else if let Some(record) = unsafe { track::record_for(slab, index) } {
                let stamp = (track::now_nanos(), cache::thread_id());
                record.on_allocate(site, flags & flag::BACKTRACES != 0, stamp.0, stamp.1);
                bits |= word::TRACKED;
                self.remember(HistoryEvent::Allocate, block, size, site, Some(stamp));
            }
        }
        bits
    }

    /// Appends to the history; `stamp` is the time and thread when the caller already
    /// read them for the block's record.
    fn remember(
        &self,
        event: HistoryEvent,
        block: NonNull<u8>,
        size: usize,
        site: Site,
        stamp: Option<(u64, u64)>,
    ) {
        let (nanos, thread) = stamp.unwrap_or_else(|| (track::now_nanos(), cache::thread_id()));
        self.history.push(HistoryEntry {
            event,
            address: block.as_ptr().addr(),
            size,
            site,
            nanos,
            thread,
        });
    }

    fn allocate_large(
        &self,
        size: usize,
        align: usize,
        flags: u32,
        site: Site,
    ) -> Result<NonNull<u8>, AllocError> {
        let tracked = flags & flag::TRACKING != 0 && !cache::is_reentrant();
        let mut flag_bits = word::LIVE;
        if flags & flag::GUARD != 0 {
            flag_bits |= word::GUARDED;
        }
        if flags & flag::TRACKING != 0 {
            flag_bits |= if tracked {
                word::TRACKED
            } else {
                word::INTERNAL
            };
        }
        let header = self.large.allocate(size, align, GUARD_LEN, flag_bits)?;
        let block = LargeHeader::user_pointer(header);
        if flags & flag::GUARD != 0 {
            // SAFETY: the allocation holds `size + GUARD_LEN` bytes after the header.
            unsafe { write_guard(block, size) };
        }
        if tracked {
            let stamp = (track::now_nanos(), cache::thread_id());
            // SAFETY: the header is live and not yet shared.
            let record = unsafe { &(*header.as_ptr()).record };
            record.on_allocate(site, flags & flag::BACKTRACES != 0, stamp.0, stamp.1);
            self.remember(HistoryEvent::Allocate, block, size, site, Some(stamp));
        }
        self.large.insert(header);
        self.count(LARGE, 1, 0, size as u64, 0);
        Ok(block)
    }

    /// Finds the live pooled block starting at `pointer`.
    #[inline]
    fn find_live(&self, pointer: NonNull<u8>) -> Result<LiveBlock, NotLive> {
        let Some(slab) = slab::containing(pointer.as_ptr()) else {
            return Err(NotLive::Unpooled);
        };
        // SAFETY: `slab` came from `containing`.
        let identity = unsafe { slab::identity_of(slab) };
        let Some((owner, class)) = slab::identity_parts(identity) else {
            return Err(NotLive::Bad(CorruptionKind::InvalidFree, None));
        };
        if owner != self.id || class >= CLASS_COUNT {
            return Err(NotLive::Bad(CorruptionKind::InvalidFree, None));
        }
        let geometry = &GEOMETRY[class];
        let Position::BlockStart(index) = slab::position(slab, geometry, pointer.as_ptr()) else {
            return Err(NotLive::Bad(CorruptionKind::InvalidFree, None));
        };
        // SAFETY: live slab, index in range as checked by `position`.
        let block_word = unsafe { slab::state_word(slab, index) }.load(Ordering::Acquire);
        match block_word & word::STATE_MASK {
            word::LIVE => Ok(LiveBlock {
                block: slab::with_slab_provenance(slab, pointer),
                slab,
                index,
                word: block_word,
                class,
            }),
            word::FREE => Err(NotLive::Bad(
                CorruptionKind::DoubleFree,
                Some((slab, index, block_word)),
            )),
            _ => Err(NotLive::Bad(CorruptionKind::InvalidFree, None)),
        }
    }

    /// Reports a pointer that is not a live block, naming the block's sites if it is one.
    #[cold]
    #[inline(never)]
    fn reject(
        &self,
        kind: CorruptionKind,
        block: Option<(NonNull<SlabHeader>, usize, u32)>,
        pointer: NonNull<u8>,
        site: Site,
    ) -> AllocError {
        let sites = block.map(|(slab, index, block_word)| {
            // SAFETY: `find_live` only passes live slabs and in-range indexes.
            let record = unsafe { track::existing_record(slab, index) };
            sites_of(
                record,
                block_word,
                Some((block_word & word::SIZE_MASK) as usize),
            )
        });
        self.corrupt(kind, pointer.as_ptr().addr(), sites, site)
    }

    /// Reports damaged guard bytes of a block that is still ours.
    #[cold]
    #[inline(never)]
    fn report_overflow(
        &self,
        slab: NonNull<SlabHeader>,
        index: usize,
        block_word: u32,
        pointer: NonNull<u8>,
        site: Site,
    ) {
        // SAFETY: callers pass a live slab and an in-range index.
        let record = unsafe { track::existing_record(slab, index) };
        let sites = sites_of(
            record,
            block_word,
            Some((block_word & word::SIZE_MASK) as usize),
        );
        let _ = self.corrupt(
            CorruptionKind::GuardOverwritten,
            pointer.as_ptr().addr(),
            Some(sites),
            site,
        );
    }

    /// Frees `pointer`, which the caller says was allocated with `size` and `align`.
    #[inline]
    pub(crate) fn deallocate(
        &self,
        pointer: NonNull<u8>,
        size: usize,
        align: usize,
        site: Site,
    ) -> Result<(), AllocError> {
        if let Ok(layout) = Layout::from_size_align(size, align)
            && try_deallocate_cached(self.fast_word(), pointer.as_ptr(), layout)
        {
            return Ok(());
        }
        self.deallocate_checked(pointer, site)
    }

    /// Frees `pointer` with every check and bookkeeping step.
    #[inline(never)]
    pub(crate) fn deallocate_checked(
        &self,
        pointer: NonNull<u8>,
        site: Site,
    ) -> Result<(), AllocError> {
        let user = pointer;
        let LiveBlock {
            block: pointer,
            slab,
            index,
            word: old_word,
            class,
        } = match self.find_live(pointer) {
            Ok(block) => block,
            Err(NotLive::Unpooled) => return self.deallocate_large(pointer, site),
            Err(NotLive::Bad(kind, block)) => return Err(self.reject(kind, block, pointer, site)),
        };
        let size = (old_word & word::SIZE_MASK) as usize;
        // SAFETY: a live block of this instance: `pointer` is its start, `size` its
        // requested size, and the guard lies inside it.
        if old_word & word::GUARDED != 0 && !unsafe { guard_intact(pointer, size) } {
            // The block is still ours: report, then free it as usual.
            self.report_overflow(slab, index, old_word, pointer, site);
        }
        let mut new_word = word::FREE | (old_word & word::SIZE_MASK);
        if old_word & (word::TRACKED | word::POISON_ON_FREE) != 0 {
            new_word |= self.free_tracked_or_poisoned(slab, index, old_word, pointer, user, site);
        }
        // SAFETY: live slab, index in range.
        unsafe { slab::state_word(slab, index) }.store(new_word, Ordering::Release);
        self.give_back(class, pointer, size);
        Ok(())
    }

    /// The slower part of a free: recording the free site and poisoning. Returns the
    /// state word bits to add.
    #[inline(never)]
    fn free_tracked_or_poisoned(
        &self,
        slab: NonNull<SlabHeader>,
        index: usize,
        old_word: u32,
        pointer: NonNull<u8>,
        user: NonNull<u8>,
        site: Site,
    ) -> u32 {
        let mut bits = 0;
        if old_word & word::TRACKED != 0 {
            // SAFETY: live slab, index in range.
            if let Some(record) = unsafe { track::existing_record(slab, index) } {
                track::store_site(&record.free_site, site);
                bits |= word::TRACKED;
                self.remember(
                    HistoryEvent::Free,
                    pointer,
                    (old_word & word::SIZE_MASK) as usize,
                    site,
                    None,
                );
            }
        }
        if old_word & word::POISON_ON_FREE != 0 {
            let size = (old_word & word::SIZE_MASK) as usize;
            // The caller's bytes are written through the caller's pointer (its owner, a
            // Box for instance, may still hold a borrow of them while it is freed), the
            // rest of the block through the slab's.
            // SAFETY: `class` never changes after slab creation.
            let block_size = GEOMETRY[unsafe { (*slab.as_ptr()).class }].block_size;
            // SAFETY: the block is being freed by its owner, so all its bytes are ours.
            unsafe {
                user.as_ptr().write_bytes(POISON_BYTE, size);
                pointer
                    .as_ptr()
                    .add(size)
                    .write_bytes(POISON_BYTE, block_size - size);
            }
            bits |= word::POISONED;
        }
        bits
    }

    /// Moves a full hot list of a thread cache behind, sending the cold list it replaces
    /// back to the shared pool.
    #[cold]
    #[inline(never)]
    fn spill(&self, class: usize, class_cache: &cache::ClassCache) {
        let (chain, count) = class_cache.spill();
        if count > 0 {
            // SAFETY: the cold list held free blocks of this instance's `class` pool
            // that the thread's cache owned, linked and ending in null.
            unsafe { self.take_back(class, chain, count) };
        }
    }

    /// Puts a freed block (with the slab's provenance) into this thread's cache, or the
    /// shared pool without one.
    #[inline(always)]
    fn give_back(&self, class: usize, block: NonNull<u8>, size: usize) {
        // SAFETY: the reference is used only within this call, on this thread.
        if let Some(slot) = unsafe { cache::current_slot(self.slot) } {
            let class_cache = &slot.classes[class];
            self.publish_if_due(class, class_cache);
            if !class_cache.has_room() {
                self.spill(class, class_cache);
            }
            // SAFETY: the block was just marked free and belongs to this instance's
            // `class` pool, with the slab's provenance.
            unsafe { class_cache.push_free(block, size, GEOMETRY[class].link) };
        } else {
            // SAFETY: a free block of this pool that we own, with the slab's provenance.
            unsafe { self.take_back_one(class, block) };
            self.count(class, 0, 1, 0, size as u64);
        }
    }

    fn deallocate_large(&self, pointer: NonNull<u8>, site: Site) -> Result<(), AllocError> {
        let address = pointer.as_ptr().addr();
        let Some(header) = self.large.remove(address) else {
            return Err(self.corrupt(CorruptionKind::InvalidFree, address, None, site));
        };
        let block = LargeHeader::user_pointer(header);
        // SAFETY: the header was just unlinked by us, so it is live and ours.
        let (size, header_word, record) = unsafe {
            let header = &*header.as_ptr();
            (
                header.size,
                header.word.load(Ordering::Relaxed),
                &header.record,
            )
        };
        // SAFETY: the block holds `size + GUARD_LEN` bytes.
        if header_word & word::GUARDED != 0 && !unsafe { guard_intact(block, size) } {
            let sites = sites_of(Some(record), header_word, Some(size));
            let _ = self.corrupt(CorruptionKind::GuardOverwritten, address, Some(sites), site);
        }
        if header_word & word::TRACKED != 0 {
            self.remember(HistoryEvent::Free, block, size, site, None);
        }
        self.count(LARGE, 0, 1, 0, size as u64);
        // SAFETY: unlinked above, never used again.
        unsafe { self.large.retire(header) };
        Ok(())
    }

    /// Resizes the block at `pointer` to `new_size` bytes at alignment `align`, in place
    /// when the block's class still fits, else by moving it.
    pub(crate) fn reallocate(
        &self,
        pointer: NonNull<u8>,
        new_size: usize,
        align: usize,
        site: Site,
    ) -> Result<NonNull<u8>, AllocError> {
        let flags = self.flags.load(Ordering::Relaxed);
        let old_size = match self.find_live(pointer) {
            Ok(LiveBlock {
                block: pointer,
                slab,
                index,
                word: old_word,
                class,
            }) => {
                let old_size = (old_word & word::SIZE_MASK) as usize;
                if class_for(new_size, align) == Some(class) {
                    // SAFETY: live block of ours with its guard inside it.
                    if old_word & word::GUARDED != 0 && !unsafe { guard_intact(pointer, old_size) }
                    {
                        // SAFETY: live slab, index in range.
                        let record = unsafe { track::existing_record(slab, index) };
                        let sites = sites_of(record, old_word, Some(old_size));
                        let _ = self.corrupt(
                            CorruptionKind::GuardOverwritten,
                            pointer.as_ptr().addr(),
                            Some(sites),
                            site,
                        );
                    }
                    let mut new_word =
                        (old_word & !word::SIZE_MASK & !word::GUARDED) | new_size as u32;
                    if flags & flag::GUARD != 0 {
                        // SAFETY: the class fits `new_size + GUARD_LEN`; the bytes past
                        // the new size are not the caller's any more.
                        unsafe { write_guard(pointer, new_size) };
                        new_word |= word::GUARDED;
                    }
                    // SAFETY: live slab, index in range.
                    unsafe { slab::state_word(slab, index) }.store(new_word, Ordering::Release);
                    self.count(class, 0, 0, new_size as u64, old_size as u64);
                    return Ok(pointer);
                }
                old_size
            }
            Err(NotLive::Unpooled) => match self.large.size_of(pointer.as_ptr().addr()) {
                Some(size) => size,
                None => {
                    return Err(self.corrupt(
                        CorruptionKind::InvalidFree,
                        pointer.as_ptr().addr(),
                        None,
                        site,
                    ));
                }
            },
            Err(NotLive::Bad(kind, sites)) => {
                return Err(self.reject(kind, sites, pointer, site));
            }
        };
        let moved = self.allocate(new_size, align, site)?;
        // SAFETY: both blocks are live, distinct, and hold at least the copied length.
        unsafe {
            ptr::copy_nonoverlapping(pointer.as_ptr(), moved.as_ptr(), old_size.min(new_size))
        };
        self.deallocate(pointer, old_size, align, site)?;
        Ok(moved)
    }

    /// Fills this thread's cache of the class serving `size` with up to `count` blocks
    /// (at most two batches); returns how many it holds.
    pub(crate) fn warm(&self, size: usize, count: usize) -> usize {
        let Some(class) = class_for(size, 1) else {
            return 0;
        };
        let want = count.min(cache_capacity(class));
        // SAFETY: the reference is used only within this call, on this thread.
        unsafe { cache::current_slot(self.slot) }
            .map(|slot| {
                let class_cache = &slot.classes[class];
                let want_hot = want.min(batch_len(class));
                while class_cache.len() < want_hot {
                    let Some((chain, taken)) = self.refill(class, want_hot - class_cache.len())
                    else {
                        break;
                    };
                    // Append the existing list after the new chain's tail.
                    let link = GEOMETRY[class].link;
                    let mut tail = chain;
                    // SAFETY: `chain` holds `taken` linked free blocks of `class` owned by
                    // us, with the slab's provenance.
                    unsafe {
                        while let Some(next) = NonNull::new(slab::next_of(tail, link)) {
                            tail = next;
                        }
                        slab::set_next(tail, link, class_cache.head.get());
                    }
                    class_cache.head.set(chain.as_ptr());
                    class_cache.set_len(class_cache.len() + taken);
                }
                // A second batch goes on the cold list, behind a full hot one.
                if want > want_hot
                    && class_cache.len() == want_hot
                    && class_cache.cached() == want_hot
                    && let Some((chain, taken)) = self.refill(class, want - want_hot)
                {
                    class_cache.set_cold(chain.as_ptr(), taken);
                }
                class_cache.cached()
            })
            .unwrap_or(0)
    }
}

/// The hit path of an allocation, for an instance whose fast word is `fast`: a pooled
/// size, tracking and poisoning off (one bit of the fast word), and a block in this
/// thread's cache. Changes nothing when it returns `None`; the caller then takes
/// [`State::allocate_uncached`].
///
/// Nothing here can panic, so the `GlobalAlloc` adapter calls it without its unwind
/// guard, and nothing here reads the instance's state: only the fast word, this
/// thread's cache and the block's slab.
#[inline(always)]
pub(crate) fn try_allocate_cached(fast: u32, layout: Layout) -> Option<NonNull<u8>> {
    if fast & fast::ALLOCATE == 0 {
        return None;
    }
    let class = class_for_layout(layout)?;
    let size = layout.size();
    // SAFETY: the reference is used only within this call, on this thread.
    let class_cache = unsafe { cache::class_cache(fast::slot(fast), class) }?;
    let geometry = &GEOMETRY[class];
    let block = class_cache.pop_allocation(size, geometry.link)?;
    // SAFETY: blocks in a cache lie in slabs of the arena, with its provenance.
    let slab = unsafe { slab::base_of(block) };
    let index = block_index(geometry, block);
    // SAFETY: the block came from this thread's cache of `class`, so it is a free block
    // of a live slab that is ours alone, at `index`; `class` fits `size`.
    unsafe { mark_live(slab, index, block, size, fast & fast::GUARD != 0, 0) };
    Some(block)
}

/// Writes the guard after `size` bytes of `block` when `guard` says so, and marks the
/// block live with `size`, the guard bit and `bits` in its state word.
///
/// # Safety
///
/// - `block` must be block `index` of the live slab `slab`, free and owned by the
///   caller, of a class whose blocks hold `size + GUARD_LEN` bytes.
#[inline(always)]
unsafe fn mark_live(
    slab: NonNull<SlabHeader>,
    index: usize,
    block: NonNull<u8>,
    size: usize,
    guard: bool,
    bits: u32,
) {
    let mut new_word = word::LIVE | size as u32 | bits;
    if guard {
        // SAFETY: as required of our caller, the guard bytes lie inside the block.
        unsafe { write_guard(block, size) };
        new_word |= word::GUARDED;
    }
    // SAFETY: a block of a live slab, so its index is in range.
    unsafe { slab::state_word(slab, index) }.store(new_word, Ordering::Release);
}

/// The hit path of a free, for an instance whose fast word is `fast`, of a block the
/// caller says it allocated with `size` and `align`: the pointer is the start of a
/// live, untracked block of this instance's slab of the class that layout selects, of
/// exactly that size, not to be poisoned, with its guard intact (one word compared),
/// and this thread's cache of the class has room. Returns `false` without changing
/// anything otherwise; the caller then takes [`State::deallocate_checked`], which
/// ignores the caller's layout, repeats every check and reports what is wrong. An
/// instance without hit paths has number zero in `fast`, which no slab names, so its
/// frees all go that way.
///
/// Everything it reads is found from the pointer and the layout alone, so the reads
/// do not wait on each other. The pointer may be null: null is outside the arena.
///
/// Nothing here can panic, so the `GlobalAlloc` adapter calls it without its unwind
/// guard.
#[inline(always)]
pub(crate) fn try_deallocate_cached(fast: u32, pointer: *mut u8, layout: Layout) -> bool {
    let Some(class) = class_for_layout(layout) else {
        return false;
    };
    let size = layout.size();
    let Some(slab) = slab::containing(pointer) else {
        return false;
    };
    // SAFETY: an address inside the arena is not null.
    let pointer = unsafe { NonNull::new_unchecked(pointer) };
    let geometry = &GEOMETRY[class];
    let Position::BlockStart(index) = slab::position(slab, geometry, pointer.as_ptr()) else {
        return false;
    };
    // SAFETY: `slab` came from `containing`.
    if unsafe { slab::identity_of(slab) } != slab::identity(fast::owner(fast), class) {
        return false;
    }
    // SAFETY: a slab of this instance and `class`, index in range as checked by
    // `position`.
    let state_word = unsafe { slab::state_word(slab, index) };
    let old_word = state_word.load(Ordering::Acquire);
    // Live, of the caller's size, neither tracked nor to be poisoned, and guarded as
    // blocks are now (a block from before a settings change takes the checked path).
    let guarded = fast & fast::GUARD;
    if old_word != word::LIVE | guarded | size as u32 {
        return false;
    }
    // The caller's pointer may only reach its own bytes: the guard is read through
    // the slab's pointer, and the cache keeps that one.
    let block = slab::with_slab_provenance(slab, pointer);
    // SAFETY: a live block of ours of `size` requested bytes, so the guard after them
    // lies inside it.
    if guarded != 0 && !unsafe { guard_intact(block, size) } {
        return false;
    }
    // SAFETY: the reference is used only within this call, on this thread.
    let Some(class_cache) = (unsafe { cache::class_cache(fast::slot(fast), class) }) else {
        return false;
    };
    if !class_cache.has_room() {
        return false;
    }
    state_word.store(word::FREE | size as u32, Ordering::Release);
    // SAFETY: the block was just marked free and belongs to this instance's `class`
    // pool, and `block` has the slab's provenance.
    unsafe { class_cache.push_free(block, size, geometry.link) };
    true
}

/// Reads a guard for validation, which may race with the block being freed and reused.
///
/// # Safety
///
/// - `block + size + GUARD_LEN` must lie inside mapped allocator memory.
pub(crate) unsafe fn guard_intact_racy(block: NonNull<u8>, size: usize) -> bool {
    let mut guard = [0u8; GUARD_LEN];
    for (offset, byte) in guard.iter_mut().enumerate() {
        // SAFETY: the caller guarantees the bytes are mapped; a volatile read keeps the
        // compiler from assuming the value is stable, and callers recheck the block's
        // state word after reading to discard results the owner changed meanwhile.
        *byte = unsafe { block.add(size + offset).as_ptr().read_volatile() };
    }
    guard == GUARD_PATTERN
}
