//! Hand-written kernels: Q8_0, Q4_0 (AVX2) and Q4_K (AVX2, AVX-512) dequantization,
//! whose compiler-vectorized kernels gain little or nothing, Q8_0 quantization (AVX2),
//! and the scale searches of Q4_K, Q5_K and Q6_K quantization (AVX2), which the
//! compiler cannot vectorize at all: their sums run over a sub-block's elements in
//! order. Those run eight sub-blocks side by side, one per lane, each in that order.
//!
//! Each one computes what the scalar kernel computes, operation for operation: the
//! block's scales come from the same scalar code, and every value is `d * q` (Q8_0) or
//! `d1 * q - m1` (Q4_K) as one multiply and one subtract, never fused. Only the loads
//! and stores are unsafe, and they live in the small functions below, which take arrays
//! of exactly the size they touch.

use std::arch::x86_64::*;

use crate::codec::BlockOverflow;
use crate::codec::kquants::{GROUP_MAX_EPS, K4Search, QK_K, k4_weights, scales_mins_k4};
use crate::codec::legacy::{inverse, scale_bits};
use crate::codec::{f16_at, signed_abs_max};

/// Reads 8 values.
#[target_feature(enable = "avx2")]
fn load_8(values: &[f32; 8]) -> __m256 {
    // SAFETY: the array holds the 8 values read, and `loadu` needs no alignment.
    unsafe { _mm256_loadu_ps(values.as_ptr()) }
}

/// Reads 16 bytes.
#[target_feature(enable = "avx2")]
fn load_128(bytes: &[u8; 16]) -> __m128i {
    // SAFETY: the array holds the 16 bytes read, and `loadu` needs no alignment.
    unsafe { _mm_loadu_si128(bytes.as_ptr().cast()) }
}

/// Writes 32 bytes.
#[target_feature(enable = "avx2")]
fn store_256(out: &mut [u8; 32], bytes: __m256i) {
    // SAFETY: the array holds the 32 bytes written, and `storeu` needs no alignment.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), bytes) }
}

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
        let (codes, _) = b[2..].as_chunks::<32>();
        let x = load_256(&codes[0]);
        let (low, high) = (_mm256_castsi256_si128(x), _mm256_extracti128_si256::<1>(x));
        let parts = [
            low,
            _mm_srli_si128::<8>(low),
            high,
            _mm_srli_si128::<8>(high),
        ];
        let (ys, _) = y.as_chunks_mut::<8>();
        for (q, o) in parts.into_iter().zip(ys.iter_mut()) {
            let q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
            store_8(o, _mm256_mul_ps(d, q));
        }
    }
}

/// Q4_0 with AVX2: `d * (nibble - 8)`, the low nibbles giving the block's first 16
/// values and the high nibbles the last 16.
#[target_feature(enable = "avx2,fma")]
pub(super) fn dequant_q4_0_avx2(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<18>();
    let (outs, _) = dst.as_chunks_mut::<32>();
    let mask = _mm_set1_epi8(0x0f);
    let eight = _mm256_set1_epi32(8);
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = _mm256_set1_ps(f16_at(b, 0));
        let (codes, _) = b[2..].as_chunks::<16>();
        let x = load_128(&codes[0]);
        let low = _mm_and_si128(x, mask);
        let high = _mm_and_si128(_mm_srli_epi16::<4>(x), mask);
        let parts = [
            low,
            _mm_srli_si128::<8>(low),
            high,
            _mm_srli_si128::<8>(high),
        ];
        let (ys, _) = y.as_chunks_mut::<8>();
        for (q, o) in parts.into_iter().zip(ys.iter_mut()) {
            let q = _mm256_sub_epi32(_mm256_cvtepu8_epi32(q), eight);
            store_8(o, _mm256_mul_ps(d, _mm256_cvtepi32_ps(q)));
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

/// `round_half_away(x) as u8` of eight values, as the scalar quantizer computes it:
/// truncate `|x|`, add the truncation of twice the remainder (both exact below 2^31),
/// give it `x`'s sign; NaN and magnitudes of 2^31 or more give 0, as the scalar cast of
/// `i32::MIN` or 0 to a byte does. Returns the codes as i32 lanes holding their low byte.
#[target_feature(enable = "avx2,fma")]
fn round_half_away_bytes(x: __m256) -> __m256i {
    let sign_mask = _mm256_set1_ps(-0.0);
    let a = _mm256_andnot_ps(sign_mask, x);
    let in_range = _mm256_cmp_ps::<_CMP_LT_OQ>(a, _mm256_set1_ps(2_147_483_648.0));
    let floored = _mm256_cvttps_epi32(a);
    let twice = _mm256_mul_ps(
        _mm256_set1_ps(2.0),
        _mm256_sub_ps(a, _mm256_cvtepi32_ps(floored)),
    );
    let rounded = _mm256_add_epi32(floored, _mm256_cvttps_epi32(twice));
    let negative = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps()));
    // Negation where x < 0: (r ^ m) - m with m all ones.
    let signed = _mm256_sub_epi32(_mm256_xor_si256(rounded, negative), negative);
    let kept = _mm256_and_si256(signed, _mm256_castps_si256(in_range));
    _mm256_and_si256(kept, _mm256_set1_epi32(0xff))
}

