//! Value transforms on a block-aligned range of a tensor, in place.
//!
//! Three paths, chosen per type and transform, reported in [`TransformReport::path`]:
//!
//! - [`TransformPath::Scales`]: scaling a block type multiplies its f16 scale fields (d;
//!   d and m for Q4_1 / Q5_1; d and dmin for the K-quants; the super-block d of the grid
//!   IQ types, which IQ1_M spreads over four nibbles) and leaves its codes alone, so
//!   no requantization error is added. Each new scale is rounded once to f16: in the
//!   normal f16 range its relative error is at most 2^-11 (half an ulp), so an element
//!   `x = d * q` (or `x = d * q + m`, `d * q - dmin * m`) ends within
//!   `2^-11 * (|s * d * q| + |s * m|)` of `s * x`; a scale that lands in the subnormal
//!   range is off by at most 2^-25 absolute. A scale that would overflow f16 is refused
//!   with [`Error::ScaleOverflow`]. Zeroing writes zero bytes, which every block type
//!   decodes as zeros (possibly -0.0).
//! - [`TransformPath::Elementwise`]: the plain types (F32, F64, F16, BF16) are decoded,
//!   transformed and rounded back one element at a time; F32 and F64 are exact, F16 and
//!   BF16 add one rounding (round to nearest even).
//! - [`TransformPath::Requantized`]: anything else dequantizes each chunk, applies the
//!   transform, and quantizes it again with the reference quantizer.
//!
//! In every path the report gives the error of the result against the intended values
//! (the transform applied to the exact dequantized old values), and nothing is written
//! unless every chunk succeeded.

use std::fmt;
use std::ops::Range;

use rayon::prelude::*;

use super::scan::{ScaleFields, scale_fields};
use super::{
    Span, check_len, check_range, chunk_blocks, dequant_kernel, f16_bits, first_non_finite,
    plain_quant_kernel,
};
use crate::error::{Error, Result};
use crate::types::GgmlType;

/// A change to a tensor's values.
#[derive(Clone, Copy)]
#[non_exhaustive]
pub enum Transform<'a> {
    /// Multiply every value by a finite factor.
    Scale(f32),
    /// Add a finite constant to every value.
    Offset(f32),
    /// Clamp every value into `min..=max`.
    Clamp {
        /// Lower bound.
        min: f32,
        /// Upper bound (at least `min`).
        max: f32,
    },
    /// Set every value to zero.
    Zero,
    /// Replace the values by these, one per element of the range.
    Set(&'a [f32]),
    /// Replace every value `x` by `f(x)`; a non-finite result is refused.
    Map(&'a (dyn Fn(f32) -> f32 + Sync)),
}

impl fmt::Debug for Transform<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transform::Scale(s) => write!(f, "Scale({s})"),
            Transform::Offset(o) => write!(f, "Offset({o})"),
            Transform::Clamp { min, max } => write!(f, "Clamp {{ min: {min}, max: {max} }}"),
            Transform::Zero => f.write_str("Zero"),
            Transform::Set(values) => write!(f, "Set([{} values])", values.len()),
            Transform::Map(_) => f.write_str("Map(..)"),
        }
    }
}

/// How a transform was carried out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TransformPath {
    /// Only the block scale fields changed (or the blocks were zeroed): the codes are
    /// untouched.
    Scales,
    /// A plain float type, rounded back element by element.
    Elementwise,
    /// Dequantized, transformed and quantized again.
    Requantized,
}

/// The outcome of [`transform_range`].
#[derive(Clone, Debug, PartialEq)]
pub struct TransformReport {
    /// The path taken.
    pub path: TransformPath,
    /// Elements transformed.
    pub n_elements: u64,
    /// Root mean square of (stored value - intended value) over the range.
    pub rms_error: f64,
    /// Largest |stored value - intended value| over the range.
    pub max_abs_error: f64,
}

impl TransformReport {
    /// Whether the work was done without requantizing (scale fields or element-wise).
    pub fn quantized_domain(&self) -> bool {
        self.path != TransformPath::Requantized
    }
}

