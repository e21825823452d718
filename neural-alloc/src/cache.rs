//! Per-thread state: block caches per allocator instance and class, counters not yet
//! published to the shared statistics, the reentrancy flag and a small thread number.
//!
//! The thread-local holding all of this has a constant initialiser and no destructor, so
//! reading it never allocates nor registers anything. A second, zero-sized thread-local
//! with a destructor ([`ExitGuard`]) is touched once per thread, on the first cache
//! refill, with the cache switched off meanwhile: any allocation that registering the
//! destructor makes goes straight to the shared pool. At thread exit the guard flushes
//! every cache back to its pool and switches the cache off for good, so frees made by
//! later destructors also go to the shared pool.

use std::cell::Cell;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};

use crate::class::{CLASS_COUNT, CLASS_SIZES};
use crate::slab;
use crate::state::State;

/// Allocator instances that get thread caches; later instances work without them.
pub(crate) const MAX_SLOTS: usize = 32;

/// The instance owning each cache slot, for the exit flush.
pub(crate) static SLOT_OWNERS: [AtomicPtr<State>; MAX_SLOTS] =
    [const { AtomicPtr::new(ptr::null_mut()) }; MAX_SLOTS];

/// Blocks moved between a thread cache and the shared pool at once, per class: about
/// 32 KiB worth, between 4 and 64 blocks.
const BATCH_LEN: [usize; CLASS_COUNT] = {
    let mut table = [0; CLASS_COUNT];
    let mut class = 0;
    while class < CLASS_COUNT {
        let by_bytes = 32 * 1024 / CLASS_SIZES[class];
        table[class] = if by_bytes > 64 {
            64
        } else if by_bytes < 4 {
            4
        } else {
            by_bytes
        };
        class += 1;
    }
    table
};

/// Blocks moved between a thread cache and the shared pool at once.
#[inline(always)]
pub(crate) fn batch_len(class: usize) -> usize {
    BATCH_LEN[class]
}

/// Blocks a thread cache may hold for one class: a batch on each of its two lists.
#[inline(always)]
pub(crate) fn cache_capacity(class: usize) -> usize {
    2 * BATCH_LEN[class]
}

/// Cache mode: not yet set up on this thread.
const MODE_UNREGISTERED: u8 = 0;
/// Cache mode: exit destructor being registered; bypass the cache meanwhile.
const MODE_REGISTERING: u8 = 1;
/// Cache mode: in use.
const MODE_ACTIVE: u8 = 2;
/// Cache mode: the thread is exiting; bypass the cache from now on.
const MODE_EXITED: u8 = 3;

/// Intrusive singly linked lists of free blocks of one class (a hot list the hit paths
/// use, and a cold one behind it), their lengths, the room the thread may fill, and the
/// class's pending counters: a cache hit touches this one cache line and nothing else of
/// the thread's state.
///
/// `limit` is zero while the thread's caching is not active (before the exit flush is
/// registered, and from thread exit on), so a free never fills an inactive cache, and an
/// inactive cache is empty, so an allocation never takes from one: the hit paths need no
/// look at the thread's mode.
#[repr(align(64))]
pub(crate) struct ClassCache {
    pub(crate) head: Cell<*mut u8>,
    len: Cell<u16>,
    limit: Cell<u16>,
    /// Blocks in `cold`.
    cold_len: Cell<u16>,
    /// A second list, of at most one batch: what the hot list held when it last filled
    /// up. Moving a whole list between the two, or a cold list to the shared pool, needs
    /// no walk of its blocks.
    cold: Cell<*mut u8>,
    /// Allocations served through this cache since the last publish, and their bytes.
    allocations: Cell<u64>,
    bytes_allocated: Cell<u64>,
    /// Frees taken by this cache since the last publish, and their bytes.
    frees: Cell<u64>,
    bytes_freed: Cell<u64>,
    /// Allocations the cache could not serve (hits are allocations minus misses).
    pub(crate) cache_misses: Cell<u64>,
}

