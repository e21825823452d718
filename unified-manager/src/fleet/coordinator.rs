//! The coordinator side of a fleet: `hotpatch fleet members|status|history|apply|revert`.
//!
//! A rollout is two phases over etcd. The coordinator records it (a transaction that
//! succeeds only when no other rollout is in flight and the desired state is the one it
//! read), then waits for every member of the membership snapshot to prepare. All ready:
//! it writes `commit` together with the new desired state, in one transaction guarded
//! on no decision having been written; a refusal, a member whose lease expired or the
//! deadline: `abort`, and nothing changes anywhere. After a commit it waits for each
//! member's `done`. Every step is in etcd, so a call that finds a rollout left by a
//! coordinator that died finishes it (all ready, or already committed) or aborts it
//! (a refusal, a member gone, the deadline passed) before doing its own work.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::etcd::{Compare, EtcdClient, EtcdTls, Op};
use super::{
    Decision, DesiredRollout, DesiredState, Done, Follower, MemberRecord, Mirror, PrepareVerdict,
    RolloutKind, RolloutSpec, SCHEMA, now_ms, prefix, to_json,
};
use crate::error::{Error, Result};
use crate::preset::Preset;

/// How a rollout runs.
#[derive(Clone, Copy, Debug)]
pub struct RolloutOptions {
    /// How long members have to prepare before the rollout is aborted.
    pub prepare_timeout: Duration,
    /// How long to wait for members to apply after the commit (the commit stands
    /// either way: a member that has not applied converges when it can).
    pub apply_timeout: Duration,
    /// Apply with a drain on every member.
    pub drain: bool,
}

impl Default for RolloutOptions {
    fn default() -> RolloutOptions {
        RolloutOptions {
            prepare_timeout: Duration::from_secs(30),
            apply_timeout: Duration::from_secs(60),
            drain: false,
        }
    }
}

/// One member's part in a rollout.
#[derive(Clone, Debug, Serialize)]
pub struct MemberOutcome {
    /// The replica.
    pub replica: String,
    /// Its prepare verdict.
    pub prepared: Option<PrepareVerdict>,
    /// Its report of having applied the commit.
    pub done: Option<Done>,
}

/// What a rollout did.
#[derive(Clone, Debug, Serialize)]
pub struct RolloutReport {
    /// The fleet.
    pub fleet: String,
    /// The rollout.
    pub id: String,
    /// What it did.
    pub action: RolloutKind,
    /// The desired state's revision it committed.
    pub revision: u64,
    /// Each member of the snapshot.
    pub members: Vec<MemberOutcome>,
    /// Members that had not reported `done` when the wait ended (they converge when
    /// they can: down, or slow).
    pub pending: Vec<String>,
    /// From recording the rollout to the commit, in milliseconds.
    pub prepare_ms: u64,
    /// From recording the rollout to the last `done`, in milliseconds.
    pub total_ms: u64,
    /// Between the first and the last member applying, in milliseconds.
    pub skew_ms: u64,
    /// etcd calls this coordinator made for it.
    pub etcd_requests: usize,
    /// A rollout left in flight by an earlier call, finished or aborted first.
    pub settled_first: Option<String>,
}

/// The state of a rollout in flight.
#[derive(Clone, Debug, Serialize)]
pub struct ActiveRollout {
    /// Its spec.
    pub spec: RolloutSpec,
    /// `prepare`, `commit` or `abort`.
    pub phase: String,
    /// Verdicts so far.
    pub prepared: BTreeMap<String, PrepareVerdict>,
    /// Done reports so far.
    pub done: BTreeMap<String, Done>,
}

/// A fleet as `hotpatch fleet status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct FleetStatus {
    /// The fleet.
    pub fleet: String,
    /// The desired state.
    pub desired: DesiredState,
    /// The registered members.
    pub members: Vec<MemberRecord>,
    /// The rollout in flight.
    pub active: Option<ActiveRollout>,
}

/// One rollout of the history.
#[derive(Clone, Debug, Serialize)]
pub struct HistoryEntry {
    /// Its spec.
    pub spec: RolloutSpec,
    /// Its decision (none: still preparing, or abandoned before a decision).
    pub decision: Option<Decision>,
    /// Members that reported `done`.
    pub done: usize,
}

/// A fleet, seen from a coordinator.
#[derive(Debug)]
pub struct Fleet {
    name: String,
    client: Arc<EtcdClient>,
}

