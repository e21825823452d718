//! The x86-64 levels: kernels of the parent module compiled again with AVX2 and FMA and
//! with AVX-512, and hand-written kernels for the hottest types.

use super::{SimdLevel, intrinsics};
use crate::codec::kquants::{self, K4Search, QK_K};
use crate::codec::{DequantKernel, QuantKernel};
use crate::types::GgmlType;

/// Compiles the listed scalar kernels once more with `$features` enabled, in module
/// `$module`, with a table from type to kernel.
///
/// Each kernel becomes a `#[target_feature]` function whose body is the scalar kernel
/// (marked `#[inline(always)]`, so that it is compiled anew for these features), and a
/// safe `run` that calls it. A `run` is only reachable through the table, which
/// [`dequant_kernel`] and [`quant_kernel`] consult only after checking the CPU.
macro_rules! compiled_for {
    (
        $module:ident, $features:literal,
        dequant { $($dequant_type:ident => $dequant:path,)* }
        quant { $($quant_type:ident => $quant:path,)* }
    ) => {
        mod $module {
            use crate::codec::{BlockOverflow, DequantKernel, QuantKernel};
            use crate::types::GgmlType;

            mod dequant {
                $(
                    #[allow(non_snake_case)]
                    pub(super) mod $dequant_type {
                        #[target_feature(enable = $features)]
                        fn compiled(src: &[u8], dst: &mut [f32]) {
                            $dequant(src, dst)
                        }

                        pub(in crate::codec::simd) fn run(src: &[u8], dst: &mut [f32]) {
                            // SAFETY: `run` is only handed out by the level's table, which
                            // is consulted only once the CPU is known to have the
                            // level's features (`SimdLevel::is_supported`).
                            unsafe { compiled(src, dst) }
                        }
                    }
                )*
            }

            mod quant {
                $(
                    #[allow(non_snake_case)]
                    pub(super) mod $quant_type {
                        use crate::codec::BlockOverflow;

                        #[target_feature(enable = $features)]
                        fn compiled(
                            src: &[f32],
                            dst: &mut [u8],
                        ) -> Result<(), BlockOverflow> {
                            $quant(src, dst)
                        }

                        pub(in crate::codec::simd) fn run(
                            src: &[f32],
                            dst: &mut [u8],
                        ) -> Result<(), BlockOverflow> {
                            // SAFETY: as for the dequantization kernels: only reachable
                            // through the table, after the CPU check.
                            unsafe { compiled(src, dst) }
                        }
                    }
                )*
            }

            /// This level's dequantization kernel of a type.
            pub(super) fn dequant_kernel(ggml_type: GgmlType) -> Option<DequantKernel> {
                Some(match ggml_type {
                    $(GgmlType::$dequant_type => dequant::$dequant_type::run,)*
                    _ => return None,
                })
            }

            /// This level's quantization kernel of a type.
            pub(super) fn quant_kernel(ggml_type: GgmlType) -> Option<QuantKernel> {
                let _: Option<BlockOverflow> = None;
                Some(match ggml_type {
                    $(GgmlType::$quant_type => quant::$quant_type::run,)*
                    _ => return None,
                })
            }
        }
    };
}

// Each level lists the types whose recompiled kernel is faster than the scalar one
// (measured kernel against kernel, in cache, on an AVX-512 machine); the others keep
// the scalar kernel, or at the AVX-512 level the AVX2 one where that pays. Gathers,
// which the compiler uses for the table lookups of the grid and lookup-table types at
// the AVX-512 level, made those up to three times slower there.
compiled_for! {
    avx2, "avx2,fma",
    dequant {
        F64 => crate::codec::float::dequant_f64,
        Q2_K => crate::codec::kquants::dequant_q2_k,
        Q3_K => crate::codec::kquants::dequant_q3_k,
        Q5_K => crate::codec::kquants::dequant_q5_k,
        Q6_K => crate::codec::kquants::dequant_q6_k,
        IQ4_NL => crate::codec::lut::dequant_iq4_nl,
        IQ4_XS => crate::codec::lut::dequant_iq4_xs,
        IQ1_S => crate::codec::grid::dequant_iq1_s,
        IQ2_XXS => crate::codec::grid::dequant_iq2_xxs,
        IQ3_XXS => crate::codec::grid::dequant_iq3_xxs,
        MXFP4 => crate::codec::lut::dequant_mxfp4,
        TQ1_0 => crate::codec::lut::dequant_tq1_0,
        TQ2_0 => crate::codec::lut::dequant_tq2_0,
    }
    quant {
        TQ1_0 => crate::codec::lut::quant_tq1_0,
        TQ2_0 => crate::codec::lut::quant_tq2_0,
    }
}

