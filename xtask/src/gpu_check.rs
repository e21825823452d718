//! `cargo xtask gpu-check`: the agent's "default server" check on a llama-server that
//! offloads every layer to an NVIDIA GPU (`-ngl 99`), where the weights live in device
//! memory and a patch to the file can never reach them.
//!
//! The check, on a copy of a model (the real model when it is installed, else the
//! generated demo model, which needs nothing from the network):
//! 1. the server is started under `hotpatch launch`, and the agent must see tensors in a
//!    device buffer (`CUDA0`, …) and be active (not inert);
//! 2. scaling a device-resident tensor in the file alone leaves the next token's top
//!    log-probabilities unchanged, and reverting that restores the file byte for byte;
//! 3. the same patch through the agent (`hotpatch patch … --agent`) changes them, and its
//!    revert restores them exactly;
//! 4. a tensor the server still reads from the file mapping, if there is one, is patched
//!    through the file (`--persist`), and its revert restores answer and file.
//!
//! Three ways to run it:
//! - `cargo xtask gpu-check` on a machine with an NVIDIA GPU, `nvcc`, CMake and a Rust
//!   toolchain: builds a CUDA llama-server from the pinned source, then checks.
//! - `cargo xtask gpu-check --bundle [DIR]` on any x86-64 machine: writes DIR (default
//!   `target/gpu-check`) with what a GPU machine without network or Rust needs: the
//!   pinned llama.cpp source without its tests, models, documents and other backends,
//!   and stripped release builds of `hotpatch`, the agent and this program. The bundle
//!   must stay under 64 MiB.
//! - `DIR/xtask gpu-check --in DIR [build|check|all] [--model M]` on the GPU machine:
//!   `build` configures and builds only the `llama-server` target for one architecture
//!   (`HOTPATCH_CUDA_ARCH`, default 90), `check` runs the check, `all` does both.
//!   When the agent built elsewhere does not load there and `cargo` is available, the
//!   agent is rebuilt from the working tree in the current directory and the check runs
//!   again.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use memory_tier::agent::AgentClient;
use memory_tier::agent::proto::{Access, TensorEntry};

use crate::bench_agent::{Proc, free_port, healthy, post};

/// The most a bundle may weigh, with the working tree it travels beside.
const BUNDLE_LIMIT: u64 = 64 << 20;
/// The llama.cpp source archive's name inside a bundle.
const SOURCE_ARCHIVE: &str = "llama.cpp.tar.gz";
/// What the CUDA build leaves out of the source: tests, models, documents, front-end
/// tests and every other backend. Each is a path under the source's top folder.
const EXCLUDED: &[&str] = &[
    "docs",
    "models",
    "media",
    "tests",
    "benches",
    "examples",
    "pocs",
    "gguf-py",
    "conversion",
    "requirements",
    "ci",
    "skills",
    "tools/ui/tests",
    "tools/ui/node_modules",
    "ggml/src/ggml-cann",
    "ggml/src/ggml-et",
    "ggml/src/ggml-hexagon",
    "ggml/src/ggml-metal",
    "ggml/src/ggml-opencl",
    "ggml/src/ggml-openvino",
    "ggml/src/ggml-sycl",
    "ggml/src/ggml-virtgpu",
    "ggml/src/ggml-vulkan",
    "ggml/src/ggml-webgpu",
    "ggml/src/ggml-zdnn",
    "ggml/src/ggml-zendnn",
];
/// The CUDA build: the deployed configuration (shared libraries, so that the agent can
/// interpose; portable CPU code with AVX2), CUDA on, no network at configure time.
const CUDA_OPTIONS: &[&str] = &[
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_CUDA=ON",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
];
/// A prompt given as token ids, so that any vocabulary (the demo model's has no byte
/// tokens to spell text with) reads it.
const PROMPT: &str = "[1, 5, 6, 7, 8, 9]";

