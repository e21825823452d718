//! Plans: what a write would do, made once, reported (serialized) before anything is
//! written, and applied unchanged afterwards.
//!
//! Every write-planning call returns a [`Plan`]. A plan records a [`FileStamp`] of the
//! file it was made from (length, modification time and a SHA-256 of the bytes the plan
//! read or replaces); `apply` checks the stamp again and refuses with
//! [`Error::StalePlan`] when the file changed in between, because the plan would then
//! no longer say what applying it does. A dry run is a plan that is reported and never
//! applied: making one writes nothing (no journal is created, no byte moves).
//!
//! - [`WritePlan`]: same-size writes in place, applied as one journal transaction.
//! - [`RewritePlan`]: a rewrite through [`GgufWriter`] into a new file, or over the
//!   input (temporary file, fsync, rename).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::edit::RewriteOutcome;
use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::inplace::InPlaceFile;
use crate::journal::{Journal, journal_path};
use crate::ops::to_hex;
use crate::patcher::{ByteWrite, EditReceipt, check_and_drop_unchanged};
use crate::writer::GgufWriter;

/// A planned write: serialized to report what it would do, applied to do it.
pub trait Plan: Serialize {
    /// What applying returns.
    type Applied;
    /// What applying can fail with.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Whether applying would change nothing.
    fn is_noop(&self) -> bool;

    /// Does what the plan says, after checking that the file is still the one it was
    /// made from.
    fn apply(self) -> std::result::Result<Self::Applied, Self::Error>;
}

/// What a plan knows of the file it was made from, checked again before it is applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FileStamp {
    /// The file.
    pub path: PathBuf,
    /// Its length.
    pub len: u64,
    /// Its modification time, in nanoseconds since the Unix epoch.
    pub modified_ns: u64,
    /// SHA-256 (hex) of the bytes of `ranges`, one after another.
    pub sha256: String,
    /// The ranges the digest covers: what the plan read or replaces.
    pub ranges: Vec<Range<u64>>,
}

fn modified_ns(path: &Path) -> Result<(u64, u64)> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io("stat", path, e))?;
    let modified = meta
        .modified()
        .map_err(|e| Error::io("read the modification time of", path, e))?;
    let ns = modified
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    Ok((meta.len(), ns))
}

fn digest(bytes: &[u8], ranges: &[Range<u64>]) -> Option<String> {
    let mut hasher = Sha256::new();
    for r in ranges {
        hasher.update(bytes.get(r.start as usize..r.end as usize)?);
    }
    Some(to_hex(&hasher.finalize()))
}

impl FileStamp {
    /// Stamps `path`, whose bytes (as mapped or read) are `bytes`, covering `ranges`.
    pub fn take(
        path: &Path,
        bytes: &[u8],
        ranges: impl IntoIterator<Item = Range<u64>>,
    ) -> Result<FileStamp> {
        let ranges: Vec<Range<u64>> = ranges.into_iter().collect();
        let (len, modified_ns) = modified_ns(path)?;
        let stale = |what: &str| Error::StalePlan {
            path: path.to_owned(),
            what: what.to_owned(),
        };
        if len != bytes.len() as u64 {
            return Err(stale("its length differs from the bytes read"));
        }
        let sha256 = digest(bytes, &ranges).ok_or_else(|| stale("a range lies past its end"))?;
        Ok(FileStamp {
            path: path.to_owned(),
            len,
            modified_ns,
            sha256,
            ranges,
        })
    }

    /// Stamps `path` by its length and modification time alone (no bytes read), or
    /// `None` when there is no such file.
    pub fn of_metadata(path: &Path) -> Result<Option<FileStamp>> {
        if std::fs::symlink_metadata(path).is_err() {
            return Ok(None);
        }
        let (len, modified_ns) = modified_ns(path)?;
        Ok(Some(FileStamp {
            path: path.to_owned(),
            len,
            modified_ns,
            sha256: to_hex(&Sha256::digest([])),
            ranges: Vec::new(),
        }))
    }

    /// Checks that `path` is as `stamp` found it: unchanged when it was there, still
    /// absent when it was not.
    pub fn check_path(path: &Path, stamp: Option<&FileStamp>) -> Result<()> {
        match stamp {
            Some(stamp) => stamp.check_unread(),
            None if std::fs::symlink_metadata(path).is_ok() => Err(Error::StalePlan {
                path: path.to_owned(),
                what: "it was created since".to_owned(),
            }),
            None => Ok(()),
        }
    }

