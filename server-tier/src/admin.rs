//! The admin API under `/admin`: rules, cache, and live patches of the model file the
//! upstream server maps.

use std::collections::HashMap;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{FromRequestParts, Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::header::AUTHORIZATION;
use http::{HeaderMap, Method, StatusCode};
use memory_tier::{LiveModel, LiveSet, MemoryPatch, PatchTarget, Payload, ValueTransform};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::proxy::{AdminAuth, Shared, read_body, require_json};
use crate::rules::{CacheSettings, Rule};
use crate::stats::RouteClass;
use crate::{Error, Result};

/// Admin request bodies are small; this bounds them.
const ADMIN_BODY_LIMIT: usize = 1 << 20;
/// How long erasing the upstream's prompt caches may take.
const ERASE_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Live-patch bookkeeping, behind one lock so that a lock check and the apply it allows
/// cannot interleave with another patch.
#[derive(Debug, Default)]
pub(crate) struct ModelOps {
    locks: Vec<Lock>,
    next_lock: u64,
    temporary: HashMap<Uuid, Temporary>,
    /// Temporary patches whose revert failed when their time came, with why.
    expiry_errors: Vec<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
struct Lock {
    id: u64,
    /// The file of a shard set the range is in (absent for a single file).
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<PathBuf>,
    start: u64,
    end: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    tensor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// The timer that reverts a temporary patch (its expiry is the patch's own, which the
/// journal records).
#[derive(Debug)]
struct Temporary {
    task: tokio::task::AbortHandle,
}

pub(crate) fn router(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    Router::new()
        .route("/rules", get(list_rules).post(add_rule))
        .route(
            "/rules/{name}",
            axum::routing::put(replace_rule).delete(delete_rule),
        )
        .route("/rules/{name}/enable", post(enable_rule))
        .route("/rules/{name}/disable", post(disable_rule))
        .route("/cache", get(get_cache).put(put_cache))
        .route("/tensors", get(tensors))
        .route("/patches", get(patches).post(apply_patch))
        .route("/patches/{id}", axum::routing::delete(revert_patch))
        .route("/history", get(history))
        .route("/stats", get(stats))
        .route("/locks", get(list_locks).post(add_lock))
        .route("/locks/{id}", axum::routing::delete(delete_lock))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared, guard))
}

/// Authentication, and the admin route's metrics.
async fn guard(State(shared): State<Arc<Shared>>, request: Request, next: Next) -> Response {
    let start = std::time::Instant::now();
    let response = match &shared.admin {
        AdminAuth::Disabled => Error::NotFound(
            "the admin API is disabled (start with an admin token or --admin-insecure-loopback)"
                .into(),
        )
        .into_response(),
        AdminAuth::Open => next.run(request).await,
        AdminAuth::Token(expected) => {
            if authorized(request.headers(), expected) {
                next.run(request).await
            } else {
                let mut response = Error::Unauthorized.into_response();
                response.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer"),
                );
                response
            }
        }
    };
    shared.stats.observe(
        RouteClass::Admin,
        response.status().as_u16(),
        start.elapsed(),
    );
    response
}

/// A path segment (a rule name, a patch or lock id); a malformed one is a JSON 400 like
/// every other error.
struct Segment(String);

impl<S: Send + Sync> FromRequestParts<S> for Segment {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut http::request::Parts, state: &S) -> Result<Segment> {
        Path::<String>::from_request_parts(parts, state)
            .await
            .map(|Path(segment)| Segment(segment))
            .map_err(|rejection| Error::BadRequest(rejection.body_text()))
    }
}

fn authorized(headers: &HeaderMap, expected: &[u8; 32]) -> bool {
    let Some(value) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let Some(token) = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
    else {
        return false;
    };
    // Both sides are hashed first, so the comparison takes the same time whatever the
    // lengths, and it is constant-time over the digests.
    token_digest(token.trim()).ct_eq(expected).into()
}

