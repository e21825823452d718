//! The aarch64 level: Q8_0, Q4_0 and Q4_K dequantization and Q8_0 quantization written
//! with NEON intrinsics.
//!
//! NEON is part of aarch64's baseline, so these kernels need no CPU check; the level
//! exists so that they can be compared with the scalar kernels (which the compiler also
//! vectorizes with NEON, less well) and switched off with `HOTPATCH_SIMD=scalar`.
//!
//! Each kernel computes what the scalar kernel computes, operation for operation: the
//! block's scales come from the same scalar code, and every value is `d * q` (Q8_0,
//! Q4_0) or `d1 * q - m1` (Q4_K) as one multiply and one subtract, never fused (the
//! intrinsics used are `vmulq_f32` and `vsubq_f32`, not `vfmaq_f32`). Only the loads
//! and stores are unsafe, and they live in the small functions below, which take arrays
//! of exactly the size they touch. The kernels carry `#[target_feature(enable = "neon")]`
//! so that the intrinsics are safe to call inside them; the parent module wraps them in
//! safe functions.

use std::arch::aarch64::*;

use crate::codec::BlockOverflow;
use crate::codec::f16_at;
use crate::codec::kquants::scales_mins_k4;
use crate::codec::legacy::{inverse, scale_bits};

/// Reads 16 bytes.
#[target_feature(enable = "neon")]
fn load_16(bytes: &[u8; 16]) -> uint8x16_t {
    // SAFETY: the array holds the 16 bytes read; `vld1q_u8` needs no alignment.
    unsafe { vld1q_u8(bytes.as_ptr()) }
}

/// Reads 4 values.
#[target_feature(enable = "neon")]
fn load_4(values: &[f32; 4]) -> float32x4_t {
    // SAFETY: the array holds the 4 values read; `vld1q_f32` needs no alignment beyond
    // an f32's, which the array has.
    unsafe { vld1q_f32(values.as_ptr()) }
}

/// Writes 4 values.
#[target_feature(enable = "neon")]
fn store_4(out: &mut [f32; 4], values: float32x4_t) {
    // SAFETY: the array holds the 4 values written; `vst1q_f32` needs no alignment
    // beyond an f32's, which the array has.
    unsafe { vst1q_f32(out.as_mut_ptr(), values) }
}

/// Writes 8 bytes.
#[target_feature(enable = "neon")]
fn store_8_bytes(out: &mut [u8; 8], bytes: uint8x8_t) {
    // SAFETY: the array holds the 8 bytes written; `vst1_u8` needs no alignment.
    unsafe { vst1_u8(out.as_mut_ptr(), bytes) }
}

/// 16 signed bytes as `d * q`, into 16 values.
#[target_feature(enable = "neon")]
fn scaled_i8(q: int8x16_t, d: float32x4_t, out: &mut [f32; 16]) {
    let low = vmovl_s8(vget_low_s8(q));
    let high = vmovl_s8(vget_high_s8(q));
    let words = [
        vmovl_s16(vget_low_s16(low)),
        vmovl_s16(vget_high_s16(low)),
        vmovl_s16(vget_low_s16(high)),
        vmovl_s16(vget_high_s16(high)),
    ];
    let (outs, _) = out.as_chunks_mut::<4>();
    for (w, o) in words.into_iter().zip(outs.iter_mut()) {
        store_4(o, vmulq_f32(d, vcvtq_f32_s32(w)));
    }
}

/// 16 unsigned bytes as `d * q - m`, into 16 values.
#[target_feature(enable = "neon")]
fn scaled_u8_minus(q: uint8x16_t, d: float32x4_t, m: float32x4_t, out: &mut [f32; 16]) {
    let low = vmovl_u8(vget_low_u8(q));
    let high = vmovl_u8(vget_high_u8(q));
    let words = [
        vmovl_u16(vget_low_u16(low)),
        vmovl_u16(vget_high_u16(low)),
        vmovl_u16(vget_low_u16(high)),
        vmovl_u16(vget_high_u16(high)),
    ];
    let (outs, _) = out.as_chunks_mut::<4>();
    for (w, o) in words.into_iter().zip(outs.iter_mut()) {
        store_4(o, vsubq_f32(vmulq_f32(d, vcvtq_f32_u32(w)), m));
    }
}

/// Q8_0: sixteen codes at a time widened to i32, converted and scaled.
#[target_feature(enable = "neon")]
pub(super) fn dequant_q8_0(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<34>();
    let (outs, _) = dst.as_chunks_mut::<32>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = vdupq_n_f32(f16_at(b, 0));
        let (codes, _) = b[2..].as_chunks::<16>();
        let (ys, _) = y.as_chunks_mut::<16>();
        for (q, o) in codes.iter().zip(ys.iter_mut()) {
            scaled_i8(vreinterpretq_s8_u8(load_16(q)), d, o);
        }
    }
}

