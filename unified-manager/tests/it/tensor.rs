//! Tensor value edits in place, requantization, export and import, verify and diff, on
//! the real model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value as Json;

const HOTPATCH: &str = env!("CARGO_BIN_EXE_hotpatch");

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

fn copy_model(dir: &Path) -> PathBuf {
    let path = dir.join("model.gguf");
    std::fs::copy(tests::real_model(), &path).unwrap();
    path
}

fn tensor_range(path: &Path, name: &str) -> std::ops::Range<u64> {
    let map = byte_tier::MappedFile::open(path).unwrap();
    map.parse().unwrap().tensor(name).unwrap().data_range()
}

#[test]
fn scaling_a_tensor_in_place_touches_only_its_bytes_and_reverts_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model(dir.path());
    let path = model.to_str().unwrap();
    let original = std::fs::read(&model).unwrap();
    for (tensor, expected_path) in [
        ("blk.0.attn_output.weight", "scales"),
        ("token_embd.weight", "scales"),
        ("output_norm.weight", "elementwise"),
    ] {
        let report: Json = serde_json::from_str(&ok(&[
            "patch", path, "--tensor", tensor, "--scale", "0.5", "--json",
        ]))
        .unwrap();
        assert_eq!(report["path"], expected_path, "{tensor}");
        let patched = std::fs::read(&model).unwrap();
        let range = tensor_range(&model, tensor);
        let changed: Vec<usize> = (0..original.len())
            .filter(|&i| original[i] != patched[i])
            .collect();
        assert!(!changed.is_empty(), "{tensor}: nothing changed");
        assert!(
            changed.iter().all(|&i| range.contains(&(i as u64))),
            "{tensor}: a byte outside {range:?} changed"
        );
        assert_eq!(
            changed.len() as u64,
            report["changed_bytes"].as_u64().unwrap()
        );
        ok(&["revert", path, "--last"]);
        assert!(
            std::fs::read(&model).unwrap() == original,
            "{tensor}: revert is not exact"
        );
    }
}

#[test]
fn patch_refuses_bad_input_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model(dir.path());
    let path = model.to_str().unwrap();
    let npy = dir.path().join("wrong.npy");
    ok(&[
        "tensor",
        "export",
        path,
        "output_norm.weight",
        "-o",
        npy.to_str().unwrap(),
    ]);
    let before = std::fs::read(&model).unwrap();
    for (args, needle) in [
        (
            vec![
                "--tensor",
                "blk.0.attn_q.weight",
                "--offset",
                "1",
                "--range",
                "0..33",
            ],
            "not aligned",
        ),
        (
            vec!["--tensor", "no.such.tensor", "--zero"],
            "no tensor named",
        ),
        (
            vec!["--tensor", "blk.0.attn_q.weight", "--scale", "NaN"],
            "not finite",
        ),
        (
            vec!["--tensor", "blk.0.attn_q.weight", "--clamp", "1", "-1"],
            "minimum exceeds maximum",
        ),
        (
            vec![
                "--tensor",
                "blk.0.attn_q.weight",
                "--set-npy",
                npy.to_str().unwrap(),
            ],
            "holds 640 values",
        ),
        (
            vec![
                "--tensor",
                "output_norm.weight",
                "--zero",
                "--range",
                "0..1000",
            ],
            "0..1000",
        ),
    ] {
        let mut full = vec!["patch", path];
        full.extend(&args);
        let output = run(&full);
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let error = String::from_utf8_lossy(&output.stderr);
        assert!(error.contains(needle), "{args:?}: {error}");
    }
    assert!(std::fs::read(&model).unwrap() == before);
    let history = ok(&["history", path, "--json"]);
    assert_eq!(
        serde_json::from_str::<Json>(&history).unwrap(),
        Json::Array(vec![])
    );
}

/// gguf-py's dequantization of one tensor, as f32 bits.
const DEQUANTIZE: &str = r#"
import sys, numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
r = GGUFReader(sys.argv[1])
t = next(t for t in r.tensors if t.name == sys.argv[2])
values = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
exported = np.load(sys.argv[3])
assert exported.dtype == np.float32, exported.dtype
assert list(exported.shape) == [int(d) for d in reversed(t.shape)], (exported.shape, t.shape)
assert np.array_equal(exported.reshape(-1).view(np.uint32), values.view(np.uint32))
np.save(sys.argv[4], exported * 2)
print("ok")
"#;

