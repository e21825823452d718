use proptest::prelude::*;

use super::legacy;
use super::transform::TransformPath;
use super::*;

/// f16 bits of `v`, which the caller keeps in range.
fn h(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

/// A Q8_0 block with scale `d` and codes `q`.
fn q8_0_block(d: f32, q: &[i8; 32]) -> Vec<u8> {
    let mut b = h(d).to_vec();
    b.extend(q.iter().map(|&v| v as u8));
    b
}

/// Byte offsets of the "d" and "m" kinds of f16 field of a block type.
fn d_and_m_fields(t: GgmlType) -> (&'static [usize], &'static [usize]) {
    match t {
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K => (&[0], &[2]),
        GgmlType::Q2_K => (&[80], &[82]),
        GgmlType::Q3_K => (&[108], &[]),
        GgmlType::Q6_K => (&[208], &[]),
        _ => (&[0], &[]),
    }
}

const SCALED_TYPES: &[GgmlType] = &[
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
    GgmlType::IQ1_S,
    GgmlType::IQ2_XXS,
    GgmlType::IQ2_XS,
    GgmlType::IQ2_S,
    GgmlType::IQ3_XXS,
    GgmlType::IQ3_S,
];

/// Random blocks of `t` whose f16 fields hold `scales` (cycled), in the normal range.
fn blocks_with_scales(t: GgmlType, raw: &[u8], scales: &[f32]) -> Vec<u8> {
    let bb = t.block_bytes() as usize;
    let mut data = raw[..raw.len() / bb * bb].to_vec();
    let (d_fields, m_fields) = d_and_m_fields(t);
    let mut k = 0;
    for block in data.chunks_exact_mut(bb) {
        for &at in d_fields.iter().chain(m_fields) {
            block[at..at + 2].copy_from_slice(&h(scales[k % scales.len()]));
            k += 1;
        }
    }
    data
}

#[test]
fn q8_0_requantizes_to_the_same_bytes() {
    // A block whose codes reach +-127 and whose d is positive is a fixed point of
    // dequantize-then-quantize: amax / 127 gives d back exactly.
    let mut q = [0i8; 32];
    for (i, v) in q.iter_mut().enumerate() {
        *v = ((i as i32 * 7) - 100) as i8;
    }
    q[5] = -127;
    let data = q8_0_block(0.0123, &q);
    let values = dequantize(GgmlType::Q8_0, &data).unwrap();
    assert_eq!(quantize(GgmlType::Q8_0, &values).unwrap(), data);
}

proptest! {
    #[test]
    fn q8_0_round_trip_is_exact(
        d in 1e-4f32..1e3,
        codes in prop::array::uniform32(-127i8..=127),
        top in 0usize..32,
        negative in any::<bool>(),
    ) {
        let mut q = codes;
        q[top] = if negative { -127 } else { 127 };
        let d = half::f16::from_f32(d).to_f32();
        let data = q8_0_block(d, &q);
        let values = dequantize(GgmlType::Q8_0, &data).unwrap();
        prop_assert_eq!(quantize(GgmlType::Q8_0, &values).unwrap(), data);
    }

    #[test]
    fn q4_0_round_trip_is_exact(
        d in prop_oneof![1e-4f32..1e3, -1e3f32..-1e-4],
        nibbles in prop::array::uniform16(any::<u8>()),
        zero_at in 0usize..32,
    ) {
        // A block holding code 0 (value -8 d) gives max = -8 d back, so d is exact.
        let mut n = nibbles;
        if zero_at < 16 { n[zero_at] &= 0xf0 } else { n[zero_at - 16] &= 0x0f }
        let mut data = h(d).to_vec();
        data.extend_from_slice(&n);
        let values = dequantize(GgmlType::Q4_0, &data).unwrap();
        prop_assert_eq!(quantize(GgmlType::Q4_0, &values).unwrap(), data);
    }

    #[test]
    fn scaling_block_scales_matches_dequantize_then_scale(
        type_index in 0usize..SCALED_TYPES.len(),
        raw in prop::collection::vec(any::<u8>(), 2 * 210),
        scales in prop::collection::vec(2f32.powi(-10)..16.0, 4),
        factor in prop_oneof![0.1f32..4.0, -4.0f32..-0.1],
    ) {
        let t = SCALED_TYPES[type_index];
        let data = blocks_with_scales(t, &raw, &scales);
        prop_assume!(!data.is_empty());
        let n = element_count(t, data.len()).unwrap();
        let old = dequantize(t, &data).unwrap();
        // Each element's d-term and m-term, to state the bound: dequantize with the
        // other kind of field set to zero.
        let (d_fields, m_fields) = d_and_m_fields(t);
        let with_zeroed = |fields: &[usize]| {
            let mut copy = data.clone();
            for block in copy.chunks_exact_mut(t.block_bytes() as usize) {
                for &at in fields {
                    block[at..at + 2].fill(0);
                }
            }
            dequantize(t, &copy).unwrap()
        };
        let d_terms = with_zeroed(m_fields);
        let m_terms = with_zeroed(d_fields);

        let mut scaled = data.clone();
        let report = transform_range(t, &mut scaled, 0..n, &Transform::Scale(factor)).unwrap();
        prop_assert_eq!(report.path, TransformPath::Scales);
        let new = dequantize(t, &scaled).unwrap();
        let mut worst = 0.0f64;
        let mut largest = 0.0f64;
        for i in 0..old.len() {
            let want = f64::from(old[i]) * f64::from(factor);
            let terms = f64::from(d_terms[i].abs()) + f64::from(m_terms[i].abs());
            // One f16 rounding of each scale (2^-11 relative), plus the f32 roundings
            // of dequantization itself.
            let bound = (2f64.powi(-11) + 2f64.powi(-20)) * f64::from(factor.abs()) * terms
                + 4.0 * f64::from(f32::EPSILON) * want.abs();
            let err = (f64::from(new[i]) - want).abs();
            prop_assert!(err <= bound, "{} element {}: {} vs {} (bound {})", t, i, new[i], want, bound);
            worst = worst.max(err);
            largest = largest.max(want.abs());
        }
        // The report measures against the f32 product, which is one f32 rounding away.
        prop_assert!((report.max_abs_error - worst).abs() <= 1e-6 * largest);
    }

    #[test]
    fn legacy_quantization_error_is_bounded_by_the_step(
        values in prop::collection::vec(-100f32..100.0, 32 * 4),
    ) {
        // Q8_0: round to the nearest of 255 steps of d = amax / 127, plus one f16
        // rounding of d applied to codes up to 127. Q4_0: truncation after adding half
        // a step is rounding, except the top value +8|d| which is clamped a whole step.
        for (t, step_bound) in [(GgmlType::Q8_0, 0.5 + 127.0 / 2048.0), (GgmlType::Q4_0, 1.0 + 16.0 / 2048.0)] {
            let back = dequantize(t, &quantize(t, &values).unwrap()).unwrap();
            for (block, (x, y)) in values.chunks(32).zip(back.chunks(32)).enumerate() {
                let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = if t == GgmlType::Q8_0 { amax / 127.0 } else { amax / 8.0 };
                for (a, b) in x.iter().zip(y) {
                    prop_assert!(
                        (a - b).abs() <= d * step_bound * 1.0001,
                        "{} block {}: {} -> {} (d {})", t, block, a, b, d
                    );
                }
            }
        }
    }

    #[test]
    fn quantize_range_writes_only_its_blocks(
        raw in prop::collection::vec(any::<u8>(), 34 * 8),
        first in 0u64..8,
        len in 0u64..8,
        values in prop::collection::vec(-10f32..10.0, 32 * 8),
    ) {
        let t = GgmlType::Q8_0;
        let mut data = blocks_with_scales(t, &raw, &[0.5]);
        let original = data.clone();
        let end = (first + len).min(8);
        let range = first * 32..end * 32;
        let n = (range.end - range.start) as usize;
        quantize_range(t, &values[..n], &mut data, range.clone()).unwrap();
        let span = check_range(t, data.len(), &range).unwrap();
        prop_assert_eq!(&data[..span.bytes.start], &original[..span.bytes.start]);
        prop_assert_eq!(&data[span.bytes.end..], &original[span.bytes.end..]);
        let expected = quantize(t, &values[..n]).unwrap();
        prop_assert_eq!(&data[span.bytes.clone()], &expected[..]);
    }
}

#[test]
fn unaligned_ranges_are_refused_and_nothing_is_written() {
    let t = GgmlType::Q4_K;
    let mut data = vec![0u8; 144 * 4];
    let original = data.clone();
    let values = vec![1.0f32; 100];
    let err = quantize_range(t, &values, &mut data, 0..100).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnalignedRange {
                ggml_type: GgmlType::Q4_K,
                start: 0,
                end: 100,
                block_len: 256
            }
        ),
        "{err}"
    );
    let err = transform_range(t, &mut data, 256..300, &Transform::Scale(2.0)).unwrap_err();
    assert!(matches!(err, Error::UnalignedRange { .. }), "{err}");
    let mut out = vec![0f32; 100];
    let err = dequantize_range(t, &data, 0..100, &mut out).unwrap_err();
    assert!(matches!(err, Error::UnalignedRange { .. }), "{err}");
    let err = transform_range(t, &mut data, 512..2048, &Transform::Zero).unwrap_err();
    assert!(
        matches!(
            err,
            Error::RangeOutOfBounds {
                start: 512,
                end: 2048,
                n_elements: 1024,
                ..
            }
        ),
        "{err}"
    );
    #[allow(clippy::reversed_empty_ranges)]
    let err = scan_non_finite(t, &data, 512..256).unwrap_err();
    assert!(matches!(err, Error::RangeOutOfBounds { .. }), "{err}");
    let err = dequantize(t, &data[..100]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::PartialBlock {
                len: 100,
                block_bytes: 144,
                ..
            }
        ),
        "{err}"
    );
    let err = dequantize_range(t, &data, 0..256, &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LengthMismatch {
                expected: 256,
                found: 100,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(data, original);
}

#[test]
fn non_finite_input_is_refused_and_nothing_is_written() {
    for t in [
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::F16,
        GgmlType::F32,
        GgmlType::BF16,
    ] {
        let n = 512usize;
        let mut data = quantize(t, &vec![0.25f32; n]).unwrap();
        let original = data.clone();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut values = vec![1.0f32; 256];
            values[40] = bad;
            let err = quantize_range(t, &values, &mut data, 256..512).unwrap_err();
            assert!(
                matches!(err, Error::NonFiniteInput { index: 296, .. }),
                "{t}: {err}"
            );
            assert_eq!(data, original, "{t}");
        }
        let to_nan = |x: f32| if x > 0.0 { f32::NAN } else { x };
        let err = transform_range(t, &mut data, 0..n as u64, &Transform::Map(&to_nan)).unwrap_err();
        assert!(
            matches!(err, Error::NonFiniteInput { index: 0, .. }),
            "{t}: {err}"
        );
        assert_eq!(data, original, "{t}");
    }
}

