//! In-place, crash-safe edits of a file through the undo journal.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::file::MappedFile;
use crate::gguf::Gguf;
use crate::journal::{Journal, Transaction, TransactionState, failpoint};
use crate::ops::sha256;
use crate::patcher::{BytePatcher, ByteWrite, EditReceipt, check_and_drop_unchanged, receipt};

/// What recovery did to a file with an unfinished transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The transaction rolled back.
    pub transaction: u64,
    /// Its name.
    pub name: String,
    /// Writes restored.
    pub writes: usize,
    /// Bytes restored (or, when `completed`, kept).
    pub bytes: u64,
    /// The transaction was the part of a shard-set transaction that committed (see
    /// [`crate::split::transaction`]): its new bytes were already written and synced, so
    /// recovery marked it committed instead of rolling it back.
    pub completed: bool,
}

/// A file opened for in-place editing: reads go through a read-only shared map (which
/// sees every write at once), writes go through positioned writes, and every change is a
/// journaled transaction. Opening it rolls back an unfinished transaction first.
#[derive(Debug)]
pub struct InPlaceFile {
    path: PathBuf,
    file: File,
    map: MappedFile,
    journal: Journal,
    recovered: Option<RecoveryReport>,
}

fn open_rw(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| match e.kind() {
            io::ErrorKind::PermissionDenied | io::ErrorKind::ReadOnlyFilesystem => {
                Error::ReadOnly {
                    path: path.to_owned(),
                }
            }
            _ => Error::io("open for writing", path, e),
        })
}

/// Rolls back the unfinished transaction of `path`'s journal, if any.
pub fn recover(path: &Path) -> Result<Option<RecoveryReport>> {
    let file = open_rw(path)?;
    let mut journal = Journal::open(path)?;
    recover_with(path, &file, &mut journal)
}

fn recover_with(path: &Path, file: &File, journal: &mut Journal) -> Result<Option<RecoveryReport>> {
    let Some(txn) = journal.unfinished().cloned() else {
        return Ok(None);
    };
    if crate::split::transaction::part_committed(path, &txn)? {
        journal.commit(txn.id)?;
        return Ok(Some(RecoveryReport {
            transaction: txn.id,
            name: txn.name.clone(),
            writes: txn.writes.len(),
            bytes: txn.bytes(),
            completed: true,
        }));
    }
    // Restore in reverse order; writing original bytes is idempotent, so a crash here is
    // recovered by the next open.
    for (i, entry) in txn.writes.iter().enumerate().rev() {
        let original = journal.original_bytes(entry)?;
        file.write_all_at(&original, entry.offset)
            .map_err(|e| Error::io("restore", path, e))?;
        if i + 1 == txn.writes.len() {
            failpoint("recovery-after-first-restore");
        }
    }
    file.sync_data().map_err(|e| Error::io("sync", path, e))?;
    journal.mark_rolled_back(txn.id)?;
    Ok(Some(RecoveryReport {
        transaction: txn.id,
        name: txn.name.clone(),
        writes: txn.writes.len(),
        bytes: txn.bytes(),
        completed: false,
    }))
}

/// A transaction whose undo information is durable in the journal and whose bytes are
/// not written yet: one shard's part of a set transaction, between its steps.
#[derive(Debug)]
pub(crate) struct Prepared {
    id: u64,
    writes: Vec<ByteWrite>,
    originals: Vec<Vec<u8>>,
}

impl Prepared {
    /// Bytes it writes.
    pub(crate) fn bytes(&self) -> u64 {
        self.writes.iter().map(|w| w.bytes.len() as u64).sum()
    }
}

