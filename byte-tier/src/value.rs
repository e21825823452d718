//! GGUF metadata values: the thirteen value types, borrowed views for reading and owned
//! values for writing.
//!
//! GGUF strings are meant to be UTF-8, but llama.cpp's reader does not check: a file
//! whose strings are not UTF-8 loads there. Strings are therefore kept as the bytes the
//! file holds ([`GgufStr`]); valid UTF-8 reads as `&str`, anything else is shown escaped
//! and written back unchanged.

use std::borrow::Cow;
use std::fmt;

/// A GGUF string as the file holds it: bytes that are usually, but not necessarily,
/// UTF-8.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GgufStr<'a>(&'a [u8]);

impl<'a> GgufStr<'a> {
    /// The string made of these bytes.
    pub const fn new(bytes: &'a [u8]) -> GgufStr<'a> {
        GgufStr(bytes)
    }

    /// The bytes, exactly as stored.
    pub const fn as_bytes(&self) -> &'a [u8] {
        self.0
    }

    /// Length in bytes.
    pub const fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the string is empty.
    pub const fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The text, when the bytes are valid UTF-8.
    pub fn as_str(&self) -> Option<&'a str> {
        std::str::from_utf8(self.0).ok()
    }

    /// Whether the bytes are valid UTF-8.
    pub fn is_utf8(&self) -> bool {
        self.as_str().is_some()
    }

    /// The text, with U+FFFD in place of each byte sequence that is not UTF-8.
    pub fn to_string_lossy(&self) -> Cow<'a, str> {
        String::from_utf8_lossy(self.0)
    }

    /// The text quoted and escaped as Rust's `{:?}` writes a string, with `\xNN` for
    /// each byte that is not part of valid UTF-8: `"abc\xff"`.
    pub fn escaped(&self) -> String {
        if let Some(text) = self.as_str() {
            return format!("{text:?}");
        }
        let mut out = String::with_capacity(self.0.len() + 2);
        out.push('"');
        for chunk in self.0.utf8_chunks() {
            // The valid run escaped as `{:?}` escapes a whole string, without its quotes.
            let valid = format!("{:?}", chunk.valid());
            out.push_str(&valid[1..valid.len() - 1]);
            for byte in chunk.invalid() {
                out.push_str(&format!("\\x{byte:02x}"));
            }
        }
        out.push('"');
        out
    }
}

impl fmt::Debug for GgufStr<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.escaped())
    }
}

impl fmt::Display for GgufStr<'_> {
    /// The lossy text (U+FFFD for bytes that are not UTF-8), unquoted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string_lossy())
    }
}

impl AsRef<[u8]> for GgufStr<'_> {
    fn as_ref(&self) -> &[u8] {
        self.0
    }
}

impl PartialEq<str> for GgufStr<'_> {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for GgufStr<'_> {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl<'a> From<&'a str> for GgufStr<'a> {
    fn from(s: &'a str) -> GgufStr<'a> {
        GgufStr(s.as_bytes())
    }
}

/// A GGUF metadata value type, as stored in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
#[non_exhaustive]
pub enum ValueType {
    /// Unsigned 8-bit integer.
    U8 = 0,
    /// Signed 8-bit integer.
    I8 = 1,
    /// Unsigned 16-bit integer.
    U16 = 2,
    /// Signed 16-bit integer.
    I16 = 3,
    /// Unsigned 32-bit integer.
    U32 = 4,
    /// Signed 32-bit integer.
    I32 = 5,
    /// 32-bit float.
    F32 = 6,
    /// Boolean stored as one byte, 0 or 1.
    Bool = 7,
    /// Length-prefixed string, UTF-8 by intent (not checked by llama.cpp).
    String = 8,
    /// Typed array: element type, count, elements.
    Array = 9,
    /// Unsigned 64-bit integer.
    U64 = 10,
    /// Signed 64-bit integer.
    I64 = 11,
    /// 64-bit float.
    F64 = 12,
}

impl ValueType {
    /// Every value type, in id order.
    pub const ALL: [ValueType; 13] = [
        ValueType::U8,
        ValueType::I8,
        ValueType::U16,
        ValueType::I16,
        ValueType::U32,
        ValueType::I32,
        ValueType::F32,
        ValueType::Bool,
        ValueType::String,
        ValueType::Array,
        ValueType::U64,
        ValueType::I64,
        ValueType::F64,
    ];

