//! Pure byte operations on slices: what every `BytePatcher` builds on. Each takes the
//! bytes it works on and never looks outside them; bounds are the caller's to check.

use std::fmt::Write as _;
use std::ops::Range;

use sha2::{Digest, Sha256};

/// A bitwise operation applied to every byte (or every byte against a repeating operand).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum BitOp {
    /// Sets bit `0..8` of every byte.
    Set(u8),
    /// Clears bit `0..8` of every byte.
    Clear(u8),
    /// Flips bit `0..8` of every byte.
    Flip(u8),
    /// ANDs with the operand, repeated over the range.
    And(Vec<u8>),
    /// ORs with the operand, repeated over the range.
    Or(Vec<u8>),
    /// XORs with the operand, repeated over the range.
    Xor(Vec<u8>),
    /// Adds the operand to every byte, wrapping.
    WrappingAdd(u8),
}

impl BitOp {
    /// Checks the operand: a bit index below 8, a non-empty key.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            BitOp::Set(bit) | BitOp::Clear(bit) | BitOp::Flip(bit) if *bit >= 8 => {
                Err(format!("bit index {bit} is not in 0..8"))
            }
            BitOp::And(key) | BitOp::Or(key) | BitOp::Xor(key) if key.is_empty() => {
                Err("the operand is empty".into())
            }
            _ => Ok(()),
        }
    }

    /// Applies the operation to `bytes` in place. The operand of And/Or/Xor repeats from
    /// the start of `bytes`.
    pub fn apply(&self, bytes: &mut [u8]) {
        match self {
            BitOp::Set(bit) => bytes.iter_mut().for_each(|b| *b |= 1 << bit),
            BitOp::Clear(bit) => bytes.iter_mut().for_each(|b| *b &= !(1 << bit)),
            BitOp::Flip(bit) => bytes.iter_mut().for_each(|b| *b ^= 1 << bit),
            BitOp::And(key) => zip_key(bytes, key, |b, k| b & k),
            BitOp::Or(key) => zip_key(bytes, key, |b, k| b | k),
            BitOp::Xor(key) => zip_key(bytes, key, |b, k| b ^ k),
            BitOp::WrappingAdd(n) => bytes.iter_mut().for_each(|b| *b = b.wrapping_add(*n)),
        }
    }
}

fn zip_key(bytes: &mut [u8], key: &[u8], f: impl Fn(u8, u8) -> u8) {
    if key.is_empty() {
        return;
    }
    for (b, k) in bytes.iter_mut().zip(key.iter().cycle()) {
        *b = f(*b, *k);
    }
}

/// XORs `bytes` with `key` repeated from the start of `bytes`.
pub fn xor(bytes: &mut [u8], key: &[u8]) {
    zip_key(bytes, key, |b, k| b ^ k);
}

/// Width of the words that `rotate_bits` rotates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WordWidth {
    /// 8-bit words.
    W8 = 1,
    /// 16-bit little-endian words.
    W16 = 2,
    /// 32-bit little-endian words.
    W32 = 4,
    /// 64-bit little-endian words.
    W64 = 8,
}

impl WordWidth {
    /// Bytes per word.
    pub fn bytes(self) -> usize {
        self as usize
    }

    /// The width with this many bits.
    pub fn from_bits(bits: u32) -> Option<WordWidth> {
        Some(match bits {
            8 => WordWidth::W8,
            16 => WordWidth::W16,
            32 => WordWidth::W32,
            64 => WordWidth::W64,
            _ => return None,
        })
    }
}

/// Rotates every little-endian word of `bytes` left by `bits` (right when negative).
/// `bytes.len()` must be a multiple of the word width; a trailing partial word is left
/// as it is.
pub fn rotate_bits(bytes: &mut [u8], width: WordWidth, bits: i32) {
    let word_bits = (width.bytes() * 8) as i32;
    let n = bits.rem_euclid(word_bits) as u32;
    for word in bytes.chunks_exact_mut(width.bytes()) {
        match width {
            WordWidth::W8 => word[0] = word[0].rotate_left(n),
            WordWidth::W16 => {
                let v = u16::from_le_bytes([word[0], word[1]]).rotate_left(n);
                word.copy_from_slice(&v.to_le_bytes());
            }
            WordWidth::W32 => {
                let v = u32::from_le_bytes(word.try_into().unwrap_or([0; 4])).rotate_left(n);
                word.copy_from_slice(&v.to_le_bytes());
            }
            WordWidth::W64 => {
                let v = u64::from_le_bytes(word.try_into().unwrap_or([0; 8])).rotate_left(n);
                word.copy_from_slice(&v.to_le_bytes());
            }
        }
    }
}

/// Every start offset of `pattern` in `haystack` (overlapping matches included), found
/// with memchr's memmem.
pub fn search(haystack: &[u8], pattern: &[u8]) -> Vec<u64> {
    if pattern.is_empty() || pattern.len() > haystack.len() {
        return Vec::new();
    }
    let finder = memchr::memmem::Finder::new(pattern);
    let mut found = Vec::new();
    let mut start = 0;
    while let Some(i) = finder.find(&haystack[start..]) {
        found.push((start + i) as u64);
        start += i + 1;
        if start + pattern.len() > haystack.len() {
            break;
        }
    }
    found
}

