//! The `ServerPatcher` trait and `RulePatcher`, the rule engine that implements it.
//!
//! Rules are compiled once (regexes, bounds, token ids) into a snapshot that requests
//! read through arc-swap: a rule change never blocks or tears a request in flight.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use regex::Regex;
use serde_json::{Map, Value};

use crate::redact::{Redactor, Replacement, StopDetector, StreamRedactor, compile_bounded};
use crate::rules::{Action, GENERATION_PATHS, PromptMode, Rule};
use crate::stats::{RuleStats, Stats};
use crate::{Error, Result};

/// The hooks of the HTTP tier, over OpenAI-compatible JSON.
///
/// The proxy calls [`pre_request`](ServerPatcher::pre_request) with each generation
/// request's JSON body before it goes upstream; the returned plan drives
/// [`post_response`](ServerPatcher::post_response) on a whole JSON answer, or
/// [`stream_chunk`](ServerPatcher::stream_chunk) on each piece of a streamed (SSE) one
/// and [`stream_end`](ServerPatcher::stream_end) when the upstream stream ends.
pub trait ServerPatcher: Send + Sync {
    /// Rewrites a request in place; returns what its response needs.
    fn pre_request(&self, request: &mut GenerationRequest<'_>) -> ResponsePlan;

    /// Filters a whole JSON response in place; returns whether it changed.
    fn post_response(&self, plan: &ResponsePlan, body: &mut Value) -> bool;

    /// Filters the next bytes of a streamed response; appends what the client gets to
    /// `out`. [`ChunkFlow::Stop`] means the stream is complete (a final event was
    /// appended) and the rest of the upstream stream must be dropped.
    fn stream_chunk(
        &self,
        stream: &mut StreamState,
        bytes: &[u8],
        out: &mut Vec<Bytes>,
    ) -> ChunkFlow;

    /// Ends a streamed response: appends any text still held back.
    fn stream_end(&self, stream: &mut StreamState, out: &mut Vec<Bytes>);
}

/// A generation request as the pre-request hook sees it.
#[derive(Debug)]
pub struct GenerationRequest<'a> {
    /// The request path.
    pub path: &'a str,
    /// The JSON body (an object).
    pub body: &'a mut Map<String, Value>,
}

/// What the pre-request hook decided for a request's response.
#[derive(Clone, Debug, Default)]
pub struct ResponsePlan {
    endpoint: Endpoint,
    /// Whether the request body was changed.
    pub request_changed: bool,
    redactors: Vec<(Arc<CompiledRule>, Arc<Redactor>)>,
    stops: Vec<Arc<CompiledRule>>,
}

impl ResponsePlan {
    /// Whether any rule looks at the response.
    pub fn filters_response(&self) -> bool {
        !self.redactors.is_empty() || !self.stops.is_empty()
    }

    /// A fresh state for filtering this response as a stream.
    pub fn stream_state(&self) -> StreamState {
        let mut after_chunks = None;
        for rule in &self.stops {
            if let CompiledAction::StopStream {
                after_chunks: Some(n),
                ..
            } = rule.action
            {
                after_chunks = Some(after_chunks.map_or(n, |m: u64| m.min(n)));
            }
        }
        StreamState {
            plan: self.clone(),
            splitter: SseSplitter::default(),
            choices: Vec::new(),
            after_chunks,
            text_chunks: 0,
            template: None,
            done: false,
            stopped_early: false,
        }
    }
}

/// Which response shape an endpoint has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum Endpoint {
    /// `/v1/chat/completions`: `choices[].message.content`, streamed `choices[].delta.content`.
    Chat,
    /// `/v1/completions`: `choices[].text`.
    Completions,
    /// llama.cpp's `/completion`: `content`.
    #[default]
    Completion,
}

impl Endpoint {
    fn of(path: &str, body: &Map<String, Value>) -> Endpoint {
        match path {
            "/v1/chat/completions" | "/chat/completions" => Endpoint::Chat,
            "/v1/completions" | "/completions" => Endpoint::Completions,
            "/completion" => Endpoint::Completion,
            _ if body.contains_key("messages") => Endpoint::Chat,
            _ => Endpoint::Completions,
        }
    }

    fn is_openai(self) -> bool {
        self != Endpoint::Completion
    }
}

