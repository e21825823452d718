//! Types whose codes index a small table of values: IQ4_NL, IQ4_XS (a non-linear 4-bit
//! grid), MXFP4 (e2m1 values under a power-of-two scale) and the ternary TQ1_0, TQ2_0.
//!
//! Layouts (byte offsets in a block):
//! - IQ4_NL (32/18): f16 d @0, nibbles @2 (element j low nibble of byte j, j + 16 high).
//! - IQ4_XS (256/136): f16 d @0, u16 high scale bits @2, low scale nibbles[4] @4,
//!   nibbles[128] @8 in eight 32-element sub-blocks of 16 bytes.
//! - MXFP4 (32/17): e8m0 exponent @0, nibbles @1 (doubled e2m1 values, half the scale).
//! - TQ1_0 (256/54): base-3 digits packed five (or four) per byte, qs[48] @0, qh[4] @48,
//!   f16 d @52.
//! - TQ2_0 (256/66): 2-bit codes qs[64] @0, f16 d @64; x = d * (q - 1).

use super::f16_at;

/// The IQ4_NL / IQ4_XS value grid.
const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Doubled e2m1 values: code 0..15 of MXFP4.
const E2M1_DOUBLED: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

#[inline]
pub(super) fn dequant_iq4_nl(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<18>();
    let (outs, _) = dst.as_chunks_mut::<32>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        let (lo, hi) = y.split_at_mut(16);
        for ((q, l), h) in b[2..].iter().zip(lo.iter_mut()).zip(hi.iter_mut()) {
            *l = d * f32::from(IQ4_VALUES[usize::from(q & 0x0f)]);
            *h = d * f32::from(IQ4_VALUES[usize::from(q >> 4)]);
        }
    }
}

#[inline]
pub(super) fn dequant_iq4_xs(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<136>();
    let (outs, _) = dst.as_chunks_mut::<256>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        let scales_h = u16::from_le_bytes([b[2], b[3]]);
        let (qs, _) = b[8..].as_chunks::<16>();
        let (ys, _) = y.as_chunks_mut::<32>();
        for (k, (q, out)) in qs.iter().zip(ys.iter_mut()).enumerate() {
            let low = (b[4 + k / 2] >> (4 * (k % 2))) & 0x0f;
            let high = ((scales_h >> (2 * k)) & 3) as u8;
            let dl = d * f32::from((low | (high << 4)) as i8 - 32);
            let (lo, hi) = out.split_at_mut(16);
            for ((v, l), h) in q.iter().zip(lo.iter_mut()).zip(hi.iter_mut()) {
                *l = dl * f32::from(IQ4_VALUES[usize::from(v & 0x0f)]);
                *h = dl * f32::from(IQ4_VALUES[usize::from(v >> 4)]);
            }
        }
    }
}

/// An e8m0 exponent as an f32 holding half its power of two (ggml's
/// `ggml_e8m0_to_fp32_half`), since the code table is doubled.
#[inline]
fn e8m0_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        u32::from(e - 1) << 23
    };
    f32::from_bits(bits)
}

#[inline]
pub(super) fn dequant_mxfp4(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<17>();
    let (outs, _) = dst.as_chunks_mut::<32>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = e8m0_half(b[0]);
        let (lo, hi) = y.split_at_mut(16);
        for ((q, l), h) in b[1..].iter().zip(lo.iter_mut()).zip(hi.iter_mut()) {
            *l = d * f32::from(E2M1_DOUBLED[usize::from(q & 0x0f)]);
            *h = d * f32::from(E2M1_DOUBLED[usize::from(q >> 4)]);
        }
    }
}

/// A base-3 digit stored as a fraction of 256: multiplying by 3^k (wrapping in a byte)
/// brings digit k to the top, and `(byte * 3) >> 8` reads it.
#[inline(always)]
fn ternary(byte: u8, pow3: u8) -> f32 {
    let shifted = byte.wrapping_mul(pow3);
    f32::from(((u16::from(shifted) * 3) >> 8) as i8 - 1)
}

#[inline]
pub(super) fn dequant_tq1_0(src: &[u8], dst: &mut [f32]) {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    let (blocks, _) = src.as_chunks::<54>();
    let (outs, _) = dst.as_chunks_mut::<256>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 52);
        for (p, &pow) in POW3.iter().enumerate() {
            for l in 0..32 {
                y[p * 32 + l] = d * ternary(b[l], pow);
            }
            for l in 0..16 {
                y[160 + p * 16 + l] = d * ternary(b[32 + l], pow);
            }
        }
        for (p, &pow) in POW3[..4].iter().enumerate() {
            for l in 0..4 {
                y[240 + p * 4 + l] = d * ternary(b[48 + l], pow);
            }
        }
    }
}

#[inline]
pub(super) fn dequant_tq2_0(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<66>();
    let (outs, _) = dst.as_chunks_mut::<256>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 64);
        for half in 0..2 {
            let qs = &b[32 * half..32 * half + 32];
            for shift in 0..4 {
                let out = &mut y[half * 128 + shift * 32..half * 128 + shift * 32 + 32];
                for (o, q) in out.iter_mut().zip(qs) {
                    *o = d * f32::from(((q >> (2 * shift)) & 3) as i8 - 1);
                }
            }
        }
    }
}
