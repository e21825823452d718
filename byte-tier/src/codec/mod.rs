//! ggml tensor codecs: dequantize tensor bytes to `f32`, quantize `f32` values back, scan
//! for NaN and infinity, and transform values in place, on any block-aligned range of a
//! tensor's elements.
//!
//! Every function takes the bytes of one whole tensor (`&[u8]` or `&mut [u8]`, as
//! [`crate::Gguf::tensor_data`] returns them) plus a range of element offsets into it.
//! The range must start and end on a block boundary of the type; bytes outside it are
//! never read for writing nor written. Every check (range, lengths, finiteness of the
//! input, scales that would overflow) happens before the first byte is written: a failed
//! call leaves the tensor as it was.
//!
//! Arithmetic follows ggml's reference C code (`dequantize_row_*`, `quantize_row_*_ref`)
//! and gguf-py's `gguf.quants`, operation for operation in `f32` without fused
//! multiply-adds, so that results are bit-identical to gguf-py for every type it handles.
//!
//! Large ranges are cut into chunks of about [`CHUNK_ELEMENTS`] elements that rayon
//! processes in parallel (on the caller's rayon pool, so a one-thread pool gives a
//! one-thread run); no call holds more than one chunk of `f32` per worker, plus, for
//! writes, a copy of the new bytes of the range (its quantized size) so that an error in
//! any chunk can still leave the tensor untouched.
//!
//! What each type supports:
//! - dequantize: F32, F16, BF16, F64, I8..I64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K,
//!   IQ4_NL, IQ4_XS, MXFP4, TQ1_0, TQ2_0, and the grid types IQ1_S, IQ1_M, IQ2_XXS,
//!   IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S ([`can_dequantize`]);
//! - quantize (and so every transform): the same but the integer types
//!   ([`can_quantize`]); the grid types as ggml does, IQ1_M, IQ2_S, IQ3_XXS and IQ3_S
//!   with or without importance weights, IQ1_S, IQ2_XXS and IQ2_XS only with them
//!   ([`needs_importance`], [`quantize_weighted`], [`transform_range_weighted`]);
//! - the grid types take the transforms that work on their block scales alone (scale,
//!   zero) exactly, without requantizing; without weights, any other transform of
//!   IQ1_S, IQ2_XXS or IQ2_XS fails with [`Error::ImportanceRequired`];
//! - not handled: the activation types Q8_1 and Q8_K, and NVFP4, Q1_0, Q2_0: every
//!   operation on them fails with [`Error::UnsupportedType`] naming the type.
//!
//! The module also reads and writes numpy `.npy` files ([`write_tensor_npy`],
//! [`read_npy_file`]) for moving a tensor's values to numpy and back.

mod float;
mod grid;
mod grid_index;
mod iq1_quant;
mod iq2_quant;
mod iq3_quant;
mod kquants;
mod legacy;
mod lut;
mod npy;
mod scan;
mod simd;
mod transform;
mod weighted;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_iq1;
#[cfg(test)]
mod tests_iq2;
#[cfg(test)]
mod tests_iq3;

use std::ops::Range;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::types::GgmlType;

pub use npy::{
    NpyArray, npy_f32_header, npy_shape, parse_npy, read_npy_file, tensor_npy_bytes, write_npy_f32,
    write_tensor_npy,
};
pub use scan::{MAX_REPORTED_OFFSETS, NonFiniteReport, scan_non_finite, scan_non_finite_into};
pub use simd::{SIMD_ENV, SimdLevel, requested_simd_level, simd_level};
pub use transform::{
    Importance, Transform, TransformPath, TransformReport, transform_range,
    transform_range_weighted, transforms_run,
};

/// Dequantizes the elements `range` of a tensor of a parsed file; errors name the
/// tensor.
pub fn dequantize_tensor(
    gguf: &crate::Gguf<'_>,
    tensor: &crate::TensorInfo,
    range: Range<u64>,
) -> Result<Vec<f32>> {
    let run = || {
        let len = range.end.saturating_sub(range.start);
        let data = gguf.tensor_data(tensor);
        // Checked before allocating: the range must lie inside the tensor.
        check_range(tensor.ggml_type, data.len(), &range)?;
        let mut out = vec![0f32; len as usize];
        dequantize_range(tensor.ggml_type, data, range.clone(), &mut out)?;
        Ok(out)
    };
    run().map_err(|e: Error| e.in_tensor(&tensor.name))
}

