//! Typed owners of pool memory: a box for one value and a byte buffer.

use std::alloc::Layout;
use std::fmt;
use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};
use std::panic::Location;
use std::ptr::NonNull;

use crate::NeuralAlloc;
use crate::error::AllocError;

/// A value in a block of a [`NeuralAlloc`], freed when dropped.
pub struct PoolBox<'a, T> {
    pointer: NonNull<T>,
    allocator: &'a NeuralAlloc,
    owns: PhantomData<T>,
}

// SAFETY: a PoolBox owns its value like a Box; the allocator is Sync.
unsafe impl<T: Send> Send for PoolBox<'_, T> {}
// SAFETY: shared access only hands out `&T`.
unsafe impl<T: Sync> Sync for PoolBox<'_, T> {}

impl<'a, T> PoolBox<'a, T> {
    pub(crate) fn new_in(
        allocator: &'a NeuralAlloc,
        value: T,
        site: &'static Location<'static>,
    ) -> Result<Self, AllocError> {
        let state = allocator.state().ok_or(AllocError::OutOfMemory {
            size: size_of::<T>(),
        })?;
        let layout = Layout::new::<T>();
        let block = state
            .allocate(layout.size(), layout.align(), Some(site))?
            .cast::<T>();
        // SAFETY: the block is fresh, large enough and aligned for `T`.
        unsafe { block.as_ptr().write(value) };
        Ok(Self {
            pointer: block,
            allocator,
            owns: PhantomData,
        })
    }

    /// Moves the value out and frees the block, recording the caller as the free site.
    #[track_caller]
    pub fn into_inner(self) -> T {
        let site = Location::caller();
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: the block holds an initialised `T` that we own; it is read once and
        // the box is not dropped afterwards.
        let value = unsafe { this.pointer.as_ptr().read() };
        if let Some(state) = this.allocator.state() {
            let layout = Layout::new::<T>();
            let _ = state.deallocate(
                this.pointer.cast(),
                layout.size(),
                layout.align(),
                Some(site),
            );
        }
        value
    }
}

impl<T> Deref for PoolBox<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the block holds an initialised `T` owned by this box.
        unsafe { self.pointer.as_ref() }
    }
}

impl<T> DerefMut for PoolBox<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { self.pointer.as_mut() }
    }
}

impl<T> Drop for PoolBox<'_, T> {
    fn drop(&mut self) {
        // SAFETY: the block holds an initialised `T` that is dropped exactly once here.
        unsafe { self.pointer.as_ptr().drop_in_place() };
        if let Some(state) = self.allocator.state() {
            let layout = Layout::new::<T>();
            // Drop glue has no caller location to record.
            let _ = state.deallocate(self.pointer.cast(), layout.size(), layout.align(), None);
        }
    }
}

impl<T: fmt::Debug> fmt::Debug for PoolBox<'_, T> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, formatter)
    }
}

/// A byte buffer in a block of a [`NeuralAlloc`], freed when dropped.
pub struct PoolBytes<'a> {
    pointer: NonNull<u8>,
    len: usize,
    allocator: &'a NeuralAlloc,
}

// SAFETY: a PoolBytes owns its bytes; the allocator is Sync.
unsafe impl Send for PoolBytes<'_> {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for PoolBytes<'_> {}

impl<'a> PoolBytes<'a> {
    pub(crate) fn zeroed_in(
        allocator: &'a NeuralAlloc,
        len: usize,
        site: &'static Location<'static>,
    ) -> Result<Self, AllocError> {
        let state = allocator
            .state()
            .ok_or(AllocError::OutOfMemory { size: len })?;
        let block = state.allocate(len, 1, Some(site))?;
        // SAFETY: the block is fresh and holds `len` bytes.
        unsafe { block.as_ptr().write_bytes(0, len) };
        Ok(Self {
            pointer: block,
            len,
            allocator,
        })
    }

    /// Changes the length, keeping the common prefix and zeroing new bytes; the block
    /// moves to another class when needed.
    ///
    /// # Errors
    ///
    /// As for [`NeuralAlloc::allocate`]; the buffer is unchanged on error.
    #[track_caller]
    pub fn resize(&mut self, new_len: usize) -> Result<(), AllocError> {
        let site = Location::caller();
        let state = self
            .allocator
            .state()
            .ok_or(AllocError::OutOfMemory { size: new_len })?;
        let moved = state.reallocate(self.pointer, new_len, 1, Some(site))?;
        if new_len > self.len {
            // SAFETY: the block now holds `new_len` bytes; the tail is ours to zero.
            unsafe {
                moved
                    .as_ptr()
                    .add(self.len)
                    .write_bytes(0, new_len - self.len)
            };
        }
        self.pointer = moved;
        self.len = new_len;
        Ok(())
    }

    /// Number of bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Address of the first byte (for tests and diagnostics).
    pub fn as_ptr(&self) -> *const u8 {
        self.pointer.as_ptr()
    }
}

impl Deref for PoolBytes<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the block holds `len` initialised bytes owned by this buffer.
        unsafe { std::slice::from_raw_parts(self.pointer.as_ptr(), self.len) }
    }
}

impl DerefMut for PoolBytes<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access unique.
        unsafe { std::slice::from_raw_parts_mut(self.pointer.as_ptr(), self.len) }
    }
}

impl Drop for PoolBytes<'_> {
    fn drop(&mut self) {
        if let Some(state) = self.allocator.state() {
            let _ = state.deallocate(self.pointer, self.len, 1, None);
        }
    }
}

impl fmt::Debug for PoolBytes<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("PoolBytes")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}
