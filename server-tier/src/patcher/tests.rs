use super::*;
use crate::rules::{Rule, RuleSet};
use serde_json::json;

fn patcher(rules: &str) -> RulePatcher {
    let set = RuleSet::from_toml_str(rules).unwrap();
    let stats = Arc::new(Stats::default());
    RulePatcher::new(CompiledRules::compile(set.rules(), &stats).unwrap(), stats)
}

/// Runs the pre-request hook on `body` at `path`; returns the new body and the plan.
fn request(patcher: &RulePatcher, path: &str, body: Value) -> (Value, ResponsePlan) {
    let mut body = body;
    let plan = patcher.pre_request(&mut GenerationRequest {
        path,
        body: body.as_object_mut().unwrap(),
    });
    (body, plan)
}

fn check_request(rules: &str, path: &str, input: Value, expected: Value) {
    let (output, _) = request(&patcher(rules), path, input);
    assert_eq!(output, expected);
}

const CHAT: &str = "/v1/chat/completions";

#[test]
fn parameter_rules() {
    let rules = r#"
[[rule]]
name = "default-temp"
action = { type = "set", key = "temperature", value = 0.3 }
[[rule]]
name = "cap"
action = { type = "clamp", key = "max_tokens", min = 1, max = 64 }
[[rule]]
name = "stop"
action = { type = "override", key = "stop", value = ["\n\n"] }
"#;
    check_request(
        rules,
        CHAT,
        json!({"max_tokens": 1000}),
        json!({"max_tokens": 64, "temperature": 0.3, "stop": ["\n\n"]}),
    );
    check_request(
        rules,
        CHAT,
        json!({"temperature": 1.5, "max_tokens": 0, "stop": "x"}),
        json!({"temperature": 1.5, "max_tokens": 1, "stop": ["\n\n"]}),
    );
    // Paths outside the generation paths are left alone.
    check_request(rules, "/v1/models", json!({"a": 1}), json!({"a": 1}));
}

#[test]
fn float_clamp_and_model_match() {
    let rules = r#"
[[rule]]
name = "cool"
model = "gemma-.*"
action = { type = "clamp", key = "temperature", max = 0.5 }
"#;
    check_request(
        rules,
        "/completion",
        json!({"model": "gemma-3", "temperature": 2}),
        json!({"model": "gemma-3", "temperature": 0.5}),
    );
    check_request(
        rules,
        "/completion",
        json!({"model": "llama", "temperature": 2}),
        json!({"model": "llama", "temperature": 2}),
    );
    check_request(
        rules,
        "/completion",
        json!({"temperature": 2}),
        json!({"temperature": 2}),
    );
}

#[test]
fn system_prompt_injection() {
    let prepend = r#"
[[rule]]
name = "persona"
action = { type = "system_prompt", text = "Be brief." }
"#;
    let merge = prepend.replace("Be brief.\" }", "Be brief.\", mode = \"merge\" }");
    let user = json!({"role": "user", "content": "hi"});
    let system = json!({"role": "system", "content": "You are a cat."});
    check_request(
        prepend,
        CHAT,
        json!({"messages": [user]}),
        json!({"messages": [{"role": "system", "content": "Be brief."}, user]}),
    );
    check_request(
        prepend,
        CHAT,
        json!({"messages": [system, user]}),
        json!({"messages": [{"role": "system", "content": "Be brief."}, system, user]}),
    );
    check_request(
        &merge,
        CHAT,
        json!({"messages": [system, user]}),
        json!({"messages": [{"role": "system", "content": "Be brief.\n\nYou are a cat."}, user]}),
    );
    check_request(
        prepend,
        "/completion",
        json!({"prompt": "Once"}),
        json!({"prompt": "Be brief.Once"}),
    );
    check_request(
        prepend,
        "/v1/completions",
        json!({"prompt": ["a", "b", [1, 2]]}),
        json!({"prompt": ["Be brief.a", "Be brief.b", [1, 2]]}),
    );
}

#[test]
fn logit_bias_merges() {
    let rules = r#"
[[rule]]
name = "ban"
action = { type = "logit_bias", bias = { "15" = -100.0 } }
"#;
    check_request(
        rules,
        CHAT,
        json!({}),
        json!({"logit_bias": {"15": -100.0}}),
    );
    check_request(
        rules,
        CHAT,
        json!({"logit_bias": {"3": 1.0}}),
        json!({"logit_bias": {"3": 1.0, "15": -100.0}}),
    );
    check_request(
        rules,
        CHAT,
        json!({"logit_bias": [[3, 1.0]]}),
        json!({"logit_bias": [[3, 1.0], [15, -100.0]]}),
    );
}