async fn not_found(method: Method, uri: http::Uri) -> Response {
    Error::NotFound(format!("{method} {}", uri.path())).into_response()
}

/// Reads a JSON body into `T`: 415 for another content type, 413 beyond the limit, 400
/// for malformed JSON or unknown fields.
async fn json_body<T: DeserializeOwned>(request: Request) -> Result<T> {
    let (parts, body) = request.into_parts();
    require_json(&parts.headers)?;
    let bytes = read_body(&parts.headers, body, ADMIN_BODY_LIMIT).await?;
    serde_json::from_slice(&bytes).map_err(|e| Error::BadRequest(e.to_string()))
}

fn ok(value: Value) -> Response {
    (StatusCode::OK, axum::Json(value)).into_response()
}

fn created(value: Value) -> Response {
    (StatusCode::CREATED, axum::Json(value)).into_response()
}

fn to_json<T: serde::Serialize>(value: &T) -> Value {
    serde_json::to_value(value).unwrap_or(Value::Null)
}

// ----- rules -----

async fn list_rules(State(shared): State<Arc<Shared>>) -> Response {
    ok(to_json(&shared.rule_set().rules()))
}

async fn add_rule(State(shared): State<Arc<Shared>>, request: Request) -> Result<Response> {
    let (parts, body) = request.into_parts();
    require_json(&parts.headers)?;
    let bytes = read_body(&parts.headers, body, ADMIN_BODY_LIMIT).await?;
    let rule = Rule::from_json_slice(&bytes)?;
    let reply = to_json(&rule);
    shared.edit_rules(|set| set.push(rule))?;
    Ok(created(reply))
}

async fn replace_rule(
    State(shared): State<Arc<Shared>>,
    Segment(name): Segment,
    request: Request,
) -> Result<Response> {
    let (parts, body) = request.into_parts();
    require_json(&parts.headers)?;
    let bytes = read_body(&parts.headers, body, ADMIN_BODY_LIMIT).await?;
    let rule = Rule::from_json_slice(&bytes)?;
    let reply = to_json(&rule);
    shared.edit_rules(|set| set.replace(&name, rule))?;
    Ok(ok(reply))
}

async fn delete_rule(
    State(shared): State<Arc<Shared>>,
    Segment(name): Segment,
) -> Result<Response> {
    let mut removed = None;
    shared.edit_rules(|set| {
        removed = Some(set.remove(&name)?);
        Ok(())
    })?;
    Ok(ok(to_json(&removed)))
}

async fn enable_rule(
    State(shared): State<Arc<Shared>>,
    Segment(name): Segment,
) -> Result<Response> {
    shared.edit_rules(|set| set.set_enabled(&name, true))?;
    Ok(ok(json!({"name": name, "enabled": true})))
}

async fn disable_rule(
    State(shared): State<Arc<Shared>>,
    Segment(name): Segment,
) -> Result<Response> {
    shared.edit_rules(|set| set.set_enabled(&name, false))?;
    Ok(ok(json!({"name": name, "enabled": false})))
}

// ----- cache -----

async fn get_cache(State(shared): State<Arc<Shared>>) -> Response {
    let cache = shared.cache.load();
    let mut value = to_json(&cache.settings);
    value["entries"] = json!(cache.entries.entry_count());
    ok(value)
}

async fn put_cache(State(shared): State<Arc<Shared>>, request: Request) -> Result<Response> {
    let settings: CacheSettings = json_body(request).await?;
    shared.set_cache(settings)?;
    Ok(ok(to_json(&settings)))
}

// ----- model -----

fn model(shared: &Shared) -> Result<&Arc<LiveSet>> {
    shared.model.as_ref().ok_or_else(|| {
        Error::Conflict("no model file is attached (start the proxy with --model FILE)".into())
    })
}

