//! Tests of the IQ2_XXS, IQ2_XS and IQ2_S quantizers against ggml's output.

use proptest::prelude::*;

use super::tests::unit_stream;
use super::*;

/// Values per row of the weighted reference vectors: two super-blocks, so that each
/// weight applies to one column of four rows.
const ROW: usize = 512;

/// The inputs of the IQ2 reference vectors: eight super-blocks of weight-like, uniform,
/// all-zero, negative-only, small-with-one-outlier, tiny (down to below IQ2_S's
/// all-zero threshold), sparse and heavy-tailed values from a fixed-seed generator.
fn iq2_input() -> Vec<f32> {
    let mut unit = unit_stream(0x2545_f491_4f6c_dd1du64);
    let mut values = Vec::with_capacity(8 * 256);
    for _ in 0..256 {
        values.push((unit() + unit() + unit()) * 0.02);
    }
    for _ in 0..256 {
        values.push(unit());
    }
    values.extend([0.0f32; 256]);
    for _ in 0..256 {
        values.push(-(unit() * 0.5).abs() - 0.001);
    }
    for i in 0..256 {
        values.push(if i == 100 { 6.0 } else { unit() * 0.01 });
    }
    for i in 0..256 {
        values.push(unit() * if i < 128 { 1e-6 } else { 1e-10 });
    }
    for i in 0..256 {
        let sparse = i % 3 == 0 && !(32..64).contains(&i);
        values.push(if sparse { unit() } else { 0.0 });
    }
    for _ in 0..256 {
        values.push(unit() * 0.01 / (unit().abs() + 0.02));
    }
    values
}

/// Importance weights of the reference vectors, one per column of a [`ROW`]-value row:
/// exact multiples of 1/8 from 0 to 6.5, some of them zero.
fn iq2_weights() -> Vec<f32> {
    (0..ROW)
        .map(|i| ((i * 29 + 7) % 53) as f32 * 0.125)
        .collect()
}

/// The reference vectors in the order of `test_data/iq2_ref.bin`: the type and whether
/// it was quantized with [`iq2_weights`].
const REFERENCE_CASES: [(GgmlType, bool); 4] = [
    (GgmlType::IQ2_XXS, true),
    (GgmlType::IQ2_XS, true),
    (GgmlType::IQ2_S, true),
    (GgmlType::IQ2_S, false),
];

fn quantize_case(t: GgmlType, weighted: bool, values: &[f32]) -> Result<Vec<u8>> {
    if weighted {
        quantize_weighted(t, values, ROW, &iq2_weights())
    } else {
        quantize(t, values)
    }
}

#[test]
fn iq2_quants_match_the_reference_vectors() {
    let expected = include_bytes!("test_data/iq2_ref.bin");
    let input = iq2_input();
    let mut at = 0;
    for (t, weighted) in REFERENCE_CASES {
        let ours = quantize_case(t, weighted, &input).unwrap();
        let theirs = &expected[at..at + ours.len()];
        at += ours.len();
        let block_bytes = t.block_bytes() as usize;
        for (b, (o, r)) in ours
            .chunks(block_bytes)
            .zip(theirs.chunks(block_bytes))
            .enumerate()
        {
            assert_eq!(o, r, "{t} (weighted: {weighted}) super-block {b}");
        }
    }
    assert_eq!(at, expected.len());
}

#[test]
fn iq2_xxs_and_iq2_xs_need_weights_and_iq2_s_does_not() {
    let input = iq2_input();
    for t in [GgmlType::IQ2_XXS, GgmlType::IQ2_XS] {
        assert!(
            can_quantize(t) && needs_importance(t) && uses_importance(t),
            "{t}"
        );
        let err = quantize(t, &input).unwrap_err();
        assert!(
            matches!(err, Error::ImportanceRequired { ggml_type } if ggml_type == t),
            "{t}: {err}"
        );
    }
    let t = GgmlType::IQ2_S;
    assert!(can_quantize(t) && !needs_importance(t) && uses_importance(t));
    let plain = quantize(t, &input).unwrap();
    let weighted = quantize_weighted(t, &input, ROW, &iq2_weights()).unwrap();
    assert_ne!(plain, weighted, "the weights changed nothing");
}

/// The super-blocks of [`iq2_input`] that decode to within half their energy: not the
/// zeros (2), nor the small values beside an outlier (4: the smallest sub-block scale
/// the outlier leaves is too coarse for them), nor the tiny values (5: their super-block
/// scale is below the smallest f16 and stored as zero).
const WELL_SCALED_BLOCKS: [usize; 5] = [0, 1, 3, 6, 7];

#[test]
fn iq2_quants_decode_near_their_input_and_zeros_to_zeros() {
    let input = iq2_input();
    let squares = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>();
    for (t, weighted) in REFERENCE_CASES {
        let back = dequantize(t, &quantize_case(t, weighted, &input).unwrap()).unwrap();
        for b in WELL_SCALED_BLOCKS {
            let (x, y) = (
                &input[256 * b..256 * (b + 1)],
                &back[256 * b..256 * (b + 1)],
            );
            let error: Vec<f32> = x.iter().zip(y).map(|(x, y)| x - y).collect();
            assert!(
                squares(&error) <= 0.5 * squares(x),
                "{t} (weighted: {weighted}) super-block {b}"
            );
        }
        assert!(back[512..768].iter().all(|&v| v == 0.0), "{t}");
    }
}

#[test]
fn iq2_quants_refuse_scales_beyond_f16_and_keep_the_others_finite() {
    let mut values = iq2_input();
    values[3 * 256 + 5] = 1e9;
    values[5 * 256] = f32::MAX;
    values[5 * 256 + 1] = -f32::MAX;
    for (t, weighted) in REFERENCE_CASES {
        let err = quantize_case(t, weighted, &values).unwrap_err();
        assert!(
            matches!(err, Error::ScaleOverflow { ggml_type, block: 3, .. } if ggml_type == t),
            "{t} (weighted: {weighted}): {err}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Any finite values and weights either quantize to finite scales or are refused
    /// as a scale overflow; nothing panics (this runs with overflow checks on).
    #[test]
    fn any_finite_input_quantizes_or_overflows(
        bits in prop::collection::vec(any::<u32>(), 512),
        weight_bits in prop::collection::vec(any::<u32>(), 256),
        scale_exponent in -40i32..40,
    ) {
        let scale = 2f32.powi(scale_exponent);
        let values: Vec<f32> = bits
            .iter()
            .map(|b| f32::from_bits(*b) * scale)
            .map(|v| if v.is_finite() { v } else { 0.0 })
            .collect();
        let weights: Vec<f32> = weight_bits
            .iter()
            .map(|b| f32::from_bits(b & 0x7fff_ffff))
            .map(|w| if w.is_finite() { w } else { 1.0 })
            .collect();
        for t in [GgmlType::IQ2_XXS, GgmlType::IQ2_XS, GgmlType::IQ2_S] {
            match quantize_weighted(t, &values, 256, &weights) {
                Ok(bytes) => {
                    let report = scan_non_finite(t, &bytes, 0..512).unwrap();
                    prop_assert!(report.nan_scales == 0 && report.inf_scales == 0, "{}", t);
                }
                Err(Error::ScaleOverflow { .. }) => {}
                Err(other) => prop_assert!(false, "{}: {}", t, other),
            }
        }
    }
}
