//! Hand-written AVX2 and AVX-512 dequantization kernels for Q8_0 and Q4_K, the types
//! whose compiler-vectorized kernels stay below ggml's own speed.
//!
//! Each one computes what the scalar kernel computes, operation for operation: the
//! block's scales come from the same scalar code, and every value is `d * q` (Q8_0) or
//! `d1 * q - m1` (Q4_K) as one multiply and one subtract, never fused. Only the loads
//! and stores are unsafe, and they live in the small helpers below, which take arrays
//! of exactly the size they touch.

use std::arch::x86_64::*;

use crate::codec::f16_at;
use crate::codec::kquants::scales_mins_k4;

/// Reads 32 bytes.
#[target_feature(enable = "avx2")]
fn load_256(bytes: &[u8; 32]) -> __m256i {
    // SAFETY: the array holds the 32 bytes read, and `loadu` needs no alignment.
    unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
}

/// Writes 8 values.
#[target_feature(enable = "avx2")]
fn store_8(out: &mut [f32; 8], values: __m256) {
    // SAFETY: the array holds the 8 values written, and `storeu` needs no alignment.
    unsafe { _mm256_storeu_ps(out.as_mut_ptr(), values) }
}

/// Writes 16 values.
#[target_feature(enable = "avx512f")]
fn store_16(out: &mut [f32; 16], values: __m512) {
    // SAFETY: the array holds the 16 values written, and `storeu` needs no alignment.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), values) }
}

/// Q8_0 with AVX2: eight codes at a time sign-extended to i32, converted and scaled.
#[target_feature(enable = "avx2,fma")]
pub(super) fn dequant_q8_0_avx2(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<34>();
    let (outs, _) = dst.as_chunks_mut::<32>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = _mm256_set1_ps(f16_at(b, 0));
        let (codes, _) = b[2..].as_chunks::<8>();
        let (ys, _) = y.as_chunks_mut::<8>();
        for (q, o) in codes.iter().zip(ys.iter_mut()) {
            let q = _mm_set_epi64x(0, i64::from_le_bytes(*q));
            let q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            store_8(o, _mm256_mul_ps(d, q));
        }
    }
}

/// Q8_0 with AVX-512: sixteen codes at a time.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub(super) fn dequant_q8_0_avx512(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<34>();
    let (outs, _) = dst.as_chunks_mut::<32>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = _mm512_set1_ps(f16_at(b, 0));
        let (codes, _) = b[2..].as_chunks::<8>();
        let (ys, _) = y.as_chunks_mut::<16>();
        for (q, o) in codes.as_chunks::<2>().0.iter().zip(ys.iter_mut()) {
            let q = _mm_set_epi64x(i64::from_le_bytes(q[1]), i64::from_le_bytes(q[0]));
            let q = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
            store_16(o, _mm512_mul_ps(d, q));
        }
    }
}

/// 32 nibbles (one per byte of `x`) as `d * q - m` into `out`, with AVX2.
#[target_feature(enable = "avx2,fma")]
fn nibbles_avx2(x: __m256i, d: __m256, m: __m256, out: &mut [f32; 32]) {
    let low = _mm256_castsi256_si128(x);
    let high = _mm256_extracti128_si256::<1>(x);
    let parts = [
        low,
        _mm_srli_si128::<8>(low),
        high,
        _mm_srli_si128::<8>(high),
    ];
    let (outs, _) = out.as_chunks_mut::<8>();
    for (part, o) in parts.into_iter().zip(outs.iter_mut()) {
        let q = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
        store_8(o, _mm256_sub_ps(_mm256_mul_ps(d, q), m));
    }
}

/// 32 nibbles as `d * q - m` into `out`, with AVX-512.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn nibbles_avx512(x: __m256i, d: __m512, m: __m512, out: &mut [f32; 32]) {
    let parts = [_mm256_castsi256_si128(x), _mm256_extracti128_si256::<1>(x)];
    let (outs, _) = out.as_chunks_mut::<16>();
    for (part, o) in parts.into_iter().zip(outs.iter_mut()) {
        let q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(part));
        store_16(o, _mm512_sub_ps(_mm512_mul_ps(d, q), m));
    }
}

/// The low and high nibbles of 32 bytes, each in a byte of its own.
#[target_feature(enable = "avx2")]
fn split_nibbles(q: &[u8; 32]) -> (__m256i, __m256i) {
    let x = load_256(q);
    let mask = _mm256_set1_epi8(0x0f);
    let low = _mm256_and_si256(x, mask);
    let high = _mm256_and_si256(_mm256_srli_epi16::<4>(x), mask);
    (low, high)
}

/// The scales of one 64-element group of a Q4_K block, as the scalar kernel computes
/// them: `(d * sc1, dmin * m1, d * sc2, dmin * m2)`.
#[inline(always)]
fn q4_k_group_scales(d: f32, dmin: f32, sc: &[u8; 8], mn: &[u8; 8], c: usize) -> [f32; 4] {
    [
        d * f32::from(sc[2 * c]),
        dmin * f32::from(mn[2 * c]),
        d * f32::from(sc[2 * c + 1]),
        dmin * f32::from(mn[2 * c + 1]),
    ]
}

/// Q4_K with AVX2.
#[target_feature(enable = "avx2,fma")]
pub(super) fn dequant_q4_k_avx2(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<144>();
    let (outs, _) = dst.as_chunks_mut::<256>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let (sc, mn) = scales_mins_k4(&b[4..16]);
        let (qs, _) = b[16..].as_chunks::<32>();
        let (ys, _) = y.as_chunks_mut::<32>();
        for (c, (q, out)) in qs.iter().zip(ys.as_chunks_mut::<2>().0).enumerate() {
            let [d1, m1, d2, m2] = q4_k_group_scales(d, dmin, &sc, &mn, c);
            let (low, high) = split_nibbles(q);
            let [lo, hi] = out;
            nibbles_avx2(low, _mm256_set1_ps(d1), _mm256_set1_ps(m1), lo);
            nibbles_avx2(high, _mm256_set1_ps(d2), _mm256_set1_ps(m2), hi);
        }
    }
}

/// Q4_K with AVX-512.
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
pub(super) fn dequant_q4_k_avx512(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<144>();
    let (outs, _) = dst.as_chunks_mut::<256>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let (sc, mn) = scales_mins_k4(&b[4..16]);
        let (qs, _) = b[16..].as_chunks::<32>();
        let (ys, _) = y.as_chunks_mut::<32>();
        for (c, (q, out)) in qs.iter().zip(ys.as_chunks_mut::<2>().0).enumerate() {
            let [d1, m1, d2, m2] = q4_k_group_scales(d, dmin, &sc, &mn, c);
            let (low, high) = split_nibbles(q);
            let [lo, hi] = out;
            nibbles_avx512(low, _mm512_set1_ps(d1), _mm512_set1_ps(m1), lo);
            nibbles_avx512(high, _mm512_set1_ps(d2), _mm512_set1_ps(m2), hi);
        }
    }
}
