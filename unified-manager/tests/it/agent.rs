//! Live patches through the agent, on a default llama-server: one that repacks Q4_K
//! weights into a CPU_REPACK buffer, so a file patch does not reach them.

use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use memory_tier::agent::proto::{
    self, Access, AgentErrorKind, Reply, Request, TensorEntry, WriteSpec,
};
use memory_tier::{AgentClient, AgentModel, MemoryPatch, PatchTarget, Payload, ValueTransform};
use serde_json::{Value as Json, json};
use tests::LlamaServer;

const HOTPATCH: &str = env!("CARGO_BIN_EXE_hotpatch");

fn run(args: &[&OsStr]) -> Output {
    Command::new(HOTPATCH).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> (String, String) {
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    let out = run(&args);
    assert!(
        out.status.success(),
        "hotpatch {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// A copy of the real model and a llama-server on it under `hotpatch launch`, with
/// `args` (no `--no-repack`: a default, repacking CPU server unless `args` say else).
struct Launched {
    _dir: tempfile::TempDir,
    model: PathBuf,
    socket: PathBuf,
    server: LlamaServer,
}

fn launch(args: &[&str]) -> Launched {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    std::fs::copy(tests::real_model(), &model).unwrap();
    let socket = dir.path().join("agent.sock");
    tests::agent_library(std::path::Path::new(HOTPATCH));
    let launcher = [
        OsStr::new(HOTPATCH),
        OsStr::new("launch"),
        OsStr::new("--socket"),
        socket.as_os_str(),
        OsStr::new("--"),
    ];
    let server = LlamaServer::start_via(&launcher, &model, args);
    Launched {
        _dir: dir,
        model,
        socket,
        server,
    }
}

fn cpu_args() -> Vec<&'static str> {
    vec!["-ngl", "0", "-c", "512", "-t", "2", "--parallel", "8"]
}

/// The top log-probabilities of the next token after a fixed prompt, recomputed.
fn top_logprobs(port: u16) -> Vec<(String, f64)> {
    let body = json!({"prompt": "The capital of France is", "n_predict": 1, "n_probs": 5,
        "temperature": 0.0, "cache_prompt": false, "seed": 1});
    let (status, text) =
        tests::http_request(port, "POST", "/completion", Some(&body.to_string())).unwrap();
    assert_eq!(status, 200, "{text}");
    let reply: Json = serde_json::from_str(&text).unwrap();
    reply["completion_probabilities"][0]["top_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["token"].as_str().unwrap().to_owned(),
                p["logprob"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn tensors(socket: &Path) -> Vec<TensorEntry> {
    let (mut client, _) = AgentClient::connect(socket).unwrap();
    client.tensors().unwrap()
}

fn first_with(tensors: &[TensorEntry], access: Access, ty: &str) -> String {
    tensors
        .iter()
        .find(|t| t.access == access && t.type_name == ty)
        .unwrap_or_else(|| panic!("no {ty} tensor with {access:?} among {tensors:?}"))
        .name
        .clone()
}

#[test]
fn a_default_server_is_patched_through_the_agent_and_not_through_the_file() {
    let l = launch(&cpu_args());
    let model = l.model.to_str().unwrap();
    let socket = l.socket.to_str().unwrap();
    let all = tensors(&l.socket);
    assert_eq!(all.len(), 236, "every weight tensor is seen placed");
    let repacked = first_with(&all, Access::WholeTensor, "q4_K");
    let view = first_with(&all, Access::FileView, "f32");
    let (status, _) = ok(&["agent", "status", socket]);
    assert!(status.contains("CPU_REPACK"), "{status}");
    assert!(status.contains("llama_process"), "{status}");

    let before = top_logprobs(l.server.port);
    // The same patch written to the file alone does not reach the repacked copy, and
    // the command says so, naming the server.
    let (_, said) = ok(&["patch", model, "--tensor", &repacked, "--scale", "0.1"]);
    assert!(
        said.contains("does NOT reach") && said.contains(&l.server.pid().to_string()),
        "{said}"
    );
    assert_eq!(top_logprobs(l.server.port), before);
    ok(&["revert", model, "--last"]);
    assert_eq!(
        std::fs::read(&l.model).unwrap(),
        std::fs::read(tests::real_model()).unwrap()
    );

    // Through the agent it does, and its revert restores the answer exactly.
    let (out, _) = ok(&[
        "patch", model, "--tensor", &repacked, "--scale", "0.1", "--agent", socket,
    ]);
    assert!(out.contains("1 write(s)"), "{out}");
    let patched = top_logprobs(l.server.port);
    assert_ne!(patched, before);
    ok(&["revert", model, "--agent", socket, "--last"]);
    assert_eq!(top_logprobs(l.server.port), before);

    // A tensor the server reads from the mapping is reached through the file, which
    // memory-only patching refuses to change and --persist journals.
    let refused = run(&[
        OsStr::new("patch"),
        OsStr::new(model),
        OsStr::new("--tensor"),
        OsStr::new(&view),
        OsStr::new("--scale"),
        OsStr::new("0.5"),
        OsStr::new("--agent"),
        OsStr::new(socket),
    ]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--persist"));
    ok(&[
        "patch",
        model,
        "--tensor",
        &view,
        "--scale",
        "0.0",
        "--agent",
        socket,
        "--persist",
    ]);
    assert_ne!(top_logprobs(l.server.port), before);
    ok(&["revert", model, "--agent", socket, "--persist", "--last"]);
    assert_eq!(top_logprobs(l.server.port), before);
    assert_eq!(
        std::fs::read(&l.model).unwrap(),
        std::fs::read(tests::real_model()).unwrap()
    );
}

/// One streamed generation; answers its text.
fn stream(port: u16, prompt: &str) -> String {
    let body = json!({"prompt": prompt, "n_predict": 24, "temperature": 0.0,
        "cache_prompt": false, "stream": true, "seed": 1});
    let (status, text) =
        tests::http_request(port, "POST", "/completion", Some(&body.to_string())).unwrap();
    assert_eq!(status, 200, "{text}");
    text.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Json>(d).ok())
        .filter_map(|d| d["content"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn no_write_lands_during_a_forward_pass() {
    let l = launch(&cpu_args());
    let all = tensors(&l.socket);
    let repacked = first_with(&all, Access::WholeTensor, "q4_K");
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Story {i}: once upon a time"))
        .collect();
    let before: Vec<String> = prompts.iter().map(|p| stream(l.server.port, p)).collect();

    let model = AgentModel::attach(&l.model, &l.socket, false).unwrap();
    let port = l.server.port;
    let streams: Vec<_> = prompts
        .iter()
        .cloned()
        .map(|p| std::thread::spawn(move || (0..2).map(|_| stream(port, &p)).collect::<Vec<_>>()))
        .collect();
    for i in 0..200 {
        let patch = MemoryPatch::new(
            format!("cycle {i}"),
            PatchTarget::Tensor {
                name: repacked.clone(),
                elements: None,
            },
            Payload::Transform(ValueTransform::Scale(0.5)),
        );
        let report = model.apply_reported(vec![patch]).unwrap();
        model.revert(report[0].id).unwrap();
    }
    for s in streams {
        let answers = s.join().unwrap();
        assert!(
            answers.iter().all(|a| !a.is_empty()),
            "every request completes: {answers:?}"
        );
    }
    let counters = model.barrier().unwrap();
    assert_eq!(counters.writes, 400);
    assert_eq!(counters.writes_during_pass, 0);
    assert!(counters.passes > 0);
    let after: Vec<String> = prompts.iter().map(|p| stream(l.server.port, p)).collect();
    assert_eq!(after, before);
}

/// Sends raw bytes and reads one reply frame.
fn raw(socket: &Path, bytes: &[u8]) -> Reply {
    let mut s = UnixStream::connect(socket).unwrap();
    s.write_all(bytes).unwrap();
    let head = proto::read_head(&mut s).unwrap().expect("a reply");
    let reply: Reply = head.parse().unwrap();
    proto::skip_data(&mut s, head.data_len).unwrap();
    reply
}

fn frame(header: &Json, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    proto::write_frame(&mut out, header, &[data]).unwrap();
    out
}

fn refused(reply: Reply) -> AgentErrorKind {
    match reply {
        Reply::Error(e) => e.kind,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn bad_requests_are_refused_with_typed_errors_and_the_server_keeps_serving() {
    let l = launch(&cpu_args());
    let all = tensors(&l.socket);
    let repacked = all
        .iter()
        .find(|t| t.access == Access::WholeTensor)
        .unwrap()
        .clone();
    let view = all
        .iter()
        .find(|t| t.access == Access::FileView)
        .unwrap()
        .clone();
    let before = top_logprobs(l.server.port);

    // Malformed JSON, an unknown op, an oversized header.
    let mut bad = Vec::new();
    bad.extend_from_slice(&5u32.to_le_bytes());
    bad.extend_from_slice(&0u64.to_le_bytes());
    bad.extend_from_slice(b"{nope");
    assert_eq!(refused(raw(&l.socket, &bad)), AgentErrorKind::Malformed);
    assert_eq!(
        refused(raw(&l.socket, &frame(&json!({"op": "format_disk"}), &[]))),
        AgentErrorKind::Malformed
    );
    let mut huge = Vec::new();
    huge.extend_from_slice(&u32::MAX.to_le_bytes());
    huge.extend_from_slice(&0u64.to_le_bytes());
    assert_eq!(refused(raw(&l.socket, &huge)), AgentErrorKind::Oversized);

    let write = |spec: WriteSpec, data: &[u8]| {
        let request = Request::Write { writes: vec![spec] };
        raw(
            &l.socket,
            &frame(&serde_json::to_value(&request).unwrap(), data),
        )
    };
    let spec = |tensor: &str, offset: u64, len: u64| WriteSpec {
        tensor: tensor.into(),
        offset,
        len,
    };
    assert_eq!(
        refused(write(spec("no.such.weight", 0, 4), &[0; 4])),
        AgentErrorKind::UnknownTensor
    );
    assert_eq!(
        refused(write(spec(&view.name, view.nbytes - 2, 4), &[0; 4])),
        AgentErrorKind::OutOfRange
    );
    assert_eq!(
        refused(write(spec(&view.name, 0, 4), &[0; 4])),
        AgentErrorKind::FileView
    );
    assert_eq!(
        refused(write(spec(&repacked.name, 144, 144), &[0; 144])),
        AgentErrorKind::WholeTensorOnly
    );
    // A frame that says it carries more than its writes cover.
    assert_eq!(
        refused(write(spec(&repacked.name, 0, repacked.nbytes), &[0; 16])),
        AgentErrorKind::Malformed
    );
    // A client that hangs up in the middle of a whole-tensor write leaves nothing
    // half-written: the agent reads a batch whole before it writes.
    {
        let request = Request::Write {
            writes: vec![spec(&repacked.name, 0, repacked.nbytes)],
        };
        let json = serde_json::to_vec(&request).unwrap();
        let mut s = UnixStream::connect(&l.socket).unwrap();
        s.write_all(&(json.len() as u32).to_le_bytes()).unwrap();
        s.write_all(&repacked.nbytes.to_le_bytes()).unwrap();
        s.write_all(&json).unwrap();
        s.write_all(&vec![0u8; (repacked.nbytes / 2) as usize])
            .unwrap();
    }
    // A peer of another user is refused (the socket is opened to everyone for this).
    {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        std::fs::set_permissions(&l.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        let dir = l.socket.parent().unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        // A copy of `hotpatch` that the other user can run, wherever this one lives.
        let bin_dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(bin_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = bin_dir.path().join("hotpatch");
        std::fs::copy(HOTPATCH, &bin).unwrap();
        let out = Command::new(&bin)
            .args(["agent", "status"])
            .arg(&l.socket)
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            text.contains("PeerRefused") && text.contains("65534"),
            "{text}"
        );
        std::fs::set_permissions(&l.socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let (_, hello) = AgentClient::connect(&l.socket).unwrap();
    assert_eq!(hello.passes.writes, 0, "no refused request wrote a byte");
    assert_eq!(top_logprobs(l.server.port), before);
    assert!(matches!(
        tests::http_request(l.server.port, "GET", "/health", None),
        Ok((200, _))
    ));
}

#[test]
fn a_tensor_held_by_a_remote_rpc_server_is_patched_and_restored() {
    let rpc_port = tests::free_port();
    let mut rpc = Command::new(tests::llama_tool("ggml-rpc-server"))
        .args(["-H", "127.0.0.1", "-p", &rpc_port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let endpoint = format!("127.0.0.1:{rpc_port}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::net::TcpStream::connect(&endpoint).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the RPC server did not listen"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let l = launch(&["--rpc", &endpoint, "-ngl", "99", "-c", "512", "-t", "2"]);
    let all = tensors(&l.socket);
    let remote: Vec<&TensorEntry> = all.iter().filter(|t| t.access == Access::Remote).collect();
    assert!(!remote.is_empty(), "{all:?}");
    let target = remote
        .iter()
        .find(|t| t.name.contains("ffn_down"))
        .unwrap_or(&remote[0])
        .name
        .clone();
    let model = l.model.to_str().unwrap();
    let socket = l.socket.to_str().unwrap();
    let before = top_logprobs(l.server.port);
    ok(&[
        "patch", model, "--tensor", &target, "--scale", "0.1", "--agent", socket,
    ]);
    // A remote buffer reads back in the file's layout: the patched bytes are there.
    let (mut client, _) = AgentClient::connect(&l.socket).unwrap();
    let entry = all.iter().find(|t| t.name == target).unwrap();
    let remote_bytes = client.read(&target, 0, entry.nbytes).unwrap();
    let file = byte_tier::MappedFile::open(&l.model).unwrap();
    let info = file
        .parse()
        .unwrap()
        .require_tensor(&target)
        .unwrap()
        .clone();
    let range = info.data_range();
    let file_bytes = &file.bytes()[range.start as usize..range.end as usize];
    assert_ne!(
        remote_bytes.as_slice(),
        file_bytes,
        "the remote copy changed, the file did not"
    );
    assert_ne!(top_logprobs(l.server.port), before);
    ok(&["revert", model, "--agent", socket, "--last"]);
    assert_eq!(
        client.read(&target, 0, entry.nbytes).unwrap().as_slice(),
        file_bytes
    );
    assert_eq!(top_logprobs(l.server.port), before);
    drop(l);
    let _ = rpc.kill();
    let _ = rpc.wait();
}

#[test]
fn serve_with_the_agent_patches_a_repacked_tensor_through_the_admin_api() {
    use crate::served::{TOKEN, admin, start_serve_with};
    let l = launch(&cpu_args());
    let all = tensors(&l.socket);
    let repacked = first_with(&all, Access::WholeTensor, "q4_K");
    let token = l.model.with_file_name("token");
    std::fs::write(&token, TOKEN).unwrap();
    let port = tests::free_port();
    let socket = l.socket.to_str().unwrap();
    let _serve = start_serve_with(l.server.port, &l.model, &token, port, &["--agent", socket]);
    let before = top_logprobs(l.server.port);
    let (status, reply) = admin(
        port,
        "POST",
        "/admin/patches",
        Some(json!({"name": "quiet", "tensor": repacked, "transform": {"scale": 0.1}})),
    );
    assert_eq!(status, 201, "{reply}");
    assert_ne!(top_logprobs(l.server.port), before);
    let id = reply["id"].as_str().unwrap();
    let (status, reply) = admin(port, "DELETE", &format!("/admin/patches/{id}"), None);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(top_logprobs(l.server.port), before);
    assert_eq!(
        std::fs::read(&l.model).unwrap(),
        std::fs::read(tests::real_model()).unwrap()
    );
}
