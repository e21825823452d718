//! The GGUF reader: parses and checks a whole file held in memory (a byte slice or a
//! memory map) without copying tensor data or long arrays.
//!
//! Every count and length read from the file is checked against the bytes left before it
//! is used, so a hostile file yields an [`Error`] carrying the offset of the bad field
//! and never a panic, a large allocation or a long loop.

use std::collections::HashMap;
use std::ops::Range;

use crate::error::{Error, Result};
use crate::types::GgmlType;
use crate::value::{ArrayRef, LenWidth, ValueRef, ValueType, decode_fixed};

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that sets the alignment.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Deepest nesting of arrays inside arrays that the reader accepts.
pub const MAX_ARRAY_DEPTH: usize = 8;
/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;

/// One metadata key-value pair, with where it sits in the file.
#[derive(Clone, Copy, Debug)]
pub struct MetadataEntry<'a> {
    /// The key.
    pub key: &'a str,
    /// The value, borrowed from the file.
    pub value: ValueRef<'a>,
    /// Absolute offset of the entry (its key's length field).
    pub entry_offset: u64,
    /// Absolute offset of the value's type tag.
    pub type_offset: u64,
    /// Absolute offset of the encoded value (just after the type tag).
    pub value_offset: u64,
    /// Length of the encoded value in bytes (without the type tag).
    pub value_len: u64,
}

impl MetadataEntry<'_> {
    /// The byte range of the encoded value (without its type tag).
    pub fn value_range(&self) -> Range<u64> {
        self.value_offset..self.value_offset + self.value_len
    }
}

/// One tensor's description, with the absolute position of its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Dimensions, fastest-moving first (ggml's `ne`).
    pub dims: Vec<u64>,
    /// The ggml type of its elements.
    pub ggml_type: GgmlType,
    /// Offset of its data relative to the start of the data section, as stored.
    pub relative_offset: u64,
    /// Absolute offset of its data in the file.
    pub data_offset: u64,
    /// Number of elements.
    pub n_elements: u64,
    /// Length of its data in bytes.
    pub n_bytes: u64,
    /// Absolute offset of its tensor info record (the name's length field).
    pub info_offset: u64,
}

impl TensorInfo {
    /// The absolute byte range of the tensor's data.
    pub fn data_range(&self) -> Range<u64> {
        self.data_offset..self.data_offset + self.n_bytes
    }

    /// Number of blocks of its type.
    pub fn n_blocks(&self) -> u64 {
        self.n_elements / self.ggml_type.block_len()
    }
}

/// A property of the data layout that gguf-py accepts but llama.cpp's C reader refuses:
/// reported, not fatal.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayoutDiagnostic {
    /// The tensor starts after the end of the previous one (padded): a hole.
    Hole {
        /// The tensor after the hole.
        tensor: String,
        /// Where the C reader expects it (relative to the data section).
        expected: u64,
        /// Where it is.
        found: u64,
    },
    /// The tensor starts before the end of the previous one in table order.
    OutOfOrder {
        /// The tensor out of order.
        tensor: String,
        /// Where the C reader expects it (relative to the data section).
        expected: u64,
        /// Where it is.
        found: u64,
    },
}

impl std::fmt::Display for LayoutDiagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayoutDiagnostic::Hole {
                tensor,
                expected,
                found,
            } => write!(
                f,
                "tensor {tensor:?} starts at data offset {found}, leaving a hole after {expected} (llama.cpp refuses holes)"
            ),
            LayoutDiagnostic::OutOfOrder {
                tensor,
                expected,
                found,
            } => write!(
                f,
                "tensor {tensor:?} starts at data offset {found}, before {expected} where the previous tensor ends (llama.cpp refuses tensors out of order)"
            ),
        }
    }
}

/// A parsed and checked GGUF file, borrowing the bytes it was parsed from.
#[derive(Clone, Debug)]
pub struct Gguf<'a> {
    bytes: &'a [u8],
    version: u32,
    metadata: Vec<MetadataEntry<'a>>,
    key_index: HashMap<&'a str, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
    tensor_infos_end: u64,
    diagnostics: Vec<LayoutDiagnostic>,
}

impl<'a> Gguf<'a> {
    /// Parses and checks a whole GGUF file.
    pub fn parse(bytes: &'a [u8]) -> Result<Gguf<'a>> {
        Parser::new(bytes).parse()
    }

    /// The bytes the file was parsed from.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The file's length in bytes.
    pub fn file_len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The GGUF version (1, 2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Every metadata entry, in file order.
    pub fn metadata(&self) -> &[MetadataEntry<'a>] {
        &self.metadata
    }

    /// The metadata entry with this key.
    pub fn entry(&self, key: &str) -> Option<&MetadataEntry<'a>> {
        self.key_index.get(key).map(|&i| &self.metadata[i])
    }

    /// The value of this key.
    pub fn get(&self, key: &str) -> Option<ValueRef<'a>> {
        self.entry(key).map(|e| e.value)
    }

