//! Quantization to the 1-bit grid types IQ1_S and IQ1_M, byte for byte as ggml's
//! `quantize_iq1_s` and `quantize_iq1_m`.
//!
//! Both types code a group of eight values as a point of the 2048-point IQ1 grid, whose
//! coordinates take three levels (-1, 0, 1), shifted by a delta of +1/8 or -1/8 and
//! multiplied by a sub-block scale. A sub-block is quantized in three steps:
//! 1. With only three levels, the best levels of the sorted values are three runs: the
//!    sub-block is sorted once, prefix sums of `w·x` and `w` give the least-squares scale
//!    of every pair of run boundaries and every choice of delta signs, and the pair with
//!    the largest `(Σ w q x)² / Σ w q²` wins (ties keep the first found).
//! 2. Each group's levels are looked up in the grid index; a group that is not a grid
//!    point takes the neighbour with the smallest weighted error at the scale found, and
//!    the scale is then fitted again by least squares over the points chosen.
//! 3. The super-block scale is the largest sub-block scale over 15, and each sub-block
//!    scale is stored as a 3-bit odd multiple of it.
//!
//! IQ1_S (sub-blocks of 32 values, one delta sign each) is quantized only with
//! importance weights: ggml asserts them. IQ1_M (sub-blocks of 16, a delta sign per
//! group of 8) also quantizes without them, weighting each value by its square, and ends
//! with a least-squares fit of the super-block scale over the whole block.
//!
//! Every float operation keeps ggml's order in `f32`, and every comparison its strictness,
//! so that ties resolve the same way. Where ggml would store a NaN or infinite scale, or
//! stop on an assertion (a sub-block scale that is NaN, a group none of whose neighbours
//! has an error below `f32::MAX`: both only from inputs or weights whose products
//! overflow `f32`), the block is refused as an overflow.

use std::cmp::Ordering;

use super::BlockOverflow;
use super::f16_bits;
use super::grid_index::{GridIndex, Lookup, grid_index, grid_key};
use super::kquants::nearest_int;
use super::weighted::{element_weights, sum_squares};
use crate::types::GgmlType;

const QK_K: usize = 256;
/// Values per grid point.
const GROUP: usize = 8;
const IQ1_S_SUB_BLOCK: usize = 32;
const IQ1_M_SUB_BLOCK: usize = 16;
const IQ1_S_BLOCK_BYTES: usize = 50;
const IQ1_M_BLOCK_BYTES: usize = 56;

/// The shift of every grid coordinate, as the decoder applies it.
const DELTA: f32 = 0.125;

/// A sub-block whose largest magnitude is below this is stored as zeros.
const IQ1_S_NEGLIGIBLE: f32 = 1e-12;
const IQ1_M_NEGLIGIBLE: f32 = 1e-7;

/// The super-block scale is `max_scale / 15`: the largest 3-bit scale code, 7, stands
/// for the odd multiple 2·7 + 1.
const TOP_MULTIPLE: f32 = 15.0;

/// Factors ggml applies to the stored super-block scale, found by trial there to lower
/// the error; they are part of the format's reference output.
const IQ1_S_SCALE_FACTOR: f32 = 1.125;
const IQ1_M_SCALE_FACTOR: f32 = 1.1125;

/// How ggml weighs each value of a sub-block.
#[derive(Clone, Copy)]
enum Weighting<'a> {
    /// The super-block's importance weights `qw`, each value weighted by
    /// `qw · sqrt(sigma2 + x²)` with `sigma2` twice the super-block's mean square.
    Importance { qw: &'a [f32; QK_K], sigma2: f32 },
    /// No importance weights (IQ1_M only): `x²`.
    Squares,
}

impl<'a> Weighting<'a> {
    /// The importance weighting of super-block `x`.
    fn importance(x: &[f32; QK_K], qw: &'a [f32; QK_K]) -> Self {
        let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
        Weighting::Importance { qw, sigma2 }
    }

