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
//!
//! The TQ1_0, TQ2_0 and MXFP4 quantizers follow gguf-py (bit-exact with ggml's
//! reference); IQ4_NL and IQ4_XS follow ggml's `quantize_row_iq4_{nl,xs}_ref` (no
//! importance matrix). One deliberate difference: where ggml leaves the codes of an
//! all-zero IQ4_NL block as whatever its scratch buffer held (the previous block's
//! codes), we write code 0; the block decodes to zeros either way.

use super::legacy::{numpy_cast_i32, round_half_away};
use super::{BlockOverflow, f16_at, f16_bits, signed_abs_max};

/// The IQ4_NL / IQ4_XS value grid.
pub(super) const IQ4_VALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

/// Doubled e2m1 values: code 0..15 of MXFP4.
const E2M1_DOUBLED: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

#[inline(always)]
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

#[inline(always)]
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

#[inline(always)]
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

#[inline(always)]
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

#[inline(always)]
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

pub(super) fn scale_bits(d: f32, block: usize) -> Result<[u8; 2], BlockOverflow> {
    f16_bits(d)
        .map(u16::to_le_bytes)
        .ok_or(BlockOverflow { block, value: d })
}

/// Ternary codes 0, 1, 2 for -1, 0, +1 of a super-block: d = max |x|, code =
/// round(x / d) + 1, cast as numpy casts (an infinite 1/d gives code 1).
fn ternary_codes(x: &[f32; 256]) -> (f32, [u8; 256]) {
    let d = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut q = [0u8; 256];
    for (c, &v) in q.iter_mut().zip(x) {
        *c = (round_half_away(v * id) as i8).wrapping_add(1) as u8;
    }
    (d, q)
}

#[inline(always)]
pub(super) fn quant_tq2_0(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = src.as_chunks::<256>();
    let (blocks, _) = dst.as_chunks_mut::<66>();
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        let (d, q) = ternary_codes(x);
        b[64..66].copy_from_slice(&scale_bits(d, i)?);
        for half in 0..2 {
            let c = &q[128 * half..128 * half + 128];
            for l in 0..32 {
                b[32 * half + l] = c[l] | (c[l + 32] << 2) | (c[l + 64] << 4) | (c[l + 96] << 6);
            }
        }
    }
    Ok(())
}

#[inline(always)]
pub(super) fn quant_tq1_0(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    const POW3: [u16; 5] = [81, 27, 9, 3, 1];
    let (xs, _) = src.as_chunks::<256>();
    let (blocks, _) = dst.as_chunks_mut::<54>();
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        let (d, q) = ternary_codes(x);
        b[52..54].copy_from_slice(&scale_bits(d, i)?);
        // Five (then four) base-3 digits per byte, most significant first, stored as
        // the fraction ceil(n * 256 / 243) so that multiplying by 3^k exposes digit k.
        let mut digits = [0u16; 52];
        for l in 0..32 {
            digits[l] = (0..5).map(|p| u16::from(q[p * 32 + l]) * POW3[p]).sum();
        }
        for l in 0..16 {
            digits[32 + l] = (0..5)
                .map(|p| u16::from(q[160 + p * 16 + l]) * POW3[p])
                .sum();
        }
        for l in 0..4 {
            digits[48 + l] = (0..4)
                .map(|p| u16::from(q[240 + p * 4 + l]) * POW3[p])
                .sum();
        }
        for (o, n) in b[..52].iter_mut().zip(digits) {
            *o = (n * 256).div_ceil(243) as u8;
        }
    }
    Ok(())
}

#[inline(always)]
pub(super) fn quant_mxfp4(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = src.as_chunks::<32>();
    let (blocks, _) = dst.as_chunks_mut::<17>();
    for (x, b) in xs.iter().zip(blocks.iter_mut()) {
        let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        // The shared exponent puts the largest magnitude within the top e2m1 value (6,
        // or 12 doubled); numpy's float to uint8 cast wraps below 2^-125.
        let e = if amax > 0.0 {
            numpy_cast_i32(amax.log2().floor() - 2.0 + 127.0) as u8
        } else {
            0
        };
        let d = e8m0_half(e);
        b[0] = e;
        let mut codes = [0u8; 32];
        for (c, &v) in codes.iter_mut().zip(x) {
            let mut best = 0;
            let mut best_err = (d * f32::from(E2M1_DOUBLED[0]) - v).abs();
            for (k, &kv) in E2M1_DOUBLED.iter().enumerate().skip(1) {
                let err = (d * f32::from(kv) - v).abs();
                if err < best_err {
                    best = k;
                    best_err = err;
                }
            }
            *c = best as u8;
        }
        for j in 0..16 {
            b[1 + j] = codes[j] | (codes[j + 16] << 4);
        }
    }
    Ok(())
}

/// ggml's `best_index_int8` over the IQ4 grid: the index of the grid value nearest to
/// `x` (the upper one on ties), by bisection.
#[inline]
pub(super) fn best_index_iq4(x: f32) -> u8 {
    let v = |i: usize| f32::from(IQ4_VALUES[i]);
    if x <= v(0) {
        return 0;
    }
    if x >= v(15) {
        return 15;
    }
    let (mut lo, mut hi) = (0usize, 15usize);
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if x < v(mid) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    if x - v(hi - 1) < v(hi) - x {
        (hi - 1) as u8
    } else {
        hi as u8
    }
}

