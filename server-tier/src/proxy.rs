//! The proxy: shared state, the router, forwarding with pooled upstream connections,
//! streamed and whole responses through the hooks, and the response cache.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use http_body::{Body as _, Frame};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

use crate::cache::{
    CacheKey, CachedBody, CachedResponse, MAX_CACHED_BYTES, ResponseCache, cache_key,
    is_deterministic,
};
use crate::patcher::{
    ChunkFlow, CompiledRules, GenerationRequest, ResponsePlan, RulePatcher, ServerPatcher,
    StreamState,
};
use crate::rules::{CacheSettings, GENERATION_PATHS, RuleSet};
use crate::stats::{RouteClass, Stats};
use crate::{AdminAccess, Error, Limits, ProxyConfig, Result};

/// The response header that says how the cache answered.
pub(crate) const CACHE_HEADER: &str = "x-hotpatch-cache";

type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub(crate) type UpstreamClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Where requests go.
#[derive(Debug)]
pub(crate) struct Upstream {
    scheme: http::uri::Scheme,
    authority: http::uri::Authority,
    base_path: String,
}

impl Upstream {
    fn parse(url: &str) -> Result<Upstream> {
        let uri: Uri = url
            .parse()
            .map_err(|e| Error::Config(format!("upstream {url:?}: {e}")))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or_else(|| Error::Config(format!("upstream {url:?}: no scheme (http://...)")))?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(Error::Config(format!(
                "upstream {url:?}: only http:// and https:// upstreams are supported"
            )));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| Error::Config(format!("upstream {url:?}: no host")))?;
        Ok(Upstream {
            scheme,
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }

    pub(crate) fn uri(&self, path_and_query: &str) -> Result<Uri> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(format!("{}{path_and_query}", self.base_path))
            .build()
            .map_err(|e| Error::BadRequest(format!("request target: {e}")))
    }
}

/// The admin token, hashed so that comparing it takes the same time whatever its length.
#[derive(Debug)]
pub(crate) enum AdminAuth {
    Disabled,
    Token([u8; 32]),
    Open,
}

/// State shared by every request.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) upstream: Upstream,
    pub(crate) client: UpstreamClient,
    pub(crate) limits: Limits,
    pub(crate) patcher: RulePatcher,
    rule_set: Mutex<RuleSet>,
    pub(crate) cache: ArcSwap<ResponseCache>,
    /// The model's patch state: every live patch and revert advances it.
    pub(crate) epoch: AtomicU64,
    /// Advances with every rule change: response rules change answers, so they are part
    /// of the cache key.
    pub(crate) rules_generation: AtomicU64,
    /// Live patches and reverts done through this proxy.
    pub(crate) live_changes: AtomicU64,
    pub(crate) guard_prompt_cache: bool,
    /// Requests hold it shared for their whole life; a drain takes it exclusively.
    pub(crate) gate: Arc<RwLock<()>>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) admin: AdminAuth,
    pub(crate) model: Option<Arc<memory_tier::LiveSet>>,
    /// The patcher over the upstream's agent, when there is one: it owns `model`.
    pub(crate) agent: Option<Arc<memory_tier::AgentModel>>,
    /// Whether the model file must be checked against the one the upstream serves.
    pub(crate) verify_model: bool,
    pub(crate) model_ops: tokio::sync::Mutex<crate::admin::ModelOps>,
    /// Why generation requests are answered 503 now (none: they are served).
    pub(crate) generation_hold: Mutex<Option<String>>,
    /// The fleet's gauges for `GET /metrics`, when the proxy is a fleet member.
    pub(crate) fleet: Mutex<Option<crate::fleet::FleetGauges>>,
}

