//! byte-tier: the GGUF format and byte-level work on GGUF files.
//!
//! It parses every GGUF version (1, 2 and 3) from a byte slice or a read-only memory map
//! without copying tensor data, checks every count, length and range before trusting it,
//! knows every ggml tensor type's block layout, and writes GGUF v3 files atomically with
//! tensor data streamed from its source. It never speaks HTTP, never prints and knows
//! nothing of live regions, presets or pipelines.

#![deny(unsafe_code)]

pub mod codec;
pub mod diff;
pub mod edit;
mod error;
mod file;
mod gguf;
pub mod imatrix;
mod inplace;
mod journal;
pub mod named;
pub mod ops;
mod patcher;
pub mod plan;
pub mod split;
pub mod surgery;
pub mod tensor_edit;
mod types;
mod value;
pub mod verify;
mod writer;

pub use error::{Error, Result, SpaceLimit};
pub use file::{MappedFile, evict_from_page_cache, memlock_limit};
pub use gguf::{
    ALIGNMENT_KEY, DEFAULT_ALIGNMENT, Gguf, LayoutDiagnostic, MAGIC, MAX_ARRAY_DEPTH,
    MAX_DIAGNOSTICS, MAX_DIMS, MetadataEntry, TensorInfo, align_up,
};
pub use inplace::{InPlaceFile, RecoveryReport, recover};
pub use journal::{Journal, Transaction, TransactionState, UndoEntry, failpoint, journal_path};
pub use patcher::{
    BufferPatcher, BytePatcher, ByteWrite, DryRun, EditReceipt, check_range, tensor_range,
};
pub use types::GgmlType;
pub use value::{Array, ArrayIter, ArrayRef, GgufStr, Value, ValueRef, ValueType};
pub use writer::{GgufWriter, Layout, TensorData, TensorSpec, WRITE_VERSION, parent_dir, sync_dir};