/// Counters of one class not yet added to the shared atomics.
pub(crate) struct Pending {
    pub(crate) allocations: u64,
    pub(crate) frees: u64,
    pub(crate) bytes_allocated: u64,
    pub(crate) bytes_freed: u64,
    pub(crate) cache_misses: u64,
}

impl ClassCache {
    const fn new() -> Self {
        Self {
            head: Cell::new(ptr::null_mut()),
            len: Cell::new(0),
            limit: Cell::new(0),
            cold_len: Cell::new(0),
            cold: Cell::new(ptr::null_mut()),
            allocations: Cell::new(0),
            bytes_allocated: Cell::new(0),
            frees: Cell::new(0),
            bytes_freed: Cell::new(0),
            cache_misses: Cell::new(0),
        }
    }

    /// Blocks on the hot list.
    #[inline(always)]
    pub(crate) fn len(&self) -> usize {
        usize::from(self.len.get())
    }

    /// Blocks on both lists.
    pub(crate) fn cached(&self) -> usize {
        self.len() + usize::from(self.cold_len.get())
    }

    /// Records that the hot list now holds `len` blocks (after moving a chain in or
    /// out); never more than one batch.
    pub(crate) fn set_len(&self, len: usize) {
        self.len.set(u16::try_from(len).unwrap_or(u16::MAX));
    }

    /// Makes the full hot list the cold one and returns the cold list it replaces (null
    /// and zero when there was none), which the caller sends to the shared pool.
    pub(crate) fn spill(&self) -> (*mut u8, usize) {
        let old = self.take_cold();
        self.cold.set(self.head.replace(ptr::null_mut()));
        self.cold_len.set(self.len.replace(0));
        old
    }

    /// Makes the cold list the hot one when the hot list is empty; returns whether it
    /// did.
    pub(crate) fn restock(&self) -> bool {
        if !self.head.get().is_null() || self.cold.get().is_null() {
            return false;
        }
        self.head.set(self.cold.replace(ptr::null_mut()));
        self.len.set(self.cold_len.replace(0));
        true
    }

    /// Detaches the cold list: its head (null when empty) and length.
    pub(crate) fn take_cold(&self) -> (*mut u8, usize) {
        (
            self.cold.replace(ptr::null_mut()),
            usize::from(self.cold_len.replace(0)),
        )
    }

    /// Installs `chain` of `len` blocks as the cold list, which must be empty.
    pub(crate) fn set_cold(&self, chain: *mut u8, len: usize) {
        self.cold.set(chain);
        self.cold_len.set(u16::try_from(len).unwrap_or(u16::MAX));
    }

    /// Whether a free may push one more block.
    #[inline(always)]
    pub(crate) fn has_room(&self) -> bool {
        self.len.get() < self.limit.get()
    }

    fn set_limit(&self, limit: usize) {
        self.limit.set(u16::try_from(limit).unwrap_or(u16::MAX));
    }

    /// Allocations plus frees counted since the last publish.
    pub(crate) fn pending_operations(&self) -> u64 {
        self.allocations.get() + self.frees.get()
    }

    /// Takes the pending counters, leaving zeros.
    pub(crate) fn take_pending(&self) -> Pending {
        Pending {
            allocations: self.allocations.replace(0),
            frees: self.frees.replace(0),
            bytes_allocated: self.bytes_allocated.replace(0),
            bytes_freed: self.bytes_freed.replace(0),
            cache_misses: self.cache_misses.replace(0),
        }
    }

