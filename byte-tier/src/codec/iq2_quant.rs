//! Quantization to IQ2_XXS, IQ2_XS and IQ2_S: ggml's `quantize_row_iq2_xxs_impl`,
//! `quantize_row_iq2_xs_impl` and `quantize_row_iq2_s_impl`, in the same float
//! operations and order, so the bytes equal ggml's.
//!
//! Each group of eight values is stored as a grid point of magnitudes (levels 0, 1, 2
//! standing for the odd multiples 1, 3, 5 of the group's scale) and eight sign bits. A
//! quantizer takes the magnitudes of the values, tries a range of scales, rounds each
//! group to levels at each, and snaps a group that rounds off the grid to the nearest
//! grid point it weighs best among the candidates [`GridIndex`] lists. The scale with
//! the least weighted error wins and is refined once by least squares; the sub-block
//! scales are then stored as 4-bit multiples of a per-super-block f16 scale.
//!
//! IQ2_XXS and IQ2_XS store seven sign bits per group, the eighth making the number of
//! negative signs even: a group with an odd number of negative values flips the sign of
//! its least important one. ggml quantizes these two types only with importance
//! weights. IQ2_S stores all eight sign bits and quantizes with or without them.
//!
//! Element weights are `qw * sqrt(sigma2 + x²)` with importance `qw`, where `sigma2` is
//! the mean square of the super-block (IQ2_XXS, IQ2_XS) or twice it (IQ2_S); IQ2_S
//! without importance uses `sigma2 / 4 + x²`. The search weighs candidate grid points
//! by the square roots of these weights.

use super::BlockOverflow;
use super::f16_bits;
use super::grid_index::{GridIndex, Lookup, POINT_WIDTH, grid_index, grid_key};
use super::kquants::{GROUP_MAX_EPS, nearest_int};
use super::weighted::make_qp_quants;
use crate::types::GgmlType;

const QK_K: usize = 256;

/// The highest level plus one: codes 0..=2 stand for the odd values 1, 3, 5.
const K_MAX_Q: i32 = 3;

/// The odd value `2 * K_MAX_Q - 1` that the largest magnitude maps to at the starting
/// scale of a search.
const TOP_ODD: f32 = (2 * K_MAX_Q - 1) as f32;

/// Below this largest magnitude an IQ2_S sub-block counts as all zeros
/// (ggml's `GROUP_MAX_EPS_IQ2_S`).
const GROUP_MAX_EPS_IQ2_S: f32 = 1e-8;

/// Sub-block scales are stored as 4-bit codes `l` of `(2 * l + 1) * d`, with `d` the
/// largest sub-block scale over this divisor.
const SCALE_DIVISOR: f32 = 31.0;

/// The largest 4-bit sub-block scale code.
const MAX_SCALE_CODE: i32 = 15;

/// IQ2_S stores its super-block scale shrunk by this factor.
const IQ2_S_SCALE_SHRINK: f32 = 0.9875;

/// The 7 stored bits of a sign byte whose eighth bit is implied by parity.
const SEVEN_SIGN_BITS: u8 = 127;

/// One group of eight values snapped to a grid point.
#[derive(Clone, Copy, Default)]
struct GroupCode {
    /// The point's index in its grid.
    index: u16,
    /// The point's levels (0, 1 or 2).
    levels: [u8; POINT_WIDTH],
    /// Whether the rounded levels were a grid point themselves, with no neighbour search.
    on_grid: bool,
}

/// The candidate among `neighbours` whose points, at `scale`, are nearest to `x` in the
/// squared error weighted by `weights`; the first on ties, as ggml keeps it.
fn best_neighbour(
    grid: &GridIndex,
    neighbours: &[u16],
    x: &[f32; POINT_WIDTH],
    weights: &[f32; POINT_WIDTH],
    scale: f32,
) -> u16 {
    let mut best_d2 = f32::MAX;
    // ggml asserts when no distance is below f32::MAX, which takes values whose squares
    // overflow; the first candidate keeps the search defined for them (their block's
    // scale overflows f16 and is refused anyway).
    let mut best = neighbours[0];
    for &candidate in neighbours {
        let point = grid.point(candidate);
        let mut d2 = 0.0f32;
        for ((&p, &v), &w) in point.iter().zip(x).zip(weights) {
            let diff = scale * f32::from(p) - v;
            d2 += w * diff * diff;
        }
        if d2 < best_d2 {
            best_d2 = d2;
            best = candidate;
        }
    }
    best
}

