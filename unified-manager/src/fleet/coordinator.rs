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
//!
//! A rolling rollout prepares the same way, then lets one member apply at a time (its
//! `wave` key), waits for its `done`, sends the health check to its proxy and records
//! the result; the next member goes only after a pass. When every member has passed it
//! commits as above (the members hold the change already, so nothing moves). A failed
//! check, a member that does not apply in time or leaves: `abort`, which every member
//! that applied takes back out by converging (each writes `reverted`), and the call
//! fails with the reason. The coordinator driving it holds `rollouts/ID/coordinator`
//! under a lease of its own; when that key is gone (the coordinator died), the next
//! call takes it and resumes the rollout where the keys say it stands.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::etcd::{Compare, EtcdClient, EtcdTls, Op};
use super::{
    Decision, DesiredRollout, DesiredState, Done, Follower, HealthCheck, HealthResult,
    MemberRecord, Mirror, PrepareVerdict, Rollback, RollingSpec, RolloutKind, RolloutSpec, SCHEMA,
    WaveStep, now_ms, prefix, to_json,
};
use crate::error::{Error, Result};
use crate::preset::Preset;

/// Seconds the lease of a rolling rollout's coordinator lives without a renewal.
const COORDINATOR_LEASE_TTL_SECS: i64 = 5;

/// How a rollout runs.
#[derive(Clone, Debug)]
pub struct RolloutOptions {
    /// How long members have to prepare before the rollout is aborted.
    pub prepare_timeout: Duration,
    /// How long to wait for members to apply after the commit (the commit stands
    /// either way: a member that has not applied converges when it can).
    pub apply_timeout: Duration,
    /// Apply with a drain on every member.
    pub drain: bool,
    /// Roll out one member at a time, each checked with this before the next (after
    /// the commit when none is given: every member at once). `apply_timeout` bounds
    /// each member's apply.
    pub rolling: Option<HealthCheck>,
}

