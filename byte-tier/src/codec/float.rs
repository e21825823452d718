//! The plain element types: F32, F16, BF16, F64 and the integers I8..I64.

use half::slice::HalfFloatSliceExt;

use super::{BlockOverflow, f16_bits};

#[inline(always)]
pub(super) fn dequant_f32(src: &[u8], dst: &mut [f32]) {
    let (words, _) = src.as_chunks::<4>();
    for (w, y) in words.iter().zip(dst.iter_mut()) {
        *y = f32::from_le_bytes(*w);
    }
}

#[inline(always)]
pub(super) fn dequant_f16(src: &[u8], dst: &mut [f32]) {
    // Converting through a u16 buffer lets half use the F16C instructions when the CPU
    // has them; f16 to f32 is exact, so every path gives the same bits.
    let mut bits = [half::f16::ZERO; 1024];
    for (s, d) in src.chunks(2048).zip(dst.chunks_mut(1024)) {
        let (pairs, _) = s.as_chunks::<2>();
        let n = pairs.len().min(d.len());
        for (b, p) in bits.iter_mut().zip(pairs) {
            *b = half::f16::from_bits(u16::from_le_bytes(*p));
        }
        bits[..n].convert_to_f32_slice(&mut d[..n]);
    }
}

#[inline(always)]
pub(super) fn dequant_bf16(src: &[u8], dst: &mut [f32]) {
    let (pairs, _) = src.as_chunks::<2>();
    for (p, y) in pairs.iter().zip(dst.iter_mut()) {
        *y = f32::from_bits(u32::from(u16::from_le_bytes(*p)) << 16);
    }
}

#[inline(always)]
pub(super) fn dequant_f64(src: &[u8], dst: &mut [f32]) {
    let (words, _) = src.as_chunks::<8>();
    for (w, y) in words.iter().zip(dst.iter_mut()) {
        // Rounds to nearest even, as numpy's astype(float32) does.
        *y = f64::from_le_bytes(*w) as f32;
    }
}

#[inline(always)]
pub(super) fn dequant_i8(src: &[u8], dst: &mut [f32]) {
    for (b, y) in src.iter().zip(dst.iter_mut()) {
        *y = f32::from(*b as i8);
    }
}

#[inline(always)]
pub(super) fn dequant_i16(src: &[u8], dst: &mut [f32]) {
    let (pairs, _) = src.as_chunks::<2>();
    for (p, y) in pairs.iter().zip(dst.iter_mut()) {
        *y = f32::from(i16::from_le_bytes(*p));
    }
}

#[inline(always)]
pub(super) fn dequant_i32(src: &[u8], dst: &mut [f32]) {
    let (words, _) = src.as_chunks::<4>();
    for (w, y) in words.iter().zip(dst.iter_mut()) {
        *y = i32::from_le_bytes(*w) as f32;
    }
}

#[inline(always)]
pub(super) fn dequant_i64(src: &[u8], dst: &mut [f32]) {
    let (words, _) = src.as_chunks::<8>();
    for (w, y) in words.iter().zip(dst.iter_mut()) {
        *y = i64::from_le_bytes(*w) as f32;
    }
}

#[inline(always)]
pub(super) fn quant_f32(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (words, _) = dst.as_chunks_mut::<4>();
    for (x, w) in src.iter().zip(words.iter_mut()) {
        *w = x.to_le_bytes();
    }
    Ok(())
}

#[inline(always)]
pub(super) fn quant_f64(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (words, _) = dst.as_chunks_mut::<8>();
    for (x, w) in src.iter().zip(words.iter_mut()) {
        *w = f64::from(*x).to_le_bytes();
    }
    Ok(())
}

#[inline(always)]
pub(super) fn quant_f16(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (pairs, _) = dst.as_chunks_mut::<2>();
    for (i, (x, p)) in src.iter().zip(pairs.iter_mut()).enumerate() {
        // Each element is its own "block": a value beyond the f16 range is refused
        // rather than stored as infinity.
        let bits = f16_bits(*x).ok_or(BlockOverflow {
            block: i,
            value: *x,
        })?;
        *p = bits.to_le_bytes();
    }
    Ok(())
}

/// f32 to bf16 bits, rounding to nearest even (ggml's `ggml_compute_fp32_to_bf16`);
/// `None` when a finite value rounds up to infinity.
#[inline]
pub(super) fn bf16_bits(x: f32) -> Option<u16> {
    let n = x.to_bits();
    if (n & 0x7fff_ffff) > 0x7f80_0000 {
        // NaN: keep it a quiet NaN (the quantizers refuse NaN; transforms of a BF16 tensor
        // that already holds NaN keep it).
        return Some(((n >> 16) | 64) as u16);
    }
    let rounded = ((u64::from(n) + 0x7fff + u64::from((n >> 16) & 1)) >> 16) as u16;
    if x.is_finite() && (rounded & 0x7fff) == 0x7f80 {
        return None;
    }
    Some(rounded)
}

#[inline(always)]
pub(super) fn quant_bf16(src: &[f32], dst: &mut [u8]) -> Result<(), BlockOverflow> {
    let (pairs, _) = dst.as_chunks_mut::<2>();
    for (i, (x, p)) in src.iter().zip(pairs.iter_mut()).enumerate() {
        let bits = bf16_bits(*x).ok_or(BlockOverflow {
            block: i,
            value: *x,
        })?;
        *p = bits.to_le_bytes();
    }
    Ok(())
}
