//! The K-quants: 256-element super-blocks of 16 or 32-element sub-blocks whose scales are
//! themselves quantized against one or two f16 super-block scales.
//!
//! Layouts (byte offsets in a block):
//! - Q2_K (84): scales[16] (low nibble scale, high nibble min) @0, qs[64] @16, d @80,
//!   dmin @82; x = d * sc * q - dmin * m, 2-bit q.
//! - Q3_K (110): hmask[32] @0, qs[64] @32, scales[12] (6-bit, signed with bias 32) @96,
//!   d @108; x = d * sc * (q - 4 * !hbit).
//! - Q4_K (144): d @0, dmin @2, scales[12] (eight 6-bit scales and mins) @4, qs[128] @16.
//! - Q5_K (176): as Q4_K plus qh[32] @16 (fifth bits), qs[128] @48.
//! - Q6_K (210): ql[128] @0, qh[64] @128, scales[16] (i8) @192, d @208;
//!   x = d * sc * (q - 32).
//!
//! The quantizers follow ggml's `quantize_row_q{2,3,4,5,6}_K_ref` (no importance
//! matrix): the same search for sub-block scales (`make_qkx2_quants`, `make_q3_quants`,
//! `make_qx_quants`), the same float operations in the same order, and ggml's
//! `nearest_int` rounding. Their bytes equal ggml's reference built without fused
//! multiply-add contraction (`-ffp-contract=off`); a build that lets the compiler fuse
//! `a * b + c` rounds differently in a small fraction of blocks.

use super::{BlockOverflow, f16_at, f16_bits, signed_abs_max};

/// Elements in a super-block.
pub(super) const QK_K: usize = 256;

/// Below this magnitude a group counts as all zeros (ggml's `GROUP_MAX_EPS`).
pub(super) const GROUP_MAX_EPS: f32 = 1e-15;

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K / Q5_K block.
#[inline(always)]
pub(super) fn scales_mins_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let mut sc = [0u8; 8];
    let mut mn = [0u8; 8];
    for j in 0..4 {
        sc[j] = s[j] & 63;
        mn[j] = s[j + 4] & 63;
        sc[j + 4] = (s[j + 8] & 0x0f) | ((s[j] >> 6) << 4);
        mn[j + 4] = (s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4);
    }
    (sc, mn)
}

#[inline(always)]
pub(super) fn dequant_q2_k(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<84>();
    let (outs, _) = dst.as_chunks_mut::<QK_K>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 80);
        let dmin = f16_at(b, 82);
        let mut dl = [0f32; 16];
        let mut ml = [0f32; 16];
        for ((s, dl), ml) in b[..16].iter().zip(dl.iter_mut()).zip(ml.iter_mut()) {
            *dl = d * f32::from(s & 0x0f);
            *ml = dmin * f32::from(s >> 4);
        }
        let (halves, _) = y.as_chunks_mut::<128>();
        for (half, out) in halves.iter_mut().enumerate() {
            let qs = &b[16 + 32 * half..16 + 32 * half + 32];
            let (rows, _) = out.as_chunks_mut::<32>();
            for (shift, row) in rows.iter_mut().enumerate() {
                let at = half * 8 + shift * 2;
                let (dl, ml) = (&dl[at..at + 2], &ml[at..at + 2]);
                for (l, o) in row.iter_mut().enumerate() {
                    *o = dl[l / 16] * f32::from((qs[l] >> (2 * shift)) & 3) - ml[l / 16];
                }
            }
        }
    }
}

/// The sixteen signed 6-bit scales of a Q3_K block.
#[inline]
pub(super) fn scales_q3_k(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (k, o) in out.iter_mut().enumerate() {
        let low = if k < 8 { s[k] & 0x0f } else { s[k - 8] >> 4 };
        let high = (s[8 + k % 4] >> (2 * (k / 4))) & 3;
        *o = (low | (high << 4)) as i8 - 32;
    }
    out
}

