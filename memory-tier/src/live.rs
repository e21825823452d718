//! `LiveModel`: a model region kept read-only by the operating system, patched through
//! page-aligned writable windows, with conflict checks, transactions, compact undo
//! storage, history, events and a read guard for engines.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock, RwLockReadGuard, mpsc};
use std::time::{Duration, Instant, SystemTime};

use byte_tier::codec;
use byte_tier::{ByteWrite, Gguf, Journal, TensorInfo};
use uuid::Uuid;

use crate::error::{Error, Result};
use crate::patch::{MemoryPatch, PatchTarget, Payload};
use crate::sys::{Backing, Mapping, page_size};

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
}

/// How an applied patch can be undone: the original bytes of its range, or only the
/// runs it changed, whichever is smaller.
#[derive(Clone, Debug)]
enum Undo {
    Original(Vec<u8>),
    Delta(Vec<(u64, Vec<u8>)>),
}

impl Undo {
    fn held(&self) -> u64 {
        match self {
            Undo::Original(b) => b.len() as u64,
            Undo::Delta(runs) => runs.iter().map(|(_, b)| 16 + b.len() as u64).sum(),
        }
    }
}

#[derive(Clone, Debug)]
struct Applied {
    patch: MemoryPatch,
    range: Range<u64>,
    undo: Undo,
    checksum_before: u32,
    checksum_after: u32,
    journal_transaction: Option<u64>,
}

#[derive(Debug, Default)]
struct State {
    registered: Vec<MemoryPatch>,
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
    /// Whether the new patch would win (higher priority).
    pub new_patch_wins: bool,
}

/// A planned patch: the range it owns and the writes it makes.
struct Plan {
    range: Range<u64>,
    writes: Vec<ByteWrite>,
    tensor: Option<usize>,
}

/// A live model region.
#[derive(Debug)]
pub struct LiveModel {
    mapping: Mapping,
    path: Option<PathBuf>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    state: RwLock<State>,
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

/// A writable window: pages made writable on creation and read-only again when it is
/// dropped, also on error and on panic.
#[must_use]
struct WritableWindow<'a> {
    model: &'a LiveModel,
    pages: Range<usize>,
}

impl<'a> WritableWindow<'a> {
    fn open(model: &'a LiveModel, bytes: Range<usize>) -> Result<WritableWindow<'a>> {
        let page = page_size();
        let pages = bytes.start / page * page..bytes.end.div_ceil(page) * page;
        model
            .mapping
            .protect(pages.start, pages.end - pages.start, true)?;
        model.protection_calls.fetch_add(1, Ordering::Relaxed);
        model.windows_opened.fetch_add(1, Ordering::Relaxed);
        Ok(WritableWindow { model, pages })
    }

    fn write(&self, offset: usize, bytes: &[u8]) {
        // Only inside the pages this window opened.
        assert!(
            offset >= self.pages.start && offset + bytes.len() <= self.pages.end,
            "write outside its window"
        );
        self.model.mapping.write(offset, bytes);
        self.model.writes.fetch_add(1, Ordering::Relaxed);
        self.model
            .bytes_written
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }
}

impl Drop for WritableWindow<'_> {
    fn drop(&mut self) {
        // Failing to make pages read-only again would leave them writable: there is no
        // safe way to go on, so the process stops rather than run unprotected.
        if let Err(error) =
            self.model
                .mapping
                .protect(self.pages.start, self.pages.end - self.pages.start, false)
        {
            eprintln!("memory-tier: cannot restore read-only protection: {error}");
            std::process::abort();
        }
        self.model.protection_calls.fetch_add(1, Ordering::Relaxed);
    }
}

/// A reader's view of the region: while it is held, no patch is half-applied.
#[derive(Debug)]
pub struct ReadGuard<'a> {
    model: &'a LiveModel,
    _state: RwLockReadGuard<'a, State>,
}

