//! `cargo xtask bench-codecs`: dequantization speed on the real model, ours against
//! gguf-py's numpy code, measured in the same run on the same tensors.
//!
//! For every tensor type in the model it times our `codec::dequantize_range` over all
//! tensors of that type on one thread and on every thread (best of a few runs), then
//! runs gguf-py's `gguf.quants.dequantize` over the same tensors in the oracle's Python
//! (best of two runs), and prints a table of throughputs (GB/s of f32 produced) with the
//! ratio ours / numpy. The oracle and the model are found as the integration tests find
//! them: `HOTPATCH_ORACLE_PYTHON` and `HOTPATCH_REAL_MODEL`, or the shared cache.
//!
//! The real model holds no grid IQ tensors, so a second table times those types the
//! same way on generated blocks (random codes under a small finite scale, 4 Mi
//! elements per type), written to a temporary file that gguf-py reads back.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use byte_tier::{GgmlType, MappedFile, codec};

/// Runs of our dequantization per type and thread count; the best is kept.
const OUR_RUNS: usize = 5;

const PYTHON_SCRIPT: &str = r#"
import sys, time
from collections import defaultdict
from gguf import GGUFReader
from gguf.quants import dequantize
reader = GGUFReader(sys.argv[1])
groups = defaultdict(list)
for t in reader.tensors:
    groups[t.tensor_type.name].append(t)
for name, tensors in sorted(groups.items()):
    best = None
    for _ in range(2):
        start = time.perf_counter()
        for t in tensors:
            dequantize(t.data, t.tensor_type)
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    print(name, best)
"#;

fn cache_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("hotpatch"));
    }
    let home = std::env::var_os("HOME").context("HOME is not set")?;
    Ok(PathBuf::from(home).join(".cache").join("hotpatch"))
}

fn oracle_python() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("HOTPATCH_ORACLE_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let python = cache_dir()?.join("oracle-venv").join("bin").join("python");
    if !python.exists() {
        bail!(
            "the gguf-py oracle is not installed at {}: run `cargo xtask oracle-env`",
            python.display()
        );
    }
    Ok(python)
}

fn real_model() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("HOTPATCH_REAL_MODEL") {
        return Ok(PathBuf::from(p));
    }
    let record = cache_dir()?.join("real-model.path");
    let path = std::fs::read_to_string(&record).with_context(|| {
        format!(
            "the real model is not installed ({} missing): run `cargo xtask real-model`",
            record.display()
        )
    })?;
    Ok(PathBuf::from(path.trim()))
}

/// One type's tensors: their bytes and element counts.
struct Group<'a> {
    tensors: Vec<&'a [u8]>,
    elements: u64,
}

/// Best wall time of dequantizing every tensor of `group` on `pool`.
fn time_ours(t: GgmlType, group: &Group<'_>, pool: &rayon::ThreadPool) -> Result<Duration> {
    let largest = group
        .tensors
        .iter()
        .map(|d| codec::element_count(t, d.len()))
        .try_fold(0u64, |acc, n| n.map(|n| acc.max(n)))?;
    let mut out = vec![0f32; largest as usize];
    let mut best = Duration::MAX;
    for _ in 0..OUR_RUNS {
        let start = Instant::now();
        pool.install(|| -> Result<()> {
            for data in &group.tensors {
                let n = codec::element_count(t, data.len())?;
                codec::dequantize_range(t, data, 0..n, &mut out[..n as usize])?;
            }
            Ok(())
        })?;
        best = best.min(start.elapsed());
    }
    Ok(best)
}

fn gb_per_s(elements: u64, time: Duration) -> f64 {
    elements as f64 * 4.0 / time.as_secs_f64() / 1e9
}

/// The grid IQ types timed on generated blocks.
const GRID_TYPES: &[GgmlType] = &[
    GgmlType::IQ1_S,
    GgmlType::IQ1_M,
    GgmlType::IQ2_XXS,
    GgmlType::IQ2_XS,
    GgmlType::IQ2_S,
    GgmlType::IQ3_XXS,
    GgmlType::IQ3_S,
];

/// Elements generated per grid type.
const GRID_ELEMENTS: u64 = 4 << 20;

const GRID_SCRIPT: &str = r#"
import sys, time
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize
for arg in sys.argv[1:]:
    name, path = arg.split("=", 1)
    raw = np.fromfile(path, dtype=np.uint8)
    best = None
    for _ in range(2):
        start = time.perf_counter()
        dequantize(raw, T[name])
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
    print(name, best)
"#;

/// Random blocks of a grid type whose super-block scale is 2^-7 (finite, so that both
/// sides compute ordinary values).
fn grid_blocks(t: GgmlType, n_blocks: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) as u8
    };
    let block_bytes = t.block_bytes() as usize;
    let mut data: Vec<u8> = (0..n_blocks * block_bytes).map(|_| next()).collect();
    for block in data.chunks_exact_mut(block_bytes) {
        if t == GgmlType::IQ1_M {
            // The f16 scale 0x2000 sits in the top nibbles of bytes 49, 51, 53, 55.
            for (at, nibble) in [(49, 0u8), (51, 0), (53, 0), (55, 2)] {
                block[at] = (block[at] & 0x0f) | (nibble << 4);
            }
        } else {
            block[0] = 0x00;
            block[1] = 0x20;
        }
    }
    data
}

