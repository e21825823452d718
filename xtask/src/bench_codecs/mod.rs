//! `cargo xtask bench-codecs`: dequantization speed on the real model, ours against
//! ggml's own `to_float` and gguf-py's numpy code, measured in the same run on the same
//! tensors.
//!
//! For every tensor type in the model it times our `codec::dequantize_range` over all
//! tensors of that type on one thread and on every thread (best of a few runs), then
//! ggml's `to_float` for that type on one thread, through a small C program
//! (`to_float.c`) compiled here against the llama.cpp build that `cargo xtask
//! llama-server` keeps in the cache (best of as many runs), then gguf-py's
//! `gguf.quants.dequantize` over the same tensors in the oracle's Python (best of two
//! runs). It prints a table of throughputs (GB/s of f32 produced) with the ratios ours /
//! ggml and ours / numpy, and the SIMD level our kernels ran at (`HOTPATCH_SIMD` forces
//! one). The oracle and the model are found as the integration tests find them:
//! `HOTPATCH_ORACLE_PYTHON` and `HOTPATCH_REAL_MODEL`, or the shared cache.
//!
//! The real model holds no grid IQ tensors, so a second table times those types the
//! same way on generated blocks (random codes under a small finite scale, 4 Mi
//! elements per type), written to a temporary file that gguf-py reads back.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
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

/// The C program that times ggml's `to_float`.
const TO_FLOAT_C: &str = include_str!("to_float.c");

/// Compiles the `to_float` program in `dir` against the cached llama.cpp build (its
/// `ggml.h` and `libggml-base`), building llama.cpp first if it is missing.
fn build_to_float(dir: &Path) -> Result<PathBuf> {
    compile_against_ggml(dir, "to_float", TO_FLOAT_C)
}

/// Compiles the C program `source` as `dir/name` against the cached llama.cpp build (its
/// `ggml.h` and `libggml-base`, found at run time through an rpath), building llama.cpp
/// first if it is missing.
pub(crate) fn compile_against_ggml(dir: &Path, name: &str, source: &str) -> Result<PathBuf> {
    let server = crate::llama_server::llama_server()?;
    let lib_dir = server
        .parent()
        .context("llama-server has no parent folder")?
        .to_path_buf();
    let include = crate::llama_server::source_dir()?
        .join("ggml")
        .join("include");
    let source_path = dir.join(format!("{name}.c"));
    std::fs::write(&source_path, source)
        .with_context(|| format!("write {}", source_path.display()))?;
    let binary = dir.join(name);
    let mut rpath = std::ffi::OsString::from("-Wl,-rpath,");
    rpath.push(&lib_dir);
    crate::run(
        Command::new(std::env::var_os("CC").unwrap_or_else(|| "cc".into()))
            .arg("-O2")
            .arg("-I")
            .arg(&include)
            .arg(&source_path)
            .arg("-L")
            .arg(&lib_dir)
            .arg("-lggml-base")
            .arg(rpath)
            .arg("-o")
            .arg(&binary),
    )?;
    Ok(binary)
}

/// Best time of ggml's `to_float` over every tensor of `group` on one thread, or `None`
/// when ggml has no `to_float` for the type. The tensors are written end to end to a
/// file in `dir` that the C program reads.
fn time_ggml(
    to_float: &Path,
    dir: &Path,
    t: GgmlType,
    group: &Group<'_>,
) -> Result<Option<Duration>> {
    let path = dir.join(format!("{}.ggml.bin", t.name()));
    let mut counts = Vec::with_capacity(group.tensors.len());
    {
        let mut file = std::io::BufWriter::new(
            std::fs::File::create(&path).with_context(|| format!("create {}", path.display()))?,
        );
        for data in &group.tensors {
            file.write_all(data)?;
            counts.push(codec::element_count(t, data.len())?.to_string());
        }
        file.flush()?;
    }
    let output = Command::new(to_float)
        .arg(OUR_RUNS.to_string())
        .arg((t as u32).to_string())
        .arg(&path)
        .args(&counts)
        .output()
        .with_context(|| format!("start {}", to_float.display()))?;
    std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
    if output.status.code() == Some(3) {
        return Ok(None);
    }
    Ok(Some(ggml_time(
        &output,
        &format!("ggml's to_float for {}", t.name()),
    )?))
}

/// The best time a timing program built by [`compile_against_ggml`] printed (seconds on
/// its standard output), or its failure, naming `what` it ran.
pub(crate) fn ggml_time(output: &std::process::Output, what: &str) -> Result<Duration> {
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let secs: f64 = text
        .trim()
        .parse()
        .with_context(|| format!("bad time {text:?} from {what}"))?;
    Ok(Duration::from_secs_f64(secs))
}

