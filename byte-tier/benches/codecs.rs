//! Codec throughput, in bytes of f32 produced (dequantize) or consumed (quantize) per
//! second, on one thread and on every thread of rayon's pool.
//!
//! `cargo bench -p byte-tier --bench codecs` (append a filter such as `dequantize/1t`).

use std::hint::black_box;

use byte_tier::GgmlType;
use byte_tier::codec;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

/// Elements per one-thread dequantize run: 256 KiB of f32, which stays in the L2 cache,
/// so the figure is the codec's own speed (as ggml's quantize-perf test measures it)
/// rather than the machine's memory bandwidth.
const DEQUANT_ELEMENTS: usize = 1 << 16;
/// Elements per run on every thread: enough chunks to spread over the pool.
const PARALLEL_ELEMENTS: usize = 1 << 20;
/// Elements per quantize run (the K-quant searches are two orders of magnitude slower).
const QUANT_ELEMENTS: usize = 1 << 16;

const DEQUANT_TYPES: &[GgmlType] = &[
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
    GgmlType::MXFP4,
    GgmlType::TQ1_0,
    GgmlType::TQ2_0,
];

const QUANT_TYPES: &[GgmlType] = &[
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::IQ4_NL,
    GgmlType::IQ4_XS,
    GgmlType::MXFP4,
    GgmlType::TQ1_0,
    GgmlType::TQ2_0,
];

/// Weight-like values from a fixed-seed generator.
fn values(n: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

/// Tensor bytes of `t`: quantized values where we can quantize, otherwise random bytes
/// with every f16 field set to a modest finite scale.
fn tensor(t: GgmlType, n: usize) -> Vec<u8> {
    if codec::can_quantize(t) {
        return codec::quantize(t, &values(n)).expect("quantize");
    }
    let bytes = (n as u64 / t.block_len() * t.block_bytes()) as usize;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut data: Vec<u8> = (0..bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let fields: &[usize] = match t {
        GgmlType::Q2_K => &[80, 82],
        GgmlType::Q3_K => &[108],
        GgmlType::TQ1_0 => &[52],
        GgmlType::TQ2_0 => &[64],
        GgmlType::IQ4_NL | GgmlType::IQ4_XS => &[0],
        _ => &[],
    };
    for block in data.chunks_exact_mut(t.block_bytes() as usize) {
        for &at in fields {
            block[at..at + 2].copy_from_slice(&half_bits(0.001));
        }
    }
    data
}

fn half_bits(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_bits().to_le_bytes()
}

fn pools() -> Vec<(String, rayon::ThreadPool)> {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut pools = vec![("1t".to_owned(), 1)];
    if all > 1 {
        pools.push((format!("{all}t"), all));
    }
    pools
        .into_iter()
        .map(|(name, n)| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build()
                .expect("thread pool");
            (name, pool)
        })
        .collect()
}

fn dequantize(c: &mut Criterion) {
    for (name, pool) in pools() {
        let elements = if pool.current_num_threads() == 1 {
            DEQUANT_ELEMENTS
        } else {
            PARALLEL_ELEMENTS
        };
        let mut group = c.benchmark_group(format!("dequantize/{name}"));
        group.throughput(Throughput::Bytes((elements * 4) as u64));
        for &t in DEQUANT_TYPES {
            let data = tensor(t, elements);
            let mut out = vec![0f32; elements];
            let n = elements as u64;
            group.bench_function(BenchmarkId::from_parameter(t), |b| {
                b.iter(|| {
                    pool.install(|| {
                        codec::dequantize_range(t, black_box(&data), 0..n, &mut out)
                            .expect("dequantize")
                    })
                })
            });
        }
        group.finish();
    }
}

fn quantize(c: &mut Criterion) {
    for (name, pool) in pools() {
        // One chunk per thread at least, so the parallel run has work to share.
        let elements = QUANT_ELEMENTS.max(pool.current_num_threads() * codec::CHUNK_ELEMENTS);
        let input = values(elements);
        let mut group = c.benchmark_group(format!("quantize/{name}"));
        group.throughput(Throughput::Bytes((elements * 4) as u64));
        group.sample_size(20);
        for &t in QUANT_TYPES {
            let mut data = codec::quantize(t, &input).expect("quantize");
            let n = elements as u64;
            group.bench_function(BenchmarkId::from_parameter(t), |b| {
                b.iter(|| {
                    pool.install(|| {
                        codec::quantize_range(t, black_box(&input), &mut data, 0..n)
                            .expect("quantize")
                    })
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, dequantize, quantize);
criterion_main!(benches);