#[inline(always)]
pub(super) fn dequant_q3_k(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<110>();
    let (outs, _) = dst.as_chunks_mut::<QK_K>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 108);
        let scales = scales_q3_k(&b[96..108]);
        let mut dl = [0f32; 16];
        for (o, s) in dl.iter_mut().zip(scales) {
            *o = d * f32::from(s);
        }
        let Some(hmask) = b.first_chunk::<32>() else {
            continue;
        };
        let (halves, _) = y.as_chunks_mut::<128>();
        for (half, out) in halves.iter_mut().enumerate() {
            let qs = &b[32 + 32 * half..32 + 32 * half + 32];
            let (rows, _) = out.as_chunks_mut::<32>();
            for (shift, row) in rows.iter_mut().enumerate() {
                let mask = 1u8 << (half * 4 + shift);
                let scale = &dl[half * 8 + shift * 2..half * 8 + shift * 2 + 2];
                for (l, o) in row.iter_mut().enumerate() {
                    let low = f32::from((qs[l] >> (2 * shift)) & 3);
                    // A clear high bit means the value is offset by -4; the difference
                    // of small integers is exact in f32.
                    let offset = if hmask[l] & mask != 0 { 0.0 } else { 4.0 };
                    *o = scale[l / 16] * (low - offset);
                }
            }
        }
    }
}

#[inline(always)]
pub(super) fn dequant_q4_k(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<144>();
    let (outs, _) = dst.as_chunks_mut::<QK_K>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let (sc, mn) = scales_mins_k4(&b[4..16]);
        let (qs, _) = b[16..].as_chunks::<32>();
        let (ys, _) = y.as_chunks_mut::<64>();
        for (c, (q, out)) in qs.iter().zip(ys.iter_mut()).enumerate() {
            let d1 = d * f32::from(sc[2 * c]);
            let m1 = dmin * f32::from(mn[2 * c]);
            let d2 = d * f32::from(sc[2 * c + 1]);
            let m2 = dmin * f32::from(mn[2 * c + 1]);
            let (lo, hi) = out.split_at_mut(32);
            for ((v, l), h) in q.iter().zip(lo.iter_mut()).zip(hi.iter_mut()) {
                *l = d1 * f32::from(v & 0x0f) - m1;
                *h = d2 * f32::from(v >> 4) - m2;
            }
        }
    }
}

#[inline(always)]
pub(super) fn dequant_q5_k(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<176>();
    let (outs, _) = dst.as_chunks_mut::<QK_K>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let (sc, mn) = scales_mins_k4(&b[4..16]);
        let qh = &b[16..48];
        let (qs, _) = b[48..].as_chunks::<32>();
        let (ys, _) = y.as_chunks_mut::<64>();
        for (c, (q, out)) in qs.iter().zip(ys.iter_mut()).enumerate() {
            let d1 = d * f32::from(sc[2 * c]);
            let m1 = dmin * f32::from(mn[2 * c]);
            let d2 = d * f32::from(sc[2 * c + 1]);
            let m2 = dmin * f32::from(mn[2 * c + 1]);
            let (lo, hi) = out.split_at_mut(32);
            for (((v, h), l), o) in q.iter().zip(qh).zip(lo.iter_mut()).zip(hi.iter_mut()) {
                let h1 = ((h >> (2 * c)) & 1) << 4;
                let h2 = ((h >> (2 * c + 1)) & 1) << 4;
                *l = d1 * f32::from((v & 0x0f) | h1) - m1;
                *o = d2 * f32::from((v >> 4) | h2) - m2;
            }
        }
    }
}

