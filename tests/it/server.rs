//! `hotpatch serve` end to end: the proxy in front of a real llama-server serving a copy
//! of the real model (rules, cache, live patches through the admin API, drain), and in
//! front of a small test upstream for hostile input and a bounded load run.

use crate::support::{local, runtime};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use server_tier::{AdminAccess, CacheSettings, Proxy, ProxyConfig, Rule, RuleSet};

const TOKEN: &str = "test-admin-token";

/// One HTTP/1.1 exchange over a fresh connection.
#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_owned())
        })
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }
}

fn exchange(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .expect("read the response");
    let text = String::from_utf8_lossy(&response).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        tests::dechunk(rest)
    } else {
        rest.to_owned()
    };
    Reply {
        status,
        head: head.to_owned(),
        body,
    }
}

const JSON: (&str, &str) = ("Content-Type", "application/json");
const AUTH: (&str, &str) = ("Authorization", "Bearer test-admin-token");

fn post(port: u16, path: &str, body: &Value) -> Reply {
    exchange(port, "POST", path, &[JSON], body.to_string().as_bytes())
}

fn admin(port: u16, method: &str, path: &str, body: Option<&Value>) -> Reply {
    let body = body.map(Value::to_string).unwrap_or_default();
    exchange(port, method, path, &[JSON, AUTH], body.as_bytes())
}

/// The text of a streamed answer: every `data:` event's content, joined.
fn streamed_text(body: &str) -> String {
    let mut text = String::new();
    for event in body.split("\n\n") {
        let Some(data) = event.trim().strip_prefix("data: ") else {
            continue;
        };
        let Ok(value) = serde_json::from_str::<Value>(data) else {
            continue;
        };
        for pointer in ["/content", "/choices/0/delta/content", "/choices/0/text"] {
            if let Some(t) = value.pointer(pointer).and_then(Value::as_str) {
                text.push_str(t);
            }
        }
    }
    text
}

fn start_proxy(runtime: &tokio::runtime::Runtime, config: ProxyConfig) -> Proxy {
    runtime
        .block_on(Proxy::bind(config))
        .expect("start the proxy")
}

fn rule(value: Value) -> Rule {
    serde_json::from_value(value).unwrap()
}

// ---------------------------------------------------------------------------------
// Against a real llama-server.
// ---------------------------------------------------------------------------------