/// Rounds eight magnitudes at inverse scale `inverse` to levels 0..=2 and, when those
/// are no grid point, snaps them to the neighbour best at `scale`.
#[inline]
fn snap_group(
    grid: &GridIndex,
    x: &[f32; POINT_WIDTH],
    search_weights: &[f32; POINT_WIDTH],
    inverse: f32,
    scale: f32,
) -> GroupCode {
    let levels = x.map(|v| nearest_int(0.5 * (inverse * v - 1.0)).clamp(0, K_MAX_Q - 1) as u8);
    match grid.lookup(grid_key(&levels)) {
        Lookup::Point(index) => GroupCode {
            index,
            levels,
            on_grid: true,
        },
        Lookup::Neighbours(list) => {
            let index = best_neighbour(grid, list, x, search_weights, scale);
            GroupCode {
                index,
                levels: grid.levels(index),
                on_grid: false,
            }
        }
    }
}

/// The weighted sums `Σ w·x·q` and `Σ w·q²` of magnitudes `x` against the odd values
/// `q = 2 * level + 1` of their groups.
fn weighted_sums<const N: usize, const G: usize>(
    x: &[f32; N],
    weights: &[f32; N],
    groups: &[GroupCode; G],
) -> (f32, f32) {
    let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
    let levels = groups.iter().flat_map(|g| g.levels);
    for ((&v, &w), level) in x.iter().zip(weights).zip(levels) {
        let q = f32::from(2 * level + 1);
        sumqx += w * v * q;
        sumq2 += w * q * q;
    }
    (sumqx, sumq2)
}

/// The eight values of group `k` of a sub-block.
#[inline(always)]
fn group_of<const N: usize>(x: &[f32; N], k: usize) -> &[f32; POINT_WIDTH] {
    x[POINT_WIDTH * k..POINT_WIDTH * (k + 1)]
        .try_into()
        .expect("sub-blocks are whole groups")
}

/// Magnitudes and sign bits of a group of eight values (bit `i` set when value `i` is
/// negative); `-0.0` counts as positive.
fn magnitudes_and_signs(x: &[f32]) -> ([f32; POINT_WIDTH], u8) {
    let mut magnitudes = [0f32; POINT_WIDTH];
    let mut signs = 0u8;
    for (i, (m, &v)) in magnitudes.iter_mut().zip(x).enumerate() {
        if v >= 0.0 {
            *m = v;
        } else {
            *m = -v;
            signs |= 1 << i;
        }
    }
    (magnitudes, signs)
}

/// Magnitudes and the seven stored sign bits of a group whose number of negative signs
/// must be even: with an odd number, the value of least weighted square `w·x·x` (the
/// first on ties) keeps its sign against the others, its magnitude negated.
fn magnitudes_and_even_signs(x: &[f32], weights: &[f32]) -> ([f32; POINT_WIDTH], u8) {
    let (mut magnitudes, mut signs) = magnitudes_and_signs(x);
    if signs.count_ones() % 2 == 1 {
        let mut least = 0;
        let mut min = weights[0] * x[0] * x[0];
        for i in 1..POINT_WIDTH {
            let ax = weights[i] * x[i] * x[i];
            if ax < min {
                min = ax;
                least = i;
            }
        }
        magnitudes[least] = -magnitudes[least];
        signs ^= 1 << least;
    }
    (magnitudes, signs & SEVEN_SIGN_BITS)
}

/// The larger of two values, the first on ties (ggml's `MAX`).
#[inline(always)]
fn max_of(a: f32, b: f32) -> f32 {
    if a > b { a } else { b }
}

fn sum_squares(x: &[f32]) -> f32 {
    let mut sum = 0.0f32;
    for v in x {
        sum += v * v;
    }
    sum
}

/// `qw * sqrt(sigma2 + x²)` for each element.
fn importance_weights<const N: usize>(x: &[f32; N], qw: &[f32; N], sigma2: f32) -> [f32; N] {
    std::array::from_fn(|i| qw[i] * (sigma2 + x[i] * x[i]).sqrt())
}

/// The 4-bit code of a sub-block scale under inverse super-block scale `inverse`.
fn scale_code(inverse: f32, scale: f32) -> u8 {
    nearest_int(0.5 * (inverse * scale - 1.0)).clamp(0, MAX_SCALE_CODE) as u8
}

