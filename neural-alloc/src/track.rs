//! Tracking: per-block records of where and when a block was allocated and freed, the
//! allocation history ring, and the clock they use.
//!
//! Records live in side tables mapped straight from the system, one per slab, so that
//! tracking never allocates through the allocator it describes.

use std::panic::Location;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

use crate::class::GEOMETRY;
use crate::slab::SlabHeader;
use crate::sys;

/// Return addresses kept per tracked allocation when backtraces are on: enough to reach
/// past the allocator's and the standard library's frames to the program's own caller.
pub const MAX_FRAMES: usize = 24;

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

/// Entries kept by the allocation history ring (fewer under Miri, whose interpreter
/// makes filling the ring in tests slow).
pub const HISTORY_LEN: usize = if cfg!(miri) { 64 } else { 1024 };

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
///
/// Lock-free: a writer claims a ticket with one atomic add and publishes its slot under
/// a sequence number (odd while writing, `2 * ticket + 2` when done), so readers copy
/// only slots whose sequence did not change while they read them. A mutex here cost more
/// than the rest of a tracked allocation.
pub(crate) struct History {
    slots: AtomicPtr<Slot>,
    next_ticket: AtomicU64,
    /// Tickets below this were cleared.
    first_kept: AtomicU64,
}

/// One entry of the ring, every field atomic so readers and writers never race.
struct Slot {
    sequence: AtomicU64,
    address: AtomicUsize,
    size: AtomicUsize,
    site: AtomicPtr<Location<'static>>,
    nanos: AtomicU64,
    /// Thread number shifted left by one, plus 1 for a free.
    thread_and_event: AtomicU64,
}

const SLOTS_BYTES: usize = (HISTORY_LEN * size_of::<Slot>()).next_multiple_of(sys::PAGE_SIZE);

impl History {
    pub(crate) const fn new() -> Self {
        Self {
            slots: AtomicPtr::new(ptr::null_mut()),
            next_ticket: AtomicU64::new(0),
            first_kept: AtomicU64::new(0),
        }
    }

    /// The slots, mapped on first use; zeroed memory is a ring of empty slots.
    fn slots(&self) -> Option<NonNull<Slot>> {
        let slots = self.slots.load(Ordering::Acquire);
        if let Some(slots) = NonNull::new(slots) {
            return Some(slots);
        }
        let fresh = sys::map_zeroed(SLOTS_BYTES, sys::PAGE_SIZE)?.cast::<Slot>();
        match self.slots.compare_exchange(
            ptr::null_mut(),
            fresh.as_ptr(),
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Some(fresh),
            Err(winner) => {
                // SAFETY: mapped just above with these arguments; it lost the race and
                // was never shared.
                unsafe { sys::unmap(fresh.cast(), SLOTS_BYTES, sys::PAGE_SIZE) };
                NonNull::new(winner)
            }
        }
    }

    /// The slot of `ticket`. Only this one slot is borrowed, not the whole ring.
    fn slot(slots: NonNull<Slot>, ticket: u64) -> &'static Slot {
        let index = (ticket % HISTORY_LEN as u64) as usize;
        // SAFETY: the mapping holds HISTORY_LEN zero-initialised slots (all-zero is a
        // valid slot of atomics), is never unmapped, and is only accessed through
        // atomics; `index < HISTORY_LEN`.
        unsafe { &*slots.as_ptr().add(index) }
    }

    /// Appends an entry, overwriting the oldest when full. Never allocates through the
    /// global allocator.
    pub(crate) fn push(&self, entry: HistoryEntry) {
        let Some(slots) = self.slots() else {
            return;
        };
        let ticket = self.next_ticket.fetch_add(1, Ordering::Relaxed);
        let slot = Self::slot(slots, ticket);
        slot.sequence.store(2 * ticket + 1, Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        slot.address.store(entry.address, Ordering::Relaxed);
        slot.size.store(entry.size, Ordering::Relaxed);
        store_site(&slot.site, entry.site);
        slot.nanos.store(entry.nanos, Ordering::Relaxed);
        let event = u64::from(entry.event == HistoryEvent::Free);
        slot.thread_and_event
            .store(entry.thread << 1 | event, Ordering::Relaxed);
        slot.sequence.store(2 * ticket + 2, Ordering::Release);
    }

    /// Copies the entries out, oldest first; entries being overwritten meanwhile are
    /// left out.
    pub(crate) fn snapshot(&self) -> Vec<HistoryEntry> {
        let Some(slots) = self.slots() else {
            return Vec::new();
        };
        let end = self.next_ticket.load(Ordering::Acquire);
        let start = end
            .saturating_sub(HISTORY_LEN as u64)
            .max(self.first_kept.load(Ordering::Acquire));
        let mut copy = Vec::with_capacity(HISTORY_LEN);
        for ticket in start..end {
            let slot = Self::slot(slots, ticket);
            if slot.sequence.load(Ordering::Acquire) != 2 * ticket + 2 {
                continue;
            }
            let thread_and_event = slot.thread_and_event.load(Ordering::Relaxed);
            let entry = HistoryEntry {
                event: if thread_and_event & 1 == 1 {
                    HistoryEvent::Free
                } else {
                    HistoryEvent::Allocate
                },
                address: slot.address.load(Ordering::Relaxed),
                size: slot.size.load(Ordering::Relaxed),
                site: load_site(&slot.site),
                nanos: slot.nanos.load(Ordering::Relaxed),
                thread: thread_and_event >> 1,
            };
            std::sync::atomic::fence(Ordering::Acquire);
            if slot.sequence.load(Ordering::Relaxed) == 2 * ticket + 2 {
                copy.push(entry);
            }
        }
        copy
    }

    /// Forgets every entry recorded so far.
    pub(crate) fn clear(&self) {
        self.first_kept
            .store(self.next_ticket.load(Ordering::Acquire), Ordering::Release);
    }
}
