//! Quantization with importance weights (an importance matrix, as llama-imatrix
//! computes it): ggml's `quantize_q{2,3,4,5,6}_K`, `quantize_q{4,5}_{0,1}`,
//! `quantize_iq4_nl`, `quantize_iq4_xs`, `quantize_iq1_s` and `quantize_iq1_m` with
//! non-null `quant_weights`; the row kernels of IQ3_XXS and IQ3_S (`quantize_iq3_xxs`,
//! `quantize_iq3_s`) live with their grid search in `iq3_quant`.
//!
//! Each kernel quantizes one row of `n_per_row` values with one weight per column, in
//! the same float operations and order as ggml (which its CPU build compiles without
//! fused multiply-add on baseline x86-64), so the bytes equal `llama-quantize
//! --imatrix`. What the weights change, per family:
//! - Q2_K, Q4_K, Q5_K, Q4_1, Q5_1: the sub-block scale and min come from
//!   `make_qkx3_quants` (a 37-step search) weighted by `w * sqrt(sigma2 + x²)`, and for
//!   the K-quants the 4- or 6-bit sub-block scales from `make_qp_quants`, weighted by
//!   each sub-block's total weight;
//! - Q3_K, Q4_0, Q5_0: `make_qx_quants` with the same weights, and for Q3_K the group
//!   scales again by `make_qx_quants` weighted by group totals;
//! - Q6_K: `make_qx_quants` weighted by the raw importance;
//! - IQ4_NL, IQ4_XS: the scale search of `quantize_row_iq4_nl_impl` with 7 tries;
//! - IQ1_S, IQ1_M: the split search of `quantize_iq1_s` / `quantize_iq1_m` weighted by
//!   `w * sqrt(sigma2 + x²)` (in `iq1_quant.rs`; IQ1_S has no unweighted form).
//! - IQ2_XXS, IQ2_XS, IQ2_S: the grid searches of `iq2_quant.rs`.
//!
//! `sigma2` is the mean square of the row (Q4_0, Q5_0, Q4_1, Q5_1), of the super-block
//! (Q2_K), twice it (Q3_K, Q4_K, Q5_K, IQ4_XS, IQ1_S, IQ1_M), or twice that of the
//! 32-value block (IQ4_NL).

use super::BlockOverflow;
use super::f16_bits;
use super::kquants::{
    GROUP_MAX_EPS, K4Parts, finish_q6_k, nearest_int, pack_2bit, pack_scales_mins_k4,
    scales_mins_k4, scales_q3_k, store_q4_k, store_q5_k,
};
use super::legacy::{fifth_bits, pack_nibbles, scale_bits};
use super::lut::{best_index_iq4, finish_iq4_xs, iq4_sub_block_weighted, pack_iq4_nibbles};
use super::signed_abs_max;

const QK_K: usize = 256;

/// Quantizes one row: `x` and `weights` hold the row's values and its per-column
/// importance (the same length, whole blocks), `dst` the row's blocks. Fails with the
/// index (within the row) of the first block whose scale does not fit.
pub(super) type RowKernel = fn(&[f32], &[f32], &mut [u8]) -> Result<(), BlockOverflow>;

/// The weighted kernel of a type, or `None` where ggml ignores importance weights.
pub(super) fn row_kernel(ggml_type: crate::types::GgmlType) -> Option<RowKernel> {
    use crate::types::GgmlType as T;
    Some(match ggml_type {
        T::Q2_K => q2_k_row,
        T::Q3_K => q3_k_row,
        T::Q4_K => q4_k_row,
        T::Q5_K => q5_k_row,
        T::Q6_K => q6_k_row,
        T::Q4_0 => q4_0_row,
        T::Q4_1 => q4_1_row,
        T::Q5_0 => q5_0_row,
        T::Q5_1 => q5_1_row,
        T::IQ4_NL => iq4_nl_row,
        T::IQ4_XS => iq4_xs_row,
        T::IQ3_XXS => super::iq3_quant::iq3_xxs_row,
        T::IQ3_S => super::iq3_quant::iq3_s_row,
        T::IQ1_S => super::iq1_quant::iq1_s_row,
        T::IQ1_M => super::iq1_quant::iq1_m_row,
        T::IQ2_XXS => super::iq2_quant::iq2_xxs_row,
        T::IQ2_XS => super::iq2_quant::iq2_xs_row,
        T::IQ2_S => super::iq2_quant::iq2_s_row,
        _ => return None,
    })
}

pub(super) fn sum_squares(x: &[f32]) -> f32 {
    let mut sum = 0.0f32;
    for v in x {
        sum += v * v;
    }
    sum
}

