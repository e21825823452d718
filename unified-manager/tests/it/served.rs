//! A model that `hotpatch serve` holds, as a user meets it: the proxy checks that its
//! model is the one llama-server serves, another writer is told who holds the file and
//! how to get through, patches sent through the proxy keep its cache right, layered
//! patches revert as layers, and patches outlive a killed proxy honestly.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

const HOTPATCH: &str = env!("CARGO_BIN_EXE_hotpatch");
pub(crate) const TOKEN: &str = "served-test-token";

fn run(args: &[&str]) -> Output {
    Command::new(HOTPATCH).args(args).output().unwrap()
}

fn ok(args: &[&str]) -> String {
    let output = run(args);
    assert!(
        output.status.success(),
        "hotpatch {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// A `hotpatch serve` child process, killed when dropped.
pub(crate) struct Serve {
    child: Child,
    port: u16,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _already_exited = self.child.kill();
        let _reaped = self.child.wait();
    }
}

fn start_serve(upstream: u16, model: &Path, token: &Path, port: u16) -> Serve {
    start_serve_with(upstream, model, token, port, &[])
}

/// `hotpatch serve` with `extra` arguments, once its admin API answers.
pub(crate) fn start_serve_with(
    upstream: u16,
    model: &Path,
    token: &Path,
    port: u16,
    extra: &[&str],
) -> Serve {
    let child = Command::new(HOTPATCH)
        .args([
            "serve",
            "--upstream",
            &format!("http://127.0.0.1:{upstream}"),
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--model")
        .arg(model)
        .arg("--admin-token-file")
        .arg(token)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut serve = Serve { child, port };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(status)) = serve.child.try_wait() {
            panic!("hotpatch serve exited with {status}");
        }
        if admin(port, "GET", "/admin/patches", None).0 == 200 {
            return serve;
        }
        assert!(Instant::now() < deadline, "hotpatch serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An admin request with the token: status and JSON body.
pub(crate) fn admin(port: u16, method: &str, path: &str, body: Option<Json>) -> (u16, Json) {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return (0, Json::Null);
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = Vec::new();
    if stream.read_to_end(&mut response).is_err() {
        return (0, Json::Null);
    }
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let rest = if head.to_ascii_lowercase().contains("chunked") {
        tests::dechunk(rest)
    } else {
        rest.to_owned()
    };
    (status, serde_json::from_str(&rest).unwrap_or(Json::Null))
}

/// A deterministic completion through the proxy: the cache header and the top
/// log-probabilities of the first token.
fn complete(port: u16) -> (String, Json) {
    use std::io::{Read, Write};
    let body = json!({"prompt": "The capital of France is", "n_predict": 1,
        "temperature": 0.0, "n_probs": 5})
    .to_string();
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap();
    let cache = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("x-hotpatch-cache: ")
                .map(str::to_owned)
        })
        .unwrap_or_default();
    let rest = if head.to_ascii_lowercase().contains("chunked") {
        tests::dechunk(rest)
    } else {
        rest.to_owned()
    };
    let reply: Json = serde_json::from_str(&rest).unwrap_or_else(|e| panic!("{e}: {rest}"));
    (cache, reply["completion_probabilities"][0].clone())
}

struct Setup {
    _dir: tempfile::TempDir,
    model: PathBuf,
    token: PathBuf,
    slots: PathBuf,
    original: Vec<u8>,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    std::fs::copy(tests::real_model(), &model).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let slots = dir.path().join("slots");
    std::fs::create_dir(&slots).unwrap();
    let original = std::fs::read(&model).unwrap();
    Setup {
        model,
        token,
        slots,
        original,
        _dir: dir,
    }
}

#[test]
fn serve_refuses_a_model_that_is_not_the_one_llama_server_serves() {
    let s = setup();
    let llama = tests::LlamaServer::start(&s.model, &[]);
    let copy = s.model.with_file_name("copy.gguf");
    std::fs::copy(&s.model, &copy).unwrap();
    let output = Command::new(HOTPATCH)
        .args([
            "serve",
            "--upstream",
            &format!("http://127.0.0.1:{}", llama.port),
        ])
        .args(["--listen", &format!("127.0.0.1:{}", tests::free_port())])
        .arg("--model")
        .arg(&copy)
        .arg("--admin-token-file")
        .arg(&s.token)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    // Both paths are named: the file given and the one the upstream serves.
    assert!(message.contains(copy.to_str().unwrap()), "{message}");
    assert!(message.contains(s.model.to_str().unwrap()), "{message}");
    assert!(message.contains("--model-unverified"), "{message}");
    // With --model-unverified it starts, and says so in every patch reply.
    let port = tests::free_port();
    let serve = start_serve_with(llama.port, &copy, &s.token, port, &["--model-unverified"]);
    let (status, reply) = admin(
        port,
        "POST",
        "/admin/patches",
        Some(json!({"name": "p", "tensor": "output_norm.weight", "transform": {"scale": 0.5}})),
    );
    assert_eq!(status, 201, "{reply}");
    assert!(
        reply["model"].as_str().unwrap().contains("not verified"),
        "{reply}"
    );
    drop(serve);
}

#[test]
fn a_patch_sent_through_the_serving_proxy_misses_its_cache_and_reverts_exactly() {
    let s = setup();
    let path = s.model.to_str().unwrap();
    let llama =
        tests::LlamaServer::start(&s.model, &["--slot-save-path", s.slots.to_str().unwrap()]);
    let rules = s.model.with_file_name("rules.toml");
    std::fs::write(&rules, "[cache]\nenabled = true\n").unwrap();
    let port = tests::free_port();
    // The rules file turns the response cache on.
    let serve = start_serve_with(
        llama.port,
        &s.model,
        &s.token,
        port,
        &["--rules", rules.to_str().unwrap()],
    );
    let (first, before) = complete(serve.port);
    assert_eq!(first, "miss");
    let (again, cached) = complete(serve.port);
    assert_eq!(again, "hit");
    assert_eq!(cached, before);

    // A plain patch of the served file is refused, naming who holds it and the way
    // through.
    let refused = run(&[
        "patch",
        path,
        "--tensor",
        "output_norm.weight",
        "--scale",
        "0.5",
    ]);
    assert_eq!(refused.status.code(), Some(1));
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(
        message.contains(&format!("process {}", serve.child.id())),
        "{message}"
    );
    assert!(
        message.contains(&format!("http://127.0.0.1:{port}/admin")),
        "{message}"
    );
    assert!(message.contains("--server"), "{message}");
    assert_eq!(std::fs::read(&s.model).unwrap(), s.original);

    // Through the proxy: the same plan and report, and the next request is a miss
    // answered with the new weights.
    let server = format!("http://127.0.0.1:{port}");
    let token = s.token.to_str().unwrap();
    let report: Json = serde_json::from_str(&ok(&[
        "patch",
        path,
        "--tensor",
        "output_norm.weight",
        "--scale",
        "0.5",
        "--server",
        &server,
        "--admin-token-file",
        token,
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["path"], "elementwise", "{report}");
    assert!(report["changed_bytes"].as_u64().unwrap() > 0, "{report}");
    let (after_patch, patched) = complete(serve.port);
    assert_eq!(after_patch, "miss");
    assert_ne!(patched, before, "the patch did not reach the server");

    ok(&[
        "revert",
        path,
        "--last",
        "--server",
        &server,
        "--admin-token-file",
        token,
    ]);
    let (after_revert, restored) = complete(serve.port);
    assert_eq!(after_revert, "miss");
    assert_eq!(restored, before, "the revert did not restore the answer");
    drop(serve);
    assert_eq!(std::fs::read(&s.model).unwrap(), s.original);
}

#[test]
fn layered_patches_through_the_admin_api_revert_as_layers() {
    let s = setup();
    let llama = tests::LlamaServer::start(&s.model, &[]);
    let serve = start_serve(llama.port, &s.model, &s.token, tests::free_port());
    let patch = |name: &str, scale: f32, priority: i32| {
        let (status, reply) = admin(
            serve.port,
            "POST",
            "/admin/patches",
            Some(json!({"name": name, "tensor": "output_norm.weight",
                "transform": {"scale": scale}, "priority": priority})),
        );
        assert_eq!(status, 201, "{reply}");
        reply["id"].as_str().unwrap().to_owned()
    };
    let a = patch("A", 0.5, 1);
    let with_a = std::fs::read(&s.model).unwrap();
    let b = patch("B", 2.0, 5);
    let (_, listed) = admin(serve.port, "GET", "/admin/patches", None);
    assert_eq!(listed[0]["id"], json!(a));
    assert_eq!(listed[0]["covered_by"], json!([b]));
    let (status, reply) = admin(serve.port, "DELETE", &format!("/admin/patches/{b}"), None);
    assert_eq!(status, 200, "{reply}");
    // A's bytes are back, and A is still there to revert by its id.
    assert_eq!(std::fs::read(&s.model).unwrap(), with_a);
    let (status, reply) = admin(serve.port, "DELETE", &format!("/admin/patches/{a}"), None);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(std::fs::read(&s.model).unwrap(), s.original);
}

#[test]
fn after_a_killed_proxy_expired_patches_are_reverted_and_the_rest_listed() {
    let s = setup();
    let llama = tests::LlamaServer::start(&s.model, &[]);
    let port = tests::free_port();
    let mut serve = start_serve(llama.port, &s.model, &s.token, port);
    let (status, temporary) = admin(
        port,
        "POST",
        "/admin/patches",
        Some(json!({"name": "temporary", "tensor": "output_norm.weight",
            "transform": {"scale": 0.5}, "ttl_secs": 2})),
    );
    assert_eq!(status, 201, "{temporary}");
    let (status, permanent) = admin(
        port,
        "POST",
        "/admin/patches",
        Some(
            json!({"name": "permanent", "tensor": "blk.0.attn_norm.weight",
            "transform": {"scale": 0.25}}),
        ),
    );
    assert_eq!(status, 201, "{permanent}");
    let with_permanent_only = {
        let mut bytes = std::fs::read(&s.model).unwrap();
        let range = byte_range(&s.model, "output_norm.weight");
        bytes[range.clone()].copy_from_slice(&s.original[range]);
        bytes
    };
    // SIGKILL: no shutdown, no revert of the temporary patch.
    serve.child.kill().unwrap();
    serve.child.wait().unwrap();
    // Restarted after the temporary patch's time.
    std::thread::sleep(Duration::from_millis(2500));
    let serve = start_serve(llama.port, &s.model, &s.token, port);
    assert_eq!(std::fs::read(&s.model).unwrap(), with_permanent_only);
    let (_, listed) = admin(serve.port, "GET", "/admin/patches", None);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["id"], permanent["id"]);
    assert_eq!(listed[0]["name"], "permanent");
    let id = permanent["id"].as_str().unwrap();
    let (status, reply) = admin(serve.port, "DELETE", &format!("/admin/patches/{id}"), None);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(std::fs::read(&s.model).unwrap(), s.original);
}

fn byte_range(path: &Path, tensor: &str) -> std::ops::Range<usize> {
    let map = byte_tier::MappedFile::open(path).unwrap();
    let range = map.parse().unwrap().tensor(tensor).unwrap().data_range();
    range.start as usize..range.end as usize
}

#[test]
fn a_proxy_serving_a_shard_set_patches_the_shard_that_holds_the_tensor() {
    let s = setup();
    let prefix = s.model.with_file_name("gemma");
    ok(&[
        "split",
        s.model.to_str().unwrap(),
        prefix.to_str().unwrap(),
        "--split-max-tensors",
        "100",
    ]);
    let shard = |n: u32| {
        s.model
            .with_file_name(format!("gemma-0000{n}-of-00003.gguf"))
    };
    let (first, last) = (shard(1), shard(3));
    let before_bytes = std::fs::read(&last).unwrap();
    let llama = tests::LlamaServer::start(&first, &["--slot-save-path", s.slots.to_str().unwrap()]);
    let port = tests::free_port();
    let serve = start_serve(llama.port, &first, &s.token, port);

    // The proxy holds every shard: it lists all 236 tensors, each with its file.
    let (status, tensors) = admin(port, "GET", "/admin/tensors", None);
    assert_eq!(status, 200);
    let tensors = tensors.as_array().unwrap();
    assert_eq!(tensors.len(), 236);
    let in_last = tensors
        .iter()
        .find(|t| {
            t["file"].as_str() == last.to_str()
                && t["name"].as_str().unwrap().ends_with("ffn_down.weight")
        })
        .expect("an ffn_down tensor in the last shard");
    let tensor = in_last["name"].as_str().unwrap();

    let (_, before) = complete(port);
    let (status, reply) = admin(
        port,
        "POST",
        "/admin/patches",
        Some(json!({"name": "silence", "tensor": tensor, "transform": {"zero": true}})),
    );
    assert_eq!(status, 201, "{reply}");
    assert_eq!(reply["file"].as_str(), last.to_str(), "{reply}");
    let (_, patched) = complete(port);
    assert_ne!(
        patched, before,
        "the patch to {tensor} did not reach the server"
    );
    let (_, listed) = admin(port, "GET", "/admin/patches", None);
    assert_eq!(listed[0]["file"].as_str(), last.to_str(), "{listed}");

    // A lock on the patched bytes of that shard refuses a second patch there.
    let (status, lock) = admin(
        port,
        "POST",
        "/admin/locks",
        Some(json!({"tensor": tensor})),
    );
    assert_eq!(status, 201);
    assert_eq!(lock["file"].as_str(), last.to_str(), "{lock}");
    let (status, refused) = admin(
        port,
        "POST",
        "/admin/patches",
        Some(
            json!({"name": "again", "tensor": tensor, "transform": {"scale": 0.5}, "priority": 5}),
        ),
    );
    assert_eq!(status, 409, "{refused}");
    assert!(refused.to_string().contains("overlap lock"), "{refused}");
    // A byte-range lock names no file of a set.
    let (status, _) = admin(
        port,
        "POST",
        "/admin/locks",
        Some(json!({"start": 0, "end": 8})),
    );
    assert_eq!(status, 400);

    let id = reply["id"].as_str().unwrap();
    let (status, reverted) = admin(port, "DELETE", &format!("/admin/patches/{id}"), None);
    assert_eq!(status, 200, "{reverted}");
    let (_, restored) = complete(port);
    assert_eq!(restored, before, "the revert did not restore the answer");
    drop(serve);
    assert!(std::fs::read(&last).unwrap() == before_bytes);
}