async fn tensors(State(shared): State<Arc<Shared>>) -> Result<Response> {
    let model = model(&shared)?;
    let list: Vec<Value> = model
        .files()
        .iter()
        .flat_map(|file| {
            let path = set_file(model, file);
            file.tensors().iter().map(move |t| {
                let mut entry = json!({"name": t.name, "type": t.ggml_type.name(),
                    "dims": t.dims, "n_elements": t.n_elements, "n_bytes": t.n_bytes,
                    "data_offset": t.data_offset});
                if let Some(path) = &path {
                    entry["file"] = json!(path);
                }
                entry
            })
        })
        .collect();
    Ok(ok(Value::Array(list)))
}

/// The file of `file` to name in replies: its path when the model is a shard set
/// (offsets are then the shard's), nothing for a single file.
fn set_file(model: &LiveSet, file: &LiveModel) -> Option<PathBuf> {
    match model.single() {
        Some(_) => None,
        None => file.path().map(std::path::Path::to_path_buf),
    }
}

fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

async fn patches(State(shared): State<Arc<Shared>>) -> Result<Response> {
    let model = model(&shared)?;
    let list: Vec<Value> = model
        .applied_patches()
        .into_iter()
        .map(|(file, a)| {
            let expires = a.patch.expires_at.map(unix_seconds);
            let covered_by: Vec<String> = a.covered_by.iter().map(Uuid::to_string).collect();
            let mut entry = json!({"id": a.patch.id.to_string(), "name": a.patch.name,
                "priority": a.patch.priority, "bytes": [a.range.start, a.range.end],
                "temporary": expires.is_some(), "expires_at": expires,
                "journal_transaction": a.journal_transaction, "covered_by": covered_by});
            if let Some(path) = set_file(model, &model.files()[file]) {
                entry["file"] = json!(path);
            }
            entry
        })
        .collect();
    Ok(ok(Value::Array(list)))
}

async fn history(State(shared): State<Arc<Shared>>) -> Result<Response> {
    let model = model(&shared)?;
    let list: Vec<Value> = model
        .history()
        .into_iter()
        .map(|h| {
            json!({"id": h.id.to_string(), "name": h.name,
                "action": format!("{:?}", h.action).to_lowercase(), "at": unix_seconds(h.at),
                "duration_us": h.duration.as_micros() as u64, "result": h.result,
                "checksum_before": h.checksum_before, "checksum_after": h.checksum_after})
        })
        .collect();
    Ok(ok(Value::Array(list)))
}