/// Q8_0 quantization with AVX2: the absolute maximum and the codes eight at a time, the
/// scale and its inverse in scalar code as the scalar kernel has them.
#[target_feature(enable = "avx2,fma")]
pub(super) fn quant_q8_0_avx2(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = src.as_chunks::<32>();
    let (blocks, _) = dst.as_chunks_mut::<34>();
    let sign_mask = _mm256_set1_ps(-0.0);
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        let (parts, _) = x.as_chunks::<8>();
        let v = [
            load_8(&parts[0]),
            load_8(&parts[1]),
            load_8(&parts[2]),
            load_8(&parts[3]),
        ];
        // The values are finite (checked before any kernel runs), so the maximum of
        // their magnitudes is the same whatever the order it is taken in.
        let m = v.map(|v| _mm256_andnot_ps(sign_mask, v));
        let m = _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
        let amax = 0.0f32.max(_mm_cvtss_f32(m));
        let d = amax / 127.0;
        let id = _mm256_set1_ps(inverse(d));
        b[..2].copy_from_slice(&scale_bits(d, i)?);
        let q = v.map(|v| round_half_away_bytes(_mm256_mul_ps(v, id)));
        let words_01 = _mm256_packus_epi32(q[0], q[1]);
        let words_23 = _mm256_packus_epi32(q[2], q[3]);
        let bytes = _mm256_packus_epi16(words_01, words_23);
        // The packs work within 128-bit lanes: put the four-byte groups back in order.
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        let (codes, _) = b[2..].as_chunks_mut::<32>();
        store_256(&mut codes[0], bytes);
    }
    Ok(())
}

/// `nearest_int` of eight values, as the scalar code computes it: the low mantissa bits
/// of `x + 1.5 * 2^23`, less 2^22.
#[target_feature(enable = "avx2,fma")]
fn nearest_int_8(x: __m256) -> __m256i {
    let bits = _mm256_castps_si256(_mm256_add_ps(x, _mm256_set1_ps(12_582_912.0)));
    _mm256_sub_epi32(
        _mm256_and_si256(bits, _mm256_set1_epi32(0x007f_ffff)),
        _mm256_set1_epi32(0x0040_0000),
    )
}