impl<'a> ReadGuard<'a> {
    /// The whole region.
    pub fn bytes(&self) -> &[u8] {
        self.model.mapping.bytes()
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
    /// Applies one patch.
    fn apply(&self, patch: MemoryPatch) -> Result<Uuid>;
    /// Applies patches as one all-or-nothing transaction.
    fn apply_transaction(&self, patches: Vec<MemoryPatch>) -> Result<Vec<Uuid>>;
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

    fn apply(&self, patch: MemoryPatch) -> Result<Uuid> {
        LiveModel::apply(self, patch)
    }

    fn apply_transaction(&self, patches: Vec<MemoryPatch>) -> Result<Vec<Uuid>> {
        self.apply_all(patches)
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

impl LiveModel {
    /// Attaches to the GGUF file at `path`.
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
        LiveModel::with_mapping(mapping, Some(path.to_owned()), journal, None)
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
        let tensors = match tensors {
            Some(t) => t,
            None => Gguf::parse(mapping.bytes())?.tensors().to_vec(),
        };
        for t in &tensors {
            if t.data_range().end > mapping.len() as u64 {
                return Err(Error::OutsideRegion {
                    start: t.data_offset,
                    end: t.data_range().end,
                    len: mapping.len() as u64,
                });
            }
        }
        let tensor_index = tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        mapping.protect(0, mapping.len(), false)?;
        Ok(LiveModel {
            mapping,
            path,
            tensors,
            tensor_index,
            state: RwLock::new(State::default()),
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
        matches!(self.mapping.backing(), Backing::Shared(_))
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
        self.mapping.len() as u64
    }

    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.mapping.len() == 0
    }

    /// The patch epoch: it advances with every apply and revert.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// A read guard: while held, patches wait, so the bytes seen are never half-patched.
    pub fn read(&self) -> ReadGuard<'_> {
        ReadGuard {
            model: self,
            _state: self.state.read().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Subscribes to events.
    pub fn subscribe(&self) -> mpsc::Receiver<Event> {
        let (tx, rx) = mpsc::channel();
        self.state
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .subscribers
            .push(tx);
        rx
    }

    /// The counters.
    pub fn stats(&self) -> Stats {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        Stats {
            patches_applied: self.patches_applied.load(Ordering::Relaxed),
            patches_reverted: self.patches_reverted.load(Ordering::Relaxed),
            windows_opened: self.windows_opened.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            protection_calls: self.protection_calls.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            undo_bytes_held: state.applied.iter().map(|a| a.undo.held()).sum(),
            applied_now: state.applied.len() as u64,
        }
    }

    /// The history, oldest first.
    pub fn history(&self) -> Vec<HistoryEntry> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .history
            .clone()
    }

    /// Registers a patch to apply later by name (see [`LiveModel::apply_registered`]).
    pub fn add(&self, patch: MemoryPatch) -> Result<Uuid> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        if state.registered.iter().any(|p| p.name == patch.name) {
            return Err(Error::InvalidPatch {
                patch: patch.name.clone(),
                reason: "a patch with this name is registered already".into(),
            });
        }
        let id = patch.id;
        state.registered.push(patch);
        Ok(id)
    }

    /// The registered patches.
    pub fn registered(&self) -> Vec<MemoryPatch> {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .registered
            .clone()
    }

    /// Enables or disables a registered patch.
    pub fn set_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let patch = state
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
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .applied
            .iter()
            .find(|a| a.patch.id == id)?
            .journal_transaction
    }

    /// The ids of the applied patches, in order of application.
    pub fn applied(&self) -> Vec<(Uuid, String)> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        state
            .applied
            .iter()
            .map(|a| (a.patch.id, a.patch.name.clone()))
            .collect()
    }