pub fn run(args: &[String]) -> Result<()> {
    let mut bundle = None;
    let mut inside = None;
    let mut model = None;
    let mut step = None;
    let mut rest = args.iter().peekable();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--bundle" => {
                let dir = rest.next_if(|a| !a.starts_with("--")).map_or_else(
                    || crate::workspace_root().join("target/gpu-check"),
                    PathBuf::from,
                );
                bundle = Some(dir);
            }
            "--in" => inside = Some(PathBuf::from(rest.next().context("--in needs a DIR")?)),
            "--model" => model = Some(PathBuf::from(rest.next().context("--model needs a FILE")?)),
            "build" | "check" | "all" if step.is_none() => step = Some(arg.clone()),
            other => bail!(
                "gpu-check: unexpected argument {other:?}\n\
                 usage: gpu-check [--model M] | --bundle [DIR] | --in DIR [build|check|all] [--model M]"
            ),
        }
    }
    match (bundle, inside) {
        (Some(_), Some(_)) => bail!("gpu-check: --bundle and --in exclude each other"),
        (Some(dir), None) => write_bundle(&dir),
        (None, Some(dir)) => in_bundle(&dir, step.as_deref().unwrap_or("all"), model),
        (None, None) => native(model),
    }
}

/// The binaries a check uses.
struct Tools {
    hotpatch: PathBuf,
    agent: PathBuf,
    server: PathBuf,
}

/// On a machine with a GPU and a Rust toolchain: build everything here, then check.
fn native(model: Option<PathBuf>) -> Result<()> {
    let nvcc = find_nvcc().context(
        "gpu-check: no nvcc (CUDA toolkit) here; on a machine without one, write a bundle \
         with `cargo xtask gpu-check --bundle` and run it where the GPU is",
    )?;
    let source = crate::llama_server::source()?;
    let build = crate::env::cache_dir()?.join("llama-server-cuda");
    let server = build_cuda(&source, &build, &nvcc)?;
    crate::run(crate::cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "unified-manager",
        "-p",
        "hotpatch-agent",
    ]))?;
    let release = crate::workspace_root().join("target/release");
    let tools = Tools {
        hotpatch: release.join("hotpatch"),
        agent: release.join("libhotpatch_agent.so"),
        server,
    };
    let model = match model {
        Some(m) => m,
        None => crate::env::real_model()?,
    };
    let work = build.join("check");
    check(&tools, &model, &work)
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CUDACXX") {
        return Some(PathBuf::from(path));
    }
    let on_path = Command::new("nvcc")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if on_path {
        return Some(PathBuf::from("nvcc"));
    }
    let usual = Path::new("/usr/local/cuda/bin/nvcc");
    usual.exists().then(|| usual.to_owned())
}

/// Runs `command` in the current directory, failing with its status when it fails.
fn sh(command: &mut Command) -> Result<()> {
    let text = format!("{command:?}");
    eprintln!("$ {text}");
    let status = command
        .status()
        .with_context(|| format!("failed to start {text}"))?;
    if !status.success() {
        bail!("{text} failed: {status}");
    }
    Ok(())
}

/// Configures and builds only `llama-server` with CUDA for one architecture; answers
/// the binary's path.
fn build_cuda(source: &Path, build: &Path, nvcc: &Path) -> Result<PathBuf> {
    let arch = std::env::var("HOTPATCH_CUDA_ARCH").unwrap_or_else(|_| "90".into());
    let cmake = if Command::new("cmake")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        PathBuf::from("cmake")
    } else {
        crate::env::oracle_python()?.with_file_name("cmake")
    };
    let ninja = Command::new("ninja")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    std::fs::create_dir_all(build)?;
    let mut configure = Command::new(&cmake);
    configure
        .arg("-S")
        .arg(source)
        .arg("-B")
        .arg(build)
        .args(CUDA_OPTIONS)
        .arg(format!("-DCMAKE_CUDA_ARCHITECTURES={arch}"))
        .arg(format!("-DCMAKE_CUDA_COMPILER={}", nvcc.display()));
    if ninja && !build.join("CMakeCache.txt").exists() {
        configure.args(["-G", "Ninja"]);
    }
    sh(&mut configure)?;
    let jobs = std::thread::available_parallelism().map_or(4, |n| n.get());
    sh(Command::new(&cmake)
        .arg("--build")
        .arg(build)
        .args(["--config", "Release", "--target", "llama-server", "-j"])
        .arg(jobs.to_string()))?;
    let binary = build.join("bin").join("llama-server");
    if !binary.exists() {
        bail!("the CUDA build produced no {}", binary.display());
    }
    Ok(binary)
}

