//! Quantization to the 3-bit grid types IQ3_XXS and IQ3_S, byte for byte as ggml's
//! `quantize_iq3_xxs` and `quantize_iq3_s` do it: with importance weights, or without
//! them, in which case each value is weighed by its own square.
//!
//! Both types cut a 256-value super-block into eight sub-blocks of 32 values, and a
//! sub-block into eight groups of four magnitudes whose signs are stored apart. A group
//! is coded as one point of a grid of 4-vectors whose coordinates take eight levels
//! (three bits each; level `l` stands for the odd value `2l + 1`): 256 points for
//! IQ3_XXS, 512 for IQ3_S. For each sub-block a search tries candidate scales around
//! `max / 15`; each candidate rounds every group to levels, and a group that lands off
//! the grid takes the best of a short list of grid points near it ([`Iq3Grid`]). The
//! candidate with the best weighted least-squares fit wins, groups it left off the grid
//! are placed again under the fitted scale, and the scale is fitted once more. The
//! sub-block scales are finally stored as 4-bit odd multiples of the super-block scale.
//!
//! The two types differ in details that show in ggml's output and are kept here:
//! - IQ3_XXS stores seven sign bits per eight values, the eighth implied by an even
//!   number of negatives: a group of eight with an odd number of negatives has the sign
//!   of its least important value flipped before the search;
//! - IQ3_XXS tries 31 candidate scales and places again only the groups that were off
//!   the grid; IQ3_S tries 19 and places every group again;
//! - IQ3_XXS treats a sub-block whose largest magnitude is below 1e-8 as zero, IQ3_S
//!   only an exact zero;
//! - IQ3_S stores the grid indices and sign bytes of its non-zero sub-blocks one after
//!   the other: an all-zero sub-block takes no room there, so that later sub-blocks' codes
//!   sit one place early (their high index bits and scales stay in their own places).
//!   This is what ggml writes, and so what decoders of its files read.
//!
//! Arithmetic is `f32` in ggml's order of operations, rounding through ggml's
//! `nearest_int`, with its strict comparisons, so that ties resolve as they do there.

use std::sync::LazyLock;

use super::BlockOverflow;
use super::f16_bits;
use super::grid::{IQ3S_GRID, IQ3XXS_GRID};
use super::kquants::nearest_int;

const QK_K: usize = 256;
/// Values per sub-block, the unit with its own scale.
const SUB_BLOCK: usize = 32;
const SUB_BLOCKS: usize = QK_K / SUB_BLOCK;
/// Grid points per sub-block: one per four values.
const GROUPS: usize = SUB_BLOCK / 4;
/// Sign groups per sub-block: one sign byte per eight values.
const SIGN_GROUPS: usize = SUB_BLOCK / 8;
/// Levels per coordinate: three bits.
const LEVELS: usize = 8;
/// Codes of four levels, the first coordinate in the lowest three bits.
const CODES: usize = LEVELS * LEVELS * LEVELS * LEVELS;
/// The value of the top level, `2 * 7 + 1`: the first candidate scale maps a
/// sub-block's largest magnitude to it.
const TOP_VALUE: f32 = 15.0;
/// The candidate scales are `(15 + STEP * s) / max` for `s` in `-steps..=steps`.
const STEP: f32 = 0.2;
/// The super-block scale is the largest sub-block scale over this, the largest odd
/// multiple a 4-bit sub-block scale code (`2l + 1`, `l` up to 15) reaches.
const TOP_SCALE_CODE: f32 = 31.0;
/// IQ3_XXS sub-blocks whose largest magnitude is below this count as zero.
const XXS_ZERO_BELOW: f32 = 1e-8;
/// ggml stores the super-block scales this much larger than computed, an adjustment
/// it found to lower the error on real weights.
const XXS_SCALE_FUDGE: f32 = 1.0125;
const S_SCALE_FUDGE: f32 = 1.033;

