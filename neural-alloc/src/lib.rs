//! neural-alloc: a size-classed pool allocator with thread caches, allocation tracking
//! and corruption checks, usable as the process's global allocator or through typed
//! handles.
//!
//! Requests up to 8 KiB (with their 8 guard bytes and alignment) are served from pools of
//! 64 to 8192-byte blocks carved out of 256 KiB slabs; each thread keeps a small cache per
//! class that is refilled and flushed in batches. Larger requests go to the system
//! allocator and are tracked the same way. Every block carries guard bytes checked on
//! free and by [`NeuralAlloc::validate_all`]; double and invalid frees are recognised
//! without touching the freed pointer; freed blocks can be poisoned to expose writes
//! after free. With tracking on, each live block remembers its call site, time, thread
//! and optionally return addresses, which feed [`NeuralAlloc::leak_report`] and a ring of
//! recent events.
//!
//! It never allocates through the global allocator on its allocation and free paths, it
//! never unwinds out of the [`GlobalAlloc`] adapter, it never hands memory of one
//! instance to another, and it depends on no other crate of the workspace.
//!
//! # Using it in a binary
//!
//! ```no_run
//! use neural_alloc::NeuralAlloc;
//!
//! #[global_allocator]
//! static ALLOCATOR: NeuralAlloc = NeuralAlloc::new();
//!
//! fn main() {
//!     // `HOTPATCH_ALLOC=track` switches tracking on (`track-backtrace` adds return
//!     // addresses); anything else leaves the build's default.
//!     neural_alloc::enable_tracking_from_env(&ALLOCATOR);
//!     // ... the program ...
//!     // At exit: write the live blocks, grouped by call site, to standard error.
//!     neural_alloc::print_leak_report(&ALLOCATOR);
//! }
//! ```
//!
//! Allocations through the `GlobalAlloc` adapter carry no call site (the standard library
//! sits between the caller and the allocator); switch backtraces on to group them by
//! return addresses, which `addr2line -e BINARY OFFSET` turns into source lines.
//!
//! # Costs and limits
//!
//! - A request of `n` bytes needs `n + 8` bytes of block, so power-of-two sizes use the
//!   next class up (a 64-byte request takes a 128-byte block).
//! - Each thread keeps about 16 KiB of thread-local state (one cache line per instance
//!   and class); up to 32 instances per process get thread caches, later ones go to
//!   the shared pools directly.
//! - Tracking costs a few times an untracked allocation (a clock read, a record and a
//!   history entry per event); it is meant for debugging runs.
//! - The most recently freed large block is given back to the system only at the next
//!   large free.
//! - Slabs are carved from one reservation of address space made on first use (64 GiB
//!   where the system allows, smaller under `ulimit -v` or strict overcommit, or what
//!   `HOTPATCH_ALLOC_ARENA_MIB` says); it costs memory only where slabs are written. When it is full, pooled requests go to the
//!   system allocator like large ones. Slabs given back under
//!   [`SlabRelease::ReleaseEmpty`] return their pages to the system but stay readable,
//!   so a late free of a pointer into one is refused as an invalid free.
//!
//! # Platform
//!
//! Thread caches rely on the standard library registering thread-local destructors
//! without allocating through the global allocator (true on glibc Linux); elsewhere the
//! first refill on a thread still works, because the cache is bypassed while the
//! destructor is registered.

mod alloc;
mod attribution;
mod cache;
mod class;
mod error;
mod global;
mod handle;
mod inspect;
mod large;
mod report;
mod slab;
mod state;
mod sys;
mod track;

#[cfg(test)]
mod tests;

use std::alloc::{GlobalAlloc, Layout};
use std::panic::Location;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};

pub use attribution::{AttributedSite, Attribution, CallSite, RuntimeHold};
pub use class::{CLASS_SIZES, GUARD_LEN};
pub use error::AllocError;
pub use global::{HOTPATCH_ALLOC_VARIABLE, enable_tracking_from_env, print_leak_report};
pub use handle::{PoolBox, PoolBytes};
pub use inspect::{ClassStats, LeakReport, LeakSite, Stats, Validation};
pub use report::{
    CorruptionAction, CorruptionCounts, CorruptionKind, CorruptionReport, KEPT_REPORTS,
};
pub use state::{Config, SlabRelease};
pub use track::{HISTORY_LEN, HistoryEntry, HistoryEvent, MAX_FRAMES};