/// Scans a whole tensor of a parsed file for NaN and infinity; errors name the tensor.
pub fn scan_tensor(gguf: &crate::Gguf<'_>, tensor: &crate::TensorInfo) -> Result<NonFiniteReport> {
    scan_non_finite(
        tensor.ggml_type,
        gguf.tensor_data(tensor),
        0..tensor.n_elements,
    )
    .map_err(|e| e.in_tensor(&tensor.name))
}

/// Elements handled by one parallel work item (rounded up to whole blocks): 256 KiB of
/// f32, large enough that a dequantization chunk (several microseconds) dwarfs rayon's
/// per-task cost, small enough to stay in a core's L2 cache.
pub const CHUNK_ELEMENTS: usize = 64 * 1024;

/// Decodes whole blocks: `src` holds `n` blocks and `dst` exactly `n * block_len` values.
type DequantKernel = fn(&[u8], &mut [f32]);

/// Encodes whole blocks: `src` holds `n * block_len` finite values and `dst` exactly `n`
/// blocks. Fails with the index (within `src`) of the first block whose scale does not
/// fit its field.
type QuantKernel = fn(&[f32], &mut [u8]) -> std::result::Result<(), BlockOverflow>;

/// A block whose scale cannot be stored: the index of the block within the kernel's
/// input and the scale that did not fit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct BlockOverflow {
    pub(crate) block: usize,
    pub(crate) value: f32,
}

/// The dequantization kernel of a type at the level the process runs at
/// ([`simd_level`]).
fn dequant_kernel(ggml_type: GgmlType) -> Option<DequantKernel> {
    dequant_kernel_at(simd_level(), ggml_type)
}

/// The dequantization kernel of a type at `level`, or the scalar one when the level has
/// none of its own or the CPU does not support it.
pub(crate) fn dequant_kernel_at(level: SimdLevel, ggml_type: GgmlType) -> Option<DequantKernel> {
    simd::dequant_kernel(level, ggml_type).or_else(|| scalar_dequant_kernel(ggml_type))
}

/// The quantization kernel of a type at the level the process runs at.
fn quant_kernel(ggml_type: GgmlType) -> Option<QuantKernel> {
    quant_kernel_at(simd_level(), ggml_type)
}

/// The quantization kernel of a type at `level`, as [`dequant_kernel_at`].
pub(crate) fn quant_kernel_at(level: SimdLevel, ggml_type: GgmlType) -> Option<QuantKernel> {
    simd::quant_kernel(level, ggml_type).or_else(|| scalar_quant_kernel(ggml_type))
}

pub(crate) fn scalar_dequant_kernel(ggml_type: GgmlType) -> Option<DequantKernel> {
    use GgmlType as T;
    Some(match ggml_type {
        T::F32 => float::dequant_f32,
        T::F16 => float::dequant_f16,
        T::BF16 => float::dequant_bf16,
        T::F64 => float::dequant_f64,
        T::I8 => float::dequant_i8,
        T::I16 => float::dequant_i16,
        T::I32 => float::dequant_i32,
        T::I64 => float::dequant_i64,
        T::Q4_0 => legacy::dequant_q4_0,
        T::Q4_1 => legacy::dequant_q4_1,
        T::Q5_0 => legacy::dequant_q5_0,
        T::Q5_1 => legacy::dequant_q5_1,
        T::Q8_0 => legacy::dequant_q8_0,
        T::Q2_K => kquants::dequant_q2_k,
        T::Q3_K => kquants::dequant_q3_k,
        T::Q4_K => kquants::dequant_q4_k,
        T::Q5_K => kquants::dequant_q5_k,
        T::Q6_K => kquants::dequant_q6_k,
        T::IQ4_NL => lut::dequant_iq4_nl,
        T::IQ4_XS => lut::dequant_iq4_xs,
        T::IQ1_S => grid::dequant_iq1_s,
        T::IQ1_M => grid::dequant_iq1_m,
        T::IQ2_XXS => grid::dequant_iq2_xxs,
        T::IQ2_XS => grid::dequant_iq2_xs,
        T::IQ2_S => grid::dequant_iq2_s,
        T::IQ3_XXS => grid::dequant_iq3_xxs,
        T::IQ3_S => grid::dequant_iq3_s,
        T::MXFP4 => lut::dequant_mxfp4,
        T::TQ1_0 => lut::dequant_tq1_0,
        T::TQ2_0 => lut::dequant_tq2_0,
        _ => return None,
    })
}

