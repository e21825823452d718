//! Hostile files: every malformed input gives a typed error with the right offset, and
//! no input panics, allocates without bound or hangs.

use proptest::prelude::*;

use super::*;
use crate::value::{Array, GgufStr, Value};
use crate::writer::{GgufWriter, TensorSpec};

/// A small valid file: a few keys (a string, a string array, a nested array) and three
/// tensors of different types.
fn small_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", "llama")
        .set("k.u32", 7u32)
        .set("k.tokens", Array::of_strings(["a", "bc", ""]))
        .set(
            "k.nested",
            Array::new(
                ValueType::Array,
                vec![Value::Array(Array::new(ValueType::U8, vec![Value::U8(1)]))],
            ),
        );
    w.add_tensor(TensorSpec::from_bytes(
        "a",
        vec![8],
        GgmlType::F32,
        vec![1u8; 32],
    ));
    w.add_tensor(TensorSpec::from_bytes(
        "b",
        vec![32, 2],
        GgmlType::Q8_0,
        vec![2u8; 68],
    ));
    w.add_tensor(TensorSpec::from_bytes(
        "c",
        vec![4],
        GgmlType::F16,
        vec![3u8; 8],
    ));
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    out
}

fn put(bytes: &mut [u8], offset: u64, new: &[u8]) {
    let o = offset as usize;
    bytes[o..o + new.len()].copy_from_slice(new);
}

fn parsed(bytes: &[u8]) -> Gguf<'_> {
    Gguf::parse(bytes).unwrap()
}

#[test]
fn the_small_file_is_valid() {
    let bytes = small_file();
    let g = parsed(&bytes);
    assert_eq!(g.version(), 3);
    assert_eq!(g.metadata().len(), 4);
    assert_eq!(g.tensors().len(), 3);
    assert!(g.diagnostics().is_empty());
    let tokens: Vec<GgufStr<'_>> = g
        .get_array("k.tokens")
        .unwrap()
        .strings()
        .unwrap()
        .collect();
    assert_eq!(tokens, ["a", "bc", ""]);
    assert_eq!(g.get_u64("k.u32").unwrap(), 7);
    assert_eq!(g.tensor_data(g.tensor("b").unwrap()), &[2u8; 68][..]);
}

#[test]
fn truncation_at_every_offset_is_a_typed_error() {
    let bytes = small_file();
    let g = parsed(&bytes);
    let data_end = g
        .tensors()
        .iter()
        .map(|t| t.data_range().end)
        .max()
        .unwrap();
    for len in 0..bytes.len() as u64 {
        let result = Gguf::parse(&bytes[..len as usize]);
        if len < data_end {
            let error = result.expect_err("a truncated file parsed");
            match error {
                Error::Truncated {
                    offset, available, ..
                } => assert_eq!(offset + available, len, "at length {len}"),
                Error::CountTooLarge { offset, .. } => assert!(offset < len),
                Error::TensorOutOfBounds { end, file_len, .. } => {
                    assert!(end > file_len);
                    assert_eq!(file_len, len);
                }
                Error::BadMagic { .. } => assert!(len < 4),
                other => panic!("unexpected error at length {len}: {other}"),
            }
        } else {
            // Only the padding after the last tensor is cut: still a valid file.
            assert!(result.is_ok(), "length {len}");
        }
    }
}

#[test]
fn absurd_counts_are_refused_before_allocating() {
    let bytes = small_file();
    let g = parsed(&bytes);
    let cases: Vec<(u64, &str)> = vec![
        (8, "tensor count"),
        (16, "metadata count"),
        (
            g.entry("general.architecture").unwrap().value_offset,
            "string length",
        ),
        (
            g.entry("k.tokens").unwrap().value_offset + 4,
            "array length",
        ),
        (g.entry("k.u32").unwrap().entry_offset, "key length"),
        (g.tensor("b").unwrap().info_offset, "tensor name length"),
    ];
    for (offset, what) in cases {
        for huge in [u64::MAX, 1 << 40, bytes.len() as u64] {
            let mut bad = bytes.clone();
            put(&mut bad, offset, &huge.to_le_bytes());
            match Gguf::parse(&bad) {
                Err(Error::CountTooLarge {
                    what: w,
                    offset: o,
                    count,
                    ..
                }) => {
                    assert_eq!((w, o, count), (what, offset, huge));
                }
                other => panic!("{what} = {huge}: {other:?}"),
            }
        }
    }
}