    /// Checks that the file still has the stamp's length and modification time, without
    /// reading it.
    pub fn check_unread(&self) -> Result<()> {
        let stale = |what: String| Error::StalePlan {
            path: self.path.clone(),
            what,
        };
        let (len, modified_ns) = match modified_ns(&self.path) {
            Ok(found) => found,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Err(stale("removed since".to_owned()));
            }
            Err(e) => return Err(e),
        };
        if len != self.len {
            return Err(stale(format!("length {} -> {len}", self.len)));
        }
        if modified_ns != self.modified_ns {
            return Err(stale("modified since".to_owned()));
        }
        Ok(())
    }

    /// Checks that `path` still has the stamp's length and modification time and that
    /// `bytes` (the file as it is now) still hold the digested ranges.
    pub fn check(&self, bytes: &[u8]) -> Result<()> {
        let stale = |what: String| Error::StalePlan {
            path: self.path.clone(),
            what,
        };
        self.check_unread()?;
        if bytes.len() as u64 != self.len {
            return Err(stale(format!("length {} -> {}", self.len, bytes.len())));
        }
        if digest(bytes, &self.ranges).as_deref() != Some(self.sha256.as_str()) {
            return Err(stale("the bytes the plan read differ".to_owned()));
        }
        Ok(())
    }
}

/// No details beyond the writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NoDetails {}

/// One write of a [`WritePlan`], as reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlannedWrite {
    /// Absolute offset.
    pub offset: u64,
    /// Bytes written.
    pub len: u64,
    /// The tensor whose data it lies in, or `None` in the header (metadata).
    pub tensor: Option<String>,
    /// The metadata key whose value it lies in, when it lies in the header.
    pub key: Option<String>,
}

/// Same-size writes to a file in place, applied as one journal transaction (all or
/// none); `details` carries what the planner adds (codec costs, tensors, keys).
#[derive(Clone, Debug, Serialize)]
pub struct WritePlan<D = NoDetails> {
    /// `"in_place"`.
    pub kind: &'static str,
    /// The file.
    pub file: PathBuf,
    /// The journal transaction's name.
    pub name: String,
    /// The transaction it reverts, for a revert.
    pub reverts: Option<u64>,
    /// The file's length (in place: unchanged).
    pub size_before: u64,
    /// The file's length afterwards.
    pub size_after: u64,
    /// The writes, sorted, only those that change bytes.
    pub writes: Vec<PlannedWrite>,
    /// Bytes written.
    pub bytes: u64,
    /// What the plan was made from.
    pub stamp: FileStamp,
    /// What the planner adds.
    #[serde(flatten)]
    pub details: D,
    #[serde(skip)]
    data: Vec<ByteWrite>,
}

impl<D> WritePlan<D> {
    /// Plans `writes` (any order, disjoint, inside the file) on `path`, whose bytes now
    /// are `bytes`, as a transaction named `name`. Writes that would put back what is
    /// there are dropped; nothing is written.
    pub fn new(
        path: &Path,
        bytes: &[u8],
        name: impl Into<String>,
        writes: Vec<ByteWrite>,
        details: D,
    ) -> Result<WritePlan<D>> {
        WritePlan::build(path, bytes, name.into(), None, writes, details)
    }

    fn build(
        path: &Path,
        bytes: &[u8],
        name: String,
        reverts: Option<u64>,
        mut writes: Vec<ByteWrite>,
        details: D,
    ) -> Result<WritePlan<D>> {
        check_and_drop_unchanged(&mut writes, bytes)?;
        let gguf = Gguf::parse(bytes).ok();
        let planned = writes
            .iter()
            .map(|w| {
                let (tensor, key) = gguf.as_ref().map_or((None, None), |g| place(g, w.offset));
                PlannedWrite {
                    offset: w.offset,
                    len: w.bytes.len() as u64,
                    tensor,
                    key,
                }
            })
            .collect();
        let ranges: Vec<Range<u64>> = writes.iter().map(ByteWrite::range).collect();
        Ok(WritePlan {
            kind: "in_place",
            file: path.to_owned(),
            name,
            reverts,
            size_before: bytes.len() as u64,
            size_after: bytes.len() as u64,
            writes: planned,
            bytes: writes.iter().map(|w| w.bytes.len() as u64).sum(),
            stamp: FileStamp::take(path, bytes, ranges)?,
            details,
            data: writes,
        })
    }

