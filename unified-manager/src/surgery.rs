//! Surgery applied: the value edits byte-tier plans (directional ablation, LoRA merge)
//! written in place as one journal transaction through a shared writable mapping, so a
//! llama-server that maps the file (CPU, `--no-repack`) computes with them at once; and
//! the LoRA unmerge, which finds its merge in the journal by the adapter's identity and
//! reverts it byte for byte. Into a shard set, the same edits go in as one set
//! transaction over the shards ([`SetSurgeryPlan`], [`unmerge_set`]).

use std::path::{Path, PathBuf};

use byte_tier::TransactionState;
use byte_tier::plan::{FileStamp, Plan};
use byte_tier::split::transaction::{
    ShardWrites, revert_set_transaction, run_set_transaction, set_journal_target,
};
use byte_tier::surgery::{RewrittenTensor, merge_label};
use memory_tier::{AttachMode, LiveModel, MemoryPatch, PatchTarget, Payload};

use crate::error::{Error, Result};

/// Lowercase hex of the SHA-256 of a file: the identity of an adapter or a direction
/// file in the journal.
pub fn file_identity(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    Ok(byte_tier::ops::sha256(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Writes the new bytes of every tensor of `rewrites` into `path` in place, as one
/// journal transaction whose name starts with `label` (all the tensors or none). Only
/// the bytes that change are written and journaled. Returns the transaction's id, or
/// `None` when no byte changes.
pub fn apply_rewrites(
    path: &Path,
    label: &str,
    rewrites: &[RewrittenTensor],
) -> Result<Option<u64>> {
    let model = LiveModel::attach(path, AttachMode::Shared)?;
    let patches: Vec<MemoryPatch> = rewrites
        .iter()
        .map(|r| {
            MemoryPatch::new(
                format!("{label} {}", r.name),
                PatchTarget::Tensor {
                    name: r.name.clone(),
                    elements: None,
                },
                Payload::Bytes(r.bytes.clone()),
            )
        })
        .collect();
    if patches.is_empty() {
        return Ok(None);
    }
    let ids = model.apply_all(patches)?;
    Ok(ids.first().and_then(|&id| model.journal_transaction(id)))
}

/// New bytes for whole tensors of a file (an ablation, a LoRA merge), planned and not
/// yet written: reported as it is, applied by [`apply_rewrites`] as one journal
/// transaction through a shared live model. The stamp covers the file's header and the
/// data of every tensor it rewrites, which the planner read.
#[derive(Debug, serde::Serialize)]
pub struct SurgeryPlan<D> {
    /// `"in_place"`.
    pub kind: &'static str,
    /// The model.
    pub file: PathBuf,
    /// The label of the journal transaction (each tensor's patch is named after it).
    pub name: String,
    /// The file's length, before and after (unchanged: in place).
    pub size_before: u64,
    /// The file's length afterwards.
    pub size_after: u64,
    /// Bytes of the tensors rewritten (only those that change are journaled).
    pub bytes: u64,
    /// What the plan was made from.
    pub stamp: FileStamp,
    /// What the planner reported (per-tensor costs, skipped tensors, notes).
    #[serde(flatten)]
    pub details: D,
    #[serde(skip)]
    rewrites: Vec<RewrittenTensor>,
}

impl<D> SurgeryPlan<D> {
    /// Plans writing `rewrites` into `path` as a transaction labelled `label`.
    pub fn new(
        path: &Path,
        label: impl Into<String>,
        rewrites: Vec<RewrittenTensor>,
        details: D,
    ) -> Result<SurgeryPlan<D>> {
        let map = byte_tier::MappedFile::open(path)?;
        let gguf = map.parse()?;
        let mut ranges = Vec::with_capacity(rewrites.len() + 1);
        ranges.push(0..gguf.data_offset());
        for r in &rewrites {
            ranges.push(gguf.require_tensor(&r.name)?.data_range());
        }
        Ok(SurgeryPlan {
            kind: "in_place",
            file: path.to_owned(),
            name: label.into(),
            size_before: gguf.file_len(),
            size_after: gguf.file_len(),
            bytes: rewrites.iter().map(|r| r.bytes.len() as u64).sum(),
            stamp: FileStamp::take(path, map.bytes(), ranges)?,
            details,
            rewrites,
        })
    }
}

impl<D: serde::Serialize> Plan for SurgeryPlan<D> {
    /// The journal transaction, `None` when no byte changes.
    type Applied = Option<u64>;
    type Error = Error;

    fn is_noop(&self) -> bool {
        self.rewrites.is_empty()
    }

    fn apply(self) -> Result<Option<u64>> {
        {
            let map = byte_tier::MappedFile::open(&self.file)?;
            self.stamp.check(map.bytes())?;
        }
        apply_rewrites(&self.file, &self.name, &self.rewrites)
    }
}

/// What an unmerge did.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Unmerged {
    /// The merge transaction reverted.
    pub merge_transaction: u64,
    /// The revert's own transaction (`None` when nothing had to change).
    pub revert_transaction: Option<u64>,
    /// Bytes restored.
    pub bytes: u64,
}

/// The last merge of the adapter whose SHA-256 is `adapter_sha256` recorded in `journal`
/// that is committed and not reverted.
pub fn find_merge(journal: &byte_tier::Journal, adapter_sha256: &str) -> Option<u64> {
    let label = merge_label(adapter_sha256);
    journal
        .transactions()
        .iter()
        .rev()
        .find(|t| {
            t.name.contains(&label)
                && t.reverts.is_none()
                && matches!(t.state, TransactionState::Committed(_))
                && journal.reverted_by(t.id).is_none()
        })
        .map(|t| t.id)
}

/// Reverts the last merge of the adapter whose SHA-256 is `adapter_sha256` into
/// `path`, byte for byte (refused when the bytes it wrote changed since). The merge was
/// a live transaction, so the live model reverts it: patches applied over it since keep
/// their bytes.
pub fn unmerge(path: &Path, adapter_sha256: &str) -> Result<Unmerged> {
    let model = LiveModel::attach(path, AttachMode::Shared)?;
    let journal = byte_tier::Journal::open_read_only(path)?;
    let id = find_merge(&journal, adapter_sha256).ok_or_else(|| {
        Error::Refused(format!(
            "the journal of {} records no merge of the adapter with sha256 {adapter_sha256} \
             that is still applied",
            path.display()
        ))
    })?;
    let bytes = journal
        .transaction(id)
        .map_or(0, byte_tier::Transaction::bytes);
    let reverted = model.revert_transaction(id)?;
    if reverted.is_empty() {
        return Err(Error::Refused(format!(
            "transaction {id} of {} holds no live patch to revert",
            path.display()
        )));
    }
    let after = byte_tier::Journal::open_read_only(path)?;
    let revert_transaction = after
        .transactions()
        .iter()
        .rev()
        .find(|t| t.reverts == Some(id))
        .map(|t| t.id);
    Ok(Unmerged {
        merge_transaction: id,
        revert_transaction,
        bytes,
    })
}

/// [`SurgeryPlan`] for a shard set: new bytes for whole tensors that lie in several
/// shards, applied as one set transaction
/// ([`byte_tier::split::transaction::run_set_transaction`]): every shard or none, each
/// shard's part journaled beside it, the decision in the set's journal. A llama-server
/// that maps the shards (CPU, `--no-repack`) computes with the new bytes at once, as for
/// a single file.
#[derive(Debug, serde::Serialize)]
pub struct SetSurgeryPlan<D> {
    /// `"in_place_set"`.
    pub kind: &'static str,
    /// Every shard of the set, in order.
    pub shards: Vec<PathBuf>,
    /// The label of the set transaction.
    pub name: String,
    /// Bytes of the tensors rewritten (only those that change are journaled).
    pub bytes: u64,
    /// What the plan was made from: each shard it writes, with its header and the data
    /// of its rewritten tensors.
    pub stamps: Vec<FileStamp>,
    /// What the planner reported.
    #[serde(flatten)]
    pub details: D,
    #[serde(skip)]
    writes: Vec<ShardWrites>,
}

impl<D> SetSurgeryPlan<D> {
    /// Plans writing `rewrites` into the set of `any_shard`, each tensor into the shard
    /// that holds it, as a set transaction labelled `label`.
    pub fn new(
        any_shard: &Path,
        label: impl Into<String>,
        rewrites: Vec<RewrittenTensor>,
        details: D,
    ) -> Result<SetSurgeryPlan<D>> {
        let set = byte_tier::split::ShardSet::open(any_shard)?;
        let shards = set.parse_all()?;
        let mut writes = Vec::new();
        let mut stamps = Vec::new();
        let mut placed = 0;
        for (file, gguf) in set.files().iter().zip(&shards) {
            let mut ranges = Vec::with_capacity(rewrites.len() + 1);
            ranges.push(0..gguf.data_offset());
            let mut shard_writes = Vec::new();
            for r in &rewrites {
                if let Some(t) = gguf.tensor(&r.name) {
                    ranges.push(t.data_range());
                    shard_writes.push(byte_tier::ByteWrite {
                        offset: t.data_range().start,
                        bytes: r.bytes.clone(),
                    });
                }
            }
            if shard_writes.is_empty() {
                continue;
            }
            placed += shard_writes.len();
            stamps.push(FileStamp::take(file.path(), file.bytes(), ranges)?);
            writes.push(ShardWrites {
                shard: file.path().to_owned(),
                writes: shard_writes,
                reverts: None,
            });
        }
        if placed != rewrites.len() {
            return Err(Error::Refused(format!(
                "{} of the {} tensors to rewrite are in no shard of the set of {}",
                rewrites.len() - placed,
                rewrites.len(),
                any_shard.display()
            )));
        }
        Ok(SetSurgeryPlan {
            kind: "in_place_set",
            shards: set.files().iter().map(|f| f.path().to_owned()).collect(),
            name: label.into(),
            bytes: rewrites.iter().map(|r| r.bytes.len() as u64).sum(),
            stamps,
            details,
            writes,
        })
    }
}

impl<D: serde::Serialize> Plan for SetSurgeryPlan<D> {
    /// The set transaction, `None` when no byte changes.
    type Applied = Option<u64>;
    type Error = Error;

    fn is_noop(&self) -> bool {
        self.writes.is_empty()
    }

    fn apply(self) -> Result<Option<u64>> {
        for (stamp, part) in self.stamps.iter().zip(&self.writes) {
            let map = byte_tier::MappedFile::open(&part.shard)?;
            stamp.check(map.bytes())?;
        }
        let receipt = run_set_transaction(&self.shards[0], &self.name, None, self.writes)?;
        Ok(receipt.transaction)
    }
}

/// The journal of `any_shard`'s set, read-only, when it has one.
fn set_journal_of(any_shard: &Path) -> Result<Option<byte_tier::Journal>> {
    let Some(name) = byte_tier::split::parse_shard_name(any_shard) else {
        return Ok(None);
    };
    let target = set_journal_target(&name.prefix);
    if !byte_tier::journal_path(&target).exists() {
        return Ok(None);
    }
    Ok(Some(byte_tier::Journal::open_read_only(&target)?))
}

/// The last merge of the adapter whose SHA-256 is `adapter_sha256` into `any_shard`'s
/// set that is committed and not reverted, as a transaction of the set's journal.
pub fn find_set_merge(any_shard: &Path, adapter_sha256: &str) -> Result<u64> {
    set_journal_of(any_shard)?
        .and_then(|journal| find_merge(&journal, adapter_sha256))
        .ok_or_else(|| {
            Error::Refused(format!(
                "the set of {} records no merge of the adapter with sha256 {adapter_sha256} \
                 that is still applied",
                any_shard.display()
            ))
        })
}

/// [`unmerge`] for a shard set: reverts the set transaction of the last merge of the
/// adapter, in every shard it wrote, as one set transaction.
pub fn unmerge_set(any_shard: &Path, adapter_sha256: &str) -> Result<Unmerged> {
    let id = find_set_merge(any_shard, adapter_sha256)?;
    let receipt = revert_set_transaction(any_shard, id)?;
    Ok(Unmerged {
        merge_transaction: id,
        revert_transaction: receipt.transaction,
        bytes: receipt.bytes(),
    })
}