/// [`quantize`], or for a type quantized only with importance weights, weighted
/// quantization in rows of 256 with every weight 1.
fn quantize_unit_weighted_if_needed(t: GgmlType, values: &[f32]) -> Result<Vec<u8>> {
    if needs_importance(t) {
        quantize_weighted(t, values, 256, &[1.0; 256])
    } else {
        quantize(t, values)
    }
}

#[test]
fn scales_that_overflow_f16_are_refused() {
    let mut q = [1i8; 32];
    q[0] = 127;
    let mut data = q8_0_block(1.0, &q);
    data.extend(q8_0_block(60000.0, &q));
    let original = data.clone();
    let err =
        transform_range(GgmlType::Q8_0, &mut data, 0..64, &Transform::Scale(2.0)).unwrap_err();
    assert!(
        matches!(err, Error::ScaleOverflow { block: 1, .. }),
        "{err}"
    );
    assert_eq!(data, original);
    // Quantizing values whose scale cannot be an f16 fails the same way, naming the
    // block in the tensor even across parallel chunks.
    let mut values = vec![1.0f32; CHUNK_ELEMENTS * 3];
    values[CHUNK_ELEMENTS * 2 + 70] = 1e7;
    let err = quantize(GgmlType::Q8_0, &values).unwrap_err();
    let block = ((CHUNK_ELEMENTS * 2 + 70) / 32) as u64;
    assert!(
        matches!(err, Error::ScaleOverflow { block: b, .. } if b == block),
        "{err}"
    );
    // Finite inputs so large that a scale search overflows f32 internally never leave
    // an infinite or NaN scale behind: the block is refused, or (where the reference
    // search itself settles on a finite scale) stored with finite scales.
    let mut extreme = vec![0.0f32; 256];
    extreme[0] = f32::MAX;
    extreme[1] = -f32::MAX;
    for &t in GgmlType::ALL.iter().filter(|t| can_quantize(**t)) {
        match quantize_unit_weighted_if_needed(t, &extreme) {
            Err(Error::ScaleOverflow { block: 0, .. }) => {}
            Err(Error::ImportanceRequired { .. }) if needs_importance(t) => {}
            Err(other) => panic!("{t}: {other}"),
            Ok(bytes) => {
                let report = scan_non_finite(t, &bytes, 0..256).unwrap();
                assert!(
                    report.nan_scales == 0 && report.inf_scales == 0,
                    "{t}: {report:?}"
                );
            }
        }
    }
    let err = quantize(GgmlType::F16, &[1.0, 70000.0]).unwrap_err();
    assert!(
        matches!(err, Error::ScaleOverflow { block: 1, .. }),
        "{err}"
    );
}

