//! `cargo xtask bench-scale [--size GB] [--dir DIR] [--keep]`: hotpatch on a big
//! generated model stored as a shard set, side by side in one run with the program a
//! user would otherwise run for each job, as whole commands:
//!
//! | ours | against |
//! |---|---|
//! | `hotpatch split` / `merge` | `llama-gguf-split --split` / `--merge` (outputs compared byte for byte) |
//! | `hotpatch verify --write-manifest` | `sha256sum` of the shards |
//! | `hotpatch prune -o` (a rewrite of the set) | `cp` of the shards, and `cp` then `sync` of the copies (a rewrite syncs its files) |
//! | `hotpatch requantize -o` to Q4_K | `llama-quantize --pure --keep-split` (same thread count; tensor data compared) |
//! | `hotpatch tensor export` of IQ3_S and IQ2_XXS tensors | gguf-py's `dequantize` and `np.save` |
//! | their decode alone, in memory | gguf-py's `dequantize` alone |
//!
//! plus `hotpatch diff` of the set against its requantized copy, without an anchor.
//! Before each command, ours or the anchor, every pending write is synced and the
//! command's inputs are dropped from the page cache (`posix_fadvise(DONTNEED)`): each
//! starts cold, whichever runs first, and none pays for another's writeback.
//! Each command's wall time gives its throughput over the bytes it reads; its peak
//! anonymous memory (`RssAnon`) and peak resident set (`VmHWM`, which counts the model's
//! mapped pages too) are read from `/proc/PID/status` every few milliseconds.
//!
//! The model is a llama-architecture file with n_embd 4096 and n_ff 11008 (a 7B's
//! shapes) in Q8_0, with as many blocks as reach `--size` (8 GB by default), its blocks
//! filled with pseudo-random quants under a small fixed scale; block 0's ffn_gate and
//! ffn_up are IQ2_XXS and IQ3_S. It is written once, split by both tools into shards
//! of at most 2 GB, and deleted at the end (unless `--keep`). The run needs about three
//! times the model's size on disk.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use byte_tier::{GgmlType, GgufWriter, TensorData, TensorSpec, Value};

const N_EMBD: u64 = 4096;
const N_FF: u64 = 11008;
const N_VOCAB: u64 = 32000;
const SHARD_SIZE: &str = "2G";

/// What a finished command cost.
#[derive(Clone, Copy, Debug, Default)]
struct Cost {
    wall: Duration,
    /// Largest `RssAnon` seen, bytes.
    peak_anon: u64,
    /// `VmHWM` at the last reading, bytes.
    peak_rss: u64,
}

/// A `/proc/PID/status` field in bytes (the file gives kB).
fn status_field(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// Runs `command` to its end, sampling its memory.
fn measure(command: &mut Command) -> Result<Cost> {
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("start {command:?}"))?;
    let pid = child.id();
    let mut stderr = child.stderr.take().context("piped stderr")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut cost = Cost::default();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if let Some(anon) = status_field(pid, "RssAnon:") {
            cost.peak_anon = cost.peak_anon.max(anon);
        }
        if let Some(hwm) = status_field(pid, "VmHWM:") {
            cost.peak_rss = cost.peak_rss.max(hwm);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    cost.wall = start.elapsed();
    let log = reader.join().unwrap_or_default();
    if !status.success() {
        let lines: Vec<&str> = log.lines().collect();
        bail!(
            "{command:?} failed ({status}):\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        );
    }
    Ok(cost)
}

/// Options of the task.
struct Options {
    size_gb: f64,
    dir: Option<PathBuf>,
    keep: bool,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut options = Options {
        size_gb: 8.0,
        dir: None,
        keep: false,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--size" => {
                let text = it.next().context("--size needs a number of GB")?;
                options.size_gb = text
                    .parse()
                    .with_context(|| format!("--size {text:?}: not a number of GB"))?;
                ensure!(options.size_gb >= 0.5, "--size must be at least 0.5 (GB)");
            }
            "--dir" => options.dir = Some(it.next().context("--dir needs a folder")?.into()),
            "--keep" => options.keep = true,
            other => bail!("unknown argument {other:?}: use [--size GB] [--dir DIR] [--keep]"),
        }
    }
    Ok(options)
}

