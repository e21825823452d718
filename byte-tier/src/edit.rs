//! Edits of a GGUF file's structure: metadata values, tensor names, tensor removal and
//! layer pruning. Same-size metadata changes are planned as in-place writes; everything
//! else is planned as a rewrite through [`GgufWriter`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::patcher::ByteWrite;
use crate::plan::RewritePlan;
use crate::value::{Value, ValueRef};
use crate::writer::GgufWriter;

/// What a rewrite did.
#[derive(Debug)]
pub struct RewriteOutcome<R> {
    /// What the edit returned.
    pub result: R,
    /// The file written.
    pub output: PathBuf,
    /// Its length.
    pub bytes_written: u64,
    /// The input's length.
    pub input_len: u64,
    /// Where the input's journal was moved, when the rewrite replaced the input: its
    /// offsets describe the old layout, so its transactions can no longer be reverted.
    pub archived_journal: Option<PathBuf>,
}

/// Rewrites `input` through `edit` into `output` (or over `input` itself, atomically,
/// when `output` is `None`). Tensor data is streamed from a read-only map of the input.
/// An unfinished in-place transaction is rolled back first.
pub fn rewrite_file<R>(
    input: &Path,
    output: Option<&Path>,
    progress: &mut dyn FnMut(u64, u64),
    edit: impl for<'a> FnOnce(&Gguf<'a>, &mut GgufWriter<'a>) -> Result<R>,
) -> Result<RewriteOutcome<R>> {
    if output.is_none() && crate::journal::journal_path(input).exists() {
        crate::inplace::recover(input)?;
    }
    let map = crate::file::MappedFile::open(input)?;
    let gguf = map.parse()?;
    let plan = RewritePlan::new(input, output, &gguf, edit)?;
    plan.with_progress(progress).write()
}

/// The in-place writes that set `key` to `value`, when the new encoding (type tag and
/// value) has exactly the length of the old one: what `gguf-set-metadata` does, extended
/// to strings and arrays of the same encoded length. `None` when a rewrite is needed
/// (a new key, another length, or a version-1 file whose lengths are 32-bit).
pub fn in_place_metadata_write(
    gguf: &Gguf<'_>,
    key: &str,
    value: &Value,
) -> Result<Option<ByteWrite>> {
    let Some(entry) = gguf.entry(key) else {
        return Ok(None);
    };
    if gguf.version() < 2 {
        return Ok(None);
    }
    let mut encoded = Vec::with_capacity(4 + value.encoded_len() as usize);
    encoded.extend_from_slice(&value.value_type().id().to_le_bytes());
    value
        .encode(&mut encoded)
        .map_err(|e| Error::InvalidWrite(format!("metadata {key:?}: {e}")))?;
    let old_len = entry.value_offset - entry.type_offset + entry.value_len;
    if encoded.len() as u64 != old_len {
        return Ok(None);
    }
    if key == crate::gguf::ALIGNMENT_KEY
        && !matches!(value, Value::U32(a) if u64::from(*a) == gguf.alignment())
    {
        // A new alignment moves every tensor: only a rewrite can do that.
        return Ok(None);
    }
    Ok(Some(ByteWrite {
        offset: entry.type_offset,
        bytes: encoded,
    }))
}

/// What pruning layers changed.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PruneReport {
    /// The block count before.
    pub blocks_before: u64,
    /// The block count after.
    pub blocks_after: u64,
    /// Tensors removed.
    pub tensors_removed: Vec<String>,
    /// Tensors renamed (old name, new name).
    pub tensors_renamed: Vec<(String, String)>,
    /// Per-layer array keys trimmed.
    pub arrays_trimmed: Vec<String>,
}

/// The block index and the rest of a `blk.N.rest` tensor name.
pub(crate) fn split_block_name(name: &str) -> Option<(u64, &str)> {
    let rest = name.strip_prefix("blk.")?;
    let (index, tail) = rest.split_once('.')?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((index.parse().ok()?, tail))
}