/// The f16 super-block scale, or the overflow of block `block`.
fn f16_scale(value: f32, block: usize) -> Result<u16, BlockOverflow> {
    f16_bits(value).ok_or(BlockOverflow { block, value })
}

/// A 32-value IQ2_XXS sub-block: its scale and four group codes (all zero for a
/// sub-block of zeros).
#[derive(Clone, Copy, Default)]
struct SubBlock32 {
    scale: f32,
    groups: [GroupCode; 4],
    signs: [u8; 4],
}

/// Searches an IQ2_XXS sub-block: a starting scale from `make_qp_quants`, thirteen
/// trial scales around it, then one least-squares refinement with every group snapped
/// at the best scale.
fn iq2_xxs_sub_block(grid: &GridIndex, x: &[f32; 32], qw: &[f32; 32], sigma2: f32) -> SubBlock32 {
    let weights = importance_weights(x, qw, sigma2);
    let search_weights = weights.map(f32::sqrt);
    let mut xval = [0f32; 32];
    let mut signs = [0u8; 4];
    for k in 0..4 {
        let (m, s) = magnitudes_and_even_signs(group_of(x, k), group_of(&weights, k));
        xval[8 * k..8 * k + 8].copy_from_slice(&m);
        signs[k] = s;
    }
    let max = xval[1..].iter().fold(xval[0], |m, &v| max_of(m, v));
    if max < GROUP_MAX_EPS {
        return SubBlock32::default();
    }
    let mut codes = [0u8; 32];
    let mut scale = make_qp_quants(K_MAX_Q + 1, &xval, &mut codes, &weights);
    let eff_max = scale * K_MAX_Q as f32;
    if eff_max <= 0.0 {
        return SubBlock32::default();
    }
    let mut best = 0.0f32;
    let mut groups = [GroupCode::default(); 4];
    for is in -6..=6 {
        let inverse = (TOP_ODD + is as f32 * 0.1) / eff_max;
        let this_scale = 1.0 / inverse;
        let trial: [GroupCode; 4] = std::array::from_fn(|k| {
            snap_group(
                grid,
                group_of(&xval, k),
                group_of(&search_weights, k),
                inverse,
                this_scale,
            )
        });
        let (sumqx, sumq2) = weighted_sums(&xval, &weights, &trial);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            groups = trial;
        }
    }
    if scale > 0.0 {
        let inverse = 1.0 / scale;
        groups = std::array::from_fn(|k| {
            snap_group(
                grid,
                group_of(&xval, k),
                group_of(&search_weights, k),
                inverse,
                scale,
            )
        });
        let (sumqx, sumq2) = weighted_sums(&xval, &weights, &groups);
        if sumq2 > 0.0 {
            scale = sumqx / sumq2;
        }
    }
    if scale < 0.0 {
        scale = -scale;
        signs = signs.map(|s| !s & SEVEN_SIGN_BITS);
    }
    SubBlock32 {
        scale,
        groups,
        signs,
    }
}

/// Quantizes one row of IQ2_XXS blocks with importance weights `qw` (one per value).
pub(super) fn iq2_xxs_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let grid = grid_index(GgmlType::IQ2_XXS).expect("IQ2_XXS has a grid index");
    let (xs, _) = x.as_chunks::<QK_K>();
    let (ws, _) = qw.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<66>();
    for (block_number, ((xb, wb), out)) in xs.iter().zip(ws).zip(blocks).enumerate() {
        let sigma2 = sum_squares(xb) / QK_K as f32;
        let (sub_x, _) = xb.as_chunks::<32>();
        let (sub_w, _) = wb.as_chunks::<32>();
        let mut subs = [SubBlock32::default(); QK_K / 32];
        let mut max_scale = 0.0f32;
        for (sub, (sx, sw)) in subs.iter_mut().zip(sub_x.iter().zip(sub_w)) {
            *sub = iq2_xxs_sub_block(grid, sx, sw, sigma2);
            max_scale = max_of(max_scale, sub.scale);
        }
        out.fill(0);
        if max_scale == 0.0 {
            continue;
        }
        let d = max_scale / SCALE_DIVISOR;
        out[0..2].copy_from_slice(&f16_scale(d, block_number)?.to_le_bytes());
        let inverse = 1.0 / d;
        for (ib, sub) in subs.iter().enumerate() {
            let at = 2 + 8 * ib;
            let mut indices = 0u32;
            let mut signs = 0u32;
            // A sub-block of zeros has scale 0 and all-zero codes; its scale code is
            // still written, as ggml writes it.
            for (k, (group, &s)) in sub.groups.iter().zip(&sub.signs).enumerate() {
                indices |= u32::from(group.index) << (8 * k);
                signs |= u32::from(s) << (7 * k);
            }
            signs |= u32::from(scale_code(inverse, sub.scale)) << 28;
            out[at..at + 4].copy_from_slice(&indices.to_le_bytes());
            out[at + 4..at + 8].copy_from_slice(&signs.to_le_bytes());
        }
    }
    Ok(())
}