    /// The writes themselves.
    pub fn byte_writes(&self) -> &[ByteWrite] {
        &self.data
    }
}

impl WritePlan {
    /// Plans the revert of `transaction` of `path`'s journal, read under a shared lock:
    /// nothing is created or written. A journal with an unfinished transaction is
    /// refused (recovery comes first).
    pub fn revert(path: &Path, transaction: u64) -> Result<WritePlan> {
        if !journal_path(path).exists() {
            return Err(Error::NoSuchTransaction(transaction));
        }
        let journal = Journal::open_read_only(path)?;
        if let Some(txn) = journal.unfinished() {
            return Err(Error::UnfinishedTransaction {
                path: journal.path().to_owned(),
                id: txn.id,
            });
        }
        let map = crate::file::MappedFile::open(path)?;
        let writes = crate::inplace::revert_writes(&journal, map.bytes(), transaction)?;
        WritePlan::build(
            path,
            map.bytes(),
            format!("revert {transaction}"),
            Some(transaction),
            writes,
            NoDetails {},
        )
    }
}

/// What a [`RecoveryPlan`] rolls back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RollBack {
    /// The unfinished transaction, or `None` when there is nothing to recover.
    pub rolls_back: Option<u64>,
    /// The unfinished transaction when it is the part of a shard-set transaction that
    /// committed: recovery keeps its bytes and marks it committed (no write).
    pub completes: Option<u64>,
}

/// The rollback of the unfinished transaction of a file's journal, planned from the
/// journal read under a shared lock: the writes put back each original byte (those
/// already back are left out). Applying it runs recovery, after checking the file and
/// that the same transaction is still the unfinished one.
#[derive(Clone, Debug, Serialize)]
pub struct RecoveryPlan {
    #[serde(flatten)]
    plan: WritePlan<RollBack>,
}

impl RecoveryPlan {
    /// Plans the recovery of `path`; nothing is created or written.
    pub fn new(path: &Path) -> Result<RecoveryPlan> {
        let map = crate::file::MappedFile::open(path)?;
        let mut writes = Vec::new();
        let mut name = "nothing to roll back".to_owned();
        let mut rolls_back = None;
        let completes = None;
        if journal_path(path).exists() {
            let journal = Journal::open_read_only(path)?;
            if let Some(txn) = journal.unfinished() {
                if crate::split::transaction::part_committed(path, txn)? {
                    let name = format!(
                        "complete {} ({}): its shard-set transaction committed",
                        txn.id, txn.name
                    );
                    let details = RollBack {
                        rolls_back: None,
                        completes: Some(txn.id),
                    };
                    let plan = WritePlan::build(path, map.bytes(), name, None, vec![], details)?;
                    return Ok(RecoveryPlan { plan });
                }
                for entry in &txn.writes {
                    writes.push(ByteWrite {
                        offset: entry.offset,
                        bytes: journal.original_bytes(entry)?,
                    });
                }
                name = format!("roll back {} ({})", txn.id, txn.name);
                rolls_back = Some(txn.id);
            }
        }
        let plan = WritePlan::build(
            path,
            map.bytes(),
            name,
            None,
            writes,
            RollBack {
                rolls_back,
                completes,
            },
        )?;
        Ok(RecoveryPlan { plan })
    }

    /// The transaction it rolls back.
    pub fn rolls_back(&self) -> Option<u64> {
        self.plan.details.rolls_back
    }

    /// The unfinished transaction it completes instead (see [`RollBack::completes`]).
    pub fn completes(&self) -> Option<u64> {
        self.plan.details.completes
    }
}

impl Plan for RecoveryPlan {
    type Applied = Option<crate::inplace::RecoveryReport>;
    type Error = Error;

    fn is_noop(&self) -> bool {
        self.rolls_back().or(self.completes()).is_none()
    }

    fn apply(self) -> Result<Self::Applied> {
        let Some(id) = self.rolls_back().or(self.completes()) else {
            return Ok(None);
        };
        {
            let map = crate::file::MappedFile::open(&self.plan.file)?;
            self.plan.stamp.check(map.bytes())?;
        }
        let journal = Journal::open_read_only(&self.plan.file)?;
        if journal.unfinished().map(|t| t.id) != Some(id) {
            return Err(Error::StalePlan {
                path: self.plan.file.clone(),
                what: format!("transaction {id} is no longer the unfinished one"),
            });
        }
        drop(journal);
        crate::inplace::recover(&self.plan.file)
    }
}