/// Running sums of [`ErrorSums::add`].
const LANES: usize = 8;

/// Error sums of one chunk.
#[derive(Clone, Copy, Debug, Default)]
struct ErrorSums {
    sum_sq: f64,
    max_abs: f64,
}

impl ErrorSums {
    fn add(&mut self, stored: &[f32], intended: &[f32]) {
        // Eight running sums, one per element index modulo 8, added together in a fixed
        // order at the end: the compiler vectorizes them (one sum would be a chain of
        // dependent f64 adds, the transform's slowest part), and the result is the same
        // at every SIMD level.
        let mut sum_sq = [0f64; LANES];
        let mut max_abs = [0f64; LANES];
        let mut lane = |k: usize, s: f32, i: f32| {
            let e = (f64::from(s) - f64::from(i)).abs();
            sum_sq[k] += e * e;
            max_abs[k] = if e > max_abs[k] { e } else { max_abs[k] };
        };
        let (stored_chunks, stored_rest) = stored.as_chunks::<LANES>();
        let (intended_chunks, intended_rest) = intended.as_chunks::<LANES>();
        for (s, i) in stored_chunks.iter().zip(intended_chunks) {
            for k in 0..LANES {
                lane(k, s[k], i[k]);
            }
        }
        for (k, (s, i)) in stored_rest.iter().zip(intended_rest).enumerate() {
            lane(k, *s, *i);
        }
        for k in 0..LANES {
            self.sum_sq += sum_sq[k];
            if max_abs[k] > self.max_abs {
                self.max_abs = max_abs[k];
            }
        }
    }

    fn merge(self, other: ErrorSums) -> ErrorSums {
        ErrorSums {
            sum_sq: self.sum_sq + other.sum_sq,
            max_abs: self.max_abs.max(other.max_abs),
        }
    }
}

/// How many transforms [`transform_range`] has been called for on this thread: a
/// diagnostic counter, so that callers can show they plan each transform once.
pub fn transforms_run() -> u64 {
    TRANSFORMS_RUN.with(std::cell::Cell::get)
}

thread_local! {
    static TRANSFORMS_RUN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Applies `transform` to the elements `range` of a tensor of `ggml_type` whose bytes are
/// `data`, in place, and reports the path taken and the error against the intended
/// values. On error nothing is written.
///
/// The element-wise and requantizing paths refuse with [`Error::NonFiniteInput`] when
/// any intended value is NaN or infinite: a `Map` that returns NaN, an F32 value scaled
/// past `f32::MAX`, or a value that was already NaN or infinite before the transform
/// (repair those with `Set` or `Zero`, which do not read the old values' finiteness
/// into the result). The scale-field path multiplies non-finite scales like any other.
pub fn transform_range(
    ggml_type: GgmlType,
    data: &mut [u8],
    range: Range<u64>,
    transform: &Transform<'_>,
) -> Result<TransformReport> {
    transform_range_weighted(ggml_type, data, range, transform, None)
}

/// Importance weights for a transform that requantizes, applied as ggml's quantizers
/// apply `quant_weights` (and so `llama-quantize --imatrix`): one weight per column of
/// the tensor's rows, one set per expert for a 3-D tensor (an importance matrix's entry,
/// see [`crate::imatrix::ImportanceMatrix::weights_for`]).
#[derive(Clone, Copy, Debug)]
pub struct Importance<'a> {
    weights: &'a [f32],
    n_per_row: usize,
    rows_per_expert: usize,
    first_element: usize,
}

