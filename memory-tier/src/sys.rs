//! The platform layer: page size, page protection and the mappings. Every `unsafe`
//! block of the crate is here, each after the checks that make it sound.

#![allow(unsafe_code)]

use std::fs::File;
use std::ops::Range;
use std::ptr::NonNull;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use memmap2::{MmapMut, MmapOptions};

use crate::error::{Error, Result};

/// The size of a memory page.
pub fn page_size() -> usize {
    region::page::size()
}

/// Memory that backs a live region: where it comes from, and its start and length,
/// taken once when it is created so that every write goes through that one pointer.
#[derive(Debug)]
pub struct Mapping {
    backing: Backing,
    start: NonNull<u8>,
    len: usize,
}

/// Where a region's memory comes from.
#[derive(Debug)]
pub enum Backing {
    /// A shared writable mapping of a file: writes reach the page cache that every
    /// process mapping the file sees, and the file.
    Shared(MmapMut),
    /// A private copy-on-write mapping of a file: writes stay in this process.
    Private(
        #[allow(dead_code, reason = "held so the mapping lives as long as the region")] MmapMut,
    ),
    /// Anonymous memory holding a copy.
    Owned(#[allow(dead_code, reason = "held so the mapping lives as long as the region")] MmapMut),
    /// Memory the caller owns.
    Raw,
}

// SAFETY: the raw backing is only created through `attach_raw`, whose caller promises
// the memory stays valid and is not written behind our back while attached; every other
// variant owns its mapping. Nothing outside this module reads or writes through the
// pointer: reads and writes go through a `Region`'s lock.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` gives no access to the bytes, only `Region`'s guards do.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn from_map(mut map: MmapMut, wrap: fn(MmapMut) -> Backing) -> Result<Mapping> {
        let len = map.len();
        let start = NonNull::new(map.as_mut_ptr()).ok_or(Error::Os {
            action: "map memory",
            source: std::io::Error::other("null mapping"),
        })?;
        Ok(Mapping {
            backing: wrap(map),
            start,
            len,
        })
    }

    /// Which kind of memory this is.
    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// A shared writable mapping of `file`.
    pub fn shared(file: &File) -> Result<Mapping> {
        // SAFETY: the mapping is shared with other processes by design (a running
        // llama-server maps the same file). Truncating the file while it is mapped would
        // fault on access; the documented rule is that nobody truncates a live model.
        let map = unsafe { MmapMut::map_mut(file) }.map_err(|source| Error::Os {
            action: "map the file shared and writable",
            source,
        })?;
        Mapping::from_map(map, Backing::Shared)
    }

    /// A private copy-on-write mapping of `file`.
    pub fn private(file: &File) -> Result<Mapping> {
        // SAFETY: as for `shared`; writes are private to this process.
        let map = unsafe { MmapOptions::new().map_copy(file) }.map_err(|source| Error::Os {
            action: "map the file copy-on-write",
            source,
        })?;
        Mapping::from_map(map, Backing::Private)
    }

    /// Anonymous memory holding a copy of `bytes`.
    pub fn owned(bytes: &[u8]) -> Result<Mapping> {
        let mut map = MmapMut::map_anon(bytes.len().max(1)).map_err(|source| Error::Os {
            action: "map anonymous memory",
            source,
        })?;
        map[..bytes.len()].copy_from_slice(bytes);
        let mut mapping = Mapping::from_map(map, Backing::Owned)?;
        mapping.len = bytes.len();
        Ok(mapping)
    }

    /// The caller's memory.
    ///
    /// # Safety
    ///
    /// - `start..start + len` is valid, readable and writable memory for as long as the
    ///   mapping lives;
    /// - nothing else writes to it, frees it or changes its protection while attached;
    /// - `start` and `len` are multiples of the page size (checked).
    pub unsafe fn raw(start: NonNull<u8>, len: usize) -> Result<Mapping> {
        let page = page_size();
        if !(start.as_ptr() as usize).is_multiple_of(page) || !len.is_multiple_of(page) || len == 0
        {
            return Err(Error::UnalignedRegion {
                start: start.as_ptr() as usize,
                len,
                page,
            });
        }
        Ok(Mapping {
            backing: Backing::Raw,
            start,
            len,
        })
    }

    /// Start of the memory.
    pub fn start(&self) -> *mut u8 {
        self.start.as_ptr()
    }

    /// Length in bytes (the data, not rounded to pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// The bytes, read-only. Private: every reader outside this module goes through a
    /// [`RegionRead`] or [`RegionWrite`], whose lock keeps writers out while the slice
    /// lives.
    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is valid for `len` bytes for its whole life (owned, or
        // promised by `raw`'s caller), and its pages are always readable: protection only
        // ever toggles between read-only and read-write. No write can change these bytes
        // while the slice lives: writes go only through a `Window`, which borrows the
        // region's write guard exclusively, and every caller of this function holds that
        // guard or a read guard of the same lock for the slice's lifetime.
        unsafe { std::slice::from_raw_parts(self.start(), self.len()) }
    }

    /// Makes the pages covering `offset..offset + len` (rounded out to pages, clipped to
    /// the mapping's pages) read-only or read-write. Private: a [`Window`] opens pages
    /// and closes them again; [`RegionWrite::set_protection`] does it by hand.
    fn protect(&self, offset: usize, len: usize, writable: bool) -> Result<()> {
        let page = page_size();
        let first = offset / page * page;
        let end = (offset + len).div_ceil(page) * page;
        let mapped_end = self.len().div_ceil(page) * page;
        let end = end.min(mapped_end);
        if end <= first {
            return Ok(());
        }
        let protection = if writable {
            region::Protection::READ_WRITE
        } else {
            region::Protection::READ
        };
        // Miri has no page protection: under it the region logic runs with every page
        // left as it is (the protection itself is checked by the tests that fault on
        // purpose, outside Miri).
        if cfg!(miri) {
            return Ok(());
        }
        // SAFETY: `first..end` lies inside pages this mapping owns (or was given by
        // `raw`, page-aligned): the start is page-aligned and the end is clipped to the
        // mapping's last page, so no other memory changes protection.
        unsafe { region::protect(self.start().add(first), end - first, protection) }.map_err(
            |source| Error::Protect {
                offset: first,
                len: end - first,
                source,
            },
        )
    }

    /// Flushes written pages of a shared file mapping to the file.
    pub fn flush(&self, offset: usize, len: usize) -> Result<()> {
        match &self.backing {
            Backing::Shared(m) => m.flush_range(offset, len).map_err(|source| Error::Os {
                action: "flush the mapping to the file",
                source,
            }),
            _ => Ok(()),
        }
    }
}

