//! Fleets: one patch set rolled out to every replica of a model, consistently, with
//! etcd as the coordination store.
//!
//! Every `hotpatch serve --fleet NAME` sidecar is a member ([`member`]): it registers
//! under a lease-bound key, converges to the fleet's desired state before it serves, and
//! takes part in rollouts. `hotpatch fleet apply|revert` is the coordinator
//! ([`coordinator`]): it records a rollout, collects every member's prepare verdict
//! (memory-tier's full plan against its own model, nothing written), then writes
//! `commit` (with the new desired state, in one transaction guarded on no `abort`) or
//! `abort`. All of a rollout's state is in etcd, so any later call resumes or aborts a
//! rollout whose coordinator died.
//!
//! Keys, under `/hotpatch/fleet/NAME/`:
//!
//! - `members/ID`: a [`MemberRecord`], bound to the member's lease.
//! - `desired`: the [`DesiredState`] (the ordered patch set and its revision).
//! - `active`: the id of the rollout in flight (absent when none is).
//! - `rollouts/ID/spec`: its [`RolloutSpec`]; `rollouts/ID/prepare/MEMBER`: a
//!   [`PrepareVerdict`]; `rollouts/ID/decision`: a [`Decision`];
//!   `rollouts/ID/done/MEMBER`: a [`Done`]. Rollouts stay: they are the history.
//! - A rolling rollout adds `rollouts/ID/wave/MEMBER` (a [`WaveStep`]: the member may
//!   apply now), `rollouts/ID/health/MEMBER` (a [`HealthResult`]),
//!   `rollouts/ID/reverted/MEMBER` (a [`Done`]: it took the change back out after an
//!   abort), `rollouts/ID/rollback` (a [`Rollback`], after a failed step) and `rollouts/ID/coordinator`, bound to the
//!   lease of the coordinator driving it (absent: nobody is, and the next call resumes
//!   it).

pub mod coordinator;
pub mod etcd;
pub mod member;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::preset::Preset;
use etcd::{EtcdClient, Event, WatchItem};

pub use coordinator::{Fleet, RolloutOptions, RolloutReport};
pub use etcd::EtcdTls;
pub use member::{MemberOptions, run_member};

/// The version of the records this code writes.
pub const SCHEMA: u32 = 1;

/// Where a fleet's keys live.
pub fn prefix(fleet: &str) -> String {
    format!("/hotpatch/fleet/{fleet}/")
}

/// Checks a fleet or replica name (it is part of etcd keys).
pub fn check_name(what: &str, name: &str) -> Result<()> {
    crate::preset::check_name(name).map_err(|message| Error::FleetRefused {
        fleet: name.to_owned(),
        message: format!("{what} name: {message}"),
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A member as it registers itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberRecord {
    /// The record's schema version.
    pub schema: u32,
    /// Its replica id.
    pub replica: String,
    /// The upstream server it fronts.
    pub upstream: String,
    /// The address its proxy listens on.
    pub listen: String,
    /// SHA-256 (hex) of its model file's header and tensor table.
    pub model_sha256: String,
    /// The desired-state revision it has applied.
    pub applied_revision: u64,
    /// The rollouts whose patches it holds, in the order it applied them.
    pub applied_rollouts: Vec<String>,
    /// Its proxy's patch epoch.
    pub epoch: u64,
    /// Why it could not converge, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A rollout that is part of the desired state: its id and its patch set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredRollout {
    /// The rollout that committed it.
    pub id: String,
    /// The patch set (live patches and server rules, in the preset format).
    pub preset: Preset,
}

/// A fleet's desired state: the ordered patch set every member holds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DesiredState {
    /// The record's schema version.
    pub schema: u32,
    /// Advances with every committed rollout.
    pub revision: u64,
    /// The patch sets, oldest first.
    pub rollouts: Vec<DesiredRollout>,
}

/// What a rollout does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RolloutKind {
    /// Add a patch set.
    Apply {
        /// The patch set.
        preset: Preset,
    },
    /// Take away the patch set an earlier rollout added.
    Revert {
        /// The rollout to undo.
        target: String,
    },
}

/// A rollout as the coordinator recorded it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// The record's schema version.
    pub schema: u32,
    /// Its id.
    pub id: String,
    /// What it does.
    pub action: RolloutKind,
    /// The members that must prepare (the membership snapshot).
    pub members: Vec<String>,
    /// The model header every member has.
    pub model_sha256: String,
    /// The desired state's revision it builds on.
    pub base_revision: u64,
    /// Apply with a drain (new requests held, in-flight ones awaited).
    pub drain: bool,
    /// When it was recorded (ms since the Unix epoch).
    pub created_ms: u64,
    /// When prepare gives up (ms since the Unix epoch).
    pub deadline_ms: u64,
    /// Apply one member at a time, each checked before the next (absent: all at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolling: Option<RollingSpec>,
}

