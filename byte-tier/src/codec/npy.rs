//! numpy's `.npy` format, for moving a tensor's values out to numpy and back in.
//!
//! Writing produces format version 1.0 with a little-endian float32 (`<f4`) C-order
//! array. GGUF dimensions run fastest first (ne0 first) while numpy's shapes run slowest
//! first, so a tensor with dims `[ne0, ne1]` becomes a numpy array of shape `(ne1, ne0)`:
//! [`npy_shape`] does that reversal. Reading accepts versions 1.0, 2.0 and 3.0, C order,
//! float16, float32 and float64 in either byte order, and converts to f32 (float64 is
//! rounded to nearest even, as numpy's `astype(float32)` does). The header length and
//! the element count are checked against the bytes present before anything is
//! allocated.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::error::{Error, Result};

const MAGIC: &[u8; 6] = b"\x93NUMPY";

/// Largest header a reader accepts: numpy itself refuses headers over 10,000 bytes by
/// default; a little more room costs nothing.
const MAX_HEADER_LEN: usize = 64 * 1024;

/// An array read from a `.npy` file, as f32 values in C order.
#[derive(Clone, Debug, PartialEq)]
pub struct NpyArray {
    /// The shape, slowest-moving axis first (numpy's order).
    pub shape: Vec<u64>,
    /// The values, converted to f32.
    pub values: Vec<f32>,
}

impl NpyArray {
    /// The shape as GGUF dimensions (fastest-moving first): the numpy shape reversed.
    pub fn gguf_dims(&self) -> Vec<u64> {
        self.shape.iter().rev().copied().collect()
    }
}

/// The numpy shape of a tensor with GGUF dimensions `dims` (ne0 first): `dims`
/// reversed, so that ne0 is the last, fastest-moving axis.
pub fn npy_shape(dims: &[u64]) -> Vec<u64> {
    dims.iter().rev().copied().collect()
}

fn npy_error(path: &Path, reason: impl Into<String>) -> Error {
    Error::Npy {
        path: path.to_owned(),
        reason: reason.into(),
    }
}

/// The version 1.0 header of a little-endian float32 C-order array of `shape`, or
/// `None` when the shape is too long for a version 1.0 header.
fn header(shape: &[u64]) -> Option<Vec<u8>> {
    let dims: Vec<String> = shape.iter().map(u64::to_string).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // Magic (6) + version (2) + length (2) + dict + padding + newline is a multiple of
    // 64, as numpy writes it, so the data that follows is aligned.
    let unpadded = 10 + dict.len() + 1;
    dict.extend(std::iter::repeat_n(
        ' ',
        unpadded.next_multiple_of(64) - unpadded,
    ));
    dict.push('\n');
    let mut out = Vec::with_capacity(10 + dict.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&u16::try_from(dict.len()).ok()?.to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    Some(out)
}

/// Writes `values` as a float32 `.npy` array of numpy shape `shape` to `out`.
///
/// `values` must hold exactly the product of `shape`; `path` only names the destination
/// in errors.
pub fn write_npy_f32(
    out: &mut dyn Write,
    path: &Path,
    shape: &[u64],
    values: &[f32],
) -> Result<()> {
    let count = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| npy_error(path, format!("shape {shape:?} overflows")))?;
    if count != values.len() as u64 {
        return Err(npy_error(
            path,
            format!(
                "shape {shape:?} needs {count} values, {} given",
                values.len()
            ),
        ));
    }
    let io = |e| Error::io("write", path, e);
    let header = header(shape).ok_or_else(|| {
        npy_error(
            path,
            format!(
                "a shape of {} dimensions does not fit the header",
                shape.len()
            ),
        )
    })?;
    out.write_all(&header).map_err(io)?;
    let mut buffer = Vec::with_capacity(64 * 1024);
    for chunk in values.chunks(16 * 1024) {
        buffer.clear();
        buffer.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
        out.write_all(&buffer).map_err(io)?;
    }
    Ok(())
}