use state::State;

/// A pool allocator instance.
///
/// Usable as `#[global_allocator] static A: NeuralAlloc = NeuralAlloc::new();`, or
/// directly through [`NeuralAlloc::allocate`], [`NeuralAlloc::boxed`] and friends. Each
/// instance has its own pools, statistics and reports; its state is created on first
/// use and lives until the process exits, even if the instance itself is dropped
/// (thread caches may still hold its blocks).
pub struct NeuralAlloc {
    state: AtomicPtr<State>,
    /// What the hit paths need (see `state::fast`), zero until the state exists.
    fast: AtomicU32,
    initial: Config,
}

impl std::fmt::Debug for NeuralAlloc {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("NeuralAlloc")
            .field("config", &self.config())
            .finish_non_exhaustive()
    }
}

impl Default for NeuralAlloc {
    fn default() -> Self {
        Self::new()
    }
}

/// Serialises the creation of instance states (rare; never on a hot path).
static CREATION: Mutex<()> = Mutex::new(());

impl NeuralAlloc {
    /// An instance with [`Config::DEFAULT`].
    pub const fn new() -> Self {
        Self::with_config(Config::DEFAULT)
    }

    /// An instance starting with `config`.
    pub const fn with_config(config: Config) -> Self {
        Self {
            state: AtomicPtr::new(std::ptr::null_mut()),
            fast: AtomicU32::new(0),
            initial: config,
        }
    }

