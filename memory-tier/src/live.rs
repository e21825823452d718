//! `LiveModel`: a model region kept read-only by the operating system, patched through
//! page-aligned writable windows, with conflict checks, transactions, layered patches
//! with compact undo storage, history, events and a read guard for engines.
//!
//! Patches are layers. A patch of higher priority that overlaps applied ones displaces
//! them on the bytes it changes: its values are computed as if they were not there, and
//! the bytes it replaced (theirs) are what it keeps to undo. Reverting it brings them
//! back; reverting a covered patch restores only its bytes that nothing above changed,
//! and hands its original bytes to the patch above, which restores them in turn. A
//! shared file mapping records every apply and revert in byte-tier's journal with a note
//! naming the patches, so that attaching again after a restart (or a crash) lists them.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use byte_tier::codec::{self, TransformReport};
use byte_tier::plan::PlannedWrite;
use byte_tier::{ByteWrite, Gguf, Journal, TensorInfo, TransactionState};
use serde::Serialize;
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::note::{Amend, LiveNote, NotedPatch};
use crate::patch::{MemoryPatch, PatchTarget, Payload};
use crate::sys::{Backing, Mapping, Region, RegionRead, RegionWrite, page_size};

/// How to attach to a GGUF file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// A shared writable mapping: every process that maps the file (a llama-server on
    /// CPU with `--no-repack`) sees each change, which is durable and journaled.
    Shared,
    /// A private copy-on-write mapping: changes stay in this process.
    Private,
    /// An anonymous copy of the file: changes stay in this process.
    Owned,
}

/// How writes are grouped into writable windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowPolicy {
    /// Largest window in bytes (rounded to pages); nearby writes share a window up to it.
    pub max_window_bytes: usize,
    /// Group only writes to the same tensor.
    pub within_tensor: bool,
}

impl Default for WindowPolicy {
    fn default() -> WindowPolicy {
        WindowPolicy {
            max_window_bytes: 1 << 20,
            within_tensor: false,
        }
    }
}

/// Counters of what the model has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Patches applied.
    pub patches_applied: u64,
    /// Patches reverted.
    pub patches_reverted: u64,
    /// Writable windows opened.
    pub windows_opened: u64,
    /// Writes made through windows.
    pub writes: u64,
    /// Calls that changed page protection.
    pub protection_calls: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Bytes held to undo the applied patches.
    pub undo_bytes_held: u64,
    /// Applied patches.
    pub applied_now: u64,
}

impl Stats {
    /// Writes per window opened: how well batching grouped them.
    pub fn writes_per_window(&self) -> f64 {
        if self.windows_opened == 0 {
            0.0
        } else {
            self.writes as f64 / self.windows_opened as f64
        }
    }
}

/// What the history records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Applied.
    Applied,
    /// Reverted.
    Reverted,
    /// Failed (nothing written).
    Failed,
    /// Partly covered by a patch of higher priority applied over it.
    Displaced,
    /// Its bytes came back when the patch over it was reverted.
    Restored,
    /// Listed again from the file's journal when the model was attached.
    Recovered,
}

/// One line of the history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    /// The patch.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// What happened.
    pub action: Action,
    /// When.
    pub at: SystemTime,
    /// How long it took.
    pub duration: Duration,
    /// "ok" or the error.
    pub result: String,
    /// CRC-32 of the target range before.
    pub checksum_before: u32,
    /// CRC-32 of the target range after.
    pub checksum_after: u32,
}

/// What subscribers are told.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Event {
    /// A patch was applied.
    Applied {
        /// Its id.
        id: Uuid,
        /// The epoch after it.
        epoch: u64,
    },
    /// A patch was reverted.
    Reverted {
        /// Its id.
        id: Uuid,
        /// The epoch after it.
        epoch: u64,
    },
    /// A patch failed; nothing was written.
    Failed {
        /// Its id.
        id: Uuid,
        /// Why.
        reason: String,
    },
    /// A patch was refused because of an applied one.
    Conflict {
        /// The refused patch.
        id: Uuid,
        /// The applied patch in the way.
        applied: Uuid,
    },
    /// A revert found bytes that were not the ones a patch wrote.
    IntegrityFailure {
        /// The patch.
        id: Uuid,
    },
    /// An applied patch was partly covered by a patch of higher priority.
    Displaced {
        /// The covered patch.
        id: Uuid,
        /// The patch over it.
        by: Uuid,
    },
    /// The bytes of a covered patch came back when the patch over it was reverted.
    Restored {
        /// The patch whose bytes came back.
        id: Uuid,
        /// The reverted patch.
        by: Uuid,
        /// The epoch after the revert.
        epoch: u64,
    },
}

/// A patch that is applied.
#[derive(Clone, Debug)]
struct Applied {
    patch: MemoryPatch,
    /// The bytes the patch owns: its tensor's element range, or its raw range.
    range: Range<u64>,
    /// The bytes it replaced, at the offsets it changed: sorted, disjoint runs. A byte
    /// belongs to the patch if it lies in one of them; reverting writes them back (or
    /// hands them to the patch over it).
    undo: Vec<(u64, Vec<u8>)>,
    /// CRC-32 of the range as the last change that touched it left it: a revert first
    /// checks that nobody changed the bytes behind the model's back.
    checksum_after: u32,
    journal_transaction: Option<u64>,
}

impl Applied {
    fn undo_bytes(&self) -> u64 {
        self.undo.iter().map(|(_, b)| 16 + b.len() as u64).sum()
    }

    /// Whether this patch changed any byte that `other` changed.
    fn shares_bytes_with(&self, other: &Applied) -> bool {
        let (mut i, mut j) = (0, 0);
        while i < self.undo.len() && j < other.undo.len() {
            let (a, b) = (run_range(&self.undo[i]), run_range(&other.undo[j]));
            if a.start < b.end && b.start < a.end {
                return true;
            }
            if a.end <= b.end {
                i += 1;
            } else {
                j += 1;
            }
        }
        false
    }

    /// Replaces the undo bytes at `offset`, which lie inside one of the patch's runs.
    fn amend(&mut self, offset: u64, bytes: &[u8]) {
        let i = self.undo.partition_point(|(o, _)| *o <= offset);
        if i > 0 {
            let (o, run) = &mut self.undo[i - 1];
            let at = (offset - *o) as usize;
            if let Some(slots) = run.get_mut(at..at + bytes.len()) {
                slots.copy_from_slice(bytes);
            }
        }
    }
}

/// The byte range of an undo run.
fn run_range((offset, bytes): &(u64, Vec<u8>)) -> Range<u64> {
    *offset..offset + bytes.len() as u64
}

/// Where each byte of `runs` goes when their patch is reverted under `above` (the patches
/// applied after it, oldest first): a piece that a patch above changed is handed to the
/// first such patch (its index in `above`), which restores it when it is reverted; the
/// rest goes back to the region. Works on runs, never byte by byte.
type Handed = Vec<(usize, u64, Vec<u8>)>;

fn split_for_revert(runs: &[(u64, Vec<u8>)], above: &[Applied]) -> (Vec<(u64, Vec<u8>)>, Handed) {
    let mut handed = Vec::new();
    // Pieces not yet claimed by a patch above: (offset, bytes).
    let mut pieces: Vec<(u64, &[u8])> = runs.iter().map(|(o, b)| (*o, b.as_slice())).collect();
    for (k, patch) in above.iter().enumerate() {
        let mut left = Vec::with_capacity(pieces.len());
        for (start, bytes) in pieces {
            let end = start + bytes.len() as u64;
            let mut cursor = start;
            for owned in patch.undo.iter().map(run_range) {
                if owned.end <= cursor || owned.start >= end {
                    continue;
                }
                let (from, to) = (owned.start.max(cursor), owned.end.min(end));
                if cursor < from {
                    left.push((
                        cursor,
                        &bytes[(cursor - start) as usize..(from - start) as usize],
                    ));
                }
                handed.push((
                    k,
                    from,
                    bytes[(from - start) as usize..(to - start) as usize].to_vec(),
                ));
                cursor = to;
            }
            if cursor < end {
                left.push((cursor, &bytes[(cursor - start) as usize..]));
            }
        }
        pieces = left;
    }
    let to_region = pieces.into_iter().map(|(o, b)| (o, b.to_vec())).collect();
    (to_region, handed)
}