/// The top log-probabilities of the next token for a fixed prompt (temperature 0).
/// `cache_prompt: false` makes the baseline computed the same way as the answers after a
/// patch, which the proxy sends with prompt caching off.
fn top_logprobs(port: u16) -> Value {
    let reply = post(
        port,
        "/completion",
        &json!({"prompt": "The capital of France is", "n_predict": 1, "n_probs": 5,
            "temperature": 0, "cache_prompt": false}),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    let probabilities = reply.json()["completion_probabilities"][0].clone();
    assert!(
        probabilities.is_object(),
        "no probabilities in {}",
        reply.body
    );
    probabilities
}

#[test]
fn server_proxy_in_front_of_llama_server() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    std::fs::copy(tests::real_model(), &model).unwrap();
    let original = std::fs::read(&model).unwrap();
    let slots = dir.path().join("slots");
    std::fs::create_dir(&slots).unwrap();
    // Slot erase (after each live patch) needs --slot-save-path.
    let llama = tests::LlamaServer::start(&model, &["--slot-save-path", slots.to_str().unwrap()]);

    let runtime = runtime();
    let mut config = ProxyConfig::new(format!("http://127.0.0.1:{}", llama.port), local());
    config.model = Some(model.clone());
    config.admin = AdminAccess::Token(TOKEN.into());
    config.rules = RuleSet::from_toml_str(
        r#"
[[rule]]
name = "cool"
paths = ["/completion"]
action = { type = "clamp", key = "temperature", max = 0.25 }

[[rule]]
name = "persona"
paths = ["/v1/chat/completions"]
action = { type = "system_prompt", text = "You are a terse assistant who answers in one word." }
"#,
    )
    .unwrap();
    let proxy = start_proxy(&runtime, config);
    let port = proxy.local_addr().port();
    let control = proxy.control();

    // Pass-through routes.
    assert_eq!(exchange(port, "GET", "/health", &[], b"").status, 200);
    let models = exchange(port, "GET", "/v1/models", &[], b"");
    assert_eq!(models.status, 200, "{}", models.body);
    assert!(models.json()["data"].is_array());

    // A temperature clamp: llama-server reports the temperature it sampled with.
    let hot = json!({"prompt": "Hello", "n_predict": 1, "temperature": 1.5});
    let direct = post(llama.port, "/completion", &hot).json();
    let proxied = post(port, "/completion", &hot).json();
    assert_eq!(direct["generation_settings"]["temperature"], json!(1.5));
    assert_eq!(proxied["generation_settings"]["temperature"], json!(0.25));

    // A system prompt: the prompt the model sees is longer by the injected message.
    let chat =
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "temperature": 0});
    let direct = post(llama.port, "/v1/chat/completions", &chat).json();
    let proxied = post(port, "/v1/chat/completions", &chat).json();
    let direct_tokens = direct["usage"]["prompt_tokens"].as_u64().unwrap();
    let proxied_tokens = proxied["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(
        proxied_tokens > direct_tokens + 5,
        "prompt tokens direct {direct_tokens}, through the proxy {proxied_tokens}"
    );

    // Redaction of a word the model does say, whole and streamed.
    let ask = json!({"prompt": "The capital of France is", "n_predict": 8, "temperature": 0,
        "cache_prompt": false});
    let plain = post(llama.port, "/completion", &ask).json()["content"]
        .as_str()
        .unwrap()
        .to_owned();
    let word = plain
        .split(|c: char| !c.is_alphanumeric())
        .find(|w| w.len() >= 3)
        .unwrap_or_else(|| panic!("no word of 3+ characters in {plain:?}"))
        .to_owned();
    control
        .add_rule(rule(json!({"name": "hide", "paths": ["/completion"],
            "action": {"type": "redact", "pattern": word, "replacement": "[hidden]"}})))
        .unwrap();
    let whole = post(port, "/completion", &ask).json()["content"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(whole, plain.replace(&word, "[hidden]"));
    let mut streaming = ask.clone();
    streaming["stream"] = json!(true);
    let streamed = post(port, "/completion", &streaming);
    assert_eq!(streamed.status, 200);
    assert_eq!(streamed_text(&streamed.body), whole);
    control.remove_rule("hide").unwrap();

    // The cache answers a deterministic request without reaching the upstream.
    control
        .set_cache(CacheSettings {
            enabled: true,
            ttl_secs: 600,
            max_entries: 100,
        })
        .unwrap();
    let first = post(port, "/completion", &ask);
    assert_eq!(
        first.header("x-hotpatch-cache").as_deref(),
        Some("miss"),
        "{} {}",
        first.head,
        first.body
    );
    let upstream_before = control.stats().upstream_requests;
    let second = post(port, "/completion", &ask);
    assert_eq!(second.header("x-hotpatch-cache").as_deref(), Some("hit"));
    assert_eq!(second.body, first.body);
    assert_eq!(control.stats().upstream_requests, upstream_before);
    // A cached stream is replayed event by event.
    let first = post(port, "/completion", &streaming);
    let second = post(port, "/completion", &streaming);
    assert_eq!(second.header("x-hotpatch-cache").as_deref(), Some("hit"));
    assert_eq!(second.body, first.body);
    // Cache-Control: no-cache goes upstream.
    let bypass = exchange(
        port,
        "POST",
        "/completion",
        &[JSON, ("Cache-Control", "no-cache")],
        ask.to_string().as_bytes(),
    );
    assert_eq!(
        bypass.header("x-hotpatch-cache").as_deref(),
        Some("bypass"),
        "{}",
        bypass.head
    );
    assert_eq!(control.stats().upstream_requests, upstream_before + 2);

    // A live patch through the admin API changes the next answer; its revert restores it
    // exactly. The cache is on: the epoch keeps answers from before the patch out.
    let before = top_logprobs(port);
    assert_eq!(
        top_logprobs(llama.port),
        before,
        "the server is not deterministic"
    );
    let applied = admin(
        port,
        "POST",
        "/admin/patches",
        Some(
            &json!({"name": "halve", "tensor": "output_norm.weight", "transform": {"scale": 0.5}}),
        ),
    );
    assert_eq!(applied.status, 201, "{}", applied.body);
    let applied = applied.json();
    let erased = &applied["upstream_prompt_cache"];
    assert!(erased["errors"].as_array().unwrap().is_empty(), "{erased}");
    assert!(
        !erased["slots_erased"].as_array().unwrap().is_empty(),
        "{erased}"
    );
    let patched = top_logprobs(port);
    assert_ne!(patched, before, "the patch did not reach the server");
    let id = applied["id"].as_str().unwrap().to_owned();
    let patches = admin(port, "GET", "/admin/patches", None).json();
    assert_eq!(patches[0]["id"].as_str(), Some(id.as_str()));
    let reverted = admin(port, "DELETE", &format!("/admin/patches/{id}"), None);
    assert_eq!(reverted.status, 200, "{}", reverted.body);
    assert_eq!(
        top_logprobs(port),
        before,
        "revert did not restore the answer"
    );
    let history = admin(port, "GET", "/admin/history", None).json();
    assert_eq!(history.as_array().unwrap().len(), 2);

    // Drain-and-patch while requests are in flight: the patch waits for them, and every
    // request completes.
    let workers: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let status = post(
                    port,
                    "/completion",
                    &json!({"prompt": format!("Count to {i}:"), "n_predict": 8, "temperature": 0.7}),
                )
                .status;
                (status, Instant::now())
            })
        })
        .collect();
    // The patch comes only once requests are in flight.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stats = admin(port, "GET", "/admin/stats", None).json();
        if stats["proxy"]["in_flight"].as_u64().unwrap_or(0) >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no request got in flight: {stats}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let drained = admin(
        port,
        "POST",
        "/admin/patches",
        Some(&json!({"name": "drained", "tensor": "output_norm.weight",
            "transform": {"scale": 0.9}, "drain": true, "drain_timeout_secs": 300})),
    );
    let replied = Instant::now();
    assert_eq!(drained.status, 201, "{}", drained.body);
    let drained = drained.json();
    assert_eq!(drained["drained"], json!(true));
    let waited_for = drained["in_flight_at_drain"].as_u64().unwrap();
    assert!(waited_for >= 2, "{drained}");
    let finished: Vec<Instant> = workers
        .into_iter()
        .map(|worker| {
            let (status, at) = worker.join().unwrap();
            assert_eq!(status, 200);
            at
        })
        .collect();
    // Every request that was in flight when the drain began finished before the patch
    // was applied and answered.
    let before_reply = finished.iter().filter(|at| **at <= replied).count() as u64;
    assert!(
        before_reply >= waited_for,
        "{before_reply} requests finished before the patch answered; {waited_for} were in flight"
    );
    let reverted = admin(port, "DELETE", "/admin/patches/drained?drain=true", None);
    assert_eq!(reverted.status, 200, "{}", reverted.body);

    let stats = admin(port, "GET", "/admin/stats", None).json();
    assert_eq!(stats["proxy"]["patches_applied"], json!(2));
    assert_eq!(stats["proxy"]["patches_reverted"], json!(2));
    assert!(
        stats["proxy"]["rules"]["cool"]["requests"]
            .as_u64()
            .unwrap()
            >= 1
    );
    let metrics = exchange(port, "GET", "/metrics", &[], b"");
    assert!(
        metrics.body.contains("hotpatch_cache_hits_total 2"),
        "{}",
        metrics.body
    );
    assert!(metrics.body.contains("hotpatch_patch_epoch 4"));

    runtime.block_on(proxy.shutdown()).unwrap();
    drop(llama);
    assert!(
        std::fs::read(&model).unwrap() == original,
        "the model file differs after every patch was reverted"
    );
}