    /// The string value of `key`: an error if it is absent or not a string.
    pub fn get_str(&self, key: &str) -> Result<&'a str> {
        let value = self.require(key)?;
        value
            .as_str()
            .ok_or_else(|| wrong_type(key, "STRING", value))
    }

    /// The value of `key` as an unsigned integer (any integer type holding a value >= 0).
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let value = self.require(key)?;
        value
            .as_u64()
            .ok_or_else(|| wrong_type(key, "an unsigned integer", value))
    }

    /// The value of `key` as a float (`FLOAT32` or `FLOAT64`).
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let value = self.require(key)?;
        value
            .as_f64()
            .ok_or_else(|| wrong_type(key, "a float", value))
    }

    /// The array value of `key`.
    pub fn get_array(&self, key: &str) -> Result<ArrayRef<'a>> {
        let value = self.require(key)?;
        value
            .as_array()
            .ok_or_else(|| wrong_type(key, "ARRAY", value))
    }

    fn require(&self, key: &str) -> Result<ValueRef<'a>> {
        self.get(key)
            .ok_or_else(|| Error::NoSuchKey(key.to_owned()))
    }

    /// `general.architecture`, if present and a string.
    pub fn architecture(&self) -> Option<&'a str> {
        self.get("general.architecture").and_then(|v| v.as_str())
    }

    /// Every tensor info, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor with this name.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    /// The tensor with this name, or [`Error::NoSuchTensor`].
    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name)
            .ok_or_else(|| Error::NoSuchTensor(name.to_owned()))
    }

    /// The data of a tensor of this file.
    pub fn tensor_data(&self, tensor: &TensorInfo) -> &'a [u8] {
        // The reader checked every tensor's range against the file's length; a
        // `TensorInfo` from another file gets an empty slice rather than a panic.
        let range = tensor.data_range();
        self.bytes
            .get(range.start as usize..range.end as usize)
            .unwrap_or(&[])
    }

    /// The data alignment in bytes.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Absolute offset just past the last tensor info (where padding starts).
    pub fn tensor_infos_end(&self) -> u64 {
        self.tensor_infos_end
    }

    /// Layout properties that llama.cpp's C reader would refuse.
    pub fn diagnostics(&self) -> &[LayoutDiagnostic] {
        &self.diagnostics
    }
}

fn wrong_type(key: &str, expected: &'static str, found: ValueRef<'_>) -> Error {
    Error::WrongValueType {
        key: key.to_owned(),
        expected,
        found: found.value_type().name(),
    }
}

/// Rounds `n` up to a multiple of `alignment` (a power of two), or `None` on overflow.
pub fn align_up(n: u64, alignment: u64) -> Option<u64> {
    Some(n.checked_add(alignment - 1)? & !(alignment - 1))
}

struct Parser<'a> {
    bytes: &'a [u8],
    position: usize,
    width: LenWidth,
}