/// Removes the blocks `layers` from a rewrite of `gguf`: drops their `blk.N.*` tensors,
/// renumbers the blocks after them, sets `{arch}.block_count`, and trims every
/// `{arch}.*` array that has one entry per block.
pub fn prune_layers(
    gguf: &Gguf<'_>,
    writer: &mut GgufWriter<'_>,
    layers: &[u64],
) -> Result<PruneReport> {
    prune_layers_of_set(gguf, std::slice::from_mut(writer), layers)
}

/// [`prune_layers`] over the shards of a set: `first` is the first shard, which holds the
/// architecture, the block count and the per-layer arrays; `writers` are the rewrites of
/// every shard, in order, whose `blk.N.*` tensors are dropped or renumbered wherever they
/// are.
pub fn prune_layers_of_set(
    first: &Gguf<'_>,
    writers: &mut [GgufWriter<'_>],
    layers: &[u64],
) -> Result<PruneReport> {
    let arch = first
        .architecture()
        .ok_or_else(|| Error::InvalidEdit("the file has no general.architecture".into()))?;
    let block_key = format!("{arch}.block_count");
    let blocks = first.get_u64(&block_key)?;
    let removed: BTreeSet<u64> = layers.iter().copied().collect();
    if let Some(&bad) = removed.iter().find(|&&l| l >= blocks) {
        return Err(Error::InvalidEdit(format!(
            "layer {bad} does not exist: the model has {blocks} blocks"
        )));
    }
    if removed.len() as u64 >= blocks {
        return Err(Error::InvalidEdit(
            "pruning would remove every block".into(),
        ));
    }
    let mut report = PruneReport {
        blocks_before: blocks,
        blocks_after: blocks - removed.len() as u64,
        ..PruneReport::default()
    };
    let new_index = |old: u64| old - removed.range(..old).count() as u64;

    for writer in writers.iter_mut() {
        writer
            .tensors_mut()
            .retain(|t| match split_block_name(&t.name) {
                Some((index, _)) if removed.contains(&index) => {
                    report.tensors_removed.push(t.name.clone());
                    false
                }
                _ => true,
            });
        for t in writer.tensors_mut() {
            if let Some((index, tail)) = split_block_name(&t.name) {
                let renamed = format!("blk.{}.{tail}", new_index(index));
                if renamed != t.name {
                    report
                        .tensors_renamed
                        .push((t.name.clone(), renamed.clone()));
                    t.name = renamed;
                }
            }
        }
    }

    let prefix = format!("{arch}.");
    let Some(writer) = writers.first_mut() else {
        return Ok(report);
    };
    for (key, value) in writer.metadata_mut().iter_mut() {
        if *key == block_key {
            *value = match value {
                Value::U64(_) => Value::U64(report.blocks_after),
                Value::I32(_) => Value::I32(report.blocks_after as i32),
                Value::I64(_) => Value::I64(report.blocks_after as i64),
                _ => Value::U32(report.blocks_after as u32),
            };
        } else if let Value::Array(array) = value
            && key.starts_with(&prefix)
            && array.items.len() as u64 == blocks
        {
            let mut index = 0u64;
            array.items.retain(|_| {
                let keep = !removed.contains(&index);
                index += 1;
                keep
            });
            report.arrays_trimmed.push(key.clone());
        }
    }
    Ok(report)
}

/// Renames a tensor in a rewrite.
pub fn rename_tensor(writer: &mut GgufWriter<'_>, from: &str, to: &str) -> Result<()> {
    if writer.tensors().iter().any(|t| t.name == to) {
        return Err(Error::InvalidEdit(format!(
            "a tensor named {to:?} already exists"
        )));
    }
    let tensor = writer
        .tensors_mut()
        .iter_mut()
        .find(|t| t.name == from)
        .ok_or_else(|| Error::NoSuchTensor(from.to_owned()))?;
    tensor.name = to.to_owned();
    Ok(())
}

/// Removes a tensor from a rewrite.
pub fn remove_tensor(writer: &mut GgufWriter<'_>, name: &str) -> Result<()> {
    let before = writer.tensors().len();
    writer.tensors_mut().retain(|t| t.name != name);
    if writer.tensors().len() == before {
        return Err(Error::NoSuchTensor(name.to_owned()));
    }
    Ok(())
}

/// Parses a command-line value for `key`: with the type given, or else the type the key
/// has in `gguf`, or else a string.
pub fn parse_metadata_value(
    gguf: &Gguf<'_>,
    key: &str,
    text: &str,
    value_type: Option<crate::value::ValueType>,
) -> Result<Value> {
    let t = match (value_type, gguf.get(key)) {
        (Some(t), _) => t,
        (None, Some(ValueRef::Array(_))) => {
            return Err(Error::InvalidEdit(format!(
                "{key:?} is an array: arrays cannot be set from the command line"
            )));
        }
        (None, Some(existing)) => existing.value_type(),
        (None, None) => crate::value::ValueType::String,
    };
    Value::parse_scalar(t, text)
        .ok_or_else(|| Error::InvalidEdit(format!("{text:?} is not a valid {t}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::GgmlType;
    use crate::value::{Array, ValueType};
    use crate::writer::TensorSpec;

    fn model(blocks: u32) -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.set("general.architecture", "toy")
            .set("toy.block_count", blocks)
            .set(
                "toy.attention.head_count_kv",
                Array::new(ValueType::U32, (0..blocks).map(Value::U32).collect()),
            )
            .set("toy.other", Array::new(ValueType::U32, vec![Value::U32(9)]));
        for b in 0..blocks {
            let bytes = vec![b as u8; 8];
            w.add_tensor(TensorSpec::from_bytes(
                format!("blk.{b}.w"),
                vec![2],
                GgmlType::F32,
                bytes,
            ));
        }
        w.add_tensor(TensorSpec::from_bytes(
            "output.weight",
            vec![2],
            GgmlType::F32,
            vec![0xee; 8],
        ));
        let mut out = Vec::new();
        w.write_to(&mut out).unwrap();
        out
    }

    #[test]
    fn pruning_renumbers_blocks_and_trims_per_layer_arrays() {
        let bytes = model(5);
        let gguf = Gguf::parse(&bytes).unwrap();
        let mut writer = GgufWriter::from_gguf(&gguf);
        let report = prune_layers(&gguf, &mut writer, &[1, 3]).unwrap();
        assert_eq!((report.blocks_before, report.blocks_after), (5, 3));
        assert_eq!(
            report.arrays_trimmed,
            vec!["toy.attention.head_count_kv".to_owned()]
        );
        let mut out = Vec::new();
        writer.write_to(&mut out).unwrap();
        let pruned = Gguf::parse(&out).unwrap();
        assert_eq!(pruned.get_u64("toy.block_count").unwrap(), 3);
        let kv: Vec<u64> = pruned
            .get_array("toy.attention.head_count_kv")
            .unwrap()
            .iter()
            .filter_map(|v| v.as_u64())
            .collect();
        assert_eq!(kv, vec![0, 2, 4]);
        assert_eq!(pruned.get_array("toy.other").unwrap().len(), 1);
        let names: Vec<&str> = pruned.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["blk.0.w", "blk.1.w", "blk.2.w", "output.weight"]);
        // blk.1 of the result is blk.2 of the original.
        assert_eq!(
            pruned.tensor_data(pruned.tensor("blk.1.w").unwrap()),
            &[2u8; 8]
        );
        assert_eq!(
            pruned.tensor_data(pruned.tensor("blk.2.w").unwrap()),
            &[4u8; 8]
        );
    }

    #[test]
    fn pruning_refuses_missing_or_all_layers() {
        let bytes = model(2);
        let gguf = Gguf::parse(&bytes).unwrap();
        let mut writer = GgufWriter::from_gguf(&gguf);
        assert!(matches!(
            prune_layers(&gguf, &mut writer, &[2]),
            Err(Error::InvalidEdit(_))
        ));
        assert!(matches!(
            prune_layers(&gguf, &mut writer, &[0, 1]),
            Err(Error::InvalidEdit(_))
        ));
    }

    #[test]
    fn in_place_metadata_writes_only_for_equal_sizes() {
        let bytes = model(2);
        let gguf = Gguf::parse(&bytes).unwrap();
        let write = in_place_metadata_write(&gguf, "toy.block_count", &Value::U32(7))
            .unwrap()
            .unwrap();
        assert_eq!(
            write.offset,
            gguf.entry("toy.block_count").unwrap().type_offset
        );
        assert_eq!(write.bytes[4..], 7u32.to_le_bytes());
        // Same size, another type: still in place (the type tag is rewritten too).
        assert!(
            in_place_metadata_write(&gguf, "toy.block_count", &Value::I32(7))
                .unwrap()
                .is_some()
        );
        assert!(
            in_place_metadata_write(&gguf, "toy.block_count", &Value::U64(7))
                .unwrap()
                .is_none()
        );
        assert!(
            in_place_metadata_write(&gguf, "general.architecture", &Value::from("abc"))
                .unwrap()
                .is_some()
        );
        assert!(
            in_place_metadata_write(&gguf, "general.architecture", &Value::from("abcd"))
                .unwrap()
                .is_none()
        );
        assert!(
            in_place_metadata_write(&gguf, "new.key", &Value::U8(1))
                .unwrap()
                .is_none()
        );
    }
}

/// One tensor requantized by [`requantize_tensors`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Requantized {
    /// The tensor.
    pub name: String,
    /// Its type before.
    pub from: crate::types::GgmlType,
    /// Its byte count before.
    pub bytes_before: u64,
    /// Its byte count after.
    pub bytes_after: u64,
    /// Whether importance weights shaped its new bytes (an importance matrix was given,
    /// it has the tensor, and the target type's quantizer uses them).
    pub weighted: bool,
}

/// Elements converted per step by a requantizing reader: a multiple of every block size
/// (256 for K-quants and IQ types, 32, 64 or 128 for the others).
const REQUANTIZE_CHUNK: u64 = 256 * 256;

/// Reads a tensor's data converted to another type, one chunk at a time: the writer
/// pulls from it, so a whole tensor is never held dequantized in memory.
struct RequantizeReader<'a> {
    source: &'a [u8],
    from: crate::types::GgmlType,
    to: crate::types::GgmlType,
    n_elements: u64,
    next_element: u64,
    buffer: Vec<u8>,
    position: usize,
    weights: Option<RowWeights>,
}

