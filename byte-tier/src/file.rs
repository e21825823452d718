//! Opening a GGUF file for reading: a read-only memory map, so that parsing touches only
//! the header pages and tensor data is never copied.

#![allow(unsafe_code)]

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Advice, Mmap};

use crate::error::{Error, Result};
use crate::gguf::Gguf;

/// A GGUF file mapped read-only.
#[derive(Debug)]
pub struct MappedFile {
    path: PathBuf,
    bytes: Bytes,
    /// The open file behind the mapping (for copies the kernel makes from it).
    file: File,
}

#[derive(Debug)]
enum Bytes {
    Mapped(Mmap),
    /// An empty file cannot be mapped; it is held as an empty buffer.
    Empty,
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: impl AsRef<Path>) -> Result<MappedFile> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", path, e))?
            .len();
        let bytes = if len == 0 {
            Bytes::Empty
        } else {
            // SAFETY: the mapping is read-only and private to this value. Another process
            // may still write to or truncate the file while it is mapped; writes show
            // through (which live patching relies on) and truncation would fault on
            // access, the documented hazard of every mapped reader, llama.cpp's included.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("map", path, e))?;
            Bytes::Mapped(map)
        };
        Ok(MappedFile {
            path: path.to_owned(),
            bytes,
            file,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Mapped(map) => map,
            Bytes::Empty => &[],
        }
    }

    /// Parses and checks the file.
    pub fn parse(&self) -> Result<Gguf<'_>> {
        Ok(Gguf::parse(self.bytes())?.with_source(&self.file))
    }

    fn map(&self) -> Option<&Mmap> {
        match &self.bytes {
            Bytes::Mapped(map) => Some(map),
            Bytes::Empty => None,
        }
    }

    /// Asks the kernel to read the whole file into the page cache ahead of use
    /// (`madvise(MADV_WILLNEED)`); it returns at once and the reads go on in the
    /// background.
    pub fn advise_will_need(&self) -> Result<()> {
        self.advise(Advice::WillNeed, "madvise(WILLNEED)")
    }

    /// Asks for transparent huge pages over the mapping (`madvise(MADV_HUGEPAGE)`). The
    /// kernel refuses (an error) when it was built without them; for a file on a regular
    /// file system it accepts the advice but backs the pages with huge pages only when
    /// read-only file THP is enabled.
    pub fn advise_huge_pages(&self) -> Result<()> {
        self.advise(Advice::HugePage, "madvise(HUGEPAGE)")
    }

    /// Returns to the default read-ahead behaviour (`madvise(MADV_NORMAL)`).
    pub fn advise_normal(&self) -> Result<()> {
        self.advise(Advice::Normal, "madvise(NORMAL)")
    }

    fn advise(&self, advice: Advice, action: &'static str) -> Result<()> {
        match self.map() {
            Some(map) => map
                .advise(advice)
                .map_err(|e| Error::io(action, &self.path, e)),
            None => Ok(()),
        }
    }

    /// Locks the whole mapping in memory (`mlock`): its pages are read in and stay
    /// resident until [`MappedFile::unlock`] or drop. The kernel refuses with
    /// [`Error::MemoryLockRefused`] when the file is larger than `RLIMIT_MEMLOCK` allows.
    pub fn lock_resident(&self) -> Result<()> {
        let Some(map) = self.map() else {
            return Ok(());
        };
        map.lock().map_err(|e| match e.raw_os_error() {
            Some(libc::ENOMEM | libc::EPERM | libc::EAGAIN) => Error::MemoryLockRefused {
                bytes: map.len() as u64,
                limit: memlock_limit(),
                source: e,
            },
            _ => Error::io("mlock", &self.path, e),
        })
    }

    /// Undoes [`MappedFile::lock_resident`].
    pub fn unlock(&self) -> Result<()> {
        match self.map() {
            Some(map) => map
                .unlock()
                .map_err(|e| Error::io("munlock", &self.path, e)),
            None => Ok(()),
        }
    }
}

/// The soft `RLIMIT_MEMLOCK` in bytes (`None` when unlimited or unknown).
pub fn memlock_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a pointer to a live local.
    let status = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    (status == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Drops a file's clean pages from the page cache (`posix_fadvise(POSIX_FADV_DONTNEED)`
/// after `fdatasync`), so that the next read comes from the disk. Pages that another
/// process holds locked or dirty stay; the kernel treats this as advice.
pub fn evict_from_page_cache(path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
    file.sync_data().map_err(|e| Error::io("sync", path, e))?;
    // SAFETY: posix_fadvise only reads its arguments; the descriptor is open for the
    // duration of the call.
    let status = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if status != 0 {
        return Err(Error::io(
            "posix_fadvise(DONTNEED)",
            path,
            std::io::Error::from_raw_os_error(status),
        ));
    }
    Ok(())
}