impl<'a> Parser<'a> {
    fn new(bytes: &'a [u8]) -> Parser<'a> {
        Parser {
            bytes,
            position: 0,
            width: LenWidth::U64,
        }
    }

    fn offset(&self) -> u64 {
        self.position as u64
    }

    fn remaining(&self) -> u64 {
        (self.bytes.len() - self.position) as u64
    }

    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(Error::Truncated {
                what,
                offset: self.offset(),
                needed: n,
                available: self.remaining(),
            });
        }
        let start = self.position;
        self.position += n as usize;
        Ok(&self.bytes[start..self.position])
    }

    fn u32(&mut self, what: &'static str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64> {
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes([
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7],
        ]))
    }

    /// Reads a length or count field, 32 or 64 bits wide by version.
    fn length(&mut self, what: &'static str) -> Result<u64> {
        match self.width {
            LenWidth::U32 => self.u32(what).map(u64::from),
            LenWidth::U64 => self.u64(what),
        }
    }

    /// Reads a count of items that each take at least `min_item_len` bytes, refusing a
    /// count that the rest of the file cannot hold.
    fn count(&mut self, what: &'static str, min_item_len: u64) -> Result<u64> {
        let offset = self.offset();
        let count = self.length(what)?;
        let available = self.remaining();
        if count > available / min_item_len.max(1) {
            return Err(Error::CountTooLarge {
                what,
                count,
                offset,
                available,
            });
        }
        Ok(count)
    }

    fn string(&mut self, what: &'static str) -> Result<&'a str> {
        let len = self.count(what, 1)?;
        let offset = self.offset();
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| Error::InvalidUtf8 { offset })
    }

    fn value_type(&mut self) -> Result<ValueType> {
        let offset = self.offset();
        let id = self.u32("value type")?;
        ValueType::from_id(id).ok_or(Error::UnknownValueType {
            type_id: id,
            offset,
        })
    }

    fn value(&mut self, t: ValueType, depth: usize) -> Result<ValueRef<'a>> {
        match t {
            ValueType::String => self.string("string length").map(ValueRef::String),
            ValueType::Array => self.array(depth).map(ValueRef::Array),
            fixed => {
                let offset = self.offset();
                let size = fixed.fixed_size().unwrap_or(1);
                let bytes = self.take(size, "value")?;
                decode_fixed(fixed, bytes).ok_or(Error::InvalidBool {
                    byte: bytes[0],
                    offset,
                })
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<ArrayRef<'a>> {
        let array_offset = self.offset();
        if depth >= MAX_ARRAY_DEPTH {
            return Err(Error::NestingTooDeep {
                limit: MAX_ARRAY_DEPTH,
                offset: array_offset,
            });
        }
        let element_type = self.value_type()?;
        let min_len = match element_type.fixed_size() {
            Some(size) => size,
            None if element_type == ValueType::String => self.width.bytes(),
            None => 4 + self.width.bytes(),
        };
        let len = self.count("array length", min_len)?;
        let start = self.position;
        match element_type {
            ValueType::String => {
                for _ in 0..len {
                    self.string("string length")?;
                }
            }
            ValueType::Array => {
                for _ in 0..len {
                    self.array(depth + 1)?;
                }
            }
            ValueType::Bool => {
                let bytes = self.take(len, "array of bools")?;
                if let Some(i) = bytes.iter().position(|&b| b > 1) {
                    return Err(Error::InvalidBool {
                        byte: bytes[i],
                        offset: start as u64 + i as u64,
                    });
                }
            }
            fixed => {
                let size = fixed.fixed_size().unwrap_or(1);
                self.take(len * size, "array elements")?;
            }
        }
        Ok(ArrayRef {
            element_type,
            len,
            bytes: &self.bytes[start..self.position],
            offset: start as u64,
            width: self.width,
        })
    }

    fn parse(mut self) -> Result<Gguf<'a>> {
        let magic = self.take(4, "magic")?;
        if magic != MAGIC {
            return Err(Error::BadMagic {
                found: [magic[0], magic[1], magic[2], magic[3]],
            });
        }
        let version_offset = self.offset();
        let version = self.u32("version")?;
        match version {
            1 => self.width = LenWidth::U32,
            2 | 3 => self.width = LenWidth::U64,
            v if v & 0xffff == 0 && (1..=3).contains(&v.swap_bytes()) => {
                return Err(Error::BigEndian {
                    version: v.swap_bytes(),
                });
            }
            v => {
                return Err(Error::UnsupportedVersion {
                    version: v,
                    offset: version_offset,
                });
            }
        }
        let w = self.width.bytes();
        // Smallest possible tensor info: empty name, no dims, type and offset.
        let tensor_count = self.count("tensor count", w + 4 + 4 + 8)?;
        // Smallest possible key-value pair: empty key, type tag, one-byte value.
        let kv_count = self.count("metadata count", w + 4 + 1)?;

        let mut metadata = Vec::with_capacity(kv_count as usize);
        let mut key_index = HashMap::with_capacity(kv_count as usize);
        for _ in 0..kv_count {
            let entry_offset = self.offset();
            let key = self.string("key length")?;
            let type_offset = self.offset();
            let t = self.value_type()?;
            let value_offset = self.offset();
            let value = self.value(t, 0)?;
            if key_index.insert(key, metadata.len()).is_some() {
                return Err(Error::DuplicateKey {
                    key: key.to_owned(),
                    offset: entry_offset,
                });
            }
            metadata.push(MetadataEntry {
                key,
                value,
                entry_offset,
                type_offset,
                value_offset,
                value_len: self.offset() - value_offset,
            });
        }

        let alignment = match key_index.get(ALIGNMENT_KEY).map(|&i| &metadata[i]) {
            None => DEFAULT_ALIGNMENT,
            Some(entry) => match entry.value {
                ValueRef::U32(a) if a.is_power_of_two() => u64::from(a),
                ValueRef::U32(a) => {
                    return Err(Error::InvalidAlignment {
                        reason: format!("{a} is not a power of two"),
                        offset: entry.value_offset,
                    });
                }
                other => {
                    return Err(Error::InvalidAlignment {
                        reason: format!("type is {}, not UINT32", other.value_type()),
                        offset: entry.value_offset,
                    });
                }
            },
        };

        let mut tensors = Vec::with_capacity(tensor_count as usize);
        let mut tensor_index = HashMap::with_capacity(tensor_count as usize);
        for _ in 0..tensor_count {
            let tensor = self.tensor_info()?;
            if tensor_index
                .insert(tensor.name.clone(), tensors.len())
                .is_some()
            {
                return Err(Error::DuplicateTensor {
                    name: tensor.name,
                    offset: tensor.info_offset,
                });
            }
            tensors.push(tensor);
        }
        let tensor_infos_end = self.offset();
        let data_offset = align_up(tensor_infos_end, alignment).unwrap_or(u64::MAX);
        let file_len = self.bytes.len() as u64;
        check_tensor_data(&mut tensors, data_offset, alignment, file_len)?;
        let diagnostics = layout_diagnostics(&tensors, alignment);

        Ok(Gguf {
            bytes: self.bytes,
            version,
            metadata,
            key_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
            tensor_infos_end,
            diagnostics,
        })
    }

    fn tensor_info(&mut self) -> Result<TensorInfo> {
        let info_offset = self.offset();
        let name = self.string("tensor name length")?.to_owned();
        let dims_offset = self.offset();
        let n_dims = self.u32("tensor dimension count")?;
        if n_dims > MAX_DIMS {
            return Err(Error::TooManyDims {
                tensor: name,
                n_dims,
                offset: dims_offset,
            });
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(self.length("tensor dimension")?);
        }
        let type_offset = self.offset();
        let type_id = self.u32("tensor type")?;
        let Some(ggml_type) = GgmlType::from_id(type_id) else {
            return Err(Error::UnknownTensorType {
                tensor: name,
                type_id,
                offset: type_offset,
            });
        };
        let relative_offset = self.u64("tensor data offset")?;
        let shape_error = |reason| Error::InvalidShape {
            tensor: name.clone(),
            dims: dims.clone(),
            reason,
            offset: info_offset,
        };
        // ggml stores dimensions and byte counts as int64_t: anything past i64::MAX is
        // refused, as its C reader does.
        let n_elements = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| i64::try_from(n).is_ok())
            .ok_or_else(|| shape_error("element count overflows"))?;
        let first_dim = dims.first().copied().unwrap_or(1);
        if first_dim % ggml_type.block_len() != 0 {
            return Err(shape_error(
                "first dimension is not a whole number of blocks",
            ));
        }
        let n_bytes = ggml_type
            .bytes_for(n_elements)
            .filter(|&n| i64::try_from(n).is_ok())
            .ok_or_else(|| shape_error("byte count overflows"))?;
        Ok(TensorInfo {
            name,
            dims,
            ggml_type,
            relative_offset,
            data_offset: 0,
            n_elements,
            n_bytes,
            info_offset,
        })
    }
}