compiled_for! {
    avx512, "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma",
    dequant {
        F16 => crate::codec::float::dequant_f16,
        F64 => crate::codec::float::dequant_f64,
        I64 => crate::codec::float::dequant_i64,
        Q2_K => crate::codec::kquants::dequant_q2_k,
        Q3_K => crate::codec::kquants::dequant_q3_k,
        Q5_K => crate::codec::kquants::dequant_q5_k,
        Q6_K => crate::codec::kquants::dequant_q6_k,
        TQ1_0 => crate::codec::lut::dequant_tq1_0,
    }
    quant {
        MXFP4 => crate::codec::lut::quant_mxfp4,
    }
}

/// The kernel of `ggml_type` at `level`, or `None` (the scalar one then runs).
pub(super) fn dequant_kernel(level: SimdLevel, ggml_type: GgmlType) -> Option<DequantKernel> {
    // Checked here again so that no kernel of a level escapes without the check.
    if !level.is_supported() {
        return None;
    }
    match (level, ggml_type) {
        (SimdLevel::Scalar | SimdLevel::Neon, _) => None,
        // Q8_0's AVX-512 kernel was slower than its AVX2 one: both levels take that.
        (SimdLevel::Avx2 | SimdLevel::Avx512, GgmlType::Q8_0) => Some(q8_0_avx2),
        (SimdLevel::Avx2 | SimdLevel::Avx512, GgmlType::Q4_0) => Some(q4_0_avx2),
        (SimdLevel::Avx2, GgmlType::Q4_K) => Some(q4_k_avx2),
        (SimdLevel::Avx512, GgmlType::Q4_K) => Some(q4_k_avx512),
        (SimdLevel::Avx2, _) => avx2::dequant_kernel(ggml_type),
        // An AVX-512 CPU has AVX2 too (`is_supported` checks both).
        (SimdLevel::Avx512, _) => {
            avx512::dequant_kernel(ggml_type).or_else(|| dequant_kernel(SimdLevel::Avx2, ggml_type))
        }
    }
}

// The hand-written kernels behind safe functions. SAFETY, for each of them: it is only
// handed out by `dequant_kernel`, after `is_supported` has confirmed the CPU has the
// level's features, which include every feature the kernel is compiled with.

fn q8_0_avx2(src: &[u8], dst: &mut [f32]) {
    // SAFETY: see above; AVX2 and FMA are present.
    unsafe { intrinsics::dequant_q8_0_avx2(src, dst) }
}

fn q4_0_avx2(src: &[u8], dst: &mut [f32]) {
    // SAFETY: see above; AVX2 and FMA are present (the AVX-512 level includes them).
    unsafe { intrinsics::dequant_q4_0_avx2(src, dst) }
}

fn q4_k_avx2(src: &[u8], dst: &mut [f32]) {
    // SAFETY: see above; AVX2 and FMA are present.
    unsafe { intrinsics::dequant_q4_k_avx2(src, dst) }
}

fn q4_k_avx512(src: &[u8], dst: &mut [f32]) {
    // SAFETY: see above; AVX-512 F, BW, DQ, VL, AVX2 and FMA are present.
    unsafe { intrinsics::dequant_q4_k_avx512(src, dst) }
}

/// The quantization kernel of `ggml_type` at `level`, or `None`.
pub(super) fn quant_kernel(level: SimdLevel, ggml_type: GgmlType) -> Option<QuantKernel> {
    if !level.is_supported() {
        return None;
    }
    match (level, ggml_type) {
        (SimdLevel::Scalar | SimdLevel::Neon, _) => None,
        (SimdLevel::Avx2 | SimdLevel::Avx512, GgmlType::Q8_0) => Some(quant_q8_0_avx2),
        (SimdLevel::Avx2 | SimdLevel::Avx512, GgmlType::Q4_K) => Some(quant_q4_k_avx2),
        (SimdLevel::Avx2 | SimdLevel::Avx512, GgmlType::Q5_K) => Some(quant_q5_k_avx2),
        (SimdLevel::Avx2 | SimdLevel::Avx512, GgmlType::Q6_K) => Some(quant_q6_k_avx2),
        (SimdLevel::Avx2 | SimdLevel::Avx512, GgmlType::Q2_K) => Some(quant_q2_k_avx2),
        (SimdLevel::Avx2, _) => avx2::quant_kernel(ggml_type),
        (SimdLevel::Avx512, _) => {
            avx512::quant_kernel(ggml_type).or_else(|| quant_kernel(SimdLevel::Avx2, ggml_type))
        }
    }
}