/// The least-squares scale search of ggml's `quantize_row_iq4_nl_impl` for one
/// 32-element sub-block (x²-weighted, no importance matrix): returns the scale (0 for
/// an all-zero sub-block) and leaves the first pass's codes in `codes`.
fn iq4_sub_block(x: &[f32; 32], ntry: i32, codes: &mut [u8; 32]) -> f32 {
    iq4_sub_block_weighted(x, &x.map(|v| v * v), ntry, codes)
}

/// [`iq4_sub_block`] with the weight of each element given: x² without an importance
/// matrix, the importance times `sqrt(sigma2 + x²)` with one.
pub(super) fn iq4_sub_block_weighted(
    x: &[f32; 32],
    weights: &[f32; 32],
    ntry: i32,
    codes: &mut [u8; 32],
) -> f32 {
    let (max, amax) = signed_abs_max(x);
    if amax < 1e-15 {
        return 0.0;
    }
    let v0 = f32::from(IQ4_VALUES[0]);
    let d = if ntry > 0 { -max / v0 } else { max / v0 };
    let sums = |id: f32, codes: Option<&mut [u8; 32]>| {
        let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
        let mut out = [0u8; 32];
        for ((o, &v), &w) in out.iter_mut().zip(x).zip(weights) {
            let l = best_index_iq4(id * v);
            *o = l;
            let q = f32::from(IQ4_VALUES[usize::from(l)]);
            sumqx += w * q * v;
            sumq2 += w * q * q;
        }
        if let Some(c) = codes {
            *c = out;
        }
        (sumqx, sumq2)
    };
    let (sumqx, sumq2) = sums(1.0 / d, Some(codes));
    let mut d = if sumq2 > 0.0 { sumqx / sumq2 } else { 0.0 };
    let mut best = d * sumqx;
    for itry in -ntry..=ntry {
        let id = (itry as f32 + v0) / max;
        let (sumqx, sumq2) = sums(id, None);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    d
}

pub(super) fn pack_iq4_nibbles(codes: &[u8; 32], out: &mut [u8]) {
    for j in 0..16 {
        out[j] = codes[j] | (codes[j + 16] << 4);
    }
}

#[inline(always)]
pub(super) fn quant_iq4_nl(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = src.as_chunks::<32>();
    let (blocks, _) = dst.as_chunks_mut::<18>();
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        // ggml's reference runs the search with ntry = -1: one pass, and the codes of
        // that pass are kept with the refined scale.
        let mut codes = [0u8; 32];
        let d = iq4_sub_block(x, -1, &mut codes);
        b[..2].copy_from_slice(&scale_bits(d, i)?);
        pack_iq4_nibbles(&codes, &mut b[2..]);
    }
    Ok(())
}

#[inline(always)]
pub(super) fn quant_iq4_xs(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = src.as_chunks::<256>();
    let (blocks, _) = dst.as_chunks_mut::<136>();
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        let (subs, _) = x.as_chunks::<32>();
        let mut scales = [0f32; 8];
        let mut scratch = [0u8; 32];
        for (s, sub) in scales.iter_mut().zip(subs) {
            *s = iq4_sub_block(sub, 7, &mut scratch);
        }
        finish_iq4_xs(x, &scales, b, i)?;
    }
    Ok(())
}

/// The part of ggml's IQ4_XS quantizer after the eight sub-block scales are found (with
/// or without importance weights): the super-block scale, the 6-bit sub-block scales and
/// the codes, written into the 136 bytes of block `block`.
pub(super) fn finish_iq4_xs(
    x: &[f32; 256],
    scales: &[f32; 8],
    b: &mut [u8],
    block: usize,
) -> Result<(), BlockOverflow> {
    let (subs, _) = x.as_chunks::<32>();
    let mut max_scale = 0.0f32;
    let mut amax_scale = 0.0f32;
    for s in scales {
        if s.abs() > amax_scale {
            amax_scale = s.abs();
            max_scale = *s;
        }
    }
    let d = -max_scale / 32.0;
    b[..2].copy_from_slice(&scale_bits(d, block)?);
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let mut scales_h = 0u16;
    let mut scales_l = [0u8; 4];
    for (ib, (s, sub)) in scales.iter().zip(subs).enumerate() {
        let l = super::kquants::nearest_int(id * s).clamp(-32, 31);
        let dl = d * l as f32;
        let idl = if dl == 0.0 { 0.0 } else { 1.0 / dl };
        let mut codes = [0u8; 32];
        for (c, &v) in codes.iter_mut().zip(sub) {
            *c = best_index_iq4(idl * v);
        }
        pack_iq4_nibbles(&codes, &mut b[8 + 16 * ib..8 + 16 * ib + 16]);
        let l = (l + 32) as u8;
        scales_l[ib / 2] |= (l & 0x0f) << (4 * (ib % 2));
        scales_h |= u16::from(l >> 4) << (2 * ib);
    }
    b[2..4].copy_from_slice(&scales_h.to_le_bytes());
    b[4..8].copy_from_slice(&scales_l);
    Ok(())
}
