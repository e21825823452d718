//! The grid IQ types: IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S, whose codes
//! index tables of lattice points (the grids) under a block scale, with separate sign
//! bits.
//!
//! The grids are constants of the format. They are embedded as data, not generated: the
//! files in `grids/` hold ggml's tables (`ggml-common.h`) one byte per coordinate, in the
//! order ggml indexes them, as `cargo xtask iq-grids` writes them from that header. The
//! IQ2 grids hold the magnitudes 8, 25 and 43; IQ3_XXS 4..62 and IQ3_S 1..15 (odd);
//! IQ1_S and IQ1_M share one grid of -1, 0 and 1 (signed bytes). The 128-entry sign table
//! of IQ2_XXS, IQ2_XS and IQ3_XXS is computed: seven stored sign bits and an eighth that
//! makes the number of negative signs even.
//!
//! Every index field is exactly as wide as its grid is long (8 bits for 256 points, 9
//! for 512, 10 for 1024, 11 for 2048), so every bit pattern of a whole block names a
//! grid point and decodes; the only malformed input is a partial block, refused by the
//! range checks before a kernel runs.
//!
//! Layouts (byte offsets in a 256-element block; d is an f16 super-block scale):
//! - IQ2_XXS (66): d @0, then per 32 elements 8 bytes: four grid indices and a u32 with
//!   four 7-bit sign indices and a 4-bit scale in its top bits.
//! - IQ2_XS (74): d @0, u16 qs[32] @2 (9-bit index, 7-bit sign index), scale nibbles[8]
//!   @66, one per 16 elements.
//! - IQ2_S (82): d @0, low index bytes[32] @2, sign bytes[32] @34, high index bits
//!   (2 per group) [8] @66, scale nibbles[8] @74.
//! - IQ3_XXS (98): d @0, grid indices[64] @2 (4 elements each), u32 sign-and-scale
//!   words[8] @66.
//! - IQ3_S (110): d @0, low index bytes[64] @2, high index bits[8] @66, sign bytes[32]
//!   @74, scale nibbles[4] @106, one per 32 elements.
//! - IQ1_S (50): d @0, low index bytes[32] @2, u16 words[8] @34 (3 high index bits per
//!   group, a 3-bit scale, a delta sign bit).
//! - IQ1_M (56): low index bytes[32] @0, nibbles[16] @32 (3 high index bits and a delta
//!   sign bit per group), u16 words[4] @48 holding sixteen 3-bit scales and, in their top
//!   nibbles, the f16 super-block scale.
//!
//! Arithmetic follows gguf-py's `dequantize_blocks` operation for operation in `f32`.
//!
//! Every grid type also quantizes, bit for bit as ggml: IQ3_XXS and IQ3_S in
//! `iq3_quant.rs`, which builds its grid lookups from the IQ3 grids here (each of their
//! coordinates takes eight values, one per 3-bit level, and the quantizer searches the
//! levels); IQ2_XXS, IQ2_XS and IQ2_S in `iq2_quant.rs` and IQ1_S and IQ1_M in
//! `iq1_quant.rs`, searching their grids through the index of `grid_index.rs`. IQ1_S,
//! IQ2_XXS and IQ2_XS quantize only with importance weights, as ggml requires (it has no
//! unweighted quantizer for them); the others with or without.

use super::f16_at;

/// A grid as `f32` coordinates, converted from the embedded bytes at compile time.
const fn grid<const POINTS: usize, const WIDTH: usize>(
    bytes: &[u8],
    signed: bool,
) -> [[f32; WIDTH]; POINTS] {
    assert!(
        bytes.len() == POINTS * WIDTH,
        "grid file has the wrong size"
    );
    let mut out = [[0f32; WIDTH]; POINTS];
    let mut point = 0;
    while point < POINTS {
        let mut j = 0;
        while j < WIDTH {
            let byte = bytes[point * WIDTH + j];
            out[point][j] = if signed {
                byte as i8 as f32
            } else {
                byte as f32
            };
            j += 1;
        }
        point += 1;
    }
    out
}

static IQ2XXS_GRID: [[f32; 8]; 256] = grid(include_bytes!("grids/iq2xxs_grid.bin"), false);
static IQ2XS_GRID: [[f32; 8]; 512] = grid(include_bytes!("grids/iq2xs_grid.bin"), false);
static IQ2S_GRID: [[f32; 8]; 1024] = grid(include_bytes!("grids/iq2s_grid.bin"), false);
/// The IQ3 grids, also read by the IQ3 quantizers (`iq3_quant`).
pub(super) static IQ3XXS_GRID: [[f32; 4]; 256] =
    grid(include_bytes!("grids/iq3xxs_grid.bin"), false);