#[test]
fn invalid_transforms_are_refused() {
    let mut data = vec![0u8; 34];
    for t in [
        Transform::Scale(f32::NAN),
        Transform::Offset(f32::INFINITY),
        Transform::Clamp { min: 1.0, max: 0.0 },
    ] {
        let err = transform_range(GgmlType::Q8_0, &mut data, 0..32, &t).unwrap_err();
        assert!(
            matches!(err, Error::InvalidTransform { .. }),
            "{t:?}: {err}"
        );
    }
    let err =
        transform_range(GgmlType::Q8_0, &mut data, 0..32, &Transform::Set(&[1.0])).unwrap_err();
    assert!(
        matches!(
            err,
            Error::LengthMismatch {
                expected: 32,
                found: 1,
                ..
            }
        ),
        "{err}"
    );
    let err =
        transform_range(GgmlType::I32, &mut [0u8; 4], 0..1, &Transform::Offset(1.0)).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedType {
                ggml_type: GgmlType::I32,
                ..
            }
        ),
        "{err}"
    );
    let err = dequantize(GgmlType::Q8_K, &[0u8; 292]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedType {
                ggml_type: GgmlType::Q8_K,
                operation: "dequantize"
            }
        ),
        "{err}"
    );
}

#[test]
fn transforms_report_their_path_and_error() {
    let values: Vec<f32> = (0..512)
        .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let data = quantize(GgmlType::Q4_K, &values).unwrap();
    let old = dequantize(GgmlType::Q4_K, &data).unwrap();

    let mut zeroed = data.clone();
    let report = transform_range(GgmlType::Q4_K, &mut zeroed, 256..512, &Transform::Zero).unwrap();
    assert_eq!(report.path, TransformPath::Scales);
    assert_eq!(report.max_abs_error, 0.0);
    let new = dequantize(GgmlType::Q4_K, &zeroed).unwrap();
    assert_eq!(&new[..256], &old[..256]);
    assert!(new[256..].iter().all(|v| *v == 0.0));

    let mut offset = data.clone();
    let report =
        transform_range(GgmlType::Q4_K, &mut offset, 0..512, &Transform::Offset(0.5)).unwrap();
    assert_eq!(report.path, TransformPath::Requantized);
    assert!(!report.quantized_domain());
    assert!(
        report.rms_error > 0.0 && report.rms_error < 0.05,
        "{report:?}"
    );
    let new = dequantize(GgmlType::Q4_K, &offset).unwrap();
    let max = new
        .iter()
        .zip(&old)
        .map(|(n, o)| f64::from((n - (o + 0.5)).abs()))
        .fold(0.0, f64::max);
    assert!(
        (max - report.max_abs_error).abs() < 1e-9,
        "{max} vs {report:?}"
    );

    let target: Vec<f32> = (0..256).map(|i| i as f32 / 256.0).collect();
    let mut set = quantize(GgmlType::F16, &values).unwrap();
    let report =
        transform_range(GgmlType::F16, &mut set, 256..512, &Transform::Set(&target)).unwrap();
    assert_eq!(report.path, TransformPath::Elementwise);
    assert_eq!(
        report.max_abs_error, 0.0,
        "multiples of 2^-8 are exact in f16"
    );
    assert_eq!(
        &dequantize(GgmlType::F16, &set).unwrap()[256..],
        &target[..]
    );

    let mut clamped = quantize(GgmlType::F32, &values).unwrap();
    let report = transform_range(
        GgmlType::F32,
        &mut clamped,
        0..512,
        &Transform::Clamp {
            min: -0.5,
            max: 0.25,
        },
    )
    .unwrap();
    assert_eq!(report.max_abs_error, 0.0);
    let new = dequantize(GgmlType::F32, &clamped).unwrap();
    assert!(
        new.iter()
            .zip(&values)
            .all(|(n, v)| *n == v.clamp(-0.5, 0.25))
    );
}

