//! `alloc-check`: runs neural-alloc's tests under Miri, which checks every unsafe
//! operation of the allocator as it runs (out-of-bounds and use-after-free accesses,
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

/// Test targets of neural-alloc run under Miri, in order.
const TARGETS: [&[&str]; 2] = [&["--lib"], &["--test", "it"]];

/// Runs `cargo +nightly miri test -p neural-alloc` on the unit and integration tests and
/// fails if either does.
pub fn run() -> anyhow::Result<()> {
    for target in TARGETS {
        let status = Command::new("cargo")
            .args(["+nightly", "miri", "test", "-p", "neural-alloc"])
            .args(target)
            .env("MIRIFLAGS", MIRI_FLAGS)
            .status()
            .context("running `cargo +nightly miri` (are the nightly miri and rust-src components installed?)")?;
        if !status.success() {
            bail!(
                "neural-alloc's tests ({}) failed under Miri ({status})",
                target.join(" ")
            );
        }
    }
    Ok(())
}