impl Default for RolloutOptions {
    fn default() -> RolloutOptions {
        RolloutOptions {
            prepare_timeout: Duration::from_secs(30),
            apply_timeout: Duration::from_secs(60),
            drain: false,
            rolling: None,
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
    /// Its health check (rolling rollouts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthResult>,
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
    /// Whether it rolled out one member at a time.
    pub rolling: bool,
}

/// Where a rolling rollout stands.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RollingProgress {
    /// Members let apply, in order.
    pub admitted: Vec<String>,
    /// Members that reported having applied.
    pub applied: Vec<String>,
    /// Health checks so far, by member.
    pub health: BTreeMap<String, HealthResult>,
    /// Members that took the change back out after an abort.
    pub reverted: Vec<String>,
    /// The rollback's outcome, once the coordinator has waited for it.
    pub rollback: Option<Rollback>,
    /// Whether a coordinator is driving it now.
    pub driven: bool,
}

/// The state of a rollout in flight.
#[derive(Clone, Debug, Serialize)]
pub struct ActiveRollout {
    /// Its spec.
    pub spec: RolloutSpec,
    /// `prepare`, `rolling` (a rolling rollout past prepare), `commit` or `abort`.
    pub phase: String,
    /// Verdicts so far.
    pub prepared: BTreeMap<String, PrepareVerdict>,
    /// Done reports so far.
    pub done: BTreeMap<String, Done>,
    /// A rolling rollout's progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolling: Option<RollingProgress>,
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
    /// A rolling rollout's progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rolling: Option<RollingProgress>,
}

/// The lease under which a coordinator drives a rolling rollout, kept alive by a task
/// until it is released (or the process dies, and the lease expires).
struct Claim {
    lease: i64,
    keeper: tokio::task::JoinHandle<()>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.keeper.abort();
    }
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
                let rolling = self.progress(&mirror, &spec)?;
                let phase = match decision {
                    None if rolling.as_ref().is_some_and(|p| !p.admitted.is_empty()) => "rolling",
                    None => "prepare",
                    Some(Decision::Commit { .. }) => "commit",
                    Some(Decision::Abort { .. }) => "abort",
                };
                Some(ActiveRollout {
                    phase: phase.into(),
                    prepared: self.records(&mirror, &format!("rollouts/{id}/prepare/"))?,
                    done: self.records(&mirror, &format!("rollouts/{id}/done/"))?,
                    rolling,
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
            let rolling = self.progress(&mirror, &spec)?;
            entries.push(HistoryEntry {
                spec,
                decision,
                done,
                rolling,
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

    /// A rolling rollout's progress as the keys say (`None` for one that is not rolling).
    fn progress(&self, mirror: &Mirror, spec: &RolloutSpec) -> Result<Option<RollingProgress>> {
        if spec.rolling.is_none() {
            return Ok(None);
        }
        let id = &spec.id;
        let has = |what: &str, m: &str| mirror.get(&format!("rollouts/{id}/{what}/{m}")).is_some();
        let mut admitted: Vec<(usize, String)> = Vec::new();
        for (replica, value) in mirror.under(&format!("rollouts/{id}/wave/")) {
            let step: WaveStep =
                super::parse(&self.name, &format!("rollouts/{id}/wave/{replica}"), value)?;
            admitted.push((step.position, replica.to_owned()));
        }
        admitted.sort();
        Ok(Some(RollingProgress {
            applied: spec
                .members
                .iter()
                .filter(|m| has("done", m))
                .cloned()
                .collect(),
            reverted: spec
                .members
                .iter()
                .filter(|m| has("reverted", m))
                .cloned()
                .collect(),
            admitted: admitted.into_iter().map(|(_, m)| m).collect(),
            health: self.records(mirror, &format!("rollouts/{id}/health/"))?,
            rollback: mirror.record(&format!("rollouts/{id}/rollback"))?,
            driven: mirror.get(&format!("rollouts/{id}/coordinator")).is_some(),
        }))
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
        if let Some(check) = &options.rolling {
            check.validate().map_err(|m| self.refused(m))?;
        }
        let requests_before = self.client.requests();
        let mut follower = Follower::start(Arc::clone(&self.client), &self.name).await?;
        let settled_first = self.settle(&mut follower, options).await?;
        if settled_first.is_some() {
            // The settled rollout's last writes (its decision and desired state) may not
            // have come through the watch yet: read everything again.
            follower = Follower::start(Arc::clone(&self.client), &self.name).await?;
        }
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
            rolling: options.rolling.as_ref().map(|health| RollingSpec {
                health: health.clone(),
                step_timeout_ms: u64::try_from(options.apply_timeout.as_millis())
                    .unwrap_or(u64::MAX / 2),
            }),
        };
        let guard = match &desired_bytes {
            Some(bytes) => Compare::Value(self.key("desired"), bytes.clone()),
            None => Compare::Absent(self.key("desired")),
        };
        let mut ops = vec![
            Op::put(self.key("active"), id.clone()),
            Op::put(self.key(&format!("rollouts/{id}/spec")), to_json(&spec)),
        ];
        // A rolling rollout is recorded together with its coordinator's claim, so that
        // no other call takes it over while this one lives.
        let mut claim = if spec.rolling.is_some() {
            let claim = self.claim_lease().await?;
            ops.push(Op::Put {
                key: self.key(&format!("rollouts/{id}/coordinator")),
                value: std::process::id().to_string().into_bytes(),
                lease: claim.lease,
            });
            Some(claim)
        } else {
            None
        };
        let recorded = self
            .client
            .txn(&[Compare::Absent(self.key("active")), guard], &ops)
            .await
            .map(|(recorded, _)| recorded);
        if !matches!(recorded, Ok(true)) {
            self.release(claim.take()).await;
        }
        if !recorded? {
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
        let driven = self.drive(&mut follower, &spec, options).await;
        self.release(claim).await;
        let mut report = driven?;
        report.settled_first = settled_first;
        report.etcd_requests = self.client.requests() - requests_before;
        Ok(report)
    }

    /// A lease for a rolling rollout's coordinator key, renewed by a task of its own.
    async fn claim_lease(&self) -> Result<Claim> {
        let lease = self.client.grant(COORDINATOR_LEASE_TTL_SECS).await?;
        let client = Arc::clone(&self.client);
        let period = Duration::from_millis(
            u64::try_from(COORDINATOR_LEASE_TTL_SECS).unwrap_or(5) * 1000 / 3,
        );
        let keeper = tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                // A failed renewal is tried again next period; a lease that lapsed
                // lets the next call take the rollout over, which is the point.
                let _ = client.keep_alive_once(lease).await;
            }
        });
        Ok(Claim { lease, keeper })
    }

    /// Revokes a claim's lease (its coordinator key goes with it).
    async fn release(&self, claim: Option<Claim>) {
        if let Some(claim) = claim {
            claim.keeper.abort();
            // Unreachable etcd: the lease expires on its own.
            let _ = self.client.revoke(claim.lease).await;
        }
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
        let coordinator_key = format!("rollouts/{id}/coordinator");
        let pending = matches!(self.verdicts(&follower.mirror, &spec), Verdicts::Pending);
        let in_flight = |phase: &str| Error::RolloutInFlight {
            fleet: self.name.clone(),
            rollout: id.clone(),
            phase: phase.into(),
        };
        if spec.rolling.is_some() && follower.mirror.get(&coordinator_key).is_some() {
            return Err(in_flight(if pending { "prepare" } else { "rolling" }));
        }
        if decision.is_none() && pending && now_ms() < spec.deadline_ms {
            return Err(in_flight("prepare"));
        }
        // A rolling rollout whose coordinator is gone: take it over, so that no other
        // call drives it at the same time.
        let claim = if spec.rolling.is_some() {
            let claim = self.claim_lease().await?;
            let (taken, _) = self
                .client
                .txn(
                    &[Compare::Absent(self.key(&coordinator_key))],
                    &[Op::Put {
                        key: self.key(&coordinator_key),
                        value: std::process::id().to_string().into_bytes(),
                        lease: claim.lease,
                    }],
                )
                .await?;
            if !taken {
                self.release(Some(claim)).await;
                return Err(in_flight("rolling"));
            }
            Some(claim)
        } else {
            None
        };
        let driven = self.drive(follower, &spec, options).await;
        self.release(claim).await;
        let outcome = match driven {
            Ok(report) => format!("rollout {id} committed at revision {}", report.revision),
            Err(Error::RolloutAborted { reason, .. }) => format!("rollout {id} aborted: {reason}"),
            Err(error @ Error::RolloutRolledBack { .. }) => error.to_string(),
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
                let verdict = match (verdict, &spec.rolling) {
                    (Ok(()), Some(rolling)) => self.wave(follower, spec, rolling).await?,
                    (verdict, _) => verdict,
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
                if spec.rolling.is_some()
                    && follower
                        .mirror
                        .under(&format!("rollouts/{id}/wave/"))
                        .next()
                        .is_some()
                {
                    let rollback = self.roll_back(follower, spec, options).await?;
                    self.clear_active(id).await?;
                    return Err(Error::RolloutRolledBack {
                        fleet: self.name.clone(),
                        rollout: id.clone(),
                        reason,
                        reverted: rollback.reverted,
                        pending: rollback.pending,
                    });
                }
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
            // A rolling rollout's health results were written before the commit; the
            // mirror shows them once the watch has delivered them.
            let waiting = spec.members.iter().any(|m| {
                let missing = |what: &str| {
                    follower
                        .mirror
                        .get(&format!("rollouts/{id}/{what}/{m}"))
                        .is_none()
                };
                (missing("done") || (spec.rolling.is_some() && missing("health")))
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
            let health = follower
                .mirror
                .record(&format!("rollouts/{id}/health/{replica}"))
                .unwrap_or(None);
            members.push(MemberOutcome {
                replica: replica.clone(),
                prepared,
                done,
                health,
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
            rolling: spec.rolling.is_some(),
        })
    }

    /// The rolling phase: lets each member apply in turn and checks it; `Ok(Err)` with
    /// the reason to abort. Picks up where the keys say it stands (a resumed rollout).
    async fn wave(
        &self,
        follower: &mut Follower,
        spec: &RolloutSpec,
        rolling: &RollingSpec,
    ) -> Result<std::result::Result<(), String>> {
        let id = &spec.id;
        let step = Duration::from_millis(rolling.step_timeout_ms);
        for (position, replica) in spec.members.iter().enumerate() {
            let health_key = format!("rollouts/{id}/health/{replica}");
            if let Some(result) = follower.mirror.record::<HealthResult>(&health_key)? {
                if result.passed {
                    continue;
                }
                return Ok(Err(format!(
                    "the health check failed on {replica}: {}",
                    result.detail
                )));
            }
            let wave_key = format!("rollouts/{id}/wave/{replica}");
            if follower.mirror.get(&wave_key).is_none() {
                if follower.mirror.get(&format!("members/{replica}")).is_none() {
                    return Ok(Err(format!(
                        "member {replica} left the fleet (its lease expired) before its turn"
                    )));
                }
                let admitted = WaveStep {
                    position,
                    at_ms: now_ms(),
                };
                self.client
                    .put(&self.key(&wave_key), &to_json(&admitted), 0)
                    .await?;
            }
            let deadline = tokio::time::Instant::now() + step;
            let record = loop {
                let record: Option<MemberRecord> =
                    follower.mirror.record(&format!("members/{replica}"))?;
                let done = follower
                    .mirror
                    .get(&format!("rollouts/{id}/done/{replica}"))
                    .is_some();
                match record {
                    None => {
                        return Ok(Err(format!(
                            "member {replica} left the fleet (its lease expired) during its turn"
                        )));
                    }
                    Some(record) if done => break record,
                    Some(MemberRecord {
                        error: Some(error), ..
                    }) => {
                        return Ok(Err(format!("member {replica} could not apply: {error}")));
                    }
                    Some(_) => {}
                }
                if !follower.next(deadline).await.unwrap_or(true) {
                    return Ok(Err(format!(
                        "member {replica} did not apply within {} s",
                        step.as_secs()
                    )));
                }
            };
            let result = probe(&rolling.health, &record.listen).await;
            self.client
                .put(&self.key(&health_key), &to_json(&result), 0)
                .await?;
            if !result.passed {
                return Ok(Err(format!(
                    "the health check failed on {replica}: {}",
                    result.detail
                )));
            }
            byte_tier::failpoint("fleet-coordinator-after-health");
        }
        Ok(Ok(()))
    }

    /// After an aborted rolling rollout: waits for every member that was let apply to
    /// take the change back out (its `reverted` key), and records the outcome.
    async fn roll_back(
        &self,
        follower: &mut Follower,
        spec: &RolloutSpec,
        options: &RolloutOptions,
    ) -> Result<Rollback> {
        let id = &spec.id;
        let rollback_key = format!("rollouts/{id}/rollback");
        if let Some(rollback) = follower.mirror.record::<Rollback>(&rollback_key)? {
            return Ok(rollback);
        }
        let admitted: Vec<String> = spec
            .members
            .iter()
            .filter(|m| {
                follower
                    .mirror
                    .get(&format!("rollouts/{id}/wave/{m}"))
                    .is_some()
            })
            .cloned()
            .collect();
        let deadline = tokio::time::Instant::now() + options.apply_timeout;
        let pending = loop {
            let pending: Vec<String> = admitted
                .iter()
                .filter(|m| {
                    follower
                        .mirror
                        .get(&format!("rollouts/{id}/reverted/{m}"))
                        .is_none()
                })
                .cloned()
                .collect();
            // A member that is gone reverts when it converges again; waiting for it
            // would only wait for the deadline.
            let reachable = pending
                .iter()
                .any(|m| follower.mirror.get(&format!("members/{m}")).is_some());
            if !reachable || !follower.next(deadline).await.unwrap_or(true) {
                break pending;
            }
        };
        let rollback = Rollback {
            reverted: admitted
                .iter()
                .filter(|m| !pending.contains(m))
                .cloned()
                .collect(),
            pending,
            at_ms: now_ms(),
        };
        self.client
            .put(&self.key(&rollback_key), &to_json(&rollback), 0)
            .await?;
        Ok(rollback)
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

/// Sends a health check to the proxy at `listen` and judges its answer.
async fn probe(check: &HealthCheck, listen: &str) -> HealthResult {
    let check = check.clone();
    let url = format!("http://{listen}{}", check.path);
    let started = Instant::now();
    let outcome = tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_millis(check.timeout_ms.max(1))))
            .build()
            .into();
        let mut response = agent
            .post(&url)
            .send_json(check.request_body())
            .map_err(|e| format!("POST {url}: {e}"))?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("POST {url}: reading the answer: {e}"))?;
        check.judge(status, &body)
    })
    .await
    .unwrap_or_else(|e| Err(format!("the health check's task failed: {e}")));
    HealthResult {
        passed: outcome.is_ok(),
        detail: outcome.err().unwrap_or_default(),
        latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        at_ms: now_ms(),
    }
}