#[test]
fn scan_counts_non_finite_scales_and_values() {
    let q = [3i8; 32];
    let mut data = Vec::new();
    for d in [1.0, f32::NAN, 2.0, f32::INFINITY] {
        data.extend(q8_0_block(d, &q));
    }
    let report = scan_non_finite(GgmlType::Q8_0, &data, 0..128).unwrap();
    assert_eq!((report.nan_scales, report.inf_scales), (1, 1));
    assert_eq!(report.first_bad_blocks, vec![1, 3]);
    assert_eq!((report.nan_count, report.inf_count), (32, 32));
    assert_eq!(report.first_offsets, (32..48).collect::<Vec<u64>>());
    assert!(!report.is_clean());
    let report = scan_non_finite(GgmlType::Q8_0, &data, 64..96).unwrap();
    assert!(report.is_clean());

    let mut values = vec![1.0f32; CHUNK_ELEMENTS * 2 + 5];
    values[3] = f32::NAN;
    values[CHUNK_ELEMENTS + 7] = f32::NEG_INFINITY;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let n = values.len() as u64;
    let report = scan_non_finite(GgmlType::F32, &bytes, 0..n).unwrap();
    assert_eq!((report.nan_count, report.inf_count), (1, 1));
    assert_eq!(report.first_offsets, vec![3, CHUNK_ELEMENTS as u64 + 7]);
    assert_eq!((report.nan_scales, report.inf_scales), (0, 0));
}

#[test]
fn parallel_chunks_match_a_block_by_block_run() {
    // Several chunks of work: the result must not depend on how they are cut.
    let n = CHUNK_ELEMENTS * 3 + 512;
    let values: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 997.0 - 0.5)
        .collect();
    for t in [
        GgmlType::Q4_K,
        GgmlType::Q8_0,
        GgmlType::Q6_K,
        GgmlType::BF16,
    ] {
        let whole = quantize(t, &values).unwrap();
        let bl = t.block_len() as usize;
        let mut pieces = Vec::new();
        for block in values.chunks(bl) {
            pieces.extend(quantize(t, block).unwrap());
        }
        assert_eq!(whole, pieces, "{t}");
        let back = dequantize(t, &whole).unwrap();
        let mut piecewise = Vec::new();
        for block in whole.chunks(t.block_bytes() as usize) {
            piecewise.extend(dequantize(t, block).unwrap());
        }
        assert_eq!(back, piecewise, "{t}");
    }
}

#[test]
fn k_quants_round_trip_closely() {
    let values: Vec<f32> = (0..4096).map(|i| ((i as f32) * 0.37).sin()).collect();
    for (t, tolerance) in [
        (GgmlType::Q4_K, 0.06),
        (GgmlType::Q5_K, 0.03),
        (GgmlType::Q6_K, 0.015),
    ] {
        let back = dequantize(t, &quantize(t, &values).unwrap()).unwrap();
        let rms = (values
            .iter()
            .zip(&back)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f32>()
            / values.len() as f32)
            .sqrt();
        assert!(rms < tolerance, "{t}: rms {rms}");
        assert!(rms > 0.0, "{t}");
    }
    // All-zero super-blocks stay all zeros.
    for t in [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        let back = dequantize(t, &quantize(t, &[0.0; 256]).unwrap()).unwrap();
        assert!(back.iter().all(|v| *v == 0.0), "{t}");
    }
}

#[test]
fn integer_types_dequantize_but_do_not_quantize() {
    let data = [0xffu8, 0x7f, 0x00, 0x80];
    assert_eq!(
        dequantize(GgmlType::I8, &data).unwrap(),
        vec![-1.0, 127.0, 0.0, -128.0]
    );
    assert_eq!(
        dequantize(GgmlType::I16, &data).unwrap(),
        vec![32767.0, -32768.0]
    );
    let err = quantize(GgmlType::I32, &[1.0]).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedType {
                operation: "quantize",
                ..
            }
        ),
        "{err}"
    );
    assert!(can_dequantize(GgmlType::I64) && !can_quantize(GgmlType::I64));
}

#[test]
fn f16_conversion_matches_half_for_every_bit_pattern() {
    for bits in 0..=u16::MAX {
        let ours = f16_to_f32(bits);
        let theirs = half::f16::from_bits(bits).to_f32();
        if theirs.is_nan() {
            assert!(ours.is_nan(), "{bits:04x}");
            assert_eq!(
                ours.to_bits() & 0xffc0_0000,
                theirs.to_bits() & 0xffc0_0000,
                "{bits:04x}"
            );
        } else {
            assert_eq!(ours.to_bits(), theirs.to_bits(), "{bits:04x}");
        }
    }
}

