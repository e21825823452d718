//! Every command that `hotpatch --help` lists runs, as a new user runs it: once with
//! valid arguments, from the model's directory, with relative paths.
//!
//! The list of commands comes from the help output itself, so a command added without a
//! case here fails the test; the cases name the command they cover, so a case for a
//! command that no longer exists fails it too.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use byte_tier::Gguf;
use unified_manager::demo::{DemoShape, write_demo_model};

const HOTPATCH: &str = env!("CARGO_BIN_EXE_hotpatch");

/// The model every case works on, relative to the working directory.
const MODEL: &str = "model.gguf";

const PRESET: &str = r#"
name = "smoke"
version = 1
description = "halves the output norm"

[[memory_patch]]
name = "halve-output-norm"
tensor = "output_norm.weight"
transform = { scale = 0.5 }
"#;

/// Runs `hotpatch args` in `dir` and returns its standard output; any exit but 0 fails
/// the test with the command line and its standard error.
fn run_in(dir: &Path, args: &[String]) -> String {
    let output = Command::new(HOTPATCH)
        .args(args)
        .current_dir(dir)
        // Nothing a case does may reach the user's own configuration.
        .env("HOTPATCH_CONFIG_DIR", dir.join("default-config"))
        .env("XDG_CONFIG_HOME", dir.join("xdg-config"))
        .output()
        .unwrap();
    assert!(
        output.status.code() == Some(0),
        "`hotpatch {}` exited with {} (101 is a panic):\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The subcommands the help of `path` lists (without `help`).
fn listed_subcommands(path: &[String]) -> Vec<String> {
    // `hotpatch help A B` rather than `hotpatch A B --help`: `bytes FILE write` takes a
    // positional argument before its subcommand, which `--help` would read as FILE.
    let mut args = vec!["help".to_owned()];
    args.extend(path.iter().cloned());
    let output = Command::new(HOTPATCH).args(&args).output().unwrap();
    assert!(
        output.status.success(),
        "`hotpatch {}` failed",
        args.join(" ")
    );
    let text = String::from_utf8(output.stdout).unwrap();
    text.lines()
        .skip_while(|line| line.trim() != "Commands:")
        .skip(1)
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// Every leaf command, as the words that name it (`["bytes", "write"]`).
fn every_listed_command() -> BTreeSet<String> {
    let mut leaves = BTreeSet::new();
    let mut pending: Vec<Vec<String>> = vec![Vec::new()];
    while let Some(path) = pending.pop() {
        assert!(
            path.len() <= 3,
            "commands nest deeper than expected: {path:?}"
        );
        let children = listed_subcommands(&path);
        if children.is_empty() {
            leaves.insert(path.join(" "));
        }
        for child in children {
            let mut next = path.clone();
            next.push(child);
            pending.push(next);
        }
    }
    leaves
}

/// One run of a command: the command it covers and its whole command line.
struct Case {
    command: &'static str,
    args: Vec<String>,
}

fn case(command: &'static str, args: &[&str]) -> Case {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    // The words of the command appear in order on its command line.
    let mut words = command.split(' ');
    let mut want = words.next();
    for arg in &args {
        if want == Some(arg.as_str()) {
            want = words.next();
        }
    }
    assert_eq!(
        want, None,
        "the case for {command:?} does not name it: {args:?}"
    );
    Case { command, args }
}

/// The cases, in an order where each one's inputs exist (a manifest before its check,
/// a transaction before its revert, an export before its import). `data` is the
/// absolute offset of `output_norm.weight`'s data (F32).
fn offline_cases(data: u64) -> Vec<Case> {
    let at = |delta: u64| (data + delta).to_string();
    let (from, to, second) = (at(0), at(16), at(4));
    vec![
        case("inspect", &["inspect", MODEL]),
        case("inspect", &["inspect", MODEL, "--json", "--full"]),
        case("demo", &["demo", "--keep", "demo-out"]),
        case(
            "hexdump",
            &[
                "hexdump",
                MODEL,
                "--tensor",
                "output_norm.weight",
                "--len",
                "32",
            ],
        ),
        case("search", &["search", MODEL, "GGUF"]),
        case("meta get", &["meta", "get", MODEL, "general.name"]),
        case(
            "meta set",
            &["meta", "set", MODEL, "llama.context_length", "512"],
        ),
        case(
            "meta set",
            &[
                "meta",
                "set",
                MODEL,
                "general.name",
                "a longer smoke-test name",
            ],
        ),
        case(
            "meta set-file",
            &[
                "meta",
                "set-file",
                MODEL,
                "tokenizer.chat_template",
                "template.jinja",
            ],
        ),
        case(
            "meta delete",
            &["meta", "delete", MODEL, "tokenizer.chat_template"],
        ),
        case(
            "bytes read",
            &["bytes", MODEL, "read", "--offset", "0", "--len", "16"],
        ),
        case(
            "bytes write",
            &[
                "bytes",
                MODEL,
                "write",
                "--tensor",
                "output_norm.weight",
                "0000803f",
                "0000 803f",
            ],
        ),
        case(
            "bytes write",
            &[
                "bytes",
                MODEL,
                "--dry-run",
                "write",
                "--offset",
                &from,
                "0000803f",
            ],
        ),
        case(
            "bytes fill",
            &[
                "bytes",
                MODEL,
                "fill",
                "--tensor",
                "output_norm.weight",
                "--offset",
                "8",
                "--len",
                "8",
                "--byte",
                "0",
            ],
        ),
        case(
            "bytes copy",
            &[
                "bytes", MODEL, "copy", "--from", &from, "--to", &to, "--len", "4",
            ],
        ),
        case(
            "bytes swap",
            &[
                "bytes", MODEL, "swap", "--first", &from, "--second", &second, "--len", "4",
            ],
        ),
        case(
            "bytes xor",
            &[
                "bytes",
                MODEL,
                "xor",
                "--tensor",
                "output_norm.weight",
                "--len",
                "4",
                "--key",
                "00000080",
            ],
        ),
        case(
            "bytes xor",
            &[
                "bytes",
                MODEL,
                "xor",
                "--tensor",
                "output_norm.weight",
                "--len",
                "4",
                "--key",
                "00",
                "--copy",
            ],
        ),
        case(
            "bytes bits",
            &[
                "bytes",
                MODEL,
                "bits",
                "--tensor",
                "output_norm.weight",
                "--len",
                "4",
                "--op",
                "flip:7",
            ],
        ),
        case(
            "bytes rotate",
            &[
                "bytes",
                MODEL,
                "rotate",
                "--tensor",
                "output_norm.weight",
                "--len",
                "4",
                "--width",
                "32",
                "--bits",
                "3",
            ],
        ),
        case(
            "bytes rotate",
            &[
                "bytes",
                MODEL,
                "rotate",
                "--tensor",
                "output_norm.weight",
                "--len",
                "4",
                "--width",
                "32",
                "--bits",
                "-3",
            ],
        ),
        case(
            "bytes reverse",
            &[
                "bytes",
                MODEL,
                "reverse",
                "--tensor",
                "output_norm.weight",
                "--len",
                "4",
            ],
        ),
        case(
            "bytes reverse",
            &[
                "bytes",
                MODEL,
                "reverse",
                "--tensor",
                "output_norm.weight",
                "--len",
                "4",
            ],
        ),
        case(
            "bytes hash",
            &["bytes", MODEL, "hash", "--tensor", "output_norm.weight"],
        ),
        case(
            "bytes compare",
            &["bytes", MODEL, "compare", "--offset", "0", "47475546"],
        ),
        case(
            "patch",
            &[
                "patch",
                MODEL,
                "--tensor",
                "output_norm.weight",
                "--scale",
                "0.5",
            ],
        ),
        case("history", &["history", MODEL]),
        case("revert", &["revert", MODEL, "--last"]),
        // The agent loads into any program; in one without ggml it says it is inert.
        case(
            "launch",
            &[
                "launch",
                "--socket",
                "agent.sock",
                "--",
                HOTPATCH,
                "agent",
                "status",
                "agent.sock",
            ],
        ),
        case(
            "agent status",
            &[
                "launch",
                "--socket",
                "agent.sock",
                "--",
                HOTPATCH,
                "agent",
                "status",
                "agent.sock",
                "--json",
            ],
        ),
        case("recover", &["recover", MODEL]),
        case(
            "tensor export",
            &[
                "tensor",
                "export",
                MODEL,
                "output_norm.weight",
                "-o",
                "norm.npy",
            ],
        ),
        case(
            "tensor import",
            &["tensor", "import", MODEL, "output_norm.weight", "norm.npy"],
        ),
        case(
            "tensor rename",
            &[
                "tensor",
                "rename",
                MODEL,
                "output.weight",
                "head.weight",
                "-o",
                "renamed.gguf",
            ],
        ),
        case(
            "tensor requantize",
            &[
                "tensor",
                "requantize",
                MODEL,
                "--tensors",
                "attn_q",
                "--type",
                "Q8_0",
                "-o",
                "requantized.gguf",
            ],
        ),
        case(
            "tensor remove",
            &[
                "tensor",
                "remove",
                MODEL,
                "output.weight",
                "-o",
                "removed.gguf",
            ],
        ),
        case(
            "requantize",
            &[
                "requantize",
                MODEL,
                "--tensors",
                "^output\\.weight$",
                "--type",
                "F16",
                "-o",
                "f16-head.gguf",
            ],
        ),
        case(
            "prune",
            &["prune", MODEL, "--layers", "1", "-o", "pruned.gguf"],
        ),
        case(
            "optimize",
            &[
                "optimize",
                MODEL,
                "--tensors",
                "ffn_down",
                "--to",
                "Q8_0",
                "--prune",
                "0",
                "-o",
                "optimized.gguf",
            ],
        ),
        case(
            "diff",
            &["diff", MODEL, "pruned.gguf", "--plot", "diff.svg"],
        ),
        case(
            "verify",
            &["verify", MODEL, "--write-manifest", "manifest.txt"],
        ),
        case("verify", &["verify", MODEL, "--check", "manifest.txt"]),
        case(
            "safety",
            &[
                "safety",
                MODEL,
                "--manifest",
                "manifest.txt",
                "--repair",
                "zero",
            ],
        ),
        case("boost", &["boost", MODEL]),
        case(
            "preset save",
            &["preset", "save", "preset.toml", "--config-dir", "config"],
        ),
        case("preset list", &["preset", "list", "--config-dir", "config"]),
        case(
            "preset show",
            &["preset", "show", "smoke", "--config-dir", "config"],
        ),
        case(
            "preset apply",
            &["preset", "apply", "smoke", MODEL, "--config-dir", "config"],
        ),
        case(
            "config export",
            &["config", "export", "config.json", "--config-dir", "config"],
        ),
        case(
            "config import",
            &[
                "config",
                "import",
                "config.json",
                "--config-dir",
                "imported",
            ],
        ),
        case(
            "preset delete",
            &["preset", "delete", "smoke", "--config-dir", "config"],
        ),
        case(
            "split",
            &["split", MODEL, "part", "--split-max-tensors", "16"],
        ),
        case(
            "merge",
            &["merge", "part-00001-of-00003.gguf", "merged.gguf"],
        ),
        case(
            "tensor copy",
            &[
                "tensor",
                "copy",
                MODEL,
                "output.weight",
                "removed.gguf",
                "-o",
                "grafted.gguf",
            ],
        ),
        case(
            "layers duplicate",
            &[
                "layers",
                "duplicate",
                MODEL,
                "--layers",
                "1..2",
                "--at",
                "2",
                "-o",
                "duplicated.gguf",
            ],
        ),
        case("ablate", &["ablate", MODEL, "--direction", "direction.npy"]),
        case("lora merge", &["lora", "merge", MODEL, "adapter.gguf"]),
        case("lora unmerge", &["lora", "unmerge", MODEL, "adapter.gguf"]),
    ]
}

/// The cases that talk to a running `hotpatch serve` at `url` (its admin API; its
/// upstream is down, which none of them needs).
fn server_cases(url: &str) -> Vec<Case> {
    vec![
        case(
            "safety",
            &[
                "safety",
                MODEL,
                "--server",
                url,
                "--admin-token-file",
                "token.txt",
                "--max-tokens",
                "64",
                "--redact",
                "secret",
            ],
        ),
        case(
            "boost",
            &[
                "boost",
                MODEL,
                "--no-cold-read",
                "--server",
                url,
                "--admin-token-file",
                "token.txt",
                "--server-cache",
            ],
        ),
        case(
            "preset save",
            &["preset", "save", "preset.toml", "--config-dir", "config"],
        ),
        case(
            "preset apply",
            &[
                "preset",
                "apply",
                "smoke",
                "preset-target.gguf",
                "--server",
                url,
                "--admin-token-file",
                "token.txt",
                "--config-dir",
                "config",
            ],
        ),
    ]
}

/// Runs the `hotpatch fleet` commands against a one-member etcd cluster and one
/// `hotpatch serve --fleet` sidecar on a fresh copy of the model; returns the commands
/// covered.
fn fleet_cases(dir: &Path) -> Vec<&'static str> {
    let etcd = tests::EtcdCluster::start(1);
    let endpoints = etcd.endpoint_list();
    std::fs::copy(dir.join(MODEL), dir.join("fleet.gguf")).unwrap();
    let port = tests::free_port();
    let dead = tests::free_port();
    let mut sidecar = Command::new(HOTPATCH)
        .args(["serve", "--upstream", &format!("http://127.0.0.1:{dead}")])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--model", "fleet.gguf", "--model-unverified"])
        .args(["--fleet", "smoke", "--etcd", &endpoints, "--replica", "one"])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let members = ["fleet", "members", "smoke", "--etcd", &endpoints, "--json"].map(str::to_owned);
    while !run_in(dir, &members).contains("\"one\"") {
        assert!(Instant::now() < deadline, "the sidecar did not register");
        std::thread::sleep(Duration::from_millis(50));
    }
    let cases = [
        case(
            "fleet members",
            &["fleet", "members", "smoke", "--etcd", &endpoints],
        ),
        case(
            "fleet apply",
            &[
                "fleet",
                "apply",
                "smoke",
                "preset.toml",
                "--etcd",
                &endpoints,
                "--drain",
            ],
        ),
        case(
            "fleet status",
            &["fleet", "status", "smoke", "--etcd", &endpoints, "--json"],
        ),
        case(
            "fleet revert",
            &["fleet", "revert", "smoke", "--etcd", &endpoints],
        ),
        case(
            "fleet history",
            &["fleet", "history", "smoke", "--etcd", &endpoints],
        ),
    ];
    let mut covered = Vec::new();
    for case in cases {
        run_in(dir, &case.args);
        covered.push(case.command);
    }
    let _already_exited = sidecar.kill();
    let _reaped = sidecar.wait();
    covered
}

/// A `hotpatch serve` on a loopback port, stopped with SIGTERM by [`Serve::stop`].
struct Serve {
    /// `None` once stopped.
    child: Option<Child>,
    port: u16,
}

impl Serve {
    fn start(dir: &Path) -> (Serve, Case) {
        std::fs::copy(dir.join(MODEL), dir.join("served.gguf")).unwrap();
        // The local `preset apply` case left its patch applied to the model (it stays
        // listed in the journal); the server case applies the preset to a fresh copy.
        std::fs::copy(dir.join(MODEL), dir.join("preset-target.gguf")).unwrap();
        let port = tests::free_port();
        let dead = tests::free_port();
        let command = case(
            "serve",
            &[
                "serve",
                "--upstream",
                &format!("http://127.0.0.1:{dead}"),
                "--listen",
                &format!("127.0.0.1:{port}"),
                // A copy: the proxy holds its model's journal as the writer, and the
                // cases edit `model.gguf` while it runs.
                "--model",
                "served.gguf",
                // No llama-server runs here to say which model it serves.
                "--model-unverified",
                "--rules",
                "rules.toml",
                "--admin-token-file",
                "token.txt",
            ],
        );
        let child = Command::new(HOTPATCH)
            .args(&command.args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Held by `Serve` from here on, so that a failed start does not leave it running.
        let mut serve = Serve {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while tests::http_request(port, "GET", "/metrics", None).is_err() {
            if let Some(status) = serve.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("hotpatch serve exited with {status} before it answered");
            }
            assert!(Instant::now() < deadline, "hotpatch serve did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        (serve, command)
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Stops the server the way a service manager does and asserts a clean exit.
    fn stop(mut self) {
        let child = self.child.take().unwrap();
        let sent = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.code() == Some(0),
            "hotpatch serve exited with {} on SIGTERM:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        // A server still here means the test failed before stopping it: do not leave it
        // behind. The test's own failure is the one to report, so errors are ignored.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A directory holding the generated model as `model.gguf` and the inputs the cases read.
fn workspace() -> (tempfile::TempDir, u64) {
    let dir = tempfile::tempdir().unwrap();
    let generated = write_demo_model(dir.path(), DemoShape::default()).unwrap();
    std::fs::rename(&generated, dir.path().join(MODEL)).unwrap();
    write_inputs(dir.path());
    let bytes = std::fs::read(dir.path().join(MODEL)).unwrap();
    let data = Gguf::parse(&bytes)
        .unwrap()
        .require_tensor("output_norm.weight")
        .unwrap()
        .data_offset;
    (dir, data)
}

fn write_inputs(dir: &Path) {
    std::fs::write(dir.join("preset.toml"), PRESET).unwrap();
    std::fs::write(
        dir.join("template.jinja"),
        "{% for m in messages %}{{ m.content }}{% endfor %}",
    )
    .unwrap();
    std::fs::write(dir.join("token.txt"), "smoke-token\n").unwrap();
    // A direction in the demo's embedding space, and a rank-2 LoRA adapter for one of
    // its attention matrices.
    let n_embd = u64::from(DemoShape::default().embedding_length);
    let direction: Vec<f32> = (0..n_embd).map(|i| ((i % 7) as f32 - 3.0) * 0.1).collect();
    byte_tier::codec::write_tensor_npy(&dir.join("direction.npy"), &[n_embd], &direction).unwrap();
    let mut adapter = byte_tier::GgufWriter::new();
    adapter.set("general.architecture", "llama");
    adapter.set("general.type", "adapter");
    adapter.set("adapter.type", "lora");
    adapter.set("adapter.lora.alpha", 2.0f32);
    let rank = 2u64;
    let values = |n: u64| -> Vec<u8> {
        (0..n)
            .flat_map(|i| (((i % 5) as f32 - 2.0) * 0.01).to_le_bytes())
            .collect()
    };
    adapter.add_tensor(byte_tier::TensorSpec::from_bytes(
        "blk.0.attn_q.weight.lora_a",
        vec![n_embd, rank],
        byte_tier::GgmlType::F32,
        values(n_embd * rank),
    ));
    adapter.add_tensor(byte_tier::TensorSpec::from_bytes(
        "blk.0.attn_q.weight.lora_b",
        vec![rank, n_embd],
        byte_tier::GgmlType::F32,
        values(n_embd * rank),
    ));
    adapter.write_to_path(&dir.join("adapter.gguf")).unwrap();
    std::fs::write(
        dir.join("rules.toml"),
        "[[rule]]\nname = \"cap\"\naction = { type = \"clamp\", key = \"max_tokens\", min = 1, max = 256 }\n",
    )
    .unwrap();
}

#[test]
fn every_listed_command_runs_with_valid_arguments_and_relative_paths() {
    // `launch` preloads the agent library, which `cargo test` alone does not build.
    tests::agent_library(std::path::Path::new(HOTPATCH));
    let listed = every_listed_command();
    let (dir, data) = workspace();
    let dir_path = dir.path().to_owned();

    let mut covered = BTreeSet::new();
    for case in offline_cases(data) {
        run_in(&dir_path, &case.args);
        covered.insert(case.command);
    }
    let (serve, serve_case) = Serve::start(&dir_path);
    covered.insert(serve_case.command);
    for case in server_cases(&serve.url()) {
        run_in(&dir_path, &case.args);
        covered.insert(case.command);
    }
    serve.stop();
    for command in fleet_cases(&dir_path) {
        covered.insert(command);
    }

    let covered: BTreeSet<String> = covered.into_iter().map(str::to_owned).collect();
    let missing: Vec<_> = listed.difference(&covered).collect();
    assert!(
        missing.is_empty(),
        "listed commands without a case: {missing:?}"
    );
    let unknown: Vec<_> = covered.difference(&listed).collect();
    assert!(
        unknown.is_empty(),
        "cases for commands not listed: {unknown:?}"
    );
}

/// The commands a user runs first on a model they downloaded, on a copy of the real one:
/// reading it, a metadata edit in place and as a rewrite, a byte write and its revert,
/// an export next to it by a bare file name.
#[test]
fn the_first_commands_a_user_runs_work_on_a_copy_of_the_real_model() {
    let dir = tempfile::tempdir().unwrap();
    let real: PathBuf = tests::real_model();
    std::fs::copy(&real, dir.path().join(MODEL)).unwrap();
    write_inputs(dir.path());
    let cases = [
        case("inspect", &["inspect", MODEL, "--json"]),
        case("meta get", &["meta", "get", MODEL, "general.architecture"]),
        case(
            "meta set",
            &["meta", "set", MODEL, "gemma3.context_length", "8192"],
        ),
        case(
            "meta set",
            &[
                "meta",
                "set",
                MODEL,
                "general.name",
                "a longer name than before",
            ],
        ),
        case(
            "bytes write",
            &[
                "bytes",
                MODEL,
                "write",
                "--tensor",
                "output_norm.weight",
                "0000803f",
            ],
        ),
        case(
            "bytes hash",
            &["bytes", MODEL, "hash", "--tensor", "output_norm.weight"],
        ),
        case("history", &["history", MODEL]),
        case("revert", &["revert", MODEL, "--last"]),
        case("hexdump", &["hexdump", MODEL, "--len", "64"]),
        case("search", &["search", MODEL, "gemma3", "--limit", "3"]),
        case(
            "preset save",
            &["preset", "save", "preset.toml", "--config-dir", "config"],
        ),
        case(
            "config export",
            &["config", "export", "config.json", "--config-dir", "config"],
        ),
    ];
    for case in cases {
        run_in(dir.path(), &case.args);
    }
    let bytes = std::fs::read(dir.path().join(MODEL)).unwrap();
    let gguf = Gguf::parse(&bytes).unwrap();
    assert_eq!(gguf.tensors().len(), 236);
}
