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

/// The llama-server binary built by `cargo xtask llama-server`.
pub fn llama_server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("HOTPATCH_LLAMA_SERVER") {
        return PathBuf::from(p);
    }
    let binary = cache_dir()
        .join("llama-server")
        .join("build")
        .join("bin")
        .join("llama-server");
    assert!(
        binary.exists(),
        "llama-server is not built at {}: run `cargo xtask llama-server`",
        binary.display()
    );
    binary
}

/// One of llama.cpp's own tools built beside llama-server by `cargo xtask llama-server`
/// (`llama-quantize`, `llama-gguf-split`, `llama-imatrix`, `llama-export-lora`,
/// `llama-cvector-generator`, `ggml-rpc-server`): the oracles for what we write.
pub fn llama_tool(name: &str) -> PathBuf {
    let binary = llama_server_binary().with_file_name(name);
    assert!(
        binary.exists(),
        "{name} is not built at {}: run `cargo xtask llama-server`",
        binary.display()
    );
    binary
}

/// ggml's shared library (`libggml-base.so`, which holds its GGUF reader), built beside
/// llama-server by `cargo xtask llama-server`.
pub fn ggml_base_library() -> PathBuf {
    let library = llama_server_binary().with_file_name("libggml-base.so");
    assert!(
        library.exists(),
        "libggml-base.so is not built at {}: run `cargo xtask llama-server`",
        library.display()
    );
    library
}

/// The agent library (`libhotpatch_agent.so`) beside the `hotpatch` binary under test,
/// where `hotpatch launch` looks for it. `cargo test` builds a cdylib-only package's test
/// harness but not the library itself, so when it is missing it is built here, into the
/// same target directory and profile as `hotpatch`.
pub fn agent_library(hotpatch: &std::path::Path) -> PathBuf {
    let library = hotpatch.with_file_name("libhotpatch_agent.so");
    if library.exists() {
        return library;
    }
    let profile_dir = hotpatch
        .parent()
        .expect("the hotpatch binary has a directory");
    let target_dir = profile_dir
        .parent()
        .expect("the profile directory has a parent");
    let mut build = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    build
        .args(["build", "-p", "hotpatch-agent", "--manifest-path"])
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    if profile_dir
        .file_name()
        .is_some_and(|name| name == "release")
    {
        build.arg("--release");
    }
    let status = build.status().expect("cargo runs");
    assert!(
        status.success() && library.exists(),
        "building hotpatch-agent did not give {} ({status})",
        library.display()
    );
    library
}

/// Writes a random (seeded) rank-`rank` LoRA adapter for `model`'s attention tensors
/// (`attn_q`, `attn_k`, `attn_v`, `attn_output`) with gguf-py's writer, in llama.cpp's
/// adapter format (`adapter.lora.alpha` = 2·rank, `NAME.lora_a` and `NAME.lora_b`).
pub fn write_lora_adapter(model: &std::path::Path, out: &std::path::Path, rank: u32) {
    const SCRIPT: &str = r#"
import sys, numpy as np, gguf
base, out, rank = sys.argv[1], sys.argv[2], int(sys.argv[3])
r = gguf.GGUFReader(base)
w = gguf.GGUFWriter(out, "gemma3")
w.add_string("general.type", "adapter")
w.add_string("adapter.type", "lora")
w.add_float32("adapter.lora.alpha", float(2 * rank))
rng = np.random.default_rng(7)
for t in r.tensors:
    if t.name.endswith(("attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_output.weight")):
        n_in, n_out = int(t.shape[0]), int(t.shape[1])
        w.add_tensor(t.name + ".lora_a", (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32))
        w.add_tensor(t.name + ".lora_b", (rng.standard_normal((n_out, rank)) * 0.02).astype(np.float32))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
"#;
    run_python(
        SCRIPT,
        &[
            model.as_os_str(),
            out.as_os_str(),
            rank.to_string().as_ref(),
        ],
    );
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port on 127.0.0.1")
}

