//! server-tier: an OpenAI-compatible proxy with hooks and a live admin API.
//!
//! The proxy sits in front of llama.cpp's `llama-server` (or any OpenAI-compatible
//! server). It forwards `/v1/chat/completions`, `/v1/completions`, `/completion`,
//! `/v1/models`, `/health` and every other path over pooled upstream connections, and
//! runs the generation requests through the [`ServerPatcher`] hooks of a
//! [`RulePatcher`]: parameter set / override / clamp, system-prompt injection, logit
//! bias, redaction of whole and streamed text (matches that straddle chunks included)
//! and early stream termination. Deterministic requests (temperature 0 or a seed) can be
//! answered from a response cache whose keys carry the model's patch epoch, so no answer
//! computed before a live patch is served after it. Cacheable answers carry an
//! `x-hotpatch-cache: hit | miss | bypass` header (`Cache-Control: no-cache` bypasses).
//!
//! The admin API (`/admin`, behind a bearer token) edits rules and the cache, and patches
//! the model file the upstream server maps, live, through memory-tier: apply, revert,
//! temporary patches, locked byte ranges and drain-and-patch. After every live patch and
//! revert it erases the upstream's prompt caches (see [`Proxy`]). `GET /metrics` serves
//! Prometheus text.
//!
//! It is the only crate that speaks HTTP. It never prints, and binds only the address it
//! is given.
//!
//! ```no_run
//! # async fn run() -> server_tier::Result<()> {
//! use server_tier::{AdminAccess, Proxy, ProxyConfig, RuleSet};
//!
//! let rules = RuleSet::from_toml_str(
//!     r#"
//! [[rule]]
//! name = "cool"
//! action = { type = "clamp", key = "temperature", max = 0.5 }
//! "#,
//! )?;
//! let mut config = ProxyConfig::new("http://127.0.0.1:8080", "127.0.0.1:0".parse().unwrap());
//! config.rules = rules;
//! config.admin = AdminAccess::Token("secret".into());
//! let proxy = Proxy::bind(config).await?;
//! println!("listening on {}", proxy.local_addr());
//! proxy.control().set_rule_enabled("cool", false)?;
//! proxy.shutdown().await?;
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod admin;
mod cache;
mod conn;
mod error;
mod fleet;
mod openapi;
mod patcher;
mod proxy;
mod redact;
pub mod rules;
mod stats;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

pub use error::{Error, Result};
pub use fleet::{FleetGauges, LiveApplied};
pub use patcher::{
    ChunkFlow, GenerationRequest, ResponsePlan, RulePatcher, ServerPatcher, StreamState,
};
pub use rules::{CacheSettings, Rule, RuleSet};
pub use stats::{HookCounts, RuleCounts, StatsSnapshot};
pub use tls::TlsFiles;

use proxy::Shared;

/// Who may use the admin API.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum AdminAccess {
    /// No admin API: `/admin` answers 404.
    #[default]
    Disabled,
    /// Requests must carry `Authorization: Bearer <token>` (compared in constant time).
    Token(String),
    /// No token, allowed only when the proxy listens on a loopback address.
    InsecureLoopback,
}

/// Limits and timeouts of the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body accepted (413 beyond).
    pub body_limit: usize,
    /// Largest whole upstream response the proxy reads when it must look at it.
    pub upstream_body_limit: usize,
    /// Time to connect to the upstream server (502 beyond).
    pub connect_timeout: Duration,
    /// Time from sending a request to the upstream's response head (504 beyond); also
    /// bounds reading a whole response.
    pub upstream_timeout: Duration,
    /// Longest silence inside a streamed response before it is cut.
    pub stream_idle_timeout: Duration,
    /// Longest wait for in-flight requests in a drain-and-patch (409 beyond, nothing
    /// applied).
    pub drain_timeout: Duration,
    /// Longest time a client may take to send a whole request head (counted from its
    /// connection, or from the end of the previous response on a kept-alive one);
    /// the connection is closed beyond.
    pub header_read_timeout: Duration,
    /// Longest time a kept-alive connection may sit with no request before it is closed.
    pub idle_timeout: Duration,
    /// Most connections open at once; past it a new connection is answered 503.
    pub max_connections: usize,
}

impl Default for Limits {
    /// 8 MiB requests, 64 MiB responses, 5 s to connect, 600 s to the response head,
    /// 120 s of stream silence, 30 s of drain, 30 s to send a request head, 60 s of
    /// keep-alive idleness, 512 connections (half a common file limit of 1,024, since
    /// each client connection may hold an upstream one too).
    fn default() -> Limits {
        Limits {
            body_limit: 8 << 20,
            upstream_body_limit: 64 << 20,
            connect_timeout: Duration::from_secs(5),
            upstream_timeout: Duration::from_secs(600),
            stream_idle_timeout: Duration::from_secs(120),
            drain_timeout: Duration::from_secs(30),
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
            max_connections: 512,
        }
    }
}