impl InPlaceFile {
    /// Opens `path` for in-place editing, rolling back an unfinished transaction first.
    pub fn open(path: impl AsRef<Path>) -> Result<InPlaceFile> {
        let path = path.as_ref();
        let file = open_rw(path)?;
        let mut journal = Journal::open(path)?;
        let recovered = recover_with(path, &file, &mut journal)?;
        let map = MappedFile::open(path)?;
        Ok(InPlaceFile {
            path: path.to_owned(),
            file,
            map,
            journal,
            recovered,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What recovery did when the file was opened.
    pub fn recovered(&self) -> Option<&RecoveryReport> {
        self.recovered.as_ref()
    }

    /// The journal (history of committed, rolled-back and reverted transactions).
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Parses the file as it is now.
    pub fn gguf(&self) -> Result<Gguf<'_>> {
        Gguf::parse(self.map.bytes())
    }

    /// The last committed transaction that is not a revert, has not been reverted, and
    /// carries no maker's note (those are reverted by their maker: see
    /// [`Error::NotedTransaction`]).
    pub fn last_revertible(&self) -> Option<&Transaction> {
        self.journal.transactions().iter().rev().find(|t| {
            matches!(t.state, TransactionState::Committed(_))
                && t.reverts.is_none()
                && t.note.is_empty()
                && self.journal.reverted_by(t.id).is_none()
        })
    }

    pub(crate) fn run_transaction(
        &mut self,
        name: &str,
        reverts: Option<u64>,
        writes: Vec<ByteWrite>,
    ) -> Result<EditReceipt> {
        let writes = self.changed_writes(writes)?;
        if writes.is_empty() {
            return Ok(receipt(None, std::iter::empty()));
        }
        let prepared = self.prepare(name, reverts, writes, &[])?;
        failpoint("after-journal-sync");
        if let Err(error) = self.write_prepared(&prepared) {
            // Put back what may have been written, then record the rollback; if even
            // that fails, the next open recovers from the journal.
            let _ = self.undo_prepared(&prepared);
            return Err(error);
        }
        failpoint("after-file-sync");
        let ranges: Vec<(u64, u64)> = prepared
            .writes
            .iter()
            .map(|w| (w.offset, w.bytes.len() as u64))
            .collect();
        let id = self.commit_prepared(prepared)?;
        failpoint("after-commit");
        Ok(receipt(Some(id), ranges.into_iter()))
    }

    /// `writes` checked against the file (inside it, not overlapping) with those that
    /// change nothing dropped.
    pub(crate) fn changed_writes(&self, mut writes: Vec<ByteWrite>) -> Result<Vec<ByteWrite>> {
        check_and_drop_unchanged(&mut writes, self.map.bytes())?;
        Ok(writes)
    }

    /// Makes the undo information of `writes` (checked by [`Self::changed_writes`])
    /// durable as a new transaction, writing nothing to the file yet.
    pub(crate) fn prepare(
        &mut self,
        name: &str,
        reverts: Option<u64>,
        writes: Vec<ByteWrite>,
        note: &[u8],
    ) -> Result<Prepared> {
        let bytes = self.map.bytes();
        let originals: Vec<Vec<u8>> = writes
            .iter()
            .map(|w| bytes[w.offset as usize..w.range().end as usize].to_vec())
            .collect();
        let undo: Vec<(u64, &[u8], &[u8])> = writes
            .iter()
            .zip(&originals)
            .map(|(w, o)| (w.offset, o.as_slice(), w.bytes.as_slice()))
            .collect();
        let id = self.journal.begin_with_note(name, reverts, &undo, note)?;
        Ok(Prepared {
            id,
            writes,
            originals,
        })
    }

    /// Writes a prepared transaction's bytes and syncs the file.
    pub(crate) fn write_prepared(&self, prepared: &Prepared) -> Result<()> {
        self.write_all(&prepared.writes)
    }

    /// Puts a prepared transaction's original bytes back and records its rollback.
    pub(crate) fn undo_prepared(&mut self, prepared: &Prepared) -> Result<()> {
        let restore: Vec<ByteWrite> = prepared
            .writes
            .iter()
            .zip(&prepared.originals)
            .map(|(w, o)| ByteWrite {
                offset: w.offset,
                bytes: o.clone(),
            })
            .collect();
        self.write_all(&restore)?;
        self.journal.mark_rolled_back(prepared.id)
    }

    /// Commits a prepared transaction whose bytes are written; returns its id.
    pub(crate) fn commit_prepared(&mut self, prepared: Prepared) -> Result<u64> {
        self.journal.commit(prepared.id)?;
        Ok(prepared.id)
    }

    fn write_all(&self, writes: &[ByteWrite]) -> Result<()> {
        let io = |e| Error::io("write", &self.path, e);
        for (i, w) in writes.iter().enumerate() {
            if i == 0 {
                // Split the first write so a crash can land in the middle of one.
                let half = w.bytes.len() / 2;
                self.file
                    .write_all_at(&w.bytes[..half], w.offset)
                    .map_err(io)?;
                failpoint("mid-write");
                self.file
                    .write_all_at(&w.bytes[half..], w.offset + half as u64)
                    .map_err(io)?;
            } else {
                self.file.write_all_at(&w.bytes, w.offset).map_err(io)?;
            }
        }
        self.file
            .sync_data()
            .map_err(|e| Error::io("sync", &self.path, e))
    }
}

impl InPlaceFile {
    /// The writes that would revert `transaction`, after checking that it committed, was
    /// not reverted yet, and that the bytes it wrote are still there.
    pub fn plan_revert(&self, transaction: u64) -> Result<Vec<ByteWrite>> {
        revert_writes(&self.journal, self.map.bytes(), transaction)
    }
}

/// The writes that would revert `transaction` of `journal` on a file whose bytes are
/// `bytes`, after checking that it committed, was not reverted yet, carries no maker's
/// note, and that the bytes it wrote are still there.
pub(crate) fn revert_writes(
    journal: &Journal,
    bytes: &[u8],
    transaction: u64,
) -> Result<Vec<ByteWrite>> {
    let txn = journal
        .transaction(transaction)
        .ok_or(Error::NoSuchTransaction(transaction))?;
    if !matches!(txn.state, TransactionState::Committed(_)) {
        return Err(Error::NotCommitted(transaction));
    }
    if journal.reverted_by(transaction).is_some() {
        return Err(Error::AlreadyReverted(transaction));
    }
    if !txn.note.is_empty() {
        return Err(Error::NotedTransaction(transaction));
    }
    undo_writes(journal, bytes, txn)
}

/// The writes that put back the original bytes of committed transaction `txn` of
/// `journal`, after checking that the bytes it wrote are still in `bytes`.
pub(crate) fn undo_writes(
    journal: &Journal,
    bytes: &[u8],
    txn: &Transaction,
) -> Result<Vec<ByteWrite>> {
    let transaction = txn.id;
    let mut writes = Vec::with_capacity(txn.writes.len());
    for entry in &txn.writes {
        let current = bytes
            .get(entry.offset as usize..(entry.offset + entry.len) as usize)
            .ok_or(Error::RevertMismatch {
                transaction,
                offset: entry.offset,
            })?;
        if sha256(current) != entry.new_sha256 {
            return Err(Error::RevertMismatch {
                transaction,
                offset: entry.offset,
            });
        }
        writes.push(ByteWrite {
            offset: entry.offset,
            bytes: journal.original_bytes(entry)?,
        });
    }
    Ok(writes)
}

impl BytePatcher for InPlaceFile {
    fn bytes(&self) -> &[u8] {
        self.map.bytes()
    }

    fn commit(&mut self, name: &str, writes: Vec<ByteWrite>) -> Result<EditReceipt> {
        self.run_transaction(name, None, writes)
    }

    fn revert(&mut self, transaction: u64) -> Result<EditReceipt> {
        let writes = self.plan_revert(transaction)?;
        let txn = self
            .journal
            .transaction(transaction)
            .cloned()
            .ok_or(Error::NoSuchTransaction(transaction))?;
        let name = format!("revert {transaction} ({})", txn.name);
        let receipt = self.run_transaction(&name, Some(transaction), writes)?;
        // Check what is there now against the checksums taken before the first change.
        let bytes = self.map.bytes();
        for entry in &txn.writes {
            let restored = &bytes[entry.offset as usize..(entry.offset + entry.len) as usize];
            if sha256(restored) != entry.original_sha256 {
                return Err(Error::RevertMismatch {
                    transaction,
                    offset: entry.offset,
                });
            }
        }
        Ok(receipt)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::journal::journal_path;
    use crate::ops::BitOp;

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    #[test]
    fn apply_and_revert_restore_the_bytes_exactly() {
        let original: Vec<u8> = (0..=255).collect();
        let (_dir, path) = file_with(&original);
        let mut f = InPlaceFile::open(&path).unwrap();
        let first = f.fill(10..20, 0xaa).unwrap();
        assert_eq!(first.transaction, Some(1));
        assert_eq!(first.bytes, 10);
        let second = f.bit_op(100..104, BitOp::Xor(vec![0xff])).unwrap();
        assert_eq!(f.read(100..104).unwrap(), &[0x9b, 0x9a, 0x99, 0x98]);
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap()[10..20], [0xaa; 10]);

        let mut f = InPlaceFile::open(&path).unwrap();
        assert_eq!(f.journal().transactions().len(), 2);
        assert_eq!(f.last_revertible().unwrap().id, second.transaction.unwrap());
        f.revert(2).unwrap();
        f.revert(1).unwrap();
        assert!(matches!(f.revert(1), Err(Error::AlreadyReverted(1))));
        assert!(f.last_revertible().is_none());
        drop(f);
        assert_eq!(std::fs::read(&path).unwrap(), original);
    }

    #[test]
    fn unchanged_writes_make_no_transaction() {
        let (_dir, path) = file_with(&[0u8; 64]);
        let mut f = InPlaceFile::open(&path).unwrap();
        let receipt = f.fill(0..64, 0).unwrap();
        assert_eq!(receipt.transaction, None);
        assert!(f.journal().transactions().is_empty());
    }

    #[test]
    fn a_revert_refuses_bytes_changed_since() {
        let (_dir, path) = file_with(&[0u8; 64]);
        let mut f = InPlaceFile::open(&path).unwrap();
        f.fill(0..8, 1).unwrap();
        drop(f);
        // Someone else changes one of the bytes the transaction wrote.
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[9], 3).unwrap();
        let mut f = InPlaceFile::open(&path).unwrap();
        assert!(matches!(
            f.revert(1),
            Err(Error::RevertMismatch {
                transaction: 1,
                offset: 0
            })
        ));
        assert_eq!(f.read(0..8).unwrap(), &[1, 1, 1, 9, 1, 1, 1, 1]);
    }

    #[test]
    fn out_of_range_and_overlapping_writes_write_nothing() {
        let (_dir, path) = file_with(&[7u8; 32]);
        let mut f = InPlaceFile::open(&path).unwrap();
        assert!(matches!(
            f.fill(30..40, 0),
            Err(Error::OutOfRange { limit: 32, .. })
        ));
        let overlapping = vec![
            ByteWrite {
                offset: 0,
                bytes: vec![1; 8],
            },
            ByteWrite {
                offset: 4,
                bytes: vec![2; 8],
            },
        ];
        assert!(matches!(
            f.write_batch(overlapping),
            Err(Error::OverlappingWrites { .. })
        ));
        assert!(matches!(
            f.search(&[7; 33], None),
            Err(Error::BadPattern { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 32]);
        assert!(f.journal().transactions().is_empty());
    }

    /// Makes a file unwritable even for root: the immutable attribute (`chattr +i`)
    /// refuses writes whatever the caller's privileges; plain permissions are used when
    /// the attribute cannot be set.
    struct Unwritable<'a>(&'a Path, bool);

    impl<'a> Unwritable<'a> {
        fn new(path: &'a Path) -> Unwritable<'a> {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444)).unwrap();
            let immutable = std::process::Command::new("chattr")
                .arg("+i")
                .arg(path)
                .status()
                .is_ok_and(|s| s.success());
            Unwritable(path, immutable)
        }
    }

    impl Drop for Unwritable<'_> {
        fn drop(&mut self) {
            if self.1 {
                let _ = std::process::Command::new("chattr")
                    .arg("-i")
                    .arg(self.0)
                    .status();
            }
        }
    }