async fn stats(State(shared): State<Arc<Shared>>) -> Response {
    let expiry_errors = shared.model_ops.lock().await.expiry_errors.clone();
    let model = shared.model.as_ref().map(|m| {
        let s = m.stats();
        let m = m.as_ref();
        json!({"patches_applied": s.patches_applied, "patches_reverted": s.patches_reverted,
            "applied_now": s.applied_now, "windows_opened": s.windows_opened, "writes": s.writes,
            "protection_calls": s.protection_calls, "bytes_written": s.bytes_written,
            "undo_bytes_held": s.undo_bytes_held, "epoch": m.epoch(),
            "expiry_errors": expiry_errors})
    });
    let cache = shared.cache.load();
    ok(json!({
        "proxy": to_json(&shared.stats.snapshot()),
        "model": model,
        "epoch": shared.epoch.load(Ordering::Acquire),
        "cache": {"settings": to_json(&cache.settings), "entries": cache.entries.entry_count()},
    }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchBody {
    name: String,
    tensor: String,
    /// Memory-tier's one transform type, validated as it is read.
    transform: ValueTransform,
    /// Element range `[start, end)`.
    #[serde(default)]
    range: Option<[u64; 2]>,
    #[serde(default)]
    priority: i32,
    /// Revert by itself after this many seconds.
    #[serde(default)]
    ttl_secs: Option<u64>,
    /// Hold new requests and wait for in-flight ones before applying.
    #[serde(default)]
    drain: bool,
    /// The longest wait for in-flight requests (the proxy's default when absent).
    #[serde(default)]
    drain_timeout_secs: Option<u64>,
}

/// The absolute byte range of a tensor's elements: whole blocks, refused otherwise, by
/// the same rule the library applies to a patch.
fn byte_range(model: &LiveModel, tensor: &str, elements: Option<[u64; 2]>) -> Result<Range<u64>> {
    let info = model.tensor(tensor)?;
    let Some([start, end]) = elements else {
        return Ok(info.data_offset..info.data_offset + info.n_bytes);
    };
    if start >= end {
        return Err(Error::BadRequest(format!(
            "range {start}..{end} of tensor {tensor:?} is empty"
        )));
    }
    let span = byte_tier::tensor_edit::element_bytes(info, &(start..end))?;
    Ok(info.data_offset + span.start..info.data_offset + span.end)
}

fn overlapping<'a>(
    locks: &'a [Lock],
    file: Option<&std::path::Path>,
    range: &Range<u64>,
) -> Option<&'a Lock> {
    locks
        .iter()
        .find(|l| l.file.as_deref() == file && l.start < range.end && range.start < l.end)
}

/// Holds new requests and waits for in-flight ones, at most `timeout`.
pub(crate) async fn drain(
    shared: &Shared,
    timeout: Duration,
) -> Result<tokio::sync::OwnedRwLockWriteGuard<()>> {
    shared.stats.drains.fetch_add(1, Ordering::Relaxed);
    match tokio::time::timeout(timeout, Arc::clone(&shared.gate).write_owned()).await {
        Ok(guard) => Ok(guard),
        Err(_) => Err(Error::Conflict(format!(
            "{} requests were still in flight after {} s; nothing was applied",
            shared.stats.in_flight.load(Ordering::Relaxed),
            timeout.as_secs_f64()
        ))),
    }
}

async fn apply_patch(State(shared): State<Arc<Shared>>, request: Request) -> Result<Response> {
    let body: PatchBody = json_body(request).await?;
    let model = Arc::clone(model(&shared)?);
    let transform = body.transform.clone();
    if body.name.trim().is_empty() {
        return Err(Error::BadRequest("name: empty".into()));
    }
    if body.ttl_secs == Some(0) {
        return Err(Error::BadRequest("ttl_secs must be at least 1".into()));
    }
    let mut ops = shared.model_ops.lock().await;
    let holder = Arc::clone(model.holder(&body.tensor)?);
    let range = byte_range(&holder, &body.tensor, body.range)?;
    let file = set_file(&model, &holder);
    if let Some(lock) = overlapping(&ops.locks, file.as_deref(), &range) {
        shared.stats.patches_refused.fetch_add(1, Ordering::Relaxed);
        return Err(Error::Conflict(format!(
            "bytes {}..{} of tensor {:?} overlap lock {} ({}..{})",
            range.start, range.end, body.tensor, lock.id, lock.start, lock.end
        )));
    }
    let model_check = if shared.verify_model {
        verify_model(&shared).await?;
        "verified: the upstream serves this file"
    } else {
        "not verified: the proxy was started with --model-unverified, so this patch may not reach the model the upstream serves"
    };
    let expires_at = body
        .ttl_secs
        .map(|ttl| SystemTime::now() + Duration::from_secs(ttl));
    let mut patch = MemoryPatch::new(
        body.name.clone(),
        PatchTarget::Tensor {
            name: body.tensor.clone(),
            elements: body.range.map(|[a, b]| a..b),
        },
        Payload::Transform(transform),
    )
    .with_priority(body.priority);
    patch.expires_at = expires_at;
    // How many requests the drain found in flight (and so waited for).
    let in_flight_at_drain = shared.stats.in_flight.load(Ordering::Relaxed);
    let gate = if body.drain {
        let timeout = body
            .drain_timeout_secs
            .map_or(shared.limits.drain_timeout, Duration::from_secs);
        Some(drain(&shared, timeout).await?)
    } else {
        None
    };
    let applied = {
        let model = Arc::clone(&holder);
        let agent = shared.agent.clone();
        tokio::task::spawn_blocking(move || match agent {
            Some(agent) => agent.apply_reported(vec![patch]),
            None => model.apply_reported(vec![patch]),
        })
        .await
        .map_err(|e| Error::Task(e.to_string()))?
    };
    let report = match applied.map(|mut r| r.pop()) {
        Ok(Some(report)) => report,
        Ok(None) => return Err(Error::Task("the model applied no patch".into())),
        Err(error) => {
            shared.stats.patches_refused.fetch_add(1, Ordering::Relaxed);
            return Err(error.into());
        }
    };
    let id = report.id;
    shared.stats.patches_applied.fetch_add(1, Ordering::Relaxed);
    shared.live_changes.fetch_add(1, Ordering::AcqRel);
    let epoch = shared.bump_epoch();
    let prompt_caches = erase_prompt_caches(&shared).await;
    drop(gate);

    if let Some(at) = expires_at {
        arm_expiry(&shared, &mut ops, id, at);
    }
    let transform_report = report.transform.as_ref().map(|t| {
        json!({"path": format!("{:?}", t.path).to_lowercase(), "n_elements": t.n_elements,
            "rms_error": t.rms_error, "max_abs_error": t.max_abs_error})
    });
    let displaces: Vec<String> = report.displaces.iter().map(Uuid::to_string).collect();
    Ok(created(json!({
        "id": id.to_string(),
        "name": body.name,
        "tensor": body.tensor,
        "file": file,
        "bytes": [range.start, range.end],
        "bytes_changed": report.bytes_changed,
        "bytes_written": report.bytes_written,
        "runs": report.runs,
        "transform_report": transform_report,
        "displaces": displaces,
        "journal_transaction": report.journal_transaction,
        "epoch": epoch,
        "drained": body.drain,
        "in_flight_at_drain": body.drain.then_some(in_flight_at_drain),
        "expires_at": expires_at.map(unix_seconds),
        "model": model_check,
        "upstream_prompt_cache": prompt_caches,
    })))
}

/// Reverts patch `id` at `at` (at once when that has passed).
fn arm_expiry(shared: &Arc<Shared>, ops: &mut ModelOps, id: Uuid, at: SystemTime) {
    let wait = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    let task_shared = Arc::clone(shared);
    let task = tokio::spawn(async move {
        tokio::time::sleep(wait).await;
        let mut ops = task_shared.model_ops.lock().await;
        ops.temporary.remove(&id);
        if let Err(error) = revert_locked(&task_shared, id).await {
            ops.expiry_errors
                .push(format!("patch {id}: {}", error.chain()));
        }
    });
    ops.temporary.insert(
        id,
        Temporary {
            task: task.abort_handle(),
        },
    );
}

/// After a restart: temporary patches the journal lists are reverted at once when their
/// time has passed, and re-armed with the time they have left otherwise.
pub(crate) async fn rearm_temporary_patches(shared: &Arc<Shared>) -> Result<()> {
    let Some(model) = shared.model.clone() else {
        return Ok(());
    };
    let mut ops = shared.model_ops.lock().await;
    for (_, applied) in model.applied_patches() {
        let Some(at) = applied.patch.expires_at else {
            continue;
        };
        if at <= SystemTime::now() {
            revert_locked(shared, applied.patch.id).await?;
        } else {
            arm_expiry(shared, &mut ops, applied.patch.id, at);
        }
    }
    Ok(())
}

/// Checks that the attached model file is the one the upstream serves: the same file
/// (device and inode) as its `GET /props` `model_path`, or, when that path is not
/// visible here, the same tensor table as its `GET /v1/models` description (element
/// count, bytes, vocabulary and embedding sizes).
pub(crate) async fn verify_model(shared: &Shared) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let model = model(shared)?;
    let ours = model
        .first()
        .path()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default();
    let refuse = |reason: String| {
        Error::Config(format!(
            "the model file {} is not the one the upstream serves: {reason}; start with --model set to the upstream's file, or pass --model-unverified to patch it anyway",
            ours.display()
        ))
    };
    let (status, props) = upstream_json(shared, Method::GET, "/props")
        .await
        .map_err(|e| refuse(format!("GET /props failed: {}", e.chain())))?;
    let served = props.get("model_path").and_then(Value::as_str);
    let Some(served) = served.filter(|_| status.is_success()) else {
        return Err(refuse(format!(
            "GET /props answered {status} without a model_path"
        )));
    };
    let served_path = std::path::Path::new(served);
    match (std::fs::metadata(served_path), std::fs::metadata(&ours)) {
        (Ok(theirs), Ok(mine)) => {
            if theirs.dev() == mine.dev() && theirs.ino() == mine.ino() {
                Ok(())
            } else {
                Err(refuse(format!(
                    "the upstream serves {served}, a different file"
                )))
            }
        }
        (Err(_), Ok(_)) => {
            // The path is the upstream's (another machine or container): compare what
            // it says about its tensors with this file's.
            let (_, models) = upstream_json(shared, Method::GET, "/v1/models")
                .await
                .map_err(|e| refuse(format!("GET /v1/models failed: {}", e.chain())))?;
            let meta = models
                .pointer("/data/0/meta")
                .cloned()
                .unwrap_or(Value::Null);
            let (n_params, size) = model.size();
            let theirs = (
                meta.get("n_params").and_then(Value::as_u64),
                meta.get("size").and_then(Value::as_u64),
            );
            if theirs == (Some(n_params), Some(size)) {
                Ok(())
            } else {
                Err(refuse(format!(
                    "the upstream serves {served} (not visible here) with {:?} parameters in {:?} bytes; this file has {n_params} in {size}",
                    theirs.0, theirs.1
                )))
            }
        }
        (_, Err(e)) => Err(refuse(format!("cannot read it: {e}"))),
    }
}