#[test]
fn hostile_request_shapes_do_not_panic() {
    let rules = r#"
[[rule]]
name = "persona"
action = { type = "system_prompt", text = "S", mode = "merge" }
[[rule]]
name = "ban"
action = { type = "logit_bias", bias = { "1" = 1.0 } }
[[rule]]
name = "cap"
action = { type = "clamp", key = "temperature", max = 1.0 }
"#;
    let p = patcher(rules);
    for body in [
        json!({"messages": "not a list", "logit_bias": "x", "temperature": "hot"}),
        json!({"messages": [1, null, {"role": 5}], "temperature": 1e308}),
        json!({"messages": [{"role": "system", "content": null}]}),
        json!({"messages": [{"role": "system", "content": [{"type": "text", "text": "a"}]}]}),
        json!({"prompt": null, "logit_bias": null}),
    ] {
        for path in [CHAT, "/v1/completions", "/completion"] {
            let _ = request(&p, path, body.clone());
        }
    }
}

fn sse(events: &[Value]) -> String {
    let mut out = String::new();
    for event in events {
        out.push_str(&format!("data: {event}\n\n"));
    }
    out
}

fn chat_chunk(text: &str) -> Value {
    json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]})
}

/// Streams `wire` through the hook in pieces of `piece` bytes; returns the text the
/// client sees, its events and whether the hook stopped.
fn stream(
    patcher: &RulePatcher,
    path: &str,
    wire: &str,
    piece: usize,
) -> (String, Vec<Value>, bool) {
    let (_, plan) = request(patcher, path, json!({}));
    let mut state = plan.stream_state();
    let mut out = Vec::new();
    let mut stopped = false;
    for chunk in wire.as_bytes().chunks(piece) {
        if patcher.stream_chunk(&mut state, chunk, &mut out) == ChunkFlow::Stop {
            stopped = true;
            break;
        }
    }
    if !stopped {
        patcher.stream_end(&mut state, &mut out);
    }
    let joined: Vec<u8> = out.iter().flat_map(|b| b.iter().copied()).collect();
    let text = String::from_utf8(joined).unwrap();
    let mut content = String::new();
    let mut events = Vec::new();
    for event in text.split("\n\n").filter(|e| !e.is_empty()) {
        let data = event.strip_prefix("data: ").unwrap();
        if data == "[DONE]" {
            events.push(json!("[DONE]"));
            continue;
        }
        let value: Value = serde_json::from_str(data).unwrap();
        if let Some(t) = value
            .pointer("/choices/0/delta/content")
            .or_else(|| value.get("content"))
            .and_then(Value::as_str)
        {
            content.push_str(t);
        }
        events.push(value);
    }
    (content, events, stopped)
}

#[test]
fn streamed_redaction_straddles_events_and_bytes() {
    let p = patcher(
        r#"
[[rule]]
name = "secret"
action = { type = "redact", pattern = "hunter2", replacement = "[redacted]" }
"#,
    );
    let mut events: Vec<Value> = ["my pass", "word is hun", "te", "r2, ok"]
        .iter()
        .map(|t| chat_chunk(t))
        .collect();
    // llama-server's last chat chunk has an empty delta: held-back text goes there.
    let mut last = chat_chunk("");
    last["choices"][0]["delta"] = json!({});
    last["choices"][0]["finish_reason"] = json!("stop");
    events.push(last.clone());
    let mut wire = sse(&events);
    wire.push_str("data: [DONE]\n\n");
    // The secret is the last text: it is held back until the finishing event.
    let (content, _, _) = stream(&p, CHAT, &sse(&[chat_chunk("hunter"), last.clone()]), 4);
    assert_eq!(content, "hunter");
    for piece in [1, 3, 7, 64, 4096] {
        let (content, events, _) = stream(&p, CHAT, &wire, piece);
        assert_eq!(content, "my password is [redacted], ok", "piece {piece}");
        assert_eq!(events.last(), Some(&json!("[DONE]")));
    }
}

#[test]
fn streamed_redaction_flushes_at_done_without_finish_reason() {
    let p = patcher(
        r#"
[[rule]]
name = "secret"
action = { type = "redact", pattern = "abcdef", mask = "*" }
"#,
    );
    let wire = format!(
        "{}data: [DONE]\n\n",
        sse(&[chat_chunk("xx abc"), chat_chunk("de")])
    );
    let (content, _, _) = stream(&p, CHAT, &wire, 5);
    assert_eq!(content, "xx abcde");
}