impl Shared {
    pub(crate) fn new(config: &ProxyConfig) -> Result<Shared> {
        let upstream = Upstream::parse(&config.upstream)?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.limits.connect_timeout));
        connector.set_nodelay(true);
        let connector = crate::tls::upstream_connector(
            connector,
            upstream.scheme == http::uri::Scheme::HTTPS,
            &config.upstream_tls,
        )?;
        let client = Client::builder(TokioExecutor::new())
            // Below the 5 s keep-alive of llama-server's HTTP library, so that the pool
            // rarely hands out a connection the upstream is closing.
            .pool_idle_timeout(Duration::from_secs(4))
            .pool_max_idle_per_host(256)
            .build(connector);
        let stats = Arc::new(Stats::default());
        let compiled = CompiledRules::compile(config.rules.rules(), &stats)?;
        config.rules.validate()?;
        let cache_settings = config.rules.cache.unwrap_or_default();
        cache_settings.validate()?;
        let admin = match &config.admin {
            AdminAccess::Disabled => AdminAuth::Disabled,
            AdminAccess::Token(token) => AdminAuth::Token(crate::admin::token_digest(token.trim())),
            AdminAccess::InsecureLoopback => AdminAuth::Open,
        };
        let (model, agent) = match (&config.model, &config.agent) {
            (Some(path), Some(socket)) => {
                if byte_tier::split::open_set_of(path)?.is_some() {
                    return Err(Error::Config(format!(
                        "{} is a shard of a set, and the agent patches one file: serve the \
                         set without --agent (its patches reach the mapped shards), or a \
                         single file with it",
                        path.display()
                    )));
                }
                let agent = memory_tier::AgentModel::attach(path, socket, true)?;
                let model = memory_tier::LiveSet::of(Arc::clone(agent.live()));
                (Some(Arc::new(model)), Some(Arc::new(agent)))
            }
            (Some(path), None) => (
                Some(Arc::new(memory_tier::LiveSet::attach(
                    path,
                    memory_tier::AttachMode::Shared,
                )?)),
                None,
            ),
            (None, Some(_)) => {
                return Err(Error::Config(
                    "--agent needs --model: the file the server loaded, whose bytes are the undo"
                        .into(),
                ));
            }
            (None, None) => (None, None),
        };
        Ok(Shared {
            upstream,
            client,
            limits: config.limits,
            patcher: RulePatcher::new(compiled, Arc::clone(&stats)),
            rule_set: Mutex::new(config.rules.clone()),
            cache: ArcSwap::from_pointee(ResponseCache::new(cache_settings)),
            epoch: AtomicU64::new(0),
            rules_generation: AtomicU64::new(0),
            live_changes: AtomicU64::new(0),
            guard_prompt_cache: config.guard_prompt_cache,
            gate: Arc::new(RwLock::new(())),
            stats,
            admin,
            model,
            agent,
            verify_model: config.verify_model,
            model_ops: tokio::sync::Mutex::new(crate::admin::ModelOps::default()),
            generation_hold: Mutex::new(config.hold_generation.clone()),
            fleet: Mutex::new(None),
        })
    }

    pub(crate) fn rule_set(&self) -> RuleSet {
        let mut set = self
            .rule_set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        set.cache = Some(self.cache.load().settings);
        set
    }

    /// Edits the rules under the lock, checks and compiles the result, then publishes it;
    /// a failed edit changes nothing.
    pub(crate) fn edit_rules(&self, edit: impl FnOnce(&mut RuleSet) -> Result<()>) -> Result<()> {
        let mut current = self.rule_set.lock().unwrap_or_else(|p| p.into_inner());
        let mut next = current.clone();
        edit(&mut next)?;
        next.validate()?;
        let compiled = CompiledRules::compile(next.rules(), &self.stats)?;
        self.patcher.store(compiled);
        self.rules_generation.fetch_add(1, Ordering::AcqRel);
        self.cache.load().entries.invalidate_all();
        *current = next;
        Ok(())
    }

    pub(crate) fn set_cache(&self, settings: CacheSettings) -> Result<()> {
        settings.validate()?;
        let old = self.cache.swap(Arc::new(ResponseCache::new(settings)));
        old.entries.invalidate_all();
        Ok(())
    }

    pub(crate) fn bump_epoch(&self) -> u64 {
        let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
        self.cache.load().entries.invalidate_all();
        epoch
    }
}

/// The router: `/metrics`, `/admin/...` and everything else proxied.
pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", axum::routing::get(metrics))
        .nest("/admin", crate::admin::router(Arc::clone(&shared)))
        .fallback(proxy)
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let start = Instant::now();
    let cache = shared.cache.load();
    let mut text = shared.stats.prometheus(
        shared.epoch.load(Ordering::Acquire),
        cache.entries.entry_count(),
    );
    crate::fleet::prometheus(&shared, &mut text);
    let response = (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response();
    shared
        .stats
        .observe(RouteClass::Metrics, 200, start.elapsed());
    response
}

async fn proxy(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let start = Instant::now();
    let route = RouteClass::of(request.uri().path());
    let response = match forward(&shared, request).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    shared
        .stats
        .observe(route, response.status().as_u16(), start.elapsed());
    response
}

