//! `alloc-check`: runs neural-alloc's unit tests under Miri, which checks every unsafe
//! operation of the allocator as it runs (out-of-bounds and use-after-free accesses,
//! aliasing, pointer provenance, data races between threads, leaks).
//!
//! Needs the nightly toolchain with the `miri` and `rust-src` components
//! (`rustup +nightly component add miri rust-src`). The unit tests shrink their loops
//! under `cfg(miri)`; the integration tests are left to the normal test run because
//! their harness, which allocates through the allocator under test, makes Miri slow.

use std::process::Command;

use anyhow::{Context, bail};

/// Strict provenance: the allocator derives every block pointer from its slab's pointer
/// (masking with `with_addr`), never from a bare integer, so Miri may hold it to that.
const MIRI_FLAGS: &str = "-Zmiri-strict-provenance";

/// Runs `cargo +nightly miri test -p neural-alloc --lib` and fails if it does.
pub fn run() -> anyhow::Result<()> {
    let status = Command::new("cargo")
        .args(["+nightly", "miri", "test", "-p", "neural-alloc", "--lib"])
        .env("MIRIFLAGS", MIRI_FLAGS)
        .status()
        .context("running `cargo +nightly miri` (are the nightly miri and rust-src components installed?)")?;
    if !status.success() {
        bail!("neural-alloc's unit tests failed under Miri ({status})");
    }
    Ok(())
}
