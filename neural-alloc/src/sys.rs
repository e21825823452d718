//! Platform calls: mapping and unmapping memory, writing to standard error, capturing
//! return addresses and naming the module a code address belongs to.
//!
//! Every call into the C library lives here. Under Miri, which cannot run `mmap`,
//! `backtrace` or `dladdr`, memory comes from [`std::alloc::System`] and the
//! diagnostic calls do nothing.

use std::ptr::NonNull;

/// Size of a page, assumed for rounding mapped lengths. Mapping rounds up anyway; this
/// only keeps our own arithmetic honest.
pub(crate) const PAGE_SIZE: usize = 4096;

/// Maps `len` bytes of zeroed, readable and writable memory aligned to `align`.
///
/// `len` and `align` must be multiples of [`PAGE_SIZE`] and `align` a power of two;
/// returns `None` when the system refuses or the request overflows.
pub(crate) fn map_zeroed(len: usize, align: usize) -> Option<NonNull<u8>> {
    debug_assert!(len.is_multiple_of(PAGE_SIZE) && align.is_power_of_two());
    imp::map_zeroed(len, align)
}

/// Reserves `len` bytes of address space aligned to `align`, readable and writable and
/// reading as zeros, whose pages cost memory only once written (the kernel backs unwritten
/// pages with its shared zero page and does not count them against the commit limit).
/// Huge pages are refused, so writing one slab commits that slab's pages only.
///
/// Same rules for `len` and `align` as [`map_zeroed`]; never given back.
pub(crate) fn reserve(len: usize, align: usize) -> Option<NonNull<u8>> {
    debug_assert!(len.is_multiple_of(PAGE_SIZE) && align.is_power_of_two());
    imp::reserve(len, align)
}

/// Gives the pages of `len` bytes at `ptr` back to the system; they read as zeros again
/// afterwards.
///
/// # Safety
///
/// - `[ptr, ptr + len)` must lie in memory from [`reserve`], page-aligned, with nothing
///   else using it.
pub(crate) unsafe fn discard(ptr: NonNull<u8>, len: usize) {
    // SAFETY: as required of our caller.
    unsafe { imp::discard(ptr, len) }
}

/// Gives back memory obtained from [`map_zeroed`].
///
/// # Safety
///
/// - `ptr`, `len` and `align` must be exactly those of one earlier [`map_zeroed`] call
///   that returned `ptr`, and that memory must not have been unmapped already.
/// - Nothing may access the memory after this call.
pub(crate) unsafe fn unmap(ptr: NonNull<u8>, len: usize, align: usize) {
    // SAFETY: the caller passes a live mapping with its own length and alignment.
    unsafe { imp::unmap(ptr, len, align) }
}

/// The value of environment variable `name` as a decimal number, read without
/// allocating; `None` when unset, empty, not a number or too large.
pub(crate) fn env_number(name: &std::ffi::CStr) -> Option<usize> {
    imp::env_number(name)
}

/// Writes all of `bytes` to standard error without allocating.
pub(crate) fn write_stderr(bytes: &[u8]) {
    imp::write_stderr(bytes);
}

/// Fills `frames` with the return addresses of the current call stack, innermost first,
/// and returns how many were written. Never allocates through the Rust global allocator.
pub(crate) fn capture_frames(frames: &mut [usize]) -> usize {
    imp::capture_frames(frames)
}

/// Nanoseconds of a cheap monotonic clock with a resolution of a few milliseconds.
pub(crate) fn coarse_monotonic_nanos() -> u64 {
    imp::coarse_monotonic_nanos()
}

/// Names the loaded module (executable or shared library) holding the code address
/// `address` and returns it with the module's load address, so that `address - base`
/// can be fed to `addr2line`.
pub(crate) fn module_of(address: usize) -> Option<(String, usize)> {
    imp::module_of(address)
}

#[cfg(not(miri))]
mod imp {
    use std::ffi::CStr;
    use std::ptr::{self, NonNull};

