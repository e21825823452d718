//! Direct operations on a live region and on its tensors, each a checked, windowed and
//! recorded patch (so each can be reverted), plus diagnostics and layer bypass.

use std::collections::BTreeMap;
use std::ops::Range;

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::live::LiveModel;
use crate::patch::{MemoryPatch, PatchKind, PatchTarget, Payload, ValueTransform};

/// Which tensors make up each block, from the `blk.N.*` names: the dependency map an
/// engine's layer loop (or a bypass) works from.
pub fn block_tensors(model: &LiveModel) -> BTreeMap<u64, Vec<String>> {
    let mut blocks: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for t in model.tensors() {
        if let Some(rest) = t.name.strip_prefix("blk.")
            && let Some((index, _)) = rest.split_once('.')
            && let Ok(index) = index.parse::<u64>()
        {
            blocks.entry(index).or_default().push(t.name.clone());
        }
    }
    blocks
}

/// A set of blocks an in-process engine skips: its layer loop asks
/// [`LayerSkipSet::is_skipped`] before each block. Readers never block.
#[derive(Debug, Default)]
pub struct LayerSkipSet {
    skipped: arc_swap::ArcSwap<Vec<u64>>,
}

impl LayerSkipSet {
    /// An empty set.
    pub fn new() -> LayerSkipSet {
        LayerSkipSet::default()
    }

    /// Whether block `index` is skipped (one atomic load, no lock).
    pub fn is_skipped(&self, index: u64) -> bool {
        self.skipped.load().contains(&index)
    }

    /// Skips block `index`.
    pub fn skip(&self, index: u64) {
        self.skipped.rcu(|current| {
            let mut next = current.to_vec();
            if !next.contains(&index) {
                next.push(index);
            }
            next
        });
    }

    /// Stops skipping block `index`.
    pub fn restore(&self, index: u64) {
        self.skipped.rcu(|current| {
            current
                .iter()
                .copied()
                .filter(|&i| i != index)
                .collect::<Vec<_>>()
        });
    }

    /// The skipped blocks.
    pub fn skipped(&self) -> Vec<u64> {
        self.skipped.load().to_vec()
    }
}

fn raw_patch(name: String, offset: u64, bytes: Vec<u8>) -> MemoryPatch {
    let end = offset + bytes.len() as u64;
    MemoryPatch::new(name, PatchTarget::Raw(offset..end), Payload::Bytes(bytes))
        .with_kind(PatchKind::Custom)
}

impl LiveModel {
    fn region_range(&self, range: &Range<u64>) -> Result<()> {
        if range.start > range.end || range.end > self.len() {
            return Err(Error::OutsideRegion {
                start: range.start,
                end: range.end,
                len: self.len(),
            });
        }
        Ok(())
    }

    /// Writes bytes at an offset (a recorded patch).
    pub fn write(&self, offset: u64, bytes: &[u8]) -> Result<Uuid> {
        self.apply(raw_patch(
            format!("write {} bytes at {offset}", bytes.len()),
            offset,
            bytes.to_vec(),
        ))
    }

    /// Writes several ranges as one transaction.
    pub fn write_batch(&self, writes: Vec<(u64, Vec<u8>)>) -> Result<Vec<Uuid>> {
        let patches = writes
            .into_iter()
            .map(|(offset, bytes)| {
                raw_patch(
                    format!("write {} bytes at {offset}", bytes.len()),
                    offset,
                    bytes,
                )
            })
            .collect();
        self.apply_all(patches)
    }

    /// Sets every byte of `range` to `byte`.
    pub fn fill(&self, range: Range<u64>, byte: u8) -> Result<Uuid> {
        self.region_range(&range)?;
        let bytes = vec![byte; (range.end - range.start) as usize];
        self.apply(raw_patch(
            format!("fill {range:?} with {byte:#04x}"),
            range.start,
            bytes,
        ))
    }

    /// Copies `len` bytes from `source` to `destination` (overlap-safe).
    pub fn copy(&self, source: u64, destination: u64, len: u64) -> Result<Uuid> {
        let bytes = self.extract(source..source.saturating_add(len))?;
        self.apply(raw_patch(
            format!("copy {len} bytes from {source} to {destination}"),
            destination,
            bytes,
        ))
    }

    /// Swaps two disjoint ranges of `len` bytes, as one transaction.
    pub fn swap(&self, a: u64, b: u64, len: u64) -> Result<Vec<Uuid>> {
        let first = self.extract(a..a.saturating_add(len))?;
        let second = self.extract(b..b.saturating_add(len))?;
        self.apply_all(vec![
            raw_patch(format!("swap {len} bytes at {a}"), a, second),
            raw_patch(format!("swap {len} bytes at {b}"), b, first),
        ])
    }

    /// A copy of the bytes of `range`, read under the read guard.
    pub fn extract(&self, range: Range<u64>) -> Result<Vec<u8>> {
        self.region_range(&range)?;
        Ok(self.read().bytes()[range.start as usize..range.end as usize].to_vec())
    }

