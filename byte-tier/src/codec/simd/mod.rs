//! Codec kernels chosen at run time for the CPU's vector instructions.
//!
//! The crate is built for baseline x86-64 (SSE2) or aarch64 (NEON), and every kernel in
//! the parent module is plain Rust written so that the compiler vectorizes it for
//! whatever the build allows. On x86-64 this module compiles those kernels again with
//! AVX2 and FMA, and with AVX-512 (F, BW, DQ, VL) enabled, for the types where that was
//! measured to pay, and hand-writes Q8_0, Q4_0 and Q4_K dequantization, Q8_0
//! quantization and the scale searches of Q2_K, Q4_K, Q5_K and Q6_K quantization with
//! intrinsics (AVX2, used at the AVX-512 level too). On aarch64 the [`SimdLevel::Neon`] level hand-writes the
//! same four kernels with NEON intrinsics (NEON is part of aarch64's baseline, so the
//! level needs no CPU check). Every other type keeps its scalar kernel at every level.
//! [`simd_level`] picks the level once per process, from the CPU's features or the
//! `HOTPATCH_SIMD` environment variable (`scalar`, `neon`, `avx2`, `avx512`).
//!
//! Every level gives the same bits as the scalar path: Rust never fuses a multiply and an
//! add on its own (enabling FMA only makes `mul_add` a single instruction, and the kernels
//! do not call it), and the intrinsic kernels do the scalar code's `f32` operations in
//! the same order, one rounding each. The tests check this on every type at every level
//! the machine has; `cargo xtask cross-check` runs them for aarch64 under qemu.
//!
//! This is the only module of the crate besides the file mapping that holds `unsafe`:
//! calling a `#[target_feature]` function is unsafe because it must only run on a CPU
//! that has the features, and the intrinsic kernels load and store through pointers.

#![allow(unsafe_code)]

#[cfg(target_arch = "x86_64")]
mod intrinsics;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod x86;

use std::sync::OnceLock;

use super::{DequantKernel, QuantKernel};
use crate::error::{Error, Result};
use crate::types::GgmlType;

/// The environment variable that forces a level: `scalar`, `neon`, `avx2` or `avx512`.
pub const SIMD_ENV: &str = "HOTPATCH_SIMD";

/// A set of vector instructions the codec kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum SimdLevel {
    /// The scalar kernels, as the baseline build compiles them (SSE2 on x86-64, NEON on
    /// aarch64).
    Scalar,
    /// aarch64 with NEON (every aarch64 CPU): hand-written NEON kernels.
    Neon,
    /// x86-64 with AVX2 and FMA.
    Avx2,
    /// x86-64 with AVX-512 F, BW, DQ and VL (and AVX2, FMA).
    Avx512,
}

impl SimdLevel {
    /// Every level, lowest first.
    pub const ALL: &'static [SimdLevel] = &[
        SimdLevel::Scalar,
        SimdLevel::Neon,
        SimdLevel::Avx2,
        SimdLevel::Avx512,
    ];

    /// The level's name, as `HOTPATCH_SIMD` spells it.
    pub const fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::Neon => "neon",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// The level of this name, or `None`.
    pub fn from_name(name: &str) -> Option<SimdLevel> {
        SimdLevel::ALL.iter().copied().find(|l| l.name() == name)
    }

    /// Whether this CPU runs the level's instructions.
    pub fn is_supported(self) -> bool {
        match self {
            SimdLevel::Scalar => true,
            // NEON is part of aarch64's baseline: the build already assumes it.
            SimdLevel::Neon => cfg!(target_arch = "aarch64"),
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => {
                SimdLevel::Avx2.is_supported()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            SimdLevel::Avx2 | SimdLevel::Avx512 => false,
        }
    }

    /// The highest level this CPU supports at or below `self` (the levels of another
    /// architecture lie below or above this one's, and step down to `Scalar` or to this
    /// architecture's highest).
    pub fn capped(self) -> SimdLevel {
        SimdLevel::ALL
            .iter()
            .rev()
            .copied()
            .find(|l| *l <= self && l.is_supported())
            .unwrap_or(SimdLevel::Scalar)
    }

    /// The highest level this CPU supports.
    pub fn detect() -> SimdLevel {
        SimdLevel::ALL
            .iter()
            .rev()
            .copied()
            .find(|l| l.is_supported())
            .unwrap_or(SimdLevel::Scalar)
    }

    /// The levels this CPU supports, lowest first.
    pub fn supported() -> Vec<SimdLevel> {
        SimdLevel::ALL
            .iter()
            .copied()
            .filter(|l| l.is_supported())
            .collect()
    }
}

