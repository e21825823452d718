//! Test support shared by the workspace's integration tests (this crate's `it` binary and
//! the CLI tests of unified-manager): where the oracle (gguf-py in a Python venv) and the
//! real model are, and how to run a Python snippet with the oracle.
//!
//! `cargo xtask oracle-env` and `cargo xtask real-model` install both, idempotently, in
//! a cache outside the repository; `cargo xtask ci` runs them before the tests. The
//! environment variables `HOTPATCH_ORACLE_PYTHON` and `HOTPATCH_REAL_MODEL` override the
//! cache locations.

use std::path::PathBuf;
use std::process::Command;

/// The cache directory shared with xtask: `$XDG_CACHE_HOME/hotpatch` or
/// `~/.cache/hotpatch`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("hotpatch");
    }
    let home = std::env::var_os("HOME").expect("HOME is not set");
    PathBuf::from(home).join(".cache").join("hotpatch")
}

/// The Python interpreter of the oracle venv (gguf-py and numpy installed).
pub fn oracle_python() -> PathBuf {
    if let Some(p) = std::env::var_os("HOTPATCH_ORACLE_PYTHON") {
        return PathBuf::from(p);
    }
    let python = cache_dir().join("oracle-venv").join("bin").join("python");
    assert!(
        python.exists(),
        "the gguf-py oracle is not installed at {}: run `cargo xtask oracle-env`",
        python.display()
    );
    python
}

/// The real model (gemma-3-270m-q4_k_m.gguf).
pub fn real_model() -> PathBuf {
    if let Some(p) = std::env::var_os("HOTPATCH_REAL_MODEL") {
        return PathBuf::from(p);
    }
    let record = cache_dir().join("real-model.path");
    let path = std::fs::read_to_string(&record).unwrap_or_else(|_| {
        panic!(
            "the real model is not installed ({} missing): run `cargo xtask real-model`",
            record.display()
        )
    });
    let path = PathBuf::from(path.trim());
    assert!(
        path.exists(),
        "the real model at {} is gone: run `cargo xtask real-model`",
        path.display()
    );
    path
}

/// Runs `script` with the oracle's Python and `args`, returning its standard output.
/// Panics with the script's standard error when it fails.
pub fn run_python(script: &str, args: &[&std::ffi::OsStr]) -> Vec<u8> {
    let output = Command::new(oracle_python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("failed to start the oracle's Python");
    assert!(
        output.status.success(),
        "oracle script failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}
