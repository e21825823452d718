//! The platform layer: page size, page protection and the mappings. Every `unsafe`
//! block of the crate is here, each after the checks that make it sound.

#![allow(unsafe_code)]

use std::fs::File;
use std::ptr::NonNull;

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
// variant owns its mapping. Writes are serialized by the region's lock.
unsafe impl Send for Mapping {}
// SAFETY: as above; shared access is read-only outside writable windows.
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

    /// The bytes, read-only.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is valid for `len` bytes for its whole life (owned, or
        // promised by `raw`'s caller), and its pages are always readable: protection only
        // ever toggles between read-only and read-write.
        unsafe { std::slice::from_raw_parts(self.start(), self.len()) }
    }

    /// Makes the pages covering `offset..offset + len` (rounded out to pages, clipped to
    /// the mapping's pages) read-only or read-write.
    pub fn protect(&self, offset: usize, len: usize, writable: bool) -> Result<()> {
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

    /// Copies `bytes` to `offset`. The caller holds a writable window over those pages.
    pub fn write(&self, offset: usize, bytes: &[u8]) {
        assert!(
            offset + bytes.len() <= self.len(),
            "write outside the mapping"
        );
        // SAFETY: the range is inside the mapping (asserted above), the caller holds a
        // writable window over its pages, and the region's lock keeps writers apart;
        // `bytes` cannot overlap the mapping's pages being written, since it is a
        // separate buffer owned by the caller.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.start().add(offset), bytes.len())
        }
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

impl Mapping {
    /// Stores `value` at `offset` as one atomic 32- or 64-bit store, or compares and
    /// exchanges it. The caller holds a writable window over the word's page.
    pub fn atomic_word(
        &self,
        offset: usize,
        width: usize,
        current: Option<u64>,
        new: u64,
    ) -> Result<Result<u64, u64>> {
        if !(width == 4 || width == 8) || !offset.is_multiple_of(width) || offset + width > self.len
        {
            return Err(Error::OutsideRegion {
                start: offset as u64,
                end: (offset + width) as u64,
                len: self.len as u64,
            });
        }
        use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
        // SAFETY: the word is inside the mapping and aligned to its width (checked
        // above), the mapping is page-aligned so the address is too, and the caller holds
        // a writable window over its page. Atomics on memory shared with other processes
        // are sound for plain loads and stores of aligned words.
        let ptr = unsafe { self.start().add(offset) };
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
