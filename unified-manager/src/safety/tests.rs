//! The one-pass and two-pass plans of a tensor agree: the same scan, the same repaired
//! and clamped values, the same bytes to write. With importance weights, a fixed row is
//! requantized as `quantize_weighted` quantizes it.

use byte_tier::{GgmlType, Gguf, GgufWriter, TensorSpec};

use super::{Repair, examine};

/// A model with an F32 and a Q8_0 tensor of 4,096 values each, holding NaN, infinity
/// and outliers.
fn model() -> Vec<u8> {
    let mut values: Vec<f32> = (0..4096)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 40.0)
        .collect();
    values[5] = f32::NAN;
    values[700] = f32::INFINITY;
    values[1500] = 90.0;
    values[3000] = -75.0;
    let f32_bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let finite: Vec<f32> = values
        .iter()
        .map(|v| if v.is_finite() { *v } else { 0.5 })
        .collect();
    let mut q8 = byte_tier::codec::quantize(GgmlType::Q8_0, &finite).unwrap();
    // A NaN scale (f16 0x7e00) in the fourth block of 34 bytes.
    q8[3 * 34..3 * 34 + 2].copy_from_slice(&[0x00, 0x7e]);
    let mut writer = GgufWriter::new();
    writer.add_tensor(TensorSpec::from_bytes(
        "a",
        vec![4096],
        GgmlType::F32,
        f32_bytes,
    ));
    writer.add_tensor(TensorSpec::from_bytes("b", vec![4096], GgmlType::Q8_0, q8));
    let mut out = Vec::new();
    writer.write_to(&mut out).unwrap();
    out
}

#[test]
fn one_decode_and_two_decodes_plan_the_same_fix() {
    let bytes = model();
    let gguf = Gguf::parse(&bytes).unwrap();
    for tensor in gguf.tensors() {
        for (repair, sigmas) in [
            (Some(Repair::Zero), Some(3.0)),
            (Some(Repair::Clamp), None),
            (None, Some(2.5)),
        ] {
            let (scan, fix) = examine(&gguf, tensor, repair, sigmas, None, u64::MAX).unwrap();
            // Windows of 96 values: many, and not a divisor of the tensor.
            let (scan_windows, fix_windows) =
                examine(&gguf, tensor, repair, sigmas, None, 96).unwrap();
            let case = format!("{} {repair:?} {sigmas:?}", tensor.name);
            assert_eq!(scan, scan_windows, "{case}");
            assert_eq!(
                (
                    fix.repaired_values,
                    fix.clamped_values,
                    fix.repair_bytes,
                    fix.clamp_bytes
                ),
                (
                    fix_windows.repaired_values,
                    fix_windows.clamped_values,
                    fix_windows.repair_bytes,
                    fix_windows.clamp_bytes
                ),
                "{case}"
            );
            assert!(
                fix.clamped_values + fix.repaired_values > 0,
                "{case}: nothing fixed"
            );
            assert!(fix.write.is_some(), "{case}: nothing to write");
            assert!(fix.write == fix_windows.write, "{case}: the writes differ");
        }
    }
}

/// Rows of 256 values (a smooth wave with a few large ones, and a fourth block of 32
/// far smaller than the rest of its row) and positive weights.
fn rows(n_rows: usize) -> (Vec<f32>, Vec<f32>) {
    let values = (0..256 * n_rows)
        .map(|i| {
            let x = (i as f32 * 0.37).sin() * 0.8 + (i as f32 * 0.011).cos() * 0.3;
            let x = if i % 97 == 0 { x * 6.0 } else { x };
            if (i % 256) / 32 == 3 { x * 0.02 } else { x }
        })
        .collect();
    let weights = (0..256).map(|i| 0.2 + (i % 13) as f32 * 0.3).collect();
    (values, weights)
}

/// A file with one tensor of `ty`, 256 x 4, quantized with `weights`, whose block
/// `block` of row 1 has a NaN scale (its first two bytes, an f16, set to 0x7e00).
fn planted(ty: GgmlType, weights: &[f32], block: usize) -> Vec<u8> {
    let (values, _) = rows(4);
    let mut data = byte_tier::codec::quantize_weighted(ty, &values, 256, weights).unwrap();
    let block_bytes = ty.block_bytes() as usize;
    let at = data.len() / 4 + block * block_bytes;
    data[at..at + 2].copy_from_slice(&[0x00, 0x7e]);
    let mut writer = GgufWriter::new();
    writer.add_tensor(TensorSpec::from_bytes("w", vec![256, 4], ty, data));
    let mut out = Vec::new();
    writer.write_to(&mut out).unwrap();
    out
}