/// A rule ready to run: regexes compiled, ids parsed, counters attached.
#[derive(Debug)]
pub(crate) struct CompiledRule {
    paths: Option<Vec<String>>,
    model: Option<(String, Regex)>,
    action: CompiledAction,
    stats: Arc<RuleStats>,
}

#[derive(Debug)]
enum CompiledAction {
    Set {
        key: String,
        value: Value,
    },
    Override {
        key: String,
        value: Value,
    },
    Clamp {
        key: String,
        min: f64,
        max: f64,
    },
    SystemPrompt {
        text: String,
        mode: PromptMode,
    },
    LogitBias(Vec<(String, f32)>),
    Redact(Arc<Redactor>),
    StopStream {
        after_chunks: Option<u64>,
        pattern: Option<(Regex, usize)>,
    },
}

impl CompiledRule {
    /// Compiles a rule, checking everything serde does not.
    pub(crate) fn compile(rule: &Rule, stats: Arc<RuleStats>) -> Result<CompiledRule> {
        let invalid = |reason: String| Error::InvalidRule {
            rule: rule.name.clone(),
            reason,
        };
        if rule.name.trim().is_empty() {
            return Err(invalid("name: a rule needs a non-empty name".into()));
        }
        if let Some(paths) = &rule.paths
            && let Some(bad) = paths.iter().find(|p| !p.starts_with('/'))
        {
            return Err(invalid(format!("paths: {bad:?} does not start with '/'")));
        }
        let model = match &rule.model {
            Some(name) => {
                let regex = Regex::new(&format!("^(?:{name})$"))
                    .map_err(|e| invalid(format!("model: not a name or regex: {e}")))?;
                Some((name.clone(), regex))
            }
            None => None,
        };
        let key_check = |key: &str| {
            if key.is_empty() {
                Err(invalid("key: empty".into()))
            } else {
                Ok(())
            }
        };
        let action = match &rule.action {
            Action::Set { key, value } => {
                key_check(key)?;
                CompiledAction::Set {
                    key: key.clone(),
                    value: value.clone(),
                }
            }
            Action::Override { key, value } => {
                key_check(key)?;
                CompiledAction::Override {
                    key: key.clone(),
                    value: value.clone(),
                }
            }
            Action::Clamp { key, min, max } => {
                key_check(key)?;
                let (min, max) = (
                    min.unwrap_or(f64::NEG_INFINITY),
                    max.unwrap_or(f64::INFINITY),
                );
                if min.is_nan() || max.is_nan() || min > max {
                    return Err(invalid(format!("min {min} must not exceed max {max}")));
                }
                if min == f64::NEG_INFINITY && max == f64::INFINITY {
                    return Err(invalid("clamp needs min, max or both".into()));
                }
                CompiledAction::Clamp {
                    key: key.clone(),
                    min,
                    max,
                }
            }
            Action::SystemPrompt { text, mode } => CompiledAction::SystemPrompt {
                text: text.clone(),
                mode: *mode,
            },
            Action::LogitBias { bias } => {
                let mut pairs = Vec::with_capacity(bias.len());
                for (token, value) in bias {
                    let id: u32 = token
                        .trim()
                        .parse()
                        .map_err(|_| invalid(format!("bias: {token:?} is not a token id")))?;
                    if !value.is_finite() {
                        return Err(invalid(format!("bias: token {id} has bias {value}")));
                    }
                    pairs.push((id.to_string(), *value));
                }
                CompiledAction::LogitBias(pairs)
            }
            Action::Redact {
                pattern,
                regex,
                replacement,
                mask,
            } => {
                let replacement = match (replacement, mask) {
                    (Some(text), None) => Replacement::Text {
                        text: text.clone(),
                        expand: *regex,
                    },
                    (None, Some(c)) => Replacement::Mask(*c),
                    _ => {
                        return Err(invalid(
                            "redact needs exactly one of replacement and mask".into(),
                        ));
                    }
                };
                let redactor = Redactor::new(pattern, *regex, replacement)
                    .map_err(|e| invalid(format!("pattern: {e}")))?;
                CompiledAction::Redact(Arc::new(redactor))
            }
            Action::StopStream {
                after_chunks,
                pattern,
                regex,
            } => {
                if after_chunks.is_none() && pattern.is_none() {
                    return Err(invalid(
                        "stop_stream needs after_chunks, pattern or both".into(),
                    ));
                }
                if *after_chunks == Some(0) {
                    return Err(invalid("after_chunks must be at least 1".into()));
                }
                let pattern = match pattern {
                    Some(p) if p.is_empty() => {
                        return Err(invalid("pattern: empty".into()));
                    }
                    Some(p) => {
                        let source = if *regex { p.clone() } else { regex::escape(p) };
                        Some(
                            compile_bounded(&source)
                                .map_err(|e| invalid(format!("pattern: {e}")))?,
                        )
                    }
                    None => None,
                };
                CompiledAction::StopStream {
                    after_chunks: *after_chunks,
                    pattern,
                }
            }
        };
        Ok(CompiledRule {
            paths: rule.paths.clone(),
            model,
            action,
            stats,
        })
    }