impl<'a> Importance<'a> {
    /// The weights of a tensor of type `ggml_type` and shape `dims` (`ne0 * ne2` of
    /// them), for data whose first element is element `first_element` of the tensor.
    /// An error when their number does not fit the shape, a row is not whole blocks, or
    /// a weight is negative or not finite.
    pub fn new(
        ggml_type: GgmlType,
        weights: &'a [f32],
        dims: &[u64],
        first_element: u64,
    ) -> Result<Importance<'a>> {
        let ne0 = dims.first().copied().unwrap_or(1);
        let ne1 = dims.get(1).copied().unwrap_or(1);
        let ne2 = dims.get(2).copied().unwrap_or(1);
        let block_len = ggml_type.block_len();
        if dims.len() > 3 || ne0 == 0 || ne1 == 0 || !ne0.is_multiple_of(block_len) {
            return Err(Error::UnalignedRange {
                ggml_type,
                start: 0,
                end: ne0,
                block_len,
            });
        }
        let expected = ne0.checked_mul(ne2);
        if expected != Some(weights.len() as u64) {
            return Err(Error::LengthMismatch {
                what: "importance weights (one per column, per expert)",
                expected: expected.unwrap_or(u64::MAX),
                found: weights.len() as u64,
                start: 0,
                end: weights.len() as u64,
            });
        }
        super::check_importance(weights)?;
        // ne0 * ne2 weights are in memory, so ne0 fits a usize; ne1 and the first
        // element are bounded by the tensor the caller holds.
        Ok(Importance {
            weights,
            n_per_row: ne0 as usize,
            rows_per_expert: usize::try_from(ne1).unwrap_or(usize::MAX),
            first_element: usize::try_from(first_element).unwrap_or(usize::MAX),
        })
    }

    /// The weights of the `len` elements from tensor element `element` on (inside one
    /// row).
    fn slice(&self, element: usize, len: usize) -> &'a [f32] {
        let row = element / self.n_per_row;
        let column = element % self.n_per_row;
        let start = row / self.rows_per_expert % (self.weights.len() / self.n_per_row)
            * self.n_per_row
            + column;
        &self.weights[start..start + len]
    }
}

/// [`transform_range`] with importance weights for the requantization, when the
/// transform requantizes and the type's quantizer takes weights
/// ([`super::uses_importance`]); transforms that work on block scales or values alone
/// ignore them. Q4_0, Q4_1, Q5_0 and Q5_1 weigh each value by its row's mean square, so
/// with weights their range must cover whole rows (else
/// [`Error::InvalidTransform`]).
pub fn transform_range_weighted(
    ggml_type: GgmlType,
    data: &mut [u8],
    range: Range<u64>,
    transform: &Transform<'_>,
    importance: Option<&Importance<'_>>,
) -> Result<TransformReport> {
    TRANSFORMS_RUN.with(|n| n.set(n.get() + 1));
    let span = check_range(ggml_type, data.len(), &range)?;
    check_transform(&span, transform)?;
    let dequant = dequant_kernel(ggml_type).ok_or(Error::UnsupportedType {
        ggml_type,
        operation: "transform",
    })?;
    let old = &data[span.bytes.clone()];
    let fields = scale_fields(ggml_type);
    let plain = matches!(
        ggml_type,
        GgmlType::F32 | GgmlType::F64 | GgmlType::F16 | GgmlType::BF16
    );
    let (path, new) = match transform {
        Transform::Zero if !plain => (TransformPath::Scales, vec![0u8; old.len()]),
        Transform::Scale(factor) if !plain && !fields.is_empty() => (
            TransformPath::Scales,
            scale_fields_of(&span, old, fields, *factor)?,
        ),
        _ => {
            let weighted =
                importance.and_then(|imp| Some((imp, super::weighted::row_kernel(ggml_type)?)));
            if weighted.is_none() {
                plain_quant_kernel(ggml_type, "transform (requantize)")?;
            }
            let path = if plain {
                TransformPath::Elementwise
            } else {
                TransformPath::Requantized
            };
            let new = match weighted {
                Some((imp, kernel)) => requantize_weighted(&span, old, transform, imp, kernel)?,
                None => requantize(&span, old, transform)?,
            };
            (path, new)
        }
    };
    let sums = measure(&span, dequant, old, &new, transform);
    data[span.bytes.clone()].copy_from_slice(&new);
    let n = span.len() as u64;
    Ok(TransformReport {
        path,
        n_elements: n,
        rms_error: if n == 0 {
            0.0
        } else {
            (sums.sum_sq / n as f64).sqrt()
        },
        max_abs_error: sums.max_abs,
    })
}