    /// The state, created on first use; `None` only when the system is out of memory.
    #[inline]
    fn state(&self) -> Option<&'static State> {
        let state = self.state.load(Ordering::Acquire);
        if state.is_null() {
            return self.create_state();
        }
        // SAFETY: a non-null pointer here was stored by `create_state` and points to a
        // state that is never freed.
        Some(unsafe { &*state })
    }

    /// `GlobalAlloc::alloc` when the hit path cannot serve the request.
    #[inline(never)]
    fn alloc_uncached(&self, layout: Layout) -> *mut u8 {
        let guard = global::AbortOnUnwind;
        let block = match self.state() {
            Some(state) => state.allocate_uncached(layout.size(), layout.align(), None),
            None => Err(AllocError::OutOfMemory {
                size: layout.size(),
            }),
        };
        std::mem::forget(guard);
        block.map_or(std::ptr::null_mut(), NonNull::as_ptr)
    }

    /// `GlobalAlloc::dealloc` when the hit path cannot take the block.
    #[inline(never)]
    fn dealloc_uncached(&self, pointer: *mut u8) {
        let guard = global::AbortOnUnwind;
        if let (Some(pointer), Some(state)) = (NonNull::new(pointer), self.state()) {
            // Errors were reported with the configured action; nothing more to do.
            let _ = state.deallocate_checked(pointer, None);
        }
        std::mem::forget(guard);
    }

    #[cold]
    fn create_state(&self) -> Option<&'static State> {
        let _creating = CREATION.lock().unwrap_or_else(PoisonError::into_inner);
        let existing = self.state.load(Ordering::Acquire);
        if !existing.is_null() {
            // SAFETY: as in `state`.
            return Some(unsafe { &*existing });
        }
        let created = State::create(state::pack(self.initial))?;
        self.state
            .store(std::ptr::from_ref(created).cast_mut(), Ordering::Release);
        self.fast.store(created.fast_word(), Ordering::Relaxed);
        Some(created)
    }

    /// The current settings.
    pub fn config(&self) -> Config {
        match self.state() {
            Some(state) => state::unpack(state.flags.load(Ordering::Relaxed)),
            None => self.initial,
        }
    }

    /// Replaces the settings. Blocks keep the guard and tracking they were allocated
    /// with, so switching at run time never produces false reports.
    pub fn set_config(&self, config: Config) {
        if let Some(state) = self.state() {
            // Held so that two changes at once leave the fast word matching the flags.
            let _changing = CREATION.lock().unwrap_or_else(PoisonError::into_inner);
            state.flags.store(state::pack(config), Ordering::Relaxed);
            self.fast.store(state.fast_word(), Ordering::Relaxed);
        }
    }

    /// Switches tracking on or off.
    pub fn set_tracking(&self, on: bool) {
        self.set_config(Config {
            tracking: on,
            ..self.config()
        });
    }

    /// Allocates `layout.size()` bytes (a zero size gets a real, smallest block).
    ///
    /// # Errors
    ///
    /// [`AllocError::TooLarge`] when the size with its guard bytes overflows,
    /// [`AllocError::OutOfMemory`] when the system refuses.
    #[track_caller]
    pub fn allocate(&self, layout: Layout) -> Result<NonNull<u8>, AllocError> {
        let state = self.state().ok_or(AllocError::OutOfMemory {
            size: layout.size(),
        })?;
        state.allocate(layout.size(), layout.align(), Some(Location::caller()))
    }

    /// Allocates zeroed bytes; see [`Self::allocate`].
    ///
    /// # Errors
    ///
    /// As for [`Self::allocate`].
    #[track_caller]
    pub fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<u8>, AllocError> {
        let block = self.allocate(layout)?;
        // SAFETY: the block is fresh and holds `layout.size()` bytes.
        unsafe { block.as_ptr().write_bytes(0, layout.size()) };
        Ok(block)
    }

    /// Frees a block. `layout` lets the free of a block allocated with it take the short
    /// path; the allocator knows each block's size itself, so a wrong layout costs only
    /// time: the block is freed, or refused, by what the allocator recorded.
    ///
    /// A pointer that is not a live block of this instance (already freed, never
    /// allocated, inside a block, from another allocator) is reported with the
    /// configured [`CorruptionAction`] and not freed; that case has defined behaviour.
    ///
    /// # Errors
    ///
    /// [`AllocError::Corruption`] when the pointer was not a live block.
    ///
    /// # Safety
    ///
    /// - If `pointer` is a live block of this instance, nothing may use it after this
    ///   call: its memory is reused.
    #[track_caller]
    pub unsafe fn deallocate(
        &self,
        pointer: NonNull<u8>,
        layout: Layout,
    ) -> Result<(), AllocError> {
        let state = self.state().ok_or(AllocError::Corruption {
            kind: CorruptionKind::InvalidFree,
            address: pointer.as_ptr().addr(),
        })?;
        state.deallocate(
            pointer,
            layout.size(),
            layout.align(),
            Some(Location::caller()),
        )
    }

    /// Resizes a block to `new_size` bytes, keeping `old_layout`'s alignment; in place
    /// when the block's class still fits, else by allocating, copying and freeing.
    ///
    /// # Errors
    ///
    /// As for [`Self::allocate`] and [`Self::deallocate`]; on error the old block is
    /// left as it was.
    ///
    /// # Safety
    ///
    /// - If `pointer` is a live block of this instance and the call succeeds, nothing
    ///   may use `pointer` afterwards unless it equals the returned pointer.
    #[track_caller]
    pub unsafe fn reallocate(
        &self,
        pointer: NonNull<u8>,
        old_layout: Layout,
        new_size: usize,
    ) -> Result<NonNull<u8>, AllocError> {
        let state = self
            .state()
            .ok_or(AllocError::OutOfMemory { size: new_size })?;
        state.reallocate(
            pointer,
            new_size,
            old_layout.align(),
            Some(Location::caller()),
        )
    }

    /// Moves `value` into a block of this allocator.
    ///
    /// # Errors
    ///
    /// As for [`Self::allocate`].
    #[track_caller]
    pub fn boxed<T>(&self, value: T) -> Result<PoolBox<'_, T>, AllocError> {
        PoolBox::new_in(self, value, Location::caller())
    }

    /// A zeroed byte buffer of `len` bytes from this allocator.
    ///
    /// # Errors
    ///
    /// As for [`Self::allocate`].
    #[track_caller]
    pub fn bytes(&self, len: usize) -> Result<PoolBytes<'_>, AllocError> {
        PoolBytes::zeroed_in(self, len, Location::caller())
    }

    /// A snapshot of the statistics; the calling thread's pending counts are included.
    pub fn stats(&self) -> Stats {
        self.state().map(State::stats).unwrap_or_default()
    }

    /// Live blocks grouped by allocation site.
    pub fn leak_report(&self) -> LeakReport {
        self.state().map(State::leak_report).unwrap_or_default()
    }

    /// Checks the guard bytes of every live block and, with poisoning on, the poison of
    /// every free block; each problem is reported with the configured action.
    ///
    /// Other threads may keep allocating and freeing meanwhile: guard bytes are read
    /// with volatile reads and a finding is dropped when the block's state word changed
    /// during the read, so a block freed and reused concurrently is skipped rather than
    /// misreported. Findings are exact when other threads are idle.
    #[track_caller]
    pub fn validate_all(&self) -> Validation {
        let site = Location::caller();
        self.state()
            .map(|state| state.validate_all(Some(site)))
            .unwrap_or_default()
    }

    /// Reports kept so far (at most [`KEPT_REPORTS`], oldest first).
    pub fn corruption_reports(&self) -> Vec<CorruptionReport> {
        self.state()
            .map(|state| state.reports.reports())
            .unwrap_or_default()
    }

    /// Number of findings of each kind so far.
    pub fn corruption_counts(&self) -> CorruptionCounts {
        self.state()
            .map(|state| state.reports.counts())
            .unwrap_or_default()
    }

    /// Forgets kept reports and counts.
    pub fn clear_corruption_reports(&self) {
        if let Some(state) = self.state() {
            state.reports.clear();
        }
    }

    /// Recent allocations and frees made with tracking on, oldest first (at most
    /// [`HISTORY_LEN`]).
    pub fn history(&self) -> Vec<HistoryEntry> {
        self.state()
            .map(|state| state.history.snapshot())
            .unwrap_or_default()
    }

    /// Forgets the history.
    pub fn clear_history(&self) {
        if let Some(state) = self.state() {
            state.history.clear();
        }
    }

    /// Fills the calling thread's cache for requests of `size` bytes with up to `count`
    /// blocks (capped by the cache's capacity) ahead of a burst; returns how many blocks
    /// the cache holds now. Returns 0 for sizes served by the system allocator and for
    /// instances without thread caches.
    pub fn warm_thread_cache(&self, size: usize, count: usize) -> usize {
        self.state().map_or(0, |state| state.warm(size, count))
    }
}

