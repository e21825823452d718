//! Finding NaN and infinity in a tensor: in its f16 scale fields and in its values.

use std::ops::Range;

use rayon::prelude::*;

use super::{Span, check_range, chunk_blocks, dequant_kernel, f16_to_f32};
use crate::error::{Error, Result};
use crate::types::GgmlType;

/// How many offsets a [`NonFiniteReport`] lists at most.
pub const MAX_REPORTED_OFFSETS: usize = 16;

/// What [`scan_non_finite`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NonFiniteReport {
    /// Elements (dequantized values) that are NaN.
    pub nan_count: u64,
    /// Elements that are +inf or -inf.
    pub inf_count: u64,
    /// Element offsets in the tensor of the first non-finite values, ascending (at most
    /// [`MAX_REPORTED_OFFSETS`]).
    pub first_offsets: Vec<u64>,
    /// f16 scale fields (d, m, dmin) that are NaN, for block types.
    pub nan_scales: u64,
    /// f16 scale fields that are infinite.
    pub inf_scales: u64,
    /// Indices in the tensor of the first blocks with a non-finite scale field, ascending
    /// (at most [`MAX_REPORTED_OFFSETS`]).
    pub first_bad_blocks: Vec<u64>,
}

impl NonFiniteReport {
    /// Whether nothing non-finite was found.
    pub fn is_clean(&self) -> bool {
        self.nan_count == 0 && self.inf_count == 0 && self.nan_scales == 0 && self.inf_scales == 0
    }

    /// The report of two disjoint ranges, `self`'s before `other`'s.
    pub fn merge(mut self, other: NonFiniteReport) -> NonFiniteReport {
        self.nan_count += other.nan_count;
        self.inf_count += other.inf_count;
        self.nan_scales += other.nan_scales;
        self.inf_scales += other.inf_scales;
        extend_capped(&mut self.first_offsets, other.first_offsets);
        extend_capped(&mut self.first_bad_blocks, other.first_bad_blocks);
        self
    }
}

fn extend_capped(list: &mut Vec<u64>, more: Vec<u64>) {
    let room = MAX_REPORTED_OFFSETS.saturating_sub(list.len());
    list.extend(more.into_iter().take(room));
}

/// Where a block type keeps its f16 scale fields (d, m, dmin).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ScaleFields {
    /// Whole little-endian f16 fields at these byte offsets of a block.
    At(&'static [usize]),
    /// IQ1_M's one f16 scale, spread over the top nibbles of its four scale words.
    Iq1M,
}

impl ScaleFields {
    /// How many scale fields a block has.
    pub(crate) fn len(self) -> usize {
        match self {
            ScaleFields::At(offsets) => offsets.len(),
            ScaleFields::Iq1M => 1,
        }
    }

    pub(crate) fn is_empty(self) -> bool {
        self.len() == 0
    }

    /// The f16 bits of scale field `field` of `block`.
    pub(crate) fn get(self, block: &[u8], field: usize) -> u16 {
        match self {
            ScaleFields::At(offsets) => {
                let at = offsets[field];
                u16::from_le_bytes([block[at], block[at + 1]])
            }
            ScaleFields::Iq1M => super::grid::iq1_m_scale_bits(block),
        }
    }

    /// Stores f16 bits as scale field `field` of `block`, leaving every other bit alone.
    pub(crate) fn set(self, block: &mut [u8], field: usize, bits: u16) {
        match self {
            ScaleFields::At(offsets) => {
                let at = offsets[field];
                block[at..at + 2].copy_from_slice(&bits.to_le_bytes());
            }
            ScaleFields::Iq1M => super::grid::set_iq1_m_scale_bits(block, bits),
        }
    }
}

/// The f16 scale fields of a block type.
pub(crate) fn scale_fields(ggml_type: GgmlType) -> ScaleFields {
    use GgmlType as T;
    ScaleFields::At(match ggml_type {
        T::Q4_0 | T::Q5_0 | T::Q8_0 | T::IQ4_NL | T::IQ4_XS => &[0],
        T::IQ2_XXS | T::IQ2_XS | T::IQ2_S | T::IQ3_XXS | T::IQ3_S | T::IQ1_S => &[0],
        T::Q4_1 | T::Q5_1 | T::Q4_K | T::Q5_K => &[0, 2],
        T::Q2_K => &[80, 82],
        T::Q3_K => &[108],
        T::Q6_K => &[208],
        T::TQ1_0 => &[52],
        T::TQ2_0 => &[64],
        T::IQ1_M => return ScaleFields::Iq1M,
        // MXFP4's e8m0 exponent has no infinity, and ggml decodes 0xff as 2^127 rather
        // than NaN; the plain types have no scales.
        _ => &[],
    })
}

