//! In-place transactions across the shards of a set: writes to several shards that commit
//! or roll back together.
//!
//! Every shard keeps its own undo journal (`SHARD.hotpatch-journal`), and a transaction's
//! part in a shard is an ordinary transaction there, holding that shard's original bytes.
//! One more journal, the set's (`PREFIX.hotpatch-set.hotpatch-journal`), records the set
//! transaction itself, and its outcome, in one place. Applying:
//!
//! 1. every shard is opened for in-place editing, in shard order: each journal is locked
//!    and its unfinished transaction, if any, recovered (below);
//! 2. the set transaction begins in the set's journal (it writes nothing of its own);
//! 3. each shard's part begins in its journal, undo records durable, with a note naming
//!    the set transaction;
//! 4. each shard's new bytes are written and synced;
//! 5. the set transaction commits: that one durable record is the decision;
//! 6. each part commits.
//!
//! Recovery of a shard whose part is unfinished asks the set's journal. When the set
//! transaction committed (a crash between 5 and 6), every shard already holds its new
//! bytes, synced in step 4, and the part is marked committed. Otherwise (no decision) the
//! part is rolled back. Whichever shard is opened first, and in whatever order, every
//! shard ends on the same side. A set transaction left without a decision is marked
//! rolled back in the set's journal once its shards are recovered.
//!
//! A set transaction is reverted as a whole, by another set transaction whose parts
//! revert the parts ([`plan_set_revert`]); a part alone is refused by the shard's own
//! `revert` (it carries a note).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{ShardSet, parse_shard_name, shard_path};
use crate::error::{Error, Result};
use crate::inplace::{InPlaceFile, Prepared, RecoveryReport};
use crate::journal::{Journal, Transaction, TransactionState, failpoint, journal_path};
use crate::patcher::ByteWrite;

/// What a part's note says: the format, and the set transaction it belongs to.
const PART_FORMAT: &str = "hotpatch-set-part/1";

/// The file whose journal is the set's journal, for the shards with this prefix. The
/// file itself is never created; its journal (`PREFIX.hotpatch-set.hotpatch-journal`)
/// is.
pub fn set_journal_target(prefix: &Path) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(".hotpatch-set");
    PathBuf::from(name)
}

/// The note of a part of a set transaction, stored with its `BEGIN` record.
#[derive(Debug, Serialize, Deserialize)]
struct PartNote {
    format: String,
    /// The set journal's target, as a file name in the shard's directory.
    set: String,
    /// The set transaction's id in the set's journal.
    transaction: u64,
}

impl PartNote {
    fn parse(note: &[u8]) -> Option<PartNote> {
        let note: PartNote = serde_json::from_slice(note).ok()?;
        (note.format == PART_FORMAT).then_some(note)
    }
}

/// The set transaction `txn` of a shard's journal is a part of, as (the set journal's
/// target, the set transaction's id); `None` when it is not a part.
pub fn part_of(shard: &Path, txn: &Transaction) -> Option<(PathBuf, u64)> {
    let note = PartNote::parse(&txn.note)?;
    let dir = shard.parent().unwrap_or(Path::new(""));
    Some((dir.join(note.set), note.transaction))
}

/// Whether `txn`, the unfinished transaction of `shard`'s journal, is the part of a set
/// transaction that committed: then its bytes are all written and synced, and recovery
/// completes it rather than rolling it back.
pub(crate) fn part_committed(shard: &Path, txn: &Transaction) -> Result<bool> {
    let Some((set, id)) = part_of(shard, txn) else {
        return Ok(false);
    };
    if !journal_path(&set).exists() {
        return Ok(false);
    }
    let journal = Journal::open_read_only(&set)?;
    Ok(journal
        .transaction(id)
        .is_some_and(|t| matches!(t.state, TransactionState::Committed(_))))
}

/// The writes of one shard in a set transaction.
#[derive(Clone, Debug)]
pub struct ShardWrites {
    /// The shard.
    pub shard: PathBuf,
    /// Its writes (absolute offsets in the shard).
    pub writes: Vec<ByteWrite>,
    /// The transaction of this shard's journal that these writes revert, if any.
    pub reverts: Option<u64>,
}

/// One shard's part of an applied set transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PartReceipt {
    /// The shard.
    pub shard: PathBuf,
    /// The part's transaction in the shard's journal.
    pub transaction: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// What an applied set transaction did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SetReceipt {
    /// The set transaction's id in the set's journal, `None` when no byte changed.
    pub transaction: Option<u64>,
    /// The shards written, in set order.
    pub parts: Vec<PartReceipt>,
}

