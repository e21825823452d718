//! The GGUF reader: parses and checks a whole file held in memory (a byte slice or a
//! memory map) without copying tensor data or long arrays.
//!
//! Every count and length read from the file is checked against the bytes left before it
//! is used, so a hostile file yields an [`Error`] carrying the offset of the bad field
//! and never a panic, a large allocation or a long loop.

use std::collections::{HashMap, HashSet};
use std::ops::Range;

use crate::error::{Error, Result};
use crate::types::GgmlType;
use crate::value::{ArrayRef, GgufStr, LenWidth, ValueRef, ValueType, decode_fixed};

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
/// Most diagnostics of one kind of lenience (strings that are not UTF-8, boolean bytes
/// other than 0 and 1) reported one by one; the rest are counted in one more.
pub const MAX_DIAGNOSTICS: usize = 256;

/// One metadata key-value pair, with where it sits in the file.
#[derive(Clone, Copy, Debug)]
pub struct MetadataEntry<'a> {
    /// The key, as the file holds it (UTF-8 or not).
    pub key: GgufStr<'a>,
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

/// A property of the file that one reference reader refuses and another accepts, or that
/// llama.cpp reads loosely: reported, not fatal. Holes and tensors out of order are
/// accepted by gguf-py and refused by llama.cpp's C reader; strings that are not UTF-8
/// and boolean bytes other than 0 or 1 are accepted by llama.cpp, which checks neither.
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
    /// A metadata key is not valid UTF-8. It is read and edited in place as it is; a
    /// rewrite refuses, since it cannot keep it unchanged.
    KeyNotUtf8 {
        /// The key, U+FFFD in place of the bytes that are not UTF-8.
        key: String,
        /// Absolute offset of the key's bytes.
        offset: u64,
    },
    /// A string value, or one element of a string array, is not valid UTF-8. It is kept
    /// as read: every edit and rewrite writes its bytes back unchanged.
    ValueNotUtf8 {
        /// The key whose value holds it.
        key: String,
        /// The element's index in the array (a token id for `tokenizer.ggml.tokens`),
        /// or `None` for a string value.
        element: Option<u64>,
        /// Absolute offset of the string's bytes.
        offset: u64,
    },
    /// A tensor's name is not valid UTF-8. The tensor is found under its name with
    /// U+FFFD in place of the bad bytes; a rewrite refuses, since it cannot keep it.
    TensorNameNotUtf8 {
        /// The tensor's index in the tensor table.
        index: u64,
        /// The name, U+FFFD in place of the bytes that are not UTF-8.
        name: String,
        /// Absolute offset of the name's bytes.
        offset: u64,
    },
    /// A boolean holds a byte other than 0 or 1; it reads as `true`, as llama.cpp reads
    /// it. In-place edits keep the byte; a rewrite stores 1.
    NonBooleanByte {
        /// The key whose value holds it.
        key: String,
        /// The element's index in the array, or `None` for a boolean value.
        element: Option<u64>,
        /// The byte.
        byte: u8,
        /// Its absolute offset.
        offset: u64,
    },
    /// More diagnostics of the kinds above than [`MAX_DIAGNOSTICS`]: the rest, counted.
    More {
        /// How many were not reported one by one.
        count: u64,
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
            LayoutDiagnostic::KeyNotUtf8 { key, offset } => write!(
                f,
                "key {key:?} at offset {offset} is not valid UTF-8 (llama.cpp does not check; a rewrite would change it and refuses)"
            ),
            LayoutDiagnostic::ValueNotUtf8 {
                key,
                element,
                offset,
            } => {
                match element {
                    Some(i) => write!(f, "element {i} of {key:?}")?,
                    None => write!(f, "the value of {key:?}")?,
                }
                write!(
                    f,
                    " at offset {offset} is not valid UTF-8 (llama.cpp does not check; kept as read)"
                )
            }
            LayoutDiagnostic::TensorNameNotUtf8 {
                index,
                name,
                offset,
            } => write!(
                f,
                "the name of tensor {index} ({name:?}) at offset {offset} is not valid UTF-8 (llama.cpp does not check; a rewrite would change it and refuses)"
            ),
            LayoutDiagnostic::NonBooleanByte {
                key,
                element,
                byte,
                offset,
            } => {
                match element {
                    Some(i) => write!(f, "element {i} of {key:?}")?,
                    None => write!(f, "the value of {key:?}")?,
                }
                write!(
                    f,
                    " at offset {offset} is a boolean holding {byte}, not 0 or 1 (read as true, as llama.cpp does)"
                )
            }
            LayoutDiagnostic::More { count } => {
                write!(
                    f,
                    "{count} more strings that are not UTF-8 or non-boolean bytes"
                )
            }
        }
    }
}