/// Block sizes and field offsets.
const XXS_BLOCK_BYTES: usize = 98;
const XXS_WORDS_AT: usize = 66;
const S_BLOCK_BYTES: usize = 110;
const S_HIGH_BITS_AT: usize = 66;
const S_SIGNS_AT: usize = 74;
const S_SCALES_AT: usize = 106;

/// Where a code of four levels lies with respect to a grid.
#[derive(Clone, Copy, Debug)]
enum Code {
    /// The code is this grid point.
    OnGrid(u16),
    /// The code is off the grid; the points to choose from are
    /// `Iq3Grid::neighbours[start..end]`, nearest first.
    OffGrid { start: u32, end: u32 },
}

/// A grid with the lookups the search needs.
///
/// The neighbour list of a code off the grid holds every grid point at the smallest
/// distinct distances from it (the two smallest for IQ3_XXS, the three smallest for
/// IQ3_S), by squared distance and then by index: the search takes the first point of
/// least weighted error in that order, as ggml does.
struct Iq3Grid {
    /// Each point's four values `2l + 1`, as the search multiplies them.
    points: Vec<[f32; 4]>,
    /// Where each code lies, indexed by code.
    codes: Vec<Code>,
    /// The neighbour lists of the codes off the grid, one after the other.
    neighbours: Vec<u16>,
}

static XXS_GRID: LazyLock<Iq3Grid> = LazyLock::new(|| Iq3Grid::new(&IQ3XXS_GRID, 2));
static S_GRID: LazyLock<Iq3Grid> = LazyLock::new(|| Iq3Grid::new(&IQ3S_GRID, 3));

/// The code of four levels.
fn code_of(levels: [usize; 4]) -> usize {
    levels
        .iter()
        .enumerate()
        .fold(0, |code, (i, &l)| code | (l << (3 * i)))
}

/// The four levels of a code.
fn levels_of(code: usize) -> [usize; 4] {
    std::array::from_fn(|i| (code >> (3 * i)) & (LEVELS - 1))
}

impl Iq3Grid {
    /// Builds the lookups of a grid given as its dequantization values, which take
    /// eight distinct values per coordinate in the order of their levels; the nearest
    /// `distances` distinct distances make the neighbour lists.
    fn new(grid: &[[f32; 4]], distances: usize) -> Self {
        let mut values: Vec<f32> = grid.iter().flatten().copied().collect();
        values.sort_by(f32::total_cmp);
        values.dedup();
        assert_eq!(
            values.len(),
            LEVELS,
            "a grid has eight levels per coordinate"
        );
        let level = |v: &f32| values.iter().position(|u| u == v).unwrap_or(0);
        let levels: Vec<[usize; 4]> = grid.iter().map(|p| p.each_ref().map(level)).collect();
        let points = levels
            .iter()
            .map(|l| l.map(|l| (2 * l + 1) as f32))
            .collect();
        let mut on_grid = vec![None; CODES];
        for (index, l) in levels.iter().enumerate() {
            on_grid[code_of(*l)] = Some(index as u16);
        }
        let mut codes = Vec::with_capacity(CODES);
        let mut neighbours = Vec::new();
        let mut by_distance: Vec<(usize, u16)> = Vec::with_capacity(levels.len());
        for (code, place) in on_grid.iter().enumerate() {
            if let Some(index) = *place {
                codes.push(Code::OnGrid(index));
                continue;
            }
            let target = levels_of(code);
            by_distance.clear();
            by_distance.extend(levels.iter().enumerate().map(|(index, point)| {
                let d2 = point
                    .iter()
                    .zip(&target)
                    .map(|(&a, &b)| a.abs_diff(b).pow(2))
                    .sum();
                (d2, index as u16)
            }));
            // Distances and indices are unique pairs: the order is total.
            by_distance.sort_unstable();
            let start = neighbours.len() as u32;
            let mut kept = 0;
            let mut last = None;
            for &(d2, index) in &by_distance {
                if last != Some(d2) {
                    if kept == distances {
                        break;
                    }
                    kept += 1;
                    last = Some(d2);
                }
                neighbours.push(index);
            }
            let end = neighbours.len() as u32;
            codes.push(Code::OffGrid { start, end });
        }
        Self {
            points,
            codes,
            neighbours,
        }
    }