/// A fixed-seed stream of values in `[-1, 1)` (a 64-bit LCG's top 24 bits): the source
/// of every reference vector's input, so that the committed ggml outputs stay
/// reproducible.
pub(super) fn unit_stream(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed;
    move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

/// The inputs of the K-quant reference vectors: eight super-blocks of weight-like,
/// uniform, all-zero, constant, outlier and tiny values from a fixed-seed generator.
fn golden_input() -> Vec<f32> {
    let mut unit = unit_stream(0x853c_49e6_748f_ea9bu64);
    let mut values = Vec::with_capacity(8 * 256);
    for _ in 0..512 {
        values.push((unit() + unit() + unit()) * 0.02);
    }
    for _ in 0..256 {
        values.push(unit());
    }
    values.extend([0.0f32; 256]);
    values.extend([-0.75f32; 256]);
    for i in 0..256 {
        values.push(if i % 41 == 7 { 3.0 } else { unit() * 0.01 });
    }
    for _ in 0..256 {
        values.push(unit() * 1e-6);
    }
    for i in 0..256 {
        values.push((i % 17) as f32 * 0.125 - 1.0);
    }
    values
}

#[test]
fn k_quants_match_the_reference_vectors() {
    let expected = include_bytes!("test_data/kquants_ref.bin");
    let input = golden_input();
    let mut at = 0;
    for t in [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ] {
        let ours = quantize(t, &input).unwrap();
        let theirs = &expected[at..at + ours.len()];
        at += ours.len();
        for (b, (o, r)) in ours
            .chunks(t.block_bytes() as usize)
            .zip(theirs.chunks(t.block_bytes() as usize))
            .enumerate()
        {
            assert_eq!(o, r, "{t} super-block {b}");
        }
    }
    assert_eq!(at, expected.len());
}

#[test]
fn iq4_quants_match_the_reference_vectors() {
    let expected = include_bytes!("test_data/iq4_ref.bin");
    let input = golden_input();
    let mut at = 0;
    for t in [GgmlType::IQ4_NL, GgmlType::IQ4_XS] {
        let ours = quantize(t, &input).unwrap();
        let theirs = &expected[at..at + ours.len()];
        at += ours.len();
        let bl = t.block_len() as usize;
        for (b, (o, r)) in ours
            .chunks(t.block_bytes() as usize)
            .zip(theirs.chunks(t.block_bytes() as usize))
            .enumerate()
        {
            if t == GgmlType::IQ4_NL && input[b * bl..(b + 1) * bl].iter().all(|v| *v == 0.0) {
                // ggml leaves stale codes in an all-zero IQ4_NL block; only its zero
                // scale is defined, and we write zero codes.
                assert_eq!(&r[..2], &[0, 0], "block {b}");
                assert!(o.iter().all(|&x| x == 0), "block {b}");
                continue;
            }
            assert_eq!(o, r, "{t} block {b}");
        }
    }
    assert_eq!(at, expected.len());
}

proptest! {
    #[test]
    fn round_half_away_matches_round(x in -3e9f32..3e9) {
        let expected = if x.abs() < 2_147_483_648.0 { x.round() as i32 } else { i32::MIN };
        prop_assert_eq!(legacy::round_half_away(x), expected);
    }
}

#[test]
fn round_half_away_edges() {
    for k in -1000..1000 {
        let x = k as f32 * 0.5;
        assert_eq!(legacy::round_half_away(x), x.round() as i32, "{x}");
    }
    for x in [
        0.49999997f32,
        -0.49999997,
        0.5,
        -0.5,
        1.5,
        2.5,
        8388607.5,
        -8388608.5,
        0.0,
        -0.0,
    ] {
        assert_eq!(legacy::round_half_away(x), x.round() as i32, "{x}");
    }
    assert_eq!(legacy::round_half_away(f32::INFINITY), 0);
    assert_eq!(legacy::round_half_away(f32::NAN), 0);
}

#[test]
fn non_finite_values_are_repaired_by_set_and_zero_but_not_scaled() {
    let values = [1.0f32, f32::NAN, 3.0, f32::INFINITY];
    let mut data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let original = data.clone();
    let err = transform_range(GgmlType::F32, &mut data, 0..4, &Transform::Scale(2.0)).unwrap_err();
    assert!(
        matches!(err, Error::NonFiniteInput { index: 1, .. }),
        "{err}"
    );
    assert_eq!(data, original);
    let report = scan_non_finite(GgmlType::F32, &data, 0..4).unwrap();
    assert_eq!(
        (
            report.nan_count,
            report.inf_count,
            report.first_offsets.clone()
        ),
        (1, 1, vec![1, 3])
    );
    transform_range(
        GgmlType::F32,
        &mut data,
        0..4,
        &Transform::Set(&[1.0, 0.0, 3.0, 0.0]),
    )
    .unwrap();
    assert!(
        scan_non_finite(GgmlType::F32, &data, 0..4)
            .unwrap()
            .is_clean()
    );
    let mut f16_data = quantize(GgmlType::F16, &[1.0, 2.0]).unwrap();
    f16_data[2..4].copy_from_slice(&0x7e00u16.to_le_bytes());
    transform_range(GgmlType::F16, &mut f16_data, 0..2, &Transform::Zero).unwrap();
    assert_eq!(
        dequantize(GgmlType::F16, &f16_data).unwrap(),
        vec![0.0, 0.0]
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any bytes decode and scan without panicking (this runs with overflow checks on),
    /// and any finite values either quantize or are refused with a typed error.
    #[test]
    fn arbitrary_input_never_panics(
        raw in prop::collection::vec(any::<u8>(), 0..2048),
        bits in prop::collection::vec(any::<u32>(), 512),
    ) {
        let values: Vec<f32> = bits
            .iter()
            .map(|b| f32::from_bits(*b))
            .map(|v| if v.is_finite() { v } else { 0.0 })
            .collect();
        for &t in GgmlType::ALL {
            if can_dequantize(t) {
                let bb = t.block_bytes() as usize;
                let data = &raw[..raw.len() / bb * bb];
                let n = element_count(t, data.len()).unwrap();
                let decoded = dequantize(t, data).unwrap();
                prop_assert_eq!(decoded.len() as u64, n);
                let report = scan_non_finite(t, data, 0..n).unwrap();
                let bad = decoded.iter().filter(|v| !v.is_finite()).count() as u64;
                prop_assert_eq!(report.nan_count + report.inf_count, bad);
            }
            if can_quantize(t) {
                match quantize_unit_weighted_if_needed(t, &values) {
                    Ok(bytes) => {
                        let report = scan_non_finite(t, &bytes, 0..512).unwrap();
                        prop_assert!(report.nan_scales == 0 && report.inf_scales == 0, "{}", t);
                    }
                    Err(Error::ScaleOverflow { .. }) => {}
                    Err(Error::ImportanceRequired { .. }) if needs_importance(t) => {}
                    Err(other) => prop_assert!(false, "{}: {}", t, other),
                }
            }
        }
    }
}

const GRID_TYPES: &[GgmlType] = &[
    GgmlType::IQ1_S,
    GgmlType::IQ1_M,
    GgmlType::IQ2_XXS,
    GgmlType::IQ2_XS,
    GgmlType::IQ2_S,
    GgmlType::IQ3_XXS,
    GgmlType::IQ3_S,
];

/// One block of `t` with the f16 scale `d` and every other byte zero.
fn grid_block_with_scale(t: GgmlType, d: f32) -> Vec<u8> {
    let mut block = vec![0u8; t.block_bytes() as usize];
    let fields = scan::scale_fields(t);
    fields.set(&mut block, 0, half::f16::from_f32(d).to_bits());
    block
}

#[test]
fn grid_blocks_decode_to_their_grid_points() {
    // With every index, sign and sub-block scale zero, each type decodes to its first
    // grid point under its smallest sub-block scale.
    let cases: &[(GgmlType, f32)] = &[
        // d * (0.5 + 0) * 0.25 * 8: grid point 0 is all 8s.
        (GgmlType::IQ2_XXS, 1.0),
        (GgmlType::IQ2_XS, 1.0),
        (GgmlType::IQ2_S, 1.0),
        // d * (0.5 + 0) * 0.5 * 4: grid point 0 is all 4s.
        (GgmlType::IQ3_XXS, 1.0),
        // d * (1 + 0) * 1: grid point 0 is all 1s.
        (GgmlType::IQ3_S, 1.0),
        // d * 1 * (-1 + 0.125): grid point 0 is all -1s, the delta is +1/8.
        (GgmlType::IQ1_S, -0.875),
        (GgmlType::IQ1_M, -0.875),
    ];
    for &(t, want) in cases {
        let values = dequantize(t, &grid_block_with_scale(t, 1.0)).unwrap();
        assert_eq!(values.len(), 256, "{t}");
        assert!(values.iter().all(|&v| v == want), "{t}: {:?}", &values[..8]);
    }
}

#[test]
fn grid_sign_indices_flip_an_even_number_of_signs() {
    // IQ2_XXS: sign index 1 of the first group sets bit 0 and, for even parity, bit 7.
    let mut block = grid_block_with_scale(GgmlType::IQ2_XXS, 1.0);
    block[2 + 4] = 1;
    let values = dequantize(GgmlType::IQ2_XXS, &block).unwrap();
    assert_eq!(&values[..8], &[-1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -1.0]);
    assert!(values[8..].iter().all(|&v| v == 1.0));
    // IQ2_S stores whole sign bytes: 0x01 flips only the first element.
    let mut block = grid_block_with_scale(GgmlType::IQ2_S, 1.0);
    block[34] = 0x01;
    let values = dequantize(GgmlType::IQ2_S, &block).unwrap();
    assert_eq!(&values[..8], &[-1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]);
}

#[test]
fn the_highest_grid_index_of_each_type_decodes() {
    // Every index field is exactly as wide as its grid is long: the all-ones index is
    // the grid's last point, never past it.
    for &t in GRID_TYPES {
        let mut block = vec![0xffu8; t.block_bytes() as usize];
        let fields = scan::scale_fields(t);
        fields.set(&mut block, 0, half::f16::from_f32(1.0).to_bits());
        let values = dequantize(t, &block).unwrap();
        assert!(values.iter().all(|v| v.is_finite()), "{t}");
        assert!(values.iter().any(|&v| v != 0.0), "{t}");
    }
}

#[test]
fn a_partial_grid_block_is_refused() {
    for &t in GRID_TYPES {
        let bytes = t.block_bytes() as usize;
        let err = dequantize(t, &vec![0u8; 2 * bytes - 1]).unwrap_err();
        assert!(
            matches!(err, Error::PartialBlock { ggml_type, len, block_bytes }
                if ggml_type == t && len == 2 * bytes as u64 - 1 && block_bytes == bytes as u64),
            "{t}: {err}"
        );
    }
}

#[test]
fn grid_types_scale_and_zero_on_block_scales_and_refuse_other_transforms() {
    let raw: Vec<u8> = (0..4 * 110u32).map(|i| (i * 37 + 11) as u8).collect();
    for &t in GRID_TYPES {
        let bytes = t.block_bytes() as usize;
        let mut data = raw[..4 * bytes].to_vec();
        for block in data.chunks_exact_mut(bytes) {
            scan::scale_fields(t).set(block, 0, half::f16::from_f32(0.75).to_bits());
        }
        let old = dequantize(t, &data).unwrap();

        let mut scaled = data.clone();
        let report = transform_range(t, &mut scaled, 0..1024, &Transform::Scale(2.0)).unwrap();
        assert_eq!(report.path, TransformPath::Scales, "{t}");
        // A power of two scales d exactly, and only the scale bits changed.
        let new = dequantize(t, &scaled).unwrap();
        for (a, b) in old.iter().zip(&new) {
            assert_eq!(a * 2.0, *b, "{t}");
        }
        let changed: Vec<usize> = (0..data.len()).filter(|&i| data[i] != scaled[i]).collect();
        let fields = scan::scale_fields(t);
        for block in scaled.chunks_exact(bytes) {
            assert_eq!(
                fields.get(block, 0),
                half::f16::from_f32(1.5).to_bits(),
                "{t}"
            );
        }
        for i in changed {
            let within = i % bytes;
            let scale_byte = match t {
                GgmlType::IQ1_M => (48..56).contains(&within),
                _ => within < 2,
            };
            assert!(scale_byte, "{t}: byte {within} of a block changed");
        }

        let mut zeroed = data.clone();
        let report = transform_range(t, &mut zeroed, 0..1024, &Transform::Zero).unwrap();
        assert_eq!(report.path, TransformPath::Scales, "{t}");
        assert!(dequantize(t, &zeroed).unwrap().iter().all(|&v| v == 0.0));

        // A type with a quantizer requantizes instead (its quantizer's tests cover that).
        if can_quantize(t) && !needs_importance(t) {
            continue;
        }
        let mut offset = data.clone();
        let result = transform_range(t, &mut offset, 0..1024, &Transform::Offset(1.0));
        if can_quantize(t) && !needs_importance(t) {
            // The grid types with an unweighted quantizer requantize instead.
            assert_eq!(result.unwrap().path, TransformPath::Requantized, "{t}");
            continue;
        }
        let err = result.unwrap_err();
        if needs_importance(t) {
            assert!(
                matches!(err, Error::ImportanceRequired { ggml_type } if ggml_type == t),
                "{t}: {err}"
            );
        } else {
            assert!(
                matches!(err, Error::UnsupportedType { ggml_type, operation: "transform (requantize)" }
                    if ggml_type == t),
                "{t}: {err}"
            );
        }
        assert_eq!(offset, data, "{t}: a refused transform wrote");
    }
}

#[test]
fn iq1_m_scale_nibbles_leave_the_sub_block_scales_alone() {
    let mut block = vec![0u8; 56];
    for (i, b) in block[48..].iter_mut().enumerate() {
        *b = 0x5a ^ (i as u8 * 17);
    }
    let fields = scan::scale_fields(GgmlType::IQ1_M);
    let before: Vec<u16> = block[48..]
        .chunks_exact(2)
        .map(|w| u16::from_le_bytes([w[0], w[1]]) & 0x0fff)
        .collect();
    fields.set(&mut block, 0, 0xabcd);
    assert_eq!(fields.get(&block, 0), 0xabcd);
    let after: Vec<u16> = block[48..]
        .chunks_exact(2)
        .map(|w| u16::from_le_bytes([w[0], w[1]]) & 0x0fff)
        .collect();
    assert_eq!(before, after);
    // The lowest nibble of the scale sits at the top of the first word.
    assert_eq!(block[49] >> 4, 0xd);
    assert_eq!(block[55] >> 4, 0xa);
}

#[test]
fn scan_counts_a_non_finite_iq1_m_scale() {
    let mut data = vec![0u8; 2 * 56];
    scan::scale_fields(GgmlType::IQ1_M).set(&mut data[56..], 0, 0x7e00);
    let report = scan_non_finite(GgmlType::IQ1_M, &data, 0..512).unwrap();
    assert_eq!(report.nan_scales, 1);
    assert_eq!(report.first_bad_blocks, vec![1]);
    assert_eq!(report.nan_count, 256);
}

/// Deterministic values with a spread of magnitudes, `n` of them.
fn wavy(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let t =
                (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) as f32 / u32::MAX as f32;
            (t - 0.5) * (1.0 + (i % 7) as f32)
        })
        .collect()
}

