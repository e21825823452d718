//! What a fleet member needs from the proxy: live patches and reverts applied as the
//! admin API applies them (model-ops lock, optional drain, epoch, prompt caches erased),
//! a hold that answers generation requests 503 until the member has converged, and the
//! fleet gauges of `GET /metrics`. The fleet protocol itself (etcd, rollouts) lives in
//! unified-manager; this module only exposes the proxy's side.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use memory_tier::{LiveModel, MemoryPatch, PatchReport};

use crate::proxy::Shared;
use crate::{Control, Error, Result};

/// The fleet gauges a member publishes on `GET /metrics`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FleetGauges {
    /// The fleet's name.
    pub fleet: String,
    /// Members registered, as this member last saw them.
    pub members: u64,
    /// The desired state's revision.
    pub desired_revision: u64,
    /// The revision this member has applied.
    pub applied_revision: u64,
    /// The phase of the rollout in flight: 0 none, 1 prepare, 2 commit, 3 abort.
    pub rollout_phase: u64,
}

/// What a live apply did.
#[derive(Clone, Debug)]
pub struct LiveApplied {
    /// Each patch's report, in order.
    pub reports: Vec<PatchReport>,
    /// The proxy's patch epoch after it.
    pub epoch: u64,
}

/// Refuses a generation request while a hold is set.
pub(crate) fn check_hold(shared: &Shared) -> Result<()> {
    let hold = shared
        .generation_hold
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    match hold.as_ref() {
        Some(reason) => Err(Error::Unavailable(reason.clone())),
        None => Ok(()),
    }
}

/// Appends the fleet gauges, when the proxy is a fleet member.
pub(crate) fn prometheus(shared: &Shared, out: &mut String) {
    let gauges = shared
        .fleet
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let Some(g) = gauges else {
        return;
    };
    let held = u64::from(
        shared
            .generation_hold
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some(),
    );
    let fleet = g.fleet.replace('\\', "\\\\").replace('"', "\\\"");
    for (name, help, value) in [
        (
            "hotpatch_fleet_members",
            "Members registered in the fleet.",
            g.members,
        ),
        (
            "hotpatch_fleet_desired_revision",
            "Revision of the fleet's desired patch set.",
            g.desired_revision,
        ),
        (
            "hotpatch_fleet_applied_revision",
            "Revision of the patch set this member has applied.",
            g.applied_revision,
        ),
        (
            "hotpatch_fleet_rollout_phase",
            "Rollout in flight: 0 none, 1 prepare, 2 commit, 3 abort.",
            g.rollout_phase,
        ),
        (
            "hotpatch_fleet_generation_held",
            "1 while generation requests are answered 503 until the member converges.",
            held,
        ),
    ] {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{fleet=\"{fleet}\"}} {value}"
        );
    }
}

impl Control {
    /// The live model the proxy patches, when it has one and it is one file (a fleet
    /// rolls out to one file; a shard set is patched through the admin API).
    pub fn model(&self) -> Option<Arc<LiveModel>> {
        self.shared.model.as_ref()?.single().cloned()
    }

    /// The one file rollouts patch: refused without a model, and for a shard set.
    fn rollout_model(&self) -> Result<Arc<LiveModel>> {
        self.model().ok_or_else(|| {
            Error::Config(if self.serves_a_set() {
                "the proxy serves a shard set, and fleet rollouts patch one file".into()
            } else {
                "no model attached (start with --model)".into()
            })
        })
    }

    /// Whether the proxy patches a shard set (several files).
    pub fn serves_a_set(&self) -> bool {
        self.shared
            .model
            .as_ref()
            .is_some_and(|m| m.single().is_none())
    }

    /// Answers generation requests 503 with `reason` from now on; `None` serves them
    /// again.
    pub fn hold_generation(&self, reason: Option<String>) {
        *self
            .shared
            .generation_hold
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = reason;
    }

    /// Publishes the fleet gauges on `GET /metrics`.
    pub fn set_fleet_gauges(&self, gauges: FleetGauges) {
        *self.shared.fleet.lock().unwrap_or_else(|p| p.into_inner()) = Some(gauges);
    }

    /// Applies `patches` to the live model as one transaction, as the admin API applies
    /// a patch: under the model-ops lock, after a drain when asked, then the epoch
    /// advanced and the upstream's prompt caches erased.
    pub async fn apply_live(&self, patches: Vec<MemoryPatch>, drain: bool) -> Result<LiveApplied> {
        let shared = &self.shared;
        let model = self.rollout_model()?;
        let _ops = shared.model_ops.lock().await;
        let gate = if drain {
            Some(crate::admin::drain(shared, shared.limits.drain_timeout).await?)
        } else {
            None
        };
        let count = patches.len() as u64;
        let applied = tokio::task::spawn_blocking(move || model.apply_reported(patches))
            .await
            .map_err(|e| Error::Task(e.to_string()))?;
        let reports = match applied {
            Ok(reports) => reports,
            Err(error) => {
                shared.stats.patches_refused.fetch_add(1, Ordering::Relaxed);
                return Err(error.into());
            }
        };
        shared
            .stats
            .patches_applied
            .fetch_add(count, Ordering::Relaxed);
        shared.live_changes.fetch_add(1, Ordering::AcqRel);
        let epoch = shared.bump_epoch();
        crate::admin::erase_prompt_caches(shared).await;
        drop(gate);
        Ok(LiveApplied { reports, epoch })
    }

    /// Reverts the journal transaction `transaction` (every patch it applied) of the live
    /// model, as the admin API reverts a patch; returns the epoch after it.
    pub async fn revert_live_transaction(&self, transaction: u64, drain: bool) -> Result<u64> {
        let shared = &self.shared;
        let model = self.rollout_model()?;
        let _ops = shared.model_ops.lock().await;
        let gate = if drain {
            Some(crate::admin::drain(shared, shared.limits.drain_timeout).await?)
        } else {
            None
        };
        let reverted = tokio::task::spawn_blocking(move || model.revert_transaction(transaction))
            .await
            .map_err(|e| Error::Task(e.to_string()))??;
        shared
            .stats
            .patches_reverted
            .fetch_add(reverted.len() as u64, Ordering::Relaxed);
        shared.live_changes.fetch_add(1, Ordering::AcqRel);
        let epoch = shared.bump_epoch();
        crate::admin::erase_prompt_caches(shared).await;
        drop(gate);
        Ok(epoch)
    }
}
