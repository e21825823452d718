//! Value edits of one tensor, planned as byte writes: the codecs transform a copy of the
//! affected blocks, and only the runs of bytes that changed become writes. Whoever holds
//! the file (the journal, a live mapping) applies them.

use std::ops::Range;

use crate::codec::{self, Transform, TransformReport};
use crate::error::{Error, Result};
use crate::gguf::{Gguf, TensorInfo};
use crate::patcher::ByteWrite;

/// Runs of changed bytes closer than this are merged into one write: fewer, larger
/// writes and undo records cost less than many tiny ones.
const MERGE_GAP: usize = 256;

/// A planned value edit.
#[derive(Clone, Debug)]
pub struct TensorEdit {
    /// The tensor.
    pub tensor: String,
    /// The element range edited.
    pub elements: Range<u64>,
    /// The writes (absolute offsets): runs of changed bytes, merged across small gaps.
    pub writes: Vec<ByteWrite>,
    /// Bytes whose value changes (the writes may cover a few unchanged ones between).
    pub changed_bytes: u64,
    /// How the codecs did it and the error against the intended values.
    pub report: TransformReport,
}

impl TensorEdit {
    /// Bytes the writes cover.
    pub fn bytes(&self) -> u64 {
        self.writes.iter().map(|w| w.bytes.len() as u64).sum()
    }
}

/// The byte range, relative to the tensor's data, that holds the elements `elements`
/// (which must start and end on block boundaries).
pub fn element_bytes(tensor: &TensorInfo, elements: &Range<u64>) -> Result<Range<u64>> {
    let block = tensor.ggml_type.block_len();
    if elements.start > elements.end || elements.end > tensor.n_elements {
        return Err(Error::OutsideTensor {
            tensor: tensor.name.clone(),
            start: elements.start,
            end: elements.end,
            n_bytes: tensor.n_elements,
        });
    }
    if !elements.start.is_multiple_of(block) || !elements.end.is_multiple_of(block) {
        return Err(Error::UnalignedRange {
            ggml_type: tensor.ggml_type,
            start: elements.start,
            end: elements.end,
            block_len: block,
        }
        .in_tensor(&tensor.name));
    }
    let bytes_per_block = tensor.ggml_type.block_bytes();
    Ok(elements.start / block * bytes_per_block..elements.end / block * bytes_per_block)
}

/// Plans `transform` on the elements `elements` (the whole tensor when `None`) of tensor
/// `name`: nothing is written; the returned writes say what would change.
pub fn plan_transform(
    gguf: &Gguf<'_>,
    name: &str,
    elements: Option<Range<u64>>,
    transform: &Transform<'_>,
) -> Result<TensorEdit> {
    let tensor = gguf.require_tensor(name)?;
    let elements = elements.unwrap_or(0..tensor.n_elements);
    let bytes = element_bytes(tensor, &elements)?;
    let data = gguf.tensor_data(tensor);
    let old = &data[bytes.start as usize..bytes.end as usize];
    // Blocks are independent, so the codecs can work on a copy of just these blocks.
    let mut new = old.to_vec();
    let report = codec::transform_range(
        tensor.ggml_type,
        &mut new,
        0..elements.end - elements.start,
        transform,
    )
    .map_err(|e| e.in_tensor(name))?;
    let base = tensor.data_offset + bytes.start;
    let changed_bytes = crate::ops::differences(old, &new)
        .iter()
        .map(|r| r.end - r.start)
        .sum();
    Ok(TensorEdit {
        tensor: name.to_owned(),
        elements,
        writes: changed_runs(old, &new, base),
        changed_bytes,
        report,
    })
}

/// The runs where `old` and `new` differ, merged across small gaps, as writes at `base`.
pub fn changed_runs(old: &[u8], new: &[u8], base: u64) -> Vec<ByteWrite> {
    let mut writes: Vec<ByteWrite> = Vec::new();
    let mut run: Option<Range<usize>> = None;
    for r in crate::ops::differences(old, new) {
        let r = r.start as usize..r.end as usize;
        run = match run {
            Some(current) if r.start - current.end <= MERGE_GAP => Some(current.start..r.end),
            Some(current) => {
                writes.push(ByteWrite {
                    offset: base + current.start as u64,
                    bytes: new[current].to_vec(),
                });
                Some(r)
            }
            None => Some(r),
        };
    }
    if let Some(current) = run {
        writes.push(ByteWrite {
            offset: base + current.start as u64,
            bytes: new[current].to_vec(),
        });
    }
    writes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_across_small_gaps_only() {
        let old = vec![0u8; 2000];
        let mut new = old.clone();
        new[10] = 1;
        new[20] = 1;
        new[1000] = 1;
        let writes = changed_runs(&old, &new, 100);
        assert_eq!(writes.len(), 2);
        assert_eq!(writes[0].offset, 110);
        assert_eq!(writes[0].bytes.len(), 11);
        assert_eq!(writes[1].offset, 1100);
        assert!(changed_runs(&old, &old, 0).is_empty());
    }
}