/// The importance weights of a tensor being requantized: `n_per_row` per expert, each
/// expert `rows_per_expert` rows (ggml's `ne1`).
struct RowWeights {
    weights: Vec<f32>,
    n_per_row: u64,
    rows_per_expert: u64,
}

impl RequantizeReader<'_> {
    /// Converts the next chunk: whole rows of one expert when weighted.
    fn next_chunk(&mut self) -> Result<Vec<u8>> {
        let start = self.next_element;
        let (end, weights) = match &self.weights {
            None => ((start + REQUANTIZE_CHUNK).min(self.n_elements), None),
            Some(w) => {
                let row = start / w.n_per_row;
                let expert = row / w.rows_per_expert;
                let rows = (REQUANTIZE_CHUNK / w.n_per_row).max(1);
                let end_row = (row + rows).min((expert + 1) * w.rows_per_expert);
                let at = (expert * w.n_per_row) as usize;
                let slice = &w.weights[at..at + w.n_per_row as usize];
                (
                    (end_row * w.n_per_row).min(self.n_elements),
                    Some((slice, w.n_per_row)),
                )
            }
        };
        let mut values = vec![0f32; (end - start) as usize];
        crate::codec::dequantize_range(self.from, self.source, start..end, &mut values)?;
        self.next_element = end;
        match weights {
            None => crate::codec::quantize(self.to, &values),
            Some((w, n_per_row)) => {
                crate::codec::quantize_weighted(self.to, &values, n_per_row as usize, w)
            }
        }
    }
}