/// `make_qkx2_quants` on eight `N`-value sub-blocks at once, one per lane, given
/// transposed (lane j of `xv[i]` is element i of sub-block j) with their weights.
/// Returns each lane's codes (as i32), scale and `-min`. Each lane does its sub-block's
/// operations in the scalar order (the sums run over the sub-block's elements one after
/// another), so every lane ends with the scalar search's bits; the branches become
/// per-lane selects.
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
fn qkx2_lanes<const N: usize>(
    xv: &[__m256; N],
    wv: &[__m256; N],
    nmax: i32,
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> ([__m256i; N], __m256, __m256) {
    let zero = _mm256_setzero_ps();
    let sign = _mm256_set1_ps(-0.0);
    let error = |diff: __m256| {
        if use_mad {
            _mm256_andnot_ps(sign, diff)
        } else {
            _mm256_mul_ps(diff, diff)
        }
    };
    let nmax_v = _mm256_set1_epi32(nmax);
    let nmax_f = nmax as f32;
    let code = |scaled: __m256| {
        _mm256_min_epi32(
            _mm256_max_epi32(nearest_int_8(scaled), _mm256_setzero_si256()),
            nmax_v,
        )
    };

    let mut min = xv[0];
    let mut max = xv[0];
    let mut sum_w = wv[0];
    let mut sum_x = _mm256_mul_ps(sum_w, xv[0]);
    for i in 1..N {
        // `x < min ? x : min` and `x > max ? x : max`, as the scalar comparisons.
        min = _mm256_min_ps(xv[i], min);
        max = _mm256_max_ps(xv[i], max);
        sum_w = _mm256_add_ps(sum_w, wv[i]);
        sum_x = _mm256_add_ps(sum_x, _mm256_mul_ps(wv[i], xv[i]));
    }
    min = _mm256_blendv_ps(min, zero, _mm256_cmp_ps::<_CMP_GT_OQ>(min, zero));
    // Lanes whose values are all equal return (0, -min) with zero codes; the rest of the
    // search runs on them too, and its results are dropped at the end.
    let flat = _mm256_cmp_ps::<_CMP_EQ_OQ>(max, min);
    let flat_min = min;
    let mut iscale = _mm256_div_ps(_mm256_set1_ps(nmax_f), _mm256_sub_ps(max, min));
    let mut scale = _mm256_div_ps(_mm256_set1_ps(1.0), iscale);
    let mut best_error = zero;
    let mut best = [_mm256_setzero_si256(); N];
    for i in 0..N {
        let l = code(_mm256_mul_ps(iscale, _mm256_sub_ps(xv[i], min)));
        best[i] = l;
        let lf = _mm256_cvtepi32_ps(l);
        let diff = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(scale, lf), min), xv[i]);
        best_error = _mm256_add_ps(best_error, _mm256_mul_ps(wv[i], error(diff)));
    }
    let mut aux = [_mm256_setzero_si256(); N];
    for is in 0..=nstep {
        let numerator = rmin + rdelta * is as f32 + nmax_f;
        // `min` moves with each better candidate, and the next scale is taken against
        // it, as the scalar search does.
        iscale = _mm256_div_ps(_mm256_set1_ps(numerator), _mm256_sub_ps(max, min));
        let (mut sum_l, mut sum_l2, mut sum_xl) = (zero, zero, zero);
        for i in 0..N {
            let l = code(_mm256_mul_ps(iscale, _mm256_sub_ps(xv[i], min)));
            aux[i] = l;
            let lf = _mm256_cvtepi32_ps(l);
            let wl = _mm256_mul_ps(wv[i], lf);
            sum_l = _mm256_add_ps(sum_l, wl);
            sum_l2 = _mm256_add_ps(sum_l2, _mm256_mul_ps(wl, lf));
            sum_xl = _mm256_add_ps(sum_xl, _mm256_mul_ps(wl, xv[i]));
        }
        let det = _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_l2), _mm256_mul_ps(sum_l, sum_l));
        let mut this_scale = _mm256_div_ps(
            _mm256_sub_ps(_mm256_mul_ps(sum_w, sum_xl), _mm256_mul_ps(sum_x, sum_l)),
            det,
        );
        let mut this_min = _mm256_div_ps(
            _mm256_sub_ps(_mm256_mul_ps(sum_l2, sum_x), _mm256_mul_ps(sum_l, sum_xl)),
            det,
        );
        let positive_min = _mm256_cmp_ps::<_CMP_GT_OQ>(this_min, zero);
        this_min = _mm256_blendv_ps(this_min, zero, positive_min);
        this_scale = _mm256_blendv_ps(this_scale, _mm256_div_ps(sum_xl, sum_l2), positive_min);
        let mut cur_error = zero;
        for i in 0..N {
            let lf = _mm256_cvtepi32_ps(aux[i]);
            let diff = _mm256_sub_ps(
                _mm256_add_ps(_mm256_mul_ps(this_scale, lf), this_min),
                xv[i],
            );
            cur_error = _mm256_add_ps(cur_error, _mm256_mul_ps(wv[i], error(diff)));
        }
        let better = _mm256_and_ps(
            _mm256_cmp_ps::<_CMP_GT_OQ>(det, zero),
            _mm256_cmp_ps::<_CMP_LT_OQ>(cur_error, best_error),
        );
        let better_i = _mm256_castps_si256(better);
        for i in 0..N {
            best[i] = _mm256_blendv_epi8(best[i], aux[i], better_i);
        }
        best_error = _mm256_blendv_ps(best_error, cur_error, better);
        scale = _mm256_blendv_ps(scale, this_scale, better);
        min = _mm256_blendv_ps(min, this_min, better);
    }
    scale = _mm256_blendv_ps(scale, zero, flat);
    min = _mm256_blendv_ps(min, flat_min, flat);
    let flat_i = _mm256_castps_si256(flat);
    for b in &mut best {
        *b = _mm256_andnot_si256(flat_i, *b);
    }
    // `-min`: the sign flipped, so that a zero min gives -0.0 as the scalar negation does.
    (best, scale, _mm256_xor_ps(min, sign))
}