async fn revert_patch(
    State(shared): State<Arc<Shared>>,
    Segment(id): Segment,
    uri: http::Uri,
) -> Result<Response> {
    let drain_first = uri
        .query()
        .is_some_and(|q| q.split('&').any(|p| p == "drain=true" || p == "drain=1"));
    let model = Arc::clone(model(&shared)?);
    let id = match Uuid::parse_str(&id) {
        Ok(uuid) => uuid,
        Err(_) => model
            .applied()
            .into_iter()
            .find(|(_, name)| *name == id)
            .map(|(uuid, _)| uuid)
            .ok_or_else(|| Error::NotFound(format!("no applied patch {id:?}")))?,
    };
    let mut ops = shared.model_ops.lock().await;
    let gate = if drain_first {
        Some(drain(&shared, shared.limits.drain_timeout).await?)
    } else {
        None
    };
    let reply = revert_locked(&shared, id).await?;
    drop(gate);
    if let Some(temporary) = ops.temporary.remove(&id) {
        temporary.task.abort();
    }
    Ok(ok(reply))
}

/// Reverts a patch; the caller holds the model-ops lock.
async fn revert_locked(shared: &Arc<Shared>, id: Uuid) -> Result<Value> {
    let model = Arc::clone(model(shared)?.holder_of_patch(id)?);
    let agent = shared.agent.clone();
    tokio::task::spawn_blocking(move || match agent {
        Some(agent) => agent.revert(id),
        None => model.revert(id),
    })
    .await
    .map_err(|e| Error::Task(e.to_string()))??;
    shared
        .stats
        .patches_reverted
        .fetch_add(1, Ordering::Relaxed);
    shared.live_changes.fetch_add(1, Ordering::AcqRel);
    let epoch = shared.bump_epoch();
    let prompt_caches = erase_prompt_caches(shared).await;
    Ok(
        json!({"id": id.to_string(), "reverted": true, "epoch": epoch,
        "upstream_prompt_cache": prompt_caches}),
    )
}