pub(super) static IQ3S_GRID: [[f32; 4]; 512] = grid(include_bytes!("grids/iq3s_grid.bin"), false);
static IQ1S_GRID: [[f32; 8]; 2048] = grid(include_bytes!("grids/iq1s_grid.bin"), true);

/// Sign bytes for a 7-bit sign index: the index's bits, and bit 7 set when the index has
/// an odd number of set bits, so that every byte has an even number of negative signs.
const KSIGNS: [u8; 128] = {
    let mut table = [0u8; 128];
    let mut i = 0;
    while i < 128 {
        let parity = (i as u8).count_ones() as u8 & 1;
        table[i] = i as u8 | (parity << 7);
        i += 1;
    }
    table
};

/// The IQ1 delta: grid points are shifted by +-1/8 before scaling.
const IQ1_DELTA: f32 = 0.125;

/// For each sign byte, +1.0 or -1.0 per bit (low bit first): multiplying by these (not
/// negating), as gguf-py does, keeps even a NaN's bits the same, and a table lookup
/// lets the compiler vectorize a group's eight products.
static SIGNS: [[f32; 8]; 256] = {
    let mut table = [[1f32; 8]; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut bit = 0;
        while bit < 8 {
            if (byte >> bit) & 1 == 1 {
                table[byte][bit] = -1.0;
            }
            bit += 1;
        }
        byte += 1;
    }
    table
};

#[inline(always)]
fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

#[inline(always)]
fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Scale nibble `k` of a run of packed nibbles (low nibble first).
#[inline(always)]
fn nibble(bytes: &[u8], k: usize) -> u8 {
    (bytes[k / 2] >> (4 * (k % 2))) & 0x0f
}

/// Writes eight values `db * grid * sign` of one group.
#[inline(always)]
fn group8(out: &mut [f32], db: f32, point: &[f32; 8], signs: u8) {
    let signs = &SIGNS[usize::from(signs)];
    for ((y, &g), &s) in out.iter_mut().zip(point).zip(signs) {
        *y = db * g * s;
    }
}

/// Two 4-coordinate grid points side by side: one group of eight values.
#[inline(always)]
fn pair(first: &[f32; 4], second: &[f32; 4]) -> [f32; 8] {
    [
        first[0], first[1], first[2], first[3], second[0], second[1], second[2], second[3],
    ]
}

#[inline(always)]
pub(super) fn dequant_iq2_xxs(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<66>();
    let (outs, _) = dst.as_chunks_mut::<256>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        for (ib, out) in y.chunks_exact_mut(32).enumerate() {
            let q = &b[2 + 8 * ib..2 + 8 * ib + 8];
            let aux = u32_at(q, 4);
            let db = d * (0.5 + (aux >> 28) as f32) * 0.25;
            for (l, group) in out.chunks_exact_mut(8).enumerate() {
                let signs = KSIGNS[((aux >> (7 * l)) & 127) as usize];
                group8(group, db, &IQ2XXS_GRID[usize::from(q[l])], signs);
            }
        }
    }
}

#[inline(always)]
pub(super) fn dequant_iq2_xs(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<74>();
    let (outs, _) = dst.as_chunks_mut::<256>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        let scales = &b[66..74];
        for (g, group) in y.chunks_exact_mut(8).enumerate() {
            let q = u16_at(b, 2 + 2 * g);
            let db = d * (0.5 + f32::from(nibble(scales, g / 2))) * 0.25;
            let signs = KSIGNS[usize::from(q >> 9)];
            group8(group, db, &IQ2XS_GRID[usize::from(q & 511)], signs);
        }
    }
}

#[inline(always)]
pub(super) fn dequant_iq2_s(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<82>();
    let (outs, _) = dst.as_chunks_mut::<256>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        let (qs, signs, qh, scales) = (&b[2..34], &b[34..66], &b[66..74], &b[74..82]);
        for (g, group) in y.chunks_exact_mut(8).enumerate() {
            let high = usize::from((qh[g / 4] >> (2 * (g % 4))) & 3);
            let index = usize::from(qs[g]) | (high << 8);
            let db = d * (0.5 + f32::from(nibble(scales, g / 2))) * 0.25;
            group8(group, db, &IQ2S_GRID[index], signs[g]);
        }
    }
}