/// Everything a proxy needs to start.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// The upstream server's base URL (`http://host:port` or `https://host:port`,
    /// optionally with a path prefix).
    pub upstream: String,
    /// TLS to an `https://` upstream: `ca` to trust instead of the system's roots, and a
    /// client certificate to present.
    pub upstream_tls: TlsFiles,
    /// TLS on the listening side: the certificate and key to serve (`ca` to require client
    /// certificates). [`Proxy::reload_tls`] reads the files again.
    pub tls: Option<TlsFiles>,
    /// Let the admin API take its bearer token over plain HTTP on a non-loopback address
    /// (refused by default, with the reason, since anyone on the path could read it).
    pub admin_allow_plaintext: bool,
    /// Where to listen.
    pub listen: SocketAddr,
    /// The GGUF file the upstream server maps, for live patches (attached shared); a
    /// shard of a set attaches every shard of it.
    pub model: Option<PathBuf>,
    /// The rules, and the cache settings when the set has them.
    pub rules: RuleSet,
    /// Admin API access.
    pub admin: AdminAccess,
    /// Limits and timeouts.
    pub limits: Limits,
    /// After the first live patch, send `"cache_prompt": false` with every generation
    /// request: llama-server's host-memory prompt cache (`--cache-ram`, on by default)
    /// keeps states computed with old weights and cannot be cleared over HTTP. On by
    /// default; turn it off only for an upstream started with `--cache-ram 0`.
    pub guard_prompt_cache: bool,
    /// Check that [`ProxyConfig::model`] is the file the upstream serves (its
    /// `GET /props` `model_path`: the same file, or the same header and tensor table
    /// when that path is not visible here), at start and before every live patch. On by
    /// default; without it every patch reply says the model was not verified.
    pub verify_model: bool,
    /// The control socket of the agent inside the upstream llama-server (started with
    /// `hotpatch launch`): every live patch and revert then also reaches the weights the
    /// server holds as copies (repacked, GPU, remote), and is journaled into `model`.
    pub agent: Option<PathBuf>,
    /// Answer generation requests 503 with this reason from the start, until
    /// [`Control::hold_generation`] lifts it (a fleet member converging first).
    pub hold_generation: Option<String>,
}

impl ProxyConfig {
    /// A configuration with no rules, no model, no admin API and default limits.
    pub fn new(upstream: impl Into<String>, listen: SocketAddr) -> ProxyConfig {
        ProxyConfig {
            upstream: upstream.into(),
            upstream_tls: TlsFiles::default(),
            tls: None,
            admin_allow_plaintext: false,
            listen,
            model: None,
            rules: RuleSet::default(),
            admin: AdminAccess::Disabled,
            limits: Limits::default(),
            guard_prompt_cache: true,
            verify_model: true,
            agent: None,
            hold_generation: None,
        }
    }
}

/// A running proxy. Dropping it without [`Proxy::shutdown`] stops it abruptly.
///
/// Live patches: after each apply and revert the proxy erases every slot's prompt cache
/// on the upstream llama-server (`POST /slots/{id}?action=erase`, which llama-server
/// allows only when started with `--slot-save-path DIR`) and, with
/// [`ProxyConfig::guard_prompt_cache`], sends `"cache_prompt": false` from then on. The
/// admin API's reply says what was done.
#[derive(Debug)]
pub struct Proxy {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    tls: Option<tls::TlsAcceptor>,
}

impl Proxy {
    /// Binds the listener, attaches the model (when given) and starts serving on the
    /// current tokio runtime.
    pub async fn bind(config: ProxyConfig) -> Result<Proxy> {
        if config.admin == AdminAccess::InsecureLoopback && !config.listen.ip().is_loopback() {
            return Err(Error::Config(format!(
                "an admin API without a token may listen only on a loopback address, not {}",
                config.listen
            )));
        }
        if let AdminAccess::Token(token) = &config.admin
            && token.trim().is_empty()
        {
            return Err(Error::Config("the admin token is empty".into()));
        }
        if config.limits.header_read_timeout.is_zero()
            || config.limits.idle_timeout.is_zero()
            || config.limits.max_connections == 0
        {
            return Err(Error::Config(
                "the header-read timeout, the idle timeout and the connection limit must be \
                 above zero"
                    .into(),
            ));
        }
        let shared = Arc::new(Shared::new(&config)?);
        if shared.model.is_some() && shared.verify_model {
            admin::verify_model(&shared).await?;
        }
        admin::rearm_temporary_patches(&shared).await?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| Error::Io {
                action: format!("bind {}", config.listen),
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| Error::Io {
            action: "read the listening address".into(),
            source,
        })?;
        if let Some(model) = &shared.model {
            model.describe_writer(&format!(
                "hotpatch serve, admin API at http://{local_addr}/admin: send patches there with --server http://{local_addr} --admin-token-file FILE"
            ))?;
        }
        let router = proxy::router(Arc::clone(&shared));
        let (sender, receiver) = tokio::sync::oneshot::channel::<()>();
        let limits = config.limits;
        let admin = conn::AdminPolicy {
            token: matches!(config.admin, AdminAccess::Token(_)),
            allow_plaintext: config.admin_allow_plaintext,
        };
        let tls = config.tls.clone().map(tls::TlsAcceptor::new).transpose()?;
        let server = match &tls {
            Some(acceptor) => tokio::spawn(conn::serve(
                listener,
                router,
                limits,
                acceptor.clone(),
                admin,
                receiver,
            )),
            None => tokio::spawn(conn::serve(
                listener,
                router,
                limits,
                conn::PlainAcceptor,
                admin,
                receiver,
            )),
        };
        Ok(Proxy {
            local_addr,
            shared,
            shutdown: Some(sender),
            server,
            tls,
        })
    }