fn check_transform(span: &Span, transform: &Transform<'_>) -> Result<()> {
    let invalid = |reason| Error::InvalidTransform {
        ggml_type: span.ggml_type,
        reason,
    };
    match *transform {
        Transform::Scale(s) if !s.is_finite() => Err(invalid("scale factor is not finite")),
        Transform::Offset(o) if !o.is_finite() => Err(invalid("offset is not finite")),
        Transform::Clamp { min, max } if !(min.is_finite() && max.is_finite()) => {
            Err(invalid("clamp bounds are not finite"))
        }
        Transform::Clamp { min, max } if min > max => Err(invalid("clamp minimum exceeds maximum")),
        Transform::Set(values) => check_len("values to set", span, values.len()),
        _ => Ok(()),
    }
}

/// The intended value of the element at `index` in the range, whose old value is `x`.
#[inline]
fn intended(transform: &Transform<'_>, index: usize, x: f32) -> f32 {
    match *transform {
        Transform::Scale(s) => x * s,
        Transform::Offset(o) => x + o,
        Transform::Clamp { min, max } => x.max(min).min(max),
        Transform::Zero => 0.0,
        Transform::Set(values) => values.get(index).copied().unwrap_or(f32::NAN),
        Transform::Map(f) => f(x),
    }
}

/// New bytes for a scale transform done on the f16 scale fields alone.
fn scale_fields_of(span: &Span, old: &[u8], fields: ScaleFields, factor: f32) -> Result<Vec<u8>> {
    let ggml_type = span.ggml_type;
    let block_bytes = ggml_type.block_bytes() as usize;
    let mut new = old.to_vec();
    for (b, block) in new.chunks_exact_mut(block_bytes).enumerate() {
        for field in 0..fields.len() {
            let old_scale = super::f16_to_f32(fields.get(block, field));
            let scaled = old_scale * factor;
            // A NaN or infinite scale stays what it was times the factor; only a finite
            // scale that overflows is refused.
            let bits = if old_scale.is_finite() {
                f16_bits(scaled).ok_or(Error::ScaleOverflow {
                    ggml_type,
                    block: (span.first_block() + b) as u64,
                    value: scaled,
                })?
            } else {
                half::f16::from_f32(scaled).to_bits()
            };
            fields.set(block, field, bits);
        }
    }
    Ok(new)
}

/// New bytes for a transform done by dequantizing, transforming and quantizing again.
fn requantize(span: &Span, old: &[u8], transform: &Transform<'_>) -> Result<Vec<u8>> {
    let ggml_type = span.ggml_type;
    let dequant = dequant_kernel(ggml_type).ok_or(Error::UnsupportedType {
        ggml_type,
        operation: "dequantize",
    })?;
    let quant = plain_quant_kernel(ggml_type, "quantize")?;
    let blocks = chunk_blocks(ggml_type);
    let block_len = ggml_type.block_len() as usize;
    let block_bytes = ggml_type.block_bytes() as usize;
    let src_chunk = blocks * block_bytes;
    let mut new = vec![0u8; old.len()];
    let results: Vec<Result<()>> = old
        .par_chunks(src_chunk)
        .zip(new.par_chunks_mut(src_chunk))
        .enumerate()
        .map(|(c, (src, dst))| {
            let first = c * blocks * block_len;
            let len = dst.len() / block_bytes * block_len;
            let values = intended_values(span, dequant, src, first, len, transform)?;
            quant(&values, dst).map_err(|e| Error::ScaleOverflow {
                ggml_type,
                block: (span.first_block() + c * blocks + e.block) as u64,
                value: e.value,
            })
        })
        .collect();
    for r in results {
        r?;
    }
    Ok(new)
}

