use super::*;
use crate::codec;
use crate::error::Error;
use crate::gguf::Gguf;
use crate::types::GgmlType;
use crate::value::Value;
use crate::writer::{GgufWriter, TensorSpec};

/// A small deterministic sequence of values in about -1..1.
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn file(
    metadata: &[(&str, Value)],
    tensors: Vec<(String, Vec<u64>, GgmlType, Vec<f32>)>,
) -> Vec<u8> {
    let mut w = GgufWriter::new();
    for (k, v) in metadata {
        w.set(*k, v.clone());
    }
    for (name, dims, t, v) in tensors {
        let bytes = codec::quantize(t, &v).unwrap();
        w.add_tensor(TensorSpec::from_bytes(name, dims, t, bytes));
    }
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    out
}

const N_EMBD: u64 = 32;
const N_IN: u64 = 64;

fn base_model() -> Vec<u8> {
    file(
        &[
            ("general.architecture", Value::from("toy")),
            ("toy.block_count", Value::U32(2)),
            ("toy.embedding_length", Value::U32(N_EMBD as u32)),
        ],
        vec![
            (
                "token_embd.weight".into(),
                vec![N_EMBD, 10],
                GgmlType::Q8_0,
                values(1, 320),
            ),
            (
                "blk.0.attn_output.weight".into(),
                vec![N_IN, N_EMBD],
                GgmlType::F32,
                values(2, 2048),
            ),
            (
                "blk.1.attn_output.weight".into(),
                vec![N_IN, N_EMBD],
                GgmlType::Q8_0,
                values(3, 2048),
            ),
            (
                "blk.0.attn_q.weight".into(),
                vec![N_EMBD, N_IN],
                GgmlType::F32,
                values(4, 2048),
            ),
            (
                "blk.1.attn_q.weight".into(),
                vec![N_EMBD, N_IN],
                GgmlType::Q8_0,
                values(5, 2048),
            ),
        ],
    )
}

fn adapter(arch: &str, tensors: Vec<(String, Vec<u64>, GgmlType, Vec<f32>)>) -> Vec<u8> {
    file(
        &[
            ("general.architecture", Value::from(arch)),
            ("general.type", Value::from("adapter")),
            ("adapter.type", Value::from("lora")),
            ("adapter.lora.alpha", Value::F32(4.0)),
        ],
        tensors,
    )
}

fn lora_pair(
    target: &str,
    rank: u64,
    n_in: u64,
    n_out: u64,
) -> Vec<(String, Vec<u64>, GgmlType, Vec<f32>)> {
    vec![
        (
            format!("{target}.lora_a"),
            vec![n_in, rank],
            GgmlType::F32,
            values(7, (n_in * rank) as usize),
        ),
        (
            format!("{target}.lora_b"),
            vec![rank, n_out],
            GgmlType::F32,
            values(8, (rank * n_out) as usize),
        ),
    ]
}

fn dequantized(bytes: &[u8], name: &str) -> Vec<f32> {
    let gguf = Gguf::parse(bytes).unwrap();
    let t = gguf.tensor(name).unwrap();
    codec::dequantize_tensor(&gguf, t, 0..t.n_elements).unwrap()
}

#[test]
fn a_lora_merge_adds_the_scaled_product_and_requantizes_to_the_same_type() {
    let base = base_model();
    let mut tensors = lora_pair("blk.0.attn_q.weight", 2, N_EMBD, N_IN);
    tensors.extend(lora_pair("blk.1.attn_q.weight", 2, N_EMBD, N_IN));
    let adapter_bytes = adapter("toy", tensors);
    let plan = plan_lora_merge(
        &Gguf::parse(&base).unwrap(),
        &Gguf::parse(&adapter_bytes).unwrap(),
        "abc",
        0.5,
    )
    .unwrap();
    assert_eq!(plan.tensors.len(), 2);
    // alpha 4, rank 2, scale 0.5: factor 1.
    assert!(plan.tensors.iter().all(|t| t.factor == 1.0 && t.rank == 2));
    let a = values(7, (N_EMBD * 2) as usize);
    let b = values(8, (2 * N_IN) as usize);
    for (report, rewrite) in plan.tensors.iter().zip(&plan.rewrites) {
        let w = dequantized(&base, &report.name);
        let mut expected = w.clone();
        for o in 0..N_IN as usize {
            for i in 0..N_EMBD as usize {
                let mut d = 0f32;
                for k in 0..2 {
                    d += b[o * 2 + k] * a[k * N_EMBD as usize + i];
                }
                expected[o * N_EMBD as usize + i] += d;
            }
        }
        let want = codec::quantize(report.ggml_type, &expected).unwrap();
        assert_eq!(rewrite.bytes, want, "{}", report.name);
        if report.ggml_type == GgmlType::F32 {
            assert_eq!(report.requantization.rms, 0.0);
        } else {
            assert!(report.requantization.rms > 0.0);
        }
    }
}

