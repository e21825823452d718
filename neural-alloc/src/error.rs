//! The crate's error type.

use crate::report::CorruptionKind;

/// Why an allocation, free or reallocation did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AllocError {
    /// The request cannot be represented: its size plus header and guard bytes overflow,
    /// or the alignment is not a power of two.
    #[error("request of {size} bytes aligned to {align} is too large")]
    TooLarge {
        /// Requested size in bytes.
        size: usize,
        /// Requested alignment in bytes.
        align: usize,
    },
    /// The system refused memory.
    #[error("out of memory allocating {size} bytes")]
    OutOfMemory {
        /// Requested size in bytes.
        size: usize,
    },
    /// The pointer was not a live block of this allocator; a corruption report was
    /// filed and nothing was freed.
    #[error("{kind} at {address:#x}")]
    Corruption {
        /// What was found.
        kind: CorruptionKind,
        /// The pointer's address.
        address: usize,
    },
}