    /// Pops a block for an allocation of `size` bytes and counts the allocation; `link`
    /// is the class's link offset.
    #[inline(always)]
    pub(crate) fn pop_allocation(&self, size: usize, link: usize) -> Option<NonNull<u8>> {
        let head = NonNull::new(self.head.get())?;
        // SAFETY: blocks on a cache list are free blocks of a live slab of the cache's
        // class, owned by this thread's cache, with the slab's provenance.
        let next = unsafe { slab::next_of(head, link) };
        self.head.set(next);
        self.len.set(self.len.get().wrapping_sub(1));
        self.allocations.set(self.allocations.get() + 1);
        self.bytes_allocated
            .set(self.bytes_allocated.get() + size as u64);
        Some(head)
    }

    /// Pushes a freed block of `size` requested bytes and counts the free; `link` is
    /// the class's link offset.
    ///
    /// # Safety
    ///
    /// - `block` must be a free block of a live slab of the cache's class, owned by
    ///   nobody else, with the slab's provenance.
    #[inline(always)]
    pub(crate) unsafe fn push_free(&self, block: NonNull<u8>, size: usize, link: usize) {
        // SAFETY: the caller hands the block over; its link word is never a caller's.
        unsafe { slab::set_next(block, link, self.head.get()) };
        self.head.set(block.as_ptr());
        self.len.set(self.len.get() + 1);
        self.frees.set(self.frees.get() + 1);
        self.bytes_freed.set(self.bytes_freed.get() + size as u64);
    }
}

/// One instance's caches on one thread.
pub(crate) struct SlotCache {
    pub(crate) classes: [ClassCache; CLASS_COUNT],
}

impl SlotCache {
    const fn new() -> Self {
        Self {
            classes: [const { ClassCache::new() }; CLASS_COUNT],
        }
    }
}

/// Everything a thread keeps for the allocator.
pub(crate) struct ThreadState {
    mode: Cell<u8>,
    reentrant: Cell<bool>,
    id: Cell<u64>,
    slots: [SlotCache; MAX_SLOTS],
}

impl ThreadState {
    const fn new() -> Self {
        Self {
            mode: Cell::new(MODE_UNREGISTERED),
            reentrant: Cell::new(false),
            id: Cell::new(0),
            slots: [const { SlotCache::new() }; MAX_SLOTS],
        }
    }
}

/// Flushes the thread's caches when the thread exits.
struct ExitGuard;

impl Drop for ExitGuard {
    fn drop(&mut self) {
        let _ = THREAD.try_with(|thread| {
            thread.mode.set(MODE_EXITED);
            set_limits(thread, false);
            for (slot, cache) in thread.slots.iter().enumerate() {
                let owner = SLOT_OWNERS[slot].load(Ordering::Acquire);
                // SAFETY: instance states are never freed once published in SLOT_OWNERS.
                if let Some(state) = unsafe { owner.as_ref() } {
                    state.flush_slot(cache);
                }
            }
        });
    }
}

thread_local! {
    static THREAD: ThreadState = const { ThreadState::new() };
    static EXIT_GUARD: ExitGuard = const { ExitGuard };
}

/// This thread's cache for `slot` when caching is usable, or `None` when the caller must
/// go to the shared pool instead.
///
/// # Safety
///
/// - The reference must not be kept beyond the caller's current call nor sent to
///   another thread (it names this thread's storage, which dies with the thread).
#[inline(always)]
pub(crate) unsafe fn current_slot<'a>(slot: usize) -> Option<&'a SlotCache> {
    let thread = THREAD.try_with(ptr::from_ref).ok()?;
    // SAFETY: THREAD has a constant initialiser and no destructor, so its storage stays
    // valid for the whole life of this thread; the caller keeps the reference on this
    // thread and within its call.
    let thread = unsafe { &*thread };
    let cache = thread.slots.get(slot)?;
    let usable = match thread.mode.get() {
        MODE_ACTIVE => true,
        MODE_UNREGISTERED => register_exit_guard(thread),
        _ => false,
    };
    usable.then_some(cache)
}