/// A parsed and checked GGUF file, borrowing the bytes it was parsed from.
#[derive(Clone, Debug)]
pub struct Gguf<'a> {
    bytes: &'a [u8],
    version: u32,
    metadata: Vec<MetadataEntry<'a>>,
    key_index: HashMap<&'a [u8], usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
    tensor_infos_end: u64,
    diagnostics: Vec<LayoutDiagnostic>,
    first_name_not_utf8: Option<String>,
    /// The file the bytes are a mapping of, when they are (see [`Gguf::source_file`]).
    source: Option<&'a std::fs::File>,
}

impl<'a> Gguf<'a> {
    /// The same parse, noting that its bytes are a mapping of the whole of `file` (as
    /// [`crate::MappedFile::parse`] makes it), so that writers can have the kernel copy
    /// tensor data from the file instead of through the mapping.
    pub(crate) fn with_source(mut self, file: &'a std::fs::File) -> Gguf<'a> {
        self.source = Some(file);
        self
    }

    /// The file whose mapping the parsed bytes are, when the parse came from a
    /// [`crate::MappedFile`]: byte offset `n` of the bytes is offset `n` of the file.
    pub fn source_file(&self) -> Option<&'a std::fs::File> {
        self.source
    }

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

    /// The metadata entry with this key (text, or the raw bytes of a key that is not
    /// UTF-8).
    pub fn entry(&self, key: impl AsRef<[u8]>) -> Option<&MetadataEntry<'a>> {
        self.key_index.get(key.as_ref()).map(|&i| &self.metadata[i])
    }

    /// The value of this key.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Option<ValueRef<'a>> {
        self.entry(key).map(|e| e.value)
    }

    /// The string value of `key`: an error if it is absent, not a string, or not UTF-8.
    pub fn get_str(&self, key: &str) -> Result<&'a str> {
        let entry = self
            .entry(key)
            .ok_or_else(|| Error::NoSuchKey(key.to_owned()))?;
        let value = entry.value;
        let string = value
            .as_gguf_str()
            .ok_or_else(|| wrong_type(key, "STRING", value))?;
        string.as_str().ok_or(Error::InvalidUtf8 {
            offset: entry.value_offset + 8,
        })
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

    /// The first key or tensor name that is not valid UTF-8, described with its offset
    /// (found even when the diagnostics are capped): what a rewrite cannot keep.
    pub fn first_name_not_utf8(&self) -> Option<&str> {
        self.first_name_not_utf8.as_deref()
    }

    /// Layout properties that llama.cpp's C reader would refuse, and what it reads
    /// loosely (strings that are not UTF-8, boolean bytes other than 0 or 1).
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
    /// Strings that are not UTF-8 and boolean bytes other than 0 or 1, in file order.
    lenience: Lenience,
}

/// The diagnostics of what the reader accepts as llama.cpp does, capped.
#[derive(Default)]
struct Lenience {
    diagnostics: Vec<LayoutDiagnostic>,
    more: u64,
    first_name_not_utf8: Option<String>,
}

impl Lenience {
    fn push(&mut self, diagnostic: impl FnOnce() -> LayoutDiagnostic) {
        if self.diagnostics.len() < MAX_DIAGNOSTICS {
            self.diagnostics.push(diagnostic());
        } else {
            self.more += 1;
        }
    }

    /// Reports the strings that are not UTF-8 and the non-boolean bytes in `value`, the
    /// value of `key`, whose encoding is `encoded` and starts at `offset`.
    fn check_value(
        &mut self,
        key: GgufStr<'_>,
        value: &ValueRef<'_>,
        encoded: &[u8],
        offset: u64,
        width: LenWidth,
    ) {
        match value {
            ValueRef::String(s) if !s.is_utf8() => self.push(|| LayoutDiagnostic::ValueNotUtf8 {
                key: key.to_string(),
                element: None,
                offset: offset + width.bytes(),
            }),
            // The decoded `bool` no longer tells 1 from 2: look at the byte itself.
            ValueRef::Bool(_) => match encoded.first() {
                Some(&byte) if byte > 1 => self.push(|| LayoutDiagnostic::NonBooleanByte {
                    key: key.to_string(),
                    element: None,
                    byte,
                    offset,
                }),
                _ => {}
            },
            ValueRef::Array(array) => self.check_array(key, None, array),
            _ => {}
        }
    }

    /// `top` is the index of the outermost array's element that holds `array`.
    fn check_array(&mut self, key: GgufStr<'_>, top: Option<u64>, array: &ArrayRef<'_>) {
        match array.element_type() {
            ValueType::String => {
                let mut position = array.offset();
                for (i, item) in array.iter().enumerate() {
                    let Some(s) = item.as_gguf_str() else {
                        continue;
                    };
                    if !s.is_utf8() {
                        self.push(|| LayoutDiagnostic::ValueNotUtf8 {
                            key: key.to_string(),
                            element: Some(top.unwrap_or(i as u64)),
                            offset: position + array.width.bytes(),
                        });
                    }
                    position += array.width.bytes() + s.len() as u64;
                }
            }
            ValueType::Bool => {
                for (i, &byte) in array.raw_bytes().iter().enumerate() {
                    if byte > 1 {
                        self.push(|| LayoutDiagnostic::NonBooleanByte {
                            key: key.to_string(),
                            element: Some(top.unwrap_or(i as u64)),
                            byte,
                            offset: array.offset() + i as u64,
                        });
                    }
                }
            }
            ValueType::Array => {
                for (i, item) in array.iter().enumerate() {
                    if let Some(inner) = item.as_array() {
                        self.check_array(key, Some(top.unwrap_or(i as u64)), &inner);
                    }
                }
            }
            _ => {}
        }
    }
}