/// A 16-value IQ2_XS or IQ2_S sub-block: its scale, two group codes and their sign
/// bytes (all zero for a sub-block of zeros).
#[derive(Clone, Copy, Default)]
struct SubBlock16 {
    scale: f32,
    groups: [GroupCode; 2],
    signs: [u8; 2],
}

/// The search shared by IQ2_XS and IQ2_S: nineteen trial scales around the one that
/// maps the largest magnitude to 5, then a least-squares refinement in which only the
/// groups that needed a neighbour search are snapped again. `sign_mask` is the set of
/// stored sign bits, inverted when the scale comes out negative.
fn pair_sub_block(
    grid: &GridIndex,
    xval: &[f32; 16],
    weights: &[f32; 16],
    signs: [u8; 2],
    sign_mask: u8,
    eps: f32,
) -> SubBlock16 {
    let search_weights = weights.map(f32::sqrt);
    let max = xval[1..].iter().fold(xval[0], |m, &v| max_of(m, v));
    if max < eps {
        return SubBlock16::default();
    }
    let mut best = 0.0f32;
    let mut scale = max / TOP_ODD;
    // The all-lowest levels are grid point 0 in every IQ2 grid.
    let mut groups = [GroupCode {
        index: 0,
        levels: [0; POINT_WIDTH],
        on_grid: true,
    }; 2];
    for is in -9..=9 {
        let inverse = (TOP_ODD + is as f32 * 0.1) / max;
        let this_scale = 1.0 / inverse;
        let trial: [GroupCode; 2] = std::array::from_fn(|k| {
            snap_group(
                grid,
                group_of(xval, k),
                group_of(&search_weights, k),
                inverse,
                this_scale,
            )
        });
        let (sumqx, sumq2) = weighted_sums(xval, weights, &trial);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            scale = sumqx / sumq2;
            best = scale * sumqx;
            groups = trial;
        }
    }
    if groups.iter().any(|g| !g.on_grid) && scale > 0.0 {
        let inverse = 1.0 / scale;
        for (k, group) in groups.iter_mut().enumerate() {
            if !group.on_grid {
                *group = snap_group(
                    grid,
                    group_of(xval, k),
                    group_of(&search_weights, k),
                    inverse,
                    scale,
                );
            }
        }
        let (sumqx, sumq2) = weighted_sums(xval, weights, &groups);
        if sumq2 > 0.0 {
            scale = sumqx / sumq2;
        }
    }
    let mut signs = signs;
    if scale < 0.0 {
        scale = -scale;
        signs = signs.map(|s| !s & sign_mask);
    }
    SubBlock16 {
        scale,
        groups,
        signs,
    }
}