// ---------------------------------------------------------------------------------
// Against a small test upstream.
// ---------------------------------------------------------------------------------

/// A small OpenAI-compatible upstream for tests: fixed answers, a streamed answer with a
/// pause between events, a slow route, and a request counter.
struct TestUpstream {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
}

const ANSWER: &str = "The secret code is 1234-5678, keep it safe.";

async fn test_upstream_chat(
    axum::extract::State(requests): axum::extract::State<Arc<AtomicU64>>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    requests.fetch_add(1, Ordering::Relaxed);
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if request["stream"] == json!(true) {
        let pieces: Vec<String> = ANSWER
            .as_bytes()
            .chunks(5)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        let pause = request["pause_ms"].as_u64().unwrap_or(0);
        let mut events: Vec<String> = pieces
            .iter()
            .map(|p| {
                let event = json!({"id": "t", "object": "chat.completion.chunk", "created": 1, "model": "m",
                    "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": null}]});
                format!("data: {event}\n\n")
            })
            .collect();
        events.push(format!(
            "data: {}\n\n",
            json!({"id": "t", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        ));
        events.push("data: [DONE]\n\n".into());
        let stream =
            futures_util::stream::unfold(events.into_iter(), move |mut events| async move {
                let event = events.next()?;
                if pause > 0 {
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                Some((Ok::<_, std::io::Error>(event), events))
            });
        return (
            [("content-type", "text/event-stream")],
            axum::body::Body::from_stream(stream),
        )
            .into_response();
    }
    axum::Json(json!({
        "id": "t", "object": "chat.completion", "created": 1, "model": "m",
        "echo": request,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
    }))
    .into_response()
}

impl TestUpstream {
    fn start(runtime: &tokio::runtime::Runtime) -> TestUpstream {
        let requests = Arc::new(AtomicU64::new(0));
        let app = axum::Router::new()
            .route(
                "/v1/chat/completions",
                axum::routing::post(test_upstream_chat),
            )
            .route("/health", axum::routing::get(|| async { "ok" }))
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            )
            .with_state(Arc::clone(&requests));
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        runtime.spawn(async move { axum::serve(listener, app).await });
        TestUpstream { addr, requests }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn chat_request(stream: bool) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "code?"}], "stream": stream})
}

