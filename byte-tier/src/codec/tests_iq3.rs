//! IQ3_XXS and IQ3_S quantization: byte for byte against ggml's output, and the
//! properties that hold whatever the input.

use super::tests::unit_stream;
use super::*;

/// Super-blocks in [`iq3_input`].
const SUPER_BLOCKS: usize = 12;
/// Row length of the weighted reference vectors: two super-blocks, so that the weights
/// of the second super-block come from the second half of the row's weights.
const N_PER_ROW: usize = 512;

/// The inputs of the IQ3 reference vectors, from a fixed-seed generator: weight-like,
/// uniform, all-zero, negative-only, outlier, tiny (below and above IQ3_XXS's zero
/// threshold), partly zero (whole zero sub-blocks between others), stepped (many ties),
/// heavy-tailed, constant and sign-alternating super-blocks.
fn iq3_input() -> Vec<f32> {
    let mut unit = unit_stream(0x2545_f491_4f6c_dd1du64);
    let mut values = Vec::with_capacity(SUPER_BLOCKS * 256);
    for _ in 0..512 {
        values.push((unit() + unit() + unit()) * 0.02);
    }
    for _ in 0..256 {
        values.push(unit());
    }
    values.extend([0.0f32; 256]);
    for _ in 0..256 {
        values.push(-unit().abs() * 0.5);
    }
    for i in 0..256 {
        values.push(match i {
            77 => -40.0,
            _ if i % 97 == 13 => 3.0,
            _ => unit() * 0.01,
        });
    }
    for i in 0..256 {
        let magnitude = if (i / 32) % 2 == 0 { 1e-9 } else { 1e-6 };
        values.push(unit() * magnitude);
    }
    for i in 0..256 {
        let zero_sub_block = matches!(i / 32, 1 | 2 | 5);
        values.push(if zero_sub_block { 0.0 } else { unit() * 0.3 });
    }
    for i in 0..256 {
        values.push((i % 17) as f32 * 0.125 - 1.0);
    }
    for _ in 0..256 {
        values.push(unit() / (unit().abs() + 0.01));
    }
    values.extend([0.5f32; 256]);
    for i in 0..256 {
        let sign = if i % 3 == 0 { -1.0 } else { 1.0 };
        values.push(sign * (0.1 + (i % 11) as f32 * 0.05));
    }
    values
}

/// Importance weights for [`N_PER_ROW`] columns: spread over three orders of magnitude,
/// with scattered zeros and one sub-block of zeros.
fn iq3_weights() -> Vec<f32> {
    (0..N_PER_ROW)
        .map(|i| {
            if (64..96).contains(&i) || i % 29 == 0 {
                0.0
            } else {
                ((i * 7919) % 1000) as f32 / 100.0 + 0.001
            }
        })
        .collect()
}

/// Compares super-block by super-block, naming the first that differs.
fn check_blocks(t: GgmlType, what: &str, ours: &[u8], theirs: &[u8]) {
    assert_eq!(ours.len(), theirs.len(), "{t} {what}");
    let block_bytes = t.block_bytes() as usize;
    for (b, (o, r)) in ours
        .chunks(block_bytes)
        .zip(theirs.chunks(block_bytes))
        .enumerate()
    {
        assert_eq!(o, r, "{t} {what}: super-block {b}");
    }
}

#[test]
fn iq3_quants_match_the_reference_vectors() {
    let expected = include_bytes!("test_data/iq3_ref.bin");
    let input = iq3_input();
    let weights = iq3_weights();
    let mut at = 0;
    for t in [GgmlType::IQ3_XXS, GgmlType::IQ3_S] {
        let plain = quantize(t, &input).unwrap();
        let weighted = quantize_weighted(t, &input, N_PER_ROW, &weights).unwrap();
        for (what, ours) in [("unweighted", plain), ("weighted", weighted)] {
            let theirs = expected
                .get(at..at + ours.len())
                .expect("reference vectors too short");
            check_blocks(t, what, &ours, theirs);
            at += ours.len();
        }
    }
    assert_eq!(at, expected.len());
}

#[test]
fn iq3_types_quantize_with_and_without_weights() {
    for t in [GgmlType::IQ3_XXS, GgmlType::IQ3_S] {
        assert!(
            can_quantize(t) && uses_importance(t) && !needs_importance(t),
            "{t}"
        );
    }
}

#[test]
fn an_all_zero_iq3_s_sub_block_takes_no_room_and_later_codes_move_up() {
    // Without weights a sub-block's grid indices and signs depend on its own values
    // alone. ggml packs those of the non-zero sub-blocks one after the other, so with
    // sub-block 2 all zero, sub-blocks 3..8 sit in places 2..7 and place 7 stays empty;
    // the high index bits and scales keep their own places.
    const INDICES: usize = 2;
    const HIGH_BITS: usize = 66;
    const SIGNS: usize = 74;
    let full: Vec<f32> = iq3_input()[..256].to_vec();
    let mut holed = full.clone();
    holed[64..96].fill(0.0);
    let full = quantize(GgmlType::IQ3_S, &full).unwrap();
    let holed = quantize(GgmlType::IQ3_S, &holed).unwrap();
    let indices = |bytes: &[u8], place: usize| bytes[INDICES + 8 * place..][..8].to_vec();
    let signs = |bytes: &[u8], place: usize| bytes[SIGNS + 4 * place..][..4].to_vec();
    for sub_block in [0, 1, 3, 4, 5, 6, 7] {
        let place = if sub_block < 2 {
            sub_block
        } else {
            sub_block - 1
        };
        assert_eq!(
            indices(&holed, place),
            indices(&full, sub_block),
            "{sub_block}"
        );
        assert_eq!(signs(&holed, place), signs(&full, sub_block), "{sub_block}");
        assert_eq!(holed[HIGH_BITS + sub_block], full[HIGH_BITS + sub_block]);
    }
    assert_eq!(indices(&holed, 7), [0; 8]);
    assert_eq!(signs(&holed, 7), [0; 4]);
    assert_eq!(holed[HIGH_BITS + 2], 0);
}

#[test]
fn iq3_xxs_treats_values_below_its_threshold_as_zero_and_iq3_s_does_not() {
    let tiny: Vec<f32> = (0..256).map(|i| (i % 7) as f32 * 1e-9 - 3e-9).collect();
    let xxs = quantize(GgmlType::IQ3_XXS, &tiny).unwrap();
    assert!(xxs.iter().all(|&b| b == 0));
    // IQ3_S codes grid points and signs (its super-block scale then rounds to an f16
    // zero).
    let s = quantize(GgmlType::IQ3_S, &tiny).unwrap();
    assert!(s[2..106].iter().any(|&b| b != 0));
}

#[test]
fn iq3_round_trips_stay_near_their_input() {
    let input = iq3_input();
    for t in [GgmlType::IQ3_XXS, GgmlType::IQ3_S] {
        let back = dequantize(t, &quantize(t, &input).unwrap()).unwrap();
        // Weight-like and uniform super-blocks: a 3-bit grid keeps the error well under
        // the values' own size.
        for (b, (x, y)) in input.chunks(256).zip(back.chunks(256)).take(3).enumerate() {
            let err: f32 = x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum();
            let power: f32 = x.iter().map(|a| a * a).sum();
            assert!(err < 0.1 * power, "{t} super-block {b}: {err} vs {power}");
        }
    }
}
