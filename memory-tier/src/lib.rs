//! memory-tier: a live model region guarded by the operating system.
//!
//! A [`LiveModel`] attaches to a GGUF model in memory (a shared or private mapping of the
//! file, an owned copy, or a region an engine owns), keeps its pages read-only and opens
//! page-aligned writable windows only for the bytes a patch writes. Patches are checked
//! before any byte moves (inside the region, inside their tensor, whole blocks), settle
//! overlaps by priority, apply all-or-nothing, keep compact undo data, and are recorded
//! in a history; a shared file mapping also journals every change through byte-tier, so
//! a crash leaves the file old or new. It never speaks HTTP and knows nothing of presets
//! or pipelines. Unsafe code lives only in `sys`.

#![deny(unsafe_code)]

pub mod agent;
mod error;
mod live;
mod note;
mod ops;
mod patch;
mod rcu;
mod set;
mod sys;

pub use agent::{AgentClient, AgentModel};
pub use error::{Error, Result};
pub use live::{
    Action, AppliedPatch, AttachMode, ConflictReport, Event, HistoryEntry, LiveModel, LivePlan,
    MemoryPatcher, PatchPlan, PatchReport, PatchStamp, PlannedPatch, RangeView, ReadGuard, Stats,
    WindowPolicy,
};
pub use ops::{LayerSkipSet, block_tensors};
pub use patch::{MemoryPatch, PatchKind, PatchTarget, Payload, ValueTransform};
pub use rcu::{TensorData, TensorTable};
pub use set::LiveSet;
pub use sys::page_size;
