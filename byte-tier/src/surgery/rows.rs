//! Row-by-row rewrites of one tensor through the codecs: dequantize a chunk of rows,
//! change the values, quantize them back to the tensor's own type, and measure what the
//! requantization lost. A whole tensor is never held dequantized.

use serde::Serialize;

use crate::codec;
use crate::error::{Error, Result};
use crate::gguf::{Gguf, TensorInfo};

/// Elements dequantized at a time (rounded to whole rows).
const CHUNK_ELEMENTS: u64 = 1 << 20;

/// The new bytes of a tensor and what requantizing them cost.
#[derive(Clone, Debug, PartialEq)]
pub struct RewrittenTensor {
    /// The tensor.
    pub name: String,
    /// Its new data, of its own type and byte count.
    pub bytes: Vec<u8>,
    /// How far the stored values are from the intended ones.
    pub requantization: RequantizationError,
}

/// The distance between the values a rewrite meant to store and the values its bytes
/// hold once quantized to the tensor's type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct RequantizationError {
    /// Root mean square of the difference.
    pub rms: f64,
    /// Largest absolute difference.
    pub max_abs: f64,
    /// Root mean square of the intended values (a scale for `rms`).
    pub rms_intended: f64,
}

/// Sees a chunk of a rewrite: its first row, the values meant and the values stored.
pub(crate) type Observer<'o> = dyn FnMut(u64, &[f32], &[f32]) + 'o;

/// Whether a tensor of this type can be dequantized and quantized back.
pub fn can_rewrite(ggml_type: crate::GgmlType) -> bool {
    codec::can_dequantize(ggml_type) && codec::can_quantize(ggml_type)
}

/// The row length (ne0) and row count of a tensor.
pub(crate) fn rows(info: &TensorInfo) -> (u64, u64) {
    let row_len = info.dims.first().copied().unwrap_or(1).max(1);
    (row_len, info.n_elements / row_len)
}

/// Calls `visit(first_row, values)` for consecutive chunks of whole rows of the tensor's
/// dequantized values.
pub(crate) fn for_each_rows(
    gguf: &Gguf<'_>,
    info: &TensorInfo,
    visit: &mut dyn FnMut(u64, &[f32]) -> Result<()>,
) -> Result<()> {
    let data = gguf.tensor_data(info);
    let (row_len, n_rows) = rows(info);
    let rows_per_chunk = (CHUNK_ELEMENTS / row_len).max(1);
    let mut values = Vec::new();
    let mut row = 0;
    while row < n_rows {
        let end = (row + rows_per_chunk).min(n_rows);
        values.resize(((end - row) * row_len) as usize, 0.0);
        codec::dequantize_range(
            info.ggml_type,
            data,
            row * row_len..end * row_len,
            &mut values,
        )
        .map_err(|e| e.in_tensor(&info.name))?;
        visit(row, &values)?;
        row = end;
    }
    Ok(())
}

/// Quantizes the rows `first_row..` of a tensor (values of whole rows) with importance
/// weights, `row_len` per expert, expert by expert (each `rows_per_expert` rows).
fn quantize_rows_weighted(
    info: &TensorInfo,
    values: &[f32],
    first_row: u64,
    weights: &[f32],
) -> Result<Vec<u8>> {
    let (row_len, _) = rows(info);
    let rows_per_expert = info.dims.get(1).copied().unwrap_or(1).max(1);
    let n_rows = values.len() as u64 / row_len;
    let mut out = Vec::new();
    let mut row = first_row;
    while row < first_row + n_rows {
        let expert = row / rows_per_expert;
        let end = ((expert + 1) * rows_per_expert).min(first_row + n_rows);
        let at = ((row - first_row) * row_len) as usize;
        let len = ((end - row) * row_len) as usize;
        let w = (expert * row_len) as usize;
        out.extend(codec::quantize_weighted(
            info.ggml_type,
            &values[at..at + len],
            row_len as usize,
            &weights[w..w + row_len as usize],
        )?);
        row = end;
    }
    Ok(out)
}

/// Rewrites a tensor chunk by chunk: `edit(first_row, values)` changes the dequantized
/// values of whole rows in place, the result is quantized to the tensor's own type (with
/// `weights`, an importance matrix's entry for the tensor, when given), and
/// `observe(first_row, intended, stored)` sees both the values meant and the values the
/// new bytes hold. Nothing is written anywhere: the new bytes are returned.
pub(crate) fn rewrite_rows(
    gguf: &Gguf<'_>,
    info: &TensorInfo,
    edit: &mut dyn FnMut(u64, &mut [f32]) -> Result<()>,
    observe: &mut Observer<'_>,
    weights: Option<&[f32]>,
) -> Result<RewrittenTensor> {
    if !can_rewrite(info.ggml_type) {
        return Err(Error::UnsupportedType {
            ggml_type: info.ggml_type,
            operation: "requantize",
        }
        .in_tensor(&info.name));
    }
    let data = gguf.tensor_data(info);
    let (row_len, n_rows) = rows(info);
    let rows_per_chunk = (CHUNK_ELEMENTS / row_len).max(1);
    let mut bytes = Vec::with_capacity(data.len());
    let (mut sum_sq, mut max_abs, mut sum_sq_intended) = (0f64, 0f64, 0f64);
    let mut values = Vec::new();
    let mut stored = Vec::new();
    let mut row = 0;
    while row < n_rows {
        let end = (row + rows_per_chunk).min(n_rows);
        let n = ((end - row) * row_len) as usize;
        values.resize(n, 0.0);
        stored.resize(n, 0.0);
        let mut run = |values: &mut Vec<f32>, stored: &mut Vec<f32>| -> Result<Vec<u8>> {
            codec::dequantize_range(info.ggml_type, data, row * row_len..end * row_len, values)?;
            edit(row, values)?;
            let chunk = match weights {
                None => codec::quantize(info.ggml_type, values)?,
                Some(w) => quantize_rows_weighted(info, values, row, w)?,
            };
            codec::dequantize_range(info.ggml_type, &chunk, 0..n as u64, stored)?;
            Ok(chunk)
        };
        let chunk = run(&mut values, &mut stored).map_err(|e| e.in_tensor(&info.name))?;
        for (&want, &got) in values.iter().zip(&stored) {
            let d = f64::from(want) - f64::from(got);
            sum_sq += d * d;
            max_abs = max_abs.max(d.abs());
            sum_sq_intended += f64::from(want) * f64::from(want);
        }
        observe(row, &values, &stored);
        bytes.extend_from_slice(&chunk);
        row = end;
    }
    let count = info.n_elements.max(1) as f64;
    Ok(RewrittenTensor {
        name: info.name.clone(),
        bytes,
        requantization: RequantizationError {
            rms: (sum_sq / count).sqrt(),
            max_abs,
            rms_intended: (sum_sq_intended / count).sqrt(),
        },
    })
}