#[test]
fn unknown_value_and_tensor_types_are_named() {
    let bytes = small_file();
    let g = parsed(&bytes);
    let mut bad = bytes.clone();
    let at = g.entry("k.u32").unwrap().type_offset;
    put(&mut bad, at, &13u32.to_le_bytes());
    assert!(matches!(
        Gguf::parse(&bad),
        Err(Error::UnknownValueType { type_id: 13, offset }) if offset == at
    ));

    let mut bad = bytes.clone();
    let at = g.entry("k.tokens").unwrap().value_offset;
    put(&mut bad, at, &99u32.to_le_bytes());
    assert!(matches!(
        Gguf::parse(&bad),
        Err(Error::UnknownValueType { type_id: 99, offset }) if offset == at
    ));

    let t = g.tensor("b").unwrap();
    // name (8 + 1) + n_dims (4) + two dims (16) = where the type is.
    let type_at = t.info_offset + 9 + 4 + 16;
    for removed in [4u32, 31, 36, 1000] {
        let mut bad = bytes.clone();
        put(&mut bad, type_at, &removed.to_le_bytes());
        match Gguf::parse(&bad) {
            Err(e @ Error::UnknownTensorType { .. }) => {
                let text = e.to_string();
                assert!(
                    text.contains("\"b\"") && text.contains(&removed.to_string()),
                    "{text}"
                );
            }
            other => panic!("type {removed}: {other:?}"),
        }
    }
}

/// Offset of tensor `name`'s relative data offset field.
fn offset_field(g: &Gguf<'_>, name: &str) -> u64 {
    let t = g.tensor(name).unwrap();
    t.info_offset + 8 + name.len() as u64 + 4 + 8 * t.dims.len() as u64 + 4
}

#[test]
fn misplaced_tensor_data_is_refused() {
    let bytes = small_file();
    let g = parsed(&bytes);
    let field = offset_field(&g, "c");
    let c_relative = g.tensor("c").unwrap().relative_offset;

    let mut bad = bytes.clone();
    put(&mut bad, field, &(c_relative + 4).to_le_bytes());
    assert!(matches!(
        Gguf::parse(&bad),
        Err(Error::MisalignedTensor { ref tensor, alignment: 32, .. }) if tensor == "c"
    ));

    let mut bad = bytes.clone();
    put(&mut bad, field, &0u64.to_le_bytes());
    assert!(matches!(
        Gguf::parse(&bad),
        Err(Error::OverlappingTensors { ref first, ref second, .. }) if first == "a" && second == "c"
    ));

    for past in [1u64 << 20, u64::MAX - 31] {
        let mut bad = bytes.clone();
        put(&mut bad, field, &past.to_le_bytes());
        assert!(matches!(
            Gguf::parse(&bad),
            Err(Error::TensorOutOfBounds { ref tensor, .. }) if tensor == "c"
        ));
    }
}

#[test]
fn holes_and_disorder_are_diagnostics_not_errors() {
    let bytes = small_file();
    let g = parsed(&bytes);
    // Swap the data offsets of a (32 bytes) and c (8 bytes, padded to 32): both still
    // aligned and disjoint, but out of table order.
    let (a, c) = (
        g.tensor("a").unwrap().relative_offset,
        g.tensor("c").unwrap().relative_offset,
    );
    let mut swapped = bytes.clone();
    put(&mut swapped, offset_field(&g, "a"), &c.to_le_bytes());
    put(&mut swapped, offset_field(&g, "c"), &a.to_le_bytes());
    let s = parsed(&swapped);
    assert!(
        matches!(s.diagnostics()[0], LayoutDiagnostic::Hole { ref tensor, .. } if tensor == "a")
    );
    assert!(
        s.diagnostics()
            .iter()
            .any(|d| matches!(d, LayoutDiagnostic::OutOfOrder { .. }))
    );
}

