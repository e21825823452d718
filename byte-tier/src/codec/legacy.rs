//! The legacy 32-element block types: Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0.
//!
//! Layouts (little-endian): Q4_0 = f16 d, 16 bytes of nibbles (element j in the low
//! nibble of byte j, element j + 16 in its high nibble), x = d * (q - 8). Q4_1 = f16 d,
//! f16 m, nibbles, x = d * q + m. Q5_0 = f16 d, u32 of fifth bits (bit j for element j),
//! nibbles, x = d * (q - 16). Q5_1 = f16 d, f16 m, u32 fifth bits, nibbles, x = d * q + m.
//! Q8_0 = f16 d, 32 i8, x = d * q.

use super::{BlockOverflow, f16_at, f16_bits};

#[inline(always)]
pub(super) fn dequant_q4_0(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<18>();
    let (outs, _) = dst.as_chunks_mut::<32>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        let (lo, hi) = y.split_at_mut(16);
        for ((q, l), h) in b[2..].iter().zip(lo.iter_mut()).zip(hi.iter_mut()) {
            *l = d * f32::from((q & 0x0f) as i8 - 8);
            *h = d * f32::from((q >> 4) as i8 - 8);
        }
    }
}

#[inline(always)]
pub(super) fn dequant_q4_1(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<20>();
    let (outs, _) = dst.as_chunks_mut::<32>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let (lo, hi) = y.split_at_mut(16);
        for ((q, l), h) in b[4..].iter().zip(lo.iter_mut()).zip(hi.iter_mut()) {
            *l = d * f32::from(q & 0x0f) + m;
            *h = d * f32::from(q >> 4) + m;
        }
    }
}

/// The fifth bits of a Q5 block as the f32 amounts they add to each low nibble:
/// `set` where the bit is 1 and `clear` where it is 0, for elements 0..16 and 16..32.
///
/// Testing each bit against a constant mask vectorizes on SSE2, where shifting every
/// lane by its own amount does not; the sums stay exact since nibbles are small integers.
#[inline(always)]
fn fifth_bit_terms(qh: u32, set: f32, clear: f32) -> ([f32; 16], [f32; 16]) {
    const BITS: [u32; 32] = {
        let mut bits = [0u32; 32];
        let mut i = 0;
        while i < 32 {
            bits[i] = 1 << i;
            i += 1;
        }
        bits
    };
    let mut low = [0f32; 16];
    let mut high = [0f32; 16];
    for j in 0..16 {
        low[j] = if qh & BITS[j] != 0 { set } else { clear };
        high[j] = if qh & BITS[j + 16] != 0 { set } else { clear };
    }
    (low, high)
}

#[inline(always)]
pub(super) fn dequant_q5_0(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<22>();
    let (outs, _) = dst.as_chunks_mut::<32>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        // (nibble | bit << 4) - 16 is nibble + 0 or nibble - 16, exactly.
        let (low, high) = fifth_bit_terms(qh, 0.0, -16.0);
        let (lo, hi) = y.split_at_mut(16);
        for (j, ((q, l), h)) in b[6..]
            .iter()
            .zip(lo.iter_mut())
            .zip(hi.iter_mut())
            .enumerate()
        {
            *l = d * (f32::from(q & 0x0f) + low[j]);
            *h = d * (f32::from(q >> 4) + high[j]);
        }
    }
}

#[inline(always)]
pub(super) fn dequant_q5_1(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<24>();
    let (outs, _) = dst.as_chunks_mut::<32>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let (low, high) = fifth_bit_terms(qh, 16.0, 0.0);
        let (lo, hi) = y.split_at_mut(16);
        for (j, ((q, l), h)) in b[8..]
            .iter()
            .zip(lo.iter_mut())
            .zip(hi.iter_mut())
            .enumerate()
        {
            *l = d * (f32::from(q & 0x0f) + low[j]) + m;
            *h = d * (f32::from(q >> 4) + high[j]) + m;
        }
    }
}

#[inline(always)]
pub(super) fn dequant_q8_0(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<34>();
    let (outs, _) = dst.as_chunks_mut::<32>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        for (q, x) in b[2..].iter().zip(y.iter_mut()) {
            *x = d * f32::from(*q as i8);
        }
    }
}

