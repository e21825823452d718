use super::*;
use crate::codec::scan::scale_fields;
use crate::codec::{
    dequant_kernel_at, quant_kernel_at, scalar_dequant_kernel, scalar_quant_kernel,
};

/// A deterministic stream of random words (splitmix64).
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// f16 scales at the edges: quiet, signalling and negative NaN, both infinities, the
/// smallest and largest subnormals, both zeros, the smallest normal and the largest
/// finite value, and a few ordinary ones.
const EDGE_F16: &[u16] = &[
    0x7e00, 0x7c01, 0xfe00, 0x7fff, 0x7c00, 0xfc00, 0x0001, 0x03ff, 0x8001, 0x0000, 0x8000, 0x0400,
    0x7bff, 0xfbff, 0x3c00, 0x2000, 0xb555,
];

/// Block counts that are not multiples of any vector width or chunk.
const BLOCK_COUNTS: &[usize] = &[1, 3, 7, 33];

/// Random blocks of `t`, with the f16 scale fields of every other block set to edge
/// values in turn. The plain types get edge words planted the same way: f16 and bf16
/// NaN, infinity and subnormal patterns.
fn blocks(t: GgmlType, n_blocks: usize, random: &mut Random) -> Vec<u8> {
    let block_bytes = t.block_bytes() as usize;
    let mut data = random.bytes(n_blocks * block_bytes);
    let fields = scale_fields(t);
    let mut edge = EDGE_F16.iter().cycle();
    for (i, block) in data.chunks_exact_mut(block_bytes).enumerate() {
        if i % 2 == 1 {
            continue;
        }
        for field in 0..fields.len() {
            fields.set(block, field, *edge.next().unwrap_or(&0));
        }
    }
    if t.block_len() == 1 && block_bytes == 2 {
        for (word, bits) in data.chunks_exact_mut(2).zip(EDGE_F16.iter().step_by(1)) {
            word.copy_from_slice(&bits.to_le_bytes());
        }
    }
    data
}

fn levels_above_scalar() -> Vec<SimdLevel> {
    let levels: Vec<SimdLevel> = SimdLevel::supported()
        .into_iter()
        .filter(|&l| l != SimdLevel::Scalar)
        .collect();
    eprintln!("SIMD levels under test: {levels:?}");
    levels
}

#[test]
fn every_supported_level_dequantizes_every_type_bit_for_bit_as_scalar() {
    let mut random = Random(0x5349_4d44);
    let mut checked = 0;
    for level in levels_above_scalar() {
        let mut own = 0;
        for &t in GgmlType::ALL {
            let Some(scalar) = scalar_dequant_kernel(t) else {
                continue;
            };
            // Types without a kernel of the level's own fall back to the scalar one; the
            // comparison runs either way, so that a fallback is checked too.
            own += usize::from(dequant_kernel(level, t).is_some());
            let vector = dequant_kernel_at(level, t).unwrap();
            for &n_blocks in BLOCK_COUNTS {
                let data = blocks(t, n_blocks, &mut random);
                let n = n_blocks * t.block_len() as usize;
                let mut want = vec![0f32; n];
                let mut got = vec![1f32; n];
                scalar(&data, &mut want);
                vector(&data, &mut got);
                for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                    assert_eq!(
                        w.to_bits(),
                        g.to_bits(),
                        "{t} at {level}, {n_blocks} blocks: element {i} is {g:?} ({:#010x}), \
                         scalar gives {w:?} ({:#010x})",
                        g.to_bits(),
                        w.to_bits()
                    );
                }
                checked += 1;
            }
        }
        // Q8_0 and Q4_K at least have kernels of each level's own.
        assert!(
            own >= 2,
            "{level} has {own} dequantization kernels of its own"
        );
    }
    eprintln!("{checked} (level, type, length) cases agree");
}