#[test]
fn duplicate_keys_and_tensor_names() {
    let bytes = small_file();
    let g = parsed(&bytes);

    // Rename "k.nested" to "k.tokens" in place (same length): a duplicate key.
    let nested = g.entry("k.nested").unwrap().entry_offset;
    let mut dup = bytes.clone();
    put(&mut dup, nested + 8, b"k.tokens");
    assert!(matches!(
        Gguf::parse(&dup),
        Err(Error::DuplicateKey { ref key, offset }) if key == "k.tokens" && offset == nested
    ));

    // Rename tensor "c" to "a": a duplicate tensor name.
    let c = g.tensor("c").unwrap().info_offset;
    let mut dup = bytes.clone();
    put(&mut dup, c + 8, b"a");
    assert!(matches!(
        Gguf::parse(&dup),
        Err(Error::DuplicateTensor { ref name, offset }) if name == "a" && offset == c
    ));
}

/// Re-encodes a parsed file through the writer.
fn rewritten(g: &Gguf<'_>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    GgufWriter::from_gguf(g).write_to(&mut out)?;
    Ok(out)
}

#[test]
fn a_string_value_that_is_not_utf8_is_kept_byte_for_byte_and_diagnosed() {
    let bytes = small_file();
    let g = parsed(&bytes);
    let mut bad = bytes.clone();
    // "k.tokens" = ["a", "bc", ""]: make element 1 "b\xff".
    let tokens = g.get_array("k.tokens").unwrap();
    let element_1 = tokens.offset() + 8 + 1 + 8;
    put(&mut bad, element_1 + 1, &[0xff]);
    let architecture = g.entry("general.architecture").unwrap().value_offset + 8;
    put(&mut bad, architecture, &[0xc3]);

    let g = parsed(&bad);
    assert_eq!(g.get("general.architecture").unwrap().as_str(), None);
    assert!(matches!(
        g.get_str("general.architecture"),
        Err(Error::InvalidUtf8 { offset }) if offset == architecture
    ));
    let strings: Vec<GgufStr<'_>> = g
        .get_array("k.tokens")
        .unwrap()
        .strings()
        .unwrap()
        .collect();
    assert_eq!(
        strings.len(),
        3,
        "one item per element, so indexes stay token ids"
    );
    assert_eq!(strings[1].as_bytes(), b"b\xff");
    assert_eq!(strings[1].escaped(), r#""b\xff""#);
    assert_eq!(strings[1].to_string_lossy(), "b\u{fffd}");
    assert_eq!(
        g.diagnostics(),
        [
            LayoutDiagnostic::ValueNotUtf8 {
                key: "general.architecture".into(),
                element: None,
                offset: architecture,
            },
            LayoutDiagnostic::ValueNotUtf8 {
                key: "k.tokens".into(),
                element: Some(1),
                offset: element_1,
            },
        ]
    );
    // A rewrite writes both strings back unchanged: here the whole file is the same.
    assert_eq!(rewritten(&g).unwrap(), bad);
}

#[test]
fn a_key_or_tensor_name_that_is_not_utf8_is_read_and_a_rewrite_refuses_to_change_it() {
    let bytes = small_file();
    let g = parsed(&bytes);

    let mut bad_key = bytes.clone();
    let key_at = g.entry("k.u32").unwrap().entry_offset + 8;
    put(&mut bad_key, key_at, &[0xff]);
    let g2 = parsed(&bad_key);
    assert_eq!(g2.get(b"\xff.u32").unwrap().as_u64(), Some(7));
    assert_eq!(
        g2.diagnostics(),
        [LayoutDiagnostic::KeyNotUtf8 {
            key: "\u{fffd}.u32".into(),
            offset: key_at,
        }]
    );
    assert!(
        matches!(rewritten(&g2), Err(Error::NameNotUtf8 { ref what }) if what.contains("offset"))
    );

    let mut bad_name = bytes.clone();
    let name_at = g.tensor("c").unwrap().info_offset + 8;
    put(&mut bad_name, name_at, &[0x80]);
    let g3 = parsed(&bad_name);
    assert_eq!(
        g3.tensor("\u{fffd}").unwrap().n_bytes,
        g.tensor("c").unwrap().n_bytes
    );
    assert!(matches!(
        g3.diagnostics(),
        [LayoutDiagnostic::TensorNameNotUtf8 { index: 2, offset, .. }] if *offset == name_at
    ));
    assert!(matches!(rewritten(&g3), Err(Error::NameNotUtf8 { .. })));
}

#[test]
fn a_boolean_byte_other_than_0_or_1_reads_as_true_and_is_diagnosed() {
    let mut w = GgufWriter::new();
    w.set("flag", false).set(
        "flags",
        Array::new(ValueType::Bool, vec![Value::Bool(false), Value::Bool(true)]),
    );
    let mut file = Vec::new();
    w.write_to(&mut file).unwrap();
    let g = parsed(&file);
    let flag = g.entry("flag").unwrap().value_offset;
    let flags = g.get_array("flags").unwrap().offset();
    put(&mut file, flag, &[2]);
    put(&mut file, flags, &[0x80]);
    let g = parsed(&file);
    assert_eq!(g.get("flag").unwrap().as_bool(), Some(true));
    let flags_read: Vec<_> = g.get_array("flags").unwrap().iter().collect();
    assert_eq!(flags_read, [ValueRef::Bool(true), ValueRef::Bool(true)]);
    assert_eq!(
        g.diagnostics(),
        [
            LayoutDiagnostic::NonBooleanByte {
                key: "flag".into(),
                element: None,
                byte: 2,
                offset: flag,
            },
            LayoutDiagnostic::NonBooleanByte {
                key: "flags".into(),
                element: Some(0),
                byte: 0x80,
                offset: flags,
            },
        ]
    );
}

#[test]
fn diagnostics_past_the_cap_are_counted_in_one() {
    let tokens: Vec<Value> = (0..MAX_DIAGNOSTICS + 5)
        .map(|_| Value::RawString(vec![0xff]))
        .collect();
    let mut w = GgufWriter::new();
    w.set("k.tokens", Array::new(ValueType::String, tokens));
    let mut file = Vec::new();
    w.write_to(&mut file).unwrap();
    let g = parsed(&file);
    assert_eq!(g.diagnostics().len(), MAX_DIAGNOSTICS + 1);
    assert_eq!(
        g.diagnostics().last(),
        Some(&LayoutDiagnostic::More { count: 5 })
    );
}

#[test]
fn invalid_alignment() {
    // The writer refuses a bad alignment outright.
    let mut w = GgufWriter::new();
    w.metadata_mut()
        .push((ALIGNMENT_KEY.into(), Value::U32(48)));
    assert!(matches!(
        w.write_to(&mut Vec::new()),
        Err(Error::InvalidWrite(_))
    ));
    assert!(GgufWriter::new().set_alignment(0).is_err());

    // A file with one is made by patching a valid file in place.
    let mut ok = GgufWriter::new();
    ok.set("x", 1u32).set(ALIGNMENT_KEY, 32u32);
    let mut good = Vec::new();
    ok.write_to(&mut good).unwrap();
    let (type_at, value_at) = {
        let e = parsed(&good).entry(ALIGNMENT_KEY).copied().unwrap();
        (e.type_offset, e.value_offset)
    };
    for (patch_at, patch, expect) in [
        (value_at, 48u32.to_le_bytes(), "power of two"),
        (value_at, 0u32.to_le_bytes(), "power of two"),
        (type_at, ValueType::I32.id().to_le_bytes(), "not UINT32"),
    ] {
        let mut bad = good.clone();
        put(&mut bad, patch_at, &patch);
        match Gguf::parse(&bad) {
            Err(Error::InvalidAlignment { reason, offset }) => {
                assert!(reason.contains(expect), "{reason}");
                assert_eq!(offset, value_at);
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn bad_shapes() {
    let bytes = small_file();
    let g = parsed(&bytes);
    let b = g.tensor("b").unwrap();
    let n_dims_at = b.info_offset + 9;

    let mut bad = bytes.clone();
    put(&mut bad, n_dims_at, &5u32.to_le_bytes());
    assert!(matches!(
        Gguf::parse(&bad),
        Err(Error::TooManyDims { n_dims: 5, offset, .. }) if offset == n_dims_at
    ));

    let mut bad = bytes.clone();
    put(&mut bad, n_dims_at + 4 + 8, &(1u64 << 62).to_le_bytes());
    assert!(matches!(
        Gguf::parse(&bad),
        Err(Error::InvalidShape {
            reason: "element count overflows",
            ..
        })
    ));

    let mut bad = bytes.clone();
    put(&mut bad, n_dims_at + 4, &16u64.to_le_bytes());
    assert!(matches!(
        Gguf::parse(&bad),
        Err(Error::InvalidShape { reason, .. }) if reason.contains("whole number of blocks")
    ));
}

#[test]
fn versions_and_endianness() {
    let bytes = small_file();
    for (version, ok) in [(2u32, true), (3, true), (0, false), (4, false)] {
        let mut v = bytes.clone();
        put(&mut v, 4, &version.to_le_bytes());
        assert_eq!(Gguf::parse(&v).is_ok(), ok, "version {version}");
    }
    let mut be = bytes.clone();
    put(&mut be, 4, &3u32.to_be_bytes());
    assert!(matches!(
        Gguf::parse(&be),
        Err(Error::BigEndian { version: 3 })
    ));
    assert!(matches!(
        Gguf::parse(b"GGML\x03\0\0\0"),
        Err(Error::BadMagic { .. })
    ));
}

#[test]
fn version_1_uses_32_bit_counts() {
    let mut v1 = Vec::new();
    v1.extend_from_slice(b"GGUF");
    v1.extend_from_slice(&1u32.to_le_bytes());
    v1.extend_from_slice(&1u32.to_le_bytes()); // tensors
    v1.extend_from_slice(&1u32.to_le_bytes()); // keys
    v1.extend_from_slice(&4u32.to_le_bytes());
    v1.extend_from_slice(b"name");
    v1.extend_from_slice(&ValueType::String.id().to_le_bytes());
    v1.extend_from_slice(&2u32.to_le_bytes());
    v1.extend_from_slice(b"v1");
    v1.extend_from_slice(&1u32.to_le_bytes());
    v1.extend_from_slice(b"t");
    v1.extend_from_slice(&1u32.to_le_bytes()); // n_dims
    v1.extend_from_slice(&2u32.to_le_bytes()); // ne0
    v1.extend_from_slice(&GgmlType::F32.id().to_le_bytes());
    v1.extend_from_slice(&0u64.to_le_bytes());
    v1.resize(align_up(v1.len() as u64, 32).unwrap() as usize, 0);
    v1.extend_from_slice(&1.5f32.to_le_bytes());
    v1.extend_from_slice(&2.5f32.to_le_bytes());
    let g = parsed(&v1);
    assert_eq!(g.version(), 1);
    assert_eq!(g.get_str("name").unwrap(), "v1");
    assert_eq!(g.tensor("t").unwrap().dims, vec![2]);
    assert_eq!(g.tensor_data(g.tensor("t").unwrap()).len(), 8);
}

#[test]
fn deep_nesting_is_refused() {
    let mut value = Value::U8(1);
    for _ in 0..MAX_ARRAY_DEPTH + 1 {
        value = Value::Array(Array::new(value.value_type(), vec![value]));
    }
    let mut w = GgufWriter::new();
    w.set("deep", value);
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    assert!(matches!(
        Gguf::parse(&out),
        Err(Error::NestingTooDeep { .. })
    ));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_corruption_never_panics(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut bytes = small_file();
        for (index, byte) in flips {
            let i = index.index(bytes.len());
            bytes[i] = byte;
        }
        // Either outcome is fine; a panic fails the test.
        if let Ok(g) = Gguf::parse(&bytes) {
            for t in g.tensors() {
                prop_assert!(t.data_range().end <= bytes.len() as u64);
            }
        }
    }

    #[test]
    fn random_bytes_after_a_valid_prefix_never_panic(tail in prop::collection::vec(any::<u8>(), 0..256), cut in 0usize..200) {
        let mut bytes = small_file();
        bytes.truncate(cut.min(bytes.len()));
        bytes.extend_from_slice(&tail);
        let _ = Gguf::parse(&bytes);
    }
}
