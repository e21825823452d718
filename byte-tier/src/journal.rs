//! The write-ahead undo journal that makes in-place edits crash-safe.
//!
//! It lives beside the file it protects (`model.gguf` → `model.gguf.hotpatch-journal`) and
//! is only ever appended to. A transaction is written as:
//!
//! 1. `BEGIN` (id, name, time, the transaction it reverts if any) and one `UNDO` record per
//!    write (offset, the original bytes, SHA-256 of the original and of the new bytes),
//!    then the journal is synced: the undo information is durable before the file is
//!    touched;
//! 2. the writes to the file, then the file is synced;
//! 3. `COMMIT`, then the journal is synced.
//!
//! A transaction without `COMMIT` (or `ROLLBACK`) is unfinished: recovery writes its
//! original bytes back, syncs the file and appends `ROLLBACK`. Recovery is idempotent,
//! so a crash during recovery is recovered by the next one. Every record carries a CRC-32
//! of its header and of its payload; a torn tail (a record cut by a crash while it was
//! being appended) ends the journal and is cut off before anything is appended.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::file::MappedFile;
use crate::ops::sha256;

const JOURNAL_MAGIC: &[u8; 8] = b"HPJOURN1";
/// How long opening waits for a journal another writer holds.
const LOCK_PATIENCE: std::time::Duration = std::time::Duration::from_millis(500);
const RECORD_HEADER_LEN: u64 = 1 + 8 + 8 + 4;
const KIND_BEGIN: u8 = 1;
const KIND_UNDO: u8 = 2;
const KIND_COMMIT: u8 = 3;
const KIND_ROLLBACK: u8 = 4;

/// The journal path for `target`.
pub fn journal_path(target: &Path) -> PathBuf {
    let mut name = target.as_os_str().to_owned();
    name.push(".hotpatch-journal");
    PathBuf::from(name)
}

/// Who holds the lock on `file`: the process id from `/proc/locks` (Linux), and what that
/// process wrote in the holder note, if the note is its own.
fn lock_holder(file: &File, journal: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = file.metadata().ok()?;
    let (major, minor) = (libc::major(meta.dev()), libc::minor(meta.dev()));
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    // "1: FLOCK  ADVISORY  WRITE 12345 fd:01:1234567 0 EOF"
    let pid = locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (pid, id) = (fields.get(4)?, fields.get(5)?);
        let mut parts = id.split(':');
        let dev_major = u32::from_str_radix(parts.next()?, 16).ok()?;
        let dev_minor = u32::from_str_radix(parts.next()?, 16).ok()?;
        let inode: u64 = parts.next()?.parse().ok()?;
        (fields.get(1) == Some(&"FLOCK")
            && dev_major == major
            && dev_minor == minor
            && inode == meta.ino())
        .then(|| pid.parse::<u32>().ok())
        .flatten()
    })?;
    let mut text = format!("process {pid}");
    let note_path = {
        let mut name = journal.as_os_str().to_owned();
        name.push(".holder");
        PathBuf::from(name)
    };
    if let Ok(note) = std::fs::read_to_string(note_path)
        && let Some((note_pid, what)) = note.split_once('\n')
        && note_pid.trim() == pid.to_string()
    {
        text.push_str(&format!(" ({})", what.trim()));
    }
    Some(text)
}

/// Crashes the process on purpose at a named point when `HOTPATCH_FAILPOINT` names it:
/// the crash-consistency tests use it to stop between every durable step. `abort` skips
/// every destructor and buffer flush, as a kill does. Public so that every writer that
/// journals (the live model too) stops at the same named steps.
pub fn failpoint(name: &str) {
    static FAILPOINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let configured = FAILPOINT.get_or_init(|| std::env::var("HOTPATCH_FAILPOINT").ok());
    if configured.as_deref() == Some(name) {
        std::process::abort();
    }
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One write of a transaction, as the journal remembers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UndoEntry {
    /// Absolute offset in the target file.
    pub offset: u64,
    /// Bytes written.
    pub len: u64,
    /// SHA-256 of the bytes before the write.
    pub original_sha256: [u8; 32],
    /// SHA-256 of the bytes the write put there.
    pub new_sha256: [u8; 32],
    /// Where the original bytes are in the journal.
    payload_offset: u64,
}

/// How a transaction ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransactionState {
    /// No `COMMIT` or `ROLLBACK` yet: recovery rolls it back.
    Unfinished,
    /// Committed at this time (ms since the epoch).
    Committed(u64),
    /// Rolled back at this time.
    RolledBack(u64),
}