/// The tensor or metadata key that holds `offset`.
fn place(gguf: &Gguf<'_>, offset: u64) -> (Option<String>, Option<String>) {
    if offset >= gguf.data_offset() {
        let tensor = gguf
            .tensors()
            .iter()
            .find(|t| t.data_range().contains(&offset))
            .map(|t| t.name.clone());
        return (tensor, None);
    }
    let key = gguf
        .metadata()
        .iter()
        .find(|e| (e.entry_offset..e.value_range().end).contains(&offset))
        .map(|e| e.key.to_string());
    (None, key)
}

impl<D: Serialize> Plan for WritePlan<D> {
    type Applied = EditReceipt;
    type Error = Error;

    fn is_noop(&self) -> bool {
        self.data.is_empty()
    }

    /// Opens the file for in-place editing (rolling back an unfinished transaction,
    /// which changes the file and so makes the plan stale), checks the stamp and commits
    /// the writes as one transaction.
    fn apply(self) -> Result<EditReceipt> {
        let mut file = InPlaceFile::open(&self.file)?;
        self.stamp
            .check(crate::patcher::BytePatcher::bytes(&file))?;
        file.run_transaction(&self.name, self.reverts, self.data)
    }
}

/// Keys and tensors a rewrite adds, removes or changes, computed from the source and the
/// writer that would produce the new file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RewriteChanges {
    /// Keys the new file has and the old one does not.
    pub keys_added: Vec<String>,
    /// Keys the old file has and the new one does not.
    pub keys_removed: Vec<String>,
    /// Keys in both whose value differs.
    pub keys_changed: Vec<String>,
    /// Tensors the new file has and the old one does not.
    pub tensors_added: Vec<String>,
    /// Tensors the old file has and the new one does not.
    pub tensors_removed: Vec<String>,
    /// Tensors in both whose type or shape differs.
    pub tensors_changed: Vec<String>,
}

impl RewriteChanges {
    /// Compares what `writer` would write with `gguf`.
    pub fn between(gguf: &Gguf<'_>, writer: &GgufWriter<'_>) -> RewriteChanges {
        use std::collections::BTreeMap;
        let old_keys: BTreeMap<String, crate::value::Value> = gguf
            .metadata()
            .iter()
            .map(|e| (e.key.to_string(), e.value.to_owned_value()))
            .collect();
        let new_keys: BTreeMap<&str, &crate::value::Value> = writer
            .metadata()
            .iter()
            .map(|(k, v)| (k.as_str(), v))
            .collect();
        let mut changes = RewriteChanges::default();
        for (key, value) in &old_keys {
            match new_keys.get(key.as_str()) {
                None => changes.keys_removed.push(key.clone()),
                Some(new) if *new != value => changes.keys_changed.push(key.clone()),
                Some(_) => {}
            }
        }
        changes.keys_added = new_keys
            .keys()
            .filter(|k| !old_keys.contains_key(**k))
            .map(|k| (*k).to_owned())
            .collect();
        let old_tensors: BTreeMap<&str, _> = gguf
            .tensors()
            .iter()
            .map(|t| (t.name.as_str(), (t.ggml_type, &t.dims)))
            .collect();
        let new_tensors: BTreeMap<&str, _> = writer
            .tensors()
            .iter()
            .map(|t| (t.name.as_str(), (t.ggml_type, &t.dims)))
            .collect();
        for (name, old) in &old_tensors {
            match new_tensors.get(name) {
                None => changes.tensors_removed.push((*name).to_owned()),
                Some(new) if new != old => changes.tensors_changed.push((*name).to_owned()),
                Some(_) => {}
            }
        }
        changes.tensors_added = new_tensors
            .keys()
            .filter(|k| !old_tensors.contains_key(*k))
            .map(|k| (*k).to_owned())
            .collect();
        changes
    }

    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.keys_added.is_empty()
            && self.keys_removed.is_empty()
            && self.keys_changed.is_empty()
            && self.tensors_added.is_empty()
            && self.tensors_removed.is_empty()
            && self.tensors_changed.is_empty()
    }
}