    /// The weights of sub-block `ib` (`x`, its values) of `N` values.
    #[inline]
    fn of<const N: usize>(self, x: &[f32; N], ib: usize) -> [f32; N] {
        match self {
            Weighting::Importance { qw, sigma2 } => {
                let (sub_weights, _) = qw.as_chunks::<N>();
                element_weights(x, &sub_weights[ib], sigma2)
            }
            Weighting::Squares => x.map(|v| v * v),
        }
    }
}

/// The sign of the delta of a group: which of the two sets of level values it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delta {
    Plus,
    Minus,
}

impl Delta {
    /// The decoded value of levels 0, 1 and 2 (grid coordinates -1, 0, 1) before the
    /// scale.
    #[inline(always)]
    fn values(self) -> &'static [f32; 3] {
        const PLUS: [f32; 3] = [-1.0 + DELTA, DELTA, 1.0 + DELTA];
        const MINUS: [f32; 3] = [-1.0 - DELTA, -DELTA, 1.0 - DELTA];
        match self {
            Delta::Plus => &PLUS,
            Delta::Minus => &MINUS,
        }
    }

    /// Position in a pair of `[plus, minus]` sums.
    #[inline(always)]
    fn index(self) -> usize {
        match self {
            Delta::Plus => 0,
            Delta::Minus => 1,
        }
    }

    /// The sign that decodes the same values negated, once the levels are mirrored.
    fn flipped(self) -> Self {
        match self {
            Delta::Plus => Delta::Minus,
            Delta::Minus => Delta::Plus,
        }
    }
}

/// The positions of a sub-block's values in ascending order, ties in their original
/// order (glibc's `qsort`, which ggml calls, is a stable merge sort for arrays this
/// small); -0.0 and 0.0 compare equal as in C.
#[inline]
fn ascending_order<const N: usize>(x: &[f32; N]) -> [u8; N] {
    let mut order: [u8; N] = std::array::from_fn(|i| i as u8);
    order.sort_by(|&a, &b| {
        x[usize::from(a)]
            .partial_cmp(&x[usize::from(b)])
            .unwrap_or(Ordering::Equal)
    });
    order
}

/// Levels that split the sorted values into three runs: the first `low_end` get level
/// 0, those up to `mid_end` level 1, the rest level 2.
#[inline]
fn three_runs<const N: usize>(order: &[u8; N], low_end: usize, mid_end: usize) -> [u8; N] {
    let mut levels = [0u8; N];
    for (rank, &i) in order.iter().enumerate() {
        levels[usize::from(i)] = u8::from(rank >= low_end) + u8::from(rank >= mid_end);
    }
    levels
}

/// `max` as ggml's `MAX` macro computes it (the second operand when they are equal).
#[inline(always)]
fn c_max(a: f32, b: f32) -> f32 {
    if a > b { a } else { b }
}

/// The largest magnitude in `x`.
#[inline]
fn abs_max(x: &[f32]) -> f32 {
    x[1..].iter().fold(x[0].abs(), |m, v| c_max(m, v.abs()))
}

/// The best split found by a sub-block search: the run boundaries, the least-squares
/// scale (negative when the levels should be mirrored) and the delta sign of each of the
/// sub-block's `G` groups.
struct Split<const G: usize> {
    low_end: usize,
    mid_end: usize,
    scale: f32,
    deltas: [Delta; G],
}

impl<const G: usize> Split<G> {
    /// Whether a candidate `(Σ w q x, Σ w q²)` beats the best score so far, as ggml
    /// compares: `sumqx² > best · sumq2`, a strict comparison so that the first of equal
    /// candidates stays.
    #[inline(always)]
    fn consider(
        best: &mut Option<Self>,
        best_score: &mut f32,
        sumqx: f32,
        sumq2: f32,
        candidate: (usize, usize, [Delta; G]),
    ) {
        if sumq2 > 0.0 && sumqx * sumqx > *best_score * sumq2 {
            let scale = sumqx / sumq2;
            *best_score = scale * sumqx;
            let (low_end, mid_end, deltas) = candidate;
            *best = Some(Split {
                low_end,
                mid_end,
                scale,
                deltas,
            });
        }
    }
}