    #[test]
    fn a_read_only_file_is_a_typed_error() {
        let (_dir, path) = file_with(&[0u8; 8]);
        let _guard = Unwritable::new(&path);
        assert!(matches!(
            InPlaceFile::open(&path),
            Err(Error::ReadOnly { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), vec![0u8; 8]);
    }

    #[test]
    fn an_unfinished_transaction_is_rolled_back_on_open() {
        let (_dir, path) = file_with(&[5u8; 16]);
        {
            let mut journal = Journal::open(&path).unwrap();
            let id = journal
                .begin("half done", None, &[(4, &[5u8; 4], &[6u8; 4])])
                .unwrap();
            assert_eq!(id, 1);
            // The write lands but the commit never does.
            let file = OpenOptions::new().write(true).open(&path).unwrap();
            file.write_all_at(&[6, 6], 4).unwrap();
        }
        let f = InPlaceFile::open(&path).unwrap();
        let report = f.recovered().unwrap();
        assert_eq!((report.transaction, report.bytes), (1, 4));
        assert_eq!(f.bytes(), &[5u8; 16]);
        assert!(matches!(
            f.journal().transactions()[0].state,
            TransactionState::RolledBack(_)
        ));
        drop(f);
        assert!(recover(&path).unwrap().is_none());
    }

    #[test]
    fn a_torn_journal_tail_is_ignored_and_cut() {
        let (_dir, path) = file_with(&[0u8; 16]);
        let mut f = InPlaceFile::open(&path).unwrap();
        f.fill(0..4, 1).unwrap();
        drop(f);
        let journal = journal_path(&path);
        let good_len = std::fs::metadata(&journal).unwrap().len();
        // A record header cut short, as a crash during an append leaves it.
        let mut handle = OpenOptions::new().append(true).open(&journal).unwrap();
        handle.write_all(&[1, 2, 0, 0, 0]).unwrap();
        drop(handle);
        let mut f = InPlaceFile::open(&path).unwrap();
        assert!(f.journal().had_torn_tail());
        assert_eq!(f.journal().transactions().len(), 1);
        f.fill(4..8, 2).unwrap();
        assert!(std::fs::metadata(&journal).unwrap().len() > good_len);
        drop(f);
        let f = InPlaceFile::open(&path).unwrap();
        assert!(!f.journal().had_torn_tail());
        assert_eq!(f.journal().transactions().len(), 2);
    }

    #[test]
    fn one_writer_at_a_time_and_readers_alongside() {
        let (_dir, path) = file_with(&[0u8; 16]);
        let mut f = InPlaceFile::open(&path).unwrap();
        f.fill(0..4, 1).unwrap();
        assert!(matches!(
            InPlaceFile::open(&path),
            Err(Error::JournalBusy { .. })
        ));
        let reader = Journal::open_read_only(&path).unwrap();
        assert_eq!(reader.transactions().len(), 1);
        // A rewrite of the file is refused while a writer holds its journal.
        let rewrite = crate::edit::rewrite_file(&path, None, &mut |_, _| {}, |_, _| Ok(()));
        assert!(matches!(rewrite, Err(Error::JournalBusy { .. })));
        drop(f);
        assert!(InPlaceFile::open(&path).is_ok());
    }

    #[test]
    fn a_corrupt_journal_header_is_refused() {
        let (_dir, path) = file_with(&[0u8; 16]);
        std::fs::write(journal_path(&path), b"not a journal").unwrap();
        assert!(matches!(
            InPlaceFile::open(&path),
            Err(Error::CorruptJournal { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), vec![0u8; 16]);
    }

    #[test]
    fn byte_operations_through_the_journal() {
        let (_dir, path) = file_with(b"0123456789abcdef");
        let mut f = InPlaceFile::open(&path).unwrap();
        f.copy(0, 2, 6).unwrap();
        assert_eq!(f.bytes(), b"0101234589abcdef");
        f.swap(0, 8, 4).unwrap();
        assert_eq!(f.bytes(), b"89ab23450101cdef");
        f.reverse(12..16).unwrap();
        assert_eq!(f.bytes(), b"89ab23450101fedc");
        f.rotate(0..4, crate::ops::WordWidth::W8, 4).unwrap();
        assert_eq!(f.read(0..4).unwrap(), &[0x83, 0x93, 0x16, 0x26]);
        assert_eq!(f.compare(4, b"2345xx01").unwrap(), vec![8..10]);
        assert_eq!(f.search(b"01", None).unwrap(), vec![8, 10]);
        assert_eq!(f.xor_copy(8..10, &[0x01]).unwrap(), b"10");
        let history = f.journal().transactions().len();
        assert_eq!(history, 4);
        for id in (1..=4).rev() {
            f.revert(id).unwrap();
        }
        assert_eq!(f.bytes(), b"0123456789abcdef");
    }
}
