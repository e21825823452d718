//! `BytePatcher`: byte operations on a GGUF file or buffer, every one bounds-checked and
//! every change an all-or-nothing transaction that can be reverted.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::gguf::TensorInfo;
use crate::ops::{self, BitOp, WordWidth};

/// One write: bytes to put at an absolute offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ByteWrite {
    /// Absolute offset.
    pub offset: u64,
    /// The new bytes.
    pub bytes: Vec<u8>,
}

impl ByteWrite {
    /// The range written.
    pub fn range(&self) -> Range<u64> {
        self.offset..self.offset + self.bytes.len() as u64
    }
}

/// What an applied change did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EditReceipt {
    /// The transaction id (in the file's journal, or the buffer's undo log); `None` when
    /// nothing changed.
    pub transaction: Option<u64>,
    /// The ranges written (only those whose bytes changed).
    pub ranges: Vec<Range<u64>>,
    /// Bytes written.
    pub bytes: u64,
}

/// Checks that `range` lies inside `0..len`.
pub fn check_range(range: &Range<u64>, len: u64) -> Result<()> {
    if range.start > range.end || range.end > len {
        return Err(Error::OutOfRange {
            start: range.start,
            end: range.end,
            limit: len,
        });
    }
    Ok(())
}

/// The absolute byte range of `sub` (relative to the tensor's data, whole tensor when
/// `None`), refusing any range that crosses the tensor's end.
pub fn tensor_range(tensor: &TensorInfo, sub: Option<Range<u64>>) -> Result<Range<u64>> {
    let sub = sub.unwrap_or(0..tensor.n_bytes);
    if sub.start > sub.end || sub.end > tensor.n_bytes {
        return Err(Error::OutsideTensor {
            tensor: tensor.name.clone(),
            start: sub.start,
            end: sub.end,
            n_bytes: tensor.n_bytes,
        });
    }
    Ok(tensor.data_offset + sub.start..tensor.data_offset + sub.end)
}

/// Checks `writes` against `bytes` (sorted, disjoint, inside) and drops those that
/// would write what is already there: only changes are journaled and written.
pub(crate) fn check_and_drop_unchanged(writes: &mut Vec<ByteWrite>, bytes: &[u8]) -> Result<()> {
    check_writes(writes, bytes.len() as u64)?;
    writes.retain(|w| bytes[w.offset as usize..w.range().end as usize] != w.bytes[..]);
    Ok(())
}

/// Sorts writes by offset and refuses overlapping ones: a transaction's undo is only
/// well defined when its writes are disjoint.
pub(crate) fn check_writes(writes: &mut [ByteWrite], len: u64) -> Result<()> {
    writes.sort_by_key(|w| w.offset);
    for w in writes.iter() {
        check_range(&w.range(), len)?;
    }
    for pair in writes.windows(2) {
        if pair[1].offset < pair[0].range().end {
            return Err(Error::OverlappingWrites {
                first: pair[0].range(),
                second: pair[1].range(),
            });
        }
    }
    Ok(())
}

/// Byte operations on a file or buffer. Implementors supply the current bytes, an
/// all-or-nothing `commit` of writes and `revert`; every other operation is built on
/// those, so every change is bounds-checked, journaled (for files) and revertible.
pub trait BytePatcher {
    /// The current bytes.
    fn bytes(&self) -> &[u8];

    /// Applies `writes` (any order, disjoint, inside the bytes) as one transaction named
    /// `name`: all of them or none.
    fn commit(&mut self, name: &str, writes: Vec<ByteWrite>) -> Result<EditReceipt>;

    /// Restores the bytes a transaction replaced, refusing when the bytes it wrote have
    /// changed since.
    fn revert(&mut self, transaction: u64) -> Result<EditReceipt>;

    /// Length in bytes.
    fn len(&self) -> u64 {
        self.bytes().len() as u64
    }

    /// Whether there are no bytes at all.
    fn is_empty(&self) -> bool {
        self.bytes().is_empty()
    }

    /// The bytes of `range`.
    fn read(&self, range: Range<u64>) -> Result<&[u8]> {
        check_range(&range, self.len())?;
        Ok(&self.bytes()[range.start as usize..range.end as usize])
    }

    /// Writes `bytes` at `offset`.
    fn write(&mut self, offset: u64, bytes: &[u8]) -> Result<EditReceipt> {
        let write = ByteWrite {
            offset,
            bytes: bytes.to_vec(),
        };
        self.commit(
            &format!("write {} bytes at {offset}", bytes.len()),
            vec![write],
        )
    }

    /// Writes several ranges as one transaction.
    fn write_batch(&mut self, writes: Vec<ByteWrite>) -> Result<EditReceipt> {
        let name = format!("batch of {} writes", writes.len());
        self.commit(&name, writes)
    }