#[inline(always)]
pub(super) fn dequant_iq3_xxs(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<98>();
    let (outs, _) = dst.as_chunks_mut::<256>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        let qs = &b[2..66];
        for (ib, out) in y.chunks_exact_mut(32).enumerate() {
            let aux = u32_at(b, 66 + 4 * ib);
            let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
            for (l, group) in out.chunks_exact_mut(8).enumerate() {
                let signs = KSIGNS[((aux >> (7 * l)) & 127) as usize];
                let first = &IQ3XXS_GRID[usize::from(qs[8 * ib + 2 * l])];
                let second = &IQ3XXS_GRID[usize::from(qs[8 * ib + 2 * l + 1])];
                group8(group, db, &pair(first, second), signs);
            }
        }
    }
}

#[inline(always)]
pub(super) fn dequant_iq3_s(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<110>();
    let (outs, _) = dst.as_chunks_mut::<256>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        let (qs, qh, signs, scales) = (&b[2..66], &b[66..74], &b[74..106], &b[106..110]);
        for (ib, out) in y.chunks_exact_mut(32).enumerate() {
            let db = d * f32::from(1 + 2 * nibble(scales, ib));
            for (l, group) in out.chunks_exact_mut(8).enumerate() {
                let s = signs[4 * ib + l];
                let k = 8 * ib + 2 * l;
                let index =
                    |k: usize| usize::from(qs[k]) | (usize::from((qh[k / 8] >> (k % 8)) & 1) << 8);
                let first = &IQ3S_GRID[index(k)];
                let second = &IQ3S_GRID[index(k + 1)];
                group8(group, db, &pair(first, second), s);
            }
        }
    }
}

/// Writes eight values `dl * (grid + delta)` of one IQ1 group.
#[inline(always)]
fn group_iq1(out: &mut [f32], dl: f32, point: &[f32; 8], delta: f32) {
    for (y, &g) in out.iter_mut().zip(point) {
        *y = dl * (g + delta);
    }
}

#[inline(always)]
pub(super) fn dequant_iq1_s(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<50>();
    let (outs, _) = dst.as_chunks_mut::<256>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = f16_at(b, 0);
        let qs = &b[2..34];
        for (ib, out) in y.chunks_exact_mut(32).enumerate() {
            let qh = u16_at(b, 34 + 2 * ib);
            let dl = d * f32::from(2 * ((qh >> 12) & 7) + 1);
            let delta = if qh & 0x8000 == 0 {
                IQ1_DELTA
            } else {
                -IQ1_DELTA
            };
            for (l, group) in out.chunks_exact_mut(8).enumerate() {
                let index = usize::from(qs[4 * ib + l]) | (usize::from((qh >> (3 * l)) & 7) << 8);
                group_iq1(group, dl, &IQ1S_GRID[index], delta);
            }
        }
    }
}

/// The f16 super-block scale of an IQ1_M block, spread over the top nibbles of its four
/// scale words (lowest nibble in the first word).
#[inline(always)]
pub(super) fn iq1_m_scale_bits(block: &[u8]) -> u16 {
    let word = |i: usize| u16_at(block, 48 + 2 * i);
    (word(0) >> 12) | ((word(1) >> 8) & 0x00f0) | ((word(2) >> 4) & 0x0f00) | (word(3) & 0xf000)
}

/// Stores `bits` as the f16 super-block scale of an IQ1_M block, leaving the twelve
/// sub-block scale bits of each word as they were.
pub(super) fn set_iq1_m_scale_bits(block: &mut [u8], bits: u16) {
    for i in 0..4 {
        let at = 48 + 2 * i;
        let word = u16_at(block, at);
        let top = ((bits >> (4 * i)) & 0x0f) << 12;
        block[at..at + 2].copy_from_slice(&((word & 0x0fff) | top).to_le_bytes());
    }
}

#[inline(always)]
pub(super) fn dequant_iq1_m(src: &[u8], dst: &mut [f32]) {
    let (blocks, _) = src.as_chunks::<56>();
    let (outs, _) = dst.as_chunks_mut::<256>();
    for (b, y) in blocks.iter().zip(outs.iter_mut()) {
        let d = super::f16_to_f32(iq1_m_scale_bits(b));
        let (qs, qh) = (&b[0..32], &b[32..48]);
        for (g, group) in y.chunks_exact_mut(8).enumerate() {
            let scale_word = u16_at(b, 48 + 2 * (g / 8));
            let scale = (scale_word >> (3 * ((g / 2) % 4))) & 7;
            let dl = d * f32::from(2 * scale + 1);
            let bits = qh[g / 2] >> (4 * (g % 2));
            let index = usize::from(qs[g]) | (usize::from(bits & 7) << 8);
            let delta = if bits & 8 == 0 { IQ1_DELTA } else { -IQ1_DELTA };
            group_iq1(group, dl, &IQ1S_GRID[index], delta);
        }
    }
}
