//! The response cache: deterministic requests only, keyed on the canonical request and
//! the model's patch epoch.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::rules::CacheSettings;

/// Responses larger than this are not cached: the entry bound counts entries, and this
/// keeps one entry's memory bounded too.
pub(crate) const MAX_CACHED_BYTES: usize = 4 << 20;

/// A cached answer.
#[derive(Debug)]
pub(crate) struct CachedResponse {
    pub(crate) status: u16,
    pub(crate) content_type: Option<http::HeaderValue>,
    pub(crate) body: CachedBody,
}

/// A whole body, or the events of a stream, replayed one by one.
#[derive(Debug)]
pub(crate) enum CachedBody {
    Whole(Bytes),
    Stream(Vec<Bytes>),
}

/// A key: SHA-256 of the path, the epoch and the canonical request.
pub(crate) type CacheKey = [u8; 32];

/// The cache with its settings; replaced whole when the settings change.
#[derive(Debug)]
pub(crate) struct ResponseCache {
    pub(crate) settings: CacheSettings,
    pub(crate) entries: moka::future::Cache<CacheKey, Arc<CachedResponse>>,
}

impl ResponseCache {
    pub(crate) fn new(settings: CacheSettings) -> ResponseCache {
        let entries = moka::future::Cache::builder()
            .max_capacity(settings.max_entries)
            .time_to_live(Duration::from_secs(settings.ttl_secs))
            .build();
        ResponseCache { settings, entries }
    }
}

/// Whether a request's answer is determined by the request: temperature 0, or a fixed
/// seed (llama.cpp takes -1 and 4294967295 as "random").
pub(crate) fn is_deterministic(body: &serde_json::Map<String, Value>) -> bool {
    if body
        .get("temperature")
        .and_then(Value::as_f64)
        .is_some_and(|t| t == 0.0)
    {
        return true;
    }
    match body.get("seed") {
        Some(Value::Number(n)) => match n.as_i64() {
            Some(seed) => seed >= 0 && seed != u32::MAX as i64,
            None => n.as_u64().is_some(),
        },
        _ => false,
    }
}

/// The cache key of a request on `path` with the model at `epoch` and the rules at
/// `rules_generation` (response rules change answers without changing requests).
pub(crate) fn cache_key(path: &str, epoch: u64, rules_generation: u64, body: &Value) -> CacheKey {
    let mut canonical = String::with_capacity(256);
    canonical.push_str(path);
    canonical.push('\0');
    let _ = write!(canonical, "{epoch}\0{rules_generation}");
    canonical.push('\0');
    write_canonical(body, &mut canonical);
    Sha256::digest(canonical.as_bytes()).into()
}

/// JSON with object keys sorted at every level and numbers in one form (integral values
/// as integers, so `1`, `1.0` and `1e0` are the same request).
pub(crate) fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                let _ = write!(out, "{i}");
            } else if let Some(u) = n.as_u64() {
                let _ = write!(out, "{u}");
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 9.0e15 {
                    let _ = write!(out, "{}", f as i64);
                } else {
                    let _ = write!(out, "{f:e}");
                }
            }
        }
        Value::String(s) => write_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_unstable();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_string(key, out);
                out.push(':');
                write_canonical(&map[key], out);
            }
            out.push('}');
        }
    }
}

fn write_string(s: &str, out: &mut String) {
    // serde_json's escaping is canonical for a given string.
    match serde_json::to_string(s) {
        Ok(quoted) => out.push_str(&quoted),
        Err(_) => out.push_str("\"\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn canonical(value: Value) -> String {
        let mut out = String::new();
        write_canonical(&value, &mut out);
        out
    }

    #[test]
    fn canonical_forms() {
        assert_eq!(
            canonical(json!({"b": 1, "a": {"d": [1.0, 2.5], "c": null}})),
            r#"{"a":{"c":null,"d":[1,2.5e0]},"b":1}"#
        );
        assert_eq!(canonical(json!("a\"b\n")), r#""a\"b\n""#);
        assert_eq!(canonical(json!(-0.0)), "0");
        assert_eq!(canonical(json!(1e300)), "1e300");
    }

    #[test]
    fn keys_ignore_key_order_and_number_spelling() {
        let a: Value =
            serde_json::from_str(r#"{"temperature": 0, "prompt": "hi", "n_predict": 8}"#).unwrap();
        let b: Value =
            serde_json::from_str(r#"{"n_predict": 8.0, "prompt": "hi", "temperature": 0.0}"#)
                .unwrap();
        assert_eq!(
            cache_key("/completion", 3, 0, &a),
            cache_key("/completion", 3, 0, &b)
        );
        // The epoch, the path and every value are part of the key.
        assert_ne!(
            cache_key("/completion", 3, 0, &a),
            cache_key("/completion", 4, 0, &a)
        );
        assert_ne!(
            cache_key("/completion", 3, 0, &a),
            cache_key("/v1/completions", 3, 0, &a)
        );
        assert_ne!(
            cache_key("/completion", 3, 0, &a),
            cache_key("/completion", 3, 1, &a)
        );
        let c: Value =
            serde_json::from_str(r#"{"temperature": 0, "prompt": "hi ", "n_predict": 8}"#).unwrap();
        assert_ne!(
            cache_key("/completion", 3, 0, &a),
            cache_key("/completion", 3, 0, &c)
        );
    }

    #[test]
    fn determinism() {
        let check = |text: &str, expected: bool| {
            let value: Value = serde_json::from_str(text).unwrap();
            let map = value.as_object().unwrap();
            assert_eq!(is_deterministic(map), expected, "{text}");
        };
        check(r#"{"temperature": 0}"#, true);
        check(r#"{"temperature": 0.0}"#, true);
        check(r#"{"temperature": 0.7}"#, false);
        check(r#"{}"#, false);
        check(r#"{"seed": 42, "temperature": 1}"#, true);
        check(r#"{"seed": -1}"#, false);
        check(r#"{"seed": 4294967295}"#, false);
        check(r#"{"seed": "42"}"#, false);
        check(r#"{"temperature": "0"}"#, false);
    }
}