/// `qw * sqrt(sigma2 + x²)`, ggml's weight of each element of a weighted block.
#[inline(always)]
pub(super) fn element_weights<const N: usize>(
    x: &[f32; N],
    qw: &[f32; N],
    sigma2: f32,
) -> [f32; N] {
    let mut w = [0f32; N];
    for ((w, &v), &q) in w.iter_mut().zip(x).zip(qw) {
        *w = q * (sigma2 + v * v).sqrt();
    }
    w
}

fn sum_of(w: &[f32]) -> f32 {
    let mut sum = 0.0f32;
    for v in w {
        sum += v;
    }
    sum
}

/// ggml's `make_qkx3_quants` with `rmin = -0.9`, `rdelta = 0.05`, `nstep = 36` and
/// squared error (every caller's arguments): a scale and a non-positive min for codes
/// `0..=nmax` minimizing the weighted squared error. Returns `(scale, -min)` and leaves
/// the codes in `codes`.
fn make_qkx3_quants<const N: usize>(
    nmax: i32,
    x: &[f32; N],
    weights: &[f32; N],
    codes: &mut [u8; N],
) -> (f32, f32) {
    const RMIN: f32 = -0.9;
    const RDELTA: f32 = 0.05;
    const NSTEP: i32 = 36;
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
    if max <= min {
        *codes = [0; N];
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best = 0.0f32;
    for i in 0..N {
        let l = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        codes[i] = l as u8;
        let diff = scale * l as f32 + min - x[i];
        best += weights[i] * (diff * diff);
    }
    let mut aux = [0u8; N];
    for is in 0..=NSTEP {
        iscale = (RMIN + RDELTA * is as f32 + nmax_f) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..N {
            // The best min so far can lie at or near the max: v may be huge, infinite
            // or NaN, and is capped (NaN goes to 0) before rounding, as in ggml.
            let v = iscale * (x[i] - min);
            let l = if v > 0.0 {
                nearest_int(if v < nmax_f { v } else { nmax_f })
            } else {
                0
            };
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
            let mut error = 0.0f32;
            for i in 0..N {
                let diff = this_scale * f32::from(aux[i]) + this_min - x[i];
                error += weights[i] * (diff * diff);
            }
            if error < best {
                *codes = aux;
                best = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// ggml's `make_qp_quants`: a positive scale for codes `0..=nmax` of non-negative
/// values (sub-block scales or mins), chosen among nine candidates by weighted squared
/// error and refined by up to five passes that move single codes. ggml keeps its codes
/// in bytes, so a negative code wraps as it does there.
pub(super) fn make_qp_quants<const N: usize>(
    nmax: i32,
    x: &[f32; N],
    codes: &mut [u8; N],
    qw: &[f32; N],
) -> f32 {
    let mut max = 0.0f32;
    for &v in x {
        max = if max > v { max } else { v };
    }
    if max < GROUP_MAX_EPS {
        *codes = [0; N];
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let mut iscale = nmax_f / max;
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = nearest_int(iscale * v) as u8;
    }
    let scale = 1.0 / iscale;
    let mut best_mse = 0.0f32;
    for i in 0..N {
        let diff = x[i] - scale * f32::from(codes[i]);
        best_mse += qw[i] * diff * diff;
    }
    for is in -4..=4 {
        if is == 0 {
            continue;
        }
        let iscale_is = (0.1 * is as f32 + nmax_f) / max;
        let scale_is = 1.0 / iscale_is;
        let mut mse = 0.0f32;
        for i in 0..N {
            let l = nearest_int(iscale_is * x[i]).min(nmax);
            let diff = x[i] - scale_is * l as f32;
            mse += qw[i] * diff * diff;
        }
        if mse < best_mse {
            best_mse = mse;
            iscale = iscale_is;
        }
    }
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..N {
        let l = nearest_int(iscale * x[i]).min(nmax);
        codes[i] = l as u8;
        let w = qw[i];
        let lf = l as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    for _ in 0..5 {
        let mut changed = false;
        for i in 0..N {
            let w = qw[i];
            let old = f32::from(codes[i]);
            let mut slx = sumlx - w * x[i] * old;
            let mut sl2 = suml2 - w * old * old;
            if slx > 0.0 && sl2 > 0.0 {
                let new_l = nearest_int(x[i] * sl2 / slx).min(nmax);
                if new_l != i32::from(codes[i]) {
                    let nf = new_l as f32;
                    slx += w * x[i] * nf;
                    sl2 += w * nf * nf;
                    if slx * slx * suml2 > sumlx * sumlx * sl2 {
                        codes[i] = new_l as u8;
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
    if suml2 > 0.0 { sumlx / suml2 } else { 0.0 }
}

/// ggml's `make_qx_quants` with `rmse_type = 1` and weights given: a signed scale for
/// codes `-nmax..nmax` (stored offset by `nmax`) minimizing the weighted squared error
/// over 19 candidate scales.
fn make_qx_quants<const N: usize>(
    nmax: i32,
    x: &[f32; N],
    codes: &mut [u8; N],
    qw: &[f32; N],
) -> f32 {
    let (max, amax) = signed_abs_max(x);
    if amax < GROUP_MAX_EPS {
        *codes = [0; N];
        return 0.0;
    }
    let nmax_f = nmax as f32;
    let code = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for (&v, &w) in x.iter().zip(qw) {
            let l = code(iscale, v) as f32;
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

fn f16_field(value: f32, block: usize) -> Result<u16, BlockOverflow> {
    f16_bits(value).ok_or(BlockOverflow { block, value })
}

fn q2_k_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = x.as_chunks::<QK_K>();
    let (ws, _) = qw.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<84>();
    for (i, ((x, qw), b)) in xs.iter().zip(ws).zip(blocks.iter_mut()).enumerate() {
        let sigma2 = sum_squares(x) / QK_K as f32;
        let mut codes = [0u8; QK_K];
        let mut scales = [0f32; 16];
        let mut mins = [0f32; 16];
        let mut sw = [0f32; 16];
        let (groups, _) = x.as_chunks::<16>();
        let (gw, _) = qw.as_chunks::<16>();
        let (cs, _) = codes.as_chunks_mut::<16>();
        for (j, ((g, q), c)) in groups.iter().zip(gw).zip(cs.iter_mut()).enumerate() {
            let weight = element_weights(g, q, sigma2);
            sw[j] = sum_of(&weight);
            (scales[j], mins[j]) = make_qkx3_quants(3, g, &weight, c);
        }
        let mut ls = [0u8; 16];
        let mut lm = [0u8; 16];
        let dm = make_qp_quants(15, &scales, &mut ls, &sw);
        let mm = make_qp_quants(15, &mins, &mut lm, &sw);
        let d_bits = f16_field(dm, i)?;
        let dmin_bits = f16_field(mm, i)?;
        let dm = half::f16::from_bits(d_bits).to_f32();
        let mm = half::f16::from_bits(dmin_bits).to_f32();
        let mut packed = [0u8; 16];
        for ((p, &s), &m) in packed.iter_mut().zip(&ls).zip(&lm) {
            *p = s | (m << 4);
        }
        for (j, (g, c)) in groups.iter().zip(cs.iter_mut()).enumerate() {
            let d = dm * f32::from(packed[j] & 0x0f);
            if d == 0.0 {
                continue;
            }
            let m = mm * f32::from(packed[j] >> 4);
            for (code, v) in c.iter_mut().zip(g) {
                *code = nearest_int((v + m) / d).clamp(0, 3) as u8;
            }
        }
        b[..16].copy_from_slice(&packed);
        pack_2bit(&codes, &mut b[16..80]);
        b[80..82].copy_from_slice(&d_bits.to_le_bytes());
        b[82..84].copy_from_slice(&dmin_bits.to_le_bytes());
    }
    Ok(())
}

fn q3_k_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = x.as_chunks::<QK_K>();
    let (ws, _) = qw.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<110>();
    for (i, ((x, qw), b)) in xs.iter().zip(ws).zip(blocks.iter_mut()).enumerate() {
        let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
        let mut codes = [0u8; QK_K];
        let mut scales = [0f32; 16];
        let mut sw = [0f32; 16];
        let (groups, _) = x.as_chunks::<16>();
        let (gw, _) = qw.as_chunks::<16>();
        let (cs, _) = codes.as_chunks_mut::<16>();
        for (j, ((g, q), c)) in groups.iter().zip(gw).zip(cs.iter_mut()).enumerate() {
            let weight = element_weights(g, q, sigma2);
            sw[j] = sum_of(&weight);
            scales[j] = make_qx_quants(4, g, c, &weight);
        }
        let mut ls = [0u8; 16];
        let d_block = make_qx_quants(32, &scales, &mut ls, &sw);
        let mut packed = [0u8; 12];
        for (j, &l) in ls.iter().enumerate() {
            if j < 8 {
                packed[j] = l & 0x0f;
            } else {
                packed[j - 8] |= (l & 0x0f) << 4;
            }
            packed[j % 4 + 8] |= (l >> 4) << (2 * (j / 4));
        }
        let d_bits = f16_field(d_block, i)?;
        let d_super = half::f16::from_bits(d_bits).to_f32();
        let sc = scales_q3_k(&packed);
        for (j, (g, c)) in groups.iter().zip(cs.iter_mut()).enumerate() {
            let d = d_super * f32::from(sc[j]);
            if d == 0.0 {
                continue;
            }
            for (code, v) in c.iter_mut().zip(g) {
                *code = (nearest_int(v / d).clamp(-4, 3) + 4) as u8;
            }
        }
        let mut hmask = [0u8; 32];
        for (j, code) in codes.iter_mut().enumerate() {
            if *code > 3 {
                hmask[j % 32] |= 1 << (j / 32);
                *code -= 4;
            }
        }
        b[..32].copy_from_slice(&hmask);
        pack_2bit(&codes, &mut b[32..96]);
        b[96..108].copy_from_slice(&packed);
        b[108..110].copy_from_slice(&d_bits.to_le_bytes());
    }
    Ok(())
}

/// The weighted Q4_K / Q5_K super-block: sub-block scales and mins by
/// `make_qkx3_quants`, their 6-bit codes by `make_qp_quants`, then the final codes.
fn k4_weighted(
    x: &[f32; QK_K],
    qw: &[f32; QK_K],
    nmax: i32,
    clamp_scales: bool,
    block: usize,
) -> Result<K4Parts, BlockOverflow> {
    let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
    let mut codes = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut mins = [0f32; 8];
    let mut sw = [0f32; 8];
    let (xs, _) = x.as_chunks::<32>();
    let (ws, _) = qw.as_chunks::<32>();
    let (cs, _) = codes.as_chunks_mut::<32>();
    for (j, ((xj, q), cj)) in xs.iter().zip(ws).zip(cs.iter_mut()).enumerate() {
        let weights = element_weights(xj, q, sigma2);
        sw[j] = sum_of(&weights);
        (scales[j], mins[j]) = make_qkx3_quants(nmax, xj, &weights, cj);
    }
    let mut ls = [0u8; 8];
    let mut lm = [0u8; 8];
    let d_block = make_qp_quants(63, &scales, &mut ls, &sw);
    let m_block = make_qp_quants(63, &mins, &mut lm, &sw);
    if clamp_scales {
        // Q5_K caps the codes at 63; Q4_K packs them as they are.
        for v in ls.iter_mut().chain(lm.iter_mut()) {
            *v = (*v).min(63);
        }
    }
    let mut packed = [0u8; 12];
    pack_scales_mins_k4(&ls, &lm, &mut packed);
    let d_bits = f16_field(d_block, block)?;
    let dmin_bits = f16_field(m_block, block)?;
    let d_super = half::f16::from_bits(d_bits).to_f32();
    let dmin_super = half::f16::from_bits(dmin_bits).to_f32();
    let (sc, mn) = scales_mins_k4(&packed);
    for (j, (xj, cj)) in xs.iter().zip(cs.iter_mut()).enumerate() {
        let d = d_super * f32::from(sc[j]);
        if d == 0.0 {
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

fn q4_k_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = x.as_chunks::<QK_K>();
    let (ws, _) = qw.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<144>();
    for (i, ((x, qw), b)) in xs.iter().zip(ws).zip(blocks.iter_mut()).enumerate() {
        store_q4_k(&k4_weighted(x, qw, 15, false, i)?, b);
    }
    Ok(())
}

fn q5_k_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = x.as_chunks::<QK_K>();
    let (ws, _) = qw.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<176>();
    for (i, ((x, qw), b)) in xs.iter().zip(ws).zip(blocks.iter_mut()).enumerate() {
        store_q5_k(&k4_weighted(x, qw, 31, true, i)?, b);
    }
    Ok(())
}

fn q6_k_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = x.as_chunks::<QK_K>();
    let (ws, _) = qw.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<210>();
    for (i, ((x, qw), b)) in xs.iter().zip(ws).zip(blocks.iter_mut()).enumerate() {
        let mut codes = [0u8; QK_K];
        let mut scales = [0f32; 16];
        let (groups, _) = x.as_chunks::<16>();
        let (gw, _) = qw.as_chunks::<16>();
        let (cs, _) = codes.as_chunks_mut::<16>();
        for (((g, q), c), s) in groups
            .iter()
            .zip(gw)
            .zip(cs.iter_mut())
            .zip(scales.iter_mut())
        {
            // Q6_K weighs by the raw importance, without the sigma term.
            *s = make_qx_quants(32, g, c, q);
        }
        finish_q6_k(x, &scales, &mut codes, b, i)?;
    }
    Ok(())
}

/// The legacy 32-value blocks of a row: index, weights (with the row's `sigma2`),
/// values and block bytes.
fn legacy_blocks<'a, const B: usize>(
    x: &'a [f32],
    qw: &'a [f32],
    dst: &'a mut [u8],
) -> impl Iterator<Item = (usize, [f32; 32], &'a [f32; 32], &'a mut [u8; B])> {
    let sigma2 = sum_squares(x) / x.len() as f32;
    let (xs, _) = x.as_chunks::<32>();
    let (ws, _) = qw.as_chunks::<32>();
    let (blocks, _) = dst.as_chunks_mut::<B>();
    xs.iter()
        .zip(ws)
        .zip(blocks.iter_mut())
        .enumerate()
        .map(move |(i, ((x, q), b))| (i, element_weights(x, q, sigma2), x, b))
}

fn q4_0_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let blocks = legacy_blocks::<18>(x, qw, dst);
    for (i, weight, xb, b) in blocks {
        let mut codes = [0u8; 32];
        let d = make_qx_quants(8, xb, &mut codes, &weight);
        b[..2].copy_from_slice(&scale_bits(d, i)?);
        pack_nibbles(&codes, &mut b[2..]);
    }
    Ok(())
}

fn q5_0_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let blocks = legacy_blocks::<22>(x, qw, dst);
    for (i, weight, xb, b) in blocks {
        let mut codes = [0u8; 32];
        let d = make_qx_quants(16, xb, &mut codes, &weight);
        b[..2].copy_from_slice(&scale_bits(d, i)?);
        b[2..6].copy_from_slice(&fifth_bits(&codes));
        pack_nibbles(&codes, &mut b[6..]);
    }
    Ok(())
}

fn q4_1_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let blocks = legacy_blocks::<20>(x, qw, dst);
    for (i, weight, xb, b) in blocks {
        let mut codes = [0u8; 32];
        let (d, the_min) = make_qkx3_quants(15, xb, &weight, &mut codes);
        b[..2].copy_from_slice(&scale_bits(d, i)?);
        b[2..4].copy_from_slice(&scale_bits(-the_min, i)?);
        pack_nibbles(&codes, &mut b[4..]);
    }
    Ok(())
}

fn q5_1_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let blocks = legacy_blocks::<24>(x, qw, dst);
    for (i, weight, xb, b) in blocks {
        let mut codes = [0u8; 32];
        let (d, the_min) = make_qkx3_quants(31, xb, &weight, &mut codes);
        b[..2].copy_from_slice(&scale_bits(d, i)?);
        b[2..4].copy_from_slice(&scale_bits(-the_min, i)?);
        b[4..8].copy_from_slice(&fifth_bits(&codes));
        pack_nibbles(&codes, &mut b[8..]);
    }
    Ok(())
}

fn iq4_nl_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = x.as_chunks::<32>();
    let (ws, _) = qw.as_chunks::<32>();
    let (blocks, _) = dst.as_chunks_mut::<18>();
    for (i, ((x, q), b)) in xs.iter().zip(ws).zip(blocks.iter_mut()).enumerate() {
        let sigma2 = sum_squares(x) * (2.0 / 32.0);
        let weight = element_weights(x, q, sigma2);
        let mut codes = [0u8; 32];
        let d = iq4_sub_block_weighted(x, &weight, 7, &mut codes);
        b[..2].copy_from_slice(&scale_bits(d, i)?);
        // With tries, ggml codes the block again with the refined scale (an all-zero
        // block gets the code of the value nearest zero).
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (c, &v) in codes.iter_mut().zip(x) {
            *c = best_index_iq4(id * v);
        }
        pack_iq4_nibbles(&codes, &mut b[2..]);
    }
    Ok(())
}

fn iq4_xs_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (xs, _) = x.as_chunks::<QK_K>();
    let (ws, _) = qw.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<136>();
    for (i, ((x, qw), b)) in xs.iter().zip(ws).zip(blocks.iter_mut()).enumerate() {
        let sigma2 = sum_squares(x) * (2.0 / QK_K as f32);
        let (subs, _) = x.as_chunks::<32>();
        let (sub_w, _) = qw.as_chunks::<32>();
        let mut scales = [0f32; 8];
        let mut scratch = [0u8; 32];
        for ((s, sub), q) in scales.iter_mut().zip(subs).zip(sub_w) {
            let weight = element_weights(sub, q, sigma2);
            *s = iq4_sub_block_weighted(sub, &weight, 7, &mut scratch);
        }
        finish_iq4_xs(x, &scales, b, i)?;
    }
    Ok(())
}