    /// The type with this id, or `None`.
    pub const fn from_id(id: u32) -> Option<ValueType> {
        if (id as usize) < Self::ALL.len() {
            Some(Self::ALL[id as usize])
        } else {
            None
        }
    }

    /// The numeric id stored in files.
    pub const fn id(self) -> u32 {
        self as u32
    }

    /// The name gguf-py gives the type (`UINT32`, `STRING`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            ValueType::U8 => "UINT8",
            ValueType::I8 => "INT8",
            ValueType::U16 => "UINT16",
            ValueType::I16 => "INT16",
            ValueType::U32 => "UINT32",
            ValueType::I32 => "INT32",
            ValueType::F32 => "FLOAT32",
            ValueType::Bool => "BOOL",
            ValueType::String => "STRING",
            ValueType::Array => "ARRAY",
            ValueType::U64 => "UINT64",
            ValueType::I64 => "INT64",
            ValueType::F64 => "FLOAT64",
        }
    }

    /// The type named `name`: gguf-py's names (`UINT32`) or short ones (`u32`, `str`),
    /// case-insensitive.
    pub fn from_name(name: &str) -> Option<ValueType> {
        let lower = name.to_ascii_lowercase();
        let t = match lower.as_str() {
            "uint8" | "u8" => ValueType::U8,
            "int8" | "i8" => ValueType::I8,
            "uint16" | "u16" => ValueType::U16,
            "int16" | "i16" => ValueType::I16,
            "uint32" | "u32" => ValueType::U32,
            "int32" | "i32" => ValueType::I32,
            "float32" | "f32" => ValueType::F32,
            "bool" => ValueType::Bool,
            "string" | "str" => ValueType::String,
            "array" => ValueType::Array,
            "uint64" | "u64" => ValueType::U64,
            "int64" | "i64" => ValueType::I64,
            "float64" | "f64" => ValueType::F64,
            _ => return None,
        };
        Some(t)
    }

    /// Encoded size of one value of this type, when it is fixed.
    pub const fn fixed_size(self) -> Option<u64> {
        match self {
            ValueType::U8 | ValueType::I8 | ValueType::Bool => Some(1),
            ValueType::U16 | ValueType::I16 => Some(2),
            ValueType::U32 | ValueType::I32 | ValueType::F32 => Some(4),
            ValueType::U64 | ValueType::I64 | ValueType::F64 => Some(8),
            ValueType::String | ValueType::Array => None,
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata value borrowed from a parsed file. Strings are the file's bytes
/// ([`GgufStr`], UTF-8 or not); arrays are lazy views that decode elements on demand.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ValueRef<'a> {
    /// `UINT8`.
    U8(u8),
    /// `INT8`.
    I8(i8),
    /// `UINT16`.
    U16(u16),
    /// `INT16`.
    I16(i16),
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `FLOAT32`.
    F32(f32),
    /// `BOOL`.
    Bool(bool),
    /// `STRING`.
    String(GgufStr<'a>),
    /// `ARRAY`.
    Array(ArrayRef<'a>),
    /// `UINT64`.
    U64(u64),
    /// `INT64`.
    I64(i64),
    /// `FLOAT64`.
    F64(f64),
}

impl<'a> ValueRef<'a> {
    /// The value's type.
    pub fn value_type(&self) -> ValueType {
        match self {
            ValueRef::U8(_) => ValueType::U8,
            ValueRef::I8(_) => ValueType::I8,
            ValueRef::U16(_) => ValueType::U16,
            ValueRef::I16(_) => ValueType::I16,
            ValueRef::U32(_) => ValueType::U32,
            ValueRef::I32(_) => ValueType::I32,
            ValueRef::F32(_) => ValueType::F32,
            ValueRef::Bool(_) => ValueType::Bool,
            ValueRef::String(_) => ValueType::String,
            ValueRef::Array(_) => ValueType::Array,
            ValueRef::U64(_) => ValueType::U64,
            ValueRef::I64(_) => ValueType::I64,
            ValueRef::F64(_) => ValueType::F64,
        }
    }

    /// The text, if this is a `STRING` holding valid UTF-8.
    pub fn as_str(&self) -> Option<&'a str> {
        match *self {
            ValueRef::String(s) => s.as_str(),
            _ => None,
        }
    }

    /// The string's bytes, UTF-8 or not, if this is a `STRING`.
    pub fn as_gguf_str(&self) -> Option<GgufStr<'a>> {
        match *self {
            ValueRef::String(s) => Some(s),
            _ => None,
        }
    }

    /// The array view, if this is an `ARRAY`.
    pub fn as_array(&self) -> Option<ArrayRef<'a>> {
        match *self {
            ValueRef::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The value as an unsigned integer, if it is an integer type holding a value >= 0.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            ValueRef::U8(v) => Some(v.into()),
            ValueRef::U16(v) => Some(v.into()),
            ValueRef::U32(v) => Some(v.into()),
            ValueRef::U64(v) => Some(v),
            ValueRef::I8(v) => u64::try_from(v).ok(),
            ValueRef::I16(v) => u64::try_from(v).ok(),
            ValueRef::I32(v) => u64::try_from(v).ok(),
            ValueRef::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer type that fits in `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            ValueRef::U64(v) => i64::try_from(v).ok(),
            ValueRef::I8(v) => Some(v.into()),
            ValueRef::I16(v) => Some(v.into()),
            ValueRef::I32(v) => Some(v.into()),
            ValueRef::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is `FLOAT32` or `FLOAT64`.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            ValueRef::F32(v) => Some(v.into()),
            ValueRef::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The boolean, if this is a `BOOL`.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            ValueRef::Bool(v) => Some(v),
            _ => None,
        }
    }

    /// An owned copy (arrays are decoded in full).
    pub fn to_owned_value(&self) -> Value {
        match *self {
            ValueRef::U8(v) => Value::U8(v),
            ValueRef::I8(v) => Value::I8(v),
            ValueRef::U16(v) => Value::U16(v),
            ValueRef::I16(v) => Value::I16(v),
            ValueRef::U32(v) => Value::U32(v),
            ValueRef::I32(v) => Value::I32(v),
            ValueRef::F32(v) => Value::F32(v),
            ValueRef::Bool(v) => Value::Bool(v),
            ValueRef::String(v) => Value::from(v),
            ValueRef::Array(a) => Value::Array(a.to_owned_array()),
            ValueRef::U64(v) => Value::U64(v),
            ValueRef::I64(v) => Value::I64(v),
            ValueRef::F64(v) => Value::F64(v),
        }
    }
}

impl fmt::Display for ValueRef<'_> {
    /// Scalars as themselves, strings quoted with escapes, arrays in full.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValueRef::U8(v) => write!(f, "{v}"),
            ValueRef::I8(v) => write!(f, "{v}"),
            ValueRef::U16(v) => write!(f, "{v}"),
            ValueRef::I16(v) => write!(f, "{v}"),
            ValueRef::U32(v) => write!(f, "{v}"),
            ValueRef::I32(v) => write!(f, "{v}"),
            ValueRef::F32(v) => write!(f, "{v}"),
            ValueRef::Bool(v) => write!(f, "{v}"),
            ValueRef::String(v) => f.write_str(&v.escaped()),
            ValueRef::U64(v) => write!(f, "{v}"),
            ValueRef::I64(v) => write!(f, "{v}"),
            ValueRef::F64(v) => write!(f, "{v}"),
            ValueRef::Array(a) => {
                f.write_str("[")?;
                for (i, item) in a.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
        }
    }
}

/// Width of the length and count fields: 64 bits since GGUF v2, 32 bits in v1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LenWidth {
    U32,
    U64,
}

impl LenWidth {
    pub(crate) const fn bytes(self) -> u64 {
        match self {
            LenWidth::U32 => 4,
            LenWidth::U64 => 8,
        }
    }

    pub(crate) fn read(self, bytes: &[u8]) -> u64 {
        match self {
            LenWidth::U32 => u32::from_le_bytes(bytes[..4].try_into().unwrap_or([0; 4])).into(),
            LenWidth::U64 => u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8])),
        }
    }
}

/// A lazy view of a metadata array in a parsed file.
///
/// The reader has checked every element when it parsed the file (lengths and nested
/// element types), so iterating cannot fail.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ArrayRef<'a> {
    pub(crate) element_type: ValueType,
    pub(crate) len: u64,
    /// The encoded elements, nothing before or after.
    pub(crate) bytes: &'a [u8],
    /// Absolute file offset of `bytes`.
    pub(crate) offset: u64,
    pub(crate) width: LenWidth,
}

impl<'a> ArrayRef<'a> {
    /// The type of every element.
    pub fn element_type(&self) -> ValueType {
        self.element_type
    }

    /// Number of elements.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the array has no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The encoded elements as they sit in the file.
    pub fn raw_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// Absolute file offset of the first element.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Iterates over the elements, decoding each on demand.
    pub fn iter(&self) -> ArrayIter<'a> {
        ArrayIter {
            array: *self,
            position: 0,
            remaining: self.len,
        }
    }

    /// Element `index` in O(1) for fixed-size element types, by walking for strings and
    /// nested arrays.
    pub fn get(&self, index: u64) -> Option<ValueRef<'a>> {
        if index >= self.len {
            return None;
        }
        match self.element_type.fixed_size() {
            Some(size) => {
                let start = usize::try_from(index * size).ok()?;
                decode_fixed(self.element_type, self.bytes.get(start..)?)
            }
            None => self.iter().nth(usize::try_from(index).ok()?),
        }
    }

    /// Iterates over the elements of a string array, UTF-8 or not (one item per
    /// element, so indexes stay token ids); `None` for other element types.
    pub fn strings(&self) -> Option<impl Iterator<Item = GgufStr<'a>> + 'a> {
        (self.element_type == ValueType::String)
            .then(|| self.iter().filter_map(|v| v.as_gguf_str()))
    }

    /// An owned copy of the whole array.
    pub fn to_owned_array(&self) -> Array {
        Array {
            element_type: self.element_type,
            items: self.iter().map(|v| v.to_owned_value()).collect(),
        }
    }
}

/// Iterator over an [`ArrayRef`].
#[derive(Clone, Debug)]
pub struct ArrayIter<'a> {
    array: ArrayRef<'a>,
    position: usize,
    remaining: u64,
}

impl<'a> Iterator for ArrayIter<'a> {
    type Item = ValueRef<'a>;

    fn next(&mut self) -> Option<ValueRef<'a>> {
        if self.remaining == 0 {
            return None;
        }
        let bytes = self.array.bytes.get(self.position..)?;
        let (value, used) = decode_checked(
            self.array.element_type,
            bytes,
            self.array.offset + self.position as u64,
            self.array.width,
        )?;
        self.position += used;
        self.remaining -= 1;
        Some(value)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = usize::try_from(self.remaining).unwrap_or(usize::MAX);
        (n, Some(n))
    }
}

impl ExactSizeIterator for ArrayIter<'_> {}

/// Decodes one fixed-size value from the start of `bytes`.
pub(crate) fn decode_fixed<'a>(t: ValueType, bytes: &[u8]) -> Option<ValueRef<'a>> {
    fn arr<const N: usize>(bytes: &[u8]) -> Option<[u8; N]> {
        bytes.get(..N)?.try_into().ok()
    }
    Some(match t {
        ValueType::U8 => ValueRef::U8(*bytes.first()?),
        ValueType::I8 => ValueRef::I8(i8::from_le_bytes(arr(bytes)?)),
        ValueType::U16 => ValueRef::U16(u16::from_le_bytes(arr(bytes)?)),
        ValueType::I16 => ValueRef::I16(i16::from_le_bytes(arr(bytes)?)),
        ValueType::U32 => ValueRef::U32(u32::from_le_bytes(arr(bytes)?)),
        ValueType::I32 => ValueRef::I32(i32::from_le_bytes(arr(bytes)?)),
        ValueType::F32 => ValueRef::F32(f32::from_le_bytes(arr(bytes)?)),
        // Any byte but 0 is true, as llama.cpp reads it; the reader reports bytes other
        // than 0 and 1.
        ValueType::Bool => ValueRef::Bool(*bytes.first()? != 0),
        ValueType::U64 => ValueRef::U64(u64::from_le_bytes(arr(bytes)?)),
        ValueType::I64 => ValueRef::I64(i64::from_le_bytes(arr(bytes)?)),
        ValueType::F64 => ValueRef::F64(f64::from_le_bytes(arr(bytes)?)),
        ValueType::String | ValueType::Array => return None,
    })
}

/// Decodes one already-validated value from the start of `bytes`, returning it and the
/// bytes it used. Used by array iteration over data the reader has checked.
fn decode_checked<'a>(
    t: ValueType,
    bytes: &'a [u8],
    offset: u64,
    width: LenWidth,
) -> Option<(ValueRef<'a>, usize)> {
    let w = width.bytes() as usize;
    match t {
        ValueType::String => {
            let len = usize::try_from(width.read(bytes.get(..w)?)).ok()?;
            let s = GgufStr::new(bytes.get(w..w.checked_add(len)?)?);
            Some((ValueRef::String(s), w + len))
        }
        ValueType::Array => {
            let element_type =
                ValueType::from_id(u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?))?;
            let len = width.read(bytes.get(4..4 + w)?);
            let body = bytes.get(4 + w..)?;
            let used = encoded_elements_len(element_type, len, body, width)?;
            let array = ArrayRef {
                element_type,
                len,
                bytes: &body[..used],
                offset: offset + 4 + w as u64,
                width,
            };
            Some((ValueRef::Array(array), 4 + w + used))
        }
        _ => {
            let size = t.fixed_size()? as usize;
            Some((decode_fixed(t, bytes)?, size))
        }
    }
}

/// Length of `len` validated elements at the start of `bytes`.
fn encoded_elements_len(t: ValueType, len: u64, bytes: &[u8], width: LenWidth) -> Option<usize> {
    if let Some(size) = t.fixed_size() {
        return usize::try_from(len.checked_mul(size)?).ok();
    }
    let mut position = 0usize;
    for _ in 0..len {
        let (_, used) = decode_checked(t, bytes.get(position..)?, 0, width)?;
        position += used;
    }
    Some(position)
}

/// An owned metadata value, for writing and editing.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `UINT8`.
    U8(u8),
    /// `INT8`.
    I8(i8),
    /// `UINT16`.
    U16(u16),
    /// `INT16`.
    I16(i16),
    /// `UINT32`.
    U32(u32),
    /// `INT32`.
    I32(i32),
    /// `FLOAT32`.
    F32(f32),
    /// `BOOL`.
    Bool(bool),
    /// `STRING` holding valid UTF-8 (build one with `Value::from("text")`).
    String(String),
    /// `STRING` whose bytes are not valid UTF-8, kept as read so that a rewrite writes
    /// them back unchanged. [`Value::from`] a [`GgufStr`] chooses between the two.
    RawString(Vec<u8>),
    /// `ARRAY`.
    Array(Array),
    /// `UINT64`.
    U64(u64),
    /// `INT64`.
    I64(i64),
    /// `FLOAT64`.
    F64(f64),
}

/// An owned metadata array: every item has `element_type`.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    /// The type of every element.
    pub element_type: ValueType,
    /// The elements.
    pub items: Vec<Value>,
}

impl Array {
    /// An array of `items`, all of type `element_type`.
    pub fn new(element_type: ValueType, items: Vec<Value>) -> Array {
        Array {
            element_type,
            items,
        }
    }

    /// An array of strings.
    pub fn of_strings<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Array {
        Array::new(
            ValueType::String,
            items.into_iter().map(|s| Value::String(s.into())).collect(),
        )
    }
}

impl Value {
    /// The value's type.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) | Value::RawString(_) => ValueType::String,
            Value::Array(_) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// Parses `text` as a value of type `t` (scalars and strings only), the way a user
    /// types it on a command line: `true`/`false` for booleans, decimal numbers.
    pub fn parse_scalar(t: ValueType, text: &str) -> Option<Value> {
        Some(match t {
            ValueType::U8 => Value::U8(text.parse().ok()?),
            ValueType::I8 => Value::I8(text.parse().ok()?),
            ValueType::U16 => Value::U16(text.parse().ok()?),
            ValueType::I16 => Value::I16(text.parse().ok()?),
            ValueType::U32 => Value::U32(text.parse().ok()?),
            ValueType::I32 => Value::I32(text.parse().ok()?),
            ValueType::F32 => Value::F32(text.parse().ok()?),
            ValueType::Bool => Value::Bool(text.parse().ok()?),
            ValueType::String => Value::String(text.to_owned()),
            ValueType::U64 => Value::U64(text.parse().ok()?),
            ValueType::I64 => Value::I64(text.parse().ok()?),
            ValueType::F64 => Value::F64(text.parse().ok()?),
            ValueType::Array => return None,
        })
    }

    /// Appends the GGUF v3 encoding of the value (without its type tag) to `out`.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) -> Result<(), String> {
        match self {
            Value::U8(v) => out.push(*v),
            Value::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Bool(v) => out.push(u8::from(*v)),
            Value::String(s) => encode_str(s, out),
            Value::RawString(bytes) => encode_bytes(bytes, out),
            Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
            Value::Array(a) => {
                out.extend_from_slice(&a.element_type.id().to_le_bytes());
                out.extend_from_slice(&(a.items.len() as u64).to_le_bytes());
                for item in &a.items {
                    if item.value_type() != a.element_type {
                        return Err(format!(
                            "array of {} holds a {}",
                            a.element_type,
                            item.value_type()
                        ));
                    }
                    item.encode(out)?;
                }
            }
        }
        Ok(())
    }

    /// Length of the GGUF v3 encoding of the value (without its type tag).
    pub fn encoded_len(&self) -> u64 {
        match self {
            Value::String(s) => 8 + s.len() as u64,
            Value::RawString(bytes) => 8 + bytes.len() as u64,
            Value::Array(a) => 12 + a.items.iter().map(Value::encoded_len).sum::<u64>(),
            other => other.value_type().fixed_size().unwrap_or(0),
        }
    }
}

pub(crate) fn encode_str(s: &str, out: &mut Vec<u8>) {
    encode_bytes(s.as_bytes(), out);
}

pub(crate) fn encode_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

impl Value {
    /// The string's bytes, if this is a `STRING` (UTF-8 or not).
    pub fn string_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::String(s) => Some(s.as_bytes()),
            Value::RawString(bytes) => Some(bytes),
            _ => None,
        }
    }
}

impl From<GgufStr<'_>> for Value {
    /// [`Value::String`] for valid UTF-8, [`Value::RawString`] otherwise.
    fn from(s: GgufStr<'_>) -> Value {
        match s.as_str() {
            Some(text) => Value::String(text.to_owned()),
            None => Value::RawString(s.as_bytes().to_vec()),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::String(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::String(s)
    }
}

impl From<u32> for Value {
    fn from(v: u32) -> Value {
        Value::U32(v)
    }
}

impl From<f32> for Value {
    fn from(v: f32) -> Value {
        Value::F32(v)
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Value {
        Value::Bool(v)
    }
}

impl From<Array> for Value {
    fn from(a: Array) -> Value {
        Value::Array(a)
    }
}