fn quant_q8_0_avx2(src: &[f32], dst: &mut [u8]) -> Result<(), crate::codec::BlockOverflow> {
    // SAFETY: handed out by `quant_kernel` only after `is_supported` confirmed AVX2 and
    // FMA (which the AVX-512 level includes).
    unsafe { intrinsics::quant_q8_0_avx2(src, dst) }
}

/// The Q4_K / Q5_K sub-block search with AVX2, behind a safe function.
fn k4_search_avx2(
    x: &[f32; QK_K],
    search: K4Search,
    codes: &mut [u8; QK_K],
    scales: &mut [f32; 8],
    mins: &mut [f32; 8],
) {
    // SAFETY: only reached through `quant_q4_k_avx2` and `quant_q5_k_avx2`, which
    // `quant_kernel` hands out only after `is_supported` confirmed AVX2 and FMA.
    unsafe { intrinsics::k4_search_avx2(x, search, codes, scales, mins) }
}

fn quant_q4_k_avx2(src: &[f32], dst: &mut [u8]) -> Result<(), crate::codec::BlockOverflow> {
    kquants::quant_q4_k_with(src, dst, k4_search_avx2)
}

fn quant_q5_k_avx2(src: &[f32], dst: &mut [u8]) -> Result<(), crate::codec::BlockOverflow> {
    kquants::quant_q5_k_with(src, dst, k4_search_avx2)
}

/// The Q6_K group search with AVX2, behind a safe function.
fn q6_k_search_avx2(x: &[f32; QK_K], codes: &mut [u8; QK_K], scales: &mut [f32; 16]) {
    // SAFETY: only reached through `quant_q6_k_avx2`, which `quant_kernel` hands out only
    // after `is_supported` confirmed AVX2 and FMA.
    unsafe { intrinsics::q6_k_search_avx2(x, codes, scales) }
}

fn quant_q6_k_avx2(src: &[f32], dst: &mut [u8]) -> Result<(), crate::codec::BlockOverflow> {
    kquants::quant_q6_k_with(src, dst, q6_k_search_avx2)
}

/// The Q2_K group search with AVX2, behind a safe function.
fn q2_k_search_avx2(
    x: &[f32; QK_K],
    codes: &mut [u8; QK_K],
    scales: &mut [f32; 16],
    mins: &mut [f32; 16],
) {
    // SAFETY: only reached through `quant_q2_k_avx2`, which `quant_kernel` hands out only
    // after `is_supported` confirmed AVX2 and FMA.
    unsafe { intrinsics::q2_k_search_avx2(x, codes, scales, mins) }
}

fn quant_q2_k_avx2(src: &[f32], dst: &mut [u8]) -> Result<(), crate::codec::BlockOverflow> {
    kquants::quant_q2_k_with(src, dst, q2_k_search_avx2)
}

#[target_feature(enable = "avx2,fma")]
fn any_non_finite_avx2_compiled(values: &[f32]) -> bool {
    crate::codec::any_non_finite(values)
}

#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
fn any_non_finite_avx512_compiled(values: &[f32]) -> bool {
    crate::codec::any_non_finite(values)
}

fn any_non_finite_avx2(values: &[f32]) -> bool {
    // SAFETY: handed out by `any_non_finite_kernel` only after `is_supported` confirmed
    // AVX2 and FMA.
    unsafe { any_non_finite_avx2_compiled(values) }
}

fn any_non_finite_avx512(values: &[f32]) -> bool {
    // SAFETY: handed out by `any_non_finite_kernel` only after `is_supported` confirmed
    // the AVX-512 level's features.
    unsafe { any_non_finite_avx512_compiled(values) }
}

/// The NaN/Inf test of `level` (the scalar fold compiled for its features), or `None`.
pub(super) fn any_non_finite_kernel(level: SimdLevel) -> Option<fn(&[f32]) -> bool> {
    if !level.is_supported() {
        return None;
    }
    match level {
        SimdLevel::Avx2 => Some(any_non_finite_avx2),
        SimdLevel::Avx512 => Some(any_non_finite_avx512),
        SimdLevel::Scalar | SimdLevel::Neon => None,
    }
}