    fn plan(&self, patch: &MemoryPatch) -> Result<Plan> {
        if !patch.enabled {
            return Err(Error::Disabled(patch.name.clone()));
        }
        let invalid = |reason: String| Error::InvalidPatch {
            patch: patch.name.clone(),
            reason,
        };
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
                let Payload::Bytes(bytes) = &patch.payload else {
                    return Err(invalid(
                        "a raw range takes bytes, not a value transform".into(),
                    ));
                };
                if bytes.len() as u64 != range.end - range.start {
                    return Err(invalid(format!(
                        "{} bytes for a range of {}",
                        bytes.len(),
                        range.end - range.start
                    )));
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
                Ok(Plan {
                    range: range.clone(),
                    writes: vec![ByteWrite {
                        offset: range.start,
                        bytes: bytes.clone(),
                    }],
                    tensor,
                })
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
                let old = &self.mapping.bytes()[range.start as usize..range.end as usize];
                let writes = match &patch.payload {
                    Payload::Bytes(bytes) => {
                        if bytes.len() as u64 != range.end - range.start {
                            return Err(invalid(format!(
                                "{} bytes for {} elements of {} ({} bytes)",
                                bytes.len(),
                                elements.end - elements.start,
                                t.ggml_type,
                                range.end - range.start
                            )));
                        }
                        byte_tier::tensor_edit::changed_runs(old, bytes, range.start)
                    }
                    Payload::Transform(transform) => {
                        let transform = transform.as_codec();
                        let mut new = old.to_vec();
                        codec::transform_range(
                            t.ggml_type,
                            &mut new,
                            0..elements.end - elements.start,
                            &transform,
                        )
                        .map_err(|e| Error::Bytes(e.in_tensor(name)))?;
                        byte_tier::tensor_edit::changed_runs(old, &new, range.start)
                    }
                };
                Ok(Plan {
                    range,
                    writes,
                    tensor: Some(index),
                })
            }
        }
    }

    fn conflicts_with(
        state: &State,
        patch: &MemoryPatch,
        range: &Range<u64>,
    ) -> Vec<ConflictReport> {
        state
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
            .collect()
    }

    /// The overlaps `patch` would have with applied patches, without applying it.
    pub fn check_conflicts(&self, patch: &MemoryPatch) -> Result<Vec<ConflictReport>> {
        let plan = self.plan(patch)?;
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        Ok(LiveModel::conflicts_with(&state, patch, &plan.range))
    }

    /// Writes through windows grouped by the policy.
    fn write_windowed(&self, writes: &[(ByteWrite, Option<usize>)]) -> Result<()> {
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
            let window = WritableWindow::open(self, start..end)?;
            for (w, _) in &writes[i..j] {
                window.write(w.offset as usize, &w.bytes);
            }
            drop(window);
            i = j;
        }
        Ok(())
    }

    fn notify(state: &mut State, event: Event) {
        state.subscribers.retain(|s| s.send(event.clone()).is_ok());
    }

    /// Applies one patch.
    pub fn apply(&self, patch: MemoryPatch) -> Result<Uuid> {
        self.apply_all(vec![patch]).map(|ids| ids[0])
    }

    /// Applies patches as one transaction: every check runs before any byte moves, and
    /// either all are applied or none. Patches that overlap each other are refused; an
    /// applied patch of lower priority in the way is reverted first, one of equal or
    /// higher priority refuses the whole transaction.
    pub fn apply_all(&self, patches: Vec<MemoryPatch>) -> Result<Vec<Uuid>> {
        let started = Instant::now();
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let mut plans = Vec::with_capacity(patches.len());
        for patch in &patches {
            let failure = |state: &mut State, error: Error| {
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
            {
                return Err(failure(
                    &mut state,
                    Error::AlreadyApplied(patch.name.clone()),
                ));
            }
            let plan = match self.plan(patch) {
                Ok(plan) => plan,
                Err(error) => return Err(failure(&mut state, error)),
            };
            let overlaps_batch =
                plans
                    .iter()
                    .zip(&patches)
                    .find(|(p, _): &(&Plan, &MemoryPatch)| {
                        p.range.start < plan.range.end && plan.range.start < p.range.end
                    });
            if let Some((other, other_patch)) = overlaps_batch {
                let error = Error::Conflict {
                    patch: patch.name.clone(),
                    applied: other_patch.name.clone(),
                    applied_priority: other_patch.priority,
                    overlap: other.range.start.max(plan.range.start)
                        ..other.range.end.min(plan.range.end),
                };
                return Err(failure(&mut state, error));
            }
            let conflicts = LiveModel::conflicts_with(&state, patch, &plan.range);
            if let Some(c) = conflicts.iter().find(|c| !c.new_patch_wins) {
                LiveModel::notify(
                    &mut state,
                    Event::Conflict {
                        id: patch.id,
                        applied: c.applied,
                    },
                );
                let error = Error::Conflict {
                    patch: patch.name.clone(),
                    applied: c.applied_name.clone(),
                    applied_priority: c.applied_priority,
                    overlap: c.overlap.clone(),
                };
                return Err(failure(&mut state, error));
            }
            plans.push(plan);
        }
        // Lower-priority patches in the way are reverted first.
        let displaced: Vec<Uuid> = patches
            .iter()
            .zip(&plans)
            .flat_map(|(p, plan)| LiveModel::conflicts_with(&state, p, &plan.range))
            .map(|c| c.applied)
            .collect();
        if !displaced.is_empty() {
            for id in displaced {
                self.revert_locked(&mut state, id)?;
            }
            // The bytes under the plans changed: plan again.
            plans = patches
                .iter()
                .map(|p| self.plan(p))
                .collect::<Result<_>>()?;
        }

        let bytes = self.mapping.bytes();
        let mut records = Vec::with_capacity(plans.len());
        let mut all_writes = Vec::new();
        for (patch, plan) in patches.iter().zip(&plans) {
            let before = &bytes[plan.range.start as usize..plan.range.end as usize];
            let delta: Vec<(u64, Vec<u8>)> = plan
                .writes
                .iter()
                .map(|w| {
                    (
                        w.offset,
                        bytes[w.offset as usize..w.range().end as usize].to_vec(),
                    )
                })
                .collect();
            let undo = if !patch.snapshot
                && delta.iter().map(|(_, b)| 16 + b.len()).sum::<usize>() < before.len()
            {
                Undo::Delta(delta)
            } else {
                Undo::Original(before.to_vec())
            };
            records.push((patch.clone(), plan.range.clone(), undo, crc(before)));
            all_writes.extend(plan.writes.iter().cloned().map(|w| (w, plan.tensor)));
        }
        all_writes.sort_by_key(|(w, _)| w.offset);

        let journal_transaction = self.journal_begin(&patches, &all_writes)?;
        if let Err(error) = self
            .write_windowed(&all_writes)
            .and_then(|()| self.flush(&all_writes))
        {
            self.restore(&records)?;
            if let Some((journal, id)) = self.journal.as_ref().zip(journal_transaction) {
                let _ = journal
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .mark_rolled_back(id);
            }
            return Err(error);
        }
        if let Some((journal, id)) = self.journal.as_ref().zip(journal_transaction) {
            journal
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .commit(id)?;
        }

        let bytes = self.mapping.bytes();
        let mut ids = Vec::with_capacity(records.len());
        for (patch, range, undo, checksum_before) in records {
            let checksum_after = crc(&bytes[range.start as usize..range.end as usize]);
            ids.push(patch.id);
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
                &mut state,
                Event::Applied {
                    id: patch.id,
                    epoch,
                },
            );
            state.applied.push(Applied {
                patch,
                range,
                undo,
                checksum_before,
                checksum_after,
                journal_transaction,
            });
        }
        Ok(ids)
    }

    fn journal_begin(
        &self,
        patches: &[MemoryPatch],
        writes: &[(ByteWrite, Option<usize>)],
    ) -> Result<Option<u64>> {
        let Some(journal) = &self.journal else {
            return Ok(None);
        };
        let bytes = self.mapping.bytes();
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
        let names: Vec<&str> = patches.iter().map(|p| p.name.as_str()).collect();
        let id = journal.lock().unwrap_or_else(|e| e.into_inner()).begin(
            &format!("live {}", names.join(", ")),
            None,
            &undo,
        )?;
        Ok(Some(id))
    }

    fn flush(&self, writes: &[(ByteWrite, Option<usize>)]) -> Result<()> {
        if let (Some(first), Some(last)) = (writes.first(), writes.last()) {
            let start = first.0.offset as usize;
            self.mapping
                .flush(start, last.0.range().end as usize - start)?;
        }
        Ok(())
    }

    fn restore(&self, records: &[(MemoryPatch, Range<u64>, Undo, u32)]) -> Result<()> {
        let mut writes = Vec::new();
        for (_, range, undo, _) in records {
            match undo {
                Undo::Original(bytes) => writes.push((
                    ByteWrite {
                        offset: range.start,
                        bytes: bytes.clone(),
                    },
                    None,
                )),
                Undo::Delta(runs) => writes.extend(runs.iter().map(|(o, b)| {
                    (
                        ByteWrite {
                            offset: *o,
                            bytes: b.clone(),
                        },
                        None,
                    )
                })),
            }
        }
        writes.sort_by_key(|(w, _)| w.offset);
        self.write_windowed(&writes)?;
        self.flush(&writes)
    }

    /// Reverts the applied patch `id`: refused when its bytes changed since; checked
    /// against the checksum taken before it was applied.
    pub fn revert(&self, id: Uuid) -> Result<()> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        self.revert_locked(&mut state, id)
    }

    /// Reverts the applied patch named `name`.
    pub fn revert_by_name(&self, name: &str) -> Result<()> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let id = state
            .applied
            .iter()
            .find(|a| a.patch.name == name)
            .map(|a| a.patch.id)
            .ok_or_else(|| Error::NoSuchPatch(name.to_owned()))?;
        self.revert_locked(&mut state, id)
    }

    /// Reverts every applied patch, newest first.
    pub fn revert_all(&self) -> Result<()> {
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        while let Some(id) = state.applied.last().map(|a| a.patch.id) {
            self.revert_locked(&mut state, id)?;
        }
        Ok(())
    }

    fn revert_locked(&self, state: &mut State, id: Uuid) -> Result<()> {
        let started = Instant::now();
        let index = state
            .applied
            .iter()
            .position(|a| a.patch.id == id)
            .ok_or_else(|| Error::NoSuchPatch(id.to_string()))?;
        let applied = state.applied[index].clone();
        let range = applied.range.clone();
        let current = crc(&self.mapping.bytes()[range.start as usize..range.end as usize]);
        if current != applied.checksum_after {
            LiveModel::notify(state, Event::IntegrityFailure { id });
            return Err(Error::ChecksumMismatch {
                patch: applied.patch.name.clone(),
                offset: range.start,
            });
        }
        let record = [(
            applied.patch.clone(),
            range.clone(),
            applied.undo.clone(),
            applied.checksum_before,
        )];
        if let Some(journal) = &self.journal {
            let bytes = self.mapping.bytes();
            let restore: Vec<(u64, Vec<u8>)> = match &applied.undo {
                Undo::Original(b) => vec![(range.start, b.clone())],
                Undo::Delta(runs) => runs.clone(),
            };
            let undo: Vec<(u64, &[u8], &[u8])> = restore
                .iter()
                .map(|(o, b)| (*o, &bytes[*o as usize..*o as usize + b.len()], b.as_slice()))
                .collect();
            let mut journal = journal.lock().unwrap_or_else(|e| e.into_inner());
            let txn = journal.begin(
                &format!("live revert {}", applied.patch.name),
                applied.journal_transaction,
                &undo,
            )?;
            self.restore(&record)?;
            journal.commit(txn)?;
        } else {
            self.restore(&record)?;
        }
        let after = crc(&self.mapping.bytes()[range.start as usize..range.end as usize]);
        if after != applied.checksum_before {
            LiveModel::notify(state, Event::IntegrityFailure { id });
            return Err(Error::ChecksumMismatch {
                patch: applied.patch.name.clone(),
                offset: range.start,
            });
        }
        state.applied.remove(index);
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
        Ok(())
    }

    pub(crate) fn atomic(
        &self,
        offset: u64,
        width: usize,
        current: Option<u64>,
        new: u64,
    ) -> Result<Result<u64, u64>> {
        let _state = self.state.write().unwrap_or_else(|e| e.into_inner());
        let start = offset as usize;
        if start.saturating_add(width) > self.mapping.len() {
            return Err(Error::OutsideRegion {
                start: offset,
                end: offset + width as u64,
                len: self.len(),
            });
        }
        let window = WritableWindow::open(self, start..start + width)?;
        let result = self.mapping.atomic_word(start, width, current, new);
        drop(window);
        self.mapping.flush(start, width)?;
        if matches!(result, Ok(Ok(_))) {
            self.epoch.fetch_add(1, Ordering::AcqRel);
        }
        result
    }

    pub(crate) fn protect_pages(&self, range: Range<u64>, writable: bool) -> Result<()> {
        let _state = self.state.write().unwrap_or_else(|e| e.into_inner());
        self.mapping.protect(
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
        if matches!(self.mapping.backing(), Backing::Raw) {
            self.mapping.protect(0, self.mapping.len(), true)?;
        }
        Ok(())
    }
}