impl RolloutSpec {
    /// The desired state a member holds while it takes part in this rolling rollout:
    /// `desired` with the rollout's change made.
    pub fn applied_to(&self, desired: &DesiredState) -> DesiredState {
        let mut next = desired.clone();
        match &self.action {
            RolloutKind::Apply { preset } => {
                if !next.rollouts.iter().any(|r| r.id == self.id) {
                    next.rollouts.push(DesiredRollout {
                        id: self.id.clone(),
                        preset: preset.clone(),
                    });
                }
            }
            RolloutKind::Revert { target } => next.rollouts.retain(|r| &r.id != target),
        }
        next
    }
}

/// How a rolling rollout checks each member before it goes on to the next.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollingSpec {
    /// The check run against each member's proxy once it has applied.
    pub health: HealthCheck,
    /// How long a member has to apply, in milliseconds.
    pub step_timeout_ms: u64,
}

/// A deterministic request sent to a member's proxy, and what its answer must satisfy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// The request's path (`/completion`, `/v1/chat/completions`).
    pub path: String,
    /// The JSON body (an object; sent with `temperature` 0 and `cache_prompt` false).
    pub body: serde_json::Value,
    /// What the answer must satisfy.
    pub expect: HealthExpect,
    /// How long the answer may take, in milliseconds.
    pub timeout_ms: u64,
}

/// What a health check's answer must satisfy (besides a 2xx status).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum HealthExpect {
    /// The generated text contains this text.
    Contains {
        /// The text.
        text: String,
    },
    /// The generated text matches this regular expression.
    Regex {
        /// The expression (Rust `regex` syntax).
        pattern: String,
    },
    /// The JSON value at this pointer (RFC 6901) of the answer equals this value.
    Pointer {
        /// The pointer (`/choices/0/finish_reason`).
        pointer: String,
        /// The value.
        equals: serde_json::Value,
    },
}

/// Where the generated text is in an answer: `/completion`'s `content`, the chat API's
/// `choices[0].message.content`, the completions API's `choices[0].text`.
const TEXT_POINTERS: [&str; 3] = ["/content", "/choices/0/message/content", "/choices/0/text"];