// SAFETY: every method honours the GlobalAlloc contract: blocks are at least
// `layout.size()` bytes, aligned to `layout.align()` (class blocks are aligned to their
// class size, which is at least the alignment; large blocks are aligned by the system
// allocator), stay valid until freed, and are never handed out twice. Nothing unwinds:
// the hit paths cannot panic, and everything else runs under `AbortOnUnwind`, which turns
// a panic into an abort.
unsafe impl GlobalAlloc for NeuralAlloc {
    // Always inlined: left to itself the compiler may keep the free's hit path out of
    // line where the layout is not a constant, and the call then costs more than the
    // hit path.
    #[inline(always)]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let fast = self.fast.load(Ordering::Relaxed);
        if let Some(block) = alloc::try_allocate_cached(fast, layout) {
            return block.as_ptr();
        }
        self.alloc_uncached(layout)
    }

    #[inline(always)]
    unsafe fn dealloc(&self, pointer: *mut u8, layout: Layout) {
        let fast = self.fast.load(Ordering::Relaxed);
        if alloc::try_deallocate_cached(fast, pointer, layout) {
            return;
        }
        self.dealloc_uncached(pointer);
    }

    #[inline]
    unsafe fn realloc(&self, pointer: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let guard = global::AbortOnUnwind;
        let moved = match (NonNull::new(pointer), self.state()) {
            (Some(pointer), Some(state)) => state
                .reallocate(pointer, new_size, layout.align(), None)
                .ok(),
            _ => None,
        };
        std::mem::forget(guard);
        moved.map_or(std::ptr::null_mut(), NonNull::as_ptr)
    }
}