/// The intended values of the `len` elements from `first` on (relative to the span)
/// whose blocks are `src`: decoded and transformed; an error naming the first that is not
/// finite.
fn intended_values(
    span: &Span,
    dequant: super::DequantKernel,
    src: &[u8],
    first: usize,
    len: usize,
    transform: &Transform<'_>,
) -> Result<Vec<f32>> {
    let mut values = vec![0f32; len];
    dequant(src, &mut values);
    for (i, v) in values.iter_mut().enumerate() {
        *v = intended(transform, first + i, *v);
    }
    match first_non_finite(&values) {
        Some(i) => Err(Error::NonFiniteInput {
            index: (span.elements.start + first + i) as u64,
            value: values[i],
        }),
        None => Ok(values),
    }
}

/// [`requantize`] with importance weights: the range is cut at the tensor's row ends
/// (a weighted quantizer reads one row's weights), and each piece is quantized by the
/// type's weighted row kernel, pieces in parallel.
fn requantize_weighted(
    span: &Span,
    old: &[u8],
    transform: &Transform<'_>,
    importance: &Importance<'_>,
    kernel: super::weighted::RowKernel,
) -> Result<Vec<u8>> {
    let ggml_type = span.ggml_type;
    let dequant = dequant_kernel(ggml_type).ok_or(Error::UnsupportedType {
        ggml_type,
        operation: "dequantize",
    })?;
    let block_len = ggml_type.block_len() as usize;
    let block_bytes = ggml_type.block_bytes() as usize;
    let whole_rows = matches!(
        ggml_type,
        GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1
    );
    // Pieces: (first element in the range, length), none crossing a row's end.
    let n_per_row = importance.n_per_row;
    let mut pieces = Vec::new();
    let mut at = 0usize;
    while at < span.len() {
        let element = importance.first_element + span.elements.start + at;
        let column = element % n_per_row;
        let len = (n_per_row - column).min(span.len() - at);
        if whole_rows && (column != 0 || len != n_per_row) {
            return Err(Error::InvalidTransform {
                ggml_type,
                reason: "importance weights for this type need whole rows (its quantizer \
                         weighs each value by the mean square of its row)",
            });
        }
        pieces.push((at, len));
        at += len;
    }
    let mut new = vec![0u8; old.len()];
    let mut outputs: Vec<&mut [u8]> = Vec::with_capacity(pieces.len());
    let mut rest = new.as_mut_slice();
    for &(_, len) in &pieces {
        let (piece, tail) = rest.split_at_mut(len / block_len * block_bytes);
        outputs.push(piece);
        rest = tail;
    }
    let results: Vec<Result<()>> = pieces
        .par_iter()
        .zip(outputs.into_par_iter())
        .map(|(&(first, len), dst)| {
            let src_start = first / block_len * block_bytes;
            let src = &old[src_start..src_start + dst.len()];
            let values = intended_values(span, dequant, src, first, len, transform)?;
            let element = importance.first_element + span.elements.start + first;
            kernel(&values, importance.slice(element, len), dst).map_err(|e| Error::ScaleOverflow {
                ggml_type,
                block: (span.first_block() + first / block_len + e.block) as u64,
                value: e.value,
            })
        })
        .collect();
    for r in results {
        r?;
    }
    Ok(new)
}

/// Error of the new bytes against the intended values, chunk by chunk.
fn measure(
    span: &Span,
    dequant: super::DequantKernel,
    old: &[u8],
    new: &[u8],
    transform: &Transform<'_>,
) -> ErrorSums {
    let ggml_type = span.ggml_type;
    let blocks = chunk_blocks(ggml_type);
    let block_len = ggml_type.block_len() as usize;
    let block_bytes = ggml_type.block_bytes() as usize;
    let chunk = blocks * block_bytes;
    old.par_chunks(chunk)
        .zip(new.par_chunks(chunk))
        .enumerate()
        .map(|(c, (o, n))| {
            let len = o.len() / block_bytes * block_len;
            let first = c * blocks * block_len;
            let mut want = vec![0f32; len];
            let mut got = vec![0f32; len];
            dequant(o, &mut want);
            for (i, v) in want.iter_mut().enumerate() {
                *v = intended(transform, first + i, *v);
            }
            dequant(n, &mut got);
            let mut sums = ErrorSums::default();
            sums.add(&got, &want);
            sums
        })
        .reduce(ErrorSums::default, ErrorSums::merge)
}