impl std::io::Read for RequantizeReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.position == self.buffer.len() {
            if self.next_element == self.n_elements {
                return Ok(0);
            }
            self.buffer = self.next_chunk().map_err(std::io::Error::other)?;
            self.position = 0;
        }
        let n = out.len().min(self.buffer.len() - self.position);
        out[..n].copy_from_slice(&self.buffer[self.position..self.position + n]);
        self.position += n;
        Ok(n)
    }
}

/// Converts every tensor whose name `select` accepts to `target` in a rewrite, streaming
/// through the codecs. Each must be dequantizable, and its first dimension a whole number
/// of the target's blocks. Tensors already of the target type are left alone.
pub fn requantize_tensors<'a>(
    gguf: &Gguf<'a>,
    writer: &mut GgufWriter<'a>,
    select: &dyn Fn(&str) -> bool,
    target: crate::types::GgmlType,
) -> Result<Vec<Requantized>> {
    requantize_tensors_weighted(gguf, writer, select, target, None)
}

/// [`requantize_tensors`] with an importance matrix, as `llama-quantize --imatrix`:
/// the matrix is checked against the whole model first
/// ([`ImportanceMatrix::check_model`]: a matrix of another model is refused before
/// anything is planned), then each selected tensor the matrix names is quantized with
/// its weights ([`crate::codec::quantize_weighted`], expert by expert for a 3-D
/// tensor), and a tensor it does not name without them, as llama-quantize does.
///
/// [`ImportanceMatrix::check_model`]: crate::imatrix::ImportanceMatrix::check_model
pub fn requantize_tensors_weighted<'a>(
    gguf: &Gguf<'a>,
    writer: &mut GgufWriter<'a>,
    select: &dyn Fn(&str) -> bool,
    target: crate::types::GgmlType,
    imatrix: Option<&crate::imatrix::ImportanceMatrix>,
) -> Result<Vec<Requantized>> {
    if let Some(imatrix) = imatrix {
        imatrix.check_model(gguf)?;
    }
    requantize_tensors_of_shard(gguf, writer, select, target, imatrix)
}