#[test]
fn a_weighted_fix_requantizes_the_fixed_row_with_its_weights() {
    let (values, weights) = rows(4);
    let sigmas = 2.5f32;
    for ty in [GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::IQ4_NL] {
        let data = byte_tier::codec::quantize_weighted(ty, &values, 256, &weights).unwrap();
        // The clamp bounds, as the planner computes them from the stored values.
        let stored = byte_tier::codec::dequantize(ty, &data).unwrap();
        let n = stored.len() as f64;
        let mean = stored.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = stored.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / n - mean * mean;
        let spread = f64::from(sigmas) * var.max(0.0).sqrt();
        let (lo, hi) = ((mean - spread) as f32, (mean + spread) as f32);
        let mut writer = GgufWriter::new();
        writer.add_tensor(TensorSpec::from_bytes("w", vec![256, 4], ty, data.clone()));
        let mut bytes = Vec::new();
        writer.write_to(&mut bytes).unwrap();
        let gguf = Gguf::parse(&bytes).unwrap();
        let tensor = &gguf.tensors()[0];

        // Expected: each row with a clamped value quantized whole with the weights, and
        // only its blocks that hold a clamped value taken from it.
        let (block_len, block_bytes) = (ty.block_len() as usize, ty.block_bytes() as usize);
        let row_bytes = data.len() / 4;
        let mut expected = data.clone();
        let mut differs_from_alone = false;
        for r in 0..4 {
            let mut row =
                byte_tier::codec::dequantize(ty, &data[r * row_bytes..(r + 1) * row_bytes])
                    .unwrap();
            let clamped: Vec<bool> = row
                .chunks_mut(block_len)
                .map(|block| {
                    let outside = block.iter().any(|v| *v < lo || *v > hi);
                    block.iter_mut().for_each(|v| *v = v.clamp(lo, hi));
                    outside
                })
                .collect();
            let whole = byte_tier::codec::quantize_weighted(ty, &row, 256, &weights).unwrap();
            for (b, _) in clamped.iter().enumerate().filter(|(_, c)| **c) {
                let new = &whole[b * block_bytes..(b + 1) * block_bytes];
                let at = r * row_bytes + b * block_bytes;
                expected[at..at + block_bytes].copy_from_slice(new);
                let columns = b * block_len..(b + 1) * block_len;
                let alone = byte_tier::codec::quantize_weighted(
                    ty,
                    &row[columns.clone()],
                    block_len,
                    &weights[columns],
                )
                .unwrap();
                differs_from_alone |= alone != new;
            }
        }
        assert!(expected != data, "{ty:?}: nothing to clamp");
        if ty == GgmlType::Q4_0 {
            // Q4_0's weighted search uses the whole row's statistics: some block comes
            // out differently when quantized alone.
            assert!(differs_from_alone);
        }

        for one_pass in [u64::MAX, 300] {
            let (_, fix) =
                examine(&gguf, tensor, None, Some(sigmas), Some(&weights), one_pass).unwrap();
            assert!(fix.clamped_values > 0);
            let (offset, written) = fix.write.unwrap();
            let start = (offset - tensor.data_offset) as usize;
            assert!(
                written == expected[start..start + written.len()],
                "{ty:?}, one pass up to {one_pass} values"
            );
            let mut result = data.clone();
            result[start..start + written.len()].copy_from_slice(&written);
            assert!(result == expected, "{ty:?}: a fixed block is not written");
        }
    }
}

#[test]
fn a_type_ggml_quantizes_only_with_weights_is_fixed_only_with_them() {
    let (_, weights) = rows(1);
    let bytes = planted(GgmlType::IQ2_XXS, &weights, 0);
    let gguf = Gguf::parse(&bytes).unwrap();
    let tensor = &gguf.tensors()[0];
    let (_, fix) = examine(&gguf, tensor, Some(Repair::Zero), None, None, u64::MAX).unwrap();
    assert!(fix.write.is_none());
    assert!(
        fix.skipped
            .as_deref()
            .is_some_and(|why| why.contains("--imatrix")),
        "{:?}",
        fix.skipped
    );
    let (_, fix) = examine(
        &gguf,
        tensor,
        Some(Repair::Zero),
        None,
        Some(&weights),
        u64::MAX,
    )
    .unwrap();
    assert!(fix.skipped.is_none());
    assert_eq!(fix.repaired_values, 256);
    let (offset, written) = fix.write.unwrap();
    let row_bytes = tensor.n_bytes / 4;
    assert_eq!(offset, tensor.data_offset + row_bytes);
    // A row of zeros quantizes to a block of zeros.
    assert!(written.iter().all(|&b| b == 0), "{written:?}");
}
