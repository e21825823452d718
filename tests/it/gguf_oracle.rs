//! The GGUF reader and writer against gguf-py, both ways, bit for bit.

use std::collections::BTreeMap;
use std::path::Path;

use byte_tier::{
    Array, GgmlType, Gguf, GgufWriter, MappedFile, TensorSpec, Value, ValueRef, ValueType,
};
use serde_json::{Value as Json, json};

use crate::support::run_python;

/// Describes a GGUF file as gguf-py's GGUFReader sees it: alignment, data offset, every
/// field (name, nested types, contents) and every tensor (name, dims, type, elements,
/// bytes, absolute data offset, CRC32 of the data).
const DESCRIBE: &str = r#"
import sys, json, zlib
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
fields = []
for f in r.fields.values():
    if f.name.startswith("GGUF."):
        continue
    fields.append([f.name, [t.name for t in f.types], f.contents()])
tensors = []
for t in r.tensors:
    tensors.append([t.name, [int(d) for d in t.shape], t.tensor_type.name, int(t.n_elements),
                    int(t.n_bytes), int(t.data_offset), zlib.crc32(t.data.tobytes())])
json.dump({"alignment": int(r.alignment), "data_offset": int(r.data_offset),
           "fields": fields, "tensors": tensors}, sys.stdout)
"#;

/// Writes a file with gguf-py's GGUFWriter: every value type, arrays of strings, nested
/// arrays, every tensor type gguf-py can produce (numpy dtypes, its quantizers, raw bytes
/// for the rest) and a custom alignment.
const WRITE_WITH_GGUF_PY: &str = r#"
import sys
import numpy as np
import gguf
from gguf import GGUFWriter, GGUFValueType as VT, GGMLQuantizationType as Q
path = sys.argv[1]
w = GGUFWriter(path, arch="oracle")
w.add_custom_alignment(64)
w.add_uint8("v.u8", 200)
w.add_int8("v.i8", -100)
w.add_uint16("v.u16", 60000)
w.add_int16("v.i16", -30000)
w.add_uint32("v.u32", 4000000000)
w.add_int32("v.i32", -2000000000)
w.add_float32("v.f32", 3.14159)
w.add_uint64("v.u64", 18000000000000000000)
w.add_int64("v.i64", -9000000000000000000)
w.add_float64("v.f64", -2.718281828459045)
w.add_bool("v.true", True)
w.add_bool("v.false", False)
w.add_string("v.str", "héllo, wörld ✓")
w.add_string("v.empty", "")
w.add_array("a.str", ["a", "", "ünïcode", "x" * 300])
w.add_array("a.i32", [1, -2, 3])
w.add_array("a.f32", [0.5, -1.25, 1e-30])
w.add_array("a.bool", [True, False, True])
w.add_key_value("a.u8", [1, 2, 255], VT.ARRAY, VT.UINT8)
w.add_key_value("a.u64", [1, 2**63], VT.ARRAY, VT.UINT64)
w.add_key_value("a.f64", [1.5, -0.0], VT.ARRAY, VT.FLOAT64)
w.add_array("a.nested", [[1, 2], [3], [4, 5, 6]])
w.add_array("a.nested_str", [["x", "y"], ["z"]])
rng = np.random.default_rng(7)
w.add_tensor("t.f32", rng.standard_normal((3, 64), dtype=np.float32))
w.add_tensor("t.f16", rng.standard_normal((2, 32)).astype(np.float16))
w.add_tensor("t.f64", rng.standard_normal((5,)))
w.add_tensor("t.i8", rng.integers(-128, 127, (7,), dtype=np.int8))
w.add_tensor("t.i16", rng.integers(-1000, 1000, (9,), dtype=np.int16))
w.add_tensor("t.i32", rng.integers(-10**9, 10**9, (11,), dtype=np.int32))
w.add_tensor("t.i64", rng.integers(-10**12, 10**12, (13,), dtype=np.int64))
values = rng.standard_normal((2, 256), dtype=np.float32)
for q in (Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.TQ1_0, Q.TQ2_0, Q.MXFP4):
    data = gguf.quants.quantize(values, q)
    w.add_tensor("t.quantized." + q.name, data, raw_shape=data.shape, raw_dtype=q)