pub(crate) fn scalar_quant_kernel(ggml_type: GgmlType) -> Option<QuantKernel> {
    use GgmlType as T;
    Some(match ggml_type {
        T::F32 => float::quant_f32,
        T::F16 => float::quant_f16,
        T::BF16 => float::quant_bf16,
        T::F64 => float::quant_f64,
        T::Q4_0 => legacy::quant_q4_0,
        T::Q4_1 => legacy::quant_q4_1,
        T::Q5_0 => legacy::quant_q5_0,
        T::Q5_1 => legacy::quant_q5_1,
        T::Q8_0 => legacy::quant_q8_0,
        T::Q2_K => kquants::quant_q2_k,
        T::Q3_K => kquants::quant_q3_k,
        T::Q4_K => kquants::quant_q4_k,
        T::Q5_K => kquants::quant_q5_k,
        T::Q6_K => kquants::quant_q6_k,
        T::IQ4_NL => lut::quant_iq4_nl,
        T::IQ4_XS => lut::quant_iq4_xs,
        T::IQ3_XXS => iq3_quant::quant_iq3_xxs,
        T::IQ3_S => iq3_quant::quant_iq3_s,
        T::MXFP4 => lut::quant_mxfp4,
        T::TQ1_0 => lut::quant_tq1_0,
        T::TQ2_0 => lut::quant_tq2_0,
        T::IQ1_M => iq1_quant::quant_iq1_m,
        T::IQ2_S => iq2_quant::quant_iq2_s,
        _ => return None,
    })
}

/// Whether [`dequantize_range`] handles this type.
pub fn can_dequantize(ggml_type: GgmlType) -> bool {
    dequant_kernel(ggml_type).is_some()
}

/// Whether this type can be quantized to: by [`quantize_range`], or, for the types
/// ggml quantizes only with importance weights ([`needs_importance`]), by
/// [`quantize_weighted`] and the weighted transforms.
pub fn can_quantize(ggml_type: GgmlType) -> bool {
    quant_kernel(ggml_type).is_some() || weighted::row_kernel(ggml_type).is_some()
}

/// Whether ggml quantizes this type only with importance weights: its quantizer has no
/// unweighted form. Quantizing to it without weights fails with
/// [`Error::ImportanceRequired`].
pub fn needs_importance(ggml_type: GgmlType) -> bool {
    quant_kernel(ggml_type).is_none() && weighted::row_kernel(ggml_type).is_some()
}

/// The quantization kernel of a type, or the error that says why there is none.
fn plain_quant_kernel(ggml_type: GgmlType, operation: &'static str) -> Result<QuantKernel> {
    quant_kernel(ggml_type).ok_or(if needs_importance(ggml_type) {
        Error::ImportanceRequired { ggml_type }
    } else {
        Error::UnsupportedType {
            ggml_type,
            operation,
        }
    })
}

/// A checked element range of a tensor, with its byte range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) ggml_type: GgmlType,
    pub(crate) elements: Range<usize>,
    pub(crate) bytes: Range<usize>,
}

impl Span {
    pub(crate) fn len(&self) -> usize {
        self.elements.end - self.elements.start
    }

    pub(crate) fn first_block(&self) -> usize {
        self.elements.start / self.ggml_type.block_len() as usize
    }
}

/// Number of elements in a tensor of `ggml_type` whose data is `data_len` bytes long:
/// an error when the data is not a whole number of blocks.
pub fn element_count(ggml_type: GgmlType, data_len: usize) -> Result<u64> {
    let block_bytes = ggml_type.block_bytes();
    let len = data_len as u64;
    if !len.is_multiple_of(block_bytes) {
        return Err(Error::PartialBlock {
            ggml_type,
            len,
            block_bytes,
        });
    }
    Ok(len / block_bytes * ggml_type.block_len())
}