    fn applies(&self, path: &str, model: Option<&str>) -> bool {
        let path_ok = match &self.paths {
            Some(paths) => paths.iter().any(|p| p == path),
            None => GENERATION_PATHS.contains(&path),
        };
        let model_ok = match (&self.model, model) {
            (None, _) => true,
            (Some((name, regex)), Some(model)) => name == model || regex.is_match(model),
            (Some(_), None) => false,
        };
        path_ok && model_ok
    }
}

/// The enabled rules of a set, compiled, in order.
#[derive(Debug, Default)]
pub(crate) struct CompiledRules {
    rules: Vec<Arc<CompiledRule>>,
}

impl CompiledRules {
    pub(crate) fn compile(rules: &[Rule], stats: &Stats) -> Result<CompiledRules> {
        let mut compiled = Vec::with_capacity(rules.len());
        for rule in rules.iter().filter(|r| r.enabled) {
            compiled.push(Arc::new(CompiledRule::compile(
                rule,
                stats.rule(&rule.name),
            )?));
        }
        Ok(CompiledRules { rules: compiled })
    }
}

/// The rule engine: the concrete [`ServerPatcher`].
#[derive(Debug)]
pub struct RulePatcher {
    rules: ArcSwap<CompiledRules>,
    stats: Arc<Stats>,
}

impl RulePatcher {
    pub(crate) fn new(rules: CompiledRules, stats: Arc<Stats>) -> RulePatcher {
        RulePatcher {
            rules: ArcSwap::from_pointee(rules),
            stats,
        }
    }

    pub(crate) fn store(&self, rules: CompiledRules) {
        self.rules.store(Arc::new(rules));
    }

    /// Whether any enabled rule applies to `path` (for any model).
    pub(crate) fn any_rule_for(&self, path: &str) -> bool {
        self.rules.load().rules.iter().any(|r| match &r.paths {
            Some(paths) => paths.iter().any(|p| p == path),
            None => GENERATION_PATHS.contains(&path),
        })
    }
}

/// Length of a JSON value as written, for the bytes-patched counters.
fn json_len(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(0, |v| v.len())
}

fn apply_request_action(
    action: &CompiledAction,
    body: &mut Map<String, Value>,
    endpoint: Endpoint,
) -> usize {
    match action {
        CompiledAction::Set { key, value } => {
            if body.contains_key(key) {
                return 0;
            }
            body.insert(key.clone(), value.clone());
            json_len(value)
        }
        CompiledAction::Override { key, value } => {
            if body.get(key) == Some(value) {
                return 0;
            }
            body.insert(key.clone(), value.clone());
            json_len(value)
        }
        CompiledAction::Clamp { key, min, max } => {
            let Some(Value::Number(number)) = body.get(key) else {
                return 0;
            };
            let Some(current) = number.as_f64() else {
                return 0;
            };
            let clamped = current.max(*min).min(*max);
            if clamped == current {
                return 0;
            }
            let integral = number.is_i64() || number.is_u64();
            let value = if integral && clamped.fract() == 0.0 && clamped.abs() < 9.0e15 {
                Value::from(clamped as i64)
            } else {
                match serde_json::Number::from_f64(clamped) {
                    Some(n) => Value::Number(n),
                    None => return 0,
                }
            };
            let len = json_len(&value);
            body.insert(key.clone(), value);
            len
        }
        CompiledAction::SystemPrompt { text, mode } => {
            inject_system_prompt(body, endpoint, text, *mode)
        }
        CompiledAction::LogitBias(pairs) => {
            let entry = body
                .entry("logit_bias")
                .or_insert_with(|| Value::Object(Map::new()));
            if entry.is_null() {
                *entry = Value::Object(Map::new());
            }
            match entry {
                Value::Object(map) => {
                    for (id, bias) in pairs {
                        map.insert(id.clone(), Value::from(*bias));
                    }
                }
                Value::Array(list) => {
                    for (id, bias) in pairs {
                        let id: u64 = id.parse().unwrap_or_default();
                        list.push(Value::Array(vec![Value::from(id), Value::from(*bias)]));
                    }
                }
                _ => return 0,
            }
            pairs.len() * 8
        }
        CompiledAction::Redact(_) | CompiledAction::StopStream { .. } => 0,
    }
}

