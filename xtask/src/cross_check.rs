//! `cargo xtask cross-check`: byte-tier's codec tests built for aarch64 and run under
//! qemu's user-mode emulation, so that the NEON kernels are checked bit for bit against
//! the scalar ones on an x86-64 machine.
//!
//! Installs what it needs when it is missing: the rustup target
//! `aarch64-unknown-linux-gnu`, Debian's cross linker (`gcc-aarch64-linux-gnu`, which
//! brings the aarch64 C library under `/usr/aarch64-linux-gnu`) and `qemu-user`. Not part
//! of `cargo xtask ci`: emulation makes it slow, and timings under it say nothing about
//! speed.

use anyhow::Result;

use crate::etcd::{apt_install, on_path};

const TARGET: &str = "aarch64-unknown-linux-gnu";
const LINKER: &str = "aarch64-linux-gnu-gcc";
const QEMU: &str = "qemu-aarch64";
/// Where Debian's cross packages put the aarch64 dynamic loader and C library.
const SYSROOT: &str = "/usr/aarch64-linux-gnu";

pub fn run(args: &[String]) -> Result<()> {
    let installed = std::process::Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l == TARGET)
        })
        .unwrap_or(false);
    if !installed {
        crate::run(std::process::Command::new("rustup").args(["target", "add", TARGET]))?;
    }
    let mut missing = Vec::new();
    if on_path(LINKER).is_none() {
        missing.push("gcc-aarch64-linux-gnu");
    }
    if on_path(QEMU).is_none() {
        missing.push("qemu-user");
    }
    if !missing.is_empty() {
        apt_install(&missing)?;
    }
    // The codec tests by default; other test name filters can be given instead.
    let filter = if args.is_empty() {
        vec!["codec".to_owned()]
    } else {
        args.to_vec()
    };
    crate::run(
        crate::cargo()
            .args([
                "test",
                "-p",
                "byte-tier",
                "--lib",
                "--tests",
                "--target",
                TARGET,
                "--",
            ])
            .args(filter)
            .env("CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER", LINKER)
            .env(
                "CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER",
                format!("{QEMU} -L {SYSROOT}"),
            ),
    )
}