/// Times our dequantization of the grid IQ types against gguf-py's on generated blocks
/// and prints the second table.
fn grid_table(
    python: &std::path::Path,
    one: &rayon::ThreadPool,
    all: &rayon::ThreadPool,
    threads: usize,
) -> Result<()> {
    let dir = std::env::temp_dir().join(format!("hotpatch-bench-grid-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = grid_rows(python, one, all, threads, &dir);
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    result
}

fn grid_rows(
    python: &std::path::Path,
    one: &rayon::ThreadPool,
    all: &rayon::ThreadPool,
    threads: usize,
    dir: &std::path::Path,
) -> Result<()> {
    let mut args = Vec::new();
    let mut ours = BTreeMap::new();
    for (i, &t) in GRID_TYPES.iter().enumerate() {
        let n_blocks = (GRID_ELEMENTS / t.block_len()) as usize;
        let data = grid_blocks(t, n_blocks, 0x6772_6964 + i as u64);
        let path = dir.join(format!("{}.bin", t.name()));
        std::fs::write(&path, &data)?;
        args.push(format!("{}={}", t.name(), path.display()));
        let group = Group {
            tensors: vec![&data],
            elements: GRID_ELEMENTS,
        };
        ours.insert(t, (time_ours(t, &group, one)?, time_ours(t, &group, all)?));
    }
    eprintln!("running gguf-py's dequantize on generated grid IQ blocks ...");
    let output = Command::new(python)
        .arg("-c")
        .arg(GRID_SCRIPT)
        .args(&args)
        .output()
        .with_context(|| format!("start {}", python.display()))?;
    if !output.status.success() {
        bail!(
            "gguf-py benchmark failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    println!(
        "\n{:<8} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "grid",
        "elements",
        "ours 1t",
        format!("ours {threads}t"),
        "numpy",
        "1t/numpy",
        format!("{threads}t/numpy")
    );
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some((name, secs)) = line.split_once(' ') else {
            continue;
        };
        let t = GgmlType::from_name(name).with_context(|| format!("unknown type {name}"))?;
        let secs: f64 = secs
            .trim()
            .parse()
            .with_context(|| format!("bad time {secs:?}"))?;
        let Some(&(single, parallel)) = ours.get(&t) else {
            continue;
        };
        let theirs = gb_per_s(GRID_ELEMENTS, Duration::from_secs_f64(secs));
        let (ours_1, ours_n) = (
            gb_per_s(GRID_ELEMENTS, single),
            gb_per_s(GRID_ELEMENTS, parallel),
        );
        println!(
            "{:<8} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10}",
            t.name(),
            GRID_ELEMENTS,
            format!("{ours_1:.2} GB/s"),
            format!("{ours_n:.2} GB/s"),
            format!("{theirs:.3} GB/s"),
            format!("{:.1}x", ours_1 / theirs),
            format!("{:.1}x", ours_n / theirs)
        );
    }
    Ok(())
}

/// Times our dequantization and gguf-py's on the real model and prints the table.
pub fn run() -> Result<()> {
    if crate::rerun_in_release("bench-codecs")? {
        return Ok(());
    }
    let model = real_model()?;
    let python = oracle_python()?;
    let file = MappedFile::open(&model).with_context(|| format!("open {}", model.display()))?;
    let gguf = file.parse().context("parse the real model")?;

    let mut groups: BTreeMap<GgmlType, Group<'_>> = BTreeMap::new();
    for tensor in gguf.tensors() {
        let group = groups.entry(tensor.ggml_type).or_insert(Group {
            tensors: Vec::new(),
            elements: 0,
        });
        group.tensors.push(gguf.tensor_data(tensor));
        group.elements += tensor.n_elements;
    }

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let all = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let mut ours = BTreeMap::new();
    for (&t, group) in &groups {
        if !codec::can_dequantize(t) {
            continue;
        }
        let single = time_ours(t, group, &one)?;
        let parallel = time_ours(t, group, &all)?;
        ours.insert(t, (single, parallel));
    }

    eprintln!("running gguf-py's dequantize on {} ...", model.display());
    let output = Command::new(&python)
        .arg("-c")
        .arg(PYTHON_SCRIPT)
        .arg(&model)
        .output()
        .with_context(|| format!("start {}", python.display()))?;
    if !output.status.success() {
        bail!(
            "gguf-py benchmark failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let mut numpy = BTreeMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Some((name, secs)) = line.split_once(' ') else {
            continue;
        };
        let t = GgmlType::from_name(name).with_context(|| format!("unknown type {name}"))?;
        let secs: f64 = secs
            .trim()
            .parse()
            .with_context(|| format!("bad time {secs:?}"))?;
        numpy.insert(t, Duration::from_secs_f64(secs));
    }

    println!(
        "{:<6} {:>7} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "type",
        "tensors",
        "elements",
        "ours 1t",
        format!("ours {threads}t"),
        "numpy",
        "1t/numpy",
        format!("{threads}t/numpy")
    );
    for (t, group) in &groups {
        let Some(&(single, parallel)) = ours.get(t) else {
            println!("{:<6} (not dequantized by byte-tier)", t.name());
            continue;
        };
        let ours_1 = gb_per_s(group.elements, single);
        let ours_n = gb_per_s(group.elements, parallel);
        let (theirs, ratio_1, ratio_n) = match numpy.get(t) {
            Some(&time) => {
                let g = gb_per_s(group.elements, time);
                (
                    format!("{g:.3} GB/s"),
                    format!("{:.1}x", ours_1 / g),
                    format!("{:.1}x", ours_n / g),
                )
            }
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!(
            "{:<6} {:>7} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10}",
            t.name(),
            group.tensors.len(),
            group.elements,
            format!("{ours_1:.2} GB/s"),
            format!("{ours_n:.2} GB/s"),
            theirs,
            ratio_1,
            ratio_n
        );
    }
    grid_table(&python, &one, &all, threads)
}