#[inline(always)]
pub(super) fn dequant_q6_k(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<210>();
    let (outs, _) = dst.as_chunks_mut::<QK_K>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 208);
        let mut dl = [0f32; 16];
        for (o, s) in dl.iter_mut().zip(&b[192..208]) {
            *o = d * f32::from(*s as i8);
        }
        let (ys, _) = y.as_chunks_mut::<128>();
        for (half, out) in ys.iter_mut().enumerate() {
            let ql = &b[64 * half..64 * half + 64];
            let qh = &b[128 + 32 * half..128 + 32 * half + 32];
            let dl = &dl[8 * half..8 * half + 8];
            let (o01, o23) = out.split_at_mut(64);
            let (o0, o1) = o01.split_at_mut(32);
            let (o2, o3) = o23.split_at_mut(32);
            for l in 0..32 {
                let s = l / 16;
                let (a, c, h) = (ql[l], ql[l + 32], qh[l]);
                let q0 = ((a & 0x0f) | ((h & 3) << 4)) as i8 - 32;
                let q1 = ((c & 0x0f) | (((h >> 2) & 3) << 4)) as i8 - 32;
                let q2 = ((a >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
                let q3 = ((c >> 4) | ((h >> 6) << 4)) as i8 - 32;
                o0[l] = dl[s] * f32::from(q0);
                o1[l] = dl[2 + s] * f32::from(q1);
                o2[l] = dl[4 + s] * f32::from(q2);
                o3[l] = dl[6 + s] * f32::from(q3);
            }
        }
    }
}