/// The header of a `.npy` file of little-endian float32 values of numpy `shape`: the
/// data follows it, `4 * product(shape)` bytes.
pub fn npy_f32_header(path: &Path, shape: &[u64]) -> Result<Vec<u8>> {
    header(shape).ok_or_else(|| {
        npy_error(
            path,
            format!(
                "a shape of {} dimensions does not fit the header",
                shape.len()
            ),
        )
    })
}

/// Writes the values of a tensor with GGUF dimensions `dims` to a new `.npy` file at
/// `path` (numpy shape = `dims` reversed).
pub fn write_tensor_npy(path: &Path, dims: &[u64], values: &[f32]) -> Result<()> {
    let file = File::create(path).map_err(|e| Error::io("create", path, e))?;
    let mut out = BufWriter::new(file);
    write_npy_f32(&mut out, path, &npy_shape(dims), values)?;
    out.flush().map_err(|e| Error::io("write", path, e))?;
    out.into_inner()
        .map_err(|e| Error::io("write", path, e.into_error()))?
        .sync_all()
        .map_err(|e| Error::io("sync", path, e))
}

/// The bytes of the `.npy` file [`write_tensor_npy`] writes, in memory.
pub fn tensor_npy_bytes(dims: &[u64], values: &[f32]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(128 + values.len() * 4);
    write_npy_f32(&mut out, Path::new("<memory>"), &npy_shape(dims), values)?;
    Ok(out)
}

/// Reads a `.npy` file into f32 values and its shape.
pub fn read_npy_file(path: &Path) -> Result<NpyArray> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
    parse_npy(&bytes, path)
}

/// Parses the bytes of a `.npy` file; `path` only names the source in errors.
pub fn parse_npy(bytes: &[u8], path: &Path) -> Result<NpyArray> {
    let fail = |reason: &str| npy_error(path, reason);
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(fail("not a .npy file (bad magic)"));
    }
    let (header_len, header_start) = match bytes[6] {
        1 => (usize::from(u16::from_le_bytes([bytes[8], bytes[9]])), 10),
        2 | 3 => {
            let len = bytes
                .get(8..12)
                .ok_or_else(|| fail("truncated header length"))?;
            (
                u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize,
                12,
            )
        }
        v => return Err(npy_error(path, format!("unsupported .npy version {v}"))),
    };
    if header_len > MAX_HEADER_LEN {
        return Err(npy_error(
            path,
            format!("header of {header_len} bytes is too long"),
        ));
    }
    let header_end = header_start + header_len;
    let header = bytes
        .get(header_start..header_end)
        .ok_or_else(|| fail("truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| fail("header is not UTF-8"))?;
    let descr = dict_value(header, "descr").ok_or_else(|| fail("header has no 'descr'"))?;
    let fortran =
        dict_value(header, "fortran_order").ok_or_else(|| fail("header has no 'fortran_order'"))?;
    let shape_text = dict_value(header, "shape").ok_or_else(|| fail("header has no 'shape'"))?;
    if fortran.trim() != "False" {
        return Err(fail(
            "Fortran-order arrays are not supported; save with C order",
        ));
    }
    let descr = descr.trim().trim_matches(|c| c == '\'' || c == '"');
    let (width, little) = match descr {
        "<f2" => (2, true),
        ">f2" => (2, false),
        "<f4" => (4, true),
        ">f4" => (4, false),
        "<f8" => (8, true),
        ">f8" => (8, false),
        other => {
            return Err(npy_error(
                path,
                format!("dtype {other:?} is not float16, float32 or float64"),
            ));
        }
    };
    let shape = parse_shape(shape_text).ok_or_else(|| fail("malformed shape"))?;
    let data = &bytes[header_end..];
    let count = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&n| n.checked_mul(width as u64) == Some(data.len() as u64))
        .ok_or_else(|| {
            npy_error(
                path,
                format!(
                    "shape {shape:?} of {width}-byte values does not match the {} data bytes",
                    data.len()
                ),
            )
        })?;
    let mut values = Vec::with_capacity(count as usize);
    match width {
        2 => values.extend(data.chunks_exact(2).map(|c| {
            let bits = if little {
                u16::from_le_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], c[1]])
            };
            half::f16::from_bits(bits).to_f32()
        })),
        4 => values.extend(data.chunks_exact(4).map(|c| {
            let b = [c[0], c[1], c[2], c[3]];
            if little {
                f32::from_le_bytes(b)
            } else {
                f32::from_be_bytes(b)
            }
        })),
        _ => values.extend(data.chunks_exact(8).map(|c| {
            let b = [c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]];
            (if little {
                f64::from_le_bytes(b)
            } else {
                f64::from_be_bytes(b)
            }) as f32
        })),
    }
    Ok(NpyArray { shape, values })
}