    /// Whether it serves TLS.
    pub fn serves_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Reads the listener's certificate and key files again (after a renewal); new
    /// connections get the new certificate, open ones keep theirs. On an error the
    /// certificate in use stays. Without TLS it does nothing.
    pub fn reload_tls(&self) -> Result<()> {
        match &self.tls {
            Some(acceptor) => acceptor.reload(),
            None => Ok(()),
        }
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A handle to change rules and the cache while it runs.
    pub fn control(&self) -> Control {
        Control {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Stops accepting connections, lets open ones finish (at most 10 s), then reverts
    /// temporary patches that have not expired. Permanent live patches stay in the file
    /// (they are journaled; `hotpatch revert` undoes them).
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(sender) = self.shutdown.take() {
            let _ = sender.send(());
        }
        let finished = tokio::time::timeout(Duration::from_secs(10), &mut self.server).await;
        if finished.is_err() {
            self.server.abort();
        }
        let failures = admin::revert_temporary_patches(&self.shared).await;
        if !failures.is_empty() {
            return Err(Error::Config(format!(
                "temporary patches could not be reverted at shutdown (the journal keeps their expiry; the next start reverts them): {}",
                failures.join("; ")
            )));
        }
        match finished {
            Ok(Ok(Ok(()))) | Err(_) => Ok(()),
            Ok(Ok(Err(source))) => Err(Error::Io {
                action: "serve".into(),
                source,
            }),
            Ok(Err(join)) => Err(Error::Task(join.to_string())),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.shutdown.is_some() {
            self.server.abort();
        }
    }
}

/// Changes a running proxy's rules and cache in process, as the admin API does.
#[derive(Clone, Debug)]
pub struct Control {
    shared: Arc<Shared>,
}

impl Control {
    /// The current rules and cache settings.
    pub fn rules(&self) -> RuleSet {
        self.shared.rule_set()
    }

    /// Appends a rule (refused when its name is taken).
    pub fn add_rule(&self, rule: Rule) -> Result<()> {
        self.shared.edit_rules(|set| set.push(rule))
    }

    /// Replaces the rule named `name`.
    pub fn replace_rule(&self, name: &str, rule: Rule) -> Result<()> {
        self.shared.edit_rules(|set| set.replace(name, rule))
    }

    /// Removes the rule named `name`.
    pub fn remove_rule(&self, name: &str) -> Result<Rule> {
        let mut removed = None;
        self.shared.edit_rules(|set| {
            removed = Some(set.remove(name)?);
            Ok(())
        })?;
        removed.ok_or_else(|| Error::NoSuchRule(name.to_owned()))
    }

    /// Enables or disables the rule named `name`.
    pub fn set_rule_enabled(&self, name: &str, enabled: bool) -> Result<()> {
        self.shared.edit_rules(|set| set.set_enabled(name, enabled))
    }

    /// Replaces every rule at once (the set's cache settings apply when it has some).
    pub fn replace_rules(&self, rules: RuleSet) -> Result<()> {
        let cache = rules.cache;
        self.shared.edit_rules(|set| {
            *set = rules;
            Ok(())
        })?;
        if let Some(cache) = cache {
            self.set_cache(cache)?;
        }
        Ok(())
    }

    /// The cache settings.
    pub fn cache(&self) -> CacheSettings {
        self.shared.cache.load().settings
    }

    /// Changes the cache settings (the cache starts empty).
    pub fn set_cache(&self, settings: CacheSettings) -> Result<()> {
        self.shared.set_cache(settings)
    }

    /// Advances the model's patch epoch and empties the cache: call it after changing the
    /// upstream's weights by other means than this proxy.
    pub fn bump_epoch(&self) -> u64 {
        self.shared.bump_epoch()
    }

    /// The model's patch epoch.
    pub fn epoch(&self) -> u64 {
        self.shared.epoch.load(Ordering::Acquire)
    }

    /// Statistics per hook and rule, and the proxy's counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }
}