/// Reverts every temporary patch that has not expired (at shutdown). Returns what could
/// not be reverted, with why; those stay in the journal with their expiry, and the next
/// attach reverts them.
pub(crate) async fn revert_temporary_patches(shared: &Arc<Shared>) -> Vec<String> {
    let mut ops = shared.model_ops.lock().await;
    let ids: Vec<Uuid> = ops.temporary.keys().copied().collect();
    let mut failures = Vec::new();
    for id in ids {
        if let Some(temporary) = ops.temporary.remove(&id) {
            temporary.task.abort();
        }
        if let Err(error) = revert_locked(shared, id).await {
            failures.push(format!("patch {id}: {}", error.chain()));
        }
    }
    failures
}

// ----- locks -----

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockBody {
    /// A tensor (its whole data, or `range` of its elements).
    #[serde(default)]
    tensor: Option<String>,
    #[serde(default)]
    range: Option<[u64; 2]>,
    /// Or an absolute byte range of the file.
    #[serde(default)]
    start: Option<u64>,
    #[serde(default)]
    end: Option<u64>,
    #[serde(default)]
    reason: Option<String>,
}

async fn list_locks(State(shared): State<Arc<Shared>>) -> Response {
    let ops = shared.model_ops.lock().await;
    ok(to_json(&ops.locks))
}

