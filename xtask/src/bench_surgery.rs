//! `cargo xtask bench-surgery`: directional ablation and LoRA merge on the real model,
//! side by side in one run with the pipeline a user runs today, each as whole commands
//! (process start included), with time per GB of model and each side's peak resident
//! memory.
//!
//! - Ablation of every residual writer (attn_output, ffn_down, token_embd):
//!   ours, `hotpatch ablate` in place, each tensor requantized to its own type; the
//!   anchor, `llama-quantize --allow-requantize … F32` to dequantize, numpy (through
//!   gguf-py's reader, in place on the F32 file) for the math, and `llama-quantize …
//!   Q4_K_M` back.
//! - LoRA merge of a rank-8 adapter on the attention tensors: ours, `hotpatch lora
//!   merge` in place; the anchor, `llama-export-lora` (which writes F16) and
//!   `llama-quantize … Q4_K_M`.
//!
//! Peak memory is each process's maximum resident set (`wait4`'s `ru_maxrss`); a
//! pipeline's is the largest of its steps'.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A finished command's wall time and peak resident memory.
#[derive(Clone, Copy, Debug, Default)]
struct Cost {
    wall: Duration,
    peak_rss_bytes: u64,
}

impl Cost {
    /// Two steps run one after the other.
    fn then(self, next: Cost) -> Cost {
        Cost {
            wall: self.wall + next.wall,
            peak_rss_bytes: self.peak_rss_bytes.max(next.peak_rss_bytes),
        }
    }
}

/// Runs `command` to its end, measuring it with `wait4`.
fn measure(command: &mut Command) -> Result<Cost> {
    command.stdout(Stdio::null()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = command
        .spawn()
        .with_context(|| format!("start {command:?}"))?;
    let mut stderr = child.stderr.take().context("piped stderr")?;
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
        text
    });
    let pid = libc::pid_t::try_from(child.id()).context("a pid fits pid_t")?;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our child, not yet waited for; `status` and `usage` are valid
    // out-pointers for the duration of the call.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let wall = start.elapsed();
    if waited != pid {
        bail!("wait4 on {command:?}: {}", std::io::Error::last_os_error());
    }
    let log = reader.join().unwrap_or_default();
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        let lines: Vec<&str> = log.lines().collect();
        bail!(
            "{command:?} failed (wait status {status}):\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        );
    }
    // The child was reaped by wait4; std's handle must not wait for it again.
    std::mem::forget(child);
    Ok(Cost {
        wall,
        // Linux reports ru_maxrss in KiB.
        peak_rss_bytes: u64::try_from(usage.ru_maxrss).unwrap_or(0) * 1024,
    })
}

const NUMPY_ABLATE: &str = r#"
import sys, numpy as np, gguf
path, d = sys.argv[1], np.load(sys.argv[2]).astype(np.float64)
r = (d / np.sqrt(np.sum(d * d))).astype(np.float32)
reader = gguf.GGUFReader(path, "r+")
norms = {t.name: np.array(t.data, dtype=np.float32) for t in reader.tensors if t.name.endswith(("post_attention_norm.weight", "post_ffw_norm.weight"))}
for t in reader.tensors:
    if not t.name.endswith(("attn_output.weight", "ffn_down.weight")) and t.name != "token_embd.weight":
        continue
    w = t.data  # float32, rows of ne[0] values: a view of the file
    if t.name == "token_embd.weight":
        w -= np.outer(w @ r, r)  # each embedding row e becomes e - (e.r) r
    else:
        # behind a post-norm with weight g the output loses its component along g*r
        post = t.name.replace("attn_output", "post_attention_norm").replace("ffn_down", "post_ffw_norm")
        u = r if post not in norms else norms[post] * r
        u = (u / np.sqrt(np.sum(u.astype(np.float64) ** 2))).astype(np.float32)
        w -= np.outer(u, u @ w)  # each output column loses its component along u
reader.data.flush()
"#;