/// Counts NaN and infinite values in the elements `range` of a tensor of `ggml_type`
/// whose bytes are `data`: in the f16 scale fields of each block and in the dequantized
/// values (a NaN scale makes every value of its block NaN, and both are counted).
pub fn scan_non_finite(
    ggml_type: GgmlType,
    data: &[u8],
    range: Range<u64>,
) -> Result<NonFiniteReport> {
    let kernel = dequant_kernel(ggml_type).ok_or(Error::UnsupportedType {
        ggml_type,
        operation: "scan",
    })?;
    let span = check_range(ggml_type, data.len(), &range)?;
    let blocks = chunk_blocks(ggml_type);
    let block_bytes = ggml_type.block_bytes() as usize;
    let block_len = ggml_type.block_len() as usize;
    let bytes = &data[span.bytes.clone()];
    let scan_chunk = |(index, chunk): (usize, &[u8])| {
        let first_block = span.first_block() + index * blocks;
        scan_chunk(kernel, &span, chunk, first_block, block_bytes, block_len)
    };
    let report = if bytes.len() <= blocks * block_bytes {
        scan_chunk((0, bytes))
    } else {
        bytes
            .par_chunks(blocks * block_bytes)
            .enumerate()
            .map(scan_chunk)
            .collect::<Vec<_>>()
            .into_iter()
            .fold(NonFiniteReport::default(), NonFiniteReport::merge)
    };
    Ok(report)
}

/// [`scan_non_finite`] that also keeps the values it decodes: `out` (exactly
/// `range.end - range.start` values) receives what [`super::dequantize_range`] would
/// write, so a caller that needs both the scan and the values decodes once.
pub fn scan_non_finite_into(
    ggml_type: GgmlType,
    data: &[u8],
    range: Range<u64>,
    out: &mut [f32],
) -> Result<NonFiniteReport> {
    let kernel = dequant_kernel(ggml_type).ok_or(Error::UnsupportedType {
        ggml_type,
        operation: "scan",
    })?;
    let span = check_range(ggml_type, data.len(), &range)?;
    super::check_len("output buffer", &span, out.len())?;
    let blocks = chunk_blocks(ggml_type);
    let block_bytes = ggml_type.block_bytes() as usize;
    let block_len = ggml_type.block_len() as usize;
    let bytes = &data[span.bytes.clone()];
    let report = bytes
        .par_chunks(blocks * block_bytes)
        .zip(out.par_chunks_mut(blocks * block_len))
        .enumerate()
        .map(|(index, (chunk, values))| {
            let first_block = span.first_block() + index * blocks;
            scan_decoded(
                kernel,
                &span,
                chunk,
                values,
                first_block,
                block_bytes,
                block_len,
            )
        })
        .collect::<Vec<_>>()
        .into_iter()
        .fold(NonFiniteReport::default(), NonFiniteReport::merge);
    Ok(report)
}

fn scan_chunk(
    kernel: super::DequantKernel,
    span: &Span,
    chunk: &[u8],
    first_block: usize,
    block_bytes: usize,
    block_len: usize,
) -> NonFiniteReport {
    let mut values = vec![0f32; chunk.len() / block_bytes * block_len];
    scan_decoded(
        kernel,
        span,
        chunk,
        &mut values,
        first_block,
        block_bytes,
        block_len,
    )
}

/// Scans one chunk's scale fields, decodes its values into `values` and scans them.
fn scan_decoded(
    kernel: super::DequantKernel,
    span: &Span,
    chunk: &[u8],
    values: &mut [f32],
    first_block: usize,
    block_bytes: usize,
    block_len: usize,
) -> NonFiniteReport {
    let mut report = NonFiniteReport::default();
    let fields = scale_fields(span.ggml_type);
    if !fields.is_empty() {
        for (b, block) in chunk.chunks_exact(block_bytes).enumerate() {
            let mut bad = false;
            for field in 0..fields.len() {
                let v = f16_to_f32(fields.get(block, field));
                if v.is_nan() {
                    report.nan_scales += 1;
                    bad = true;
                } else if v.is_infinite() {
                    report.inf_scales += 1;
                    bad = true;
                }
            }
            if bad && report.first_bad_blocks.len() < MAX_REPORTED_OFFSETS {
                report.first_bad_blocks.push((first_block + b) as u64);
            }
        }
    }
    kernel(chunk, values);
    if super::simd::any_non_finite_kernel(super::simd_level())(values) {
        let first_element = first_block * block_len;
        for (i, v) in values.iter().enumerate() {
            if v.is_finite() {
                continue;
            }
            if v.is_nan() {
                report.nan_count += 1;
            } else {
                report.inf_count += 1;
            }
            if report.first_offsets.len() < MAX_REPORTED_OFFSETS {
                report.first_offsets.push((first_element + i) as u64);
            }
        }
    }
    report
}