async fn add_lock(State(shared): State<Arc<Shared>>, request: Request) -> Result<Response> {
    let body: LockBody = json_body(request).await?;
    let (file, range) = match (&body.tensor, body.start, body.end) {
        (Some(tensor), None, None) => {
            let model = model(&shared)?;
            let holder = model.holder(tensor)?;
            (
                set_file(model, holder),
                byte_range(holder, tensor, body.range)?,
            )
        }
        (None, Some(start), Some(end)) if start < end && body.range.is_none() => {
            if shared.model.as_ref().is_some_and(|m| m.single().is_none()) {
                return Err(Error::BadRequest(
                    "the model is a shard set, where a byte range names no file: lock a tensor"
                        .into(),
                ));
            }
            (None, start..end)
        }
        _ => {
            return Err(Error::BadRequest(
                "a lock names a tensor (with an optional element range) or a byte range start < end"
                    .into(),
            ));
        }
    };
    let mut ops = shared.model_ops.lock().await;
    ops.next_lock += 1;
    let lock = Lock {
        id: ops.next_lock,
        file,
        start: range.start,
        end: range.end,
        tensor: body.tensor,
        reason: body.reason,
    };
    ops.locks.push(lock.clone());
    Ok(created(to_json(&lock)))
}

async fn delete_lock(State(shared): State<Arc<Shared>>, Segment(id): Segment) -> Result<Response> {
    let id: u64 = id
        .parse()
        .map_err(|_| Error::NotFound(format!("no lock {id:?}")))?;
    let mut ops = shared.model_ops.lock().await;
    let position = ops
        .locks
        .iter()
        .position(|l| l.id == id)
        .ok_or_else(|| Error::NotFound(format!("no lock {id}")))?;
    let lock = ops.locks.remove(position);
    Ok(ok(to_json(&lock)))
}

async fn openapi() -> Response {
    ok(crate::openapi::document())
}

// ----- the upstream's prompt caches -----

/// What was done about the upstream's prompt caches after a live patch or revert.
#[derive(Debug, serde::Serialize)]
pub(crate) struct PromptCacheReport {
    /// Slots whose prompt cache was erased.
    slots_erased: Vec<u64>,
    /// Why some could not be (empty when every slot was erased).
    errors: Vec<String>,
    /// Whether the proxy now sends `cache_prompt: false` with every generation request.
    cache_prompt_disabled: bool,
    note: String,
}