#[derive(Debug, Default)]
struct State {
    registered: Vec<MemoryPatch>,
    /// Applied patches, oldest first: later ones lie over earlier ones.
    applied: Vec<Applied>,
    history: Vec<HistoryEntry>,
    subscribers: Vec<mpsc::Sender<Event>>,
}

/// A conflict found by [`LiveModel::check_conflicts`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConflictReport {
    /// The applied patch.
    pub applied: Uuid,
    /// Its name.
    pub applied_name: String,
    /// Its priority.
    pub applied_priority: i32,
    /// The overlapping bytes.
    pub overlap: Range<u64>,
    /// Whether the new patch would win (higher priority) and lie over it.
    pub new_patch_wins: bool,
}

/// What applying one patch did (or, from [`LiveModel::plan`], would do).
#[derive(Clone, Debug, PartialEq)]
pub struct PatchReport {
    /// The patch.
    pub id: Uuid,
    /// Its name.
    pub name: String,
    /// The tensor it changes, if it targets one.
    pub tensor: Option<String>,
    /// The absolute byte range it owns.
    pub range: Range<u64>,
    /// Bytes whose value it changes.
    pub bytes_changed: u64,
    /// Bytes it writes: the runs of changed bytes, with the unchanged bytes between
    /// changes close enough to share a run.
    pub bytes_written: u64,
    /// Separate runs written.
    pub runs: usize,
    /// The codec's report of a value transform (the path taken and the error added).
    pub transform: Option<TransformReport>,
    /// Applied patches it lies over.
    pub displaces: Vec<Uuid>,
    /// The journal transaction that applied it (shared file mappings only).
    pub journal_transaction: Option<u64>,
}

/// An applied patch as [`LiveModel::applied_patches`] lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct AppliedPatch {
    /// The patch (a transform the journal could not describe, after a restart, comes
    /// back as the bytes it wrote).
    pub patch: MemoryPatch,
    /// The absolute byte range it owns.
    pub range: Range<u64>,
    /// The journal transaction that applied it.
    pub journal_transaction: Option<u64>,
    /// Patches lying over some of its bytes.
    pub covered_by: Vec<Uuid>,
}

/// Where a patch applies: the absolute bytes it owns, the index of its tensor, and the
/// tensor's elements it changes.
type Target = (Range<u64>, Option<usize>, Option<Range<u64>>);

/// A patch planned against the bytes as they are: every check done, nothing written.
#[derive(Debug)]
struct Plan {
    range: Range<u64>,
    writes: Vec<ByteWrite>,
    tensor: Option<usize>,
    transform: Option<TransformReport>,
    /// Bytes whose value changes.
    changed: u64,
    /// Indices (into `State::applied`) of the patches it lies over.
    displaces: Vec<usize>,
}

/// One patch of a [`PatchPlan`]: what applying it would do.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PlannedPatch {
    /// The patch's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// Its priority.
    pub priority: i32,
    /// The tensor it changes, if it targets one.
    pub tensor: Option<String>,
    /// The absolute byte range it owns.
    pub range: Range<u64>,
    /// Bytes whose value it changes.
    pub bytes_changed: u64,
    /// Bytes it writes.
    pub bytes_written: u64,
    /// Separate runs written.
    pub runs: usize,
    /// The codec's path for a value transform (`scales`, `elementwise`, `requantized`).
    pub path: Option<String>,
    /// RMS error against the intended values, for a value transform.
    pub rms_error: Option<f64>,
    /// Largest absolute error against the intended values, for a value transform.
    pub max_abs_error: Option<f64>,
    /// Ids of the applied patches it would lie over.
    pub displaces: Vec<String>,
}

/// What a [`PatchPlan`] was made from, checked again before it is applied: the
/// region's length, the patches applied then (a plan computes a displacing patch's
/// values from their undo bytes) and a SHA-256 of the bytes it read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PatchStamp {
    /// The region's length.
    pub len: u64,
    /// Ids of the applied patches, oldest first.
    pub applied: Vec<String>,
    /// The ranges the digest covers: every planned patch's range.
    pub ranges: Vec<Range<u64>>,
    /// SHA-256 (hex) of the bytes of `ranges`, one after another.
    pub sha256: String,
}

impl PatchStamp {
    fn take(bytes: &[u8], state: &State, ranges: Vec<Range<u64>>) -> PatchStamp {
        PatchStamp {
            len: bytes.len() as u64,
            applied: state
                .applied
                .iter()
                .map(|a| a.patch.id.to_string())
                .collect(),
            sha256: digest(bytes, &ranges),
            ranges,
        }
    }

    /// What differs between the model the plan was made from and `bytes` and `state`.
    fn differs(&self, bytes: &[u8], state: &State) -> Option<&'static str> {
        if self.len != bytes.len() as u64 {
            return Some("its length changed");
        }
        let applied: Vec<String> = state
            .applied
            .iter()
            .map(|a| a.patch.id.to_string())
            .collect();
        if self.applied != applied {
            return Some("its applied patches changed");
        }
        if self.sha256 != digest(bytes, &self.ranges) {
            return Some("the bytes the plan read changed");
        }
        None
    }
}

/// SHA-256 (hex) of `ranges` of `bytes` (ranges were checked to lie inside them).
fn digest(bytes: &[u8], ranges: &[Range<u64>]) -> String {
    let parts = ranges
        .iter()
        .map(|r| &bytes[r.start as usize..r.end as usize]);
    byte_tier::ops::to_hex(&byte_tier::ops::sha256_of_parts(parts))
}

/// A transaction of patches planned once against the model as it is, with every check
/// done and every value computed: serialized, it says what applying would write
/// (`kind` `in_place`, as byte-tier's write plans); [`LiveModel::apply_planned`]
/// writes exactly that, or refuses with [`Error::StalePlan`] when the model changed
/// since. Making one writes nothing, not even a journal.
#[derive(Debug, Serialize)]
pub struct PatchPlan {
    /// `"in_place"`.
    pub kind: &'static str,
    /// The model's file, when it maps one.
    pub file: Option<PathBuf>,
    /// The journal transaction's name.
    pub name: String,
    /// The region's length (unchanged).
    pub size_before: u64,
    /// The region's length afterwards.
    pub size_after: u64,
    /// The writes, sorted, only bytes that change (or a snapshot patch's whole range).
    pub writes: Vec<PlannedWrite>,
    /// Bytes written.
    pub bytes: u64,
    /// Each patch.
    pub patches: Vec<PlannedPatch>,
    /// What it was made from.
    pub stamp: PatchStamp,
    #[serde(skip)]
    items: Vec<(MemoryPatch, Plan, PatchReport)>,
}

impl PatchPlan {
    /// Whether applying would change no byte.
    pub fn is_noop(&self) -> bool {
        self.writes.is_empty()
    }

    /// The report each patch would give (no journal transaction yet).
    pub fn reports(&self) -> Vec<PatchReport> {
        self.items.iter().map(|(_, _, r)| r.clone()).collect()
    }

    /// The writes with their bytes, in the order applying makes them, for a writer
    /// outside this model (a transaction across the shards of a set). `None` when a
    /// patch lies over an applied one: only this model can displace its own patches.
    pub fn byte_writes(&self) -> Option<Vec<ByteWrite>> {
        if self.patches.iter().any(|p| !p.displaces.is_empty()) {
            return None;
        }
        Some(
            self.items
                .iter()
                .flat_map(|(_, plan, _)| plan.writes.iter().cloned())
                .collect(),
        )
    }