#[test]
fn bad_adapters_are_refused_with_typed_errors() {
    let base = base_model();
    let plan = |bytes: &[u8]| {
        plan_lora_merge(
            &Gguf::parse(&base).unwrap(),
            &Gguf::parse(bytes).unwrap(),
            "x",
            1.0,
        )
    };
    let mut only_a = lora_pair("blk.0.attn_q.weight", 2, N_EMBD, N_IN);
    only_a.pop();
    assert!(matches!(
        plan(&adapter("toy", only_a)),
        Err(Error::MissingLoraPair { missing, .. }) if missing == "blk.0.attn_q.weight.lora_b"
    ));
    assert!(matches!(
        plan(&adapter(
            "llama",
            lora_pair("blk.0.attn_q.weight", 2, N_EMBD, N_IN)
        )),
        Err(Error::AdapterMismatch(_))
    ));
    assert!(matches!(
        plan(&adapter(
            "toy",
            lora_pair("blk.0.attn_q.weight", 2, N_IN, N_EMBD)
        )),
        Err(Error::AdapterMismatch(_))
    ));
    assert!(matches!(
        plan(&adapter(
            "toy",
            lora_pair("blk.5.attn_q.weight", 2, N_EMBD, N_IN)
        )),
        Err(Error::AdapterMismatch(_))
    ));
    let not_adapter = file(
        &[("general.architecture", Value::from("toy"))],
        lora_pair("blk.0.attn_q.weight", 2, N_EMBD, N_IN),
    );
    assert!(matches!(plan(&not_adapter), Err(Error::NotAnAdapter(_))));
}

fn unit_direction(seed: u64) -> Vec<f32> {
    let v = values(seed, N_EMBD as usize);
    let n = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    v.iter().map(|x| (f64::from(*x) / n) as f32).collect()
}

#[test]
fn ablation_removes_the_direction_from_writers_and_embeddings() {
    let base = base_model();
    let gguf = Gguf::parse(&base).unwrap();
    let r = unit_direction(11);
    let plan = plan_ablation(
        &gguf,
        &Directions::Single(r.clone()),
        &AblationOptions::default(),
    )
    .unwrap();
    let names: Vec<&str> = plan.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "token_embd.weight",
            "blk.0.attn_output.weight",
            "blk.1.attn_output.weight"
        ]
    );
    assert!(plan.notes.iter().any(|n| n.contains("tied")));
    // The F32 writer: exactly (I - r rᵀ) W, in f64, rounded once.
    let w = dequantized(&base, "blk.0.attn_output.weight");
    let (n_in, n_out) = (N_IN as usize, N_EMBD as usize);
    let mut expected = w.clone();
    for i in 0..n_in {
        let c: f64 = (0..n_out)
            .map(|o| f64::from(r[o]) * f64::from(w[o * n_in + i]))
            .sum();
        for o in 0..n_out {
            expected[o * n_in + i] = (f64::from(w[o * n_in + i]) - f64::from(r[o]) * c) as f32;
        }
    }
    let got = codec::dequantize(GgmlType::F32, &plan.rewrites[1].bytes).unwrap();
    for (g, e) in got.iter().zip(&expected) {
        assert!((g - e).abs() <= 1e-6 * e.abs().max(1.0), "{g} vs {e}");
    }
    for t in &plan.tensors {
        assert!(
            t.component_before > 0.1,
            "{}: {}",
            t.name,
            t.component_before
        );
        assert!(
            t.component_exact * 1000.0 < t.component_before,
            "{}: {} -> {}",
            t.name,
            t.component_before,
            t.component_exact
        );
        assert!(t.component_after <= 3.0 * t.noise_floor + 1e-5, "{t:?}");
    }
}

