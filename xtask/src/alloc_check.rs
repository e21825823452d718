//! `alloc-check`: runs neural-alloc's tests, and memory-tier's region logic, under Miri,
//! which checks every unsafe operation as it runs (out-of-bounds and use-after-free accesses,
//! aliasing and provenance under Stacked Borrows, data races between threads, leaks).
//!
//! Needs the nightly toolchain with the `miri` and `rust-src` components
//! (`rustup +nightly component add miri rust-src`). Both the unit tests and the
//! integration tests run: the integration test binary installs the allocator as its
//! global allocator, so Miri also sees the allocator serve the test harness, threads
//! and std collections, which is where aliasing mistakes with `Box` show. Tests shrink
//! their loops under `cfg(miri)`; the whole check takes several minutes.

use std::process::Command;

use anyhow::{Context, bail};

/// Strict provenance: the allocator derives every block pointer from its slab's or its
/// header's pointer, never from a bare integer, so Miri may hold it to that.
const MIRI_FLAGS: &str = "-Zmiri-strict-provenance";

/// Test targets run under Miri, in order, with the Miri flags each needs: neural-alloc's
/// unit and integration tests, and memory-tier's region logic on memory the tests own
/// (its page protection is off under Miri, which has none; everything else, aliasing and
/// races included, is checked). The live model timestamps its history with the wall
/// clock, which Miri's isolation hides, so isolation is off for it.
const TARGETS: [(&[&str], &str); 3] = [
    (&["-p", "neural-alloc", "--lib"], MIRI_FLAGS),
    (&["-p", "neural-alloc", "--test", "it"], MIRI_FLAGS),
    (
        &["-p", "memory-tier", "--lib", "live::tests"],
        "-Zmiri-strict-provenance -Zmiri-disable-isolation",
    ),
];

/// Runs `cargo +nightly miri test` on each target and fails if any does.
pub fn run() -> anyhow::Result<()> {
    for (target, flags) in TARGETS {
        let status = Command::new("cargo")
            .args(["+nightly", "miri", "test"])
            .args(target)
            .env("MIRIFLAGS", flags)
            .status()
            .context("running `cargo +nightly miri` (are the nightly miri and rust-src components installed?)")?;
        if !status.success() {
            bail!(
                "the tests ({}) failed under Miri ({status})",
                target.join(" ")
            );
        }
    }
    Ok(())
}