    /// The grid point for four magnitudes `x` under `scale` (`inverse` is `1 / scale`),
    /// and whether rounding put them on the grid; off it, the neighbour of least error
    /// weighted by `w`.
    #[inline(always)]
    fn place(&self, x: &[f32], w: &[f32], inverse: f32, scale: f32) -> (u16, bool) {
        let levels = std::array::from_fn(|i| {
            nearest_int(0.5 * (inverse * x[i] - 1.0)).clamp(0, LEVELS as i32 - 1) as usize
        });
        match self.codes[code_of(levels)] {
            Code::OnGrid(index) => (index, true),
            Code::OffGrid { start, end } => {
                let candidates = &self.neighbours[start as usize..end as usize];
                (self.best_neighbour(candidates, x, w, scale), false)
            }
        }
    }

    /// The first candidate of least weighted squared error under `scale`.
    ///
    /// ggml aborts when no candidate's error is below `f32::MAX` (weights so large that
    /// every error is infinite or NaN); the first candidate is taken then, and such a
    /// block's scale does not fit in f16 anyway for unweighted input.
    fn best_neighbour(&self, candidates: &[u16], x: &[f32], w: &[f32], scale: f32) -> u16 {
        let mut best_error = f32::MAX;
        let mut best = candidates[0];
        for &index in candidates {
            let point = &self.points[usize::from(index)];
            let mut error = 0.0f32;
            for i in 0..4 {
                let diff = scale * point[i] - x[i];
                error += w[i] * diff * diff;
            }
            if error < best_error {
                best_error = error;
                best = index;
            }
        }
        best
    }

    /// The weighted sums `Σ w x q` and `Σ w q²` of a sub-block coded as `indices`.
    fn sums(
        &self,
        indices: &[u16; GROUPS],
        x: &[f32; SUB_BLOCK],
        w: &[f32; SUB_BLOCK],
    ) -> (f32, f32) {
        let (mut sumqx, mut sumq2) = (0.0f32, 0.0f32);
        for (i, (&x, &w)) in x.iter().zip(w).enumerate() {
            let q = self.points[usize::from(indices[i / 4])][i % 4];
            sumqx += w * x * q;
            sumq2 += w * q * q;
        }
        (sumqx, sumq2)
    }
}

/// What differs between the two types' sub-block searches.
struct Search {
    grid: &'static LazyLock<Iq3Grid>,
    /// Candidate scales are tried for steps `-steps..=steps`.
    steps: i32,
    /// IQ3_XXS keeps the groups a candidate put on the grid and places again only the
    /// others, counting every group as on the grid until a candidate is taken; IQ3_S
    /// places every group again, counting them all off the grid until then.
    keeps_groups_on_grid: bool,
}

const XXS_SEARCH: Search = Search {
    grid: &XXS_GRID,
    steps: 15,
    keeps_groups_on_grid: true,
};

const S_SEARCH: Search = Search {
    grid: &S_GRID,
    steps: 9,
    keeps_groups_on_grid: false,
};

/// A sub-block's magnitudes and the weights of the search: `weight` for the fit, its
/// square root for choosing among neighbours.
struct SubBlock {
    magnitudes: [f32; SUB_BLOCK],
    weight: [f32; SUB_BLOCK],
    neighbour_weight: [f32; SUB_BLOCK],
}

impl SubBlock {
    /// The weights of sub-block `x`: `importance * sqrt(sigma2 + x²)` with importance
    /// weights, `x²` without. The magnitudes are left for the caller to fill.
    fn new(x: &[f32], importance: Option<&[f32]>, sigma2: f32) -> Self {
        let weight = std::array::from_fn(|i| match importance {
            Some(qw) => qw[i] * (sigma2 + x[i] * x[i]).sqrt(),
            None => x[i] * x[i],
        });
        Self {
            magnitudes: [0.0; SUB_BLOCK],
            weight,
            neighbour_weight: weight.map(f32::sqrt),
        }
    }