/// The text of the value of `key` in a numpy header dict (up to the next top-level
/// comma or the closing brace).
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let single = format!("'{key}'");
    let double = format!("\"{key}\"");
    let at = header
        .find(&single)
        .map(|i| i + single.len())
        .or_else(|| header.find(&double).map(|i| i + double.len()))?;
    let rest = header[at..].trim_start().strip_prefix(':')?;
    let mut depth = 0usize;
    for (i, c) in rest.char_indices() {
        match c {
            '(' | '[' => depth += 1,
            ')' | ']' => depth = depth.saturating_sub(1),
            ',' | '}' if depth == 0 => return Some(rest[..i].trim()),
            _ => {}
        }
    }
    None
}

fn parse_shape(text: &str) -> Option<Vec<u64>> {
    let inner = text.trim().strip_prefix('(')?.strip_suffix(')')?;
    inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.trim_end_matches('L').parse::<u64>().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_aligned_and_round_trips() {
        for shape in [vec![], vec![5], vec![3, 4], vec![2, 1, 3, 7]] {
            let n: u64 = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 1.0).collect();
            let mut bytes = Vec::new();
            write_npy_f32(&mut bytes, Path::new(""), &shape, &values).unwrap();
            let header_len = usize::from(u16::from_le_bytes([bytes[8], bytes[9]]));
            assert_eq!((10 + header_len) % 64, 0);
            let back = parse_npy(&bytes, Path::new("")).unwrap();
            assert_eq!(back.shape, shape);
            assert_eq!(back.values, values);
        }
    }

    #[test]
    fn bad_files_are_refused() {
        let p = Path::new("x.npy");
        assert!(parse_npy(b"PK\x03\x04", p).is_err());
        let mut bytes = Vec::new();
        write_npy_f32(&mut bytes, p, &[4], &[1.0, 2.0, 3.0, 4.0]).unwrap();
        let err = parse_npy(&bytes[..bytes.len() - 1], p).unwrap_err();
        assert!(matches!(err, Error::Npy { .. }), "{err}");
        let err = write_npy_f32(&mut Vec::new(), p, &[3], &[1.0]).unwrap_err();
        assert!(matches!(err, Error::Npy { .. }), "{err}");
        // A shape that claims more elements than the data holds is refused before any
        // allocation, and so are other dtypes and Fortran order.
        for dict in [
            "{'descr': '<f4', 'fortran_order': False, 'shape': (9999999999999,), }",
            "{'descr': '<f4', 'fortran_order': False, 'shape': (18446744073709551615, 2), }",
            "{'descr': '<i4', 'fortran_order': False, 'shape': (4,), }",
            "{'descr': '<f4', 'fortran_order': True, 'shape': (2, 2), }",
        ] {
            let err = parse_npy(&with_header(dict, &[0u8; 16]), p).unwrap_err();
            assert!(matches!(err, Error::Npy { .. }), "{dict}: {err}");
        }
        let ok = parse_npy(
            &with_header(
                "{'descr': '>f8', 'fortran_order': False, 'shape': (2,), }",
                &{
                    let mut d = 1.5f64.to_be_bytes().to_vec();
                    d.extend((-2.0f64).to_be_bytes());
                    d
                },
            ),
            p,
        )
        .unwrap();
        assert_eq!(ok.values, vec![1.5, -2.0]);
    }

    fn with_header(dict: &str, data: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&((dict.len() + 1) as u16).to_le_bytes());
        out.extend_from_slice(dict.as_bytes());
        out.push(b'\n');
        out.extend_from_slice(data);
        out
    }
}