/// A minimal HTTP/1.1 exchange over a fresh connection: returns the status code and the
/// body. Enough for health checks and JSON requests to a local server in tests.
pub fn http_request(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = match text.split_once("\r\n\r\n") {
        Some((head, rest))
            if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked") =>
        {
            dechunk(rest)
        }
        Some((_, rest)) => rest.to_owned(),
        None => String::new(),
    };
    Ok((status, body))
}

/// The payload of an HTTP/1.1 `Transfer-Encoding: chunked` body (up to the last chunk,
/// or to the first malformed size line).
pub fn dechunk(mut rest: &str) -> String {
    let mut out = String::new();
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].strip_prefix("\r\n").unwrap_or(&tail[n..]);
    }
    out
}

/// A llama-server on 127.0.0.1 serving one model on CPU, stopped when dropped.
#[derive(Debug)]
pub struct LlamaServer {
    child: std::process::Child,
    /// Its port.
    pub port: u16,
}

impl LlamaServer {
    /// Starts llama-server on `model` (`--no-repack -ngl 0 -c 512 -t 2`, so that weights
    /// are read straight from the shared mapping) plus `extra` arguments, and waits until
    /// `/health` answers 200. Panics with the server's log if it does not within 120 s.
    pub fn start(model: &std::path::Path, extra: &[&str]) -> LlamaServer {
        let mut args = vec!["--no-repack", "-ngl", "0", "-c", "512", "-t", "2"];
        args.extend_from_slice(extra);
        LlamaServer::start_via(&[], model, &args)
    }

    /// Starts `LAUNCHER… llama-server -m MODEL --host 127.0.0.1 --port P --no-webui ARGS`
    /// (a launcher such as `hotpatch launch --socket S --`, or none) and waits for
    /// `/health` as [`LlamaServer::start`] does.
    pub fn start_via(
        launcher: &[&std::ffi::OsStr],
        model: &std::path::Path,
        args: &[&str],
    ) -> LlamaServer {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("llama-server-{port}.log"));
        let log_file = std::fs::File::create(&log).expect("create the server log");
        let mut command = match launcher.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(llama_server_binary());
                c
            }
            None => Command::new(llama_server_binary()),
        };
        let child = command
            .arg("-m")
            .arg(model)
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--no-webui",
            ])
            .args(args)
            .stdout(log_file.try_clone().expect("clone the log handle"))
            .stderr(log_file)
            .spawn()
            .expect("failed to start llama-server");
        let mut server = LlamaServer { child, port };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "llama-server exited with {status}:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if matches!(http_request(port, "GET", "/health", None), Ok((200, _))) {
                return server;
            }
            if std::time::Instant::now() > deadline {
                let _ = server.child.kill();
                panic!(
                    "llama-server did not become healthy in 120 s:\n{}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The etcd binary: `HOTPATCH_ETCD`, else `etcd` on `PATH` (`cargo xtask etcd` installs
/// it). Panics when there is none: the fleet tests fail, not skip, without it.
pub fn etcd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("HOTPATCH_ETCD") {
        return PathBuf::from(p);
    }
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("etcd"))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| panic!("etcd is not installed: run `cargo xtask etcd`"))
}

/// A static etcd cluster on loopback ports, in a directory of its own, SIGKILLed and
/// removed when dropped (a SIGTERM to the leader waits seconds for a leadership
/// transfer).
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Option<std::process::Child>>,
    /// Each member's client port.
    pub client_ports: Vec<u16>,
    dir: PathBuf,
}

