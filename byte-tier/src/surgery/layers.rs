//! Layer duplication (the passthrough "self-merge"): copies of a run of blocks inserted
//! at another place, every block renumbered, `block_count` and the per-layer arrays
//! updated. Tensors keep their types and bytes.

use std::ops::Range;

use serde::Serialize;

use crate::edit::split_block_name;
use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::value::Value;
use crate::writer::{GgufWriter, TensorSpec};

/// What a layer duplication changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DuplicateReport {
    /// The block count before.
    pub blocks_before: u64,
    /// The block count after.
    pub blocks_after: u64,
    /// The blocks copied (original numbering).
    pub copied: Range<u64>,
    /// Where the copies start in the new numbering.
    pub at: u64,
    /// Tensors added (the copies, under their new names).
    pub tensors_added: Vec<String>,
    /// Tensors renamed (old name, new name): the original blocks from `at` on.
    pub tensors_renamed: Vec<(String, String)>,
    /// Per-layer array keys that received the copied blocks' entries.
    pub arrays_extended: Vec<String>,
}

/// The new index of original block `old` when `count` copies are inserted at `at`.
fn shifted(old: u64, at: u64, count: u64) -> u64 {
    if old < at { old } else { old + count }
}

/// Inserts copies of the blocks `layers` (original numbering, `start..end`) so that they
/// become blocks `at..at + len` of the result; the original blocks from `at` on move up
/// by `len`. Every `{arch}.*` array with one entry per block gets the copied blocks'
/// entries at the same place, and `{arch}.block_count` grows by `len`. The copies share
/// the original tensors' types and bytes.
///
/// Refused with a typed error, before anything is written: an empty or reversed range
/// or one past the last block ([`Error::LayersOutOfRange`]) and an insertion point past
/// the end ([`Error::DuplicationPastEnd`]).
pub fn duplicate_layers<'a>(
    gguf: &Gguf<'a>,
    writer: &mut GgufWriter<'a>,
    layers: Range<u64>,
    at: u64,
) -> Result<DuplicateReport> {
    duplicate_layers_of_set(
        std::slice::from_ref(gguf),
        std::slice::from_mut(writer),
        layers,
        at,
    )
}

/// [`duplicate_layers`] over the shards of a set, each parsed in `parsed` with its
/// writer in `writers`: the metadata is the first shard's, and each copy goes into the
/// shard that holds its original.
pub fn duplicate_layers_of_set<'a>(
    parsed: &[Gguf<'a>],
    writers: &mut [GgufWriter<'a>],
    layers: Range<u64>,
    at: u64,
) -> Result<DuplicateReport> {
    let Some(first) = parsed.first() else {
        return Err(Error::InvalidEdit("a set without shards".into()));
    };
    let arch = first
        .architecture()
        .ok_or_else(|| Error::InvalidEdit("the file has no general.architecture".into()))?;
    let block_key = format!("{arch}.block_count");
    let blocks = first.get_u64(&block_key)?;
    if layers.start >= layers.end || layers.end > blocks {
        return Err(Error::LayersOutOfRange {
            start: layers.start,
            end: layers.end,
            blocks,
        });
    }
    if at > blocks {
        return Err(Error::DuplicationPastEnd { at, blocks });
    }
    let count = layers.end - layers.start;
    let blocks_after = blocks
        .checked_add(count)
        .filter(|&n| u32::try_from(n).is_ok())
        .ok_or_else(|| Error::InvalidEdit("the block count would overflow".into()))?;
    let mut report = DuplicateReport {
        blocks_before: blocks,
        blocks_after,
        copied: layers.clone(),
        at,
        ..DuplicateReport::default()
    };
    for (gguf, writer) in parsed.iter().zip(writers.iter_mut()) {
        renumber_blocks(gguf, writer, &layers, at, blocks, &mut report)?;
    }
    if let Some(writer) = writers.first_mut() {
        extend_block_arrays(writer, arch, &layers, at, blocks, &mut report);
    }
    Ok(report)
}

/// Adds the copies of `layers`' tensors found in `writer` (from `gguf`) and renumbers
/// its blocks. Tensors: those before the first block tensor, then every block in the
/// new order (within a block, the original order), then the rest. llama.cpp finds
/// tensors by name, so the order is for people reading the file.
fn renumber_blocks<'a>(
    gguf: &Gguf<'a>,
    writer: &mut GgufWriter<'a>,
    layers: &Range<u64>,
    at: u64,
    blocks: u64,
    report: &mut DuplicateReport,
) -> Result<()> {
    let count = layers.end - layers.start;
    let specs = std::mem::take(writer.tensors_mut());
    let mut head = Vec::new();
    let mut tail = Vec::new();
    let mut by_block: Vec<Vec<TensorSpec<'a>>> =
        (0..report.blocks_after).map(|_| Vec::new()).collect();
    for spec in specs {
        let Some((index, rest)) = split_block_name(&spec.name) else {
            if by_block.iter().all(Vec::is_empty) {
                head.push(spec);
            } else {
                tail.push(spec);
            }
            continue;
        };
        if index >= blocks {
            return Err(Error::InvalidEdit(format!(
                "tensor {:?} names block {index}, but the model has {blocks} blocks",
                spec.name
            )));
        }
        let rest = rest.to_owned();
        if layers.contains(&index) {
            let copy_index = at + (index - layers.start);
            let mut copy = TensorSpec::of(gguf, gguf.require_tensor(&spec.name)?);
            copy.name = format!("blk.{copy_index}.{rest}");
            report.tensors_added.push(copy.name.clone());
            by_block[copy_index as usize].push(copy);
        }
        let new_index = shifted(index, at, count);
        let mut spec = spec;
        if new_index != index {
            let renamed = format!("blk.{new_index}.{rest}");
            report
                .tensors_renamed
                .push((spec.name.clone(), renamed.clone()));
            spec.name = renamed;
        }
        by_block[new_index as usize].push(spec);
    }
    let tensors = writer.tensors_mut();
    tensors.extend(head);
    tensors.extend(by_block.into_iter().flatten());
    tensors.extend(tail);
    Ok(())
}