/// A mapping and the lock that decides who reads and who writes it: the only way to
/// its bytes. Readers hold a [`RegionRead`]; a writer holds the one [`RegionWrite`], and
/// only a [`Window`] borrowed from it exclusively can write, so no `&[u8]` handed out by
/// either guard can alias a write. The lock also guards the caller's state `S` (the
/// patches, the history), so that the bytes and the record of them change together.
#[derive(Debug)]
pub struct Region<S> {
    mapping: Mapping,
    state: RwLock<S>,
}

impl<S> Region<S> {
    /// Guards `mapping` and `state` with one lock.
    pub fn new(mapping: Mapping, state: S) -> Region<S> {
        Region {
            mapping,
            state: RwLock::new(state),
        }
    }

    /// The mapping (its kind, start and length; never its bytes).
    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// Shared access: the bytes and the state, while no writer runs.
    pub fn read(&self) -> RegionRead<'_, S> {
        RegionRead {
            mapping: &self.mapping,
            state: self.state.read().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Exclusive access: the bytes, the state, and writable windows.
    pub fn write(&self) -> RegionWrite<'_, S> {
        RegionWrite {
            mapping: &self.mapping,
            state: self.state.write().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

/// A reader's hold on a region: the bytes do not change while it lives.
#[derive(Debug)]
pub struct RegionRead<'a, S> {
    mapping: &'a Mapping,
    state: RwLockReadGuard<'a, S>,
}

impl<S> RegionRead<'_, S> {
    /// The region's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.mapping.bytes()
    }
}

impl<S> std::ops::Deref for RegionRead<'_, S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.state
    }
}

/// The writer's hold on a region. Slices from [`RegionWrite::bytes`] or
/// [`RegionWrite::parts`] borrow it; a [`Window`] borrows it exclusively, so the borrow
/// checker ends every slice before a byte can change.
#[derive(Debug)]
pub struct RegionWrite<'a, S> {
    mapping: &'a Mapping,
    state: RwLockWriteGuard<'a, S>,
}