/// A proxied request in flight: holds the drain gate and the in-flight count until the
/// response body is done or dropped.
#[derive(Debug)]
pub(crate) struct InFlight {
    _gate: OwnedRwLockReadGuard<()>,
    stats: Arc<Stats>,
}

impl InFlight {
    async fn enter(shared: &Shared) -> InFlight {
        let gate = Arc::clone(&shared.gate).read_owned().await;
        shared.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            _gate: gate,
            stats: Arc::clone(&shared.stats),
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads a body up to `limit` bytes: 413 beyond, 400 when it breaks off.
pub(crate) async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes> {
    if let Some(length) = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        && length > limit as u64
    {
        return Err(Error::TooLarge { limit });
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(error) if error.downcast_ref::<LengthLimitError>().is_some() => {
            Err(Error::TooLarge { limit })
        }
        Err(error) => Err(Error::BadRequest(format!("reading the body: {error}"))),
    }
}

/// Refuses a body whose declared type is not JSON (a missing type is taken as JSON).
pub(crate) fn require_json(headers: &HeaderMap) -> Result<()> {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or("").trim().to_ascii_lowercase();
    let essence = text.split(';').next().unwrap_or("").trim();
    if essence == "application/json" || essence.ends_with("+json") {
        Ok(())
    } else {
        Err(Error::UnsupportedMediaType(text))
    }
}

fn asks_no_cache(headers: &HeaderMap) -> bool {
    headers.get_all(CACHE_CONTROL).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.to_ascii_lowercase().contains("no-cache")
                || s.to_ascii_lowercase().contains("no-store")
        })
    })
}

/// Headers that belong to one connection and are never forwarded.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CacheOutcome {
    Hit,
    Miss,
    Bypass,
}

impl CacheOutcome {
    fn header(self) -> HeaderValue {
        HeaderValue::from_static(match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Bypass => "bypass",
        })
    }
}

/// Where a response is recorded for the cache.
struct Recorder {
    key: CacheKey,
    cache: Arc<ResponseCache>,
    status: u16,
    content_type: Option<HeaderValue>,
    chunks: Vec<Bytes>,
    bytes: usize,
}

impl Recorder {
    fn record(&mut self, chunk: &Bytes) -> bool {
        self.bytes += chunk.len();
        self.chunks.push(chunk.clone());
        self.bytes <= MAX_CACHED_BYTES
    }

    async fn store(self, streamed: bool) {
        let body = if streamed {
            CachedBody::Stream(self.chunks)
        } else {
            CachedBody::Whole(self.chunks.into_iter().next().unwrap_or_default())
        };
        let entry = Arc::new(CachedResponse {
            status: self.status,
            content_type: self.content_type,
            body,
        });
        self.cache.entries.insert(self.key, entry).await;
    }
}

