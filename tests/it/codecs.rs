//! The codecs against gguf-py (`gguf.quants`), bit for bit: dequantization of random
//! blocks of every type both handle and of every tensor of the real model, and
//! quantization of random and edge-case inputs for every type gguf-py quantizes.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;

use byte_tier::{GgmlType, MappedFile, codec};
use sha2::{Digest, Sha256};

use crate::support;

/// Types whose dequantization is compared with gguf-py on random blocks.
const DEQUANT_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::F64,
    GgmlType::I8,
    GgmlType::I16,
    GgmlType::I32,
    GgmlType::I64,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
    GgmlType::MXFP4,
    GgmlType::TQ1_0,
    GgmlType::TQ2_0,
    GgmlType::IQ1_S,
    GgmlType::IQ1_M,
    GgmlType::IQ2_XXS,
    GgmlType::IQ2_XS,
    GgmlType::IQ2_S,
    GgmlType::IQ3_XXS,
    GgmlType::IQ3_S,
];

/// The grid IQ types: tested on more blocks, so that random indices reach every point of
/// their grids (the largest, 2048 points, gets 32768 draws: missing one point has odds
/// near 1e-7 per point, and the seed is fixed).
const GRID_TYPES: &[GgmlType] = &[
    GgmlType::IQ1_S,
    GgmlType::IQ1_M,
    GgmlType::IQ2_XXS,
    GgmlType::IQ2_XS,
    GgmlType::IQ2_S,
    GgmlType::IQ3_XXS,
    GgmlType::IQ3_S,
];

/// Types gguf-py quantizes that we quantize too.
const QUANT_TYPES: &[GgmlType] = &[
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::MXFP4,
    GgmlType::TQ1_0,
    GgmlType::TQ2_0,
];

/// gguf-py's dequantization of a flat byte file; the plain integer and F64 types, which
/// gguf.quants leaves to numpy, are converted with numpy's astype.
const DEQUANT_SCRIPT: &str = r#"
import sys
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
path, name = sys.argv[1], sys.argv[2]
raw = np.fromfile(path, dtype=np.uint8)
plain = {"F64": "<f8", "I8": "i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}
if name in plain:
    out = raw.view(plain[name]).astype(np.float32)
else:
    out = dequantize(raw, T[name])
sys.stdout.buffer.write(np.ascontiguousarray(out, dtype="<f4").tobytes())
"#;

const QUANT_SCRIPT: &str = r#"
import sys
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize
path, name = sys.argv[1], sys.argv[2]
values = np.fromfile(path, dtype="<f4")
out = quantize(values, T[name])
sys.stdout.buffer.write(np.ascontiguousarray(out).view(np.uint8).tobytes())
"#;

/// A small deterministic generator (SplitMix64), so every run tests the same data.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }

    /// Roughly normal (sum of four uniforms).
    fn normal(&mut self) -> f32 {
        (self.unit() + self.unit() + self.unit() + self.unit()) * 0.5
    }
}

/// Byte offsets of the f16 scale fields in a block of `t`.
fn f16_fields(t: GgmlType) -> &'static [usize] {
    use GgmlType as T;
    match t {
        T::Q4_0 | T::Q5_0 | T::Q8_0 | T::IQ4_NL | T::IQ4_XS => &[0],
        T::Q4_1 | T::Q5_1 | T::Q4_K | T::Q5_K => &[0, 2],
        T::Q2_K => &[80, 82],
        T::Q3_K => &[108],
        T::Q6_K => &[208],
        T::TQ1_0 => &[52],
        T::TQ2_0 => &[64],
        T::F16 => &[0],
        T::IQ1_S | T::IQ2_XXS | T::IQ2_XS | T::IQ2_S | T::IQ3_XXS | T::IQ3_S => &[0],
        _ => &[],
    }
}

/// Random blocks of `t` whose f16 fields are finite (any finite f16, subnormals and
/// the largest included) and whose F64 elements are finite.
fn random_blocks(t: GgmlType, n_blocks: usize, rng: &mut Rng) -> Vec<u8> {
    let block_bytes = t.block_bytes() as usize;
    let mut data = rng.bytes(n_blocks * block_bytes);
    for block in data.chunks_exact_mut(block_bytes) {
        for &at in f16_fields(t) {
            if block[at + 1] & 0x7c == 0x7c {
                block[at + 1] &= !0x40;
            }
        }
        if t == GgmlType::F64 && block[7] & 0x7f == 0x7f && block[6] & 0xf0 == 0xf0 {
            block[7] &= !0x40;
        }
        // IQ1_M keeps its f16 scale in the top nibbles of the words at 48..56: exponent
        // bits 10 and 11 are bits 6 and 7 of byte 53, bits 12..14 are bits 4..6 of byte 55.
        if t == GgmlType::IQ1_M && block[53] & 0xc0 == 0xc0 && block[55] & 0x70 == 0x70 {
            block[55] &= !0x40;
        }
    }
    data
}

