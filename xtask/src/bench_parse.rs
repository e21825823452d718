//! `cargo xtask bench-parse`: parse time of the real model, ours against gguf-py's
//! GGUFReader on the same file in the same run.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use byte_tier::MappedFile;

const OUR_RUNS: usize = 50;
const GGUF_PY_RUNS: usize = 2;

const GGUF_PY_TIMING: &str = r#"
import sys, time
from gguf import GGUFReader
best = float("inf")
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    reader = GGUFReader(sys.argv[1])
    best = min(best, time.perf_counter() - start)
    assert len(reader.tensors) > 0
print(best)
"#;

pub fn run() -> Result<()> {
    if crate::rerun_in_release("bench-parse")? {
        return Ok(());
    }
    let python = crate::env::oracle_python()?;
    let model = crate::env::real_model()?;

    let mut ours = Vec::with_capacity(OUR_RUNS);
    let mut checksum = 0usize;
    for _ in 0..OUR_RUNS {
        let start = Instant::now();
        let file = MappedFile::open(&model)?;
        let gguf = file.parse()?;
        checksum += gguf.tensors().len() + gguf.metadata().len();
        ours.push(start.elapsed());
    }
    ours.sort();
    let our_best = ours[0];
    let our_median = ours[ours.len() / 2];

    let output = Command::new(&python)
        .arg("-c")
        .arg(GGUF_PY_TIMING)
        .arg(&model)
        .arg(GGUF_PY_RUNS.to_string())
        .output()
        .context("run gguf-py")?;
    if !output.status.success() {
        bail!(
            "gguf-py failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let theirs = Duration::from_secs_f64(String::from_utf8(output.stdout)?.trim().parse()?);

    println!(
        "model: {} ({} parses, check {checksum})",
        model.display(),
        OUR_RUNS
    );
    println!(
        "byte-tier parse      best {:>10.3} ms   median {:>10.3} ms",
        ms(our_best),
        ms(our_median)
    );
    println!(
        "gguf-py GGUFReader   best {:>10.3} ms   ({GGUF_PY_RUNS} runs)",
        ms(theirs)
    );
    println!(
        "ratio (gguf-py / ours, medians vs best): {:.0}x",
        theirs.as_secs_f64() / our_median.as_secs_f64()
    );
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
