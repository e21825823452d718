//! The state of one allocator instance: settings, the shared pool of every class,
//! statistics counters, reports and history.
//!
//! A state is created on an instance's first use in memory from the system allocator and
//! is never freed: thread caches and slab headers point to it for the rest of the
//! process.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicI64, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::cache::{self, ClassCache, MAX_SLOTS, Pending, SLOT_OWNERS, SlotCache, batch_len};
use crate::class::{CLASS_COUNT, GEOMETRY};
use crate::large::LargeTable;
use crate::report::{CorruptionAction, ReportLog};
use crate::slab::{self, SlabHeader};
use crate::track::History;

/// What to do with a slab once all its blocks are free again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlabRelease {
    /// Keep it for later requests (fastest when usage goes up and down).
    #[default]
    Retain,
    /// Give it back to the system at once.
    ReleaseEmpty,
}

/// Run-time settings of an allocator instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    /// Record call site, time and thread of every allocation (leak reports, history).
    pub tracking: bool,
    /// With tracking, also keep a few return addresses per allocation.
    pub backtraces: bool,
    /// Write guard bytes after each allocation and check them on free.
    pub guard_checks: bool,
    /// Fill freed blocks with a pattern and check it when they are reused.
    pub poison: bool,
    /// What to do when corruption is found.
    pub on_corruption: CorruptionAction,
    /// What to do with empty slabs.
    pub slab_release: SlabRelease,
}

impl Config {
    /// Defaults for this build: tracking and poisoning on in debug builds only, guard
    /// checks always, abort on corruption, keep empty slabs.
    pub const DEFAULT: Config = Config {
        tracking: cfg!(debug_assertions),
        backtraces: false,
        guard_checks: true,
        poison: cfg!(debug_assertions),
        on_corruption: CorruptionAction::Abort,
        slab_release: SlabRelease::Retain,
    };
}

impl Default for Config {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Settings packed into one atomic word, read once per operation.
pub(crate) mod flag {
    pub(crate) const TRACKING: u32 = 1;
    pub(crate) const BACKTRACES: u32 = 1 << 1;
    pub(crate) const GUARD: u32 = 1 << 2;
    pub(crate) const POISON: u32 = 1 << 3;
    pub(crate) const RELEASE_EMPTY: u32 = 1 << 4;
    pub(crate) const ACTION_SHIFT: u32 = 8;
    pub(crate) const ACTION_MASK: u32 = 0b11 << ACTION_SHIFT;
}

/// The fast word: what the hit paths need of an instance, in one word a `NeuralAlloc`
/// keeps beside its state pointer, so a hit reads nothing of the state itself.
pub(crate) mod fast {
    use crate::cache::MAX_SLOTS;

    /// Allocations may take the hit path: tracking and poisoning are off. Frees need no
    /// switch: an instance without hit paths has number zero in its fast word, and no
    /// slab's identity names owner zero.
    pub(crate) const ALLOCATE: u32 = 1;
    /// Guard checks are on: the same bit as a guarded block's state word, so a free
    /// builds the state word it expects with one `or`.
    pub(crate) const GUARD: u32 = crate::slab::word::GUARDED;
    /// Where the cache slot sits: shifted so that the compiler turns slot times the
    /// 512-byte size of a slot's caches into one mask.
    const SLOT_SHIFT: u32 = 9;
    /// Where the instance's number sits (1 to `MAX_SLOTS`, its cache slot plus one), in
    /// the top byte; slab identities keep it in the same place.
    pub(crate) const OWNER_SHIFT: u32 = 24;

    // The fields do not overlap: switches, slot, guard bit, number.
    const SLOT_BITS: u32 = (MAX_SLOTS as u32 - 1) << SLOT_SHIFT;
    const _: () = assert!(MAX_SLOTS.is_power_of_two() && MAX_SLOTS < 1 << 8);
    const _: () = assert!(ALLOCATE < 1 << SLOT_SHIFT);
    const _: () = assert!(SLOT_BITS & GUARD == 0 && SLOT_BITS < GUARD);
    const _: () = assert!(GUARD < 1 << OWNER_SHIFT);