pub fn run(args: &[String]) -> Result<()> {
    let options = parse(args)?;
    if crate::rerun_in_release_with("bench-scale", args)? {
        return Ok(());
    }
    crate::run(crate::cargo().args(["build", "--release", "--quiet", "--bin", "hotpatch"]))?;
    let tools = Tools::find()?;
    let dir = match &options.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("hotpatch-bench-scale-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    let result = bench(&dir, &tools, options.size_gb);
    if !options.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

struct Tools {
    hotpatch: PathBuf,
    gguf_split: PathBuf,
    quantize: PathBuf,
    python: PathBuf,
}

impl Tools {
    fn find() -> Result<Tools> {
        let server = crate::llama_server::llama_server()?;
        Ok(Tools {
            hotpatch: crate::workspace_root().join("target/release/hotpatch"),
            gguf_split: server.with_file_name("llama-gguf-split"),
            quantize: server.with_file_name("llama-quantize"),
            python: crate::env::oracle_python()?,
        })
    }
}

/// A reader of `n` pseudo-random bytes laid out as blocks of `block` bytes, each starting
/// with the f16 scale `scale`.
struct Quants {
    left: u64,
    block: usize,
    scale: [u8; 2],
    at: usize,
    state: u64,
}

impl Quants {
    fn new(n: u64, ggml_type: GgmlType, seed: u64) -> Quants {
        Quants {
            left: n,
            block: ggml_type.block_bytes() as usize,
            // 2^-8 as an f16.
            scale: 0x1c00u16.to_le_bytes(),
            at: 0,
            state: seed | 1,
        }
    }

    fn next(&mut self) -> u8 {
        // xorshift64: cheap, and enough to keep the codecs from meeting runs of zeros.
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state >> 32) as u8
    }
}

impl Read for Quants {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = out
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        for byte in &mut out[..n] {
            *byte = match self.at {
                0 | 1 => self.scale[self.at],
                _ => self.next(),
            };
            self.at = (self.at + 1) % self.block;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn q_tensor(
    name: String,
    dims: [u64; 2],
    ggml_type: GgmlType,
    seed: u64,
) -> Result<TensorSpec<'static>> {
    let n_bytes = ggml_type
        .bytes_for(dims[0] * dims[1])
        .context("a whole number of blocks")?;
    Ok(TensorSpec {
        name,
        dims: dims.to_vec(),
        ggml_type,
        data: TensorData::Reader(Box::new(Quants::new(n_bytes, ggml_type, seed))),
    })
}

fn norm(name: String) -> TensorSpec<'static> {
    let bytes: Vec<u8> = (0..N_EMBD).flat_map(|_| 1.0f32.to_le_bytes()).collect();
    TensorSpec::from_bytes(name, vec![N_EMBD], GgmlType::F32, bytes)
}

/// Writes the generated model of about `size_gb` GB to `path`; returns its block count.
fn generate(path: &Path, size_gb: f64) -> Result<u64> {
    let q8 = |n: u64| n / 32 * 34;
    let per_block = q8(4 * N_EMBD * N_EMBD + 3 * N_EMBD * N_FF);
    let fixed = q8(2 * N_EMBD * N_VOCAB);
    let blocks = ((size_gb * 1e9 - fixed as f64) / per_block as f64)
        .ceil()
        .max(1.0) as u64;
    let mut w = GgufWriter::new();
    w.set("general.architecture", "llama")
        .set("general.name", "hotpatch bench-scale")
        .set("llama.context_length", Value::U32(4096))
        .set("llama.embedding_length", Value::U32(N_EMBD as u32))
        .set("llama.block_count", Value::U32(blocks as u32))
        .set("llama.feed_forward_length", Value::U32(N_FF as u32))
        .set("llama.rope.dimension_count", Value::U32(128))
        .set("llama.attention.head_count", Value::U32(32))
        .set("llama.attention.head_count_kv", Value::U32(32))
        .set("llama.attention.layer_norm_rms_epsilon", Value::F32(1e-5))
        .set("llama.vocab_size", Value::U32(N_VOCAB as u32));
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next_seed = || {
        seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        seed
    };
    w.add_tensor(q_tensor(
        "token_embd.weight".into(),
        [N_EMBD, N_VOCAB],
        GgmlType::Q8_0,
        next_seed(),
    )?);
    for b in 0..blocks {
        let t = |kind: &str| format!("blk.{b}.{kind}.weight");
        w.add_tensor(norm(t("attn_norm")));
        for kind in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            w.add_tensor(q_tensor(
                t(kind),
                [N_EMBD, N_EMBD],
                GgmlType::Q8_0,
                next_seed(),
            )?);
        }
        w.add_tensor(norm(t("ffn_norm")));
        let (gate, up) = if b == 0 {
            (GgmlType::IQ2_XXS, GgmlType::IQ3_S)
        } else {
            (GgmlType::Q8_0, GgmlType::Q8_0)
        };
        w.add_tensor(q_tensor(t("ffn_gate"), [N_EMBD, N_FF], gate, next_seed())?);
        w.add_tensor(q_tensor(t("ffn_up"), [N_EMBD, N_FF], up, next_seed())?);
        w.add_tensor(q_tensor(
            t("ffn_down"),
            [N_FF, N_EMBD],
            GgmlType::Q8_0,
            next_seed(),
        )?);
    }
    w.add_tensor(norm("output_norm.weight".into()));
    w.add_tensor(q_tensor(
        "output.weight".into(),
        [N_EMBD, N_VOCAB],
        GgmlType::Q8_0,
        next_seed(),
    )?);
    w.write_to_path(path)?;
    Ok(blocks)
}

