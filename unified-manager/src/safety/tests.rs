//! The one-pass and two-pass plans of a tensor agree: the same scan, the same repaired
//! and clamped values, the same bytes to write.

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
            let (scan, fix) = examine(&gguf, tensor, repair, sigmas, u64::MAX).unwrap();
            // Windows of 96 values: many, and not a divisor of the tensor.
            let (scan_windows, fix_windows) = examine(&gguf, tensor, repair, sigmas, 96).unwrap();
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