#[test]
fn export_matches_gguf_py_and_import_writes_the_values_back() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model(dir.path());
    let path = model.to_str().unwrap();
    let exported = dir.path().join("q.npy");
    let doubled = dir.path().join("q2.npy");
    let name = "blk.1.attn_q.weight";
    ok(&[
        "tensor",
        "export",
        path,
        name,
        "-o",
        exported.to_str().unwrap(),
    ]);
    let out = tests::run_python(
        DEQUANTIZE,
        &[
            model.as_os_str(),
            name.as_ref(),
            exported.as_os_str(),
            doubled.as_os_str(),
        ],
    );
    assert_eq!(String::from_utf8(out).unwrap().trim(), "ok");

    let before = std::fs::read(&model).unwrap();
    ok(&["tensor", "import", path, name, doubled.to_str().unwrap()]);
    let diff: Json = serde_json::from_str(&ok(&[
        "diff",
        tests::real_model().to_str().unwrap(),
        path,
        "--json",
    ]))
    .unwrap();
    let changed = diff["tensors_changed"].as_array().unwrap();
    assert_eq!(changed.len(), 1, "{diff}");
    assert_eq!(changed[0]["name"], name);
    // Doubling every value: the change is about as large as the values themselves.
    let ratio = changed[0]["rms"].as_f64().unwrap() / changed[0]["rms_a"].as_f64().unwrap();
    assert!((0.9..1.1).contains(&ratio), "rms ratio {ratio}");
    ok(&["revert", path, "--last"]);
    assert!(std::fs::read(&model).unwrap() == before);
}

#[test]
fn the_manifest_matches_gguf_hash_and_catches_a_change() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model(dir.path());
    let path = model.to_str().unwrap();
    let manifest = dir.path().join("manifest.txt");
    let report: Json = serde_json::from_str(&ok(&[
        "verify",
        path,
        "--write-manifest",
        manifest.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["ok"], true);
    assert_eq!(report["non_finite"], Json::Array(vec![]));

    // gguf-py ships gguf-hash as a module without a console script.
    let gguf_hash = Command::new(tests::oracle_python())
        .args(["-m", "gguf.scripts.gguf_hash"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(gguf_hash.status.success());
    let theirs: Vec<String> = String::from_utf8(gguf_hash.stdout)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("sha256"))
        .map(str::to_owned)
        .collect();
    let ours: Vec<String> = std::fs::read_to_string(&manifest)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ours.len(), 237);
    assert_eq!(ours, theirs);

    ok(&[
        "patch",
        path,
        "--tensor",
        "blk.2.ffn_up.weight",
        "--scale",
        "1.5",
    ]);
    let output = run(&[
        "verify",
        path,
        "--check",
        manifest.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(output.status.code(), Some(1));
    let report: Json = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        report["manifest"]["mismatched"],
        serde_json::json!(["blk.2.ffn_up.weight"])
    );
    assert_eq!(report["manifest"]["whole_matches"], false);
}

#[test]
fn requantizing_a_q4_k_tensor_to_q8_0_gives_a_file_gguf_py_and_llama_cpp_load() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("requantized.gguf");
    let model = tests::real_model();
    let report: Json = serde_json::from_str(&ok(&[
        "requantize",
        model.to_str().unwrap(),
        "--tensors",
        r"^blk\.0\.attn_output\.weight$",
        "--type",
        "Q8_0",
        "-o",
        output.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["tensors"][0]["from"], "Q4_K");
    let map = byte_tier::MappedFile::open(&output).unwrap();
    let gguf = map.parse().unwrap();
    assert_eq!(
        gguf.tensor("blk.0.attn_output.weight").unwrap().ggml_type,
        byte_tier::GgmlType::Q8_0
    );

    // GGUFReader reads it, and the values moved only by Q8_0's rounding.
    let diff: Json = serde_json::from_str(&ok(&[
        "diff",
        model.to_str().unwrap(),
        output.to_str().unwrap(),
        "--json",
    ]))
    .unwrap();
    let changed = diff["tensors_changed"].as_array().unwrap();
    assert_eq!(changed.len(), 1);
    let relative = changed[0]["rms"].as_f64().unwrap() / changed[0]["rms_a"].as_f64().unwrap();
    assert!(relative < 0.01, "relative rms {relative}");
    let out = tests::run_python(
        "import sys\nfrom gguf import GGUFReader\nr = GGUFReader(sys.argv[1])\nprint(next(t.tensor_type.name for t in r.tensors if t.name == 'blk.0.attn_output.weight'))",
        &[output.as_os_str()],
    );
    assert_eq!(String::from_utf8(out).unwrap().trim(), "Q8_0");

    let server = tests::LlamaServer::start(&output, &[]);
    let (status, body) = tests::http_request(
        server.port,
        "POST",
        "/completion",
        Some(r#"{"prompt": "Once upon a time", "n_predict": 4, "cache_prompt": false}"#),
    )
    .unwrap();
    assert_eq!(status, 200, "{body}");
}

fn top_logprob(port: u16) -> Json {
    let request = r#"{"prompt": "The capital of France is", "n_predict": 1, "n_probs": 3, "temperature": 0, "cache_prompt": false}"#;
    let (status, body) = tests::http_request(port, "POST", "/completion", Some(request)).unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Json>(&body).unwrap()["completion_probabilities"][0].clone()
}

#[test]
fn hotpatch_patch_on_a_served_file_changes_the_servers_answer_and_revert_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = copy_model(dir.path());
    let path = model.to_str().unwrap();
    let server = tests::LlamaServer::start(&model, &[]);
    let before = top_logprob(server.port);
    ok(&[
        "patch",
        path,
        "--tensor",
        "output_norm.weight",
        "--scale",
        "0.5",
    ]);
    assert_ne!(top_logprob(server.port), before);
    ok(&["revert", path, "--last"]);
    assert_eq!(top_logprob(server.port), before);
}
