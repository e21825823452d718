//! `hotpatch inspect` and `hotpatch demo`.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value as Json;

fn hotpatch(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hotpatch"))
        .args(args)
        .output()
        .expect("failed to run hotpatch")
}

fn stdout_json(output: &Output) -> Json {
    assert!(
        output.status.success(),
        "hotpatch failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("hotpatch printed invalid JSON")
}

fn gguf_dump_json(model: &Path) -> Json {
    let gguf_dump = tests::oracle_python().with_file_name("gguf-dump");
    let output = Command::new(gguf_dump)
        .args(["--json", "--json-array"])
        .arg(model)
        .output()
        .expect("failed to run gguf-dump");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("gguf-dump printed invalid JSON")
}

#[test]
fn inspect_json_matches_gguf_dump_on_the_real_model() {
    let model = tests::real_model();
    let model_arg = model.to_str().unwrap();
    let ours = stdout_json(&hotpatch(&["inspect", "--json", "--full", model_arg]));
    let theirs = gguf_dump_json(&model);

    assert_eq!(ours["filename"], theirs["filename"]);
    assert_eq!(ours["endian"], theirs["endian"]);
    let (our_keys, their_keys) = (
        ours["metadata"].as_object().unwrap(),
        theirs["metadata"].as_object().unwrap(),
    );
    assert_eq!(
        our_keys.keys().collect::<Vec<_>>(),
        their_keys.keys().collect::<Vec<_>>(),
        "keys or their order differ"
    );
    for (key, theirs) in their_keys {
        let ours = &our_keys[key];
        for field in ["index", "type", "offset", "value", "array_types"] {
            assert_eq!(ours.get(field), theirs.get(field), "{key}: {field} differs");
        }
    }
    let (our_tensors, their_tensors) = (
        ours["tensors"].as_object().unwrap(),
        theirs["tensors"].as_object().unwrap(),
    );
    assert_eq!(their_tensors.len(), 236);
    assert_eq!(
        our_tensors.keys().collect::<Vec<_>>(),
        their_tensors.keys().collect::<Vec<_>>()
    );
    for (name, theirs) in their_tensors {
        let ours = &our_tensors[name];
        for field in ["index", "shape", "type", "offset"] {
            assert_eq!(ours[field], theirs[field], "{name}: {field} differs");
        }
    }
}

#[test]
fn inspect_summarizes_long_arrays_unless_full() {
    let model = tests::real_model();
    let model_arg = model.to_str().unwrap();
    let summary = stdout_json(&hotpatch(&["inspect", "--json", model_arg]));
    let tokens = &summary["metadata"]["tokenizer.ggml.tokens"];
    assert_eq!(tokens["len"], 262_144);
    assert_eq!(tokens["truncated"], true);
    assert_eq!(tokens["head"][0], "<pad>");
    assert!(tokens.get("value").is_none());

    let text = hotpatch(&["inspect", model_arg]);
    assert!(text.status.success());
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains("[STRING; 262144]   tokenizer.ggml.tokens = [\"<pad>\", \"<eos>\""));
    assert!(text.contains("(262136 more)"));
    assert!(text.contains("token_embd.weight"));
    assert!(
        text.len() < 64 * 1024,
        "the summary printed {} bytes",
        text.len()
    );
}

#[test]
fn demo_generates_and_inspects_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let output = hotpatch(&["demo", "--keep", dir.path().to_str().unwrap()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains("general.architecture = \"llama\""), "{text}");
    assert!(text.contains("blk.1.ffn_down.weight"), "{text}");

    let model = dir.path().join("demo-llama.gguf");
    let json = stdout_json(&hotpatch(&["inspect", "--json", model.to_str().unwrap()]));
    assert_eq!(json["metadata"]["llama.block_count"]["value"], 4);
    assert_eq!(json["tensors"].as_object().unwrap().len(), 39);
    assert_eq!(json["diagnostics"], Json::Array(vec![]));
}

#[test]
fn bad_files_give_one_clear_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    let output = hotpatch(&["inspect", missing.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(error.starts_with("hotpatch: open "), "{error}");
    assert_eq!(error.lines().count(), 1, "{error}");

    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, b"GGUF\x03\0\0\0\0\0\0\0\0\0\0\0").unwrap();
    let output = hotpatch(&["inspect", truncated.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    let error = String::from_utf8(output.stderr).unwrap();
    assert!(
        error.contains("truncated: metadata count at offset 16"),
        "{error}"
    );

    let output = hotpatch(&["inspect"]);
    assert_eq!(output.status.code(), Some(2));
}

/// `HOTPATCH_ALLOC=track` on a run with no leak: zero leaks, and the blocks the standard
/// library keeps (stdout's buffer among them) reported apart as held by the runtime.
#[test]
fn a_tracked_inspect_reports_no_leak_and_the_runtime_held_blocks_apart() {
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_hotpatch"))
        .args(["demo", "--keep"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_hotpatch"))
        .arg("inspect")
        .arg(dir.path().join("demo-llama.gguf"))
        .env("HOTPATCH_ALLOC", "track")
        .output()
        .unwrap();
    assert!(output.status.success());
    let report = String::from_utf8_lossy(&output.stderr);
    assert!(
        report.starts_with("neural-alloc: 0 leaks, 0 bytes"),
        "{report}"
    );
    assert!(
        report.contains("held by the runtime for the life of the process"),
        "{report}"
    );
    assert!(
        report.contains("1024 bytes in 1 block: a standard stream's buffer"),
        "{report}"
    );
}