/// Finite values of every kind: ordinary, tiny, subnormal, zeros of both signs, and
/// magnitudes large enough to overflow a block's scale.
fn values(n: usize, random: &mut Random) -> Vec<f32> {
    const EDGE: &[f32] = &[
        0.0,
        -0.0,
        1e-45,
        -1e-40,
        f32::MIN_POSITIVE,
        65504.0,
        -65520.0,
        1e30,
        -3.4e38,
        f32::MAX,
    ];
    (0..n)
        .map(|i| {
            let word = random.next();
            match word % 16 {
                0 => EDGE[(word >> 8) as usize % EDGE.len()],
                1 => (word >> 32) as i32 as f32 * 1e-12,
                _ => ((word >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * (1 + i % 7) as f32,
            }
        })
        .collect()
}

#[test]
fn every_supported_level_quantizes_every_type_bit_for_bit_as_scalar() {
    let mut random = Random(0x7175_616e);
    let mut checked = 0;
    for level in levels_above_scalar() {
        let mut own = 0;
        for &t in GgmlType::ALL {
            let Some(scalar) = scalar_quant_kernel(t) else {
                continue;
            };
            own += usize::from(quant_kernel(level, t).is_some());
            let vector = quant_kernel_at(level, t).unwrap();
            for &n_blocks in BLOCK_COUNTS {
                // Half the runs keep to ordinary values so that whole blocks quantize;
                // the others include values whose scale overflows, and both sides must
                // stop at the same block with the same value.
                for extremes in [false, true] {
                    let n = n_blocks * t.block_len() as usize;
                    let mut x = values(n, &mut random);
                    if !extremes {
                        x.iter_mut().for_each(|v| *v = v.clamp(-100.0, 100.0));
                    }
                    let bytes = n_blocks * t.block_bytes() as usize;
                    let (mut want, mut got) = (vec![0u8; bytes], vec![0u8; bytes]);
                    let want_result = scalar(&x, &mut want);
                    let got_result = vector(&x, &mut got);
                    // The overflow's value compared by its bits: NaN scales must match too.
                    let bits = |r: Result<(), crate::codec::BlockOverflow>| {
                        r.map_err(|e| (e.block, e.value.to_bits()))
                    };
                    assert_eq!(
                        bits(got_result),
                        bits(want_result),
                        "{t} at {level}, {n_blocks} blocks"
                    );
                    if want_result.is_ok() {
                        assert_eq!(got, want, "{t} at {level}, {n_blocks} blocks");
                    }
                    checked += 1;
                }
            }
        }
        // Q8_0 at least has a quantizer of each level's own.
        assert!(own > 0, "{level} has no quantization kernel of its own");
    }
    eprintln!("{checked} (level, type, length) cases agree");
}

#[test]
fn k_quant_searches_agree_with_scalar_on_many_super_blocks() {
    // The vector scale searches take a branch per lane where the scalar search takes it
    // per sub-block; many super-blocks of mixed magnitudes, with flat, one-signed and
    // sparse sub-blocks, exercise every combination of those branches.
    let mut random = Random(0x6b5f_7175);
    let n_blocks = 400;
    let mut x = values(n_blocks * 256, &mut random);
    for (b, block) in x.chunks_exact_mut(256).enumerate() {
        // At most 1e4 in magnitude: every super-block's scales fit their f16 fields.
        let magnitude = [1e-3f32, 1.0, 30.0, 100.0][b % 4];
        for (i, v) in block.iter_mut().enumerate() {
            let sub = i / 16;
            *v = match (b / 4 + sub) % 6 {
                0 => 0.25 * magnitude,
                1 => v.abs().min(100.0) * magnitude,
                2 if i % 5 != 0 => 0.0,
                _ => v.clamp(-100.0, 100.0) * magnitude,
            };
        }
    }
    for level in levels_above_scalar() {
        for t in [
            GgmlType::Q2_K,
            GgmlType::Q4_K,
            GgmlType::Q5_K,
            GgmlType::Q6_K,
        ] {
            let (Some(scalar), Some(vector)) = (scalar_quant_kernel(t), quant_kernel_at(level, t))
            else {
                continue;
            };
            let bytes = n_blocks * t.block_bytes() as usize;
            let (mut want, mut got) = (vec![0u8; bytes], vec![1u8; bytes]);
            let want_result = scalar(&x, &mut want).map_err(|e| (e.block, e.value.to_bits()));
            let got_result = vector(&x, &mut got).map_err(|e| (e.block, e.value.to_bits()));
            assert_eq!(got_result, want_result, "{t} at {level}");
            assert!(want_result.is_ok(), "{t}: {want_result:?}");
            let block_bytes = t.block_bytes() as usize;
            for (b, (w, g)) in want
                .chunks_exact(block_bytes)
                .zip(got.chunks_exact(block_bytes))
                .enumerate()
            {
                assert_eq!(g, w, "{t} at {level}: super-block {b}");
            }
        }
    }
}

#[test]
fn every_supported_level_quantizes_zero_and_subnormal_blocks_as_scalar() {
    // A block of subnormals has a scale whose inverse overflows to infinity, and a
    // block of zeros a zero scale: the codes then come from the rounding's edge cases.
    let blocks: [&[f32]; 4] = [
        &[0.0],
        &[-0.0, 0.0],
        &[1e-45, -2e-45, 0.0],
        &[-1e-39, 3e-40],
    ];
    for level in levels_above_scalar() {
        for &t in GgmlType::ALL {
            let (Some(scalar), Some(vector)) = (scalar_quant_kernel(t), quant_kernel_at(level, t))
            else {
                continue;
            };
            for pattern in blocks {
                let n = 2 * t.block_len() as usize;
                let x: Vec<f32> = pattern.iter().copied().cycle().take(n).collect();
                let bytes = 2 * t.block_bytes() as usize;
                let (mut want, mut got) = (vec![0u8; bytes], vec![1u8; bytes]);
                let want_result = scalar(&x, &mut want).map_err(|e| (e.block, e.value.to_bits()));
                let got_result = vector(&x, &mut got).map_err(|e| (e.block, e.value.to_bits()));
                assert_eq!(got_result, want_result, "{t} at {level}, {pattern:?}");
                if want_result.is_ok() {
                    assert_eq!(got, want, "{t} at {level}, {pattern:?}");
                }
            }
        }
    }
}

#[test]
fn every_supported_level_finds_nan_and_infinity_as_scalar() {
    let mut random = Random(0x6e61_6e73);
    let planted = [
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001),
        f32::from_bits(0xffff_ffff),
        f32::INFINITY,
        f32::NEG_INFINITY,
    ];
    for level in levels_above_scalar() {
        let vector = any_non_finite_kernel(level);
        for n in [0, 1, 7, 8, 15, 16, 33, 64, 255, 1000] {
            let clean = values(n, &mut random);
            assert!(!vector(&clean), "{level}, {n} finite values");
            assert_eq!(vector(&clean), crate::codec::any_non_finite(&clean));
            for at in [0, n / 2, n.saturating_sub(1)]
                .into_iter()
                .filter(|&at| at < n)
            {
                for bad in planted {
                    let mut x = clean.clone();
                    x[at] = bad;
                    assert!(vector(&x), "{level}: {bad:?} at {at} of {n} missed");
                    assert_eq!(vector(&x), crate::codec::any_non_finite(&x));
                }
            }
        }
    }
}

#[test]
fn levels_are_named_as_the_environment_variable_spells_them() {
    for &level in SimdLevel::ALL {
        assert_eq!(SimdLevel::from_name(level.name()), Some(level));
    }
    assert_eq!(SimdLevel::from_name("AVX2"), None);
    assert_eq!(SimdLevel::from_name("sse4"), None);
}

#[test]
fn the_process_runs_at_a_supported_level_and_scalar_always_is() {
    assert!(SimdLevel::Scalar.is_supported());
    assert!(simd_level().is_supported());
    assert!(SimdLevel::supported().contains(&simd_level()));
    // The scalar level hands out no kernel of its own.
    for &t in GgmlType::ALL {
        assert!(dequant_kernel(SimdLevel::Scalar, t).is_none());
        assert!(quant_kernel(SimdLevel::Scalar, t).is_none());
    }
}

#[test]
fn a_requested_level_is_capped_to_a_supported_one_at_or_below_it() {
    for &level in SimdLevel::ALL {
        let capped = level.capped();
        assert!(
            capped.is_supported(),
            "{level} caps to unsupported {capped}"
        );
        assert!(capped <= level, "{level} caps up to {capped}");
        if level.is_supported() {
            assert_eq!(capped, level);
        }
    }
    // The highest level caps to the best this CPU has; the other architecture's levels
    // never run here.
    assert_eq!(SimdLevel::Avx512.capped(), SimdLevel::detect());
    if cfg!(target_arch = "aarch64") {
        assert_eq!(SimdLevel::detect(), SimdLevel::Neon);
        assert!(!SimdLevel::Avx2.is_supported());
    } else {
        assert!(!SimdLevel::Neon.is_supported());
        assert_eq!(SimdLevel::Neon.capped(), SimdLevel::Scalar);
    }
}

#[test]
fn an_unknown_level_name_is_an_error_naming_the_value() {
    let err = Error::UnknownSimdLevel {
        value: "sse9".into(),
    };
    assert_eq!(
        err.to_string(),
        "HOTPATCH_SIMD=\"sse9\" is not a SIMD level: expected scalar, neon, avx2 or avx512"
    );
}
