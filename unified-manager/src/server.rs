//! The manager's link to a server tier proxy: an HTTP client of a running `hotpatch
//! serve` admin API, and the default rules the safety pipeline adds.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
pub use server_tier::rules::{Action, Rule};

use crate::error::{Error, Result};
use crate::safety::ServerDefaults;

/// What the manager asks of a server: its rules and its response cache.
pub trait ServerLink: Send + Sync + fmt::Debug {
    /// The rules, in order.
    fn rules(&self) -> Result<Vec<Rule>>;
    /// Appends a rule (refused when the name is taken).
    fn add_rule(&self, rule: Rule) -> Result<()>;
    /// Removes the rule with this name.
    fn remove_rule(&self, name: &str) -> Result<()>;
    /// Whether the response cache is on.
    fn cache_enabled(&self) -> Result<bool>;
    /// Turns the response cache on or off.
    fn set_cache_enabled(&self, enabled: bool) -> Result<()>;
}

/// The rules the safety pipeline adds: a cap on requested tokens (`max_tokens` of the
/// OpenAI routes and `n_predict` of llama-server's `/completion`) and one literal
/// redaction per listed string.
pub fn default_safety_rules(defaults: &ServerDefaults) -> Vec<Rule> {
    let clamp = |name: &str, key: &str| Rule {
        name: name.to_owned(),
        enabled: true,
        paths: None,
        model: None,
        action: Action::Clamp {
            key: key.to_owned(),
            min: None,
            max: Some(defaults.max_tokens as f64),
        },
    };
    let mut rules = vec![
        clamp("safety-max-tokens", "max_tokens"),
        clamp("safety-n-predict", "n_predict"),
    ];
    for (i, text) in defaults.redact.iter().enumerate() {
        rules.push(Rule {
            name: format!("safety-redact-{}", i + 1),
            enabled: true,
            paths: None,
            model: None,
            action: Action::Redact {
                pattern: text.clone(),
                regex: false,
                replacement: Some("[redacted]".to_owned()),
                mask: None,
            },
        });
    }
    rules
}

/// A client of a running proxy's admin API (`/admin/...`), authenticated with a bearer
/// token: plain HTTP on loopback, or HTTPS (rustls) to a `hotpatch serve --tls-cert`,
/// trusting the system's root certificates and, with [`AdminClient::with_ca`], a
/// private CA's.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminClient")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .finish()
    }
}

impl AdminClient {
    /// A client of the proxy at `base` (`http://127.0.0.1:8081`, or `https://...`
    /// with a certificate the system's roots vouch for).
    pub fn new(base: &str, token: Option<String>) -> AdminClient {
        AdminClient::build(base, token, Vec::new())
    }

    /// A client of the proxy at `base` that also trusts the CA certificates (PEM) in
    /// `ca`: for a proxy serving HTTPS with a certificate a private CA signed.
    pub fn with_ca(base: &str, token: Option<String>, ca: &Path) -> Result<AdminClient> {
        let unreadable =
            |reason: String| Error::Server(format!("CA file {}: {reason}", ca.display()));
        let pem = std::fs::read(ca).map_err(|e| unreadable(e.to_string()))?;
        let mut certs = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            if let ureq::tls::PemItem::Certificate(cert) =
                item.map_err(|e| unreadable(e.to_string()))?
            {
                certs.push(cert);
            }
        }
        if certs.is_empty() {
            return Err(unreadable("it holds no PEM certificate".into()));
        }
        Ok(AdminClient::build(base, token, certs))
    }

    fn build(
        base: &str,
        token: Option<String>,
        extra_roots: Vec<ureq::tls::Certificate<'static>>,
    ) -> AdminClient {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)));
        // The system's roots are read only for an HTTPS proxy; a certificate that does
        // not load is skipped, as rustls-native-certs reports it and others do.
        if base.starts_with("https://") {
            let mut roots: Vec<ureq::tls::Certificate<'static>> =
                rustls_native_certs::load_native_certs()
                    .certs
                    .iter()
                    .map(|der| ureq::tls::Certificate::from_der(der.as_ref()).to_owned())
                    .collect();
            roots.extend(extra_roots);
            let tls = ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
                .unversioned_rustls_crypto_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .build();
            config = config.tls_config(tls);
        }
        AdminClient {
            base: base.trim_end_matches('/').to_owned(),
            token,
            agent: config.build().into(),
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base);
        let failed = |e: ureq::Error| Error::Server(format!("{method} {url}: {e}"));
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut response = match (method, body) {
            ("GET", _) => {
                let mut request = self.agent.get(&url);
                if let Some(auth) = &auth {
                    request = request.header("Authorization", auth);
                }
                request.call().map_err(failed)?
            }
            ("DELETE", _) => {
                let mut request = self.agent.delete(&url);
                if let Some(auth) = &auth {
                    request = request.header("Authorization", auth);
                }
                request.call().map_err(failed)?
            }
            (_, body) => {
                let mut request = if method == "PUT" {
                    self.agent.put(&url)
                } else {
                    self.agent.post(&url)
                };
                if let Some(auth) = &auth {
                    request = request.header("Authorization", auth);
                }
                request
                    .send_json(body.unwrap_or(Value::Null))
                    .map_err(failed)?
            }
        };
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| Error::Server(format!("{method} {url}: {e}")))?;
        if !status.is_success() {
            let reason = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("error").cloned())
                .map_or(text.clone(), |e| match e {
                    Value::String(s) => s,
                    Value::Object(o) => o
                        .get("message")
                        .and_then(Value::as_str)
                        .map_or_else(|| Value::Object(o.clone()).to_string(), str::to_owned),
                    other => other.to_string(),
                });
            return Err(Error::Server(format!(
                "{method} {path}: {status}: {reason}"
            )));
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text)
            .map_err(|e| Error::Server(format!("{method} {path}: the answer is not JSON: {e}")))
    }
}