impl HealthCheck {
    /// Checks the request and the expectation (the regular expression compiles, the
    /// pointer is one, the body is an object); the reason when they are not usable.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !self.path.starts_with('/') {
            return Err(format!(
                "health request path {:?} does not start with /",
                self.path
            ));
        }
        if !self.body.is_object() {
            return Err("the health request's body is not a JSON object".into());
        }
        match &self.expect {
            HealthExpect::Contains { .. } => Ok(()),
            HealthExpect::Regex { pattern } => regex::Regex::new(pattern)
                .map(|_| ())
                .map_err(|e| format!("health regex: {e}")),
            HealthExpect::Pointer { pointer, .. } => {
                if pointer.is_empty() || pointer.starts_with('/') {
                    Ok(())
                } else {
                    Err(format!("health pointer {pointer:?} does not start with /"))
                }
            }
        }
    }

    /// The body sent: the one given, with `temperature` 0 and `cache_prompt` false (so
    /// the answer depends only on the weights and rules).
    pub fn request_body(&self) -> serde_json::Value {
        let mut body = self.body.clone();
        if let Some(object) = body.as_object_mut() {
            object.insert("temperature".into(), serde_json::json!(0.0));
            object.insert("cache_prompt".into(), serde_json::json!(false));
        }
        body
    }

    /// Judges an answer: `Err` with what was wrong.
    pub fn judge(&self, status: u16, body: &str) -> std::result::Result<(), String> {
        let excerpt = |text: &str| {
            let cut: String = text.chars().take(200).collect();
            if cut.len() < text.len() {
                format!("{cut:?}…")
            } else {
                format!("{cut:?}")
            }
        };
        if !(200..300).contains(&status) {
            return Err(format!("answered {status}: {}", excerpt(body)));
        }
        let json: Option<serde_json::Value> = serde_json::from_str(body).ok();
        let text = json
            .as_ref()
            .and_then(|j| {
                TEXT_POINTERS
                    .iter()
                    .find_map(|p| j.pointer(p).and_then(serde_json::Value::as_str))
            })
            .unwrap_or(body);
        match &self.expect {
            HealthExpect::Contains { text: wanted } => {
                if text.contains(wanted.as_str()) {
                    Ok(())
                } else {
                    Err(format!(
                        "the answer {} does not contain {wanted:?}",
                        excerpt(text)
                    ))
                }
            }
            HealthExpect::Regex { pattern } => {
                let re = regex::Regex::new(pattern).map_err(|e| format!("health regex: {e}"))?;
                if re.is_match(text) {
                    Ok(())
                } else {
                    Err(format!(
                        "the answer {} does not match /{pattern}/",
                        excerpt(text)
                    ))
                }
            }
            HealthExpect::Pointer { pointer, equals } => {
                let json =
                    json.ok_or_else(|| format!("the answer is not JSON: {}", excerpt(body)))?;
                match json.pointer(pointer) {
                    Some(found) if found == equals => Ok(()),
                    Some(found) => Err(format!("{pointer} is {found}, not {equals}")),
                    None => Err(format!("the answer has no {pointer}")),
                }
            }
        }
    }
}

/// The coordinator let a member of a rolling rollout apply.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WaveStep {
    /// Its place in the order (0 first).
    pub position: usize,
    /// When (ms since the Unix epoch).
    pub at_ms: u64,
}

/// A member's health check in a rolling rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthResult {
    /// Whether the answer satisfied the check.
    pub passed: bool,
    /// What was wrong (empty when it passed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// How long the request took, in milliseconds.
    pub latency_ms: u64,
    /// When (ms since the Unix epoch).
    pub at_ms: u64,
}

/// What a failed rolling rollout took back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    /// Members that had applied and no longer hold the rollout.
    pub reverted: Vec<String>,
    /// Members that had applied and still held it when the wait ended (they revert when
    /// they converge: down, or slow).
    pub pending: Vec<String>,
    /// When the wait ended (ms since the Unix epoch).
    pub at_ms: u64,
}

/// A member's prepare verdict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "snake_case", deny_unknown_fields)]
pub enum PrepareVerdict {
    /// Every check passed.
    Ready,
    /// A check failed.
    Refused {
        /// Why.
        reason: String,
    },
}

/// The coordinator's decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case", deny_unknown_fields)]
pub enum Decision {
    /// Every member was ready: apply.
    Commit {
        /// The desired state's new revision.
        revision: u64,
        /// When (ms since the Unix epoch).
        at_ms: u64,
    },
    /// Nothing changes.
    Abort {
        /// Why.
        reason: String,
        /// When (ms since the Unix epoch).
        at_ms: u64,
    },
}