    /// Binds the plan to the model it applies to, as a `byte_tier::plan::Plan`.
    pub fn on(self, model: &LiveModel) -> LivePlan<'_> {
        LivePlan { model, plan: self }
    }
}

/// A [`PatchPlan`] with the model it applies to: reported as the plan, applied by
/// [`LiveModel::apply_planned`].
#[derive(Debug, Serialize)]
pub struct LivePlan<'a> {
    #[serde(skip)]
    model: &'a LiveModel,
    #[serde(flatten)]
    plan: PatchPlan,
}

impl LivePlan<'_> {
    /// The plan.
    pub fn plan(&self) -> &PatchPlan {
        &self.plan
    }
}

impl byte_tier::plan::Plan for LivePlan<'_> {
    type Applied = Vec<PatchReport>;
    type Error = Error;

    fn is_noop(&self) -> bool {
        self.plan.is_noop()
    }

    fn apply(self) -> Result<Vec<PatchReport>> {
        self.model.apply_planned(self.plan)
    }
}

/// A live model region.
#[derive(Debug)]
pub struct LiveModel {
    region: Region<State>,
    path: Option<PathBuf>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    journal: Option<Mutex<Journal>>,
    epoch: AtomicU64,
    windows_opened: AtomicU64,
    writes: AtomicU64,
    protection_calls: AtomicU64,
    bytes_written: AtomicU64,
    patches_applied: AtomicU64,
    patches_reverted: AtomicU64,
    policy: WindowPolicy,
}

/// A reader's view of the region: while it is held, no patch is half-applied.
#[derive(Debug)]
pub struct ReadGuard<'a> {
    model: &'a LiveModel,
    region: RegionRead<'a, State>,
}

impl<'a> ReadGuard<'a> {
    /// The whole region.
    pub fn bytes(&self) -> &[u8] {
        self.region.bytes()
    }

    /// A tensor's data.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let t = self.model.tensor(name)?;
        Ok(&self.bytes()[t.data_offset as usize..t.data_range().end as usize])
    }

    /// The epoch this view belongs to.
    pub fn epoch(&self) -> u64 {
        self.model.epoch()
    }
}

/// A read-only view of a byte range of the region, under a read guard.
#[derive(Debug)]
pub struct RangeView<'a> {
    guard: ReadGuard<'a>,
    range: Range<u64>,
}

impl RangeView<'_> {
    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.guard.bytes()[self.range.start as usize..self.range.end as usize]
    }

    /// The range viewed.
    pub fn range(&self) -> Range<u64> {
        self.range.clone()
    }
}

/// Tensor-aware patching of a live region: what every live region offers, whatever
/// backs it.
pub trait MemoryPatcher {
    /// Registers a patch to apply later by name.
    fn add(&self, patch: MemoryPatch) -> Result<Uuid>;
    /// Applies one patch; the report carries the codec's report of its transform.
    fn apply(&self, patch: MemoryPatch) -> Result<PatchReport>;
    /// Applies patches as one all-or-nothing transaction.
    fn apply_transaction(&self, patches: Vec<MemoryPatch>) -> Result<Vec<PatchReport>>;
    /// Reverts an applied patch.
    fn revert(&self, id: Uuid) -> Result<()>;
    /// The overlaps a patch would have, without applying it.
    fn check_conflicts(&self, patch: &MemoryPatch) -> Result<Vec<ConflictReport>>;
    /// The history, oldest first.
    fn history(&self) -> Vec<HistoryEntry>;
    /// The counters.
    fn stats(&self) -> Stats;
}

impl MemoryPatcher for LiveModel {
    fn add(&self, patch: MemoryPatch) -> Result<Uuid> {
        LiveModel::add(self, patch)
    }

    fn apply(&self, patch: MemoryPatch) -> Result<PatchReport> {
        let mut reports = self.apply_reported(vec![patch])?;
        reports.pop().ok_or(Error::ReadOnly)
    }

    fn apply_transaction(&self, patches: Vec<MemoryPatch>) -> Result<Vec<PatchReport>> {
        self.apply_reported(patches)
    }

    fn revert(&self, id: Uuid) -> Result<()> {
        LiveModel::revert(self, id)
    }

    fn check_conflicts(&self, patch: &MemoryPatch) -> Result<Vec<ConflictReport>> {
        LiveModel::check_conflicts(self, patch)
    }

    fn history(&self) -> Vec<HistoryEntry> {
        LiveModel::history(self)
    }

    fn stats(&self) -> Stats {
        LiveModel::stats(self)
    }
}

fn crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `bytes` (the whole region) over `range`, with `overlays` written over it in order.
fn image_with(bytes: &[u8], range: &Range<u64>, overlays: &[&[(u64, Vec<u8>)]]) -> Vec<u8> {
    let mut image = bytes[range.start as usize..range.end as usize].to_vec();
    for runs in overlays {
        for (offset, run) in runs.iter() {
            let start = (*offset).max(range.start);
            let end = (offset + run.len() as u64).min(range.end);
            if start < end {
                image[(start - range.start) as usize..(end - range.start) as usize]
                    .copy_from_slice(&run[(start - offset) as usize..(end - offset) as usize]);
            }
        }
    }
    image
}