impl AdminClient {
    /// Applies a live patch through the proxy (`POST /admin/patches`); the answer is
    /// the proxy's report.
    pub fn apply_patch(&self, body: Value) -> Result<Value> {
        self.call("POST", "/admin/patches", Some(body))
    }

    /// The patches the proxy has applied (`GET /admin/patches`).
    pub fn patches(&self) -> Result<Vec<Value>> {
        match self.call("GET", "/admin/patches", None)? {
            Value::Array(list) => Ok(list),
            other => Err(Error::Server(format!(
                "GET /admin/patches: expected a list, got {other}"
            ))),
        }
    }

    /// Reverts a live patch through the proxy (`DELETE /admin/patches/{id}`).
    pub fn revert_patch(&self, id: &str) -> Result<Value> {
        self.call(
            "DELETE",
            &format!("/admin/patches/{}", encode_segment(id)),
            None,
        )
    }
}

impl ServerLink for AdminClient {
    fn rules(&self) -> Result<Vec<Rule>> {
        let value = self.call("GET", "/admin/rules", None)?;
        let list = value.get("rules").cloned().unwrap_or(value);
        serde_json::from_value(list)
            .map_err(|e| Error::Server(format!("GET /admin/rules: unexpected answer: {e}")))
    }

    fn add_rule(&self, rule: Rule) -> Result<()> {
        let body = serde_json::to_value(&rule)
            .map_err(|e| Error::Server(format!("rule {:?}: {e}", rule.name)))?;
        self.call("POST", "/admin/rules", Some(body)).map(drop)
    }

    fn remove_rule(&self, name: &str) -> Result<()> {
        self.call(
            "DELETE",
            &format!("/admin/rules/{}", encode_segment(name)),
            None,
        )
        .map(drop)
    }

    fn cache_enabled(&self) -> Result<bool> {
        let value = self.call("GET", "/admin/cache", None)?;
        value
            .get("enabled")
            .and_then(Value::as_bool)
            .ok_or_else(|| Error::Server("GET /admin/cache: no `enabled` in the answer".into()))
    }

    fn set_cache_enabled(&self, enabled: bool) -> Result<()> {
        // The answer to GET also reports state (`entries`) that PUT refuses as an
        // unknown field: send back only the settable fields, with their current values.
        let current = self.call("GET", "/admin/cache", None)?;
        let mut settings = serde_json::to_value(server_tier::CacheSettings::default())
            .map_err(|e| Error::Server(format!("encode the cache settings: {e}")))?;
        if let Some(fields) = settings.as_object_mut() {
            for (field, value) in fields.iter_mut() {
                if let Some(now) = current.get(field) {
                    *value = now.clone();
                }
            }
            fields.insert("enabled".to_owned(), json!(enabled));
        }
        self.call("PUT", "/admin/cache", Some(settings)).map(drop)
    }
}

/// Percent-encodes a path segment (rule names may hold any character).
fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A proxy running in this process is controlled directly.
impl ServerLink for server_tier::Control {
    fn rules(&self) -> Result<Vec<Rule>> {
        Ok(server_tier::Control::rules(self).rules().to_vec())
    }

    fn add_rule(&self, rule: Rule) -> Result<()> {
        server_tier::Control::add_rule(self, rule).map_err(|e| Error::Server(e.to_string()))
    }

    fn remove_rule(&self, name: &str) -> Result<()> {
        server_tier::Control::remove_rule(self, name)
            .map(drop)
            .map_err(|e| Error::Server(e.to_string()))
    }

    fn cache_enabled(&self) -> Result<bool> {
        Ok(self.cache().enabled)
    }

    fn set_cache_enabled(&self, enabled: bool) -> Result<()> {
        let mut settings = self.cache();
        settings.enabled = enabled;
        self.set_cache(settings)
            .map_err(|e| Error::Server(e.to_string()))
    }
}