/// The element of largest magnitude (the first one on ties, as numpy's argmax), with its
/// sign: a block of -0.0 gives -0.0 and so a +0.0 scale.
#[inline]
fn signed_abs_max(x: &[f32; 32]) -> f32 {
    let mut max = x[0];
    let mut amax = x[0].abs();
    for &v in &x[1..] {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    max
}

#[inline]
fn min_max(x: &[f32; 32]) -> (f32, f32) {
    let mut min = x[0];
    let mut max = x[0];
    for &v in &x[1..] {
        min = min.min(v);
        max = max.max(v);
    }
    (min, max)
}

#[inline]
pub(super) fn inverse(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

/// A float to integer cast as numpy's `astype` performs it on x86-64 (`cvttss2si`):
/// truncation toward zero, with NaN and values outside the i32 range giving `i32::MIN`.
/// Only blocks whose f32 scale is subnormal (its inverse overflows to infinity) reach
/// those cases; their f16 scale is zero, so the codes do not change any value, but the
/// bytes still match the reference.
#[inline(always)]
pub(super) fn numpy_cast_i32(x: f32) -> i32 {
    if x.is_nan() || !(-2_147_483_648.0..2_147_483_648.0).contains(&x) {
        i32::MIN
    } else {
        x as i32
    }
}

/// Rounds half away from zero (C's `roundf`, gguf-py's `np_roundf`) and casts to an
/// integer as numpy does; gguf-py's rounding turns an infinite value into NaN, which
/// numpy casts to 0.
///
/// Spelled out with truncating casts because `f32::round` is a library call on x86-64
/// without SSE4.1, which made it the slowest step of the quantizers. For |x| < 2^31 the
/// steps are exact: `a - floor(a)` and its double are representable.
#[inline(always)]
pub(super) fn round_half_away(x: f32) -> i32 {
    let a = x.abs();
    if a.is_nan() || a >= 2_147_483_648.0 {
        // NaN, infinity, or beyond i32: as numpy's cast of NaN or an overflow.
        return if x.is_finite() { i32::MIN } else { 0 };
    }
    let floored = a as i32;
    let rounded = floored + (2.0 * (a - floored as f32)) as i32;
    if x < 0.0 { -rounded } else { rounded }
}

pub(super) fn scale_bits(d: f32, block: usize) -> Result<[u8; 2], BlockOverflow> {
    f16_bits(d)
        .map(u16::to_le_bytes)
        .ok_or(BlockOverflow { block, value: d })
}

/// Symmetric 4- or 5-bit blocks (Q4_0, Q5_0): d = max / -half where max is the signed
/// element of largest magnitude, q = trunc(x / d + half + 0.5) clamped to the top code.
/// Returns the scale and the codes.
#[inline]
fn symmetric_codes(x: &[f32; 32], half: f32, top: u8) -> (f32, [u8; 32]) {
    let max = signed_abs_max(x);
    let d = max / -half;
    let id = inverse(d);
    let mut q = [0u8; 32];
    for (c, &v) in q.iter_mut().zip(x) {
        // The sum is at least 0.5 - rounding, so truncation (which the cast does) is
        // the floor; the clamp is the reference's clip to the top code.
        *c = (numpy_cast_i32(v * id + (half + 0.5)) as u8).min(top);
    }
    (d, q)
}

/// Asymmetric 4- or 5-bit blocks (Q4_1, Q5_1): d = (max - min) / top,
/// q = trunc((x - min) / d + 0.5) clamped to the top code.
#[inline]
fn asymmetric_codes(x: &[f32; 32], top: u8) -> (f32, f32, [u8; 32]) {
    let (min, max) = min_max(x);
    let d = (max - min) / f32::from(top);
    let id = inverse(d);
    let mut q = [0u8; 32];
    for (c, &v) in q.iter_mut().zip(x) {
        *c = (numpy_cast_i32((v - min) * id + 0.5) as u8).min(top);
    }
    (d, min, q)
}

pub(super) fn pack_nibbles(q: &[u8; 32], out: &mut [u8]) {
    for (j, o) in out.iter_mut().take(16).enumerate() {
        *o = (q[j] & 0x0f) | ((q[j + 16] & 0x0f) << 4);
    }
}

pub(super) fn fifth_bits(q: &[u8; 32]) -> [u8; 4] {
    let mut qh = 0u32;
    for (j, &c) in q.iter().enumerate() {
        qh |= u32::from((c >> 4) & 1) << j;
    }
    qh.to_le_bytes()
}

#[inline(always)]
pub(super) fn quant_q4_0(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = src.as_chunks::<32>();
    let (blocks, _) = dst.as_chunks_mut::<18>();
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        let (d, q) = symmetric_codes(x, 8.0, 15);
        b[..2].copy_from_slice(&scale_bits(d, i)?);
        pack_nibbles(&q, &mut b[2..]);
    }
    Ok(())
}

#[inline(always)]
pub(super) fn quant_q5_0(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = src.as_chunks::<32>();
    let (blocks, _) = dst.as_chunks_mut::<22>();
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        let (d, q) = symmetric_codes(x, 16.0, 31);
        b[..2].copy_from_slice(&scale_bits(d, i)?);
        b[2..6].copy_from_slice(&fifth_bits(&q));
        pack_nibbles(&q, &mut b[6..]);
    }
    Ok(())
}

#[inline(always)]
pub(super) fn quant_q4_1(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = src.as_chunks::<32>();
    let (blocks, _) = dst.as_chunks_mut::<20>();
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        let (d, m, q) = asymmetric_codes(x, 15);
        b[..2].copy_from_slice(&scale_bits(d, i)?);
        b[2..4].copy_from_slice(&scale_bits(m, i)?);
        pack_nibbles(&q, &mut b[4..]);
    }
    Ok(())
}

#[inline(always)]
pub(super) fn quant_q5_1(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = src.as_chunks::<32>();
    let (blocks, _) = dst.as_chunks_mut::<24>();
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        let (d, m, q) = asymmetric_codes(x, 31);
        b[..2].copy_from_slice(&scale_bits(d, i)?);
        b[2..4].copy_from_slice(&scale_bits(m, i)?);
        b[4..8].copy_from_slice(&fifth_bits(&q));
        pack_nibbles(&q, &mut b[8..]);
    }
    Ok(())
}

#[inline(always)]
pub(super) fn quant_q8_0(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = src.as_chunks::<32>();
    let (blocks, _) = dst.as_chunks_mut::<34>();
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = inverse(d);
        b[..2].copy_from_slice(&scale_bits(d, i)?);
        for (o, &v) in b[2..].iter_mut().zip(x) {
            *o = round_half_away(v * id) as u8;
        }
    }
    Ok(())
}
