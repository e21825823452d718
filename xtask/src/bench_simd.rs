//! `cargo xtask bench-simd`: the run-time SIMD levels against the scalar kernels, in one
//! run, on the work that is not dequantization (which `bench-codecs` times against
//! ggml): quantization of the common types, the NaN/Inf scan and the block-scale
//! transform.
//!
//! The level is chosen once per process, so the task runs itself once per level this
//! CPU supports, with `HOTPATCH_SIMD` set, and prints each level's throughput (GB/s of
//! f32 values quantized, scanned or transformed, best of a few runs on one thread) with
//! its ratio to the scalar level's. The input is generated: 4 Mi values per type, an
//! ordinary spread under a few magnitudes, and their quantized blocks for the scan and
//! the transform.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use byte_tier::{GgmlType, codec};

/// Values per type.
const N: usize = 4 << 20;
/// Runs per measurement; the best is kept.
const RUNS: usize = 5;

const QUANT_TYPES: &[GgmlType] = &[
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q5_0,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
];
const SCAN_TYPES: &[GgmlType] = &[GgmlType::F32, GgmlType::F16, GgmlType::Q8_0, GgmlType::Q4_K];
const SCALE_TYPES: &[GgmlType] = &[
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
];

/// Deterministic values: a splitmix64 stream mapped to `[-0.5, 0.5)` times 1 to 7.
fn values() -> Vec<f32> {
    let mut state = 0x6265_6e63_685f_7369u64;
    (0..N)
        .map(|i| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * (1 + i % 7) as f32
        })
        .collect()
}

fn best(mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..RUNS {
        let start = Instant::now();
        f()?;
        best = best.min(start.elapsed());
    }
    Ok(best)
}

/// The measurements of the level this process runs at: (operation, type) to seconds.
fn measure() -> Result<Vec<(String, String, f64)>> {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let x = values();
    let mut rows = Vec::new();
    pool.install(|| -> Result<()> {
        for &t in QUANT_TYPES {
            let time = best(|| {
                codec::quantize(t, &x)?;
                Ok(())
            })?;
            rows.push((
                "quantize".to_owned(),
                t.name().to_owned(),
                time.as_secs_f64(),
            ));
        }
        for &t in SCAN_TYPES {
            let data = codec::quantize(t, &x)?;
            let time = best(|| {
                let report = codec::scan_non_finite(t, &data, 0..N as u64)?;
                if !report.is_clean() {
                    bail!("the generated {t} blocks hold non-finite values");
                }
                Ok(())
            })?;
            rows.push(("scan".to_owned(), t.name().to_owned(), time.as_secs_f64()));
        }
        for &t in SCALE_TYPES {
            let mut data = codec::quantize(t, &x)?;
            // Alternating factors keep the scales in range however many runs there are.
            let mut factors = [0.5f32, 2.0].into_iter().cycle();
            let time = best(|| {
                let factor = factors.next().unwrap_or(1.0);
                codec::transform_range(
                    t,
                    &mut data,
                    0..N as u64,
                    &codec::Transform::Scale(factor),
                )?;
                Ok(())
            })?;
            rows.push(("scale".to_owned(), t.name().to_owned(), time.as_secs_f64()));
        }
        Ok(())
    })?;
    Ok(rows)
}

pub fn run(args: &[String]) -> Result<()> {
    if args.first().map(String::as_str) == Some("--child") {
        for (op, t, seconds) in measure()? {
            println!("{op} {t} {seconds}");
        }
        return Ok(());
    }
    if crate::rerun_in_release("bench-simd")? {
        return Ok(());
    }
    let exe = std::env::current_exe().context("no path to this program")?;
    let levels = codec::SimdLevel::supported();
    let mut table: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    let mut order = Vec::new();
    for level in &levels {
        eprintln!("measuring at {level} ...");
        let output = Command::new(&exe)
            .args(["bench-simd", "--child"])
            .env(codec::SIMD_ENV, level.name())
            .output()
            .with_context(|| format!("failed to run {}", exe.display()))?;
        if !output.status.success() {
            bail!(
                "the {level} run failed: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let mut parts = line.split_whitespace();
            let (Some(op), Some(t), Some(seconds)) = (parts.next(), parts.next(), parts.next())
            else {
                bail!("unexpected line from the {level} run: {line:?}");
            };
            let key = (op.to_owned(), t.to_owned());
            if !table.contains_key(&key) {
                order.push(key.clone());
            }
            table.entry(key).or_default().push(seconds.parse()?);
        }
    }
    let gb = |seconds: f64| N as f64 * 4.0 / seconds / 1e9;
    print!("{:<9} {:<6}", "work", "type");
    for level in &levels {
        print!(" {:>8}", format!("{level}"));
    }
    for level in levels.iter().skip(1) {
        print!(" {:>13}", format!("{level}/scalar"));
    }
    println!("   (GB/s of f32, one thread)");
    for key in order {
        let times = &table[&key];
        print!("{:<9} {:<6}", key.0, key.1);
        for &s in times {
            print!(" {:>8.2}", gb(s));
        }
        for &s in times.iter().skip(1) {
            print!(" {:>12.2}x", times[0] / s);
        }
        println!();
    }
    Ok(())
}