    pub(super) fn map_zeroed(len: usize, align: usize) -> Option<NonNull<u8>> {
        map_aligned(len, align, 0)
    }

    pub(super) fn reserve(len: usize, align: usize) -> Option<NonNull<u8>> {
        let memory = map_aligned(len, align, libc::MAP_NORESERVE)?;
        // Advice only: without it the mapping still works, with huge pages allowed.
        // SAFETY: the range is the mapping just made, which nothing else knows about.
        unsafe { libc::madvise(memory.as_ptr().cast(), len, libc::MADV_NOHUGEPAGE) };
        Some(memory)
    }

    /// # Safety
    ///
    /// - Same duties as [`super::discard`].
    pub(super) unsafe fn discard(ptr: NonNull<u8>, len: usize) {
        // SAFETY: the caller guarantees the range is ours, unused and page-aligned; on a
        // private anonymous mapping the pages read as zeros afterwards.
        let result = unsafe { libc::madvise(ptr.as_ptr().cast(), len, libc::MADV_DONTNEED) };
        if result != 0 {
            // The pages stay; zero them so they read as a fresh slab would.
            // SAFETY: as above.
            unsafe { ptr.as_ptr().write_bytes(0, len) };
        }
    }

    /// Maps `len` bytes aligned to `align` with `extra` mapping flags.
    fn map_aligned(len: usize, align: usize, extra: libc::c_int) -> Option<NonNull<u8>> {
        // Over-map by `align` and trim both ends, so the kept part starts aligned.
        let padded = len.checked_add(align)?;
        // SAFETY: an anonymous private mapping at an address the kernel picks touches
        // no existing memory; every argument is a plain value.
        let raw = unsafe {
            libc::mmap(
                ptr::null_mut(),
                padded,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }
        let raw = raw.cast::<u8>();
        let start = raw.addr();
        let aligned = start.checked_add(align - 1)? & !(align - 1);
        let head = aligned - start;
        let tail = padded - head - len;
        if head > 0 {
            // SAFETY: `[raw, raw + head)` is the front of the mapping just made, which
            // nothing else knows about.
            unsafe { libc::munmap(raw.cast(), head) };
        }
        if tail > 0 {
            // SAFETY: `[aligned + len, raw + padded)` is the back of the same mapping;
            // `head + len + tail == padded` keeps it inside.
            unsafe { libc::munmap(raw.add(head + len).cast(), tail) };
        }
        // SAFETY: `head < padded`, so the offset stays inside the mapping.
        NonNull::new(unsafe { raw.add(head) })
    }

    /// # Safety
    ///
    /// - Same duties as [`super::unmap`].
    pub(super) unsafe fn unmap(ptr: NonNull<u8>, len: usize, _align: usize) {
        // SAFETY: the caller guarantees `[ptr, ptr + len)` is one live mapping of ours.
        unsafe { libc::munmap(ptr.as_ptr().cast(), len) };
    }

    pub(super) fn env_number(name: &CStr) -> Option<usize> {
        // SAFETY: `getenv` reads the environment and returns null or a NUL-terminated
        // string that stays valid until the environment changes; it is read at once.
        let value = unsafe { libc::getenv(name.as_ptr()) };
        if value.is_null() {
            return None;
        }
        // SAFETY: non-null, so a NUL-terminated string owned by the environment.
        let digits = unsafe { CStr::from_ptr(value) }.to_bytes();
        if digits.is_empty() {
            return None;
        }
        digits.iter().try_fold(0usize, |number, &digit| {
            if !digit.is_ascii_digit() {
                return None;
            }
            number
                .checked_mul(10)?
                .checked_add(usize::from(digit - b'0'))
        })
    }

    pub(super) fn write_stderr(mut bytes: &[u8]) {
        while !bytes.is_empty() {
            // SAFETY: `bytes` is a live slice; `write` reads at most `bytes.len()` bytes.
            let written = unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
            if written <= 0 {
                return;
            }
            bytes = &bytes[written.unsigned_abs()..];
        }
    }

    pub(super) fn coarse_monotonic_nanos() -> u64 {
        let mut now = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `clock_gettime` writes one timespec into `now`, which lives on our stack.
        let result = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
        if result != 0 {
            return 0;
        }
        let seconds = u64::try_from(now.tv_sec).unwrap_or(0);
        let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
        seconds.saturating_mul(1_000_000_000).saturating_add(nanos)
    }

    pub(super) fn capture_frames(frames: &mut [usize]) -> usize {
        let capacity = libc::c_int::try_from(frames.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: glibc's `backtrace` writes at most `capacity` pointers into the buffer,
        // which is `frames.len()` pointer-sized slots long. It allocates only through
        // the C library's own malloc, never through the Rust global allocator.
        let count = unsafe { libc::backtrace(frames.as_mut_ptr().cast(), capacity) };
        usize::try_from(count).unwrap_or(0).min(frames.len())
    }

    pub(super) fn module_of(address: usize) -> Option<(String, usize)> {
        let mut info = libc::Dl_info {
            dli_fname: ptr::null(),
            dli_fbase: ptr::null_mut(),
            dli_sname: ptr::null(),
            dli_saddr: ptr::null_mut(),
        };
        // SAFETY: `dladdr` only reads the loader's tables and fills `info`, which lives
        // on our stack for the whole call.
        let found = unsafe { libc::dladdr(ptr::without_provenance(address), &mut info) };
        if found == 0 || info.dli_fname.is_null() {
            return None;
        }
        // SAFETY: on success `dli_fname` points to a NUL-terminated path owned by the
        // loader, valid while the module stays loaded; we copy it out at once.
        let name = unsafe { CStr::from_ptr(info.dli_fname) };
        Some((name.to_string_lossy().into_owned(), info.dli_fbase.addr()))
    }
}

#[cfg(miri)]
mod imp {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::io::Write;
    use std::ptr::NonNull;

    pub(super) fn map_zeroed(len: usize, align: usize) -> Option<NonNull<u8>> {
        let layout = Layout::from_size_align(len, align).ok()?;
        // SAFETY: `len` is a non-zero multiple of the page size, so the layout is not
        // zero-sized.
        NonNull::new(unsafe { System.alloc_zeroed(layout) })
    }

    pub(super) fn reserve(len: usize, align: usize) -> Option<NonNull<u8>> {
        map_zeroed(len, align)
    }

    /// # Safety
    ///
    /// - Same duties as [`super::discard`].
    pub(super) unsafe fn discard(ptr: NonNull<u8>, len: usize) {
        // SAFETY: the caller guarantees the range is ours and unused.
        unsafe { ptr.as_ptr().write_bytes(0, len) };
    }

    /// # Safety
    ///
    /// - Same duties as [`super::unmap`].
    pub(super) unsafe fn unmap(ptr: NonNull<u8>, len: usize, align: usize) {
        // SAFETY: `map_zeroed` built this layout from the same `len` and `align`.
        let layout = unsafe { Layout::from_size_align_unchecked(len, align) };
        // SAFETY: the caller passes memory that `map_zeroed` got from `System` with
        // this layout and that is still allocated.
        unsafe { System.dealloc(ptr.as_ptr(), layout) };
    }

    pub(super) fn env_number(_name: &std::ffi::CStr) -> Option<usize> {
        None
    }

    pub(super) fn write_stderr(bytes: &[u8]) {
        let _ = std::io::stderr().write_all(bytes);
    }

    pub(super) fn capture_frames(_frames: &mut [usize]) -> usize {
        0
    }

    pub(super) fn coarse_monotonic_nanos() -> u64 {
        use std::sync::OnceLock;
        use std::time::Instant;
        static START: OnceLock<Instant> = OnceLock::new();
        let start = START.get_or_init(Instant::now);
        u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    pub(super) fn module_of(_address: usize) -> Option<(String, usize)> {
        None
    }
}
