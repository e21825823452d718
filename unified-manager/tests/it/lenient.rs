//! What llama.cpp loads, hotpatch opens: strings that are not UTF-8 are shown escaped,
//! reported as diagnostics, and kept byte for byte through edits of other keys.

use std::path::Path;
use std::process::Command;

use byte_tier::Gguf;
use serde_json::Value as Json;
use unified_manager::demo::{DemoShape, write_demo_model};

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

/// The bytes of token `index` of `path`'s vocabulary.
fn token_bytes(path: &Path, index: u64) -> Vec<u8> {
    let bytes = std::fs::read(path).unwrap();
    let gguf = Gguf::parse(&bytes).unwrap();
    let tokens = gguf.get_array("tokenizer.ggml.tokens").unwrap();
    let token = tokens.get(index).unwrap().as_gguf_str().unwrap();
    token.as_bytes().to_vec()
}

/// The demo model with token 5's first byte replaced by 0xff; returns the model and the
/// token's bytes.
fn model_with_a_bad_token(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
    let model = write_demo_model(dir, DemoShape::default()).unwrap();
    let mut bytes = std::fs::read(&model).unwrap();
    let at = {
        let gguf = Gguf::parse(&bytes).unwrap();
        let tokens = gguf.get_array("tokenizer.ggml.tokens").unwrap();
        let mut position = tokens.offset();
        for i in 0..5 {
            let token = tokens.get(i).unwrap().as_gguf_str().unwrap();
            position += 8 + token.len() as u64;
        }
        usize::try_from(position + 8).unwrap()
    };
    bytes[at] = 0xff;
    std::fs::write(&model, &bytes).unwrap();
    let token = token_bytes(&model, 5);
    assert!(std::str::from_utf8(&token).is_err());
    (model, token)
}

#[test]
fn a_token_that_is_not_utf8_is_shown_escaped_and_diagnosed() {
    let dir = tempfile::tempdir().unwrap();
    let (model, token) = model_with_a_bad_token(dir.path());
    let path = model.to_str().unwrap();

    let report: Json =
        serde_json::from_str(&hotpatch(&["inspect", path, "--json", "--full"])).unwrap();
    let shown = &report["metadata"]["tokenizer.ggml.tokens"]["value"][5];
    assert_eq!(shown["hex"], byte_tier::ops::to_hex(&token));
    assert_eq!(
        shown["lossy"],
        String::from_utf8_lossy(&token).into_owned(),
        "{shown}"
    );
    let diagnostics = report["diagnostics"].as_array().unwrap();
    assert!(
        diagnostics.iter().any(|d| d
            .as_str()
            .unwrap()
            .starts_with("element 5 of \"tokenizer.ggml.tokens\"")),
        "{diagnostics:?}"
    );

    let text = hotpatch(&["inspect", path]);
    assert!(
        text.contains("note: element 5 of \"tokenizer.ggml.tokens\""),
        "{text}"
    );
    hotpatch(&["verify", path]);
}

#[test]
fn editing_another_key_keeps_a_token_that_is_not_utf8_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (model, token) = model_with_a_bad_token(dir.path());
    let path = model.to_str().unwrap();

    // In place (same size), then a rewrite (the name grows), then into a new file.
    hotpatch(&["meta", "set", path, "llama.context_length", "512"]);
    assert_eq!(token_bytes(&model, 5), token);
    hotpatch(&[
        "meta",
        "set",
        path,
        "general.name",
        "a much longer name than before",
    ]);
    assert_eq!(token_bytes(&model, 5), token);
    let out = dir.path().join("out.gguf");
    hotpatch(&[
        "meta",
        "delete",
        path,
        "general.name",
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(token_bytes(&out, 5), token);
    assert_eq!(
        Gguf::parse(&std::fs::read(&out).unwrap())
            .unwrap()
            .get_u64("llama.context_length")
            .unwrap(),
        512
    );
}