#[test]
fn stop_after_chunks_ends_cleanly() {
    let p = patcher(
        r#"
[[rule]]
name = "short"
action = { type = "stop_stream", after_chunks = 2 }
"#,
    );
    let wire = sse(&[
        chat_chunk("a"),
        chat_chunk("b"),
        chat_chunk("c"),
        chat_chunk("d"),
    ]);
    let (content, events, stopped) = stream(&p, CHAT, &wire, 10);
    assert!(stopped);
    assert_eq!(content, "ab");
    let n = events.len();
    assert_eq!(events[n - 1], json!("[DONE]"));
    assert_eq!(events[n - 2]["choices"][0]["finish_reason"], json!("stop"));
    assert_eq!(events[n - 2]["id"], json!("c1"));
}

#[test]
fn stop_on_a_straddling_pattern() {
    let p = patcher(
        r#"
[[rule]]
name = "end"
action = { type = "stop_stream", pattern = "STOP" }
"#,
    );
    let wire = sse(&[
        json!({"content": "one ST", "stop": false}),
        json!({"content": "OP two", "stop": false}),
        json!({"content": "three", "stop": false}),
    ]);
    let (content, events, stopped) = stream(&p, "/completion", &wire, 9);
    assert!(stopped);
    assert_eq!(content, "one STOP");
    assert_eq!(events.last().unwrap()["stop"], json!(true));
}

#[test]
fn whole_responses_are_redacted() {
    let p = patcher(
        r##"
[[rule]]
name = "digits"
action = { type = "redact", pattern = "[0-9]{3}", regex = true, mask = "#" }
"##,
    );
    let (_, plan) = request(&p, CHAT, json!({}));
    let mut body = json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": "call 555 now"}}]});
    assert!(p.post_response(&plan, &mut body));
    assert_eq!(
        body["choices"][0]["message"]["content"],
        json!("call ### now")
    );
    let (_, plan) = request(&p, "/completion", json!({}));
    let mut body = json!({"content": "no digits"});
    assert!(!p.post_response(&plan, &mut body));
    let mut odd = json!({"choices": "nope"});
    assert!(!p.post_response(&plan, &mut odd));
}

#[test]
fn garbage_streams_pass_through() {
    let p = patcher(
        r#"
[[rule]]
name = "x"
action = { type = "redact", pattern = "x", mask = "*" }
"#,
    );
    let (_, plan) = request(&p, CHAT, json!({}));
    let mut state = plan.stream_state();
    let mut out = Vec::new();
    for input in [
        &b"\xff\xfe\n\n"[..],
        b"data: {not json\n\n",
        b": comment\n\n",
        b"data: [1,2]\n\n",
    ] {
        assert_eq!(
            p.stream_chunk(&mut state, input, &mut out),
            ChunkFlow::Continue
        );
    }
    p.stream_end(&mut state, &mut out);
    assert_eq!(out.len(), 4);
}

proptest::proptest! {
    #[test]
    fn arbitrary_streams_and_bodies_never_panic(
        bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400),
        cut in 0usize..400,
        text in ".{0,200}",
    ) {
        let p = patcher(
            r#"
[[rule]]
name = "x"
action = { type = "redact", pattern = "a[bc]+", regex = true, replacement = "_" }
[[rule]]
name = "stop"
action = { type = "stop_stream", after_chunks = 3, pattern = "zz" }
[[rule]]
name = "persona"
action = { type = "system_prompt", text = "S", mode = "merge" }
"#,
        );
        for path in [CHAT, "/v1/completions", "/completion"] {
            let (_, plan) = request(&p, path, json!({}));
            let mut state = plan.stream_state();
            let mut out = Vec::new();
            let cut = cut.min(bytes.len());
            let _ = p.stream_chunk(&mut state, &bytes[..cut], &mut out);
            let _ = p.stream_chunk(&mut state, &bytes[cut..], &mut out);
            p.stream_end(&mut state, &mut out);
            if let Ok(mut value) = serde_json::from_slice::<Value>(&bytes) {
                let _ = p.post_response(&plan, &mut value);
                if let Value::Object(_) = value {
                    let _ = request(&p, path, value);
                }
            }
        }
        let _ = RuleSet::from_toml_str(&text);
        let _ = Rule::from_json_slice(text.as_bytes());
    }
}