#[test]
fn server_hostile_input_gets_json_errors_and_the_proxy_keeps_serving() {
    let runtime = runtime();
    let upstream = TestUpstream::start(&runtime);
    let mut config = ProxyConfig::new(upstream.url(), local());
    config.admin = AdminAccess::Token(TOKEN.into());
    config.limits.body_limit = 4096;
    config.limits.upstream_timeout = Duration::from_millis(500);
    config.limits.stream_idle_timeout = Duration::from_secs(1);
    config.rules = RuleSet::from_toml_str(
        r#"
[[rule]]
name = "code"
action = { type = "redact", pattern = "[0-9]{4}-[0-9]{4}", regex = true, mask = "*" }
"#,
    )
    .unwrap();
    let proxy = start_proxy(&runtime, config);
    let port = proxy.local_addr().port();
    let check_error = |reply: Reply, status: u16| {
        assert_eq!(reply.status, status, "{}", reply.body);
        assert_eq!(
            reply.json()["error"]["status"],
            json!(status),
            "{}",
            reply.body
        );
    };

    // Redaction whole and streamed, the code straddling several upstream events.
    let whole = post(port, "/v1/chat/completions", &chat_request(false)).json();
    let redacted = ANSWER.replace("1234-5678", "*********");
    assert_eq!(whole["choices"][0]["message"]["content"], json!(redacted));
    let streamed = post(port, "/v1/chat/completions", &chat_request(true));
    assert_eq!(streamed_text(&streamed.body), redacted);
    assert!(streamed.body.ends_with("data: [DONE]\n\n"));

    let chat = "/v1/chat/completions";
    check_error(
        exchange(port, "POST", chat, &[JSON], b"{\"messages\": [1,"),
        400,
    );
    check_error(exchange(port, "POST", chat, &[JSON], b"[1, 2]"), 400);
    check_error(
        exchange(port, "POST", chat, &[JSON], &[0xff, 0xfe, b'{']),
        400,
    );
    check_error(
        exchange(port, "POST", chat, &[("Content-Type", "text/plain")], b"{}"),
        415,
    );
    check_error(
        exchange(port, "POST", chat, &[JSON], &vec![b' '; 5000]),
        413,
    );
    check_error(exchange(port, "GET", "/slow", &[], b""), 504);
    check_error(
        admin(
            port,
            "POST",
            "/admin/rules",
            Some(&json!({"name": "x", "colour": 1,
            "action": {"type": "set", "key": "k", "value": 1}})),
        ),
        400,
    );
    check_error(
        admin(
            port,
            "POST",
            "/admin/rules",
            Some(&json!({"name": "code",
            "action": {"type": "set", "key": "k", "value": 1}})),
        ),
        409,
    );
    check_error(admin(port, "DELETE", "/admin/rules/nope", None), 404);
    check_error(admin(port, "GET", "/admin/nowhere", None), 404);
    check_error(admin(port, "GET", "/admin/tensors", None), 409);
    check_error(
        admin(
            port,
            "PUT",
            "/admin/cache",
            Some(&json!({"enabled": true, "ttl_secs": 0})),
        ),
        400,
    );

    // An upstream stream that falls silent is cut with an error event and counted.
    let timeouts = proxy.control().stats().upstream_timeouts;
    let silent = post(
        port,
        chat,
        &json!({"messages": [], "stream": true, "pause_ms": 3000}),
    );
    assert_eq!(silent.status, 200);
    let event: Value = serde_json::from_str(
        silent
            .body
            .trim_end()
            .strip_prefix("data: ")
            .expect("one event"),
    )
    .unwrap();
    assert_eq!(event["error"]["code"], json!("upstream_timeout"), "{event}");
    assert_eq!(event["error"]["status"], json!(504), "{event}");
    assert_eq!(proxy.control().stats().upstream_timeouts, timeouts + 1);

    // A client that leaves mid-stream: the proxy drops the upstream stream and goes on.
    for _ in 0..3 {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let body = json!({"messages": [], "stream": true, "pause_ms": 50}).to_string();
        write!(
            stream,
            "POST {chat} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut first = [0u8; 64];
        let _ = stream.read(&mut first).unwrap();
        drop(stream);
    }
    let mut in_flight = u64::MAX;
    for _ in 0..200 {
        in_flight = proxy.control().stats().in_flight;
        if in_flight == 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        in_flight, 0,
        "requests left in flight after their clients left"
    );
    assert!(proxy.control().stats().client_disconnects >= 3);
    assert_eq!(post(port, chat, &chat_request(false)).status, 200);

    // Stop a stream after two chunks, cleanly.
    proxy
        .control()
        .add_rule(rule(
            json!({"name": "short", "action": {"type": "stop_stream", "after_chunks": 2}}),
        ))
        .unwrap();
    let cut = post(port, chat, &chat_request(true));
    assert!(cut.body.ends_with("data: [DONE]\n\n"), "{}", cut.body);
    assert!(cut.body.contains("\"finish_reason\":\"stop\""));
    assert_eq!(streamed_text(&cut.body), &ANSWER[..10]);

    // An upstream that is down: 502, and the proxy still answers.
    runtime.block_on(proxy.shutdown()).unwrap();
    let dead_port = tests::free_port();
    let proxy = start_proxy(
        &runtime,
        ProxyConfig::new(format!("http://127.0.0.1:{dead_port}"), local()),
    );
    let port = proxy.local_addr().port();
    check_error(post(port, chat, &chat_request(false)), 502);
    check_error(exchange(port, "GET", "/health", &[], b""), 502);
    // With the admin API off, /admin answers 404 rather than reaching the upstream.
    check_error(exchange(port, "GET", "/admin/rules", &[], b""), 404);
    runtime.block_on(proxy.shutdown()).unwrap();
}

#[test]
fn server_admin_routes_need_the_token() {
    let runtime = runtime();
    let upstream = TestUpstream::start(&runtime);
    let mut config = ProxyConfig::new(upstream.url(), local());
    config.admin = AdminAccess::Token(TOKEN.into());
    let proxy = start_proxy(&runtime, config);
    let port = proxy.local_addr().port();
    let routes = [
        ("GET", "/admin/rules"),
        ("POST", "/admin/rules"),
        ("PUT", "/admin/rules/a"),
        ("DELETE", "/admin/rules/a"),
        ("POST", "/admin/rules/a/enable"),
        ("POST", "/admin/rules/a/disable"),
        ("GET", "/admin/cache"),
        ("PUT", "/admin/cache"),
        ("GET", "/admin/tensors"),
        ("GET", "/admin/patches"),
        ("POST", "/admin/patches"),
        ("DELETE", "/admin/patches/x"),
        ("GET", "/admin/history"),
        ("GET", "/admin/stats"),
        ("GET", "/admin/locks"),
        ("POST", "/admin/locks"),
        ("DELETE", "/admin/locks/1"),
        ("GET", "/admin/openapi.json"),
        ("GET", "/admin/unknown"),
    ];
    let wrong = [
        vec![JSON],
        vec![JSON, ("Authorization", "Bearer wrong")],
        vec![JSON, ("Authorization", "Bearer test-admin-token-and-more")],
        vec![JSON, ("Authorization", "Basic dGVzdC1hZG1pbi10b2tlbg==")],
        vec![JSON, ("Authorization", "test-admin-token")],
    ];
    for (method, path) in routes {
        for headers in &wrong {
            let reply = exchange(port, method, path, headers, b"{}");
            assert_eq!(
                reply.status, 401,
                "{method} {path} with {headers:?}: {}",
                reply.body
            );
            assert_eq!(reply.json()["error"]["code"], json!("unauthorized"));
        }
    }
    assert_eq!(upstream.requests.load(Ordering::Relaxed), 0);
    let document = admin(port, "GET", "/admin/openapi.json", None);
    assert_eq!(document.status, 200);
    let document = document.json();
    assert_eq!(document["openapi"], json!("3.1.0"));
    for (_, path) in routes.iter().filter(|(_, p)| !p.ends_with("unknown")) {
        let templated = path
            .replace("/rules/a", "/rules/{name}")
            .replace("/patches/x", "/patches/{id}")
            .replace("/locks/1", "/locks/{id}");
        assert!(
            document["paths"].get(&templated).is_some(),
            "{templated} is not in the OpenAPI document"
        );
    }
    runtime.block_on(proxy.shutdown()).unwrap();
}

#[test]
fn server_locks_and_temporary_patches_on_an_attached_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.gguf");
    std::fs::copy(tests::real_model(), &model).unwrap();
    let original = std::fs::read(&model).unwrap();
    let runtime = runtime();
    let upstream = TestUpstream::start(&runtime);
    let mut config = ProxyConfig::new(upstream.url(), local());
    config.admin = AdminAccess::InsecureLoopback;
    config.model = Some(model.clone());
    // The test upstream is not a llama-server and serves no model file.
    config.verify_model = false;
    let proxy = start_proxy(&runtime, config);
    let port = proxy.local_addr().port();
    let call = |method: &str, path: &str, body: Option<Value>| {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        exchange(port, method, path, &[JSON], body.as_bytes())
    };

    let tensors = call("GET", "/admin/tensors", None).json();
    assert!(
        tensors
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["name"] == json!("output_norm.weight"))
    );
    let lock = call(
        "POST",
        "/admin/locks",
        Some(json!({"tensor": "output_norm.weight"})),
    );
    assert_eq!(lock.status, 201, "{}", lock.body);
    let lock_id = lock.json()["id"].as_u64().unwrap();
    let patch = json!({"name": "t", "tensor": "output_norm.weight", "transform": {"scale": 2.0}, "ttl_secs": 1});
    let refused = call("POST", "/admin/patches", Some(patch.clone()));
    assert_eq!(refused.status, 409, "{}", refused.body);
    assert_eq!(
        call("DELETE", &format!("/admin/locks/{lock_id}"), None).status,
        200
    );
    assert_eq!(
        call(
            "POST",
            "/admin/patches",
            Some(json!({"name": "bad", "tensor": "nope", "transform": {"zero": true}}))
        )
        .status,
        404
    );
    assert_eq!(
        call(
            "POST",
            "/admin/patches",
            Some(
                json!({"name": "bad", "tensor": "output_norm.weight", "transform": {"explode": 1}})
            )
        )
        .status,
        400
    );

    // A patch over an applied one of equal priority is a conflict.
    let first = call(
        "POST",
        "/admin/patches",
        Some(json!({"name": "a", "tensor": "output_norm.weight", "transform": {"offset": 1.0}})),
    );
    assert_eq!(first.status, 201, "{}", first.body);
    let second = call(
        "POST",
        "/admin/patches",
        Some(
            json!({"name": "b", "tensor": "output_norm.weight", "transform": {"clamp": [0.0, 1.0]}, "range": [0, 32]}),
        ),
    );
    assert_eq!(second.status, 409, "{}", second.body);
    assert_eq!(second.json()["error"]["code"], json!("conflict"));
    assert_eq!(call("DELETE", "/admin/patches/a", None).status, 200);
    assert!(std::fs::read(&model).unwrap() == original);

    // A temporary patch reverts by itself.
    let applied = call("POST", "/admin/patches", Some(patch));
    assert_eq!(applied.status, 201, "{}", applied.body);
    assert!(std::fs::read(&model).unwrap() != original);
    let mut patches = Value::Null;
    for _ in 0..300 {
        patches = call("GET", "/admin/patches", None).json();
        if patches.as_array().is_some_and(Vec::is_empty) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(patches, json!([]), "the temporary patch is still applied");
    assert!(std::fs::read(&model).unwrap() == original);
    assert_eq!(proxy.control().epoch(), 4);
    runtime.block_on(proxy.shutdown()).unwrap();
}

