//! Named byte patches: a described change to a byte range, applied and reverted by name,
//! with a check of the bytes it expects and priorities that settle overlaps.

use std::ops::Range;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::journal::{Journal, TransactionState};
use crate::ops::{self, BitOp};
use crate::patcher::{BytePatcher, ByteWrite, EditReceipt, check_range, tensor_range};

/// Where a patch applies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum PatchTarget {
    /// An absolute byte range.
    Offset {
        /// Absolute offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// A byte range inside a tensor's data (relative to it); it may not cross its end.
    Tensor {
        /// The tensor.
        tensor: String,
        /// Start, relative to the tensor's data.
        start: u64,
        /// End, relative to the tensor's data.
        end: u64,
    },
}

/// What a patch does to its range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "op")]
pub enum PatchOperation {
    /// Writes these bytes (hexadecimal); their length must be the range's.
    Write {
        /// The bytes, in hexadecimal.
        hex: String,
    },
    /// Sets every byte.
    Fill {
        /// The value.
        byte: u8,
    },
    /// XORs with a repeating key (hexadecimal).
    Xor {
        /// The key, in hexadecimal.
        key: String,
    },
    /// Flips one bit of every byte.
    FlipBit {
        /// The bit, 0-7.
        bit: u8,
    },
    /// Reverses the byte order of the range.
    Reverse,
}

/// What the range must hold before the patch applies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "check")]
pub enum Expected {
    /// Exactly these bytes (hexadecimal).
    Bytes {
        /// The bytes, in hexadecimal.
        hex: String,
    },
    /// Bytes with this SHA-256 (hexadecimal).
    Sha256 {
        /// The digest, in hexadecimal.
        hex: String,
    },
    /// Bytes with this CRC-32.
    Crc32 {
        /// The checksum.
        value: u32,
    },
}

/// A named byte patch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BytePatch {
    /// A stable identifier (any string; a UUID when generated).
    pub id: String,
    /// The name it is applied and reverted by; unique in a book.
    pub name: String,
    /// What it is for.
    #[serde(default)]
    pub description: String,
    /// Where it applies.
    pub target: PatchTarget,
    /// What it does.
    pub operation: PatchOperation,
    /// What the range must hold first, if anything.
    #[serde(default)]
    pub expected: Option<Expected>,
    /// Higher wins an overlap; an equal or lower one is refused.
    #[serde(default)]
    pub priority: i32,
}

impl BytePatch {
    /// The absolute range of the patch in `bytes` (a GGUF file for tensor targets).
    pub fn resolve(&self, bytes: &[u8]) -> Result<Range<u64>> {
        match &self.target {
            PatchTarget::Offset { offset, len } => {
                let range = *offset..offset.checked_add(*len).ok_or(Error::OutOfRange {
                    start: *offset,
                    end: u64::MAX,
                    limit: bytes.len() as u64,
                })?;
                check_range(&range, bytes.len() as u64)?;
                Ok(range)
            }
            PatchTarget::Tensor { tensor, start, end } => {
                let gguf = Gguf::parse(bytes)?;
                tensor_range(gguf.require_tensor(tensor)?, Some(*start..*end))
            }
        }
    }

    /// The bytes the patch writes over `current` (the bytes of its range now), after
    /// checking that they are what it expects.
    pub fn new_bytes(&self, current: &[u8]) -> Result<Vec<u8>> {
        check_expected(self, current)?;
        compute(self, current)
    }
}

/// An overlap between a patch and one already applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The applied patch.
    pub applied: String,
    /// Its priority.
    pub applied_priority: i32,
    /// The overlapping absolute range.
    pub overlap: Range<u64>,
    /// Whether the new patch wins (its priority is higher) and would lie over the
    /// applied one.
    pub new_patch_wins: bool,
}

/// A patch applied, with the transaction that applied it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AppliedPatch {
    /// The patch's name.
    pub name: String,
    /// The transaction (in the file's journal or the buffer's log).
    pub transaction: u64,
    /// The absolute range it covers.
    pub range: Range<u64>,
    /// Its priority.
    pub priority: i32,
    /// The bytes of its range before it was applied: what reverting it restores.
    undo: Vec<u8>,
}