/// The IQ1_S search over a 32-value sub-block: every pair of run boundaries, each with
/// both delta signs (one sign for the whole sub-block).
fn search_iq1_s(
    x: &[f32; IQ1_S_SUB_BLOCK],
    w: &[f32; IQ1_S_SUB_BLOCK],
    order: &[u8; IQ1_S_SUB_BLOCK],
) -> Option<Split<{ IQ1_S_SUB_BLOCK / GROUP }>> {
    const N: usize = IQ1_S_SUB_BLOCK;
    let mut sum_x = [0f32; N + 1];
    let mut sum_w = [0f32; N + 1];
    for (j, &i) in order.iter().enumerate() {
        let i = usize::from(i);
        sum_x[j + 1] = sum_x[j] + w[i] * x[i];
        sum_w[j + 1] = sum_w[j] + w[i];
    }
    let mut best = None;
    let mut best_score = -f32::MAX;
    for low_end in 0..=N {
        for mid_end in low_end..=N {
            for delta in [Delta::Plus, Delta::Minus] {
                let v = delta.values();
                // Each run's sum times its level value, in ggml's order of operations.
                let sumqx = sum_x[low_end] * v[0]
                    + (sum_x[mid_end] - sum_x[low_end]) * v[1]
                    + (sum_x[N] - sum_x[mid_end]) * v[2];
                let sumq2 = sum_w[low_end] * v[0] * v[0]
                    + (sum_w[mid_end] - sum_w[low_end]) * v[1] * v[1]
                    + (sum_w[N] - sum_w[mid_end]) * v[2] * v[2];
                let candidate = (low_end, mid_end, [delta; N / GROUP]);
                Split::consider(&mut best, &mut best_score, sumqx, sumq2, candidate);
            }
        }
    }
    best
}

/// IQ1_M's delta signs of the two groups of a sub-block, in the order ggml tries them.
const IQ1_M_DELTAS: [[Delta; 2]; 4] = [
    [Delta::Plus, Delta::Plus],
    [Delta::Plus, Delta::Minus],
    [Delta::Minus, Delta::Plus],
    [Delta::Minus, Delta::Minus],
];

/// The IQ1_M search over a 16-value sub-block: every pair of run boundaries, each with
/// the four combinations of the two groups' delta signs. Prefix sums are kept per group
/// (each group has its own sign); since the three level values of either sign are evenly
/// spaced one apart, a split's `Σ w q x` is `total · v₂ − S(low_end) − S(mid_end)`.
fn search_iq1_m(
    x: &[f32; IQ1_M_SUB_BLOCK],
    w: &[f32; IQ1_M_SUB_BLOCK],
    order: &[u8; IQ1_M_SUB_BLOCK],
) -> Option<Split<{ IQ1_M_SUB_BLOCK / GROUP }>> {
    const N: usize = IQ1_M_SUB_BLOCK;
    let mut sum_x = [[0f32; N + 1]; 2];
    let mut sum_w = [[0f32; N + 1]; 2];
    for (j, &i) in order.iter().enumerate() {
        let i = usize::from(i);
        let (own, other) = if i < GROUP { (0, 1) } else { (1, 0) };
        sum_x[own][j + 1] = sum_x[own][j] + w[i] * x[i];
        sum_x[other][j + 1] = sum_x[other][j];
        sum_w[own][j + 1] = sum_w[own][j] + w[i];
        sum_w[other][j + 1] = sum_w[other][j];
    }
    let total_x = [sum_x[0][N], sum_x[1][N]];
    let total_w = [sum_w[0][N], sum_w[1][N]];
    let (plus, minus) = (Delta::Plus.values(), Delta::Minus.values());
    let (p2, m2) = (plus[2], minus[2]);
    // Differences of squared level values: exact in f32 (0.75, -1.25, 1.25, -0.75).
    let cp1 = plus[0] * plus[0] - plus[1] * plus[1];
    let cp2 = plus[1] * plus[1] - plus[2] * plus[2];
    let cm1 = minus[0] * minus[0] - minus[1] * minus[1];
    let cm2 = minus[1] * minus[1] - minus[2] * minus[2];
    let mut best = None;
    let mut best_score = -f32::MAX;
    for low_end in 0..=N {
        for mid_end in low_end..=N {
            let mut qx = [[0f32; 2]; 2];
            let mut q2 = [[0f32; 2]; 2];
            for h in 0..2 {
                let s = sum_x[h][low_end] + sum_x[h][mid_end];
                qx[h] = [total_x[h] * p2 - s, total_x[h] * m2 - s];
                q2[h] = [
                    total_w[h] * p2 * p2 + sum_w[h][low_end] * cp1 + sum_w[h][mid_end] * cp2,
                    total_w[h] * m2 * m2 + sum_w[h][low_end] * cm1 + sum_w[h][mid_end] * cm2,
                ];
            }
            for deltas in IQ1_M_DELTAS {
                let (first, second) = (deltas[0].index(), deltas[1].index());
                let sumqx = qx[0][first] + qx[1][second];
                let sumq2 = q2[0][first] + q2[1][second];
                let candidate = (low_end, mid_end, deltas);
                Split::consider(&mut best, &mut best_score, sumqx, sumq2, candidate);
            }
        }
    }
    best
}

