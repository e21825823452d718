//! `cargo xtask bench-iq-quant`: quantization to the grid IQ types against ggml's own
//! (`ggml_quantize_chunk`, what llama-quantize runs), in the same run, on one thread.
//!
//! The input is generated: rows of 4,096 values with an ordinary spread under a few
//! magnitudes, and one importance weight per column. Each type is quantized with the
//! weights, and also without them where ggml allows it; ggml's side runs in a small C
//! program (`quantize.c`) compiled here against the llama.cpp build that `cargo xtask
//! llama-server` makes, which also writes its bytes so that the two outputs are compared
//! as they are timed. Printed: the throughput of each side (MB/s of f32 values, best of
//! a few runs), ours / ggml, and whether the bytes are the same.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use byte_tier::{GgmlType, codec};

/// Values per row.
const N_PER_ROW: usize = 4096;
/// Rows quantized per run.
const ROWS: usize = 64;
/// Runs per measurement; the best is kept.
const RUNS: usize = 3;

const TYPES: &[GgmlType] = &[
    GgmlType::IQ1_S,
    GgmlType::IQ1_M,
    GgmlType::IQ2_XXS,
    GgmlType::IQ2_XS,
    GgmlType::IQ2_S,
    GgmlType::IQ3_XXS,
    GgmlType::IQ3_S,
];

/// A splitmix64 stream.
fn stream(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed;
    move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Values in `[-0.5, 0.5)` times 1 to 7, and weights in `[0.1, 10)`.
fn input() -> (Vec<f32>, Vec<f32>) {
    let mut next = stream(0x6971_5f71_7561_6e74);
    let values = (0..N_PER_ROW * ROWS)
        .map(|i| ((next() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * (1 + i % 7) as f32)
        .collect();
    let weights = (0..N_PER_ROW)
        .map(|_| 0.1 + (next() >> 40) as f32 / (1u64 << 24) as f32 * 9.9)
        .collect();
    (values, weights)
}

fn write_f32s(path: &Path, values: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("write {}", path.display()))
}

/// ggml's best time and its bytes.
fn time_ggml(
    program: &Path,
    dir: &Path,
    t: GgmlType,
    weights: Option<&Path>,
) -> Result<(Duration, Vec<u8>)> {
    let out = dir.join("ggml.out");
    let output = Command::new(program)
        .arg(RUNS.to_string())
        .arg((t as u32).to_string())
        .arg(N_PER_ROW.to_string())
        .arg(dir.join("values.f32"))
        .arg(weights.map_or_else(|| PathBuf::from("-"), Path::to_owned))
        .arg(&out)
        .output()
        .with_context(|| format!("start {}", program.display()))?;
    let time =
        crate::bench_codecs::ggml_time(&output, &format!("ggml's quantization to {}", t.name()))?;
    let bytes = std::fs::read(&out).with_context(|| format!("read {}", out.display()))?;
    Ok((time, bytes))
}

/// Our best time on one thread and our bytes.
fn time_ours(
    t: GgmlType,
    values: &[f32],
    weights: Option<&[f32]>,
    pool: &rayon::ThreadPool,
) -> Result<(Duration, Vec<u8>)> {
    let mut best = Duration::MAX;
    let mut bytes = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        bytes = pool.install(|| match weights {
            Some(w) => codec::quantize_weighted(t, values, N_PER_ROW, w),
            None => codec::quantize(t, values),
        })?;
        best = best.min(start.elapsed());
    }
    Ok((best, bytes))
}

pub fn run() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("hotpatch-bench-iq-quant-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = measure(&dir);
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    result
}

/// Builds the C program in `dir`, times both sides per type and prints the table.
fn measure(dir: &Path) -> Result<()> {
    let program =
        crate::bench_codecs::compile_against_ggml(dir, "quantize", include_str!("quantize.c"))?;
    let (values, weights) = input();
    write_f32s(&dir.join("values.f32"), &values)?;
    let weights_path = dir.join("weights.f32");
    write_f32s(&weights_path, &weights)?;
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let mb = (values.len() * 4) as f64 / 1e6;
    println!(
        "grid IQ quantization, one thread, {} values (rows of {N_PER_ROW}), best of {RUNS}",
        values.len()
    );
    println!(
        "{:<8} {:<10} {:>11} {:>11} {:>11}  same bytes",
        "type", "weights", "ours MB/s", "ggml MB/s", "ours/ggml"
    );
    let mut differ = Vec::new();
    for &t in TYPES {
        let cases: &[bool] = if codec::needs_importance(t) {
            &[true]
        } else {
            &[true, false]
        };
        for &weighted in cases {
            let (ggml, theirs) = time_ggml(&program, dir, t, weighted.then_some(&weights_path))?;
            let (ours, bytes) = time_ours(t, &values, weighted.then_some(&weights), &pool)?;
            let same = bytes == theirs;
            if !same {
                differ.push(format!(
                    "{} {}",
                    t.name(),
                    if weighted { "weighted" } else { "plain" }
                ));
            }
            println!(
                "{:<8} {:<10} {:>11.1} {:>11.1} {:>10.2}x  {}",
                t.name(),
                if weighted { "imatrix" } else { "none" },
                mb / ours.as_secs_f64(),
                mb / ggml.as_secs_f64(),
                ggml.as_secs_f64() / ours.as_secs_f64(),
                if same { "yes" } else { "NO" }
            );
        }
    }
    if !differ.is_empty() {
        bail!("our bytes differ from ggml's for: {}", differ.join(", "));
    }
    Ok(())
}
