//! The error type of memory-tier.

use std::ops::Range;

/// Everything that can go wrong while attaching to a region or patching it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A byte-tier operation (parsing the header, the journal, a codec) failed.
    #[error("byte tier")]
    Bytes(#[from] byte_tier::Error),
    /// An operating-system call failed.
    #[error("{action}")]
    Os {
        /// What was being done.
        action: &'static str,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Changing page protection failed.
    #[error("changing page protection of {len} bytes at region offset {offset} failed")]
    Protect {
        /// Region offset of the pages.
        offset: usize,
        /// Their length.
        len: usize,
        /// The underlying error.
        #[source]
        source: region::Error,
    },
    /// A raw region is not page-aligned, so it cannot be protected without touching
    /// memory outside it.
    #[error(
        "a raw region must start and end on page boundaries ({page} bytes): start {start:#x}, length {len}"
    )]
    UnalignedRegion {
        /// Its start address.
        start: usize,
        /// Its length.
        len: usize,
        /// The page size.
        page: usize,
    },
    /// A byte range is outside the region.
    #[error("range {start}..{end} is outside the region of {len} bytes")]
    OutsideRegion {
        /// Start of the range.
        start: u64,
        /// End of the range.
        end: u64,
        /// The region's length.
        len: u64,
    },
    /// A write would leave its target tensor.
    #[error("patch {patch:?}: range {start}..{end} leaves tensor {tensor:?}")]
    OutsideTensor {
        /// The patch.
        patch: String,
        /// The tensor.
        tensor: String,
        /// Start (absolute).
        start: u64,
        /// End (absolute).
        end: u64,
    },
    /// No tensor has this name.
    #[error("no tensor named {0:?}")]
    NoSuchTensor(String),
    /// No patch has this id or name.
    #[error("no patch {0:?}")]
    NoSuchPatch(String),
    /// A patch overlaps an applied patch of equal or higher priority.
    #[error(
        "patch {patch:?} conflicts with applied patch {applied:?} (priority {applied_priority}) on bytes {overlap:?}"
    )]
    Conflict {
        /// The patch refused.
        patch: String,
        /// The applied patch in the way.
        applied: String,
        /// Its priority.
        applied_priority: i32,
        /// The overlapping byte range.
        overlap: Range<u64>,
    },
    /// The bytes under a patch are not the ones it wrote (someone else changed them), so
    /// it cannot be reverted safely.
    #[error("patch {patch:?}: the bytes at {offset} changed since it was applied")]
    ChecksumMismatch {
        /// The patch.
        patch: String,
        /// Start of its range.
        offset: u64,
    },
    /// The patch is already applied.
    #[error("patch {0:?} is already applied")]
    AlreadyApplied(String),
    /// The patch is disabled.
    #[error("patch {0:?} is disabled")]
    Disabled(String),
    /// A payload does not fit its target.
    #[error("patch {patch:?}: {reason}")]
    InvalidPatch {
        /// The patch.
        patch: String,
        /// What is wrong.
        reason: String,
    },
    /// The region was attached read-only: nothing can be written.
    #[error("the region is attached read-only")]
    ReadOnly,
    /// A write failed, and writing back the bytes it had replaced failed too: the
    /// region may hold part of the change. On a shared file the journal still holds the
    /// original bytes, and attaching again (or `hotpatch recover`) rolls it back.
    #[error("{error}; restoring the original bytes also failed: {restore}")]
    RestoreFailed {
        /// What failed first.
        error: Box<Error>,
        /// What failed while restoring.
        restore: Box<Error>,
    },
    /// Pages of a shared file mapping cannot be made writable by hand: a write through
    /// them would reach the file without a journal record.
    #[error(
        "pages of a shared file mapping cannot be made writable by hand: writes there go through patches, which the journal records"
    )]
    SharedFileProtection,
    /// A transaction failed and every byte it wrote was restored.
    #[error("transaction rolled back after patch {failed:?} failed")]
    RolledBack {
        /// The patch that failed.
        failed: String,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// The agent's socket could not be reached.
    #[error("cannot reach the agent at {socket}: is the server running under `hotpatch launch`?")]
    AgentConnect {
        /// The socket.
        socket: std::path::PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A frame to or from the agent failed.
    #[error("talking to the agent at {socket}")]
    AgentChannel {
        /// The socket.
        socket: std::path::PathBuf,
        /// What failed.
        #[source]
        source: crate::agent::proto::FrameError,
    },
    /// The agent refused a request; it wrote nothing.
    #[error("the agent refused")]
    AgentRefused(#[source] crate::agent::proto::AgentError),
    /// The server holds a tensor of another size than the file's: it serves another model.
    #[error(
        "tensor {tensor:?} has {file_bytes} bytes in the file but {server_bytes} in the server: the server runs another model"
    )]
    AgentTensorMismatch {
        /// The tensor.
        tensor: String,
        /// Its size in the file.
        file_bytes: u64,
        /// Its size in the server.
        server_bytes: u64,
    },
    /// The server did not place this tensor where the agent saw it.
    #[error(
        "the agent never saw tensor {tensor:?} placed (the server loaded it without a call the agent watches, e.g. a CPU buffer with --no-mmap)"
    )]
    AgentUnseenTensor {
        /// The tensor.
        tensor: String,
    },
    /// A tensor the server reads straight from the file mapping can only be patched
    /// through the file.
    #[error(
        "tensor {tensor:?} is read by the server straight from the file mapping: only a change of the file reaches it (use --persist, which journals the file)"
    )]
    FileViewNeedsFile {
        /// The tensor.
        tensor: String,
    },
    /// Patches kept only in the server's memory would be written to the file.
    #[error(
        "the agent holds {count} memory-only patch(es); revert them first, or keep patching memory-only (without --persist)"
    )]
    AgentMemoryOnlyPatches {
        /// How many.
        count: usize,
    },
    /// A record kept by the agent is not one this library wrote.
    #[error("the agent's record {key:?} is not a patch record: {reason}")]
    AgentRecord {
        /// Its key.
        key: String,
        /// Why.
        reason: String,
    },
    /// The server changed but the library's model could not follow (and the reverse).
    #[error("the server and the model disagree after a failed write; revert patch {patch:?} again")]
    AgentDiverged {
        /// The patch.
        patch: String,
        /// What failed.
        #[source]
        source: Box<Error>,
    },
    /// The model changed between a plan and its apply: the plan no longer says what
    /// applying it would do, so it is refused (plan again).
    #[error("{model}: the model changed since the plan was made ({what}); plan again")]
    StalePlan {
        /// The model's file, or "the model".
        model: String,
        /// What changed: its length, its applied patches or the bytes the plan read.
        what: String,
    },
}

/// The result type of memory-tier.
pub type Result<T, E = Error> = std::result::Result<T, E>;