impl SetReceipt {
    /// Bytes written over all shards.
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes).sum()
    }
}

/// Every shard of a set opened for in-place editing, what their recovery did (per
/// shard), the set's journal, and its target.
type OpenSet = (
    Vec<InPlaceFile>,
    Vec<(PathBuf, RecoveryReport)>,
    Journal,
    PathBuf,
);

/// The set of `any_shard`, with every shard opened for in-place editing (journals locked
/// and recovered, in shard order), and the set's journal opened with any set transaction
/// left without a decision marked rolled back. Returns the shards, what their recovery
/// did, and the set's journal.
fn open_set_for_writing(any_shard: &Path) -> Result<OpenSet> {
    let name = parse_shard_name(any_shard).ok_or_else(|| Error::NotAShardName {
        path: any_shard.to_owned(),
    })?;
    // Checks the set (every shard present and agreeing) before anything is opened for
    // writing.
    drop(ShardSet::open(any_shard)?);
    let mut shards = Vec::with_capacity(name.count as usize);
    let mut recovered = Vec::new();
    for index in 0..name.count {
        let file = InPlaceFile::open(shard_path(&name.prefix, index, name.count))?;
        if let Some(report) = file.recovered() {
            recovered.push((file.path().to_owned(), report.clone()));
        }
        shards.push(file);
    }
    let target = set_journal_target(&name.prefix);
    let mut journal = Journal::open(&target)?;
    if let Some(undecided) = journal.unfinished().map(|t| t.id) {
        // Its parts were rolled back when their shards opened just now (or before).
        journal.mark_rolled_back(undecided)?;
    }
    Ok((shards, recovered, journal, target))
}

/// Recovers every shard of `any_shard`'s set, as a set: each shard's unfinished part is
/// completed or rolled back as the set's journal decides, then a set transaction left
/// without a decision is marked rolled back. Returns each shard that had an unfinished
/// transaction, with what its recovery did.
pub fn recover_set(any_shard: &Path) -> Result<Vec<(PathBuf, RecoveryReport)>> {
    let (_shards, recovered, _journal, _) = open_set_for_writing(any_shard)?;
    Ok(recovered)
}