/// This thread's cache of `class` for `slot`, for the hit paths: one thread-local
/// access, no registration, no look at the thread's mode (see [`ClassCache`]). `None`
/// only when the thread-local is gone.
///
/// # Safety
///
/// - As for [`current_slot`].
#[inline(always)]
pub(crate) unsafe fn class_cache<'a>(slot: usize, class: usize) -> Option<&'a ClassCache> {
    let thread = THREAD.try_with(ptr::from_ref).ok()?;
    // SAFETY: as in `current_slot`.
    let thread = unsafe { &*thread };
    thread.slots[slot % MAX_SLOTS].classes.get(class)
}

/// Registers the exit flush on this thread's first cache use; returns whether caching
/// can be used. The cache is bypassed while registering, in case that allocates.
#[cold]
#[inline(never)]
fn register_exit_guard(thread: &ThreadState) -> bool {
    thread.mode.set(MODE_REGISTERING);
    let registered = EXIT_GUARD.try_with(|_| ()).is_ok();
    if registered {
        set_limits(thread, true);
        thread.mode.set(MODE_ACTIVE);
    } else {
        thread.mode.set(MODE_EXITED);
    }
    registered
}

/// Opens every cache of the thread up to its capacity, or closes them all.
fn set_limits(thread: &ThreadState, open: bool) {
    for cache in &thread.slots {
        for (class, class_cache) in cache.classes.iter().enumerate() {
            let limit = if open { batch_len(class) } else { 0 };
            class_cache.set_limit(limit);
        }
    }
}

/// Publishes this thread's pending counters of `slot` (used before reading statistics).
pub(crate) fn flush_deltas(state: &State, slot: usize) {
    let _ = THREAD.try_with(|thread| {
        if let Some(cache) = thread.slots.get(slot) {
            for class in 0..CLASS_COUNT {
                state.publish(class, &cache.classes[class]);
            }
        }
    });
}

/// Whether the current thread is inside allocator code that may allocate (building a
/// report); nested allocations are then not tracked.
#[inline]
pub(crate) fn is_reentrant() -> bool {
    THREAD
        .try_with(|thread| thread.reentrant.get())
        .unwrap_or(true)
}

/// Marks the current thread as inside allocator code until the returned guard drops.
pub(crate) fn enter() -> ReentrancyGuard {
    let previous = THREAD
        .try_with(|thread| thread.reentrant.replace(true))
        .unwrap_or(true);
    ReentrancyGuard { previous }
}

/// Restores the reentrancy flag on drop.
#[must_use]
pub(crate) struct ReentrancyGuard {
    previous: bool,
}

impl Drop for ReentrancyGuard {
    fn drop(&mut self) {
        let _ = THREAD.try_with(|thread| thread.reentrant.set(self.previous));
    }
}

/// A small number naming the current thread, assigned on first use.
pub(crate) fn thread_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    THREAD
        .try_with(|thread| {
            if thread.id.get() == 0 {
                thread.id.set(NEXT.fetch_add(1, Ordering::Relaxed));
            }
            thread.id.get()
        })
        .unwrap_or(0)
}

