//! The member side of a fleet: what `hotpatch serve --fleet NAME` runs beside its proxy.
//!
//! A member registers under a lease-bound key and keeps the lease alive; it follows the
//! fleet's keys and, on every change, does what the whole state asks of it (so a missed
//! event or a restart changes nothing about the outcome):
//!
//! - converge: the rollouts whose patches it holds (named `fleet:ROLLOUT:NAME` in its
//!   journal and rules) are compared with the desired state; what is not desired is
//!   reverted, what is desired and missing is applied, each rollout as one transaction.
//!   Until the first convergence, the proxy answers generation requests 503.
//! - prepare: for a rollout in flight that lists it, it runs every check the memory
//!   tier runs before a byte moves (`LiveModel::plan`, nothing written) and checks the
//!   rules, then writes `ready` or `refused` with the reason.
//! - done: once a committed rollout is applied here, it writes `done` with its epoch.
//! - rolling: a rolling rollout's `wave/MEMBER` key lets this member apply before the
//!   decision; it converges to the desired state with the rollout's change made and
//!   writes `done`. An abort then takes the change back out by the same convergence,
//!   and it writes `reverted`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use memory_tier::MemoryPatch;
use server_tier::{Control, FleetGauges, RuleSet};

use super::etcd::{EtcdClient, EtcdTls};
use super::{
    Decision, DesiredState, Done, Follower, MemberRecord, PrepareVerdict, RolloutKind, RolloutSpec,
    SCHEMA, fleet_patch_name, model_header_sha256, now_ms, prefix, rollout_of, to_json,
};
use crate::error::{Error, Result};
use crate::preset::Preset;

/// How a member joins its fleet.
#[derive(Clone, Debug)]
pub struct MemberOptions {
    /// The fleet.
    pub fleet: String,
    /// Its replica id.
    pub replica: String,
    /// The etcd endpoints.
    pub endpoints: Vec<String>,
    /// TLS for the etcd connection.
    pub tls: EtcdTls,
    /// The upstream it fronts (recorded for operators).
    pub upstream: String,
    /// The proxy's address (recorded for operators).
    pub listen: String,
    /// Its lease's time to live, in seconds (etcd's minimum is 2).
    pub lease_ttl_secs: i64,
}

/// The reason the proxy gives while it converges.
pub const CONVERGING: &str = "this fleet member has not yet converged to its fleet's desired state";

struct Member {
    options: MemberOptions,
    client: Arc<EtcdClient>,
    control: Control,
    model_sha256: String,
    lease: std::sync::Mutex<i64>,
    /// The last record written, so that an unchanged one is not written again.
    last_record: std::sync::Mutex<Vec<u8>>,
    converged_once: std::sync::atomic::AtomicBool,
    /// The desired revision this member last converged to.
    applied_revision: std::sync::atomic::AtomicU64,
    /// The rollout records this member has written (keys without the fleet's prefix),
    /// for the rollout in flight.
    written: std::sync::Mutex<BTreeSet<String>>,
}

/// Runs a member until the future is dropped. The proxy must have been started with
/// its generation hold set (`ProxyConfig::hold_generation`); the member lifts it once it
/// has converged. Returns only on an error it cannot retry (a bad name, no model).
pub async fn run_member(options: MemberOptions, control: Control) -> Result<()> {
    super::check_name("fleet", &options.fleet)?;
    super::check_name("replica", &options.replica)?;
    let model = control.model().ok_or_else(|| Error::FleetRefused {
        fleet: options.fleet.clone(),
        message: if control.serves_a_set() {
            "a fleet member patches one file, and --model names a shard of a set: serve \
             the set without --fleet, or a merged file with it"
                .into()
        } else {
            "a fleet member needs --model (the file its upstream serves)".into()
        },
    })?;
    let client = Arc::new(EtcdClient::with_tls(&options.endpoints, &options.tls)?);
    let member = Arc::new(Member {
        model_sha256: model_header_sha256(&model),
        client,
        control,
        lease: std::sync::Mutex::new(0),
        last_record: std::sync::Mutex::new(Vec::new()),
        converged_once: std::sync::atomic::AtomicBool::new(false),
        applied_revision: std::sync::atomic::AtomicU64::new(0),
        written: std::sync::Mutex::new(BTreeSet::new()),
        options,
    });
    // The lease is kept alive by its own task, so that slow work here never lets it
    // lapse.
    let keeper = tokio::spawn(keep_lease(Arc::clone(&member)));
    let result = follow(&member).await;
    keeper.abort();
    result
}