fn inject_system_prompt(
    body: &mut Map<String, Value>,
    endpoint: Endpoint,
    text: &str,
    mode: PromptMode,
) -> usize {
    if endpoint == Endpoint::Chat || body.contains_key("messages") {
        let Some(Value::Array(messages)) = body.get_mut("messages") else {
            return 0;
        };
        if mode == PromptMode::Merge
            && let Some(Value::Object(first)) = messages.first_mut()
            && first.get("role").and_then(Value::as_str) == Some("system")
        {
            match first.get_mut("content") {
                Some(Value::String(content)) => {
                    *content = format!("{text}\n\n{content}");
                    return text.len() + 2;
                }
                Some(Value::Array(parts)) => {
                    parts.insert(0, serde_json::json!({"type": "text", "text": text}));
                    return text.len();
                }
                _ => {
                    first.insert("content".into(), Value::String(text.to_owned()));
                    return text.len();
                }
            }
        }
        messages.insert(0, serde_json::json!({"role": "system", "content": text}));
        return text.len();
    }
    match body.get_mut("prompt") {
        Some(Value::String(prompt)) => {
            prompt.insert_str(0, text);
            text.len()
        }
        Some(Value::Array(prompts)) => {
            let mut n = 0;
            for prompt in prompts.iter_mut() {
                if let Value::String(p) = prompt {
                    p.insert_str(0, text);
                    n += text.len();
                }
            }
            n
        }
        _ => 0,
    }
}

impl ServerPatcher for RulePatcher {
    fn pre_request(&self, request: &mut GenerationRequest<'_>) -> ResponsePlan {
        let start = Instant::now();
        let rules = self.rules.load();
        let endpoint = Endpoint::of(request.path, request.body);
        let mut plan = ResponsePlan {
            endpoint,
            ..ResponsePlan::default()
        };
        if rules.rules.is_empty() {
            return plan;
        }
        let model = request
            .body
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_owned);
        for rule in &rules.rules {
            if !rule.applies(request.path, model.as_deref()) {
                continue;
            }
            let rule_start = Instant::now();
            match &rule.action {
                CompiledAction::Redact(redactor) => {
                    plan.redactors
                        .push((Arc::clone(rule), Arc::clone(redactor)));
                    rule.stats.request(0, rule_start.elapsed());
                }
                CompiledAction::StopStream { .. } => {
                    plan.stops.push(Arc::clone(rule));
                    rule.stats.request(0, rule_start.elapsed());
                }
                action => {
                    let bytes = apply_request_action(action, request.body, endpoint);
                    if bytes > 0 {
                        plan.request_changed = true;
                        rule.stats.request(bytes, rule_start.elapsed());
                    }
                }
            }
        }
        self.stats.pre_request.record(start.elapsed());
        plan
    }

    fn post_response(&self, plan: &ResponsePlan, body: &mut Value) -> bool {
        if plan.redactors.is_empty() {
            return false;
        }
        let start = Instant::now();
        let mut changed = false;
        for_each_text(plan.endpoint, body, false, |_, _, container, key| {
            let Some(Value::String(text)) = container.get_mut(key) else {
                return;
            };
            for (rule, redactor) in &plan.redactors {
                let rule_start = Instant::now();
                let (out, matched) = redactor.redact_all(text);
                rule.stats.response(matched, rule_start.elapsed());
                if matched > 0 {
                    *text = out;
                    changed = true;
                }
            }
        });
        self.stats.post_response.record(start.elapsed());
        changed
    }

    fn stream_chunk(
        &self,
        stream: &mut StreamState,
        bytes: &[u8],
        out: &mut Vec<Bytes>,
    ) -> ChunkFlow {
        if stream.done {
            return ChunkFlow::Stop;
        }
        let start = Instant::now();
        stream.splitter.push(bytes);
        let mut flow = ChunkFlow::Continue;
        while let Some(event) = stream.splitter.next_event() {
            if stream.event(&event, out) == ChunkFlow::Stop {
                flow = ChunkFlow::Stop;
                break;
            }
        }
        self.stats.stream_chunk.record(start.elapsed());
        flow
    }

    fn stream_end(&self, stream: &mut StreamState, out: &mut Vec<Bytes>) {
        if stream.done {
            return;
        }
        if let Some(rest) = stream.splitter.rest() {
            stream.event(&rest, out);
        }
        stream.flush_pending(out);
        stream.done = true;
    }
}