/// Checks that `range` is a block-aligned range of the elements of a tensor of
/// `ggml_type` held in `data_len` bytes, and finds its bytes.
pub(crate) fn check_range(
    ggml_type: GgmlType,
    data_len: usize,
    range: &Range<u64>,
) -> Result<Span> {
    let n_elements = element_count(ggml_type, data_len)?;
    let (start, end) = (range.start, range.end);
    if start > end || end > n_elements {
        return Err(Error::RangeOutOfBounds {
            ggml_type,
            start,
            end,
            n_elements,
        });
    }
    let block_len = ggml_type.block_len();
    if !start.is_multiple_of(block_len) || !end.is_multiple_of(block_len) {
        return Err(Error::UnalignedRange {
            ggml_type,
            start,
            end,
            block_len,
        });
    }
    let block_bytes = ggml_type.block_bytes();
    // Both ends are at most `n_elements`, whose bytes fit in `data_len`: no overflow.
    let byte = |element: u64| (element / block_len * block_bytes) as usize;
    Ok(Span {
        ggml_type,
        elements: start as usize..end as usize,
        bytes: byte(start)..byte(end),
    })
}

fn check_len(what: &'static str, span: &Span, found: usize) -> Result<()> {
    if found == span.len() {
        return Ok(());
    }
    Err(Error::LengthMismatch {
        what,
        expected: span.len() as u64,
        found: found as u64,
        start: span.elements.start as u64,
        end: span.elements.end as u64,
    })
}

/// Elements per parallel chunk for this type: [`CHUNK_ELEMENTS`] rounded up to blocks.
pub(crate) fn chunk_blocks(ggml_type: GgmlType) -> usize {
    (CHUNK_ELEMENTS as u64).div_ceil(ggml_type.block_len()) as usize
}

/// Dequantizes the elements `range` of a tensor of `ggml_type` whose bytes are `data`
/// into `out`, which must hold exactly `range.end - range.start` values.
///
/// Results are bit-identical to gguf-py's `gguf.quants.dequantize` (and so to ggml's
/// reference C code compiled without fused multiply-add).
pub fn dequantize_range(
    ggml_type: GgmlType,
    data: &[u8],
    range: Range<u64>,
    out: &mut [f32],
) -> Result<()> {
    let kernel = dequant_kernel(ggml_type).ok_or(Error::UnsupportedType {
        ggml_type,
        operation: "dequantize",
    })?;
    let span = check_range(ggml_type, data.len(), &range)?;
    check_len("output buffer", &span, out.len())?;
    run_dequant(kernel, ggml_type, &data[span.bytes], out);
    Ok(())
}

/// Dequantizes a whole tensor's bytes into a new vector.
pub fn dequantize(ggml_type: GgmlType, data: &[u8]) -> Result<Vec<f32>> {
    let n = element_count(ggml_type, data.len())?;
    let mut out = vec![0.0; n as usize];
    dequantize_range(ggml_type, data, 0..n, &mut out)?;
    Ok(out)
}

/// Runs a dequantization kernel over whole blocks, in parallel chunks when there is more
/// than one chunk.
fn run_dequant(kernel: DequantKernel, ggml_type: GgmlType, src: &[u8], dst: &mut [f32]) {
    let blocks = chunk_blocks(ggml_type);
    let src_chunk = blocks * ggml_type.block_bytes() as usize;
    let dst_chunk = blocks * ggml_type.block_len() as usize;
    if src.len() <= src_chunk {
        kernel(src, dst);
        return;
    }
    src.par_chunks(src_chunk)
        .zip(dst.par_chunks_mut(dst_chunk))
        .for_each(|(s, d)| kernel(s, d));
}

/// Quantizes `values` into the elements `range` of a tensor of `ggml_type` whose bytes
/// are `data`; `values` must hold exactly `range.end - range.start` values.
///
/// NaN and infinite values are refused with [`Error::NonFiniteInput`] (naming the first
/// one's element offset in the tensor), and a block whose scale would overflow its f16
/// field with [`Error::ScaleOverflow`]; in both cases nothing is written. The reference
/// quantizers would store NaN or infinite scales that poison every value of the block.
///
/// Bytes are identical to gguf-py's `gguf.quants.quantize` for the types it quantizes
/// (BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4, TQ1_0, TQ2_0), and to ggml's
/// `quantize_row_*_ref` (no importance matrix, built without fused multiply-add) for
/// Q2_K..Q6_K, IQ4_NL and IQ4_XS, and to ggml's `quantize_iq*` (no importance matrix)
/// for IQ1_M, IQ2_S, IQ3_XXS and IQ3_S. F16 rounds to nearest even, as numpy does.
pub fn quantize_range(
    ggml_type: GgmlType,
    values: &[f32],
    data: &mut [u8],
    range: Range<u64>,
) -> Result<()> {
    let span = check_range(ggml_type, data.len(), &range)?;
    check_len("input values", &span, values.len())?;
    let bytes = quantize_span(&span, values)?;
    data[span.bytes].copy_from_slice(&bytes);
    Ok(())
}