async fn keep_lease(member: Arc<Member>) {
    let period = Duration::from_millis(
        u64::try_from(member.options.lease_ttl_secs.max(2)).unwrap_or(2) * 1000 / 3,
    );
    loop {
        let lease = *member.lease.lock().unwrap_or_else(|p| p.into_inner());
        let renewed = if lease == 0 {
            false
        } else {
            matches!(member.client.keep_alive_once(lease).await, Ok(ttl) if ttl > 0)
        };
        if !renewed && lease != 0 {
            // Expired (or unreachable for now): a fresh lease and record. An
            // unreachable cluster is retried on the next period.
            if let Ok(fresh) = member.client.grant(member.options.lease_ttl_secs).await {
                *member.lease.lock().unwrap_or_else(|p| p.into_inner()) = fresh;
                member
                    .last_record
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
                let _ = member.register(None).await;
            }
        }
        tokio::time::sleep(period).await;
    }
}

async fn follow(member: &Arc<Member>) -> Result<()> {
    // Until etcd answers, keep trying: a member that cannot reach its fleet keeps
    // answering 503 rather than serve a state it cannot check.
    let mut follower = loop {
        match member.start().await {
            Ok(follower) => break follower,
            Err(error) => {
                eprintln!("hotpatch serve: fleet {}: {error}", member.options.fleet);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    loop {
        if let Err(error) = member.step(&follower.mirror).await {
            eprintln!("hotpatch serve: fleet {}: {error}", member.options.fleet);
            let _ = member.register(Some(error.to_string())).await;
        }
        // Wake at least every few seconds, so a refused step is tried again.
        let until = tokio::time::Instant::now() + Duration::from_secs(3);
        if let Err(error) = follower.next(until).await {
            eprintln!("hotpatch serve: fleet {}: {error}", member.options.fleet);
        }
    }
}

impl Member {
    fn fleet(&self) -> &str {
        &self.options.fleet
    }

    fn key(&self, suffix: &str) -> Vec<u8> {
        format!("{}{suffix}", prefix(self.fleet())).into_bytes()
    }

    async fn start(self: &Arc<Self>) -> Result<Follower> {
        let lease = self.client.grant(self.options.lease_ttl_secs).await?;
        *self.lease.lock().unwrap_or_else(|p| p.into_inner()) = lease;
        Follower::start(Arc::clone(&self.client), self.fleet()).await
    }

    /// The rollouts this member holds, in the order it applied them, with the journal
    /// transaction of each one's memory patches.
    fn held(&self) -> Vec<(String, Option<u64>)> {
        let mut held: Vec<(String, Option<u64>)> = Vec::new();
        if let Some(model) = self.control.model() {
            let mut patches = model.applied_patches();
            patches.sort_by_key(|p| p.journal_transaction);
            for applied in patches {
                if let Some(rollout) = rollout_of(&applied.patch.name)
                    && !held.iter().any(|(r, _)| r == rollout)
                {
                    held.push((rollout.to_owned(), applied.journal_transaction));
                }
            }
        }
        for rule in self.control.rules().rules() {
            if let Some(rollout) = rollout_of(&rule.name)
                && !held.iter().any(|(r, _)| r == rollout)
            {
                held.push((rollout.to_owned(), None));
            }
        }
        held
    }

    /// Writes the member record (when it changed).
    async fn register(&self, error: Option<String>) -> Result<()> {
        let lease = *self.lease.lock().unwrap_or_else(|p| p.into_inner());
        if lease == 0 {
            return Ok(());
        }
        let held = self.held();
        let record = MemberRecord {
            schema: SCHEMA,
            replica: self.options.replica.clone(),
            upstream: self.options.upstream.clone(),
            listen: self.options.listen.clone(),
            model_sha256: self.model_sha256.clone(),
            applied_revision: self.applied_revision(),
            applied_rollouts: held.into_iter().map(|(r, _)| r).collect(),
            epoch: self.control.epoch(),
            error,
        };
        let value = to_json(&record);
        if *self.last_record.lock().unwrap_or_else(|p| p.into_inner()) == value {
            return Ok(());
        }
        self.client
            .put(
                &self.key(&format!("members/{}", self.options.replica)),
                &value,
                lease,
            )
            .await?;
        *self.last_record.lock().unwrap_or_else(|p| p.into_inner()) = value;
        Ok(())
    }

    /// Writes one of this member's rollout records (`prepare`, `done`, `reverted`) once.
    /// The mirror shows the write only when the watch delivers it, and every other
    /// member's write wakes this member meanwhile: without this, each wake-up would write
    /// the record again, and each write would wake every member, so the writes of a
    /// fleet grew with the square of its size (tens of thousands of puts per rollout
    /// at 50 members, enough to push etcd past its request timeouts and the members past
    /// their lease TTL).
    async fn put_once(&self, suffix: String, value: Vec<u8>) -> Result<()> {
        let seen = |written: &BTreeSet<String>| written.contains(&suffix);
        if seen(&self.written.lock().unwrap_or_else(|p| p.into_inner())) {
            return Ok(());
        }
        self.client.put(&self.key(&suffix), &value, 0).await?;
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(suffix);
        Ok(())
    }

    fn applied_revision(&self) -> u64 {
        self.applied_revision
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Does what the fleet's state asks of this member now.
    async fn step(&self, mirror: &super::Mirror) -> Result<()> {
        let desired = mirror.desired()?;
        let members = mirror.members().unwrap_or_default();
        let active: Option<String> = mirror
            .get("active")
            .map(|v| String::from_utf8_lossy(v).into_owned());
        let spec: Option<RolloutSpec> = match &active {
            Some(id) => mirror.record(&format!("rollouts/{id}/spec"))?,
            None => None,
        };
        let decision: Option<Decision> = match &active {
            Some(id) => mirror.record(&format!("rollouts/{id}/decision"))?,
            None => None,
        };
        // Records of rollouts no longer in flight are never written again.
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|key| {
                active
                    .as_ref()
                    .is_some_and(|id| key.starts_with(&format!("rollouts/{id}/")))
            });
        let phase = match (&spec, &decision) {
            (None, _) => 0,
            (Some(_), None) => 1,
            (Some(_), Some(Decision::Commit { .. })) => 2,
            (Some(_), Some(Decision::Abort { .. })) => 3,
        };

        // A rolling rollout that has let this member apply (and is not decided yet) is
        // part of what it converges to; once decided, the desired state says all: a
        // commit carries the rollout, an abort leaves it out, so a member that applied
        // reverts.
        let in_wave = match (&active, &spec, &decision) {
            (Some(id), Some(spec), None) => {
                spec.rolling.is_some()
                    && spec.base_revision == desired.revision
                    && mirror
                        .get(&format!("rollouts/{id}/wave/{}", self.options.replica))
                        .is_some()
            }
            _ => false,
        };
        let target = match &spec {
            Some(spec) if in_wave => spec.applied_to(&desired),
            _ => desired.clone(),
        };
        // Converge first: a commit shows up as a new desired state. A committed rollout
        // that asked for a drain is applied with one.
        let drain = match (&spec, &decision) {
            (Some(spec), Some(Decision::Commit { .. })) => spec.drain,
            (Some(spec), None) => in_wave && spec.drain,
            _ => false,
        };
        self.converge(&target, drain).await?;
        self.applied_revision
            .store(desired.revision, std::sync::atomic::Ordering::Release);
        if !self
            .converged_once
            .swap(true, std::sync::atomic::Ordering::AcqRel)
        {
            self.control.hold_generation(None);
        }
        self.register(None).await?;

        if let (Some(id), Some(spec)) = (&active, &spec)
            && spec.members.contains(&self.options.replica)
        {
            let mine = |what: &str| format!("rollouts/{id}/{what}/{}", self.options.replica);
            match &decision {
                None if mirror.get(&mine("prepare")).is_none() => {
                    let verdict = match self.prepare(spec, &desired) {
                        Ok(()) => PrepareVerdict::Ready,
                        Err(reason) => PrepareVerdict::Refused { reason },
                    };
                    self.put_once(mine("prepare"), to_json(&verdict)).await?;
                }
                None if in_wave && mirror.get(&mine("done")).is_none() => {
                    let done = Done {
                        revision: target.revision + 1,
                        epoch: self.control.epoch(),
                        at_ms: now_ms(),
                    };
                    self.put_once(mine("done"), to_json(&done)).await?;
                }
                Some(Decision::Abort { .. })
                    if spec.rolling.is_some()
                        && mirror.get(&mine("wave")).is_some()
                        && mirror.get(&mine("reverted")).is_none() =>
                {
                    // Converged to a desired state without the rollout just above: the
                    // change it applied in its turn is out again.
                    let reverted = Done {
                        revision: desired.revision,
                        epoch: self.control.epoch(),
                        at_ms: now_ms(),
                    };
                    self.put_once(mine("reverted"), to_json(&reverted)).await?;
                }
                Some(Decision::Commit { revision, .. })
                    if *revision == desired.revision && mirror.get(&mine("done")).is_none() =>
                {
                    let done = Done {
                        revision: desired.revision,
                        epoch: self.control.epoch(),
                        at_ms: now_ms(),
                    };
                    self.put_once(mine("done"), to_json(&done)).await?;
                }
                _ => {}
            }
        }
        self.control.set_fleet_gauges(FleetGauges {
            fleet: self.fleet().to_owned(),
            members: members.len() as u64,
            desired_revision: desired.revision,
            applied_revision: self.applied_revision(),
            rollout_phase: phase,
        });
        Ok(())
    }

    /// Reverts what is held and not desired, applies what is desired and not held.
    /// Returns whether anything changed.
    async fn converge(&self, desired: &DesiredState, drain: bool) -> Result<bool> {
        let held = self.held();
        let wanted: BTreeSet<&str> = desired.rollouts.iter().map(|r| r.id.as_str()).collect();
        let to_revert: Vec<&(String, Option<u64>)> = held
            .iter()
            .filter(|(r, _)| !wanted.contains(r.as_str()))
            .collect();
        let held_ids: BTreeSet<&str> = held.iter().map(|(r, _)| r.as_str()).collect();
        let to_apply: Vec<&super::DesiredRollout> = desired
            .rollouts
            .iter()
            .filter(|r| !held_ids.contains(r.id.as_str()))
            .collect();
        // Rules of a held rollout can be missing after a restart (rules live in the
        // proxy's memory; patches in the journal).
        let rules_missing: Vec<&super::DesiredRollout> = desired
            .rollouts
            .iter()
            .filter(|r| held_ids.contains(r.id.as_str()))
            .filter(|r| {
                let rules = self.control.rules();
                r.preset
                    .server_rules
                    .iter()
                    .any(|rule| rules.get(&fleet_patch_name(&r.id, &rule.name)).is_none())
            })
            .collect();
        if to_revert.is_empty() && to_apply.is_empty() && rules_missing.is_empty() {
            return Ok(false);
        }
        byte_tier::failpoint("fleet-member-before-apply");
        for (rollout, transaction) in to_revert.into_iter().rev() {
            self.revert_rollout(rollout, *transaction, drain).await?;
        }
        for rollout in to_apply {
            self.apply_rollout(&rollout.id, &rollout.preset, drain)
                .await?;
        }
        for rollout in rules_missing {
            self.add_rules(&rollout.id, &rollout.preset)?;
        }
        Ok(true)
    }

    fn memory_patches(
        rollout: &str,
        preset: &Preset,
    ) -> std::result::Result<Vec<MemoryPatch>, String> {
        if !preset.byte_patches.is_empty() {
            return Err(format!(
                "preset {:?} has byte patches, which a fleet rollout does not carry (live patches and server rules only)",
                preset.name
            ));
        }
        let mut patches = Vec::new();
        for (i, spec) in preset.memory_patches.iter().enumerate() {
            let mut patch = spec
                .to_patch()
                .map_err(|m| format!("memory_patch[{i}].transform: {m}"))?;
            patch.name = fleet_patch_name(rollout, &spec.name);
            patches.push(patch);
        }
        Ok(patches)
    }

    fn rules_with(&self, rollout: &str, preset: &Preset) -> std::result::Result<RuleSet, String> {
        let mut set = self.control.rules();
        for rule in &preset.server_rules {
            let mut rule = rule.clone();
            rule.name = fleet_patch_name(rollout, &rule.name);
            if set.get(&rule.name).is_none() {
                set.push(rule).map_err(|e| e.to_string())?;
            }
        }
        set.validate().map_err(|e| e.to_string())?;
        Ok(set)
    }

    fn add_rules(&self, rollout: &str, preset: &Preset) -> Result<()> {
        if preset.server_rules.is_empty() {
            return Ok(());
        }
        let set = self.rules_with(rollout, preset).map_err(Error::Server)?;
        self.control
            .replace_rules(set)
            .map_err(|e| Error::Server(e.to_string()))
    }

    async fn apply_rollout(&self, rollout: &str, preset: &Preset, drain: bool) -> Result<()> {
        let patches = Self::memory_patches(rollout, preset).map_err(|m| Error::FleetRefused {
            fleet: self.fleet().to_owned(),
            message: format!("rollout {rollout}: {m}"),
        })?;
        let applied = if patches.is_empty() {
            None
        } else {
            let applied = self
                .control
                .apply_live(patches, drain)
                .await
                .map_err(|e| Error::Server(format!("rollout {rollout}: {}", e.chain())))?;
            Some(applied)
        };
        if let Err(error) = self.add_rules(rollout, preset) {
            // The rules failed after the patches went in: take the patches back out, so
            // the rollout is all or nothing here too.
            if let Some(transaction) = applied
                .as_ref()
                .and_then(|a| a.reports.first())
                .and_then(|r| r.journal_transaction)
                && let Err(undo) = self
                    .control
                    .revert_live_transaction(transaction, drain)
                    .await
            {
                return Err(Error::RollbackFailed {
                    error: Box::new(error),
                    rollback: vec![undo.chain()],
                });
            }
            return Err(error);
        }
        Ok(())
    }

    async fn revert_rollout(
        &self,
        rollout: &str,
        transaction: Option<u64>,
        drain: bool,
    ) -> Result<()> {
        if let Some(transaction) = transaction {
            self.control
                .revert_live_transaction(transaction, drain)
                .await
                .map_err(|e| Error::Server(format!("revert rollout {rollout}: {}", e.chain())))?;
        } else if let Some(model) = self.control.model() {
            // Patches the journal lists without a transaction: one by one.
            for applied in model.applied_patches() {
                if rollout_of(&applied.patch.name) == Some(rollout) {
                    model.revert(applied.patch.id)?;
                }
            }
        }
        let rules = self.control.rules();
        let mine: Vec<String> = rules
            .rules()
            .iter()
            .filter(|r| rollout_of(&r.name) == Some(rollout))
            .map(|r| r.name.clone())
            .collect();
        for name in mine {
            self.control
                .remove_rule(&name)
                .map_err(|e| Error::Server(e.to_string()))?;
        }
        Ok(())
    }

    /// Every check the member can make before anything changes; the reason on refusal.
    fn prepare(
        &self,
        spec: &RolloutSpec,
        desired: &DesiredState,
    ) -> std::result::Result<(), String> {
        if spec.model_sha256 != self.model_sha256 {
            return Err(format!(
                "model header {} differs from the rollout's {}",
                self.model_sha256, spec.model_sha256
            ));
        }
        if desired.revision != spec.base_revision {
            return Err(format!(
                "desired state is at revision {}, the rollout builds on {}",
                desired.revision, spec.base_revision
            ));
        }
        let held: BTreeMap<String, Option<u64>> = self.held().into_iter().collect();
        let wanted: BTreeSet<&str> = desired.rollouts.iter().map(|r| r.id.as_str()).collect();
        if held.keys().any(|r| !wanted.contains(r.as_str()))
            || wanted.iter().any(|r| !held.contains_key(*r))
        {
            return Err("this member has not converged to the desired state yet".into());
        }
        match &spec.action {
            RolloutKind::Apply { preset } => {
                let patches = Self::memory_patches(&spec.id, preset)?;
                if !patches.is_empty() {
                    let model = self
                        .control
                        .model()
                        .ok_or_else(|| "no model attached".to_owned())?;
                    model.plan(&patches).map_err(|e| {
                        let mut message = e.to_string();
                        let mut source = std::error::Error::source(&e);
                        while let Some(s) = source {
                            message.push_str(&format!(": {s}"));
                            source = s.source();
                        }
                        message
                    })?;
                }
                self.rules_with(&spec.id, preset)?;
                Ok(())
            }
            RolloutKind::Revert { target } => {
                if !held.contains_key(target) {
                    return Err(format!("rollout {target} is not applied here"));
                }
                Ok(())
            }
        }
    }
}