/// A rewrite of a GGUF file through a [`GgufWriter`] that an edit has prepared: into
/// `output`, or over the input itself (atomically) when there is none. Tensor data is
/// streamed from the input's map when it is applied. `details` is what the edit
/// returned (prune report, requantized tensors, ...), serialized as `report`.
pub struct RewritePlan<'a, R> {
    input: PathBuf,
    output: Option<PathBuf>,
    source: &'a [u8],
    stamp: FileStamp,
    writer: GgufWriter<'a>,
    size_after: u64,
    changes: RewriteChanges,
    details: R,
    progress: Option<Box<dyn FnMut(u64, u64) + 'a>>,
}

impl<R: std::fmt::Debug> std::fmt::Debug for RewritePlan<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RewritePlan")
            .field("input", &self.input)
            .field("output", &self.output)
            .field("stamp", &self.stamp)
            .field("size_after", &self.size_after)
            .field("changes", &self.changes)
            .field("details", &self.details)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct RewriteReport<'p, R> {
    kind: &'static str,
    file: &'p Path,
    output: &'p Path,
    size_before: u64,
    size_after: u64,
    #[serde(flatten)]
    changes: &'p RewriteChanges,
    stamp: &'p FileStamp,
    /// What the edit returned, under its own key: its names (a prune's
    /// `tensors_removed`) would otherwise collide with the changes'.
    report: &'p R,
}

impl<R: Serialize> Serialize for RewritePlan<'_, R> {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        RewriteReport {
            kind: "rewrite",
            file: &self.input,
            output: self.target(),
            size_before: self.stamp.len,
            size_after: self.size_after,
            changes: &self.changes,
            stamp: &self.stamp,
            report: &self.details,
        }
        .serialize(serializer)
    }
}

impl<'a, R> RewritePlan<'a, R> {
    /// Plans the rewrite of `input`, parsed as `gguf`, through `edit`, into `output`
    /// (over `input` when `None`). The edit runs now, once; nothing is written. The
    /// stamp covers the input's header (metadata and tensor table).
    pub fn new(
        input: &Path,
        output: Option<&Path>,
        gguf: &Gguf<'a>,
        edit: impl FnOnce(&Gguf<'a>, &mut GgufWriter<'a>) -> Result<R>,
    ) -> Result<RewritePlan<'a, R>> {
        let stamp = FileStamp::take(input, gguf.bytes(), std::iter::once(0..gguf.data_offset()))?;
        let mut writer = GgufWriter::from_gguf(gguf);
        let details = edit(gguf, &mut writer)?;
        let size_after = writer.layout()?.file_len;
        let changes = RewriteChanges::between(gguf, &writer);
        Ok(RewritePlan {
            input: input.to_owned(),
            output: output.map(Path::to_owned),
            source: gguf.bytes(),
            stamp,
            writer,
            size_after,
            changes,
            details,
            progress: None,
        })
    }

    /// Reports progress (bytes written, total) while the plan is applied.
    pub fn with_progress(mut self, progress: impl FnMut(u64, u64) + 'a) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// The file the plan was made from.
    pub fn input(&self) -> &Path {
        &self.input
    }

    /// The file that would be written.
    pub fn target(&self) -> &Path {
        self.output.as_deref().unwrap_or(&self.input)
    }

    /// What the edit returned.
    pub fn details(&self) -> &R {
        &self.details
    }

    /// Keys and tensors added, removed, changed.
    pub fn changes(&self) -> &RewriteChanges {
        &self.changes
    }

    /// The new file's length.
    pub fn size_after(&self) -> u64 {
        self.size_after
    }
}

impl<R: Serialize> Plan for RewritePlan<'_, R> {
    type Applied = RewriteOutcome<R>;
    type Error = Error;

    fn is_noop(&self) -> bool {
        self.changes.is_empty() && self.output.is_none() && self.size_after == self.stamp.len
    }

    fn apply(self) -> Result<RewriteOutcome<R>> {
        self.write()
    }
}

impl<R> RewritePlan<'_, R> {
    /// Writes the new file (what [`Plan::apply`] does, for any `R`). Replacing the
    /// input, it holds the input's journal (no other writer works on the old file
    /// meanwhile; an unfinished transaction there makes the plan stale) and afterwards
    /// removes the journal, or moves it aside when it has transactions, whose offsets
    /// describe the old layout.
    pub fn write(mut self) -> Result<RewriteOutcome<R>> {
        let held = if self.output.is_none() {
            hold_journal(&self.input)?
        } else {
            None
        };
        self.stamp.check(self.source)?;
        let target = self.target().to_owned();
        let mut progress = self.progress.take();
        let mut report = |done: u64, total: u64| {
            if let Some(p) = progress.as_mut() {
                p(done, total);
            }
        };
        let bytes_written = self.writer.write_to_path_reporting(&target, &mut report)?;
        let archived_journal = match held {
            Some(held) => retire_journal(held, &self.input)?,
            None => None,
        };
        Ok(RewriteOutcome {
            result: self.details,
            output: target,
            bytes_written,
            input_len: self.stamp.len,
            archived_journal,
        })
    }
}

