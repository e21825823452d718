//! `cargo xtask bench-edit`: in-place edits of the real model against the anchors' way,
//! in the same run: `hotpatch meta set` against gguf-py's gguf-set-metadata, and scaling
//! one Q4_K tensor in place against a rewrite of the file through gguf-py
//! (gguf-new-metadata), both as whole commands, process start included.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const OUR_RUNS: usize = 7;
const GGUF_PY_RUNS: usize = 2;

fn time(command: &mut Command) -> Result<Duration> {
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let start = Instant::now();
    let status = command.status().context("run a timed command")?;
    let elapsed = start.elapsed();
    if !status.success() {
        bail!("{command:?} failed: {status}");
    }
    Ok(elapsed)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run() -> Result<()> {
    crate::run(crate::cargo().args(["build", "--release", "--quiet", "--bin", "hotpatch"]))?;
    let hotpatch = crate::workspace_root().join("target/release/hotpatch");
    let python = crate::env::oracle_python()?;
    let model = crate::env::real_model()?;
    let dir = std::env::temp_dir().join(format!("hotpatch-bench-edit-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let ours = dir.join("ours.gguf");
    let theirs = dir.join("theirs.gguf");
    let rewritten = dir.join("rewritten.gguf");
    let result = (|| -> Result<()> {
        std::fs::copy(&model, &ours)?;
        std::fs::copy(&model, &theirs)?;
        // Warm the page cache for both tools alike.
        std::fs::read(&ours)?;
        std::fs::read(&theirs)?;

        let mut meta = Vec::new();
        for i in 0..OUR_RUNS {
            let value = if i % 2 == 0 { "8192" } else { "32768" };
            meta.push(time(
                Command::new(&hotpatch)
                    .args(["meta", "set"])
                    .arg(&ours)
                    .args(["gemma3.context_length", value]),
            )?);
        }
        let mut set_metadata = Vec::new();
        for i in 0..GGUF_PY_RUNS {
            let value = if i % 2 == 0 { "8192" } else { "32768" };
            set_metadata.push(time(
                Command::new(python.with_file_name("gguf-set-metadata"))
                    .arg("--force")
                    .arg(&theirs)
                    .args(["gemma3.context_length", value]),
            )?);
        }

        let mut scale = Vec::new();
        for i in 0..OUR_RUNS {
            let factor = if i % 2 == 0 { "0.5" } else { "2" };
            scale.push(time(Command::new(&hotpatch).arg("patch").arg(&ours).args(
                ["--tensor", "blk.0.attn_output.weight", "--scale", factor],
            ))?);
        }
        let mut rewrite = Vec::new();
        for _ in 0..GGUF_PY_RUNS {
            rewrite.push(time(
                Command::new(python.with_file_name("gguf-new-metadata"))
                    .arg("--force")
                    .args(["--general-description", "bench"])
                    .arg(&theirs)
                    .arg(&rewritten),
            )?);
        }
        report(&model, &meta, &set_metadata, &scale, &rewrite);
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn report(
    model: &Path,
    meta: &[Duration],
    set_metadata: &[Duration],
    scale: &[Duration],
    rewrite: &[Duration],
) {
    let (meta, set_metadata) = (median(meta.to_vec()), median(set_metadata.to_vec()));
    let (scale, rewrite) = (median(scale.to_vec()), median(rewrite.to_vec()));
    println!("model: {}", model.display());
    println!(
        "                                     ours (median of {OUR_RUNS})   gguf-py (median of {GGUF_PY_RUNS})   ratio"
    );
    println!(
        "meta set (scalar, in place)          {:>10.1} ms          {:>10.1} ms          {:>6.0}x",
        ms(meta),
        ms(set_metadata),
        set_metadata.as_secs_f64() / meta.as_secs_f64()
    );
    println!(
        "scale one Q4_K tensor vs a rewrite   {:>10.1} ms          {:>10.1} ms          {:>6.0}x",
        ms(scale),
        ms(rewrite),
        rewrite.as_secs_f64() / scale.as_secs_f64()
    );
}