/// The grid point nearest a group's values at `scale` among `neighbours` (by weighted
/// squared error; the first of equal errors), or `None` when no error is below
/// `f32::MAX`.
fn best_neighbour(
    grid: &GridIndex,
    neighbours: &[u16],
    x: &[f32; GROUP],
    w: &[f32; GROUP],
    scale: f32,
    values: &[f32; 3],
) -> Option<u16> {
    let mut best_error = f32::MAX;
    let mut best = None;
    for &point in neighbours {
        let levels = grid.levels(point);
        let mut error = 0.0f32;
        for i in 0..GROUP {
            let diff = scale * values[usize::from(levels[i])] - x[i];
            error += w[i] * diff * diff;
        }
        if error < best_error {
            best_error = error;
            best = Some(point);
        }
    }
    best
}

/// A sub-block coded on the grid: a grid index and a delta sign for each of its `G`
/// groups, and the sub-block scale (not negative, finite).
struct SubBlock<const G: usize> {
    indices: [u16; G],
    deltas: [Delta; G],
    scale: f32,
}

/// Codes the sub-block `x` (weights `w`) from the winning split: mirrors the levels if
/// the scale came out negative, moves each group onto the grid and, if any group moved,
/// fits the scale again. Fails (with the scale) where ggml would stop on an assertion
/// or store an infinite scale.
fn code_on_grid<const N: usize, const G: usize>(
    grid: &GridIndex,
    x: &[f32; N],
    w: &[f32; N],
    order: &[u8; N],
    split: Split<G>,
) -> Result<SubBlock<G>, f32> {
    let mut levels = three_runs(order, split.low_end, split.mid_end);
    let mut scale = split.scale;
    let mut deltas = split.deltas;
    if scale < 0.0 {
        for l in levels.iter_mut() {
            *l = 2 - *l;
        }
        scale = -scale;
        deltas = deltas.map(Delta::flipped);
    }
    let (xs, _) = x.as_chunks::<GROUP>();
    let (ws, _) = w.as_chunks::<GROUP>();
    let (ls, _) = levels.as_chunks::<GROUP>();
    let mut indices = [0u16; G];
    let mut all_on_grid = true;
    for (k, index) in indices.iter_mut().enumerate() {
        *index = match grid.lookup(grid_key(&ls[k])) {
            Lookup::Point(point) => point,
            Lookup::Neighbours(neighbours) => {
                all_on_grid = false;
                let values = deltas[k].values();
                best_neighbour(grid, neighbours, &xs[k], &ws[k], scale, values).ok_or(scale)?
            }
        };
    }
    if !all_on_grid {
        let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
        for k in 0..G {
            let values = deltas[k].values();
            let levels = grid.levels(indices[k]);
            for j in 0..GROUP {
                let w = ws[k][j];
                let q = values[usize::from(levels[j])];
                sumqx += w * q * xs[k][j];
                sumq2 += w * q * q;
            }
        }
        if sumqx > 0.0 && sumq2 > 0.0 {
            scale = sumqx / sumq2;
        }
    }
    // ggml asserts `scale >= 0`, which a NaN fails; an infinite scale would be stored.
    if !scale.is_finite() {
        return Err(scale);
    }
    Ok(SubBlock {
        indices,
        deltas,
        scale,
    })
}