    /// The instance's number: zero for an instance without hit paths.
    #[inline(always)]
    pub(crate) fn owner(fast: u32) -> u32 {
        fast >> OWNER_SHIFT
    }

    /// The instance's cache slot, when its number is not zero.
    #[inline(always)]
    pub(crate) fn slot(fast: u32) -> usize {
        (fast >> SLOT_SHIFT) as usize % MAX_SLOTS
    }

    /// The fast word of the instance numbered `id` with settings `flags`: zero (no hit
    /// paths) for an instance without a cache slot.
    pub(crate) fn word(flags: u32, id: u32) -> u32 {
        if id == 0 || id as usize > MAX_SLOTS {
            return 0;
        }
        let mut word = (id << OWNER_SHIFT) | ((id - 1) << SLOT_SHIFT);
        if flags & (super::flag::TRACKING | super::flag::POISON) == 0 {
            word |= ALLOCATE;
        }
        if flags & super::flag::GUARD != 0 {
            word |= GUARD;
        }
        word
    }
}

pub(crate) fn pack(config: Config) -> u32 {
    let mut bits = 0;
    for (on, bit) in [
        (config.tracking, flag::TRACKING),
        (config.backtraces, flag::BACKTRACES),
        (config.guard_checks, flag::GUARD),
        (config.poison, flag::POISON),
        (
            config.slab_release == SlabRelease::ReleaseEmpty,
            flag::RELEASE_EMPTY,
        ),
    ] {
        if on {
            bits |= bit;
        }
    }
    let action = match config.on_corruption {
        CorruptionAction::Abort => 0,
        CorruptionAction::Log => 1,
        CorruptionAction::Count => 2,
    };
    bits | (action << flag::ACTION_SHIFT)
}

pub(crate) fn unpack(bits: u32) -> Config {
    Config {
        tracking: bits & flag::TRACKING != 0,
        backtraces: bits & flag::BACKTRACES != 0,
        guard_checks: bits & flag::GUARD != 0,
        poison: bits & flag::POISON != 0,
        on_corruption: action_of(bits),
        slab_release: if bits & flag::RELEASE_EMPTY != 0 {
            SlabRelease::ReleaseEmpty
        } else {
            SlabRelease::Retain
        },
    }
}

pub(crate) fn action_of(bits: u32) -> CorruptionAction {
    match (bits & flag::ACTION_MASK) >> flag::ACTION_SHIFT {
        0 => CorruptionAction::Abort,
        1 => CorruptionAction::Log,
        _ => CorruptionAction::Count,
    }
}

/// Pending per-thread allocations and frees of a class that trigger publishing them.
const PUBLISH_EVERY: u64 = 4096;

/// Shared counters of one class (index CLASS_COUNT is the system-allocator path).
pub(crate) struct Counters {
    pub(crate) allocations: AtomicU64,
    pub(crate) frees: AtomicU64,
    pub(crate) bytes_allocated: AtomicU64,
    pub(crate) bytes_freed: AtomicU64,
    pub(crate) peak_bytes: AtomicU64,
    pub(crate) cache_hits: AtomicU64,
    pub(crate) refills: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) slabs: AtomicU64,
    pub(crate) slabs_created: AtomicU64,
    pub(crate) blocks_outside_pool: AtomicU64,
}

impl Counters {
    const fn new() -> Self {
        Self {
            allocations: AtomicU64::new(0),
            frees: AtomicU64::new(0),
            bytes_allocated: AtomicU64::new(0),
            bytes_freed: AtomicU64::new(0),
            peak_bytes: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            refills: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            slabs: AtomicU64::new(0),
            slabs_created: AtomicU64::new(0),
            blocks_outside_pool: AtomicU64::new(0),
        }
    }
}

/// The shared pool of one class.
pub(crate) struct ClassPool {
    pub(crate) lists: Mutex<PoolLists>,
    /// Head of the list of all slabs, readable without the lock by walkers.
    pub(crate) all_head: AtomicPtr<SlabHeader>,
}

/// Whole batches a class's shared pool keeps as they came back from thread caches.
const TRANSFER_CHAINS: usize = 32;