for q in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q8_K, Q.IQ2_XXS, Q.IQ2_XS, Q.IQ3_XXS,
          Q.IQ1_S, Q.IQ4_NL, Q.IQ3_S, Q.IQ2_S, Q.IQ4_XS, Q.IQ1_M, Q.NVFP4, Q.Q1_0):
    block, size = gguf.GGML_QUANT_SIZES[q]
    raw = rng.integers(0, 256, (2, 256 // block * size), dtype=np.uint8)
    w.add_tensor("t.raw." + q.name, raw, raw_shape=raw.shape, raw_dtype=q)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
"#;

fn describe_with_gguf_py(path: &Path) -> Json {
    let out = run_python(DESCRIBE, &[path.as_os_str()]);
    serde_json::from_slice(&out).expect("the oracle printed invalid JSON")
}

/// gguf-py flattens nested arrays and lists the element types along the first element.
fn flatten(value: &ValueRef<'_>, out: &mut Vec<Json>) {
    match value {
        ValueRef::Array(a) => a.iter().for_each(|v| flatten(&v, out)),
        other => out.push(scalar_json(other)),
    }
}

fn scalar_json(value: &ValueRef<'_>) -> Json {
    match *value {
        ValueRef::U8(v) => json!(v),
        ValueRef::I8(v) => json!(v),
        ValueRef::U16(v) => json!(v),
        ValueRef::I16(v) => json!(v),
        ValueRef::U32(v) => json!(v),
        ValueRef::I32(v) => json!(v),
        ValueRef::F32(v) => json!(f64::from(v)),
        ValueRef::Bool(v) => json!(v),
        ValueRef::String(v) => json!(v.to_string_lossy()),
        ValueRef::U64(v) => json!(v),
        ValueRef::I64(v) => json!(v),
        ValueRef::F64(v) => json!(v),
        ValueRef::Array(_) => unreachable!("arrays are flattened"),
    }
}

/// The value's type followed by its first element's chain, as gguf-py lists types (an
/// empty array lists no element type).
fn type_chain(value: &ValueRef<'_>) -> Vec<Json> {
    let mut types = vec![json!(value.value_type().name())];
    if let Some(first) = value.as_array().and_then(|a| a.iter().next()) {
        types.extend(type_chain(&first));
    }
    types
}

/// Our parse, described the way `DESCRIBE` describes gguf-py's.
fn describe_with_byte_tier(gguf: &Gguf<'_>) -> Json {
    let fields: Vec<Json> = gguf
        .metadata()
        .iter()
        .map(|e| {
            let contents = match e.value {
                ValueRef::Array(_) => {
                    let mut flat = Vec::new();
                    flatten(&e.value, &mut flat);
                    Json::Array(flat)
                }
                scalar => scalar_json(&scalar),
            };
            json!([e.key.to_string(), type_chain(&e.value), contents])
        })
        .collect();
    let tensors: Vec<Json> = gguf
        .tensors()
        .iter()
        .map(|t| {
            json!([
                t.name,
                t.dims,
                t.ggml_type.name(),
                t.n_elements,
                t.n_bytes,
                t.data_offset,
                crc32fast::hash(gguf.tensor_data(t))
            ])
        })
        .collect();
    json!({
        "alignment": gguf.alignment(),
        "data_offset": gguf.data_offset(),
        "fields": fields,
        "tensors": tensors,
    })
}

fn assert_same_description(ours: &Json, theirs: &Json) {
    if ours == theirs {
        return;
    }
    // Point at the first difference rather than dumping two large documents.
    for key in ["alignment", "data_offset"] {
        assert_eq!(ours[key], theirs[key], "{key} differs");
    }
    for list in ["fields", "tensors"] {
        let (a, b) = (
            ours[list].as_array().unwrap(),
            theirs[list].as_array().unwrap(),
        );
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x, y, "{list} entry differs (ours left, gguf-py right)");
        }
        assert_eq!(a.len(), b.len(), "{list} count differs");
    }
    panic!("descriptions differ");
}

#[test]
fn files_written_by_gguf_py_parse_as_its_reader_reports_and_rewrite_identically() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("oracle.gguf");
    run_python(WRITE_WITH_GGUF_PY, &[path.as_os_str()]);
    let theirs = describe_with_gguf_py(&path);

    let file = MappedFile::open(&path).unwrap();
    let gguf = file.parse().unwrap();
    assert_eq!(gguf.alignment(), 64);
    assert!(gguf.diagnostics().is_empty(), "{:?}", gguf.diagnostics());
    assert_same_description(&describe_with_byte_tier(&gguf), &theirs);

    // Parse then write of an unchanged model reproduces it byte for byte.
    let copy = dir.path().join("copy.gguf");
    GgufWriter::from_gguf(&gguf).write_to_path(&copy).unwrap();
    let original = std::fs::read(&path).unwrap();
    let rewritten = std::fs::read(&copy).unwrap();
    assert_eq!(original.len(), rewritten.len());
    assert!(
        original == rewritten,
        "the rewrite differs from gguf-py's file"
    );
}