impl EtcdCluster {
    /// Starts `size` members (every one named in `--initial-cluster`) with short
    /// heartbeat and election times, and waits until each answers `/health` with a
    /// leader. Panics with the members' logs if that takes over 60 s.
    pub fn start(size: usize) -> EtcdCluster {
        let etcd = etcd_binary();
        let dir = std::env::temp_dir().join(format!(
            "hotpatch-etcd-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("create the cluster's directory");
        let client_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let peer_ports: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let initial: Vec<String> = peer_ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("m{i}=http://127.0.0.1:{p}"))
            .collect();
        let token = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut members = Vec::new();
        for i in 0..size {
            let log =
                std::fs::File::create(dir.join(format!("m{i}.log"))).expect("create a member log");
            let client = format!("http://127.0.0.1:{}", client_ports[i]);
            let peer = format!("http://127.0.0.1:{}", peer_ports[i]);
            let child = Command::new(&etcd)
                .args(["--name", &format!("m{i}")])
                .arg("--data-dir")
                .arg(dir.join(format!("m{i}.data")))
                .args([
                    "--listen-client-urls",
                    &client,
                    "--advertise-client-urls",
                    &client,
                ])
                .args([
                    "--listen-peer-urls",
                    &peer,
                    "--initial-advertise-peer-urls",
                    &peer,
                ])
                .args(["--initial-cluster", &initial.join(",")])
                .args([
                    "--initial-cluster-state",
                    "new",
                    "--initial-cluster-token",
                    &token,
                ])
                .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
                .args(["--logger", "zap", "--log-level", "error"])
                .stdout(log.try_clone().expect("clone the log handle"))
                .stderr(log)
                .spawn()
                .expect("failed to start etcd");
            members.push(Some(child));
        }
        let cluster = EtcdCluster {
            members,
            client_ports,
            dir,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !(0..size).all(|i| cluster.healthy(i)) {
            if std::time::Instant::now() > deadline {
                panic!(
                    "the etcd cluster did not become healthy in 60 s:\n{}",
                    cluster.logs()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        cluster
    }

    fn healthy(&self, member: usize) -> bool {
        matches!(
            http_request(self.client_ports[member], "GET", "/health", None),
            Ok((200, body)) if body.contains("true")
        )
    }

    /// Every member's log.
    pub fn logs(&self) -> String {
        (0..self.members.len())
            .map(|i| {
                let text =
                    std::fs::read_to_string(self.dir.join(format!("m{i}.log"))).unwrap_or_default();
                format!("--- m{i}\n{text}")
            })
            .collect()
    }

    /// The client endpoints, `http://127.0.0.1:PORT`.
    pub fn endpoints(&self) -> Vec<String> {
        self.client_ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect()
    }

    /// The client endpoints, comma-separated (`--etcd`'s form).
    pub fn endpoint_list(&self) -> String {
        self.endpoints().join(",")
    }

    /// The index of the member that leads now (asked through etcd's JSON gateway).
    pub fn leader(&self) -> Option<usize> {
        for (i, port) in self.client_ports.iter().enumerate() {
            if self.members[i].is_none() {
                continue;
            }
            let Ok((200, body)) = http_request(*port, "POST", "/v3/maintenance/status", Some("{}"))
            else {
                continue;
            };
            let field = |name: &str| {
                let start = body.find(&format!("\"{name}\":\""))? + name.len() + 4;
                let end = start + body[start..].find('"')?;
                Some(body[start..end].to_owned())
            };
            if let (Some(member), Some(leader)) = (field("member_id"), field("leader"))
                && member == leader
            {
                return Some(i);
            }
        }
        None
    }

    /// Freezes every running member (SIGSTOP) when `frozen`, thaws them (SIGCONT)
    /// otherwise: the cluster stops answering without losing anything.
    pub fn freeze(&self, frozen: bool) {
        for child in self.members.iter().flatten() {
            let signal = if frozen { "-STOP" } else { "-CONT" };
            let sent = Command::new("kill")
                .args([signal, &child.id().to_string()])
                .status()
                .expect("run kill");
            assert!(sent.success(), "kill {signal} {} failed", child.id());
        }
    }

    /// SIGKILLs member `index`.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