/// Calls `f(choice index, finished, object holding the text, its key)` for each text of
/// a response or event. Objects that should hold a text but are missing (a chat delta
/// without content) are created only when `create` is true.
fn for_each_text(
    endpoint: Endpoint,
    value: &mut Value,
    streamed: bool,
    mut f: impl FnMut(u64, bool, &mut Map<String, Value>, &'static str),
) {
    match endpoint {
        Endpoint::Completion => {
            let finished = value.get("stop").and_then(Value::as_bool) == Some(true);
            if let Value::Object(map) = value {
                f(0, finished, map, "content");
            }
        }
        Endpoint::Chat | Endpoint::Completions => {
            let Some(Value::Array(choices)) = value.get_mut("choices") else {
                return;
            };
            for (position, choice) in choices.iter_mut().enumerate() {
                let Value::Object(choice) = choice else {
                    continue;
                };
                let index = choice
                    .get("index")
                    .and_then(Value::as_u64)
                    .unwrap_or(position as u64);
                let finished = choice.get("finish_reason").is_some_and(|r| !r.is_null());
                let container = match endpoint {
                    Endpoint::Chat => {
                        let field = if streamed { "delta" } else { "message" };
                        match choice.get_mut(field) {
                            Some(Value::Object(inner)) => inner,
                            Some(_) => continue,
                            None if streamed => {
                                choice.insert(field.into(), Value::Object(Map::new()));
                                match choice.get_mut(field) {
                                    Some(Value::Object(inner)) => inner,
                                    _ => continue,
                                }
                            }
                            None => continue,
                        }
                    }
                    _ => choice,
                };
                let key = if endpoint == Endpoint::Chat {
                    "content"
                } else {
                    "text"
                };
                f(index, finished, container, key);
            }
        }
    }
}

/// Whether a stream goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkFlow {
    /// Keep reading the upstream stream.
    Continue,
    /// The stream is complete; drop the rest of the upstream stream.
    Stop,
}

/// Splits a byte stream into server-sent events.
#[derive(Debug, Default)]
struct SseSplitter {
    buffer: Vec<u8>,
    scanned: usize,
}

/// A buffered event larger than this is passed on as it is rather than held.
const MAX_EVENT_BYTES: usize = 16 << 20;

impl SseSplitter {
    fn push(&mut self, bytes: &[u8]) {
        self.buffer.extend_from_slice(bytes);
    }

    /// The next complete event, without its blank-line terminator.
    fn next_event(&mut self) -> Option<Vec<u8>> {
        let from = self.scanned.saturating_sub(3);
        let haystack = &self.buffer[from..];
        let lf = memchr::memmem::find(haystack, b"\n\n").map(|i| (i, 2));
        let crlf = memchr::memmem::find(haystack, b"\r\n\r\n").map(|i| (i, 4));
        let found = match (lf, crlf) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        match found {
            Some((at, len)) => {
                let end = from + at;
                let event = self.buffer[..end].to_vec();
                self.buffer.drain(..end + len);
                self.scanned = 0;
                Some(event)
            }
            None if self.buffer.len() > MAX_EVENT_BYTES => {
                self.scanned = 0;
                Some(std::mem::take(&mut self.buffer))
            }
            None => {
                self.scanned = self.buffer.len();
                None
            }
        }
    }

    /// What is left at the end of the stream, if anything but whitespace.
    fn rest(&mut self) -> Option<Vec<u8>> {
        let rest = std::mem::take(&mut self.buffer);
        (!rest.iter().all(u8::is_ascii_whitespace)).then_some(rest)
    }
}

/// Per-choice filters of a stream.
#[derive(Debug)]
struct ChoiceState {
    index: u64,
    redactors: Vec<(Arc<CompiledRule>, StreamRedactor)>,
    stops: Vec<StopDetector>,
}