/// Slab lists guarded by the pool lock.
pub(crate) struct PoolLists {
    partial_head: *mut SlabHeader,
    /// Chains of exactly one batch of free blocks, as thread caches flushed them, given
    /// whole to the next refill: a batch that goes back and forth between threads and
    /// the pool costs a lock and no walk of its blocks. At most about a megabyte per
    /// class (32 batches of about 32 KiB); kept empty when empty slabs are released, so
    /// blocks return to their slabs at once.
    transfer: [*mut u8; TRANSFER_CHAINS],
    transfer_len: usize,
}

// SAFETY: the raw pointers name slabs owned by this pool; they are only followed while
// the pool's mutex is held.
unsafe impl Send for PoolLists {}

impl ClassPool {
    const fn new() -> Self {
        Self {
            lists: Mutex::new(PoolLists {
                partial_head: ptr::null_mut(),
                transfer: [ptr::null_mut(); TRANSFER_CHAINS],
                transfer_len: 0,
            }),
            all_head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, PoolLists> {
        self.lists.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// All state of one allocator instance.
pub(crate) struct State {
    /// The instance's number, from 1, in the identity of its slabs.
    pub(crate) id: u32,
    /// Thread cache slot (`id - 1`), or MAX_SLOTS when this instance has none.
    pub(crate) slot: usize,
    pub(crate) flags: AtomicU32,
    pub(crate) pools: [ClassPool; CLASS_COUNT],
    pub(crate) large: LargeTable,
    pub(crate) counters: [Counters; CLASS_COUNT + 1],
    /// Bytes live over all classes as last published, and its peak.
    pub(crate) live_bytes: AtomicI64,
    pub(crate) peak_live_bytes: AtomicI64,
    pub(crate) reports: ReportLog,
    pub(crate) history: History,
    /// Walkers (leak reports, validation) reading slab lists without the pool locks;
    /// slabs are not released while any is active.
    pub(crate) walkers: AtomicUsize,
}

impl State {
    fn new(flags: u32, id: u32) -> Self {
        let slot = (id as usize).wrapping_sub(1).min(MAX_SLOTS);
        Self {
            id,
            slot,
            flags: AtomicU32::new(flags),
            pools: [const { ClassPool::new() }; CLASS_COUNT],
            large: LargeTable::new(),
            counters: [const { Counters::new() }; CLASS_COUNT + 1],
            live_bytes: AtomicI64::new(0),
            peak_live_bytes: AtomicI64::new(0),
            reports: ReportLog::new(),
            history: History::new(),
            walkers: AtomicUsize::new(0),
        }
    }

    /// Creates a state in memory from the system allocator and gives it a cache slot.
    /// Returns `None` when the system is out of memory.
    pub(crate) fn create(flags: u32) -> Option<&'static State> {
        static NEXT_ID: AtomicU32 = AtomicU32::new(1);
        let id = NEXT_ID
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |id| id.checked_add(1))
            .ok()?;
        let layout = Layout::new::<State>();
        // SAFETY: `State` is not zero-sized.
        let memory = NonNull::new(unsafe { System.alloc(layout) })?.cast::<State>();
        // SAFETY: fresh memory of the right layout, not yet shared.
        unsafe { memory.as_ptr().write(State::new(flags, id)) };
        // SAFETY: just written.
        let slot = unsafe { (*memory.as_ptr()).slot };
        if slot < MAX_SLOTS {
            SLOT_OWNERS[slot].store(memory.as_ptr(), Ordering::Release);
        }
        // SAFETY: initialised above and never freed.
        Some(unsafe { memory.as_ref() })
    }

    /// Gives `want` blocks of `class` out of the shared pool as a chain linked through
    /// [`slab::next_of`]. Returns the head and how many were given (at least one), or
    /// `None` when no slab can be mapped.
    pub(crate) fn refill(&self, class: usize, want: usize) -> Option<(NonNull<u8>, usize)> {
        let geometry = &GEOMETRY[class];
        let pool = &self.pools[class];
        let mut lists = pool.lock();
        let mut head: *mut u8 = ptr::null_mut();
        let mut given = 0;
        if want == batch_len(class) && lists.transfer_len > 0 {
            lists.transfer_len -= 1;
            head = lists.transfer[lists.transfer_len];
            given = want;
        }
        while given < want {
            let slab = match NonNull::new(lists.partial_head) {
                Some(slab) => slab,
                None => {
                    let Some(slab) = slab::create(self.id, class) else {
                        break;
                    };
                    self.counters[class].slabs.fetch_add(1, Ordering::Relaxed);
                    self.counters[class]
                        .slabs_created
                        .fetch_add(1, Ordering::Relaxed);
                    // SAFETY: the slab is new and ours; the pool lock is held.
                    unsafe {
                        link_all(pool, slab);
                        link_partial(&mut lists, slab);
                    }
                    slab
                }
            };
            let header = slab.as_ptr();
            // SAFETY: the slab belongs to this pool and the pool lock is held, so its
            // lock-guarded fields are ours; blocks taken are free and unshared.
            unsafe {
                // The slab's free list is already a chain: a run of it is cut off and
                // put in front of ours with a single link write.
                if let Some(run_head) = NonNull::new((*header).free_head) {
                    let mut last = run_head;
                    let mut taken = 1;
                    while taken < want - given {
                        let Some(next) = NonNull::new(slab::next_of(last, geometry.link)) else {
                            break;
                        };
                        last = next;
                        taken += 1;
                    }
                    (*header).free_head = slab::next_of(last, geometry.link);
                    slab::set_next(last, geometry.link, head);
                    head = run_head.as_ptr();
                    (*header).handed_out += taken;
                    given += taken;
                }
                // Then blocks never handed out, which have no link yet.
                while given < want && (*header).bump < geometry.block_count {
                    let block = slab::block_at(slab, geometry, (*header).bump);
                    (*header).bump += 1;
                    (*header).handed_out += 1;
                    slab::set_next(block, geometry.link, head);
                    head = block.as_ptr();
                    given += 1;
                }
                if (*header).free_head.is_null() && (*header).bump == geometry.block_count {
                    unlink_partial(&mut lists, slab);
                }
            }
        }
        drop(lists);
        let head = NonNull::new(head)?;
        let counters = &self.counters[class];
        counters.refills.fetch_add(1, Ordering::Relaxed);
        counters
            .blocks_outside_pool
            .fetch_add(given as u64, Ordering::Relaxed);
        Some((head, given))
    }

    /// Takes back a chain of `count` free blocks of `class` (linked through
    /// [`slab::next_of`], ending in null).
    ///
    /// # Safety
    ///
    /// - Every block of the chain must be a free block of a slab of this instance's
    ///   `class` pool, handed out by `refill` and owned by the caller.
    pub(crate) unsafe fn take_back(&self, class: usize, chain: *mut u8, count: usize) {
        let keep_whole = count == batch_len(class)
            && self.flags.load(Ordering::Relaxed) & flag::RELEASE_EMPTY == 0;
        let mut lists = self.pools[class].lock();
        if keep_whole && lists.transfer_len < TRANSFER_CHAINS {
            let slot = lists.transfer_len;
            lists.transfer[slot] = chain;
            lists.transfer_len += 1;
        } else {
            // SAFETY: as required of our caller; the pool lock is held.
            unsafe { self.return_chain(&mut lists, class, chain, usize::MAX) };
        }
        drop(lists);
        self.after_take_back(class, count);
    }

    /// Puts up to `limit` blocks from the front of `chain` back on their slabs' free
    /// lists; returns the rest of the chain and how many blocks went back.
    ///
    /// # Safety
    ///
    /// - The lock of the pool of `class` must be held (`lists` is its guard's contents).
    /// - Every block of the chain must be a free block of a slab of that pool, handed
    ///   out by `refill` and owned by the caller, linked through [`slab::next_of`], the
    ///   last link null; blocks past the first `limit` stay the caller's.
    unsafe fn return_chain(
        &self,
        lists: &mut PoolLists,
        class: usize,
        chain: *mut u8,
        limit: usize,
    ) -> (*mut u8, usize) {
        let release = self.flags.load(Ordering::Relaxed) & flag::RELEASE_EMPTY != 0;
        let link = GEOMETRY[class].link;
        let mut cursor = chain;
        let mut returned = 0;
        while returned < limit
            && let Some(first) = NonNull::new(cursor)
        {
            // Blocks handed out by `refill` lie in slabs of ours, so masking finds the
            // slab without an arena check.
            // SAFETY: as required of our caller, a block of a slab of the arena.
            let slab = unsafe { slab::base_of(first) };
            // Consecutive blocks of one slab are already linked to each other: they go
            // back as one run, with one link written and the header updated once.
            let mut last = first;
            let mut run = 1;
            loop {
                // SAFETY: the caller hands over these linked blocks of `class`.
                let next = unsafe { slab::next_of(last, link) };
                // SAFETY: as for `first`.
                let same_slab = |next| unsafe { slab::base_of(next) } == slab;
                match NonNull::new(next) {
                    Some(next) if returned + run < limit && same_slab(next) => {
                        last = next;
                        run += 1;
                    }
                    _ => {
                        cursor = next;
                        break;
                    }
                }
            }
            // SAFETY: the run `first..=last` holds `run` linked free blocks of `slab`,
            // owned by the caller; the pool lock is held; `last` has the slab's
            // provenance. Its link is rewritten after `cursor` was read from it.
            unsafe { self.return_run(lists, slab, first, last, run, release) };
            returned += run;
        }
        (cursor, returned)
    }

    /// Takes back one free block of `class`.
    ///
    /// # Safety
    ///
    /// - As for [`Self::take_back`], and `block` must have the slab's provenance.
    pub(crate) unsafe fn take_back_one(&self, class: usize, block: NonNull<u8>) {
        let mut lists = self.pools[class].lock();
        let release = self.flags.load(Ordering::Relaxed) & flag::RELEASE_EMPTY != 0;
        // SAFETY: as required of our caller, a block of a slab of the arena.
        let slab = unsafe { slab::base_of(block) };
        // SAFETY: as required of our caller; the pool lock is held.
        unsafe { self.return_run(&mut lists, slab, block, block, 1, release) };
        drop(lists);
        self.after_take_back(class, 1);
    }

    /// Puts a run of `run` blocks of one slab, linked from `first` to `last`, at the
    /// front of the slab's free list, and releases the slab if that empties it and
    /// `release` says so.
    ///
    /// # Safety
    ///
    /// - The lock of the pool of `slab`'s class must be held (`lists` is its guard's
    ///   contents).
    /// - The run must be free blocks of `slab`, a slab of this instance, owned by the caller
    ///   and linked through [`slab::next_of`]; `last` must have the slab's provenance.
    unsafe fn return_run(
        &self,
        lists: &mut PoolLists,
        slab: NonNull<SlabHeader>,
        first: NonNull<u8>,
        last: NonNull<u8>,
        run: usize,
        release: bool,
    ) {
        let header = slab.as_ptr();
        // SAFETY: the slab is live and ours and the pool lock is held, so its
        // lock-guarded fields are ours to change (`class` never changes); the blocks are
        // ours to link.
        unsafe {
            let class = (*header).class;
            let pool = &self.pools[class];
            slab::set_next(last, GEOMETRY[class].link, (*header).free_head);
            (*header).free_head = first.as_ptr();
            (*header).handed_out -= run;
            if !(*header).in_partial {
                link_partial(lists, slab);
            }
            if release && (*header).handed_out == 0 && self.walkers.load(Ordering::SeqCst) == 0 {
                unlink_partial(lists, slab);
                unlink_all(pool, slab);
                slab::destroy(slab);
                self.counters[class].slabs.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn after_take_back(&self, class: usize, count: usize) {
        let counters = &self.counters[class];
        counters.flushes.fetch_add(1, Ordering::Relaxed);
        counters
            .blocks_outside_pool
            .fetch_sub(count as u64, Ordering::Relaxed);
    }

    /// Adds a thread's pending counters of `class` to the shared ones.
    pub(crate) fn publish(&self, class: usize, class_cache: &ClassCache) {
        let Pending {
            allocations,
            frees,
            bytes_allocated,
            bytes_freed,
            cache_misses,
        } = class_cache.take_pending();
        if allocations == 0 && frees == 0 {
            return;
        }
        let cache_hits = allocations.saturating_sub(cache_misses);
        self.count(class, allocations, frees, bytes_allocated, bytes_freed);
        self.counters[class]
            .cache_hits
            .fetch_add(cache_hits, Ordering::Relaxed);
    }

    /// Publishes a thread's pending counters once enough have piled up (every shared
    /// counter update is a locked instruction, which costs more than the allocations it
    /// counts when done on every refill).
    #[inline]
    pub(crate) fn publish_if_due(&self, class: usize, class_cache: &ClassCache) {
        if class_cache.pending_operations() >= PUBLISH_EVERY {
            self.publish(class, class_cache);
        }
    }

    /// The fast word of this instance under its current settings.
    #[inline]
    pub(crate) fn fast_word(&self) -> u32 {
        fast::word(self.flags.load(Ordering::Relaxed), self.id)
    }

    /// Adds counts to the shared counters of `class` and updates the peaks.
    pub(crate) fn count(
        &self,
        class: usize,
        allocations: u64,
        frees: u64,
        bytes_allocated: u64,
        bytes_freed: u64,
    ) {
        let counters = &self.counters[class];
        let add = |counter: &AtomicU64, amount: u64| {
            if amount == 0 {
                counter.load(Ordering::Relaxed)
            } else {
                counter.fetch_add(amount, Ordering::Relaxed) + amount
            }
        };
        add(&counters.allocations, allocations);
        add(&counters.frees, frees);
        let allocated = add(&counters.bytes_allocated, bytes_allocated);
        let freed = add(&counters.bytes_freed, bytes_freed);
        let class_live = allocated.saturating_sub(freed);
        if class_live > counters.peak_bytes.load(Ordering::Relaxed) {
            counters.peak_bytes.fetch_max(class_live, Ordering::Relaxed);
        }
        let change = bytes_allocated as i64 - bytes_freed as i64;
        if change != 0 {
            let live = self.live_bytes.fetch_add(change, Ordering::Relaxed) + change;
            if live > self.peak_live_bytes.load(Ordering::Relaxed) {
                self.peak_live_bytes.fetch_max(live, Ordering::Relaxed);
            }
        }
    }

    /// Returns every cached block of one thread's slot to the shared pools and publishes
    /// its counters (thread exit).
    pub(crate) fn flush_slot(&self, cache: &SlotCache) {
        for (class, (class_cache, geometry)) in cache.classes.iter().zip(&GEOMETRY).enumerate() {
            let hot = cache::take_chain(class_cache, usize::MAX, geometry.link);
            for (chain, count) in [hot, class_cache.take_cold()] {
                if count > 0 {
                    // SAFETY: the chain consists of free blocks of this instance's class
                    // pool that the exiting thread's cache owned.
                    unsafe { self.take_back(class, chain, count) };
                }
            }
            self.publish(class, class_cache);
        }
    }

    /// Calls `visit` for every slab of `class`, without holding the pool lock while
    /// visiting, and with slab release held off meanwhile.
    pub(crate) fn walk_slabs(&self, class: usize, mut visit: impl FnMut(NonNull<SlabHeader>)) {
        self.walkers.fetch_add(1, Ordering::SeqCst);
        // Taking the lock once orders us after any release already under way.
        let pool = &self.pools[class];
        drop(pool.lock());
        let mut cursor = pool.all_head.load(Ordering::Acquire);
        while let Some(slab) = NonNull::new(cursor) {
            visit(slab);
            // SAFETY: slabs are not destroyed while `walkers` is non-zero, and
            // `all_next` is atomic.
            cursor = unsafe { (*slab.as_ptr()).all_next.load(Ordering::Acquire) };
        }
        self.walkers.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Pushes a slab on the list of all slabs.
///
/// # Safety
///
/// - The pool lock must be held and `slab` must be a live slab of this pool not on the list.
unsafe fn link_all(pool: &ClassPool, slab: NonNull<SlabHeader>) {
    let head = pool.all_head.load(Ordering::Relaxed);
    // SAFETY: the lock is held, so the list is ours to change; walkers only read
    // `all_next` and `all_head`, which are atomics published with release.
    unsafe {
        (*slab.as_ptr()).all_prev = ptr::null_mut();
        (*slab.as_ptr()).all_next.store(head, Ordering::Relaxed);
        if !head.is_null() {
            (*head).all_prev = slab.as_ptr();
        }
    }
    pool.all_head.store(slab.as_ptr(), Ordering::Release);
}

/// Removes a slab from the list of all slabs.
///
/// # Safety
///
/// - The pool lock must be held, `slab` must be on the list and no walker active.
unsafe fn unlink_all(pool: &ClassPool, slab: NonNull<SlabHeader>) {
    // SAFETY: the lock is held and the neighbours are live slabs of this pool.
    unsafe {
        let header = slab.as_ptr();
        let previous = (*header).all_prev;
        let next = (*header).all_next.load(Ordering::Relaxed);
        if previous.is_null() {
            pool.all_head.store(next, Ordering::Release);
        } else {
            (*previous).all_next.store(next, Ordering::Release);
        }
        if !next.is_null() {
            (*next).all_prev = previous;
        }
    }
}

/// Pushes a slab on the partial list.
///
/// # Safety
///
/// - The pool lock must be held and `slab` must be a live slab of this pool.
unsafe fn link_partial(lists: &mut PoolLists, slab: NonNull<SlabHeader>) {
    // SAFETY: the lock is held, so the partial links are ours.
    unsafe {
        let header = slab.as_ptr();
        (*header).partial_prev = ptr::null_mut();
        (*header).partial_next = lists.partial_head;
        if !lists.partial_head.is_null() {
            (*lists.partial_head).partial_prev = header;
        }
        (*header).in_partial = true;
    }
    lists.partial_head = slab.as_ptr();
}

/// Removes a slab from the partial list if it is on it.
///
/// # Safety
///
/// - The pool lock must be held and `slab` must be a live slab of this pool.
unsafe fn unlink_partial(lists: &mut PoolLists, slab: NonNull<SlabHeader>) {
    // SAFETY: the lock is held, so the partial links are ours.
    unsafe {
        let header = slab.as_ptr();
        if !(*header).in_partial {
            return;
        }
        let previous = (*header).partial_prev;
        let next = (*header).partial_next;
        if previous.is_null() {
            lists.partial_head = next;
        } else {
            (*previous).partial_next = next;
        }
        if !next.is_null() {
            (*next).partial_prev = previous;
        }
        (*header).in_partial = false;
        (*header).partial_prev = ptr::null_mut();
        (*header).partial_next = ptr::null_mut();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_word_keeps_number_slot_and_switches_apart() {
        for id in 1..=MAX_SLOTS as u32 {
            for flags in 0..1 << 5 {
                let word = fast::word(flags, id);
                assert_eq!(fast::owner(word), id, "id {id} flags {flags:#b}");
                assert_eq!(fast::slot(word), id as usize - 1);
                assert_eq!(word & fast::GUARD != 0, flags & flag::GUARD != 0);
                let allocate = flags & (flag::TRACKING | flag::POISON) == 0;
                assert_eq!(word & fast::ALLOCATE != 0, allocate);
            }
        }
        assert_eq!(fast::word(flag::GUARD, 0), 0);
        assert_eq!(fast::word(flag::GUARD, MAX_SLOTS as u32 + 1), 0);
    }

    #[test]
    fn a_free_builds_the_identity_of_its_own_slabs_only() {
        use crate::class::CLASS_COUNT;
        use crate::slab::{identity, identity_parts};

        assert_eq!(identity_parts(0), None);
        for class in 0..CLASS_COUNT {
            // An instance without hit paths expects owner zero, which no slab has and
            // which is not the zero of a slab out of use.
            assert_ne!(identity(fast::owner(0), class), 0);
            for id in [1, 2, MAX_SLOTS as u32, MAX_SLOTS as u32 + 1, u32::MAX] {
                let slab = identity(id, class);
                assert_eq!(identity_parts(slab), Some((id, class)));
                assert_ne!(identity(fast::owner(0), class), slab);
                let word = fast::word(flag::GUARD, id);
                let expected = identity(fast::owner(word), class);
                // Only instances with a cache slot have hit paths; they find their own
                // slabs and no other instance's or class's.
                assert_eq!(expected == slab, word != 0, "id {id} class {class}");
                if word != 0 {
                    assert_ne!(expected, identity(id + 1, class));
                    assert_ne!(expected, identity(id, (class + 1) % CLASS_COUNT));
                }
            }
        }
    }
}