/// A ratio cell, or `-` when the other side has no time.
fn ratio(ours: f64, theirs: Option<f64>) -> String {
    theirs.map_or_else(|| "-".into(), |g| format!("{:.2}x", ours / g))
}

/// A throughput cell, or `-`.
fn throughput(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |g| format!("{g:.3} GB/s"))
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
fn grid_rows(
    python: &Path,
    to_float: &Path,
    one: &rayon::ThreadPool,
    all: &rayon::ThreadPool,
    threads: usize,
    dir: &Path,
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
        let ggml = time_ggml(to_float, dir, t, &group)?;
        ours.insert(
            t,
            (time_ours(t, &group, one)?, time_ours(t, &group, all)?, ggml),
        );
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
        "\n{:<8} {:>9} {:>11} {:>11} {:>11} {:>12} {:>8} {:>9} {:>9}",
        "grid",
        "elements",
        "ours 1t",
        format!("ours {threads}t"),
        "ggml 1t",
        "numpy",
        "1t/ggml",
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
        let Some(&(single, parallel, ggml)) = ours.get(&t) else {
            continue;
        };
        let theirs = gb_per_s(GRID_ELEMENTS, Duration::from_secs_f64(secs));
        let ggml = ggml.map(|time| gb_per_s(GRID_ELEMENTS, time));
        let (ours_1, ours_n) = (
            gb_per_s(GRID_ELEMENTS, single),
            gb_per_s(GRID_ELEMENTS, parallel),
        );
        println!(
            "{:<8} {:>9} {:>11} {:>11} {:>11} {:>12} {:>8} {:>9} {:>9}",
            t.name(),
            GRID_ELEMENTS,
            format!("{ours_1:.2} GB/s"),
            format!("{ours_n:.2} GB/s"),
            throughput(ggml),
            format!("{theirs:.3} GB/s"),
            ratio(ours_1, ggml),
            ratio(ours_1, Some(theirs)),
            ratio(ours_n, Some(theirs))
        );
    }
    Ok(())
}

/// Times our dequantization and gguf-py's on the real model and prints the table.
pub fn run() -> Result<()> {
    if crate::rerun_in_release("bench-codecs")? {
        return Ok(());
    }
    // A misspelt HOTPATCH_SIMD would otherwise time the detected level unnoticed.
    codec::requested_simd_level()?;
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

    let dir = std::env::temp_dir().join(format!("hotpatch-bench-codecs-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = tables(&groups, &python, &model, &dir);
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    result
}

/// Builds the `to_float` program in `dir`, times every side and prints both tables.
fn tables(
    groups: &BTreeMap<GgmlType, Group<'_>>,
    python: &Path,
    model: &Path,
    dir: &Path,
) -> Result<()> {
    let to_float = build_to_float(dir)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let all = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let mut ours = BTreeMap::new();
    for (&t, group) in groups {
        if !codec::can_dequantize(t) {
            continue;
        }
        let single = time_ours(t, group, &one)?;
        let parallel = time_ours(t, group, &all)?;
        let ggml = time_ggml(&to_float, dir, t, group)?;
        ours.insert(t, (single, parallel, ggml));
    }

    eprintln!("running gguf-py's dequantize on {} ...", model.display());
    let output = Command::new(python)
        .arg("-c")
        .arg(PYTHON_SCRIPT)
        .arg(model)
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

    println!("SIMD level of our kernels: {}", codec::simd_level().name());
    println!(
        "{:<6} {:>7} {:>9} {:>11} {:>11} {:>11} {:>12} {:>8} {:>9} {:>9}",
        "type",
        "tensors",
        "elements",
        "ours 1t",
        format!("ours {threads}t"),
        "ggml 1t",
        "numpy",
        "1t/ggml",
        "1t/numpy",
        format!("{threads}t/numpy")
    );
    for (t, group) in groups {
        let Some(&(single, parallel, ggml)) = ours.get(t) else {
            println!("{:<6} (not dequantized by byte-tier)", t.name());
            continue;
        };
        let ours_1 = gb_per_s(group.elements, single);
        let ours_n = gb_per_s(group.elements, parallel);
        let ggml = ggml.map(|time| gb_per_s(group.elements, time));
        let theirs = numpy.get(t).map(|&time| gb_per_s(group.elements, time));
        println!(
            "{:<6} {:>7} {:>9} {:>11} {:>11} {:>11} {:>12} {:>8} {:>9} {:>9}",
            t.name(),
            group.tensors.len(),
            group.elements,
            format!("{ours_1:.2} GB/s"),
            format!("{ours_n:.2} GB/s"),
            throughput(ggml),
            throughput(theirs),
            ratio(ours_1, ggml),
            ratio(ours_1, theirs),
            ratio(ours_n, theirs)
        );
    }
    grid_rows(python, &to_float, &one, &all, threads, dir)
}