impl<'a> Parser<'a> {
    fn new(bytes: &'a [u8]) -> Parser<'a> {
        Parser {
            bytes,
            position: 0,
            width: LenWidth::U64,
            lenience: Lenience::default(),
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

    /// Reads a string as bytes: llama.cpp does not check UTF-8, so neither does the
    /// reader; the caller reports what is not.
    fn string(&mut self, what: &'static str) -> Result<GgufStr<'a>> {
        let len = self.count(what, 1)?;
        self.take(len, what).map(GgufStr::new)
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
                // `take` gave `size` bytes, all a fixed-size type needs.
                decode_fixed(fixed, bytes).ok_or(Error::Truncated {
                    what: "value",
                    offset,
                    needed: size,
                    available: bytes.len() as u64,
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
            if !key.is_utf8() {
                let offset = entry_offset + self.width.bytes();
                self.lenience
                    .first_name_not_utf8
                    .get_or_insert_with(|| format!("key {key:?} at offset {offset}"));
                self.lenience.push(|| LayoutDiagnostic::KeyNotUtf8 {
                    key: key.to_string(),
                    offset,
                });
            }
            let type_offset = self.offset();
            let t = self.value_type()?;
            let value_offset = self.offset();
            let value = self.value(t, 0)?;
            if key_index.insert(key.as_bytes(), metadata.len()).is_some() {
                return Err(Error::DuplicateKey {
                    key: key.to_string(),
                    offset: entry_offset,
                });
            }
            let encoded = &self.bytes[value_offset as usize..self.position];
            self.lenience
                .check_value(key, &value, encoded, value_offset, self.width);
            metadata.push(MetadataEntry {
                key,
                value,
                entry_offset,
                type_offset,
                value_offset,
                value_len: self.offset() - value_offset,
            });
        }

        let alignment = match key_index
            .get(ALIGNMENT_KEY.as_bytes())
            .map(|&i| &metadata[i])
        {
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
        // Names as the file holds them: two names that differ only in bytes that are
        // not UTF-8 are distinct, as they are to llama.cpp.
        let mut raw_names = HashSet::with_capacity(tensor_count as usize);
        for index in 0..tensor_count {
            let (tensor, raw_name) = self.tensor_info()?;
            if !raw_names.insert(raw_name.as_bytes()) {
                return Err(Error::DuplicateTensor {
                    name: tensor.name,
                    offset: tensor.info_offset,
                });
            }
            if !raw_name.is_utf8() {
                let offset = tensor.info_offset + self.width.bytes();
                self.lenience
                    .first_name_not_utf8
                    .get_or_insert_with(|| format!("tensor name {raw_name:?} at offset {offset}"));
                self.lenience.push(|| LayoutDiagnostic::TensorNameNotUtf8 {
                    index,
                    name: tensor.name.clone(),
                    offset,
                });
            }
            // A lossy name that another tensor's name already is keeps the first.
            tensor_index
                .entry(tensor.name.clone())
                .or_insert(tensors.len());
            tensors.push(tensor);
        }
        let tensor_infos_end = self.offset();
        let data_offset = align_up(tensor_infos_end, alignment).unwrap_or(u64::MAX);
        let file_len = self.bytes.len() as u64;
        check_tensor_data(&mut tensors, data_offset, alignment, file_len)?;
        let mut diagnostics = layout_diagnostics(&tensors, alignment);
        diagnostics.append(&mut self.lenience.diagnostics);
        if self.lenience.more > 0 {
            diagnostics.push(LayoutDiagnostic::More {
                count: self.lenience.more,
            });
        }

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
            first_name_not_utf8: self.lenience.first_name_not_utf8,
            source: None,
        })
    }

    /// One tensor info, and its name as the file holds it.
    fn tensor_info(&mut self) -> Result<(TensorInfo, GgufStr<'a>)> {
        let info_offset = self.offset();
        let raw_name = self.string("tensor name length")?;
        let name = raw_name.to_string_lossy().into_owned();
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
        let tensor = TensorInfo {
            name,
            dims,
            ggml_type,
            relative_offset,
            data_offset: 0,
            n_elements,
            n_bytes,
            info_offset,
        };
        Ok((tensor, raw_name))
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