/// Holds the journal of `input`, which a rewrite is about to replace, when it has one: no
/// other writer works on the old file meanwhile. An unfinished transaction there makes
/// the plan stale.
pub(crate) fn hold_journal(input: &Path) -> Result<Option<Journal>> {
    if !journal_path(input).exists() {
        return Ok(None);
    }
    let held = Journal::open(input)?;
    if held.unfinished().is_some() {
        return Err(Error::StalePlan {
            path: input.to_owned(),
            what: "its journal has an unfinished transaction".to_owned(),
        });
    }
    Ok(Some(held))
}

/// After `input` was replaced by a rewrite: removes its held journal, or moves it aside
/// when it has transactions, whose offsets describe the old layout. Returns where it
/// was moved.
pub(crate) fn retire_journal(held: Journal, input: &Path) -> Result<Option<PathBuf>> {
    let journal = journal_path(input);
    let empty = held.transactions().is_empty();
    drop(held);
    if empty {
        std::fs::remove_file(&journal)
            .map_err(|e| Error::io("remove empty journal", &journal, e))?;
        return Ok(None);
    }
    let mut archived = journal.clone().into_os_string();
    let stamp = std::time::SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    archived.push(format!(".before-rewrite-{stamp}"));
    let archived = PathBuf::from(archived);
    std::fs::rename(&journal, &archived).map_err(|e| Error::io("archive journal", &journal, e))?;
    Ok(Some(archived))
}

/// One file a [`NewFilesPlan`] writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NewFile {
    /// Where.
    pub path: PathBuf,
    /// Its length.
    pub n_bytes: u64,
    /// SHA-256 (hex) of its content; in a plan, `None` for content that is computed as
    /// it is written (a tensor export, too large to hold), whose source's stamp
    /// determines it; the applied file always has it.
    pub sha256: Option<String>,
    /// The file it replaces, when there is one: replacing it is refused if it changed
    /// since the plan was made.
    pub replaces: Option<FileStamp>,
}

/// Writes a streamed file's content, in order, to the writer it is given.
pub type ContentWriter = Box<dyn FnOnce(&mut dyn std::io::Write) -> Result<()>>;

/// The content of one file of a [`NewFilesPlan`].
enum NewContent {
    /// Computed when the plan was made.
    Bytes(Vec<u8>),
    /// Computed as it is written, in bounded memory.
    Streamed(ContentWriter),
}

impl std::fmt::Debug for NewContent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NewContent::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            NewContent::Streamed(_) => f.write_str("Streamed(..)"),
        }
    }
}

/// Whole files whose content is computed when the plan is made (a manifest, a preset)
/// or as it is written (a `.npy` export, [`NewFilesPlan::streamed`]), each written
/// atomically (temporary file in the same directory, fsync, rename) when it is applied.
/// `stamp` is the file they were computed from, if any.
#[derive(Debug, Serialize)]
pub struct NewFilesPlan<D = NoDetails> {
    /// `"new_files"`.
    pub kind: &'static str,
    /// The file the content was computed from, if any.
    pub file: Option<PathBuf>,
    /// The files written.
    pub files: Vec<NewFile>,
    /// What the content was computed from.
    pub stamp: Option<FileStamp>,
    /// What the planner adds.
    #[serde(flatten)]
    pub details: D,
    #[serde(skip)]
    contents: Vec<NewContent>,
}

impl<D> NewFilesPlan<D> {
    /// Plans writing `files` (path, content), computed from the file `source` stamps,
    /// when given.
    pub fn new(
        source: Option<FileStamp>,
        files: Vec<(PathBuf, Vec<u8>)>,
        details: D,
    ) -> Result<NewFilesPlan<D>> {
        let stamp = source;
        let mut planned = Vec::with_capacity(files.len());
        let mut contents = Vec::with_capacity(files.len());
        for (path, content) in files {
            let replaces = FileStamp::of_metadata(&path)?;
            planned.push(NewFile {
                path,
                n_bytes: content.len() as u64,
                sha256: Some(to_hex(&Sha256::digest(&content))),
                replaces,
            });
            contents.push(NewContent::Bytes(content));
        }
        Ok(NewFilesPlan {
            kind: "new_files",
            file: stamp.as_ref().map(|s| s.path.clone()),
            files: planned,
            stamp,
            details,
            contents,
        })
    }
}