#[test]
fn weighted_quantization_ignores_weights_where_ggml_does() {
    let values = wavy(512, 1);
    let weights = wavy(256, 2).iter().map(|w| w.abs()).collect::<Vec<_>>();
    for t in [GgmlType::Q8_0, GgmlType::F16, GgmlType::BF16, GgmlType::F32] {
        assert!(!uses_importance(t));
        assert_eq!(
            quantize_weighted(t, &values, 256, &weights).unwrap(),
            quantize(t, &values).unwrap(),
            "{t}"
        );
    }
}

#[test]
fn weights_change_the_bytes_of_every_weighted_type_and_rows_are_independent() {
    let n_per_row = 512;
    let values = wavy(n_per_row * 3, 3);
    let skewed: Vec<f32> = (0..n_per_row)
        .map(|i| if i % 5 == 0 { 50.0 } else { 0.01 })
        .collect();
    let flat = vec![1.0f32; n_per_row];
    for t in [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::IQ4_NL,
        GgmlType::IQ4_XS,
    ] {
        assert!(uses_importance(t));
        let a = quantize_weighted(t, &values, n_per_row, &skewed).unwrap();
        let b = quantize_weighted(t, &values, n_per_row, &flat).unwrap();
        assert_ne!(a, b, "{t}: the weights changed nothing");
        // Each row is quantized on its own (legacy types use the row's mean square).
        let row_bytes = a.len() / 3;
        for r in 0..3 {
            let row = &values[r * n_per_row..(r + 1) * n_per_row];
            let alone = quantize_weighted(t, row, n_per_row, &skewed).unwrap();
            assert_eq!(alone, a[r * row_bytes..(r + 1) * row_bytes], "{t} row {r}");
        }
        // The result decodes to values nearer the input than zeros are.
        let back = dequantize(t, &a).unwrap();
        let err = values
            .iter()
            .zip(&back)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        let amax = values.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        assert!(err < amax, "{t}: max error {err}, largest value {amax}");
    }
}

