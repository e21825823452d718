//! Tracking: per-block records of where and when a block was allocated and freed, the
//! allocation history ring, and the clock they use.
//!
//! Records live in side tables mapped straight from the system, one per slab, so that
//! tracking never allocates through the allocator it describes.

use std::panic::Location;
use std::ptr::{self, NonNull};
use std::sync::Mutex;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use crate::class::GEOMETRY;
use crate::slab::SlabHeader;
use crate::sys;

/// Return addresses kept per tracked allocation when backtraces are on.
pub const MAX_FRAMES: usize = 8;

/// What is known about one tracked block. Every field is atomic because leak reports read
/// records while other threads allocate and free.
#[repr(C)]
pub(crate) struct TrackRecord {
    pub(crate) alloc_site: AtomicPtr<Location<'static>>,
    pub(crate) free_site: AtomicPtr<Location<'static>>,
    pub(crate) alloc_nanos: AtomicU64,
    pub(crate) thread: AtomicU64,
    pub(crate) frames: [AtomicUsize; MAX_FRAMES],
}

impl TrackRecord {
    /// An empty record, for large blocks whose record sits in their header.
    pub(crate) const fn new() -> Self {
        Self {
            alloc_site: AtomicPtr::new(ptr::null_mut()),
            free_site: AtomicPtr::new(ptr::null_mut()),
            alloc_nanos: AtomicU64::new(0),
            thread: AtomicU64::new(0),
            frames: [const { AtomicUsize::new(0) }; MAX_FRAMES],
        }
    }

    /// Fills the record for a fresh allocation.
    pub(crate) fn on_allocate(
        &self,
        site: Option<&'static Location<'static>>,
        backtrace: bool,
        nanos: u64,
        thread: u64,
    ) {
        store_site(&self.alloc_site, site);
        store_site(&self.free_site, None);
        self.alloc_nanos.store(nanos, Ordering::Relaxed);
        self.thread.store(thread, Ordering::Relaxed);
        let mut frames = [0usize; MAX_FRAMES + 2];
        let count = if backtrace {
            sys::capture_frames(&mut frames)
        } else {
            0
        };
        // The first two frames are the capture call and this function.
        let kept = frames.get(2..count).unwrap_or(&[]);
        for (index, slot) in self.frames.iter().enumerate() {
            slot.store(kept.get(index).copied().unwrap_or(0), Ordering::Relaxed);
        }
    }

    /// Reads the allocation site.
    pub(crate) fn alloc_site(&self) -> Option<&'static Location<'static>> {
        load_site(&self.alloc_site)
    }

    /// Reads the site of the last free.
    pub(crate) fn free_site(&self) -> Option<&'static Location<'static>> {
        load_site(&self.free_site)
    }
}

pub(crate) fn store_site(
    slot: &AtomicPtr<Location<'static>>,
    site: Option<&'static Location<'static>>,
) {
    let raw = site.map_or(ptr::null_mut(), |location| {
        ptr::from_ref(location).cast_mut()
    });
    slot.store(raw, Ordering::Relaxed);
}

pub(crate) fn load_site(slot: &AtomicPtr<Location<'static>>) -> Option<&'static Location<'static>> {
    let raw = slot.load(Ordering::Relaxed);
    // SAFETY: only `store_site` writes these slots, and it stores null or a pointer made
    // from a `&'static Location`, which stays valid forever.
    unsafe { raw.as_ref() }
}

/// Length and alignment of the side table of a slab of `class`.
pub(crate) fn table_size(class: usize) -> (usize, usize) {
    let bytes = GEOMETRY[class].block_count * size_of::<TrackRecord>();
    (bytes.next_multiple_of(sys::PAGE_SIZE), sys::PAGE_SIZE)
}

/// The record of block `index` of `slab`, mapping the slab's side table on first use.
///
/// # Safety
///
/// - `slab` must be a live slab and `index` below its block count.
pub(crate) unsafe fn record_for<'a>(
    slab: NonNull<SlabHeader>,
    index: usize,
) -> Option<&'a TrackRecord> {
    // SAFETY: the caller guarantees the slab is live; `tracking` is atomic.
    let slot = unsafe { &(*slab.as_ptr()).tracking };
    let mut table = slot.load(Ordering::Acquire);
    if table.is_null() {
        // SAFETY: `class` is fixed at slab creation.
        let class = unsafe { (*slab.as_ptr()).class };
        let (len, align) = table_size(class);
        let fresh = sys::map_zeroed(len, align)?.cast::<TrackRecord>().as_ptr();
        match slot.compare_exchange(ptr::null_mut(), fresh, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => table = fresh,
            Err(winner) => {
                if let Some(fresh) = NonNull::new(fresh) {
                    // SAFETY: `fresh` was mapped above with these arguments and lost the
                    // race, so nothing else refers to it.
                    unsafe { sys::unmap(fresh.cast(), len, align) };
                }
                table = winner;
            }
        }
    }
    // SAFETY: the table holds one zero-initialised record per block (all-zero bytes are
    // a valid empty record), stays mapped while the slab lives, and is only accessed
    // through atomics; `index` is in bounds by the caller's duty.
    Some(unsafe { &*table.add(index) })
}