impl std::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The level `HOTPATCH_SIMD` asks for: `None` when it is unset or empty, an error naming
/// the value when it is not a level's name.
pub fn requested_simd_level() -> Result<Option<SimdLevel>> {
    let Some(value) = std::env::var_os(SIMD_ENV) else {
        return Ok(None);
    };
    let text = value.to_string_lossy();
    if text.is_empty() {
        return Ok(None);
    }
    SimdLevel::from_name(&text)
        .map(Some)
        .ok_or_else(|| Error::UnknownSimdLevel {
            value: text.into_owned(),
        })
}

/// The level the codecs run at, chosen on first use and kept for the process: the level
/// `HOTPATCH_SIMD` asks for, lowered to the highest one the CPU supports at or below it
/// ([`SimdLevel::capped`]), or without it
/// (or when its value is not a level's name, which [`requested_simd_level`] reports) the
/// highest level the CPU supports.
pub fn simd_level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| match requested_simd_level() {
        Ok(Some(asked)) => asked.capped(),
        Ok(None) | Err(_) => SimdLevel::detect(),
    })
}

/// The dequantization kernel of `ggml_type` at `level`: `None` when the level is not
/// supported by this CPU or has no kernel of its own for the type (the caller then uses
/// the scalar one).
pub(crate) fn dequant_kernel(level: SimdLevel, ggml_type: GgmlType) -> Option<DequantKernel> {
    if level == SimdLevel::Scalar || !level.is_supported() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        x86::dequant_kernel(level, ggml_type)
    }
    #[cfg(target_arch = "aarch64")]
    {
        neon_dequant_kernel(level, ggml_type)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = ggml_type;
        None
    }
}

/// The quantization kernel of `ggml_type` at `level`, as [`dequant_kernel`].
pub(crate) fn quant_kernel(level: SimdLevel, ggml_type: GgmlType) -> Option<QuantKernel> {
    if level == SimdLevel::Scalar || !level.is_supported() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        x86::quant_kernel(level, ggml_type)
    }
    #[cfg(target_arch = "aarch64")]
    {
        neon_quant_kernel(level, ggml_type)
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        let _ = ggml_type;
        None
    }
}

/// The NaN/Inf test at `level`: whether any value is NaN or infinite. The scalar one
/// where the level has none of its own or the CPU does not support it.
pub(crate) fn any_non_finite_kernel(level: SimdLevel) -> fn(&[f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if let Some(kernel) = x86::any_non_finite_kernel(level) {
        return kernel;
    }
    let _ = level;
    crate::codec::any_non_finite
}

/// The NEON level's dequantization kernels (the kernels need no CPU check: NEON is part
/// of the aarch64 baseline).
#[cfg(target_arch = "aarch64")]
fn neon_dequant_kernel(level: SimdLevel, ggml_type: GgmlType) -> Option<DequantKernel> {
    match (level, ggml_type) {
        (SimdLevel::Neon, GgmlType::Q8_0) => Some(neon_dequant_q8_0),
        (SimdLevel::Neon, GgmlType::Q4_0) => Some(neon_dequant_q4_0),
        (SimdLevel::Neon, GgmlType::Q4_K) => Some(neon_dequant_q4_k),
        _ => None,
    }
}

/// The NEON level's quantization kernels.
#[cfg(target_arch = "aarch64")]
fn neon_quant_kernel(level: SimdLevel, ggml_type: GgmlType) -> Option<QuantKernel> {
    match (level, ggml_type) {
        (SimdLevel::Neon, GgmlType::Q8_0) => Some(neon_quant_q8_0),
        _ => None,
    }
}

// The NEON kernels behind safe functions. SAFETY, for each of them: the kernel is
// compiled with NEON, which every aarch64 CPU has (the target's baseline includes it).

#[cfg(target_arch = "aarch64")]
fn neon_dequant_q8_0(src: &[u8], dst: &mut [f32]) {
    // SAFETY: see above.
    unsafe { neon::dequant_q8_0(src, dst) }
}

#[cfg(target_arch = "aarch64")]
fn neon_dequant_q4_0(src: &[u8], dst: &mut [f32]) {
    // SAFETY: see above.
    unsafe { neon::dequant_q4_0(src, dst) }
}

#[cfg(target_arch = "aarch64")]
fn neon_dequant_q4_k(src: &[u8], dst: &mut [f32]) {
    // SAFETY: see above.
    unsafe { neon::dequant_q4_k(src, dst) }
}

#[cfg(target_arch = "aarch64")]
fn neon_quant_q8_0(src: &[f32], dst: &mut [u8]) -> Result<(), crate::codec::BlockOverflow> {
    // SAFETY: see above.
    unsafe { neon::quant_q8_0(src, dst) }
}

#[cfg(test)]
mod tests;