    /// The largest magnitude, as ggml's `MAX` finds it from the first.
    fn max(&self) -> f32 {
        self.magnitudes[1..]
            .iter()
            .fold(self.magnitudes[0], |max, &v| if max > v { max } else { v })
    }

    /// The sub-block scale and grid points, for a sub-block whose largest magnitude
    /// `max` is not (near) zero.
    fn search(&self, search: &Search, max: f32) -> (f32, [u16; GROUPS]) {
        let grid: &Iq3Grid = search.grid;
        let x = &self.magnitudes;
        let group = |values: &[f32; SUB_BLOCK], k: usize| -> [f32; 4] {
            std::array::from_fn(|i| values[4 * k + i])
        };
        let mut best = 0.0f32;
        let mut scale = max / TOP_VALUE;
        // Until a candidate is taken, every group is grid point 0 (all levels 0).
        let mut indices = [0u16; GROUPS];
        let mut on_grid = [search.keeps_groups_on_grid; GROUPS];
        let mut trial = [0u16; GROUPS];
        let mut trial_on_grid = [false; GROUPS];
        for step in -search.steps..=search.steps {
            let inverse = (TOP_VALUE + step as f32 * STEP) / max;
            let this_scale = 1.0 / inverse;
            for k in 0..GROUPS {
                (trial[k], trial_on_grid[k]) = grid.place(
                    &group(x, k),
                    &group(&self.neighbour_weight, k),
                    inverse,
                    this_scale,
                );
            }
            let (sumqx, sumq2) = grid.sums(&trial, x, &self.weight);
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                indices = trial;
                on_grid = trial_on_grid;
            }
        }
        if on_grid.contains(&false) && scale > 0.0 {
            let inverse = 1.0 / scale;
            for k in 0..GROUPS {
                if search.keeps_groups_on_grid && on_grid[k] {
                    continue;
                }
                indices[k] = grid
                    .place(
                        &group(x, k),
                        &group(&self.neighbour_weight, k),
                        inverse,
                        scale,
                    )
                    .0;
            }
            let (sumqx, sumq2) = grid.sums(&indices, x, &self.weight);
            if sumq2 > 0.0 {
                scale = sumqx / sumq2;
            }
        }
        (scale, indices)
    }
}

/// `2 * sum(x²) / 256`, the spread added to each squared value under importance
/// weights.
fn sigma2(x: &[f32; QK_K]) -> f32 {
    let mut sum = 0.0f32;
    for v in x {
        sum += v * v;
    }
    2.0 * sum / QK_K as f32
}

/// ggml's `MAX(a, b)`: `a` unless `b` is larger (a NaN `b` replaces `a`).
fn larger(a: f32, b: f32) -> f32 {
    if a > b { a } else { b }
}

/// The 4-bit code of a sub-block scale under the super-block scale `1 / inverse`.
fn scale_code(inverse: f32, scale: f32) -> u8 {
    nearest_int(0.5 * (inverse * scale - 1.0)).clamp(0, 15) as u8
}

/// The stored f16 super-block scale, or the block's overflow.
fn super_scale(d: f32, block: usize) -> Result<[u8; 2], BlockOverflow> {
    f16_bits(d)
        .map(u16::to_le_bytes)
        .ok_or(BlockOverflow { block, value: d })
}

/// The magnitudes of eight IQ3_XXS values and their seven stored sign bits. Only an
/// even number of negatives can be stored (the eighth sign is implied): with an odd
/// number, the value that matters least (least `weight * x²`, the first on ties) keeps
/// the wrong sign, and its magnitude is made negative so that the search sees it so.
fn even_signs(x: &[f32], weight: &[f32], magnitudes: &mut [f32]) -> u8 {
    let mut signs = 0u8;
    for (i, (&v, m)) in x.iter().zip(magnitudes.iter_mut()).enumerate() {
        if v >= 0.0 {
            *m = v;
        } else {
            *m = -v;
            signs |= 1 << i;
        }
    }
    if signs.count_ones() % 2 == 1 {
        let importance = |i: usize| weight[i] * x[i] * x[i];
        let mut least = 0;
        for i in 1..x.len() {
            if importance(i) < importance(least) {
                least = i;
            }
        }
        magnitudes[least] = -magnitudes[least];
        signs ^= 1 << least;
    }
    signs & 0x7f
}

