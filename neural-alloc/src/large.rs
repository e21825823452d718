//! Requests too large (or too aligned) for any class: served by the system allocator,
//! with a header in front of the caller's bytes and guard bytes after them.
//!
//! Headers are kept in a hash table of intrusive bucket lists keyed by the caller's
//! address, so a free finds its header without reading the freed pointer, and a pointer
//! the table does not know is reported as an invalid free instead of being handed to the
//! system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::error::AllocError;
use crate::track::TrackRecord;

const BUCKET_COUNT: usize = 64;

/// Placed at the start of each system allocation.
pub(crate) struct LargeHeader {
    /// Address handed to the caller.
    pub(crate) user: usize,
    /// Requested size.
    pub(crate) size: usize,
    /// Layout of the whole system allocation.
    pub(crate) layout: Layout,
    /// Offset from the header to the caller's bytes.
    pub(crate) offset: usize,
    /// Same flag bits as a slab block's state word (guarded, tracked, internal).
    pub(crate) word: AtomicU32,
    /// Next header in the same bucket; bucket lock.
    next: *mut LargeHeader,
    /// Tracking record.
    pub(crate) record: TrackRecord,
}

impl LargeHeader {
    /// The caller's bytes.
    pub(crate) fn user_pointer(header: NonNull<LargeHeader>) -> NonNull<u8> {
        // SAFETY: `offset` is fixed at creation and keeps the pointer inside the system
        // allocation that starts with the header.
        unsafe { header.cast::<u8>().add((*header.as_ptr()).offset) }
    }
}

struct Bucket {
    head: *mut LargeHeader,
}

// SAFETY: the headers are owned by the table and only followed under the bucket lock.
unsafe impl Send for Bucket {}

/// All live large blocks of one instance.
pub(crate) struct LargeTable {
    buckets: [Mutex<Bucket>; BUCKET_COUNT],
    /// The most recently freed block, given back to the system only when the next one
    /// is freed: see [`LargeTable::retire`].
    retired: AtomicPtr<LargeHeader>,
}