impl ChoiceState {
    fn push(&mut self, text: &str) -> String {
        let mut text = text.to_owned();
        for (rule, redactor) in &mut self.redactors {
            let start = Instant::now();
            let before = redactor.bytes_matched;
            text = redactor.push(&text);
            rule.stats
                .chunk(redactor.bytes_matched - before, start.elapsed());
        }
        text
    }

    fn finish(&mut self) -> String {
        let mut text = String::new();
        for (rule, redactor) in &mut self.redactors {
            let before = redactor.bytes_matched;
            let mut out = redactor.push(&text);
            out.push_str(&redactor.finish());
            rule.stats
                .chunk(redactor.bytes_matched - before, std::time::Duration::ZERO);
            text = out;
        }
        text
    }

    /// Bytes of `text` to keep when a stop pattern ends in it.
    fn stop_at(&mut self, text: &str) -> Option<usize> {
        self.stops.iter_mut().filter_map(|s| s.push(text)).min()
    }
}

/// The state of one streamed response through the stream-chunk hook.
#[derive(Debug)]
pub struct StreamState {
    plan: ResponsePlan,
    splitter: SseSplitter,
    choices: Vec<ChoiceState>,
    after_chunks: Option<u64>,
    text_chunks: u64,
    template: Option<Value>,
    done: bool,
    stopped_early: bool,
}

impl StreamState {
    /// Whether a `stop_stream` rule ended the stream.
    pub fn stopped_early(&self) -> bool {
        self.stopped_early
    }

    fn choice(&mut self, index: u64) -> &mut ChoiceState {
        let position = match self.choices.iter().position(|c| c.index == index) {
            Some(p) => p,
            None => {
                let redactors = self
                    .plan
                    .redactors
                    .iter()
                    .map(|(rule, r)| (Arc::clone(rule), StreamRedactor::new(Arc::clone(r))))
                    .collect();
                let stops = self
                    .plan
                    .stops
                    .iter()
                    .filter_map(|rule| match &rule.action {
                        CompiledAction::StopStream {
                            pattern: Some((regex, max_len)),
                            ..
                        } => Some(StopDetector::new(regex.clone(), *max_len)),
                        _ => None,
                    })
                    .collect();
                self.choices.push(ChoiceState {
                    index,
                    redactors,
                    stops,
                });
                self.choices.len() - 1
            }
        };
        &mut self.choices[position]
    }

    /// Handles one event; appends the client's bytes to `out`.
    fn event(&mut self, event: &[u8], out: &mut Vec<Bytes>) -> ChunkFlow {
        let Ok(text) = std::str::from_utf8(event) else {
            out.push(frame_raw(event));
            return ChunkFlow::Continue;
        };
        let mut data = String::new();
        let mut others = Vec::new();
        let mut has_data = false;
        for line in text.lines() {
            if let Some(payload) = line.strip_prefix("data:") {
                if has_data {
                    data.push('\n');
                }
                data.push_str(payload.strip_prefix(' ').unwrap_or(payload));
                has_data = true;
            } else {
                others.push(line);
            }
        }
        if !has_data {
            out.push(frame_raw(event));
            return ChunkFlow::Continue;
        }
        if data.trim() == "[DONE]" {
            self.flush_pending(out);
            out.push(Bytes::from_static(b"data: [DONE]\n\n"));
            self.done = true;
            return ChunkFlow::Stop;
        }
        let Ok(mut value) = serde_json::from_str::<Value>(&data) else {
            out.push(frame_raw(event));
            return ChunkFlow::Continue;
        };
        if self.template.is_none() {
            self.template = Some(value.clone());
        }
        let endpoint = self.plan.endpoint;
        let mut any_text = false;
        let mut any_finished = false;
        let mut texts = Vec::new();
        for_each_text(
            endpoint,
            &mut value,
            true,
            |index, finished, container, key| {
                let text = container
                    .get(key)
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                any_text |= !text.is_empty();
                any_finished |= finished;
                texts.push((index, finished, text));
            },
        );
        if any_text {
            self.text_chunks += 1;
        }
        let limit_reached = self.after_chunks.is_some_and(|n| self.text_chunks >= n);
        let mut stopped = false;
        let mut outputs = Vec::with_capacity(texts.len());
        for (index, finished, text) in texts {
            let choice = self.choice(index);
            let mut output = choice.push(&text);
            if finished || limit_reached {
                output.push_str(&choice.finish());
            }
            if let Some(keep) = choice.stop_at(&output) {
                output.truncate(keep);
                stopped = true;
            }
            outputs.push(output);
        }
        let mut outputs = outputs.into_iter();
        for_each_text(endpoint, &mut value, true, |_, _, container, key| {
            let Some(output) = outputs.next() else { return };
            let current = container.get(key);
            let unchanged = match current {
                Some(Value::String(text)) => *text == output,
                Some(Value::Null) | None => output.is_empty(),
                Some(_) => true,
            };
            if !unchanged {
                container.insert(key.to_owned(), Value::String(output));
            }
        });
        out.push(frame_json(&value, &others));
        if (stopped || limit_reached) && !any_finished {
            self.finish_early(out);
            return ChunkFlow::Stop;
        }
        ChunkFlow::Continue
    }