/// A member's report that it applied a committed rollout.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Done {
    /// The desired revision it now holds.
    pub revision: u64,
    /// Its proxy's patch epoch after applying.
    pub epoch: u64,
    /// When it finished applying (ms since the Unix epoch).
    pub at_ms: u64,
}

/// Parses a record, naming the key when it is malformed.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    fleet: &str,
    key: &str,
    value: &[u8],
) -> Result<T> {
    serde_json::from_slice(value).map_err(|e| Error::FleetState {
        fleet: fleet.to_owned(),
        key: key.to_owned(),
        message: e.to_string(),
    })
}

pub(crate) fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // These records hold only strings, numbers and presets, which always serialize.
    serde_json::to_vec(value).unwrap_or_default()
}

/// A local copy of every key under a fleet's prefix, kept current by a watch.
#[derive(Debug)]
pub(crate) struct Mirror {
    fleet: String,
    prefix: String,
    /// The store revision the copy reflects.
    pub(crate) revision: i64,
    /// Key (without the prefix) to value.
    pub(crate) keys: BTreeMap<String, Vec<u8>>,
}

impl Mirror {
    /// Reads every key of the fleet.
    pub(crate) async fn load(client: &EtcdClient, fleet: &str) -> Result<Mirror> {
        let prefix = prefix(fleet);
        let snapshot = client.get_prefix(prefix.as_bytes()).await?;
        let mut keys = BTreeMap::new();
        for kv in snapshot.kvs {
            if let Some(suffix) = kv.key.strip_prefix(prefix.as_bytes()) {
                keys.insert(String::from_utf8_lossy(suffix).into_owned(), kv.value);
            }
        }
        Ok(Mirror {
            fleet: fleet.to_owned(),
            prefix,
            revision: snapshot.revision,
            keys,
        })
    }

    fn apply(&mut self, events: &[Event]) {
        for event in events {
            let Some(kv) = &event.kv else { continue };
            self.revision = self.revision.max(kv.mod_revision);
            let Some(suffix) = kv.key.strip_prefix(self.prefix.as_bytes()) else {
                continue;
            };
            let key = String::from_utf8_lossy(suffix).into_owned();
            if event.kind == 1 {
                self.keys.remove(&key);
            } else {
                self.keys.insert(key, kv.value.clone());
            }
        }
    }

    pub(crate) fn get(&self, key: &str) -> Option<&[u8]> {
        self.keys.get(key).map(Vec::as_slice)
    }

    /// Parses the record at `key`, when there is one.
    pub(crate) fn record<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.get(key)
            .map(|value| parse(&self.fleet, key, value))
            .transpose()
    }

    /// Keys under `under` (a key prefix without the fleet's), with the rest of the key.
    pub(crate) fn under<'a>(
        &'a self,
        under: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        self.keys
            .range(under.to_owned()..)
            .take_while(move |(k, _)| k.starts_with(under))
            .map(move |(k, v)| (&k[under.len()..], v.as_slice()))
    }

    /// The desired state (the empty one at revision 0 when none was written).
    pub(crate) fn desired(&self) -> Result<DesiredState> {
        let state = self
            .record::<DesiredState>("desired")?
            .unwrap_or(DesiredState {
                schema: SCHEMA,
                revision: 0,
                rollouts: Vec::new(),
            });
        if state.schema != SCHEMA {
            return Err(Error::FleetState {
                fleet: self.fleet.clone(),
                key: "desired".into(),
                message: format!("schema {} (this version reads {SCHEMA})", state.schema),
            });
        }
        Ok(state)
    }

    /// The registered members, by replica id.
    pub(crate) fn members(&self) -> Result<BTreeMap<String, MemberRecord>> {
        let mut members = BTreeMap::new();
        for (replica, value) in self.under("members/") {
            let record: MemberRecord = parse(&self.fleet, &format!("members/{replica}"), value)?;
            members.insert(replica.to_owned(), record);
        }
        Ok(members)
    }
}

