//! The `Manager`: one coordinator over the byte, memory and server tiers.
//!
//! A user attaches models (a file shared with running servers, a private copy-on-write
//! view, or an owned buffer) and, optionally, a server; then applies patches without
//! choosing a tier (each kind of patch goes to the tier that owns it) and runs the
//! coordinated pipelines (`safety`, `optimize`, `boost`), each journaled and revertible
//! as one unit.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use byte_tier::named::BytePatch;
use memory_tier::{AttachMode, LiveModel, MemoryPatch, PatchPlan, PatchTarget, Payload};
use serde::Serialize;
use uuid::Uuid;

use crate::boost::HeldBoost;
use crate::error::{Error, Result};
use crate::report::{PipelineReport, Tier};
use crate::server::{Rule, ServerLink};

/// A handle to an attached model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(pub u32);

/// A patch of any tier.
#[derive(Clone, Debug)]
pub enum Patch {
    /// A change of the live region's values or bytes (memory tier).
    Memory(MemoryPatch),
    /// A named byte patch (byte tier), written through the live region so that it is
    /// page-protected and journaled like any other write.
    Byte(BytePatch),
    /// A rule of the attached server (server tier).
    Rule(Box<Rule>),
}

impl Patch {
    /// The tier that carries the patch out.
    pub fn tier(&self) -> Tier {
        match self {
            Patch::Memory(_) => Tier::Memory,
            Patch::Byte(_) => Tier::Byte,
            Patch::Rule(_) => Tier::Server,
        }
    }

    /// The patch's (or rule's) name.
    pub fn name(&self) -> &str {
        match self {
            Patch::Memory(p) => &p.name,
            Patch::Byte(p) => &p.name,
            Patch::Rule(r) => &r.name,
        }
    }
}

/// What applying a patch did, and what reverts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The tier that carried it out.
    pub tier: Tier,
    /// The patch's name.
    pub name: String,
    /// The memory-tier patch that holds it (memory and byte patches).
    pub memory_patch: Option<Uuid>,
    /// The file journal's transaction (shared file attachments).
    pub journal_transaction: Option<u64>,
}

/// Patches planned as one unit by [`Manager::plan_all`]: the memory and byte patches as
/// one memory-tier transaction plan (its writes, codec costs and stamp), then the server
/// rules. Reported as it is serialized; [`UnitPlan::on`] binds it to the manager that
/// applies it, unchanged.
#[derive(Debug, Serialize)]
pub struct UnitPlan {
    /// The memory and byte patches' transaction.
    #[serde(flatten)]
    pub memory: PatchPlan,
    /// The server rules added after it, by name.
    pub rules: Vec<String>,
    #[serde(skip)]
    model: ModelId,
    #[serde(skip)]
    rule_data: Vec<Rule>,
    #[serde(skip)]
    order: Vec<(Tier, String)>,
}

impl UnitPlan {
    /// What applying would give back, before any journal transaction exists.
    pub fn receipts(&self) -> Vec<Receipt> {
        let mut ids = self.memory.reports().into_iter().map(|r| r.id);
        self.order
            .iter()
            .map(|(tier, name)| Receipt {
                tier: *tier,
                name: name.clone(),
                memory_patch: if *tier == Tier::Server {
                    None
                } else {
                    ids.next()
                },
                journal_transaction: None,
            })
            .collect()
    }

    /// Binds the plan to the manager that applies it, as a `byte_tier::plan::Plan`.
    pub fn on(self, manager: &Manager) -> BoundUnitPlan<'_> {
        BoundUnitPlan {
            manager,
            plan: self,
        }
    }
}

/// A [`UnitPlan`] with its manager: reported as the plan, applied by
/// [`Manager::apply_planned`].
#[derive(Debug, Serialize)]
pub struct BoundUnitPlan<'a> {
    #[serde(skip)]
    manager: &'a Manager,
    #[serde(flatten)]
    plan: UnitPlan,
}

impl BoundUnitPlan<'_> {
    /// The plan.
    pub fn plan(&self) -> &UnitPlan {
        &self.plan
    }
}