impl<S> RegionWrite<'_, S> {
    /// The region's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.mapping.bytes()
    }

    /// The bytes and the state at once, the state writable.
    pub fn parts(&mut self) -> (&[u8], &mut S) {
        (self.mapping.bytes(), &mut self.state)
    }

    /// Makes the pages covering `bytes` writable until the window is dropped.
    pub fn window(&mut self, bytes: Range<usize>) -> Result<Window<'_>> {
        let page = page_size();
        let pages = bytes.start / page * page..bytes.end.div_ceil(page) * page;
        self.mapping
            .protect(pages.start, pages.end - pages.start, true)?;
        Ok(Window {
            mapping: self.mapping,
            pages,
        })
    }

    /// Changes the protection of the pages covering `offset..offset + len` by hand.
    pub fn set_protection(&mut self, offset: usize, len: usize, writable: bool) -> Result<()> {
        self.mapping.protect(offset, len, writable)
    }

    /// Flushes written pages of a shared file mapping to the file.
    pub fn flush(&self, offset: usize, len: usize) -> Result<()> {
        self.mapping.flush(offset, len)
    }
}

impl<S> std::ops::Deref for RegionWrite<'_, S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.state
    }
}

impl<S> std::ops::DerefMut for RegionWrite<'_, S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.state
    }
}

/// Writable pages of a region: the only thing that can write to it. Made writable when
/// it is opened and read-only again when it is dropped, also on error and on panic.
#[must_use]
#[derive(Debug)]
pub struct Window<'a> {
    mapping: &'a Mapping,
    pages: Range<usize>,
}

impl Window<'_> {
    /// Copies `bytes` to `offset`, which must lie inside the window's pages.
    pub fn write(&self, offset: usize, bytes: &[u8]) -> Result<()> {
        let end = offset.checked_add(bytes.len());
        if offset < self.pages.start || end.is_none_or(|e| e > self.pages.end.min(self.mapping.len))
        {
            return Err(Error::OutsideRegion {
                start: offset as u64,
                end: offset as u64 + bytes.len() as u64,
                len: self.mapping.len as u64,
            });
        }
        // SAFETY: the range is inside the mapping and inside the pages this window made
        // writable (checked above). The window borrows the region's write guard
        // exclusively, so no reader's slice of these bytes is alive and no other writer
        // runs. `bytes` is a caller's buffer, never the mapping's own memory: every slice
        // of the mapping is borrowed from a guard that the window's borrow excludes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.mapping.start().add(offset),
                bytes.len(),
            )
        }
        Ok(())
    }

    /// Stores `value` at `offset` as one atomic 32- or 64-bit store, or compares and
    /// exchanges it. The word must lie inside the window's pages.
    pub fn atomic_word(
        &self,
        offset: usize,
        width: usize,
        current: Option<u64>,
        new: u64,
    ) -> Result<Result<u64, u64>> {
        if !(width == 4 || width == 8)
            || !offset.is_multiple_of(width)
            || offset < self.pages.start
            || offset + width > self.mapping.len.min(self.pages.end)
        {
            return Err(Error::OutsideRegion {
                start: offset as u64,
                end: (offset + width) as u64,
                len: self.mapping.len as u64,
            });
        }
        use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
        // SAFETY: the word is inside the mapping and inside this window's writable pages,
        // aligned to its width (checked above; the mapping is page-aligned so the address
        // is too). Atomics on memory shared with other processes are sound for plain
        // loads and stores of aligned words.
        let ptr = unsafe { self.mapping.start().add(offset) };
        let result = if width == 4 {
            // SAFETY: aligned, valid and writable as established above.
            let word = unsafe { AtomicU32::from_ptr(ptr.cast::<u32>()) };
            match current {
                None => Ok(u64::from(word.swap(new as u32, Ordering::SeqCst))),
                Some(c) => word
                    .compare_exchange(c as u32, new as u32, Ordering::SeqCst, Ordering::SeqCst)
                    .map(u64::from)
                    .map_err(u64::from),
            }
        } else {
            // SAFETY: aligned, valid and writable as established above.
            let word = unsafe { AtomicU64::from_ptr(ptr.cast::<u64>()) };
            match current {
                None => Ok(word.swap(new, Ordering::SeqCst)),
                Some(c) => word.compare_exchange(c, new, Ordering::SeqCst, Ordering::SeqCst),
            }
        };
        Ok(result)
    }
}

impl Drop for Window<'_> {
    fn drop(&mut self) {
        // Failing to make pages read-only again would leave them writable: there is no
        // safe way to go on, so the process stops rather than run unprotected.
        if let Err(error) =
            self.mapping
                .protect(self.pages.start, self.pages.end - self.pages.start, false)
        {
            eprintln!("memory-tier: cannot restore read-only protection: {error}");
            std::process::abort();
        }
    }
}