/// Lane j of the codes in `best` into `codes[j]`.
#[target_feature(enable = "avx2")]
fn store_lane_codes<const N: usize>(best: &[__m256i; N], codes: &mut [&mut [u8; N]; 8]) {
    let mut lanes = [0i32; 8];
    for (i, b) in best.iter().enumerate() {
        store_8_i32(&mut lanes, *b);
        for (cj, &l) in codes.iter_mut().zip(&lanes) {
            cj[i] = l as u8;
        }
    }
}

/// The Q4_K / Q5_K sub-block search with AVX2: `make_qkx2_quants` on the eight
/// sub-blocks at once, one per lane ([`qkx2_lanes`]).
#[target_feature(enable = "avx2,fma")]
pub(super) fn k4_search_avx2(
    x: &[f32; QK_K],
    search: K4Search,
    codes: &mut [u8; QK_K],
    scales: &mut [f32; 8],
    mins: &mut [f32; 8],
) {
    let mut xt = [[0f32; 8]; 32];
    let mut wt = [[0f32; 8]; 32];
    let (xs, _) = x.as_chunks::<32>();
    for (j, xj) in xs.iter().enumerate() {
        let weights = k4_weights(xj);
        for i in 0..32 {
            xt[i][j] = xj[i];
            wt[i][j] = weights[i];
        }
    }
    let xv: [__m256; 32] = std::array::from_fn(|i| load_8(&xt[i]));
    let wv: [__m256; 32] = std::array::from_fn(|i| load_8(&wt[i]));
    let (best, scale, min) =
        qkx2_lanes(&xv, &wv, search.nmax, search.rmin, 0.1, search.nstep, false);
    let (cs, _) = codes.as_chunks_mut::<32>();
    let [c0, c1, c2, c3, c4, c5, c6, c7] = cs else {
        return;
    };
    store_lane_codes(&best, &mut [c0, c1, c2, c3, c4, c5, c6, c7]);
    store_8(scales, scale);
    store_8(mins, min);
}

/// The Q2_K group search with AVX2: `make_qkx2_quants` (top code 3, absolute error,
/// weights `|x|`) on eight of the sixteen 16-value groups at once, twice.
#[target_feature(enable = "avx2,fma")]
pub(super) fn q2_k_search_avx2(
    x: &[f32; QK_K],
    codes: &mut [u8; QK_K],
    scales: &mut [f32; 16],
    mins: &mut [f32; 16],
) {
    let (groups, _) = x.as_chunks::<16>();
    let (group_codes, _) = codes.as_chunks_mut::<16>();
    let (halves, _) = groups.as_chunks::<8>();
    let (code_halves, _) = group_codes.as_chunks_mut::<8>();
    let (scale_halves, _) = scales.as_chunks_mut::<8>();
    let (min_halves, _) = mins.as_chunks_mut::<8>();
    let sign = _mm256_set1_ps(-0.0);
    for (((half, half_codes), half_scales), half_mins) in halves
        .iter()
        .zip(code_halves)
        .zip(scale_halves)
        .zip(min_halves)
    {
        let mut xt = [[0f32; 8]; 16];
        for (j, g) in half.iter().enumerate() {
            for i in 0..16 {
                xt[i][j] = g[i];
            }
        }
        let xv: [__m256; 16] = std::array::from_fn(|i| load_8(&xt[i]));
        let wv: [__m256; 16] = std::array::from_fn(|i| _mm256_andnot_ps(sign, xv[i]));
        let (best, scale, min) = qkx2_lanes(&xv, &wv, 3, -0.5, 0.1, 15, true);
        let [c0, c1, c2, c3, c4, c5, c6, c7] = half_codes;
        store_lane_codes(&best, &mut [c0, c1, c2, c3, c4, c5, c6, c7]);
        store_8(half_scales, scale);
        store_8(half_mins, min);
    }
}

/// Writes 8 i32 lanes.
#[target_feature(enable = "avx2")]
fn store_8_i32(out: &mut [i32; 8], values: __m256i) {
    // SAFETY: the array holds the 32 bytes written, and `storeu` needs no alignment.
    unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), values) }
}