/// A transaction recorded in the journal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// Its id, increasing from 1.
    pub id: u64,
    /// The name given by whoever made it (`scale blk.0.attn_q.weight by 0.5`).
    pub name: String,
    /// When it began (ms since the epoch).
    pub started_ms: u64,
    /// The transaction it reverts, if it is a revert.
    pub reverts: Option<u64>,
    /// Its writes, in order.
    pub writes: Vec<UndoEntry>,
    /// How it ended.
    pub state: TransactionState,
    /// What its maker recorded about it beside the bytes (a live patch's identity,
    /// priority and expiry, say); empty when nothing was. The journal does not read it.
    pub note: Vec<u8>,
}

impl Transaction {
    /// Total bytes written.
    pub fn bytes(&self) -> u64 {
        self.writes.iter().map(|w| w.len).sum()
    }
}

/// An open journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    /// Length of the valid part (a torn tail beyond it is cut before the next append).
    valid_len: u64,
    torn_tail: bool,
    transactions: Vec<Transaction>,
    writable: bool,
    /// The holder note this journal wrote, removed when it is closed.
    holder_note: Option<PathBuf>,
}

impl Drop for Journal {
    fn drop(&mut self) {
        if let Some(note) = &self.holder_note {
            // Best effort: a note left behind names a process that no longer holds the
            // lock, and is never shown (the lock holder's id must match it).
            let _ignored = std::fs::remove_file(note);
        }
    }
}

