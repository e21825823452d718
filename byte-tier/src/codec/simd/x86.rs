//! The x86-64 levels: every kernel of the parent module compiled again with AVX2 and FMA
//! and with AVX-512, and hand-written AVX2 and AVX-512 kernels for the hottest types.

use super::{SimdLevel, intrinsics};
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

/// Both levels' lists of kernels: every type the scalar tables handle.
macro_rules! every_kernel {
    ($module:ident, $features:literal) => {
        compiled_for! {
            $module, $features,
            dequant {
                F32 => crate::codec::float::dequant_f32,
                F16 => crate::codec::float::dequant_f16,
                BF16 => crate::codec::float::dequant_bf16,
                F64 => crate::codec::float::dequant_f64,
                I8 => crate::codec::float::dequant_i8,
                I16 => crate::codec::float::dequant_i16,
                I32 => crate::codec::float::dequant_i32,
                I64 => crate::codec::float::dequant_i64,
                Q4_0 => crate::codec::legacy::dequant_q4_0,
                Q4_1 => crate::codec::legacy::dequant_q4_1,
                Q5_0 => crate::codec::legacy::dequant_q5_0,
                Q5_1 => crate::codec::legacy::dequant_q5_1,
                Q8_0 => crate::codec::legacy::dequant_q8_0,
                Q2_K => crate::codec::kquants::dequant_q2_k,
                Q3_K => crate::codec::kquants::dequant_q3_k,
                Q4_K => crate::codec::kquants::dequant_q4_k,
                Q5_K => crate::codec::kquants::dequant_q5_k,
                Q6_K => crate::codec::kquants::dequant_q6_k,
                IQ4_NL => crate::codec::lut::dequant_iq4_nl,
                IQ4_XS => crate::codec::lut::dequant_iq4_xs,
                IQ1_S => crate::codec::grid::dequant_iq1_s,
                IQ1_M => crate::codec::grid::dequant_iq1_m,
                IQ2_XXS => crate::codec::grid::dequant_iq2_xxs,
                IQ2_XS => crate::codec::grid::dequant_iq2_xs,
                IQ2_S => crate::codec::grid::dequant_iq2_s,
                IQ3_XXS => crate::codec::grid::dequant_iq3_xxs,
                IQ3_S => crate::codec::grid::dequant_iq3_s,
                MXFP4 => crate::codec::lut::dequant_mxfp4,
                TQ1_0 => crate::codec::lut::dequant_tq1_0,
                TQ2_0 => crate::codec::lut::dequant_tq2_0,
            }
            quant {
                F32 => crate::codec::float::quant_f32,
                F16 => crate::codec::float::quant_f16,
                BF16 => crate::codec::float::quant_bf16,
                F64 => crate::codec::float::quant_f64,
                Q4_0 => crate::codec::legacy::quant_q4_0,
                Q4_1 => crate::codec::legacy::quant_q4_1,
                Q5_0 => crate::codec::legacy::quant_q5_0,
                Q5_1 => crate::codec::legacy::quant_q5_1,
                Q8_0 => crate::codec::legacy::quant_q8_0,
                Q2_K => crate::codec::kquants::quant_q2_k,
                Q3_K => crate::codec::kquants::quant_q3_k,
                Q4_K => crate::codec::kquants::quant_q4_k,
                Q5_K => crate::codec::kquants::quant_q5_k,
                Q6_K => crate::codec::kquants::quant_q6_k,
                IQ4_NL => crate::codec::lut::quant_iq4_nl,
                IQ4_XS => crate::codec::lut::quant_iq4_xs,
                MXFP4 => crate::codec::lut::quant_mxfp4,
                TQ1_0 => crate::codec::lut::quant_tq1_0,
                TQ2_0 => crate::codec::lut::quant_tq2_0,
            }
        }
    };
}

every_kernel!(avx2, "avx2,fma");
every_kernel!(avx512, "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma");

/// The kernel of `ggml_type` at `level`, or `None` (the scalar one then runs).
pub(super) fn dequant_kernel(level: SimdLevel, ggml_type: GgmlType) -> Option<DequantKernel> {
    // Checked here again so that no kernel of a level escapes without the check.
    if !level.is_supported() {
        return None;
    }
    match (level, ggml_type) {
        (SimdLevel::Scalar, _) => None,
        (SimdLevel::Avx2, GgmlType::Q8_0) => Some(q8_0_avx2),
        (SimdLevel::Avx2, GgmlType::Q4_K) => Some(q4_k_avx2),
        (SimdLevel::Avx512, GgmlType::Q8_0) => Some(q8_0_avx512),
        (SimdLevel::Avx512, GgmlType::Q4_K) => Some(q4_k_avx512),
        (SimdLevel::Avx2, _) => avx2::dequant_kernel(ggml_type),
        (SimdLevel::Avx512, _) => avx512::dequant_kernel(ggml_type),
    }
}

// The hand-written kernels behind safe functions. SAFETY, for each of them: it is only
// handed out by `dequant_kernel`, after `is_supported` has confirmed the CPU has the
// level's features, which include every feature the kernel is compiled with.

fn q8_0_avx2(src: &[u8], dst: &mut [f32]) {
    // SAFETY: see above; AVX2 and FMA are present.
    unsafe { intrinsics::dequant_q8_0_avx2(src, dst) }
}

fn q4_k_avx2(src: &[u8], dst: &mut [f32]) {
    // SAFETY: see above; AVX2 and FMA are present.
    unsafe { intrinsics::dequant_q4_k_avx2(src, dst) }
}

fn q8_0_avx512(src: &[u8], dst: &mut [f32]) {
    // SAFETY: see above; AVX-512 F, BW, DQ, VL, AVX2 and FMA are present.
    unsafe { intrinsics::dequant_q8_0_avx512(src, dst) }
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
    match level {
        SimdLevel::Scalar => None,
        SimdLevel::Avx2 => avx2::quant_kernel(ggml_type),
        SimdLevel::Avx512 => avx512::quant_kernel(ggml_type),
    }
}
