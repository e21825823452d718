//! IQ1_S and IQ1_M quantization against ggml's output.

use super::tests::unit_stream;
use super::*;

/// The inputs of the IQ1 reference vectors: sixteen super-blocks of weight-like,
/// uniform, all-zero, outlier, negative-only, tiny (below IQ1_M's threshold, above
/// IQ1_S's), tied, half-zero, constant, heavy-tailed and sparse values from a fixed-seed
/// generator.
fn iq1_input() -> Vec<f32> {
    let mut unit = unit_stream(0x9e37_79b9_7f4a_7c15u64);
    let mut values = Vec::with_capacity(16 * 256);
    for _ in 0..1024 {
        values.push((unit() + unit() + unit()) * 0.02);
    }
    for _ in 0..256 {
        values.push(unit());
    }
    values.extend([0.0f32; 256]);
    for i in 0..256 {
        values.push(if i == 77 { 40.0 } else { unit() * 0.01 });
    }
    for _ in 0..256 {
        values.push(-(unit().abs() + 0.01));
    }
    for _ in 0..256 {
        values.push(unit() * 1e-9);
    }
    for i in 0..256 {
        values.push(((i * 7) % 5) as f32 * 0.25 - 0.5);
    }
    for i in 0..256 {
        values.push(if (i / 16) % 2 == 0 { 0.0 } else { unit() });
    }
    values.extend([0.3f32; 256]);
    for _ in 0..256 {
        let u = unit();
        values.push(u * u * u * 3.0);
    }
    for i in 0..256 {
        values.push(if i % 29 == 3 { unit() * 5.0 } else { 0.0 });
    }
    for _ in 0..512 {
        values.push((unit() + unit() + unit() + unit()) * 0.5);
    }
    values
}

/// Rows of the reference vectors: four super-blocks, so that rows share weights.
const IQ1_ROW: usize = 1024;

/// Importance weights for one row of [`iq1_input`], some of them zero.
fn iq1_weights() -> Vec<f32> {
    (0..IQ1_ROW)
        .map(|i| {
            if i % 37 == 5 {
                0.0
            } else {
                0.05 + ((i * 7919) % 101) as f32 / 25.0
            }
        })
        .collect()
}

/// Compares ours with ggml's bytes super-block by super-block, naming the first that
/// differs.
fn check_blocks(what: &str, t: GgmlType, ours: &[u8], theirs: &[u8]) {
    assert_eq!(ours.len(), theirs.len(), "{what}");
    let bytes = t.block_bytes() as usize;
    for (b, (o, r)) in ours.chunks(bytes).zip(theirs.chunks(bytes)).enumerate() {
        assert_eq!(o, r, "{what} super-block {b}");
    }
}

#[test]
fn iq1_quants_match_the_reference_vectors() {
    let expected = include_bytes!("test_data/iq1_ref.bin");
    let input = iq1_input();
    let weights = iq1_weights();
    let cases: [(&str, GgmlType, Option<&[f32]>); 3] = [
        ("IQ1_S weighted", GgmlType::IQ1_S, Some(&weights)),
        ("IQ1_M", GgmlType::IQ1_M, None),
        ("IQ1_M weighted", GgmlType::IQ1_M, Some(&weights)),
    ];
    let mut at = 0;
    for (what, t, weights) in cases {
        let ours = match weights {
            Some(w) => quantize_weighted(t, &input, IQ1_ROW, w).unwrap(),
            None => quantize(t, &input).unwrap(),
        };
        check_blocks(what, t, &ours, &expected[at..at + ours.len()]);
        at += ours.len();
    }
    assert_eq!(at, expected.len());
}