impl byte_tier::plan::Plan for BoundUnitPlan<'_> {
    type Applied = Vec<Receipt>;
    type Error = Error;

    fn is_noop(&self) -> bool {
        self.plan.memory.is_noop() && self.plan.rules.is_empty()
    }

    fn apply(self) -> Result<Vec<Receipt>> {
        self.manager.apply_planned(self.plan)
    }
}

/// Counters across the tiers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ManagerStats {
    /// Models attached now.
    pub models_attached: usize,
    /// Whether a server is attached.
    pub server_attached: bool,
    /// Patches applied (every tier).
    pub patches_applied: u64,
    /// Patches reverted (every tier).
    pub patches_reverted: u64,
    /// Bytes written to model regions (patches, reverts and pipelines).
    pub bytes_modified: u64,
    /// Pipeline runs completed (and reverts of them).
    pub actions_completed: u64,
    /// The last thing done, in words.
    pub last_action: Option<String>,
}

#[derive(Debug)]
struct Attached {
    id: ModelId,
    path: Option<PathBuf>,
    mode: AttachMode,
    live: Arc<LiveModel>,
    /// Held around each change so that its byte count is its own. The live model
    /// serializes writers anyway; this only makes the accounting exact.
    writes: Arc<Mutex<()>>,
}

/// The coordinator. Every method takes `&self`; it is `Send + Sync` and can be shared
/// between threads behind an `Arc`.
#[derive(Debug, Default)]
pub struct Manager {
    models: RwLock<Vec<Attached>>,
    next_id: AtomicU32,
    server: RwLock<Option<Arc<dyn ServerLink>>>,
    pub(crate) boosts: Mutex<Vec<HeldBoost>>,
    patches_applied: AtomicU64,
    patches_reverted: AtomicU64,
    bytes_modified: AtomicU64,
    actions_completed: AtomicU64,
    last_action: Mutex<Option<String>>,
}

impl Manager {
    /// A manager with no model and no server attached. The byte and memory tiers need
    /// no set-up of their own; a server is attached with [`Manager::attach_server`].
    pub fn new() -> Manager {
        Manager::default()
    }