async fn upstream_json(shared: &Shared, method: Method, path: &str) -> Result<(StatusCode, Value)> {
    use http_body_util::BodyExt;
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    let body = if method == Method::POST {
        bytes::Bytes::from_static(b"{}")
    } else {
        bytes::Bytes::new()
    };
    let response = tokio::time::timeout(
        ERASE_TIMEOUT,
        crate::proxy::send(shared, &method, path, &headers, body),
    )
    .await
    .map_err(|_| Error::UpstreamTimeout(ERASE_TIMEOUT))??;
    let status = response.status();
    let bytes = tokio::time::timeout(ERASE_TIMEOUT, response.into_body().collect())
        .await
        .map_err(|_| Error::UpstreamTimeout(ERASE_TIMEOUT))?
        .map_err(|e| Error::Upstream(e.to_string()))?
        .to_bytes();
    let value = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Ok((status, value))
}

/// Erases every slot's prompt cache on the upstream llama-server: they hold KV values
/// computed with the old weights, and llama-server reuses them when a new prompt shares
/// a prefix, which would mix old and new weights in one answer.
pub(crate) async fn erase_prompt_caches(shared: &Shared) -> PromptCacheReport {
    let mut report = PromptCacheReport {
        slots_erased: Vec::new(),
        errors: Vec::new(),
        cache_prompt_disabled: shared.guard_prompt_cache,
        note: String::new(),
    };
    let slots = match upstream_json(shared, Method::GET, "/props").await {
        Ok((status, props)) if status.is_success() => {
            props.get("total_slots").and_then(Value::as_u64)
        }
        Ok((status, _)) => {
            report.errors.push(format!("GET /props answered {status}"));
            None
        }
        Err(error) => {
            report.errors.push(format!("GET /props: {}", error.chain()));
            None
        }
    };
    // Concurrently: llama-server defers erasing a slot that is still generating, so one
    // busy slot must not hold up the others.
    let slot_ids: Vec<u64> = (0..slots.unwrap_or(0).min(1024)).collect();
    let paths: Vec<String> = slot_ids
        .iter()
        .map(|slot| format!("/slots/{slot}?action=erase"))
        .collect();
    let results = futures_util::future::join_all(
        paths
            .iter()
            .map(|path| upstream_json(shared, Method::POST, path)),
    )
    .await;
    for (slot, result) in slot_ids.into_iter().zip(results) {
        match result {
            Ok((status, _)) if status.is_success() => report.slots_erased.push(slot),
            Ok((status, body)) => {
                let message = body
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .map_or_else(|| body.to_string(), str::to_owned);
                report
                    .errors
                    .push(format!("slot {slot}: {status}: {message}"));
            }
            Err(error) => report
                .errors
                .push(format!("slot {slot}: {}", error.chain())),
        }
    }
    let mut note = if report.errors.is_empty() && slots.is_some() {
        format!(
            "erased the prompt cache of all {} llama-server slots, which held KV values computed with the old weights",
            report.slots_erased.len()
        )
    } else {
        "could not erase llama-server's slot prompt caches (slot erase needs llama-server started with --slot-save-path DIR); they hold KV values computed with the old weights and would be reused for prompts that share a prefix".to_owned()
    };
    if shared.guard_prompt_cache {
        note.push_str("; llama-server's host-memory prompt cache (--cache-ram) cannot be cleared over HTTP, so the proxy now sends cache_prompt=false with every generation request: answers through the proxy use only the new weights (requests sent to llama-server directly are not covered)");
    } else {
        note.push_str("; the proxy does not force cache_prompt=false: the upstream must run with --cache-ram 0 or answers may mix old and new weights");
    }
    report.note = note;
    report
}
