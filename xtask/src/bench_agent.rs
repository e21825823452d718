//! `cargo xtask bench-agent`: how long a live patch takes to reach a llama-server's
//! weights, by path, under load (4 streams generating), side by side in one run:
//!
//! - the anchor: a 4 KiB patch written to the file mapping of a `--no-repack` server;
//! - a 4 KiB patch through the agent, as a partial write into a tensor the server holds
//!   in a remote (`ggml-rpc-server`) buffer;
//! - a whole-tensor re-set of a ~1 MB Q4_K tensor through the agent, into a CPU_REPACK
//!   buffer of a default server;
//!
//! and how long a patch through the agent waits for a pass boundary.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use memory_tier::agent::proto::Access;
use memory_tier::{AgentModel, AttachMode, LiveModel, MemoryPatch, PatchTarget, Payload};

const ROUNDS: usize = 200;
const STREAMS: usize = 4;

pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub(crate) fn post(port: u16, path: &str, body: &str) -> std::io::Result<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(300)))?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

pub(crate) fn healthy(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = write!(
        s,
        "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

/// Starts a llama-server (under the agent when `socket` is given) and waits for health.
fn server(
    binary: &Path,
    model: &Path,
    args: &[&str],
    agent: Option<(&Path, &Path)>,
) -> Result<(Proc, u16)> {
    let port = free_port()?;
    let mut command = Command::new(binary);
    command
        .arg("-m")
        .arg(model)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--no-webui",
        ])
        .args(["-c", "2048", "-t", "2", "--parallel", "4"])
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some((library, socket)) = agent {
        command
            .env("LD_PRELOAD", library)
            .env(memory_tier::agent::proto::SOCKET_ENV, socket);
    }
    let child = Proc(command.spawn().context("start llama-server")?);
    let deadline = Instant::now() + Duration::from_secs(180);
    while !healthy(port) {
        if Instant::now() > deadline {
            bail!("llama-server did not become healthy");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok((child, port))
}

/// Keeps `STREAMS` generations running against `port` until dropped.
struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..STREAMS)
            .map(|i| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let body = format!(
                        r#"{{"prompt":"Write a long story, part {i}:","n_predict":48,"stream":true,"cache_prompt":false,"temperature":0}}"#
                    );
                    while !stop.load(Ordering::Relaxed) {
                        let _ = post(port, "/completion", &body);
                    }
                })
            })
            .collect();
        // Let the streams reach generation.
        std::thread::sleep(Duration::from_secs(2));
        Load { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[derive(Default)]
struct Samples {
    apply: Vec<Duration>,
    revert: Vec<Duration>,
    waited: Vec<Duration>,
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn raw(name: &str, range: std::ops::Range<u64>, byte: u8) -> MemoryPatch {
    let len = (range.end - range.start) as usize;
    MemoryPatch::new(
        name,
        PatchTarget::Raw(range),
        Payload::Bytes(vec![byte; len]),
    )
}

fn scale(name: &str, tensor: &str) -> MemoryPatch {
    MemoryPatch::new(
        name,
        PatchTarget::Tensor {
            name: tensor.into(),
            elements: None,
        },
        Payload::Transform(memory_tier::ValueTransform::Scale(0.5)),
    )
}

pub fn run() -> Result<()> {
    if crate::rerun_in_release("bench-agent")? {
        return Ok(());
    }
    crate::run(crate::cargo().args(["build", "--release", "-p", "hotpatch-agent"]))?;
    let library = crate::workspace_root().join("target/release/libhotpatch_agent.so");
    let binary = crate::llama_server::llama_server()?;
    let rpc_binary = binary.with_file_name("ggml-rpc-server");
    let real = crate::env::real_model()?;
    let dir = std::env::temp_dir().join(format!("hotpatch-bench-agent-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = measure(&dir, &binary, &rpc_binary, &library, &real);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn copy(real: &Path, dir: &Path, name: &str) -> Result<PathBuf> {
    let path = dir.join(name);
    std::fs::copy(real, &path)?;
    Ok(path)
}

fn measure(
    dir: &Path,
    binary: &Path,
    rpc_binary: &Path,
    library: &Path,
    real: &Path,
) -> Result<()> {
    // The anchor: the file mapping of a --no-repack server.
    let file_model = copy(real, dir, "file.gguf")?;
    let mut file = Samples::default();
    {
        let (_server, port) = server(binary, &file_model, &["--no-repack", "-ngl", "0"], None)?;
        let live = LiveModel::attach(&file_model, AttachMode::Shared)?;
        let t = live
            .tensors()
            .iter()
            .find(|t| t.n_bytes >= 1 << 20)
            .context("no tensor of 1 MiB")?
            .data_range();
        let _load = Load::start(port);
        for i in 0..ROUNDS {
            let at = t.start + (i as u64 % 64) * 8192;
            let start = Instant::now();
            let id = live.apply(raw("p", at..at + 4096, 0x11))?;
            file.apply.push(start.elapsed());
            let start = Instant::now();
            live.revert(id)?;
            file.revert.push(start.elapsed());
        }
    }

    // A 4 KiB partial write into a remote buffer.
    let rpc_model = copy(real, dir, "rpc.gguf")?;
    let mut remote = Samples::default();
    {
        let rpc_port = free_port()?;
        let _rpc = Proc(
            Command::new(rpc_binary)
                .args(["-H", "127.0.0.1", "-p", &rpc_port.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("start ggml-rpc-server")?,
        );
        let endpoint = format!("127.0.0.1:{rpc_port}");
        while std::net::TcpStream::connect(&endpoint).is_err() {
            std::thread::sleep(Duration::from_millis(100));
        }
        let socket = dir.join("rpc.sock");
        let (_server, port) = server(
            binary,
            &rpc_model,
            &["--rpc", &endpoint, "-ngl", "99"],
            Some((library, &socket)),
        )?;
        let model = AgentModel::attach(&rpc_model, &socket, false)?;
        let name = model
            .entries()
            .values()
            .filter(|e| e.access == Access::Remote && e.nbytes >= 1 << 19)
            .map(|e| e.name.clone())
            .min()
            .context("no tensor of 512 KiB in a remote buffer")?;
        let t = model.live().tensor(&name)?.data_range();
        let _load = Load::start(port);
        for i in 0..ROUNDS {
            let at = t.start + (i as u64 % 32) * 8192;
            let start = Instant::now();
            let report = model.apply_reported(vec![raw("p", at..at + 4096, 0x22)])?;
            remote.apply.push(start.elapsed());
            remote
                .waited
                .push(Duration::from_micros(model.last_delivery().waited_us));
            let start = Instant::now();
            model.revert(report[0].id)?;
            remote.revert.push(start.elapsed());
        }
    }

    // A whole-tensor re-set of a ~1 MB Q4_K tensor in CPU_REPACK.
    let repack_model = copy(real, dir, "repack.gguf")?;
    let mut whole = Samples::default();
    let whole_bytes;
    {
        let socket = dir.join("repack.sock");
        let (_server, port) = server(
            binary,
            &repack_model,
            &["-ngl", "0"],
            Some((library, &socket)),
        )?;
        let model = AgentModel::attach(&repack_model, &socket, false)?;
        let entry = model
            .entries()
            .values()
            .filter(|e| e.access == Access::WholeTensor)
            .min_by_key(|e| e.nbytes.abs_diff(1 << 20))
            .context("no repacked tensor")?
            .clone();
        whole_bytes = entry.nbytes;
        let _load = Load::start(port);
        for _ in 0..ROUNDS {
            let start = Instant::now();
            let report = model.apply_reported(vec![scale("s", &entry.name)])?;
            whole.apply.push(start.elapsed());
            whole
                .waited
                .push(Duration::from_micros(model.last_delivery().waited_us));
            let start = Instant::now();
            model.revert(report[0].id)?;
            whole.revert.push(start.elapsed());
        }
    }

    let anchor = pct(&mut file.apply, 0.5);
    println!("live patch latency under load ({STREAMS} streams generating), {ROUNDS} rounds each");
    println!(
        "{:<58} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "path", "apply p50", "apply p99", "revert p50", "revert p99", "x anchor"
    );
    for (label, s) in [
        (
            "4 KiB, file mapping, --no-repack server (anchor)",
            &mut file,
        ),
        ("4 KiB, agent partial write, remote RPC buffer", &mut remote),
        (
            &*format!("{whole_bytes} B Q4_K, agent whole-tensor re-set, CPU_REPACK") as &str,
            &mut whole,
        ),
    ] {
        let p50 = pct(&mut s.apply, 0.5);
        println!(
            "{label:<58} {:>7.3}ms {:>7.3}ms {:>8.3}ms {:>8.3}ms {:>7.1}x",
            ms(p50),
            ms(pct(&mut s.apply, 0.99)),
            ms(pct(&mut s.revert, 0.5)),
            ms(pct(&mut s.revert, 0.99)),
            p50.as_secs_f64() / anchor.as_secs_f64()
        );
    }
    for (label, s) in [
        ("agent, remote buffer", &mut remote),
        ("agent, CPU_REPACK", &mut whole),
    ] {
        println!(
            "wait for a pass boundary ({label}): p50 {:.3} ms, p99 {:.3} ms",
            ms(pct(&mut s.waited, 0.5)),
            ms(pct(&mut s.waited, 0.99))
        );
    }
    Ok(())
}