#[test]
fn norm_preserving_ablation_keeps_every_written_vector_norm() {
    let base = base_model();
    let gguf = Gguf::parse(&base).unwrap();
    let options = AblationOptions {
        norm_preserve: true,
        kinds: Some(vec!["attn_output".into()]),
        layers: Some(0..1),
        ..AblationOptions::default()
    };
    let plan = plan_ablation(&gguf, &Directions::Single(unit_direction(12)), &options).unwrap();
    assert_eq!(plan.tensors.len(), 1);
    let w = dequantized(&base, "blk.0.attn_output.weight");
    let got = codec::dequantize(GgmlType::F32, &plan.rewrites[0].bytes).unwrap();
    let (n_in, n_out) = (N_IN as usize, N_EMBD as usize);
    for i in 0..n_in {
        let norm = |m: &[f32]| {
            (0..n_out)
                .map(|o| f64::from(m[o * n_in + i]).powi(2))
                .sum::<f64>()
                .sqrt()
        };
        assert!((norm(&w) - norm(&got)).abs() < 1e-5, "column {i}");
    }
    assert!(plan.tensors[0].component_exact < 1e-4);
}

#[test]
fn bad_directions_and_layers_are_refused() {
    let base = base_model();
    let gguf = Gguf::parse(&base).unwrap();
    let options = AblationOptions::default();
    assert!(matches!(
        plan_ablation(&gguf, &Directions::Single(vec![1.0; 31]), &options),
        Err(Error::DirectionLength {
            found: 31,
            expected: 32,
            ..
        })
    ));
    let out_of_range = AblationOptions {
        layers: Some(1..3),
        ..AblationOptions::default()
    };
    assert!(matches!(
        plan_ablation(&gguf, &Directions::Single(unit_direction(1)), &out_of_range),
        Err(Error::LayersOutOfRange {
            start: 1,
            end: 3,
            blocks: 2
        })
    ));
    let dir = tempfile::tempdir().unwrap();
    let zero = dir.path().join("zero.npy");
    codec::write_tensor_npy(&zero, &[N_EMBD], &vec![0.0; N_EMBD as usize]).unwrap();
    assert!(matches!(
        read_directions(&zero, N_EMBD),
        Err(Error::ZeroDirection(_))
    ));
    let short = dir.path().join("short.npy");
    codec::write_tensor_npy(&short, &[3], &[1.0, 2.0, 3.0]).unwrap();
    assert!(matches!(
        read_directions(&short, N_EMBD),
        Err(Error::DirectionLength { found: 3, .. })
    ));
    let per_layer = dir.path().join("layers.npy");
    codec::write_tensor_npy(&per_layer, &[N_EMBD, 2], &values(3, 64)).unwrap();
    let Directions::PerLayer(map) = read_directions(&per_layer, N_EMBD).unwrap() else {
        panic!("two rows are per-layer directions");
    };
    assert_eq!(map.len(), 2);
}

/// A legacy importance matrix file naming `entries` (tensor, weights).
fn legacy_imatrix(entries: &[(&str, Vec<f32>)]) -> crate::imatrix::ImportanceMatrix {
    let mut b = (entries.len() as i32).to_le_bytes().to_vec();
    for (name, w) in entries {
        b.extend((name.len() as i32).to_le_bytes());
        b.extend(name.as_bytes());
        b.extend(1i32.to_le_bytes());
        b.extend((w.len() as i32).to_le_bytes());
        b.extend(w.iter().flat_map(|v| v.to_le_bytes()));
    }
    crate::imatrix::ImportanceMatrix::parse(&b).unwrap()
}