/// Writes `parts` into the shards of `any_shard`'s set as one set transaction named
/// `name` (reverting set transaction `reverts`, if given): all shards or none, as the
/// module says. Writes that change nothing are dropped, and a shard left with none takes
/// no part. Each write is checked to lie inside its shard before anything is written.
pub fn run_set_transaction(
    any_shard: &Path,
    name: &str,
    reverts: Option<u64>,
    parts: Vec<ShardWrites>,
) -> Result<SetReceipt> {
    let (mut shards, _recovered, mut journal, target) = open_set_for_writing(any_shard)?;
    let mut work: Vec<(usize, ShardWrites)> = Vec::with_capacity(parts.len());
    for part in parts {
        let index = shards
            .iter()
            .position(|s| s.path() == part.shard)
            .ok_or_else(|| {
                Error::InvalidEdit(format!(
                    "{} is not a shard of the set of {}",
                    part.shard.display(),
                    any_shard.display()
                ))
            })?;
        work.push((index, part));
    }
    work.sort_by_key(|(index, _)| *index);
    if work.windows(2).any(|w| w[0].0 == w[1].0) {
        return Err(Error::InvalidEdit(
            "a set transaction names a shard twice".into(),
        ));
    }
    let set_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Nothing is journaled before every part is known to change something.
    let mut changes = Vec::with_capacity(work.len());
    for (index, part) in work {
        let writes = shards[index].changed_writes(part.writes)?;
        if !writes.is_empty() {
            changes.push((index, part.reverts, writes));
        }
    }
    if changes.is_empty() {
        return Ok(SetReceipt {
            transaction: None,
            parts: Vec::new(),
        });
    }
    let shard_names: Vec<String> = changes
        .iter()
        .map(|(i, _, _)| shards[*i].path().display().to_string())
        .collect();
    let set_note = serde_json::json!({"format": "hotpatch-set/1", "shards": shard_names});
    let id = journal.begin_with_note(name, reverts, &[], set_note.to_string().as_bytes())?;
    let note = serde_json::to_vec(&PartNote {
        format: PART_FORMAT.to_owned(),
        set: set_name,
        transaction: id,
    })
    .map_err(|e| Error::InvalidEdit(format!("note of a set transaction: {e}")))?;
    let mut prepared: Vec<(usize, Prepared)> = Vec::with_capacity(changes.len());
    let mut result = Ok(());
    for (index, part_reverts, writes) in changes {
        match shards[index].prepare(name, part_reverts, writes, &note) {
            Ok(p) => prepared.push((index, p)),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    failpoint("set-after-prepare");
    if result.is_ok() {
        for (n, (index, p)) in prepared.iter().enumerate() {
            if let Err(e) = shards[*index].write_prepared(p) {
                result = Err(e);
                break;
            }
            if n == 0 {
                failpoint("set-between-shards");
            }
        }
    }
    if let Err(error) = result {
        // Put every shard back and record the rollbacks; what fails here is recovered
        // from the journals by the next open (no decision was recorded).
        for (index, p) in prepared.iter().rev() {
            let _ = shards[*index].undo_prepared(p);
        }
        let _ = journal.mark_rolled_back(id);
        return Err(error);
    }
    journal.commit(id)?;
    failpoint("set-after-decision");
    let mut receipt = SetReceipt {
        transaction: Some(id),
        parts: Vec::with_capacity(prepared.len()),
    };
    for (index, p) in prepared {
        let shard = &mut shards[index];
        let bytes = p.bytes();
        let transaction = shard.commit_prepared(p)?;
        receipt.parts.push(PartReceipt {
            shard: shard.path().to_owned(),
            transaction,
            bytes,
        });
    }
    Ok(receipt)
}

/// The parts of set transaction `id` of `any_shard`'s set, as (shard, the part's
/// transaction in that shard's journal), in set order.
pub fn set_parts(any_shard: &Path, id: u64) -> Result<Vec<(PathBuf, u64)>> {
    let name = parse_shard_name(any_shard).ok_or_else(|| Error::NotAShardName {
        path: any_shard.to_owned(),
    })?;
    let target = set_journal_target(&name.prefix);
    let mut parts = Vec::new();
    for index in 0..name.count {
        let shard = shard_path(&name.prefix, index, name.count);
        if !journal_path(&shard).exists() {
            continue;
        }
        let journal = Journal::open_read_only(&shard)?;
        if let Some(t) = journal
            .transactions()
            .iter()
            .find(|t| part_of(&shard, t).is_some_and(|(set, n)| set == target && n == id))
        {
            parts.push((shard, t.id));
        }
    }
    Ok(parts)
}

/// The writes that revert set transaction `id` of `any_shard`'s set: each part's
/// original bytes, after checking that the set transaction committed, was not reverted,
/// and that every byte it wrote is still there.
pub fn plan_set_revert(any_shard: &Path, id: u64) -> Result<Vec<ShardWrites>> {
    let name = parse_shard_name(any_shard).ok_or_else(|| Error::NotAShardName {
        path: any_shard.to_owned(),
    })?;
    let target = set_journal_target(&name.prefix);
    if !journal_path(&target).exists() {
        return Err(Error::NoSuchTransaction(id));
    }
    let journal = Journal::open_read_only(&target)?;
    let txn = journal
        .transaction(id)
        .ok_or(Error::NoSuchTransaction(id))?;
    if !matches!(txn.state, TransactionState::Committed(_)) {
        return Err(Error::NotCommitted(id));
    }
    if journal.reverted_by(id).is_some() {
        return Err(Error::AlreadyReverted(id));
    }
    let mut out = Vec::new();
    for (shard, part) in set_parts(any_shard, id)? {
        let map = crate::file::MappedFile::open(&shard)?;
        let shard_journal = Journal::open_read_only(&shard)?;
        let txn = shard_journal
            .transaction(part)
            .ok_or(Error::NoSuchTransaction(part))?;
        let writes = crate::inplace::undo_writes(&shard_journal, map.bytes(), txn)?;
        out.push(ShardWrites {
            shard,
            writes,
            reverts: Some(part),
        });
    }
    Ok(out)
}

/// Reverts set transaction `id` of `any_shard`'s set, as one set transaction.
pub fn revert_set_transaction(any_shard: &Path, id: u64) -> Result<SetReceipt> {
    let parts = plan_set_revert(any_shard, id)?;
    run_set_transaction(any_shard, &format!("revert {id}"), Some(id), parts)
}