/// Detaches up to `count` blocks from the front of a cache of a class whose link offset
/// is `link`, as a chain.
pub(crate) fn take_chain(cache: &ClassCache, count: usize, link: usize) -> (*mut u8, usize) {
    let head = cache.head.get();
    let mut taken = 0;
    let mut last = None;
    let mut cursor = head;
    while taken < count
        && let Some(block) = NonNull::new(cursor)
    {
        last = Some(block);
        // SAFETY: every block on the list is a free block of the cache's class.
        cursor = unsafe { slab::next_of(block, link) };
        taken += 1;
    }
    if let Some(last) = last {
        // SAFETY: `last` is a block of the chain; cutting the link ends the chain there.
        unsafe { slab::set_next(last, link, ptr::null_mut()) };
    }
    cache.head.set(cursor);
    cache.set_len(cache.len() - taken);
    (if taken == 0 { ptr::null_mut() } else { head }, taken)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The link offset of blocks of the smallest class, which the stand-ins are.
    const LINK: usize = crate::class::GEOMETRY[0].link;

    /// Three pointer-aligned stand-ins for blocks of the smallest class.
    fn blocks(memory: &mut [[usize; 8]; 3]) -> [NonNull<u8>; 3] {
        let [a, b, c] = memory;
        [a, b, c].map(|block| NonNull::from(block).cast())
    }

    #[test]
    fn the_length_follows_pops_pushes_chains_and_publishing() {
        let cache = ClassCache::new();
        cache.set_limit(3);
        let mut memory = [[0; 8]; 3];
        for block in blocks(&mut memory) {
            assert!(cache.has_room());
            // SAFETY: each stand-in is pointer-aligned, unshared and pushed once.
            unsafe { cache.push_free(block, 10, LINK) };
        }
        assert!(!cache.has_room());
        assert_eq!(cache.len(), 3);
        assert!(cache.pop_allocation(7, LINK).is_some());
        assert_eq!(cache.len(), 2);
        let pending = cache.take_pending();
        assert_eq!(
            (
                pending.allocations,
                pending.frees,
                pending.bytes_allocated,
                pending.bytes_freed
            ),
            (1, 3, 7, 30)
        );
        assert_eq!(cache.len(), 2);
        let (_, taken) = take_chain(&cache, 1, LINK);
        assert_eq!((taken, cache.len()), (1, 1));
        assert!(cache.pop_allocation(7, LINK).is_some());
        assert!(cache.pop_allocation(7, LINK).is_none());
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_full_hot_list_moves_behind_and_back_whole() {
        let cache = ClassCache::new();
        cache.set_limit(2);
        let mut memory = [[0; 8]; 3];
        let [a, b, c] = blocks(&mut memory);
        // SAFETY: pointer-aligned, unshared stand-ins, each pushed once.
        unsafe {
            cache.push_free(a, 1, LINK);
            cache.push_free(b, 1, LINK);
        }
        assert!(!cache.has_room());
        assert_eq!(cache.spill(), (ptr::null_mut(), 0));
        assert_eq!((cache.len(), cache.cached()), (0, 2));
        // SAFETY: as above.
        unsafe { cache.push_free(c, 1, LINK) };
        assert!(!cache.restock(), "the hot list is not empty");
        assert_eq!(cache.pop_allocation(1, LINK), Some(c));
        assert!(cache.restock());
        assert_eq!((cache.len(), cache.cached()), (2, 2));
        assert_eq!(cache.pop_allocation(1, LINK), Some(b));
        assert_eq!(cache.pop_allocation(1, LINK), Some(a));
        assert!(!cache.restock());
    }

    #[test]
    fn a_free_block_links_through_its_last_word_only() {
        let cache = ClassCache::new();
        cache.set_limit(2);
        let mut memory = [[usize::MAX; 8]; 3];
        let [a, b, _] = blocks(&mut memory);
        // SAFETY: pointer-aligned, unshared stand-ins, each pushed once.
        unsafe {
            cache.push_free(a, 1, LINK);
            cache.push_free(b, 1, LINK);
        }
        let (first, taken) = take_chain(&cache, 2, LINK);
        assert_eq!((first, taken), (b.as_ptr(), 2));
        let words = |block: NonNull<u8>| {
            // SAFETY: each stand-in is eight readable words.
            unsafe { block.cast::<[usize; 8]>().read() }
        };
        let mut linked = [usize::MAX; 8];
        linked[7] = a.addr().get();
        assert_eq!(
            words(b),
            linked,
            "b's link names a, the rest is the caller's"
        );
        linked[7] = 0;
        assert_eq!(words(a), linked, "a ends the chain");
    }

    #[test]
    fn a_closed_cache_takes_no_frees() {
        let cache = ClassCache::new();
        assert!(!cache.has_room());
        cache.set_limit(batch_len(0));
        assert!(cache.has_room());
        cache.set_limit(0);
        assert!(!cache.has_room());
    }
}