impl<D> NewFilesPlan<D> {
    /// Plans writing one file of `n_bytes` whose content `write` produces when the plan
    /// is applied (the source `source` stamps determines it): for content too large to
    /// hold in memory. Applying refuses a writer that writes another length.
    pub fn streamed(
        source: Option<FileStamp>,
        path: PathBuf,
        n_bytes: u64,
        write: ContentWriter,
        details: D,
    ) -> Result<NewFilesPlan<D>> {
        let replaces = FileStamp::of_metadata(&path)?;
        Ok(NewFilesPlan {
            kind: "new_files",
            file: source.as_ref().map(|s| s.path.clone()),
            files: vec![NewFile {
                path,
                n_bytes,
                sha256: None,
                replaces,
            }],
            stamp: source,
            details,
            contents: vec![NewContent::Streamed(write)],
        })
    }
}

impl<D: Serialize> Plan for NewFilesPlan<D> {
    /// The files written.
    type Applied = Vec<NewFile>;
    type Error = Error;

    fn is_noop(&self) -> bool {
        self.files.is_empty()
    }

    /// Checks the source's stamp (length and modification time; its bytes were read
    /// when the content was computed) and each replaced file's, and that no file
    /// appeared where there was none; then writes each file.
    fn apply(self) -> Result<Vec<NewFile>> {
        if let Some(stamp) = &self.stamp {
            stamp.check_unread()?;
        }
        for file in &self.files {
            FileStamp::check_path(&file.path, file.replaces.as_ref())?;
        }
        let mut written = Vec::with_capacity(self.files.len());
        for (mut file, content) in self.files.into_iter().zip(self.contents) {
            let digest = match content {
                NewContent::Bytes(bytes) => write_atomically(&file.path, file.n_bytes, |out| {
                    out.write_all(&bytes)
                        .map_err(|e| Error::io("write", &file.path, e))
                })?,
                NewContent::Streamed(write) => write_atomically(&file.path, file.n_bytes, write)?,
            };
            file.sha256 = Some(digest.sha256);
            written.push(file);
        }
        Ok(written)
    }
}

/// What [`write_atomically`] wrote.
struct Written {
    sha256: String,
}

/// A writer that counts and hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hasher: Sha256,
    n_bytes: u64,
}

impl<W: std::io::Write> std::io::Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.n_bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes what `write` produces to `path` through a temporary file in the same
/// directory, fsynced and renamed over it (permissions 0644); on error, or when it wrote
/// other than `n_bytes` bytes, the temporary file is removed and `path` is untouched.
fn write_atomically(
    path: &Path,
    expected: u64,
    write: impl FnOnce(&mut dyn std::io::Write) -> Result<()>,
) -> Result<Written> {
    use std::io::Write as _;
    let dir = crate::writer::parent_dir(path);
    let temp = tempfile::Builder::new()
        .prefix(".hotpatch-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io("create a temporary file in", dir, e))?;
    let mut out = Hashing {
        inner: std::io::BufWriter::with_capacity(1 << 20, temp),
        hasher: Sha256::new(),
        n_bytes: 0,
    };
    write(&mut out)?;
    out.flush().map_err(|e| Error::io("write", path, e))?;
    let Hashing {
        inner,
        hasher,
        n_bytes,
    } = out;
    if n_bytes != expected {
        return Err(Error::LengthMismatch {
            what: "bytes written for a new file",
            expected,
            found: n_bytes,
            start: 0,
            end: expected,
        });
    }
    let temp = inner
        .into_inner()
        .map_err(|e| Error::io("write", path, e.into_error()))?;
    temp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(|e| Error::io("set permissions of", path, e))?;
    temp.as_file()
        .sync_all()
        .map_err(|e| Error::io("sync", path, e))?;
    temp.persist(path)
        .map_err(|e| Error::io("rename into", path, e.error))?;
    crate::writer::sync_dir(dir)?;
    Ok(Written {
        sha256: to_hex(&hasher.finalize()),
    })
}

#[cfg(test)]
mod tests;