    /// The ranges where the bytes at `offset` differ from `expected`: a structured diff.
    pub fn compare(&self, offset: u64, expected: &[u8]) -> Result<Vec<Range<u64>>> {
        let range = offset..offset.saturating_add(expected.len() as u64);
        self.region_range(&range)?;
        let guard = self.read();
        let current = &guard.bytes()[range.start as usize..range.end as usize];
        Ok(byte_tier::ops::differences(current, expected)
            .into_iter()
            .map(|r| r.start + offset..r.end + offset)
            .collect())
    }

    /// Every offset of `pattern` inside `within` (the whole region when `None`).
    pub fn search(&self, pattern: &[u8], within: Option<Range<u64>>) -> Result<Vec<u64>> {
        let range = within.unwrap_or(0..self.len());
        self.region_range(&range)?;
        let guard = self.read();
        let hay = &guard.bytes()[range.start as usize..range.end as usize];
        Ok(byte_tier::ops::search(hay, pattern)
            .into_iter()
            .map(|o| o + range.start)
            .collect())
    }

    /// A hex dump of `range`.
    pub fn hexdump(&self, range: Range<u64>) -> Result<String> {
        let bytes = self.extract(range.clone())?;
        Ok(byte_tier::ops::hexdump(&bytes, range.start))
    }

    /// Clones the data of tensor `from` into tensor `to` (same type and shape).
    pub fn clone_tensor(&self, from: &str, to: &str) -> Result<Uuid> {
        let (a, b) = (self.tensor(from)?.clone(), self.tensor(to)?.clone());
        if a.ggml_type != b.ggml_type || a.dims != b.dims {
            return Err(Error::InvalidPatch {
                patch: format!("clone {from} into {to}"),
                reason: format!(
                    "{} {:?} and {} {:?} differ",
                    a.ggml_type, a.dims, b.ggml_type, b.dims
                ),
            });
        }
        let bytes = self.extract(a.data_range())?;
        self.apply(MemoryPatch::new(
            format!("clone {from} into {to}"),
            PatchTarget::Tensor {
                name: to.to_owned(),
                elements: None,
            },
            Payload::Bytes(bytes),
        ))
    }

    /// Swaps the data of two tensors of the same type and shape, as one transaction.
    pub fn swap_tensors(&self, a: &str, b: &str) -> Result<Vec<Uuid>> {
        let (ta, tb) = (self.tensor(a)?.clone(), self.tensor(b)?.clone());
        if ta.ggml_type != tb.ggml_type || ta.dims != tb.dims {
            return Err(Error::InvalidPatch {
                patch: format!("swap {a} and {b}"),
                reason: "the tensors differ in type or shape".into(),
            });
        }
        let (da, db) = (
            self.extract(ta.data_range())?,
            self.extract(tb.data_range())?,
        );
        let target = |name: &str| PatchTarget::Tensor {
            name: name.to_owned(),
            elements: None,
        };
        self.apply_all(vec![
            MemoryPatch::new(format!("swap {a} <- {b}"), target(a), Payload::Bytes(db)),
            MemoryPatch::new(format!("swap {b} <- {a}"), target(b), Payload::Bytes(da)),
        ])
    }

    /// Stores a 32- or 64-bit word atomically (aligned to its width) and returns the
    /// previous value. Recorded in the statistics, not as a revertible patch: it is the
    /// primitive for flags an engine polls.
    pub fn atomic_store(&self, offset: u64, width: usize, value: u64) -> Result<u64> {
        self.atomic(offset, width, None, value)
            .map(|r| r.unwrap_or_else(|v| v))
    }

    /// Compares and exchanges a 32- or 64-bit word: `Ok(previous)` when it held
    /// `current` and now holds `new`, `Err(actual)` otherwise.
    pub fn compare_exchange(
        &self,
        offset: u64,
        width: usize,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>> {
        self.atomic(offset, width, Some(current), new)
    }

    /// Makes the region's pages in `range` writable or read-only again, by hand. Pages
    /// left writable are outside the protection this crate promises until set back.
    pub fn set_protection(&self, range: Range<u64>, writable: bool) -> Result<()> {
        self.region_range(&range)?;
        self.protect_pages(range, writable)
    }

    /// Makes block `index` add nothing to the residual stream, for a model read from
    /// this region or its file: zeroes its output projections (`attn_output` and
    /// `ffn_down`) in one revertible transaction. Norms, attention and the feed-forward
    /// input still run; only their contribution is removed.
    pub fn bypass_layer(&self, index: u64) -> Result<Vec<Uuid>> {
        let patches: Vec<MemoryPatch> = ["attn_output", "ffn_down"]
            .iter()
            .map(|part| format!("blk.{index}.{part}.weight"))
            .map(|name| {
                self.tensor(&name)?;
                Ok(
                    MemoryPatch::transform(format!("bypass {name}"), name, ValueTransform::Zero)
                        .with_kind(PatchKind::LayerBypass),
                )
            })
            .collect::<Result<_>>()?;
        self.apply_all(patches)
    }
}