fn bucket_of(address: usize) -> usize {
    // Large blocks are at least page-ish apart; mix the bits above the low ones.
    let mixed = (address >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    mixed >> (usize::BITS - BUCKET_COUNT.trailing_zeros())
}

impl LargeTable {
    pub(crate) const fn new() -> Self {
        Self {
            buckets: [const {
                Mutex::new(Bucket {
                    head: ptr::null_mut(),
                })
            }; BUCKET_COUNT],
            retired: AtomicPtr::new(ptr::null_mut()),
        }
    }

    fn lock(&self, address: usize) -> MutexGuard<'_, Bucket> {
        self.buckets[bucket_of(address)]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Allocates from the system and registers the block. `word` gives its flag bits.
    /// Returns `None` when the layout overflows or the system refuses.
    pub(crate) fn allocate(
        &self,
        size: usize,
        align: usize,
        extra: usize,
        word: u32,
    ) -> Result<NonNull<LargeHeader>, AllocError> {
        let too_large = AllocError::TooLarge { size, align };
        let align = align.max(align_of::<LargeHeader>());
        let offset = size_of::<LargeHeader>().next_multiple_of(align);
        let total = offset
            .checked_add(size)
            .and_then(|total| total.checked_add(extra))
            .ok_or(too_large)?;
        let layout = Layout::from_size_align(total, align).map_err(|_| too_large)?;
        // SAFETY: `total` includes the header, so the layout is not zero-sized.
        let base = NonNull::new(unsafe { System.alloc(layout) })
            .ok_or(AllocError::OutOfMemory { size })?;
        let header = base.cast::<LargeHeader>();
        // SAFETY: `base` is a fresh allocation aligned for the header and large enough.
        let user = unsafe { base.add(offset) }.as_ptr().addr();
        // SAFETY: as above; nothing else knows this memory yet.
        unsafe {
            header.as_ptr().write(LargeHeader {
                user,
                size,
                layout,
                offset,
                word: AtomicU32::new(word),
                next: ptr::null_mut(),
                record: TrackRecord::new(),
            });
        }
        Ok(header)
    }

    /// Makes a block allocated by [`Self::allocate`] findable.
    pub(crate) fn insert(&self, header: NonNull<LargeHeader>) {
        // SAFETY: the header is live and not yet shared.
        let user = unsafe { (*header.as_ptr()).user };
        let mut bucket = self.lock(user);
        // SAFETY: the bucket lock is held; `next` is only touched under it.
        unsafe { (*header.as_ptr()).next = bucket.head };
        bucket.head = header.as_ptr();
    }

    /// Unlinks the block whose caller address is `user`, if there is one.
    pub(crate) fn remove(&self, user: usize) -> Option<NonNull<LargeHeader>> {
        let mut bucket = self.lock(user);
        let mut link: *mut *mut LargeHeader = &raw mut bucket.head;
        // SAFETY: every header on the bucket list is live and its `next` field is only
        // touched under the bucket lock, which is held.
        unsafe {
            while let Some(header) = NonNull::new(*link) {
                if (*header.as_ptr()).user == user {
                    *link = (*header.as_ptr()).next;
                    return Some(header);
                }
                link = &raw mut (*header.as_ptr()).next;
            }
        }
        None
    }

    /// The requested size of the live block whose caller address is `user`.
    pub(crate) fn size_of(&self, user: usize) -> Option<usize> {
        let bucket = self.lock(user);
        let mut cursor = bucket.head;
        // SAFETY: headers on the list are live while the bucket lock is held.
        unsafe {
            while let Some(header) = NonNull::new(cursor) {
                if (*header.as_ptr()).user == user {
                    return Some((*header.as_ptr()).size);
                }
                cursor = (*header.as_ptr()).next;
            }
        }
        None
    }

    /// Gives an unlinked block back to the system one free later.
    ///
    /// The caller freeing a block may still hold a borrow of its bytes for the rest of
    /// its own call (a `Box` being dropped does, as far as Rust's aliasing rules go), and
    /// the system allocation also holds our header, so releasing it at once through the
    /// header's pointer would end that borrow early. Deferring the release by one free
    /// ends it only after the caller has returned; it also keeps the latest freed block
    /// unreused for a while, which helps expose late writes.
    ///
    /// # Safety
    ///
    /// - `header` must come from [`Self::allocate`], be unlinked, and never be used
    ///   again by the caller.
    pub(crate) unsafe fn retire(&self, header: NonNull<LargeHeader>) {
        let previous = self.retired.swap(header.as_ptr(), Ordering::AcqRel);
        if let Some(previous) = NonNull::new(previous) {
            // SAFETY: blocks only reach `retired` unlinked and unused, and the swap gave
            // this one to us alone.
            unsafe { Self::release(previous) };
        }
    }

    /// Gives the memory of an unlinked block back to the system.
    ///
    /// # Safety
    ///
    /// - `header` must come from [`Self::allocate`], be unlinked, and never be used again.
    pub(crate) unsafe fn release(header: NonNull<LargeHeader>) {
        // SAFETY: the header is live until the dealloc below.
        let layout = unsafe { (*header.as_ptr()).layout };
        // SAFETY: the memory came from `System.alloc` with this layout.
        unsafe { System.dealloc(header.as_ptr().cast(), layout) };
    }

    /// Calls `visit` on every live block while holding its bucket lock, so blocks cannot
    /// be freed during the visit. `visit` must not allocate.
    pub(crate) fn for_each(&self, mut visit: impl FnMut(NonNull<LargeHeader>)) {
        for bucket in &self.buckets {
            let bucket = bucket.lock().unwrap_or_else(PoisonError::into_inner);
            let mut cursor = bucket.head;
            while let Some(header) = NonNull::new(cursor) {
                visit(header);
                // SAFETY: the bucket lock is held, so the header stays live.
                cursor = unsafe { (*header.as_ptr()).next };
            }
        }
    }
}