/// ggml's `nearest_int`: rounds to nearest (ties to even) through the mantissa of
/// `x + 1.5 * 2^23`. Exact for |x| <= 2^22, which the quantizers stay within; outside
/// it gives ggml's (meaningless but deterministic) answer rather than panicking.
#[inline(always)]
pub(super) fn nearest_int(x: f32) -> i32 {
    let bits = (x + 12_582_912.0).to_bits();
    (bits & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's `make_qkx2_quants` on an `N`-element sub-block: finds a scale and a
/// (non-positive) min for codes `0..=nmax` minimizing the weighted squared (or, with
/// `use_mad`, absolute) error, trying `nstep + 1` candidate scales around the min-max
/// one. Returns `(scale, -min)` and leaves the codes in `codes`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants<const N: usize>(
    nmax: i32,
    x: &[f32; N],
    weights: &[f32; N],
    codes: &mut [u8; N],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let error = |diff: f32| if use_mad { diff.abs() } else { diff * diff };
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..N {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        *codes = [0; N];
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..N {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        codes[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best_error += weights[i] * error(diff);
    }
    let mut aux = [0u8; N];
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..N {
            let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            aux[i] = l as u8;
            let w = weights[i];
            let lf = l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..N {
                let diff = this_scale * f32::from(aux[i]) + this_min - x[i];
                cur_error += weights[i] * error(diff);
            }
            if cur_error < best_error {
                *codes = aux;
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Packs eight 6-bit scales and mins into the 12 scale bytes of Q4_K / Q5_K.
pub(super) fn pack_scales_mins_k4(ls: &[u8; 8], lm: &[u8; 8], s: &mut [u8]) {
    s[..12].fill(0);
    for j in 0..8 {
        if j < 4 {
            s[j] = ls[j];
            s[j + 4] = lm[j];
        } else {
            s[j + 4] = (ls[j] & 0x0f) | ((lm[j] & 0x0f) << 4);
            s[j - 4] |= (ls[j] >> 4) << 6;
            s[j] |= (lm[j] >> 4) << 6;
        }
    }
}

/// The parts of a Q4_K / Q5_K block that both quantizers share.
pub(super) struct K4Parts {
    pub(super) scales: [u8; 12],
    pub(super) d: [u8; 2],
    pub(super) dmin: [u8; 2],
    pub(super) codes: [u8; QK_K],
}

/// The weights of a Q4_K / Q5_K sub-block's search: `sqrt(mean(x^2)) + |x|`.
#[inline(always)]
pub(super) fn k4_weights(xj: &[f32; 32]) -> [f32; 32] {
    let mut sum_x2 = 0.0f32;
    for v in xj {
        sum_x2 += v * v;
    }
    let av_x = (sum_x2 / 32.0).sqrt();
    let mut weights = [0f32; 32];
    for (w, v) in weights.iter_mut().zip(xj) {
        *w = av_x + v.abs();
    }
    weights
}

/// The parameters of the Q4_K / Q5_K sub-block search: the top code, and `rmin` and
/// `nstep` of `make_qkx2_quants` (whose `rdelta` is 0.1 for both).
#[derive(Clone, Copy)]
pub(super) struct K4Search {
    pub(super) nmax: i32,
    pub(super) rmin: f32,
    pub(super) nstep: i32,
}

/// The search of the eight sub-blocks of a super-block: their codes, scales and mins.
pub(super) type K4SearchFn =
    fn(&[f32; QK_K], K4Search, &mut [u8; QK_K], &mut [f32; 8], &mut [f32; 8]);

/// The scalar search: `make_qkx2_quants` on each sub-block in turn.
#[inline(always)]
pub(super) fn k4_search_scalar(
    x: &[f32; QK_K],
    search: K4Search,
    codes: &mut [u8; QK_K],
    scales: &mut [f32; 8],
    mins: &mut [f32; 8],
) {
    let (xs, _) = x.as_chunks::<32>();
    let (cs, _) = codes.as_chunks_mut::<32>();
    for (j, (xj, cj)) in xs.iter().zip(cs.iter_mut()).enumerate() {
        let weights = k4_weights(xj);
        let (scale, min) = make_qkx2_quants(
            search.nmax,
            xj,
            &weights,
            cj,
            search.rmin,
            0.1,
            search.nstep,
            false,
        );
        scales[j] = scale;
        mins[j] = min;
    }
}

/// The common part of ggml's Q4_K and Q5_K reference quantizers: sub-block scales and
/// mins (found by `sub_blocks`), the packed scale bytes, the two f16 super-block scales
/// and the final codes.
#[inline(always)]
pub(super) fn quant_k4_common(
    x: &[f32; QK_K],
    search: K4Search,
    sub_blocks: K4SearchFn,
    block: usize,
) -> Result<K4Parts, BlockOverflow> {
    let nmax = search.nmax;
    let mut codes = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    sub_blocks(x, search, &mut codes, &mut scales, &mut mins);
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for (&scale, &min) in scales.iter().zip(&mins) {
        if scale > max_scale {
            max_scale = scale;
        }
        if min > max_min {
            max_min = min;
        }
    }
    let (xs, _) = x.as_chunks::<32>();
    let (cs, _) = codes.as_chunks_mut::<32>();
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    for j in 0..8 {
        // ggml stores nearest_int's int into a uint8_t (wrapping) before the MIN.
        ls[j] = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        lm[j] = (nearest_int(inv_min * mins[j]) as u8).min(63);
    }
    let mut packed = [0u8; 12];
    pack_scales_mins_k4(&ls, &lm, &mut packed);
    let d_value = max_scale / 63.0;
    let dmin_value = max_min / 63.0;
    let d_bits = f16_bits(d_value).ok_or(BlockOverflow {
        block,
        value: d_value,
    })?;
    let dmin_bits = f16_bits(dmin_value).ok_or(BlockOverflow {
        block,
        value: dmin_value,
    })?;
    let d_super = half::f16::from_bits(d_bits).to_f32();
    let dmin_super = half::f16::from_bits(dmin_bits).to_f32();
    let (sc, mn) = scales_mins_k4(&packed);
    for (j, (xj, cj)) in xs.iter().zip(cs.iter_mut()).enumerate() {
        let d = d_super * f32::from(sc[j]);
        if d == 0.0 {
            // ggml keeps the codes of the sub-block search here.
            continue;
        }
        let dm = dmin_super * f32::from(mn[j]);
        for (c, v) in cj.iter_mut().zip(xj) {
            *c = nearest_int((v + dm) / d).clamp(0, nmax) as u8;
        }
    }
    Ok(K4Parts {
        scales: packed,
        d: d_bits.to_le_bytes(),
        dmin: dmin_bits.to_le_bytes(),
        codes,
    })
}

#[inline(always)]
pub(super) fn quant_q4_k(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    quant_q4_k_with(src, dst, k4_search_scalar)
}

/// Q4_K quantization with the given sub-block search (the scalar one or a vector one
/// that gives the same bits).
#[inline(always)]
pub(super) fn quant_q4_k_with(
    src: &[f32],
    dst: &mut [u8],
    sub_blocks: K4SearchFn,
) -> Result<(), BlockOverflow> {
    let (xs, _) = src.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<144>();
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        store_q4_k(&quant_k4_common(x, Q4_K_SEARCH, sub_blocks, i)?, b);
    }
    Ok(())
}

/// Q4_K's sub-block search.
pub(super) const Q4_K_SEARCH: K4Search = K4Search {
    nmax: 15,
    rmin: -1.0,
    nstep: 20,
};

/// Q5_K's sub-block search.
pub(super) const Q5_K_SEARCH: K4Search = K4Search {
    nmax: 31,
    rmin: -0.5,
    nstep: 15,
};

/// Writes the parts of a Q4_K block into its 144 bytes.
#[inline(always)]
pub(super) fn store_q4_k(parts: &K4Parts, b: &mut [u8]) {
    b[0..2].copy_from_slice(&parts.d);
    b[2..4].copy_from_slice(&parts.dmin);
    b[4..16].copy_from_slice(&parts.scales);
    let (cs, _) = parts.codes.as_chunks::<64>();
    let (qs, _) = b[16..].as_chunks_mut::<32>();
    for (c, q) in cs.iter().zip(qs.iter_mut()) {
        for l in 0..32 {
            q[l] = c[l] | (c[l + 32] << 4);
        }
    }
}

#[inline(always)]
pub(super) fn quant_q5_k(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    quant_q5_k_with(src, dst, k4_search_scalar)
}

/// Q5_K quantization with the given sub-block search, as [`quant_q4_k_with`].
#[inline(always)]
pub(super) fn quant_q5_k_with(
    src: &[f32],
    dst: &mut [u8],
    sub_blocks: K4SearchFn,
) -> Result<(), BlockOverflow> {
    let (xs, _) = src.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<176>();
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        store_q5_k(&quant_k4_common(x, Q5_K_SEARCH, sub_blocks, i)?, b);
    }
    Ok(())
}

/// Writes the parts of a Q5_K block into its 176 bytes.
#[inline(always)]
pub(super) fn store_q5_k(parts: &K4Parts, b: &mut [u8]) {
    b[0..2].copy_from_slice(&parts.d);
    b[2..4].copy_from_slice(&parts.dmin);
    b[4..16].copy_from_slice(&parts.scales);
    let mut qh = [0u8; 32];
    let (cs, _) = parts.codes.as_chunks::<64>();
    let (qs, _) = b[48..].as_chunks_mut::<32>();
    for (n, (c, q)) in cs.iter().zip(qs.iter_mut()).enumerate() {
        let (m1, m2) = (1u8 << (2 * n), 2u8 << (2 * n));
        for j in 0..32 {
            let mut l1 = c[j];
            if l1 > 15 {
                l1 -= 16;
                qh[j] |= m1;
            }
            let mut l2 = c[j + 32];
            if l2 > 15 {
                l2 -= 16;
                qh[j] |= m2;
            }
            q[j] = l1 | (l2 << 4);
        }
    }
    b[16..48].copy_from_slice(&qh);
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and no importance weights, on a
/// 16-element group: a signed scale for codes `-nmax..nmax` (stored offset by `nmax`)
/// minimizing the x²-weighted squared error over 19 candidate scales.
fn make_qx_quants(nmax: i32, x: &[f32; 16], codes: &mut [u8; 16]) -> f32 {
    let (max, amax) = signed_abs_max(x);
    if amax < GROUP_MAX_EPS {
        *codes = [0; 16];
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let code = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = code(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut iscale = -nmax_f / max;
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = (code(iscale, v) + nmax) as u8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax_f + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (c, &v) in codes.iter_mut().zip(x) {
                *c = (code(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

#[inline(always)]
pub(super) fn quant_q6_k(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    quant_q6_k_with(src, dst, q6_k_search_scalar)
}

/// The search of the sixteen groups of a Q6_K super-block: their codes and scales.
pub(super) type Q6KSearchFn = fn(&[f32; QK_K], &mut [u8; QK_K], &mut [f32; 16]);

/// The scalar search: `make_qx_quants` on each group in turn.
#[inline(always)]
pub(super) fn q6_k_search_scalar(x: &[f32; QK_K], codes: &mut [u8; QK_K], scales: &mut [f32; 16]) {
    let (groups, _) = x.as_chunks::<16>();
    let (cs, _) = codes.as_chunks_mut::<16>();
    for ((g, c), s) in groups.iter().zip(cs.iter_mut()).zip(scales.iter_mut()) {
        *s = make_qx_quants(32, g, c);
    }
}

/// Q6_K quantization with the given group search (the scalar one or a vector one that
/// gives the same bits).
#[inline(always)]
pub(super) fn quant_q6_k_with(
    src: &[f32],
    dst: &mut [u8],
    groups: Q6KSearchFn,
) -> Result<(), BlockOverflow> {
    let (xs, _) = src.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<210>();
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        let mut codes = [0u8; QK_K];
        let mut scales = [0f32; 16];
        groups(x, &mut codes, &mut scales);
        finish_q6_k(x, &scales, &mut codes, b, i)?;
    }
    Ok(())
}

/// The part of ggml's Q6_K quantizers after the sixteen group scales are found (with or
/// without importance weights): the super-block scale, the 8-bit group scales, the
/// final codes (where a group's scale is zero, the codes of its search stay) and the
/// packed bytes of block `block`.
#[inline(always)]
pub(super) fn finish_q6_k(
    x: &[f32; QK_K],
    scales: &[f32; 16],
    codes: &mut [u8; QK_K],
    b: &mut [u8],
    block: usize,
) -> Result<(), BlockOverflow> {
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for &scale in scales {
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        b.fill(0);
        return Ok(());
    }
    let iscale = -128.0 / max_scale;
    let d_value = 1.0 / iscale;
    let d_bits = f16_bits(d_value).ok_or(BlockOverflow {
        block,
        value: d_value,
    })?;
    let mut sc = [0i8; 16];
    for (s, &scale) in sc.iter_mut().zip(scales) {
        *s = nearest_int(iscale * scale).min(127) as i8;
    }
    let d_super = half::f16::from_bits(d_bits).to_f32();
    let (groups, _) = x.as_chunks::<16>();
    let (cs, _) = codes.as_chunks_mut::<16>();
    for (j, (g, c)) in groups.iter().zip(cs.iter_mut()).enumerate() {
        let d = d_super * f32::from(sc[j]);
        if d == 0.0 {
            continue;
        }
        for (code, v) in c.iter_mut().zip(g) {
            *code = (nearest_int(v / d).clamp(-32, 31) + 32) as u8;
        }
    }
    let (ql_all, rest) = b.split_at_mut(128);
    let (qh_all, rest) = rest.split_at_mut(64);
    for (s, o) in sc.iter().zip(rest.iter_mut()) {
        *o = *s as u8;
    }
    rest[16..18].copy_from_slice(&d_bits.to_le_bytes());
    for half in 0..2 {
        let l_base = 128 * half;
        let ql = &mut ql_all[64 * half..64 * half + 64];
        let qh = &mut qh_all[32 * half..32 * half + 32];
        for l in 0..32 {
            let q1 = codes[l_base + l];
            let q2 = codes[l_base + l + 32];
            let q3 = codes[l_base + l + 64];
            let q4 = codes[l_base + l + 96];
            ql[l] = (q1 & 0x0f) | ((q3 & 0x0f) << 4);
            ql[l + 32] = (q2 & 0x0f) | ((q4 & 0x0f) << 4);
            qh[l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    Ok(())
}

/// Packs 256 two-bit codes as Q2_K and Q3_K store them: byte `l` of each 32-byte half
/// holds elements `l`, `l + 32`, `l + 64` and `l + 96` of that half, lowest bits first.
pub(super) fn pack_2bit(codes: &[u8; QK_K], qs: &mut [u8]) {
    for half in 0..2 {
        let c = &codes[128 * half..128 * half + 128];
        for l in 0..32 {
            qs[32 * half + l] = c[l] | (c[l + 32] << 2) | (c[l + 64] << 4) | (c[l + 96] << 6);
        }
    }
}

#[inline(always)]
pub(super) fn quant_q2_k(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    quant_q2_k_with(src, dst, q2_k_search_scalar)
}

/// The search of the sixteen groups of a Q2_K super-block: codes, scales and mins.
pub(super) type Q2KSearchFn = fn(&[f32; QK_K], &mut [u8; QK_K], &mut [f32; 16], &mut [f32; 16]);

/// The scalar search: `make_qkx2_quants` on each group in turn.
#[inline(always)]
pub(super) fn q2_k_search_scalar(
    x: &[f32; QK_K],
    codes: &mut [u8; QK_K],
    scales: &mut [f32; 16],
    mins: &mut [f32; 16],
) {
    let (groups, _) = x.as_chunks::<16>();
    let (cs, _) = codes.as_chunks_mut::<16>();
    for (j, (g, c)) in groups.iter().zip(cs.iter_mut()).enumerate() {
        let mut weights = [0f32; 16];
        for (w, v) in weights.iter_mut().zip(g) {
            *w = v.abs();
        }
        let (scale, min) = make_qkx2_quants(3, g, &weights, c, -0.5, 0.1, 15, true);
        scales[j] = scale;
        mins[j] = min;
    }
}

/// Q2_K quantization with the given group search (the scalar one or a vector one that
/// gives the same bits).
#[inline(always)]
pub(super) fn quant_q2_k_with(
    src: &[f32],
    dst: &mut [u8],
    search: Q2KSearchFn,
) -> Result<(), BlockOverflow> {
    const Q4SCALE: f32 = 15.0;
    let (xs, _) = src.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<84>();
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        let mut codes = [0u8; QK_K];
        let mut scales = [0f32; 16];
        let mut mins = [0f32; 16];
        search(x, &mut codes, &mut scales, &mut mins);
        let mut max_scale = 0.0f32;
        let mut max_min = 0.0f32;
        for (&scale, &min) in scales.iter().zip(&mins) {
            if scale > max_scale {
                max_scale = scale;
            }
            if min > max_min {
                max_min = min;
            }
        }
        let mut packed = [0u8; 16];
        let mut d_value = 0.0f32;
        if max_scale > 0.0 {
            let iscale = Q4SCALE / max_scale;
            for (p, &scale) in packed.iter_mut().zip(&scales) {
                // ggml stores the int into a uint8_t, wrapping.
                *p = nearest_int(iscale * scale) as u8;
            }
            d_value = max_scale / Q4SCALE;
        }
        let mut dmin_value = 0.0f32;
        if max_min > 0.0 {
            let iscale = Q4SCALE / max_min;
            for (p, &min) in packed.iter_mut().zip(&mins) {
                *p |= (nearest_int(iscale * min) << 4) as u8;
            }
            dmin_value = max_min / Q4SCALE;
        }
        let d_bits = f16_bits(d_value).ok_or(BlockOverflow {
            block: i,
            value: d_value,
        })?;
        let dmin_bits = f16_bits(dmin_value).ok_or(BlockOverflow {
            block: i,
            value: dmin_value,
        })?;
        let d_super = half::f16::from_bits(d_bits).to_f32();
        let dmin_super = half::f16::from_bits(dmin_bits).to_f32();
        let (groups, _) = x.as_chunks::<16>();
        let (cs, _) = codes.as_chunks_mut::<16>();
        for (j, (g, c)) in groups.iter().zip(cs.iter_mut()).enumerate() {
            let d = d_super * f32::from(packed[j] & 0x0f);
            if d == 0.0 {
                continue;
            }
            let dm = dmin_super * f32::from(packed[j] >> 4);
            for (code, v) in c.iter_mut().zip(g) {
                *code = nearest_int((v + dm) / d).clamp(0, 3) as u8;
            }
        }
        b[..16].copy_from_slice(&packed);
        pack_2bit(&codes, &mut b[16..80]);
        b[80..82].copy_from_slice(&d_bits.to_le_bytes());
        b[82..84].copy_from_slice(&dmin_bits.to_le_bytes());
    }
    Ok(())
}

/// ggml's `make_q3_quants` with `do_rmse = true` on a 16-element group: a signed scale
/// for codes `-nmax..nmax` (returned offset by `nmax`), refined by up to five passes
/// that move single codes while the x²-weighted fit improves.
fn make_q3_quants(nmax: i32, x: &[f32; 16], codes: &mut [i8; 16]) -> f32 {
    let (max, amax) = signed_abs_max(x);
    if amax < GROUP_MAX_EPS {
        *codes = [0; 16];
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let mut sumlx = 0.0f32;
    let mut suml2 = 0.0f32;
    for (c, &v) in codes.iter_mut().zip(x) {
        let l = nearest_int(iscale * v).clamp(-nmax, nmax - 1);
        *c = l as i8;
        let w = v * v;
        let lf = l as f32;
        sumlx += w * v * lf;
        suml2 += w * lf * lf;
    }
    for _ in 0..5 {
        let mut changed = false;
        for (c, &v) in codes.iter_mut().zip(x) {
            let w = v * v;
            let old = f32::from(*c);
            let mut slx = sumlx - w * v * old;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * old * old;
                let new_l = nearest_int(v * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != i32::from(*c) {
                    let nf = new_l as f32;
                    slx += w * v * nf;
                    sl2 += w * nf * nf;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        *c = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        changed = true;
                    }
                }
            }
        }
        if !changed {
            break;
        }
    }
    for c in codes.iter_mut() {
        *c += nmax as i8;
    }
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

#[inline(always)]
pub(super) fn quant_q3_k(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = src.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<110>();
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        let mut signed = [0i8; QK_K];
        let mut scales = [0f32; 16];
        let mut max_scale = 0.0f32;
        let mut amax = 0.0f32;
        let (groups, _) = x.as_chunks::<16>();
        let (cs, _) = signed.as_chunks_mut::<16>();
        for (j, (g, c)) in groups.iter().zip(cs.iter_mut()).enumerate() {
            scales[j] = make_q3_quants(4, g, c);
            if scales[j].abs() > amax {
                amax = scales[j].abs();
                max_scale = scales[j];
            }
        }
        let mut packed = [0u8; 12];
        let mut d_value = 0.0f32;
        if max_scale != 0.0 {
            let iscale = -32.0 / max_scale;
            for (j, &scale) in scales.iter().enumerate() {
                // ggml stores the int into an int8_t (wrapping) before clamping.
                let l = ((nearest_int(iscale * scale) as i8).clamp(-32, 31) + 32) as u8;
                if j < 8 {
                    packed[j] = l & 0x0f;
                } else {
                    packed[j - 8] |= (l & 0x0f) << 4;
                }
                packed[j % 4 + 8] |= (l >> 4) << (2 * (j / 4));
            }
            d_value = 1.0 / iscale;
        }
        let d_bits = f16_bits(d_value).ok_or(BlockOverflow {
            block: i,
            value: d_value,
        })?;
        let d_super = half::f16::from_bits(d_bits).to_f32();
        let sc = scales_q3_k(&packed);
        for (j, (g, c)) in groups.iter().zip(cs.iter_mut()).enumerate() {
            let d = d_super * f32::from(sc[j]);
            if d == 0.0 {
                continue;
            }
            for (code, v) in c.iter_mut().zip(g) {
                *code = (nearest_int(v / d).clamp(-4, 3) + 4) as i8;
            }
        }
        let mut codes = [0u8; QK_K];
        let mut hmask = [0u8; 32];
        for (j, (code, &s)) in codes.iter_mut().zip(&signed).enumerate() {
            let mut l = s as u8;
            if l > 3 {
                hmask[j % 32] |= 1 << (j / 32);
                l -= 4;
            }
            *code = l;
        }
        b[..32].copy_from_slice(&hmask);
        pack_2bit(&codes, &mut b[32..96]);
        b[96..108].copy_from_slice(&packed);
        b[108..110].copy_from_slice(&d_bits.to_le_bytes());
    }
    Ok(())
}