fn temp_file(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().expect("temp file");
    file.write_all(bytes).expect("write temp file");
    file.flush().expect("flush temp file");
    file
}

fn oracle_dequantize(t: GgmlType, data: &[u8]) -> Vec<u32> {
    let file = temp_file(data);
    let out = support::run_python(
        DEQUANT_SCRIPT,
        &[file.path().as_os_str(), OsStr::new(t.name())],
    );
    out.chunks_exact(4)
        .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
        .collect()
}

fn oracle_quantize(t: GgmlType, values: &[f32]) -> Vec<u8> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let file = temp_file(&bytes);
    support::run_python(
        QUANT_SCRIPT,
        &[file.path().as_os_str(), OsStr::new(t.name())],
    )
}

fn first_difference<T: PartialEq + Copy>(a: &[T], b: &[T]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

#[test]
fn dequantize_random_blocks_matches_gguf_py_bit_for_bit() {
    let mut rng = Rng(0x5eed_0001);
    let mut failures = Vec::new();
    for &t in DEQUANT_TYPES {
        // 64 blocks of the 256-element types, 512 of the 32-element ones, 8192 plain;
        // 1024 blocks of the grid types.
        let n_blocks = if GRID_TYPES.contains(&t) {
            1024
        } else {
            (8192 / t.block_len()) as usize
        };
        let data = random_blocks(t, n_blocks, &mut rng);
        let ours: Vec<u32> = codec::dequantize(t, &data)
            .expect("dequantize")
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let theirs = oracle_dequantize(t, &data);
        if let Some(i) = first_difference(&ours, &theirs) {
            failures.push(format!(
                "{t}: element {i}: ours {:08x?} gguf-py {:08x?} (lengths {} / {})",
                ours.get(i),
                theirs.get(i),
                ours.len(),
                theirs.len()
            ));
        }
    }
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
}

#[test]
fn dequantize_every_tensor_of_the_real_model_matches_gguf_py() {
    let path = support::real_model();
    let script = r#"
import sys, hashlib
import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
reader = GGUFReader(sys.argv[1])
for t in reader.tensors:
    out = dequantize(t.data, t.tensor_type)
    digest = hashlib.sha256(np.ascontiguousarray(out, dtype="<f4").tobytes()).hexdigest()
    print(t.name, t.tensor_type.name, out.size, digest)
"#;
    let out = support::run_python(script, &[path.as_os_str()]);
    let theirs: BTreeMap<String, String> = String::from_utf8(out)
        .expect("utf-8")
        .lines()
        .map(|line| {
            let (name, rest) = line.split_once(' ').expect("name");
            (name.to_owned(), rest.to_owned())
        })
        .collect();

    let file = MappedFile::open(&path).expect("open model");
    let gguf = file.parse().expect("parse model");
    assert_eq!(gguf.tensors().len(), theirs.len());
    let mut types = BTreeMap::new();
    let mut failures = Vec::new();
    for tensor in gguf.tensors() {
        let values =
            codec::dequantize(tensor.ggml_type, gguf.tensor_data(tensor)).expect("dequantize");
        let mut hasher = Sha256::new();
        for chunk in values.chunks(4096) {
            let bytes: Vec<u8> = chunk.iter().flat_map(|v| v.to_le_bytes()).collect();
            hasher.update(&bytes);
        }
        let digest: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let ours = format!("{} {} {digest}", tensor.ggml_type, values.len());
        *types.entry(tensor.ggml_type).or_insert(0) += 1;
        if theirs.get(&tensor.name) != Some(&ours) {
            failures.push(format!(
                "{}: ours {ours}, gguf-py {:?}",
                tensor.name,
                theirs.get(&tensor.name)
            ));
        }
    }
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
    // The model must have exercised the five types it is known to hold.
    for t in [
        GgmlType::F32,
        GgmlType::Q8_0,
        GgmlType::Q5_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ] {
        assert!(
            types.contains_key(&t),
            "no {t} tensor in the real model: {types:?}"
        );
    }
}

/// Inputs for the quantizers: random data at several magnitudes and edge cases.
fn quantize_cases() -> Vec<(&'static str, Vec<f32>)> {
    let mut rng = Rng(0x5eed_0002);
    let n = 4096;
    let mut cases: Vec<(&'static str, Vec<f32>)> = vec![
        ("weights", (0..n).map(|_| rng.normal() * 0.02).collect()),
        ("uniform", (0..n).map(|_| rng.unit()).collect()),
        ("zeros", vec![0.0; 512]),
        ("negative zeros", vec![-0.0; 512]),
        ("positive constant", vec![0.5; 512]),
        ("negative constant", vec![-3.0; 512]),
        ("large", (0..n).map(|_| rng.unit() * 60000.0).collect()),
        ("small", (0..n).map(|_| rng.unit() * 1e-6).collect()),
        ("tiny", (0..n).map(|_| rng.unit() * 1e-30).collect()),
        (
            "denormal",
            (0..n).map(|_| rng.unit() * f32::MIN_POSITIVE).collect(),
        ),
        (
            "halves",
            (0..n).map(|i| (i % 33) as f32 * 0.5 - 8.0).collect(),
        ),
        (
            "integers",
            (0..n).map(|i| ((i * 7919) % 255) as f32 - 127.0).collect(),
        ),
    ];
    // Magnitude ties with opposite signs: the first one found must win.
    let mut ties = vec![0.25f32; 512];
    for (i, v) in ties.iter_mut().enumerate() {
        if i % 32 == 3 {
            *v = -1.0;
        } else if i % 32 == 17 {
            *v = 1.0;
        }
    }
    cases.push(("ties", ties));
    // A single outlier per block.
    let mut outliers: Vec<f32> = (0..n).map(|_| rng.normal() * 0.01).collect();
    for v in outliers.iter_mut().step_by(37) {
        *v = 5.0;
    }
    cases.push(("outliers", outliers));
    cases
}

#[test]
fn quantize_matches_gguf_py_bit_for_bit() {
    let mut failures = Vec::new();
    for (case, values) in quantize_cases() {
        for &t in QUANT_TYPES {
            let ours = codec::quantize(t, &values).unwrap_or_else(|e| panic!("{t} {case}: {e}"));
            let theirs = oracle_quantize(t, &values);
            if let Some(i) = first_difference(&ours, &theirs) {
                let block = i / t.block_bytes() as usize;
                failures.push(format!(
                    "{t} {case}: byte {i} (block {block}): ours {:02x?} gguf-py {:02x?}",
                    ours.get(i),
                    theirs.get(i)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "mismatches:\n{}", failures.join("\n"));
}

#[test]
fn npy_round_trips_through_numpy() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A tensor with GGUF dims [ne0 = 5, ne1 = 3, ne2 = 2]: numpy must see shape (2, 3, 5)
    // with ne0 as the fastest axis.
    let dims = [5u64, 3, 2];
    let values: Vec<f32> = (0..30).map(|i| i as f32 * 0.25 - 3.0).collect();
    let ours = dir.path().join("ours.npy");
    codec::write_tensor_npy(&ours, &dims, &values).expect("write npy");
    let script = r#"
import sys
import numpy as np
a = np.load(sys.argv[1])
assert a.dtype == np.float32, a.dtype
assert a.shape == (2, 3, 5), a.shape
assert a[1, 2, 4] == 29 * 0.25 - 3.0
assert a[0, 1, 0] == 5 * 0.25 - 3.0
out = sys.argv[2]
np.save(out + "/f32.npy", (a * 2).astype(np.float32))
np.save(out + "/f16.npy", a.astype(np.float16))
np.save(out + "/f64.npy", a.astype(np.float64) / 3)
np.save(out + "/big.npy", a.astype(">f4"))
np.save(out + "/vector.npy", np.arange(7, dtype=np.float32))
print("ok")
"#;
    let out = support::run_python(script, &[ours.as_os_str(), dir.path().as_os_str()]);
    assert_eq!(String::from_utf8_lossy(&out).trim(), "ok");

    let read = |name: &str| codec::read_npy_file(&dir.path().join(name)).expect(name);
    let f32s = read("f32.npy");
    assert_eq!(f32s.shape, vec![2, 3, 5]);
    assert_eq!(f32s.gguf_dims(), dims.to_vec());
    assert_eq!(
        f32s.values,
        values.iter().map(|v| v * 2.0).collect::<Vec<_>>()
    );
    // Multiples of 0.25 below 8 are exact in f16.
    assert_eq!(read("f16.npy").values, values);
    let thirds: Vec<f32> = values
        .iter()
        .map(|v| (f64::from(*v) / 3.0) as f32)
        .collect();
    assert_eq!(read("f64.npy").values, thirds);
    assert_eq!(read("big.npy").values, values);
    let vector = read("vector.npy");
    assert_eq!(vector.shape, vec![7]);
    assert_eq!(vector.values, (0..7).map(|i| i as f32).collect::<Vec<_>>());
}

/// Elements of each tensor whose requantization is also compared with gguf-py's.
const REQUANT_SAMPLE: usize = 1 << 16;

#[test]
fn requantizing_the_real_models_q8_0_and_q5_0_tensors_gives_their_bytes_back() {
    // ggml's Q8_0 and Q5_0 quantizers leave, in every block, an element at the extreme
    // code (+-127, or code 0 for Q5_0), so dequantized values requantize to the same
    // scale and codes: the whole tensor must come back byte for byte.
    let path = support::real_model();
    let file = MappedFile::open(&path).expect("open model");
    let gguf = file.parse().expect("parse model");
    let mut checked = BTreeMap::new();
    let mut samples = Vec::new();
    for tensor in gguf.tensors() {
        let t = tensor.ggml_type;
        if t != GgmlType::Q8_0 && t != GgmlType::Q5_0 {
            continue;
        }
        let data = gguf.tensor_data(tensor);
        let values = codec::dequantize(t, data).expect("dequantize");
        let again = codec::quantize(t, &values).expect("quantize");
        let bb = t.block_bytes() as usize;
        let bad = again
            .chunks(bb)
            .zip(data.chunks(bb))
            .position(|(a, b)| a != b);
        assert_eq!(bad, None, "{}: first differing block", tensor.name);
        *checked.entry(t).or_insert(0) += 1;
        let n = values.len().min(REQUANT_SAMPLE);
        samples.push((
            tensor.name.clone(),
            t,
            values[..n].to_vec(),
            again[..n / 32 * bb].to_vec(),
        ));
    }
    assert!(checked.get(&GgmlType::Q8_0) > Some(&0) && checked.get(&GgmlType::Q5_0) > Some(&0));

    // gguf-py quantizes the same dequantized values to the same bytes.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut list = String::new();
    for (i, (name, t, values, _)) in samples.iter().enumerate() {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(dir.path().join(format!("{i}.f32")), bytes).expect("write sample");
        list.push_str(&format!("{i} {} {name}\n", t.name()));
    }
    std::fs::write(dir.path().join("list"), list).expect("write list");
    let script = r#"
import sys, os
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize
d = sys.argv[1]
for line in open(os.path.join(d, "list")):
    i, name, _ = line.split(" ", 2)
    values = np.fromfile(os.path.join(d, i + ".f32"), dtype="<f4")
    quantize(values, T[name]).tofile(os.path.join(d, i + ".q"))
"#;
    support::run_python(script, &[dir.path().as_os_str()]);
    for (i, (name, t, _, ours)) in samples.iter().enumerate() {
        let theirs = std::fs::read(dir.path().join(format!("{i}.q"))).expect("read gguf-py output");
        assert!(
            theirs == *ours,
            "{name} ({t}): gguf-py's requantization differs"
        );
    }
}

#[test]
fn the_real_model_scans_clean_and_errors_name_the_tensor() {
    let path = support::real_model();
    let file = MappedFile::open(&path).expect("open model");
    let gguf = file.parse().expect("parse model");
    for tensor in gguf.tensors() {
        let report = codec::scan_tensor(&gguf, tensor).expect("scan");
        assert!(report.is_clean(), "{}: {report:?}", tensor.name);
    }
    let tensor = gguf
        .tensors()
        .iter()
        .find(|t| t.ggml_type == GgmlType::Q4_K)
        .expect("a Q4_K tensor");
    let err = codec::dequantize_tensor(&gguf, tensor, 0..100).unwrap_err();
    // The tensor's name is on the outer error, the range on its source.
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    assert!(
        text.contains(&tensor.name) && text.contains("0..100") && text.contains("Q4_K"),
        "{text}"
    );
    let head = codec::dequantize_tensor(&gguf, tensor, 256..512).expect("dequantize");
    let whole = codec::dequantize(GgmlType::Q4_K, gguf.tensor_data(tensor)).expect("whole");
    assert_eq!(head, whole[256..512]);
}