/// Follows a fleet's keys: waits for changes and keeps a [`Mirror`] current, watching
/// again from the last revision seen plus one whenever a watch ends (its member died),
/// and reading everything again when etcd has compacted past that revision.
#[derive(Debug)]
pub(crate) struct Follower {
    client: Arc<EtcdClient>,
    pub(crate) mirror: Mirror,
    receiver: tokio::sync::mpsc::Receiver<WatchItem>,
    task: tokio::task::JoinHandle<()>,
}

impl Follower {
    pub(crate) async fn start(client: Arc<EtcdClient>, fleet: &str) -> Result<Follower> {
        let mirror = Mirror::load(&client, fleet).await?;
        let (task, receiver) = Follower::watch(&client, &mirror);
        Ok(Follower {
            client,
            mirror,
            receiver,
            task,
        })
    }

    fn watch(
        client: &Arc<EtcdClient>,
        mirror: &Mirror,
    ) -> (
        tokio::task::JoinHandle<()>,
        tokio::sync::mpsc::Receiver<WatchItem>,
    ) {
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        let client = Arc::clone(client);
        let prefix = mirror.prefix.clone().into_bytes();
        let start = mirror.revision + 1;
        let task = tokio::spawn(async move {
            client.watch_prefix(&prefix, start, sender).await;
        });
        (task, receiver)
    }