/// Quantizes one row of IQ2_XS blocks with importance weights `qw` (one per value).
pub(super) fn iq2_xs_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let grid = grid_index(GgmlType::IQ2_XS).expect("IQ2_XS has a grid index");
    let (xs, _) = x.as_chunks::<QK_K>();
    let (ws, _) = qw.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<74>();
    for (block_number, ((xb, wb), out)) in xs.iter().zip(ws).zip(blocks).enumerate() {
        let sigma2 = sum_squares(xb) / QK_K as f32;
        let (sub_x, _) = xb.as_chunks::<16>();
        let (sub_w, _) = wb.as_chunks::<16>();
        let mut subs = [SubBlock16::default(); QK_K / 16];
        for (sub, (sx, sw)) in subs.iter_mut().zip(sub_x.iter().zip(sub_w)) {
            let weights = importance_weights(sx, sw, sigma2);
            let mut xval = [0f32; 16];
            let mut signs = [0u8; 2];
            for k in 0..2 {
                let (m, s) = magnitudes_and_even_signs(group_of(sx, k), group_of(&weights, k));
                xval[8 * k..8 * k + 8].copy_from_slice(&m);
                signs[k] = s;
            }
            *sub = pair_sub_block(grid, &xval, &weights, signs, SEVEN_SIGN_BITS, GROUP_MAX_EPS);
        }
        let max_scale = subs.iter().fold(0.0f32, |m, s| max_of(m, s.scale));
        out.fill(0);
        if max_scale == 0.0 {
            continue;
        }
        let d = max_scale / SCALE_DIVISOR;
        out[0..2].copy_from_slice(&f16_scale(d, block_number)?.to_le_bytes());
        let inverse = 1.0 / d;
        for (ib, sub) in subs.iter().enumerate() {
            for (k, (group, &s)) in sub.groups.iter().zip(&sub.signs).enumerate() {
                let at = 2 + 2 * (2 * ib + k);
                let word = group.index | (u16::from(s) << 9);
                out[at..at + 2].copy_from_slice(&word.to_le_bytes());
            }
            out[66 + ib / 2] |= scale_code(inverse, sub.scale) << (4 * (ib % 2));
        }
    }
    Ok(())
}

/// Quantizes IQ2_S blocks, the element weights of each 16-value sub-block given by
/// `weights_of(sigma2, sub-block values, offset of the sub-block in x)`.
fn iq2_s_blocks(
    x: &[f32],
    dst: &mut [u8],
    weights_of: impl Fn(f32, &[f32; 16], usize) -> [f32; 16],
) -> Result<(), BlockOverflow> {
    let grid = grid_index(GgmlType::IQ2_S).expect("IQ2_S has a grid index");
    let (xs, _) = x.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<82>();
    for (block_number, (xb, out)) in xs.iter().zip(blocks).enumerate() {
        let sigma2 = 2.0 * sum_squares(xb) / QK_K as f32;
        let (sub_x, _) = xb.as_chunks::<16>();
        let mut subs = [SubBlock16::default(); QK_K / 16];
        for (ib, (sub, sx)) in subs.iter_mut().zip(sub_x).enumerate() {
            let weights = weights_of(sigma2, sx, QK_K * block_number + 16 * ib);
            let mut xval = [0f32; 16];
            let mut signs = [0u8; 2];
            for k in 0..2 {
                let (m, s) = magnitudes_and_signs(group_of(sx, k));
                xval[8 * k..8 * k + 8].copy_from_slice(&m);
                signs[k] = s;
            }
            *sub = pair_sub_block(grid, &xval, &weights, signs, u8::MAX, GROUP_MAX_EPS_IQ2_S);
        }
        let max_scale = subs.iter().fold(0.0f32, |m, s| max_of(m, s.scale));
        out.fill(0);
        // The grid indices and signs are stored even when every scale is zero (they
        // are zero too, then).
        for (ib, sub) in subs.iter().enumerate() {
            for (k, (group, &s)) in sub.groups.iter().zip(&sub.signs).enumerate() {
                let g = 2 * ib + k;
                out[2 + g] = (group.index & 0xff) as u8;
                out[66 + g / 4] |= ((group.index >> 8) as u8) << (2 * (g % 4));
                out[34 + g] = s;
            }
        }
        if max_scale == 0.0 {
            continue;
        }
        let d = max_scale / SCALE_DIVISOR;
        out[0..2].copy_from_slice(&f16_scale(d * IQ2_S_SCALE_SHRINK, block_number)?.to_le_bytes());
        let inverse = 1.0 / d;
        for (ib, sub) in subs.iter().enumerate() {
            out[74 + ib / 2] |= scale_code(inverse, sub.scale) << (4 * (ib % 2));
        }
    }
    Ok(())
}

/// Quantizes one row of IQ2_S blocks with importance weights `qw` (one per value).
pub(super) fn iq2_s_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    iq2_s_blocks(x, dst, |sigma2, sx, at| {
        let sw: &[f32; 16] = qw[at..at + 16].try_into().expect("weights cover the row");
        importance_weights(sx, sw, sigma2)
    })
}

/// Quantizes IQ2_S blocks without importance weights.
pub(super) fn quant_iq2_s(x: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    iq2_s_blocks(x, dst, |sigma2, sx, _| sx.map(|v| 0.25 * sigma2 + v * v))
}