enum Verdicts {
    Pending,
    AllReady,
    Refused(String),
}

impl Fleet {
    /// The fleet `name` on the etcd cluster at `endpoints` (nothing is contacted yet).
    pub fn new(name: &str, endpoints: &[String]) -> Result<Fleet> {
        Fleet::with_tls(name, endpoints, &EtcdTls::default())
    }

    /// The fleet `name` on the etcd cluster at `endpoints`, over TLS as `tls` says.
    pub fn with_tls(name: &str, endpoints: &[String], tls: &EtcdTls) -> Result<Fleet> {
        super::check_name("fleet", name)?;
        Ok(Fleet {
            name: name.to_owned(),
            client: Arc::new(EtcdClient::with_tls(endpoints, tls)?),
        })
    }

    /// The etcd client (for tests and benches that count requests or find the leader).
    pub fn client(&self) -> &EtcdClient {
        &self.client
    }

    fn key(&self, suffix: &str) -> Vec<u8> {
        format!("{}{suffix}", prefix(&self.name)).into_bytes()
    }

    fn refused(&self, message: impl Into<String>) -> Error {
        Error::FleetRefused {
            fleet: self.name.clone(),
            message: message.into(),
        }
    }

    /// The registered members.
    pub async fn members(&self) -> Result<Vec<MemberRecord>> {
        let mirror = Mirror::load(&self.client, &self.name).await?;
        Ok(mirror.members()?.into_values().collect())
    }

    /// The desired state, the members and the rollout in flight.
    pub async fn status(&self) -> Result<FleetStatus> {
        let mirror = Mirror::load(&self.client, &self.name).await?;
        let active = match mirror.get("active") {
            None => None,
            Some(id) => {
                let id = String::from_utf8_lossy(id).into_owned();
                let spec: RolloutSpec =
                    mirror
                        .record(&format!("rollouts/{id}/spec"))?
                        .ok_or_else(|| {
                            self.malformed(
                                "active",
                                format!("names rollout {id}, which has no spec"),
                            )
                        })?;
                let decision: Option<Decision> =
                    mirror.record(&format!("rollouts/{id}/decision"))?;
                let phase = match decision {
                    None => "prepare",
                    Some(Decision::Commit { .. }) => "commit",
                    Some(Decision::Abort { .. }) => "abort",
                };
                Some(ActiveRollout {
                    phase: phase.into(),
                    prepared: self.records(&mirror, &format!("rollouts/{id}/prepare/"))?,
                    done: self.records(&mirror, &format!("rollouts/{id}/done/"))?,
                    spec,
                })
            }
        };
        Ok(FleetStatus {
            fleet: self.name.clone(),
            desired: mirror.desired()?,
            members: mirror.members()?.into_values().collect(),
            active,
        })
    }

    /// Every rollout recorded, oldest first.
    pub async fn history(&self) -> Result<Vec<HistoryEntry>> {
        let mirror = Mirror::load(&self.client, &self.name).await?;
        let mut entries = Vec::new();
        for (rest, value) in mirror.under("rollouts/") {
            let Some(id) = rest.strip_suffix("/spec") else {
                continue;
            };
            let spec: RolloutSpec = super::parse(&self.name, &format!("rollouts/{rest}"), value)?;
            let decision = mirror.record(&format!("rollouts/{id}/decision"))?;
            let done = mirror.under(&format!("rollouts/{id}/done/")).count();
            entries.push(HistoryEntry {
                spec,
                decision,
                done,
            });
        }
        entries.sort_by_key(|e| e.spec.created_ms);
        Ok(entries)
    }

    fn records<T: serde::de::DeserializeOwned>(
        &self,
        mirror: &Mirror,
        under: &str,
    ) -> Result<BTreeMap<String, T>> {
        mirror
            .under(under)
            .map(|(replica, value)| {
                super::parse(&self.name, &format!("{under}{replica}"), value)
                    .map(|record| (replica.to_owned(), record))
            })
            .collect()
    }

    fn malformed(&self, key: &str, message: String) -> Error {
        Error::FleetState {
            fleet: self.name.clone(),
            key: key.to_owned(),
            message,
        }
    }