/// Q4_0: `d * (nibble - 8)`, the low nibbles giving the block's first 16 values and the
/// high nibbles the last 16.
#[target_feature(enable = "neon")]
pub(super) fn dequant_q4_0(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<18>();
    let (outs, _) = dst.as_chunks_mut::<32>();
    let mask = vdupq_n_u8(0x0f);
    let eight = vdupq_n_s8(8);
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = vdupq_n_f32(f16_at(b, 0));
        let (codes, _) = b[2..].as_chunks::<16>();
        let x = load_16(&codes[0]);
        let low = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(x, mask)), eight);
        let high = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8::<4>(x)), eight);
        let (ys, _) = y.as_chunks_mut::<16>();
        for (q, o) in [low, high].into_iter().zip(ys.iter_mut()) {
            scaled_i8(q, d, o);
        }
    }
}

/// Q4_K: each 64-value group is 32 bytes, whose low nibbles are the first 32 values
/// (scale `d1`, minimum `m1`) and whose high nibbles the last 32 (`d2`, `m2`).
#[target_feature(enable = "neon")]
pub(super) fn dequant_q4_k(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<144>();
    let (outs, _) = dst.as_chunks_mut::<256>();
    let mask = vdupq_n_u8(0x0f);
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let (sc, mn) = scales_mins_k4(&b[4..16]);
        let (qs, _) = b[16..].as_chunks::<32>();
        let (ys, _) = y.as_chunks_mut::<64>();
        for (c, (q, out)) in qs.iter().zip(ys.iter_mut()).enumerate() {
            let d1 = vdupq_n_f32(d * f32::from(sc[2 * c]));
            let m1 = vdupq_n_f32(dmin * f32::from(mn[2 * c]));
            let d2 = vdupq_n_f32(d * f32::from(sc[2 * c + 1]));
            let m2 = vdupq_n_f32(dmin * f32::from(mn[2 * c + 1]));
            let (halves, _) = q.as_chunks::<16>();
            let (parts, _) = out.as_chunks_mut::<16>();
            // parts[0..2] take the low nibbles of both halves, parts[2..4] the high ones.
            let (low_parts, high_parts) = parts.split_at_mut(2);
            for ((h, lo), hi) in halves.iter().zip(low_parts).zip(high_parts) {
                let x = load_16(h);
                scaled_u8_minus(vandq_u8(x, mask), d1, m1, lo);
                scaled_u8_minus(vshrq_n_u8::<4>(x), d2, m2, hi);
            }
        }
    }
}

/// `round_half_away(x) as u8` of four values, as the scalar quantizer computes it:
/// truncate `|x|`, add the truncation of twice the remainder (both exact below 2^31),
/// give it `x`'s sign; NaN and magnitudes of 2^31 or more give 0, as the scalar cast of
/// `i32::MIN` or 0 to a byte does. Returns the codes as i32 lanes holding their low byte.
#[target_feature(enable = "neon")]
fn round_half_away(x: float32x4_t) -> int32x4_t {
    let a = vabsq_f32(x);
    // False for NaN, so NaN lanes are cleared as the out-of-range ones are.
    let in_range = vcltq_f32(a, vdupq_n_f32(2_147_483_648.0));
    let floored = vcvtq_s32_f32(a);
    let twice = vmulq_f32(vdupq_n_f32(2.0), vsubq_f32(a, vcvtq_f32_s32(floored)));
    let rounded = vaddq_s32(floored, vcvtq_s32_f32(twice));
    let negative = vcltq_f32(x, vdupq_n_f32(0.0));
    let signed = vbslq_s32(negative, vnegq_s32(rounded), rounded);
    vandq_s32(signed, vreinterpretq_s32_u32(in_range))
}

/// Q8_0 quantization: the absolute maximum and the codes four at a time, the scale and
/// its inverse in scalar code as the scalar kernel has them.
#[target_feature(enable = "neon")]
pub(super) fn quant_q8_0(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = src.as_chunks::<32>();
    let (blocks, _) = dst.as_chunks_mut::<34>();
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        let (parts, _) = x.as_chunks::<4>();
        let v: [float32x4_t; 8] = std::array::from_fn(|k| load_4(&parts[k]));
        // The values are finite (checked before any kernel runs), so the maximum of
        // their magnitudes is the same whatever the order it is taken in.
        let m = v
            .iter()
            .fold(vdupq_n_f32(0.0), |m, &v| vmaxq_f32(m, vabsq_f32(v)));
        let amax = 0.0f32.max(vmaxvq_f32(m));
        let d = amax / 127.0;
        let id = vdupq_n_f32(inverse(d));
        b[..2].copy_from_slice(&scale_bits(d, i)?);
        let (codes, _) = b[2..].as_chunks_mut::<8>();
        for (pair, out) in v.as_chunks::<2>().0.iter().zip(codes.iter_mut()) {
            let low = vmovn_s32(round_half_away(vmulq_f32(pair[0], id)));
            let high = vmovn_s32(round_half_away(vmulq_f32(pair[1], id)));
            // The narrowing moves keep the low bits, as the scalar `as u8` does.
            let bytes = vmovn_s16(vcombine_s16(low, high));
            store_8_bytes(out, vreinterpret_u8_s8(bytes));
        }
    }
    Ok(())
}
