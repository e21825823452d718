//! A live patch of the model a running llama-server maps: the next answer changes, and
//! reverting restores it exactly, with no restart.

use memory_tier::{AttachMode, LiveModel, MemoryPatch, ValueTransform};
use serde_json::Value as Json;

/// The top log-probabilities of the next token for a fixed prompt, with prompt caching
/// off so that every request is computed with the weights as they are now.
fn top_logprobs(port: u16) -> Json {
    let request = r#"{"prompt": "The capital of France is", "n_predict": 1, "n_probs": 5,
        "temperature": 0, "cache_prompt": false}"#;
    let (status, body) = tests::http_request(port, "POST", "/completion", Some(request)).unwrap();
    assert_eq!(status, 200, "{body}");
    let answer: Json = serde_json::from_str(&body).unwrap();
    let probabilities = answer["completion_probabilities"][0].clone();
    assert!(probabilities.is_object(), "no probabilities in {body}");
    probabilities
}

#[test]
fn scaling_output_norm_changes_the_running_servers_answer_and_revert_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::copy(tests::real_model(), &path).unwrap();
    let original_file = std::fs::read(&path).unwrap();
    let server = tests::LlamaServer::start(&path, &[]);

    let before = top_logprobs(server.port);
    assert_eq!(
        top_logprobs(server.port),
        before,
        "the server is not deterministic"
    );

    let model = LiveModel::attach(&path, AttachMode::Shared).unwrap();
    let id = model
        .apply(MemoryPatch::transform(
            "halve output_norm",
            "output_norm.weight",
            ValueTransform::Scale(0.5),
        ))
        .unwrap();
    let patched = top_logprobs(server.port);
    assert_ne!(patched, before, "the patch did not reach the server");

    eprintln!(
        "top token before: {}, patched: {}",
        before["top_logprobs"][0], patched["top_logprobs"][0]
    );
    model.revert(id).unwrap();
    let after = top_logprobs(server.port);
    assert_eq!(after, before, "revert did not restore the answer exactly");
    drop(server);
    assert!(std::fs::read(&path).unwrap() == original_file);
}