/// The 3-bit code of a sub-block scale under the super-block's inverse scale `id`: the
/// nearest odd multiple `2l + 1` of the super-block scale.
#[inline]
fn scale_code(id: f32, scale: f32) -> u16 {
    nearest_int(0.5 * (id * scale - 1.0)).clamp(0, 7) as u16
}

/// The index of the grid IQ1_S and IQ1_M share, built on first use.
fn iq1_grid() -> &'static GridIndex {
    grid_index(GgmlType::IQ1_S).expect("IQ1_S has a grid index")
}

/// The error of block `block` for a scale that cannot be stored.
fn overflow(block: usize) -> impl Fn(f32) -> BlockOverflow {
    move |value| BlockOverflow { block, value }
}

/// Quantizes one IQ1_S super-block into `out` (50 bytes: f16 scale, 32 low index
/// bytes, eight u16 words of high index bits, scale code and delta sign).
fn iq1_s_block(
    grid: &GridIndex,
    x: &[f32; QK_K],
    qw: &[f32; QK_K],
    out: &mut [u8; IQ1_S_BLOCK_BYTES],
    block: usize,
) -> Result<(), BlockOverflow> {
    const N: usize = IQ1_S_SUB_BLOCK;
    out.fill(0);
    let weighting = Weighting::importance(x, qw);
    let mut scales = [0f32; QK_K / N];
    let mut deltas = [Delta::Plus; QK_K / N];
    let mut high = [0u16; QK_K / N];
    let mut max_scale = 0.0f32;
    let (subs, _) = x.as_chunks::<N>();
    for (ib, xb) in subs.iter().enumerate() {
        if abs_max(xb) < IQ1_S_NEGLIGIBLE {
            continue;
        }
        let w = weighting.of(xb, ib);
        let order = ascending_order(xb);
        let Some(split) = search_iq1_s(xb, &w, &order) else {
            continue;
        };
        let sub = code_on_grid(grid, xb, &w, &order, split).map_err(overflow(block))?;
        for (k, &index) in sub.indices.iter().enumerate() {
            out[2 + 4 * ib + k] = index as u8;
            high[ib] |= (index >> 8) << (3 * k);
        }
        scales[ib] = sub.scale;
        deltas[ib] = sub.deltas[0];
        max_scale = c_max(max_scale, sub.scale);
    }
    if max_scale != 0.0 {
        let d = max_scale / TOP_MULTIPLE;
        let stored = d * IQ1_S_SCALE_FACTOR;
        let bits = f16_bits(stored).ok_or(BlockOverflow {
            block,
            value: stored,
        })?;
        out[..2].copy_from_slice(&bits.to_le_bytes());
        let id = 1.0 / d;
        for ib in 0..QK_K / N {
            let sign = u16::from(deltas[ib] == Delta::Minus) << 3;
            high[ib] |= (scale_code(id, scales[ib]) | sign) << 12;
        }
    }
    for (ib, word) in high.iter().enumerate() {
        out[34 + 2 * ib..36 + 2 * ib].copy_from_slice(&word.to_le_bytes());
    }
    Ok(())
}