/// Quantizes a whole tensor's values into new bytes.
pub fn quantize(ggml_type: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    let block_len = ggml_type.block_len();
    let n = values.len() as u64;
    let n_bytes = ggml_type.bytes_for(n).ok_or(Error::UnalignedRange {
        ggml_type,
        start: 0,
        end: n,
        block_len,
    })?;
    let mut data = vec![0u8; n_bytes as usize];
    quantize_range(ggml_type, values, &mut data, 0..n)?;
    Ok(data)
}

/// Whether ggml's quantizer of this type uses importance weights (an importance
/// matrix) when given them: Q2_K..Q6_K, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL, IQ4_XS,
/// IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S. Every other type quantizes
/// the same with or without them.
pub fn uses_importance(ggml_type: GgmlType) -> bool {
    weighted::row_kernel(ggml_type).is_some()
}

/// Refuses importance weights that are negative or not finite, naming the first.
pub(crate) fn check_importance(weights: &[f32]) -> Result<()> {
    match weights.iter().position(|w| !w.is_finite() || *w < 0.0) {
        Some(i) => Err(Error::BadImportance {
            column: i as u64,
            value: weights[i],
        }),
        None => Ok(()),
    }
}

/// Quantizes rows of `n_per_row` values with one importance weight per column, as
/// ggml's `quantize_*` functions do with non-null `quant_weights` (and so
/// `llama-quantize --imatrix`), into new bytes. `weights` holds `n_per_row` values (one
/// expert's slice of an importance matrix, see [`crate::imatrix`]).
///
/// Types whose quantizer ignores importance weights ([`uses_importance`] is false)
/// quantize as [`quantize`] does. Rows must be whole blocks; values and weights must be
/// finite, and weights not negative. Errors as [`quantize`], nothing is written on error.
pub fn quantize_weighted(
    ggml_type: GgmlType,
    values: &[f32],
    n_per_row: usize,
    weights: &[f32],
) -> Result<Vec<u8>> {
    let block_len = ggml_type.block_len();
    let n = values.len() as u64;
    let unaligned = || Error::UnalignedRange {
        ggml_type,
        start: 0,
        end: n_per_row as u64,
        block_len,
    };
    if n_per_row == 0 || !(n_per_row as u64).is_multiple_of(block_len) {
        return Err(unaligned());
    }
    if !values.len().is_multiple_of(n_per_row) {
        return Err(Error::LengthMismatch {
            what: "input values (whole rows)",
            expected: n.div_ceil(n_per_row as u64) * n_per_row as u64,
            found: n,
            start: 0,
            end: n,
        });
    }
    if weights.len() != n_per_row {
        return Err(Error::LengthMismatch {
            what: "importance weights (one per column)",
            expected: n_per_row as u64,
            found: weights.len() as u64,
            start: 0,
            end: n_per_row as u64,
        });
    }
    check_importance(weights)?;
    let Some(kernel) = weighted::row_kernel(ggml_type) else {
        return quantize(ggml_type, values);
    };
    if let Some(i) = first_non_finite(values) {
        return Err(Error::NonFiniteInput {
            index: i as u64,
            value: values[i],
        });
    }
    let row_bytes = ggml_type
        .bytes_for(n_per_row as u64)
        .ok_or_else(unaligned)? as usize;
    let rows = values.len() / n_per_row;
    let mut bytes = vec![0u8; rows * row_bytes];
    let blocks_per_row = n_per_row / block_len as usize;
    // Whole rows per parallel item, about CHUNK_ELEMENTS values each.
    let rows_per_item = (CHUNK_ELEMENTS / n_per_row).max(1);
    let run =
        |item: usize, src: &[f32], dst: &mut [u8]| -> std::result::Result<(), BlockOverflow> {
            for (r, (x, d)) in src
                .chunks(n_per_row)
                .zip(dst.chunks_mut(row_bytes))
                .enumerate()
            {
                kernel(x, weights, d).map_err(|e| BlockOverflow {
                    block: (item * rows_per_item + r) * blocks_per_row + e.block,
                    value: e.value,
                })?;
            }
            Ok(())
        };
    let result = if rows <= rows_per_item {
        run(0, values, &mut bytes)
    } else {
        values
            .par_chunks(rows_per_item * n_per_row)
            .zip(bytes.par_chunks_mut(rows_per_item * row_bytes))
            .enumerate()
            .try_for_each(|(i, (s, d))| run(i, s, d))
    };
    result.map_err(|e| Error::ScaleOverflow {
        ggml_type,
        block: e.block as u64,
        value: e.value,
    })?;
    Ok(bytes)
}