fn iq3_xxs_block(
    x: &[f32; QK_K],
    importance: Option<&[f32; QK_K]>,
    out: &mut [u8; XXS_BLOCK_BYTES],
    block: usize,
) -> Result<(), BlockOverflow> {
    out.fill(0);
    let sigma2 = sigma2(x);
    let mut scales = [0f32; SUB_BLOCKS];
    let mut words = [0u32; SUB_BLOCKS];
    let mut max_scale = 0.0f32;
    for ib in 0..SUB_BLOCKS {
        let xb = &x[SUB_BLOCK * ib..][..SUB_BLOCK];
        let qw = importance.map(|qw| &qw[SUB_BLOCK * ib..][..SUB_BLOCK]);
        let mut sub = SubBlock::new(xb, qw, sigma2);
        let mut signs = [0u8; SIGN_GROUPS];
        for (k, s) in signs.iter_mut().enumerate() {
            let at = 8 * k..8 * k + 8;
            *s = even_signs(
                &xb[at.clone()],
                &sub.weight[at.clone()],
                &mut sub.magnitudes[at],
            );
        }
        let max = sub.max();
        if max < XXS_ZERO_BELOW {
            continue;
        }
        let (mut scale, indices) = sub.search(&XXS_SEARCH, max);
        if scale < 0.0 {
            scale = -scale;
            for s in &mut signs {
                *s = !*s & 0x7f;
            }
        }
        for (q, &index) in out[2 + GROUPS * ib..][..GROUPS].iter_mut().zip(&indices) {
            *q = index as u8;
        }
        words[ib] = signs
            .iter()
            .enumerate()
            .fold(0, |word, (k, &s)| word | (u32::from(s) << (7 * k)));
        scales[ib] = scale;
        max_scale = larger(max_scale, scale);
    }
    if max_scale == 0.0 {
        out.fill(0);
        return Ok(());
    }
    let d = max_scale / TOP_SCALE_CODE;
    out[..2].copy_from_slice(&super_scale(d * XXS_SCALE_FUDGE, block)?);
    let inverse = 1.0 / d;
    for (ib, (word, &scale)) in words.iter().zip(&scales).enumerate() {
        let word = word | (u32::from(scale_code(inverse, scale)) << 28);
        out[XXS_WORDS_AT + 4 * ib..][..4].copy_from_slice(&word.to_le_bytes());
    }
    Ok(())
}

fn iq3_s_block(
    x: &[f32; QK_K],
    importance: Option<&[f32; QK_K]>,
    out: &mut [u8; S_BLOCK_BYTES],
    block: usize,
) -> Result<(), BlockOverflow> {
    out.fill(0);
    let sigma2 = sigma2(x);
    let mut scales = [0f32; SUB_BLOCKS];
    let mut max_scale = 0.0f32;
    // Where the next non-zero sub-block's indices and sign bytes go.
    let mut packed = 0;
    for ib in 0..SUB_BLOCKS {
        let xb = &x[SUB_BLOCK * ib..][..SUB_BLOCK];
        let qw = importance.map(|qw| &qw[SUB_BLOCK * ib..][..SUB_BLOCK]);
        let mut sub = SubBlock::new(xb, qw, sigma2);
        let mut signs = [0u8; SIGN_GROUPS];
        for (i, &v) in xb.iter().enumerate() {
            if v >= 0.0 {
                sub.magnitudes[i] = v;
            } else {
                sub.magnitudes[i] = -v;
                signs[i / 8] |= 1 << (i % 8);
            }
        }
        let max = sub.max();
        if max == 0.0 {
            continue;
        }
        let (mut scale, indices) = sub.search(&S_SEARCH, max);
        if scale < 0.0 {
            scale = -scale;
            for s in &mut signs {
                *s = !*s;
            }
        }
        for (k, &index) in indices.iter().enumerate() {
            out[2 + GROUPS * packed + k] = index as u8;
            out[S_HIGH_BITS_AT + ib] |= ((index >> 8) as u8) << k;
        }
        out[S_SIGNS_AT + SIGN_GROUPS * packed..][..SIGN_GROUPS].copy_from_slice(&signs);
        packed += 1;
        scales[ib] = scale;
        max_scale = larger(max_scale, scale);
    }
    if max_scale == 0.0 {
        return Ok(());
    }
    let d = max_scale / TOP_SCALE_CODE;
    out[..2].copy_from_slice(&super_scale(d * S_SCALE_FUDGE, block)?);
    let inverse = 1.0 / d;
    for (byte, pair) in out[S_SCALES_AT..].iter_mut().zip(scales.chunks_exact(2)) {
        *byte = scale_code(inverse, pair[0]) | (scale_code(inverse, pair[1]) << 4);
    }
    Ok(())
}