/// Quantizes one IQ1_M super-block into `out` (56 bytes: 32 low index bytes, a nibble
/// per group of three high index bits and the delta sign, four u16 words of 3-bit
/// sub-block scales whose top nibbles hold the f16 super-block scale).
fn iq1_m_block(
    grid: &GridIndex,
    x: &[f32; QK_K],
    weighting: Weighting<'_>,
    out: &mut [u8; IQ1_M_BLOCK_BYTES],
    block: usize,
) -> Result<(), BlockOverflow> {
    const N: usize = IQ1_M_SUB_BLOCK;
    const SUBS: usize = QK_K / N;
    out.fill(0);
    let mut scales = [0f32; SUBS];
    let mut deltas = [[Delta::Plus; 2]; SUBS];
    let mut indices = [[0u16; 2]; SUBS];
    let mut weights = [0f32; QK_K];
    let mut max_scale = 0.0f32;
    let (subs, _) = x.as_chunks::<N>();
    let (sub_weights, _) = weights.as_chunks_mut::<N>();
    for (ib, (xb, w)) in subs.iter().zip(sub_weights.iter_mut()).enumerate() {
        *w = weighting.of(xb, ib);
        if abs_max(xb) < IQ1_M_NEGLIGIBLE {
            continue;
        }
        let order = ascending_order(xb);
        let Some(split) = search_iq1_m(xb, w, &order) else {
            continue;
        };
        let sub = code_on_grid(grid, xb, w, &order, split).map_err(overflow(block))?;
        indices[ib] = sub.indices;
        scales[ib] = sub.scale;
        deltas[ib] = sub.deltas;
        max_scale = c_max(max_scale, sub.scale);
    }
    let mut high = [0u8; SUBS];
    for (h, pair) in high.iter_mut().zip(&indices) {
        *h = (pair[0] >> 8) as u8 | ((pair[1] >> 8) as u8) << 4;
    }
    for (ib, pair) in indices.iter().enumerate() {
        out[2 * ib] = pair[0] as u8;
        out[2 * ib + 1] = pair[1] as u8;
    }
    if max_scale != 0.0 {
        let mut words = [0u16; 4];
        let d = max_scale / TOP_MULTIPLE;
        let id = 1.0 / d;
        // The super-block scale is fitted again over the whole block, with every
        // sub-block at its coded scale (a skipped sub-block counts as grid point 0 at
        // the smallest multiple).
        let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
        for ib in 0..SUBS {
            let code = scale_code(id, scales[ib]);
            words[ib / 4] |= code << (3 * (ib % 4));
            for (k, delta) in deltas[ib].iter().enumerate() {
                high[ib] |= u8::from(*delta == Delta::Minus) << (3 + 4 * k);
            }
            let multiple = f32::from(2 * code + 1);
            for k in 0..2 {
                let values = deltas[ib][k].values();
                let levels = grid.levels(indices[ib][k]);
                for j in 0..GROUP {
                    let i = N * ib + GROUP * k + j;
                    let w = weights[i];
                    let q = values[usize::from(levels[j])] * multiple;
                    sumqx += w * q * x[i];
                    sumq2 += w * q * q;
                }
            }
        }
        let d = if sumq2 > 0.0 { sumqx / sumq2 } else { d };
        let stored = d * IQ1_M_SCALE_FACTOR;
        let bits = f16_bits(stored).ok_or(BlockOverflow {
            block,
            value: stored,
        })?;
        for (i, word) in words.iter_mut().enumerate() {
            *word |= ((bits >> (4 * i)) & 0x0f) << 12;
        }
        for (i, word) in words.iter().enumerate() {
            out[48 + 2 * i..50 + 2 * i].copy_from_slice(&word.to_le_bytes());
        }
    }
    out[32..48].copy_from_slice(&high);
    Ok(())
}

/// IQ1_S, weighted: the row's super-blocks with the matching importance weights.
pub(super) fn iq1_s_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let grid = iq1_grid();
    let (xs, _) = x.as_chunks::<QK_K>();
    let (ws, _) = qw.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<IQ1_S_BLOCK_BYTES>();
    for (i, ((x, qw), b)) in xs.iter().zip(ws).zip(blocks.iter_mut()).enumerate() {
        iq1_s_block(grid, x, qw, b, i)?;
    }
    Ok(())
}

/// IQ1_M, weighted: the row's super-blocks with the matching importance weights.
pub(super) fn iq1_m_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let grid = iq1_grid();
    let (xs, _) = x.as_chunks::<QK_K>();
    let (ws, _) = qw.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<IQ1_M_BLOCK_BYTES>();
    for (i, ((x, qw), b)) in xs.iter().zip(ws).zip(blocks.iter_mut()).enumerate() {
        iq1_m_block(grid, x, Weighting::importance(x, qw), b, i)?;
    }
    Ok(())
}

/// IQ1_M without importance weights: each value weighted by its square.
pub(super) fn quant_iq1_m(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let grid = iq1_grid();
    let (xs, _) = src.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<IQ1_M_BLOCK_BYTES>();
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        iq1_m_block(grid, x, Weighting::Squares, b, i)?;
    }
    Ok(())
}