    /// Sets every byte of `range` to `byte`.
    fn fill(&mut self, range: Range<u64>, byte: u8) -> Result<EditReceipt> {
        check_range(&range, self.len())?;
        let write = ByteWrite {
            offset: range.start,
            bytes: vec![byte; (range.end - range.start) as usize],
        };
        self.commit(&format!("fill {range:?} with {byte:#04x}"), vec![write])
    }

    /// Copies `len` bytes from `source` to `destination`; the ranges may overlap (the
    /// result is as if the source were read first).
    fn copy(&mut self, source: u64, destination: u64, len: u64) -> Result<EditReceipt> {
        let bytes = self.read(source..source.saturating_add(len))?.to_vec();
        check_range(&(destination..destination.saturating_add(len)), self.len())?;
        let name = format!("copy {len} bytes from {source} to {destination}");
        self.commit(
            &name,
            vec![ByteWrite {
                offset: destination,
                bytes,
            }],
        )
    }

    /// Swaps two disjoint ranges of `len` bytes.
    fn swap(&mut self, a: u64, b: u64, len: u64) -> Result<EditReceipt> {
        let first = self.read(a..a.saturating_add(len))?.to_vec();
        let second = self.read(b..b.saturating_add(len))?.to_vec();
        let name = format!("swap {len} bytes at {a} and {b}");
        self.commit(
            &name,
            vec![
                ByteWrite {
                    offset: a,
                    bytes: second,
                },
                ByteWrite {
                    offset: b,
                    bytes: first,
                },
            ],
        )
    }

    /// The ranges (absolute) where the bytes at `offset` differ from `expected`.
    fn compare(&self, offset: u64, expected: &[u8]) -> Result<Vec<Range<u64>>> {
        let current = self.read(offset..offset.saturating_add(expected.len() as u64))?;
        Ok(ops::differences(current, expected)
            .into_iter()
            .map(|r| r.start + offset..r.end + offset)
            .collect())
    }

    /// Every absolute offset where `pattern` occurs inside `within` (everywhere when
    /// `None`).
    fn search(&self, pattern: &[u8], within: Option<Range<u64>>) -> Result<Vec<u64>> {
        let range = within.unwrap_or(0..self.len());
        let haystack = self.read(range.clone())?;
        if pattern.is_empty() || pattern.len() > haystack.len() {
            return Err(Error::BadPattern {
                pattern_len: pattern.len() as u64,
                searched_len: haystack.len() as u64,
            });
        }
        Ok(ops::search(haystack, pattern)
            .into_iter()
            .map(|o| o + range.start)
            .collect())
    }

    /// XORs `range` with `key` (repeated) in place.
    fn xor(&mut self, range: Range<u64>, key: &[u8]) -> Result<EditReceipt> {
        self.bit_op(range, BitOp::Xor(key.to_vec()))
    }

    /// A copy of `range` XORed with `key` (repeated); nothing is written.
    fn xor_copy(&self, range: Range<u64>, key: &[u8]) -> Result<Vec<u8>> {
        BitOp::Xor(key.to_vec())
            .validate()
            .map_err(Error::InvalidOperand)?;
        let mut bytes = self.read(range)?.to_vec();
        ops::xor(&mut bytes, key);
        Ok(bytes)
    }

    /// Applies a bit operation to every byte of `range`.
    fn bit_op(&mut self, range: Range<u64>, op: BitOp) -> Result<EditReceipt> {
        op.validate().map_err(Error::InvalidOperand)?;
        let mut bytes = self.read(range.clone())?.to_vec();
        op.apply(&mut bytes);
        self.commit(
            &format!("{op:?} on {range:?}"),
            vec![ByteWrite {
                offset: range.start,
                bytes,
            }],
        )
    }

    /// Rotates every little-endian word of `range` left by `bits` (right when negative).
    fn rotate(&mut self, range: Range<u64>, width: WordWidth, bits: i32) -> Result<EditReceipt> {
        let mut bytes = self.read(range.clone())?.to_vec();
        if !bytes.len().is_multiple_of(width.bytes()) {
            return Err(Error::InvalidOperand(format!(
                "{} bytes is not a whole number of {}-byte words",
                bytes.len(),
                width.bytes()
            )));
        }
        ops::rotate_bits(&mut bytes, width, bits);
        self.commit(
            &format!("rotate {range:?} by {bits} bits"),
            vec![ByteWrite {
                offset: range.start,
                bytes,
            }],
        )
    }

    /// Reverses the order of the bytes of `range`.
    fn reverse(&mut self, range: Range<u64>) -> Result<EditReceipt> {
        let mut bytes = self.read(range.clone())?.to_vec();
        bytes.reverse();
        self.commit(
            &format!("reverse {range:?}"),
            vec![ByteWrite {
                offset: range.start,
                bytes,
            }],
        )
    }

    /// CRC-32 of `range`.
    fn crc32(&self, range: Range<u64>) -> Result<u32> {
        Ok(ops::crc32(self.read(range)?))
    }

    /// FNV-1a-64 of `range`.
    fn fnv1a64(&self, range: Range<u64>) -> Result<u64> {
        Ok(ops::fnv1a64(self.read(range)?))
    }

