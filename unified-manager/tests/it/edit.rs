//! Metadata edits and structural rewrites, checked against gguf-py and llama.cpp.

use std::path::Path;
use std::process::Command;

use serde_json::Value as Json;

const HOTPATCH: &str = env!("CARGO_BIN_EXE_hotpatch");

fn hotpatch(args: &[&str]) -> String {
    let output = Command::new(HOTPATCH).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "hotpatch {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn copy_of_real_model(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::copy(tests::real_model(), &path).unwrap();
    path
}

/// What GGUFReader reads: every scalar or string field and a CRC of every tensor's data.
const READ_BACK: &str = r#"
import sys, json, zlib
from gguf import GGUFReader, GGUFValueType
r = GGUFReader(sys.argv[1])
fields = {}
for f in r.fields.values():
    if f.types and f.types[0] != GGUFValueType.ARRAY:
        fields[f.name] = f.contents()
    elif f.types:
        fields[f.name] = {"len": len(f.data)}
tensors = {t.name: [[int(d) for d in t.shape], t.tensor_type.name, zlib.crc32(t.data.tobytes())] for t in r.tensors}
json.dump({"fields": fields, "tensors": tensors}, sys.stdout)
"#;

fn read_back(path: &Path) -> Json {
    serde_json::from_slice(&tests::run_python(READ_BACK, &[path.as_os_str()])).unwrap()
}

#[test]
fn a_scalar_change_is_byte_identical_to_gguf_set_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let theirs = copy_of_real_model(dir.path(), "theirs.gguf");
    let ours = copy_of_real_model(dir.path(), "ours.gguf");
    let status = Command::new(tests::oracle_python().with_file_name("gguf-set-metadata"))
        .args(["--force"])
        .arg(&theirs)
        .args(["gemma3.context_length", "8192"])
        .status()
        .unwrap();
    assert!(status.success());
    let out = hotpatch(&[
        "meta",
        "set",
        ours.to_str().unwrap(),
        "gemma3.context_length",
        "8192",
    ]);
    assert!(out.contains("in place: transaction 1"), "{out}");
    let (a, b) = (
        std::fs::read(&theirs).unwrap(),
        std::fs::read(&ours).unwrap(),
    );
    assert!(a == b, "the files differ");
    assert_ne!(a, std::fs::read(tests::real_model()).unwrap());

    // And the change reverts to the original bytes.
    hotpatch(&["revert", ours.to_str().unwrap(), "--last"]);
    assert!(std::fs::read(&ours).unwrap() == std::fs::read(tests::real_model()).unwrap());
}

#[test]
fn a_chat_template_that_grows_the_header_keeps_every_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_of_real_model(dir.path(), "model.gguf");
    let template = dir.path().join("template.jinja");
    let text = "{% for message in messages %}<start_of_turn>{{ message.role }}\n{{ message.content }}<end_of_turn>\n{% endfor %}".repeat(40);
    std::fs::write(&template, &text).unwrap();
    let before = read_back(&model);
    let out = hotpatch(&[
        "meta",
        "set-file",
        model.to_str().unwrap(),
        "tokenizer.chat_template",
        template.to_str().unwrap(),
    ]);
    assert!(out.contains("rewrote"), "{out}");
    let after = read_back(&model);
    assert_eq!(
        after["fields"]["tokenizer.chat_template"],
        Json::String(text)
    );
    assert_eq!(after["tensors"], before["tensors"], "tensor data changed");
    for (key, value) in before["fields"].as_object().unwrap() {
        if !key.starts_with("GGUF.") {
            assert_eq!(&after["fields"][key], value, "{key}");
        }
    }
}