/// The value of largest magnitude (the first one, on ties) and that magnitude: the
/// starting point of ggml's scale searches.
pub(crate) fn signed_abs_max(x: &[f32]) -> (f32, f32) {
    let (mut max, mut amax) = (0.0f32, 0.0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    (max, amax)
}

/// Whether any value is NaN or infinite (an exponent of all ones), written as a fold
/// over the bits so that the compiler vectorizes it for whatever the build allows.
#[inline(always)]
pub(crate) fn any_non_finite(values: &[f32]) -> bool {
    values.iter().fold(0u32, |acc, v| {
        acc | u32::from(v.to_bits() & 0x7f80_0000 == 0x7f80_0000)
    }) != 0
}

/// Index of the first value that is NaN or infinite.
pub(crate) fn first_non_finite(values: &[f32]) -> Option<usize> {
    // A test over whole chunks at the process's SIMD level; the exact index is then
    // found in the one chunk that failed.
    let any_non_finite = simd::any_non_finite_kernel(simd_level());
    let mut base = 0;
    for chunk in values.chunks(4096) {
        if any_non_finite(chunk) {
            return chunk.iter().position(|v| !v.is_finite()).map(|i| base + i);
        }
        base += chunk.len();
    }
    None
}

/// Quantizes the values of a checked span into new bytes, or fails before anything is
/// written anywhere.
pub(crate) fn quantize_span(span: &Span, values: &[f32]) -> Result<Vec<u8>> {
    let ggml_type = span.ggml_type;
    let kernel = plain_quant_kernel(ggml_type, "quantize")?;
    if let Some(i) = first_non_finite(values) {
        return Err(Error::NonFiniteInput {
            index: (span.elements.start + i) as u64,
            value: values[i],
        });
    }
    let mut bytes = vec![0u8; span.bytes.len()];
    let blocks = chunk_blocks(ggml_type);
    let src_chunk = blocks * ggml_type.block_len() as usize;
    let dst_chunk = blocks * ggml_type.block_bytes() as usize;
    let result = if values.len() <= src_chunk {
        kernel(values, &mut bytes)
    } else {
        values
            .par_chunks(src_chunk)
            .zip(bytes.par_chunks_mut(dst_chunk))
            .enumerate()
            .try_for_each(|(i, (s, d))| {
                kernel(s, d).map_err(|e| BlockOverflow {
                    block: i * blocks + e.block,
                    value: e.value,
                })
            })
    };
    result.map_err(|e| Error::ScaleOverflow {
        ggml_type,
        block: (span.first_block() + e.block) as u64,
        value: e.value,
    })?;
    Ok(bytes)
}

/// Reads the little-endian f16 at `bytes[at..at + 2]` as f32.
#[inline(always)]
pub(crate) fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16_to_f32(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

/// Converts f16 bits to f32, exactly.
///
/// Written out rather than calling `half` because it is on the hot path of every block
/// and inlines to a few instructions with no CPU-feature check. Normal and subnormal
/// values alike are the f16 bits moved into an f32's place and multiplied by 2^112;
/// infinities keep an all-ones exponent, and NaNs are made quiet as F16C and `half` do.
#[inline(always)]
pub(crate) fn f16_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits & 0x8000) << 16;
    let magnitude = u32::from(bits & 0x7fff) << 13;
    let value = if bits & 0x7c00 == 0x7c00 {
        let quiet = if magnitude & 0x007f_e000 != 0 {
            0x0040_0000
        } else {
            0
        };
        magnitude | 0x7f80_0000 | quiet
    } else {
        // 0x7780_0000 is 2^112 as an f32.
        (f32::from_bits(magnitude) * f32::from_bits(0x7780_0000)).to_bits()
    };
    f32::from_bits(value | sign)
}

/// Rounds `value` to f16 (round to nearest even, as numpy and ggml do) and returns its
/// bits, or `None` when the result is not finite: the value overflows f16, or a scale
/// search on extreme (but finite) inputs produced an infinite or NaN scale.
#[inline]
pub(crate) fn f16_bits(value: f32) -> Option<u16> {
    let h = half::f16::from_f32(value);
    h.is_finite().then(|| h.to_bits())
}