/// A file covering every value type and every tensor type, written by us.
fn write_everything(path: &Path, alignment: u32) -> BTreeMap<String, Vec<u8>> {
    let mut w = GgufWriter::new();
    w.set_alignment(alignment).unwrap();
    w.set("v.u8", Value::U8(7))
        .set("v.i8", Value::I8(-7))
        .set("v.u16", Value::U16(65535))
        .set("v.i16", Value::I16(-32768))
        .set("v.u32", Value::U32(u32::MAX))
        .set("v.i32", Value::I32(i32::MIN))
        .set("v.f32", Value::F32(-0.1))
        .set("v.bool", Value::Bool(true))
        .set("v.str", "chat {{ template }} ✓")
        .set("v.u64", Value::U64(u64::MAX))
        .set("v.i64", Value::I64(i64::MIN))
        .set("v.f64", Value::F64(1e300))
        .set("a.str", Array::of_strings(["", "b", "ç"]))
        .set(
            "a.nested",
            Array::new(
                ValueType::Array,
                vec![
                    Value::Array(Array::new(
                        ValueType::I16,
                        vec![Value::I16(1), Value::I16(-2)],
                    )),
                    Value::Array(Array::new(ValueType::I16, vec![Value::I16(3)])),
                ],
            ),
        )
        .set(
            "a.bool",
            Array::new(ValueType::Bool, vec![Value::Bool(false), Value::Bool(true)]),
        );
    let mut expected = BTreeMap::new();
    let mut seed = 1u32;
    // gguf-py 0.19 gives Q8_1 40 bytes per block where ggml has 36, and does not know
    // Q2_0: those two are left out of the comparison with it.
    for &t in GgmlType::ALL
        .iter()
        .filter(|t| !matches!(t, GgmlType::Q8_1 | GgmlType::Q2_0))
    {
        let dims = vec![t.block_len() * 2, 3];
        let n = t.bytes_for(dims[0] * dims[1]).unwrap() as usize;
        let bytes: Vec<u8> = (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (seed >> 16) as u8
            })
            .collect();
        let name = format!("t.{}", t.name());
        expected.insert(name.clone(), bytes.clone());
        w.add_tensor(TensorSpec::from_bytes(name, dims, t, bytes));
    }
    w.write_to_path(path).unwrap();
    expected
}

#[test]
fn files_we_write_read_back_identically_through_gguf_py() {
    let dir = tempfile::tempdir().unwrap();
    for alignment in [32, 64, 1] {
        let path = dir.path().join(format!("ours-{alignment}.gguf"));
        let data = write_everything(&path, alignment);
        let file = MappedFile::open(&path).unwrap();
        let gguf = file.parse().unwrap();
        for (name, bytes) in &data {
            let t = gguf.tensor(name).unwrap();
            assert_eq!(gguf.tensor_data(t), &bytes[..], "{name}");
            assert_eq!(t.data_offset % u64::from(alignment), 0);
        }
        assert_same_description(
            &describe_with_byte_tier(&gguf),
            &describe_with_gguf_py(&path),
        );
    }
}

#[test]
fn the_real_model_parses_as_gguf_py_reads_it_and_rewrites_byte_for_byte() {
    let model = crate::support::real_model();
    let file = MappedFile::open(&model).unwrap();
    let gguf = file.parse().unwrap();
    assert_eq!(gguf.tensors().len(), 236);
    assert_eq!(
        gguf.get_array("tokenizer.ggml.tokens").unwrap().len(),
        262_144
    );
    assert_same_description(
        &describe_with_byte_tier(&gguf),
        &describe_with_gguf_py(&model),
    );

    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("copy.gguf");
    let written = GgufWriter::from_gguf(&gguf).write_to_path(&copy).unwrap();
    assert_eq!(written, gguf.file_len());
    let rewritten = MappedFile::open(&copy).unwrap();
    assert!(
        rewritten.bytes() == file.bytes(),
        "the rewrite differs from the model"
    );
}