async fn forward(shared: &Arc<Shared>, request: Request) -> Result<Response> {
    let in_flight = InFlight::enter(shared).await;
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_owned();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or_else(|| path.clone(), |pq| pq.as_str().to_owned());
    let bytes = read_body(&parts.headers, body, shared.limits.body_limit).await?;
    let generation = parts.method == Method::POST
        && (GENERATION_PATHS.contains(&path.as_str()) || shared.patcher.any_rule_for(&path));
    if generation {
        crate::fleet::check_hold(shared)?;
    }
    if !generation {
        let upstream = send(
            shared,
            &parts.method,
            &path_and_query,
            &parts.headers,
            bytes,
        )
        .await?;
        return Ok(passthrough(shared, upstream, None, in_flight));
    }

    require_json(&parts.headers)?;
    let mut value: Value = serde_json::from_slice(&bytes)
        .map_err(|e| Error::BadRequest(format!("malformed JSON: {e}")))?;
    let Value::Object(body) = &mut value else {
        return Err(Error::BadRequest("the body must be a JSON object".into()));
    };
    // Read before the rules snapshot and before the upstream computes anything, so that
    // an answer is never keyed with a state newer than the one that produced it.
    let epoch = shared.epoch.load(Ordering::Acquire);
    let rules_generation = shared.rules_generation.load(Ordering::Acquire);
    let plan = shared
        .patcher
        .pre_request(&mut GenerationRequest { path: &path, body });
    let mut changed = plan.request_changed;
    if shared.guard_prompt_cache
        && shared.live_changes.load(Ordering::Acquire) > 0
        && body.get("cache_prompt") != Some(&Value::Bool(false))
    {
        body.insert("cache_prompt".into(), Value::Bool(false));
        changed = true;
    }

    // The cache: deterministic requests only, keyed with the epoch read now.
    let cache = shared.cache.load_full();
    let mut outcome = None;
    let mut key = None;
    if cache.settings.enabled && is_deterministic(body) {
        if asks_no_cache(&parts.headers) {
            shared.stats.cache_bypasses.fetch_add(1, Ordering::Relaxed);
            outcome = Some(CacheOutcome::Bypass);
        } else {
            let k = cache_key(&path, epoch, rules_generation, &value);
            if let Some(hit) = cache.entries.get(&k).await {
                shared.stats.cache_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(replay(&hit));
            }
            shared.stats.cache_misses.fetch_add(1, Ordering::Relaxed);
            outcome = Some(CacheOutcome::Miss);
            key = Some(k);
        }
    }

    let body_bytes = if changed {
        Bytes::from(serde_json::to_vec(&value).map_err(|e| Error::BadRequest(e.to_string()))?)
    } else {
        bytes
    };
    let upstream = send(
        shared,
        &parts.method,
        &path_and_query,
        &parts.headers,
        body_bytes,
    )
    .await?;
    let status = upstream.status();
    let is_stream = upstream
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let recorder = key
        .filter(|_| status == StatusCode::OK)
        .map(|key| Recorder {
            key,
            cache,
            status: status.as_u16(),
            content_type: upstream.headers().get(CONTENT_TYPE).cloned(),
            chunks: Vec::new(),
            bytes: 0,
        });
    if is_stream {
        if !plan.filters_response() && recorder.is_none() {
            return Ok(passthrough(shared, upstream, outcome, in_flight));
        }
        return Ok(filtered_stream(
            shared, upstream, plan, recorder, outcome, in_flight,
        ));
    }
    if !plan.filters_response() && recorder.is_none() {
        return Ok(passthrough(shared, upstream, outcome, in_flight));
    }
    whole(shared, upstream, &plan, recorder, outcome).await
}

/// Whether a failed exchange broke on a pooled connection the upstream had closed (it
/// closes idle keep-alive connections on its own schedule): the request was not
/// processed, so one retry on a fresh connection is safe.
fn is_stale_connection(error: &hyper_util::client::legacy::Error) -> bool {
    if error.is_connect() {
        return false;
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(hyper_error) = cause.downcast_ref::<hyper::Error>()
            && (hyper_error.is_incomplete_message() || hyper_error.is_canceled())
        {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            )
        {
            return true;
        }
        source = cause.source();
    }
    false
}