    /// Sends text still held back by redactors, as one more event.
    fn flush_pending(&mut self, out: &mut Vec<Bytes>) {
        let mut pending = Vec::new();
        for index in self.choices.iter().map(|c| c.index).collect::<Vec<_>>() {
            let choice = self.choice(index);
            let text = choice.finish();
            if !text.is_empty() {
                pending.push((index, text));
            }
        }
        if pending.is_empty() {
            return;
        }
        let event = self.synthesize(&pending, None);
        out.push(frame_json(&event, &[]));
    }

    /// Ends the stream cleanly: a final event with a stop reason, then `[DONE]` on the
    /// OpenAI endpoints.
    fn finish_early(&mut self, out: &mut Vec<Bytes>) {
        let indexes: Vec<(u64, String)> = if self.choices.is_empty() {
            vec![(0, String::new())]
        } else {
            self.choices
                .iter()
                .map(|c| (c.index, String::new()))
                .collect()
        };
        let event = self.synthesize(&indexes, Some("stop"));
        out.push(frame_json(&event, &[]));
        if self.plan.endpoint.is_openai() {
            out.push(Bytes::from_static(b"data: [DONE]\n\n"));
        }
        self.done = true;
        self.stopped_early = true;
    }

    fn synthesize(&self, texts: &[(u64, String)], finish: Option<&str>) -> Value {
        let template = self.template.as_ref();
        let field = |name: &str| template.and_then(|t| t.get(name)).cloned();
        match self.plan.endpoint {
            Endpoint::Completion => {
                let text = texts.first().map(|(_, t)| t.as_str()).unwrap_or("");
                let mut event = serde_json::json!({"content": text, "stop": finish.is_some()});
                if finish.is_some() {
                    event["stop_type"] = Value::from("word");
                }
                event
            }
            endpoint => {
                let choices: Vec<Value> = texts
                    .iter()
                    .map(|(index, text)| {
                        let mut choice = if endpoint == Endpoint::Chat {
                            let delta = if text.is_empty() {
                                serde_json::json!({})
                            } else {
                                serde_json::json!({"content": text})
                            };
                            serde_json::json!({"index": index, "delta": delta})
                        } else {
                            serde_json::json!({"index": index, "text": text})
                        };
                        choice["finish_reason"] = finish.map_or(Value::Null, Value::from);
                        choice
                    })
                    .collect();
                let mut event = serde_json::json!({"choices": choices});
                for name in ["id", "object", "created", "model"] {
                    if let Some(value) = field(name) {
                        event[name] = value;
                    }
                }
                event
            }
        }
    }
}

fn frame_raw(event: &[u8]) -> Bytes {
    let mut framed = Vec::with_capacity(event.len() + 2);
    framed.extend_from_slice(event);
    framed.extend_from_slice(b"\n\n");
    Bytes::from(framed)
}

fn frame_json(value: &Value, other_lines: &[&str]) -> Bytes {
    let mut framed = Vec::with_capacity(256);
    for line in other_lines {
        framed.extend_from_slice(line.as_bytes());
        framed.push(b'\n');
    }
    framed.extend_from_slice(b"data: ");
    if serde_json::to_writer(&mut framed, value).is_err() {
        framed.extend_from_slice(b"{}");
    }
    framed.extend_from_slice(b"\n\n");
    Bytes::from(framed)
}

#[cfg(test)]
mod tests;