/// Writes the bundle a GPU machine without network or Rust runs.
fn write_bundle(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let source = crate::llama_server::source()?;
    let (parent, top) = (
        source.parent().context("the source has a parent folder")?,
        source.file_name().context("the source has a name")?,
    );
    let archive = dir.join(SOURCE_ARCHIVE);
    let mut tar = Command::new("tar");
    tar.arg("-czf").arg(&archive).arg("-C").arg(parent);
    for excluded in EXCLUDED {
        tar.arg(format!("--exclude={}/{excluded}", top.to_string_lossy()));
    }
    tar.args(["--exclude=*.gguf", "--exclude=.git"]).arg(top);
    sh(&mut tar)?;

    crate::run(crate::cargo().args([
        "build",
        "--release",
        "--locked",
        "-p",
        "unified-manager",
        "-p",
        "hotpatch-agent",
        "-p",
        "xtask",
    ]))?;
    let release = crate::workspace_root().join("target/release");
    for name in ["hotpatch", "libhotpatch_agent.so", "xtask"] {
        let to = dir.join(name);
        std::fs::copy(release.join(name), &to)
            .with_context(|| format!("copy {name} into the bundle"))?;
        // Symbols are not needed to run, and they would not fit.
        sh(Command::new("strip").arg(&to))?;
    }

    let mut total = 0;
    let mut lines = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let len = entry.metadata()?.len();
            total += len;
            lines.push(format!(
                "  {:>9.1} MiB  {}",
                len as f64 / (1 << 20) as f64,
                entry.file_name().to_string_lossy()
            ));
        }
    }
    lines.sort();
    println!("bundle {}:\n{}", dir.display(), lines.join("\n"));
    println!("  {:>9.1} MiB  in all", total as f64 / (1 << 20) as f64);
    if total > BUNDLE_LIMIT {
        bail!(
            "the bundle weighs {total} bytes, over the {BUNDLE_LIMIT} a GPU machine can be given"
        );
    }
    let relative = dir
        .strip_prefix(crate::workspace_root())
        .map(Path::to_path_buf)
        .unwrap_or(dir.clone());
    println!(
        "on the GPU machine, from the repository root:\n  \
         {0}/xtask gpu-check --in {0} build   (configure and build llama-server for sm_90)\n  \
         {0}/xtask gpu-check --in {0} check   (the check)",
        relative.display()
    );
    Ok(())
}

/// On the GPU machine, from a bundle.
fn in_bundle(dir: &Path, step: &str, model: Option<PathBuf>) -> Result<()> {
    let dir = dir
        .canonicalize()
        .with_context(|| format!("no bundle at {}", dir.display()))?;
    let build = dir.join("build");
    let server = build.join("bin").join("llama-server");
    if matches!(step, "build" | "all") {
        let source = dir.join("src");
        if !source.join("llama.cpp").join("CMakeLists.txt").exists() {
            std::fs::create_dir_all(&source)?;
            sh(Command::new("tar")
                .arg("-xzf")
                .arg(dir.join(SOURCE_ARCHIVE))
                .arg("-C")
                .arg(&source))?;
        }
        let nvcc = find_nvcc().context("gpu-check: no nvcc on this machine")?;
        build_cuda(&source.join("llama.cpp"), &build, &nvcc)?;
    }
    if matches!(step, "check" | "all") {
        if !server.exists() {
            bail!(
                "no CUDA llama-server at {}: run the build step first",
                server.display()
            );
        }
        let tools = Tools {
            hotpatch: dir.join("hotpatch"),
            agent: dir.join("libhotpatch_agent.so"),
            server,
        };
        let work = dir.join("check");
        let model = match model {
            Some(m) => m,
            None => demo_model(&tools.hotpatch, &work)?,
        };
        match check(&tools, &model, &work) {
            Err(e) if e.downcast_ref::<AgentInert>().is_some() => {
                eprintln!("gpu-check: {e}; rebuilding the agent here");
                let rebuilt = rebuild_agent(&dir)?;
                check(
                    &Tools {
                        agent: rebuilt,
                        ..tools
                    },
                    &model,
                    &work,
                )?;
            }
            other => other?,
        }
    }
    Ok(())
}

/// The agent did not load, or loaded inert: it was built for another ggml or libc.
#[derive(Debug)]
struct AgentInert(String);

impl std::fmt::Display for AgentInert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the agent is not working in this server: {}", self.0)
    }
}

impl std::error::Error for AgentInert {}