    /// SHA-256 of `range`.
    fn sha256(&self, range: Range<u64>) -> Result<[u8; 32]> {
        Ok(ops::sha256(self.read(range)?))
    }

    /// A hex dump of `range`.
    fn hexdump(&self, range: Range<u64>) -> Result<String> {
        let start = range.start;
        Ok(ops::hexdump(self.read(range)?, start))
    }
}

/// A `BytePatcher` over bytes in memory, with an in-memory undo log.
#[derive(Debug, Default)]
pub struct BufferPatcher {
    bytes: Vec<u8>,
    log: Vec<BufferTransaction>,
}

#[derive(Debug)]
struct BufferTransaction {
    id: u64,
    /// (offset, original bytes, new bytes).
    writes: Vec<(u64, Vec<u8>, Vec<u8>)>,
    reverted: bool,
}

impl BufferPatcher {
    /// Patches `bytes`.
    pub fn new(bytes: impl Into<Vec<u8>>) -> BufferPatcher {
        BufferPatcher {
            bytes: bytes.into(),
            log: Vec::new(),
        }
    }

    /// The bytes, given back.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

impl BytePatcher for BufferPatcher {
    fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn commit(&mut self, _name: &str, mut writes: Vec<ByteWrite>) -> Result<EditReceipt> {
        check_writes(&mut writes, self.len())?;
        let mut log = Vec::new();
        for w in writes {
            let range = w.offset as usize..w.offset as usize + w.bytes.len();
            if self.bytes[range.clone()] != w.bytes[..] {
                log.push((w.offset, self.bytes[range].to_vec(), w.bytes));
            }
        }
        if log.is_empty() {
            return Ok(EditReceipt {
                transaction: None,
                ranges: Vec::new(),
                bytes: 0,
            });
        }
        for (offset, _, new) in &log {
            let start = *offset as usize;
            self.bytes[start..start + new.len()].copy_from_slice(new);
        }
        let id = self.log.last().map_or(1, |t| t.id + 1);
        let receipt = receipt(Some(id), log.iter().map(|(o, _, n)| (*o, n.len() as u64)));
        self.log.push(BufferTransaction {
            id,
            writes: log,
            reverted: false,
        });
        Ok(receipt)
    }

    fn revert(&mut self, transaction: u64) -> Result<EditReceipt> {
        let Some(index) = self.log.iter().position(|t| t.id == transaction) else {
            return Err(Error::NoSuchTransaction(transaction));
        };
        if self.log[index].reverted {
            return Err(Error::AlreadyReverted(transaction));
        }
        for (offset, _, new) in &self.log[index].writes {
            let start = *offset as usize;
            if self.bytes[start..start + new.len()] != new[..] {
                return Err(Error::RevertMismatch {
                    transaction,
                    offset: *offset,
                });
            }
        }
        let writes: Vec<ByteWrite> = self.log[index]
            .writes
            .iter()
            .map(|(offset, original, _)| ByteWrite {
                offset: *offset,
                bytes: original.clone(),
            })
            .collect();
        self.log[index].reverted = true;
        self.commit(&format!("revert {transaction}"), writes)
    }
}

/// A `BytePatcher` that writes nothing: it plans. Every operation is checked as it would
/// be for real, and the writes it would make are kept in `planned` (only those that
/// change bytes).
#[derive(Debug)]
pub struct DryRun<'a> {
    bytes: &'a [u8],
    /// The writes the operations would make.
    pub planned: Vec<ByteWrite>,
    /// The names of the transactions they would be, in order.
    pub names: Vec<String>,
}

impl<'a> DryRun<'a> {
    /// Plans changes to `bytes`.
    pub fn new(bytes: &'a [u8]) -> DryRun<'a> {
        DryRun {
            bytes,
            planned: Vec::new(),
            names: Vec::new(),
        }
    }
}

impl BytePatcher for DryRun<'_> {
    fn bytes(&self) -> &[u8] {
        self.bytes
    }

    fn commit(&mut self, name: &str, mut writes: Vec<ByteWrite>) -> Result<EditReceipt> {
        check_and_drop_unchanged(&mut writes, self.bytes)?;
        self.names.push(name.to_owned());
        let r = receipt(
            None,
            writes.iter().map(|w| (w.offset, w.bytes.len() as u64)),
        );
        self.planned.extend(writes);
        Ok(r)
    }

    fn revert(&mut self, transaction: u64) -> Result<EditReceipt> {
        Err(Error::NoSuchTransaction(transaction))
    }
}

pub(crate) fn receipt(
    transaction: Option<u64>,
    writes: impl Iterator<Item = (u64, u64)>,
) -> EditReceipt {
    let ranges: Vec<Range<u64>> = writes.map(|(o, len)| o..o + len).collect();
    let bytes = ranges.iter().map(|r| r.end - r.start).sum();
    EditReceipt {
        transaction,
        ranges,
        bytes,
    }
}