/// The record of block `index` if the slab already has a side table.
///
/// # Safety
///
/// - `slab` must be a live slab and `index` below its block count.
pub(crate) unsafe fn existing_record<'a>(
    slab: NonNull<SlabHeader>,
    index: usize,
) -> Option<&'a TrackRecord> {
    // SAFETY: the caller guarantees the slab is live.
    let table = unsafe { (*slab.as_ptr()).tracking.load(Ordering::Acquire) };
    if table.is_null() {
        return None;
    }
    // SAFETY: as in `record_for`.
    Some(unsafe { &*table.add(index) })
}

/// Nanoseconds of the coarse monotonic clock: a few milliseconds of resolution, which is
/// plenty to date an allocation, for a fraction of the precise clock's cost on every
/// tracked allocation and free.
pub(crate) fn now_nanos() -> u64 {
    sys::coarse_monotonic_nanos()
}

/// Entries kept by the allocation history ring.
pub const HISTORY_LEN: usize = 1024;

/// What happened to a block, as recorded in the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryEvent {
    /// The block was handed out.
    Allocate,
    /// The block was given back.
    Free,
}

/// One allocation or free, as kept by the history ring while tracking is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryEntry {
    /// Allocation or free.
    pub event: HistoryEvent,
    /// Address of the block as the caller saw it.
    pub address: usize,
    /// Requested size in bytes.
    pub size: usize,
    /// Call site, when the caller went through the typed or raw API.
    pub site: Option<&'static Location<'static>>,
    /// Nanoseconds of the coarse monotonic clock (a few milliseconds of resolution).
    pub nanos: u64,
    /// Small number naming the thread (not the OS thread id).
    pub thread: u64,
}

/// A fixed-size ring of the most recent [`HistoryEntry`] values, mapped on first use.
pub(crate) struct History {
    ring: Mutex<Ring>,
}

struct Ring {
    entries: *mut HistoryEntry,
    next: usize,
    len: usize,
}

// SAFETY: `entries` points to memory owned by the ring alone and only touched while its
// mutex is held.
unsafe impl Send for Ring {}

impl History {
    pub(crate) const fn new() -> Self {
        Self {
            ring: Mutex::new(Ring {
                entries: ptr::null_mut(),
                next: 0,
                len: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends an entry, dropping the oldest when full. Never allocates through the
    /// global allocator.
    pub(crate) fn push(&self, entry: HistoryEntry) {
        let mut ring = self.lock();
        if ring.entries.is_null() {
            let bytes = (HISTORY_LEN * size_of::<HistoryEntry>()).next_multiple_of(sys::PAGE_SIZE);
            match sys::map_zeroed(bytes, sys::PAGE_SIZE) {
                Some(memory) => ring.entries = memory.cast().as_ptr(),
                None => return,
            }
        }
        let slot = ring.next;
        // SAFETY: the ring holds HISTORY_LEN entries and `slot < HISTORY_LEN`; we hold
        // the lock, so nothing else touches the memory.
        unsafe { ring.entries.add(slot).write(entry) };
        ring.next = (slot + 1) % HISTORY_LEN;
        ring.len = (ring.len + 1).min(HISTORY_LEN);
    }

    /// Copies the entries out, oldest first.
    pub(crate) fn snapshot(&self) -> Vec<HistoryEntry> {
        // Reserved before locking: the allocation may come back into this allocator,
        // which must never happen while its lock is held.
        let mut copy = Vec::with_capacity(HISTORY_LEN);
        let ring = self.lock();
        let oldest = (ring.next + HISTORY_LEN - ring.len) % HISTORY_LEN;
        for step in 0..ring.len {
            // SAFETY: the first `len` entries before `next` were written by `push`; the
            // lock is held.
            copy.push(unsafe { ring.entries.add((oldest + step) % HISTORY_LEN).read() });
        }
        copy
    }

    /// Forgets every entry.
    pub(crate) fn clear(&self) {
        let mut ring = self.lock();
        ring.next = 0;
        ring.len = 0;
    }
}