impl LiveModel {
    /// Attaches to the GGUF file at `path`. A shared attach rolls back an unfinished
    /// transaction first, then lists again the live patches the file's journal records
    /// as applied (by this process before, or by another one that stopped or crashed);
    /// a private view lists them from the journal read under a shared lock.
    pub fn attach(path: impl AsRef<Path>, mode: AttachMode) -> Result<LiveModel> {
        let path = path.as_ref();
        let writable = mode == AttachMode::Shared;
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::PermissionDenied => Error::Bytes(byte_tier::Error::ReadOnly {
                    path: path.to_owned(),
                }),
                _ => Error::Os {
                    action: "open the model file",
                    source: e,
                },
            })?;
        let (mapping, journal) = match mode {
            AttachMode::Shared => {
                // An unfinished in-place transaction is rolled back before anything else.
                byte_tier::recover(path)?;
                (
                    Mapping::shared(&file)?,
                    Some(Mutex::new(Journal::open(path)?)),
                )
            }
            AttachMode::Private => (Mapping::private(&file)?, None),
            AttachMode::Owned => {
                let bytes = std::fs::read(path).map_err(|source| Error::Os {
                    action: "read the model file",
                    source,
                })?;
                (Mapping::owned(&bytes)?, None)
            }
        };
        let model = LiveModel::with_mapping(mapping, Some(path.to_owned()), journal, None)?;
        match &model.journal {
            Some(journal) => {
                model.list_journaled_patches(&journal.lock().unwrap_or_else(|e| e.into_inner()))?
            }
            // A private view lists them too, from the journal read under a shared lock
            // (nothing is written): what it plans is what a shared attach would apply.
            None if mode == AttachMode::Private && byte_tier::journal_path(path).exists() => {
                model.list_journaled_patches(&Journal::open_read_only(path)?)?
            }
            None => {}
        }
        Ok(model)
    }

    /// Attaches to memory the caller owns, whose bytes are a GGUF file (or, with
    /// `tensors`, hold tensors at the given absolute offsets).
    ///
    /// # Safety
    ///
    /// - `start..start + len` is valid, readable and writable memory for as long as the
    ///   model lives;
    /// - nothing else writes to it, frees it or changes its protection while attached;
    /// - `start` and `len` are multiples of the page size (checked: an error otherwise).
    // The one unsafe entry point outside `sys`: it only forwards the caller's promise.
    #[allow(unsafe_code)]
    pub unsafe fn attach_raw(
        start: NonNull<u8>,
        len: usize,
        tensors: Option<Vec<TensorInfo>>,
    ) -> Result<LiveModel> {
        // SAFETY: the caller's duties are exactly those of `Mapping::raw`.
        let mapping = unsafe { Mapping::raw(start, len)? };
        LiveModel::with_mapping(mapping, None, None, tensors)
    }

    fn with_mapping(
        mapping: Mapping,
        path: Option<PathBuf>,
        journal: Option<Mutex<Journal>>,
        tensors: Option<Vec<TensorInfo>>,
    ) -> Result<LiveModel> {
        let len = mapping.len();
        let region = Region::new(mapping, State::default());
        let tensors = match tensors {
            Some(t) => t,
            None => Gguf::parse(region.read().bytes())?.tensors().to_vec(),
        };
        for t in &tensors {
            if t.data_range().end > len as u64 {
                return Err(Error::OutsideRegion {
                    start: t.data_offset,
                    end: t.data_range().end,
                    len: len as u64,
                });
            }
        }
        let tensor_index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        region.write().set_protection(0, len, false)?;
        Ok(LiveModel {
            region,
            path,
            tensors,
            tensor_index,
            journal,
            epoch: AtomicU64::new(0),
            windows_opened: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            protection_calls: AtomicU64::new(1),
            bytes_written: AtomicU64::new(0),
            patches_applied: AtomicU64::new(0),
            patches_reverted: AtomicU64::new(0),
            policy: WindowPolicy::default(),
        })
    }

    /// Rebuilds the applied patches from the journal's notes: each live apply that no
    /// later live revert undid, with its undo bytes from the journal and the bytes that
    /// later reverts handed to it.
    fn list_journaled_patches(&self, journal: &Journal) -> Result<()> {
        let mut region = self.region.write();
        let (bytes, state) = region.parts();
        let committed =
            |t: &&byte_tier::Transaction| matches!(t.state, TransactionState::Committed(_));
        // The patches a later transaction reverted: their undo bytes are never read back
        // from the journal, so attaching costs what is applied now, not the history.
        let reverted: std::collections::HashSet<String> = journal
            .transactions()
            .iter()
            .filter(committed)
            .filter_map(|t| LiveNote::parse(&t.note)?.reverts)
            .collect();
        for txn in journal.transactions().iter().filter(committed) {
            let Some(note) = LiveNote::parse(&txn.note) else {
                // A transaction made outside a live model (a metadata edit, a repair): if
                // it reverted a live apply, that patch is gone.
                if let Some(reverted) = txn.reverts {
                    state
                        .applied
                        .retain(|a| a.journal_transaction != Some(reverted));
                }
                continue;
            };
            if let Some(id) = &note.reverts {
                state.applied.retain(|a| a.patch.id.to_string() != *id);
            }
            for amend in &note.amends {
                let Some(run) = crate::note::from_hex(&amend.bytes) else {
                    continue;
                };
                if let Some(applied) = state
                    .applied
                    .iter_mut()
                    .find(|a| a.patch.id.to_string() == amend.patch)
                {
                    applied.amend(amend.offset, &run);
                }
            }
            for noted in &note.patches {
                if reverted.contains(&noted.id) {
                    continue;
                }
                let range = noted.range[0]..noted.range[1];
                if range.start > range.end || range.end > bytes.len() as u64 {
                    continue;
                }
                let mut undo = Vec::new();
                for entry in &txn.writes {
                    if entry.offset >= range.start && entry.offset + entry.len <= range.end {
                        undo.push((entry.offset, journal.original_bytes(entry)?));
                    }
                }
                undo.sort_by_key(|(o, _)| *o);
                let written = bytes[range.start as usize..range.end as usize].to_vec();
                let Some(patch) = noted.to_patch(written) else {
                    continue;
                };
                state.applied.push(Applied {
                    checksum_after: crc(&bytes[range.start as usize..range.end as usize]),
                    patch,
                    range,
                    undo,
                    journal_transaction: Some(txn.id),
                });
            }
        }
        let recovered: Vec<(Uuid, String)> = state
            .applied
            .iter()
            .map(|a| (a.patch.id, a.patch.name.clone()))
            .collect();
        for (id, name) in recovered {
            state.history.push(HistoryEntry {
                id,
                name,
                action: Action::Recovered,
                at: SystemTime::now(),
                duration: Duration::ZERO,
                result: "listed from the journal".into(),
                checksum_before: 0,
                checksum_after: 0,
            });
        }
        Ok(())
    }

    /// Says who holds this model's journal, so that another writer's refusal names it
    /// (a `hotpatch serve` gives its admin API). Nothing happens for a region without a
    /// journal.
    pub fn describe_writer(&self, what: &str) -> Result<()> {
        if let Some(journal) = &self.journal {
            journal
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .describe_holder(what)?;
        }
        Ok(())
    }

    /// Sets how writes are grouped into windows.
    pub fn set_window_policy(&mut self, policy: WindowPolicy) {
        self.policy = policy;
    }

    /// The file attached, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Whether changes reach the file (and other processes mapping it).
    pub fn is_shared(&self) -> bool {
        matches!(self.region.mapping().backing(), Backing::Shared(_))
    }

    /// The tensor table.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A tensor by name.
    pub fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor_index
            .get(name)
            .map(|&i| &self.tensors[i])
            .ok_or_else(|| Error::NoSuchTensor(name.to_owned()))
    }

    /// The region's length.
    pub fn len(&self) -> u64 {
        self.region.mapping().len() as u64
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.region.mapping().len() == 0
    }

    /// The patch epoch: it advances with every apply and revert.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A read guard: while held, patches wait, so the bytes seen are never half-patched.
    pub fn read(&self) -> ReadGuard<'_> {
        ReadGuard {
            model: self,
            region: self.region.read(),
        }
    }

    /// Subscribes to events.
    pub fn subscribe(&self) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel();
        self.region.write().subscribers.push(tx);
        rx
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        let region = self.region.read();
        Stats {
            patches_applied: self.patches_applied.load(Ordering::Relaxed),
            patches_reverted: self.patches_reverted.load(Ordering::Relaxed),
            windows_opened: self.windows_opened.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            protection_calls: self.protection_calls.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            undo_bytes_held: region.applied.iter().map(Applied::undo_bytes).sum(),
            applied_now: region.applied.len() as u64,
        }
    }

    /// The history, oldest first.
    pub fn history(&self) -> Vec<HistoryEntry> {
        self.region.read().history.clone()
    }

    /// Registers a patch to apply later by name (see [`LiveModel::apply_registered`]).
    pub fn add(&self, patch: MemoryPatch) -> Result<Uuid> {
        let mut region = self.region.write();
        if region.registered.iter().any(|p| p.name == patch.name) {
            return Err(Error::InvalidPatch {
                patch: patch.name.clone(),
                reason: "a patch with this name is registered already".into(),
            });
        }
        let id = patch.id;
        region.registered.push(patch);
        Ok(id)
    }

    /// The registered patches.
    pub fn registered(&self) -> Vec<MemoryPatch> {
        self.region.read().registered.clone()
    }

    /// Enables or disables a registered patch.
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        let mut region = self.region.write();
        let patch = region
            .registered
            .iter_mut()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::NoSuchPatch(name.to_owned()))?;
        patch.enabled = enabled;
        Ok(())
    }

    /// Applies the registered patch named `name`.
    pub fn apply_registered(&self, name: &str) -> Result<Uuid> {
        let patch = self
            .registered()
            .into_iter()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::NoSuchPatch(name.to_owned()))?;
        self.apply(patch)
    }

    /// A read-only view of `range`, valid while it is held (patches wait for it).
    pub fn view(&self, range: Range<u64>) -> Result<RangeView<'_>> {
        if range.start > range.end || range.end > self.len() {
            return Err(Error::OutsideRegion {
                start: range.start,
                end: range.end,
                len: self.len(),
            });
        }
        Ok(RangeView {
            guard: self.read(),
            range,
        })
    }

    /// The journal transaction that applied patch `id` (shared file mappings only).
    pub fn journal_transaction(&self, id: Uuid) -> Option<u64> {
        self.region
            .read()
            .applied
            .iter()
            .find(|a| a.patch.id == id)?
            .journal_transaction
    }

    /// The ids of the applied patches, in order of application.
    pub fn applied(&self) -> Vec<(Uuid, String)> {
        self.region
            .read()
            .applied
            .iter()
            .map(|a| (a.patch.id, a.patch.name.clone()))
            .collect()
    }

    /// The applied patches, oldest first, with what lies over each.
    pub fn applied_patches(&self) -> Vec<AppliedPatch> {
        let region = self.region.read();
        region
            .applied
            .iter()
            .enumerate()
            .map(|(i, a)| AppliedPatch {
                patch: a.patch.clone(),
                range: a.range.clone(),
                journal_transaction: a.journal_transaction,
                covered_by: region.applied[i + 1..]
                    .iter()
                    .filter(|b| a.shares_bytes_with(b))
                    .map(|b| b.patch.id)
                    .collect(),
            })
            .collect()
    }

    /// The patches journal transaction `transaction` applied that are still applied,
    /// oldest first.
    pub fn patches_of_transaction(&self, transaction: u64) -> Vec<Uuid> {
        self.region
            .read()
            .applied
            .iter()
            .filter(|a| a.journal_transaction == Some(transaction))
            .map(|a| a.patch.id)
            .collect()
    }

    /// Reverts every patch that journal transaction `transaction` applied and that is
    /// still applied, newest first; returns their ids. Empty when none is.
    pub fn revert_transaction(&self, transaction: u64) -> Result<Vec<Uuid>> {
        let mut region = self.region.write();
        let ids: Vec<Uuid> = region
            .applied
            .iter()
            .filter(|a| a.journal_transaction == Some(transaction))
            .map(|a| a.patch.id)
            .collect();
        for id in ids.iter().rev() {
            self.revert_locked(&mut region, *id)?;
        }
        Ok(ids)
    }

    /// The bytes a patch owns: checked against the region and its tensor.
    fn target(&self, patch: &MemoryPatch) -> Result<Target> {
        if !patch.enabled {
            return Err(Error::Disabled(patch.name.clone()));
        }
        let region_len = self.len();
        match &patch.target {
            PatchTarget::Raw(range) => {
                if range.start > range.end || range.end > region_len {
                    return Err(Error::OutsideRegion {
                        start: range.start,
                        end: range.end,
                        len: region_len,
                    });
                }
                // The tensor it falls in, if any: a raw write may not straddle tensors.
                let tensor = self.tensors.iter().position(|t| {
                    let r = t.data_range();
                    range.start < r.end && r.start < range.end
                });
                if let Some(i) = tensor {
                    let r = self.tensors[i].data_range();
                    if range.start < r.start || range.end > r.end {
                        return Err(Error::OutsideTensor {
                            patch: patch.name.clone(),
                            tensor: self.tensors[i].name.clone(),
                            start: range.start,
                            end: range.end,
                        });
                    }
                }
                Ok((range.clone(), tensor, None))
            }
            PatchTarget::Tensor { name, elements } => {
                let index = *self
                    .tensor_index
                    .get(name)
                    .ok_or_else(|| Error::NoSuchTensor(name.clone()))?;
                let t = &self.tensors[index];
                let elements = elements.clone().unwrap_or(0..t.n_elements);
                let span = byte_tier::tensor_edit::element_bytes(t, &elements)?;
                let range = t.data_offset + span.start..t.data_offset + span.end;
                Ok((range, Some(index), Some(elements)))
            }
        }
    }

    /// Plans `patch` against `bytes` (the whole region) and the applied patches: checks
    /// everything, computes its values as if the patches it displaces were not there,
    /// and returns the writes (only the bytes that differ from what is there now).
    fn plan_one(&self, bytes: &[u8], state: &State, patch: &MemoryPatch) -> Result<Plan> {
        let (range, tensor, elements) = self.target(patch)?;
        let mut displaces = Vec::new();
        for (i, a) in state.applied.iter().enumerate() {
            if a.range.start < range.end && range.start < a.range.end {
                if patch.priority <= a.patch.priority {
                    return Err(Error::Conflict {
                        patch: patch.name.clone(),
                        applied: a.patch.name.clone(),
                        applied_priority: a.patch.priority,
                        overlap: a.range.start.max(range.start)..a.range.end.min(range.end),
                    });
                }
                displaces.push(i);
            }
        }
        let invalid = |reason: String| Error::InvalidPatch {
            patch: patch.name.clone(),
            reason,
        };
        // The values the patch starts from: the bytes with every displaced patch undone,
        // newest first, as if it had never been applied.
        let undone: Vec<&[(u64, Vec<u8>)]> = displaces
            .iter()
            .rev()
            .map(|&i| state.applied[i].undo.as_slice())
            .collect();
        let base = image_with(bytes, &range, &undone);
        let (new, transform) = match &patch.payload {
            Payload::Bytes(new) => {
                if new.len() as u64 != range.end - range.start {
                    return Err(invalid(match (tensor, &elements) {
                        (Some(t), Some(e)) => format!(
                            "{} bytes for {} elements of {} ({} bytes)",
                            new.len(),
                            e.end - e.start,
                            self.tensors[t].ggml_type,
                            range.end - range.start
                        ),
                        _ => format!(
                            "{} bytes for a range of {}",
                            new.len(),
                            range.end - range.start
                        ),
                    }));
                }
                (new.clone(), None)
            }
            Payload::Transform(transform) => {
                let (Some(t), Some(elements)) = (tensor, &elements) else {
                    return Err(invalid(
                        "a raw range takes bytes, not a value transform".into(),
                    ));
                };
                let info = &self.tensors[t];
                let in_tensor = |e: byte_tier::Error| Error::Bytes(e.in_tensor(&info.name));
                let importance = patch
                    .importance
                    .as_deref()
                    .map(|w| codec::Importance::new(info.ggml_type, w, &info.dims, elements.start))
                    .transpose()
                    .map_err(in_tensor)?;
                let mut new = base;
                let report = codec::transform_range_weighted(
                    info.ggml_type,
                    &mut new,
                    0..elements.end - elements.start,
                    &transform.as_codec(),
                    importance.as_ref(),
                )
                .map_err(in_tensor)?;
                (new, Some(report))
            }
        };
        let current = &bytes[range.start as usize..range.end as usize];
        let changed = current.iter().zip(&new).filter(|(a, b)| a != b).count() as u64;
        let writes = if patch.snapshot {
            vec![ByteWrite {
                offset: range.start,
                bytes: new,
            }]
        } else {
            byte_tier::tensor_edit::changed_runs(current, &new, range.start)
        };
        Ok(Plan {
            range,
            writes,
            tensor,
            transform,
            changed,
            displaces,
        })
    }

    /// Plans `patches` as one transaction without writing anything: the report each
    /// would give, and the first error any of them meets.
    pub fn plan(&self, patches: &[MemoryPatch]) -> Result<Vec<PatchReport>> {
        Ok(self.plan_transaction(patches.to_vec())?.reports())
    }

    /// Plans `patches` as one transaction without writing anything (no byte, no
    /// journal): a [`PatchPlan`] that says what would be written and that
    /// [`LiveModel::apply_planned`] applies as it is, without planning again.
    pub fn plan_transaction(&self, patches: Vec<MemoryPatch>) -> Result<PatchPlan> {
        let region = self.region.read();
        let bytes = region.bytes();
        let plans = self.plan_batch(bytes, &region, &patches)?;
        let mut writes: Vec<PlannedWrite> = plans
            .iter()
            .flat_map(|plan| {
                let tensor = plan.tensor.map(|t| self.tensors[t].name.clone());
                plan.writes.iter().map(move |w| PlannedWrite {
                    offset: w.offset,
                    len: w.bytes.len() as u64,
                    tensor: tensor.clone(),
                    key: None,
                })
            })
            .collect();
        writes.sort_by_key(|w| w.offset);
        let stamp = PatchStamp::take(
            bytes,
            &region,
            plans.iter().map(|p| p.range.clone()).collect(),
        );
        let mut items = Vec::with_capacity(plans.len());
        let mut planned = Vec::with_capacity(plans.len());
        for (patch, plan) in patches.into_iter().zip(plans) {
            let report = self.report(&patch, &plan, &region, None);
            let transform = report.transform.as_ref();
            planned.push(PlannedPatch {
                id: patch.id.to_string(),
                name: patch.name.clone(),
                priority: patch.priority,
                tensor: report.tensor.clone(),
                range: report.range.clone(),
                bytes_changed: report.bytes_changed,
                bytes_written: report.bytes_written,
                runs: report.runs,
                path: transform.map(|t| format!("{:?}", t.path).to_lowercase()),
                rms_error: transform.map(|t| t.rms_error),
                max_abs_error: transform.map(|t| t.max_abs_error),
                displaces: report.displaces.iter().map(Uuid::to_string).collect(),
            });
            items.push((patch, plan, report));
        }
        let names: Vec<&str> = items.iter().map(|(p, _, _)| p.name.as_str()).collect();
        Ok(PatchPlan {
            kind: "in_place",
            file: self.path.clone(),
            name: format!("live {}", names.join(", ")),
            size_before: bytes.len() as u64,
            size_after: bytes.len() as u64,
            bytes: writes.iter().map(|w| w.len).sum(),
            writes,
            patches: planned,
            stamp,
            items,
        })
    }

    fn report(
        &self,
        patch: &MemoryPatch,
        plan: &Plan,
        state: &State,
        journal: Option<u64>,
    ) -> PatchReport {
        PatchReport {
            id: patch.id,
            name: patch.name.clone(),
            tensor: plan.tensor.map(|t| self.tensors[t].name.clone()),
            range: plan.range.clone(),
            bytes_changed: plan.changed,
            bytes_written: plan.writes.iter().map(|w| w.bytes.len() as u64).sum(),
            runs: plan.writes.len(),
            transform: plan.transform.clone(),
            displaces: plan
                .displaces
                .iter()
                .map(|&i| state.applied[i].patch.id)
                .collect(),
            journal_transaction: journal,
        }
    }

    fn plan_batch(
        &self,
        bytes: &[u8],
        state: &State,
        patches: &[MemoryPatch],
    ) -> Result<Vec<Plan>> {
        let mut plans: Vec<Plan> = Vec::with_capacity(patches.len());
        for patch in patches {
            let fail = |error: Error| {
                if patches.len() > 1 {
                    Error::RolledBack {
                        failed: patch.name.clone(),
                        source: Box::new(error),
                    }
                } else {
                    error
                }
            };
            if state
                .applied
                .iter()
                .any(|a| a.patch.id == patch.id || a.patch.name == patch.name)
                || patches
                    .iter()
                    .take(plans.len())
                    .any(|p| p.id == patch.id || p.name == patch.name)
            {
                return Err(fail(Error::AlreadyApplied(patch.name.clone())));
            }
            let plan = self.plan_one(bytes, state, patch).map_err(fail)?;
            if let Some((other, other_patch)) = plans
                .iter()
                .zip(patches)
                .find(|(p, _)| p.range.start < plan.range.end && plan.range.start < p.range.end)
            {
                return Err(fail(Error::Conflict {
                    patch: patch.name.clone(),
                    applied: other_patch.name.clone(),
                    applied_priority: other_patch.priority,
                    overlap: other.range.start.max(plan.range.start)
                        ..other.range.end.min(plan.range.end),
                }));
            }
            plans.push(plan);
        }
        Ok(plans)
    }

    /// The overlaps `patch` would have with applied patches, without applying it.
    pub fn check_conflicts(&self, patch: &MemoryPatch) -> Result<Vec<ConflictReport>> {
        let region = self.region.read();
        let (range, _, _) = self.target(patch)?;
        Ok(region
            .applied
            .iter()
            .filter(|a| a.range.start < range.end && range.start < a.range.end)
            .map(|a| ConflictReport {
                applied: a.patch.id,
                applied_name: a.patch.name.clone(),
                applied_priority: a.patch.priority,
                overlap: a.range.start.max(range.start)..a.range.end.min(range.end),
                new_patch_wins: patch.priority > a.patch.priority,
            })
            .collect())
    }

    /// Writes through windows grouped by the policy.
    fn write_windowed(
        &self,
        region: &mut RegionWrite<'_, State>,
        writes: &[(ByteWrite, Option<usize>)],
    ) -> Result<()> {
        let page = page_size();
        let max = self.policy.max_window_bytes.max(page);
        let mut i = 0;
        while i < writes.len() {
            let (first, tensor) = &writes[i];
            let start = first.offset as usize;
            let mut end = first.range().end as usize;
            let mut j = i + 1;
            while j < writes.len() {
                let (next, next_tensor) = &writes[j];
                let next_end = next.range().end as usize;
                let span = next_end.div_ceil(page) * page - start / page * page;
                if span > max || (self.policy.within_tensor && next_tensor != tensor) {
                    break;
                }
                end = end.max(next_end);
                j += 1;
            }
            let window = region.window(start..end)?;
            self.protection_calls.fetch_add(2, Ordering::Relaxed);
            self.windows_opened.fetch_add(1, Ordering::Relaxed);
            for (w, _) in &writes[i..j] {
                window.write(w.offset as usize, &w.bytes)?;
                self.writes.fetch_add(1, Ordering::Relaxed);
                self.bytes_written
                    .fetch_add(w.bytes.len() as u64, Ordering::Relaxed);
            }
            drop(window);
            i = j;
        }
        if let (Some(first), Some(last)) = (writes.first(), writes.last()) {
            let start = first.0.offset as usize;
            region.flush(start, last.0.range().end as usize - start)?;
        }
        Ok(())
    }

    fn notify(state: &mut State, event: Event) {
        state.subscribers.retain(|s| s.send(event.clone()).is_ok());
    }

    fn record_failure(state: &mut State, patches: &[MemoryPatch], error: &Error, started: Instant) {
        for patch in patches {
            if let Error::Conflict { applied, .. } = error
                && let Some(a) = state.applied.iter().find(|a| a.patch.name == *applied)
            {
                let applied = a.patch.id;
                LiveModel::notify(
                    state,
                    Event::Conflict {
                        id: patch.id,
                        applied,
                    },
                );
            }
            LiveModel::notify(
                state,
                Event::Failed {
                    id: patch.id,
                    reason: error.to_string(),
                },
            );
            state.history.push(HistoryEntry {
                id: patch.id,
                name: patch.name.clone(),
                action: Action::Failed,
                at: SystemTime::now(),
                duration: started.elapsed(),
                result: error.to_string(),
                checksum_before: 0,
                checksum_after: 0,
            });
        }
    }

    /// Applies one patch.
    pub fn apply(&self, patch: MemoryPatch) -> Result<Uuid> {
        Ok(self.apply_all(vec![patch])?.remove(0))
    }

    /// Applies patches as one transaction: every patch is planned and checked before any
    /// byte moves; an applied patch of lower priority in the way is displaced (the new
    /// patch lies over it, and reverting the new one brings it back), one of equal or
    /// higher priority refuses the whole transaction.
    pub fn apply_all(&self, patches: Vec<MemoryPatch>) -> Result<Vec<Uuid>> {
        Ok(self
            .apply_reported(patches)?
            .into_iter()
            .map(|r| r.id)
            .collect())
    }

    /// [`LiveModel::apply_all`], returning what each patch did: the bytes it changed,
    /// the codec's report of its transform (planned once, then written), the patches it
    /// displaced and its journal transaction.
    pub fn apply_reported(&self, patches: Vec<MemoryPatch>) -> Result<Vec<PatchReport>> {
        let started = Instant::now();
        let mut region = self.region.write();
        let (bytes, state) = region.parts();
        let plans = match self.plan_batch(bytes, state, &patches) {
            Ok(plans) => plans,
            Err(error) => {
                LiveModel::record_failure(state, &patches, &error, started);
                return Err(error);
            }
        };
        self.write_planned(region, patches, plans, started)
    }

    /// Applies `plan` as it was made by [`LiveModel::plan_transaction`] (on this model,
    /// or on another view of the same file), without computing any value again: refused
    /// with [`Error::StalePlan`] when the model's length, its applied patches or the
    /// bytes the plan read changed since.
    pub fn apply_planned(&self, plan: PatchPlan) -> Result<Vec<PatchReport>> {
        let started = Instant::now();
        let region = self.region.write();
        let (patches, plans): (Vec<MemoryPatch>, Vec<Plan>) =
            plan.items.into_iter().map(|(p, plan, _)| (p, plan)).unzip();
        let what = if plan.file.is_some() && plan.file != self.path {
            Some("it was made for another file")
        } else {
            plan.stamp.differs(region.bytes(), &region)
        };
        if let Some(what) = what {
            let mut region = region;
            let error = Error::StalePlan {
                model: self
                    .path
                    .as_ref()
                    .map_or_else(|| "the model".to_owned(), |p| p.display().to_string()),
                what: what.to_owned(),
            };
            LiveModel::record_failure(&mut region, &patches, &error, started);
            return Err(error);
        }
        self.write_planned(region, patches, plans, started)
    }

    /// Writes planned patches as one journal transaction and records them as applied.
    fn write_planned(
        &self,
        mut region: RegionWrite<'_, State>,
        patches: Vec<MemoryPatch>,
        plans: Vec<Plan>,
        started: Instant,
    ) -> Result<Vec<PatchReport>> {
        let (bytes, state) = region.parts();
        // What each patch replaces, taken before the first byte moves.
        let mut undos = Vec::with_capacity(plans.len());
        let mut all_writes = Vec::new();
        for plan in &plans {
            let undo: Vec<(u64, Vec<u8>)> = plan
                .writes
                .iter()
                .map(|w| {
                    (
                        w.offset,
                        bytes[w.offset as usize..w.range().end as usize].to_vec(),
                    )
                })
                .collect();
            let before = crc(&bytes[plan.range.start as usize..plan.range.end as usize]);
            undos.push((undo, before));
            all_writes.extend(plan.writes.iter().cloned().map(|w| (w, plan.tensor)));
        }
        all_writes.sort_by_key(|(w, _)| w.offset);
        let note = LiveNote {
            format: crate::note::FORMAT.into(),
            patches: patches
                .iter()
                .zip(&plans)
                .map(|(p, plan)| NotedPatch::from_patch(p, &plan.range))
                .collect(),
            ..LiveNote::default()
        };
        let names: Vec<&str> = patches.iter().map(|p| p.name.as_str()).collect();
        let journal_transaction = match self.journal_begin(
            &format!("live {}", names.join(", ")),
            None,
            bytes,
            &all_writes,
            &note,
        ) {
            Ok(id) => id,
            Err(error) => {
                LiveModel::record_failure(state, &patches, &error, started);
                return Err(error);
            }
        };
        if let Err(error) = self.write_and_commit(&mut region, &all_writes, journal_transaction) {
            LiveModel::record_failure(&mut region, &patches, &error, started);
            return Err(error);
        }

        let (bytes, state) = region.parts();
        let mut reports = Vec::with_capacity(patches.len());
        for ((patch, plan), (undo, checksum_before)) in patches.into_iter().zip(plans).zip(undos) {
            reports.push(self.report(&patch, &plan, state, journal_transaction));
            let displaced: Vec<Uuid> = plan
                .displaces
                .iter()
                .map(|&i| state.applied[i].patch.id)
                .collect();
            let checksum_after = crc(&bytes[plan.range.start as usize..plan.range.end as usize]);
            state.history.push(HistoryEntry {
                id: patch.id,
                name: patch.name.clone(),
                action: Action::Applied,
                at: SystemTime::now(),
                duration: started.elapsed(),
                result: "ok".into(),
                checksum_before,
                checksum_after,
            });
            self.patches_applied.fetch_add(1, Ordering::Relaxed);
            let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
            LiveModel::notify(
                state,
                Event::Applied {
                    id: patch.id,
                    epoch,
                },
            );
            for id in displaced {
                if let Some(a) = state.applied.iter().find(|a| a.patch.id == id) {
                    let name = a.patch.name.clone();
                    state.history.push(HistoryEntry {
                        id,
                        name,
                        action: Action::Displaced,
                        at: SystemTime::now(),
                        duration: Duration::ZERO,
                        result: format!("covered by {}", patch.name),
                        checksum_before: 0,
                        checksum_after: 0,
                    });
                }
                LiveModel::notify(state, Event::Displaced { id, by: patch.id });
            }
            state.applied.push(Applied {
                patch,
                range: plan.range,
                undo,
                checksum_after,
                journal_transaction,
            });
        }
        LiveModel::refresh_checksums(bytes, state);
        Ok(reports)
    }

    /// Writes a journaled transaction's bytes and commits it, stopping at the named
    /// durable steps for the crash tests. A failed write puts back the bytes it replaced
    /// and marks the transaction rolled back.
    fn write_and_commit(
        &self,
        region: &mut RegionWrite<'_, State>,
        writes: &[(ByteWrite, Option<usize>)],
        journal_transaction: Option<u64>,
    ) -> Result<()> {
        let bytes = region.bytes();
        let restore: Vec<(ByteWrite, Option<usize>)> = writes
            .iter()
            .map(|(w, t)| {
                (
                    ByteWrite {
                        offset: w.offset,
                        bytes: bytes[w.offset as usize..w.range().end as usize].to_vec(),
                    },
                    *t,
                )
            })
            .collect();
        byte_tier::failpoint("after-journal-sync");
        if let Err(error) = self.write_windowed(region, writes) {
            return Err(self.roll_back(region, &restore, journal_transaction, error));
        }
        byte_tier::failpoint("after-file-sync");
        if let Some((journal, id)) = self.journal.as_ref().zip(journal_transaction) {
            journal
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .commit(id)?;
        }
        byte_tier::failpoint("after-commit");
        Ok(())
    }

    /// Writes `restore` back after a failed write and marks the journal transaction
    /// rolled back; the error says what failed, and also what the restore met.
    fn roll_back(
        &self,
        region: &mut RegionWrite<'_, State>,
        restore: &[(ByteWrite, Option<usize>)],
        journal_transaction: Option<u64>,
        error: Error,
    ) -> Error {
        let restored = self.write_windowed(region, restore).and_then(|()| {
            match self.journal.as_ref().zip(journal_transaction) {
                Some((journal, id)) => journal
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .mark_rolled_back(id)
                    .map_err(Error::from),
                None => Ok(()),
            }
        });
        match restored {
            Ok(()) => error,
            Err(restore) => Error::RestoreFailed {
                error: Box::new(error),
                restore: Box::new(restore),
            },
        }
    }

    /// Takes the checksum of every applied patch's range again, as the model now leaves
    /// them.
    fn refresh_checksums(bytes: &[u8], state: &mut State) {
        for a in &mut state.applied {
            a.checksum_after = crc(&bytes[a.range.start as usize..a.range.end as usize]);
        }
    }

    fn journal_begin(
        &self,
        name: &str,
        reverts: Option<u64>,
        bytes: &[u8],
        writes: &[(ByteWrite, Option<usize>)],
        note: &LiveNote,
    ) -> Result<Option<u64>> {
        let Some(journal) = &self.journal else {
            return Ok(None);
        };
        let undo: Vec<(u64, &[u8], &[u8])> = writes
            .iter()
            .map(|(w, _)| {
                (
                    w.offset,
                    &bytes[w.offset as usize..w.range().end as usize],
                    w.bytes.as_slice(),
                )
            })
            .collect();
        let id = journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .begin_with_note(name, reverts, &undo, &note.to_bytes())?;
        Ok(Some(id))
    }

    /// Reverts the applied patch `id`: its bytes that no patch over it changed get their
    /// original values back; the originals of the bytes a patch over it changed are
    /// handed to that patch, which restores them when it is reverted. Refused when the
    /// bytes changed behind the model's back.
    pub fn revert(&self, id: Uuid) -> Result<()> {
        let mut region = self.region.write();
        self.revert_locked(&mut region, id)
    }

    /// Reverts the applied patch named `name`.
    pub fn revert_by_name(&self, name: &str) -> Result<()> {
        let mut region = self.region.write();
        let id = region
            .applied
            .iter()
            .find(|a| a.patch.name == name)
            .map(|a| a.patch.id)
            .ok_or_else(|| Error::NoSuchPatch(name.to_owned()))?;
        self.revert_locked(&mut region, id)
    }

    /// Reverts every applied patch, newest first.
    pub fn revert_all(&self) -> Result<()> {
        let mut region = self.region.write();
        while let Some(id) = region.applied.last().map(|a| a.patch.id) {
            self.revert_locked(&mut region, id)?;
        }
        Ok(())
    }

    fn revert_locked(&self, region: &mut RegionWrite<'_, State>, id: Uuid) -> Result<()> {
        let started = Instant::now();
        let (bytes, state) = region.parts();
        let index = state
            .applied
            .iter()
            .position(|a| a.patch.id == id)
            .ok_or_else(|| Error::NoSuchPatch(id.to_string()))?;
        let applied = state.applied[index].clone();
        let range = applied.range.clone();
        if crc(&bytes[range.start as usize..range.end as usize]) != applied.checksum_after {
            LiveModel::notify(state, Event::IntegrityFailure { id });
            return Err(Error::ChecksumMismatch {
                patch: applied.patch.name.clone(),
                offset: range.start,
            });
        }
        // Each byte the patch changed goes back to the region, or to the first patch
        // over it that changed the same byte.
        let (to_region, handed) = split_for_revert(&applied.undo, &state.applied[index + 1..]);
        let handed: Handed = handed
            .into_iter()
            .map(|(k, offset, bytes)| (index + 1 + k, offset, bytes))
            .collect();
        let writes: Vec<(ByteWrite, Option<usize>)> = to_region
            .into_iter()
            .map(|(offset, bytes)| (ByteWrite { offset, bytes }, None))
            .collect();
        let amends: Vec<Amend> = handed
            .iter()
            .map(|(b, offset, bytes)| Amend {
                patch: state.applied[*b].patch.id.to_string(),
                offset: *offset,
                bytes: crate::note::to_hex(bytes),
            })
            .collect();
        let note = LiveNote {
            format: crate::note::FORMAT.into(),
            reverts: Some(id.to_string()),
            amends,
            ..LiveNote::default()
        };
        let journal_transaction = self.journal_begin(
            &format!("live revert {}", applied.patch.name),
            applied.journal_transaction,
            bytes,
            &writes,
            &note,
        )?;
        let expected = image_with(
            bytes,
            &range,
            &[&writes
                .iter()
                .map(|(w, _)| (w.offset, w.bytes.clone()))
                .collect::<Vec<_>>()],
        );
        self.write_and_commit(region, &writes, journal_transaction)?;
        let (bytes, state) = region.parts();
        let after = crc(&bytes[range.start as usize..range.end as usize]);
        if after != crc(&expected) {
            LiveModel::notify(state, Event::IntegrityFailure { id });
            return Err(Error::ChecksumMismatch {
                patch: applied.patch.name.clone(),
                offset: range.start,
            });
        }
        for (b, offset, bytes) in &handed {
            state.applied[*b].amend(*offset, bytes);
        }
        // The patches under this one whose bytes came back.
        let restored: Vec<(Uuid, String)> = state.applied[..index]
            .iter()
            .filter(|a| a.shares_bytes_with(&applied))
            .map(|a| (a.patch.id, a.patch.name.clone()))
            .collect();
        state.applied.remove(index);
        LiveModel::refresh_checksums(bytes, state);
        state.history.push(HistoryEntry {
            id,
            name: applied.patch.name.clone(),
            action: Action::Reverted,
            at: SystemTime::now(),
            duration: started.elapsed(),
            result: "ok".into(),
            checksum_before: applied.checksum_after,
            checksum_after: after,
        });
        self.patches_reverted.fetch_add(1, Ordering::Relaxed);
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        LiveModel::notify(state, Event::Reverted { id, epoch });
        for (restored_id, name) in restored {
            state.history.push(HistoryEntry {
                id: restored_id,
                name,
                action: Action::Restored,
                at: SystemTime::now(),
                duration: Duration::ZERO,
                result: format!("bytes back after {} was reverted", applied.patch.name),
                checksum_before: 0,
                checksum_after: 0,
            });
            LiveModel::notify(
                state,
                Event::Restored {
                    id: restored_id,
                    by: id,
                    epoch,
                },
            );
        }
        Ok(())
    }

    /// Stores (or compares and exchanges) an aligned word. On a shared file mapping the
    /// store is journaled like any other change: undo record first, then the word, then
    /// the commit.
    pub(crate) fn atomic(
        &self,
        offset: u64,
        width: usize,
        current: Option<u64>,
        new: u64,
    ) -> Result<Result<u64, u64>> {
        let mut region = self.region.write();
        let start = offset as usize;
        if start.saturating_add(width) > region.bytes().len() {
            return Err(Error::OutsideRegion {
                start: offset,
                end: offset + width as u64,
                len: self.len(),
            });
        }
        let old = region.bytes()[start..start + width].to_vec();
        let new_bytes = if width == 8 {
            new.to_le_bytes().to_vec()
        } else {
            (new as u32).to_le_bytes().to_vec()
        };
        let journal_transaction = match &self.journal {
            Some(journal) => Some(journal.lock().unwrap_or_else(|e| e.into_inner()).begin(
                &format!("atomic store of {width} bytes at {offset}"),
                None,
                &[(offset, &old, &new_bytes)],
            )?),
            None => None,
        };
        let window = region.window(start..start + width)?;
        self.protection_calls.fetch_add(2, Ordering::Relaxed);
        let result = window.atomic_word(start, width, current, new);
        drop(window);
        let finished = region.flush(start, width).and_then(|()| {
            match (self.journal.as_ref(), journal_transaction, &result) {
                (Some(journal), Some(txn), Ok(Ok(_))) => journal
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .commit(txn)
                    .map_err(Error::from),
                // The exchange did not happen: nothing changed, and the record says so.
                (Some(journal), Some(txn), _) => journal
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .mark_rolled_back(txn)
                    .map_err(Error::from),
                _ => Ok(()),
            }
        });
        finished?;
        if matches!(result, Ok(Ok(_))) {
            self.epoch.fetch_add(1, Ordering::AcqRel);
            let (bytes, state) = region.parts();
            LiveModel::refresh_checksums(bytes, state);
        }
        result
    }

    /// Changes page protection by hand. Refused on a shared file mapping: pages left
    /// writable there would let a write reach the file without a journal record.
    pub(crate) fn protect_pages(&self, range: Range<u64>, writable: bool) -> Result<()> {
        if writable && self.is_shared() {
            return Err(Error::SharedFileProtection);
        }
        let mut region = self.region.write();
        region.set_protection(
            range.start as usize,
            (range.end - range.start) as usize,
            writable,
        )?;
        self.protection_calls.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Detaches: with `revert`, every applied patch is reverted first (for shared files
    /// they are journaled and stay otherwise); the pages are made writable again for
    /// a raw region so its owner gets it back as it gave it.
    pub fn detach(self, revert: bool) -> Result<()> {
        if revert {
            self.revert_all()?;
        }
        if matches!(self.region.mapping().backing(), Backing::Raw) {
            let len = self.region.mapping().len();
            self.region.write().set_protection(0, len, true)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