/// Rebuilds the agent with the `cargo` found here, from the working tree in the current
/// directory.
fn rebuild_agent(dir: &Path) -> Result<PathBuf> {
    let manifest = std::env::current_dir()?.join("Cargo.toml");
    if !manifest.exists() {
        bail!("no workspace in the current directory to rebuild the agent from");
    }
    let target = dir.join("agent-target");
    sh(Command::new("cargo")
        .args([
            "build",
            "--release",
            "-p",
            "hotpatch-agent",
            "--manifest-path",
        ])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target))
    .context("the agent could not be rebuilt here (is cargo installed?)")?;
    Ok(target.join("release").join("libhotpatch_agent.so"))
}

/// Writes the generated demo model into `work` and answers its path.
fn demo_model(hotpatch: &Path, work: &Path) -> Result<PathBuf> {
    let demo = work.join("demo");
    std::fs::create_dir_all(&demo)?;
    let original = demo.join("demo-llama.original.gguf");
    if !original.exists() {
        let out = Command::new(hotpatch)
            .arg("demo")
            .arg("--keep")
            .arg(&demo)
            .output()
            .context("run hotpatch demo")?;
        if !out.status.success() || !original.exists() {
            bail!(
                "hotpatch demo did not write a model: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(original)
}

/// The check itself, on a copy of `model` in `work`.
fn check(tools: &Tools, model: &Path, work: &Path) -> Result<()> {
    std::fs::create_dir_all(work)?;
    let copy = work.join("model.gguf");
    std::fs::copy(model, &copy).with_context(|| format!("copy {}", model.display()))?;
    let pristine = std::fs::read(&copy)?;
    let socket = work.join("agent.sock");
    let _ = std::fs::remove_file(&socket);
    let log = work.join("llama-server.log");
    let port = free_port()?;
    let started = Instant::now();
    let mut command = Command::new(&tools.hotpatch);
    command
        .arg("launch")
        .arg("--socket")
        .arg(&socket)
        .arg("--agent-library")
        .arg(&tools.agent)
        .arg("--")
        .arg(&tools.server)
        .arg("-m")
        .arg(&copy)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["-ngl", "99", "-c", "512", "--no-webui"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?);
    let mut server = Proc(command.spawn().context("start hotpatch launch")?);
    let deadline = started + Duration::from_secs(300);
    while !healthy(port) {
        if let Some(status) = server.0.try_wait()? {
            bail!(
                "llama-server exited ({status}) before it served:\n{}",
                tail(&log)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "llama-server did not become healthy in 300 s:\n{}",
                tail(&log)
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "llama-server healthy under the agent after {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let (mut client, hello) = AgentClient::connect(&socket)
        .map_err(|e| AgentInert(format!("no agent on {}: {e}", socket.display())))?;
    if let Some(why) = &hello.inert {
        return Err(AgentInert(why.clone()).into());
    }
    println!(
        "agent {} in ggml {} (llama.cpp build {}), entry points {:?}",
        hello.agent,
        hello.ggml.as_deref().unwrap_or("?"),
        hello.llama_build.map_or("?".into(), |b| b.to_string()),
        hello.entry_points
    );
    let tensors = client.tensors()?;
    drop(client);
    let mut buffers = std::collections::BTreeMap::<&str, usize>::new();
    for t in &tensors {
        *buffers.entry(&t.buffer).or_default() += 1;
    }
    println!("{} weight tensors placed: {buffers:?}", tensors.len());
    let device = pick(&tensors, Access::Device).with_context(|| {
        format!(
            "no tensor in a device buffer ({buffers:?}): was llama-server built with CUDA, \
             and does it see the GPU?\n{}",
            tail(&log)
        )
    })?;
    println!(
        "device tensor: {} ({}, {})",
        device.name, device.type_name, device.buffer
    );
    let status = hotpatch(tools, &["agent", "status", &path(&socket)])?;
    if !status.contains(&device.buffer) {
        bail!(
            "`hotpatch agent status` does not show {}:\n{status}",
            device.buffer
        );
    }

    let before = top_logprobs(port)?;
    let model_arg = path(&copy);
    let socket_arg = path(&socket);
    // The file alone does not reach device memory.
    hotpatch(
        tools,
        &[
            "patch",
            &model_arg,
            "--tensor",
            &device.name,
            "--scale",
            "0.1",
        ],
    )?;
    if top_logprobs(port)? != before {
        bail!(
            "a patch to the file alone changed a GPU server's answer: the check is not measuring the device copy"
        );
    }
    hotpatch(tools, &["revert", &model_arg, "--last"])?;
    if std::fs::read(&copy)? != pristine {
        bail!("reverting the file patch did not restore the file byte for byte");
    }
    println!("ok: a patch to the file alone leaves the answer unchanged");

    // Through the agent it reaches device memory, and its revert restores the answer.
    let applied = Instant::now();
    hotpatch(
        tools,
        &[
            "patch",
            &model_arg,
            "--tensor",
            &device.name,
            "--scale",
            "0.1",
            "--agent",
            &socket_arg,
        ],
    )?;
    let apply_time = applied.elapsed();
    let patched = top_logprobs(port)?;
    if patched == before {
        bail!("the patch through the agent did not change the answer");
    }
    hotpatch(
        tools,
        &["revert", &model_arg, "--agent", &socket_arg, "--last"],
    )?;
    let restored = top_logprobs(port)?;
    if restored != before {
        bail!(
            "after the revert through the agent the answer differs:\n  before {before:?}\n  after  {restored:?}"
        );
    }
    println!(
        "ok: through the agent the answer changes ({:?} -> {:?}) and its revert restores it exactly (apply took {:.1} ms with the CLI's start)",
        before.first(),
        patched.first(),
        apply_time.as_secs_f64() * 1e3
    );

    // A tensor still read from the mapping (the input embeddings stay on the CPU).
    if let Some(view) = pick(&tensors, Access::FileView) {
        hotpatch(
            tools,
            &[
                "patch",
                &model_arg,
                "--tensor",
                &view.name,
                "--scale",
                "0.0",
                "--agent",
                &socket_arg,
                "--persist",
            ],
        )?;
        if top_logprobs(port)? == before {
            bail!(
                "zeroing {} through the file did not change the answer",
                view.name
            );
        }
        hotpatch(
            tools,
            &[
                "revert",
                &model_arg,
                "--agent",
                &socket_arg,
                "--persist",
                "--last",
            ],
        )?;
        if top_logprobs(port)? != before || std::fs::read(&copy)? != pristine {
            bail!("reverting the file-view patch did not restore answer and file");
        }
        println!(
            "ok: file-view tensor {} ({}) patched through the file and restored",
            view.name, view.buffer
        );
    }
    drop(server);
    println!("gpu-check: passed");
    Ok(())
}

/// A tensor reached by `access`, of a type the CLI's scale supports, preferring a
/// quantized one (where a requantizing write is exercised).
fn pick(tensors: &[TensorEntry], access: Access) -> Option<&TensorEntry> {
    ["q4_K", "q6_K", "q8_0", "f16", "f32"]
        .iter()
        .find_map(|ty| {
            tensors
                .iter()
                .find(|t| t.access == access && t.type_name == *ty)
        })
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Runs `hotpatch ARGS`, answering its stdout, failing with its stderr.
fn hotpatch(tools: &Tools, args: &[&str]) -> Result<String> {
    let out = Command::new(&tools.hotpatch)
        .args(args)
        .output()
        .context("run hotpatch")?;
    if !out.status.success() {
        bail!(
            "hotpatch {} failed ({}):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The next token's top log-probabilities after [`PROMPT`], recomputed (no cache).
fn top_logprobs(port: u16) -> Result<Vec<(i64, f64)>> {
    let body = format!(
        r#"{{"prompt": {PROMPT}, "n_predict": 1, "n_probs": 5, "temperature": 0.0, "cache_prompt": false, "seed": 1}}"#
    );
    let reply = post(port, "/completion", &body)?;
    let (head, json) = reply
        .split_once("\r\n\r\n")
        .context("llama-server's reply has no body")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("llama-server answered {head}\n{json}");
    }
    let value: serde_json::Value = serde_json::from_str(json)
        .with_context(|| format!("llama-server's reply is not JSON: {json}"))?;
    let top = value["completion_probabilities"][0]["top_logprobs"]
        .as_array()
        .with_context(|| format!("no top_logprobs in {json}"))?;
    top.iter()
        .map(|p| {
            Ok((
                p["id"].as_i64().context("a top_logprobs entry has no id")?,
                p["logprob"]
                    .as_f64()
                    .context("a top_logprobs entry has no logprob")?,
            ))
        })
        .collect()
}

/// The last lines of a log, for an error message.
fn tail(log: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