    /// Rolls `preset` out to every member.
    pub async fn apply(&self, preset: &Preset, options: &RolloutOptions) -> Result<RolloutReport> {
        preset.validate(&preset.name)?;
        if !preset.byte_patches.is_empty() {
            return Err(self.refused(format!(
                "preset {:?} has byte patches; a fleet rollout carries live patches and server rules only",
                preset.name
            )));
        }
        self.rollout(
            |_| {
                Ok(RolloutKind::Apply {
                    preset: preset.clone(),
                })
            },
            options,
        )
        .await
    }

    /// Undoes rollout `target` (the last one of the desired state when `None`) on every
    /// member.
    pub async fn revert(
        &self,
        target: Option<&str>,
        options: &RolloutOptions,
    ) -> Result<RolloutReport> {
        self.rollout(
            |desired| {
                let target = match target {
                    Some(id) => id.to_owned(),
                    None => desired
                        .rollouts
                        .last()
                        .map(|r| r.id.clone())
                        .ok_or_else(|| self.refused("the desired state holds no rollout to revert"))?,
                };
                if !desired.rollouts.iter().any(|r| r.id == target) {
                    return Err(self.refused(format!(
                        "rollout {target} is not part of the desired state (never committed, or reverted already)"
                    )));
                }
                Ok(RolloutKind::Revert { target })
            },
            options,
        )
        .await
    }

    async fn rollout(
        &self,
        action: impl FnOnce(&DesiredState) -> Result<RolloutKind>,
        options: &RolloutOptions,
    ) -> Result<RolloutReport> {
        let requests_before = self.client.requests();
        let mut follower = Follower::start(Arc::clone(&self.client), &self.name).await?;
        let settled_first = self.settle(&mut follower, options).await?;
        let mirror = &follower.mirror;
        let desired = mirror.desired()?;
        let desired_bytes = mirror.get("desired").map(<[u8]>::to_vec);
        let members = mirror.members()?;
        if members.is_empty() {
            return Err(self.refused("no member is registered (start `hotpatch serve --fleet`)"));
        }
        let mut headers: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (replica, record) in &members {
            headers
                .entry(record.model_sha256.as_str())
                .or_default()
                .push(replica.as_str());
        }
        if headers.len() > 1 {
            let described: Vec<String> = headers
                .iter()
                .map(|(sha, replicas)| {
                    format!("{} on {}", &sha[..sha.len().min(16)], replicas.join(", "))
                })
                .collect();
            return Err(self.refused(format!(
                "members serve models with different headers ({}); nothing was changed",
                described.join("; ")
            )));
        }
        let model_sha256 = headers
            .keys()
            .next()
            .map(|s| (*s).to_owned())
            .unwrap_or_default();
        let action = action(&desired)?;
        let created_ms = now_ms();
        let id = format!(
            "{created_ms}-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..8]
        );
        let spec = RolloutSpec {
            schema: SCHEMA,
            id: id.clone(),
            action,
            members: members.keys().cloned().collect(),
            model_sha256,
            base_revision: desired.revision,
            drain: options.drain,
            created_ms,
            deadline_ms: created_ms
                + u64::try_from(options.prepare_timeout.as_millis()).unwrap_or(u64::MAX / 2),
        };
        let guard = match &desired_bytes {
            Some(bytes) => Compare::Value(self.key("desired"), bytes.clone()),
            None => Compare::Absent(self.key("desired")),
        };
        let (recorded, _) = self
            .client
            .txn(
                &[Compare::Absent(self.key("active")), guard],
                &[
                    Op::put(self.key("active"), id.clone()),
                    Op::put(self.key(&format!("rollouts/{id}/spec")), to_json(&spec)),
                ],
            )
            .await?;
        if !recorded {
            let fresh = Mirror::load(&self.client, &self.name).await?;
            if let Some(other) = fresh.get("active") {
                return Err(Error::RolloutInFlight {
                    fleet: self.name.clone(),
                    rollout: String::from_utf8_lossy(other).into_owned(),
                    phase: "prepare".into(),
                });
            }
            return Err(self.refused("the desired state changed while the rollout was being recorded; nothing was changed, run it again"));
        }
        let mut report = self.drive(&mut follower, &spec, options).await?;
        report.settled_first = settled_first;
        report.etcd_requests = self.client.requests() - requests_before;
        Ok(report)
    }