    /// Attaches the GGUF file at `path`: `Shared` writes through to the file (and to
    /// every process that maps it, a running llama-server included) and journals each
    /// change; `Private` and `Owned` change only this process's view.
    pub fn attach(&self, path: impl AsRef<Path>, mode: AttachMode) -> Result<ModelId> {
        let path = path.as_ref();
        let live = LiveModel::attach(path, mode)?;
        let id = ModelId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1);
        self.write_models().push(Attached {
            id,
            path: Some(path.to_owned()),
            mode,
            live: Arc::new(live),
            writes: Arc::new(Mutex::new(())),
        });
        self.record(format!(
            "attached {} ({mode:?}) as #{}",
            path.display(),
            id.0
        ));
        Ok(id)
    }

    /// The live model attached as `id`.
    pub fn model(&self, id: ModelId) -> Result<Arc<LiveModel>> {
        self.read_models()
            .iter()
            .find(|a| a.id == id)
            .map(|a| Arc::clone(&a.live))
            .ok_or(Error::NotAttached(id.0))
    }

    /// Runs `change` on the model `id` alone among the manager's writers and adds the
    /// bytes it wrote to the statistics.
    pub(crate) fn change<T>(
        &self,
        id: ModelId,
        change: impl FnOnce(&LiveModel) -> Result<T>,
    ) -> Result<(T, u64)> {
        let (live, writes) = self
            .read_models()
            .iter()
            .find(|a| a.id == id)
            .map(|a| (Arc::clone(&a.live), Arc::clone(&a.writes)))
            .ok_or(Error::NotAttached(id.0))?;
        let _alone = writes.lock().unwrap_or_else(|e| e.into_inner());
        let before = live.stats().bytes_written;
        let result = change(&live);
        let written = live.stats().bytes_written - before;
        self.bytes_modified.fetch_add(written, Ordering::Relaxed);
        result.map(|value| (value, written))
    }

    /// The file a model was attached from and its mode.
    pub fn source(&self, id: ModelId) -> Result<(Option<PathBuf>, AttachMode)> {
        self.read_models()
            .iter()
            .find(|a| a.id == id)
            .map(|a| (a.path.clone(), a.mode))
            .ok_or(Error::NotAttached(id.0))
    }

    /// The attached models.
    pub fn models(&self) -> Vec<ModelId> {
        self.read_models().iter().map(|a| a.id).collect()
    }

    /// Detaches one model; with `revert`, its applied patches are reverted first (for a
    /// shared file they otherwise stay, journaled).
    pub fn detach(&self, id: ModelId, revert: bool) -> Result<()> {
        let attached = {
            let mut models = self.write_models();
            let index = models
                .iter()
                .position(|a| a.id == id)
                .ok_or(Error::NotAttached(id.0))?;
            if Arc::strong_count(&models[index].live) > 1 {
                return Err(Error::Refused(format!(
                    "model #{} is still in use by another holder; drop it first",
                    id.0
                )));
            }
            models.remove(index)
        };
        let before = attached.live.stats().bytes_written;
        let live = Arc::into_inner(attached.live).ok_or_else(|| {
            Error::Refused(format!("model #{} is still in use by another holder", id.0))
        })?;
        if revert {
            let reverted = live.revert_all();
            self.bytes_modified
                .fetch_add(live.stats().bytes_written - before, Ordering::Relaxed);
            reverted?;
        }
        live.detach(false)?;
        self.record(format!("detached #{}", id.0));
        Ok(())
    }

    /// Detaches every model (and releases boosts held for them).
    pub fn detach_all(&self, revert: bool) -> Result<()> {
        for id in self.models() {
            self.detach(id, revert)?;
        }
        Ok(())
    }

    /// Attaches a server: pipelines and rule patches then reach it.
    pub fn attach_server(&self, link: Arc<dyn ServerLink>) {
        *self.server.write().unwrap_or_else(|e| e.into_inner()) = Some(link);
        self.record("attached a server".to_owned());
    }

    /// Detaches the server (its rules stay as they are).
    pub fn detach_server(&self) {
        *self.server.write().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The attached server.
    pub fn server(&self) -> Option<Arc<dyn ServerLink>> {
        self.server
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies one patch on the tier that owns it.
    pub fn apply(&self, id: ModelId, patch: Patch) -> Result<Receipt> {
        self.apply_all(id, vec![patch])
            .map(|mut receipts| receipts.remove(0))
    }

    /// Plans patches as one unit without writing anything: the memory and byte patches
    /// as one memory-tier transaction plan, the server rules after it (refused now when
    /// there are rules and no server).
    pub fn plan_all(&self, id: ModelId, patches: Vec<Patch>) -> Result<UnitPlan> {
        let live = self.model(id)?;
        let Unit {
            order,
            memory,
            rules,
        } = Unit::of(patches, live.read().bytes())?;
        self.rule_server_for(&rules)?;
        Ok(UnitPlan {
            memory: live.plan_transaction(memory)?,
            rules: rules.iter().map(|r| r.name.clone()).collect(),
            model: id,
            rule_data: rules,
            order,
        })
    }

    /// Applies a [`UnitPlan`] as it was made: the memory transaction without planning
    /// it again (refused when the model changed since), then the server rules; if a
    /// rule is refused, everything applied before it is reverted.
    pub fn apply_planned(&self, plan: UnitPlan) -> Result<Vec<Receipt>> {
        let UnitPlan {
            memory,
            model: id,
            rule_data: rules,
            order,
            ..
        } = plan;
        let server = self.rule_server_for(&rules)?;
        let ids: Vec<Uuid> = if memory.patches.is_empty() {
            Vec::new()
        } else {
            self.change(id, |live| {
                Ok(live
                    .apply_planned(memory)?
                    .into_iter()
                    .map(|r| r.id)
                    .collect())
            })?
            .0
        };
        self.finish_unit(id, ids, rules, server, order)
    }

    /// Applies patches as one unit: the memory and byte patches in one memory-tier
    /// transaction (all or none, one journal transaction for a shared file), then the
    /// server rules; if a rule is refused, everything applied before it is reverted.
    pub fn apply_all(&self, id: ModelId, patches: Vec<Patch>) -> Result<Vec<Receipt>> {
        let live = self.model(id)?;
        let Unit {
            order,
            memory,
            rules,
        } = Unit::of(patches, live.read().bytes())?;
        let server = self.rule_server_for(&rules)?;
        let (ids, _) = if memory.is_empty() {
            (Vec::new(), 0)
        } else {
            self.change(id, |live| Ok(live.apply_all(memory)?))?
        };
        self.finish_unit(id, ids, rules, server, order)
    }

    /// The server that takes `rules`: `None` when there are none, refused when there
    /// are rules and no attached server.
    pub(crate) fn rule_server_for(&self, rules: &[Rule]) -> Result<Option<Arc<dyn ServerLink>>> {
        if rules.is_empty() {
            return Ok(None);
        }
        self.server()
            .map(Some)
            .ok_or_else(|| Error::Refused("server rules need an attached server".to_owned()))
    }

    /// After the memory transaction `ids` of model `id`: adds the server rules (undoing
    /// everything on a refusal) and makes the receipts in the patches' order.
    fn finish_unit(
        &self,
        id: ModelId,
        ids: Vec<Uuid>,
        rules: Vec<Rule>,
        server: Option<Arc<dyn ServerLink>>,
        order: Vec<(Tier, String)>,
    ) -> Result<Vec<Receipt>> {
        let live = self.model(id)?;
        let mut added: Vec<String> = Vec::new();
        if let Some(server) = &server {
            for rule in rules {
                let name = rule.name.clone();
                if let Err(error) = server.add_rule(rule) {
                    let mut rollback = Vec::new();
                    for name in added.iter().rev() {
                        if let Err(e) = server.remove_rule(name) {
                            rollback.push(format!("removing rule {name:?}: {e}"));
                        }
                    }
                    let reverted = self.change(id, |live| {
                        for patch in ids.iter().rev() {
                            live.revert(*patch)?;
                        }
                        Ok(())
                    });
                    if let Err(e) = reverted {
                        rollback.push(format!("reverting the memory patches: {e}"));
                    }
                    if rollback.is_empty() {
                        return Err(error);
                    }
                    return Err(Error::RollbackFailed {
                        error: Box::new(error),
                        rollback,
                    });
                }
                added.push(name);
            }
        }
        let mut ids = ids.into_iter();
        let receipts: Vec<Receipt> = order
            .into_iter()
            .map(|(tier, name)| {
                let memory_patch = if tier == Tier::Server {
                    None
                } else {
                    ids.next()
                };
                Receipt {
                    tier,
                    name,
                    memory_patch,
                    journal_transaction: memory_patch.and_then(|id| live.journal_transaction(id)),
                }
            })
            .collect();
        self.patches_applied
            .fetch_add(receipts.len() as u64, Ordering::Relaxed);
        self.record(format!("applied {} patch(es) to #{}", receipts.len(), id.0));
        Ok(receipts)
    }

    /// Reverts what a receipt applied.
    pub fn revert(&self, id: ModelId, receipt: &Receipt) -> Result<()> {
        match (receipt.tier, receipt.memory_patch) {
            (Tier::Server, _) => {
                let server = self
                    .server()
                    .ok_or_else(|| Error::Refused("no server is attached".to_owned()))?;
                server.remove_rule(&receipt.name)?;
            }
            (_, Some(patch)) => {
                self.change(id, |live| Ok(live.revert(patch)?))?;
            }
            (_, None) => {
                return Err(Error::Refused(format!(
                    "{:?} holds no patch to revert",
                    receipt.name
                )));
            }
        }
        self.patches_reverted.fetch_add(1, Ordering::Relaxed);
        self.record(format!("reverted {:?} on #{}", receipt.name, id.0));
        Ok(())
    }

    /// Reverts the memory or byte patch applied under `name` to the model `id`.
    pub fn revert_by_name(&self, id: ModelId, name: &str) -> Result<()> {
        self.change(id, |live| Ok(live.revert_by_name(name)?))?;
        self.patches_reverted.fetch_add(1, Ordering::Relaxed);
        self.record(format!("reverted {name:?} on #{}", id.0));
        Ok(())
    }

    /// Undoes a pipeline run as one unit: its memory patches (newest first), its server
    /// rules and cache setting, its boost, and the file it wrote (when unchanged since).
    pub fn revert_pipeline(&self, id: ModelId, report: &PipelineReport) -> Result<()> {
        let undo = &report.undo;
        if !undo.memory_patches.is_empty() {
            self.change(id, |live| {
                for patch in undo.memory_patches.iter().rev() {
                    live.revert(*patch)?;
                }
                Ok(())
            })?;
        }
        if !undo.server_rules.is_empty() || undo.server_cache_before.is_some() {
            let server = self.server().ok_or_else(|| {
                Error::Refused("the run changed a server that is no longer attached".into())
            })?;
            for name in undo.server_rules.iter().rev() {
                server.remove_rule(name)?;
            }
            if let Some(enabled) = undo.server_cache_before {
                server.set_cache_enabled(enabled)?;
            }
        }
        if let Some(boost) = undo.boost {
            self.release_boost(boost)?;
        }
        if let Some((path, sha256)) = &undo.output {
            crate::optimize::remove_output(path, sha256)?;
        }
        self.actions_completed.fetch_add(1, Ordering::Relaxed);
        self.record(format!("reverted the {} pipeline run", report.pipeline));
        Ok(())
    }

    /// Counters across the tiers.
    pub fn stats(&self) -> ManagerStats {
        ManagerStats {
            models_attached: self.read_models().len(),
            server_attached: self.server().is_some(),
            patches_applied: self.patches_applied.load(Ordering::Relaxed),
            patches_reverted: self.patches_reverted.load(Ordering::Relaxed),
            bytes_modified: self.bytes_modified.load(Ordering::Relaxed),
            actions_completed: self.actions_completed.load(Ordering::Relaxed),
            last_action: self
                .last_action
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }

    pub(crate) fn record(&self, action: String) {
        *self.last_action.lock().unwrap_or_else(|e| e.into_inner()) = Some(action);
    }

    /// Counts a completed pipeline run (its writes were counted as they were made).
    pub(crate) fn completed(&self, report: &PipelineReport) {
        self.actions_completed.fetch_add(1, Ordering::Relaxed);
        self.record(format!(
            "{} pipeline on {}: {} steps",
            report.pipeline,
            report.target.display(),
            report.steps.len()
        ));
    }

    fn read_models(&self) -> std::sync::RwLockReadGuard<'_, Vec<Attached>> {
        self.models.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_models(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Attached>> {
        self.models.write().unwrap_or_else(|e| e.into_inner())
    }
}

/// A byte patch as a memory patch: its range resolved in the region's bytes, its
/// expected bytes checked, its new bytes computed; priority and name carried over.
/// Patches of one unit, split by where they go: byte patches become memory patches
/// against `bytes`, rules wait for the server; `order` keeps the receipts' order.
struct Unit {
    order: Vec<(Tier, String)>,
    memory: Vec<MemoryPatch>,
    rules: Vec<Rule>,
}

impl Unit {
    fn of(patches: Vec<Patch>, bytes: &[u8]) -> Result<Unit> {
        let mut unit = Unit {
            order: Vec::with_capacity(patches.len()),
            memory: Vec::new(),
            rules: Vec::new(),
        };
        for patch in patches {
            unit.order.push((patch.tier(), patch.name().to_owned()));
            match patch {
                Patch::Memory(p) => unit.memory.push(p),
                Patch::Byte(p) => unit.memory.push(byte_patch_as_memory(&p, bytes)?),
                Patch::Rule(rule) => unit.rules.push(*rule),
            }
        }
        Ok(unit)
    }
}

/// The memory and byte patches of `patches` as memory patches against `bytes` (rules
/// are left out).
pub(crate) fn memory_patches(patches: Vec<Patch>, bytes: &[u8]) -> Result<Vec<MemoryPatch>> {
    Ok(Unit::of(patches, bytes)?.memory)
}

fn byte_patch_as_memory(patch: &BytePatch, bytes: &[u8]) -> Result<MemoryPatch> {
    let range = patch.resolve(bytes)?;
    let current = &bytes[range.start as usize..range.end as usize];
    let new = patch.new_bytes(current)?;
    let mut memory = MemoryPatch::new(
        patch.name.clone(),
        PatchTarget::Raw(range),
        Payload::Bytes(new),
    )
    .with_priority(patch.priority);
    memory.kind = memory_tier::PatchKind::Custom;
    Ok(memory)
}