/// [`requantize_tensors_weighted`] on one shard of a set, whose importance matrix the
/// caller has checked against the whole set
/// ([`ImportanceMatrix::check_shards`](crate::imatrix::ImportanceMatrix::check_shards)).
pub fn requantize_tensors_of_shard<'a>(
    gguf: &Gguf<'a>,
    writer: &mut GgufWriter<'a>,
    select: &dyn Fn(&str) -> bool,
    target: crate::types::GgmlType,
    imatrix: Option<&crate::imatrix::ImportanceMatrix>,
) -> Result<Vec<Requantized>> {
    if !crate::codec::can_quantize(target) {
        return Err(Error::UnsupportedType {
            ggml_type: target,
            operation: "quantize",
        });
    }
    let mut done = Vec::new();
    for spec in writer.tensors_mut() {
        if !select(&spec.name) {
            continue;
        }
        let info = gguf.require_tensor(&spec.name)?;
        if info.ggml_type == target {
            continue;
        }
        if !crate::codec::can_dequantize(info.ggml_type) {
            return Err(Error::UnsupportedType {
                ggml_type: info.ggml_type,
                operation: "dequantize",
            }
            .in_tensor(&info.name));
        }
        let first_dim = info.dims.first().copied().unwrap_or(1);
        if !first_dim.is_multiple_of(target.block_len()) {
            return Err(Error::InvalidEdit(format!(
                "tensor {:?}: its rows of {first_dim} elements are not whole {target} blocks of {}",
                info.name,
                target.block_len()
            )));
        }
        let bytes_after = target
            .bytes_for(info.n_elements)
            .ok_or_else(|| Error::InvalidEdit(format!("tensor {:?} is too large", info.name)))?;
        let weights = match imatrix {
            Some(m) if crate::codec::uses_importance(target) => {
                m.weights_for(info)?.map(|weights| RowWeights {
                    weights: weights.to_vec(),
                    n_per_row: first_dim,
                    rows_per_expert: info.dims.get(1).copied().unwrap_or(1).max(1),
                })
            }
            _ => None,
        };
        let weighted = weights.is_some();
        if !weighted && crate::codec::needs_importance(target) {
            return Err(Error::ImportanceRequired { ggml_type: target }.in_tensor(&info.name));
        }
        spec.ggml_type = target;
        spec.data = crate::writer::TensorData::Reader(Box::new(RequantizeReader {
            source: gguf.tensor_data(info),
            from: info.ggml_type,
            to: target,
            n_elements: info.n_elements,
            next_element: 0,
            buffer: Vec::new(),
            position: 0,
            weights,
        }));
        done.push(Requantized {
            name: info.name.clone(),
            from: info.ggml_type,
            bytes_before: info.n_bytes,
            bytes_after,
            weighted,
        });
    }
    Ok(done)
}