#[test]
fn weighted_quantization_refuses_bad_shapes_and_weights() {
    let values = wavy(512, 4);
    let weights = vec![1.0f32; 256];
    let t = GgmlType::Q4_K;
    assert!(matches!(
        quantize_weighted(t, &values, 200, &weights[..200]),
        Err(Error::UnalignedRange { .. })
    ));
    assert!(matches!(
        quantize_weighted(t, &values[..300], 256, &weights),
        Err(Error::LengthMismatch { .. })
    ));
    assert!(matches!(
        quantize_weighted(t, &values, 256, &weights[..128]),
        Err(Error::LengthMismatch { .. })
    ));
    let mut bad = weights.clone();
    bad[7] = -1.0;
    assert!(matches!(
        quantize_weighted(t, &values, 256, &bad),
        Err(Error::BadImportance { column: 7, .. })
    ));
    bad[7] = f32::NAN;
    assert!(matches!(
        quantize_weighted(t, &values, 256, &bad),
        Err(Error::BadImportance { column: 7, .. })
    ));
    let mut inf = values.clone();
    inf[300] = f32::INFINITY;
    assert!(matches!(
        quantize_weighted(t, &inf, 256, &weights),
        Err(Error::NonFiniteInput { index: 300, .. })
    ));
}

#[test]
fn a_weighted_transform_requantizes_as_weighted_quantization_of_the_intended_values() {
    // Three experts of four rows of 512 values: a transform over any block-aligned range
    // gives, block for block, the bytes of quantizing the intended values row by row with
    // the row's expert's weights.
    let (n_per_row, rows_per_expert, experts) = (512usize, 4usize, 3usize);
    let dims = [n_per_row as u64, rows_per_expert as u64, experts as u64];
    let n = n_per_row * rows_per_expert * experts;
    let weights: Vec<f32> = (0..n_per_row * experts)
        .map(|i| {
            if i % 7 == 0 {
                40.0
            } else {
                0.05 + (i % 3) as f32
            }
        })
        .collect();
    for t in [
        GgmlType::Q4_K,
        GgmlType::Q6_K,
        GgmlType::IQ4_NL,
        GgmlType::Q5_0,
    ] {
        let original = quantize(t, &wavy(n, 5)).unwrap();
        let old = dequantize(t, &original).unwrap();
        let intended: Vec<f32> = old.iter().map(|v| v + 0.125).collect();
        let expected: Vec<u8> = intended
            .chunks(n_per_row)
            .enumerate()
            .flat_map(|(row, values)| {
                let e = row / rows_per_expert;
                quantize_weighted(t, values, n_per_row, &weights[e * n_per_row..][..n_per_row])
                    .unwrap()
            })
            .collect();
        let unweighted = quantize(t, &intended).unwrap();
        assert_ne!(expected, unweighted, "{t}: the weights changed nothing");
        let block = t.block_len() as usize;
        let bytes_per = |elements: usize| elements / block * t.block_bytes() as usize;
        // The whole tensor, whole rows across an expert's end, and (per-block types only)
        // a range that starts and ends inside rows.
        let mut ranges = vec![0..n, 3 * n_per_row..6 * n_per_row];
        if t != GgmlType::Q5_0 {
            ranges.push(n_per_row + 256..5 * n_per_row - 256);
        }
        for range in ranges {
            // The data handed over is just the range's blocks, as a patch plans it.
            let mut data = original[bytes_per(range.start)..bytes_per(range.end)].to_vec();
            let importance = Importance::new(t, &weights, &dims, range.start as u64).unwrap();
            let len = (range.end - range.start) as u64;
            let report = transform_range_weighted(
                t,
                &mut data,
                0..len,
                &Transform::Offset(0.125),
                Some(&importance),
            )
            .unwrap();
            assert_eq!(report.path, TransformPath::Requantized);
            assert_eq!(
                data,
                expected[bytes_per(range.start)..bytes_per(range.end)],
                "{t} over {range:?}"
            );
        }
    }
    // Q5_0 weighs each value by its row's mean square: part of a row is refused, with
    // nothing written.
    let t = GgmlType::Q5_0;
    let original = quantize(t, &wavy(n, 6)).unwrap();
    let mut data = original.clone();
    let importance = Importance::new(t, &weights, &dims, 0).unwrap();
    let result = transform_range_weighted(
        t,
        &mut data,
        32..n as u64,
        &Transform::Offset(0.5),
        Some(&importance),
    );
    assert!(
        matches!(result, Err(Error::InvalidTransform { .. })),
        "{result:?}"
    );
    assert_eq!(data, original);
    // Weights that do not fit the shape, or are negative, are refused.
    assert!(matches!(
        Importance::new(t, &weights[..n_per_row], &dims, 0),
        Err(Error::LengthMismatch { .. })
    ));
    let mut bad = weights.clone();
    bad[3] = -1.0;
    assert!(matches!(
        Importance::new(t, &bad, &dims, 0),
        Err(Error::BadImportance { column: 3, .. })
    ));
    // A block-scale transform ignores the weights: scaling a Q4_K tensor is exact.
    let t = GgmlType::Q4_K;
    let original = quantize(t, &wavy(n, 7)).unwrap();
    let mut data = original.clone();
    let importance = Importance::new(t, &weights, &dims, 0).unwrap();
    let report = transform_range_weighted(
        t,
        &mut data,
        0..n as u64,
        &Transform::Scale(0.5),
        Some(&importance),
    )
    .unwrap();
    assert_eq!(report.path, TransformPath::Scales);
}
