//! `cargo xtask bench-live`: latency of live patches under page protection: apply and
//! revert of one 4 KiB patch (p50, p99), and 100 adjacent patches batched in one
//! transaction against applied one by one (windows, protection calls, time).

use std::time::{Duration, Instant};

use anyhow::Result;
use byte_tier::{GgmlType, GgufWriter, TensorSpec};
use memory_tier::{AttachMode, LiveModel, MemoryPatch, PatchTarget, Payload};

const ROUNDS: usize = 5_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub fn run() -> Result<()> {
    if crate::rerun_in_release("bench-live")? {
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("hotpatch-bench-live-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("bench.gguf");
    let mut w = GgufWriter::new();
    w.set("general.architecture", "bench");
    w.add_tensor(TensorSpec::from_bytes(
        "w",
        vec![1 << 20],
        GgmlType::F32,
        vec![0u8; 4 << 20],
    ));
    w.write_to_path(&path)?;
    let result = measure(&path);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn patch(name: String, start: u64, len: u64, byte: u8) -> MemoryPatch {
    MemoryPatch::new(
        name,
        PatchTarget::Raw(start..start + len),
        Payload::Bytes(vec![byte; len as usize]),
    )
}

fn measure(path: &std::path::Path) -> Result<()> {
    let model = LiveModel::attach(path, AttachMode::Owned)?;
    let base = model.tensor("w")?.data_offset;
    let mut apply = Vec::with_capacity(ROUNDS);
    let mut revert = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS {
        let offset = base + (i as u64 % 512) * 8192;
        let start = Instant::now();
        let id = model.apply(patch(format!("p{i}"), offset, 4096, 0x5a))?;
        apply.push(start.elapsed());
        let start = Instant::now();
        model.revert(id)?;
        revert.push(start.elapsed());
    }
    apply.sort();
    revert.sort();
    println!("one 4 KiB patch, {ROUNDS} rounds (owned copy, page protection on):");
    println!(
        "  apply   p50 {:>8.1} us   p99 {:>8.1} us",
        us(percentile(&apply, 0.5)),
        us(percentile(&apply, 0.99))
    );
    println!(
        "  revert  p50 {:>8.1} us   p99 {:>8.1} us",
        us(percentile(&revert, 0.5)),
        us(percentile(&revert, 0.99))
    );

    let patches = || {
        (0..100u64)
            .map(|i| patch(format!("b{i}"), base + i * 64, 32, 0x77))
            .collect::<Vec<_>>()
    };
    let one_by_one = LiveModel::attach(path, AttachMode::Owned)?;
    let start = Instant::now();
    for p in patches() {
        one_by_one.apply(p)?;
    }
    let unbatched = start.elapsed();
    let batched_model = LiveModel::attach(path, AttachMode::Owned)?;
    let start = Instant::now();
    batched_model.apply_all(patches())?;
    let batched = start.elapsed();
    let (u, b) = (one_by_one.stats(), batched_model.stats());
    println!("100 adjacent 32-byte patches:");
    println!(
        "  one by one  {:>8.1} us  windows {:>4}  protection calls {:>4}",
        us(unbatched),
        u.windows_opened,
        u.protection_calls
    );
    println!(
        "  batched     {:>8.1} us  windows {:>4}  protection calls {:>4}   ({:.1}x faster)",
        us(batched),
        b.windows_opened,
        b.protection_calls,
        unbatched.as_secs_f64() / batched.as_secs_f64()
    );
    Ok(())
}