/// The shards `prefix-*-of-*.gguf`, in order.
fn shards(prefix: &Path) -> Result<Vec<PathBuf>> {
    let set = byte_tier::split::ShardSet::open(&byte_tier::split::shard_path(
        prefix,
        0,
        count_of(prefix)?,
    ))?;
    Ok(set.files().iter().map(|f| f.path().to_owned()).collect())
}

/// How many shards the set with this prefix has, read from its first shard's name.
fn count_of(prefix: &Path) -> Result<u32> {
    let dir = prefix.parent().context("a prefix in a folder")?;
    let stem = prefix
        .file_name()
        .and_then(|n| n.to_str())
        .context("a UTF-8 prefix")?;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if let Some(name) = byte_tier::split::parse_shard_name(&path)
            && name.index == 0
            && name.prefix.file_name().and_then(|n| n.to_str()) == Some(stem)
        {
            return Ok(name.count);
        }
    }
    bail!("no first shard of {}", prefix.display())
}

fn total_len(files: &[PathBuf]) -> Result<u64> {
    files.iter().map(|f| Ok(std::fs::metadata(f)?.len())).sum()
}

fn remove(files: &[PathBuf]) -> Result<()> {
    for f in files {
        std::fs::remove_file(f).with_context(|| format!("remove {}", f.display()))?;
    }
    Ok(())
}

fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    Ok(Command::new("cmp")
        .args(["--silent"])
        .arg(a)
        .arg(b)
        .status()?
        .success())
}

/// Every tensor's data of a set, by name.
fn tensor_digests(
    first: &Path,
) -> Result<std::collections::BTreeMap<String, (GgmlType, [u8; 32])>> {
    use sha2::{Digest, Sha256};
    let set = byte_tier::split::ShardSet::open(first)?;
    let mut table = std::collections::BTreeMap::new();
    for file in set.files() {
        let gguf = file.parse()?;
        for t in gguf.tensors() {
            let digest: [u8; 32] = Sha256::digest(gguf.tensor_data(t)).into();
            table.insert(t.name.clone(), (t.ggml_type, digest));
        }
    }
    Ok(table)
}

/// gguf-py's export of tensors (`argv[3:]`) of a file (`argv[1]`) to a .npy file
/// (`argv[2]`), synced as `hotpatch tensor export` syncs its output.
const GGUF_PY_EXPORT: &str = r#"
import os, sys, numpy as np, gguf
from gguf.quants import dequantize
r = gguf.GGUFReader(sys.argv[1])
names = set(sys.argv[3:])
for t in r.tensors:
    if t.name in names:
        with open(sys.argv[2], "wb") as f:
            np.save(f, dequantize(t.data, t.tensor_type))
            f.flush()
            os.fsync(f.fileno())