/// 5,000 requests, 32 at a time, one in ten malformed: every one is answered with the
/// right status within the client's read timeout, and the proxy ends with nothing in
/// flight.
#[test]
fn server_load_run_ends_with_every_request_answered() {
    let runtime = runtime();
    let upstream = TestUpstream::start(&runtime);
    let mut config = ProxyConfig::new(upstream.url(), local());
    config.rules = RuleSet::from_toml_str(
        r#"
[[rule]]
name = "code"
action = { type = "redact", pattern = "1234", mask = "*" }
[[rule]]
name = "cap"
action = { type = "clamp", key = "temperature", max = 1.0 }
"#,
    )
    .unwrap();
    let proxy = start_proxy(&runtime, config);
    let port = proxy.local_addr().port();
    const TOTAL: usize = 5000;
    const WORKERS: usize = 32;
    let failures = Arc::new(AtomicU64::new(0));
    let answered = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..WORKERS)
        .map(|worker| {
            let failures = Arc::clone(&failures);
            let answered = Arc::clone(&answered);
            std::thread::spawn(move || {
                for i in (worker..TOTAL).step_by(WORKERS) {
                    let malformed = i % 10 == 0;
                    let body = if malformed {
                        b"{\"messages\": [".to_vec()
                    } else {
                        json!({"messages": [{"role": "user", "content": "x"}], "temperature": 3, "stream": i % 3 == 0})
                            .to_string()
                            .into_bytes()
                    };
                    let reply = exchange(port, "POST", "/v1/chat/completions", &[JSON], &body);
                    answered.fetch_add(1, Ordering::Relaxed);
                    let expected = if malformed { 400 } else { 200 };
                    let good = reply.status == expected
                        && (malformed || !reply.body.contains("1234"));
                    if !good {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("a client thread panicked");
    }
    assert_eq!(answered.load(Ordering::Relaxed), TOTAL as u64);
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    let stats = proxy.control().stats();
    assert_eq!(stats.in_flight, 0);
    assert_eq!(
        upstream.requests.load(Ordering::Relaxed),
        (TOTAL - TOTAL / 10) as u64
    );
    assert_eq!(exchange(port, "GET", "/health", &[], b"").status, 200);
    runtime.block_on(proxy.shutdown()).unwrap();
}