    /// Finishes or aborts a rollout left in flight; errors when it may still be
    /// progressing under its own coordinator.
    async fn settle(
        &self,
        follower: &mut Follower,
        options: &RolloutOptions,
    ) -> Result<Option<String>> {
        let Some(id) = follower.mirror.get("active") else {
            return Ok(None);
        };
        let id = String::from_utf8_lossy(id).into_owned();
        let spec: RolloutSpec = follower
            .mirror
            .record(&format!("rollouts/{id}/spec"))?
            .ok_or_else(|| {
                self.malformed("active", format!("names rollout {id}, which has no spec"))
            })?;
        let decision: Option<Decision> =
            follower.mirror.record(&format!("rollouts/{id}/decision"))?;
        if decision.is_none()
            && matches!(self.verdicts(&follower.mirror, &spec), Verdicts::Pending)
            && now_ms() < spec.deadline_ms
        {
            return Err(Error::RolloutInFlight {
                fleet: self.name.clone(),
                rollout: id,
                phase: "prepare".into(),
            });
        }
        let outcome = match self.drive(follower, &spec, options).await {
            Ok(report) => format!("rollout {id} committed at revision {}", report.revision),
            Err(Error::RolloutAborted { reason, .. }) => format!("rollout {id} aborted: {reason}"),
            Err(error) => return Err(error),
        };
        Ok(Some(outcome))
    }

    fn verdicts(&self, mirror: &Mirror, spec: &RolloutSpec) -> Verdicts {
        let mut pending = false;
        for replica in &spec.members {
            let key = format!("rollouts/{}/prepare/{replica}", spec.id);
            match mirror.record::<PrepareVerdict>(&key) {
                Ok(Some(PrepareVerdict::Ready)) => {}
                Ok(Some(PrepareVerdict::Refused { reason })) => {
                    return Verdicts::Refused(format!("member {replica} refused: {reason}"));
                }
                Err(error) => return Verdicts::Refused(format!("member {replica}: {error}")),
                Ok(None) if mirror.get(&format!("members/{replica}")).is_none() => {
                    return Verdicts::Refused(format!(
                        "member {replica} left the fleet (its lease expired) before it prepared"
                    ));
                }
                Ok(None) => pending = true,
            }
        }
        if pending {
            Verdicts::Pending
        } else {
            Verdicts::AllReady
        }
    }

    /// Runs a recorded rollout from wherever it stands to its end.
    async fn drive(
        &self,
        follower: &mut Follower,
        spec: &RolloutSpec,
        options: &RolloutOptions,
    ) -> Result<RolloutReport> {
        let id = &spec.id;
        let decision_key = format!("rollouts/{id}/decision");
        let started = Instant::now();
        let recorded: Option<Decision> = follower.mirror.record(&decision_key)?;
        let decision = match recorded {
            Some(decision) => decision,
            None => {
                let deadline = tokio::time::Instant::now()
                    + Duration::from_millis(spec.deadline_ms.saturating_sub(now_ms()));
                let verdict = loop {
                    match self.verdicts(&follower.mirror, spec) {
                        Verdicts::Pending => {}
                        Verdicts::AllReady => break Ok(()),
                        Verdicts::Refused(reason) => break Err(reason),
                    }
                    if !follower.next(deadline).await.unwrap_or(true) {
                        let silent: Vec<String> = spec
                            .members
                            .iter()
                            .filter(|m| {
                                follower
                                    .mirror
                                    .get(&format!("rollouts/{id}/prepare/{m}"))
                                    .is_none()
                            })
                            .cloned()
                            .collect();
                        break Err(format!(
                            "the prepare deadline passed with members still silent ({})",
                            silent.join(", ")
                        ));
                    }
                };
                match verdict {
                    Ok(()) => {
                        byte_tier::failpoint("fleet-coordinator-before-commit");
                        self.commit(follower, spec).await?
                    }
                    Err(reason) => self.abort(spec, reason).await?,
                }
            }
        };
        let prepare_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let revision = match decision {
            Decision::Commit { revision, .. } => revision,
            Decision::Abort { reason, .. } => {
                self.clear_active(id).await?;
                return Err(Error::RolloutAborted {
                    fleet: self.name.clone(),
                    rollout: id.clone(),
                    reason,
                });
            }
        };
        // Committed: wait for every member that is still registered to apply.
        let deadline = tokio::time::Instant::now() + options.apply_timeout;
        loop {
            let waiting = spec.members.iter().any(|m| {
                follower
                    .mirror
                    .get(&format!("rollouts/{id}/done/{m}"))
                    .is_none()
                    && follower.mirror.get(&format!("members/{m}")).is_some()
            });
            if !waiting || !follower.next(deadline).await.unwrap_or(true) {
                break;
            }
        }
        let mut members = Vec::new();
        let mut pending = Vec::new();
        let mut done_times = Vec::new();
        for replica in &spec.members {
            let prepared = follower
                .mirror
                .record(&format!("rollouts/{id}/prepare/{replica}"))
                .unwrap_or(None);
            let done: Option<Done> = follower
                .mirror
                .record(&format!("rollouts/{id}/done/{replica}"))
                .unwrap_or(None);
            match &done {
                Some(d) => done_times.push(d.at_ms),
                None => pending.push(replica.clone()),
            }
            members.push(MemberOutcome {
                replica: replica.clone(),
                prepared,
                done,
            });
        }
        self.clear_active(id).await?;
        let first = done_times.iter().min().copied().unwrap_or(0);
        let last = done_times.iter().max().copied().unwrap_or(0);
        Ok(RolloutReport {
            fleet: self.name.clone(),
            id: id.clone(),
            action: spec.action.clone(),
            revision,
            members,
            pending,
            prepare_ms,
            total_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            skew_ms: last - first,
            etcd_requests: 0,
            settled_first: None,
        })
    }