"#;

/// The seconds gguf-py's `dequantize` takes on tensors (`argv[2:]`) of a file (`argv[1]`),
/// their data already read into memory: the decode alone, printed.
const GGUF_PY_DECODE_SECONDS: &str = r#"
import sys, time, numpy as np, gguf
from gguf.quants import dequantize
r = gguf.GGUFReader(sys.argv[1])
names = set(sys.argv[2:])
total = 0.0
for t in r.tensors:
    if t.name in names:
        data = np.array(t.data)
        start = time.perf_counter()
        values = dequantize(data, t.tensor_type)
        total += time.perf_counter() - start
        del values
print(total)
"#;

/// The decode alone, data in memory, one thread each: byte-tier's dequantization of
/// `names`, a chunk at a time into one buffer as `tensor export` streams it, against
/// gguf-py's `dequantize`, which returns each tensor as one new array (the export rows
/// add the file). Prints one row.
fn decode_line(file: &Path, names: &[&str], bytes: u64, python: &Path) -> Result<()> {
    let map = byte_tier::MappedFile::open(file)?;
    let gguf = map.parse()?;
    // Ours decodes as the export does: a chunk at a time into one buffer.
    const CHUNK: u64 = 1 << 20;
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
    let mut buffer = vec![0f32; CHUNK as usize];
    let mut ours = Duration::ZERO;
    for name in names {
        let tensor = gguf.require_tensor(name)?;
        let data = gguf.tensor_data(tensor).to_vec();
        let start = Instant::now();
        one_thread.install(|| -> Result<()> {
            let mut at = 0;
            while at < tensor.n_elements {
                let end = (at + CHUNK).min(tensor.n_elements);
                let out = &mut buffer[..(end - at) as usize];
                byte_tier::codec::dequantize_range(tensor.ggml_type, &data, at..end, out)?;
                std::hint::black_box(&out[0]);
                at = end;
            }
            Ok(())
        })?;
        ours += start.elapsed();
    }
    let output = Command::new(python)
        .args(["-c", GGUF_PY_DECODE_SECONDS])
        .arg(file)
        .args(names)
        .output()
        .context("run gguf-py's dequantize")?;
    ensure!(
        output.status.success(),
        "gguf-py's dequantize failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let theirs: f64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .context("gguf-py's decode time")?;
    let gbps = |seconds: f64| bytes as f64 / 1e9 / seconds.max(1e-9);
    println!(
        "{:<22} {:>7.2} GB/s {:>32} | {:<18} {:>7.2} GB/s {:>16} | {:>5.2}x",
        "IQ dequantize (decode)",
        gbps(ours.as_secs_f64()),
        "",
        "gguf-py",
        gbps(theirs),
        "",
        theirs / ours.as_secs_f64().max(1e-9),
    );
    Ok(())
}

/// Syncs every pending write and drops `inputs` from the page cache, so that the next
/// command starts cold and pays for no earlier command's writeback.
fn settle(inputs: &[PathBuf]) -> Result<()> {
    let status = Command::new("sync").status().context("run sync")?;
    ensure!(status.success(), "sync failed: {status}");
    for input in inputs {
        byte_tier::evict_from_page_cache(input)?;
    }
    Ok(())
}

/// One row of the report.
fn line(what: &str, bytes: u64, ours: Cost, theirs: Option<(&str, Cost)>) {
    let gbps = |c: Cost| bytes as f64 / 1e9 / c.wall.as_secs_f64();
    let mb = |b: u64| b as f64 / 1e6;
    match theirs {
        Some((name, t)) => println!(
            "{what:<22} {:>7.2} GB/s  anon {:>7.1} MB  rss {:>7.1} MB | {name:<18} {:>7.2} GB/s  anon {:>7.1} MB | {:>5.2}x",
            gbps(ours),
            mb(ours.peak_anon),
            mb(ours.peak_rss),
            gbps(t),
            mb(t.peak_anon),
            t.wall.as_secs_f64() / ours.wall.as_secs_f64(),
        ),
        None => println!(
            "{what:<22} {:>7.2} GB/s  anon {:>7.1} MB  rss {:>7.1} MB",
            gbps(ours),
            mb(ours.peak_anon),
            mb(ours.peak_rss),
        ),
    }
}

fn bench(dir: &Path, tools: &Tools, size_gb: f64) -> Result<()> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let big = dir.join("big.gguf");
    let blocks = generate(&big, size_gb)?;
    let size = std::fs::metadata(&big)?.len();
    println!(
        "model: llama shapes (n_embd {N_EMBD}, n_ff {N_FF}), {blocks} blocks, Q8_0 with IQ2_XXS and IQ3_S in block 0, {:.2} GB; {threads} threads; throughput over the bytes read",
        size as f64 / 1e9
    );
    let hp = || Command::new(&tools.hotpatch);

    // Split and merge, against llama-gguf-split.
    let ours = dir.join("ours");
    let theirs = dir.join("theirs");
    let inputs = [big.clone()];
    settle(&inputs)?;
    let split_ours = measure(
        hp().arg("split")
            .arg(&big)
            .arg(&ours)
            .args(["--split-max-size", SHARD_SIZE]),
    )?;
    settle(&inputs)?;
    let split_theirs = measure(
        Command::new(&tools.gguf_split)
            .args(["--split", "--split-max-size", SHARD_SIZE])
            .arg(&big)
            .arg(&theirs),
    )?;
    let set = shards(&ours)?;
    let their_set = shards(&theirs)?;
    ensure!(
        set.len() == their_set.len(),
        "the tools split into different counts"
    );
    for (a, b) in set.iter().zip(&their_set) {
        ensure!(
            same_bytes(a, b)?,
            "{} and {} differ",
            a.display(),
            b.display()
        );
    }
    line(
        "split",
        size,
        split_ours,
        Some(("llama-gguf-split", split_theirs)),
    );
    remove(&their_set)?;
    std::fs::remove_file(&big)?;
    let merged_ours = dir.join("merged-ours.gguf");
    let merged_theirs = dir.join("merged-theirs.gguf");
    settle(&set)?;
    let merge_ours = measure(hp().arg("merge").arg(&set[0]).arg(&merged_ours))?;
    settle(&set)?;
    let merge_theirs = measure(
        Command::new(&tools.gguf_split)
            .arg("--merge")
            .arg(&set[0])
            .arg(&merged_theirs),
    )?;
    ensure!(
        same_bytes(&merged_ours, &merged_theirs)?,
        "the merged files differ"
    );
    line(
        "merge",
        size,
        merge_ours,
        Some(("llama-gguf-split", merge_theirs)),
    );
    remove(&[merged_ours, merged_theirs])?;
    println!(
        "  {} shards, byte-identical to llama-gguf-split's; merged files identical",
        set.len()
    );

    // Verify (a manifest of every tensor, and a NaN scan), against sha256sum.
    let manifest = dir.join("set.sha256");
    settle(&set)?;
    let verify = measure(
        hp().arg("verify")
            .arg(&set[0])
            .arg("--write-manifest")
            .arg(&manifest),
    )?;
    settle(&set)?;
    let sha = measure(Command::new("sha256sum").args(&set))?;
    line("verify", size, verify, Some(("sha256sum", sha)));

    // Prune one block: a rewrite of the whole set, against copying it.
    let pruned = dir.join("pruned.gguf");
    settle(&set)?;
    let prune = measure(
        hp().arg("prune")
            .arg(&set[0])
            .args(["--layers", "1", "-o"])
            .arg(&pruned),
    )?;
    let pruned_set = shards(&dir.join("pruned"))?;
    remove(&pruned_set)?;
    let copy_dir = dir.join("copies");
    std::fs::create_dir_all(&copy_dir)?;
    settle(&set)?;
    let cp_cost = measure(Command::new("cp").args(&set).arg(&copy_dir))?;
    // A rewrite is synced before it is renamed in; `cp` leaves its copy in the page
    // cache. The second anchor makes the copy as durable.
    let copies: Vec<PathBuf> = set
        .iter()
        .filter_map(|s| s.file_name().map(|n| copy_dir.join(n)))
        .collect();
    let sync_cost = measure(Command::new("sync").args(&copies))?;
    let durable_cp = Cost {
        wall: cp_cost.wall + sync_cost.wall,
        peak_anon: cp_cost.peak_anon.max(sync_cost.peak_anon),
        peak_rss: cp_cost.peak_rss.max(sync_cost.peak_rss),
    };
    std::fs::remove_dir_all(&copy_dir)?;
    line("prune (rewrite)", size, prune, Some(("cp", cp_cost)));
    line(
        "prune (rewrite)",
        size,
        prune,
        Some(("cp, then sync", durable_cp)),
    );

    // Requantize every matrix to Q4_K, against llama-quantize on the same threads.
    let matrices =
        r"^(token_embd|output|blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down)))\.weight$";
    let ours_q = dir.join("rq-ours.gguf");
    let theirs_q = dir.join("rq-theirs.gguf");
    settle(&set)?;
    let rq_ours = measure(
        hp().env("RAYON_NUM_THREADS", threads.to_string())
            .arg("requantize")
            .arg(&set[0])
            .args(["--tensors", matrices, "--type", "Q4_K", "-o"])
            .arg(&ours_q),
    )?;
    settle(&set)?;
    let rq_theirs = measure(
        Command::new(&tools.quantize)
            .args(["--allow-requantize", "--pure", "--keep-split"])
            .arg(&set[0])
            .arg(&theirs_q)
            .args(["Q4_K", &threads.to_string()]),
    )?;
    let ours_rq_set = shards(&dir.join("rq-ours"))?;
    let theirs_rq_set = shards(&dir.join("rq-theirs"))?;
    let (a, b) = (
        tensor_digests(&ours_rq_set[0])?,
        tensor_digests(&theirs_rq_set[0])?,
    );
    ensure!(
        a.len() == b.len(),
        "the requantized sets hold different tensors"
    );
    let differing: Vec<&String> = a
        .iter()
        .filter(|(name, v)| b.get(*name) != Some(v))
        .map(|(name, _)| name)
        .collect();
    ensure!(
        differing.is_empty(),
        "tensors differ from llama-quantize's: {differing:?}"
    );
    line(
        "requantize Q4_K",
        size,
        rq_ours,
        Some(("llama-quantize", rq_theirs)),
    );
    println!(
        "  every tensor's bytes equal llama-quantize's ({} tensors)",
        a.len()
    );
    remove(&theirs_rq_set)?;

    // Diff of the set against its requantized copy (every tensor decoded on both sides).
    let diff = measure(hp().arg("diff").arg(&set[0]).arg(&ours_rq_set[0]))?;
    line("diff", size + total_len(&ours_rq_set)?, diff, None);
    remove(&ours_rq_set)?;

    // Dequantize the grid IQ tensors, against gguf-py.
    let holder = byte_tier::split::file_holding_tensor(&set[0], "blk.0.ffn_up.weight")?;
    let iq_names = ["blk.0.ffn_gate.weight", "blk.0.ffn_up.weight"];
    let iq_bytes = GgmlType::IQ2_XXS.bytes_for(N_EMBD * N_FF).unwrap_or(0)
        + GgmlType::IQ3_S.bytes_for(N_EMBD * N_FF).unwrap_or(0);
    let mut export = Cost::default();
    for name in iq_names {
        let cost = measure(
            hp().args(["tensor", "export"])
                .arg(&holder)
                .arg(name)
                .arg("-o")
                .arg(dir.join("iq.npy")),
        )?;
        export.wall += cost.wall;
        export.peak_anon = export.peak_anon.max(cost.peak_anon);
        export.peak_rss = export.peak_rss.max(cost.peak_rss);
    }
    let py = measure(
        Command::new(&tools.python)
            .args(["-c", GGUF_PY_EXPORT])
            .arg(&holder)
            .arg(dir.join("py.npy"))
            .args(iq_names),
    )?;
    line(
        "IQ dequantize (export)",
        iq_bytes,
        export,
        Some(("gguf-py", py)),
    );
    std::fs::remove_file(dir.join("iq.npy")).ok();
    std::fs::remove_file(dir.join("py.npy")).ok();
    decode_line(&holder, &iq_names, iq_bytes, &tools.python)?;
    println!("  anon: peak RssAnon; rss: peak resident set, mapped model pages included");
    Ok(())
}