#[test]
fn iq1_s_quantizes_only_with_importance_weights_and_iq1_m_either_way() {
    assert!(needs_importance(GgmlType::IQ1_S) && can_quantize(GgmlType::IQ1_S));
    assert!(!needs_importance(GgmlType::IQ1_M) && can_quantize(GgmlType::IQ1_M));
    assert!(uses_importance(GgmlType::IQ1_S) && uses_importance(GgmlType::IQ1_M));
    let values = iq1_input();
    let err = quantize(GgmlType::IQ1_S, &values).unwrap_err();
    assert!(
        matches!(
            err,
            Error::ImportanceRequired {
                ggml_type: GgmlType::IQ1_S
            }
        ),
        "{err}"
    );
    let weights = iq1_weights();
    let weighted = quantize_weighted(GgmlType::IQ1_M, &values, IQ1_ROW, &weights).unwrap();
    assert_ne!(weighted, quantize(GgmlType::IQ1_M, &values).unwrap());
}

#[test]
fn iq1_quantization_decodes_near_its_input() {
    // Weight-like values: every super-block's decoded values are nearer the input (in
    // root mean square) than zeros are.
    let values: Vec<f32> = iq1_input()[..1024].to_vec();
    let weights = vec![1.0f32; 1024];
    for t in [GgmlType::IQ1_S, GgmlType::IQ1_M] {
        let bytes = quantize_weighted(t, &values, 1024, &weights).unwrap();
        let back = dequantize(t, &bytes).unwrap();
        for (b, (x, y)) in values.chunks(256).zip(back.chunks(256)).enumerate() {
            let err: f32 = x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum();
            let norm: f32 = x.iter().map(|a| a * a).sum();
            assert!(err < 0.5 * norm, "{t} super-block {b}: {err} vs {norm}");
        }
    }
}

#[test]
fn iq1_weights_whose_errors_overflow_are_refused_as_an_overflow() {
    // Importance weights so large that the weights of the values overflow f32: with
    // values of one sign the first split tried has an infinite Σwqx over an infinite
    // Σwq², a NaN scale. ggml stops on an assertion there; we refuse the block.
    let values: Vec<f32> = (0..256).map(|i| -1.0 - (i % 7) as f32).collect();
    let weights = vec![f32::MAX; 256];
    for t in [GgmlType::IQ1_S, GgmlType::IQ1_M] {
        let err = quantize_weighted(t, &values, 256, &weights).unwrap_err();
        assert!(
            matches!(err, Error::ScaleOverflow { ggml_type, block: 0, .. } if ggml_type == t),
            "{t}: {err}"
        );
    }
}

#[test]
fn a_weighted_transform_of_iq1_requantizes_as_weighted_quantization() {
    // Two rows of 1024: an offset transform with the rows' importance gives the bytes
    // of quantizing the intended values with those weights; without weights IQ1_S asks
    // for them and is left as it was.
    let weights = iq1_weights();
    let dims = [IQ1_ROW as u64, 2, 1];
    let input = &iq1_input()[..2 * IQ1_ROW];
    for t in [GgmlType::IQ1_S, GgmlType::IQ1_M] {
        let original = quantize_weighted(t, input, IQ1_ROW, &weights).unwrap();
        let intended: Vec<f32> = dequantize(t, &original)
            .unwrap()
            .iter()
            .map(|v| v + 0.125)
            .collect();
        let expected = quantize_weighted(t, &intended, IQ1_ROW, &weights).unwrap();
        let importance = Importance::new(t, &weights, &dims, 0).unwrap();
        let mut data = original.clone();
        let n = input.len() as u64;
        let offset = Transform::Offset(0.125);
        let report =
            transform_range_weighted(t, &mut data, 0..n, &offset, Some(&importance)).unwrap();
        assert_eq!(report.path, transform::TransformPath::Requantized, "{t}");
        check_blocks("weighted transform", t, &data, &expected);

        let mut data = original.clone();
        let result = transform_range(t, &mut data, 0..n, &offset);
        if t == GgmlType::IQ1_S {
            assert!(
                matches!(result, Err(Error::ImportanceRequired { .. })),
                "{result:?}"
            );
            assert_eq!(data, original);
        } else {
            assert_eq!(data, quantize(t, &intended).unwrap(), "{t}");
        }
    }
}