#[test]
fn a_lora_merge_with_an_imatrix_requantizes_the_targets_it_names_with_their_weights() {
    let metadata = [
        ("general.architecture", Value::from("toy")),
        ("toy.block_count", Value::U32(2)),
        ("toy.embedding_length", Value::U32(N_EMBD as u32)),
    ];
    let target = |l: u64, t: GgmlType| {
        let name = format!("blk.{l}.attn_q.weight");
        (
            name,
            vec![N_EMBD, N_IN],
            t,
            values(20 + l, (N_EMBD * N_IN) as usize),
        )
    };
    let base = file(
        &metadata,
        vec![target(0, GgmlType::Q4_1), target(1, GgmlType::Q5_0)],
    );
    let mut tensors = lora_pair("blk.0.attn_q.weight", 2, N_EMBD, N_IN);
    tensors.extend(lora_pair("blk.1.attn_q.weight", 2, N_EMBD, N_IN));
    let adapter_bytes = adapter("toy", tensors);
    let (base_gguf, adapter_gguf) = (
        Gguf::parse(&base).unwrap(),
        Gguf::parse(&adapter_bytes).unwrap(),
    );
    let importance: Vec<f32> = (0..N_EMBD).map(|i| 0.1 + (i % 4) as f32 * 3.0).collect();
    let matrix = legacy_imatrix(&[("blk.0.attn_q.weight", importance.clone())]);
    let weighted =
        plan_lora_merge_weighted(&base_gguf, &adapter_gguf, "abc", 0.5, Some(&matrix)).unwrap();
    let plain = plan_lora_merge(&base_gguf, &adapter_gguf, "abc", 0.5).unwrap();
    // Both plans mean the same values; the named target is quantized with its weights,
    // the other as without a matrix.
    for ((report, w), p) in weighted
        .tensors
        .iter()
        .zip(&weighted.rewrites)
        .zip(&plain.rewrites)
    {
        if report.name == "blk.0.attn_q.weight" {
            assert_ne!(w.bytes, p.bytes, "the weights changed nothing");
        } else {
            assert_eq!(
                w.bytes, p.bytes,
                "{} is not named by the matrix",
                report.name
            );
        }
    }
    // The weighted bytes are quantize_weighted of the merged values.
    let a = values(7, (N_EMBD * 2) as usize);
    let b = values(8, (2 * N_IN) as usize);
    let mut expected = dequantized(&base, "blk.0.attn_q.weight");
    for o in 0..N_IN as usize {
        for i in 0..N_EMBD as usize {
            let mut d = 0f32;
            for k in 0..2 {
                d += b[o * 2 + k] * a[k * N_EMBD as usize + i];
            }
            expected[o * N_EMBD as usize + i] += d;
        }
    }
    let want =
        codec::quantize_weighted(GgmlType::Q4_1, &expected, N_EMBD as usize, &importance).unwrap();
    assert_eq!(weighted.rewrites[0].bytes, want);
    // A matrix of another model is refused.
    let foreign = legacy_imatrix(&[("blk.0.attn_q.weight", vec![1.0; 16])]);
    assert!(matches!(
        plan_lora_merge_weighted(&base_gguf, &adapter_gguf, "abc", 0.5, Some(&foreign)),
        Err(Error::ImatrixMismatch { .. })
    ));
}

#[test]
fn an_ablation_with_an_imatrix_of_another_model_is_refused() {
    let base = base_model();
    let gguf = Gguf::parse(&base).unwrap();
    let options = AblationOptions {
        imatrix: Some(std::sync::Arc::new(legacy_imatrix(&[(
            "blk.0.attn_output.weight",
            vec![1.0; 8],
        )]))),
        ..AblationOptions::default()
    };
    assert!(matches!(
        plan_ablation(&gguf, &Directions::Single(unit_direction(12)), &options),
        Err(Error::ImatrixMismatch { .. })
    ));
}

#[test]
fn an_ablation_with_an_imatrix_quantizes_the_tensors_it_names_with_their_weights() {
    let metadata = [
        ("general.architecture", Value::from("toy")),
        ("toy.block_count", Value::U32(2)),
        ("toy.embedding_length", Value::U32(N_EMBD as u32)),
    ];
    let writer = |l: u64| {
        (
            format!("blk.{l}.attn_output.weight"),
            vec![N_IN, N_EMBD],
            GgmlType::Q5_0,
            values(40 + l, (N_IN * N_EMBD) as usize),
        )
    };
    let base = file(&metadata, vec![writer(0), writer(1)]);
    let gguf = Gguf::parse(&base).unwrap();
    let importance: Vec<f32> = (0..N_IN).map(|i| 0.05 + (i % 5) as f32 * 2.0).collect();
    let direction = Directions::Single(unit_direction(12));
    let plain = plan_ablation(&gguf, &direction, &AblationOptions::default()).unwrap();
    let options = AblationOptions {
        imatrix: Some(std::sync::Arc::new(legacy_imatrix(&[(
            "blk.1.attn_output.weight",
            importance,
        )]))),
        ..AblationOptions::default()
    };
    let weighted = plan_ablation(&gguf, &direction, &options).unwrap();
    assert_eq!(plain.rewrites.len(), 2);
    assert_eq!(weighted.rewrites.len(), 2);
    for (w, p) in weighted.rewrites.iter().zip(&plain.rewrites) {
        assert_eq!(w.name, p.name);
        if w.name == "blk.1.attn_output.weight" {
            assert_ne!(w.bytes, p.bytes, "the weights changed nothing");
        } else {
            assert_eq!(w.bytes, p.bytes, "{} is not named by the matrix", w.name);
        }
    }
}