    /// Writes `commit` and the new desired state, guarded on no decision and on the
    /// desired state being the rollout's base.
    async fn commit(&self, follower: &Follower, spec: &RolloutSpec) -> Result<Decision> {
        let mirror = &follower.mirror;
        let desired = mirror.desired()?;
        if desired.revision != spec.base_revision {
            return self
                .abort(
                    spec,
                    format!(
                        "the desired state moved to revision {} (the rollout built on {})",
                        desired.revision, spec.base_revision
                    ),
                )
                .await;
        }
        let mut next = desired.clone();
        next.schema = SCHEMA;
        next.revision = desired.revision + 1;
        match &spec.action {
            RolloutKind::Apply { preset } => next.rollouts.push(DesiredRollout {
                id: spec.id.clone(),
                preset: preset.clone(),
            }),
            RolloutKind::Revert { target } => next.rollouts.retain(|r| &r.id != target),
        }
        let decision = Decision::Commit {
            revision: next.revision,
            at_ms: now_ms(),
        };
        let decision_key = self.key(&format!("rollouts/{}/decision", spec.id));
        let guard = match mirror.get("desired") {
            Some(bytes) => Compare::Value(self.key("desired"), bytes.to_vec()),
            None => Compare::Absent(self.key("desired")),
        };
        let (committed, _) = self
            .client
            .txn(
                &[Compare::Absent(decision_key.clone()), guard],
                &[
                    Op::put(decision_key.clone(), to_json(&decision)),
                    Op::put(self.key("desired"), to_json(&next)),
                ],
            )
            .await?;
        if committed {
            return Ok(decision);
        }
        // Someone else decided first (a second coordinator): take their decision.
        let (_, existing) = self.client.get(&decision_key).await?;
        match existing {
            Some(kv) => super::parse(&self.name, "decision", &kv.value),
            None => {
                self.abort(spec, "the desired state changed before the commit".into())
                    .await
            }
        }
    }

    /// Writes `abort` (unless a decision exists, which is returned instead).
    async fn abort(&self, spec: &RolloutSpec, reason: String) -> Result<Decision> {
        let decision = Decision::Abort {
            reason,
            at_ms: now_ms(),
        };
        let decision_key = self.key(&format!("rollouts/{}/decision", spec.id));
        let (written, _) = self
            .client
            .txn(
                &[Compare::Absent(decision_key.clone())],
                &[Op::put(decision_key.clone(), to_json(&decision))],
            )
            .await?;
        if written {
            return Ok(decision);
        }
        let (_, existing) = self.client.get(&decision_key).await?;
        match existing {
            Some(kv) => super::parse(&self.name, "decision", &kv.value),
            None => Ok(decision),
        }
    }

    async fn clear_active(&self, id: &str) -> Result<()> {
        self.client
            .txn(
                &[Compare::Value(self.key("active"), id.as_bytes().to_vec())],
                &[Op::Delete(self.key("active"))],
            )
            .await?;
        Ok(())
    }
}