/// Sets each tensor's absolute offset and checks that its data is aligned, inside the
/// file and overlaps no other tensor's data.
fn check_tensor_data(
    tensors: &mut [TensorInfo],
    data_offset: u64,
    alignment: u64,
    file_len: u64,
) -> Result<()> {
    for t in tensors.iter_mut() {
        let start = data_offset.checked_add(t.relative_offset);
        let end = start.and_then(|s| s.checked_add(t.n_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= file_len => {
                if t.relative_offset % alignment != 0 {
                    return Err(Error::MisalignedTensor {
                        tensor: t.name.clone(),
                        offset: start,
                        alignment,
                    });
                }
                t.data_offset = start;
            }
            _ => {
                return Err(Error::TensorOutOfBounds {
                    tensor: t.name.clone(),
                    start: start.unwrap_or(u64::MAX),
                    end: end.unwrap_or(u64::MAX),
                    file_len,
                });
            }
        }
    }
    let mut order: Vec<usize> = (0..tensors.len())
        .filter(|&i| tensors[i].n_bytes > 0)
        .collect();
    order.sort_unstable_by_key(|&i| tensors[i].data_offset);
    for pair in order.windows(2) {
        let (first, second) = (&tensors[pair[0]], &tensors[pair[1]]);
        if second.data_offset < first.data_range().end {
            return Err(Error::OverlappingTensors {
                first: first.name.clone(),
                second: second.name.clone(),
                offset: second.data_offset,
            });
        }
    }
    Ok(())
}

/// Compares the layout with the one llama.cpp's C reader requires: tensors in table
/// order, each at the running padded size.
fn layout_diagnostics(tensors: &[TensorInfo], alignment: u64) -> Vec<LayoutDiagnostic> {
    let mut diagnostics = Vec::new();
    let mut expected = 0u64;
    for t in tensors {
        let found = t.relative_offset;
        if found > expected {
            diagnostics.push(LayoutDiagnostic::Hole {
                tensor: t.name.clone(),
                expected,
                found,
            });
        } else if found < expected {
            diagnostics.push(LayoutDiagnostic::OutOfOrder {
                tensor: t.name.clone(),
                expected,
                found,
            });
        }
        expected = align_up(found.saturating_add(t.n_bytes), alignment).unwrap_or(u64::MAX);
    }
    diagnostics
}

#[cfg(test)]
mod tests;