/// The outcome of applying a patch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// The write.
    pub receipt: EditReceipt,
    /// Lower-priority patches it lies over: it replaces their bytes where they overlap,
    /// they stay applied, and reverting it brings their bytes back.
    pub displaced: Vec<String>,
}

/// A set of named patches and which of them are applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatchBook {
    /// The patches.
    #[serde(default, rename = "patch")]
    pub patches: Vec<BytePatch>,
    #[serde(skip)]
    applied: Vec<AppliedPatch>,
}

/// The name of the transaction that applies patch `name`.
pub fn transaction_name(name: &str) -> String {
    format!("patch {name}")
}

impl PatchBook {
    /// A book of these patches, none applied; names must be unique.
    pub fn new(patches: Vec<BytePatch>) -> Result<PatchBook> {
        let mut book = PatchBook::default();
        for p in patches {
            book.add(p)?;
        }
        Ok(book)
    }

    /// Adds a patch; its name must be new.
    pub fn add(&mut self, patch: BytePatch) -> Result<()> {
        if self.patches.iter().any(|p| p.name == patch.name) {
            return Err(Error::InvalidEdit(format!(
                "a patch named {:?} exists already",
                patch.name
            )));
        }
        self.patches.push(patch);
        Ok(())
    }

    /// The patch with this name.
    pub fn patch(&self, name: &str) -> Result<&BytePatch> {
        self.patches
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::InvalidEdit(format!("no patch named {name:?}")))
    }

    /// The patches applied now.
    pub fn applied(&self) -> &[AppliedPatch] {
        &self.applied
    }

    /// Learns which patches a file's journal shows applied: the last committed
    /// transaction named after each patch, unless it was reverted.
    pub fn load_applied(&mut self, journal: &Journal, bytes: &[u8]) -> Result<()> {
        self.applied.clear();
        for patch in &self.patches {
            let name = transaction_name(&patch.name);
            let last = journal
                .transactions()
                .iter()
                .rev()
                .find(|t| t.name == name && matches!(t.state, TransactionState::Committed(_)));
            if let Some(t) = last
                && journal.reverted_by(t.id).is_none()
            {
                let range = self.resolve(patch, bytes)?;
                // The bytes it replaced, from the journal's undo records.
                let mut undo = bytes
                    .get(range.start as usize..range.end as usize)
                    .unwrap_or_default()
                    .to_vec();
                for entry in &t.writes {
                    if entry.offset >= range.start && entry.offset + entry.len <= range.end {
                        let original = journal.original_bytes(entry)?;
                        let at = (entry.offset - range.start) as usize;
                        undo[at..at + original.len()].copy_from_slice(&original);
                    }
                }
                self.applied.push(AppliedPatch {
                    name: patch.name.clone(),
                    transaction: t.id,
                    range,
                    priority: patch.priority,
                    undo,
                });
            }
        }
        // Oldest first, as they were applied: later ones lie over earlier ones.
        self.applied.sort_by_key(|a| a.transaction);
        Ok(())
    }

    /// The absolute range of a patch in `bytes` (a GGUF file for tensor targets).
    pub fn resolve(&self, patch: &BytePatch, bytes: &[u8]) -> Result<Range<u64>> {
        patch.resolve(bytes)
    }

    /// The overlaps `name` would have with the applied patches, without applying it.
    pub fn check_conflicts(&self, name: &str, bytes: &[u8]) -> Result<Vec<Conflict>> {
        let patch = self.patch(name)?;
        let range = self.resolve(patch, bytes)?;
        Ok(self
            .applied
            .iter()
            .filter(|a| a.name != name && a.range.start < range.end && range.start < a.range.end)
            .map(|a| Conflict {
                applied: a.name.clone(),
                applied_priority: a.priority,
                overlap: a.range.start.max(range.start)..a.range.end.min(range.end),
                new_patch_wins: patch.priority > a.priority,
            })
            .collect())
    }

    /// Applies patch `name`: settles overlaps by priority (an equal or higher one in the
    /// way refuses it), computes its bytes from its range as it would be without the
    /// lower-priority patches it overlaps, checks the bytes it expects there, and writes
    /// in one transaction. The patches it lies over stay applied: reverting it brings
    /// their bytes back.
    pub fn apply(&mut self, name: &str, patcher: &mut dyn BytePatcher) -> Result<ApplyOutcome> {
        if self.applied.iter().any(|a| a.name == name) {
            return Err(Error::InvalidEdit(format!(
                "patch {name:?} is applied already"
            )));
        }
        let patch = self.patch(name)?.clone();
        let range = self.resolve(&patch, patcher.bytes())?;
        let conflicts = self.check_conflicts(name, patcher.bytes())?;
        if let Some(blocking) = conflicts.iter().find(|c| !c.new_patch_wins) {
            return Err(Error::PatchConflict {
                patch: name.to_owned(),
                applied: blocking.applied.clone(),
                start: blocking.overlap.start,
                end: blocking.overlap.end,
            });
        }
        let current = patcher.read(range.clone())?.to_vec();
        // What the range holds without the patches it displaces, newest undone first.
        let mut base = current.clone();
        for applied in self.applied.iter().rev() {
            if conflicts.iter().any(|c| c.applied == applied.name) {
                overlay(&mut base, &range, &applied.range, &applied.undo);
            }
        }
        check_expected(&patch, &base)?;
        let new_bytes = compute(&patch, &base)?;
        let receipt = patcher.commit(
            &transaction_name(name),
            vec![ByteWrite {
                offset: range.start,
                bytes: new_bytes,
            }],
        )?;
        if let Some(transaction) = receipt.transaction {
            self.applied.push(AppliedPatch {
                name: name.to_owned(),
                transaction,
                range,
                priority: patch.priority,
                undo: current,
            });
        }
        let displaced = conflicts.into_iter().map(|c| c.applied).collect();
        Ok(ApplyOutcome { receipt, displaced })
    }

    /// Reverts patch `name` (refused when its bytes changed since). Its bytes that a
    /// patch over it changed stay that patch's: the patches over it are reverted first,
    /// then it, then they are applied again, each step its own transaction, so that what
    /// reverting it restores is only what nothing above covers.
    pub fn revert(&mut self, name: &str, patcher: &mut dyn BytePatcher) -> Result<EditReceipt> {
        let index = self
            .applied
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| Error::InvalidEdit(format!("patch {name:?} is not applied")))?;
        // Every later patch that overlaps it, or overlaps one of those.
        let mut above: Vec<usize> = Vec::new();
        for j in index + 1..self.applied.len() {
            let overlaps = |k: usize| {
                let (a, b) = (&self.applied[j].range, &self.applied[k].range);
                a.start < b.end && b.start < a.end
            };
            if overlaps(index) || above.iter().any(|&k| overlaps(k)) {
                above.push(j);
            }
        }
        let lifted: Vec<String> = above
            .iter()
            .map(|&j| self.applied[j].name.clone())
            .collect();
        for lifted_name in lifted.iter().rev() {
            self.revert_top(lifted_name, patcher)?;
        }
        let receipt = self.revert_top(name, patcher)?;
        for lifted_name in &lifted {
            self.apply(lifted_name, patcher)?;
        }
        Ok(receipt)
    }

    /// Reverts an applied patch that no applied patch lies over.
    fn revert_top(&mut self, name: &str, patcher: &mut dyn BytePatcher) -> Result<EditReceipt> {
        let index = self
            .applied
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| Error::InvalidEdit(format!("patch {name:?} is not applied")))?;
        let receipt = patcher.revert(self.applied[index].transaction)?;
        self.applied.remove(index);
        Ok(receipt)
    }
}