/// The Q6_K group search with AVX2: `make_qx_quants` (top code 32) on eight of the
/// sixteen 16-value groups at once, one per lane, twice. As in [`k4_search_avx2`], each
/// lane keeps the scalar order of its group's sums, and the branches become selects.
#[target_feature(enable = "avx2,fma")]
pub(super) fn q6_k_search_avx2(x: &[f32; QK_K], codes: &mut [u8; QK_K], scales: &mut [f32; 16]) {
    const NMAX: i32 = 32;
    let (groups, _) = x.as_chunks::<16>();
    let (group_codes, _) = codes.as_chunks_mut::<16>();
    let (halves, _) = groups.as_chunks::<8>();
    let (code_halves, _) = group_codes.as_chunks_mut::<8>();
    let (scale_halves, _) = scales.as_chunks_mut::<8>();
    let zero = _mm256_setzero_ps();
    let low = _mm256_set1_epi32(-NMAX);
    let high = _mm256_set1_epi32(NMAX - 1);
    let nmax_f = NMAX as f32;
    for ((half, half_codes), half_scales) in halves.iter().zip(code_halves).zip(scale_halves) {
        let mut xt = [[0f32; 8]; 16];
        let mut maxes = [0f32; 8];
        let mut amaxes = [0f32; 8];
        for (j, g) in half.iter().enumerate() {
            (maxes[j], amaxes[j]) = signed_abs_max(g);
            for i in 0..16 {
                xt[i][j] = g[i];
            }
        }
        let xv: [__m256; 16] = std::array::from_fn(|i| load_8(&xt[i]));
        let max = load_8(&maxes);
        let flat = _mm256_cmp_ps::<_CMP_LT_OQ>(load_8(&amaxes), _mm256_set1_ps(GROUP_MAX_EPS));
        let code = |iscale: __m256, v: __m256| {
            _mm256_min_epi32(
                _mm256_max_epi32(nearest_int_8(_mm256_mul_ps(iscale, v)), low),
                high,
            )
        };
        let sums = |iscale: __m256| {
            let (mut sumlx, mut suml2) = (zero, zero);
            for &v in &xv {
                let l = _mm256_cvtepi32_ps(code(iscale, v));
                let w = _mm256_mul_ps(v, v);
                sumlx = _mm256_add_ps(sumlx, _mm256_mul_ps(_mm256_mul_ps(w, v), l));
                suml2 = _mm256_add_ps(suml2, _mm256_mul_ps(_mm256_mul_ps(w, l), l));
            }
            (sumlx, suml2)
        };
        let mut iscale = _mm256_div_ps(_mm256_set1_ps(-nmax_f), max);
        let mut best_codes: [__m256i; 16] = std::array::from_fn(|i| code(iscale, xv[i]));
        let (sumlx, suml2) = sums(iscale);
        let nonzero = _mm256_cmp_ps::<_CMP_NEQ_UQ>(suml2, zero);
        let mut scale = _mm256_and_ps(_mm256_div_ps(sumlx, suml2), nonzero);
        let mut best = _mm256_mul_ps(scale, sumlx);
        for is in (-9..=9).filter(|&is| is != 0) {
            let numerator = -(nmax_f + 0.1 * is as f32);
            iscale = _mm256_div_ps(_mm256_set1_ps(numerator), max);
            let (sumlx, suml2) = sums(iscale);
            let better = _mm256_and_ps(
                _mm256_cmp_ps::<_CMP_GT_OQ>(suml2, zero),
                _mm256_cmp_ps::<_CMP_GT_OQ>(
                    _mm256_mul_ps(sumlx, sumlx),
                    _mm256_mul_ps(best, suml2),
                ),
            );
            let better_i = _mm256_castps_si256(better);
            for (b, &v) in best_codes.iter_mut().zip(&xv) {
                *b = _mm256_blendv_epi8(*b, code(iscale, v), better_i);
            }
            scale = _mm256_blendv_ps(scale, _mm256_div_ps(sumlx, suml2), better);
            best = _mm256_blendv_ps(best, _mm256_mul_ps(scale, sumlx), better);
        }
        // Groups below the threshold give zero codes (stored as 0, not as `0 + 32`) and a
        // zero scale.
        let flat_i = _mm256_castps_si256(flat);
        let offset = _mm256_set1_epi32(NMAX);
        let mut lanes = [0i32; 8];
        for (i, b) in best_codes.iter().enumerate() {
            store_8_i32(
                &mut lanes,
                _mm256_andnot_si256(flat_i, _mm256_add_epi32(*b, offset)),
            );
            for (c, &l) in half_codes.iter_mut().zip(&lanes) {
                c[i] = l as u8;
            }
        }
        store_8(half_scales, _mm256_andnot_ps(flat, scale));
    }
}