/// Sets `{arch}.block_count` to the new count and gives every `{arch}.*` array with one
/// entry per block the copied blocks' entries at the insertion point.
fn extend_block_arrays(
    writer: &mut GgufWriter<'_>,
    arch: &str,
    layers: &Range<u64>,
    at: u64,
    blocks: u64,
    report: &mut DuplicateReport,
) {
    let block_key = format!("{arch}.block_count");
    let blocks_after = report.blocks_after;
    let prefix = format!("{arch}.");
    for (key, value) in writer.metadata_mut().iter_mut() {
        if *key == block_key {
            *value = match value {
                Value::U64(_) => Value::U64(blocks_after),
                Value::I32(_) => Value::I32(blocks_after as i32),
                Value::I64(_) => Value::I64(blocks_after as i64),
                _ => Value::U32(blocks_after as u32),
            };
        } else if let Value::Array(array) = value
            && key.starts_with(&prefix)
            && array.items.len() as u64 == blocks
        {
            let copies: Vec<Value> =
                array.items[layers.start as usize..layers.end as usize].to_vec();
            let at = at as usize;
            array.items.splice(at..at, copies);
            report.arrays_extended.push(key.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::GgmlType;
    use crate::value::{Array, ValueType};

    fn model(blocks: u32) -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.set("general.architecture", "toy")
            .set("toy.block_count", blocks)
            .set(
                "toy.feed_forward_length",
                Array::new(
                    ValueType::U32,
                    (0..blocks).map(|b| Value::U32(100 + b)).collect(),
                ),
            );
        w.add_tensor(TensorSpec::from_bytes(
            "token_embd.weight",
            vec![2],
            GgmlType::F32,
            vec![0xaa; 8],
        ));
        for b in 0..blocks {
            for kind in ["attn", "ffn"] {
                w.add_tensor(TensorSpec::from_bytes(
                    format!("blk.{b}.{kind}.weight"),
                    vec![2],
                    GgmlType::F32,
                    vec![b as u8; 8],
                ));
            }
        }
        w.add_tensor(TensorSpec::from_bytes(
            "output_norm.weight",
            vec![2],
            GgmlType::F32,
            vec![0xee; 8],
        ));
        let mut out = Vec::new();
        w.write_to(&mut out).unwrap();
        out
    }

    fn duplicated(blocks: u32, layers: Range<u64>, at: u64) -> Result<(Vec<u8>, DuplicateReport)> {
        let bytes = model(blocks);
        let gguf = Gguf::parse(&bytes)?;
        let mut writer = GgufWriter::from_gguf(&gguf);
        let report = duplicate_layers(&gguf, &mut writer, layers, at)?;
        let mut out = Vec::new();
        writer.write_to(&mut out)?;
        Ok((out, report))
    }

    /// The first data byte of every block's `attn` tensor: which original block it is.
    fn block_sources(bytes: &[u8]) -> Vec<u8> {
        let gguf = Gguf::parse(bytes).unwrap();
        let blocks = gguf.get_u64("toy.block_count").unwrap();
        (0..blocks)
            .map(|b| {
                let t = gguf.tensor(&format!("blk.{b}.attn.weight")).unwrap();
                gguf.tensor_data(t)[0]
            })
            .collect()
    }

    #[test]
    fn copies_go_in_at_the_insertion_point_and_everything_after_moves_up() {
        let (out, report) = duplicated(6, 1..3, 4).unwrap();
        assert_eq!(block_sources(&out), [0, 1, 2, 3, 1, 2, 4, 5]);
        assert_eq!((report.blocks_before, report.blocks_after), (6, 8));
        assert_eq!(report.tensors_added.len(), 4);
        assert_eq!(report.arrays_extended, ["toy.feed_forward_length"]);
        let gguf = Gguf::parse(&out).unwrap();
        let ff: Vec<u64> = gguf
            .get_array("toy.feed_forward_length")
            .unwrap()
            .iter()
            .filter_map(|v| v.as_u64())
            .collect();
        assert_eq!(ff, [100, 101, 102, 103, 101, 102, 104, 105]);
        let names: Vec<&str> = gguf.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names.first(), Some(&"token_embd.weight"));
        assert_eq!(names.last(), Some(&"output_norm.weight"));
        assert_eq!(names.len(), 2 + 8 * 2);
    }

    #[test]
    fn copies_may_go_at_the_very_end_or_the_very_start() {
        let (out, _) = duplicated(3, 0..3, 3).unwrap();
        assert_eq!(block_sources(&out), [0, 1, 2, 0, 1, 2]);
        let (out, _) = duplicated(3, 2..3, 0).unwrap();
        assert_eq!(block_sources(&out), [2, 0, 1, 2]);
    }

    #[test]
    fn out_of_range_layers_and_a_point_past_the_end_are_refused() {
        assert!(matches!(
            duplicated(4, 2..5, 1),
            Err(Error::LayersOutOfRange {
                start: 2,
                end: 5,
                blocks: 4
            })
        ));
        assert!(matches!(
            duplicated(4, 2..2, 1),
            Err(Error::LayersOutOfRange { .. })
        ));
        assert!(matches!(
            duplicated(4, 1..2, 5),
            Err(Error::DuplicationPastEnd { at: 5, blocks: 4 })
        ));
    }
}