/// Writes `undo` (the bytes of `undo_range`) over `base` (the bytes of `range`) where the
/// two ranges overlap.
fn overlay(base: &mut [u8], range: &Range<u64>, undo_range: &Range<u64>, undo: &[u8]) {
    let start = range.start.max(undo_range.start);
    let end = range.end.min(undo_range.end);
    if start < end {
        base[(start - range.start) as usize..(end - range.start) as usize].copy_from_slice(
            &undo[(start - undo_range.start) as usize..(end - undo_range.start) as usize],
        );
    }
}

fn compute(patch: &BytePatch, current: &[u8]) -> Result<Vec<u8>> {
    let hex = |text: &str| {
        ops::from_hex(text)
            .ok_or_else(|| Error::InvalidOperand(format!("{text:?} is not hexadecimal")))
    };
    let mut bytes = current.to_vec();
    match &patch.operation {
        PatchOperation::Write { hex: text } => {
            let new = hex(text)?;
            if new.len() != current.len() {
                return Err(Error::InvalidOperand(format!(
                    "patch {:?} writes {} bytes into a {}-byte range",
                    patch.name,
                    new.len(),
                    current.len()
                )));
            }
            bytes = new;
        }
        PatchOperation::Fill { byte } => bytes.fill(*byte),
        PatchOperation::Xor { key } => {
            let op = BitOp::Xor(hex(key)?);
            op.validate().map_err(Error::InvalidOperand)?;
            op.apply(&mut bytes);
        }
        PatchOperation::FlipBit { bit } => {
            let op = BitOp::Flip(*bit);
            op.validate().map_err(Error::InvalidOperand)?;
            op.apply(&mut bytes);
        }
        PatchOperation::Reverse => bytes.reverse(),
    }
    Ok(bytes)
}