fn upstream_request(
    shared: &Shared,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<http::Request<Full<Bytes>>> {
    let mut builder = http::Request::builder()
        .method(method.clone())
        .uri(shared.upstream.uri(path_and_query)?);
    if let Some(target) = builder.headers_mut() {
        for (name, value) in headers {
            if !is_hop_by_hop(name) && name != HOST && name != CONTENT_LENGTH {
                target.append(name.clone(), value.clone());
            }
        }
        if !body.is_empty() || method == Method::POST || method == Method::PUT {
            target.insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
    }
    builder
        .body(Full::new(body))
        .map_err(|e| Error::BadRequest(format!("request: {e}")))
}

/// Sends a request upstream over a pooled connection (retried once when the pooled
/// connection turns out to be closed), waiting at most the upstream timeout for the
/// response head.
pub(crate) async fn send(
    shared: &Shared,
    method: &Method,
    path_and_query: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<http::Response<Incoming>> {
    let deadline = tokio::time::Instant::now() + shared.limits.upstream_timeout;
    let mut retried = false;
    shared
        .stats
        .upstream_requests
        .fetch_add(1, Ordering::Relaxed);
    loop {
        let request = upstream_request(shared, method, path_and_query, headers, body.clone())?;
        match tokio::time::timeout_at(deadline, shared.client.request(request)).await {
            Err(_) => {
                shared
                    .stats
                    .upstream_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                return Err(Error::UpstreamTimeout(shared.limits.upstream_timeout));
            }
            Ok(Err(error)) if !retried && is_stale_connection(&error) => {
                retried = true;
                shared
                    .stats
                    .upstream_retries
                    .fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(error)) => {
                shared.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
                let mut message = error.to_string();
                let mut source = std::error::Error::source(&error);
                while let Some(cause) = source {
                    message.push_str(": ");
                    message.push_str(&cause.to_string());
                    source = cause.source();
                }
                return Err(Error::Upstream(message));
            }
            Ok(Ok(response)) => return Ok(response),
        }
    }
}

fn response_head(
    upstream: &http::response::Parts,
    outcome: Option<CacheOutcome>,
    keep_length: bool,
) -> http::response::Builder {
    let mut builder = Response::builder().status(upstream.status);
    if let Some(headers) = builder.headers_mut() {
        for (name, value) in &upstream.headers {
            if !is_hop_by_hop(name) && (keep_length || name != CONTENT_LENGTH) {
                headers.append(name.clone(), value.clone());
            }
        }
        if let Some(outcome) = outcome {
            headers.insert(HeaderName::from_static(CACHE_HEADER), outcome.header());
        }
    }
    builder
}

fn build(builder: http::response::Builder, body: Body) -> Response {
    builder
        .body(body)
        .unwrap_or_else(|e| Error::Upstream(format!("response head: {e}")).into_response())
}

/// The upstream body as it comes, frame by frame, with an idle timeout.
fn passthrough(
    shared: &Arc<Shared>,
    upstream: http::Response<Incoming>,
    outcome: Option<CacheOutcome>,
    in_flight: InFlight,
) -> Response {
    let (parts, incoming) = upstream.into_parts();
    let body = UpstreamBody {
        inner: incoming,
        idle: shared.limits.stream_idle_timeout,
        sleep: Box::pin(tokio::time::sleep(shared.limits.stream_idle_timeout)),
        stats: Arc::clone(&shared.stats),
        ended: false,
        _in_flight: in_flight,
    };
    build(response_head(&parts, outcome, true), Body::new(body))
}

/// An upstream body passed on unchanged; the in-flight guard lives as long as it does.
struct UpstreamBody {
    inner: Incoming,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    stats: Arc<Stats>,
    ended: bool,
    _in_flight: InFlight,
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                let deadline = tokio::time::Instant::now() + this.idle;
                this.sleep.as_mut().reset(deadline);
                if frame.is_none() {
                    this.ended = true;
                }
                Poll::Ready(frame.map(|f| {
                    f.map_err(|e| {
                        this.ended = true;
                        Box::new(e) as BoxError
                    })
                }))
            }
            Poll::Pending => {
                if this.sleep.as_mut().poll(cx).is_ready() {
                    this.ended = true;
                    this.stats.upstream_timeouts.fetch_add(1, Ordering::Relaxed);
                    return Poll::Ready(Some(Err("upstream stream idle timeout".into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if !self.ended && !self.inner.is_end_stream() {
            self.stats
                .client_disconnects
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A whole response, read, filtered and maybe cached.
async fn whole(
    shared: &Arc<Shared>,
    upstream: http::Response<Incoming>,
    plan: &ResponsePlan,
    recorder: Option<Recorder>,
    outcome: Option<CacheOutcome>,
) -> Result<Response> {
    let (parts, incoming) = upstream.into_parts();
    let limit = shared.limits.upstream_body_limit;
    let collected = tokio::time::timeout(
        shared.limits.upstream_timeout,
        Limited::new(incoming, limit).collect(),
    )
    .await;
    let mut bytes = match collected {
        Err(_) => {
            shared
                .stats
                .upstream_timeouts
                .fetch_add(1, Ordering::Relaxed);
            return Err(Error::UpstreamTimeout(shared.limits.upstream_timeout));
        }
        Ok(Err(error)) => {
            shared.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
            return Err(Error::Upstream(format!("reading the response: {error}")));
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    if plan.filters_response()
        && parts.status.is_success()
        && let Ok(mut value) = serde_json::from_slice::<Value>(&bytes)
        && shared.patcher.post_response(plan, &mut value)
        && let Ok(encoded) = serde_json::to_vec(&value)
    {
        bytes = Bytes::from(encoded);
    }
    if let Some(mut recorder) = recorder
        && recorder.record(&bytes)
    {
        recorder.store(false).await;
    }
    let mut head = response_head(&parts, outcome, false);
    if let Some(headers) = head.headers_mut() {
        headers.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    }
    Ok(build(head, Body::from(bytes)))
}

/// A cached answer, as it was sent the first time (streams event by event).
fn replay(entry: &CachedResponse) -> Response {
    let mut builder = Response::builder()
        .status(StatusCode::from_u16(entry.status).unwrap_or(StatusCode::OK))
        .header(
            HeaderName::from_static(CACHE_HEADER),
            CacheOutcome::Hit.header(),
        );
    if let Some(content_type) = &entry.content_type {
        builder = builder.header(CONTENT_TYPE, content_type.clone());
    }
    let body = match &entry.body {
        CachedBody::Whole(bytes) => Body::from(bytes.clone()),
        CachedBody::Stream(chunks) => {
            let chunks: Vec<Result<Bytes, BoxError>> = chunks.iter().cloned().map(Ok).collect();
            Body::from_stream(futures_util::stream::iter(chunks))
        }
    };
    build(builder, body)
}

/// A streamed response through the stream-chunk hook.
struct FilteredStream {
    shared: Arc<Shared>,
    incoming: Option<Incoming>,
    state: Option<StreamState>,
    queue: VecDeque<Bytes>,
    recorder: Option<Recorder>,
    ended: bool,
    _in_flight: InFlight,
}

impl Drop for FilteredStream {
    fn drop(&mut self) {
        if !self.ended {
            self.shared
                .stats
                .client_disconnects
                .fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn filtered_stream(
    shared: &Arc<Shared>,
    upstream: http::Response<Incoming>,
    plan: ResponsePlan,
    recorder: Option<Recorder>,
    outcome: Option<CacheOutcome>,
    in_flight: InFlight,
) -> Response {
    let (parts, incoming) = upstream.into_parts();
    let state = plan.filters_response().then(|| plan.stream_state());
    let stream = FilteredStream {
        shared: Arc::clone(shared),
        incoming: Some(incoming),
        state,
        queue: VecDeque::new(),
        recorder,
        ended: false,
        _in_flight: in_flight,
    };
    let body = futures_util::stream::unfold(stream, |mut s| async move {
        let item = s.next().await?;
        Some((item, s))
    });
    build(
        response_head(&parts, outcome, false),
        Body::from_stream(body),
    )
}

impl FilteredStream {
    /// Stops reading upstream after a failure: counts it with `counter`, and neither
    /// reads nor caches anything more of this stream (a broken stream is not a response
    /// worth replaying).
    fn abandon(&mut self, counter: fn(&Stats) -> &AtomicU64) {
        counter(&self.shared.stats).fetch_add(1, Ordering::Relaxed);
        self.recorder = None;
        self.incoming = None;
        self.ended = true;
    }

    async fn next(&mut self) -> Option<Result<Bytes, BoxError>> {
        loop {
            if let Some(bytes) = self.queue.pop_front() {
                if let Some(recorder) = &mut self.recorder
                    && !recorder.record(&bytes)
                {
                    self.recorder = None;
                }
                return Some(Ok(bytes));
            }
            if self.ended {
                if let Some(recorder) = self.recorder.take() {
                    recorder.store(true).await;
                }
                return None;
            }
            let Some(incoming) = self.incoming.as_mut() else {
                self.ended = true;
                continue;
            };
            let idle = self.shared.limits.stream_idle_timeout;
            let mut out = Vec::new();
            match tokio::time::timeout(idle, incoming.frame()).await {
                Err(_) => {
                    self.abandon(|stats| &stats.upstream_timeouts);
                    let event = serde_json::json!({"error": {
                        "code": "upstream_timeout",
                        "message": format!("the upstream stream was idle for {idle:?}"),
                        "status": 504}});
                    self.queue
                        .push_back(Bytes::from(format!("data: {event}\n\n")));
                }
                Ok(None) => {
                    if let Some(state) = &mut self.state {
                        self.shared.patcher.stream_end(state, &mut out);
                    }
                    self.incoming = None;
                    self.ended = true;
                }
                Ok(Some(Err(error))) => {
                    self.abandon(|stats| &stats.upstream_errors);
                    return Some(Err(Box::new(error)));
                }
                Ok(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    match &mut self.state {
                        Some(state) => {
                            let flow = self.shared.patcher.stream_chunk(state, &data, &mut out);
                            if flow == ChunkFlow::Stop {
                                if state.stopped_early() {
                                    self.shared
                                        .stats
                                        .streams_stopped
                                        .fetch_add(1, Ordering::Relaxed);
                                }
                                // Dropping the upstream body closes its connection, which
                                // makes llama-server stop generating.
                                self.incoming = None;
                                self.ended = true;
                            }
                        }
                        None => out.push(data),
                    }
                }
            }
            self.queue.extend(out);
        }
    }
}