/// Quantizes one super-block with or without its importance weights into a block of
/// `B` bytes; the last argument is the block's index, for the overflow error.
type BlockQuantizer<const B: usize> =
    fn(&[f32; QK_K], Option<&[f32; QK_K]>, &mut [u8; B], usize) -> Result<(), BlockOverflow>;

/// Runs a super-block quantizer over whole blocks, with a row's importance weights
/// (one per value of `x`) or without.
fn run<const B: usize>(
    x: &[f32],
    importance: Option<&[f32]>,
    dst: &mut [u8],
    block_fn: BlockQuantizer<B>,
) -> Result<(), BlockOverflow> {
    let (xs, _) = x.as_chunks::<QK_K>();
    let (blocks, _) = dst.as_chunks_mut::<B>();
    let weights = importance.map(|qw| qw.as_chunks::<QK_K>().0);
    for (i, (x, b)) in xs.iter().zip(blocks.iter_mut()).enumerate() {
        block_fn(x, weights.map(|w| &w[i]), b, i)?;
    }
    Ok(())
}

/// IQ3_XXS without importance weights (ggml's `quantize_row_iq3_xxs_ref`).
pub(super) fn quant_iq3_xxs(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    run(src, None, dst, iq3_xxs_block)
}

/// IQ3_S without importance weights (ggml's `quantize_row_iq3_s_ref`).
pub(super) fn quant_iq3_s(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    run(src, None, dst, iq3_s_block)
}

/// One IQ3_XXS row with importance weights (ggml's `quantize_iq3_xxs`).
pub(super) fn iq3_xxs_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    run(x, Some(qw), dst, iq3_xxs_block)
}

/// One IQ3_S row with importance weights (ggml's `quantize_iq3_s`).
pub(super) fn iq3_s_row(x: &[f32], qw: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    run(x, Some(qw), dst, iq3_s_block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_levels_follow_the_order_of_the_grid_values() {
        // The first codes of ggml's level tables (`kgrid_256`, `kgrid_512`): the levels
        // read back from the dequantization grids must give the same points.
        let on_grid = |grid: &Iq3Grid, n: usize| -> Vec<usize> {
            let mut codes = vec![0; n];
            for (code, place) in grid.codes.iter().enumerate() {
                if let Code::OnGrid(index) = *place {
                    codes[usize::from(index)] = code;
                }
            }
            codes
        };
        let xxs = on_grid(&XXS_GRID, 256);
        assert_eq!(xxs[..8], [0, 2, 4, 9, 11, 15, 16, 18]);
        assert_eq!(xxs[255], 3992);
        let s = on_grid(&S_GRID, 512);
        assert_eq!(s[..8], [0, 1, 2, 5, 7, 8, 9, 10]);
        assert_eq!(s[511], 4032);
        for grid in [&*XXS_GRID, &*S_GRID] {
            for code in &grid.codes {
                if let Code::OffGrid { start, end } = *code {
                    assert!(start < end);
                }
            }
        }
    }
}