fn check_expected(patch: &BytePatch, current: &[u8]) -> Result<()> {
    let ok = match &patch.expected {
        None => true,
        Some(Expected::Bytes { hex }) => ops::from_hex(hex).as_deref() == Some(current),
        Some(Expected::Sha256 { hex }) => {
            ops::to_hex(&ops::sha256(current)) == hex.to_ascii_lowercase()
        }
        Some(Expected::Crc32 { value }) => ops::crc32(current) == *value,
    };
    if ok {
        Ok(())
    } else {
        Err(Error::UnexpectedBytes {
            patch: patch.name.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::patcher::BufferPatcher;

    fn patch(name: &str, offset: u64, len: u64, byte: u8, priority: i32) -> BytePatch {
        BytePatch {
            id: format!("id-{name}"),
            name: name.to_owned(),
            description: String::new(),
            target: PatchTarget::Offset { offset, len },
            operation: PatchOperation::Fill { byte },
            expected: None,
            priority,
        }
    }

    #[test]
    fn apply_revert_and_priorities() {
        let mut buffer = BufferPatcher::new(vec![0u8; 64]);
        let mut book = PatchBook::new(vec![
            patch("low", 0, 16, 1, 0),
            patch("high", 8, 16, 2, 5),
            patch("equal", 20, 4, 3, 5),
            patch("apart", 40, 4, 4, 0),
        ])
        .unwrap();
        book.apply("low", &mut buffer).unwrap();
        book.apply("apart", &mut buffer).unwrap();
        // A higher priority displaces the lower one it overlaps.
        let conflicts = book.check_conflicts("high", buffer.bytes()).unwrap();
        assert_eq!(conflicts.len(), 1);
        assert!(conflicts[0].new_patch_wins);
        assert_eq!(conflicts[0].overlap, 8..16);
        let outcome = book.apply("high", &mut buffer).unwrap();
        assert_eq!(outcome.displaced, vec!["low".to_owned()]);
        // It lies over the lower one, which stays applied where it is not covered.
        assert_eq!(&buffer.bytes()[0..8], &[1; 8]);
        assert_eq!(&buffer.bytes()[8..24], &[2; 16]);
        // An equal priority is refused, and nothing is written.
        let before = buffer.bytes().to_vec();
        assert!(matches!(
            book.apply("equal", &mut buffer),
            Err(Error::PatchConflict { ref applied, start: 20, end: 24, .. }) if applied == "high"
        ));
        assert_eq!(buffer.bytes(), &before[..]);
        book.revert("high", &mut buffer).unwrap();
        // Reverting the higher one brings the lower one's bytes back.
        assert_eq!(&buffer.bytes()[0..16], &[1; 16]);
        book.revert("low", &mut buffer).unwrap();
        book.revert("apart", &mut buffer).unwrap();
        assert_eq!(buffer.bytes(), &[0u8; 64][..]);
        assert!(book.applied().is_empty());
    }

    #[test]
    fn reverting_a_covered_patch_restores_only_its_uncovered_bytes() {
        let mut buffer = BufferPatcher::new(vec![0u8; 32]);
        let mut book =
            PatchBook::new(vec![patch("low", 0, 16, 1, 0), patch("high", 8, 16, 2, 5)]).unwrap();
        book.apply("low", &mut buffer).unwrap();
        book.apply("high", &mut buffer).unwrap();
        book.revert("low", &mut buffer).unwrap();
        assert_eq!(&buffer.bytes()[0..8], &[0; 8]);
        assert_eq!(&buffer.bytes()[8..24], &[2; 16]);
        assert_eq!(book.applied().len(), 1);
        // The higher one now restores the original bytes, not the lower one's.
        book.revert("high", &mut buffer).unwrap();
        assert_eq!(buffer.bytes(), &[0u8; 32][..]);
    }

    #[test]
    fn a_displacing_operation_starts_from_the_bytes_under_the_displaced_patch() {
        let mut buffer = BufferPatcher::new(vec![0x0fu8; 16]);
        let mut flip = patch("flip", 0, 8, 0, 5);
        flip.operation = PatchOperation::FlipBit { bit: 7 };
        let mut book = PatchBook::new(vec![patch("fill", 0, 8, 0x55, 0), flip]).unwrap();
        book.apply("fill", &mut buffer).unwrap();
        book.apply("flip", &mut buffer).unwrap();
        // Bit 7 of the original 0x0f, not of the filled 0x55.
        assert_eq!(&buffer.bytes()[0..8], &[0x8f; 8]);
        book.revert("flip", &mut buffer).unwrap();
        assert_eq!(&buffer.bytes()[0..8], &[0x55; 8]);
    }

    #[test]
    fn expected_bytes_are_checked_before_writing() {
        let mut buffer = BufferPatcher::new(b"GGUF\x03\0\0\0".to_vec());
        let mut p = patch("version", 4, 4, 0, 0);
        p.operation = PatchOperation::Write {
            hex: "02000000".into(),
        };
        p.expected = Some(Expected::Bytes {
            hex: "02000000".into(),
        });
        let mut good = p.clone();
        good.name = "good".into();
        good.expected = Some(Expected::Sha256 {
            hex: ops::to_hex(&ops::sha256(&[3, 0, 0, 0])),
        });
        let mut book = PatchBook::new(vec![p, good]).unwrap();
        assert!(matches!(
            book.apply("version", &mut buffer),
            Err(Error::UnexpectedBytes { .. })
        ));
        assert_eq!(buffer.bytes(), b"GGUF\x03\0\0\0");
        book.apply("good", &mut buffer).unwrap();
        assert_eq!(buffer.bytes(), b"GGUF\x02\0\0\0");
    }

    #[test]
    fn layers_survive_a_restart_through_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.bin");
        std::fs::write(&path, [0u8; 32]).unwrap();
        let patches = vec![patch("low", 0, 16, 1, 0), patch("high", 8, 16, 2, 5)];
        {
            let mut file = crate::InPlaceFile::open(&path).unwrap();
            let mut book = PatchBook::new(patches.clone()).unwrap();
            book.apply("low", &mut file).unwrap();
            book.apply("high", &mut file).unwrap();
        }
        // A new process: the book learns what is applied, and the bytes each replaced,
        // from the journal.
        let mut file = crate::InPlaceFile::open(&path).unwrap();
        let mut book = PatchBook::new(patches).unwrap();
        let bytes = file.bytes().to_vec();
        book.load_applied(file.journal(), &bytes).unwrap();
        assert_eq!(book.applied().len(), 2);
        book.revert("low", &mut file).unwrap();
        assert_eq!(&file.bytes()[0..8], &[0; 8]);
        assert_eq!(&file.bytes()[8..24], &[2; 16]);
        book.revert("high", &mut file).unwrap();
        drop(file);
        assert_eq!(std::fs::read(&path).unwrap(), vec![0u8; 32]);
    }

    #[test]
    fn books_round_trip_through_toml_shaped_serde() {
        let book = PatchBook::new(vec![patch("a", 1, 2, 3, 4)]).unwrap();
        let json = serde_json::to_string(&book).unwrap();
        let back: PatchBook = serde_json::from_str(&json).unwrap();
        assert_eq!(back, book);
    }
}