/// The ranges (relative to the start) where `a` and `b` differ, merged into runs.
pub fn differences(a: &[u8], b: &[u8]) -> Vec<Range<u64>> {
    let mut runs: Vec<Range<u64>> = Vec::new();
    let common = a.len().min(b.len());
    let mut i = 0;
    while i < common {
        // Skip equal 8-byte words quickly: most of a large comparison is equal.
        if i + 8 <= common && a[i..i + 8] == b[i..i + 8] {
            i += 8;
            continue;
        }
        if a[i] != b[i] {
            match runs.last_mut() {
                Some(last) if last.end == i as u64 => last.end += 1,
                _ => runs.push(i as u64..i as u64 + 1),
            }
        }
        i += 1;
    }
    if a.len() != b.len() {
        let (start, end) = (common as u64, a.len().max(b.len()) as u64);
        match runs.last_mut() {
            Some(last) if last.end == start => last.end = end,
            _ => runs.push(start..end),
        }
    }
    runs
}

/// CRC-32 (IEEE), as zlib and gzip compute it.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// FNV-1a, 64 bits.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET_BASIS, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(PRIME)
    })
}

/// SHA-256.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

/// SHA-256 of `parts` one after another, as of their concatenation, without making it.
pub fn sha256_of_parts<'a>(parts: impl IntoIterator<Item = &'a [u8]>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// Lower-case hexadecimal of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Parses hexadecimal bytes, ignoring spaces and an optional `0x` prefix.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    let text = text.strip_prefix("0x").unwrap_or(text);
    let digits: Vec<u8> = text.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) {
        return None;
    }
    digits
        .chunks_exact(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok())
        .collect()
}

/// A classic hex dump: offset, 16 bytes in hex, the same bytes as ASCII. `base` is the
/// absolute offset of `bytes[0]`.
pub fn hexdump(bytes: &[u8], base: u64) -> String {
    let mut out = String::with_capacity(bytes.len() / 16 * 78 + 78);
    for (row, chunk) in bytes.chunks(16).enumerate() {
        let _ = write!(out, "{:08x}  ", base + row as u64 * 16);
        for i in 0..16 {
            match chunk.get(i) {
                Some(b) => {
                    let _ = write!(out, "{b:02x} ");
                }
                None => out.push_str("   "),
            }
            if i == 7 {
                out.push(' ');
            }
        }
        out.push_str(" |");
        out.extend(chunk.iter().map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        }));
        out.push_str("|\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn known_hashes() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(
            to_hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn search_finds_overlapping_matches() {
        assert_eq!(search(b"aaaa", b"aa"), vec![0, 1, 2]);
        assert_eq!(search(b"abc", b"abcd"), Vec::<u64>::new());
        assert_eq!(search(b"xabcxabc", b"abc"), vec![1, 5]);
    }

    #[test]
    fn hexdump_layout() {
        let dump = hexdump(b"GGUF\x03\0\0\0hello, world!!!\n", 0x10);
        assert_eq!(
            dump,
            "00000010  47 47 55 46 03 00 00 00  68 65 6c 6c 6f 2c 20 77  |GGUF....hello, w|\n\
             00000020  6f 72 6c 64 21 21 21 0a                           |orld!!!.|\n"
        );
    }

    #[test]
    fn bit_operations() {
        let mut b = [0b1010_1010u8, 0xff];
        BitOp::Flip(0).apply(&mut b);
        assert_eq!(b, [0b1010_1011, 0xfe]);
        BitOp::And(vec![0x0f]).apply(&mut b);
        assert_eq!(b, [0x0b, 0x0e]);
        BitOp::WrappingAdd(0xf5).apply(&mut b);
        assert_eq!(b, [0x00, 0x03]);
        assert!(BitOp::Set(8).validate().is_err());
        let mut w = 0x8000_0001u32.to_le_bytes();
        rotate_bits(&mut w, WordWidth::W32, 1);
        assert_eq!(u32::from_le_bytes(w), 0x0000_0003);
        rotate_bits(&mut w, WordWidth::W32, -1);
        assert_eq!(u32::from_le_bytes(w), 0x8000_0001);
    }

    #[test]
    fn hex_parsing() {
        assert_eq!(from_hex("0x47 47"), Some(vec![0x47, 0x47]));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }

    proptest! {
        #[test]
        fn xor_twice_is_identity(data in prop::collection::vec(any::<u8>(), 0..200), key in prop::collection::vec(any::<u8>(), 1..9)) {
            let mut work = data.clone();
            xor(&mut work, &key);
            xor(&mut work, &key);
            prop_assert_eq!(work, data);
        }

        #[test]
        fn rotation_inverts(data in prop::collection::vec(any::<u8>(), 0..64), bits in -70i32..70) {
            for width in [WordWidth::W8, WordWidth::W16, WordWidth::W32, WordWidth::W64] {
                let mut work = data.clone();
                rotate_bits(&mut work, width, bits);
                rotate_bits(&mut work, width, -bits);
                prop_assert_eq!(&work, &data);
            }
        }

        #[test]
        fn differences_cover_exactly_the_changed_bytes(a in prop::collection::vec(any::<u8>(), 0..100), flips in prop::collection::vec(0usize..100, 0..10)) {
            let mut b = a.clone();
            for f in flips { if f < b.len() { b[f] ^= 0x55; } }
            let runs = differences(&a, &b);
            for i in 0..a.len() {
                let inside = runs.iter().any(|r| r.contains(&(i as u64)));
                prop_assert_eq!(inside, a[i] != b[i]);
            }
        }

        #[test]
        fn search_agrees_with_a_naive_scan(hay in prop::collection::vec(0u8..3, 0..80), needle in prop::collection::vec(0u8..3, 1..4)) {
            let naive: Vec<u64> = (0..hay.len()).filter(|&i| hay[i..].starts_with(&needle)).map(|i| i as u64).collect();
            prop_assert_eq!(search(&hay, &needle), naive);
        }
    }
}