    /// Waits for the next change (or a re-read after a broken watch); `Ok(false)` when
    /// `until` passed first.
    pub(crate) async fn next(&mut self, until: tokio::time::Instant) -> Result<bool> {
        let item = tokio::select! {
            item = self.receiver.recv() => item,
            () = tokio::time::sleep_until(until) => return Ok(false),
        };
        match item {
            Some(WatchItem::Events(events)) => {
                self.mirror.apply(&events);
                Ok(true)
            }
            Some(WatchItem::Ended { .. }) | None => {
                // Catch up on what the broken watch may have missed (or everything, when
                // etcd compacted past it), then follow on from there.
                self.task.abort();
                let result = match Mirror::load(&self.client, &self.mirror.fleet).await {
                    Ok(fresh) => {
                        self.mirror = fresh;
                        Ok(true)
                    }
                    Err(error) => {
                        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        Err(error)
                    }
                };
                let (task, receiver) = Follower::watch(&self.client, &self.mirror);
                self.task = task;
                self.receiver = receiver;
                result
            }
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The name a fleet patch or rule carries: the rollout that added it, then its own.
pub(crate) fn fleet_patch_name(rollout: &str, name: &str) -> String {
    format!("fleet:{rollout}:{name}")
}

/// The rollout a patch or rule name says added it.
pub(crate) fn rollout_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("fleet:")?;
    rest.split_once(':').map(|(rollout, _)| rollout)
}

/// SHA-256 (hex) of a model file's header and tensor table (every byte before the
/// first tensor's data).
pub fn model_header_sha256(model: &memory_tier::LiveModel) -> String {
    use sha2::{Digest, Sha256};
    let end = model
        .tensors()
        .iter()
        .map(|t| t.data_offset)
        .min()
        .unwrap_or(model.len());
    let guard = model.read();
    let bytes = guard.bytes();
    let end = usize::try_from(end).unwrap_or(bytes.len()).min(bytes.len());
    let digest = Sha256::digest(&bytes[..end]);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_patch_names_carry_their_rollout() {
        let name = fleet_patch_name("r1-ab", "halve");
        assert_eq!(rollout_of(&name), Some("r1-ab"));
        assert_eq!(rollout_of("halve"), None);
    }

    fn check(expect: HealthExpect) -> HealthCheck {
        HealthCheck {
            path: "/completion".into(),
            body: serde_json::json!({"prompt": "p", "temperature": 0.8}),
            expect,
            timeout_ms: 1000,
        }
    }

    #[test]
    fn a_health_check_judges_the_generated_text_and_json_pointers() {
        let contains = check(HealthExpect::Contains {
            text: "Paris".into(),
        });
        assert_eq!(contains.judge(200, r#"{"content": " Paris."}"#), Ok(()));
        let refused = contains
            .judge(200, r#"{"content": " ****.", "model": "Paris"}"#)
            .expect_err("the text is only the generated content");
        assert!(refused.contains("does not contain"), "{refused}");
        let status = contains
            .judge(503, r#"{"content": "Paris"}"#)
            .expect_err("a 503 fails");
        assert!(status.contains("503"), "{status}");
        let chat = check(HealthExpect::Regex {
            pattern: "^[A-Z][a-z]+$".into(),
        });
        assert_eq!(
            chat.judge(200, r#"{"choices": [{"message": {"content": "Paris"}}]}"#),
            Ok(())
        );
        assert!(
            chat.judge(200, r#"{"choices": [{"text": "paris"}]}"#)
                .is_err()
        );
        let pointer = check(HealthExpect::Pointer {
            pointer: "/stop_type".into(),
            equals: serde_json::json!("limit"),
        });
        assert_eq!(pointer.judge(200, r#"{"stop_type": "limit"}"#), Ok(()));
        let wrong = pointer
            .judge(200, r#"{"stop_type": "eos"}"#)
            .expect_err("another value");
        assert!(wrong.contains("\"eos\""), "{wrong}");
        assert!(pointer.judge(200, "not json").is_err());
    }

    #[test]
    fn a_health_request_is_sent_deterministic_and_bad_checks_are_refused() {
        let body = check(HealthExpect::Contains { text: "x".into() }).request_body();
        assert_eq!(body["temperature"], serde_json::json!(0.0));
        assert_eq!(body["cache_prompt"], serde_json::json!(false));
        assert_eq!(body["prompt"], "p");
        let bad_regex = check(HealthExpect::Regex {
            pattern: "(".into(),
        });
        assert!(bad_regex.validate().is_err());
        let mut not_object = check(HealthExpect::Contains { text: "x".into() });
        not_object.body = serde_json::json!([1]);
        assert!(not_object.validate().is_err());
        let mut no_slash = not_object.clone();
        no_slash.body = serde_json::json!({});
        no_slash.path = "completion".into();
        assert!(no_slash.validate().is_err());
    }

    #[test]
    fn a_rolling_spec_adds_or_removes_its_rollout_from_a_desired_state() {
        let preset = Preset::from_toml("p", "name = \"p\"\nversion = 1\n").expect("preset");
        let desired = DesiredState {
            schema: SCHEMA,
            revision: 4,
            rollouts: vec![DesiredRollout {
                id: "old".into(),
                preset: preset.clone(),
            }],
        };
        let mut spec = RolloutSpec {
            schema: SCHEMA,
            id: "new".into(),
            action: RolloutKind::Apply { preset },
            members: vec!["a".into()],
            model_sha256: String::new(),
            base_revision: 4,
            drain: false,
            created_ms: 0,
            deadline_ms: 0,
            rolling: None,
        };
        let ids = |d: &DesiredState| d.rollouts.iter().map(|r| r.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&spec.applied_to(&desired)), ["old", "new"]);
        assert_eq!(spec.applied_to(&desired).revision, 4);
        spec.action = RolloutKind::Revert {
            target: "old".into(),
        };
        assert!(ids(&spec.applied_to(&desired)).is_empty());
    }

    #[test]
    fn a_hand_written_desired_state_is_refused_with_its_key() {
        let error =
            parse::<DesiredState>("f", "desired", b"{\"revision\": \"x\"}").expect_err("malformed");
        assert!(
            matches!(&error, Error::FleetState { key, .. } if key == "desired"),
            "{error}"
        );
    }
}