pub fn run() -> Result<()> {
    if crate::rerun_in_release("bench-surgery")? {
        return Ok(());
    }
    crate::run(crate::cargo().args(["build", "--release", "--quiet", "--bin", "hotpatch"]))?;
    let hotpatch = crate::workspace_root().join("target/release/hotpatch");
    let python = crate::env::oracle_python()?;
    let model = crate::env::real_model()?;
    let server = crate::llama_server::llama_server()?;
    let quantize = server.with_file_name("llama-quantize");
    let export_lora = server.with_file_name("llama-export-lora");
    let dir = std::env::temp_dir().join(format!("hotpatch-bench-surgery-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = bench(&dir, &hotpatch, &python, &model, &quantize, &export_lora);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn bench(
    dir: &Path,
    hotpatch: &Path,
    python: &Path,
    model: &Path,
    quantize: &Path,
    export_lora: &Path,
) -> Result<()> {
    let mapped = byte_tier::MappedFile::open(model)?;
    let gguf = mapped.parse()?;
    let n_embd = gguf
        .tensor("token_embd.weight")
        .context("the model has no token_embd.weight")?
        .dims[0];
    let gb = std::fs::metadata(model)?.len() as f64 / 1e9;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "bench-surgery on {} ({gb:.3} GB, n_embd {n_embd}), {threads} threads for every tool",
        model.display()
    );

    // A fixed direction, the same for both sides.
    let direction = dir.join("direction.npy");
    let values: Vec<f32> = (0..n_embd)
        .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0)
        .collect();
    byte_tier::codec::write_tensor_npy(&direction, &[n_embd], &values)?;
    let adapter = dir.join("adapter.gguf");
    tests::write_lora_adapter(model, &adapter, 8);

    let copy = |name: &str| -> Result<std::path::PathBuf> {
        let path = dir.join(name);
        std::fs::copy(model, &path)?;
        Ok(path)
    };
    // Read the model once so that both sides start from a warm page cache.
    std::fs::read(model)?;

    // Ablation.
    let ours_model = copy("ablate-ours.gguf")?;
    let ours_ablate = measure(
        Command::new(hotpatch)
            .arg("ablate")
            .arg(&ours_model)
            .arg("--direction")
            .arg(&direction),
    )?;
    let f32_model = dir.join("ablate-f32.gguf");
    let requantized = dir.join("ablate-theirs.gguf");
    let dequantize = measure(
        Command::new(quantize)
            .arg("--allow-requantize")
            .arg(model)
            .arg(&f32_model)
            .arg("F32")
            .arg(threads.to_string()),
    )?;
    let numpy = measure(
        Command::new(python)
            .args(["-c", NUMPY_ABLATE])
            .arg(&f32_model)
            .arg(&direction),
    )?;
    let back = measure(
        Command::new(quantize)
            .arg(&f32_model)
            .arg(&requantized)
            .arg("Q4_K_M")
            .arg(threads.to_string()),
    )?;
    let their_ablate = dequantize.then(numpy).then(back);
    report(
        "ablate every residual writer",
        gb,
        ours_ablate,
        their_ablate,
        &format!(
            "llama-quantize to F32 {:.1} s, numpy {:.1} s, llama-quantize to Q4_K_M {:.1} s",
            dequantize.wall.as_secs_f64(),
            numpy.wall.as_secs_f64(),
            back.wall.as_secs_f64()
        ),
    );
    for path in [&f32_model, &requantized, &ours_model] {
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_file(byte_tier::journal_path(&ours_model));

    // LoRA merge.
    let ours_model = copy("merge-ours.gguf")?;
    let ours_merge = measure(
        Command::new(hotpatch)
            .args(["lora", "merge"])
            .arg(&ours_model)
            .arg(&adapter),
    )?;
    let f16_model = dir.join("merge-f16.gguf");
    let merged = dir.join("merge-theirs.gguf");
    let export = measure(
        Command::new(export_lora)
            .arg("-m")
            .arg(model)
            .arg("--lora")
            .arg(&adapter)
            .arg("-o")
            .arg(&f16_model)
            .args(["-t", &threads.to_string()]),
    )?;
    let back = measure(
        Command::new(quantize)
            .arg("--allow-requantize")
            .arg(&f16_model)
            .arg(&merged)
            .arg("Q4_K_M")
            .arg(threads.to_string()),
    )?;
    let f16_size = std::fs::metadata(&f16_model)?.len();
    let their_merge = export.then(back);
    report(
        "merge a rank-8 LoRA adapter",
        gb,
        ours_merge,
        their_merge,
        &format!(
            "llama-export-lora {:.1} s (writes {:.0} MB of F16), llama-quantize {:.1} s",
            export.wall.as_secs_f64(),
            f16_size as f64 / 1e6,
            back.wall.as_secs_f64()
        ),
    );
    Ok(())
}

fn report(what: &str, gb: f64, ours: Cost, theirs: Cost, steps: &str) {
    let mb = |c: Cost| c.peak_rss_bytes as f64 / 1e6;
    println!("\n{what}");
    println!(
        "  hotpatch        {:>7.2} s  {:>7.2} s/GB  peak RSS {:>7.0} MB",
        ours.wall.as_secs_f64(),
        ours.wall.as_secs_f64() / gb,
        mb(ours)
    );
    println!(
        "  today's tools   {:>7.2} s  {:>7.2} s/GB  peak RSS {:>7.0} MB  ({steps})",
        theirs.wall.as_secs_f64(),
        theirs.wall.as_secs_f64() / gb,
        mb(theirs)
    );
    println!(
        "  ratio           {:.2}x faster, {:.2}x less peak memory",
        theirs.wall.as_secs_f64() / ours.wall.as_secs_f64(),
        mb(theirs) / mb(ours).max(1e-9)
    );
}