impl Journal {
    /// Opens (creating if needed) the journal of `target` and reads its transactions.
    pub fn open(target: &Path) -> Result<Journal> {
        let path = journal_path(target);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io("open journal", &path, e))?;
        // One writer at a time, across processes: an exclusive advisory lock held for as
        // long as this journal is open (released when the file is closed). A child
        // process forked by anyone in this process holds the descriptor for an instant
        // before it execs, so a busy lock is retried briefly before it counts.
        let deadline = std::time::Instant::now() + LOCK_PATIENCE;
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    let holder = lock_holder(&file, &path);
                    return Err(Error::JournalBusy { path, holder });
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(Error::io("lock journal", &path, e));
                }
            }
        }
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat journal", &path, e))?
            .len();
        if len == 0 {
            (&file)
                .write_all(JOURNAL_MAGIC)
                .and_then(|()| file.sync_all())
                .map_err(|e| Error::io("create journal", &path, e))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                crate::writer::sync_dir(dir)?;
            }
        }
        Journal::read(path, file, true)
    }

    /// Opens the journal of `target` to read its history, alongside a writer if there is
    /// one (a shared lock: it waits for no one and blocks only other writers' opening).
    /// Nothing can be appended through it.
    pub fn open_read_only(target: &Path) -> Result<Journal> {
        let path = journal_path(target);
        let file = File::open(&path).map_err(|e| Error::io("open journal", &path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat journal", &path, e))?
            .len();
        if len == 0 {
            // Created by a writer that stopped before its first byte: what `open` makes
            // an empty journal, with no transaction in it.
            return Ok(Journal {
                path,
                file,
                valid_len: 0,
                torn_tail: false,
                transactions: Vec::new(),
                writable: false,
                holder_note: None,
            });
        }
        Journal::read(path, file, false)
    }

    fn read(path: PathBuf, file: File, writable: bool) -> Result<Journal> {
        let mut journal = Journal {
            path,
            file,
            valid_len: 0,
            torn_tail: false,
            transactions: Vec::new(),
            writable,
            holder_note: None,
        };
        journal.scan()?;
        Ok(journal)
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Says who holds this journal, for the error another writer gets while it is held
    /// (`hotpatch serve, admin API at http://…`). Written beside the journal with this
    /// process's id, replaced atomically, and removed when the journal is closed.
    pub fn describe_holder(&mut self, what: &str) -> Result<()> {
        let mut note = self.path.as_os_str().to_owned();
        note.push(".holder");
        let note = PathBuf::from(note);
        let mut temporary = note.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        std::fs::write(&temporary, format!("{}\n{what}\n", std::process::id()))
            .and_then(|()| std::fs::rename(&temporary, &note))
            .map_err(|e| Error::io("write the journal's holder note", &note, e))?;
        self.holder_note = Some(note);
        Ok(())
    }

    /// Every transaction, oldest first.
    pub fn transactions(&self) -> &[Transaction] {
        &self.transactions
    }

    /// The transaction with this id.
    pub fn transaction(&self, id: u64) -> Option<&Transaction> {
        self.transactions.iter().find(|t| t.id == id)
    }

    /// Whether the journal ended in a torn record when it was read.
    pub fn had_torn_tail(&self) -> bool {
        self.torn_tail
    }

    /// The unfinished transaction, if any (there is at most one).
    pub fn unfinished(&self) -> Option<&Transaction> {
        self.transactions
            .iter()
            .rev()
            .find(|t| t.state == TransactionState::Unfinished)
    }

    /// The transaction that reverted `id`, if one committed.
    pub fn reverted_by(&self, id: u64) -> Option<u64> {
        self.transactions
            .iter()
            .find(|t| t.reverts == Some(id) && matches!(t.state, TransactionState::Committed(_)))
            .map(|t| t.id)
    }

    fn scan(&mut self) -> Result<()> {
        let map = MappedFile::open(&self.path)?;
        let bytes = map.bytes();
        if bytes.len() < JOURNAL_MAGIC.len() || &bytes[..JOURNAL_MAGIC.len()] != JOURNAL_MAGIC {
            return Err(Error::CorruptJournal {
                path: self.path.clone(),
                offset: 0,
                reason: "bad magic".into(),
            });
        }
        let mut position = JOURNAL_MAGIC.len() as u64;
        let len = bytes.len() as u64;
        loop {
            if position == len {
                break;
            }
            let Some(record) = read_record(bytes, position) else {
                // A record cut short or failing its checksum can only be the last one:
                // records are appended one after the other and synced in order.
                self.torn_tail = true;
                break;
            };
            self.apply_record(&record, position)?;
            position = record.end;
        }
        self.valid_len = position;
        Ok(())
    }

    fn apply_record(&mut self, record: &Record<'_>, position: u64) -> Result<()> {
        let corrupt = |reason: &str| Error::CorruptJournal {
            path: self.path.clone(),
            offset: position,
            reason: reason.into(),
        };
        let p = record.payload;
        match record.kind {
            KIND_BEGIN => {
                if p.len() < 20 {
                    return Err(corrupt("short BEGIN"));
                }
                let started_ms = le_u64(&p[0..8]);
                let reverts = le_u64(&p[8..16]);
                let name_len = le_u32(&p[16..20]) as usize;
                let name = p
                    .get(20..20 + name_len)
                    .and_then(|n| std::str::from_utf8(n).ok())
                    .ok_or_else(|| corrupt("bad BEGIN name"))?;
                // Whatever follows the name is the maker's note (journals written before
                // notes existed end at the name).
                let note = p[20 + name_len..].to_vec();
                if self.unfinished().is_some() {
                    return Err(corrupt("BEGIN while another transaction is unfinished"));
                }
                self.transactions.push(Transaction {
                    id: record.txn,
                    name: name.to_owned(),
                    started_ms,
                    reverts: (reverts != 0).then_some(reverts),
                    writes: Vec::new(),
                    state: TransactionState::Unfinished,
                    note,
                });
            }
            KIND_UNDO => {
                if p.len() < 80 {
                    return Err(corrupt("short UNDO"));
                }
                let offset = le_u64(&p[0..8]);
                let len = le_u64(&p[8..16]);
                if p.len() as u64 != 80 + len {
                    return Err(corrupt("UNDO length mismatch"));
                }
                let entry = UndoEntry {
                    offset,
                    len,
                    original_sha256: p[16..48].try_into().unwrap_or_default(),
                    new_sha256: p[48..80].try_into().unwrap_or_default(),
                    payload_offset: record.payload_offset + 80,
                };
                let txn = self
                    .transactions
                    .last_mut()
                    .filter(|t| t.id == record.txn && t.state == TransactionState::Unfinished)
                    .ok_or_else(|| corrupt("UNDO outside its transaction"))?;
                txn.writes.push(entry);
            }
            KIND_COMMIT | KIND_ROLLBACK => {
                let at = p.get(0..8).map_or(0, le_u64);
                let txn = self
                    .transactions
                    .iter_mut()
                    .find(|t| t.id == record.txn && t.state == TransactionState::Unfinished)
                    .ok_or_else(|| corrupt("end of a transaction that is not open"))?;
                txn.state = if record.kind == KIND_COMMIT {
                    TransactionState::Committed(at)
                } else {
                    TransactionState::RolledBack(at)
                };
            }
            _ => return Err(corrupt("unknown record kind")),
        }
        Ok(())
    }

    /// Cuts a torn tail off before anything is appended after it.
    fn cut_torn_tail(&mut self) -> Result<()> {
        if self.torn_tail {
            self.file
                .set_len(self.valid_len)
                .and_then(|()| self.file.sync_all())
                .map_err(|e| Error::io("truncate journal", &self.path, e))?;
            self.torn_tail = false;
        }
        Ok(())
    }

    fn append(&mut self, kind: u8, txn: u64, payload: &[&[u8]]) -> Result<()> {
        if !self.writable {
            return Err(Error::JournalBusy {
                path: self.path.clone(),
                holder: Some("it was opened to read the history only".into()),
            });
        }
        self.cut_torn_tail()?;
        let start = self.valid_len;
        self.write_record(kind, txn, payload)
            .map_err(|error| self.cut_back(start, error))
    }

    /// Cuts the journal back to `len` bytes after a failed write (a full disk, a file-size
    /// limit), so that no partial record waits for the next open; returns the write's
    /// error, or [`Error::JournalNotCut`] when the cut fails too.
    fn cut_back(&mut self, len: u64, error: Error) -> Error {
        self.valid_len = len;
        match self.file.set_len(len).and_then(|()| self.file.sync_all()) {
            Ok(()) => error,
            Err(source) => {
                // The next append (or open) cuts it as a torn tail.
                self.torn_tail = true;
                Error::JournalNotCut {
                    path: self.path.clone(),
                    cause: Box::new(error),
                    source,
                }
            }
        }
    }

    fn write_record(&mut self, kind: u8, txn: u64, payload: &[&[u8]]) -> Result<()> {
        let payload_len: u64 = payload.iter().map(|p| p.len() as u64).sum();
        let mut header = Vec::with_capacity(RECORD_HEADER_LEN as usize);
        header.push(kind);
        header.extend_from_slice(&txn.to_le_bytes());
        header.extend_from_slice(&payload_len.to_le_bytes());
        header.extend_from_slice(&crc32fast::hash(&header).to_le_bytes());
        let mut crc = crc32fast::Hasher::new();
        let mut position = self.valid_len;
        let io = |e| Error::io("append to journal", &self.path, e);
        self.file.write_all_at(&header, position).map_err(io)?;
        position += header.len() as u64;
        for part in payload {
            crc.update(part);
            self.file.write_all_at(part, position).map_err(io)?;
            position += part.len() as u64;
        }
        self.file
            .write_all_at(&crc.finalize().to_le_bytes(), position)
            .map_err(io)?;
        self.valid_len = position + 4;
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("sync journal", &self.path, e))
    }

    /// Records the undo information of a transaction and makes it durable. `writes` are
    /// (offset, original bytes, new bytes). Returns the new transaction's id.
    pub fn begin(
        &mut self,
        name: &str,
        reverts: Option<u64>,
        writes: &[(u64, &[u8], &[u8])],
    ) -> Result<u64> {
        self.begin_with_note(name, reverts, writes, &[])
    }

    /// [`Journal::begin`], with a note stored in the same durable record as the
    /// transaction's name ([`Transaction::note`]).
    pub fn begin_with_note(
        &mut self,
        name: &str,
        reverts: Option<u64>,
        writes: &[(u64, &[u8], &[u8])],
        note: &[u8],
    ) -> Result<u64> {
        if let Some(t) = self.unfinished() {
            return Err(Error::UnfinishedTransaction {
                path: self.path.clone(),
                id: t.id,
            });
        }
        let start = self.valid_len;
        match self.write_transaction(name, reverts, writes, note) {
            Ok(id) => Ok(id),
            // The file is untouched; the journal goes back to what it was, so that no
            // unfinished transaction waits for a `recover`.
            Err(error @ Error::JournalNotCut { .. }) => Err(error),
            Err(error) if self.valid_len > start => Err(self.cut_back(start, error)),
            Err(error) => Err(error),
        }
    }

    fn write_transaction(
        &mut self,
        name: &str,
        reverts: Option<u64>,
        writes: &[(u64, &[u8], &[u8])],
        note: &[u8],
    ) -> Result<u64> {
        let id = self.transactions.last().map_or(1, |t| t.id + 1);
        let started_ms = now_ms();
        let name_len = (name.len() as u32).to_le_bytes();
        self.append(
            KIND_BEGIN,
            id,
            &[
                &started_ms.to_le_bytes(),
                &reverts.unwrap_or(0).to_le_bytes(),
                &name_len,
                name.as_bytes(),
                note,
            ],
        )?;
        let mut entries = Vec::with_capacity(writes.len());
        for &(offset, original, new) in writes {
            let original_sha256 = sha256(original);
            let new_sha256 = sha256(new);
            let payload_offset = self.valid_len + RECORD_HEADER_LEN + 80;
            self.append(
                KIND_UNDO,
                id,
                &[
                    &offset.to_le_bytes(),
                    &(original.len() as u64).to_le_bytes(),
                    &original_sha256,
                    &new_sha256,
                    original,
                ],
            )?;
            entries.push(UndoEntry {
                offset,
                len: original.len() as u64,
                original_sha256,
                new_sha256,
                payload_offset,
            });
        }
        self.sync()?;
        self.transactions.push(Transaction {
            id,
            name: name.to_owned(),
            started_ms,
            reverts,
            writes: entries,
            state: TransactionState::Unfinished,
            note: note.to_vec(),
        });
        Ok(id)
    }

    fn finish(&mut self, id: u64, kind: u8) -> Result<()> {
        let at = now_ms();
        self.append(kind, id, &[&at.to_le_bytes()])?;
        self.sync()?;
        if let Some(t) = self.transactions.iter_mut().find(|t| t.id == id) {
            t.state = if kind == KIND_COMMIT {
                TransactionState::Committed(at)
            } else {
                TransactionState::RolledBack(at)
            };
        }
        Ok(())
    }

    /// Marks a transaction committed, durably.
    pub fn commit(&mut self, id: u64) -> Result<()> {
        self.finish(id, KIND_COMMIT)
    }

    /// Marks a transaction rolled back, durably (after its original bytes are restored).
    pub fn mark_rolled_back(&mut self, id: u64) -> Result<()> {
        self.finish(id, KIND_ROLLBACK)
    }

    /// The original bytes of a write, checked against their SHA-256.
    pub fn original_bytes(&self, entry: &UndoEntry) -> Result<Vec<u8>> {
        let len = usize::try_from(entry.len).map_err(|_| Error::CorruptJournal {
            path: self.path.clone(),
            offset: entry.payload_offset,
            reason: "undo record too large".into(),
        })?;
        let mut bytes = vec![0u8; len];
        self.file
            .read_exact_at(&mut bytes, entry.payload_offset)
            .map_err(|e| Error::io("read journal", &self.path, e))?;
        if sha256(&bytes) != entry.original_sha256 {
            return Err(Error::CorruptJournal {
                path: self.path.clone(),
                offset: entry.payload_offset,
                reason: "undo bytes do not match their checksum".into(),
            });
        }
        Ok(bytes)
    }
}

struct Record<'a> {
    kind: u8,
    txn: u64,
    payload: &'a [u8],
    payload_offset: u64,
    end: u64,
}

/// Reads the record at `position`, or `None` when it is cut short or fails a checksum.
fn read_record(bytes: &[u8], position: u64) -> Option<Record<'_>> {
    let start = usize::try_from(position).ok()?;
    let header = bytes.get(start..start + RECORD_HEADER_LEN as usize)?;
    let crc = le_u32(&header[17..21]);
    if crc32fast::hash(&header[..17]) != crc {
        return None;
    }
    let payload_len = usize::try_from(le_u64(&header[9..17])).ok()?;
    let payload_start = start + RECORD_HEADER_LEN as usize;
    let payload_end = payload_start.checked_add(payload_len)?;
    let payload = bytes.get(payload_start..payload_end)?;
    let payload_crc = le_u32(bytes.get(payload_end..payload_end + 4)?);
    if crc32fast::hash(payload) != payload_crc {
        return None;
    }
    Some(Record {
        kind: header[0],
        txn: le_u64(&header[1..9]),
        payload,
        payload_offset: payload_start as u64,
        end: payload_end as u64 + 4,
    })
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap_or_default())
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().unwrap_or_default())
}