#[test]
fn pruning_two_layers_of_the_real_model_gives_a_file_gguf_py_and_llama_cpp_load() {
    let dir = tempfile::tempdir().unwrap();
    let pruned = dir.path().join("pruned.gguf");
    let model = tests::real_model();
    let report: Json = serde_json::from_str(&hotpatch(&[
        "prune",
        model.to_str().unwrap(),
        "--layers",
        "3,7",
        "-o",
        pruned.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["blocks_before"], 18);
    assert_eq!(report["blocks_after"], 16);

    let before = read_back(&model);
    let after = read_back(&pruned);
    assert_eq!(after["fields"]["gemma3.block_count"], 16);
    let tensors = after["tensors"].as_object().unwrap();
    let per_block = before["tensors"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("blk.0."))
        .count();
    assert_eq!(
        tensors.len(),
        before["tensors"].as_object().unwrap().len() - 2 * per_block
    );
    // Blocks are renumbered 0..16 with no gap, each as complete as before, and block
    // 3 of the result is block 4 of the original.
    for block in 0..16 {
        let count = tensors
            .keys()
            .filter(|k| k.starts_with(&format!("blk.{block}.")))
            .count();
        assert_eq!(count, per_block, "block {block}");
    }
    assert!(
        tensors
            .keys()
            .all(|k| !k.starts_with("blk.16.") && !k.starts_with("blk.17."))
    );
    assert_eq!(
        tensors["blk.3.attn_q.weight"],
        before["tensors"]["blk.4.attn_q.weight"]
    );
    assert_eq!(
        tensors["blk.6.ffn_down.weight"],
        before["tensors"]["blk.8.ffn_down.weight"]
    );

    // llama.cpp loads it and generates from it.
    let server = tests::LlamaServer::start(&pruned, &[]);
    let (status, body) = tests::http_request(
        server.port,
        "POST",
        "/completion",
        Some(r#"{"prompt": "The capital of France is", "n_predict": 4, "cache_prompt": false}"#),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
    let answer: Json = serde_json::from_str(&body).unwrap();
    assert!(answer["tokens_predicted"].as_u64().unwrap() > 0, "{body}");
}

#[test]
fn a_rewrite_that_runs_out_of_space_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    hotpatch(&["demo", "--keep", dir.path().to_str().unwrap()]);
    let model = dir.path().join("demo-llama.gguf");
    let original = std::fs::read(&model).unwrap();
    let template = dir.path().join("t.txt");
    std::fs::write(&template, "x".repeat(1000)).unwrap();
    // A file size limit of 1 MiB, with SIGXFSZ ignored, makes the write fail with EFBIG
    // as a full disk fails with ENOSPC.
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; ulimit -f 1024; exec {HOTPATCH} meta set-file {} tokenizer.chat_template {}",
            model.display(),
            template.display()
        ))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("File too large"), "{error}");
    assert!(
        std::fs::read(&model).unwrap() == original,
        "the original changed"
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary files left behind: {leftovers:?}"
    );
}

#[test]
fn metadata_edits_refuse_bad_input_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    hotpatch(&["demo", "--keep", dir.path().to_str().unwrap()]);
    let model = dir.path().join("demo-llama.gguf");
    let original = std::fs::read(&model).unwrap();
    for args in [
        vec![
            "meta",
            "set",
            model.to_str().unwrap(),
            "llama.block_count",
            "lots",
        ],
        vec![
            "meta",
            "set",
            model.to_str().unwrap(),
            "tokenizer.ggml.tokens",
            "x",
        ],
        vec!["meta", "delete", model.to_str().unwrap(), "no.such.key"],
        vec!["prune", model.to_str().unwrap(), "--layers", "4"],
        vec!["prune", model.to_str().unwrap(), "--layers", "0,1,2,3"],
        vec![
            "tensor",
            "rename",
            model.to_str().unwrap(),
            "output.weight",
            "token_embd.weight",
        ],
    ] {
        let output = Command::new(HOTPATCH).args(&args).output().unwrap();
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        assert_eq!(
            String::from_utf8_lossy(&output.stderr).lines().count(),
            1,
            "{args:?}"
        );
    }
    assert!(std::fs::read(&model).unwrap() == original);
}
